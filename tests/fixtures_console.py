"""Helpers for the console checks of ``pyoco run`` (issue 13 items 4 and 5): run it in a fresh process with
``ray.init`` counted, and the assertions a quiet run's console must pass. Used by test_console.py (the
runner on stub steps that use a real Ray) and test_sd_workflow.py (the real steps end to end)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# Before `pyoco run` starts: count ray.init, and print the count when the process ends.
COUNT_RAY_INITS = """
import atexit, sys, ray
calls = []
real_init = ray.init
def counting_init(*args, **kwargs):
    calls.append(kwargs.get("address"))
    return real_init(*args, **kwargs)
ray.init = counting_init
atexit.register(lambda: print(f"RAY_INIT_CALLS={len(calls)}", file=sys.stderr, flush=True))
"""
RUN_CLI = """
sys.argv = ["pyoco", "run", *sys.argv[1:]]
from pipelines.cli import main
main()
"""

# A line that Ray's processes printed (forwarded with their pid), or Ray Data / Train's own chatter.
RAY_PROCESS_LINE = re.compile(r"\(\w*\s*pid=\d+|streaming_executor|Ray Train Controller|logging_progress")


def counted_run(
    cfg_path: Path, *extra: str, env: dict, prelude: str = "", timeout_s: float = 900
) -> tuple[subprocess.CompletedProcess, str, int]:
    """``pyoco run --config CFG EXTRA`` in a fresh process (``prelude`` runs first, e.g. to stub steps);
    returns the process, its console (stdout + stderr, the count line removed) and the ray.init count."""
    res = subprocess.run(
        [sys.executable, "-c", COUNT_RAY_INITS + prelude + RUN_CLI, "--config", str(cfg_path), *extra],
        capture_output=True,
        text=True,
        timeout=timeout_s,
        env=env,
        cwd=cfg_path.parent,
    )
    calls = re.findall(r"RAY_INIT_CALLS=(\d+)", res.stderr)
    console = re.sub(r"RAY_INIT_CALLS=\d+\n?", "", res.stdout + res.stderr)
    return res, console, int(calls[-1]) if calls else -1


# MLflow's client writes these to stdout (not to a logger) when a run ends on an http tracking server
# (``TrackingServiceClient._log_url``); quiet_logs turns them off (MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT).
MLFLOW_RUN_URL = re.compile(r"^(🏃 View run \S+ at: |🧪 View experiment at: )http", re.M)


def assert_quiet_run(console: str, steps: list[str], *, max_lines: int = 60) -> Path:
    """A quiet ``pyoco run``: a start and an end line per step, nothing from Ray's processes, at most
    ``max_lines`` lines, no MLflow run URLs; returns the log file it names (where Ray's output
    went)."""
    ray_lines = [line for line in console.splitlines() if RAY_PROCESS_LINE.search(line)]
    assert ray_lines == [], ray_lines[:5]
    for step in steps:
        assert f"> {step} (key " in console and f"  {step} done in " in console, (step, console[-3000:])
    assert not MLFLOW_RUN_URL.search(console), console
    assert len(console.splitlines()) <= max_lines, console
    found = re.search(r"^log: (\S+)", console, re.M)
    assert found, console[-3000:]
    return Path(found.group(1))
