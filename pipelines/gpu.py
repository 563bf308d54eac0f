"""Run one piece of work (evaluate's sampling and scoring, ``pyoco sample``) as a Ray task on a GPU node.

    result = run_on_gpu(fn, *args, setting="evaluate.use_gpu", address=cfg.ray.address, **kwargs)

``fn`` runs inside ``ray.remote(num_gpus=1)`` with ``device="cuda"`` added to its keyword arguments, and
what it returns comes back to the caller. Its arguments travel in Ray's control plane, so they must carry
no credentials (URIs never do; the task's process finds its own from the node's environment). When the
cluster has no GPU the caller gets one line naming ``setting``, never a task that waits forever for a GPU
that is not there.
"""

from __future__ import annotations

from typing import Any

from pipelines.common import PyocoError


def cluster_gpus() -> float:
    import ray

    return float(ray.cluster_resources().get("GPU", 0))


def run_on_gpu(fn, *args: Any, setting: str, address: str | None = None, **kwargs: Any) -> Any:
    """``fn(*args, device="cuda", **kwargs)`` in a one-GPU Ray task; see the module docstring."""
    import ray

    from pipelines.context import ensure_ray

    started = ensure_ray(address)
    try:
        have = cluster_gpus()
        if have < 1:
            cpus = float(ray.cluster_resources().get("CPU", 0))
            raise PyocoError(
                f"{setting}: this Ray cluster has no GPU ({cpus:g} CPUs, 0 GPUs); add a GPU node or "
                f"turn {setting} off to run on the CPU"
            )
        task = ray.remote(num_gpus=1, max_retries=0)(_on_device)
        try:
            return ray.get(task.remote(fn, args, kwargs))
        except ray.exceptions.RayTaskError as err:
            cause = err.cause
            if isinstance(cause, PyocoError):
                raise PyocoError(str(cause), exit_code=cause.exit_code) from None
            first = (str(cause).strip().splitlines() or [""])[0][:300]
            raise PyocoError(f"{setting}: the GPU task failed: {type(cause).__name__}: {first}") from None
    finally:
        if started:
            ray.shutdown()


def _on_device(fn, args: tuple, kwargs: dict) -> Any:
    import torch

    if not torch.cuda.is_available():  # Ray gave us a GPU that torch cannot see: a broken node, say so
        raise RuntimeError(
            f"Ray assigned GPU {ray_gpu_ids()} but torch.cuda.is_available() is False on this node"
        )
    return fn(*args, device="cuda", **kwargs)


def ray_gpu_ids() -> list:
    import ray

    return list(ray.get_gpu_ids())
