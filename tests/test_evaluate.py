"""pipelines.evaluate on the val split: deterministic val_loss and sample metrics, FVD/prompt accuracy with an
evaluator (ours, trained once per session on labelled synth clips, or a user's TorchScript), motion gap."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from typer.testing import CliRunner

from pipelines.common import PyocoError
from pipelines.evaluate.metrics import load_eval_clips, sample_metrics
from pipelines.evaluate.step import run_evaluate
from pyoco.config import EvaluateConfig, NoiseConfig
from tests.fixtures_eval import EVAL_VAL_VIDEOS
from tests.fixtures_registry import TINY_FRAMES, TINY_SIZE, make_clips_dir

pytest_plugins = ("tests.fixtures_registry", "tests.fixtures_eval")
pytestmark = pytest.mark.usefixtures("one_torch_thread")

TIMESTEPS = [10, 500, 990]


def _cfg(**kw) -> EvaluateConfig:
    return EvaluateConfig(
        **{"num_clips": 5, "timesteps": TIMESTEPS, "sample_steps": 2, "num_videos": 6, **kw}
    )


@pytest.fixture(scope="module")
def clips_dir(tmp_path_factory):
    return make_clips_dir(tmp_path_factory.mktemp("data") / "pre", num_clips=7, files=3)


def test_validation_loss_is_deterministic_and_independent_of_batching(tiny_package, clips_dir):
    a = run_evaluate(str(tiny_package), str(clips_dir), _cfg(), log_to_mlflow=False, batch_size=4)
    b = run_evaluate(str(tiny_package), str(clips_dir), _cfg(), log_to_mlflow=False, batch_size=2)
    assert a["device"] == "cpu"  # evaluate.use_gpu defaults to false: here, on the CPU
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
    # the sample metrics are deterministic too (per-video seeds, DDIM eta = 0)
    assert a["motion"] == b["motion"] and a["sample"]["num_videos"] == 6
    assert a["num_clips"] == 5 and a["num_val_clips"] == 7
    assert a["clip_shape"] == [TINY_FRAMES, TINY_SIZE, TINY_SIZE, 3]
    # no noise override: scored under the prior the package was trained with (the one register tags)
    assert (a["noise"]["kind"], a["noise"]["alpha"]) == ("progressive", 1.0)
    # without an evaluator FVD and prompt accuracy are skipped, with no number anywhere
    assert a["fvd"]["status"] == "skipped" and "value" not in a["fvd"] and "fvd" not in a["metrics"]
    assert not any(k.startswith(("prompt_accuracy", "inception_score")) for k in a["metrics"])
    assert "temporal_consistency" not in a["metrics"] and "own prior" in a["metric_descriptions"]["val_loss"]
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


def test_fvd_with_a_users_torchscript_network_and_noise_override(tmp_path, tiny_package, clips_dir):
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
    cfg = _cfg(evaluator=str(tmp_path / "feats.pt"), output=str(out), num_videos=32, num_bootstrap=20)
    r = run_evaluate(
        str(tiny_package),
        str(clips_dir),
        cfg,
        noise=NoiseConfig(kind="mixed", alpha=0.5),
        log_to_mlflow=False,
    )
    assert r["fvd"]["status"] == "computed" and r["fvd"]["value"] >= 0 and math.isfinite(r["fvd"]["value"])
    assert r["metrics"]["fvd"] == r["fvd"]["value"] and r["fvd"]["num_generated"] == 32
    assert r["metrics"]["fvd_ci_low"] <= r["metrics"]["fvd_ci_high"] and r["metrics"]["fvd_num_videos"] == 32
    # a features-only network has no class heads: no prompt accuracy, and it says so by omission
    assert r["prompt_accuracy"] == {} and not any(k.startswith("prompt_accuracy") for k in r["metrics"])
    assert r["noise"]["kind"] == "mixed" and r["noise"]["alpha"] == 0.5
    assert json.loads(out.read_text())["metrics"] == r["metrics"]

    # a network that cannot take these clips (I3D wants ~9+ frames): a one-line error, no number
    with pytest.raises(PyocoError, match=r"evaluator failed on videos \(N, 3, T=4"):
        run_evaluate(
            str(tiny_package),
            str(clips_dir),
            _cfg(evaluator=str(tmp_path / "i3d_like.pt"), num_videos=32),
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


# ------------------------------------------------------------------------------- issue 10's metric tests
def _val_frames(data):
    from pyoco import clips as C

    table = C.read_clips(str(data), "val").sort_by("clip_id")
    rows = table.select(["frames", "num_frames", "height", "width"]).to_pylist()
    return np.stack([C.frames_array(r) for r in rows]), C.labels_of(table)


def test_frozen_video_scores_worse_on_motion_gap_than_real_clips(labelled_clips, trained_evaluator):
    from pyoco.evaluator import load_evaluator

    real, labels = _val_frames(labelled_clips)
    frozen = np.repeat(real[:, :1], real.shape[1], axis=1)  # each val clip's first frame, held
    ev = load_evaluator(trained_evaluator["path"])
    prompts = list(range(len(real)))
    frozen_m = sample_metrics(real, frozen, prompts, labels, ev, num_bootstrap=50)["metrics"]
    real_m = sample_metrics(real, real, prompts, labels, ev, num_bootstrap=50)["metrics"]
    reference = frozen_m["motion_gap_real_halves"]  # real vs real: the two halves of val
    assert frozen_m["motion_gap"] > 5 * reference, (frozen_m["motion_gap"], reference)
    assert frozen_m["motion_gap_ci_low"] > reference
    assert frozen_m["motion_gap"] == pytest.approx(frozen_m["motion_mean_real"])  # W1 to a point mass at 0
    assert real_m["motion_gap"] == 0.0 and frozen_m["motion_mean_generated"] == 0.0
    # the learned evaluator also sees the missing motion: direction/speed of frozen clips are not the prompt's
    assert frozen_m["prompt_accuracy_direction"] < real_m["prompt_accuracy_direction"] - 0.3


def test_untrained_model_is_near_chance_and_far_worse_on_fvd_than_real_vs_real(
    tiny_package, labelled_clips, trained_evaluator
):
    from collections import Counter

    cfg = EvaluateConfig(
        num_clips=4, timesteps=[500], sample_steps=2, evaluator=trained_evaluator["path"], num_bootstrap=100
    )
    r = run_evaluate(str(tiny_package), str(labelled_clips), cfg, log_to_mlflow=False)
    m = r["metrics"]
    assert r["sample"]["num_videos"] == 64 and m["fvd_num_videos"] == 64  # max(48 val clips, 64)
    # FVD: the untrained (zero-initialised motion modules, untrained UNet) model's videos are far from val;
    # the two halves of val (24 clips each, so biased upwards) are the reference.
    assert m["fvd_ci_low"] > 3 * m["fvd_real_halves"], (m["fvd"], m["fvd_ci_low"], m["fvd_real_halves"])
    # prompt accuracy: at most what always answering the most frequent prompt class scores, plus noise
    _, labels = _val_frames(labelled_clips)
    prompts = [labels[i % EVAL_VAL_VIDEOS] for i in range(64)]
    for name in ("color", "direction"):
        best_constant = Counter(p[name] for p in prompts).most_common(1)[0][1] / 64
        assert m[f"prompt_accuracy_{name}"] <= best_constant + 0.1, (name, m[f"prompt_accuracy_{name}"])
        assert m[f"prompt_accuracy_{name}_ci_low"] <= m[f"prompt_accuracy_{name}"]
        assert m[f"prompt_accuracy_{name}"] <= m[f"prompt_accuracy_{name}_ci_high"]
        # while the evaluator itself recognises the real val clips
        assert r["prompt_accuracy"][name]["evaluator_accuracy_on_real"] >= 0.8
        assert 1.0 <= m[f"inception_score_{name}"] <= len(trained_evaluator["labels"][name])
    assert m["motion_gap"] > m["motion_gap_real_halves"]


def test_evaluate_is_deterministic_for_the_same_model_data_and_seed(
    tiny_package, labelled_clips, trained_evaluator
):
    def assert_same_videos(x, y):  # the same videos up to float round-off, judged by their metrics
        for key in ("fvd", "motion_gap", "prompt_accuracy_color", "prompt_accuracy_direction"):
            assert x["metrics"][key] == pytest.approx(y["metrics"][key], rel=1e-3, abs=1e-4), key

    cfg = EvaluateConfig(
        num_clips=4,
        timesteps=[500],
        sample_steps=2,
        evaluator=trained_evaluator["path"],
        num_videos=32,
        num_bootstrap=20,
        sample_batch_size=16,
    )
    a = run_evaluate(str(tiny_package), str(labelled_clips), cfg, log_to_mlflow=False)
    b = run_evaluate(str(tiny_package), str(labelled_clips), cfg, log_to_mlflow=False)
    assert a["metrics"] == b["metrics"]
    # per-video noise streams: another sampling batch size gives the same videos (to float round-off)
    c = run_evaluate(
        str(tiny_package),
        str(labelled_clips),
        cfg.model_copy(update={"sample_batch_size": 5}),
        log_to_mlflow=False,
    )
    assert_same_videos(c, a)
    d = run_evaluate(
        str(tiny_package), str(labelled_clips), cfg.model_copy(update={"seed": 1}), log_to_mlflow=False
    )
    assert d["metrics"]["fvd"] != a["metrics"]["fvd"]  # the seed is really used
    # stochastic DDIM (eta > 0) draws its step noise from the same per-video streams: still reproducible
    # and independent of the batch, and really different from eta = 0
    stochastic = cfg.model_copy(update={"eta": 1.0})
    e = run_evaluate(str(tiny_package), str(labelled_clips), stochastic, log_to_mlflow=False)
    f = run_evaluate(
        str(tiny_package),
        str(labelled_clips),
        stochastic.model_copy(update={"sample_batch_size": 5}),
        log_to_mlflow=False,
    )
    assert e["sample"]["eta"] == 1.0 and a["sample"]["eta"] == 0.0
    assert e["metrics"]["fvd"] != a["metrics"]["fvd"]
    assert_same_videos(f, e)


def test_fvd_refuses_fewer_than_32_videos(tmp_path, tiny_package, labelled_clips, trained_evaluator):
    from pipelines.cli import app

    cfg = EvaluateConfig(evaluator=trained_evaluator["path"], num_videos=31)
    with pytest.raises(PyocoError, match="FVD needs at least 32 generated videos"):
        run_evaluate(str(tiny_package), str(labelled_clips), cfg, log_to_mlflow=False)
    res = CliRunner().invoke(
        app,
        [
            "evaluate",
            "--checkpoint",
            str(tiny_package),
            "--data",
            str(labelled_clips),
            "--evaluator",
            trained_evaluator["path"],
            "--num-videos",
            "16",
            "--no-mlflow",
        ],
    )
    assert res.exit_code == 2, res.output
    assert "at least 32 generated videos" in res.stderr and len(res.stderr.strip().splitlines()) == 1


def test_gpu_tasks_on_a_cluster_without_a_gpu_fail_in_one_line_not_a_hang(
    ray_local, tiny_package, clips_dir, tmp_path
):
    """``evaluate.use_gpu`` and ``pyoco sample --device gpu`` run in one-GPU Ray tasks (pipelines.gpu). This
    machine's Ray has 2 CPUs and no GPU: each refuses at once, in one line naming the setting, rather than
    queueing a task that no node can ever run; nothing is written."""
    import time

    from pipelines.cli import app

    cfg_file = tmp_path / "cfg.yaml"
    cfg_file.write_text(json.dumps({"evaluate": {"use_gpu": True, "num_videos": 6, "sample_steps": 2}}))
    t0 = time.perf_counter()
    with pytest.raises(
        PyocoError, match=r"^evaluate\.use_gpu: this Ray cluster has no GPU \(2 CPUs, 0 GPUs\)"
    ):
        run_evaluate(str(tiny_package), str(clips_dir), _cfg(use_gpu=True), log_to_mlflow=False)
    runner = CliRunner()
    out = tmp_path / "results.json"
    res = runner.invoke(
        app,
        ["evaluate", "--checkpoint", str(tiny_package), "--data", str(clips_dir), "--config", str(cfg_file)]
        + ["--no-mlflow", "--out", str(out)],
    )
    assert res.exit_code == 2, res.output
    assert "evaluate.use_gpu: this Ray cluster has no GPU" in res.output and not out.exists()
    video = tmp_path / "v.mp4"
    sample = ["sample", "--model", str(tiny_package), "--prompt", "a red square", "--out", str(video)]
    res = runner.invoke(app, [*sample, "--device", "gpu"])
    assert res.exit_code == 2 and "--device gpu: this Ray cluster has no GPU" in res.output, res.output
    assert len(res.output.strip().splitlines()) == 1 and not video.exists()
    assert time.perf_counter() - t0 < 60  # refused, not waiting for a GPU
    res = runner.invoke(app, [*sample, "--device", "tpu"])
    assert res.exit_code == 2 and "--device must be cpu or gpu (got 'tpu')" in res.output


def test_summary_says_when_the_evaluator_does_not_read_a_label():
    """A prompt accuracy scored by an evaluator that cannot read the label on real val clips (below halfway
    from chance to 1) is flagged as not a measure; one it reads is printed plainly."""
    from pipelines.evaluate.summary import summary_lines

    def acc(real: float, chance: float) -> dict:
        return {
            "value": 0.3,
            "ci_low": 0.2,
            "ci_high": 0.4,
            "chance": chance,
            "evaluator_accuracy_on_real": real,
        }

    score = {"value": 1.5, "ci_low": 1.4, "ci_high": 1.6, "max": 4}
    results = {
        "fvd": {"status": "skipped", "reason": "fewer than 32 videos"},
        "prompt_accuracy": {"direction": acc(0.35, 0.25), "color": acc(1.0, 1 / 7)},
        "inception_score": {"direction": score, "color": score},
        "motion": {
            "motion_gap": 0.01,
            "motion_gap_ci_low": 0.0,
            "motion_gap_ci_high": 0.02,
            "motion_mean_generated": 0.02,
            "motion_mean_real": 0.02,
        },
        "val_loss_per_timestep": {"500": 0.1},
        "val_loss": 0.1,
    }
    lines = {ln.split(":")[0]: ln for ln in summary_lines(results)}
    assert lines["prompt accuracy direction"].endswith(
        "the evaluator does not read this label, so this is not a measure"
    )
    assert "does not read" not in lines["prompt accuracy color"]
