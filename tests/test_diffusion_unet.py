"""The objective on the real tiny diffusers UNets: equivalence with the image loss, and an overfit curve."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pyoco.diffusion import DiffusionLoss, make_scheduler_config
from pyoco.model import TinyUNetConfig, VideoDenoiser, build_unet2d, inflate
from pyoco.noise import make_prior

TINY = TinyUNetConfig(sample_size=8, block_out_channels=(16, 32), norm_num_groups=8)


def test_iid_single_frame_equals_hand_computed_diffusers_image_loss():
    """iid prior, T = 1: our loss is exactly diffusers' epsilon-prediction image loss (1e-6)."""
    from diffusers import DDPMScheduler

    unet = build_unet2d(TINY, seed=1).eval()
    g = torch.Generator().manual_seed(0)
    b = 3
    x0 = torch.rand((b, 3, 1, 8, 8), generator=g) * 2 - 1
    cond = torch.randn((b, 6, 384), generator=g)
    mask = torch.ones((b, 6), dtype=torch.bool)
    mask[0, 4:] = False

    ours = DiffusionLoss()(
        VideoDenoiser(unet), x0, cond, mask, make_prior("iid"), generator=torch.Generator().manual_seed(42)
    ).loss

    # The same draws in the same order: noise first, then one timestep per image.
    ref_gen = torch.Generator().manual_seed(42)
    noise = torch.randn((b, 3, 8, 8), generator=ref_gen)
    t = torch.randint(0, 1000, (b,), generator=ref_gen)
    sched = DDPMScheduler.from_config(make_scheduler_config())
    x_t = sched.add_noise(x0[:, :, 0], noise, t)
    with torch.no_grad():
        pred = unet(x_t, t, encoder_hidden_states=cond, encoder_attention_mask=mask.float()).sample
    reference = F.mse_loss(pred, noise)
    torch.testing.assert_close(ours.detach(), reference, rtol=1e-6, atol=1e-6)


def _clip(t: int = 4, size: int = 8) -> torch.Tensor:
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    frames = [torch.stack([torch.tanh(3 * (xx - 0.5 + 0.3 * i)), yy, -xx * yy]) for i in range(t)]
    return torch.stack(frames, dim=1)[None]  # (1, 3, T, H, W) in [-1, 1]


def test_tiny_video_model_overfits_one_clip():
    """Seeded: 60 AdamW steps on one moving-edge clip cut the fixed-noise eval loss at least 5x."""
    torch.manual_seed(0)
    model = VideoDenoiser(inflate(build_unet2d(TINY, seed=0)))
    model.set_trainable("all")
    x0 = _clip()
    cond = torch.randn((1, 4, 384), generator=torch.Generator().manual_seed(1))
    mask = torch.ones((1, 4), dtype=torch.bool)
    prior = make_prior("progressive", 1.0)
    loss_fn = DiffusionLoss()

    def eval_loss() -> float:
        with torch.no_grad():
            n = 16
            return loss_fn(
                model,
                x0.expand(n, -1, -1, -1, -1),
                cond.expand(n, -1, -1),
                mask.expand(n, -1),
                prior,
                generator=torch.Generator().manual_seed(123),
            ).loss.item()

    opt = torch.optim.AdamW(model.trainable_parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    start = eval_loss()
    b = 4
    for _ in range(60):
        out = loss_fn(
            model,
            x0.expand(b, -1, -1, -1, -1),
            cond.expand(b, -1, -1),
            mask.expand(b, -1),
            prior,
            generator=g,
        )
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    end = eval_loss()
    assert start > 0.8, start  # an untrained model is near the noise variance
    assert end * 5 <= start, (start, end)
