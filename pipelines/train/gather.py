"""The workers' side of the export: the whole model's fp32 weights, gathered across ranks at the end of
training, so that no process ever reads a merged checkpoint with every rank's optimizer shards.

:func:`gather_fp32_weights` is a collective: every rank calls it, rank 0 gets the state dict (the others
``None``). What it returns equals what DeepSpeed's ``zero_to_fp32`` consolidates from the checkpoint
(``tests/test_train_unit.py`` checks this under real ZeRO-2 and ZeRO-3), with the EMA in place of the trained
parameters when EMA is on:

- trainable parameters: the optimizer's fp32 master copy (``deepspeed.utils.safe_get_full_fp32_param``:
  an all-reduce at ZeRO 1-2, an all-gather of the partitions at ZeRO-3), or the parameter itself at stage 0;
- frozen parameters: the module's own, gathered one at a time under ZeRO-3 (``GatheredParameters``);
- buffers: the module's (never partitioned);
- EMA (:class:`pipelines.train.ema.ShardedEMA`): rank 0's full copy at ZeRO 0-2; at ZeRO-3 every rank's
  partition is gathered to rank 0 parameter by parameter and cut to the full shape, as
  :func:`pipelines.train.ema.consolidate` does from the files.

Parameters are gathered one at a time, so a rank holds at most one full parameter beyond its shards; only
rank 0 keeps the result (one fp32 copy of the model).
"""

from __future__ import annotations

import torch
from torch import nn


def _gather_to_rank0(local: torch.Tensor, rank: int, world: int) -> list[torch.Tensor] | None:
    import torch.distributed as dist

    parts = [torch.empty_like(local) for _ in range(world)] if rank == 0 else None
    dist.gather(local.contiguous(), parts, dst=0)
    return parts


@torch.no_grad()
def gather_fp32_weights(
    module: nn.Module, ema=None, *, zero_stage: int, rank: int, world: int
) -> dict | None:
    """The whole model's fp32 state dict on rank 0 (EMA weights for the trainable parameters when ``ema``
    is given), ``None`` on the other ranks. Every rank must call it (see the module docstring)."""
    from deepspeed.utils import safe_get_full_fp32_param

    keep = rank == 0
    out: dict[str, torch.Tensor] = {}
    names = set(module.state_dict().keys())  # persistent buffers only, as the package stores them
    replaced = set(ema.shadow) if ema is not None else set()
    for name, p in module.named_parameters():
        if name in replaced:  # the EMA below takes its place: no need to gather it
            continue
        full = safe_get_full_fp32_param(p) if p.requires_grad and zero_stage >= 1 else None
        if full is None and zero_stage >= 3 and hasattr(p, "ds_id"):
            import deepspeed

            with deepspeed.zero.GatheredParameters([p]):
                full = p.data.float().clone() if keep else None
        elif full is None:
            full = p.data
        if keep:
            out[name] = full.detach().float().cpu().clone()
    if keep:
        for name, b in module.named_buffers():
            if name in names:
                out[name] = b.detach().float().cpu().clone()
    if ema is not None:
        for name, shadow in ema.shadow.items():
            if not ema.zero3:
                if keep:
                    out[name] = shadow.detach().float().cpu().reshape(ema.params[name].shape).clone()
                continue
            parts = _gather_to_rank0(shadow, rank, world)
            if keep:
                shape = list(ema.params[name].ds_shape)
                numel = int(torch.Size(shape).numel())
                out[name] = torch.cat([t.reshape(-1) for t in parts])[:numel].reshape(shape).cpu().clone()
    return out if keep else None
