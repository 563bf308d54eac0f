"""``pyoco evaluator train``: learn the real clips' labels with a small video classifier (pyoco.evaluator).

    pyoco evaluator train --data out/data --out out/evaluator --labels shape,color,direction,speed

Fits on ``DATA/clips/train``, reports held-out accuracy per label on ``DATA/clips/val``, and writes
``OUT/evaluator.pt`` (TorchScript: ``forward(x) -> {"features", "logits_<label>"}`` and ``features(x)``)
with ``OUT/evaluator.json`` (label vocabularies, input layout and size, training-data hash, accuracy).
``pyoco evaluate --evaluator OUT`` then uses it for FVD, prompt accuracy and the class score.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path
from typing import Any

import typer

from pipelines.common import PyocoError, cli_errors, console
from pipelines.evaluate.summary import label_unread
from pyoco.config import EvaluatorConfig

# The evaluator section's defaults (pyoco/config.py says why these), for the function and the CLI alike.
_DEFAULT = EvaluatorConfig()

evaluator_app = typer.Typer(
    help="The learned video evaluator used by `pyoco evaluate`.", no_args_is_help=True
)


def _read_split(data: str, split: str) -> tuple[list, list[dict], list[str], list[str | None]]:
    """(uint8 (T, H, W, 3) clips, label dicts, clip ids, label texts) of one split, sorted by clip id."""
    from pyoco import clips as C

    try:
        table = C.read_clips(data, split)
    except C.DataError as err:
        raise PyocoError(str(err)) from None
    if len(table) == 0:
        raise PyocoError(f"{C.split_uri(data, split)}: no clips")
    if C.LABELS not in table.column_names:
        raise PyocoError(
            f"{C.split_uri(data, split)}: the clips have no labels column (re-run `pyoco preprocess` on a "
            "dataset with .json/.cls members or UCF-101 class folders)"
        )
    table = table.sort_by("clip_id")
    cols = table.select(["clip_id", "frames", "num_frames", "height", "width"]).to_pylist()
    try:
        labels = C.labels_of(table)
    except C.DataError as err:
        raise PyocoError(f"{C.split_uri(data, split)}: {err}") from None
    try:
        frames = [C.frames_array(r) for r in cols]
    except C.DataError as err:  # latents-only clips: the evaluator learns from pixels
        raise PyocoError(f"{C.split_uri(data, split)}: {err}") from None
    return frames, labels, [r["clip_id"] for r in cols], table.column(C.LABELS).to_pylist()


def _stack(frames: list):
    import numpy as np

    shapes = {f.shape for f in frames}
    return np.stack(frames) if len(shapes) == 1 else frames


def _manifest(data: str) -> dict[str, Any]:
    from pyoco import storage

    try:
        return json.loads(storage.read_bytes(storage.join(data, "manifest.json")))
    except (FileNotFoundError, json.JSONDecodeError, OSError):
        return {}


def unread_labels(heldout: dict[str, float | None], vocab: dict[str, list[str]]) -> list[str]:
    """The labels the evaluator does not read on held-out clips (`summary.label_unread`)."""
    return [n for n, acc in heldout.items() if label_unread(acc, 1.0 / len(vocab[n]))]


def unread_line(meta: dict[str, Any]) -> str | None:
    """One console line naming the labels the evaluator cannot read (``None`` when it reads them all)."""
    unread = meta.get("unread_labels") or []
    if not unread:
        return None
    held = meta["heldout_accuracy"]
    parts = ", ".join(f"{n} {held[n]:.2f} (chance {meta['chance'][n]:.2f})" for n in unread)
    return f"warning: the evaluator does not read {parts} on val clips: its prompt accuracy there is not a measure"


def run_evaluator_train(
    data: str,
    out: str,
    *,
    labels: list[str] | None = None,
    steps: int = _DEFAULT.steps,
    size: int = _DEFAULT.size,
    seed: int = _DEFAULT.seed,
    batch_size: int = 16,
    lr: float = _DEFAULT.lr,
    progress=None,
) -> dict[str, Any]:
    """Train, score and export the evaluator; returns the JSON written next to it."""
    from pipelines.tracking import pyoco_version, redact_uri
    from pyoco import evaluator as E
    from pyoco.config import config_hash

    t0 = time.perf_counter()
    train_frames, train_labels, train_ids, train_texts = _read_split(data, "train")
    if not any(train_labels):
        raise PyocoError(
            f"{data}: no training clip has labels (the labels column is empty: preprocess a dataset with "
            ".json/.cls members or UCF-101 class folders)"
        )
    available = sorted({k for lab in train_labels for k in lab})
    names = labels if labels else E.categorical_labels(train_labels)
    unknown = [n for n in names if n not in available]
    if unknown:
        raise PyocoError(f"unknown label {unknown[0]!r}: the clips' labels are {', '.join(available)}")
    if not names:
        raise PyocoError(
            f"{data}: no categorical label to learn (labels: {', '.join(available)}); pass --labels"
        )
    vocab = E.build_vocab(train_labels, names)
    single = [n for n in names if len(vocab[n]) < 2]
    if single:
        raise PyocoError(f"label {single[0]!r} has one value ({vocab[single[0]]}) in the training clips")
    val_frames, val_labels, val_ids, _ = _read_split(data, "val")
    num_frames = Counter(f.shape[0] for f in train_frames).most_common(1)[0][0]

    settings = E.TrainSettings(steps=steps, batch_size=batch_size, lr=lr, seed=seed)
    result = E.train_classifier(
        _stack(train_frames),
        train_labels,
        _stack(val_frames),
        val_labels,
        names,
        num_frames=num_frames,
        size=size,
        settings=settings,
        progress=progress,
    )
    manifest = _manifest(data)
    train_data_hash = config_hash(sorted(zip(train_ids, train_texts, strict=True)))
    meta = {
        "labels": result.vocab,
        "train_data_hash": train_data_hash,
        "data": redact_uri(str(data)),
        "data_manifest_hash": manifest.get("data_hash"),
        "eval_data_hash": manifest.get("eval_data_hash"),
        "train_clips": len(train_ids),
        "val_clips": len(val_ids),
        "heldout_accuracy": result.heldout_accuracy,
        "heldout_counts": result.heldout_counts,
        "train_accuracy": result.train_accuracy,
        "chance": {n: 1.0 / len(v) for n, v in result.vocab.items()},
        "unread_labels": unread_labels(result.heldout_accuracy, result.vocab),
        "final_loss": result.final_loss,
        "settings": {
            "steps": settings.steps,
            "batch_size": settings.batch_size,
            "lr": settings.lr,
            "seed": settings.seed,
            "augment": f"random translation up to {settings.max_shift_frac:.3f} x size (no flips)",
            "widths": list(settings.widths),
        },
        "seconds": round(time.perf_counter() - t0, 1),
        "pyoco_version": pyoco_version(),
    }
    path = E.export(result.model, out, meta)
    return json.loads(Path(path).with_name(E.META_NAME).read_text()) | {"path": str(path)}


@evaluator_app.command("train")
@cli_errors
def train_cmd(
    data: str = typer.Option(..., "--data", help="Preprocess output folder (clips/train and clips/val)."),
    out: str = typer.Option(..., "--out", help="Folder for evaluator.pt and evaluator.json (local)."),
    labels: str | None = typer.Option(
        None, "--labels", help="Comma-separated label names (default: every categorical label)."
    ),
    steps: int = typer.Option(_DEFAULT.steps, "--steps", min=1, help="Optimiser steps."),
    size: int = typer.Option(16, "--size", min=8, help="Input size (px) the clips are resized to."),
    seed: int = typer.Option(0, "--seed", help="Seed for init, batches and augmentation."),
    lr: float = typer.Option(
        _DEFAULT.lr, "--lr", min=1e-6, help="AdamW learning rate (cosine, 10 warm-up steps)."
    ),
) -> None:
    """Train the video classifier on the clips' labels; print held-out accuracy per label."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    names = [n.strip() for n in labels.split(",") if n.strip()] if labels else None
    if labels is not None and not names:
        raise PyocoError("--labels is empty: give label names separated by commas")
    if "://" in out and not out.startswith("file://"):
        raise PyocoError(f"--out {out}: the evaluator is written to a local folder")
    # The bar starts with the first step, so data errors stay one line.
    bar = Progress(
        TextColumn("evaluator"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]:.3f}"),
        TimeElapsedColumn(),
        console=console,
    )
    task = None

    def progress(done: int, total: int, loss: float) -> None:
        nonlocal task
        if task is None:
            bar.start()
            task = bar.add_task("steps", total=total, loss=loss)
        bar.update(task, completed=done, loss=loss)

    try:
        meta = run_evaluator_train(
            data, out, labels=names, steps=steps, size=size, seed=seed, lr=lr, progress=progress
        )
    finally:
        bar.stop()
    for name, acc in meta["heldout_accuracy"].items():
        shown = "n/a (no val clip has it)" if acc is None else f"{acc:.3f}"
        console.print(
            f"{name}: held-out accuracy {shown} over {meta['heldout_counts'][name]} val clips "
            f"(chance {meta['chance'][name]:.3f}, {len(meta['labels'][name])} classes)"
        )
    warning = unread_line(meta)
    if warning:
        console.print(warning, soft_wrap=True)
    console.print(f"wrote {meta['path']} ({meta['seconds']} s)")
    print(json.dumps({"heldout_accuracy": meta["heldout_accuracy"], "path": meta["path"]}, sort_keys=True))


def register(app: typer.Typer) -> None:
    app.add_typer(evaluator_app, name="evaluator")
