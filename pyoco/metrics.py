"""Sample-quality metrics: Fréchet distance between feature statistics, and temporal consistency.

Pure numpy/torch; no mlflow, no ray. Video layouts at this boundary:

    videos    uint8 (N, T, H, W, 3)         what the sampler returns and what preprocess stores per clip
    extractor float32 (N, 3, T, H, W) in [-1, 1]  ->  features (N, D)

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
from pathlib import Path

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
    """Mean frame-to-frame change over a set of uint8 videos (lower = smoother). See frame_differences."""
    return float(frame_differences(videos).mean())


# --------------------------------------------------------------------------------------- FVD extractor
def videos_to_extractor_input(videos: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 (N, T, H, W, 3) -> float32 (N, 3, T, H, W) in [-1, 1]."""
    v = _check_videos(videos)
    return v.permute(0, 4, 1, 2, 3).to(torch.float32).div(127.5).sub(1.0).contiguous()


class FeatureExtractor:
    """A user-supplied TorchScript video network (e.g. the I3D used for FVD), as ``videos -> (N, D)``.

    Contract for the TorchScript file: it takes float32 (N, 3, T, H, W) in [-1, 1] and returns (N, D)
    features (anything with N leading is flattened). The StyleGAN-V I3D export additionally takes the keyword
    arguments ``rescale=False, resize=True, return_features=True``; we pass those that the module's
    ``forward`` schema declares.
    """

    STYLEGAN_V_KWARGS = {"rescale": False, "resize": True, "return_features": True}

    def __init__(self, module: torch.jit.ScriptModule, path: str, batch_size: int = 8):
        self.module = module
        self.path = path
        self.batch_size = batch_size
        try:
            names = {a.name for a in module.forward.schema.arguments}
        except (AttributeError, RuntimeError):
            names = set()
        self.kwargs = {k: v for k, v in self.STYLEGAN_V_KWARGS.items() if k in names}

    @torch.no_grad()
    def __call__(self, videos: np.ndarray | torch.Tensor) -> np.ndarray:
        x = videos_to_extractor_input(videos)
        feats = []
        for i in range(0, x.shape[0], self.batch_size):
            out = self.module(x[i : i + self.batch_size], **self.kwargs)
            if isinstance(out, tuple | list):
                out = out[0]
            if not isinstance(out, torch.Tensor):
                raise ValueError(f"{self.path}: extractor returned {type(out).__name__}, expected a tensor")
            feats.append(out.detach().to(torch.float64).reshape(out.shape[0], -1).cpu())
        return torch.cat(feats).numpy()


def load_feature_extractor(path: str | Path, *, batch_size: int = 8) -> Callable[..., np.ndarray]:
    """Load a TorchScript extractor from a local path (see :class:`FeatureExtractor` for the contract)."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{p}: FVD feature extractor not found (expected a TorchScript .pt file)")
    try:
        module = torch.jit.load(str(p), map_location="cpu")
    except Exception as err:  # torch raises RuntimeError / ValueError / zipfile errors for non-TorchScript
        raise InputError(f"{p}: not a TorchScript module ({type(err).__name__}: {str(err)[:200]})") from None
    module.eval()
    return FeatureExtractor(module, str(p), batch_size=batch_size)


def frechet_video_distance(
    extractor: Callable[..., np.ndarray],
    real_videos: np.ndarray | torch.Tensor,
    fake_videos: np.ndarray | torch.Tensor,
) -> float:
    """FVD = Fréchet distance of extractor features of real and generated uint8 videos."""
    return frechet_distance_features(extractor(real_videos), extractor(fake_videos))
