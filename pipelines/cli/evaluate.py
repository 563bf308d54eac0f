"""``pyoco evaluate``: the command and its summary lines."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer

from pipelines.common import cli_errors, console


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


def summary_lines(results: dict[str, Any]) -> list[str]:
    """Human-readable lines: FVD, prompt accuracy, class score and motion gap with CIs, then val_loss."""
    lines = []
    fvd = results["fvd"]
    if fvd["status"] == "computed":
        ref = f"; real-vs-real halves {fvd['real_halves']:.3f}" if fvd.get("real_halves") is not None else ""
        lines.append(
            f"FVD {fvd['value']:.3f} [95% CI {fvd['ci_low']:.3f}, {fvd['ci_high']:.3f}] over "
            f"{fvd['num_generated']} generated vs {fvd['num_real']} val clips{ref}"
        )
    else:
        lines.append(f"FVD: skipped ({fvd['reason']})")
    if results["prompt_accuracy"].get("status") != "skipped":
        for name, acc in results["prompt_accuracy"].items():
            if acc.get("value") is None:
                lines.append(f"prompt accuracy {name}: n/a ({acc['reason']})")
                continue
            score = results["inception_score"][name]
            lines.append(
                f"prompt accuracy {name}: {acc['value']:.3f} [{acc['ci_low']:.3f}, {acc['ci_high']:.3f}] "
                f"(chance {acc['chance']:.3f}; evaluator on real val {acc['evaluator_accuracy_on_real']:.3f}); "
                f"class score {score['value']:.2f} [{score['ci_low']:.2f}, {score['ci_high']:.2f}] of {score['max']}"
            )
    m = results["motion"]
    lines.append(
        f"motion gap {m['motion_gap']:.4f} [{m['motion_gap_ci_low']:.4f}, {m['motion_gap_ci_high']:.4f}] "
        f"(mean |Δframe| generated {m['motion_mean_generated']:.4f}, real {m['motion_mean_real']:.4f})"
    )
    per_t = ", ".join(f"t={t}: {v:.5f}" for t, v in results["val_loss_per_timestep"].items())
    lines.append(f"val_loss {results['val_loss']:.6f} under the model's own prior ({per_t})")
    return lines


def register(app: typer.Typer) -> None:
    app.command("evaluate")(evaluate_cmd)
