"""DDIM sampling of videos with classifier-free guidance, drawing every noise from one prior.

The initial latent x_T and, when eta > 0, the fresh noise of every DDIM step both come from
``prior.sample``: a model finetuned with correlated noise is sampled with the same correlation
(Ge et al. 2023, Sec. 3.2). The diffusers scheduler is handed that noise through ``variance_noise`` and
never draws its own.

Layouts: the model sees (B, C, T, H, W) float; the result is uint8 (B, T, H, W, 3) with frames on
axis 1, ready for :func:`pyoco.video.write_mp4`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from pyoco.diffusion import make_scheduler_config
from pyoco.errors import InputError
from pyoco.noise import NoisePrior, clip_generators


def _ddim(scheduler_config: dict[str, Any] | None):
    from diffusers import DDIMScheduler

    cfg = make_scheduler_config(scheduler_config)
    cfg = {k: v for k, v in cfg.items() if k not in ("variance_type",)}
    return DDIMScheduler.from_config(cfg)


def from_uint8_video(frames: torch.Tensor) -> torch.Tensor:
    """(B, T, H, W, 3) uint8 -> (B, 3, T, H, W) float32 in [-1, 1] (x = u / 127.5 - 1), the model's layout."""
    if frames.ndim != 5 or frames.shape[-1] != 3 or frames.dtype != torch.uint8:
        raise ValueError(f"expected uint8 (B, T, H, W, 3) frames (got {frames.dtype} {tuple(frames.shape)})")
    return frames.permute(0, 4, 1, 2, 3).float().div(127.5).sub(1.0).contiguous()


def to_uint8_video(x: torch.Tensor) -> torch.Tensor:
    """(B, 3, T, H, W) float in [-1, 1] -> (B, T, H, W, 3) uint8."""
    if x.ndim != 5 or x.shape[1] != 3:
        raise ValueError(f"expected (B, 3, T, H, W) pixels (got shape {tuple(x.shape)})")
    x = ((x.float().clamp(-1, 1) + 1.0) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 4, 1).contiguous()


@torch.no_grad()
def sample_video(
    model: nn.Module,
    cond: torch.Tensor,
    cond_mask: torch.Tensor | None,
    *,
    prior: NoisePrior,
    null_cond: torch.Tensor | None = None,
    null_mask: torch.Tensor | None = None,
    num_frames: int,
    height: int,
    width: int,
    channels: int = 3,
    steps: int = 20,
    guidance: float = 3.0,
    eta: float = 0.0,
    generator: torch.Generator | Sequence[torch.Generator] | None = None,
    scheduler_config: dict[str, Any] | None = None,
    vae: nn.Module | None = None,
) -> torch.Tensor:
    """Generate B videos for B caption embeddings ``cond`` (B, L, D). Returns uint8 (B, T, H, W, 3).

    ``height``/``width`` are the pixel size; with a VAE the latent is `pyoco.vae.vae_factor` (8 for SD) smaller.
    ``generator`` may be one generator or B of them (one stream per video, as in evaluation).
    """
    if steps < 1:
        raise InputError(f"steps must be >= 1 (got {steps})")
    if num_frames < 1:
        raise InputError(f"num_frames must be >= 1 (got {num_frames})")
    if eta < 0:
        raise InputError(f"eta must be >= 0 (got {eta})")
    b = cond.shape[0]
    device = cond.device
    dtype = next(model.parameters()).dtype
    if vae is not None:
        from pyoco.vae import vae_factor

        factor = vae_factor(vae)
        channels = vae.config.latent_channels
        h, w = height // factor, width // factor
    else:
        if channels != 3:
            raise InputError(f"a pixel-space model must have 3 channels (got {channels}); pass its VAE")
        h, w = height, width
    shape = (b, channels, num_frames, h, w)

    use_cfg = guidance != 1.0 and null_cond is not None
    if use_cfg:
        null_cond = null_cond.to(device, cond.dtype).expand(b, *cond.shape[1:])
        both_cond = torch.cat([null_cond, cond])
        both_mask = None
        if cond_mask is not None:
            nm = null_mask if null_mask is not None else torch.ones_like(cond_mask)
            both_mask = torch.cat([nm.to(cond_mask.device, cond_mask.dtype).expand_as(cond_mask), cond_mask])

    sched = _ddim(scheduler_config)
    sched.set_timesteps(steps, device=device)

    def draw() -> torch.Tensor:
        gen_device = "cpu"
        if isinstance(generator, torch.Generator):
            gen_device = generator.device
        elif generator is not None:
            gen_device = generator[0].device
        return prior.sample(shape, generator=generator, device=gen_device).to(device, dtype)

    x = draw() * sched.init_noise_sigma
    for t in sched.timesteps:
        x_in = sched.scale_model_input(x, t)
        if use_cfg:
            t_in = t.reshape(1).expand(2 * b).to(device)
            pred_uncond, pred_cond = model(torch.cat([x_in, x_in]), t_in, both_cond, both_mask).chunk(2)
            pred = pred_uncond + guidance * (pred_cond - pred_uncond)
        else:
            pred = model(x_in, t.reshape(1).expand(b).to(device), cond, cond_mask)
        # With eta = 0 DDIM is deterministic and draws nothing; otherwise its noise is the prior's.
        step_noise = draw() if eta > 0 else None
        x = sched.step(pred, t, x, eta=eta, variance_noise=step_noise).prev_sample

    if vae is not None:
        from pyoco.model import decode_video

        x = decode_video(vae, x)
    return to_uint8_video(x)


def generate(
    model: nn.Module,
    text_encoder,
    prompts: Sequence[str],
    *,
    prior: NoisePrior,
    num_frames: int,
    height: int,
    width: int,
    steps: int = 20,
    guidance: float = 3.0,
    seed: int = 0,
    eta: float = 0.0,
    scheduler_config: dict[str, Any] | None = None,
    vae: nn.Module | None = None,
    device: str | torch.device = "cpu",
) -> torch.Tensor:
    """Prompts -> uint8 videos (B, T, H, W, 3). Video i uses the stream ``clip_generators(seed, [i])``,
    so a prompt's video does not change when other prompts are added to the batch."""
    prompts = list(prompts)
    if not prompts:
        raise InputError("need at least one prompt")
    cond, mask = text_encoder.encode(prompts)
    null_cond, null_mask = text_encoder.null_embedding(1)
    gens = clip_generators(seed, range(len(prompts)))
    return sample_video(
        model,
        cond.to(device),
        mask.to(device) if mask is not None else None,
        prior=prior,
        null_cond=null_cond.to(device),
        null_mask=null_mask.to(device) if null_mask is not None else None,
        num_frames=num_frames,
        height=height,
        width=width,
        channels=getattr(getattr(model, "unet", None), "config", {}).get("in_channels", 3)
        if vae is None
        else 3,
        steps=steps,
        guidance=guidance,
        eta=eta,
        generator=gens,
        scheduler_config=scheduler_config,
        vae=vae,
    )
