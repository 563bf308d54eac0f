"""Where each preprocess stage runs: Ray options of the tasks and actors, chosen from the cluster's resources.

Pure functions of the config and ``cluster`` (``ray.cluster_resources()``, read once by the driver), so the
choice is testable without a cluster or a GPU:

- decode, index and write tasks: CPUs, plus a tiny share of ``cfg.resource`` (the CPU-node label, default
  ``preprocess``) when some node offers it; never GPUs;
- caption-embedding and latents actors: on GPU actors when ``cfg.accelerator`` is ``auto`` and the cluster
  has GPUs (a quarter GPU per embedding actor, ``latent_num_gpus`` per latents actor; no CPU-node label, GPU
  nodes need not carry it), else CPU actors on the labelled CPU nodes. ``accelerator: cpu`` forces the
  latter, ``gpu`` the former (``ray.cluster_resources()`` lists only the nodes up now: on an autoscaling
  cluster whose GPU type scales from 0, the GPU request is what starts a GPU node). The actor is told its
  device (:func:`devices`), it does not guess it from what it can see: on a GPU node, an actor that was
  given no GPU must not use one.
"""

from __future__ import annotations

import math
from typing import Any

from pyoco.config import PreprocessConfig

EMBED_GPU_FRACTION = 0.25  # of one GPU per text-embedding actor: the text encoder is small next to a VAE
RESOURCE_FRACTION = 0.001  # custom-resource request per task: a placement label, not a concurrency cap
DECODE_CPUS_PER_EMBED_ACTOR = 8  # embed_actors: auto on CPU: MiniLM costs a few % of decoding


def _gpus(cfg: PreprocessConfig, cluster: dict[str, float]) -> bool:
    return cfg.accelerator == "gpu" or (cfg.accelerator == "auto" and cluster.get("GPU", 0) > 0)


def task_args(cfg: PreprocessConfig, num_cpus: float, cluster: dict[str, float]) -> dict[str, Any]:
    """Ray options of a CPU task/actor: ``num_cpus`` plus the CPU-node label when some node has it."""
    args: dict[str, Any] = {"num_cpus": num_cpus}
    if cfg.resource and cluster.get(cfg.resource, 0) > 0:
        args["resources"] = {cfg.resource: RESOURCE_FRACTION}
    return args


def embed_args(cfg: PreprocessConfig, cluster: dict[str, float]) -> dict[str, Any]:
    """Ray options of one text-embedding actor."""
    if _gpus(cfg, cluster):
        return {"num_cpus": cfg.embed_num_cpus, "num_gpus": EMBED_GPU_FRACTION}
    return task_args(cfg, cfg.embed_num_cpus, cluster)


def latent_args(cfg: PreprocessConfig, cluster: dict[str, float]) -> dict[str, Any]:
    """Ray options of one latents (VAE) actor; ``latent_num_gpus: 0`` keeps it on CPU."""
    if _gpus(cfg, cluster) and cfg.latent_num_gpus > 0:
        return {"num_gpus": cfg.latent_num_gpus, "num_cpus": 1}
    return task_args(cfg, cfg.latent_num_cpus, cluster)


def devices(cfg: PreprocessConfig, cluster: dict[str, float]) -> dict[str, str]:
    """``{"embed": "cuda"|"cpu", "latents": ...}``: the torch device each actor kind runs on (it changes the
    float results, so it is part of a unit's identity too)."""
    return {
        "embed": "cuda" if "num_gpus" in embed_args(cfg, cluster) else "cpu",
        "latents": "cuda" if "num_gpus" in latent_args(cfg, cluster) else "cpu",
    }


def embed_pool(cfg: PreprocessConfig, cluster: dict[str, float]) -> dict[str, int]:
    """``ray.data.ActorPoolStrategy`` arguments of the embedding actors: ``{"size": n}`` for a fixed
    ``embed_actors: n``; for ``auto``, a pool Ray Data grows from 1 actor while the stage has a backlog, up
    to one actor per ``EMBED_GPU_FRACTION`` of the cluster's GPUs (of one GPU when none is up yet), or one per
    ``DECODE_CPUS_PER_EMBED_ACTOR`` CPUs of the decoding nodes (CPU actors)."""
    if cfg.embed_actors != "auto":
        return {"size": int(cfg.embed_actors)}
    if _gpus(cfg, cluster):
        most = math.floor(max(cluster.get("GPU", 0), 1) / EMBED_GPU_FRACTION)
    else:
        cpus = cluster.get(cfg.resource, 0) if cfg.resource else 0
        most = math.ceil((cpus or cluster.get("CPU", 1)) / DECODE_CPUS_PER_EMBED_ACTOR)
    return {"min_size": 1, "max_size": max(1, most)}
