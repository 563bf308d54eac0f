"""Image UNet → video UNet: build/load a diffusers `UNet2DConditionModel`, inflate it with zero-initialised
AnimateDiff motion modules into a `UNetMotionModel`, and wrap either one in `VideoDenoiser`.

Tensor layouts at this module's boundary (everything else is internal):

- video sample / model output: ``(B, C, T, H, W)`` float, frames on axis 2 (as in `pyoco.noise`).
- timesteps: ``(B,)``, one timestep per clip, shared by its T frames (a 0-d tensor or number is broadcast).
- text: ``encoder_hidden_states`` ``(B, L, D)`` and ``encoder_attention_mask`` ``(B, L)`` (bool or 0/1, 1 = keep),
  exactly what `pyoco.text.TextEncoder.encode` returns.

H and W must be divisible by ``2 ** (len(block_out_channels) - 1)`` for the down/up paths to line up without
interpolation (diffusers interpolates otherwise, which is slower and not what the model was trained on).
T must not exceed ``motion_max_seq_length`` (the temporal positional embedding table) for video models.

Model folders are diffusers folders: either a pipeline folder with ``unet/`` (``vae/``, ``scheduler/``, ...)
subfolders, or a bare component folder holding ``config.json`` + ``*.safetensors``. ``s3://`` (and other fsspec
URIs) are downloaded once into a content-addressed cache and loaded from there; the endpoint and credentials
come from the standard AWS environment (``AWS_ENDPOINT_URL``, ...) through s3fs/botocore, or from
``storage_options``.

Over 400 lines because build, inflate, load and :class:`VideoDenoiser` (with `_motion_forward`, a copy
of diffusers 0.42's forward) all lean on the same diffusers UNet internals; the VAE helpers could move out.
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import json
import os
import re
import shutil
import tempfile
import uuid
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import torch
from diffusers import AutoencoderKL, MotionAdapter, UNet2DConditionModel, UNetMotionModel
from diffusers.models.unets.unet_motion_model import AnimateDiffTransformer3D
from torch import nn

from pyoco.errors import InputError

__all__ = [
    "TinyUNetConfig",
    "VideoDenoiser",
    "build_unet2d",
    "decode_video",
    "default_cache_dir",
    "encode_video",
    "inflate",
    "load_scheduler_config",
    "load_unet2d",
    "load_vae",
    "load_video_denoiser",
    "localize",
    "resolve_component",
]

PYOCO_MODEL_FILE = "pyoco_model.json"
_MODEL_CLASSES: dict[str, type] = {
    "UNet2DConditionModel": UNet2DConditionModel,
    "UNetMotionModel": UNetMotionModel,
}


# ----------------------------------------------------------------------------------------------------------
# Config and construction


@dataclasses.dataclass(frozen=True, kw_only=True)
class TinyUNetConfig:
    """A small pixel-space text-conditioned UNet, trainable on CPU.

    ``attention_head_dim`` keeps diffusers' legacy meaning for `UNet2DConditionModel`: it is the *number of
    heads* of the spatial transformers (diffusers passes it as ``num_attention_heads``).
    Cross-attention sits on the lower-resolution block and the mid block only, which keeps spatial
    self-attention at (H/2·W/2)² instead of (H·W)².
    """

    sample_size: int = 32
    in_channels: int = 3
    out_channels: int = 3
    block_out_channels: tuple[int, ...] = (32, 64)
    layers_per_block: int = 1
    cross_attention_dim: int = 384  # all-MiniLM-L6-v2 hidden size
    attention_head_dim: int = 8
    norm_num_groups: int = 8
    down_block_types: tuple[str, ...] = ("DownBlock2D", "CrossAttnDownBlock2D")
    up_block_types: tuple[str, ...] = ("CrossAttnUpBlock2D", "UpBlock2D")

    def __post_init__(self) -> None:
        n = len(self.block_out_channels)
        if len(self.down_block_types) != n or len(self.up_block_types) != n:
            raise InputError(
                f"TinyUNetConfig: down_block_types/up_block_types need {n} entries "
                f"(one per block_out_channels), got {self.down_block_types} / {self.up_block_types}"
            )
        for ch in self.block_out_channels:
            if ch % self.norm_num_groups:
                raise InputError(
                    f"TinyUNetConfig: block_out_channels {self.block_out_channels} must be divisible by "
                    f"norm_num_groups={self.norm_num_groups}"
                )
        if self.sample_size % self.downsample_factor:
            raise InputError(
                f"TinyUNetConfig: sample_size={self.sample_size} must be divisible by {self.downsample_factor}"
            )

    @property
    def downsample_factor(self) -> int:
        """H and W must be multiples of this."""
        return 2 ** (len(self.block_out_channels) - 1)


def build_unet2d(cfg: TinyUNetConfig, *, seed: int = 0) -> UNet2DConditionModel:
    """A freshly initialised `UNet2DConditionModel`; the same ``(cfg, seed)`` gives bit-identical weights.

    Only blocks with motion counterparts are allowed, so the result is accepted by `inflate`.
    """
    with _seeded(seed):
        unet = UNet2DConditionModel(
            sample_size=cfg.sample_size,
            in_channels=cfg.in_channels,
            out_channels=cfg.out_channels,
            down_block_types=tuple(cfg.down_block_types),
            up_block_types=tuple(cfg.up_block_types),
            mid_block_type="UNetMidBlock2DCrossAttn",
            block_out_channels=tuple(cfg.block_out_channels),
            layers_per_block=cfg.layers_per_block,
            cross_attention_dim=cfg.cross_attention_dim,
            attention_head_dim=cfg.attention_head_dim,
            norm_num_groups=cfg.norm_num_groups,
        )
    return unet


def inflate(
    unet2d: UNet2DConditionModel,
    *,
    motion_max_seq_length: int = 32,
    motion_num_attention_heads: int = 8,
    seed: int = 0,
) -> UNetMotionModel:
    """Image UNet → `UNetMotionModel` with one AnimateDiff temporal transformer after every spatial layer.

    All 2-D weights are copied. Each motion module is ``x + proj_out(temporal_attn(norm(x)))``; we zero
    ``proj_out`` (diffusers' `from_unet2d` leaves it random), so at initialisation every motion module is the
    identity and the video model's output on each frame equals the image model's output on that frame. The
    first gradients therefore reach only ``proj_out``; the rest of each module starts learning after one step.

    ``motion_num_attention_heads`` must divide every entry of ``block_out_channels``; T is limited to
    ``motion_max_seq_length`` by the sinusoidal temporal position table.
    """
    cfg = unet2d.config
    channels = tuple(cfg.block_out_channels)
    bad = [ch for ch in channels if ch % motion_num_attention_heads]
    if bad:
        raise InputError(
            f"inflate: motion_num_attention_heads={motion_num_attention_heads} must divide every "
            f"block_out_channels entry {channels}"
        )
    _warn_dropped_config(unet2d)
    with _seeded(seed):
        adapter = MotionAdapter(
            block_out_channels=channels,
            motion_layers_per_block=cfg.layers_per_block,
            motion_num_attention_heads=motion_num_attention_heads,
            motion_norm_num_groups=cfg.norm_num_groups,
            motion_max_seq_length=motion_max_seq_length,
            use_motion_mid_block=True,
        )
        _zero_motion_outputs(adapter)
        unet = UNetMotionModel.from_unet2d(unet2d, adapter)
    # from_unet2d loads the adapter's (already zeroed) modules; zero again so this holds even if a future
    # diffusers re-initialises them on load.
    _zero_motion_outputs(unet)
    return unet


def _zero_motion_outputs(module: nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, AnimateDiffTransformer3D):
            nn.init.zeros_(m.proj_out.weight)
            if m.proj_out.bias is not None:
                nn.init.zeros_(m.proj_out.bias)


def _warn_dropped_config(unet2d: UNet2DConditionModel) -> None:
    """`UNetMotionModel.from_unet2d` silently drops UNet2DConditionModel options it cannot represent."""
    expected, optional = UNetMotionModel._get_signature_keys(UNetMotionModel)
    # attention_head_dim is the legacy alias of num_attention_heads, which from_unet2d maps across.
    motion_keys = set(expected) | set(optional) | {"attention_head_dim"}
    defaults = inspect.signature(UNet2DConditionModel.__init__).parameters
    dropped = {
        k: v
        for k, v in unet2d.config.items()
        if k in defaults and k not in motion_keys and _normalise(defaults[k].default) != _normalise(v)
    }
    if dropped:
        warnings.warn(
            f"inflate: UNetMotionModel cannot represent these UNet2DConditionModel settings; they are dropped "
            f"and per-frame equivalence may not hold: {dropped}",
            stacklevel=3,
        )


def _normalise(v: Any) -> Any:
    return list(v) if isinstance(v, tuple | list) else v


class _seeded:
    """Seed torch's CPU RNG inside the block without disturbing the caller's RNG stream."""

    def __init__(self, seed: int):
        self.seed = seed

    def __enter__(self) -> None:
        self._ctx = torch.random.fork_rng(devices=[])
        self._ctx.__enter__()
        torch.manual_seed(self.seed)

    def __exit__(self, *exc: Any) -> None:
        self._ctx.__exit__(*exc)


# ----------------------------------------------------------------------------------------------------------
# Locating and caching diffusers folders (local or fsspec URIs)


def default_cache_dir() -> Path:
    """Where :func:`localize` downloads when no ``cache_dir`` is given: ``$PYOCO_CACHE/models``, default
    ``~/.cache/pyoco/models`` (`pyoco.storage.cache_root`)."""
    from pyoco.storage import cache_root

    return cache_root() / "models"


def _url_to_fs(uri: str, storage_options: dict | None = None):
    import fsspec

    return fsspec.core.url_to_fs(str(uri), **(storage_options or {}))


def _is_local(fs) -> bool:
    from fsspec.implementations.local import LocalFileSystem

    return isinstance(fs, LocalFileSystem)


def resolve_component(uri: str | os.PathLike, subfolder: str, *, storage_options: dict | None = None) -> str:
    """The URI of a diffusers component folder: ``uri/subfolder`` if it holds a ``config.json``, else ``uri``
    itself if it does (a bare component folder).

    Raises `FileNotFoundError` naming ``uri`` when it does not exist, and `ValueError` when it exists but holds
    neither ``{subfolder}/config.json`` nor ``config.json``.
    """
    uri = str(uri)
    fs, root = _url_to_fs(uri, storage_options)
    root = root.rstrip("/")
    if not fs.exists(root):
        raise FileNotFoundError(f"model folder not found: {uri}")
    if not fs.isdir(root):
        raise InputError(f"not a diffusers model folder (it is a file): {uri}")
    if fs.exists(f"{root}/{subfolder}/config.json"):
        return uri.rstrip("/") + "/" + subfolder
    if fs.exists(f"{root}/config.json"):
        return uri
    raise InputError(
        f"not a diffusers model folder: {uri} has neither {subfolder}/config.json (pipeline folder) "
        f"nor config.json (bare {subfolder} folder)"
    )


def _unsafe_key(rel: str) -> bool:
    """A remote key that must not become a local path: ``..`` / ``.`` / empty parts, an absolute path, a
    drive letter, a backslash or a NUL byte (the same rule preprocess applies to tar members)."""
    if not rel or "\x00" in rel or "\\" in rel or rel.startswith("/") or re.match(r"^[a-zA-Z]:", rel):
        return True
    return any(part in ("", ".", "..") for part in rel.split("/"))


def localize(
    uri: str | os.PathLike, *, cache_dir: str | os.PathLike | None = None, storage_options: dict | None = None
) -> Path:
    """A local directory with the contents of ``uri``.

    Local paths and ``file://`` URIs are returned as they are. Anything else (``s3://bucket/prefix``) is
    listed, and the listing (relative paths, sizes, ETags/mtimes) is hashed into a cache key, so changed
    remote content gets a new cache entry and unchanged content is downloaded once per machine. Downloads go to
    a temporary sibling and are renamed into place, so concurrent workers never see half a folder.
    """
    uri = str(uri)
    fs, root = _url_to_fs(uri, storage_options)
    if _is_local(fs):
        path = Path(root)
        if not path.exists():
            raise FileNotFoundError(f"model folder not found: {uri}")
        return path
    root = root.rstrip("/")
    if not fs.exists(root):
        raise FileNotFoundError(f"model folder not found: {uri}")
    listing = fs.find(root, detail=True)
    if not listing:
        raise FileNotFoundError(f"model folder is empty: {uri}")
    entries = []
    for path, info in sorted(listing.items()):
        rel = path[len(root) :].lstrip("/")
        if _unsafe_key(rel):  # never build a local path from it: it would land outside the cache
            raise InputError(f"{uri}: refusing to download {path!r} (a '..', absolute or empty path part)")
        tag = info.get("ETag") or info.get("etag") or info.get("LastModified") or info.get("mtime")
        entries.append((rel, info.get("size"), str(tag)))
    key = hashlib.sha256(json.dumps([uri, entries]).encode()).hexdigest()[:32]
    cache = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    target = cache / key
    if (target / ".complete").exists():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    tmp = cache / f".{key}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
    try:
        for rel, _, _ in entries:
            dest = tmp / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            fs.get_file(f"{root}/{rel}", str(dest))
        (tmp / ".complete").write_text(json.dumps({"uri": uri, "files": len(entries)}))
        try:
            os.replace(tmp, target)
        except OSError:
            # Another process finished first (target exists and is non-empty): keep theirs.
            if not (target / ".complete").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _read_config(folder: Path, uri: str) -> dict:
    try:
        return json.loads((folder / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise InputError(f"not a diffusers model folder: cannot read {uri}/config.json ({err})") from err


def _local_component(
    uri: str | os.PathLike, subfolder: str, cache_dir: str | os.PathLike | None, storage_options: dict | None
) -> tuple[Path, str]:
    component_uri = resolve_component(uri, subfolder, storage_options=storage_options)
    return localize(component_uri, cache_dir=cache_dir, storage_options=storage_options), component_uri


def load_unet2d(
    uri: str | os.PathLike,
    *,
    cache_dir: str | os.PathLike | None = None,
    storage_options: dict | None = None,
) -> UNet2DConditionModel:
    """Load a `UNet2DConditionModel` from a pipeline folder (its ``unet/``) or a bare unet folder, local or
    ``s3://`` (downloaded to ``cache_dir``, default :func:`default_cache_dir`)."""
    folder, component_uri = _local_component(uri, "unet", cache_dir, storage_options)
    class_name = _read_config(folder, component_uri).get("_class_name")
    if class_name != "UNet2DConditionModel":
        hint = " (a video model: use load_video_denoiser)" if class_name == "UNetMotionModel" else ""
        raise InputError(
            f"{component_uri} holds a {class_name!r}, expected a UNet2DConditionModel folder{hint}"
        )
    return UNet2DConditionModel.from_pretrained(folder, local_files_only=True)


def load_scheduler_config(
    uri: str | os.PathLike, *, storage_options: dict | None = None
) -> dict[str, Any] | None:
    """``scheduler/scheduler_config.json`` of a pipeline folder (or ``scheduler_config.json`` in ``uri``
    itself) as a dict, or None if there is none. Feed it to e.g. ``DDPMScheduler.from_config``."""
    fs, root = _url_to_fs(str(uri), storage_options)
    root = root.rstrip("/")
    if not fs.exists(root):
        raise FileNotFoundError(f"model folder not found: {uri}")
    for candidate in (f"{root}/scheduler/scheduler_config.json", f"{root}/scheduler_config.json"):
        if fs.exists(candidate):
            with fs.open(candidate, "r") as f:
                return json.load(f)
    return None


# ----------------------------------------------------------------------------------------------------------
# The denoiser


class VideoDenoiser(nn.Module):
    """ε/v-prediction network for clips: ``forward((B, C, T, H, W), (B,), (B, L, D), (B, L)) -> (B, C, T, H, W)``.

    Wraps either

    - a `UNet2DConditionModel` (``is_video=False``): the image model. Frames are folded into the batch and
      denoised independently: the T=1 image pretraining model and the per-frame baseline; or
    - a `UNetMotionModel` (``is_video=True``): the inflated video model.

    ``motion_branch`` (video models only): pyoco's own layers after every motion module
    (`pyoco.branch`, e.g. ``"caption-conv"``), zero-initialised, owned here as ``branches``.

    The prediction target (ε or v) is the training objective's business, not this module's.
    """

    def __init__(self, unet: UNet2DConditionModel | UNetMotionModel, *, motion_branch: str | None = None):
        super().__init__()
        if not isinstance(unet, UNet2DConditionModel | UNetMotionModel):
            raise TypeError(
                f"VideoDenoiser wraps a UNet2DConditionModel or UNetMotionModel, got {type(unet)}"
            )
        unsupported = {
            k: unet.config.get(k)
            for k in ("addition_embed_type", "encoder_hid_dim_type", "class_embed_type", "time_cond_proj_dim")
            if unet.config.get(k) is not None
        }
        if unsupported:
            raise InputError(
                f"VideoDenoiser conditions on text only; this UNet needs extra conditioning: {unsupported}"
            )
        self.unet = unet
        self.is_video = isinstance(unet, UNetMotionModel)
        self.motion_branch = motion_branch
        self.branches = None
        if motion_branch is not None:
            from pyoco.branch import CallContext, build_branches, hook_branches

            if not self.is_video:
                raise InputError(f"motion_branch {motion_branch!r} needs a video model; got an image UNet")
            self.branches = build_branches(motion_branch, unet)
            self._call = CallContext()
            hook_branches(unet, self.branches, self._call)

    @property
    def config(self):
        return self.unet.config

    @property
    def max_num_frames(self) -> int | None:
        """The longest clip a video model can take (its temporal position table); None for image models."""
        return self.unet.config.motion_max_seq_length if self.is_video else None

    def forward(
        self,
        sample: torch.Tensor,
        timesteps: torch.Tensor | float | int,
        encoder_hidden_states: torch.Tensor,
        encoder_attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """
        Args:
            sample: ``(B, C, T, H, W)`` noisy clips, frames on axis 2.
            timesteps: ``(B,)`` one (integer or continuous) timestep per clip, or a scalar for all clips.
            encoder_hidden_states: ``(B, L, D)`` text token states, D == ``cross_attention_dim``.
            encoder_attention_mask: ``(B, L)`` bool or 0/1 (1 = attend), or None (attend to all L tokens).
                Applied in every cross-attention as an additive bias of -10000 on masked tokens (diffusers'
                convention), identically for image and video models.

        Returns:
            ``(B, C_out, T, H, W)`` in the UNet's dtype.
        """
        if sample.ndim != 5:
            raise ValueError(f"sample must be (B, C, T, H, W), got shape {tuple(sample.shape)}")
        batch, _, num_frames, _, _ = sample.shape
        if encoder_hidden_states.ndim != 3 or encoder_hidden_states.shape[0] != batch:
            raise ValueError(
                f"encoder_hidden_states must be (B={batch}, L, D), got {tuple(encoder_hidden_states.shape)}"
            )
        if self.is_video and num_frames > self.max_num_frames:
            raise ValueError(f"T={num_frames} exceeds motion_max_seq_length={self.max_num_frames}")
        timesteps = torch.as_tensor(timesteps, device=sample.device)
        if timesteps.ndim == 0:
            timesteps = timesteps.expand(batch)
        if timesteps.shape != (batch,):
            raise ValueError(f"timesteps must be (B={batch},) or a scalar, got {tuple(timesteps.shape)}")

        # Per-frame conditioning, frame-major within each clip: row b*T + t is frame t of clip b, the same
        # order in which both UNets fold (B, C, T, H, W) -> (B*T, C, H, W).
        ehs = encoder_hidden_states.to(self.unet.dtype).repeat_interleave(num_frames, dim=0)
        keep = None  # (B*T, L), 1 = attend
        if encoder_attention_mask is not None:
            if encoder_attention_mask.shape != encoder_hidden_states.shape[:2]:
                raise ValueError(
                    f"encoder_attention_mask must be (B, L)={tuple(encoder_hidden_states.shape[:2])}, "
                    f"got {tuple(encoder_attention_mask.shape)}"
                )
            keep = encoder_attention_mask.to(device=sample.device, dtype=self.unet.dtype)
            keep = keep.repeat_interleave(num_frames, dim=0)

        if self.branches is not None:  # what this call's branches read (pyoco.branch)
            self._call.num_frames = num_frames
            self._call.text = encoder_hidden_states
            self._call.keep = None if keep is None else keep[::num_frames]
        if self.is_video:
            # The same bias UNet2DConditionModel.forward makes from a 0/1 mask: (B*T, 1, L), -10000 = masked.
            bias = None if keep is None else ((1.0 - keep) * -10000.0).unsqueeze(1)
            return _motion_forward(self.unet, sample, timesteps, ehs, bias)
        x = sample.permute(0, 2, 1, 3, 4).reshape(batch * num_frames, *sample.shape[1:2], *sample.shape[3:])
        out = self.unet(
            x,
            timesteps.repeat_interleave(num_frames),
            encoder_hidden_states=ehs,
            encoder_attention_mask=keep,  # diffusers turns the 0/1 mask into the -10000 bias itself
            return_dict=False,
        )[0]
        return out.reshape(batch, num_frames, *out.shape[1:]).permute(0, 2, 1, 3, 4)

    # -- training helpers ----------------------------------------------------------------------------------

    def enable_gradient_checkpointing(self) -> None:
        self.unet.enable_gradient_checkpointing()

    def set_trainable(self, mode: Literal["temporal", "all"]) -> None:
        """``"temporal"``: only motion-module parameters require grad (video models only). ``"all"``: all."""
        if mode == "all":
            self.unet.requires_grad_(True)
        elif mode == "temporal":
            if not self.is_video:
                raise ValueError(
                    "set_trainable('temporal') needs a video model (UNetMotionModel); got an image UNet"
                )
            self.unet.requires_grad_(False)
            for p in self.motion_parameters():
                p.requires_grad_(True)
        else:
            raise ValueError(f"set_trainable: mode must be 'temporal' or 'all', got {mode!r}")

    def named_motion_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """The motion modules' parameters (names relative to the unet), then any motion branch's
        (``branches.<i>.*``): what ``train_layers: temporal`` trains and ``motion_lr_multiplier`` scales."""
        for name, p in self.unet.named_parameters():
            if ".motion_modules." in name:
                yield name, p
        if self.branches is not None:
            for name, p in self.branches.named_parameters():
                yield f"branches.{name}", p

    def motion_parameters(self) -> list[nn.Parameter]:
        return [p for _, p in self.named_motion_parameters()]

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    # -- persistence ---------------------------------------------------------------------------------------

    def save_pretrained(
        self,
        path: str | os.PathLike,
        *,
        metadata: dict[str, Any] | None = None,
        storage_options: dict | None = None,
    ) -> None:
        """Write a diffusers folder (``config.json`` + ``diffusion_pytorch_model.safetensors``) plus
        ``pyoco_model.json`` naming the UNet class. ``metadata`` (JSON-able, e.g. the text encoder's
        ``describe()``) is stored in ``pyoco_model.json`` under ``"metadata"``. Remote URIs are written via a
        local temporary folder."""
        info = {
            "format": "pyoco.VideoDenoiser",
            "format_version": 1,
            "unet_class": type(self.unet).__name__,
            "is_video": self.is_video,
            "metadata": metadata or {},
        }
        if self.branches is not None:
            from pyoco.branch import branch_record

            info["motion_branch"] = branch_record(self.motion_branch)
        fs, root = _url_to_fs(str(path), storage_options)
        if _is_local(fs):
            _save_local(self, Path(root), info)
            return
        with tempfile.TemporaryDirectory(prefix="pyoco-save-") as tmp:
            _save_local(self, Path(tmp), info)
            fs.put(tmp.rstrip("/") + "/", root.rstrip("/") + "/", recursive=True)

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike,
        *,
        cache_dir: str | os.PathLike | None = None,
        storage_options: dict | None = None,
    ) -> VideoDenoiser:
        """Load what `save_pretrained` wrote, or any diffusers UNet2DConditionModel / UNetMotionModel folder
        (bare, or a pipeline folder's ``unet/``), local or remote. A folder whose ``pyoco_model.json`` names a
        motion branch loads it from its weights file, and is refused without it (never silently the model
        without its branch)."""
        folder, component_uri = _local_component(path, "unet", cache_dir, storage_options)
        class_name = _read_config(folder, component_uri).get("_class_name")
        info_file = folder / PYOCO_MODEL_FILE
        info = json.loads(info_file.read_text()) if info_file.exists() else {}
        class_name = info.get("unet_class", class_name)
        if class_name not in _MODEL_CLASSES:
            raise InputError(
                f"{component_uri} holds a {class_name!r}; expected one of {sorted(_MODEL_CLASSES)}"
            )
        branch = info.get("motion_branch")
        branch_file = None
        if branch is not None:
            from pyoco.branch import branch_weights_file

            branch_file = branch_weights_file(folder, branch, where=f"{component_uri}: {PYOCO_MODEL_FILE}")
        unet = _MODEL_CLASSES[class_name].from_pretrained(folder, local_files_only=True)
        try:
            model = cls(unet, motion_branch=None if branch is None else branch.get("kind"))
        except ValueError as err:
            raise InputError(f"{component_uri}: {err}") from None
        if branch_file is not None:
            from pyoco.branch import load_branch_weights

            load_branch_weights(model.branches, branch_file)
        return model


def _save_local(model: VideoDenoiser, folder: Path, info: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    model.unet.save_pretrained(folder, safe_serialization=True)
    if model.branches is not None:
        from pyoco.branch import save_branch_weights

        save_branch_weights(model.branches, folder / info["motion_branch"]["file"])
    (folder / PYOCO_MODEL_FILE).write_text(json.dumps(info, indent=2, sort_keys=True))


def load_video_denoiser(
    uri: str | os.PathLike,
    *,
    cache_dir: str | os.PathLike | None = None,
    storage_options: dict | None = None,
) -> VideoDenoiser:
    """`VideoDenoiser.from_pretrained` for a local path or ``s3://`` URI."""
    return VideoDenoiser.from_pretrained(uri, cache_dir=cache_dir, storage_options=storage_options)


def pyoco_model_info(uri: str | os.PathLike, *, storage_options: dict | None = None) -> dict[str, Any] | None:
    """The ``pyoco_model.json`` written by `VideoDenoiser.save_pretrained` (read without downloading
    weights), or None if the folder has none."""
    fs, root = _url_to_fs(str(uri), storage_options)
    root = root.rstrip("/")
    for candidate in (f"{root}/{PYOCO_MODEL_FILE}", f"{root}/unet/{PYOCO_MODEL_FILE}"):
        if fs.exists(candidate):
            with fs.open(candidate, "r") as f:
                return json.load(f)
    return None


def _motion_forward(
    unet: UNetMotionModel,
    sample: torch.Tensor,
    timesteps: torch.Tensor,
    encoder_hidden_states: torch.Tensor,
    encoder_attention_bias: torch.Tensor | None,
) -> torch.Tensor:
    """`UNetMotionModel.forward` (diffusers 0.42) for text-only conditioning, plus the cross-attention mask.

    diffusers' forward has no ``encoder_attention_mask`` argument: its ``attention_mask`` goes to the
    *spatial self*-attention, so a (B, L) text mask cannot be passed through it. The motion blocks do take
    ``encoder_attention_mask``, so we run the same steps and hand it to them. With no mask this is exactly
    diffusers' forward (checked in tests/test_model.py).

    sample (B, C, T, H, W); timesteps (B,); encoder_hidden_states (B*T, L, D) frame-major;
    encoder_attention_bias (B*T, 1, L) additive or None. Returns (B, C_out, T, H, W).
    """
    batch, _, num_frames = sample.shape[:3]
    up_factor = 2**unet.num_upsamplers
    forward_upsample_size = any(s % up_factor != 0 for s in sample.shape[-2:])

    t_emb = unet.time_proj(timesteps).to(dtype=unet.dtype)
    emb = unet.time_embedding(t_emb, None)
    emb = emb.repeat_interleave(num_frames, dim=0)  # (B*T, E)

    h = sample.permute(0, 2, 1, 3, 4).reshape(batch * num_frames, -1, *sample.shape[3:])
    h = unet.conv_in(h)
    cross = {"encoder_hidden_states": encoder_hidden_states, "encoder_attention_mask": encoder_attention_bias}

    res_samples: tuple[torch.Tensor, ...] = (h,)
    for block in unet.down_blocks:
        if getattr(block, "has_cross_attention", False):
            h, res = block(hidden_states=h, temb=emb, num_frames=num_frames, **cross)
        else:
            h, res = block(hidden_states=h, temb=emb, num_frames=num_frames)
        res_samples += res

    if unet.mid_block is not None:
        if hasattr(unet.mid_block, "motion_modules"):
            h = unet.mid_block(h, emb, num_frames=num_frames, **cross)
        else:
            h = unet.mid_block(h, emb, **cross)

    upsample_size = None
    for i, block in enumerate(unet.up_blocks):
        res = res_samples[-len(block.resnets) :]
        res_samples = res_samples[: -len(block.resnets)]
        if i < len(unet.up_blocks) - 1 and forward_upsample_size:
            upsample_size = res_samples[-1].shape[2:]
        if getattr(block, "has_cross_attention", False):
            h = block(
                hidden_states=h,
                temb=emb,
                res_hidden_states_tuple=res,
                upsample_size=upsample_size,
                num_frames=num_frames,
                **cross,
            )
        else:
            h = block(
                hidden_states=h,
                temb=emb,
                res_hidden_states_tuple=res,
                upsample_size=upsample_size,
                num_frames=num_frames,
            )

    if unet.conv_norm_out is not None:
        h = unet.conv_act(unet.conv_norm_out(h))
    h = unet.conv_out(h)
    return h.reshape(batch, num_frames, *h.shape[1:]).permute(0, 2, 1, 3, 4)


# ----------------------------------------------------------------------------------------------------------
# Optional latent space


def load_vae(
    uri: str | os.PathLike,
    *,
    cache_dir: str | os.PathLike | None = None,
    storage_options: dict | None = None,
) -> AutoencoderKL:
    """`AutoencoderKL` from a pipeline folder's ``vae/`` or a bare vae folder, local or remote."""
    folder, component_uri = _local_component(uri, "vae", cache_dir, storage_options)
    class_name = _read_config(folder, component_uri).get("_class_name")
    if class_name != "AutoencoderKL":
        raise InputError(f"{component_uri} holds a {class_name!r}, expected an AutoencoderKL folder")
    return AutoencoderKL.from_pretrained(folder, local_files_only=True)


def _vae_scale_shift(vae: AutoencoderKL) -> tuple[float, float]:
    return float(vae.config.scaling_factor), float(getattr(vae.config, "shift_factor", None) or 0.0)


def encode_video(
    vae: AutoencoderKL,
    x: torch.Tensor,
    *,
    sample_posterior: bool = False,
    generator: torch.Generator | None = None,
    chunk_frames: int | None = None,
) -> torch.Tensor:
    """Pixels ``(B, 3, T, H, W)`` in [-1, 1] → latents ``(B, c, T, H/f, W/f)``, scaled to ~unit variance:
    ``z = (mode_or_sample - shift_factor) * scaling_factor``. Frames are encoded independently, in chunks of
    ``chunk_frames`` (all at once by default)."""
    scale, shift = _vae_scale_shift(vae)
    batch, _, num_frames = x.shape[:3]
    frames = x.permute(0, 2, 1, 3, 4).reshape(batch * num_frames, *x.shape[1:2], *x.shape[3:])
    outs = []
    for chunk in frames.split(chunk_frames or frames.shape[0]):
        dist = vae.encode(chunk.to(vae.dtype)).latent_dist
        z = dist.sample(generator) if sample_posterior else dist.mode()
        outs.append((z - shift) * scale)
    z = torch.cat(outs)
    return z.reshape(batch, num_frames, *z.shape[1:]).permute(0, 2, 1, 3, 4)


def decode_video(vae: AutoencoderKL, z: torch.Tensor, *, chunk_frames: int | None = None) -> torch.Tensor:
    """Latents ``(B, c, T, h, w)`` (as from `encode_video`) → pixels ``(B, 3, T, h*f, w*f)``, roughly [-1, 1]."""
    scale, shift = _vae_scale_shift(vae)
    batch, _, num_frames = z.shape[:3]
    frames = z.permute(0, 2, 1, 3, 4).reshape(batch * num_frames, *z.shape[1:2], *z.shape[3:])
    outs = [
        vae.decode((chunk / scale + shift).to(vae.dtype)).sample
        for chunk in frames.split(chunk_frames or frames.shape[0])
    ]
    x = torch.cat(outs)
    return x.reshape(batch, num_frames, *x.shape[1:]).permute(0, 2, 1, 3, 4)
