"""Core commands: ``pyoco noise stats``, ``pyoco model init`` and ``pyoco sample``."""

from __future__ import annotations

import time
from pathlib import Path

import typer

from pipelines.common import PyocoError, cli_errors, console

noise_app = typer.Typer(help="Inspect the PYoCo noise prior.", no_args_is_help=True)
model_app = typer.Typer(help="Create video models from image models.", no_args_is_help=True)

NOISE_KINDS = "iid | mixed | progressive"


def _check_alpha(alpha: float) -> None:
    import math

    if not math.isfinite(alpha) or alpha < 0:
        raise PyocoError(f"--alpha must be a finite number >= 0 (got {alpha})")


def noise_stats_table(kind: str, alpha: float, frames: int, *, samples: int = 64, seed: int = 0):
    """(theory, empirical) T x T correlation matrices from ``samples`` clips of 4 x 32 x 32 noise."""
    import torch

    from pyoco.noise import empirical_frame_correlation, make_prior

    prior = make_prior(kind, alpha)
    eps = prior.sample((samples, 4, frames, 32, 32), generator=torch.Generator().manual_seed(seed))
    return prior, prior.covariance(frames), empirical_frame_correlation(eps)


def print_noise_stats(kind: str, alpha: float, frames: int) -> float:
    from rich.console import Console
    from rich.table import Table

    prior, theory, emp = noise_stats_table(kind, alpha, frames)
    table = Table(title=f"frame correlation, {kind} prior, alpha={alpha:g} (rho={prior.rho:.4f}), T={frames}")
    table.add_column("lag", justify="right")
    table.add_column("theory", justify="right")
    table.add_column("empirical", justify="right")
    table.add_column("max |diff|", justify="right")
    worst = 0.0
    for lag in range(frames):
        th = theory.diagonal(lag)
        em = emp.diagonal(lag)
        diff = float((th - em).abs().max())
        worst = max(worst, diff)
        table.add_row(str(lag), f"{float(th.mean()):.4f}", f"{float(em.mean()):.4f}", f"{diff:.4f}")
    Console().print(table)
    print(
        f"max |empirical - theory| over all frame pairs: {worst:.4f} ({64 * 4 * 32 * 32:,} draws per frame)"
    )
    return worst


@noise_app.command("stats")
@cli_errors
def noise_stats(
    kind: str = typer.Option("progressive", "--kind", help=f"Noise prior: {NOISE_KINDS}."),
    alpha: float = typer.Option(1.0, "--alpha", help="The paper's alpha (>= 0)."),
    frames: int = typer.Option(16, "--frames", min=1, help="Number of frames T."),
    png: Path | None = typer.Option(None, "--png", help="Also save a heatmap (theory | empirical) here."),
) -> None:
    """Print theoretical against empirical frame correlations of the prior."""
    _check_alpha(alpha)
    from pyoco.noise import make_prior

    make_prior(kind, alpha)  # validates kind
    print_noise_stats(kind, alpha, frames)
    if png is not None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        _, theory, emp = noise_stats_table(kind, alpha, frames)
        fig, axes = plt.subplots(1, 2, figsize=(8, 3.6))
        for ax, mat, title in zip(axes, (theory, emp), ("theory", "empirical"), strict=True):
            im = ax.imshow(mat.numpy(), vmin=0, vmax=1, cmap="viridis")
            ax.set_title(f"{title}: {kind}, alpha={alpha:g}")
            ax.set_xlabel("frame")
            ax.set_ylabel("frame")
        fig.colorbar(im, ax=axes, shrink=0.8)
        png.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(png, dpi=100)
        print(f"heatmap: {png}")


@model_app.command("init")
@cli_errors
def model_init(
    out: Path = typer.Option(..., "--out", help="Folder to write the video model package to."),
    pretrained: str | None = typer.Option(
        None,
        "--pretrained",
        help="Diffusers image model folder (local or s3://). Default: a tiny random UNet.",
    ),
    size: int = typer.Option(32, "--size", min=8, help="Sample height/width in pixels (tiny model)."),
    frames: int = typer.Option(8, "--frames", min=1, help="Default number of frames to sample."),
    noise: str = typer.Option(
        "progressive", "--noise", help=f"Default prior recorded with it: {NOISE_KINDS}."
    ),
    alpha: float = typer.Option(1.0, "--alpha", help="Default alpha recorded with it."),
    seed: int = typer.Option(0, "--seed", help="Seed for the tiny UNet's weights."),
    vae: str | None = typer.Option(None, "--vae", help="VAE folder overriding the pretrained folder's vae/."),
    text_encoder: str | None = typer.Option(
        None,
        "--text-encoder",
        help="'minilm' or a CLIP folder (default: the pretrained folder's, else MiniLM).",
    ),
) -> None:
    """Inflate an image UNet into a video model (temporal layers zero-initialised) and save it. From a
    Stable-Diffusion-style folder the package also carries its VAE and CLIP text encoder."""
    _check_alpha(alpha)
    from pyoco.noise import make_prior

    make_prior(noise, alpha)
    root = build_initial_package(
        out,
        pretrained=pretrained,
        size=size,
        frames=frames,
        noise=noise,
        alpha=alpha,
        seed=seed,
        vae=vae,
        text_encoder=text_encoder,
    )
    from pyoco.package import read_info

    info = read_info(root)
    kind = "latent" if info.has_vae else "pixel-space"
    console.print(
        f"video model written to {out} ({kind}, {info.height}x{info.width} px, "
        f"text encoder {info.text_encoder['kind']})"
    )


def build_initial_package(
    out,
    *,
    pretrained=None,
    size=32,
    frames=8,
    noise="progressive",
    alpha=1.0,
    seed=0,
    vae=None,
    text_encoder=None,
):
    """A raw (untrained) video package: the pretrained folder's UNet inflated, with its VAE, text encoder
    and scheduler (pyoco.pretrained), or the tiny UNet at ``size`` px; the pixel size of a pretrained
    model is its UNet's sample_size times the VAE factor."""
    from pyoco.config import ModelConfig
    from pyoco.diffusion import make_scheduler_config
    from pyoco.model import TinyUNetConfig, VideoDenoiser, build_unet2d, inflate, load_unet2d, load_vae
    from pyoco.package import PackageInfo, save_package
    from pyoco.pretrained import check_compatible, resolve_pretrained
    from pyoco.text import load_text_encoder

    spec = resolve_pretrained(
        ModelConfig(
            pretrained=pretrained or None, vae=vae, text_encoder=text_encoder, tiny={"sample_size": size}
        )
    )
    check_compatible(spec)
    if pretrained:
        unet2d = load_unet2d(spec.unet)
        size = spec.pixel_size
    else:
        unet2d = build_unet2d(TinyUNetConfig(sample_size=size), seed=seed)
    vae_model = load_vae(spec.vae) if spec.vae else None
    # MiniLM is referenced, not copied (it ships with pyoco); the package default already names it.
    encoder = None if spec.text_encoder == "minilm" else load_text_encoder(spec.text_encoder)
    video = VideoDenoiser(inflate(unet2d))
    info = PackageInfo(
        noise={"kind": noise, "alpha": alpha}, height=size, width=size, num_frames=frames, weights="raw"
    )
    return save_package(
        out,
        video,
        scheduler_config=make_scheduler_config(spec.scheduler_config),
        info=info,
        vae=vae_model,
        text_encoder=encoder,
    )


def resolve_model(model: str) -> str:
    """A local folder for ``model``: a path, an s3:// URI, or models:/NAME@ALIAS from the registry."""
    if model.startswith("models:/") or model.startswith("runs:/"):
        from pipelines.registry.resolve import resolve_model_uri

        return resolve_model_uri(model)
    return model


def sample_to_files(
    model: str,
    prompt: str,
    out: Path,
    *,
    frames: int | None = None,
    steps: int = 20,
    guidance: float = 3.0,
    noise: str | None = None,
    alpha: float | None = None,
    seed: int = 0,
    eta: float = 0.0,
    fps: int | None = None,
    gif: bool = False,
    device: str = "cpu",
) -> dict:
    """Sample one video and write it as mp4 (and GIF). ``device`` "gpu": the sampling runs in a one-GPU
    Ray task (:mod:`pipelines.gpu`), which reads the model from its (resolved) URI itself; "cpu": here."""
    from pyoco.video import write_gif, write_mp4

    kw = dict(frames=frames, steps=steps, guidance=guidance, noise=noise, alpha=alpha, seed=seed, eta=eta)
    t0 = time.perf_counter()
    if device == "gpu":
        from pipelines.gpu import run_on_gpu

        video, info = run_on_gpu(
            sample_video_frames, resolve_model(model), prompt, setting="--device gpu", **kw
        )
    else:
        video, info = sample_video_frames(resolve_model(model), prompt, **kw)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_mp4(video, str(out), fps=fps or info["fps"])
    outputs = {"mp4": str(out)}
    if gif:
        gif_path = out.with_suffix(".gif")
        write_gif(video, str(gif_path), fps=fps or info["fps"])
        outputs["gif"] = str(gif_path)
    return {
        "frames": info["frames"],
        "seconds": time.perf_counter() - t0,
        "prior": info["prior"],
        "device": info["device"],
        **outputs,
    }


def sample_video_frames(
    model_uri: str,
    prompt: str,
    *,
    frames: int | None,
    steps: int,
    guidance: float,
    noise: str | None,
    alpha: float | None,
    seed: int,
    eta: float,
    device: str = "cpu",
):
    """(uint8 (T, H, W, 3) numpy video, facts) for ``prompt`` from the package at ``model_uri``, on
    ``device``."""
    from pyoco.package import load_package
    from pyoco.sampling import generate

    pkg = load_package(model_uri, device=device)
    prior = pkg.prior(noise, alpha)
    num_frames = frames or pkg.info.num_frames
    video = generate(
        pkg.denoiser,
        pkg.text_encoder(),
        [prompt],
        prior=prior,
        num_frames=num_frames,
        height=pkg.info.height,
        width=pkg.info.width,
        steps=steps,
        guidance=guidance,
        seed=seed,
        eta=eta,
        scheduler_config=pkg.scheduler_config,
        vae=pkg.vae,
        device=device,
    )[0]
    facts = {"frames": num_frames, "fps": pkg.info.fps, "prior": prior.describe(), "device": str(device)}
    return video.cpu().numpy(), facts


@cli_errors
def sample(
    model: str = typer.Option(
        ..., "--model", help="Model folder (local or s3://) or registry URI models:/NAME@ALIAS."
    ),
    prompt: str = typer.Option(..., "--prompt", help="Text prompt."),
    out: Path = typer.Option(..., "--out", help="Output .mp4 file."),
    frames: int | None = typer.Option(
        None, "--frames", min=1, help="Frames to generate (default: the model's)."
    ),
    steps: int = typer.Option(20, "--steps", min=1, help="DDIM steps."),
    guidance: float = typer.Option(3.0, "--guidance", help="Classifier-free guidance scale (1 = off)."),
    noise: str | None = typer.Option(
        None, "--noise", help=f"Noise prior: {NOISE_KINDS} (default: the model's)."
    ),
    alpha: float | None = typer.Option(None, "--alpha", help="Prior alpha >= 0 (default: the model's)."),
    seed: int = typer.Option(0, "--seed", help="Random seed; the same seed gives the same video."),
    eta: float = typer.Option(0.0, "--eta", min=0.0, help="DDIM eta; > 0 draws step noise from the prior."),
    fps: int | None = typer.Option(
        None, "--fps", min=1, help="Frame rate of the mp4 (default: the model's)."
    ),
    gif: bool = typer.Option(False, "--gif", help="Also write a GIF next to the mp4."),
    device: str = typer.Option(
        "cpu",
        "--device",
        help="cpu: sample in this process. gpu: in a one-GPU Ray task ($RAY_ADDRESS, else an embedded Ray); "
        "the model must be reachable from that node (s3://, a shared path or models:/).",
    ),
) -> None:
    """Generate a video from a text prompt and write it as mp4."""
    if device not in ("cpu", "gpu"):
        raise PyocoError(f"--device must be cpu or gpu (got {device!r})")
    if alpha is not None:
        _check_alpha(alpha)
    if noise is not None:
        from pyoco.noise import KINDS

        if noise not in KINDS:
            raise PyocoError(f"--noise must be one of {NOISE_KINDS} (got {noise!r})")
    if out.suffix.lower() != ".mp4":
        raise PyocoError(f"--out must end in .mp4 (got {out})")
    if not (model.startswith(("models:/", "runs:/", "s3://")) or Path(model).exists()):
        raise PyocoError(f"--model {model}: no such model folder")
    with console.status(f"sampling {frames or 'default'} frames, {steps} steps"):
        result = sample_to_files(
            model,
            prompt,
            out,
            frames=frames,
            steps=steps,
            guidance=guidance,
            noise=noise,
            alpha=alpha,
            seed=seed,
            eta=eta,
            fps=fps,
            gif=gif,
            device=device,
        )
    console.print(
        f"wrote {result['mp4']} ({result['frames']} frames, {result['prior']['kind']} prior, "
        f"alpha={result['prior']['alpha']:g}) in {result['seconds']:.1f}s"
    )


def register(app: typer.Typer) -> None:
    app.add_typer(noise_app, name="noise")
    app.add_typer(model_app, name="model")
    app.command("sample")(sample)
