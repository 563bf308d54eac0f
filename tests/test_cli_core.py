"""The core CLI: help texts, one-line errors with exit 2, and an init -> sample round trip."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import av
from typer.testing import CliRunner

from pipelines.cli import app

runner = CliRunner()
PYOCO = [sys.executable, "-m", "pipelines.cli"]


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*PYOCO, *args], capture_output=True, text=True, timeout=300)


def test_help_describes_every_flag():
    top = runner.invoke(app, ["--help"])
    assert top.exit_code == 0
    for cmd in ("sample", "noise", "model"):
        assert cmd in top.output
    sample = runner.invoke(app, ["sample", "--help"], terminal_width=200)
    assert sample.exit_code == 0
    for flag in (
        "--model",
        "--prompt",
        "--out",
        "--frames",
        "--steps",
        "--guidance",
        "--noise",
        "--alpha",
        "--seed",
    ):
        assert flag in sample.output, flag


def test_bad_flags_give_one_line_error_and_exit_2(tmp_path):
    bad_alpha = _run(
        "sample", "--model", str(tmp_path), "--prompt", "x", "--out", str(tmp_path / "a.mp4"), "--alpha", "-1"
    )
    assert bad_alpha.returncode == 2
    assert bad_alpha.stderr.strip() == "error: --alpha must be a finite number >= 0 (got -1.0)"
    missing = _run(
        "sample", "--model", str(tmp_path / "nope"), "--prompt", "x", "--out", str(tmp_path / "a.mp4")
    )
    assert missing.returncode == 2
    assert missing.stderr.strip() == f"error: --model {tmp_path / 'nope'}: no such model folder"
    kind = _run("noise", "stats", "--kind", "pink")
    assert kind.returncode == 2 and "unknown noise kind 'pink'" in kind.stderr
    assert "Traceback" not in kind.stderr + missing.stderr + bad_alpha.stderr


def test_noise_stats_prints_table_and_png(tmp_path):
    png = tmp_path / "corr.png"
    result = runner.invoke(
        app, ["noise", "stats", "--kind", "mixed", "--alpha", "2", "--frames", "4", "--png", str(png)]
    )
    assert result.exit_code == 0, result.output
    assert "0.8000" in result.output  # mixed, alpha = 2: off-diagonal alpha^2 / (1 + alpha^2)
    assert png.stat().st_size > 1000


def test_model_init_then_sample_writes_requested_frames(tmp_path: Path):
    model = tmp_path / "model"
    out = tmp_path / "clip.mp4"
    init = runner.invoke(app, ["model", "init", "--out", str(model), "--size", "16", "--frames", "4"])
    assert init.exit_code == 0, init.output
    result = runner.invoke(
        app,
        [
            "sample",
            "--model",
            str(model),
            "--prompt",
            "a blue square moves up",
            "--out",
            str(out),
            "--frames",
            "3",
            "--steps",
            "2",
            "--seed",
            "1",
            "--gif",
        ],
    )
    assert result.exit_code == 0, result.output
    with av.open(str(out)) as c:
        frames = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
    assert len(frames) == 3 and frames[0].shape == (16, 16, 3)
    assert out.with_suffix(".gif").stat().st_size > 0
