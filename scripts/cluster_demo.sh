#!/usr/bin/env bash
# `make cluster-demo` [KEEP=1]: the demo workflow as a Ray job on the local 2-node token-auth cluster.
#   1. infra/local/up.sh starts a Ray head + 1 worker node, an mlflow server and moto S3 on 127.0.0.1, with
#      the bucket that pipelines/configs/cluster_demo.yaml writes to (every path in it is on that bucket);
#   2. `pyoco submit --wait` runs synth -> preprocess -> pretrain -> train -> evaluate -> register ->
#      promote -> sample on the cluster, streaming the job's logs;
#   3. a summary: the champion, the sample (copied to demo/cluster/), where the outputs are (s3:// URIs);
#   4. infra/local/down.sh stops what step 1 started, also when a step fails or on Ctrl-C.
# KEEP=1 (or --keep) leaves the stack running to look around; `infra/local/down.sh` stops it then.
# Each line of the by-hand recipe in infra/local/README.md is a line of this script (a test checks it).
set -euo pipefail
cd "$(dirname "$0")/.."
keep="${KEEP:-0}"
for arg in "$@"; do
  case "$arg" in
    --keep) keep=1 ;;
    -h | --help) sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "error: unknown argument $arg (only --keep)" >&2; exit 2 ;;
  esac
done
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false RAY_USAGE_STATS_ENABLED=0
start=$(date +%s)
up=0

finish() {
  local rc=$?
  if [ "$up" = 1 ] && [ "$keep" = 1 ]; then
    echo "the local stack keeps running (KEEP=1): infra/local/status.sh; infra/local/down.sh stops it"
  elif [ "$up" = 1 ]; then
    infra/local/down.sh
  fi
  [ "$rc" = 0 ] || echo "cluster demo FAILED (exit $rc) after $(($(date +%s) - start))s" >&2
  exit "$rc"
}
trap finish EXIT
trap 'exit 130' INT TERM

# up.sh stops whatever it started itself when it fails; `up=1` only once there is something of ours to stop
# (when a stack already runs from the same state folder, up.sh refuses and that stack is left alone).
infra/local/up.sh --bucket pyoco-demo
up=1
eval "$(.venv/bin/python infra/local/services.py env)"
.venv/bin/pyoco submit --config pipelines/configs/cluster_demo.yaml --address "$RAY_ADDRESS" --wait

# The job's own summary is in the log above; here what a user looks at next, read back from S3 and MLflow.
.venv/bin/pyoco registry history --name pyoco-cluster-demo | tail -n 8
.venv/bin/python - <<'PY'
from pathlib import Path

import av
from mlflow.tracking import MlflowClient

from pyoco.config import load_config
from pyoco.storage import read_bytes

cfg = load_config("pipelines/configs/cluster_demo.yaml")
out = cfg.output.rstrip("/")
champion = MlflowClient().get_model_version_by_alias(cfg.mlflow.registered_model, "champion")
local = Path("demo/cluster")
local.mkdir(parents=True, exist_ok=True)
for kind in ("mp4", "gif"):
    (local / f"sample.{kind}").write_bytes(read_bytes(f"{out}/sample.{kind}"))
with av.open("demo/cluster/sample.mp4") as c:
    n = sum(1 for _ in c.decode(video=0))
assert n == cfg.sample.num_frames, (n, cfg.sample.num_frames)
print()
print(f"champion: models:/{cfg.mlflow.registered_model}@champion = version {champion.version} (run {champion.run_id})")
print(f"sample:   {out}/sample.mp4 (+ .gif) -> demo/cluster/sample.mp4 ({n} frames), demo/cluster/sample.gif")
print(f"          prompt {cfg.sample.prompt!r}")
print(f"data:     {cfg.preprocess.output} (clips/, rejects/, manifest.json); raw videos {cfg.synth.out}")
print(f"model:    {out}/model (diffusers format, safetensors); checkpoints {out}/ray")
print(f"state:    {out}/workflow/state.json (a re-submit skips every unchanged step)")
PY
echo "cluster demo finished in $(($(date +%s) - start))s"
if [ "$keep" = 1 ]; then
  echo "  MLflow UI: $MLFLOW_TRACKING_URI   Ray dashboard: $RAY_ADDRESS (token: $RAY_AUTH_TOKEN_PATH)"
  echo "  this shell's settings: eval \"\$(.venv/bin/python infra/local/services.py env)\""
fi
