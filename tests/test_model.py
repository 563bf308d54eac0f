"""pyoco.model on tiny CPU models: inflation equivalence, the (B, C, T, H, W) contract, persistence, training
modes. Inputs are 16×16 so every forward is a few tens of ms."""

from __future__ import annotations

import json

import fsspec
import pytest
import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel, UNetMotionModel
from torch.testing import assert_close

from pyoco.model import (
    TinyUNetConfig,
    VideoDenoiser,
    build_unet2d,
    decode_video,
    encode_video,
    inflate,
    load_scheduler_config,
    load_unet2d,
    load_vae,
    load_video_denoiser,
    localize,
)

CFG = TinyUNetConfig()
H = W = 16
L = 8
D = CFG.cross_attention_dim


def _perturb(module: torch.nn.Module, seed: int, scale: float = 0.05) -> None:
    """Add seeded noise to every weight: no zero-initialised layer (diffusers zero-inits nothing we rely on,
    but this also makes every layer matter for the equivalence check)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)


def _perturb_motion_outputs(video: VideoDenoiser, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in video.named_motion_parameters():
            if ".proj_out." in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)


def _inputs(batch: int, num_frames: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, CFG.in_channels, num_frames, H, W, generator=g)
    t = torch.randint(0, 1000, (batch,), generator=g)
    ehs = torch.randn(batch, L, D, generator=g)
    mask = torch.ones(batch, L, dtype=torch.bool)
    mask[:, L // 2 :] = torch.rand(batch, L - L // 2, generator=g) < 0.5  # ragged padding
    return x, t, ehs, mask


@pytest.fixture(scope="module")
def unet2d() -> UNet2DConditionModel:
    unet = build_unet2d(CFG, seed=0)
    _perturb(unet, seed=1)
    return unet.eval()


@pytest.fixture(scope="module")
def motion(unet2d) -> UNetMotionModel:
    return inflate(unet2d, seed=0).eval()


def test_build_is_deterministic_and_validates():
    a, b, c = build_unet2d(CFG, seed=0), build_unet2d(CFG, seed=0), build_unet2d(CFG, seed=1)
    for (name, pa), pb in zip(a.named_parameters(), b.parameters(), strict=True):
        assert torch.equal(pa, pb), name
    assert not torch.equal(a.conv_in.weight, c.conv_in.weight)
    assert a.config.cross_attention_dim == 384 and tuple(a.config.block_out_channels) == (32, 64)
    with pytest.raises(ValueError, match="norm_num_groups"):
        TinyUNetConfig(block_out_channels=(12, 24))
    with pytest.raises(ValueError, match="down_block_types"):
        TinyUNetConfig(block_out_channels=(32, 64, 64))


def test_inflated_model_equals_image_model_per_frame(unet2d, motion):
    """Zero-initialised motion outputs: video(x)[:, :, t] == image(x[:, :, t]) for every frame t."""
    image, video = VideoDenoiser(unet2d), VideoDenoiser(motion)
    assert video.is_video and not image.is_video
    x, t, ehs, mask = _inputs(batch=2, num_frames=4)
    assert (x[:, :, 0] - x[:, :, 1]).abs().mean() > 0.5  # distinct frames
    with torch.no_grad():
        out_video = video(x, t, ehs, mask)
        out_image = image(x, t, ehs, mask)
        per_frame = torch.stack(
            [unet2d(x[:, :, i], t, ehs, encoder_attention_mask=mask).sample for i in range(4)], 2
        )
    assert out_image.std() > 0.1  # non-trivial outputs, so the comparison means something
    assert_close(out_video, out_image, atol=1e-5, rtol=0)
    assert_close(out_image, per_frame, atol=1e-5, rtol=0)


def test_motion_forward_matches_diffusers_and_applies_mask(motion):
    """Our motion forward exists only to pass the text mask; without one it must be diffusers' forward."""
    video = VideoDenoiser(motion)
    x, t, ehs, mask = _inputs(batch=2, num_frames=3, seed=1)
    with torch.no_grad():
        ours = video(x, t, ehs)
        theirs = motion(x, t, ehs.repeat_interleave(3, dim=0)).sample  # diffusers wants (B*T, L, D)
        all_ones = video(x, t, ehs, torch.ones(2, L, dtype=torch.bool))
        masked = video(x, t, ehs, mask)
        # Masked tokens are ignored: changing their states changes nothing.
        ehs_junk = torch.where(mask.unsqueeze(-1), ehs, torch.randn_like(ehs))
        masked_junk = video(x, t, ehs_junk, mask)
    assert_close(ours, theirs, atol=0, rtol=0)
    assert_close(all_ones, ours, atol=1e-6, rtol=0)
    assert (masked - ours).abs().max() > 1e-3
    assert_close(masked_junk, masked, atol=1e-5, rtol=0)


def test_motion_modules_mix_frames_once_trained(unet2d):
    video = VideoDenoiser(inflate(unet2d, seed=0)).eval()
    _perturb_motion_outputs(video, seed=2)
    x, t, ehs, _ = _inputs(batch=1, num_frames=4, seed=2)
    x2 = x.clone()
    x2[:, :, 3] = torch.randn_like(x2[:, :, 3])  # change only the last frame
    with torch.no_grad():
        a, b = video(x, t, ehs), video(x2, t, ehs)
    assert (a[:, :, 0] - b[:, :, 0]).abs().max() > 1e-4  # frame 0 now sees frame 3


def test_motion_modules_keep_clips_apart_and_know_frame_order(unet2d):
    """Issue 10 (the demo's frames jump): temporal attention must mix the T frames of one clip, never frames
    of another clip (a (B, T) vs (T, B) fold would), and must know their order (the sinusoidal positions):
    reversing the frames must not merely reverse the output, or no direction could be learned."""
    video = VideoDenoiser(inflate(unet2d, seed=0)).eval()
    _perturb_motion_outputs(video, seed=3)
    x, t, ehs, _ = _inputs(batch=2, num_frames=4, seed=3)
    x2 = x.clone()
    x2[0, :, 0] = torch.randn_like(x2[0, :, 0])  # clip 0, frame 0 only
    with torch.no_grad():
        a, b = video(x, t, ehs), video(x2, t, ehs)
        reversed_ = video(x.flip(2), t, ehs).flip(2)
    diff = (a - b).abs().amax(dim=(1, 3, 4))  # (B, T)
    assert (diff[0, 1:] > 1e-4).all(), diff  # every other frame of clip 0 sees frame 0
    assert (diff[1] == 0).all(), diff  # clip 1 is untouched
    assert (reversed_ - a).abs().max() > 1e-4  # order-aware, not permutation-equivariant


@pytest.mark.parametrize("kind", ["image", "video"])
def test_shape_contract(unet2d, motion, kind):
    model = VideoDenoiser(unet2d if kind == "image" else motion)
    with torch.no_grad():
        for batch, frames in [(1, 1), (2, 3)]:
            x, t, ehs, mask = _inputs(batch, frames)
            assert model(x, t, ehs, mask).shape == x.shape
        x, _, ehs, _ = _inputs(2, 2)
        assert model(x, 500, ehs).shape == x.shape  # scalar timestep is broadcast
        with pytest.raises(ValueError, match=r"\(B, C, T, H, W\)"):
            model(x[:, :, 0], torch.tensor([1, 2]), ehs)
        with pytest.raises(ValueError, match="encoder_hidden_states"):
            model(x, torch.tensor([1, 2]), ehs[:1])
        with pytest.raises(ValueError, match="timesteps"):
            model(x, torch.tensor([1, 2, 3]), ehs)
        with pytest.raises(ValueError, match="encoder_attention_mask"):
            model(x, torch.tensor([1, 2]), ehs, torch.ones(2, L + 1))
    if kind == "video":
        assert model.max_num_frames == 32
        with pytest.raises(ValueError, match="motion_max_seq_length"):
            model(torch.zeros(1, 3, 33, H, W), torch.tensor([1]), ehs[:1])


@pytest.mark.parametrize("kind", ["image", "video"])
def test_save_load_round_trip(unet2d, motion, kind, tmp_path):
    model = VideoDenoiser(unet2d if kind == "image" else motion)
    model.save_pretrained(tmp_path / "ckpt", metadata={"text_encoder": {"kind": "minilm"}})
    assert (tmp_path / "ckpt" / "diffusion_pytorch_model.safetensors").exists()
    info = json.loads((tmp_path / "ckpt" / "pyoco_model.json").read_text())
    assert info["unet_class"] == type(model.unet).__name__ and info["is_video"] == model.is_video
    assert info["metadata"] == {"text_encoder": {"kind": "minilm"}}

    reloaded = load_video_denoiser((tmp_path / "ckpt").as_uri()).eval()  # file:// URI
    assert type(reloaded.unet) is type(model.unet) and reloaded.is_video == model.is_video
    x, t, ehs, mask = _inputs(2, 3, seed=3)
    with torch.no_grad():
        assert_close(reloaded(x, t, ehs, mask), model(x, t, ehs, mask), atol=0, rtol=0)


def test_load_unet2d_layouts_and_errors(unet2d, motion, tmp_path):
    unet2d.save_pretrained(tmp_path / "pipe" / "unet")
    unet2d.save_pretrained(tmp_path / "bare")
    for uri in [tmp_path / "pipe", str(tmp_path / "bare"), (tmp_path / "pipe").as_uri()]:
        loaded = load_unet2d(uri)
        assert_close(loaded.conv_out.weight, unet2d.conv_out.weight, atol=0, rtol=0)

    # A pipeline folder also loads as the (image) denoiser.
    assert not load_video_denoiser(tmp_path / "pipe").is_video

    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError, match="nope"):
        load_unet2d(missing)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="empty.*config.json"):
        load_unet2d(tmp_path / "empty")
    motion.save_pretrained(tmp_path / "motion")
    with pytest.raises(ValueError, match="load_video_denoiser"):
        load_unet2d(tmp_path / "motion")


def test_remote_folder_is_cached_by_content(unet2d, tmp_path):
    """The non-local branch (s3:// in production), exercised with fsspec's in-memory filesystem."""
    local = tmp_path / "src" / "unet"
    unet2d.save_pretrained(local)
    mem = fsspec.filesystem("memory")
    mem.put(str(tmp_path / "src") + "/", "/pyoco-test-pipe/", recursive=True)
    cache = tmp_path / "cache"

    loaded = load_unet2d("memory://pyoco-test-pipe", cache_dir=cache)
    assert_close(loaded.conv_in.weight, unet2d.conv_in.weight, atol=0, rtol=0)
    first = localize("memory://pyoco-test-pipe/unet", cache_dir=cache)
    assert first.parent == cache and (first / "config.json").exists()
    assert localize("memory://pyoco-test-pipe/unet", cache_dir=cache) == first  # cached
    assert len([p for p in cache.iterdir() if not p.name.startswith(".")]) == 1

    with mem.open("/pyoco-test-pipe/unet/extra.txt", "w") as f:
        f.write("changed")
    assert localize("memory://pyoco-test-pipe/unet", cache_dir=cache) != first  # new content, new key
    with pytest.raises(FileNotFoundError, match="memory://pyoco-missing"):
        load_unet2d("memory://pyoco-missing", cache_dir=cache)
    mem.rm("/pyoco-test-pipe", recursive=True)


def test_model_cache_follows_pyoco_cache(unet2d, tmp_path, monkeypatch):
    """Without ``cache_dir``, remote folders land in ``$PYOCO_CACHE/models``, next to the registry's
    ``$PYOCO_CACHE/registry``."""
    from pipelines.registry.resolve import _cache_root

    unet2d.save_pretrained(tmp_path / "src")
    fsspec.filesystem("memory").put(str(tmp_path / "src") + "/", "/pyoco-cache-env/", recursive=True)
    monkeypatch.setenv("PYOCO_CACHE", str(tmp_path / "pc"))
    folder = localize("memory://pyoco-cache-env")
    assert folder.parent == tmp_path / "pc" / "models" and (folder / "config.json").exists()
    assert _cache_root() == tmp_path / "pc" / "registry"
    monkeypatch.delenv("PYOCO_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert localize("memory://pyoco-cache-env").parent == tmp_path / "home" / ".cache" / "pyoco" / "models"
    fsspec.filesystem("memory").rm("/pyoco-cache-env", recursive=True)


def test_load_scheduler_config(tmp_path):
    DDPMScheduler(num_train_timesteps=1000, prediction_type="v_prediction").save_pretrained(
        tmp_path / "pipe" / "scheduler"
    )
    cfg = load_scheduler_config(tmp_path / "pipe")
    assert cfg["prediction_type"] == "v_prediction" and cfg["num_train_timesteps"] == 1000
    (tmp_path / "other").mkdir()
    assert load_scheduler_config(tmp_path / "other") is None
    with pytest.raises(FileNotFoundError, match="absent"):
        load_scheduler_config(tmp_path / "absent")


def test_set_trainable_temporal_only_motion_gets_gradients(unet2d):
    video = VideoDenoiser(inflate(unet2d, seed=0))
    _perturb_motion_outputs(video, seed=4)  # non-zero proj_out, so gradients reach every motion layer
    video.set_trainable("temporal")
    motion_ids = {id(p) for p in video.motion_parameters()}
    trainable = video.trainable_parameters()
    assert {id(p) for p in trainable} == motion_ids and len(trainable) > 0
    assert all(".motion_modules." in n for n, p in video.named_parameters() if p.requires_grad)

    x, t, ehs, mask = _inputs(1, 4, seed=4)
    video(x, t, ehs, mask).square().mean().backward()
    for name, p in video.named_parameters():
        if id(p) in motion_ids:
            assert p.grad is not None, name
        else:
            assert p.grad is None, name
    assert sum(p.grad.abs().sum() for p in trainable) > 0
    for name, p in video.named_motion_parameters():
        if ".proj_out." in name or ".to_q." in name:
            assert p.grad.abs().max() > 0, name

    video.set_trainable("all")
    assert len(video.trainable_parameters()) == len(list(video.parameters()))
    with pytest.raises(ValueError, match="mode"):
        video.set_trainable("spatial")
    with pytest.raises(ValueError, match="video model"):
        VideoDenoiser(unet2d).set_trainable("temporal")


@pytest.mark.parametrize("kind", ["image", "video"])
def test_gradient_checkpointing_gives_the_same_gradients(unet2d, kind):
    def grads(checkpointing: bool) -> dict[str, torch.Tensor]:
        unet = inflate(unet2d, seed=0) if kind == "video" else build_unet2d(CFG, seed=0)
        model = VideoDenoiser(unet).train()
        if kind == "video":
            _perturb_motion_outputs(model, seed=5)
        if checkpointing:
            model.enable_gradient_checkpointing()
        x, t, ehs, mask = _inputs(1, 2, seed=5)
        model(x, t, ehs, mask).square().mean().backward()
        return {n: p.grad for n, p in model.named_parameters()}

    plain, ckpt = grads(False), grads(True)
    assert plain.keys() == ckpt.keys()
    for name in plain:
        assert_close(ckpt[name], plain[name], atol=1e-5, rtol=1e-4, msg=name)


def test_vae_round_trip_shapes_and_scaling(tmp_path):
    torch.manual_seed(0)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=16,
        scaling_factor=0.5,
    )
    vae.save_pretrained(tmp_path / "pipe" / "vae")
    vae = load_vae(tmp_path / "pipe").eval()
    assert vae.config.scaling_factor == 0.5
    with pytest.raises(ValueError, match="AutoencoderKL"):
        build_unet2d(CFG).save_pretrained(tmp_path / "u")
        load_vae(tmp_path / "u")

    x = torch.rand(2, 3, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        z = encode_video(vae, x)
        assert z.shape == (2, 4, 3, 8, 8)
        expected = vae.encode(x[:, :, 1]).latent_dist.mode() * 0.5
        assert_close(z[:, :, 1], expected, atol=1e-5, rtol=1e-5)
        assert_close(encode_video(vae, x, chunk_frames=2), z, atol=1e-5, rtol=1e-5)

        y = decode_video(vae, z)
        assert y.shape == x.shape
        assert_close(y[:, :, 2], vae.decode(z[:, :, 2] / 0.5).sample, atol=1e-5, rtol=1e-5)
        assert_close(decode_video(vae, z, chunk_frames=4), y, atol=1e-5, rtol=1e-5)
