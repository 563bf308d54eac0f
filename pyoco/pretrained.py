"""``model.pretrained``: what one diffusers pipeline folder provides, and whether it fits the data.

`resolve_pretrained(model_cfg)` reads only the components' JSON configs (no weights, so it is cheap enough to
run on the driver before Ray starts, also for s3://) and says where each part comes from:

- UNet: ``pretrained/unet`` (or a bare unet folder); the tiny UNet of ``model.tiny`` without ``pretrained``;
- VAE: ``model.vae`` if set, else ``pretrained/vae`` when the folder has one, else none (pixel space);
- text encoder: ``model.text_encoder`` if set (``"minilm"`` or a folder), else the folder's
  ``text_encoder/`` + ``tokenizer/`` when it has them, else MiniLM;
- scheduler: ``pretrained/scheduler/scheduler_config.json`` as shipped (None: our default schedule).

`check_compatible(spec, ...)` is the pure pre-flight check: text width, clip embedding width, pixel size
divisibility and the latents' VAE identity. It raises one `InputError` line naming the values and fields.
Load the weights with `pyoco.model.load_unet2d` / `load_vae` and `pyoco.text.load_text_encoder` on the
spec's URIs.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from pyoco.errors import InputError
from pyoco.model import _url_to_fs, load_scheduler_config, resolve_component

__all__ = [
    "PretrainedSpec",
    "check_compatible",
    "resolve_pretrained",
    "resolve_text",
    "resolve_vae",
    "unet_factor",
]


@dataclass(frozen=True, kw_only=True)
class PretrainedSpec:
    """Where the model's parts come from, with the configs the checks need (JSON-able)."""

    unet: str | None  # URI of the unet component; None: build model.tiny
    unet_config: dict[str, Any]
    vae: str | None  # URI of the vae component; None: pixel space
    vae_config: dict[str, Any] | None
    text_encoder: str  # "minilm" or a folder URI (pipeline folder or bare text_encoder + tokenizer)
    text_dim: int
    text_len: (
        int  # L: CLIP's own length (tokenizer model_max_length, 77 for SD); MiniLM: model.text_max_length
    )
    scheduler_config: dict[str, Any] | None

    @property
    def latent(self) -> bool:
        return self.vae is not None

    @property
    def vae_factor(self) -> int:
        from pyoco.vae import vae_factor

        return vae_factor(self.vae_config) if self.vae_config is not None else 1

    @property
    def pixel_multiple(self) -> int:
        """Pixel H and W must be multiples of this: UNet downsampling x VAE factor."""
        return unet_factor(self.unet_config) * self.vae_factor

    @property
    def pixel_size(self) -> int:
        """The size the UNet was trained at, in pixels: ``unet.config.sample_size`` x VAE factor."""
        return int(self.unet_config.get("sample_size") or 32) * self.vae_factor


def unet_factor(unet_config: dict[str, Any]) -> int:
    """The UNet's total downsampling: ``2 ** (len(block_out_channels) - 1)``."""
    return 2 ** (len(unet_config["block_out_channels"]) - 1)


def _json(uri: str, storage_options: dict | None) -> dict[str, Any]:
    fs, path = _url_to_fs(uri, storage_options)
    try:
        with fs.open(path, "r") as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as err:
        raise InputError(f"cannot read {uri} ({err})") from None


def _component(uri: str, subfolder: str, storage_options: dict | None) -> str | None:
    """``uri/subfolder`` when it holds a config.json, else None (the folder has no such component)."""
    fs, root = _url_to_fs(uri, storage_options)
    return (
        uri.rstrip("/") + "/" + subfolder
        if fs.exists(f"{root.rstrip('/')}/{subfolder}/config.json")
        else None
    )


def resolve_pretrained(model_cfg, *, storage_options: dict | None = None) -> PretrainedSpec:
    """A `PretrainedSpec` for a `pyoco.config.ModelConfig` (reads configs only; see the module docstring)."""
    pretrained = model_cfg.pretrained
    if pretrained:
        unet = resolve_component(pretrained, "unet", storage_options=storage_options)
        unet_config = _json(unet + "/config.json", storage_options)
        scheduler = load_scheduler_config(pretrained, storage_options=storage_options)
        vae = model_cfg.vae or _component(pretrained, "vae", storage_options)
        text = model_cfg.text_encoder or (
            pretrained if _component(pretrained, "text_encoder", storage_options) else "minilm"
        )
    else:
        unet, scheduler = None, None
        unet_config = {"_class_name": "UNet2DConditionModel", **model_cfg.tiny.model_dump()}
        vae, text = model_cfg.vae, model_cfg.text_encoder or "minilm"
    vae, vae_config = resolve_vae(vae, storage_options=storage_options) if vae else (None, None)
    text, text_dim, text_len = resolve_text(text, model_cfg.text_max_length, storage_options=storage_options)
    spec = PretrainedSpec(
        unet=unet,
        unet_config=unet_config,
        vae=vae,
        vae_config=vae_config,
        text_encoder=text,
        text_dim=text_dim,
        text_len=text_len,
        scheduler_config=scheduler,
    )
    _check_channels(spec, model_cfg)
    return spec


def resolve_vae(uri: str, *, storage_options: dict | None = None) -> tuple[str, dict[str, Any]]:
    """(URI of the vae component, its config) for a VAE folder or a pipeline folder with vae/."""
    vae = resolve_component(uri, "vae", storage_options=storage_options)
    return vae, _json(vae + "/config.json", storage_options)


def resolve_text(
    text: str, minilm_length: int, *, storage_options: dict | None = None
) -> tuple[str, int, int]:
    """(encoder, width D, token length L) for ``"minilm"`` (L = ``minilm_length``) or a CLIP folder (L from
    its configs), reading configs only."""
    from pyoco.text import MINILM_DIM

    if text.lower() == "minilm":
        return "minilm", MINILM_DIM, int(minilm_length)
    enc = resolve_component(text, "text_encoder", storage_options=storage_options)
    enc_config = _json(enc + "/config.json", storage_options)
    tok = enc if enc == text else text.rstrip("/") + "/tokenizer"  # as CLIPTextEncoder.from_pretrained
    tok_max = _json(tok + "/tokenizer_config.json", storage_options).get("model_max_length")
    text_len = min(int(enc_config["max_position_embeddings"]), int(tok_max or 10**9))
    return text, int(enc_config["hidden_size"]), text_len


def _check_channels(spec: PretrainedSpec, model_cfg) -> None:
    source = f"model.pretrained {model_cfg.pretrained}" if model_cfg.pretrained else "model.tiny"
    in_ch = int(spec.unet_config.get("in_channels", 3))
    if spec.vae_config is None:
        if in_ch != 3:
            raise InputError(
                f"{source}: unet.config.in_channels={in_ch} is a latent model but there is no VAE "
                "(no vae/ in the folder and model.vae unset)"
            )
        return
    latent_ch = int(spec.vae_config.get("latent_channels", 4))
    if latent_ch != in_ch:
        raise InputError(
            f"{source}: unet.config.in_channels={in_ch} != vae.config.latent_channels={latent_ch} "
            f"(vae from {spec.vae})"
        )


def check_compatible(
    spec: PretrainedSpec,
    *,
    clip_text_dim: int | None = None,
    height: int | None = None,
    width: int | None = None,
    latents_vae_identity: str | None = None,
    model_vae_identity: str | None = None,
    data: str = "clips",
) -> None:
    """Raise one `InputError` line listing every mismatch between the model, its encoder and the data.

    ``clip_text_dim``: the clips' ``caption_embedding`` width D; ``height``/``width``: the pixel size;
    ``latents_vae_identity``: the identity stored with the clips' latents (None: no latents);
    ``model_vae_identity``: `pyoco.vae.vae_identity` of the model's VAE. ``data`` names the data in messages.
    """
    problems = []
    cross = spec.unet_config.get("cross_attention_dim")
    if cross is not None and int(cross) != spec.text_dim:
        problems.append(
            f"unet.config.cross_attention_dim={cross} != the text encoder's width {spec.text_dim} "
            f"(model.text_encoder={spec.text_encoder})"
        )
    if clip_text_dim is not None and int(clip_text_dim) != spec.text_dim:
        problems.append(
            f"{data} caption_embedding width {clip_text_dim} != the text encoder's width {spec.text_dim} "
            f"(model.text_encoder={spec.text_encoder}); preprocess the data with that encoder"
        )
    multiple = spec.pixel_multiple
    for name, size in (("height", height), ("width", width)):
        if size is not None and int(size) % multiple:
            problems.append(
                f"{data} {name} {size} px is not divisible by {multiple} = UNet downsampling "
                f"{unet_factor(spec.unet_config)} (unet.config.block_out_channels) x VAE factor "
                f"{spec.vae_factor} (vae.config.block_out_channels)"
            )
    if latents_vae_identity is not None:
        if spec.vae is None:
            problems.append(f"{data} hold VAE latents but the model is pixel-space (no VAE)")
        elif model_vae_identity is not None and latents_vae_identity != model_vae_identity:
            problems.append(
                f"{data} latents were made by VAE {latents_vae_identity[:19]} (latents vae_identity) but the "
                f"model's VAE {spec.vae} is {model_vae_identity[:19]}; re-run preprocess with this VAE"
            )
    if problems:
        raise InputError("; ".join(problems))
