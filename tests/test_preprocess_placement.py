"""Where preprocess runs (issue 14, item 5): decode on CPU nodes, the caption embedder and the latents on GPU
actors when the cluster has GPUs, and a knob that forces CPU.
The choice is a pure function of the config and ``ray.cluster_resources()``, so no GPU is needed here."""

from __future__ import annotations

import pytest

from pipelines.preprocess.placement import (
    EMBED_GPU_FRACTION,
    RESOURCE_FRACTION,
    devices,
    embed_args,
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
    with pytest.raises(ConfigError, match=r"t\.yaml: accelerator: .*'auto' or 'cpu'.*\(got 'gpu'\)"):
        _cfg(accelerator="gpu")


def test_a_cpu_cluster_runs_embed_actors_and_latents_on_cpu(ray_local, sd_pipeline, tmp_path):
    """End to end on the embedded (CPU) Ray: the embedding and latents stages take their actor options from
    the cluster's resources, the actors run on CPU, and the manifest says so."""
    import pyarrow.parquet as pq

    from pipelines.preprocess.step import run_preprocess
    from pyoco import synth

    raw = tmp_path / "raw"
    synth.write_dataset(str(raw), videos=4, shards=2, seed=3, frames=12, size=32)
    cfg = _cfg(
        input=str(raw), output=str(tmp_path / "out"), num_frames=3, size=sd_pipeline.pixel_size,
        text_encoder=str(sd_pipeline.path), vae=str(sd_pipeline.path), latents=True,
        captions={"dedupe": "none"}, val_fraction=0.0, min_motion=0.0,
    )  # fmt: skip
    manifest = run_preprocess(cfg, progress=False)
    assert manifest["devices"] == {"embed": "cpu", "latents": "cpu"}
    assert manifest["accepted_videos"] == 4
    table = pq.read_table(tmp_path / "out" / "clips" / "train")
    assert table.num_rows == manifest["clips_written"] and table.column("latents").null_count == 0
