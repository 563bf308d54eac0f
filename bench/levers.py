"""Issue 10 experiments: ways to give the demo's video model a path from the caption (or the frame's
position) to what each frame draws, attached to an inflated `pyoco.model.VideoDenoiser` for
``bench/frame_order.py --lever``. The measured figures are in the README's frame-order section. The one that
reached the goal, ``temporal-conv-caption-pos``, is now the product's ``model.motion_branch: caption-conv``
(`pyoco.branch`, which it shares its coordinate grid and caption pooling with); it stays here, in the bench's
parameter layout, so the README's bench rows reproduce.

- ``caption-motion``: after every AnimateDiff motion module, a cross-attention from each (frame, pixel) to the
  caption's token states, with the frame's sinusoidal position added to the query. Output projection
  zero-initialised, so at step 0 the model is exactly the inflated one. Its parameters sit under
  ``.motion_modules.``, so ``train_layers: temporal`` trains them.
- ``st-attention``: after every motion module on a feature map of at most ``ST_MAX_TOKENS`` / T pixels, a
  joint attention over all T x H x W positions of a clip (sinusoidal frame, row and column positions added),
  so a frame can read where the shape is in another frame, not only at its own pixel. Zero-initialised.
- ``frame-bias``: every ResNet block's time-embedding projection gains a learned per-frame bias
  ``(max_frames, C)``, zero-initialised: the spatial layers (which read the caption) learn which frame they
  draw. Trained only with ``--layers all``.
- ``temporal-conv`` / ``temporal-conv-caption``: after every motion module, a zero-initialised residual
  3 x 3 x 3 (frames x pixels) convolution branch, local and order-aware; the ``-caption`` variant scales and
  shifts its features by a linear map of the caption's mean token state (FiLM). ``-caption-pos`` also feeds
  the branch's first convolution three coordinate channels (frame, row, column, each in [-1, 1]), so that
  at the highest noise, where the input is pure noise and a translation-equivariant UNet has no place to
  put the shape, the branch can draw the caption's mean trajectory (a fast shape's start and end are fixed).

Both read the current call's text and frame count from a forward pre-hook on the denoiser.
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from torch import nn

from pyoco.branch import coordinate_grid
from pyoco.text import masked_mean

LEVERS = (
    "none",
    "caption-motion",
    "frame-bias",
    "st-attention",
    "temporal-conv",
    "temporal-conv-caption",
    "temporal-conv-caption-pos",
)


def _sinusoid(n: int, dim: int) -> torch.Tensor:
    pos = torch.arange(n, dtype=torch.float32)[:, None]
    freq = 10000.0 ** (-torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    table = torch.zeros(n, dim)
    table[:, 0::2] = torch.sin(pos * freq)
    table[:, 1::2] = torch.cos(pos * freq)
    return table


class MotionBranch(nn.Module):
    """``motion(h) + branch(motion(h))`` for a wrapped AnimateDiff motion module ``self.motion``, called the way
    diffusers calls the module it replaces. Subclasses define ``branch(h, num_frames)`` on the (B*T, C, H, W)
    output, returning the residual to add or None (the identity)."""

    def branch(self, h: torch.Tensor, num_frames: int) -> torch.Tensor | None:
        raise NotImplementedError

    def forward(
        self,
        hidden_states,
        encoder_hidden_states=None,
        timestep=None,
        class_labels=None,
        num_frames=1,
        cross_attention_kwargs=None,
    ):  # fmt: skip  (diffusers' positional call order)
        h = self.motion(hidden_states, num_frames=num_frames)
        residual = self.branch(h, num_frames)
        return h if residual is None else h + residual


class _AfterMotion(MotionBranch):
    """``motion(h) + proj_out(attend(tokens))``: the wrapped AnimateDiff module, then a zero-initialised
    attention branch over ``tokens`` = norm(motion(h)) as (B, T, H*W, C). Called like the module it wraps."""

    def __init__(self, motion: nn.Module, heads: int, max_frames: int, *, name: str, multiple: int = 1):
        super().__init__()
        channels = motion.in_channels
        if channels % heads or channels % multiple:
            raise ValueError(f"{name}: {heads} heads (and {multiple}) must divide {channels} channels")
        self.motion, self.heads = motion, heads
        self.norm = nn.GroupNorm(motion.norm.num_groups, channels, eps=1e-6)
        self.register_buffer("frame_pos", _sinusoid(max_frames, channels), persistent=False)

    def _add_output(self) -> None:
        """The zero-initialised output projection, made last so that the branch's layers draw their
        initial weights in the order the README's measured runs did."""
        channels = self.motion.in_channels
        self.proj_out = nn.Linear(channels, channels)
        nn.init.zeros_(self.proj_out.weight)
        nn.init.zeros_(self.proj_out.bias)

    def heads_of(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N, C) -> (B, heads, N, C / heads)."""
        return x.reshape(x.shape[0], x.shape[1], self.heads, -1).transpose(1, 2)

    def attend(self, tokens: torch.Tensor) -> torch.Tensor | None:  # (B, T, HW, C) -> (B, heads, T*HW, d)
        raise NotImplementedError

    def branch(self, h, num_frames):
        bt, c, height, width = h.shape
        b, t = bt // num_frames, num_frames
        o = self.attend(self.norm(h).reshape(b, t, c, height * width).permute(0, 1, 3, 2))
        if o is None:
            return None
        o = self.proj_out(o.transpose(1, 2).reshape(b, t, height * width, c))
        return o.permute(0, 1, 3, 2).reshape(bt, c, height, width)


class CaptionMotion(_AfterMotion):
    """``motion(h) + proj_out(cross_attention(norm(motion(h)) + pos_t, caption tokens))``."""

    def __init__(self, motion: nn.Module, text_dim: int, heads: int, max_frames: int):
        super().__init__(motion, heads, max_frames, name="caption-motion")
        channels = motion.in_channels
        self.to_q = nn.Linear(channels, channels, bias=False)
        self.to_k = nn.Linear(text_dim, channels, bias=False)
        self.to_v = nn.Linear(text_dim, channels, bias=False)
        self._add_output()
        self.text: tuple[torch.Tensor, torch.Tensor | None] | None = None

    def attend(self, tokens):
        text, bias = self.text
        b, t, hw, c = tokens.shape
        q = self.heads_of(self.to_q(tokens + self.frame_pos[:t, None, :]).reshape(b, t * hw, c))
        return F.scaled_dot_product_attention(
            q, self.heads_of(self.to_k(text)), self.heads_of(self.to_v(text)), attn_mask=bias
        )


ST_MAX_TOKENS = 1024


class SpaceTimeAttention(_AfterMotion):
    """``motion(h) + proj_out(attention over the clip's T*H*W tokens of norm(motion(h)) + positions)``; the
    identity on feature maps with more than ``ST_MAX_TOKENS`` tokens per clip, and on non-square ones."""

    def __init__(self, motion: nn.Module, heads: int, max_frames: int):
        super().__init__(motion, heads, max_frames, name="st-attention", multiple=4)
        channels = motion.in_channels
        self.to_qkv = nn.Linear(channels, 3 * channels, bias=False)
        self._add_output()
        self.register_buffer("axis_pos", _sinusoid(256, channels // 2), persistent=False)

    def attend(self, tokens):
        b, t, hw, c = tokens.shape
        height = width = math.isqrt(hw)
        if t * hw > ST_MAX_TOKENS or height * width != hw:
            return None
        yx = torch.cat(
            [
                self.axis_pos[:height, None, :].expand(height, width, -1),
                self.axis_pos[None, :width, :].expand(height, width, -1),
            ],
            dim=-1,
        ).reshape(1, 1, hw, c)
        x = (tokens + self.frame_pos[:t, None, :] + yx).reshape(b, t * hw, c)
        q, k, v = self.to_qkv(x).chunk(3, dim=-1)
        return F.scaled_dot_product_attention(self.heads_of(q), self.heads_of(k), self.heads_of(v))


class TemporalConv(MotionBranch):
    """``motion(h) + conv3d_out(silu(film(conv3d(silu(norm(motion(h)))))))``: a (2+1)-D-style residual branch
    whose first convolution spans 3 frames x 3 x 3 pixels, so a frame reads its neighbours' pixels around its
    own (order-aware and local, unlike the motion module's attention over all frames at one pixel). With
    ``caption=True`` its features are scaled and shifted by a linear map of the caption's masked-mean token
    state (FiLM), so the branch can draw the caption's direction. The last convolution (3 x 1 x 1) is
    zero-initialised: at step 0 the model is exactly the inflated one. With ``coords=True`` the first
    convolution also reads (frame, row, column) coordinate channels in [-1, 1] (CoordConv)."""

    def __init__(self, motion: nn.Module, text_dim: int | None, *, coords: bool = False):
        super().__init__()
        channels = motion.in_channels
        self.motion, self.coords = motion, coords
        self.norm = nn.GroupNorm(motion.norm.num_groups, channels, eps=1e-6)
        self.conv_in = nn.Conv3d(channels + (3 if coords else 0), channels, (3, 3, 3), padding=1)
        self.film = None if text_dim is None else nn.Linear(text_dim, 2 * channels)
        if self.film is not None:
            nn.init.zeros_(self.film.weight)
            nn.init.zeros_(self.film.bias)
        self.conv_out = nn.Conv3d(channels, channels, (3, 1, 1), padding=(1, 0, 0))
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)
        self.proj_out = self.conv_out  # what frame_order.motion_off zeroes
        self.text: tuple[torch.Tensor, torch.Tensor | None] | None = None

    def branch(self, h, num_frames):
        bt, c, height, width = h.shape
        b = bt // num_frames
        x = h.reshape(b, num_frames, c, height, width).permute(0, 2, 1, 3, 4)  # (B, C, T, H, W)
        x = F.silu(self.norm(x))
        if self.coords:
            x = torch.cat([x, coordinate_grid(x)], dim=1)
        y = self.conv_in(x)
        if self.film is not None:
            text, keep = self.text
            scale, shift = self.film(masked_mean(text, keep)).chunk(2, dim=-1)
            y = y * (1 + scale[:, :, None, None, None]) + shift[:, :, None, None, None]
        y = self.conv_out(F.silu(y))
        return y.permute(0, 2, 1, 3, 4).reshape(bt, c, height, width)


class FrameBias(nn.Module):
    """``linear(temb) + bias[frame]`` for the frame-major rows ``b*T + t`` of a (B*T, E) time embedding."""

    def __init__(self, linear: nn.Linear, max_frames: int):
        super().__init__()
        self.linear = linear
        self.frame_bias = nn.Parameter(torch.zeros(max_frames, linear.out_features))
        self.num_frames = 1

    def forward(self, temb: torch.Tensor) -> torch.Tensor:
        t = self.num_frames
        return self.linear(temb) + self.frame_bias[:t].repeat(temb.shape[0] // t, 1)


def attach(model, lever: str, *, heads: int = 4) -> int:
    """Attach ``lever`` to the video denoiser ``model`` in place; returns the number of added parameters."""
    from diffusers.models.resnet import ResnetBlock2D
    from diffusers.models.unets.unet_motion_model import AnimateDiffTransformer3D

    if lever == "none":
        return 0
    if lever not in LEVERS:
        raise ValueError(f"lever must be one of {LEVERS}, got {lever!r}")
    max_frames = int(model.max_num_frames)
    added: list[nn.Module] = []
    for parent in list(model.unet.modules()):
        for name, child in list(parent.named_children()):
            if lever == "caption-motion" and isinstance(child, AnimateDiffTransformer3D):
                new = CaptionMotion(child, int(model.config.cross_attention_dim), heads, max_frames)
            elif lever == "st-attention" and isinstance(child, AnimateDiffTransformer3D):
                new = SpaceTimeAttention(child, heads, max_frames)
            elif lever.startswith("temporal-conv") and isinstance(child, AnimateDiffTransformer3D):
                text_dim = int(model.config.cross_attention_dim) if "caption" in lever else None
                new = TemporalConv(child, text_dim, coords=lever.endswith("-pos"))
            elif lever == "frame-bias" and isinstance(parent, ResnetBlock2D) and name == "time_emb_proj":
                new = FrameBias(child, max_frames)
            else:
                continue
            setattr(parent, name, new)  # ModuleList accepts "0", "1", ... as attribute names too
            added.append(new)
    if not added:
        raise ValueError(f"lever {lever}: nothing to attach to in this model")

    def set_call(_module, args, kwargs):
        sample = args[0] if args else kwargs["sample"]
        text = args[2] if len(args) > 2 else kwargs["encoder_hidden_states"]
        mask = args[3] if len(args) > 3 else kwargs.get("encoder_attention_mask")
        bias = None if mask is None else ((1.0 - mask.float()) * -10000.0)[:, None, None, :]
        for m in added:
            if isinstance(m, CaptionMotion):
                m.text = (text.float(), bias)
            elif isinstance(m, TemporalConv):
                m.text = (text.float(), None if mask is None else mask.float())
            elif isinstance(m, FrameBias):
                m.num_frames = int(sample.shape[2])

    model.register_forward_pre_hook(set_call, with_kwargs=True)
    own = {id(p) for m in added for p in m.parameters()} - {
        id(p) for m in added for p in getattr(m, "motion", getattr(m, "linear", None)).parameters()
    }
    return sum(p.numel() for p in model.parameters() if id(p) in own)


@contextlib.contextmanager
def power_timesteps(loss_cls, power: float):
    """Within the block, ``loss_cls.sample_timesteps`` draws t with density proportional to t^(power-1)
    (1: uniform, unchanged): more of the training at high noise, where only the caption fixes the motion."""
    if power == 1.0:
        yield
        return
    original = loss_cls.sample_timesteps

    def sample_timesteps(self, batch_size, generator, device):  # the product's draw (train.timestep_power)
        self.timestep_power = float(power)
        return original(self, batch_size, generator, device)

    loss_cls.sample_timesteps = sample_timesteps
    try:
        yield
    finally:
        loss_cls.sample_timesteps = original
