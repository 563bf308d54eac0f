"""``pyoco evaluate``: the command and its summary lines."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from pipelines.common import cli_errors, console
from pipelines.evaluate.summary import summary_lines


# ------------------------------------------------------------------------------------------------- CLI
@cli_errors
def evaluate_cmd(
    checkpoint: str = typer.Option(..., "--checkpoint", help="Model package folder (local or s3://)."),
    data: str = typer.Option(..., "--data", help="Preprocess output folder (evaluate reads clips/val)."),
    num_clips: int | None = typer.Option(None, "--num-clips", min=1, help="Val clips for val_loss."),
    num_videos: int | None = typer.Option(
        None, "--num-videos", min=1, help="Generated videos (default: val clips, at least 64)."
    ),
    seed: int | None = typer.Option(None, "--seed", help="Noise seed (fixed per clip and per video)."),
    config: Path | None = typer.Option(None, "--config", help="pyoco config; its evaluate: section is used."),
    evaluator: Path | None = typer.Option(
        None,
        "--evaluator",
        "--fvd-extractor",
        help="TorchScript evaluator (`pyoco evaluator train` output, or an I3D export) for FVD/accuracy.",
    ),
    out: Path | None = typer.Option(None, "--out", help="Write the results JSON here."),
    mlflow_run: str | None = typer.Option(
        None, "--mlflow-run", help="Log into this MLflow run (default: a new run)."
    ),
    no_mlflow: bool = typer.Option(False, "--no-mlflow", help="Do not log to MLflow."),
) -> None:
    """FVD, prompt accuracy and class score (with an evaluator), motion gap and val_loss on the val split."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from pyoco.config import load_config

    overrides = {
        "evaluate.num_clips": num_clips,
        "evaluate.num_videos": num_videos,
        "evaluate.seed": seed,
        "evaluate.evaluator": str(evaluator) if evaluator else None,
        "evaluate.output": str(out) if out else None,
    }
    cfg = load_config(config, overrides)
    # The bar starts with the first sampled batch, so input errors stay one line.
    bar = Progress(
        TextColumn("evaluate: sampling"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
    )
    task = None

    def progress(done: int, total: int) -> None:
        nonlocal task
        if task is None:
            bar.start()
            task = bar.add_task("videos", total=total)
        bar.update(task, completed=done)

    try:
        from pipelines.evaluate.step import run_evaluate

        results = run_evaluate(
            checkpoint,
            data,
            cfg.evaluate,
            model_cfg=cfg.model,
            noise=None,
            mlflow_run_id=mlflow_run,
            log_to_mlflow=not no_mlflow,
            tracking_uri=cfg.mlflow.tracking_uri,
            experiment=cfg.mlflow.experiment,
            progress=progress,
            ray_address=cfg.ray.address,
        )
    finally:
        bar.stop()
    for line in summary_lines(results):
        console.print(line)
    print(json.dumps(results["metrics"], sort_keys=True))


def register(app: typer.Typer) -> None:
    app.command("evaluate")(evaluate_cmd)
