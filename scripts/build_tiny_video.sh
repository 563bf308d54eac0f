#!/usr/bin/env bash
# Rebuild the shipped tiny video model pipelines/assets/tiny-video-16px/ (what `make demo` finetunes):
# synth 512 videos (seed 2000) -> preprocess to 16 px -> `pyoco train` stage 1 (pipelines/configs/pretrain_video16.yaml:
# the shipped image model inflated, with the caption-conv motion branch, 1600 steps) -> stage 2
# (pretrain_video16_stage2.yaml: 1600 more steps from stage 1) -> copy the package. About 52 min on 2 CPUs.
source "$(dirname "$0")/asset_build.sh"
CONFIG=pipelines/configs/pretrain_video16.yaml
OUT=./pyoco-out/tiny-video-16px
synth_and_preprocess $OUT $CONFIG 2000
$PYOCO train --config $CONFIG --output $OUT/stage1
$PYOCO train --config pipelines/configs/pretrain_video16_stage2.yaml --output $OUT/model
publish $OUT/model "${1:-pipelines/assets/tiny-video-16px}"
