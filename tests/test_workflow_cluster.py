"""Issues 6 §6 and 15: the whole workflow as a Ray job on a real 2-node local cluster, with its data on S3,
started the way the README documents it: ``make cluster-demo``, i.e. ``scripts/cluster_demo.sh``.

The script runs in a copy of the checkout (what a fresh clone holds, plus the venv), with the user's AWS
credentials in the shell and no ``~/.ray/auth_token``. It starts ``infra/local`` (a token-auth Ray head plus
one worker node that alone offers the ``preprocess`` resource, a moto S3 endpoint with the bucket, an
``mlflow server``), submits ``pipelines/configs/cluster_demo.yaml`` with the real ``pyoco submit --wait``
(synth -> s3://pyoco-demo/raw, preprocess -> s3://pyoco-demo/cluster-demo/data, pretrain, train, evaluate,
register, promote, sample), and prints the champion and the sample it copied to ``demo/cluster/``. It runs
with ``KEEP=1`` so that this test can look at what it left; then the documented ``infra/local/down.sh``
stops it. Checked:

- the documented commands (README.md, infra/local/README.md, the config's header) are the script's lines,
  and ``make cluster-demo`` runs the script;
- the script succeeded with a champion and a sample (decoded by the script; both files are here);
- the job succeeded; its record carries credentials only as ``${NAME}`` references;
- the preprocess manifest (decoded on the ``preprocess`` node only) and the training checkpoint are on S3;
- the registry's ``champion`` alias points at the version the workflow registered;
- a re-submit skips every step ("unchanged ... skipped"), rewrites no workflow state, registers nothing;
- Jobs API calls without the token are refused (401) and create no job;
- neither the AWS secret key nor the Ray token appears in any MLflow param, tag, metric name, text artifact
  (all runs of all experiments, logged models, registered versions), the MLflow database and artifact store,
  the job logs, the job records, the script's output, the Ray nodes' log folders or the workflow state on S3;
- the stack itself (what test_infra.py once started a stack of its own for): ``status`` reports it healthy
  with token auth and 2 nodes, a second start refuses, every listening socket of its processes is on
  127.0.0.1, the token file is private and the token is in no argv, state file, stack log or ``env`` line;
- ``infra/local/down.sh`` leaves none of the stack's processes running, nor its Ray temp folders, and
  ``status`` reports it stopped.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.fixtures_infra import (
    REPO,
    SCRUBBED,
    TEST_AWS_KEY_ID,
    TEST_AWS_SECRET,
    listening_addresses,
    load_services,
    stack_pids,
    token_of,
)

CONFIG_REL = "pipelines/configs/cluster_demo.yaml"
SCRIPT_REL = "scripts/cluster_demo.sh"
BUCKET = "pyoco-demo"
OUT = "cluster-demo"  # the config's output prefix on the bucket
MODEL = "pyoco-cluster-demo"
STEPS = ["synth", "preprocess", "pretrain", "train", "evaluate", "register", "promote", "sample"]
BINARY_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".ckpt", ".mp4", ".gif", ".png", ".jpg", ".parquet")
MAX_TEXT_ARTIFACT = 2 * 2**20


# ------------------------------------------------------------------------------------------------ helpers
def _clone(dst: Path) -> Path:
    """What a fresh clone of this checkout holds (git's tracked and untracked-but-not-ignored files), plus
    ``.venv`` pointing at the interpreter's environment (``make`` would create it there)."""
    names = subprocess.run(
        ["git", "-C", str(REPO), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        capture_output=True,
        check=True,
        timeout=60,
    ).stdout.decode()
    copied = 0
    for rel in filter(None, names.split("\0")):
        src = REPO / rel
        if rel == ".venv" or rel.startswith(".venv/") or not src.is_file() or src.is_symlink():
            continue
        (dst / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, dst / rel)
        copied += 1
    assert copied > 50 and (dst / SCRIPT_REL).is_file() and (dst / CONFIG_REL).is_file(), copied
    assert not (dst / "demo").exists() and not (dst / ".pyoco-local").exists()
    (dst / ".venv").symlink_to(Path(sys.prefix), target_is_directory=True)
    return dst


def _shell_env(clone: Path, home: Path) -> dict[str, str]:
    """A user's shell in the clone: their AWS credentials set (a fake, distinctive secret), nothing of the
    session's servers or tokens, and no ``~/.ray/auth_token`` to fall back on."""
    drop = (*SCRUBBED, "AWS_ENDPOINT_URL", "MLFLOW_TRACKING_URI", "PYOCO_LOCAL_DIR", "KEEP")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env.update(
        AWS_ACCESS_KEY_ID=TEST_AWS_KEY_ID,
        AWS_SECRET_ACCESS_KEY=TEST_AWS_SECRET,
        AWS_DEFAULT_REGION="us-east-1",
        HOME=str(home),
        PYTHONPATH=str(clone),  # the clone's code, also on the Ray nodes, not an editable install's
        PYTHONUNBUFFERED="1",
    )
    return env


def _user_env(shell: dict[str, str], state_dir: Path) -> dict[str, str]:
    """That shell after ``eval "$(.venv/bin/python infra/local/services.py env)"``: the token by path only."""
    env = dict(shell)
    for line in load_services().env_lines(state_dir):
        if line.startswith("export "):
            key, _, value = line.removeprefix("export ").partition("=")
            env[key] = shlex.split(value)[0]
    assert "RAY_AUTH_TOKEN" not in env and env["RAY_AUTH_TOKEN_PATH"].endswith("auth_token")
    return env


def _submit(env: dict[str, str], cwd: Path, address: str) -> tuple[subprocess.CompletedProcess, float]:
    argv = [str(cwd / ".venv" / "bin" / "pyoco"), "submit", "--config", CONFIG_REL, "--address", address]
    t0 = time.monotonic()
    proc = subprocess.run([*argv, "--wait"], env=env, cwd=cwd, capture_output=True, text=True, timeout=720)
    return proc, time.monotonic() - t0


def _job_id(proc: subprocess.CompletedProcess) -> str:
    job_id = proc.stdout.splitlines()[0].strip()
    assert job_id.startswith("pyoco-cluster-demo-"), proc.stdout[:500]
    return job_id


def _tail(proc: subprocess.CompletedProcess, n: int = 4000) -> str:
    return f"--- stdout ---\n{proc.stdout[-n:]}\n--- stderr ---\n{proc.stderr[-n:]}"


def _bash_blocks(markdown: str) -> list[list[str]]:
    """The command lines (trailing ``# comments`` dropped) of each ```bash block."""
    blocks = re.findall(r"```bash\n(.*?)```", markdown, re.S)
    return [[re.sub(r"\s+#\s.*$", "", ln).strip() for ln in b.splitlines() if ln.strip()] for b in blocks]


def _s3(state: dict):
    import boto3

    return boto3.client(
        "s3",
        endpoint_url=state["s3"]["url"],
        aws_access_key_id=TEST_AWS_KEY_ID,
        aws_secret_access_key=TEST_AWS_SECRET,
        region_name="us-east-1",
    )


def _keys(s3, prefix: str) -> dict[str, int]:
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
    return {o["Key"]: o["Size"] for page in pages for o in page.get("Contents", [])}


def _mlflow_texts(tracking_uri: str, dst: Path) -> dict[str, str]:
    """{where: text} for everything the MLflow server holds: per run of every experiment (deleted ones
    included) its params, tags and metric names, and its text artifacts (downloaded); logged models'
    params, tags and text artifacts; registered models' and versions' tags and descriptions."""
    import mlflow.artifacts
    from mlflow.entities import ViewType
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    texts: dict[str, str] = {}

    def artifacts(label: str, list_fn, download_fn, path: str | None = None) -> None:
        for info in list_fn(path):
            if info.is_dir:
                artifacts(label, list_fn, download_fn, info.path)
            elif not info.path.endswith(BINARY_SUFFIXES) and (info.file_size or 0) <= MAX_TEXT_ARTIFACT:
                local = Path(download_fn(info.path))
                texts[f"{label} artifact {info.path}"] = local.read_bytes().decode("utf-8", "replace")

    experiments = client.search_experiments(view_type=ViewType.ALL)
    for exp in experiments:
        texts[f"experiment {exp.name} tags"] = json.dumps(exp.tags)
        runs = client.search_runs([exp.experiment_id], run_view_type=ViewType.ALL, max_results=5000)
        for run in runs:
            rid = run.info.run_id
            label = f"run {run.info.run_name} ({rid})"
            texts[f"{label} params"] = json.dumps(run.data.params)
            texts[f"{label} tags"] = json.dumps(run.data.tags)
            texts[f"{label} metric names"] = json.dumps(sorted(run.data.metrics))
            out = dst / rid
            out.mkdir(parents=True, exist_ok=True)
            artifacts(
                label,
                lambda p, rid=rid: client.list_artifacts(rid, p),
                lambda p, rid=rid, out=out: client.download_artifacts(rid, p, str(out)),
            )
        for model in client.search_logged_models([exp.experiment_id]):
            mid = model.model_id
            label = f"logged model {model.name} ({mid})"
            texts[f"{label} params+tags"] = json.dumps([model.params, model.tags])
            out = dst / mid
            out.mkdir(parents=True, exist_ok=True)
            artifacts(
                label,
                lambda p, mid=mid: client.list_logged_model_artifacts(mid, p),
                lambda p, model=model, out=out: mlflow.artifacts.download_artifacts(
                    artifact_uri=f"{model.artifact_location.rstrip('/')}/{p}",
                    dst_path=str(out),
                    tracking_uri=tracking_uri,
                ),
            )
    for rm in client.search_registered_models():
        texts[f"registered model {rm.name}"] = json.dumps([rm.tags, rm.description, rm.aliases])
        for mv in client.search_model_versions(f"name='{rm.name}'"):
            texts[f"model version {rm.name}/{mv.version}"] = json.dumps(
                [mv.tags, mv.description, mv.source, mv.run_id]
            )
    assert len(experiments) >= 1 and any("artifact" in k for k in texts), sorted(texts)[:20]
    return texts


def _files_containing(roots: list[Path], needle: bytes) -> list[str]:
    hits = []
    for root in roots:
        for path in root.rglob("*"):
            try:
                if path.is_file() and not path.is_symlink() and needle in path.read_bytes():
                    hits.append(str(path))
            except OSError:
                continue  # a socket or a file removed while walking
    return hits


# --------------------------------------------------------------------------------------------------- tests
def test_documented_cluster_commands_are_the_scripts():
    """README.md says `make cluster-demo`; infra/local/README.md and the config's header spell out the same
    steps by hand: each of their lines is a line of the script the test below runs."""
    script_lines = {ln.strip() for ln in (REPO / SCRIPT_REL).read_text().splitlines()}
    readme = [b for b in _bash_blocks((REPO / "README.md").read_text()) if "make cluster-demo" in b]
    assert readme == [["make cluster-demo"]], readme
    recipe = subprocess.run(
        ["make", "--no-print-directory", "-n", "-o", ".venv/.pyoco-installed", "cluster-demo"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert recipe.returncode == 0 and recipe.stdout.strip() == f"bash {SCRIPT_REL}", recipe

    local = _bash_blocks((REPO / "infra/local/README.md").read_text())
    by_hand = [b for b in local if any(CONFIG_REL in ln for ln in b)]
    assert len(by_hand) == 1 and len(by_hand[0]) == 4, local
    header = [
        ln.removeprefix("#").strip()
        for ln in (REPO / CONFIG_REL).read_text().splitlines()
        if ln.startswith("#   ")
    ]
    assert header == by_hand[0], (header, by_hand[0])
    missing = [ln for ln in by_hand[0] if ln not in script_lines]
    assert not missing, f"documented but not what {SCRIPT_REL} runs: {missing}"
    assert f"--bucket {BUCKET}" in by_hand[0][0] and "down.sh" in by_hand[0][-1]


@pytest.mark.slow
@pytest.mark.timeout(1500)  # measured 11.5 min on the shared 2-core machine (load avg 15-30)
def test_cluster_demo_script_runs_the_workflow_on_a_two_node_cluster(tmp_path, monkeypatch):
    services = load_services()
    monkeypatch.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    timings: dict[str, float] = {}
    t_all = time.monotonic()
    clone = _clone(tmp_path / "clone")
    state_dir = clone / ".pyoco-local"  # the script's default, as in a fresh clone
    home = tmp_path / "home"
    home.mkdir()
    try:
        _run_and_check(services, tmp_path, clone, state_dir, home, timings)
    finally:
        services.stop(state_dir)  # a no-op after the documented down.sh; the safety net when a check failed
        timings["total"] = time.monotonic() - t_all
        print("cluster demo test: " + ", ".join(f"{k} {v:.1f}s" for k, v in timings.items()))


def _run_and_check(
    services, tmp_path: Path, clone: Path, state_dir: Path, home: Path, timings: dict[str, float]
) -> None:
    from mlflow.tracking import MlflowClient
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    shell = _shell_env(clone, home)

    # ---- 1. the documented command: up, submit --wait, summary; KEEP=1 leaves the stack for the checks
    t0 = time.monotonic()
    demo = subprocess.run(
        ["bash", SCRIPT_REL],
        env={**shell, "KEEP": "1"},
        cwd=clone,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    timings["cluster_demo.sh (up + all steps + summary)"] = time.monotonic() - t0
    (tmp_path / "cluster-demo.log").write_text(demo.stdout + demo.stderr)  # kept by pytest for debugging
    assert demo.returncode == 0, _tail(demo)
    state = services.load_state(state_dir)
    assert state and services.status(state_dir)["running"], "KEEP=1 must leave the stack running"
    url = state["ray"]["dashboard_url"]
    token = token_of(state)
    mlflow_uri = state["mlflow"]["url"]
    env = _user_env(shell, state_dir)
    assert env["MLFLOW_TRACKING_URI"] == mlflow_uri and env["AWS_ENDPOINT_URL"] == state["s3"]["url"]
    _check_stack(services, state_dir, state, token)

    assert re.search(r"^job pyoco-cluster-demo-\S+ SUCCEEDED after ", demo.stderr, re.M), _tail(demo)
    for step in STEPS:
        assert f"> {step} (key " in demo.stdout and f"  {step} done in " in demo.stdout, step
    step_s = {m[1]: float(m[2]) for m in re.finditer(r"^  (\w+) done in ([\d.]+)s$", demo.stdout, re.M)}
    print("workflow steps (s): " + ", ".join(f"{k} {v:.1f}" for k, v in step_s.items()))
    summary = demo.stdout[demo.stdout.index("\nchampion: ") :]
    assert f"champion: models:/{MODEL}@champion = version 1 " in summary, summary
    assert f"s3://{BUCKET}/{OUT}/sample.mp4 (+ .gif) -> demo/cluster/sample.mp4 (4 frames)" in summary
    assert f"model:    s3://{BUCKET}/{OUT}/model " in summary and "cluster demo finished in " in summary
    assert "the local stack keeps running (KEEP=1)" in demo.stdout
    mp4, gif = clone / "demo/cluster/sample.mp4", clone / "demo/cluster/sample.gif"
    assert mp4.stat().st_size > 0 and gif.read_bytes()[:6] in (b"GIF87a", b"GIF89a")

    client = JobSubmissionClient(url, headers={"Authorization": f"Bearer {token}"})
    (info1,) = client.list_jobs()
    job1 = info1.submission_id
    assert job1.startswith("pyoco-cluster-demo-") and f"{job1}\n" in demo.stdout
    assert str(info1.status.value) == "SUCCEEDED"
    assert info1.entrypoint == f"python -m pipelines.cli run --config {CONFIG_REL}"
    env_vars = info1.runtime_env["env_vars"]
    assert env_vars["AWS_SECRET_ACCESS_KEY"] == "${AWS_SECRET_ACCESS_KEY}"
    assert env_vars["MLFLOW_TRACKING_URI"] == mlflow_uri

    # ---- 2. data, manifest and checkpoints on S3; preprocessing ran on the `preprocess` node only
    s3 = _s3(state)
    keys = _keys(s3, "")
    assert [k for k in keys if k.startswith("raw/") and k.endswith(".tar")], sorted(keys)
    manifest = json.loads(s3.get_object(Bucket=BUCKET, Key=f"{OUT}/data/manifest.json")["Body"].read())
    assert manifest["inputs"] == manifest["accepted_videos"] == manifest["clips_written"] == 8
    assert manifest["clip_shape"] == [4, 16, 16, 3]
    assert [k for k in keys if k.startswith(f"{OUT}/data/clips/") and k.endswith(".parquet")]
    _, body = services.http_get(f"{url}/nodes?view=summary", token=token)
    nodes = json.loads(body)["data"]["summary"]
    assert len(nodes) == 2
    preprocess_nodes = {
        n["raylet"]["nodeId"] for n in nodes if n["raylet"]["resourcesTotal"].get("preprocess", 0) > 0
    }
    assert len(preprocess_nodes) == 1
    assert set(manifest["decode_nodes"]) == preprocess_nodes, manifest["decode_nodes"]

    wf_key = f"{OUT}/workflow/state.json"
    wf = json.loads(s3.get_object(Bucket=BUCKET, Key=wf_key)["Body"].read())["steps"]
    assert {s: wf[s]["status"] for s in STEPS} == dict.fromkeys(STEPS, "done")
    train = wf["train"]["outputs"]
    # The run name carries a hash of the settings checkpoints must agree on (cluster-demo-train-HASH).
    run_dir = rf"s3://{BUCKET}/{OUT}/ray/cluster-demo-train-[0-9a-f]+/checkpoint_\d+"
    assert re.fullmatch(run_dir, train["checkpoint"].rstrip("/")), train["checkpoint"]
    assert train["model_dir"] == f"s3://{BUCKET}/{OUT}/model" and train["final_step"] == 3
    ckpt_prefix = train["checkpoint"].removeprefix(f"s3://{BUCKET}/").rstrip("/") + "/"
    ckpt = _keys(s3, ckpt_prefix)
    assert any(k.endswith("/latest") for k in ckpt) and any(k.endswith("_model_states.pt") for k in ckpt)
    assert sum(ckpt.values()) > 100_000, ckpt
    assert f"{OUT}/model/unet/diffusion_pytorch_model.safetensors" in keys
    assert f"{OUT}/pretrained-image/unet/diffusion_pytorch_model.safetensors" in keys
    assert s3.get_object(Bucket=BUCKET, Key=f"{OUT}/sample.mp4")["Body"].read() == mp4.read_bytes()

    # ---- 3. the registry has a champion: the version this workflow registered and promoted
    ml = MlflowClient(tracking_uri=mlflow_uri)
    champion = ml.get_model_version_by_alias(MODEL, "champion")
    assert champion.version == str(wf["register"]["outputs"]["version"]) == "1"
    assert wf["promote"]["outputs"]["promoted"] is True
    # evaluate logged into the training run, and register logged the pyfunc into that same run, on this server
    train_run = ml.get_run(train["mlflow_run_id"])
    assert "eval.val_loss" in train_run.data.metrics and champion.run_id == train_run.info.run_id
    manifest_hash = wf["preprocess"]["outputs"]["manifest_hash"]
    assert champion.tags["pyoco.data_manifest_hash"] == manifest_hash
    assert train_run.data.tags["pyoco.data_manifest_hash"] == manifest_hash
    versions_before = len(ml.search_model_versions(f"name='{MODEL}'"))

    # ---- 4. a re-submit (the documented by-hand line) skips every unchanged step and changes nothing
    state_etag = s3.head_object(Bucket=BUCKET, Key=wf_key)["ETag"]
    second, timings["submit #2 (all skipped)"] = _submit(env, clone, url)
    (tmp_path / "submit-2.log").write_text(second.stdout + second.stderr)
    assert second.returncode == 0, _tail(second)
    job2 = _job_id(second)
    assert job2 != job1
    for step in STEPS:
        line = f"- {step}: unchanged (key {wf[step]['key']}), skipped"
        assert line in second.stdout, (line, _tail(second))
    assert not [ln for ln in second.stdout.splitlines() if ln.startswith("> ")], _tail(second)
    assert s3.head_object(Bucket=BUCKET, Key=wf_key)["ETag"] == state_etag
    assert len(ml.search_model_versions(f"name='{MODEL}'")) == versions_before
    assert ml.get_model_version_by_alias(MODEL, "champion").version == champion.version

    # ---- 5. the Jobs API refuses calls without the token (and with a wrong one); nothing is created
    assert services.http_get(f"{url}/api/jobs/")[0] == 401
    assert services.http_get(f"{url}/api/jobs/{job1}")[0] == 401
    assert services.http_get(f"{url}/api/jobs/", token="0" * 64)[0] == 403
    req = urllib.request.Request(
        f"{url}/api/jobs/",
        data=json.dumps({"entrypoint": "echo unauthenticated", "submission_id": "no-token"}).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(req, timeout=10)  # noqa: S310 (127.0.0.1)
    assert refused.value.code == 401
    with pytest.raises(AuthenticationError):
        JobSubmissionClient(url).list_jobs()
    assert {j.submission_id for j in client.list_jobs()} == {job1, job2}

    # ---- 6. no secret value anywhere: MLflow (API and storage), jobs, CLI, Ray logs, S3 state
    t0 = time.monotonic()
    secrets_ = {"the AWS secret key": TEST_AWS_SECRET, "the Ray token": token}
    texts = _mlflow_texts(mlflow_uri, tmp_path / "mlflow-artifacts")
    runs = {k for k in texts if k.startswith("run ") and k.endswith(" params")}
    assert len(runs) >= 2 * len(STEPS) + 2, sorted(runs)  # parents + steps of both jobs, train runs
    jobs = {}
    for job_id in (job1, job2):
        jobs[f"job {job_id} logs"] = client.get_job_logs(job_id)
        jobs[f"job {job_id} record"] = json.dumps(vars(client.get_job_info(job_id)), default=str)
    assert "> train (key " in jobs[f"job {job1} logs"]
    cli = {
        "cluster_demo.sh output": demo.stdout + demo.stderr,
        "submit #2 output": second.stdout + second.stderr,
    }
    s3_texts = {
        key: s3.get_object(Bucket=BUCKET, Key=key)["Body"].read().decode("utf-8", "replace")
        for key in keys
        if key.endswith((".json", ".yaml", ".txt"))
    }
    assert wf_key in s3_texts and len(s3_texts) >= 10
    ray_dirs = [Path(state["ray"]["temp_dir"]), *map(Path, state["ray"]["worker_temp_dirs"])]
    stores = [Path(state["mlflow"]["artifacts"]), state_dir / "mlflow", state_dir / "logs", *ray_dirs]
    for label, value in secrets_.items():
        for group in (texts, jobs, cli, s3_texts):
            leaks = [where for where, text in group.items() if value in text]
            assert not leaks, f"{label} appears in: {leaks}"
        leaks = [f for f in _files_containing(stores, value.encode()) if Path(f) != state_dir / "auth_token"]
        assert not leaks, f"{label} appears in files: {leaks}"
    timings["secret scan"] = time.monotonic() - t0

    # ---- 7. the documented stop leaves none of the stack's processes
    t0 = time.monotonic()
    records = services._all_records(state)
    assert len(records) == 4  # ray worker, ray head, mlflow, s3
    down = subprocess.run(
        ["infra/local/down.sh"], env=shell, cwd=clone, capture_output=True, text=True, timeout=180
    )
    timings["down.sh"] = time.monotonic() - t0
    assert down.returncode == 0, down.stderr
    assert not (state_dir / "state.json").exists()
    alive = [rec["name"] for rec in records if services._alive(rec) or services._group_members(rec)]
    assert not alive, f"still running after down.sh: {alive}"
    assert not [d for d in ray_dirs if d.exists()], ray_dirs
    assert services.status(state_dir) == {"state_dir": str(state_dir), "running": False, "services": {}}
    assert services.http_get(f"{url}/api/gcs_healthz")[0] == 0  # nothing answers there any more


def _check_stack(services, state_dir: Path, state: dict, token: str) -> None:
    """The running ``infra/local`` stack as ``up.sh`` left it: healthy, token-auth, 2 nodes, on 127.0.0.1
    only, its token private (in no argv, state file, stack log or ``env`` line)."""
    import psutil
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    report = services.status(state_dir)
    ray = report["services"]["ray"]
    assert ray["auth"] == "token" and ray["nodes_alive"] == 2 and ray["url"].startswith("http://127.0.0.1:")
    assert report["services"]["mlflow"]["healthy"] and report["services"]["s3"]["healthy"], report
    with pytest.raises(services.StackError, match="already runs"):
        services.start(services.StackSpec(), state_dir)
    with pytest.raises(AuthenticationError):  # a wrong token, through Ray's client
        url = state["ray"]["dashboard_url"]
        JobSubmissionClient(url, headers={"Authorization": "Bearer " + "0" * 64}).list_jobs()
    pids = stack_pids(services, state)
    assert len(pids) >= 8
    assert listening_addresses(pids) == {"127.0.0.1"}  # every listening socket, Ray's gRPC included
    assert (Path(state["ray"]["token_path"]).stat().st_mode & 0o777) == 0o600
    for pid in pids:
        with contextlib.suppress(psutil.NoSuchProcess):
            assert token not in " ".join(psutil.Process(pid).cmdline())
    for path in [state_dir / "state.json", *sorted((state_dir / "logs").glob("*.log"))]:
        assert token not in path.read_text(errors="replace"), path
    lines = services.env_lines(state_dir)
    assert f"export RAY_AUTH_TOKEN_PATH={state['ray']['token_path']}" in lines
    assert not any(token in line or TEST_AWS_SECRET in line for line in lines)
