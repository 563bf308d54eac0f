# Shared by scripts/build_tiny_image.sh and scripts/build_tiny_video.sh (source it; not run on its own):
# the offline environment, then `synth_and_preprocess OUT CONFIG SEED` and `publish FOLDER DEST`.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false RAY_USAGE_STATS_ENABLED=0
export MLFLOW_TRACKING_URI="${MLFLOW_TRACKING_URI:-sqlite:///$PWD/pyoco-out/mlflow.db}"
mkdir -p pyoco-out
PYOCO=.venv/bin/pyoco

# 512 synth videos of seed SEED (never the demo's 0) into OUT/raw, preprocessed by CONFIG's preprocess section.
synth_and_preprocess() {
  local out=$1 config=$2 seed=$3
  $PYOCO data synth --out "$out/raw" --videos 512 --shards 8 --seed "$seed" --frames 16 --size 32 --fps 8
  $PYOCO preprocess --config "$config" --no-progress
}

# Replace the asset folder DEST with the package FOLDER.
publish() {
  local folder=$1 dest=$2
  rm -rf "$dest"
  mkdir -p "$dest"
  cp -r "$folder/." "$dest/"
  echo "model written to $dest"
}
