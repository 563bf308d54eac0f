"""Session fixtures for the evaluator/evaluate tests: labelled synth clips and an evaluator trained once.

The clips are rendered by pyoco.synth (exact ground truth as ``labels``) and written with pyoco.clips into
``clips/train`` and ``clips/val``, at the tiny model package's size (16 px, 4 frames), without Ray.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.fixtures_registry import TINY_FRAMES, TINY_SIZE

EVAL_TRAIN_VIDEOS = 96
EVAL_VAL_VIDEOS = 48
TEXT_LEN = 8
EVALUATOR_STEPS = 300


def make_labelled_clips_dir(
    out: Path,
    *,
    train: int = EVAL_TRAIN_VIDEOS,
    val: int = EVAL_VAL_VIDEOS,
    frames: int = TINY_FRAMES,
    size: int = TINY_SIZE,
    labels: bool = True,
    seed: int = 0,
) -> Path:
    """``out/clips/{train,val}/part-00000.parquet``: synth videos ``0..train-1`` and ``10000..`` (val), one
    clip each; caption states are seeded random (L = 8, D = 384, 3-6 real tokens)."""
    import json

    import numpy as np

    from pyoco import clips as C
    from pyoco.synth import make_spec, render

    rng = np.random.default_rng(seed)
    for split, indices in (("train", range(train)), ("val", range(10_000, 10_000 + val))):
        rows = []
        for i in indices:
            spec = make_spec(i, seed=seed, frames=frames, size=size)
            rows.append(
                {
                    "clip_id": f"{rng.integers(0, 2**63):016x}",
                    "source": f"file:///synth/{spec.key}.mp4",
                    "key": spec.key,
                    "clip_index": 0,
                    "start_frame": 0,
                    "num_frames": frames,
                    "fps": 8.0,
                    "height": size,
                    "width": size,
                    "frames": render(spec).tobytes(),
                    "caption": spec.caption,
                    "caption_embedding": rng.standard_normal(TEXT_LEN * 384).astype(np.float32),
                    "caption_mask": [j < 3 + i % 4 for j in range(TEXT_LEN)],
                    "labels": json.dumps(spec.attributes()) if labels else None,
                    "node_id": "fixture",
                }
            )
        d = out / "clips" / split
        d.mkdir(parents=True, exist_ok=True)
        C.write_clip_table(rows, str(d / "part-00000.parquet"))
    return out


@pytest.fixture(scope="session")
def labelled_clips(tmp_path_factory) -> Path:
    return make_labelled_clips_dir(tmp_path_factory.mktemp("labelled") / "data")


@pytest.fixture(scope="session")
def trained_evaluator(labelled_clips, tmp_path_factory) -> dict:
    """``pyoco evaluator train`` once per session (fixed seed): its JSON, with ``path`` to the .pt."""
    import torch

    from pipelines.evaluate.evaluator import run_evaluator_train

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return run_evaluator_train(
            str(labelled_clips),
            str(tmp_path_factory.mktemp("evaluator") / "ev"),
            labels=["shape", "color", "direction", "speed"],
            steps=EVALUATOR_STEPS,
            size=TINY_SIZE,
            seed=0,
        )
    finally:
        torch.set_num_threads(before)
