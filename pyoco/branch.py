"""The caption-conv motion branch (``model.motion_branch: caption-conv``, issue 10).

After every AnimateDiff motion module of an inflated UNet, a zero-initialised residual

    h + conv_out(silu(film(conv_in([silu(norm(h)), frame, row, column]))))

where ``h`` is the motion module's output viewed as (B, C, T, H, W), ``conv_in`` a 3 x 3 x 3 (frames x pixels)
convolution that also reads three coordinate channels in [-1, 1], ``film`` a scale and shift from the
caption's masked-mean token state, and ``conv_out`` a zero-initialised 3 x 1 x 1 convolution: at step 0 the
model is exactly the inflated one.

Why (measured in the README's "frame order" section): the motion modules attend over frames at one pixel and
never read the caption, so they cannot say *which way* the shape goes; the spatial layers read the caption
but not the frame. This branch is local, order-aware, caption-conditioned and position-aware, so at high
noise, where a translation-equivariant UNet has no place to put the shape, it can draw the caption's
trajectory. On the bench it took direction accuracy from 0.25 to 0.61 (1600 steps, all layers, t drawn with
density proportional to t^2).

The branches are pyoco's own layers, not diffusers': `pyoco.model.VideoDenoiser` owns them (parameters
``branches.<i>.*``), hooks them onto the motion modules, and saves them beside the diffusers UNet in
``unet/pyoco_branch.safetensors``; ``pyoco_model.json`` names the branch, and loading refuses a folder that
names one but lacks its weights. diffusers alone loads such a ``unet/`` without the branch (a different
model): load pyoco packages with `pyoco.package.load_package`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from pyoco.errors import InputError
from pyoco.text import masked_mean

BRANCHES = ("caption-conv",)
BRANCH_FILE = "pyoco_branch.safetensors"


@dataclass
class CallContext:
    """What the current forward call's branches read: its frame count and caption (set by the denoiser)."""

    num_frames: int = 1
    text: torch.Tensor | None = None  # (B, L, D)
    keep: torch.Tensor | None = None  # (B, L) 1 = attend, or None


class CaptionConv(nn.Module):
    """One branch, for a motion module with ``channels`` channels; ``forward(h)`` returns the residual
    (B*T, C, H, W) to add to the motion module's output ``h``, for the call described by ``self.ctx``."""

    def __init__(self, channels: int, num_groups: int, text_dim: int):
        super().__init__()
        self.ctx = CallContext()  # the denoiser's, once hooked (hook_branches)
        self.norm = nn.GroupNorm(num_groups, channels, eps=1e-6)
        self.conv_in = nn.Conv3d(channels + 3, channels, (3, 3, 3), padding=1)
        self.film = nn.Linear(text_dim, 2 * channels)
        self.conv_out = nn.Conv3d(channels, channels, (3, 1, 1), padding=(1, 0, 0))
        for layer in (self.film, self.conv_out):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def after_motion(self, _module, _args, output: torch.Tensor) -> torch.Tensor:
        """The forward hook on its motion module. A bound method, not a closure, so that a deep copy of the
        denoiser hooks the copy's branches (``copy`` deep-copies a bound method's ``self``)."""
        return output + self(output)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        ctx = self.ctx
        bt, c, height, width = h.shape
        t = ctx.num_frames
        b = bt // t
        x = h.reshape(b, t, c, height, width).permute(0, 2, 1, 3, 4)  # (B, C, T, H, W)
        x = F.silu(self.norm(x))
        y = self.conv_in(torch.cat([x, coordinate_grid(x)], dim=1))
        scale, shift = self.film(masked_mean(ctx.text.to(y.dtype), ctx.keep)).chunk(2, dim=-1)
        y = y * (1 + scale[:, :, None, None, None]) + shift[:, :, None, None, None]
        y = self.conv_out(F.silu(y))
        return y.permute(0, 2, 1, 3, 4).reshape(bt, c, height, width)


def coordinate_grid(x: torch.Tensor) -> torch.Tensor:
    """``(B, 3, T, H, W)`` frame, row and column coordinates in [-1, 1] for clips ``x`` (B, C, T, H, W)."""
    b, _, t, height, width = x.shape
    axes = (torch.linspace(-1.0, 1.0, n, device=x.device, dtype=x.dtype) for n in (t, height, width))
    return torch.stack(torch.meshgrid(*axes, indexing="ij"))[None].expand(b, -1, -1, -1, -1)


def motion_modules(unet: nn.Module) -> list[nn.Module]:
    """The inflated UNet's AnimateDiff motion modules, in module order (the branches' index order)."""
    from diffusers.models.unets.unet_motion_model import AnimateDiffTransformer3D

    return [m for m in unet.modules() if isinstance(m, AnimateDiffTransformer3D)]


def build_branches(kind: str, unet: nn.Module) -> nn.ModuleList:
    """One zero-initialised branch of ``kind`` per motion module of ``unet`` (not yet hooked)."""
    if kind not in BRANCHES:
        raise ValueError(f"motion_branch must be one of {list(BRANCHES)}, got {kind!r}")
    modules = motion_modules(unet)
    if not modules:
        raise ValueError(f"motion_branch {kind!r} needs an inflated video UNet (it has no motion modules)")
    text_dim = int(unet.config.cross_attention_dim)
    return nn.ModuleList(CaptionConv(m.in_channels, m.norm.num_groups, text_dim) for m in modules)


def hook_branches(unet: nn.Module, branches: nn.ModuleList, ctx: CallContext) -> list:
    """Add ``branches[i](output)`` to the output of the unet's i-th motion module on every call, each branch
    reading the call's frames and caption from ``ctx``; returns the hook handles."""
    modules = motion_modules(unet)
    if len(modules) != len(branches):
        raise ValueError(f"{len(branches)} branches for {len(modules)} motion modules")
    for b in branches:
        b.ctx = ctx
    return [m.register_forward_hook(b.after_motion) for m, b in zip(modules, branches, strict=True)]


# ------------------------------------------------------------------------------------------------ persistence
def branch_record(kind: str) -> dict:
    """What ``pyoco_model.json`` says of a model's branch: ``{"kind", "file"}``."""
    return {"kind": kind, "file": BRANCH_FILE}


def save_branch_weights(branches: nn.ModuleList, path: Path) -> None:
    from safetensors.torch import save_file

    save_file({k: v.detach().contiguous().cpu() for k, v in branches.state_dict().items()}, str(path))


def branch_weights_file(folder: Path, record: dict, *, where: str) -> Path:
    """The weights file ``record`` (a `branch_record`) names in ``folder``; a one-line InputError (prefixed by
    ``where``) if the name leaves the folder or the file is missing."""
    name = str(record.get("file") or "")
    if Path(name).name != name or name in ("", ".", ".."):  # a file in this folder, nowhere else
        raise InputError(f"{where} motion_branch file {name!r} is not a file name")
    path = folder / name
    if not path.is_file():
        raise InputError(
            f"{where} names motion branch {record.get('kind')!r} but its weights file {name!r} is missing"
        )
    return path


def load_branch_weights(branches: nn.ModuleList, path: Path) -> None:
    from safetensors.torch import load_file

    try:
        branches.load_state_dict(load_file(str(path)), strict=True)
    except RuntimeError as err:
        first = str(err).strip().splitlines()[0]
        raise InputError(f"{path}: does not fit this model's motion branch ({first})") from None
