"""``pyoco run``: the command."""

from __future__ import annotations

import time
from pathlib import Path

import typer

from pipelines.common import PyocoError, cli_errors, console
from pipelines.context import RunContext
from pipelines.workflow.state import join
from pipelines.workflow.steps import STEP_ORDER
from pyoco.config import load_config


@cli_errors
def run_cmd(
    config: Path = typer.Option(..., "--config", help="Workflow YAML (see pipelines/configs/)."),
    from_step: str | None = typer.Option(
        None, "--from", help=f"Re-run from this step: {', '.join(STEP_ORDER)}."
    ),
    only: str | None = typer.Option(None, "--only", help="Run just this step (earlier outputs must exist)."),
    verbose: bool = typer.Option(
        False,
        "--verbose",
        "-v",
        help="Show Ray's, MLflow's and DeepSpeed's own output here, not in the log file.",
    ),
) -> None:
    """Run the whole workflow: preprocess, train, evaluate, register, promote (cached per step)."""
    if from_step and only:
        raise PyocoError("use --from or --only, not both")
    cfg = load_config(config)
    ctx = RunContext.from_config(cfg, verbose=verbose)
    t0 = time.perf_counter()
    from pipelines.workflow.runner import print_summary, run_workflow

    summary = run_workflow(cfg, from_step=from_step, only=only, ctx=ctx)
    print_summary(cfg, summary)
    console.print(
        f"workflow finished in {time.perf_counter() - t0:.1f}s; state: {join(cfg.output, 'workflow')}"
    )
    from pipelines.tracking import redact_uri

    uri = redact_uri(ctx.tracking_uri)
    ui = f"mlflow ui --backend-store-uri {uri}" if uri.startswith("sqlite") else f"open {uri}"
    console.print(f"MLflow: {uri}  (UI: {ui})")
    if not verbose:
        console.print(f"log: {ctx.log_file}", soft_wrap=True)


def register(app: typer.Typer) -> None:
    app.command("run")(run_cmd)
