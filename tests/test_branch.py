"""The caption-conv motion branch (`pyoco.branch`, ``model.motion_branch``): identity at step 0, reads the
caption, the frame order and the position once trained, keeps clips apart, trains with ``temporal``,
survives save/load and deep copies, and a folder that names a branch without its weights is refused."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch.testing import assert_close

from pyoco.branch import BRANCH_FILE, motion_modules
from pyoco.errors import InputError
from pyoco.model import PYOCO_MODEL_FILE, TinyUNetConfig, VideoDenoiser, build_unet2d, inflate

CFG = TinyUNetConfig(sample_size=8, block_out_channels=(16, 32), attention_head_dim=4, norm_num_groups=8)
L, D = 6, CFG.cross_attention_dim


@pytest.fixture(scope="module")
def motion():
    return inflate(build_unet2d(CFG, seed=0), seed=0, motion_num_attention_heads=1).eval()


def _inputs(batch=2, frames=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, CFG.in_channels, frames, 8, 8, generator=g)
    t = torch.randint(0, 1000, (batch,), generator=g)
    ehs = torch.randn(batch, L, D, generator=g)
    mask = torch.ones(batch, L, dtype=torch.bool)
    mask[:, -2:] = False
    return x, t, ehs, mask


def _trained(motion, seed=1) -> VideoDenoiser:
    """A branched model whose zero-initialised layers were given seeded weights (as training would)."""
    model = VideoDenoiser(copy.deepcopy(motion), motion_branch="caption-conv").eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.branches.named_parameters():
            if name.split(".")[1] in ("film", "conv_out"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model


def test_branch_is_the_identity_at_step_0(motion):
    plain = VideoDenoiser(motion)
    branched = VideoDenoiser(copy.deepcopy(motion), motion_branch="caption-conv").eval()
    assert len(branched.branches) == len(motion_modules(motion)) == 7  # 2 down, 1 mid, 4 up (tiny UNet)
    x, t, ehs, mask = _inputs()
    with torch.no_grad():
        assert_close(branched(x, t, ehs, mask), plain(x, t, ehs, mask), atol=0, rtol=0)


def test_trained_branch_reads_caption_order_and_clip(motion):
    model = _trained(motion)
    x, t, ehs, mask = _inputs(seed=2)
    with torch.no_grad():
        base = model(x, t, ehs, mask)
        other_caption = model(x, t, ehs.flip(0), mask)
        reversed_ = model(x.flip(2), t, ehs, mask).flip(2)
        x2 = x.clone()
        x2[0, :, 0] = torch.randn_like(x2[0, :, 0])
        changed = model(x2, t, ehs, mask)
        masked_junk = model(x, t, torch.where(mask[..., None], ehs, torch.randn_like(ehs)), mask)
    assert (other_caption - base).abs().max() > 1e-3  # FiLM reads the caption
    assert (reversed_ - base).abs().max() > 1e-3  # order-aware
    diff = (changed - base).abs().amax(dim=(1, 3, 4))
    assert (diff[0, 1:] > 1e-5).all() and (diff[1] == 0).all(), diff  # clip 1 untouched
    assert_close(masked_junk, base, atol=1e-5, rtol=0)  # padded tokens are not pooled


def test_temporal_training_covers_the_branch(motion):
    model = _trained(motion)
    model.set_trainable("temporal")
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {f"branches.{n}" for n, _ in model.branches.named_parameters()} <= names
    assert not any(n.startswith("unet.") and ".motion_modules." not in n for n in names)
    x, t, ehs, mask = _inputs(seed=3)
    model(x, t, ehs, mask).pow(2).mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.branches.parameters())


def test_save_load_round_trip_and_deep_copy(motion, tmp_path):
    model = _trained(motion)
    x, t, ehs, mask = _inputs(seed=4)
    with torch.no_grad():
        expected = model(x, t, ehs, mask)
    model.save_pretrained(tmp_path / "unet")
    info = json.loads((tmp_path / "unet" / PYOCO_MODEL_FILE).read_text())
    assert info["motion_branch"] == {"kind": "caption-conv", "file": BRANCH_FILE}
    loaded = VideoDenoiser.from_pretrained(tmp_path / "unet").eval()
    clone = copy.deepcopy(model)
    with torch.no_grad():
        assert_close(loaded(x, t, ehs, mask), expected, atol=1e-6, rtol=0)
        # The copy's hooks call the copy's branches: zeroing the original's changes nothing in the copy.
        for p in model.branches.parameters():
            p.zero_()
        assert_close(clone(x, t, ehs, mask), expected, atol=1e-6, rtol=0)
        assert (model(x, t, ehs, mask) - expected).abs().max() > 1e-3


def test_a_folder_naming_a_branch_without_its_weights_is_refused(motion, tmp_path):
    _trained(motion).save_pretrained(tmp_path / "unet")
    (tmp_path / "unet" / BRANCH_FILE).unlink()
    with pytest.raises(
        InputError, match=f"names motion branch 'caption-conv' but its weights file '{BRANCH_FILE}'"
    ):
        VideoDenoiser.from_pretrained(tmp_path / "unet")
    info_file = tmp_path / "unet" / PYOCO_MODEL_FILE
    info = json.loads(info_file.read_text())
    info["motion_branch"]["file"] = "../elsewhere.safetensors"  # never read outside the model folder
    info_file.write_text(json.dumps(info))
    with pytest.raises(InputError, match="is not a file name"):
        VideoDenoiser.from_pretrained(tmp_path / "unet")


def test_bad_branch_settings_are_refused(motion):
    with pytest.raises(ValueError, match="motion_branch must be one of"):
        VideoDenoiser(copy.deepcopy(motion), motion_branch="nope")
    with pytest.raises(InputError, match="needs a video model"):
        VideoDenoiser(build_unet2d(CFG, seed=0), motion_branch="caption-conv")


def test_the_shipped_video_model_is_what_the_demo_config_asks_for():
    """pipelines/assets/tiny-video-16px (scripts/build_tiny_video.sh) loads with its trained branch, the
    demo's prior and prediction type, and samples at the demo's clip size."""
    from pathlib import Path

    from pyoco.config import load_config
    from pyoco.package import load_package

    root = Path(__file__).resolve().parents[1]
    demo = load_config(root / "pipelines" / "configs" / "demo.yaml")
    pkg = load_package(str(root / demo.model.pretrained))
    assert pkg.denoiser.is_video and pkg.denoiser.motion_branch == demo.model.motion_branch == "caption-conv"
    assert pkg.info.noise == {"kind": demo.noise.kind, "alpha": demo.noise.alpha}
    assert pkg.scheduler_config["prediction_type"] == demo.train.prediction_type
    assert (pkg.info.num_frames, pkg.info.height) == (demo.preprocess.num_frames, demo.preprocess.size)
    trained = [p for n, p in pkg.denoiser.branches.named_parameters() if ".conv_out." in n]
    assert trained and all(float(p.abs().max()) > 0 for p in trained)  # not the zero-initialised branch
