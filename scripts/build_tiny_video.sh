#!/usr/bin/env bash
# Rebuild the shipped tiny video model pipelines/assets/tiny-video-16px/ (what `make demo` finetunes):
# synth 512 videos (seed 2000) -> preprocess to 16 px -> `pyoco train` stage 1 (pipelines/configs/pretrain_video16.yaml:
# the shipped image model inflated, with the caption-conv motion branch, 1600 steps) -> stage 2
# (pretrain_video16_stage2.yaml: 1600 more steps from stage 1) -> copy the package. About 45 min on 2 CPUs.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false RAY_USAGE_STATS_ENABLED=0
export MLFLOW_TRACKING_URI="${MLFLOW_TRACKING_URI:-sqlite:///$PWD/pyoco-out/mlflow.db}"
CONFIG=pipelines/configs/pretrain_video16.yaml
OUT=./pyoco-out/tiny-video-16px
DEST="${1:-pipelines/assets/tiny-video-16px}"
mkdir -p pyoco-out
PYOCO=.venv/bin/pyoco
$PYOCO data synth --out $OUT/raw --videos 512 --shards 8 --seed 2000 --frames 16 --size 32 --fps 8
$PYOCO preprocess --config $CONFIG --no-progress
$PYOCO train --config $CONFIG --output $OUT/stage1
$PYOCO train --config pipelines/configs/pretrain_video16_stage2.yaml --output $OUT/model
rm -rf "$DEST"
mkdir -p "$DEST"
cp -r $OUT/model/. "$DEST/"
echo "video model written to $DEST"
