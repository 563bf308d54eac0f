"""The PYoCo correlated video noise prior (Ge et al. 2023, "Preserve Your Own Correlation", Sec. 3.2).

Noise tensors are (B, C, T, H, W) with frames on axis 2. Each frame's marginal is exactly N(0, I); the
prior only correlates frames of the same clip, never pixels, channels or clips.

    mixed (eq. 4):        eps_i = eps_shared + eps_ind_i
                          eps_shared ~ N(0, alpha^2 / (1 + alpha^2))   (one draw per clip, all frames)
                          eps_ind_i  ~ N(0,       1 / (1 + alpha^2))
    progressive (eq. 5):  eps_0 ~ N(0, 1)
                          eps_i = rho * eps_{i-1} + eps_ind_i,  rho = alpha / sqrt(1 + alpha^2)
                          eps_ind_i ~ N(0, 1 / (1 + alpha^2))

The variances above become standard-deviation coefficients (square roots) when we scale unit normals;
mixing up the two is the usual bug. Frame covariance: mixed has 1 on the diagonal and
alpha^2 / (1 + alpha^2) elsewhere; progressive is the AR(1) matrix rho^|i - j|.

Cost: mixed is one randn of the full size plus one of size 1/T; progressive is one randn plus T in-place
axpy's over frame slices. No Python work per element.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from pyoco.errors import InputError

KINDS = ("iid", "mixed", "progressive")

Generator = torch.Generator | Sequence[torch.Generator] | None


def _check_alpha(alpha: float) -> float:
    try:
        a = float(alpha)
    except (TypeError, ValueError):
        raise InputError(f"alpha must be a number (got {alpha!r})") from None
    if not math.isfinite(a) or a < 0:
        raise InputError(f"alpha must be a finite number >= 0 (got {alpha!r})")
    return a


def _check_kind(kind: str) -> str:
    if kind not in KINDS:
        raise InputError(f"unknown noise kind {kind!r}; expected one of {', '.join(KINDS)}")
    return kind


def alpha_to_rho(alpha: float, kind: str = "progressive") -> float:
    """Correlation of neighbouring frames for the paper's alpha.

    mixed: alpha^2 / (1 + alpha^2) (the shared variance); progressive: alpha / sqrt(1 + alpha^2); iid: 0.
    """
    a = _check_alpha(alpha)
    kind = _check_kind(kind)
    if kind == "iid":
        return 0.0
    if kind == "mixed":
        return a * a / (1.0 + a * a)
    return a / math.sqrt(1.0 + a * a)


def rho_to_alpha(rho: float, kind: str = "progressive") -> float:
    """Inverse of :func:`alpha_to_rho`, for rho in [0, 1)."""
    kind = _check_kind(kind)
    r = float(rho)
    if not math.isfinite(r) or not 0.0 <= r < 1.0:
        raise InputError(f"rho must be in [0, 1) (got {rho!r})")
    if kind == "iid":
        if r != 0.0:
            raise InputError(f"iid noise has rho = 0 (got {rho!r})")
        return 0.0
    if kind == "mixed":
        return math.sqrt(r / (1.0 - r))
    return r / math.sqrt(1.0 - r * r)


def _mix_seed(*parts: int) -> int:
    """A 63-bit seed from integers, with no collisions between e.g. (seed=1, rank=0) and (seed=0, rank=1)."""
    blob = ":".join(str(int(p)) for p in parts).encode()
    return int.from_bytes(hashlib.sha256(blob).digest()[:8], "little") & ((1 << 63) - 1)


def rank_generator(seed: int, rank: int, *, device: str | torch.device = "cpu") -> torch.Generator:
    """The diffusion-noise stream of one data-parallel rank.

    Same seed and rank give the same stream; another rank gives an independent one. Draw a whole clip
    (all its frames) from one generator: the prior's correlations are between frames of one draw.
    """
    g = torch.Generator(device=device)
    g.manual_seed(_mix_seed(seed, rank, 0x5059))
    return g


def clip_generators(
    seed: int, clip_ids: Sequence[int], *, device: str | torch.device = "cpu"
) -> list[torch.Generator]:
    """One generator per clip (evaluation: a clip's noise must not depend on batch composition)."""
    out = []
    for cid in clip_ids:
        g = torch.Generator(device=device)
        g.manual_seed(_mix_seed(seed, cid, 0xC11B))
        out.append(g)
    return out


@dataclass(frozen=True)
class NoisePrior:
    """A noise distribution over video tensors (B, C, T, H, W). Build with :func:`make_prior`."""

    kind: str = "iid"
    alpha: float = 0.0

    def __post_init__(self) -> None:
        _check_kind(self.kind)
        object.__setattr__(self, "alpha", _check_alpha(self.alpha))

    # --------------------------------------------------------------------------------------- statistics
    @property
    def rho(self) -> float:
        """Correlation of neighbouring frames."""
        return alpha_to_rho(self.alpha, self.kind)

    @property
    def is_iid(self) -> bool:
        return self.kind == "iid" or self.alpha == 0.0

    def covariance(self, num_frames: int) -> torch.Tensor:
        """The T x T covariance between frames (also their correlation: the marginals are unit)."""
        if int(num_frames) != num_frames or num_frames < 1:
            raise ValueError(f"num_frames must be a positive integer (got {num_frames!r})")
        t = int(num_frames)
        if self.is_iid:
            return torch.eye(t, dtype=torch.float64)
        if self.kind == "mixed":
            shared = self.alpha**2 / (1.0 + self.alpha**2)
            return torch.full((t, t), shared, dtype=torch.float64) + (1.0 - shared) * torch.eye(
                t, dtype=torch.float64
            )
        idx = torch.arange(t, dtype=torch.float64)
        return self.rho ** (idx[:, None] - idx[None, :]).abs()

    # ------------------------------------------------------------------------------------------ drawing
    def sample(
        self,
        shape: Sequence[int],
        *,
        generator: Generator = None,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> torch.Tensor:
        """Draw noise of ``shape`` = (B, C, T, H, W).

        ``generator`` is one ``torch.Generator`` or a list of B of them (one stream per clip, so a clip's
        noise does not depend on what else is in the batch). The draw happens in float32 and is cast to
        ``dtype`` afterwards, so bf16 training sees the same statistics.
        """
        shape = tuple(int(s) for s in shape)
        if len(shape) != 5:
            raise ValueError(f"noise shape must be 5-D (B, C, T, H, W) with frames on axis 2 (got {shape})")
        if any(s < 1 for s in shape):
            raise ValueError(f"noise shape must have positive sizes (got {shape})")
        dtype = dtype or torch.float32
        if generator is not None and not isinstance(generator, torch.Generator):
            gens = list(generator)
            if len(gens) != shape[0]:
                raise ValueError(f"got {len(gens)} generators for a batch of {shape[0]} clips")
            one = (1, *shape[1:])
            return torch.cat([self._draw(one, g, device) for g in gens]).to(dtype)
        return self._draw(shape, generator, device).to(dtype)

    def sample_like(self, x: torch.Tensor, *, generator: Generator = None) -> torch.Tensor:
        return self.sample(x.shape, generator=generator, device=x.device, dtype=x.dtype)

    def _draw(self, shape: tuple[int, ...], generator, device) -> torch.Tensor:
        b, c, t, h, w = shape
        if self.is_iid or t == 1:
            # T = 1 (and alpha = 0) is exactly iid: same values as kind="iid" for the same generator.
            return torch.randn(shape, generator=generator, device=device, dtype=torch.float32)
        a2 = self.alpha**2
        sd_ind = math.sqrt(1.0 / (1.0 + a2))
        eps = torch.randn(shape, generator=generator, device=device, dtype=torch.float32)
        if self.kind == "mixed":
            sd_shared = math.sqrt(a2 / (1.0 + a2))
            shared = torch.randn((b, c, 1, h, w), generator=generator, device=device, dtype=torch.float32)
            # shared * sd_shared + sd_ind * eps in one fused pass, broadcasting the shared draw over frames.
            return torch.add(shared.mul_(sd_shared), eps, alpha=sd_ind, out=eps)
        # progressive: eps_0 stays N(0, 1); later frames are rho * previous + N(0, 1 / (1 + alpha^2)).
        # Frame by frame, so each slice is still in cache for its second touch.
        rho = self.rho
        for i in range(1, t):
            eps[:, :, i].mul_(sd_ind).add_(eps[:, :, i - 1], alpha=rho)
        return eps

    def describe(self) -> dict:
        return {"kind": self.kind, "alpha": self.alpha, "rho": self.rho}


def make_prior(kind: str = "progressive", alpha: float = 1.0) -> NoisePrior:
    """``make_prior("mixed", alpha=1.0)``. ``iid`` ignores alpha (recorded as 0)."""
    kind = _check_kind(kind)
    alpha = _check_alpha(alpha)
    return NoisePrior(kind=kind, alpha=0.0 if kind == "iid" else alpha)


def empirical_frame_correlation(noise: torch.Tensor) -> torch.Tensor:
    """T x T correlation between frames, pooling batch, channel and pixels as samples."""
    if noise.ndim != 5:
        raise ValueError(f"expected (B, C, T, H, W) noise (got shape {tuple(noise.shape)})")
    t = noise.shape[2]
    x = noise.transpose(1, 2).reshape(noise.shape[0], t, -1).transpose(0, 1).reshape(t, -1).double()
    x = x - x.mean(dim=1, keepdim=True)
    cov = x @ x.T / x.shape[1]
    sd = cov.diagonal().sqrt()
    return cov / (sd[:, None] * sd[None, :])
