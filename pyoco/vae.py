"""The VAE at the clip boundary: uint8 frames <-> scaled latents, its downsampling factor, and its identity.

Layouts: frames uint8 ``(B, T, H, W, 3)`` (the clip format's, frames on axis 1); latents float32
``(B, C, T, h, w)`` with ``h = H / factor`` (frames on axis 2, as everywhere in the model). Latents are
already in the diffusion model's space: ``z = (mode(q(z|x)) - shift_factor) * scaling_factor``, which is
what diffusers' SD/SD3 pipelines do before the UNet sees them (`pyoco.model.encode_video`, whose inverse is
`pyoco.model.decode_video`). The loader is `pyoco.model.load_vae`.

`vae_identity` names one VAE (config + weights): latents stored by preprocess carry it, and train refuses
latents whose identity differs from the model's VAE (`pyoco.compat.check_compatible`).
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import numpy as np
import torch
from torch import nn

from pyoco.model import decode_video, encode_video
from pyoco.sampling import from_uint8_video, to_uint8_video

__all__ = ["LatentEncoder", "decode_frames", "encode_frames", "vae_factor", "vae_identity"]


def vae_factor(vae_or_config: nn.Module | dict[str, Any]) -> int:
    """Pixels per latent along H and W: ``2 ** (len(block_out_channels) - 1)`` (8 for SD's VAE)."""
    config = getattr(vae_or_config, "config", vae_or_config)
    return 2 ** (len(config["block_out_channels"]) - 1)


@torch.no_grad()
def encode_frames(
    vae: nn.Module, frames: np.ndarray | torch.Tensor, *, chunk_frames: int | None = None
) -> torch.Tensor:
    """uint8 ``(B, T, H, W, 3)`` → float32 ``(B, C, T, H/f, W/f)`` scaled latents (the posterior's mode, so
    the same frames always give the same latents). Runs on the VAE's device, returns on it."""
    param = next(vae.parameters())
    x = from_uint8_video(torch.as_tensor(frames).to(param.device))
    return encode_video(vae, x, chunk_frames=chunk_frames).float()


@torch.no_grad()
def decode_frames(vae: nn.Module, latents: torch.Tensor, *, chunk_frames: int | None = None) -> torch.Tensor:
    """float ``(B, C, T, h, w)`` scaled latents → uint8 ``(B, T, h*f, w*f, 3)`` frames on the VAE's device."""
    param = next(vae.parameters())
    return to_uint8_video(decode_video(vae, latents.to(param.device), chunk_frames=chunk_frames))


def vae_identity(vae: nn.Module) -> str:
    """``sha256:`` of the VAE's config (public keys, sorted) and of every weight (name, shape, float32 bytes).

    The hash is of float32 values: compute it on the VAE as loaded (`pyoco.model.load_vae` loads float32),
    before any cast to bf16/fp16, so a GPU actor and a CPU trainer agree on it.
    """
    config = {k: v for k, v in dict(vae.config).items() if not k.startswith("_")}
    digest = hashlib.sha256(json.dumps(config, sort_keys=True, default=list).encode())
    for name, tensor in sorted(vae.state_dict().items()):
        value = tensor.detach().to("cpu", torch.float32).contiguous()
        digest.update(f"{name}:{tuple(value.shape)};".encode())
        digest.update(value.numpy().tobytes())
    return "sha256:" + digest.hexdigest()


class LatentEncoder:
    """A loaded VAE as a batch function: uint8 ``(B, T, H, W, 3)`` → float32 numpy ``(B, C, T, h, w)``.

    What a preprocess actor holds (one per actor: the VAE loads once). ``identity`` is computed from the
    float32 weights before the cast to ``dtype`` (bf16 on GPU halves the memory and the encode time), so it
    equals the identity train computes on its own float32 copy.
    """

    def __init__(
        self,
        uri: str,
        *,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        chunk_frames: int | None = 16,
        cache_dir: str | None = None,
        storage_options: dict | None = None,
    ):
        from pyoco.model import load_vae

        vae = load_vae(uri, cache_dir=cache_dir, storage_options=storage_options).eval()
        self.identity = vae_identity(vae)
        self.factor = vae_factor(vae)
        self.latent_channels = int(vae.config.latent_channels)
        self.vae = vae.to(device=device, dtype=dtype).requires_grad_(False)
        self.chunk_frames = chunk_frames

    def __call__(self, frames: np.ndarray) -> np.ndarray:
        return encode_frames(self.vae, frames, chunk_frames=self.chunk_frames).cpu().numpy()
