"""bench/levers.py (issue 10 experiments): each lever starts as the identity on the inflated model, its
parameters are the ones ``train_layers`` trains, and a step on them makes the output depend on the caption
(caption-motion) or on the frame index (frame-bias), or mixes frames (st-attention, temporal-conv)."""

from __future__ import annotations

import pytest
import torch
from diffusers.models.unets.unet_motion_model import AnimateDiffTransformer3D
from torch.testing import assert_close

from bench.levers import CaptionMotion, attach
from pyoco.model import TinyUNetConfig, VideoDenoiser, build_unet2d, inflate

CFG = TinyUNetConfig(sample_size=8, block_out_channels=(16, 32), attention_head_dim=4, norm_num_groups=8,
                     cross_attention_dim=24)  # fmt: skip
B, T, L = 2, 4, 5


def _model() -> VideoDenoiser:
    return VideoDenoiser(inflate(build_unet2d(CFG, seed=0), motion_num_attention_heads=4, seed=0)).eval()


def _inputs():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, 3, T, 8, 8, generator=g)
    return x, torch.tensor([10, 900]), torch.randn(B, L, 24, generator=g), torch.ones(B, L, dtype=torch.bool)


@pytest.mark.parametrize(
    "lever",
    [
        "caption-motion",
        "frame-bias",
        "st-attention",
        "temporal-conv",
        "temporal-conv-caption",
        "temporal-conv-caption-pos",
    ],
)
def test_a_lever_starts_as_the_identity_and_then_learns(lever):
    model, (x, t, text, mask) = _model(), _inputs()
    with torch.no_grad():
        before = model(x, t, text, mask)
    added = attach(model, lever, heads=4)
    assert added > 0
    with torch.no_grad():
        assert_close(model(x, t, text, mask), before, rtol=0, atol=1e-6)

    model.set_trainable("all" if lever == "frame-bias" else "temporal")
    lever_params = [p for n, p in model.named_parameters() if "frame_bias" in n or ".motion_modules." in n
                    and any(k in n for k in ("to_q", "to_k", "to_v", "to_qkv", "proj_out", "conv_in", "conv_out", "film"))]  # fmt: skip
    assert lever_params and all(p.requires_grad for p in lever_params)
    opt = torch.optim.SGD(model.trainable_parameters(), lr=0.5)
    for _ in range(2):  # two steps: a zero-initialised FiLM only gets a gradient once conv_out is non-zero
        opt.zero_grad()
        model(x, t, text, mask).square().mean().backward()
        opt.step()
    if lever.startswith("temporal-conv-caption"):
        films = [p for n, p in model.named_parameters() if ".film." in n]
        assert films and all(p.abs().max() > 0 for p in films)
    with torch.no_grad():
        out = model(x, t, text, mask)
        if lever == "caption-motion":
            assert any(isinstance(m, CaptionMotion) for m in model.modules())
            changed = model(x, t, torch.randn(text.shape, generator=torch.Generator().manual_seed(1)), mask)
        elif lever == "frame-bias":
            changed = model(x.flip(2), t, text, mask).flip(2)  # the same frames at other positions
        else:  # st-attention, temporal-conv: with the AnimateDiff modules made the identity, only the lever mixes frames,
            # so changing frame 0 changes what the other frames output
            for m in model.modules():
                if isinstance(m, AnimateDiffTransformer3D):
                    m.proj_out.weight.zero_()
                    m.proj_out.bias.zero_()
            out = model(x, t, text, mask)
            shifted = x.clone()
            shifted[:, :, 0] = x[:, :, 0].roll(1, dims=-1)
            changed = model(shifted, t, text, mask)
            out, changed = out[:, :, 1:], changed[:, :, 1:]
    assert (out - changed).abs().max() > 1e-4


def test_unknown_lever_is_refused():
    with pytest.raises(ValueError, match="lever must be one of"):
        attach(_model(), "wings")


def test_the_coordinate_branch_can_place_a_shape_where_the_input_has_none():
    """temporal-conv-caption-pos: on a constant input (no place to read from it), the branch's output varies
    over frames and pixels once its weights are non-zero; without coordinates it is the same at every interior
    pixel of every interior frame (only zero padding breaks the symmetry)."""
    from bench.levers import TemporalConv

    motion = inflate(build_unet2d(CFG, seed=0), motion_num_attention_heads=4, seed=0).down_blocks[0]
    motion = motion.motion_modules[0]
    text = (torch.randn(1, L, 24, generator=torch.Generator().manual_seed(0)), None)
    h = torch.full((T, 16, 6, 6), 0.3)  # (B*T, C, H, W), B = 1
    spread = {}
    for coords in (False, True):
        torch.manual_seed(0)
        branch = TemporalConv(motion, 24, coords=coords)
        torch.nn.init.normal_(branch.conv_out.weight, std=0.1)
        branch.text = text
        with torch.no_grad():
            out = branch.branch(h, T)[1:-1, :, 1:-1, 1:-1]  # interior frames and pixels
        spread[coords] = (out - out[:1, :, :1, :1]).abs().max().item()
    assert spread[False] < 1e-5 < 1e-2 < spread[True]
