"""Where preprocess runs (issue 14, item 5): decode on CPU nodes, the caption embedder and the latents on GPU
actors when the cluster has GPUs, a knob that forces CPU, and the embedding pool's size (fixed or auto).
The choice is a pure function of the config and ``ray.cluster_resources()``, so no GPU is needed here."""

from __future__ import annotations

import pytest
import ray.data

from pipelines.preprocess.placement import (
    EMBED_GPU_FRACTION,
    RESOURCE_FRACTION,
    devices,
    embed_args,
    embed_pool,
    latent_args,
    task_args,
)
from pyoco.config import ConfigError, PreprocessConfig, parse_config

CPU_ONLY = {"CPU": 32.0, "preprocess": 32.0, "memory": 1e11}  # two 16-CPU preprocess nodes, CPU-0 head
WITH_GPUS = {**CPU_ONLY, "CPU": 48.0, "GPU": 2.0}  # plus two 8-CPU, 1-GPU nodes


def _cfg(**fields) -> PreprocessConfig:
    return parse_config({"input": "in", "output": "out", **fields}, source="t.yaml", model=PreprocessConfig)


def test_decode_stays_on_cpu_nodes_and_actors_go_to_gpus_when_there_are_some():
    cfg = _cfg(latents=True, latent_num_gpus=0.5)
    label = {"preprocess": RESOURCE_FRACTION}
    for cluster in (CPU_ONLY, WITH_GPUS):  # decode never asks for a GPU, and keeps the CPU-node label
        assert task_args(cfg, cfg.num_cpus_per_task, cluster) == {"num_cpus": 1.0, "resources": label}

    assert embed_args(cfg, CPU_ONLY) == {"num_cpus": 0.0, "resources": label}
    assert latent_args(cfg, CPU_ONLY) == {"num_cpus": 1.0, "resources": label}
    assert devices(cfg, CPU_ONLY) == {"embed": "cpu", "latents": "cpu"}

    # GPU actors carry no CPU-node label: the GPU nodes do not offer it.
    assert embed_args(cfg, WITH_GPUS) == {"num_cpus": 0.0, "num_gpus": EMBED_GPU_FRACTION}
    assert latent_args(cfg, WITH_GPUS) == {"num_gpus": 0.5, "num_cpus": 1}
    assert devices(cfg, WITH_GPUS) == {"embed": "cuda", "latents": "cuda"}

    # latent_num_gpus 0 keeps the VAE on CPU; a cluster without the label gets plain CPU scheduling.
    assert devices(_cfg(latent_num_gpus=0), WITH_GPUS) == {"embed": "cuda", "latents": "cpu"}
    assert embed_args(cfg, {"CPU": 2.0}) == {"num_cpus": 0.0}


def test_accelerator_cpu_forces_cpu_actors_on_a_gpu_cluster():
    cfg = _cfg(accelerator="cpu", latents=True)
    label = {"preprocess": RESOURCE_FRACTION}
    assert embed_args(cfg, WITH_GPUS) == {"num_cpus": 0.0, "resources": label}
    assert latent_args(cfg, WITH_GPUS) == {"num_cpus": 1.0, "resources": label}
    assert devices(cfg, WITH_GPUS) == {"embed": "cpu", "latents": "cpu"}
    with pytest.raises(ConfigError, match=r"t\.yaml: accelerator: .*'auto', 'gpu' or 'cpu'.*\(got 'cuda'\)"):
        _cfg(accelerator="cuda")


def test_accelerator_gpu_asks_for_gpus_before_any_gpu_node_is_up():
    """An autoscaling cluster lists no GPU while its GPU type is at 0 nodes: ``gpu`` requests GPUs anyway
    (the request is what scales a GPU node up); decode still asks for none."""
    cfg = _cfg(accelerator="gpu", latents=True, embed_actors="auto")
    assert embed_args(cfg, CPU_ONLY) == {"num_cpus": 0.0, "num_gpus": EMBED_GPU_FRACTION}
    assert latent_args(cfg, CPU_ONLY) == {"num_gpus": 1.0, "num_cpus": 1}
    assert devices(cfg, CPU_ONLY) == {"embed": "cuda", "latents": "cuda"}
    assert "num_gpus" not in task_args(cfg, cfg.num_cpus_per_task, CPU_ONLY)
    assert embed_pool(cfg, CPU_ONLY) == {"min_size": 1, "max_size": 4}  # one GPU's worth
    assert embed_pool(cfg, WITH_GPUS) == {"min_size": 1, "max_size": 8}


def test_embed_actors_fixed_or_auto_become_an_actor_pool():
    assert embed_pool(_cfg(), WITH_GPUS) == {"size": 1}
    assert embed_pool(_cfg(embed_actors=3), CPU_ONLY) == {"size": 3}
    auto = _cfg(embed_actors="auto")
    # One GPU actor per quarter GPU; on CPU, one per 8 decode CPUs (the labelled ones when any).
    assert embed_pool(auto, WITH_GPUS) == {"min_size": 1, "max_size": 8}
    assert embed_pool(auto, CPU_ONLY) == {"min_size": 1, "max_size": 4}
    assert embed_pool(_cfg(embed_actors="auto", accelerator="cpu"), WITH_GPUS) == {
        "min_size": 1,
        "max_size": 4,
    }
    assert embed_pool(auto, {"CPU": 2.0}) == {"min_size": 1, "max_size": 1}
    # What the step hands Ray Data: a fixed pool, or an autoscaling one from 1 actor.
    pool = ray.data.ActorPoolStrategy(**embed_pool(auto, WITH_GPUS))
    assert (pool.min_size, pool.max_size) == (1, 8)
    fixed = ray.data.ActorPoolStrategy(**embed_pool(_cfg(embed_actors=2), WITH_GPUS))
    assert (fixed.min_size, fixed.max_size) == (2, 2)

    for bad in (0, "many", True, 1.5):
        with pytest.raises(ConfigError, match=r"^t\.yaml: embed_actors: .*integer >= 1 or 'auto'"):
            _cfg(embed_actors=bad)


def test_a_cpu_cluster_runs_auto_embed_actors_and_latents_on_cpu(ray_local, sd_pipeline, tmp_path):
    """End to end on the embedded (CPU) Ray: ``embed_actors: auto`` and the latents stage build their actor
    pools from the cluster's resources, the actors run on CPU, and the manifest says so."""
    import pyarrow.parquet as pq

    from pipelines.preprocess.step import run_preprocess
    from pyoco import synth

    raw = tmp_path / "raw"
    synth.write_dataset(str(raw), videos=4, shards=2, seed=3, frames=12, size=32)
    cfg = _cfg(
        input=str(raw), output=str(tmp_path / "out"), num_frames=3, size=sd_pipeline.pixel_size,
        text_encoder=str(sd_pipeline.path), vae=str(sd_pipeline.path), latents=True, embed_actors="auto",
        captions={"dedupe": "none"}, val_fraction=0.0, min_motion=0.0,
    )  # fmt: skip
    manifest = run_preprocess(cfg, progress=False)
    assert manifest["devices"] == {"embed": "cpu", "latents": "cpu"}
    assert manifest["accepted_videos"] == 4 and manifest["config"]["embed_actors"] == "auto"
    table = pq.read_table(tmp_path / "out" / "clips" / "train")
    assert table.num_rows == manifest["clips_written"] and table.column("latents").null_count == 0
