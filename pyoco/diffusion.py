"""The video diffusion training objective, handed its noise by a :class:`~pyoco.noise.NoisePrior`.

For clean clips x0 (B, C, T, H, W), one timestep t per clip (shared by its frames) and prior noise eps,

    x_t = sqrt(abar_t) * x0 + sqrt(1 - abar_t) * eps                          (DDPM, Ho et al. eq. 4)
    target = eps                                  (prediction_type "epsilon")
           = sqrt(abar_t) * eps - sqrt(1 - abar_t) * x0    ("v_prediction", Salimans & Ho 2022)
    loss = mean_b  w(t_b) * mean_{c,t,h,w} (model(x_t, t, cond) - target)^2

with min-SNR-gamma weighting (Hang et al. 2023) w = min(SNR, gamma) / SNR for epsilon and
min(SNR, gamma) / (SNR + 1) for v, where SNR = abar / (1 - abar); w = 1 without it. Both stay finite
on zero-terminal-SNR schedules (abar_T = 0, Lin et al. 2024): w_eps(SNR = 0) = 1, w_v(SNR = 0) = 0.

The loss never draws Gaussian noise itself: eps comes from ``prior.sample_like``. It only draws the
timesteps and the caption-dropout coin flips, from the same generator.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from pyoco.noise import NoisePrior

# Our default schedule for the tiny pixel-space models. A pretrained folder's scheduler/ overrides it.
DEFAULT_SCHEDULER_CONFIG: dict[str, Any] = {
    "_class_name": "DDPMScheduler",
    "num_train_timesteps": 1000,
    "beta_schedule": "squaredcos_cap_v2",
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "prediction_type": "epsilon",
    "clip_sample": True,
    "clip_sample_range": 1.0,
    # trailing: a few-step DDIM starts at t = N-1 (pure noise, which is what it is handed); with "leading",
    # 10 steps start at t = 900, where the model expects some signal in its input.
    "timestep_spacing": "trailing",
    "steps_offset": 0,
}


def make_scheduler_config(
    pretrained: dict[str, Any] | None = None,
    num_train_timesteps: int | None = None,
    *,
    prediction_type: str | None = None,
) -> dict[str, Any]:
    """The scheduler config to train and sample with: a pretrained folder's, or our default.

    ``prediction_type`` (None: keep the config's) overrides what the model predicts, so the config a model
    is exported with says what it was trained to predict: a v-model sampled as epsilon draws noise."""
    cfg = dict(pretrained) if pretrained else dict(DEFAULT_SCHEDULER_CONFIG)
    if num_train_timesteps is not None and not pretrained:
        cfg["num_train_timesteps"] = int(num_train_timesteps)
    if prediction_type is not None:
        cfg["prediction_type"] = prediction_type
    return cfg


def alphas_cumprod(scheduler_config: dict[str, Any]) -> torch.Tensor:
    """abar_t for t = 0..N-1 as float64, computed by diffusers' own DDPMScheduler."""
    from diffusers import DDPMScheduler

    sched = DDPMScheduler.from_config(scheduler_config)
    return sched.alphas_cumprod.to(torch.float64).clone()


@dataclass
class LossOutput:
    loss: torch.Tensor  # scalar, what backward() is called on
    per_sample: torch.Tensor  # (B,) weighted per-clip loss, detached
    timesteps: torch.Tensor  # (B,) long


def _expand(v: torch.Tensor, ndim: int) -> torch.Tensor:
    return v.reshape(-1, *([1] * (ndim - 1)))


class DiffusionLoss:
    """``loss_fn(model, x0, cond, cond_mask, prior, generator=g)`` -> :class:`LossOutput`."""

    def __init__(
        self,
        scheduler_config: dict[str, Any] | None = None,
        *,
        prediction_type: str | None = None,
        min_snr_gamma: float | None = None,
        caption_dropout: float = 0.0,
        num_train_timesteps: int | None = None,
        timestep_power: float = 1.0,
    ):
        self.scheduler_config = make_scheduler_config(scheduler_config, num_train_timesteps)
        self.prediction_type = prediction_type or self.scheduler_config.get("prediction_type", "epsilon")
        if self.prediction_type not in ("epsilon", "v_prediction"):
            raise ValueError(
                f"prediction_type must be 'epsilon' or 'v_prediction' (got {self.prediction_type!r})"
            )
        if min_snr_gamma is not None and not min_snr_gamma > 0:
            raise ValueError(f"min_snr_gamma must be > 0 (got {min_snr_gamma!r})")
        if not 0.0 <= caption_dropout <= 1.0:
            raise ValueError(f"caption_dropout must be in [0, 1] (got {caption_dropout!r})")
        if not timestep_power > 0:
            raise ValueError(f"timestep_power must be > 0 (got {timestep_power!r})")
        self.min_snr_gamma = min_snr_gamma
        self.caption_dropout = caption_dropout
        self.timestep_power = float(timestep_power)
        self.alphas_cumprod = alphas_cumprod(self.scheduler_config)
        self.num_train_timesteps = len(self.alphas_cumprod)

    def noisy(self, x0: torch.Tensor, eps: torch.Tensor, timesteps: torch.Tensor):
        """(x_t, target) for clean x0, noise eps and per-clip timesteps (B,)."""
        abar = self.alphas_cumprod.to(x0.device)[timesteps].to(torch.float32)
        sqrt_a = _expand(abar.sqrt(), x0.ndim).to(x0.dtype)
        sqrt_1ma = _expand((1.0 - abar).sqrt(), x0.ndim).to(x0.dtype)
        x_t = sqrt_a * x0 + sqrt_1ma * eps
        target = eps if self.prediction_type == "epsilon" else sqrt_a * eps - sqrt_1ma * x0
        return x_t, target

    def weights(self, timesteps: torch.Tensor) -> torch.Tensor:
        """Per-clip loss weight (B,) float32: min-SNR-gamma, or ones."""
        if self.min_snr_gamma is None:
            return torch.ones(timesteps.shape, dtype=torch.float32, device=timesteps.device)
        abar = self.alphas_cumprod.to(timesteps.device)[timesteps]
        snr = abar / (1.0 - abar)
        if self.prediction_type == "epsilon":
            # min(SNR, gamma) / SNR written as min(1, gamma / SNR): finite (= 1) at SNR = 0, i.e. at the
            # last step of a zero-terminal-SNR schedule (abar_T = 0), where the ratio form is 0 / 0.
            w = (self.min_snr_gamma / snr).clamp(max=1.0)
        else:
            w = snr.clamp(max=self.min_snr_gamma) / (snr + 1.0)
        return w.to(torch.float32)

    def sample_timesteps(self, batch_size: int, generator: torch.Generator | None, device) -> torch.Tensor:
        """Uniform over [0, T), or with ``timestep_power`` p != 1 a density proportional to t^(p-1) (p = 3: t^2,
        more of the training at high noise, where only the caption says where the shape goes)."""
        gen_device = generator.device if generator is not None else "cpu"
        n = self.num_train_timesteps
        if self.timestep_power == 1.0:  # the same draws as before the option existed (golden loss curve)
            t = torch.randint(0, n, (batch_size,), generator=generator, device=gen_device)
        else:
            u = torch.rand((batch_size,), generator=generator, device=gen_device)
            t = (n * u.pow(1.0 / self.timestep_power)).long().clamp(max=n - 1)
        return t.to(device)

    def drop_captions(self, cond, cond_mask, null_cond, null_mask, generator):
        """Replace each clip's caption by the null embedding with probability ``caption_dropout``."""
        if self.caption_dropout <= 0.0:
            return cond, cond_mask
        if null_cond is None:
            raise ValueError("caption_dropout > 0 needs null_cond (the text encoder's null embedding)")
        b = cond.shape[0]
        gen_device = generator.device if generator is not None else "cpu"
        drop = (torch.rand((b,), generator=generator, device=gen_device) < self.caption_dropout).to(
            cond.device
        )
        null_cond = null_cond.to(cond.device, cond.dtype).expand_as(cond)
        cond = torch.where(drop[:, None, None], null_cond, cond)
        if cond_mask is not None and null_mask is not None:
            null_mask = null_mask.to(cond_mask.device, cond_mask.dtype).expand_as(cond_mask)
            cond_mask = torch.where(drop[:, None], null_mask, cond_mask)
        return cond, cond_mask

    def __call__(
        self,
        model: nn.Module,
        x0: torch.Tensor,
        cond: torch.Tensor,
        cond_mask: torch.Tensor | None,
        prior: NoisePrior,
        *,
        generator: torch.Generator | None = None,
        null_cond: torch.Tensor | None = None,
        null_mask: torch.Tensor | None = None,
        timesteps: torch.Tensor | None = None,
    ) -> LossOutput:
        if x0.ndim != 5:
            raise ValueError(f"x0 must be (B, C, T, H, W) (got shape {tuple(x0.shape)})")
        b = x0.shape[0]
        # Draw order is fixed (noise, timesteps, dropout) so one generator reproduces the whole step.
        gen_device = generator.device if generator is not None else x0.device
        eps = prior.sample(x0.shape, generator=generator, device=gen_device, dtype=x0.dtype).to(x0.device)
        if timesteps is None:
            timesteps = self.sample_timesteps(b, generator, x0.device)
        timesteps = timesteps.to(x0.device).long()
        cond, cond_mask = self.drop_captions(cond, cond_mask, null_cond, null_mask, generator)
        x_t, target = self.noisy(x0, eps, timesteps)
        pred = model(x_t, timesteps, cond, cond_mask)
        per_clip = (pred.float() - target.float()).pow(2).mean(dim=tuple(range(1, x0.ndim)))
        weighted = per_clip * self.weights(timesteps)
        return LossOutput(loss=weighted.mean(), per_sample=weighted.detach(), timesteps=timesteps)
