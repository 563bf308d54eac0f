"""What a rank trains with: the model (the inflated UNet wrapped as a denoiser, or the 2-D UNet for image
pretraining), and the :class:`Engine` around it (device, dtype, VAE, ``deepspeed.initialize``, EMA)."""

from __future__ import annotations

import dataclasses
from typing import Any

from pipelines.common import PyocoError


# ============================================================================================== the model
def build_denoiser(model_cfg, *, image_pretrain: bool):
    """(VideoDenoiser, pretrained scheduler config or None) for ``model_cfg``.

    ``model.pretrained``: an image UNet folder (diffusers pipeline or bare unet, local or s3://; inflated here
    unless image pretraining) or a video model / pyoco package (trained further as it is). None: the tiny UNet
    from ``model.tiny`` and ``model.seed``."""
    from pyoco.model import (
        TinyUNetConfig,
        VideoDenoiser,
        build_unet2d,
        inflate,
        load_scheduler_config,
        load_unet2d,
        pyoco_model_info,
    )

    def video(unet2d):
        if image_pretrain:
            return VideoDenoiser(unet2d)
        return VideoDenoiser(
            inflate(
                unet2d,
                motion_max_seq_length=model_cfg.motion_max_seq_length,
                motion_num_attention_heads=model_cfg.motion_num_attention_heads,
                seed=model_cfg.seed,
            ),
            motion_branch=model_cfg.motion_branch,
        )

    if image_pretrain and model_cfg.motion_branch:
        raise PyocoError(
            f"model.motion_branch {model_cfg.motion_branch!r}: image pretraining has no motion layers"
        )
    if model_cfg.pretrained:
        info = pyoco_model_info(model_cfg.pretrained) or {}
        if info.get("is_video"):
            if image_pretrain:
                raise PyocoError(
                    f"model.pretrained {model_cfg.pretrained} is a video model; image pretraining "
                    "needs an image UNet (or none)"
                )
            model = VideoDenoiser.from_pretrained(model_cfg.pretrained, cache_dir=model_cfg.cache_dir)
            if model_cfg.motion_branch and model.motion_branch != model_cfg.motion_branch:
                raise PyocoError(
                    f"model.motion_branch is {model_cfg.motion_branch!r} but the video model "
                    f"{model_cfg.pretrained} has {model.motion_branch or 'none'}"
                )
        else:
            model = video(load_unet2d(model_cfg.pretrained, cache_dir=model_cfg.cache_dir))
        return model, load_scheduler_config(model_cfg.pretrained)
    tiny = TinyUNetConfig(**model_cfg.tiny.model_dump())
    return video(build_unet2d(tiny, seed=model_cfg.seed)), None


# ============================================================================================== the engine
@dataclasses.dataclass
class Engine:
    """What one rank trains with, as :func:`setup_engine` built it."""

    device: Any  # torch.device: the rank's GPU, or the CPU
    dtype: Any  # compute dtype: bf16 on GPU (train.precision auto), fp32 on CPU
    engine: Any  # the DeepSpeed engine: forward, backward, step (optimizer and LR schedule), checkpoints
    ema: Any  # pipelines.train.ema.ShardedEMA, or None without train.ema_decay
    vae: Any  # the model's VAE (frozen, eval) when frames are encoded online or samples decoded; else None
    encode_online: bool  # the clips carry frames but the model trains on latents: encode each batch
    scheduler_config: dict  # the noise schedule the loss trains (and the package records)
    trainable_names: list[str]
    num_trainable: int  # trainable parameters (ZeRO-3: the full count, not this rank's partition)


def setup_engine(cfg, plan, geometry, *, rank: int) -> Engine:
    """Device, model, VAE, ``deepspeed.initialize`` and EMA for one rank of ``plan``.

    Ray Train already created the process group (gloo on CPU, NCCL on GPU); DeepSpeed wraps it."""
    import torch

    from pipelines.train.deepspeed import make_lr_scheduler, param_groups, setup_deepspeed, use_bf16
    from pyoco.diffusion import make_scheduler_config

    t = cfg.train
    deepspeed = setup_deepspeed(t.use_gpu)
    if t.use_gpu:
        import ray.train.torch

        device = ray.train.torch.get_device()
    else:
        device = torch.device("cpu")
        torch.set_num_threads(max(1, int(t.resources_per_worker.get("CPU", 1))))
    dtype = torch.bfloat16 if use_bf16(t) else torch.float32

    model, pretrained_sched = build_denoiser(cfg.model, image_pretrain=t.image_pretrain)
    model.set_trainable(cfg.model.train_layers)  # "all" for image pretraining (plan.resolve_config)
    if cfg.model.gradient_checkpointing:
        model.enable_gradient_checkpointing()
    # Resolved once: the checkpoint and the exported package carry the prediction type the loss trains.
    scheduler_config = make_scheduler_config(
        pretrained_sched, t.num_train_timesteps, prediction_type=t.prediction_type
    )
    # The VAE encodes frames online only when the clips carry no latents; with latents it is loaded
    # just to decode the in-training samples.
    vae = None
    encode_online = plan.vae is not None and not geometry.latents
    if plan.vae and (encode_online or t.sample_every):
        from pyoco.model import load_vae

        vae = load_vae(plan.vae, cache_dir=cfg.model.cache_dir).to(device, dtype)
        vae.requires_grad_(False).eval()

    deepspeed.init_distributed(dist_backend="nccl" if t.use_gpu else "gloo")
    trainable = [p for p in model.parameters() if p.requires_grad]
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        model_parameters=param_groups(model, t),
        config=plan.ds_config,
        lr_scheduler=make_lr_scheduler(t, plan.total_steps),
    )
    named = [(n, p) for n, p in engine.module.named_parameters() if p.requires_grad]
    ema = None
    if t.ema_decay:
        from pipelines.train.ema import ShardedEMA

        ema = ShardedEMA(named, t.ema_decay, rank=rank)
    return Engine(
        device=device,
        dtype=dtype,
        engine=engine,
        ema=ema,
        vae=vae,
        encode_online=encode_online,
        scheduler_config=scheduler_config,
        trainable_names=[n for n, _ in named],
        # ZeRO-3 partitions the parameters in place; ds_numel keeps the full size.
        num_trainable=sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in trainable),
    )
