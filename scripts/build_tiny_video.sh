#!/usr/bin/env bash
# Rebuild the shipped tiny video model pipelines/assets/tiny-video-16px/ (what `make demo` finetunes):
# synth 512 videos (seed 2000) -> preprocess to 16 px -> `pyoco train` stage 1 (pipelines/configs/pretrain_video16.yaml:
# the shipped image model inflated, with the caption-conv motion branch, 1600 steps) -> stage 2 (the same config
# from stage 1's package: half the learning rate, a longer warmup, another seed) -> copy the package.
# About 52 min on 2 CPUs.
source "$(dirname "$0")/asset_build.sh"
CONFIG=pipelines/configs/pretrain_video16.yaml
OUT=./pyoco-out/tiny-video-16px
synth_and_preprocess $OUT $CONFIG 2000
$PYOCO train --config $CONFIG --output $OUT/stage1
$PYOCO train --config $CONFIG --output $OUT/model \
  --set model.pretrained=$OUT/stage1 --set train.lr=0.0005 --set train.warmup_steps=50 --set train.seed=1
publish $OUT/model "${1:-pipelines/assets/tiny-video-16px}"
