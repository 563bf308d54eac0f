"""Preprocess stage 3b (``preprocess.latents: true``): VAE latents in a Ray Data actor pool, between
decode/embed and write.

Each actor holds one `pyoco.vae.LatentEncoder` (the VAE loads once per actor). On a cluster with GPUs the
actors request ``latent_num_gpus`` each and encode in bf16 on the GPU; otherwise (or with ``accelerator:
cpu``) they are CPU actors on the CPU nodes (``latent_num_cpus`` each, float32;
:func:`pipelines.preprocess.placement.latent_args`). The latents identity is always computed from the
float32 weights, so it is the same on either kind of actor and equals the one train computes.

Layouts: decoded rows carry ``frames`` uint8 (T, H, W, 3) bytes; this stage adds ``latents``: float16
``(C, T, h, w)`` bytes (`pyoco.clips.latents_array`), and nulls ``frames`` when ``keep_frames`` is false.
Reject rows (``reason`` set) pass through with null latents.

The driver plans the stage with :func:`latent_plan` (reads the VAE config, and loads it once to compute the
identity the manifest records and the writer stamps into the column metadata).
"""

from __future__ import annotations

from dataclasses import dataclass

from pipelines.common import PyocoError
from pyoco import clips as clipfmt


@dataclass(frozen=True)
class LatentPlan:
    vae: str  # URI of the vae component
    identity: str  # pyoco.vae.vae_identity of its float32 weights
    shape: tuple[int, int, int, int]  # (C, T, h, w)

    def manifest(self) -> dict:
        return {
            "vae": self.vae,
            "vae_identity": self.identity,
            "shape": list(self.shape),
            "dtype": clipfmt.LATENTS_DTYPE.name,
        }


def latent_plan(cfg, storage_options: dict | None = None) -> LatentPlan:
    """The latents' VAE, identity and shape for a `PreprocessConfig` with ``latents: true``."""
    from pyoco.model import load_vae
    from pyoco.pretrained import resolve_vae
    from pyoco.vae import vae_factor, vae_identity

    if not cfg.vae:
        raise PyocoError(
            "preprocess.latents is true but preprocess.vae is not set (a VAE folder, or a pipeline folder "
            "with vae/; `pyoco run` takes the model's)"
        )
    uri, config = resolve_vae(cfg.vae, storage_options=storage_options)
    factor = vae_factor(config)
    if cfg.size % factor:
        raise PyocoError(
            f"preprocess.size {cfg.size} px is not divisible by the VAE factor {factor} "
            f"(vae.config.block_out_channels of {uri})"
        )
    identity = vae_identity(load_vae(uri, storage_options=storage_options))
    shape = (int(config.get("latent_channels", 4)), cfg.num_frames, cfg.size // factor, cfg.size // factor)
    return LatentPlan(vae=uri, identity=identity, shape=shape)


def latent_stage(ds, cfg, plan: LatentPlan, cluster: dict, storage_options: dict | None = None):
    """``ds`` with the latents actor pool applied (``cfg.latent_actors`` actors; ``cluster``:
    ``ray.cluster_resources()``). ``storage_options``: `pyoco.storage.loader_options` (an endpoint, never
    credentials: it is an actor argument)."""
    import ray.data

    from pipelines.preprocess.placement import devices, latent_args

    args = latent_args(cfg, cluster)
    return ds.map_batches(
        LatentStage,
        batch_size=None,  # whole blocks, so units never mix; it encodes latent_batch_size clips at a time
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=cfg.latent_actors),
        fn_constructor_kwargs={
            "vae": plan.vae,
            "identity": plan.identity,
            "keep_frames": cfg.keep_frames,
            "threads": max(1, int(args.get("num_cpus", 1))),
            "storage_options": storage_options,
            "device": devices(cfg, cluster)["latents"],
            "batch_size": cfg.latent_batch_size,
        },
        **args,
    )


class LatentStage:
    """Ray Data actor: adds the ``latents`` column to decoded rows (see the module docstring)."""

    def __init__(
        self,
        *,
        vae: str,
        identity: str,
        keep_frames: bool,
        threads: int = 1,
        storage_options: dict | None = None,
        device: str | None = None,  # the driver's choice (placement.devices); None: CUDA if visible
        batch_size: int = 4,  # clips per VAE call (the UDF gets a whole unit, or a piece of one)
    ):
        import torch

        from pyoco.vae import LatentEncoder

        torch.set_num_threads(max(1, threads))
        gpu = device == "cuda" if device else torch.cuda.is_available()
        self.encoder = LatentEncoder(
            vae,
            device="cuda" if gpu else "cpu",
            dtype=torch.bfloat16 if gpu else torch.float32,
            storage_options=storage_options,
        )
        if self.encoder.identity != identity:  # another VAE at the same URI on this node
            raise PyocoError(
                f"preprocess: the VAE at {vae} on this node is {self.encoder.identity[:19]}, the driver's "
                f"is {identity[:19]}"
            )
        self.keep_frames = keep_frames
        self.batch_size = max(1, batch_size)

    def __call__(self, batch):
        import numpy as np
        import pyarrow as pa

        n = batch.num_rows
        ok = [i for i, r in enumerate(batch.column("reason").to_pylist()) if r is None]
        cells: list[bytes | None] = [None] * n
        for start in range(0, len(ok), self.batch_size):
            part = ok[start : start + self.batch_size]
            rows = batch.take(part).select(["frames", "num_frames", "height", "width"]).to_pylist()
            frames = np.stack([clipfmt.frames_array(r) for r in rows])  # (B, T, H, W, 3) uint8
            latents = self.encoder(frames)  # (B, C, T, h, w) float32
            for i, cell in zip(part, clipfmt.latents_array(latents).to_pylist(), strict=True):
                cells[i] = cell
        out = batch.append_column(clipfmt.LATENTS, pa.array(cells, pa.large_binary()))
        if not self.keep_frames:
            idx = out.schema.get_field_index("frames")
            out = out.set_column(idx, out.schema.field(idx), pa.nulls(n, pa.large_binary()))
        return out
