"""pyoco.noisefit: DDIM-inverted frame correlation and the prior fitted to it (issue 11, noise fit)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pyoco import noisefit as nf
from pyoco.model import TinyUNetConfig, VideoDenoiser, build_unet2d
from pyoco.noise import alpha_to_rho, make_prior, rank_generator
from pyoco.synth import make_spec, render

N_CLIPS, N_FRAMES, SIZE, STEPS = 8, 8, 16, 5


@pytest.fixture(scope="module")
def image_model():
    cfg = TinyUNetConfig(sample_size=SIZE, block_out_channels=(16, 32))
    return VideoDenoiser(build_unet2d(cfg, seed=0)).eval()


@pytest.fixture(scope="module")
def synth_clips():
    """(N, 3, T, H, W) in [-1, 1]: moving coloured shapes on plain or noisy backgrounds."""
    clips = np.stack([render(make_spec(i, frames=N_FRAMES, size=SIZE)) for i in range(N_CLIPS)])
    return torch.from_numpy(clips).float().div(127.5).sub(1).permute(0, 4, 1, 2, 3).contiguous()


def _fit(model, clips):
    cond = torch.zeros(clips.shape[0], 4, model.config.cross_attention_dim)
    mask = torch.ones(clips.shape[0], 4, dtype=torch.bool)
    x_t, rec = nf.ddim_invert(model, clips, cond, mask, scheduler_config=None, steps=STEPS)
    return nf.summarise(x_t, reconstruction_psnr_db=nf.psnr(rec, clips), steps=STEPS, space="pixels")


def test_shuffling_frames_in_time_lowers_the_lag1_correlation(image_model, synth_clips):
    ordered = _fit(image_model, synth_clips)
    perm = torch.randperm(N_FRAMES, generator=torch.Generator().manual_seed(3))
    assert not torch.equal(perm, torch.arange(N_FRAMES))
    shuffled = _fit(image_model, synth_clips[:, :, perm])
    # Measured 0.26 (ordered) against 0.07 (shuffled) with this seed; "clearly lower" = by at least 0.1.
    assert ordered.lag_correlation[0] > shuffled.lag_correlation[0] + 0.1
    assert ordered.lag_correlation[0] > ordered.cross_video_correlation + 0.1
    lo, hi = ordered.lag_correlation_ci[0]
    assert lo <= ordered.lag_correlation[0] <= hi


def test_iid_random_frames_give_about_zero_correlation(image_model):
    frames = torch.rand(N_CLIPS, 3, N_FRAMES, SIZE, SIZE, generator=torch.Generator().manual_seed(0)) * 2 - 1
    result = _fit(image_model, frames)
    # Standardising over N*T = 64 frames leaves a bias of about -1/64; 0.05 is ~2.5x that.
    assert np.all(np.abs(result.lag_correlation) < 0.05), result.lag_correlation
    assert abs(result.cross_video_correlation) < 0.05
    assert result.fit["params"]["mixed"]["rho"] < 0.05


@pytest.mark.parametrize("kind", ["mixed", "progressive"])
@pytest.mark.parametrize("alpha", [0.5, 1.0, 2.0])
def test_noise_drawn_from_a_prior_is_fitted_back_to_it(kind, alpha):
    prior = make_prior(kind, alpha)
    noise = prior.sample((64, 4, 8, 16, 16), generator=rank_generator(seed=1, rank=0))
    result = nf.summarise(noise, reconstruction_psnr_db=float("inf"), steps=0, space="pixels")
    assert result.fit["kind"] == kind
    # 64 clips x 1024 positions: the fitted alpha is within 10 % of the truth for these seeds.
    assert result.fit["alpha"] == pytest.approx(alpha, rel=0.1)
    assert result.fit["rho"] == pytest.approx(alpha_to_rho(alpha, kind), abs=0.03)
    assert abs(result.spatial_neighbour_correlation) < 0.02  # the prior is white across pixels
    assert abs(result.cross_video_correlation) < 0.03


def test_fit_prior_on_exact_curves():
    lags = np.arange(1, 8)
    mixed = nf.fit_prior(np.full(7, 0.5))
    assert mixed.kind == "mixed" and mixed.alpha == pytest.approx(1.0, abs=1e-6)
    rho = 1 / np.sqrt(2)
    prog = nf.fit_prior(rho**lags)
    assert prog.kind == "progressive" and prog.alpha == pytest.approx(1.0, abs=2e-3)
    with pytest.raises(ValueError, match="lags"):
        nf.fit_prior(np.array([]))


def test_video_models_are_refused(image_model):
    from pyoco.model import inflate

    video = VideoDenoiser(inflate(image_model.unet))
    with pytest.raises(ValueError, match="image model"):
        nf.ddim_invert(video, torch.zeros(1, 3, 2, SIZE, SIZE), torch.zeros(1, 4, 384), None,
                       scheduler_config=None, steps=1)  # fmt: skip


def test_plot_writes_a_png(tmp_path):
    noise = make_prior("mixed", 1.0).sample((8, 2, 4, 8, 8), generator=rank_generator(seed=0, rank=0))
    result = nf.summarise(noise, reconstruction_psnr_db=20.0, steps=0, space="pixels")
    out = tmp_path / "fit.png"
    nf.plot(result, str(out))
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _val_folder(root, n: int = 6, frames: int = 6, size: int = SIZE):
    """A preprocess-shaped folder with synth clips in clips/val (pyoco.clips format, zero captions)."""
    from pyoco import clips as clipfmt

    rows = []
    for i in range(n):
        spec = make_spec(i, frames=frames, size=size)
        rows.append({
            "clip_id": f"c{i:03d}", "source": "test", "key": spec.key, "clip_index": 0, "start_frame": 0,
            "num_frames": frames, "fps": 8.0, "height": size, "width": size,
            "frames": render(spec).tobytes(), "caption": spec.caption,
            "caption_embedding": np.zeros((4, 384), np.float32), "caption_mask": [True] * 4,
            "labels": spec.attributes(), "node_id": "test",
        })  # fmt: skip
    clipfmt.write_clip_table(rows, str(root / "clips" / "val" / "part-0.parquet"))
    return root


def test_noise_fit_cli_writes_the_report_the_plot_and_an_mlflow_run(tmp_path, image_model, monkeypatch):
    import json

    import mlflow
    from typer.testing import CliRunner

    from pipelines.cli import app
    from pyoco.package import PackageInfo, save_package

    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking)
    data = _val_folder(tmp_path / "data")
    model = save_package(tmp_path / "image", image_model, scheduler_config={}, info=PackageInfo(num_frames=1))
    out, png = tmp_path / "fit.json", tmp_path / "fit.png"
    args = ["noise", "fit", "--model", str(model), "--data", str(data), "--steps", "3", "--num-clips", "6"]
    res = CliRunner().invoke(app, [*args, "--out", str(out), "--png", str(png)])
    assert res.exit_code == 0, res.output
    report = json.loads(out.read_text())
    assert report["num_clips"] == 6 and report["num_frames"] == 6 and len(report["lag_correlation"]) == 5
    assert report["fit"]["kind"] in ("mixed", "progressive") and report["fit"]["alpha"] >= 0
    assert "best fit: noise.kind=" in res.output
    assert png.read_bytes()[:4] == b"\x89PNG"
    runs = mlflow.MlflowClient(tracking).search_runs(
        [mlflow.MlflowClient(tracking).get_experiment_by_name("pyoco-noise-fit").experiment_id]
    )
    assert len(runs) == 1 and runs[0].data.metrics["lag_correlation_1"] == pytest.approx(
        report["lag_correlation"][0]
    )
    assert runs[0].data.tags["pyoco.noise_fit.kind"] == report["fit"]["kind"]


def test_noise_fit_cli_bad_inputs_are_one_line_errors(tmp_path, image_model):
    from typer.testing import CliRunner

    from pipelines.cli import app
    from pyoco.model import inflate
    from pyoco.package import PackageInfo, save_package

    def one_error_line(res) -> bool:  # the console's progress line may precede it; no traceback
        errors = [ln for ln in res.stderr.splitlines() if ln.startswith("error:")]
        return len(errors) == 1 and "Traceback" not in res.stderr

    data = _val_folder(tmp_path / "data", n=2)
    runner = CliRunner()
    base = [
        "noise",
        "fit",
        "--data",
        str(data),
        "--no-mlflow",
        "--steps",
        "1",
        "--out",
        str(tmp_path / "f.json"),
    ]
    res = runner.invoke(app, [*base, "--model", str(tmp_path / "missing")])
    assert res.exit_code == 2 and "not found" in res.stderr and one_error_line(res)
    video = save_package(
        tmp_path / "video", VideoDenoiser(inflate(image_model.unet)), scheduler_config={}, info=PackageInfo()
    )
    res = runner.invoke(app, [*base, "--model", str(video)])
    assert res.exit_code == 2 and "image model" in res.stderr and one_error_line(res)
    res = runner.invoke(
        app, [*base[:2], "--data", str(tmp_path / "nodata"), *base[4:], "--model", str(video)]
    )
    assert res.exit_code == 2 and "clips/val" in res.stderr and one_error_line(res)


@pytest.mark.parametrize("kind", ["auto", "progressive"])
def test_the_workflows_noise_fit_step_fits_with_the_pretrained_image_model(
    tmp_path, image_model, kind, mlflow_server
):
    """The workflow's ``noise_fit`` step for real (the stub-step runner tests in test_workflow.py replace
    it): it inverts the val clips with the image model pretrain exported, writes fit.json and fit.png under
    the workflow's output, and returns what train uses: the fitted kind with its alpha, or for a fixed kind
    that kind's own best alpha."""
    import json

    from pipelines.context import RunContext
    from pipelines.workflow import steps
    from pyoco.config import parse_config
    from pyoco.package import PackageInfo, save_package

    data = _val_folder(tmp_path / "data")
    model = save_package(tmp_path / "image", image_model, scheduler_config={}, info=PackageInfo(num_frames=1))
    cfg = parse_config({
        "name": "nf", "output": str(tmp_path / "out"), "preprocess": {"input": str(tmp_path), "output": str(data)},
        "noise": {"kind": kind, "alpha": "auto", "fit_clips": 6, "fit_steps": 3},
        "mlflow": {"tracking_uri": mlflow_server.uri},  # the session's server: no sqlite store to create
    })  # fmt: skip
    outs = {"pretrain": {"model_dir": str(model)}}
    res = steps._step_noise_fit(cfg, outs, RunContext.from_config(cfg), key="k")
    report = json.loads((tmp_path / "out" / "noise_fit" / "fit.json").read_text())
    assert report["num_clips"] == 6 and res["report"].endswith("noise_fit/fit.json")
    assert (tmp_path / "out" / "noise_fit" / "fit.png").read_bytes()[:4] == b"\x89PNG"
    if kind == "auto":
        assert res["kind"] == report["fit"]["kind"] and res["alpha"] == pytest.approx(report["fit"]["alpha"])
    else:
        assert res["kind"] == "progressive"
        assert res["alpha"] == pytest.approx(report["fit"]["params"]["progressive"]["alpha"])
    fitted = steps._fitted_noise(cfg, {"noise_fit": res})
    assert fitted.noise.kind == res["kind"] and fitted.noise.alpha == round(res["alpha"], 4)

    no_model = cfg.model_copy(update={"pretrain": None})
    with pytest.raises(Exception, match="noise 'auto' needs an image model"):
        steps._step_noise_fit(no_model, {}, RunContext.from_config(cfg), key="k")
