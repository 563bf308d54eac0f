"""`pyoco run`'s console (issue 13 items 4 and 5): one Ray start per run, a start and an end line per step,
nothing from Ray's processes on the console (they go to the log file), ``-v`` brings them back, and a failing
step is one line naming the log file.

Here the runner and the CLI are real and so is Ray, but the steps are stubs (as in test_workflow.py) whose
Ray steps each call ``ensure_ray`` and run a Ray task that prints: what the console shows is then the
runner's and the console routing's doing, in seconds. The real steps' console (their progress lines, the
training workers' prints in the log file, one ``ray.init`` for preprocess, train and evaluate) is checked on
the real workflow run of test_sd_workflow.py; the pre-flight error that a broken tiny model raises is
checked by test_sd_workflow.py::test_data_that_does_not_fit_the_sd_model_fails_before_ray."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import yaml

from tests.fixtures_console import REPO, assert_quiet_run, counted_run

TINY = {
    "name": "wf-console",
    "synth": {"videos": 4, "shards": 2, "frames": 6, "size": 16, "fps": 4},
    "preprocess": {"num_frames": 4, "size": 16, "max_clips_per_video": 1},
    "model": {"tiny": {"sample_size": 16, "block_out_channels": [16, 32]}, "train_layers": "all"},
    "noise": {"kind": "progressive", "alpha": 1.0},
    "pretrain": {"num_workers": 1, "max_steps": 2, "checkpoint_every": 2, "ema_decay": None},
    "train": {"num_workers": 1, "max_steps": 2, "checkpoint_every": 2, "ema_decay": None},
    "evaluate": {"num_clips": 2, "timesteps": [100, 900], "sample_steps": 1},
    "mlflow": {"experiment": "wf-console", "registered_model": "wf-console"},
    "sample": {"num_frames": 4, "steps": 1},
}
STEPS = ["synth", "preprocess", "pretrain", "train", "evaluate", "register", "promote", "sample"]

# Stub steps (test_workflow.py's outputs); the steps whose real versions need Ray call ensure_ray and run a
# task that prints, and wait until that line has reached this process (Ray forwards worker output
# asynchronously); $STUB_FAIL names a step that raises (before it needs Ray).
STUB_STEPS = r"""
import dataclasses, os, threading
from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher
from pipelines.context import ensure_ray
from pipelines.workflow import runner, steps
from tests.test_workflow import _fake_outputs

@ray.remote(num_cpus=0)
def worker_says(line):
    print(line, flush=True)

def stub(step):
    def run(cfg, outs, ctx, *, key):
        if step.name == os.environ.get("STUB_FAIL"):
            raise RuntimeError(f"{step.name} stub broke\nsecond line of the message")
        if step.name in ("preprocess", "pretrain", "train", "evaluate"):
            ensure_ray(cfg.ray.address)
            line, seen = f"stub: {step.name} worker ready", threading.Event()
            dispatcher.add_handler("stub", lambda data: line in data.get("lines", []) and seen.set())
            ray.get(worker_says.remote(line))
            assert seen.wait(60), "the worker's line never reached the driver"
            dispatcher.remove_handler("stub")
        return _fake_outputs(step.name, cfg, outs, key)
    return dataclasses.replace(step, run=run)

runner.STEPS = [stub(s) for s in steps.STEPS]
"""


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


def test_run_is_quiet_starts_ray_once_and_v_restores_ray_output(tmp_path, mlflow_server):
    # The session's `mlflow server` (a sqlite store would cost each run its schema migrations; the alembic
    # logs those print are routed in the test below).
    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_server.uri, "PYTHONPATH": str(REPO)}
    env.pop("RAY_ADDRESS", None)
    env.pop("STUB_FAIL", None)
    cfg = json.loads(json.dumps(TINY))
    cfg["name"] = cfg["mlflow"]["experiment"] = f"wf-console-{tmp_path.name[-12:]}".replace("_", "-")
    path = _write(tmp_path, cfg)

    # 1. Quiet by default: pyoco's lines only, Ray's processes in the log file. Four steps need Ray
    # (preprocess, pretrain, train, evaluate): one Ray start serves them all.
    res, console, ray_inits = counted_run(path, env=env, prelude=STUB_STEPS)
    assert res.returncode == 0, console[-3000:]
    assert ray_inits == 1, console[-2000:]
    log_file = assert_quiet_run(console, STEPS)
    log = log_file.read_text()
    for step in ("preprocess", "pretrain", "train", "evaluate"):
        assert re.search(rf"pid=\d+.*stub: {step} worker ready", log), (step, log[-3000:])
    assert log_file.parent == tmp_path / "out" / "logs"

    # 2. -v: Ray's own output is back on the console (a worker's line with its pid), no log file. A changed
    # max_steps gives train a new key: the workflow reruns train and the steps after it.
    cfg["train"]["max_steps"] = 3
    path = _write(tmp_path, cfg)
    res, console, ray_inits = counted_run(path, "-v", env=env, prelude=STUB_STEPS)
    assert res.returncode == 0 and "  train done in " in console, console[-3000:]
    assert "- pretrain: unchanged" in console and "> pretrain" not in console, console[-3000:]
    assert ray_inits == 1
    assert re.search(r"pid=\d+.*stub: train worker ready", console), console[-3000:]
    assert not re.search(r"^log: ", console, re.M)

    # 3. A failing step: one error line (the message's first line) that says where the full log (with the
    # traceback) is.
    cfg["pretrain"]["max_steps"] = 3
    res, console, _ = counted_run(
        _write(tmp_path, cfg), env={**env, "STUB_FAIL": "pretrain"}, prelude=STUB_STEPS
    )
    assert res.returncode == 1
    errors = [line for line in console.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith(
        "error: step pretrain failed: pretrain stub broke (fix it"
    ), console
    failed_log = Path(errors[0].rsplit("full log: ", 1)[1])
    assert "Traceback" in failed_log.read_text() and "Traceback" not in console
    assert "second line of the message" not in console


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

    from pipelines.console import quiet_logs
    from pipelines.context import RunContext

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
