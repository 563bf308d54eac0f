"""A small learned video evaluator: a (2+1)-D convolutional classifier with one head per label.

It plays the role the paper's I3D (trained on UCF-101) plays for IS and FVD, on our own data: it learns
the real clips' ``labels`` (e.g. the synth ground truth ``shape``/``color``/``direction``/``speed``) and
its penultimate activations are the FVD features.

    model = VideoClassifier({"color": [...], "direction": [...]}, num_frames=8, size=32)
    out = model(x)   # {"features": (B, D), "logits_color": (B, 7), "logits_direction": (B, 4)}

Input layouts (both accepted by ``forward``, at any size; the module resizes to its own input size
``(num_frames, size, size)`` by trilinear interpolation):

    uint8   (B, T, H, W, 3)            what the clips store and the sampler returns
    float32 (B, 3, T, H, W) in [-1, 1]  the model layout

Architecture. The three RGB channels are joined by three frame-difference channels
(x[t] - x[t-1], zero for t = 0), so motion is visible to the first layer. Then three (2+1)-D blocks
(Tran et al. 2018: a 1x3x3 spatial conv, then a 3x1x1 temporal conv, each with GroupNorm and ReLU,
spatial stride 2 after the first block), global average pooling, and a linear layer to the features
(ReLU). Each label has a linear head on the features.

Augmentation (training only) never changes a label: a random translation of the whole clip (the same
for every frame, edge padding), which keeps the direction of motion. Flips and time reversal are not
used: they would turn left into right.

Exported as TorchScript (``export``): ``forward(x) -> Dict[str, Tensor]`` and ``features(x)``, with a
JSON next to it (:data:`META_NAME`) holding the label vocabularies, the input size and layout, the
training-data hash and the held-out accuracy. :func:`load_evaluator` loads ours or a user's TorchScript
network (see :class:`Evaluator` for that contract).

Over 400 lines because the classifier, its training loop and its TorchScript export and loader are
one file format that has to change in step.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pyoco.errors import InputError

MODEL_NAME = "evaluator.pt"
META_NAME = "evaluator.json"
FORMAT = "pyoco-evaluator/1"
INPUT_LAYOUT = (
    "uint8 (B, T, H, W, 3) or float32 (B, 3, T, H, W) in [-1, 1], any T/H/W: resized inside the module "
    "(trilinear) to (num_frames, height, width)"
)


# ------------------------------------------------------------------------------------------------- model
class _Block(nn.Module):
    """(2+1)-D: spatial 1x3x3 conv (stride s) -> GN -> ReLU -> temporal 3x1x1 conv -> GN -> ReLU."""

    def __init__(self, c_in: int, c_out: int, stride: int, norm: bool = True):
        super().__init__()
        self.spatial = nn.Conv3d(c_in, c_out, (1, 3, 3), stride=(1, stride, stride), padding=(0, 1, 1))
        self.norm1 = nn.GroupNorm(4, c_out) if norm else nn.Identity()
        self.temporal = nn.Conv3d(c_out, c_out, (3, 1, 1), padding=(1, 0, 0))
        self.norm2 = nn.GroupNorm(4, c_out) if norm else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.norm1(self.spatial(x)))
        return F.relu(self.norm2(self.temporal(x)))


class VideoClassifier(nn.Module):
    """Multi-head (2+1)-D video classifier. ``labels`` maps each label name to its class names."""

    def __init__(
        self,
        labels: Mapping[str, Sequence[str]],
        *,
        num_frames: int,
        size: int,
        widths: Sequence[int] = (16, 32, 64),
        feature_dim: int = 64,
    ):
        super().__init__()
        if not labels:
            raise ValueError("VideoClassifier needs at least one label")
        self.label_names = [str(k) for k in labels]
        self.num_classes = [len(v) for v in labels.values()]
        self.num_frames = int(num_frames)
        self.size = int(size)
        self.feature_dim = int(feature_dim)
        blocks = []
        c = 6  # RGB + frame differences
        for i, w in enumerate(widths):
            blocks.append(_Block(c, int(w), 1 if i == 0 else 2))
            c = int(w)
        self.blocks = nn.Sequential(*blocks)
        # a per-pixel colour branch (1x1x1 conv, no normalisation: GroupNorm's per-clip statistics wash out
        # absolute colour), max- and mean-pooled like the conv features
        self.colour = nn.Conv3d(3, 16, 1)
        self.proj = nn.Linear(2 * c + 32, self.feature_dim)
        self.heads = nn.ModuleList([nn.Linear(self.feature_dim, k) for k in self.num_classes])

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        """Either input layout -> float32 (B, 3, num_frames, size, size) in [-1, 1]."""
        if x.dtype == torch.uint8:
            x = x.permute(0, 4, 1, 2, 3).to(torch.float32) / 127.5 - 1.0
        else:
            x = x.to(torch.float32)
        if x.shape[2] != self.num_frames or x.shape[3] != self.size or x.shape[4] != self.size:
            x = F.interpolate(
                x, size=[self.num_frames, self.size, self.size], mode="trilinear", align_corners=False
            )
        return x

    def _features(self, x: torch.Tensor) -> torch.Tensor:
        diff = torch.cat([torch.zeros_like(x[:, :, :1]), x[:, :, 1:] - x[:, :, :-1]], dim=2)
        h = self.blocks(torch.cat([x, diff], dim=1))
        c = F.relu(self.colour(x))
        # mean and max over (T, H, W): the max keeps small objects (a shape on a large background) visible
        pooled = torch.cat(
            [h.mean(dim=(2, 3, 4)), h.amax(dim=(2, 3, 4)), c.mean(dim=(2, 3, 4)), c.amax(dim=(2, 3, 4))],
            dim=1,
        )
        return F.relu(self.proj(pooled))

    @torch.jit.export
    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate features (B, feature_dim): what FVD compares."""
        return self._features(self.prepare(x))

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        f = self._features(self.prepare(x))
        out: dict[str, torch.Tensor] = {"features": f}
        for i, head in enumerate(self.heads):
            out["logits_" + self.label_names[i]] = head(f)
        return out


# ------------------------------------------------------------------------------------------------- data
def encode_labels(
    labels: Sequence[Mapping[str, Any]], names: Sequence[str], vocab: Mapping[str, Sequence[str]]
) -> np.ndarray:
    """(N, len(names)) int64 class indices; -1 where a clip lacks the label or has a value not in vocab."""
    out = np.full((len(labels), len(names)), -1, dtype=np.int64)
    for j, name in enumerate(names):
        index = {v: i for i, v in enumerate(vocab[name])}
        for i, lab in enumerate(labels):
            value = lab.get(name)
            if value is not None and str(value) in index:
                out[i, j] = index[str(value)]
    return out


def categorical_labels(labels: Sequence[Mapping[str, Any]]) -> list[str]:
    """The label names worth learning by default: string (or int/bool) values with 2 to max(2, N // 4)
    distinct values over the clips (so ids and captions, unique per clip, are left out)."""
    values: dict[str, set[str]] = {}
    for lab in labels:
        for k, v in lab.items():
            if isinstance(v, str | int | bool) and not isinstance(v, float):
                values.setdefault(k, set()).add(str(v))
    limit = max(2, len(labels) // 4)
    return sorted(k for k, vs in values.items() if 2 <= len(vs) <= limit)


def build_vocab(labels: Sequence[Mapping[str, Any]], names: Sequence[str]) -> dict[str, list[str]]:
    """{name: sorted distinct values} over ``labels`` (the training clips)."""
    vocab = {}
    for name in names:
        vocab[name] = sorted({str(lab[name]) for lab in labels if lab.get(name) is not None})
    return vocab


def to_model_input(frames: np.ndarray, *, num_frames: int, size: int, batch: int = 64) -> torch.Tensor:
    """uint8 (N, T, H, W, 3) -> float32 (N, 3, num_frames, size, size) in [-1, 1] (resized once)."""
    out = []
    for i in range(0, len(frames), batch):
        x = torch.from_numpy(np.ascontiguousarray(frames[i : i + batch])).permute(0, 4, 1, 2, 3).float()
        x = x / 127.5 - 1.0
        if tuple(x.shape[2:]) != (num_frames, size, size):
            x = F.interpolate(x, size=[num_frames, size, size], mode="trilinear", align_corners=False)
        out.append(x)
    return torch.cat(out) if out else torch.zeros((0, 3, num_frames, size, size))


def _translate(x: torch.Tensor, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    """Shift each clip by a random (dy, dx) in [-max_shift, max_shift], the same for all its frames."""
    if max_shift <= 0:
        return x
    b, _, _, h, w = x.shape
    p = max_shift
    padded = F.pad(x.flatten(1, 2), (p, p, p, p), mode="replicate").view(
        b, x.shape[1], x.shape[2], h + 2 * p, -1
    )
    shifts = torch.randint(0, 2 * p + 1, (b, 2), generator=generator)
    return torch.stack(
        [padded[i, :, :, int(s[0]) : int(s[0]) + h, int(s[1]) : int(s[1]) + w] for i, s in enumerate(shifts)]
    )


# ---------------------------------------------------------------------------------------------- training
@dataclass
class TrainSettings:
    steps: int = 300
    batch_size: int = 16
    lr: float = 3e-3
    weight_decay: float = 1e-4
    max_shift_frac: float = 0.125  # random translation, as a fraction of the input size
    seed: int = 0
    widths: tuple[int, ...] = (16, 32, 64)
    feature_dim: int = 64


@dataclass
class TrainResult:
    model: VideoClassifier
    vocab: dict[str, list[str]]
    train_accuracy: dict[str, float]
    heldout_accuracy: dict[str, float | None]
    heldout_counts: dict[str, int]
    final_loss: float
    seconds: float
    settings: TrainSettings
    losses: list[float] = field(default_factory=list)


@torch.no_grad()
def accuracy(model: VideoClassifier, x: torch.Tensor, y: np.ndarray, batch: int = 64) -> tuple[dict, dict]:
    """({label: accuracy or None}, {label: clips counted}) of ``model`` on inputs x with targets y (-1 skip)."""
    model.eval()
    preds = {name: [] for name in model.label_names}
    for i in range(0, len(x), batch):
        out = model(x[i : i + batch])
        for name in model.label_names:
            preds[name].append(out["logits_" + name].argmax(dim=1))
    acc: dict[str, float | None] = {}
    counts: dict[str, int] = {}
    for j, name in enumerate(model.label_names):
        p = torch.cat(preds[name]).numpy() if len(x) else np.zeros(0, np.int64)
        keep = y[:, j] >= 0
        counts[name] = int(keep.sum())
        acc[name] = float((p[keep] == y[keep, j]).mean()) if keep.any() else None
    return acc, counts


def train_classifier(
    train_frames: np.ndarray,
    train_labels: Sequence[Mapping[str, Any]],
    val_frames: np.ndarray,
    val_labels: Sequence[Mapping[str, Any]],
    names: Sequence[str],
    *,
    num_frames: int,
    size: int,
    settings: TrainSettings | None = None,
    progress: Callable[[int, int, float], None] | None = None,
) -> TrainResult:
    """Fit a :class:`VideoClassifier` on uint8 clips (N, T, H, W, 3) with label dicts; score on val.

    Deterministic for the same inputs and ``settings.seed`` (one torch generator for init, batches and
    augmentation; single-threaded CPU kernels).
    """
    s = settings or TrainSettings()
    t0 = time.perf_counter()
    vocab = build_vocab(train_labels, names)
    y_train = encode_labels(train_labels, names, vocab)
    y_val = encode_labels(val_labels, names, vocab)
    x_train = to_model_input(train_frames, num_frames=num_frames, size=size)
    x_val = to_model_input(val_frames, num_frames=num_frames, size=size)
    torch.manual_seed(s.seed)  # parameter init
    model = VideoClassifier(
        vocab, num_frames=num_frames, size=size, widths=s.widths, feature_dim=s.feature_dim
    )
    gen = torch.Generator().manual_seed(s.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=s.lr, weight_decay=s.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda k: min(1.0, (k + 1) / 10) * 0.5 * (1 + math.cos(math.pi * min(k, s.steps) / s.steps))
    )
    targets = torch.from_numpy(y_train)
    max_shift = int(round(s.max_shift_frac * size))
    n = len(x_train)
    losses: list[float] = []
    order = torch.randperm(n, generator=gen)
    pos = 0
    model.train()
    for step in range(s.steps):
        if pos + s.batch_size > n:  # epoch boundary: a fresh permutation
            order, pos = torch.randperm(n, generator=gen), 0
        idx = order[pos : pos + min(s.batch_size, n)]
        pos += len(idx)
        xb = _translate(x_train[idx], max_shift, gen)
        out = model(xb)
        loss = sum(
            F.cross_entropy(out["logits_" + name], targets[idx, j], ignore_index=-1)
            for j, name in enumerate(model.label_names)
            if bool((targets[idx, j] >= 0).any())
        )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
        if progress is not None:
            progress(step + 1, s.steps, losses[-1])
    train_acc, _ = accuracy(model, x_train, y_train)
    held, counts = accuracy(model, x_val, y_val)
    model.eval()
    return TrainResult(
        model=model,
        vocab=vocab,
        train_accuracy={k: v for k, v in train_acc.items() if v is not None},
        heldout_accuracy=held,
        heldout_counts=counts,
        final_loss=float(np.mean(losses[-10:])) if losses else float("nan"),
        seconds=time.perf_counter() - t0,
        settings=s,
        losses=losses,
    )


def export(model: VideoClassifier, out_dir: str | Path, meta: Mapping[str, Any]) -> Path:
    """Write ``out_dir/evaluator.pt`` (TorchScript) and ``out_dir/evaluator.json``; returns the .pt path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    scripted = torch.jit.script(model.eval())
    path = out / MODEL_NAME
    scripted.save(str(path))
    full = {
        "format": FORMAT,
        "labels": {name: list(v) for name, v in meta["labels"].items()},
        "input": {
            "layout": INPUT_LAYOUT,
            "num_frames": model.num_frames,
            "height": model.size,
            "width": model.size,
        },
        "outputs": {
            "forward": "Dict[str, Tensor]: 'features' (B, D) and 'logits_<label>' (B, K) per label",
            "features": "method features(x) -> (B, D), the penultimate activations used for FVD",
            "feature_dim": model.feature_dim,
        },
        **{k: v for k, v in meta.items() if k != "labels"},
    }
    (out / META_NAME).write_text(json.dumps(full, indent=2, sort_keys=True))
    return path


# --------------------------------------------------------------------------------------------- loading
class Evaluator:
    """A TorchScript video network used for FVD (features) and, when it has class heads, prompt accuracy.

    Contract for a user's network (e.g. an I3D export):
    - ``forward(x)`` takes float32 (B, 3, T, H, W) in [-1, 1]; if the JSON next to it gives
      ``input.num_frames/height/width`` and the module does not resize itself, set ``input.resize: true``
      there and we resize (trilinear) before calling it;
    - it returns a (B, D) feature tensor (anything with B leading is flattened; the first element of a
      tuple), or a ``Dict[str, Tensor]`` with ``"features"`` and ``"logits_<label>"`` entries;
    - class heads need their vocabularies in the JSON (``labels: {name: [class names]}``), otherwise only
      FVD is available. The StyleGAN-V I3D export's ``rescale``/``resize``/``return_features`` keyword
      arguments are passed when its ``forward`` declares them (features, not logits).
    The JSON is ``evaluator.json`` next to ``evaluator.pt``, or ``<file>.json`` for any other file name.
    """

    STYLEGAN_V_KWARGS = {"rescale": False, "resize": True, "return_features": True}

    def __init__(self, module: torch.jit.ScriptModule, path: str, meta: dict[str, Any], batch_size: int = 32):
        self.module = module
        self.path = path
        self.meta = meta
        self.batch_size = batch_size
        self.labels: dict[str, list[str]] = {k: list(v) for k, v in (meta.get("labels") or {}).items()}
        inp = meta.get("input") or {}
        self.resize_to = (
            (int(inp["num_frames"]), int(inp["height"]), int(inp["width"])) if inp.get("resize") else None
        )
        try:
            names = {a.name for a in module.forward.schema.arguments}
        except (AttributeError, RuntimeError):
            names = set()
        self.kwargs = {k: v for k, v in self.STYLEGAN_V_KWARGS.items() if k in names}

    @torch.no_grad()
    def run(self, videos: np.ndarray | torch.Tensor) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """uint8 videos (N, T, H, W, 3) -> (features (N, D) float64, {label: probabilities (N, K)})."""
        v = torch.as_tensor(videos)
        if v.dtype != torch.uint8 or v.ndim != 5 or v.shape[-1] != 3:
            raise ValueError(f"expected uint8 videos (N, T, H, W, 3) (got {v.dtype} {tuple(v.shape)})")
        feats, probs = [], {name: [] for name in self.labels}
        for i in range(0, v.shape[0], self.batch_size):
            x = v[i : i + self.batch_size].permute(0, 4, 1, 2, 3).to(torch.float32).div(127.5).sub(1.0)
            if self.resize_to is not None and tuple(x.shape[2:]) != self.resize_to:
                x = F.interpolate(x, size=list(self.resize_to), mode="trilinear", align_corners=False)
            out = self.module(x.contiguous(), **self.kwargs)
            if isinstance(out, dict):
                if "features" not in out:
                    raise InputError(f"{self.path}: forward returned a dict without 'features'")
                for name in self.labels:
                    key = "logits_" + name
                    if key not in out:
                        raise InputError(f"{self.path}: forward returned no {key!r} for label {name!r}")
                    if out[key].shape[-1] != len(self.labels[name]):
                        raise ValueError(
                            f"{self.path}: {key} has {out[key].shape[-1]} classes, the JSON lists "
                            f"{len(self.labels[name])}"
                        )
                    probs[name].append(out[key].double().softmax(dim=-1).cpu())
                out = out["features"]
            elif isinstance(out, tuple | list):
                out = out[0]
            if not isinstance(out, torch.Tensor):
                raise InputError(f"{self.path}: evaluator returned {type(out).__name__}, expected a tensor")
            feats.append(out.detach().to(torch.float64).reshape(out.shape[0], -1).cpu())
        return torch.cat(feats).numpy(), {k: torch.cat(p).numpy() for k, p in probs.items() if p}

    def features(self, videos: np.ndarray | torch.Tensor) -> np.ndarray:
        return self.run(videos)[0]

    __call__ = features


def evaluator_paths(path: str | Path) -> tuple[Path, Path]:
    """(TorchScript file, JSON) for a file or a folder holding ``evaluator.pt``."""
    p = Path(path)
    if p.is_dir():
        p = p / MODEL_NAME
    meta = p.with_name(META_NAME) if p.name == MODEL_NAME else p.with_name(p.name + ".json")
    return p, meta


def load_evaluator(path: str | Path, *, batch_size: int = 32) -> Evaluator:
    """Load a TorchScript evaluator (ours, from ``pyoco evaluator train``, or a user's; see :class:`Evaluator`)."""
    p, meta_path = evaluator_paths(path)
    if not p.is_file():
        raise FileNotFoundError(f"{p}: evaluator not found (expected a TorchScript .pt file or its folder)")
    try:
        module = torch.jit.load(str(p), map_location="cpu")
    except Exception as err:  # torch raises RuntimeError / ValueError / zipfile errors for non-TorchScript
        raise InputError(f"{p}: not a TorchScript module ({type(err).__name__}: {str(err)[:200]})") from None
    module.eval()
    meta: dict[str, Any] = {}
    if meta_path.is_file():
        try:
            meta = json.loads(meta_path.read_text())
        except json.JSONDecodeError as err:
            raise InputError(f"{meta_path}: not valid JSON ({err.msg} at line {err.lineno})") from None
        if not isinstance(meta, dict) or not isinstance(meta.get("labels", {}), dict):
            raise InputError(f"{meta_path}: expected an object with a 'labels' object")
    return Evaluator(module, str(p), meta, batch_size=batch_size)
