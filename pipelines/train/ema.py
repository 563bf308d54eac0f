"""Exponential moving average of the trained weights that stays correct, and sharded, under ZeRO-3.

Each rank keeps the EMA of exactly what it holds of every trainable parameter, in fp32:

- ZeRO 0-2: the full parameter (``p.data``); every rank's EMA is identical, rank 0's is saved.
- ZeRO-3: its partition ``p.ds_tensor``, i.e. the contiguous slice ``[r * n, (r + 1) * n)`` of the flattened
  (and zero-padded) parameter; each rank saves its own slice and :func:`consolidate` concatenates them in rank
  order, as DeepSpeed's ``zero_to_fp32`` does for the weights. The EMA therefore costs 1/world of a model per
  rank, like the ZeRO-3 weights themselves, and never needs a gather during training.

Update after every optimizer step (diffusers' ``EMAModel`` schedule, so short runs are not dominated by the
initial weights):

    d_n = min(decay, (1 + n) / (10 + n))          n = number of updates so far
    ema <- d_n * ema + (1 - d_n) * theta

:meth:`ShardedEMA.swap` temporarily puts the EMA into the model (for sampling) and restores the trained weights
afterwards. Under ZeRO-3 "the model" is each rank's partition; persistent (small, always gathered) parameters
are re-partitioned, overwritten and gathered again, the same sequence DeepSpeed runs after its optimizer step.
With bf16 training the EMA is updated from the bf16 weights (the fp32 masters live inside the optimizer).

On disk (:func:`save_ema_state` / :func:`load_ema_state`) a rank's EMA is one safetensors file: the shadow tensors,
plus the scalars and full shapes as JSON in the file's metadata. Nothing is unpickled on load, so a checkpoint
bucket cannot smuggle code into the workers or the exporting driver.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
from torch import nn


def _is_zero3(p: torch.Tensor) -> bool:
    return hasattr(p, "ds_tensor") and p.ds_tensor is not None


def _local(p: nn.Parameter) -> torch.Tensor:
    """What this rank holds of ``p``: its ZeRO-3 partition, or the whole tensor."""
    return p.ds_tensor if _is_zero3(p) else p.data


def _full_shape(p: nn.Parameter) -> list[int]:
    return list(p.ds_shape) if _is_zero3(p) else list(p.shape)


class ShardedEMA:
    def __init__(self, named_params: Iterable[tuple[str, nn.Parameter]], decay: float, *, rank: int = 0):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"ema decay must be in (0, 1) (got {decay})")
        self.decay = float(decay)
        self.rank = int(rank)
        self.params = dict(named_params)
        if not self.params:
            raise ValueError("EMA needs at least one trainable parameter")
        self.zero3 = any(_is_zero3(p) for p in self.params.values())
        self.num_updates = 0
        with torch.no_grad():
            self.shadow = {n: _local(p).detach().float().clone() for n, p in self.params.items()}

    def current_decay(self) -> float:
        n = self.num_updates
        return min(self.decay, (1.0 + n) / (10.0 + n))

    @torch.no_grad()
    def update(self) -> None:
        d = self.current_decay()
        for name, p in self.params.items():
            # ema += (1 - d) * (theta - ema)  ==  d * ema + (1 - d) * theta
            self.shadow[name].lerp_(_local(p).float(), 1.0 - d)
        self.num_updates += 1

    # -- persistence ---------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            "decay": self.decay,
            "num_updates": self.num_updates,
            "zero3": self.zero3,
            "rank": self.rank,
            "shapes": {n: _full_shape(p) for n, p in self.params.items()},
            "shadow": {n: t.clone() for n, t in self.shadow.items()},
        }

    def load_state_dict(self, state: dict) -> None:
        missing = sorted(set(self.shadow) - set(state["shadow"]))
        extra = sorted(set(state["shadow"]) - set(self.shadow))
        if missing or extra:
            raise ValueError(
                f"EMA checkpoint does not match the trainable parameters (missing {missing[:3]}, "
                f"unexpected {extra[:3]})"
            )
        if bool(state["zero3"]) != self.zero3:
            raise ValueError("EMA checkpoint was saved with a different ZeRO stage (3 vs 0-2)")
        for n, t in state["shadow"].items():
            if t.shape != self.shadow[n].shape:
                raise ValueError(
                    f"EMA checkpoint shard for {n} has shape {tuple(t.shape)}, this rank holds "
                    f"{tuple(self.shadow[n].shape)} (resume with the same number of workers)"
                )
            self.shadow[n].copy_(t)
        self.num_updates = int(state["num_updates"])

    # -- use -----------------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def swap(self) -> Iterator[None]:
        """Within the block the model holds the EMA weights (on every rank; ZeRO-3 needs all ranks here)."""
        backup = self._write({n: t for n, t in self.shadow.items()}, keep=True)
        try:
            yield
        finally:
            self._write(backup, keep=False)

    @torch.no_grad()
    def _write(self, values: dict[str, torch.Tensor], *, keep: bool) -> dict[str, torch.Tensor]:
        params = list(self.params.items())
        persistent = []
        if self.zero3:
            from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

            persistent = [p for _, p in params if p.ds_status == ZeroParamStatus.AVAILABLE]
            if persistent:
                persistent[0].partition(param_list=persistent)  # free the gathered copies, keep partitions
        old = {}
        for n, p in params:
            local = _local(p)
            if keep:
                old[n] = local.detach().clone()
            local.copy_(values[n].to(local.dtype))
        if persistent:
            persistent[0].all_gather(param_list=persistent)  # re-gather from the new partitions
        return old


EMA_META_KEY = "pyoco_ema"


def ema_file(state_dir: str | Path, rank: int) -> Path:
    return Path(state_dir) / f"ema_rank{int(rank):03d}.safetensors"


def save_ema_state(state: dict, path: str | Path) -> None:
    """A :meth:`ShardedEMA.state_dict` as safetensors (shadow tensors) + JSON metadata (the rest)."""
    from safetensors.torch import save_file

    meta = {k: v for k, v in state.items() if k != "shadow"}
    save_file(
        {n: t.detach().contiguous().cpu() for n, t in state["shadow"].items()},
        str(path),
        metadata={EMA_META_KEY: json.dumps(meta)},
    )


def load_ema_state(path: str | Path) -> dict:
    """The state dict :func:`save_ema_state` wrote (no pickle involved)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt", device="cpu") as f:
        meta = (f.metadata() or {}).get(EMA_META_KEY)
        if meta is None:
            raise ValueError(f"{path}: not a pyoco EMA file (no {EMA_META_KEY!r} metadata)")
        shadow = {n: f.get_tensor(n) for n in f.keys()}  # noqa: SIM118 - safe_open has no __iter__
    return {**json.loads(meta), "shadow": shadow}


def load_ema_shards(state_dir: str | Path) -> list[dict]:
    """Every rank's EMA file in a checkpoint's state folder (one at ZeRO 0-2, one per rank at ZeRO-3)."""
    return [load_ema_state(f) for f in sorted(Path(state_dir).glob("ema_rank*.safetensors"))]


def consolidate(states: list[dict]) -> dict[str, torch.Tensor]:
    """Full fp32 EMA tensors from the per-rank :meth:`ShardedEMA.state_dict` s (any order)."""
    if not states:
        raise ValueError("no EMA states to consolidate")
    states = sorted(states, key=lambda s: s["rank"])
    first = states[0]
    if not first["zero3"]:
        return {n: t.reshape(first["shapes"][n]) for n, t in first["shadow"].items()}
    ranks = [s["rank"] for s in states]
    if ranks != list(range(len(states))):
        raise ValueError(f"ZeRO-3 EMA shards are incomplete: have ranks {ranks}")
    out = {}
    for n, shape in first["shapes"].items():
        flat = torch.cat([s["shadow"][n].reshape(-1) for s in states])
        numel = 1
        for d in shape:
            numel *= int(d)
        out[n] = flat[:numel].reshape(shape).clone()
    return out
