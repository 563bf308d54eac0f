"""What a rank does around training besides training: MLflow metrics, system metrics and validation samples,
as callbacks the :class:`pipelines.train.loop.Trainer` calls on every rank, in list order.

A callback sees the trainer (``trainer.step``, ``.rank``, ``.world``, ``.plan``, ``.t``, the engine, EMA,
prior and generators). Hooks run on every rank, so a hook may run a collective (sampling gathers its videos
with ``all_gather_object``) as long as it does so on every rank; work for rank 0 alone checks
``trainer.rank``. Tests add their own (``tests/fault_injection.py``) through ``run_train(callbacks=...)``.
"""

from __future__ import annotations

import contextlib
import json
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pipelines.train.loop import Trainer


class Callback:
    """The hooks; each does nothing unless overridden."""

    def on_fit_start(self, trainer: Trainer) -> None:
        """Once per attempt, after the restore and before the first step."""

    def on_step_start(self, trainer: Trainer) -> None:
        """Before optimizer step ``trainer.step + 1``."""

    def on_step_end(self, trainer: Trainer, metrics: dict | None) -> None:
        """After optimizer step ``trainer.step`` and before its checkpoint; ``metrics`` (loss over the last
        ``log_every`` steps and all ranks, lr, grad norm, step time...) on logging steps, else None."""

    def on_fit_end(self, trainer: Trainer) -> None:
        """Once per attempt, after the last checkpoint and the export, or when the loop raised."""


def default_callbacks(cfg) -> list[Callback]:
    """The callbacks every run has: MLflow metrics, system metrics when ``mlflow.system_metrics``, samples
    when ``train.sample_every``."""
    out: list[Callback] = [MlflowMetrics()]
    if cfg.mlflow.system_metrics:
        out.append(SystemMetrics())
    if cfg.train.sample_every:
        out.append(Samples(cfg.train.sample_every))
    return out


class MlflowMetrics(Callback):
    """Rank 0 sends each logging step's metrics to the run, through a queue that never makes a step wait
    (:class:`pipelines.tracking.MetricsLogger`)."""

    def __init__(self):
        self.logger = None

    def on_fit_start(self, trainer):
        if trainer.rank == 0:
            from pipelines import tracking

            self.logger = tracking.MetricsLogger(trainer.plan.tracking_uri, trainer.plan.run_id)

    def on_step_end(self, trainer, metrics):
        if metrics and self.logger is not None:
            self.logger.log(metrics, step=trainer.step)

    def on_fit_end(self, trainer):
        if self.logger is not None:
            self.logger.close()  # sends what is still queued
            self.logger = None


class SystemMetrics(Callback):
    """Rank 0 logs MLflow's system metrics (CPU, memory, disk, network, GPU) every
    ``train.system_metrics_interval_s`` while the loop runs; a resumed attempt continues the run's series."""

    def __init__(self):
        self._stack: contextlib.ExitStack | None = None

    def on_fit_start(self, trainer):
        if trainer.rank != 0:
            return
        from pipelines import tracking

        self._stack = contextlib.ExitStack()
        self._stack.enter_context(
            tracking.system_metrics(
                trainer.plan.tracking_uri,
                trainer.plan.run_id,
                interval_s=trainer.t.system_metrics_interval_s,
                resume=trainer.resumed_from is not None,
            )
        )

    def on_fit_end(self, trainer):
        if self._stack is not None:
            self._stack.close()
            self._stack = None


class Samples(Callback):
    """Every ``every`` steps: the fixed prompts x seeds, sampled with the EMA weights when EMA is on, as mp4
    and GIF artifacts of the run (``samples/step_{step:06d}/``).

    The (seed, prompt) items are split across the ranks: rank r samples items r, r + world, ..., and every
    rank gets them all back by ``all_gather_object``, so no rank samples alone while the others wait at the
    next collective. A video's noise is its own stream (``clip_generators(seed, [prompt])``), so the split
    does not change it. Under ZeRO-3 every forward gathers parameters, so a rank with no share samples item 0
    as well and drops it. Rank 0 writes the files, and in ``prompts.json`` which rank sampled which."""

    def __init__(self, every: int):
        self.every = every
        self.client = None

    def on_fit_start(self, trainer):
        if trainer.rank == 0:
            from pipelines import tracking

            self.client = tracking.client(trainer.plan.tracking_uri)

    def on_step_end(self, trainer, metrics):
        if trainer.step % self.every == 0:
            self.sample(trainer)

    def sample(self, tr: Trainer) -> None:
        import torch
        import torch.distributed as dist

        from pyoco.noise import clip_generators
        from pyoco.sampling import sample_video

        g = tr.geometry
        cond = torch.as_tensor(tr.plan.sample_cond).to(tr.device)
        mask = torch.as_tensor(tr.plan.sample_mask).to(tr.device)
        items = [(seed, i) for seed in tr.t.sample_seeds for i in range(cond.shape[0])]
        mine = items[tr.rank :: tr.world]
        run = mine or (items[:1] if tr.t.zero_stage >= 3 else [])
        done = []
        if run:
            prompts = torch.tensor([i for _, i in run], device=tr.device)
            gens = [clip_generators(seed, [i])[0] for seed, i in run]
            swap = tr.ema.swap() if tr.ema is not None else contextlib.nullcontext()
            tr.module.eval()
            try:
                with swap, torch.no_grad():
                    videos = sample_video(
                        tr.module,
                        cond[prompts],
                        mask[prompts],
                        prior=tr.prior,
                        null_cond=tr.null_cond,
                        null_mask=tr.null_mask,
                        # an image model (pretraining) samples single frames
                        num_frames=g.num_frames if tr.module.is_video else 1,
                        height=g.height,
                        width=g.width,
                        steps=tr.t.sample_steps,
                        guidance=tr.t.sample_guidance,
                        generator=gens,
                        scheduler_config=tr.scheduler_config,
                        vae=tr.vae,
                    )
            finally:
                tr.module.train()
            done = [(seed, i, tr.rank, v.cpu().numpy()) for (seed, i), v in zip(mine, videos, strict=False)]
        if dist.is_initialized() and tr.world > 1:
            parts = [None] * tr.world
            dist.all_gather_object(parts, done)
            done = [x for part in parts for x in part]
        if tr.rank == 0:
            self._log(tr, done)

    def _log(self, tr: Trainer, done: list) -> None:
        from pyoco.video import write_gif, write_mp4

        fps = tr.geometry.fps
        with tempfile.TemporaryDirectory(prefix="pyoco-samples-") as tmp:
            sampled_by = {}
            for seed, i, rank, frames in sorted(done, key=lambda x: (x[0], x[1])):
                name = f"prompt{i:02d}_seed{seed}"
                write_mp4(frames, f"{Path(tmp) / name}.mp4", fps=fps)
                write_gif(frames, f"{Path(tmp) / name}.gif", fps=fps)
                sampled_by[name] = rank
            prompts = {
                "prompts": tr.t.sample_prompts,
                "seeds": tr.t.sample_seeds,
                "step": tr.step,
                "sampled_by": sampled_by,
            }
            (Path(tmp) / "prompts.json").write_text(json.dumps(prompts))
            self.client.log_artifacts(tr.plan.run_id, tmp, f"samples/step_{tr.step:06d}")
