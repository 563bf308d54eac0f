"""`pyoco run`'s console (issue 13 items 4 and 5): one Ray start per run, a start and an end line per step,
progress from ``ray.train.report``, nothing from Ray's processes on the console (they go to the log file),
``-v`` brings them back, and a failing step is one line naming the log file."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import yaml

# The one real tiny workflow of this file (tests/test_workflow.py runs its runner on stub steps).
TINY = {
    "name": "wf-test",
    "synth": {"videos": 4, "shards": 2, "frames": 6, "size": 16, "fps": 4},
    "preprocess": {
        "num_frames": 4,
        "size": 16,
        "max_clips_per_video": 1,
        "rows_per_file": 8,
        "videos_per_task": 2,
        "val_fraction": 0.34,  # of the 4 videos, key 00000003 (score 0.315) is held out for evaluate
        "captions": {"dedupe": "none"},
    },
    "model": {"tiny": {"sample_size": 16, "block_out_channels": [16, 32]}, "train_layers": "all"},
    "noise": {"kind": "progressive", "alpha": 1.0},
    "train": {
        "num_workers": 1,
        "resources_per_worker": {"CPU": 1},
        "zero_stage": 0,
        "batch_size_per_worker": 2,
        "max_steps": 2,
        "checkpoint_every": 2,
        "ema_decay": None,
        "sample_every": None,
    },
    "evaluate": {
        "num_clips": 2,
        "timesteps": [100, 900],
        "num_videos": 4,
        "sample_steps": 1,
    },
    "mlflow": {"experiment": "wf-test", "registered_model": "wf-test"},
    "sample": {"num_frames": 4, "steps": 1},
}


def _write(tmp: Path, cfg: dict) -> Path:
    out = tmp / "out"
    cfg = json.loads(json.dumps(cfg))
    cfg["output"] = str(out)
    cfg["synth"]["out"] = str(out / "raw")
    cfg["preprocess"]["input"] = str(out / "raw")
    cfg["preprocess"]["output"] = str(out / "data")
    path = tmp / "wf.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


# `pyoco run` with ray.init counted: what one workflow starts, however many steps need Ray.
_COUNTING_RUN = """
import atexit, sys, ray
calls = []
real_init = ray.init
def counting_init(*args, **kwargs):
    calls.append(kwargs.get("address"))
    return real_init(*args, **kwargs)
ray.init = counting_init
atexit.register(lambda: print(f"RAY_INIT_CALLS={len(calls)}", file=sys.stderr, flush=True))
sys.argv = ["pyoco", "run", *sys.argv[1:]]
from pipelines.cli import main
main()
"""

RAY_PROCESS_LINE = re.compile(r"\(\w*\s*pid=\d+|streaming_executor|Ray Train Controller|logging_progress")


def _run(cfg_path: Path, *extra: str, env: dict) -> tuple[subprocess.CompletedProcess, str, int]:
    res = subprocess.run(
        [sys.executable, "-c", _COUNTING_RUN, "--config", str(cfg_path), *extra],
        capture_output=True,
        text=True,
        timeout=900,
        env=env,
        cwd=cfg_path.parent,
    )
    calls = re.findall(r"RAY_INIT_CALLS=(\d+)", res.stderr)
    console = re.sub(r"RAY_INIT_CALLS=\d+\n?", "", res.stdout + res.stderr)
    return res, console, int(calls[-1]) if calls else -1


def test_run_is_quiet_starts_ray_once_and_v_restores_ray_output(tmp_path):
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    env.pop("RAY_ADDRESS", None)
    cfg = json.loads(json.dumps(TINY))
    cfg["name"] = cfg["mlflow"]["experiment"] = cfg["mlflow"]["registered_model"] = "wf-console"
    # preprocess, pretrain and train all need Ray: one Ray start serves the three
    cfg["pretrain"] = {"num_workers": 1, "resources_per_worker": {"CPU": 1}, "zero_stage": 0, "max_steps": 2,
                       "batch_size_per_worker": 2, "checkpoint_every": 2, "ema_decay": None}  # fmt: skip
    path = _write(tmp_path, cfg)

    # 1. Quiet by default: pyoco's lines only, Ray's processes in the log file.
    res, console, ray_inits = _run(path, env=env)
    assert res.returncode == 0, console[-3000:]
    assert ray_inits == 1, console[-2000:]
    ray_lines = [line for line in console.splitlines() if RAY_PROCESS_LINE.search(line)]
    assert ray_lines == [], ray_lines[:5]
    for step in ("synth", "preprocess", "pretrain", "train", "evaluate", "register", "promote", "sample"):
        assert f"> {step} (key " in console and f"  {step} done in " in console, step
    assert "train: 2/2 steps" in console  # the driver's progress line, from the workers' reports
    assert "preprocess: 4/4 videos" in console
    assert len(console.splitlines()) <= 60, console
    log_file = Path(re.search(r"^log: (\S+)", console, re.M).group(1))
    log = log_file.read_text()
    assert "pid=" in log and "pyoco: rank 0 ready" in log  # a worker's print, captured from Ray
    assert log_file.parent == tmp_path / "out" / "logs"

    # 2. -v: Ray's own output is back on the console (a worker's line with its pid), no log file. A changed
    # max_steps gives train a new key: the workflow reruns train and the steps after it.
    cfg["train"]["max_steps"] = 3
    path = _write(tmp_path, cfg)
    res, console, ray_inits = _run(path, "-v", env=env)
    assert res.returncode == 0 and "  train done in " in console, console[-3000:]
    assert ray_inits == 1
    assert re.search(r"pid=\d+.*pyoco: rank 0 ready", console), console[-3000:]
    assert not re.search(r"^log: ", console, re.M)

    # 3. A failing step: one error line that says where the full log (with the traceback) is. The broken
    # model fails the first step that builds it (pretrain, whose key covers the model section).
    broken = json.loads(json.dumps(cfg))
    broken["model"]["tiny"]["cross_attention_dim"] = 128  # does not match the 384-d caption embeddings
    res, console, _ = _run(_write(tmp_path, broken), env=env)
    assert res.returncode == 1
    errors = [line for line in console.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and re.search(
        r"step (pretrain|train) failed: model\.tiny\.cross_attention_dim 128", errors[0]
    ), console
    failed_log = Path(errors[0].rsplit("full log: ", 1)[1])
    assert "Traceback" in failed_log.read_text() and "Traceback" not in console


def test_progress_line_prints_two_milestones_off_a_terminal():
    import io

    from rich.console import Console

    from pipelines.common import ProgressLine

    out = io.StringIO()
    with ProgressLine("preprocess", unit="video", out=Console(file=out, width=200)) as bar:
        for done in range(1, 11):
            bar.update(done, 10)
    lines = out.getvalue().splitlines()
    assert len(lines) == 2 and lines[0].startswith("  preprocess: 5/10 videos, ")
    assert lines[1].startswith("  preprocess: 10/10 videos, ") and "videos/s" in lines[1]


def test_quiet_logs_send_library_logs_to_the_scrubbed_file_and_restore_them(tmp_path, capfd):
    import logging

    import mlflow  # noqa: F401 - gives the mlflow logger its console handler

    from pipelines.context import RunContext, quiet_logs

    before = list(logging.getLogger("mlflow").handlers)
    ctx = RunContext("sqlite:///x", "e", "m", log_file=str(tmp_path / "logs" / "run.log"))
    with quiet_logs(ctx):
        logging.getLogger("mlflow").warning("server https://alice:hunter2@mlflow.example/x")
        logging.getLogger("alembic").warning("migrating")
    err = capfd.readouterr().err
    assert "hunter2" not in err and "migrating" not in err
    log = (tmp_path / "logs" / "run.log").read_text()
    assert "https://***@mlflow.example/x" in log and "hunter2" not in log and "migrating" in log
    assert logging.getLogger("mlflow").handlers == before
    with quiet_logs(RunContext("sqlite:///x", "e", "m", log_file=str(tmp_path / "v.log"), verbose=True)):
        logging.getLogger("alembic").warning("shown with -v")
    assert not (tmp_path / "v.log").exists()
