"""Sample-quality metrics: Fréchet distance (FVD), motion gap, prompt accuracy, class score, and their CIs.

Pure numpy/torch; no mlflow, no ray. Video layouts at this boundary:

    videos    uint8 (N, T, H, W, 3)   what the sampler returns and what preprocess stores per clip
    features  (N, D)                  from an evaluator network (pyoco.evaluator.Evaluator)
    probs     (N, K)                  its class probabilities for one label

Fréchet distance between Gaussians N(mu1, S1) and N(mu2, S2) (Dowson & Landau 1982; FID, Heusel et al.
2017; FVD, Unterthiner et al. 2018):

    d^2 = |mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^{1/2})

We compute tr((S1 S2)^{1/2}) without a general matrix square root: S1 S2 is similar to the symmetric PSD
matrix M = S1^{1/2} S2 S1^{1/2} (conjugate by S1^{1/2}), so its eigenvalues are M's, all real and >= 0, and
the trace of the principal square root is sum_i sqrt(lambda_i(M)). Two symmetric eigendecompositions are
stable where scipy's ``sqrtm`` of the non-symmetric product can return complex noise.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from pyoco.errors import InputError


# ------------------------------------------------------------------------------------------------ Fréchet
def feature_statistics(features: np.ndarray | torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """(mu (D,), sigma (D, D)) of features (N, D), float64, unbiased covariance (N - 1)."""
    f = features.detach().cpu().numpy() if isinstance(features, torch.Tensor) else np.asarray(features)
    f = f.astype(np.float64).reshape(f.shape[0], -1)
    if f.shape[0] < 2:
        raise ValueError(f"need at least 2 feature vectors for a covariance (got {f.shape[0]})")
    if not np.isfinite(f).all():
        raise ValueError("features contain NaN or inf")
    return f.mean(axis=0), np.cov(f, rowvar=False).reshape(f.shape[1], f.shape[1])


def _psd_sqrt(s: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh((s + s.T) / 2.0)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def trace_sqrt_product(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    """tr((sigma1 sigma2)^{1/2}) for symmetric PSD sigma1, sigma2 (see the module docstring)."""
    r = _psd_sqrt(np.asarray(sigma1, dtype=np.float64))
    m = r @ np.asarray(sigma2, dtype=np.float64) @ r
    lam = np.linalg.eigvalsh((m + m.T) / 2.0)
    return float(np.sqrt(np.clip(lam, 0.0, None)).sum())


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """Squared Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2) (the number FID/FVD report)."""
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = (
        np.atleast_2d(np.asarray(sigma1, np.float64)),
        np.atleast_2d(np.asarray(sigma2, np.float64)),
    )
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (mu1.size, mu1.size):
        raise ValueError(
            f"shape mismatch: mu {mu1.shape} vs {mu2.shape}, sigma {sigma1.shape} vs {sigma2.shape}"
        )
    diff = mu1 - mu2
    d2 = diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * trace_sqrt_product(sigma1, sigma2)
    return float(max(d2, 0.0))


def frechet_distance_features(real: np.ndarray | torch.Tensor, fake: np.ndarray | torch.Tensor) -> float:
    """Fréchet distance between the Gaussian fits of two feature sets (N1, D) and (N2, D)."""
    return frechet_distance(*feature_statistics(real), *feature_statistics(fake))


# ----------------------------------------------------------------------------------- temporal consistency
def _check_videos(videos: np.ndarray | torch.Tensor) -> torch.Tensor:
    v = torch.as_tensor(videos)
    if v.dtype != torch.uint8 or v.ndim != 5 or v.shape[-1] != 3:
        raise ValueError(f"expected uint8 videos (N, T, H, W, 3) (got {v.dtype} {tuple(v.shape)})")
    return v


def frame_differences(videos: np.ndarray | torch.Tensor) -> torch.Tensor:
    """Per-video mean absolute change between consecutive frames, in [0, 1] (N,) float64.

    0 means a still video; i.i.d. uniform noise frames give about 1/3. Videos with T = 1 give 0.
    """
    v = _check_videos(videos)
    if v.shape[1] < 2:
        return torch.zeros(v.shape[0], dtype=torch.float64)
    x = v.to(torch.float64) / 255.0
    return (x[:, 1:] - x[:, :-1]).abs().mean(dim=(1, 2, 3, 4))


def temporal_consistency(videos: np.ndarray | torch.Tensor) -> float:
    """Mean frame-to-frame change over a set of uint8 videos. See frame_differences.

    Not a quality score: a frozen video scores 0, the "best" value. Use :func:`motion_gap` to compare
    generated motion with real motion."""
    return float(frame_differences(videos).mean())


# ------------------------------------------------------------------------------------------- motion gap
def wasserstein_1d(a: np.ndarray, b: np.ndarray) -> float:
    """W1 distance between the empirical distributions of samples ``a`` and ``b`` (1-D):
    the integral over x of |F_a(x) - F_b(x)|, exact for step CDFs."""
    a = np.sort(np.asarray(a, np.float64).ravel())
    b = np.sort(np.asarray(b, np.float64).ravel())
    if a.size == 0 or b.size == 0:
        raise ValueError("wasserstein_1d needs at least one sample on each side")
    x = np.concatenate([a, b])
    x.sort()
    widths = np.diff(x)
    cdf_a = np.searchsorted(a, x[:-1], side="right") / a.size
    cdf_b = np.searchsorted(b, x[:-1], side="right") / b.size
    return float(np.sum(np.abs(cdf_a - cdf_b) * widths))


def motion_gap(generated: np.ndarray | torch.Tensor, real: np.ndarray | torch.Tensor) -> float:
    """W1 distance between the per-clip mean |frame difference| distributions of two sets of uint8 videos
    (same units as :func:`frame_differences`, in [0, 1]; 0 = the same motion statistics). A frozen video
    has motion 0, so it scores the real clips' mean motion: far from real-vs-real."""
    return wasserstein_1d(frame_differences(generated).numpy(), frame_differences(real).numpy())


# ---------------------------------------------------------------------------------- intervals, scores
def bootstrap_ci(
    statistic: Callable[..., float],
    samples: tuple[np.ndarray, ...],
    *,
    num_bootstrap: int = 200,
    seed: int = 0,
    level: float = 0.95,
) -> tuple[float, float]:
    """Percentile bootstrap CI of ``statistic(*samples)``: each sample set (rows on axis 0) is resampled
    with replacement, independently, ``num_bootstrap`` times from ``numpy.random.default_rng(seed)``."""
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(num_bootstrap):
        values.append(statistic(*(s[rng.integers(0, len(s), len(s))] for s in samples)))
    lo, hi = np.quantile(np.asarray(values, np.float64), [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


MIN_FVD_VIDEOS = 32


def fvd_from_features(
    real: np.ndarray,
    fake: np.ndarray,
    *,
    num_bootstrap: int = 200,
    seed: int = 0,
    min_videos: int = MIN_FVD_VIDEOS,
) -> dict[str, float]:
    """{"fvd", "fvd_ci_low", "fvd_ci_high", "num_videos"} from features (N, D) of real and generated videos.

    Refuses fewer than ``min_videos`` generated videos: the Fréchet distance of a handful of samples is
    dominated by its estimation bias. The CI is a bootstrap over both sets (:func:`bootstrap_ci`)."""
    real, fake = np.asarray(real, np.float64), np.asarray(fake, np.float64)
    if len(fake) < min_videos:
        raise InputError(f"FVD needs at least {min_videos} generated videos (got {len(fake)})")
    if len(real) < 2:
        raise InputError(f"FVD needs at least 2 real clips (got {len(real)})")
    value = frechet_distance_features(real, fake)
    lo, hi = bootstrap_ci(frechet_distance_features, (real, fake), num_bootstrap=num_bootstrap, seed=seed)
    return {"fvd": value, "fvd_ci_low": lo, "fvd_ci_high": hi, "num_videos": int(len(fake))}


def wilson_interval(successes: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion (95 % for the default z); (0, 1) when n = 0."""
    if n <= 0:
        return 0.0, 1.0
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return float(max(0.0, centre - half)), float(min(1.0, centre + half))


def class_score(probs: np.ndarray) -> float:
    """The Inception-Score form for one label: exp(E_x KL(p(y|x) || p(y))), p(y) the mean over videos.

    Between 1 (every video gets the same class distribution, or all are uncertain) and K (each video is
    confidently one class and the classes are used equally)."""
    p = np.clip(np.asarray(probs, np.float64), 1e-12, 1.0)
    marginal = p.mean(axis=0, keepdims=True)
    return float(np.exp(np.mean(np.sum(p * (np.log(p) - np.log(marginal)), axis=1))))
