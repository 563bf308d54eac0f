"""One rank's side of Ray Train: :func:`train_loop_per_worker` and the :class:`Trainer` (engine setup,
restore, ``fit`` -> ``train_step`` -> ``forward_backward``, logging, checkpoints, samples).

Over 400 lines because :class:`Trainer` is one class of ~480 lines; splitting it into engine, checkpoint I/O,
loop and callbacks is issue 13's trainer refactor (item 3), which changes code rather than moving it."""

from __future__ import annotations

import contextlib
import json
import math
import os
import statistics
import tempfile
import time
from pathlib import Path

from pipelines.train.checkpoint import (
    CHECKPOINT_TAG,
    STATE_DIR,
    TRAIN_STATE,
    check_resume,
    compat_hash,
    load_rng_state,
    save_rng_state,
)
from pipelines.train.engine import build_denoiser
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
        from pipelines.train.deepspeed import make_lr_scheduler, param_groups, setup_deepspeed, use_bf16
        from pyoco.diffusion import DiffusionLoss, make_scheduler_config
        from pyoco.noise import make_prior, rank_generator

        t_start = time.perf_counter()
        self.plan = plan
        self.cfg = PyocoConfig.model_validate(plan.config)
        self.t = self.cfg.train
        self.geometry = ClipGeometry.from_dict(plan.geometry)
        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        self.image = self.t.image_pretrain

        self.deepspeed = setup_deepspeed(self.t.use_gpu)
        if self.t.use_gpu:
            import ray.train.torch

            self.device = ray.train.torch.get_device()
        else:
            self.device = torch.device("cpu")
            torch.set_num_threads(max(1, int(self.t.resources_per_worker.get("CPU", 1))))
        self.dtype = torch.bfloat16 if use_bf16(self.t) else torch.float32

        model, pretrained_sched = build_denoiser(self.cfg.model, image_pretrain=self.image)
        model.set_trainable("all" if self.image else self.cfg.model.train_layers)
        if self.cfg.model.gradient_checkpointing:
            model.enable_gradient_checkpointing()
        # Resolved once: the checkpoint and the exported package carry the prediction type the loss trains.
        self.scheduler_config = make_scheduler_config(
            pretrained_sched, self.t.num_train_timesteps, prediction_type=self.t.prediction_type
        )
        # The VAE encodes frames online only when the clips carry no latents; with latents it is loaded
        # just to decode the in-training samples.
        self.vae = None
        self.encode_online = plan.vae is not None and not self.geometry.latents
        if plan.vae and (self.encode_online or self.t.sample_every):
            from pyoco.model import load_vae

            self.vae = load_vae(plan.vae, cache_dir=self.cfg.model.cache_dir).to(self.device, self.dtype)
            self.vae.requires_grad_(False).eval()

        # Ray Train already created the process group (gloo on CPU, NCCL on GPU); DeepSpeed wraps it.
        self.deepspeed.init_distributed(dist_backend="nccl" if self.t.use_gpu else "gloo")
        trainable = [p for p in model.parameters() if p.requires_grad]
        self.engine, _, _, self.lr_scheduler = self.deepspeed.initialize(
            model=model,
            model_parameters=param_groups(model, self.t),
            config=plan.ds_config,
            lr_scheduler=make_lr_scheduler(self.t, plan.total_steps),
        )
        self.module = self.engine.module
        self.trainable_names = [n for n, p in self.module.named_parameters() if p.requires_grad]
        self.ema = None
        if self.t.ema_decay:
            from pipelines.train.ema import ShardedEMA

            named = [(n, p) for n, p in self.module.named_parameters() if p.requires_grad]
            self.ema = ShardedEMA(named, self.t.ema_decay, rank=self.rank)

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

        self.step = 0
        self.resumed_from: int | None = None
        self.last_checkpoint_step = 0
        self._restore()
        if self.rank == 0:
            n_train = sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in trainable)
            print(
                f"pyoco: rank 0 ready in {time.perf_counter() - t_start:.1f}s: {type(model.unet).__name__}, "
                f"{n_train / 1e6:.2f}M trainable params, ZeRO-{self.t.zero_stage}, {self.dtype}, "
                f"world {self.world}, step {self.step}/{plan.total_steps}",
                flush=True,
            )
        self.mlflow = self.metrics_logger = None
        if self.rank == 0:
            from pipelines import tracking

            self.mlflow = tracking.client(plan.tracking_uri)
            self.metrics_logger = tracking.MetricsLogger(plan.tracking_uri, plan.run_id)

    # ------------------------------------------------------------------------------------------ checkpoints
    def _state_files(self, root: Path) -> Path:
        d = root / STATE_DIR
        d.mkdir(parents=True, exist_ok=True)
        return d

    def _restore(self) -> None:
        """Resume from Ray's checkpoint, after checking it was written by this config and world size.

        Nothing here runs code from the checkpoint: our own state (RNG, EMA, train_state.json) holds no
        pickles, and DeepSpeed's ``ds/`` files are read with ``weights_only=True``
        (:func:`pipelines.train.deepspeed.use_weights_only_loading`; DeepSpeed 0.19's ``load_checkpoint`` has no
        such argument)."""
        import ray.train

        from pipelines.train.deepspeed import use_weights_only_loading
        from pipelines.train.ema import ema_file, load_ema_state

        ckpt = ray.train.get_checkpoint()
        if ckpt is None:
            return
        with ckpt.as_directory() as d:
            root = Path(d)
            state_dir = root / STATE_DIR
            state_file = state_dir / TRAIN_STATE
            state = json.loads(state_file.read_text()) if state_file.is_file() else {}
            check_resume(state, self.plan.compat, self.world, where=str(ckpt.path))
            use_weights_only_loading(self.engine)
            path, client_state = self.engine.load_checkpoint(
                str(root), tag=CHECKPOINT_TAG, load_optimizer_states=True, load_lr_scheduler_states=True
            )
            if path is None:
                raise RuntimeError(f"{ckpt.path}: no DeepSpeed checkpoint under tag {CHECKPOINT_TAG!r}")
            self.step = int(client_state["step"])
            if self.ema is not None:
                self.ema.load_state_dict(
                    load_ema_state(ema_file(state_dir, self.rank if self.ema.zero3 else 0))
                )
            rng_file = state_dir / f"rng_rank{self.rank:03d}.safetensors"
            if rng_file.exists():
                load_rng_state(rng_file, self.generator)
        self.resumed_from = self.step
        self.last_checkpoint_step = self.step
        if self.rank == 0:
            print(f"pyoco: resumed from step {self.step} ({ckpt.path})", flush=True)

    def save_checkpoint(self, metrics: dict) -> None:
        """Every rank writes its part; Ray merges the folders into one checkpoint in storage."""
        import ray.train

        from pipelines.train.ema import ema_file, save_ema_state

        with tempfile.TemporaryDirectory(prefix="pyoco-ckpt-") as tmp:
            root = Path(tmp)
            self.engine.save_checkpoint(str(root), tag=CHECKPOINT_TAG, client_state={"step": self.step})
            state_dir = self._state_files(root)
            save_rng_state(state_dir / f"rng_rank{self.rank:03d}.safetensors", self.generator)
            if self.ema is not None and (self.ema.zero3 or self.rank == 0):
                save_ema_state(self.ema.state_dict(), ema_file(state_dir, self.rank))
            if self.rank == 0:
                self.module.unet.save_config(str(state_dir / "unet"))
                (state_dir / TRAIN_STATE).write_text(json.dumps(self.train_state(), indent=2, default=str))
            ray.train.report(
                metrics,
                checkpoint=ray.train.Checkpoint.from_directory(tmp),
                checkpoint_dir_name=f"checkpoint_{self.step:08d}",
            )
        self.last_checkpoint_step = self.step

    def train_state(self) -> dict:
        """train_state.json: what a resume checks and what the package is built from."""
        return {
            "step": self.step,
            "zero_stage": self.t.zero_stage,
            "world_size": self.world,
            "image_pretrain": self.image,
            "unet_class": type(self.module.unet).__name__,
            "ema": self.ema is not None,
            "ema_decay": self.t.ema_decay,
            "trainable": self.trainable_names,
            "geometry": self.plan.geometry,
            "scheduler_config": self.scheduler_config,
            "noise": {"kind": self.prior.kind, "alpha": self.prior.alpha},
            "mlflow_run_id": self.plan.run_id,
            "compat": {"hash": compat_hash(self.plan.compat), "fields": self.plan.compat},
        }

    def export(self) -> None:
        """The model package from the final weights, on the workers: every rank takes part in the gather
        (:func:`pipelines.train.gather.gather_fp32_weights`, EMA weights when EMA is on), rank 0 writes the
        package (weights and configs, no optimizer state) to ``plan.export_uri``."""
        from pipelines.train.export import write_package
        from pipelines.train.gather import gather_fp32_weights

        t0 = time.perf_counter()
        weights = gather_fp32_weights(
            self.module, self.ema, zero_stage=self.t.zero_stage, rank=self.rank, world=self.world
        )
        if self.rank != 0:
            return
        from pyoco import storage

        ckpt = storage.join(self.t.storage_path, self.t.run_name, f"checkpoint_{self.step:08d}")
        write_package(
            weights,
            self.train_state(),
            dict(self.module.unet.config),
            self.plan.export_uri,
            which="ema" if self.ema is not None else "raw",
            text_encoder=self.plan.text_encoder,
            lineage={**self.plan.lineage, "checkpoint": ckpt},
            vae=self.plan.vae,
            cache_dir=self.cfg.model.cache_dir,
        )
        print(
            f"pyoco: rank 0 wrote the model package for step {self.step} to {self.plan.export_uri} "
            f"in {time.perf_counter() - t0:.1f}s",
            flush=True,
        )

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
            self.export()
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
