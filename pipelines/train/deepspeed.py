"""DeepSpeed for the training step: the config generated from the typed TrainConfig, the LR schedule, and the
process setup that lets DeepSpeed run on CPU workers (gloo) as well as GPUs (NCCL, bf16).

The generated config is the single description of the optimisation (logged to MLflow as
``deepspeed/ds_config.json``):

- ZeRO stage 0-3 (``train.zero_stage``); at stage 3 parameters, gradients and optimizer state are partitioned.
- precision: bf16 on GPU, fp32 on CPU (``train.precision: auto``); DeepSpeed keeps fp32 master weights for bf16.
- ``train_micro_batch_size_per_gpu`` = ``batch_size_per_worker``, ``gradient_accumulation_steps``, global
  ``train_batch_size`` = micro x accumulation x workers; gradient clipping by global norm.
- AdamW built by DeepSpeed as ``torch.optim.AdamW`` (``torch_adam: true``): works on CPU and GPU without
  compiling DeepSpeed's fused/CPU Adam kernels.

The LR schedule (linear warmup, then constant / linear / cosine decay to 0 at ``total_steps``) is a
``LambdaLR`` handed to ``deepspeed.initialize``; DeepSpeed steps it at every optimizer step and saves and
restores its position in checkpoints. Its shape is *not* restored from a checkpoint, so resuming with a larger
``max_steps`` stretches the decay instead of keeping the old end point.
"""

from __future__ import annotations

import math
import os
from typing import Any

from pyoco.config import TrainConfig
from pyoco.errors import InputError

ADAM_EPS = 1e-8


def use_bf16(train: TrainConfig) -> bool:
    """bf16 when asked, or on GPU with ``precision: auto``; fp32 otherwise (CPU has no fast bf16 path here)."""
    if train.precision == "auto":
        return bool(train.use_gpu)
    return train.precision == "bf16"


def deepspeed_config(train: TrainConfig, *, world_size: int) -> dict[str, Any]:
    """The DeepSpeed config dict for ``train`` on ``world_size`` data-parallel workers."""
    micro = int(train.batch_size_per_worker)
    accum = int(train.grad_accum_steps)
    zero: dict[str, Any] = {"stage": int(train.zero_stage)}
    if train.zero_stage >= 2:
        zero.update({"overlap_comm": False, "contiguous_gradients": True})
    if train.zero_stage == 3:
        # Weights are consolidated from the checkpoint (zero_to_fp32) at export, never gathered on save.
        zero["stage3_gather_16bit_weights_on_model_save"] = False
    return {
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": accum,
        "train_batch_size": micro * accum * int(world_size),
        "gradient_clipping": float(train.grad_clip) if train.grad_clip else 0.0,
        "optimizer": {
            "type": "AdamW",
            "params": {
                "lr": float(train.lr),
                "betas": [float(b) for b in train.betas],
                "eps": ADAM_EPS,
                "weight_decay": float(train.weight_decay),
                "torch_adam": True,
            },
        },
        "zero_optimization": zero,
        "bf16": {"enabled": use_bf16(train)},
        "fp16": {"enabled": False},
        "steps_per_print": 10**9,  # we log ourselves
        "wall_clock_breakdown": False,
        "dump_state": False,
    }


def lr_multiplier(step: int, *, warmup_steps: int, total_steps: int, kind: str) -> float:
    """LR factor for optimizer step ``step`` (0-based): linear warmup to 1 over ``warmup_steps``, then
    ``kind`` = constant (1), linear (to 0 at ``total_steps``) or cosine (half cosine to 0)."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if kind == "constant":
        return 1.0
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, max(0.0, (step - warmup_steps) / span))
    if kind == "linear":
        return 1.0 - progress
    if kind == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    raise InputError(f"unknown lr_schedule {kind!r}")


def param_groups(model, train: TrainConfig) -> list:
    """What ``deepspeed.initialize(model_parameters=...)`` gets for a :class:`pyoco.model.VideoDenoiser`: its
    trainable parameters, as today, or, with ``train.motion_lr_multiplier`` != 1, two AdamW groups: the
    spatial layers at ``lr`` and the motion modules at ``lr x motion_lr_multiplier``. The LR schedule scales
    both groups alike."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    motion_ids = {id(p) for p in model.motion_parameters() if p.requires_grad} if model.is_video else set()
    if train.motion_lr_multiplier == 1.0 or not motion_ids:
        return trainable
    groups = [
        {"params": [p for p in trainable if id(p) not in motion_ids]},
        {
            "params": [p for p in trainable if id(p) in motion_ids],
            "lr": float(train.lr) * float(train.motion_lr_multiplier),
        },
    ]
    return [g for g in groups if g["params"]]


def make_lr_scheduler(train: TrainConfig, total_steps: int):
    """``optimizer -> LambdaLR`` for ``deepspeed.initialize(lr_scheduler=...)``.

    The multiplier is a closure (not a callable object) on purpose: ``LambdaLR.state_dict`` then stores only
    the position, so a resumed run follows *its* config's schedule."""

    def build(optimizer):
        from torch.optim.lr_scheduler import LambdaLR

        warmup, kind = int(train.warmup_steps), str(train.lr_schedule)

        def factor(step: int) -> float:
            return lr_multiplier(step, warmup_steps=warmup, total_steps=total_steps, kind=kind)

        return LambdaLR(optimizer, factor)

    return build


def setup_deepspeed(use_gpu: bool, *, quiet: bool = True):
    """Import DeepSpeed for this worker's device and return the module (call before anything else imports it).

    On CPU: select DeepSpeed's CPU accelerator (``DS_ACCELERATOR=cpu``; its collectives then use the gloo
    process group that Ray Train created) and skip building DeepSpeed's shared-memory all-reduce extension:
    DeepSpeed JIT-compiles it (about a minute on a fresh machine) when its comm backend starts, and only its
    *inference* all-reduce uses it; training collectives go through torch.distributed/gloo either way.
    """
    if not use_gpu:
        os.environ["DS_ACCELERATOR"] = "cpu"
    import importlib
    import sys

    # DeepSpeed imports its Muon optimizer module during ZeRO setup only for `isinstance(opt, MuonWithAuxAdam)`
    # checks; that module applies torch.compile at import, which loads TorchInductor (4-10 s per worker start).
    # We always build AdamW, so a stand-in class (never instantiated, isinstance always False) is equivalent.
    name = "deepspeed.runtime.zero.muon.muon_optimizer"
    if name not in sys.modules:
        import types

        stub = types.ModuleType(name, "pyoco stand-in: Muon is not used (see pipelines/train/deepspeed.py)")
        stub.MuonWithAuxAdam = type("MuonWithAuxAdam", (), {})
        sys.modules[name] = stub
    import deepspeed

    if not use_gpu:
        # import_module, not `import deepspeed.comm.torch as m`: deepspeed.comm re-exports the name `torch`
        # (PyTorch itself), which that form would resolve to.
        ds_comm_torch = importlib.import_module("deepspeed.comm.torch")
        ds_comm_torch.build_shm_op = lambda: None
    if quiet:
        import logging

        from deepspeed.utils import logger as ds_logger

        ds_logger.setLevel(logging.WARNING)
    return deepspeed


# DeepSpeed classes its optimizer checkpoints hold (ZeRO 1-3 on CPU/fp32, checked by loading real checkpoints):
# plain data holders, rebuilt from their fields by torch's restricted unpickler, never called as code.
_SAFE_DS_GLOBALS = (
    ("deepspeed.runtime.fp16.loss_scaler", "LossScaler"),
    ("deepspeed.runtime.fp16.loss_scaler", "DynamicLossScaler"),
    ("deepspeed.runtime.zero.config", "ZeroStageEnum"),
    ("deepspeed.utils.tensor_fragment", "fragment_address"),
)


def _safe_ds_globals() -> list:
    import importlib

    out = []
    for module, name in _SAFE_DS_GLOBALS:
        try:
            out.append(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError):  # another DeepSpeed version: what it lacks it cannot have saved
            continue
    return out


def use_weights_only_loading(engine) -> None:
    """Make ``engine.load_checkpoint`` unpickle with ``torch.load(weights_only=True)``.

    DeepSpeed 0.19's ``load_checkpoint`` has no ``weights_only`` argument and its ``TorchCheckpointEngine``
    hard-codes ``weights_only=False``; every file it reads (model states, ZeRO optimizer shards) goes through
    ``engine.checkpoint_engine.load``, so that engine is replaced by one that loads with the restricted
    unpickler and a short allowlist of DeepSpeed's data classes. A checkpoint holding any other global is
    refused with a one-line error naming it, instead of running it."""
    import torch
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    current = getattr(engine, "checkpoint_engine", None)
    if current is None or type(current) is not TorchCheckpointEngine:
        return  # DeepSpeed's other engines (async/decoupled, Nebula) are not used by pyoco; leave them be

    safe = _safe_ds_globals()

    class WeightsOnlyCheckpointEngine(TorchCheckpointEngine):
        def load(self, path: str, map_location=None):
            try:
                with torch.serialization.safe_globals(safe):
                    return torch.load(path, map_location=map_location, weights_only=True)
            except Exception as err:  # torch's UnpicklingError names the refused global
                lines = [ln.strip() for ln in str(err).splitlines() if "GLOBAL" in ln or "Unsupported" in ln]
                why = lines[0][:300] if lines else f"{type(err).__name__}: {str(err)[:200]}"
                raise RuntimeError(f"{path}: refusing to unpickle DeepSpeed checkpoint ({why})") from None

    replacement = WeightsOnlyCheckpointEngine.__new__(WeightsOnlyCheckpointEngine)
    replacement.__dict__.update(current.__dict__)
    engine.checkpoint_engine = replacement
