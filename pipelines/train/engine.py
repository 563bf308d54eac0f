"""The model a rank trains: the (inflated) UNet wrapped as a denoiser, or the 2-D UNet for image
pretraining."""

from __future__ import annotations

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
            )
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
        else:
            model = video(load_unet2d(model_cfg.pretrained, cache_dir=model_cfg.cache_dir))
        return model, load_scheduler_config(model_cfg.pretrained)
    tiny = TinyUNetConfig(**model_cfg.tiny.model_dump())
    return video(build_unet2d(tiny, seed=model_cfg.seed)), None
