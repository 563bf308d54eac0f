"""Typed configuration for every pyoco step, validated once at entry.

One YAML file describes a whole workflow; each step reads its own section. Every model forbids unknown
keys, so a typo (``trian:``) is an error that names the field instead of a silently ignored setting.

    cfg = load_config("pipelines/configs/demo.yaml", overrides={"preprocess.input": "s3://b/raw"})

Errors are raised as :class:`ConfigError` whose message names the file and the dotted field path, e.g.
``demo.yaml: train.zero_stage: Input should be 0, 1, 2 or 3 (got 5)``.

Over 400 lines because it is one pydantic model per config section, kept together so that the whole
schema reads in one place.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from pyoco.errors import InputError

SECRET_KEY_MARKERS = ("secret", "password", "token", "credential", "access_key", "api_key")


class ConfigError(InputError):
    """A configuration problem; the message names the file and the field."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=False, validate_assignment=True)


# ----------------------------------------------------------------------------------------------------- noise
class NoiseConfig(_Section):
    """The PYoCo prior (Ge et al. 2023). ``alpha`` is the paper's α; see pyoco.noise for ρ."""

    kind: Literal["iid", "mixed", "progressive", "auto"] = "progressive"
    # "auto": `pyoco run` fits it to the data first (`pyoco noise fit`: DDIM-invert val clips with the image
    # model), as a cached step before train; kind "auto" needs alpha "auto", a fixed kind may have either.
    alpha: float | Literal["auto"] = 1.0
    fit_clips: int = Field(32, ge=2)  # val clips the noise fit inverts
    fit_steps: int = Field(50, ge=1)  # its DDIM inversion steps

    @field_validator("alpha")
    @classmethod
    def _alpha_ok(cls, v: float | str) -> float | str:
        if v == "auto":
            return v
        if not math.isfinite(v) or v < 0:
            raise ValueError(f"alpha must be a finite number >= 0 or 'auto' (got {v})")
        return v

    @model_validator(mode="after")
    def _auto_ok(self) -> NoiseConfig:
        if self.kind == "auto" and self.alpha != "auto":
            raise ValueError("kind 'auto' needs alpha 'auto' (the fit chooses both)")
        if self.kind == "iid" and self.alpha == "auto":
            raise ValueError("iid noise has no alpha to fit; use kind mixed|progressive|auto")
        return self

    @property
    def is_auto(self) -> bool:
        return self.kind == "auto" or self.alpha == "auto"


# ----------------------------------------------------------------------------------------------------- synth
class SynthConfig(_Section):
    """``pyoco data synth``: moving coloured shapes as WebDataset shards."""

    out: str
    videos: int = Field(64, ge=1)
    shards: int = Field(4, ge=1)
    seed: int = 0
    frames: int = Field(24, ge=1)
    size: int = Field(64, ge=8)
    fps: int = Field(8, ge=1)
    # Shares of videos with a hard cut / with a shape that stands still (pyoco.synth module doc).
    cut_fraction: float = Field(0.0, ge=0, le=1)
    static_fraction: float = Field(0.0, ge=0, le=1)

    @model_validator(mode="after")
    def _kinds_fit(self) -> SynthConfig:
        if self.cut_fraction + self.static_fraction > 1:
            raise ValueError(
                f"cut_fraction + static_fraction must be <= 1 (got {self.cut_fraction} + {self.static_fraction})"
            )
        return self


# ------------------------------------------------------------------------------------------------ preprocess
class CaptionFilterConfig(_Section):
    min_words: int = Field(2, ge=0)
    max_words: int = Field(77, ge=1)
    max_chars: int = Field(1000, ge=1)
    min_letter_fraction: float = Field(0.5, ge=0, le=1)
    blocklist: list[str] = Field(default_factory=list)
    dedupe: Literal["none", "exact", "normalized"] = "normalized"


class PreprocessConfig(_Section):
    input: str
    output: str
    format: Literal["auto", "webdataset", "folder", "ucf101"] = "auto"
    num_frames: int = Field(8, ge=1)
    frame_stride: int = Field(1, ge=1)
    target_fps: float | None = Field(None, gt=0)
    size: int = Field(32, ge=8)
    max_clips_per_video: int = Field(1, ge=1)
    seed: int = 0
    # Clips never span a shot cut (pyoco.video shot-aware decoding, pyoco.shots.detect_cuts).
    shot_aware: bool = True
    # A clip whose pyoco.shots.motion_score is below this is dropped as `static` (0: keep every clip).
    min_motion: float = Field(3e-4, ge=0)  # pyoco.shots.STATIC_MOTION
    # A clip whose pyoco.shots.jitter_score (px per frame step, per step) is above this is dropped as
    # `jitter`; None: no jitter check (it costs an FFT per frame).
    max_jitter_px: float | None = Field(None, gt=0)
    # Share of source videos held out for evaluation (clips/val); a per-video hash threshold, see pyoco.clips.
    val_fraction: float = Field(0.1, ge=0, lt=1)
    rows_per_file: int = Field(256, ge=1)
    captions: CaptionFilterConfig = Field(default_factory=CaptionFilterConfig)
    text_encoder: str = "minilm"
    text_max_length: int = Field(32, ge=1)
    # Text-embedding actors: a fixed pool of N, or `auto`: Ray Data grows the pool from 1 while the stage has
    # a backlog (pipelines/preprocess/placement.py:embed_pool).
    embed_actors: int | Literal["auto"] = 1
    embed_batch_size: int = Field(64, ge=1)
    # Logical CPUs each embedding actor reserves. 0: it shares the decode CPUs (MiniLM on short captions
    # costs a few % of decoding; a whole CPU per actor would starve decode on 1-2 CPU nodes).
    embed_num_cpus: float = Field(0.0, ge=0)
    decode_threads: int = Field(1, ge=0)
    # Videos per chunk that a unit's decode task streams back (a task decodes a whole shard / unit): smaller
    # bounds the frames in flight, larger cuts per-object overhead.
    videos_per_task: int = Field(4, ge=1)
    # Custom Ray resource that decode tasks request, to keep them on CPU nodes; when no node in the cluster
    # offers it, tasks fall back to plain CPU scheduling.
    resource: str | None = "preprocess"
    num_cpus_per_task: float = Field(1.0, gt=0)
    s3_endpoint_url: str | None = None
    # The step fails (naming the top reasons) when more than this fraction of its inputs is rejected:
    # a decoder or caption-rule regression must not "succeed" with few or no clips.
    max_reject_fraction: float = Field(0.5, ge=0, le=1)
    # VAE latents (pipelines/preprocess/latents.py): a ``latents`` column (C, T, h, w) encoded by ``vae`` (a
    # VAE folder or a pipeline folder with vae/; in a workflow, the model's VAE) in an actor pool, on GPU
    # actors (``latent_num_gpus`` each) when the cluster has GPUs. Train then runs no VAE.
    latents: bool = False
    vae: str | None = None
    keep_frames: bool = True  # False: frames are null (smaller rows; evaluate decodes the latents)
    latent_actors: int = Field(1, ge=1)
    latent_batch_size: int = Field(4, ge=1)
    latent_num_gpus: float = Field(1.0, ge=0)  # per actor, used only when the cluster has GPUs
    latent_num_cpus: float = Field(1.0, ge=0)  # per CPU actor
    # Where the embedding and latents actors run (decode stays on the CPU nodes either way): `auto`, on GPU
    # actors when the cluster has GPUs now; `gpu`, GPU actors even when no GPU node is up yet (an autoscaling
    # cluster whose GPU type scales from 0 starts one); `cpu`, always CPU actors.
    accelerator: Literal["auto", "gpu", "cpu"] = "auto"

    @field_validator("embed_actors", mode="before")
    @classmethod
    def _actors_or_auto(cls, v):
        if isinstance(v, str) and v.strip().isdigit():  # "4" from an environment or a flag
            v = int(v)
        if v == "auto" or (isinstance(v, int) and not isinstance(v, bool) and v >= 1):
            return v
        raise ValueError("must be an integer >= 1 or 'auto'")


# ----------------------------------------------------------------------------------------------------- model
class TinyUNetSettings(_Section):
    sample_size: int = 32
    in_channels: int = 3
    out_channels: int = 3
    block_out_channels: tuple[int, ...] = (32, 64)
    layers_per_block: int = 1
    cross_attention_dim: int = 384
    attention_head_dim: int = 8
    norm_num_groups: int = 8


class ModelConfig(_Section):
    # A diffusers folder (pipeline folder with unet/ [+ vae/, scheduler/, text_encoder/] or a bare unet
    # folder), local or s3://. None: build the tiny UNet below from ``seed``.
    pretrained: str | None = None
    tiny: TinyUNetSettings = Field(default_factory=TinyUNetSettings)
    seed: int = 0
    # None: the pretrained folder's vae/ when it has one, else none (pixel space). See pyoco.pretrained.
    vae: str | None = None
    # "minilm" or a folder with text_encoder/ + tokenizer/. None: the pretrained folder's text_encoder/ when
    # it has one, else MiniLM (pyoco.pretrained.resolve_pretrained; pyoco.text.load_text_encoder(None) is
    # MiniLM).
    text_encoder: str | None = None
    text_max_length: int = Field(32, ge=1)
    train_layers: Literal["temporal", "all"] = "temporal"
    gradient_checkpointing: bool = False
    motion_max_seq_length: int = Field(32, ge=1)
    # Heads of each inflated motion module's temporal attention; must divide every block_out_channels entry.
    # 1 is ~2x faster than 8 on CPU at 16-32 channels.
    motion_num_attention_heads: int = Field(8, ge=1)
    # pyoco's own layers after every motion module (pyoco.branch): "caption-conv" is a caption-conditioned,
    # position-aware 3-D convolution, zero-initialised. None: the inflated model has none, and a pretrained
    # video model keeps whatever it has; set, a pretrained video model must have this branch.
    motion_branch: Literal["caption-conv"] | None = None
    cache_dir: str | None = None


# -------------------------------------------------------------------------------------------------- training
class TrainConfig(_Section):
    data: str | None = None  # clips folder (preprocess output); default: preprocess.output
    output: str | None = None  # where consolidated weights go; default: {workflow output}/model
    storage_path: str | None = None  # Ray Train storage (local or s3://); default: {workflow output}/ray
    num_workers: int = Field(2, ge=1)
    use_gpu: bool = False
    resources_per_worker: dict[str, float] = Field(default_factory=lambda: {"CPU": 1})
    zero_stage: Literal[0, 1, 2, 3] = 2
    batch_size_per_worker: int = Field(2, ge=1)
    grad_accum_steps: int = Field(1, ge=1)
    lr: float = Field(1e-4, gt=0)
    # The inflated motion modules' LR is lr x this: they start at zero (identity) while the spatial layers are
    # pretrained, so they can take a larger step without the image model forgetting what it draws.
    motion_lr_multiplier: float = Field(1.0, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = Field(0, ge=0)
    lr_schedule: Literal["constant", "linear", "cosine"] = "cosine"
    max_steps: int | None = Field(20, ge=1)
    epochs: int | None = Field(None, ge=1)
    grad_clip: float | None = Field(1.0, gt=0)
    ema_decay: float | None = Field(0.999, gt=0, lt=1)
    caption_dropout: float = Field(0.1, ge=0, le=1)
    min_snr_gamma: float | None = Field(None, gt=0)
    # Training timesteps drawn with density proportional to t^(power - 1): 1 uniform; 3 (t^2) puts more of the
    # training at high noise, where the caption alone says where the shape goes (README: frame order).
    timestep_power: float = Field(1.0, gt=0)
    prediction_type: Literal["epsilon", "v_prediction"] | None = None  # None: from the scheduler config
    num_train_timesteps: int = Field(1000, ge=1)
    shuffle_buffer: int = Field(64, ge=0)
    checkpoint_every: int = Field(10, ge=1)
    num_to_keep: int = Field(2, ge=1)
    max_failures: int = Field(0, ge=-1)
    log_every: int = Field(1, ge=1)
    sample_every: int | None = Field(None, ge=1)
    sample_prompts: list[str] = Field(default_factory=lambda: ["a red circle moves to the left"])
    sample_seeds: list[int] = Field(default_factory=lambda: [0])
    sample_steps: int = Field(10, ge=1)
    seed: int = 0
    image_pretrain: bool = False  # T = 1, iid prior, 2-D UNet (``pyoco pretrain-image``)
    # Ray Train run name under storage_path; re-running with the same name resumes from its latest
    # checkpoint. None: "{name}-train" ("{name}-pretrain-image" for image pretraining).
    run_name: str | None = None
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 on GPU, fp32 on CPU
    sample_guidance: float = Field(3.0, ge=1.0)
    system_metrics_interval_s: float = Field(10.0, gt=0)

    @model_validator(mode="before")
    @classmethod
    def _epochs_replace_default_steps(cls, data: Any) -> Any:
        # max_steps has a default (20); giving epochs alone means "stop after these epochs", not "whichever
        # comes first", so the default must not apply.
        if isinstance(data, dict) and data.get("epochs") is not None and "max_steps" not in data:
            data = {**data, "max_steps": None}
        return data

    @model_validator(mode="after")
    def _one_stop(self) -> TrainConfig:
        if self.max_steps is None and self.epochs is None:
            raise ValueError("set max_steps or epochs (both are empty)")
        if self.max_steps is not None and self.epochs is not None:
            raise ValueError(
                f"set max_steps or epochs, not both (got max_steps {self.max_steps}, epochs {self.epochs})"
            )
        return self


class PretrainConfig(TrainConfig):
    """``pyoco pretrain-image``: same loop, T = 1, iid prior, 2-D UNet."""

    image_pretrain: bool = True
    zero_stage: Literal[0, 1, 2, 3] = 0
    num_workers: int = Field(1, ge=1)


# --------------------------------------------------------------------------------------------- evaluate etc.
class EvaluateConfig(_Section):
    """``pyoco evaluate``: metrics on the val split (see pipelines/evaluate/step.py for each one)."""

    num_clips: int = Field(16, ge=1)  # val clips (smallest clip ids) for val_loss
    seed: int = 0
    timesteps: list[int] = Field(default_factory=lambda: [50, 250, 500, 750, 950])
    # generated videos, prompted with the val clips' captions in clip-id order (cycled); None: as many
    # as there are val clips, at least 64. FVD refuses fewer than 32.
    num_videos: int | None = Field(None, ge=1)
    sample_steps: int = Field(10, ge=1)
    sample_batch_size: int = Field(16, ge=1)
    guidance: float = 3.0
    # DDIM's eta: 0 is deterministic DDIM, 1 re-draws part of the noise at every step (from the prior, on each
    # video's own seeded stream, so the videos stay reproducible).
    eta: float = Field(0.0, ge=0)
    evaluator: str | None = None  # TorchScript evaluator (pyoco evaluator train, or a user's I3D)
    num_bootstrap: int = Field(200, ge=10)
    output: str | None = None
    # True: the loss, sampling and scoring run in a one-GPU Ray task (pipelines.gpu); an error when the
    # cluster has no GPU. False: in the evaluating process, on its CPU.
    use_gpu: bool = False


class MlflowConfig(_Section):
    tracking_uri: str | None = None  # None: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db
    experiment: str = "pyoco"
    registered_model: str = "pyoco-video"
    system_metrics: bool = True


class PromoteConfig(_Section):
    # None: fvd when evaluate.evaluator is set, else val_loss (see pipelines.registry.register.default_gate)
    metric: str | None = None
    mode: Literal["min", "max"] | None = None  # None: min
    min_improvement: float = Field(0.0, ge=0)  # the margin is max(this, the challenger's CI half-width)
    # When the champion was evaluated on other eval data: evaluate it on the challenger's before comparing.
    reevaluate: bool = False


class RayConfig(_Section):
    address: str | None = None  # None: $RAY_ADDRESS, else an embedded local Ray


class SampleConfig(_Section):
    prompt: str = "a red circle moves to the left"
    num_frames: int = Field(8, ge=1)
    steps: int = Field(20, ge=1)
    guidance: float = 3.0
    eta: float = Field(0.0, ge=0)  # as evaluate.eta
    seed: int = 0
    fps: int = Field(8, ge=1)


# -------------------------------------------------------------------------------------------------- workflow
class EvaluatorConfig(_Section):
    """``pyoco run`` trains the learned evaluator (``pyoco evaluator train``) on the preprocessed clips when
    this section is set and ``evaluate.evaluator`` is not; evaluate and the promotion gate then use it."""

    labels: list[str] | None = None  # default: the clips' categorical labels
    # 600 steps at lr 2e-3: at 5e-3 (the old default) 2 of 3 seeds never learned direction or speed on the
    # demo's clips (held-out 0.35-0.42, chance 0.25); at 2e-3 every one of 4 seeds read colour, direction
    # and speed at 1.0 (300 steps left colour at 0.73-0.81 for 3 of 7 seeds).
    steps: int = Field(600, ge=1)
    lr: float = Field(2e-3, gt=0)
    size: int = Field(16, ge=4)
    seed: int = 0
    output: str | None = None  # default {output}/evaluator


class PyocoConfig(_Section):
    name: str = "pyoco"
    output: str = "./pyoco-out"
    seed: int = 0
    ray: RayConfig = Field(default_factory=RayConfig)
    synth: SynthConfig | None = None
    pretrain: PretrainConfig | None = None
    preprocess: PreprocessConfig | None = None
    model: ModelConfig = Field(default_factory=ModelConfig)
    noise: NoiseConfig = Field(default_factory=NoiseConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)
    evaluator: EvaluatorConfig | None = None
    mlflow: MlflowConfig = Field(default_factory=MlflowConfig)
    promote: PromoteConfig = Field(default_factory=PromoteConfig)
    sample: SampleConfig = Field(default_factory=SampleConfig)

    def hash(self) -> str:
        return config_hash(self.model_dump(mode="json"))


# ------------------------------------------------------------------------------------------------- functions
def config_hash(data: Any) -> str:
    """Stable short hash of JSON-able data (sorted keys)."""
    blob = json.dumps(data, sort_keys=True, separators=(",", ":"), default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def _format_validation_error(source: str, err: ValidationError) -> str:
    parts = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "<root>"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown field"
        elif "input" in e and not isinstance(e["input"], dict | list):
            msg = f"{msg} (got {e['input']!r})"
        parts.append(f"{loc}: {msg}")
    return f"{source}: " + "; ".join(parts)


def set_dotted(data: dict, dotted: str, value: Any) -> None:
    """``set_dotted(d, "train.lr", 1e-3)`` creating intermediate dicts as needed."""
    keys = dotted.split(".")
    cur = data
    for k in keys[:-1]:
        nxt = cur.get(k)
        if not isinstance(nxt, dict):
            nxt = {}
            cur[k] = nxt
        cur = nxt
    cur[keys[-1]] = value


# ``scheme://userinfo@``: credentials (or a token posing as a user name) inside a URI.
URI_USERINFO = re.compile(r"([A-Za-z][A-Za-z0-9+.\-]*://)[^/\s@'\"<>]+@")


def _credential_uri_fields(data: Any, prefix: str = "") -> list[str]:
    """Dotted names of the string values (in nested dicts and lists) that embed ``user[:password]@``."""
    if isinstance(data, dict):
        return [
            f
            for k, v in data.items()
            for f in _credential_uri_fields(v, f"{prefix}.{k}" if prefix else str(k))
        ]
    if isinstance(data, list | tuple):
        return [f for i, v in enumerate(data) for f in _credential_uri_fields(v, f"{prefix}[{i}]")]
    return [prefix or "<root>"] if isinstance(data, str) and URI_USERINFO.search(data) else []


def check_no_credential_uris(data: Any, source: str = "<config>") -> None:
    """Refuse a config whose URIs carry credentials: they would end up in MLflow params, the resolved-config
    artifact, job packages and logs. The value is never echoed."""
    found = _credential_uri_fields(data)
    if found:
        raise ConfigError(
            f"{source}: {', '.join(found)}: URI embeds credentials (user[:password]@host); remove them and "
            "set them in the environment instead (MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD or "
            "MLFLOW_TRACKING_TOKEN for MLflow, AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY for s3://)"
        )


def parse_config(data: dict | None, *, source: str = "<config>", model: type[BaseModel] = PyocoConfig):
    """Validate a dict into ``model``; raise ConfigError naming the source and field."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: top level must be a mapping (got {type(data).__name__})")
    check_no_credential_uris(data, source)
    try:
        return model.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_validation_error(source, err)) from None


def read_yaml(path: str | Path) -> dict:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p}: config file not found")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{p}:{where} invalid YAML ({getattr(err, 'problem', err)})") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{p}: not UTF-8 text") from None
    return data if data is not None else {}


def load_config(
    path: str | Path | None,
    overrides: dict[str, Any] | None = None,
    *,
    model: type[BaseModel] = PyocoConfig,
):
    """Read YAML (or start from defaults when ``path`` is None), apply dotted overrides, validate."""
    data = read_yaml(path) if path is not None else {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    for k, v in (overrides or {}).items():
        if v is not None:
            set_dotted(data, k, v)
    return parse_config(data, source=str(path) if path is not None else "<config>", model=model)


def is_secret_key(key: str) -> bool:
    k = key.lower()
    return any(m in k for m in SECRET_KEY_MARKERS)


def flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    """Flatten nested dicts to ``{"train.lr": 1e-4, ...}``; lists become JSON strings."""
    out: dict[str, Any] = {}
    if isinstance(data, BaseModel):
        data = data.model_dump(mode="json")
    if isinstance(data, dict):
        for k, v in data.items():
            key = f"{prefix}.{k}" if prefix else str(k)
            out.update(flatten(v, key))
    elif isinstance(data, list | tuple):
        out[prefix] = json.dumps(list(data), default=str)
    else:
        out[prefix] = data
    return out


def redact(data: Any) -> Any:
    """Copy of nested data with values under secret-looking keys replaced by ``"***"``."""
    if isinstance(data, BaseModel):
        data = data.model_dump(mode="json")
    if isinstance(data, dict):
        return {k: ("***" if is_secret_key(str(k)) and v is not None else redact(v)) for k, v in data.items()}
    if isinstance(data, list):
        return [redact(v) for v in data]
    return data
