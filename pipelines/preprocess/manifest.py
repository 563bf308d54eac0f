"""The step's outputs: staging, the atomic publish of ``clips/`` + ``rejects/`` + ``manifest.json``, and
the version recorded in the manifest."""

from __future__ import annotations

import json
import os
from pathlib import Path

from pipelines.common import PyocoError
from pyoco.config import PreprocessConfig

STAGING = ".staging"  # OUT/.staging/{clips,rejects}: where a run writes until it has succeeded


def _prepare_output(cfg: PreprocessConfig, options) -> tuple[str, str, str]:
    """Return the ``(clips, rejects, units)`` URIs under ``OUT/.staging/``. A failed or killed run's staged
    clips and unit markers are kept (a rerun resumes from them: :mod:`pipelines.preprocess.units`); its
    ledger and incomplete manifest are not (the driver rewrites both). The previous run's outputs in
    ``OUT/`` are not touched until this run has succeeded (:func:`_publish`)."""
    from pipelines.preprocess.units import UNITS_DIR
    from pyoco import storage

    out = cfg.output.rstrip("/")
    if out == cfg.input.rstrip("/"):
        raise PyocoError(f"output {cfg.output} is the input folder; choose another output")
    staging = storage.join(out, STAGING)
    clips_uri, rejects_uri = storage.join(staging, "clips"), storage.join(staging, "rejects")
    units_uri = storage.join(staging, UNITS_DIR)
    storage.remove(rejects_uri, options=options)
    storage.remove(storage.join(staging, "manifest.incomplete.json"), options=options)
    if not storage.is_remote(out):
        for uri in (clips_uri, rejects_uri, units_uri):
            Path(uri).mkdir(parents=True, exist_ok=True)
    return clips_uri, rejects_uri, units_uri


OUTPUT_DIRS = ("clips", "rejects")
OUTPUT_FILES = ("manifest.json", "manifest.incomplete.json")


def _publish(out: str, manifest: dict, options) -> None:
    """Swap the staged ``clips/`` and ``rejects/`` in for the previous run's, then write ``manifest.json``
    last, so a manifest only ever sits next to the files it describes.

    Local: the old folders are renamed aside, the staged ones renamed in (atomic per folder), and the old
    ones deleted afterwards. S3 has no rename: the old manifest goes first, then the old objects, then the
    staged objects are copied in (server-side) and the manifest written; a crash in between leaves no
    manifest (the output reads as unfinished) and the staged copy intact.
    """
    import shutil
    import uuid

    from pyoco import storage

    out = out.rstrip("/")
    staging = storage.join(out, STAGING)
    body = json.dumps(manifest, indent=2).encode()
    if not storage.is_remote(out):
        root = Path(storage.filesystem(out)[1])
        trash = root / f".replaced-{uuid.uuid4().hex[:8]}"
        trash.mkdir()
        for name in (*OUTPUT_FILES, *OUTPUT_DIRS):
            if (root / name).exists():
                os.replace(root / name, trash / name)
        for name in OUTPUT_DIRS:
            os.replace(root / STAGING / name, root / name)
        tmp = root / f".manifest.json.{uuid.uuid4().hex[:8]}.tmp"
        tmp.write_bytes(body)
        os.replace(tmp, root / "manifest.json")
        shutil.rmtree(trash, ignore_errors=True)
        shutil.rmtree(root / STAGING, ignore_errors=True)
        return
    fs, path = storage.filesystem(out, options=options)
    for name in OUTPUT_FILES:
        storage.remove(storage.join(out, name), options=options)
    for name in OUTPUT_DIRS:
        storage.remove(storage.join(out, name), options=options)
        src = f"{path}/{STAGING}/{name}"
        if fs.exists(src):
            for f in fs.find(src):
                dst = f"{path}/{name}/{f[len(src) :].lstrip('/')}"
                storage.retry_transient(lambda f=f, dst=dst: fs.copy(f, dst), what=f"copy {f}")
    storage.write_bytes(storage.join(out, "manifest.json"), body, options=options)
    storage.remove(staging, options=options)


def pyoco_version() -> str:
    try:
        from importlib.metadata import version

        return version("pyoco")
    except Exception:  # noqa: BLE001
        return "0+unknown"
