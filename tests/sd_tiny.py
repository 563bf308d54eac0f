"""A tiny Stable-Diffusion-shaped diffusers pipeline folder, built offline from diffusers' and transformers'
own classes (what a user's ``model.pretrained`` folder looks like, at a size that trains on a CPU).

    DIR/model_index.json             StableDiffusionPipeline: the same file a real SD folder ships
    DIR/unet/                        UNet2DConditionModel: 3 down blocks (2 with cross-attention), 4 channels
    DIR/vae/                         AutoencoderKL: 4 latent channels, 4 blocks -> downsampling factor 8
    DIR/text_encoder/                CLIPTextModel, hidden size = unet.config.cross_attention_dim
    DIR/tokenizer/                   CLIPTokenizer files: vocab.json + merges.txt written here (byte-level BPE)
    DIR/scheduler/scheduler_config.json  SD-1.5's PNDMScheduler config, with the requested prediction_type

Every weight comes from a fixed seed, so two builds with the same arguments are byte-identical, and a build
with another ``vae_seed`` is "the same model with another VAE" (for the latents-identity checks).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest

CLIP_DIM = 32  # the tiny CLIP's hidden size = the UNet's cross_attention_dim
MAX_LENGTH = 77  # SD's token length
VAE_FACTOR = 8  # 2 ** (4 VAE blocks - 1), as in SD
UNET_FACTOR = 4  # 2 ** (3 UNet blocks - 1)
SD_SCALING_FACTOR = 0.18215

SPECIAL = {"bos": "<|startoftext|>", "eos": "<|endoftext|>"}


@dataclass(frozen=True)
class TinySD:
    """A built folder and the numbers tests check against."""

    path: Path
    prediction_type: str
    pixel_size: int  # a pixel size the UNet and VAE both divide: latent_size * VAE_FACTOR
    latent_size: int
    clip_dim: int = CLIP_DIM
    max_length: int = MAX_LENGTH
    latent_channels: int = 4


MERGES = ["t h", "th e</w>", "e r</w>", "i n", "o r</w>"]
MERGED = ["th", "the</w>", "er</w>", "in", "or</w>"]


def _byte_chars() -> list[str]:
    """GPT-2/CLIP's byte-level alphabet: printable bytes map to themselves, the rest to U+0100 onwards."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    chars, extra = [], 0
    for b in range(256):
        if b in printable:
            chars.append(chr(b))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    return chars


def _byte_vocab() -> dict[str, int]:
    """CLIP's first 512 entries (every byte-level character, bare and word-final) + a few merges + specials,
    so any prompt tokenizes (one token per character, merged where merges.txt says)."""
    chars = _byte_chars()
    tokens = [*chars, *(c + "</w>" for c in chars), *MERGED, SPECIAL["bos"], SPECIAL["eos"]]
    return {tok: i for i, tok in enumerate(tokens)}


def write_tokenizer(folder: Path, max_length: int = MAX_LENGTH) -> int:
    """CLIPTokenizer files (vocab.json, merges.txt, tokenizer_config.json, special_tokens_map.json) in
    ``folder``; returns the vocabulary size."""
    folder.mkdir(parents=True, exist_ok=True)
    vocab = _byte_vocab()
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(MERGES) + "\n")
    (folder / "tokenizer_config.json").write_text(
        json.dumps({"tokenizer_class": "CLIPTokenizer", "model_max_length": max_length})
    )
    (folder / "special_tokens_map.json").write_text(
        json.dumps(
            {
                "bos_token": SPECIAL["bos"],
                "eos_token": SPECIAL["eos"],
                "pad_token": SPECIAL["eos"],
                "unk_token": SPECIAL["eos"],
            }
        )
    )
    return len(vocab)


def build_clip(vocab_size: int, *, seed: int = 0, dim: int = CLIP_DIM, max_length: int = MAX_LENGTH):
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel

    vocab = _byte_vocab()
    torch.manual_seed(seed)
    config = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=dim,
        intermediate_size=2 * dim,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=max_length,
        bos_token_id=vocab[SPECIAL["bos"]],
        eos_token_id=vocab[SPECIAL["eos"]],
        pad_token_id=vocab[SPECIAL["eos"]],
    )
    return CLIPTextModel(config).eval()


def build_vae(*, seed: int = 0, scaling_factor: float = SD_SCALING_FACTOR, shift_factor: float | None = None):
    """An SD-shaped AutoencoderKL: 4 blocks (factor 8), 4 latent channels, tiny widths."""
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 16, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=32,
        scaling_factor=scaling_factor,
        shift_factor=shift_factor,
    ).eval()


def build_unet(*, seed: int = 0, latent_size: int = 4, cross_attention_dim: int = CLIP_DIM):
    """SD-1.5's block layout (cross-attention down, down, plain; mirrored up) at widths (16, 32, 32)."""
    import torch
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=latent_size,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        mid_block_type="UNetMidBlock2DCrossAttn",
        block_out_channels=(16, 32, 32),
        layers_per_block=1,
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=2,
        norm_num_groups=8,
    )


def sd_scheduler_config(prediction_type: str = "epsilon") -> dict:
    """SD-1.5's shipped scheduler/scheduler_config.json (SD-2's v-model differs only in prediction_type
    among the fields we read)."""
    return {
        "_class_name": "PNDMScheduler",
        "_diffusers_version": "0.6.0",
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "beta_start": 0.00085,
        "clip_sample": False,
        "num_train_timesteps": 1000,
        "prediction_type": prediction_type,
        "set_alpha_to_one": False,
        "skip_prk_steps": True,
        "steps_offset": 1,
        "trained_betas": None,
    }


MODEL_INDEX = {
    "_class_name": "StableDiffusionPipeline",
    "_diffusers_version": "0.42.1",
    "feature_extractor": [None, None],
    "requires_safety_checker": False,
    "safety_checker": [None, None],
    "scheduler": ["diffusers", "PNDMScheduler"],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "unet": ["diffusers", "UNet2DConditionModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}


def build_sd_pipeline(
    root: Path,
    *,
    prediction_type: str = "epsilon",
    seed: int = 0,
    vae_seed: int | None = None,
    latent_size: int = 4,
    shift_factor: float | None = None,
    with_vae: bool = True,
) -> TinySD:
    """Write the folder at ``root`` (created) and describe it. ``vae_seed`` (default ``seed``) varies only
    the VAE's weights; ``shift_factor`` gives an SD3/Flux-style VAE with a shift."""
    if prediction_type not in ("epsilon", "v_prediction"):
        raise ValueError(f"prediction_type must be epsilon or v_prediction, got {prediction_type!r}")
    import torch

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    with torch.random.fork_rng(devices=[]):
        vocab_size = write_tokenizer(root / "tokenizer")
        build_clip(vocab_size, seed=seed).save_pretrained(root / "text_encoder")
        build_unet(seed=seed, latent_size=latent_size).save_pretrained(root / "unet")
        if with_vae:
            vae = build_vae(seed=seed if vae_seed is None else vae_seed, shift_factor=shift_factor)
            vae.save_pretrained(root / "vae")
    (root / "scheduler").mkdir(exist_ok=True)
    (root / "scheduler" / "scheduler_config.json").write_text(
        json.dumps(sd_scheduler_config(prediction_type), indent=2)
    )
    index = dict(MODEL_INDEX) if with_vae else {k: v for k, v in MODEL_INDEX.items() if k != "vae"}
    (root / "model_index.json").write_text(json.dumps(index, indent=2))
    return TinySD(
        path=root,
        prediction_type=prediction_type,
        pixel_size=latent_size * VAE_FACTOR,
        latent_size=latent_size,
    )


# ------------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="session")
def sd_pipeline(tmp_path_factory) -> TinySD:
    """The ε-prediction tiny SD folder (built once per session; treat it as read-only)."""
    return build_sd_pipeline(tmp_path_factory.mktemp("sd-eps") / "pipe")


@pytest.fixture(scope="session")
def sd_pipeline_v(tmp_path_factory) -> TinySD:
    """The same folder with a v_prediction scheduler (SD-2 style)."""
    return build_sd_pipeline(tmp_path_factory.mktemp("sd-v") / "pipe", prediction_type="v_prediction")


@pytest.fixture(scope="session")
def sd_pipeline_other_vae(tmp_path_factory) -> TinySD:
    """The ε folder with a different VAE (other weights, same shapes): its latents must be refused."""
    return build_sd_pipeline(tmp_path_factory.mktemp("sd-other-vae") / "pipe", vae_seed=1)
