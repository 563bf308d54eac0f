"""Measure the frame correlation of a real video's noise, and fit the prior to it (Ge et al. 2023, Sec. 3.1).

PYoCo's motivation (its Fig. 2): DDIM-invert each frame of a real video *independently* with the image
model, and the recovered noise maps are strongly correlated across frames. This module does exactly that
and turns the measurement into a choice of prior:

    x_T^(t) = DDIMInverse(image_model, x_0^(t), caption)     for every frame t, independently
    z       = (x_T - mean) / std                             per position (c, h, w), over all clips/frames
    r(k)    = E[z^(t) . z^(t+k)]                             within a clip, lags k = 1..T-1
    mixed:        r(k) = alpha^2 / (1 + alpha^2)             (the same for every lag)
    progressive:  r(k) = rho^k,  rho = alpha / sqrt(1 + alpha^2)

Standardising per position removes what the model maps *every* input to (a fixed pattern shared by all
clips), so independent frames give r(k) ~ 0; the cross-video baseline (frame t of clip i against frame t
of another clip) says how far from 0 that is on this data. The spatial neighbour correlation checks the
prior's other assumption: that the noise is white across pixels.

Layouts: clips are ``(N, C, T, H, W)`` in the model's space (pixels in [-1, 1], or VAE latents already
scaled), conditioning ``(N, L, D)`` with a ``(N, L)`` mask. Pure torch + diffusers: no ray, no mlflow.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from pyoco.diffusion import make_scheduler_config
from pyoco.noise import rho_to_alpha


def _schedulers(scheduler_config: dict[str, Any] | None, steps: int):
    from diffusers import DDIMInverseScheduler, DDIMScheduler

    cfg = {k: v for k, v in make_scheduler_config(scheduler_config).items() if k != "variance_type"}
    inverse = DDIMInverseScheduler.from_config(cfg)
    forward = DDIMScheduler.from_config(cfg)
    inverse.set_timesteps(steps)
    forward.set_timesteps(steps)
    return inverse, forward


@torch.no_grad()
def ddim_invert(
    denoiser: nn.Module,
    x0: torch.Tensor,
    cond: torch.Tensor,
    mask: torch.Tensor | None,
    *,
    scheduler_config: dict[str, Any] | None,
    steps: int = 50,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Deterministic DDIM inversion of ``x0`` (N, C, T, H, W), then the DDIM reconstruction from it.

    ``denoiser`` is an image model (`pyoco.model.VideoDenoiser` over a `UNet2DConditionModel`), which folds
    frames into the batch, so every frame is inverted on its own. Returns ``(x_T, x0_reconstructed)``.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1 (got {steps})")
    if getattr(denoiser, "is_video", False):
        raise ValueError("noise fit inverts frames independently: pass the image model, not a video model")
    inverse, forward = _schedulers(scheduler_config, steps)
    x = x0.float()
    for t in inverse.timesteps:
        x = inverse.step(denoiser(x, t, cond, mask).float(), t, x).prev_sample
    x_t = x.clone()
    for t in forward.timesteps:
        x = forward.step(denoiser(x, t, cond, mask).float(), t, x, eta=0.0).prev_sample
    return x_t, x


def standardise(noise: torch.Tensor) -> torch.Tensor:
    """Per position (c, h, w): zero mean and unit variance over all clips and frames."""
    if noise.ndim != 5:
        raise ValueError(f"expected (N, C, T, H, W) noise (got shape {tuple(noise.shape)})")
    if noise.shape[0] * noise.shape[2] < 2:
        raise ValueError("need at least 2 frames in all to standardise")
    x = noise.double()
    mean = x.mean(dim=(0, 2), keepdim=True)
    std = x.std(dim=(0, 2), keepdim=True).clamp_min(1e-12)
    return (x - mean) / std


def lag_correlations(z: torch.Tensor) -> np.ndarray:
    """``(N, T-1)``: clip i's mean correlation between frames t and t+k, for k = 1..T-1."""
    n, _, t = z.shape[:3]
    out = np.zeros((n, max(t - 1, 0)))
    for k in range(1, t):
        out[:, k - 1] = (z[:, :, :-k] * z[:, :, k:]).mean(dim=(1, 2, 3, 4)).cpu().numpy()
    return out


def cross_video_correlation(z: torch.Tensor) -> np.ndarray:
    """``(N,)``: frame t of clip i against frame t of clip i+1 (another video), averaged over t."""
    if z.shape[0] < 2:
        raise ValueError("the cross-video baseline needs at least 2 clips")
    other = torch.roll(z, shifts=1, dims=0)
    return (z * other).mean(dim=(1, 2, 3, 4)).cpu().numpy()


def spatial_neighbour_correlation(z: torch.Tensor) -> np.ndarray:
    """``(N,)``: correlation of horizontally and vertically adjacent positions (the prior assumes ~0)."""
    horizontal = (z[..., :, 1:] * z[..., :, :-1]).mean(dim=(1, 2, 3, 4))
    vertical = (z[..., 1:, :] * z[..., :-1, :]).mean(dim=(1, 2, 3, 4))
    return ((horizontal + vertical) / 2).cpu().numpy()


def bootstrap_ci(
    per_clip: np.ndarray, *, n_boot: int = 1000, seed: int = 0, level: float = 0.95
) -> tuple[float, float]:
    """Percentile bootstrap CI of the mean over clips (axis 0); works column-wise for 2-D input."""
    values = np.asarray(per_clip, dtype=np.float64)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, values.shape[0], size=(n_boot, values.shape[0]))
    means = values[idx].mean(axis=1)
    lo, hi = np.quantile(means, [(1 - level) / 2, (1 + level) / 2], axis=0)
    return lo, hi


@dataclass(frozen=True)
class PriorFit:
    kind: str  # "mixed" | "progressive": the better least-squares fit of r(k)
    alpha: float
    rho: float  # neighbouring-frame correlation of the fitted prior
    sse: dict[str, float]  # sum of squared residuals of each kind's fit
    params: dict[str, dict[str, float]]  # each kind's best alpha and rho


def fit_prior(lag_corr: np.ndarray) -> PriorFit:
    """Least-squares fit of the mean lag correlations r(1..T-1) by both priors; the lower residual wins."""
    r = np.asarray(lag_corr, dtype=np.float64)
    if r.ndim != 1 or r.size < 1:
        raise ValueError("need the mean correlation at lags 1..T-1 (T >= 2)")
    lags = np.arange(1, r.size + 1)
    cap = 0.999
    # mixed: a constant c over all lags; its least-squares value is the mean.
    c = float(np.clip(r.mean(), 0.0, cap))
    sse_mixed = float(((r - c) ** 2).sum())
    # progressive: rho^k; a fine grid is exact enough and has no local-minimum surprises.
    grid = np.linspace(0.0, cap, 4000)
    sse_grid = ((r[None, :] - grid[:, None] ** lags[None, :]) ** 2).sum(axis=1)
    rho = float(grid[int(np.argmin(sse_grid))])
    sse_prog = float(sse_grid.min())
    params = {
        "mixed": {"alpha": rho_to_alpha(c, "mixed"), "rho": c},
        "progressive": {"alpha": rho_to_alpha(rho, "progressive"), "rho": rho},
    }
    kind = "mixed" if sse_mixed <= sse_prog else "progressive"
    return PriorFit(
        kind=kind,
        alpha=params[kind]["alpha"],
        rho=params[kind]["rho"],
        sse={"mixed": sse_mixed, "progressive": sse_prog},
        params=params,
    )


def psnr(a: torch.Tensor, b: torch.Tensor, *, value_range: float = 2.0) -> float:
    """PSNR in dB of pixels with the given range ([-1, 1] has range 2)."""
    mse = float(((a.double() - b.double()) ** 2).mean())
    return math.inf if mse == 0 else 10.0 * math.log10(value_range**2 / mse)


@dataclass
class NoiseFitResult:
    num_clips: int
    num_frames: int
    steps: int
    lag_correlation: list[float]
    lag_correlation_ci: list[list[float]]
    cross_video_correlation: float
    cross_video_correlation_ci: list[float]
    spatial_neighbour_correlation: float
    reconstruction_psnr_db: float
    fit: dict[str, Any]
    space: str = "pixels"  # or "latents"
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def summarise(
    noise: torch.Tensor, *, reconstruction_psnr_db: float, steps: int, space: str, seed: int = 0
) -> NoiseFitResult:
    """The statistics of inverted noise ``(N, C, T, H, W)`` and the fitted prior."""
    z = standardise(noise)
    lags = lag_correlations(z)
    lo, hi = bootstrap_ci(lags, seed=seed)
    cross = cross_video_correlation(z)
    cross_lo, cross_hi = bootstrap_ci(cross, seed=seed)
    fit = fit_prior(lags.mean(axis=0))
    return NoiseFitResult(
        num_clips=int(noise.shape[0]),
        num_frames=int(noise.shape[2]),
        steps=int(steps),
        lag_correlation=[float(v) for v in lags.mean(axis=0)],
        lag_correlation_ci=[[float(a), float(b)] for a, b in zip(lo, hi, strict=True)],
        cross_video_correlation=float(cross.mean()),
        cross_video_correlation_ci=[float(cross_lo), float(cross_hi)],
        spatial_neighbour_correlation=float(spatial_neighbour_correlation(z).mean()),
        reconstruction_psnr_db=float(reconstruction_psnr_db),
        fit=asdict(fit),
        space=space,
    )


def plot(result: NoiseFitResult, path: str) -> None:
    """Lag correlation with its CI, both fitted priors and the cross-video baseline, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lags = np.arange(1, len(result.lag_correlation) + 1)
    r = np.asarray(result.lag_correlation)
    ci = np.asarray(result.lag_correlation_ci).reshape(-1, 2)
    fig, ax = plt.subplots(figsize=(5.5, 3.6), dpi=120)
    # The interval as drawn lines, not errorbar's offsets: a percentile CI need not contain the mean.
    ax.vlines(lags, ci[:, 0], ci[:, 1], colors="k", lw=1)
    ax.plot(lags, r, "o", color="k", label="DDIM-inverted frames (95% CI)")
    fine = np.linspace(1, max(lags.max(), 1), 200)
    mixed, prog = result.fit["params"]["mixed"], result.fit["params"]["progressive"]
    ax.plot(fine, np.full_like(fine, mixed["rho"]), "--", label=f"mixed, alpha={mixed['alpha']:.2f}")
    ax.plot(fine, prog["rho"] ** fine, ":", label=f"progressive, alpha={prog['alpha']:.2f}")
    ax.axhline(result.cross_video_correlation, color="grey", lw=1, label="cross-video baseline")
    ax.set_xlabel("frame lag k")
    ax.set_ylabel("noise correlation r(k)")
    ax.set_ylim(min(-0.1, float(r.min()) - 0.05), 1.0)
    ax.set_title(f"noise fit: best {result.fit['kind']} (alpha={result.fit['alpha']:.2f}), "
                 f"{result.num_clips} clips")  # fmt: skip
    ax.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
