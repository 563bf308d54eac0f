"""``pyoco data synth``: the deterministic moving-shapes demo dataset (see pyoco.synth)."""

from __future__ import annotations

import typer

from pipelines.common import cli_errors, console

data_app = typer.Typer(help="Datasets: the synthetic moving-shapes demo set.", no_args_is_help=True)


@data_app.command("synth")
@cli_errors
def synth_cmd(
    out: str = typer.Option(..., "--out", help="Output folder or s3:// prefix for the WebDataset shards."),
    videos: int = typer.Option(64, "--videos", min=1, help="Number of videos."),
    shards: int = typer.Option(4, "--shards", min=1, help="Number of tar shards."),
    seed: int = typer.Option(0, "--seed", help="Seed: the same seed gives byte-identical shards."),
    frames: int = typer.Option(24, "--frames", min=1, help="Frames per video."),
    size: int = typer.Option(64, "--size", min=8, help="Frame width and height (px)."),
    fps: int = typer.Option(8, "--fps", min=1, help="Frame rate."),
    cut_fraction: float = typer.Option(
        0.0, "--cut-fraction", min=0, max=1, help="Share of videos with a hard cut (ground truth in .json)."
    ),
    static_fraction: float = typer.Option(
        0.0, "--static-fraction", min=0, max=1, help="Share of videos whose shape stands still."
    ),
) -> None:
    """Write moving coloured shapes as WebDataset shards ({key}.mp4, {key}.txt, {key}.json)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from pyoco.config import SynthConfig
    from pyoco.synth import previous_shards, write_config

    cfg = SynthConfig(
        out=out,
        videos=videos,
        shards=shards,
        seed=seed,
        frames=frames,
        size=size,
        fps=fps,
        cut_fraction=cut_fraction,
        static_fraction=static_fraction,
    )
    previous_shards(cfg.out)  # refuse a foreign folder before drawing a progress bar
    with Progress(
        TextColumn("synth"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=console
    ) as bar:
        task = bar.add_task("videos", total=cfg.videos)
        summary = write_config(cfg, progress=lambda done, total: bar.update(task, completed=done))
    console.print(
        f"wrote {summary['videos']} videos in {len(summary['shards'])} shards "
        f"({summary['bytes'] / 1e6:.1f} MB) to {summary['out']}"
    )


def register(app: typer.Typer) -> None:
    app.add_typer(data_app, name="data")
