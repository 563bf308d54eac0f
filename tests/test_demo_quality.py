"""The demo's quality checks: the pixel scorer of generated videos, and the golden loss curve of the trainer.

- `pyoco.synth.score_video` reads a synth clip's colour and direction back (~1.0 accuracy on real clips,
  after H.264 and the 32 -> 16 px resize preprocess does); a frozen clip has no direction, a reversed one the
  opposite direction, and noise scores near chance.
- Golden loss curve (issue 10, item 7): 12 seeded steps of the tiny model through the real trainer (Ray
  Train, 1 worker, ZeRO-0, fp32) must reproduce ``tests/assets/golden_loss_tiny.json`` at rtol 1e-3, so a
  silent change to the loss, the noise prior, the data order, the optimizer or the model fails. When a change
  is *meant* to move the curve, regenerate it (and say why in the commit):

      PYTHONPATH=. .venv/bin/python -m tests.test_demo_quality --regenerate-golden
"""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import numpy as np
import pytest

from pyoco import synth

GOLDEN = Path(__file__).parent / "assets" / "golden_loss_tiny.json"
GOLDEN_STEPS = 12


def _decoded(specs, size: int) -> list[np.ndarray]:
    from pyoco.video import decode_clips

    out = []
    for spec in specs:
        mp4 = synth.encode_sample(spec)["mp4"]
        out.append(decode_clips(io.BytesIO(mp4), num_frames=8, size=size, key=spec.key)[0].frames)
    return out


@pytest.fixture(scope="module")
def real_16px():
    specs = [synth.make_spec(i, seed=3, frames=16, size=32) for i in range(48)]
    return specs, _decoded(specs, 16)


def test_score_video_reads_real_synth_clips_back(real_16px):
    specs, clips = real_16px
    # Rendered frames are exact; decoded + resized clips lose a little colour to H.264 chroma and the resize.
    assert synth.prompt_accuracy([synth.render(s) for s in specs], specs) == {
        "color": 1.0,
        "direction": 1.0,
        "n": 48,
    }
    acc = synth.prompt_accuracy(clips, specs)
    assert acc["color"] >= 0.95 and acc["direction"] >= 0.95, acc  # measured 0.995 / 1.0 over 200


def test_score_video_frozen_reversed_and_noise_videos_fail(real_16px):
    specs, clips = real_16px
    frozen = [np.repeat(c[:1], len(c), axis=0) for c in clips]
    assert synth.prompt_accuracy(frozen, specs)["direction"] == 0.0
    assert all(synth.score_video(v).direction is None for v in frozen)
    reversed_ = [c[::-1] for c in clips]
    opposite = {"left": "right", "right": "left", "up": "down", "down": "up"}
    flipped = [{"color": s.color, "direction": opposite[s.direction]} for s in specs]
    assert synth.prompt_accuracy(reversed_, flipped)["direction"] >= 0.95
    assert synth.prompt_accuracy(reversed_, specs)["direction"] <= 0.05
    rng = np.random.default_rng(0)
    noise = [rng.integers(0, 256, c.shape, dtype=np.uint8) for c in clips]
    acc = synth.prompt_accuracy(noise, specs)
    # Chance is 1/7 and 1/4; with 48 videos a 3-sigma band is well under 0.5.
    assert acc["color"] < 0.4 and acc["direction"] < 0.5, acc


def test_score_video_rejects_bad_shapes():
    with pytest.raises(ValueError, match="T >= 2"):
        synth.score_video(np.zeros((1, 8, 8, 3), np.uint8))
    with pytest.raises(ValueError, match="as many truths"):
        synth.prompt_accuracy([np.zeros((2, 8, 8, 3), np.uint8)], [])


# ------------------------------------------------------------------------------------------- golden curve
def golden_losses(tmp: Path) -> list[float]:
    """The per-step training loss of 12 seeded steps: tiny video UNet, 1 worker, ZeRO-0, fp32, no shuffle."""
    from mlflow.tracking import MlflowClient

    from pipelines.train.driver import run_train
    from pyoco.config import parse_config
    from tests.fixtures_train import tiny_config, write_clips

    clips = write_clips(tmp / "data", num_clips=4, num_frames=4, size=8, shards=1)
    cfg = tiny_config(
        tmp,
        clips,
        num_workers=1,
        resources_per_worker={"CPU": 1},
        zero_stage=0,
        precision="fp32",
        batch_size_per_worker=4,
        lr=3e-3,
        lr_schedule="cosine",
        warmup_steps=2,
        max_steps=GOLDEN_STEPS,
        checkpoint_every=GOLDEN_STEPS,
        shuffle_buffer=0,
        ema_decay=0.9,
        caption_dropout=0.25,
        seed=0,
    )
    cfg["mlflow"]["tracking_uri"] = f"sqlite:///{tmp / 'mlflow.db'}"
    res = run_train(parse_config(cfg))
    client = MlflowClient(cfg["mlflow"]["tracking_uri"])
    history = sorted((m.step, m.value) for m in client.get_metric_history(res["mlflow_run_id"], "loss"))
    assert [s for s, _ in history] == list(range(1, GOLDEN_STEPS + 1)), history
    return [v for _, v in history]


def test_golden_loss_curve(ray_local, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    golden = json.loads(GOLDEN.read_text())
    losses = golden_losses(tmp_path)
    np.testing.assert_allclose(
        losses,
        golden["loss"],
        rtol=1e-3,
        atol=0,
        err_msg="training loss curve moved; if intended, regenerate tests/assets/golden_loss_tiny.json",
    )


if __name__ == "__main__" and "--regenerate-golden" in sys.argv:
    import tempfile

    with tempfile.TemporaryDirectory(prefix="pyoco-golden-") as d:
        import os

        os.chdir(d)
        losses = golden_losses(Path(d))
    GOLDEN.parent.mkdir(parents=True, exist_ok=True)
    GOLDEN.write_text(
        json.dumps(
            {
                "what": "per-step loss of tests/test_demo_quality.py::golden_losses (12 seeded steps, 1 worker, "
                "ZeRO-0, fp32)",
                "regenerate": "PYTHONPATH=. .venv/bin/python -m tests.test_demo_quality --regenerate-golden",
                "loss": losses,
            },
            indent=2,
        )
        + "\n"
    )
    print(f"wrote {GOLDEN}: {losses}")
