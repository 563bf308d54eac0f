"""pipelines.evaluate: deterministic validation loss, sample metrics, FVD only with an extractor."""

from __future__ import annotations

import json
import math

import pytest
from typer.testing import CliRunner

from pipelines.common import PyocoError
from pipelines.evaluate import load_eval_clips, run_evaluate
from pyoco.config import EvaluateConfig, NoiseConfig
from tests.fixtures_registry import TINY_FRAMES, TINY_SIZE, make_clips_dir

pytest_plugins = ("tests.fixtures_registry",)
pytestmark = pytest.mark.usefixtures("one_torch_thread")

TIMESTEPS = [10, 500, 990]


def _cfg(**kw) -> EvaluateConfig:
    return EvaluateConfig(num_clips=5, timesteps=TIMESTEPS, sample_steps=2, **kw)


@pytest.fixture(scope="module")
def clips_dir(tmp_path_factory):
    return make_clips_dir(tmp_path_factory.mktemp("data") / "pre", num_clips=7, files=3)


def test_validation_loss_is_deterministic_and_independent_of_batching(tiny_package, clips_dir):
    a = run_evaluate(str(tiny_package), str(clips_dir), _cfg(), log_to_mlflow=False, batch_size=4)
    b = run_evaluate(str(tiny_package), str(clips_dir), _cfg(), log_to_mlflow=False, batch_size=2)
    assert a["val_loss"] == pytest.approx(b["val_loss"], abs=1e-6, rel=0)
    assert a["val_loss_per_timestep"].keys() == {str(t) for t in TIMESTEPS}
    for t in TIMESTEPS:
        assert a["val_loss_per_timestep"][str(t)] == pytest.approx(
            b["val_loss_per_timestep"][str(t)], abs=1e-6
        )
    assert a["val_loss"] == pytest.approx(
        sum(a["val_loss_per_timestep"].values()) / len(TIMESTEPS), rel=1e-12
    )
    assert math.isfinite(a["val_loss"]) and a["val_loss"] > 0
    assert a["metrics"]["val_loss_t0500"] == a["val_loss_per_timestep"]["500"]
    # the sample metrics are deterministic too (fixed prompts and seeds, DDIM eta = 0)
    assert a["sample"] == b["sample"]
    assert a["num_clips"] == 5 and a["clip_shape"] == [TINY_FRAMES, TINY_SIZE, TINY_SIZE, 3]
    # FVD without an extractor is reported as skipped, with no number anywhere
    assert a["fvd"]["status"] == "skipped" and "value" not in a["fvd"] and "fvd" not in a["metrics"]
    # another noise seed gives another estimate (the seed is really used)
    c = run_evaluate(str(tiny_package), str(clips_dir), _cfg(seed=1), log_to_mlflow=False)
    assert abs(c["val_loss"] - a["val_loss"]) > 1e-6


def test_eval_subset_is_by_clip_id_and_pooled_embeddings_are_l_equals_1(tmp_path, clips_dir):
    clips = load_eval_clips(str(clips_dir), 4, embed_dim=384)
    assert clips.clip_ids == sorted(clips.clip_ids) and len(clips.clip_ids) == 4
    assert (
        clips.frames.shape == (4, TINY_FRAMES, TINY_SIZE, TINY_SIZE, 3) and clips.frames.dtype.name == "uint8"
    )
    assert clips.cond.shape == (4, 8, 384) and clips.mask.shape == (4, 8)
    everything = load_eval_clips(str(clips_dir), 100, embed_dim=384)
    assert everything.clip_ids[:4] == clips.clip_ids and len(everything.clip_ids) == 7

    pooled = load_eval_clips(str(make_clips_dir(tmp_path / "pooled", pooled=True)), 3, embed_dim=384)
    assert pooled.cond.shape == (3, 1, 384) and pooled.mask.all()


def test_fvd_with_a_torchscript_extractor_and_noise_override(tmp_path, tiny_package, clips_dir):
    import runpy

    src = tmp_path / "make_extractor.py"
    src.write_text(
        "import torch\n\n\n"
        "class Feats(torch.nn.Module):\n"
        "    def forward(self, x):\n"
        "        return torch.cat([x.mean(dim=(2, 3, 4)), x.std(dim=(2, 3, 4))], dim=1)\n\n\n"
        f"torch.jit.script(Feats()).save({str(tmp_path / 'feats.pt')!r})\n\n\n"
        "class NeedsLongClips(torch.nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.conv = torch.nn.Conv3d(3, 2, kernel_size=(9, 1, 1))\n\n"
        "    def forward(self, x):\n"
        "        return self.conv(x).flatten(1)\n\n\n"
        f"torch.jit.script(NeedsLongClips()).save({str(tmp_path / 'i3d_like.pt')!r})\n"
    )
    runpy.run_path(str(src), run_name="pyoco_eval_extractor")
    out = tmp_path / "eval.json"
    cfg = _cfg(fvd_extractor=str(tmp_path / "feats.pt"), output=str(out))
    r = run_evaluate(
        str(tiny_package),
        str(clips_dir),
        cfg,
        noise=NoiseConfig(kind="mixed", alpha=0.5),
        log_to_mlflow=False,
    )
    assert r["fvd"]["status"] == "computed" and r["fvd"]["value"] >= 0 and math.isfinite(r["fvd"]["value"])
    assert r["metrics"]["fvd"] == r["fvd"]["value"] and r["fvd"]["num_generated"] == 2
    assert r["noise"]["kind"] == "mixed" and r["noise"]["alpha"] == 0.5
    assert json.loads(out.read_text())["metrics"] == r["metrics"]

    # an extractor that cannot take these clips (I3D wants ~9+ frames): a one-line error, no number
    with pytest.raises(PyocoError, match=r"FVD extractor failed on videos \(N, 3, T=4"):
        run_evaluate(
            str(tiny_package),
            str(clips_dir),
            _cfg(fvd_extractor=str(tmp_path / "i3d_like.pt")),
            log_to_mlflow=False,
        )


def test_evaluate_cli_bad_inputs_are_one_line_errors(tmp_path, tiny_package):
    from pipelines.cli import app

    runner = CliRunner()
    res = runner.invoke(
        app, ["evaluate", "--checkpoint", str(tiny_package), "--data", str(tmp_path / "nope"), "--no-mlflow"]
    )
    assert res.exit_code == 2, res.output
    assert "no clips/val/*.parquet" in res.stderr and len(res.stderr.strip().splitlines()) == 1
    res = runner.invoke(
        app, ["evaluate", "--checkpoint", str(tmp_path / "nomodel"), "--data", str(tmp_path), "--no-mlflow"]
    )
    assert res.exit_code == 2 and "not found" in res.stderr and len(res.stderr.strip().splitlines()) == 1
