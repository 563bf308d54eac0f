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
