"""One rank's side of Ray Train: :func:`train_loop_per_worker` and the :class:`Trainer`, in the manner of
torchtitan: ``fit`` -> ``train_step`` -> ``forward_backward``.

The pieces around the loop live elsewhere: engine setup in :func:`pipelines.train.engine.setup_engine`,
checkpoint save/restore in :mod:`pipelines.train.checkpoint`, the export in
:func:`pipelines.train.export.export_trained`, and MLflow metrics, system metrics and samples in
:mod:`pipelines.train.callbacks`."""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Sequence

from pipelines.train.callbacks import Callback, default_callbacks
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
    cfg = PyocoConfig.model_validate(plan.config)
    trainer = ImagePretrainer if cfg.train.image_pretrain else Trainer
    trainer(plan, callbacks=[*default_callbacks(cfg), *plan.callbacks]).fit()


class StepClock:
    """Step times for the logs and the checkpoints' summary. A step's time runs from the end of the previous
    step's checkpoint to its own EMA update (logging, samples and checkpoints are not in it); the steady loop
    rate leaves out the first ``WARMUP_STEPS_EXCLUDED`` steps of the attempt and includes everything else."""

    def __init__(self, start_step: int):
        self.attempt_start = start_step
        self.times: list[float] = []
        self.steady_t0: float | None = None
        self.steady_n = 0
        self.start()

    def start(self) -> None:
        self.t0 = time.perf_counter()

    def stop(self, step: int) -> float:
        now = time.perf_counter()
        self.times.append(now - self.t0)
        if step - self.attempt_start == WARMUP_STEPS_EXCLUDED:
            self.steady_t0, self.steady_n = now, 0
        elif self.steady_t0 is not None:
            self.steady_n += 1
        return self.times[-1]

    def summary(self, step: int, loss: float) -> dict:
        steady = self.times[WARMUP_STEPS_EXCLUDED:] or self.times
        out = {
            "step": step,
            "attempt_start_step": self.attempt_start,
            "loss": loss,
            "step_time_median_s": statistics.median(steady) if steady else float("nan"),
            "steady_steps": len(steady),
        }
        if self.steady_t0 is not None and self.steady_n > 0:
            out["loop_time_per_step_s"] = (time.perf_counter() - self.steady_t0) / self.steady_n
        return out


class Trainer:
    """One rank's training loop: ``fit`` -> ``train_step`` -> ``forward_backward``, then the checkpoint and
    the callbacks."""

    def __init__(self, plan: WorkerPlan, callbacks: Sequence[Callback] = ()):
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
        self.callbacks = list(callbacks)
        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()

        e = setup_engine(self.cfg, plan, self.geometry, rank=self.rank)
        self.device, self.dtype, self.vae, self.encode_online = e.device, e.dtype, e.vae, e.encode_online
        self.engine, self.ema = e.engine, e.ema  # DeepSpeed steps (and checkpoints) the LR schedule itself
        self.module = self.engine.module
        self.scheduler_config, self.trainable_names = e.scheduler_config, e.trainable_names

        self.loss_fn = DiffusionLoss(
            self.scheduler_config,
            min_snr_gamma=self.t.min_snr_gamma,
            caption_dropout=self.t.caption_dropout,
            timestep_power=self.t.timestep_power,
        )
        self.prior = make_prior(self.cfg.noise.kind, self.cfg.noise.alpha)  # iid for image pretraining
        # Per-rank stream for the diffusion noise, timesteps and dropout (pyoco.noise.rank_generator), on the
        # device so the noise is drawn where it is used.
        self.generator = rank_generator(self.t.seed, self.rank, device=self.device)
        self.null_cond = torch.as_tensor(plan.null_cond).to(self.device)
        self.null_mask = torch.as_tensor(plan.null_mask).to(self.device)

        self.resumed_from = restore_checkpoint(self)  # None: a fresh start
        self.step = self.last_checkpoint_step = self.resumed_from or 0
        if self.rank == 0:
            print(
                f"pyoco: rank 0 ready in {time.perf_counter() - t_start:.1f}s: {type(self.module.unet).__name__}, "
                f"{e.num_trainable / 1e6:.2f}M trainable params, ZeRO-{self.t.zero_stage}, {self.dtype}, "
                f"world {self.world}, step {self.step}/{plan.total_steps}",
                flush=True,
            )

    # ------------------------------------------------------------------------------------------ the loop
    def fit(self) -> None:
        """Train from the restored step to ``plan.total_steps``, checkpointing every ``checkpoint_every`` steps
        and at the end, then export. Every rank runs this; logging and checkpoints are collectives."""
        t, total = self.t, self.plan.total_steps
        stream = self.batches()
        loss_window: list[float] = []
        logged: dict[str, float] = {}
        self._each("on_fit_start")
        clock = StepClock(self.step)
        try:
            while self.step < total:
                self._each("on_step_start")
                lr, loss = self.train_step(stream)
                step_time = clock.stop(self.step)
                loss_window.append(loss)
                metrics = None
                if self.step % t.log_every == 0 or self.step == total:
                    metrics = logged = self.log_step(loss_window, lr, step_time)
                    loss_window = []
                self._each("on_step_end", metrics)
                if self.step % t.checkpoint_every == 0 or self.step == total:
                    self.save_checkpoint(clock.summary(self.step, logged.get("loss", float("nan"))))
                clock.start()
            if self.last_checkpoint_step != self.step:  # already at the target when (re)started
                self.save_checkpoint(clock.summary(self.step, logged.get("loss", float("nan"))))
            if self.plan.export_uri:
                export_trained(self)
        finally:
            self._each("on_fit_end")

    def train_step(self, stream) -> tuple[float, float]:
        """One optimizer step over ``grad_accum_steps`` micro-batches; returns (the LR it used, the mean
        micro-batch loss)."""
        lr = float(self.engine.get_lr()[0])
        losses = []
        for _ in range(self.t.grad_accum_steps):
            losses.append(self.forward_backward(next(stream)))
            self.engine.step()  # DeepSpeed steps the optimizer + LR schedule on the last micro-batch
        self.step += 1
        if self.ema is not None:
            self.ema.update()
        return lr, sum(losses) / len(losses)

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
        # note: a CPU-GPU sync point per micro-batch (float waits for the forward); the logs need each loss
        return float(out.loss.detach())

    def prepare(self, batch: dict):
        """Collated CPU batch (x0 ``(B, C, T, H, W)``) -> (x0, cond, cond_mask) on the device; x0 in the
        compute dtype (latents: the clips' own, or encoded here by the VAE)."""
        import torch

        x0 = batch["x0"].to(self.device, self.dtype, non_blocking=True)
        if self.encode_online:
            from pyoco.model import encode_video

            with torch.no_grad():
                x0 = encode_video(self.vae, x0)
        cond = batch["cond"].to(self.device, non_blocking=True)
        mask = batch["cond_mask"].to(self.device, non_blocking=True)
        return x0, cond, mask

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

    # ---------------------------------------------------------------------------------- logs, checkpoints
    def log_step(self, loss_window: list[float], lr: float, step_time: float) -> dict:
        """The step's metrics: mean loss over the window and all ranks (a collective: every rank calls this),
        reported to Ray (the driver's progress line reads rank 0's); the callbacks get them next."""
        import ray.train
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
        # Every rank reports (Ray Train V2's report is collective).
        ray.train.report({**metrics, "step": self.step})
        return metrics

    def save_checkpoint(self, summary: dict) -> None:
        save_checkpoint(self, summary)
        self.last_checkpoint_step = self.step

    def _each(self, hook: str, *args) -> None:
        for cb in self.callbacks:
            getattr(cb, hook)(self, *args)


class ImagePretrainer(Trainer):
    """``pyoco pretrain-image``: the 2-D UNet learns single frames, one random frame per clip (T = 1).

    Everything else is set where the run is planned: the driver resolves image pretraining to the iid prior
    and all layers trainable (:func:`pipelines.train.plan.resolve_config`), and the engine builds the 2-D UNet
    (:func:`pipelines.train.engine.build_denoiser`), which the samples then draw one frame from."""

    def prepare(self, batch: dict):
        import torch

        x0 = batch["x0"]
        if x0.shape[2] > 1:  # the frame index comes from the rank's stream, like the diffusion noise
            g = self.generator
            idx = torch.randint(0, x0.shape[2], (x0.shape[0],), generator=g, device=g.device).cpu()
            batch = {**batch, "x0": x0[torch.arange(x0.shape[0]), :, idx].unsqueeze(2)}
        return super().prepare(batch)
