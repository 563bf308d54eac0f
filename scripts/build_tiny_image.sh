#!/usr/bin/env bash
# Rebuild the shipped tiny image model pipelines/assets/tiny-image-16px/ (what `make demo` finetunes):
# synth 512 videos (seed 1000) -> preprocess to 16 px -> `pyoco pretrain-image` -> copy the package.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false RAY_USAGE_STATS_ENABLED=0
export MLFLOW_TRACKING_URI="${MLFLOW_TRACKING_URI:-sqlite:///$PWD/pyoco-out/mlflow.db}"
CONFIG=pipelines/configs/pretrain_tiny16.yaml
OUT=./pyoco-out/tiny-image-16px
DEST="${1:-pipelines/assets/tiny-image-16px}"
mkdir -p pyoco-out
PYOCO=.venv/bin/pyoco
$PYOCO data synth --out $OUT/raw --videos 512 --shards 8 --seed 1000 --frames 16 --size 32 --fps 8
$PYOCO preprocess --config $CONFIG --no-progress
$PYOCO pretrain-image --config $CONFIG --data $OUT/data/clips --output $OUT/pretrained-image
rm -rf "$DEST"
mkdir -p "$DEST"
cp -r $OUT/pretrained-image/. "$DEST/"
echo "image model written to $DEST"
