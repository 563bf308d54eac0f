#!/usr/bin/env bash
# Core demo: a tiny image UNet inflated to a video model, sampled with the progressive prior.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
PYOCO=.venv/bin/pyoco
start=$(date +%s)
rm -rf demo/model
$PYOCO model init --out demo/model --size 32 --frames 8 --noise progressive --alpha 1.0
$PYOCO sample --model demo/model --prompt "a red circle moves to the left" --out demo/sample.mp4 \
  --frames 8 --steps 10 --noise progressive --alpha 1.0 --seed 0 --gif
$PYOCO noise stats --kind progressive --alpha 1.0 --frames 8 --png demo/noise_progressive.png
.venv/bin/python - <<'PY'
import av
with av.open("demo/sample.mp4") as c:
    n = sum(1 for _ in c.decode(video=0))
print(f"demo/sample.mp4 decodes to {n} frames")
assert n == 8, n
PY
echo "demo finished in $(( $(date +%s) - start ))s: demo/sample.mp4, demo/sample.gif, demo/noise_progressive.png"
