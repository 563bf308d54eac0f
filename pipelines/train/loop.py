"""One rank's side of Ray Train: :func:`train_loop_per_worker` and the :class:`Trainer` (``fit`` ->
``train_step`` -> ``forward_backward``, logging, checkpoints, samples). Engine setup is
:func:`pipelines.train.engine.setup_engine`, checkpoint I/O :mod:`pipelines.train.checkpoint`, the export
:func:`pipelines.train.export.export_trained`."""

from __future__ import annotations

import contextlib
import json
import math
import os
import statistics
import tempfile
import time
from pathlib import Path

from pipelines.train.checkpoint import restore_checkpoint, save_checkpoint
from pipelines.train.engine import setup_engine
from pipelines.train.export import export_trained
from pipelines.train.plan import WorkerPlan, apply_worker_env
from pyoco.config import PyocoConfig

WARMUP_STEPS_EXCLUDED = 2  # first steps of an attempt left out of the step-time median


def train_loop_per_worker(config: dict) -> None:
    """Ray Train entry point: one call per worker (and again after each restart)."""
    plan = WorkerPlan(**config)
    missing = apply_worker_env(plan.env, tuple(plan.credential_names))
    if missing:
        print(
            f"pyoco: {', '.join(missing)} set on the driver but not in this Ray worker's environment; "
            "credentials are never shipped in task arguments, so give them to the nodes (or use a role)",
            flush=True,
        )
    Trainer(plan).fit()


class Trainer:
    """One rank's training loop: ``fit`` -> ``train_step`` -> ``forward_backward``."""

    def __init__(self, plan: WorkerPlan):
        import ray.train
        import torch

        from pipelines.train.data import ClipGeometry
        from pyoco.diffusion import DiffusionLoss
        from pyoco.noise import make_prior, rank_generator

        t_start = time.perf_counter()
        self.plan = plan
        self.cfg = PyocoConfig.model_validate(plan.config)
        self.t = self.cfg.train
        self.geometry = ClipGeometry.from_dict(plan.geometry)
        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        self.image = self.t.image_pretrain

        e = setup_engine(self.cfg, plan, self.geometry, rank=self.rank)
        self.device, self.dtype, self.vae, self.encode_online = e.device, e.dtype, e.vae, e.encode_online
        self.engine, self.lr_scheduler, self.ema = e.engine, e.lr_scheduler, e.ema
        self.module = self.engine.module
        self.scheduler_config, self.trainable_names = e.scheduler_config, e.trainable_names

        self.loss_fn = DiffusionLoss(
            self.scheduler_config,
            min_snr_gamma=self.t.min_snr_gamma,
            caption_dropout=self.t.caption_dropout,
        )
        kind = "iid" if self.image else self.cfg.noise.kind
        self.prior = make_prior(kind, self.cfg.noise.alpha)
        # Per-rank stream for the diffusion noise, timesteps and dropout (pyoco.noise.rank_generator), on the
        # device so the noise is drawn where it is used.
        self.generator = rank_generator(self.t.seed, self.rank, device=self.device)
        self.null_cond = torch.as_tensor(plan.null_cond).to(self.device)
        self.null_mask = torch.as_tensor(plan.null_mask).to(self.device)

        self.resumed_from = restore_checkpoint(self)
        self.step = self.last_checkpoint_step = self.resumed_from or 0
        if self.rank == 0:
            print(
                f"pyoco: rank 0 ready in {time.perf_counter() - t_start:.1f}s: {type(self.module.unet).__name__}, "
                f"{e.num_trainable / 1e6:.2f}M trainable params, ZeRO-{self.t.zero_stage}, {self.dtype}, "
                f"world {self.world}, step {self.step}/{plan.total_steps}",
                flush=True,
            )
        self.mlflow = self.metrics_logger = None
        if self.rank == 0:
            from pipelines import tracking

            self.mlflow = tracking.client(plan.tracking_uri)
            self.metrics_logger = tracking.MetricsLogger(plan.tracking_uri, plan.run_id)

    def save_checkpoint(self, metrics: dict) -> None:
        save_checkpoint(self, metrics)
        self.last_checkpoint_step = self.step

    # ---------------------------------------------------------------------------------------------- steps
    def prepare(self, batch: dict):
        """Collated CPU batch -> (x0, cond, cond_mask) on the device; x0 in the compute dtype (latents: the
        clips' own, or encoded here by the VAE; one random frame per clip, T = 1, for image pretraining)."""
        import torch

        x0 = batch["x0"]
        if self.image and x0.shape[2] > 1:
            g = self.generator
            idx = torch.randint(0, x0.shape[2], (x0.shape[0],), generator=g, device=g.device).cpu()
            x0 = x0[torch.arange(x0.shape[0]), :, idx].unsqueeze(2)
        x0 = x0.to(self.device, self.dtype, non_blocking=True)
        if self.encode_online:
            from pyoco.model import encode_video

            with torch.no_grad():
                x0 = encode_video(self.vae, x0)
        cond = batch["cond"].to(self.device, non_blocking=True)
        mask = batch["cond_mask"].to(self.device, non_blocking=True)
        return x0, cond, mask

    def forward_backward(self, batch: dict) -> float:
        x0, cond, mask = self.prepare(batch)
        out = self.loss_fn(
            self.engine,
            x0,
            cond,
            mask,
            self.prior,
            generator=self.generator,
            null_cond=self.null_cond,
            null_mask=self.null_mask,
        )
        self.engine.backward(out.loss)
        return float(out.loss.detach())

    def maybe_inject_fault(self) -> None:
        """Test hook: rank 1 (rank 0 when alone) dies at ``fail_at_step``, once per run (marker in storage)."""
        if self.t.fail_at_step is None or self.step + 1 != self.t.fail_at_step:
            return
        if self.rank != (1 if self.world > 1 else 0) or not self.plan.fault_marker:
            return
        from pyoco import storage

        if storage.exists(self.plan.fault_marker):
            return
        # Die only once Ray has committed the checkpoints reported so far, so the test knows which one the
        # restart must use. (A real crash can outrun the controller; Ray then resumes from the previous one.)
        import ray.train

        ray.train.get_all_reported_checkpoints(
            consistency_mode=ray.train.CheckpointConsistencyMode.COMMITTED, timeout_s=120
        )
        storage.write_bytes(
            self.plan.fault_marker, f"rank {self.rank} exited at step {self.step + 1}\n".encode()
        )
        print(f"pyoco: fault injection: rank {self.rank} exits before step {self.step + 1}", flush=True)
        os._exit(1)

    # ------------------------------------------------------------------------------------------ the loop
    def batches(self):
        """Endless stream of collated batches from this worker's shard; each pass is one (reshuffled) epoch."""
        import ray.train

        from pipelines.train.data import make_collate

        shard = ray.train.get_dataset_shard("train")
        collate = make_collate(self.geometry)
        epoch = 0
        while True:
            n = 0
            for batch in shard.iter_torch_batches(
                batch_size=self.t.batch_size_per_worker,
                drop_last=True,
                local_shuffle_buffer_size=self.t.shuffle_buffer or None,
                local_shuffle_seed=(self.t.seed * 1_000_003 + self.rank * 7919 + epoch * 31 + self.step)
                if self.t.shuffle_buffer
                else None,
                collate_fn=collate,
                prefetch_batches=2,
            ):
                n += 1
                yield batch
            if n == 0:
                raise RuntimeError(f"rank {self.rank}: its data shard has no full batch")
            epoch += 1

    def fit(self) -> None:
        t = self.t
        total = self.plan.total_steps
        attempt_start = self.step
        metrics: dict[str, float] = {}
        step_times: list[float] = []
        loss_window: list[float] = []
        stream = self.batches()
        steady_t0, steady_n = None, 0
        with self._system_metrics():
            tick = time.perf_counter()
            while self.step < total:
                self.maybe_inject_fault()
                lr = float(self.engine.get_lr()[0])
                losses = []
                for _ in range(t.grad_accum_steps):
                    losses.append(self.forward_backward(next(stream)))
                    self.engine.step()  # DeepSpeed steps the optimizer + LR schedule on the last micro-batch
                self.step += 1
                if self.ema is not None:
                    self.ema.update()
                now = time.perf_counter()
                step_time = now - tick
                step_times.append(step_time)
                loss_window.append(sum(losses) / len(losses))
                if self.step - attempt_start == WARMUP_STEPS_EXCLUDED:
                    steady_t0, steady_n = now, 0
                elif steady_t0 is not None:
                    steady_n += 1
                if self.step % t.log_every == 0 or self.step == total:
                    metrics = self.log_step(loss_window, lr, step_time)
                    loss_window = []
                if t.sample_every and self.step % t.sample_every == 0:
                    self.log_samples()
                if self.step % t.checkpoint_every == 0 or self.step == total:
                    summary = self.summary(metrics, step_times, attempt_start, steady_t0, steady_n)
                    self.save_checkpoint(summary)
                tick = time.perf_counter()
        if self.last_checkpoint_step != self.step:  # already at the target when (re)started
            self.save_checkpoint(self.summary(metrics, step_times, attempt_start, steady_t0, steady_n))
        if self.plan.export_uri:
            export_trained(self)
        if self.metrics_logger is not None:
            self.metrics_logger.close()

    def summary(self, metrics, step_times, attempt_start, steady_t0, steady_n) -> dict:
        steady = step_times[WARMUP_STEPS_EXCLUDED:] or step_times
        out = {
            "step": self.step,
            "attempt_start_step": attempt_start,
            "loss": metrics.get("loss", float("nan")),
            "step_time_median_s": statistics.median(steady) if steady else float("nan"),
            "steady_steps": len(steady),
        }
        if steady_t0 is not None and steady_n > 0:
            out["loop_time_per_step_s"] = (time.perf_counter() - steady_t0) / steady_n
        return out

    def log_step(self, loss_window: list[float], lr: float, step_time: float) -> dict:
        """Mean loss over the window and all ranks (a collective: every rank calls this), logged by rank 0."""
        import torch
        import torch.distributed as dist

        loss = torch.tensor([sum(loss_window) / max(1, len(loss_window))], dtype=torch.float64)
        if dist.is_initialized() and self.world > 1:
            dist.all_reduce(loss)
            loss /= self.world
        grad_norm = self.engine.get_global_grad_norm()
        global_batch = self.t.batch_size_per_worker * self.t.grad_accum_steps * self.world
        metrics = {
            "loss": float(loss.item()),
            "lr": lr,
            "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
            "step_time_s": step_time,
            "samples_per_s": global_batch / step_time if step_time > 0 else float("nan"),
            "epoch": self.step / max(1, self.plan.steps_per_epoch),
        }
        if self.resumed_from is not None:
            metrics["resumed_from_step"] = float(self.resumed_from)
        metrics = {k: v for k, v in metrics.items() if v is not None and math.isfinite(v)}
        if self.metrics_logger is not None:
            self.metrics_logger.log(metrics, step=self.step)
        import ray.train

        # Every rank reports (Ray Train V2's report is collective); the driver's progress line reads rank 0's.
        ray.train.report({**metrics, "step": self.step})
        return metrics

    @contextlib.contextmanager
    def _system_metrics(self):
        if self.rank != 0 or not self.cfg.mlflow.system_metrics:
            yield
            return
        from pipelines import tracking

        with tracking.system_metrics(
            self.plan.tracking_uri,
            self.plan.run_id,
            interval_s=self.t.system_metrics_interval_s,
            resume=self.resumed_from is not None,
        ):
            yield

    def log_samples(self) -> None:
        """Sample the fixed prompts x seeds (EMA weights when EMA is on), split across the ranks: rank r
        samples items r, r + world, ... of the (seed, prompt) list, and every rank gets them all back by
        ``all_gather_object``, so no rank samples alone while the others wait at the next collective. A
        video's noise is its own stream (``clip_generators(seed, [prompt])``), so the split does not change
        it. Under ZeRO-3 every forward gathers parameters, so a rank with no share samples item 0 as well
        and drops it. Rank 0 logs mp4 + GIF artifacts, and in ``prompts.json`` which rank sampled which."""
        import torch
        import torch.distributed as dist

        from pyoco.noise import clip_generators
        from pyoco.sampling import sample_video

        g = self.geometry
        cond = torch.as_tensor(self.plan.sample_cond).to(self.device)
        mask = torch.as_tensor(self.plan.sample_mask).to(self.device)
        items = [(seed, i) for seed in self.t.sample_seeds for i in range(cond.shape[0])]
        mine = items[self.rank :: self.world]
        run = mine or (items[:1] if self.t.zero_stage >= 3 else [])
        done = []
        if run:
            prompts = torch.tensor([i for _, i in run], device=self.device)
            gens = [clip_generators(seed, [i])[0] for seed, i in run]
            swap = self.ema.swap() if self.ema is not None else contextlib.nullcontext()
            self.module.eval()
            try:
                with swap, torch.no_grad():
                    videos = sample_video(
                        self.module,
                        cond[prompts],
                        mask[prompts],
                        prior=self.prior,
                        null_cond=self.null_cond,
                        null_mask=self.null_mask,
                        num_frames=1 if self.image else g.num_frames,
                        height=g.height,
                        width=g.width,
                        steps=self.t.sample_steps,
                        guidance=self.t.sample_guidance,
                        generator=gens,
                        scheduler_config=self.scheduler_config,
                        vae=self.vae,
                    )
            finally:
                self.module.train()
            done = [(seed, i, self.rank, v.cpu().numpy()) for (seed, i), v in zip(mine, videos, strict=False)]
        if dist.is_initialized() and self.world > 1:
            parts = [None] * self.world
            dist.all_gather_object(parts, done)
            done = [x for part in parts for x in part]
        if self.rank != 0:
            return
        from pyoco.video import write_gif, write_mp4

        with tempfile.TemporaryDirectory(prefix="pyoco-samples-") as tmp:
            sampled_by = {}
            for seed, i, rank, frames in sorted(done, key=lambda x: (x[0], x[1])):
                name = f"prompt{i:02d}_seed{seed}"
                write_mp4(frames, f"{Path(tmp) / name}.mp4", fps=g.fps)
                write_gif(frames, f"{Path(tmp) / name}.gif", fps=g.fps)
                sampled_by[name] = rank
            (Path(tmp) / "prompts.json").write_text(
                json.dumps(
                    {
                        "prompts": self.t.sample_prompts,
                        "seeds": self.t.sample_seeds,
                        "step": self.step,
                        "sampled_by": sampled_by,
                    }
                )
            )
            self.mlflow.log_artifacts(self.plan.run_id, tmp, f"samples/step_{self.step:06d}")
