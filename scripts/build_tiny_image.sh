#!/usr/bin/env bash
# Rebuild the shipped tiny image model pipelines/assets/tiny-image-16px/ (what the tiny video model inflates):
# synth 512 videos (seed 1000) -> preprocess to 16 px -> `pyoco pretrain-image` -> copy the package.
source "$(dirname "$0")/asset_build.sh"
CONFIG=pipelines/configs/pretrain_tiny16.yaml
OUT=./pyoco-out/tiny-image-16px
synth_and_preprocess $OUT $CONFIG 1000
$PYOCO pretrain-image --config $CONFIG --data $OUT/data/clips --output $OUT/pretrained-image
publish $OUT/pretrained-image "${1:-pipelines/assets/tiny-image-16px}"
