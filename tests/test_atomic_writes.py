"""Issue 12 item 8: ``state.json`` (workflow) and ``manifest.json`` (preprocess, via ``pyoco.storage.write_bytes``)
are replaced atomically: a crash or an error in the middle of a write leaves the previous file intact."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipelines.workflow.state import WorkflowState

OLD = {"train": {"status": "done", "key": "k1", "outputs": {"model_dir": "/m"}}}


class Unprintable:
    """A value whose serialisation fails, half-way through writing the state (``default=str`` calls it)."""

    def __str__(self) -> str:
        raise RuntimeError("cannot serialise this value")


def _state_uri(request, tmp_path) -> str:
    if request.param == "local":
        return str(tmp_path / "out")
    moto = request.getfixturevalue("moto_s3")
    bucket = moto.make_bucket(f"pyoco-atomic-{tmp_path.name.lower().replace('_', '-')[:30]}")
    return f"s3://{bucket}/out"


@pytest.fixture(params=["local", "s3"])
def output(request, tmp_path):
    return _state_uri(request, tmp_path)


def test_workflow_state_error_mid_save_keeps_the_old_state(output):
    from pyoco import storage

    state = WorkflowState.load(output)
    state.steps = json.loads(json.dumps(OLD))
    state.save()
    before = storage.read_bytes(state.uri)
    # A later step's outputs hold a value that cannot be written: the save fails after the first keys.
    state.steps["zzz-evaluate"] = {"status": "done", "outputs": {"bad": Unprintable()}}
    with pytest.raises(RuntimeError, match="cannot serialise"):
        state.save()
    assert storage.read_bytes(state.uri) == before
    assert WorkflowState.load(output).steps == OLD


_WRITER = """
import sys
from pyoco.storage import write_bytes
print("writing", flush=True)
write_bytes(sys.argv[1], b"n" * (int(sys.argv[2]) << 20))
print("done", flush=True)
"""


def test_process_killed_mid_write_leaves_the_old_file(tmp_path):
    """SIGKILL the writer while the new bytes are going to disk; the target holds the old bytes, whole."""
    target = tmp_path / "manifest.json"
    old = b'{"inputs": 3, "accepted_videos": 3}'
    target.write_bytes(old)
    size_mb = 192
    proc = subprocess.Popen(
        [sys.executable, "-c", _WRITER, str(target), str(size_mb)],
        stdout=subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])},
    )
    assert proc.stdout.readline().strip() == b"writing"
    deadline = time.monotonic() + 60
    seen_partial = False
    while time.monotonic() < deadline and proc.poll() is None:
        # Kill as soon as any new bytes exist: in a temporary file next to the target, or in the target.
        others = [p for p in tmp_path.iterdir() if p != target and p.stat().st_size > 0]
        if others or target.stat().st_size != len(old):
            seen_partial = True
            os.kill(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.0005)
    proc.wait(timeout=30)
    assert seen_partial and proc.returncode == -signal.SIGKILL, (
        "the writer finished before it could be killed"
    )
    assert target.read_bytes() == old
