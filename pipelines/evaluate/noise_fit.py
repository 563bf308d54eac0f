"""``pyoco noise fit``: choose the prior from your own data (Ge et al. 2023, Sec. 3.1; math in pyoco.noisefit).

DDIM-invert every frame of the val clips independently with the *image* model (in latent space when it
has a VAE), measure how correlated the recovered noise is across frames, and fit ``mixed`` and
``progressive`` to it. Writes ``fit.json`` (and a PNG), logs both to MLflow, and is what
``noise: {kind: auto, alpha: auto}`` runs as a workflow step.

Layouts: clips are read as uint8 (N, T, H, W, 3), turned into (N, 3, T, H, W) float in [-1, 1] (then VAE
latents (N, c, T, h, w) for latent models); caption states (N, L, D) with their (N, L) mask.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import typer

from pipelines.common import PyocoError, cli_errors, console


@dataclass(frozen=True)
class NoiseFitResult:
    """What the workflow records: the fitted prior and where the report is."""

    kind: str
    alpha: float
    rho: float
    lag1: float
    json_uri: str
    png_uri: str | None
    run_id: str | None

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


def load_image_model(uri: str, *, device: str = "cpu"):
    """(denoiser, scheduler_config, vae or None) from a pyoco package or a diffusers pipeline folder."""
    from pyoco import storage
    from pyoco.model import VideoDenoiser, load_scheduler_config, load_unet2d, load_vae, resolve_component
    from pyoco.package import PACKAGE_FILE, load_package

    if not storage.exists(uri):
        raise PyocoError(f"--model {uri}: not found")
    if storage.exists(storage.join(uri, PACKAGE_FILE)):
        pkg = load_package(str(uri), device=device)
        return pkg.denoiser, pkg.scheduler_config, pkg.vae
    try:
        unet = load_unet2d(str(uri))
    except (FileNotFoundError, ValueError) as err:
        raise PyocoError(f"--model {uri}: not an image model ({err})") from None
    vae = None
    try:
        resolve_component(str(uri), "vae")
        vae = load_vae(str(uri)).to(device).eval()
    except (FileNotFoundError, ValueError):
        vae = None
    return VideoDenoiser(unet).to(device).eval(), load_scheduler_config(str(uri)), vae


def load_val_clips(data: str, num_clips: int, *, split: str = "val"):
    """(x (N, 3, T, H, W) in [-1, 1], cond (N, L, D), mask (N, L)) from the first clips by clip_id."""
    import numpy as np
    import torch

    from pyoco.clips import DataError, embedding_arrays, frames_array, read_clips

    try:
        table = read_clips(data, split, limit=num_clips)
    except DataError as err:
        raise PyocoError(str(err)) from None
    if table.num_rows < 2:
        raise PyocoError(f"{data}: noise fit needs at least 2 {split} clips (found {table.num_rows})")
    try:
        rows = table.select(["frames", "num_frames", "height", "width"]).to_pylist()
        frames = np.stack([frames_array(row) for row in rows])
    except DataError as err:  # latents-only clips: the fit inverts pixel frames
        raise PyocoError(f"{data}: {err}") from None
    emb, mask = embedding_arrays(table)
    x = torch.from_numpy(frames).float().div(127.5).sub(1.0).permute(0, 4, 1, 2, 3).contiguous()
    return x, torch.from_numpy(np.array(emb)), torch.from_numpy(np.array(mask))


def run_noise_fit(
    *,
    model: str,
    data: str,
    out: str,
    png: str | None = None,
    num_clips: int = 32,
    steps: int = 50,
    seed: int = 0,
    split: str = "val",
    tracking_uri: str | None = None,
    experiment: str | None = "pyoco-noise-fit",
) -> NoiseFitResult:
    import torch

    from pyoco import noisefit as nf
    from pyoco import storage
    from pyoco.model import decode_video, encode_video

    torch.manual_seed(seed)
    x, cond, mask = load_val_clips(data, num_clips, split=split)
    denoiser, scheduler_config, vae = load_image_model(model)
    if denoiser.is_video:
        raise PyocoError(f"--model {model}: a video model; noise fit inverts frames with the image model")
    width = int(denoiser.config.cross_attention_dim)
    if cond.shape[-1] != width:
        raise PyocoError(
            f"{data}: caption_embedding width {cond.shape[-1]} != the model's unet.config.cross_attention_dim "
            f"{width} (preprocess with the model's text encoder)"
        )
    with torch.no_grad():
        z0 = encode_video(vae, x) if vae is not None else x
        x_t, rec = nf.ddim_invert(denoiser, z0, cond, mask, scheduler_config=scheduler_config, steps=steps)
        rec_pixels = decode_video(vae, rec).clamp(-1, 1) if vae is not None else rec.clamp(-1, 1)
    result = nf.summarise(
        x_t,
        reconstruction_psnr_db=nf.psnr(rec_pixels, x),
        steps=steps,
        space="latents" if vae is not None else "pixels",
        seed=seed,
    )
    result.extra.update({"model": model, "data": data, "split": split})
    storage.write_bytes(out, json.dumps(result.to_json(), indent=2).encode())
    if png is not None:
        local_png = png
        if "://" in png:
            local_png = str(Path(os.environ.get("TMPDIR", "/tmp")) / f"pyoco-noise-fit-{os.getpid()}.png")
        nf.plot(result, local_png)
        if local_png != png:
            storage.write_bytes(png, Path(local_png).read_bytes())
    run_id = _log_to_mlflow(result, out, png, tracking_uri, experiment) if experiment else None
    fit = result.fit
    return NoiseFitResult(
        kind=fit["kind"],
        alpha=float(fit["alpha"]),
        rho=float(fit["rho"]),
        lag1=float(result.lag_correlation[0]),
        json_uri=out,
        png_uri=png,
        run_id=run_id,
    )


def _log_to_mlflow(result, out: str, png: str | None, tracking_uri: str | None, experiment: str) -> str:
    from pipelines import tracking

    uri = tracking.resolve_tracking_uri(tracking_uri)
    run_id = tracking.start_run(uri, experiment, run_name="noise-fit", tags={"pyoco.step": "noise_fit"})
    try:
        fit = result.fit
        tracking.log_params(
            uri,
            run_id,
            {
                "model": result.extra["model"],
                "data": result.extra["data"],
                "steps": result.steps,
                "num_clips": result.num_clips,
                "space": result.space,
            },  # fmt: skip
        )
        metrics = {f"lag_correlation_{k + 1}": v for k, v in enumerate(result.lag_correlation)}
        metrics.update(
            cross_video_correlation=result.cross_video_correlation,
            spatial_neighbour_correlation=result.spatial_neighbour_correlation,
            reconstruction_psnr_db=min(result.reconstruction_psnr_db, 1e6),
            fit_alpha=fit["alpha"],
            fit_rho=fit["rho"],
        )
        tracking.log_metrics(uri, run_id, metrics, step=0)
        tracking.set_tags(uri, run_id, {"pyoco.noise_fit.kind": fit["kind"]})
        tracking.log_text(uri, run_id, json.dumps(result.to_json(), indent=2), "noise_fit/fit.json")
        if png is not None and "://" not in png:
            tracking.log_artifact(uri, run_id, png, "noise_fit")
        tracking.end_run(uri, run_id)
    except BaseException:
        tracking.end_run(uri, run_id, "FAILED")
        raise
    return run_id


@cli_errors
def noise_fit_cmd(
    model: str = typer.Option(
        ..., "--model", help="Image model: a pyoco package or a diffusers pipeline folder."
    ),
    data: str = typer.Option(..., "--data", help="Preprocess output folder (reads clips/val)."),
    num_clips: int = typer.Option(32, "--num-clips", min=2, help="Val clips to invert."),
    steps: int = typer.Option(50, "--steps", min=1, help="DDIM inversion steps."),
    out: str = typer.Option("fit.json", "--out", help="Where to write the JSON report (local or s3://)."),
    png: str | None = typer.Option(None, "--png", help="Also plot the lag correlation and both fits here."),
    seed: int = typer.Option(0, "--seed", help="Seed of the bootstrap CIs."),
    tracking_uri: str | None = typer.Option(
        None, "--tracking-uri", help="MLflow (default: MLFLOW_TRACKING_URI)."
    ),
    experiment: str = typer.Option("pyoco-noise-fit", "--experiment", help="MLflow experiment."),
    no_mlflow: bool = typer.Option(False, "--no-mlflow", help="Don't log the result to MLflow."),
) -> None:
    """DDIM-invert val frames with the image model and fit the noise prior (kind, alpha) to them."""
    console.print(f"noise fit: inverting up to {num_clips} val clips of {data} with {steps} DDIM steps")
    res = run_noise_fit(
        model=model,
        data=data,
        out=out,
        png=png,
        num_clips=num_clips,
        steps=steps,
        seed=seed,
        tracking_uri=tracking_uri,
        experiment=None if no_mlflow else experiment,
    )
    from pyoco import storage

    report = json.loads(storage.read_bytes(out))
    lags, cis = report["lag_correlation"], report["lag_correlation_ci"]
    for k, (r, (lo, hi)) in enumerate(zip(lags, cis, strict=True), start=1):
        console.print(f"  lag {k}: r = {r:+.3f}  (95% CI {lo:+.3f} .. {hi:+.3f})")
    console.print(
        f"  cross-video {report['cross_video_correlation']:+.3f}, spatial neighbour "
        f"{report['spatial_neighbour_correlation']:+.3f}, reconstruction {report['reconstruction_psnr_db']:.1f} dB"
    )
    console.print(
        f"best fit: noise.kind={res.kind} noise.alpha={res.alpha:.3f} (rho={res.rho:.3f}); report {out}"
    )
    if png:
        console.print(f"plot: {png}")


def register(app: typer.Typer) -> None:
    from pipelines.cli.core import noise_app

    noise_app.command("fit")(noise_fit_cmd)
