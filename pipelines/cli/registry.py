"""``pyoco register``, ``promote``, ``rollback`` and ``pyoco registry history``."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from pipelines.common import PyocoError, cli_errors, console
from pipelines.registry.client import CHALLENGER, CHAMPION, DEFAULT_NAME

# ------------------------------------------------------------------------------------------------- CLI
registry_app = typer.Typer(help="Inspect the MLflow model registry.", no_args_is_help=True)

NAME_OPT = typer.Option(DEFAULT_NAME, "--name", help="Registered model name.")


def _champion_cell(e: dict) -> str:
    before, after = e.get("previous_champion"), e.get("champion")
    if e.get("action") in ("promote", "force-promote", "rollback") and before != after:
        return f"v{before} -> v{after}" if before else f"-> v{after}"
    return f"v{after}" if after else "-"


def _print_history(name: str, events: list[dict], desc: dict) -> None:
    import sys

    from rich.console import Console
    from rich.table import Table

    aliases = ", ".join(f"{a}=v{v}" for a, v in sorted(desc["aliases"].items())) or "none"
    table = Table(title=f"{name}: {aliases} (generation {desc['generation']})")
    for col in ("gen", "time (UTC)", "action", "version", "champion", "reason"):
        table.add_column(col, no_wrap=col != "reason")
    for e in events:
        table.add_row(
            str(e.get("generation")),
            str(e.get("time", ""))[:16].replace("T", " "),
            str(e.get("action")),
            f"v{e['version']}" if e.get("version") else "",
            _champion_cell(e),
            str(e.get("reason", "")),
        )
    # piped output (logs, CI) gets a wide table instead of one wrapped at 80 columns
    Console(width=None if sys.stdout.isatty() else 150).print(table)


@registry_app.command("history")
@cli_errors
def history_cmd(
    name: str = NAME_OPT,
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
) -> None:
    """Show the aliases and every register / promote / refuse / rollback event."""
    from pipelines.registry.promote import describe, history

    events = history(name)
    desc = describe(name)
    if as_json:
        print(json.dumps({**desc, "history": events}, indent=2, sort_keys=True))
    else:
        _print_history(name, events, desc)


@cli_errors
def register_cmd(
    run: str | None = typer.Option(None, "--run", help="MLflow run id of the training run."),
    checkpoint: str | None = typer.Option(
        None, "--checkpoint", help="Model package folder (local or s3://), e.g. training's model_dir."
    ),
    name: str = NAME_OPT,
    eval_file: Path | None = typer.Option(None, "--eval", help="JSON written by `pyoco evaluate --out`."),
    config: Path | None = typer.Option(None, "--config", help="pyoco config to store with the model."),
) -> None:
    """Register a model as a new MLflow pyfunc version and set the `challenger` alias."""
    if run is None and checkpoint is None:
        raise PyocoError("give --run RUN_ID or --checkpoint URI")
    cfg = None
    if config is not None:
        from pyoco.config import load_config

        cfg = load_config(config)
    with console.status(f"registering {name}"):
        from pipelines.registry.register import register_model

        result = register_model(name, checkpoint=checkpoint, run_id=run, eval_file=eval_file, config=cfg)
    console.print(f"registered {name} v{result['version']} (run {result['run_id']}) as {CHALLENGER}")
    print(json.dumps({k: result[k] for k in ("name", "version", "run_id", "model_uri", "metrics")}))


@cli_errors
def promote_cmd(
    name: str = NAME_OPT,
    metric: str | None = typer.Option(
        None,
        "--metric",
        help="Evaluation metric that gates promotion (default: fvd with an evaluator configured, else val_loss).",
    ),
    mode: str | None = typer.Option(None, "--mode", help="min: lower is better (default); max: higher."),
    min_improvement: float | None = typer.Option(
        None,
        "--min-improvement",
        help="Required improvement in the metric's units (strictly greater; at least the challenger's CI "
        "half-width).",
    ),
    force: bool = typer.Option(False, "--force", help="Promote even when the challenger is not better."),
    version: str | None = typer.Option(
        None, "--version", help="Promote this version instead of the challenger."
    ),
    reevaluate: bool = typer.Option(
        False,
        "--reevaluate",
        help="When the champion was evaluated on other eval data, evaluate it on the challenger's first.",
    ),
    evaluator: str | None = typer.Option(
        None, "--evaluator", help="Evaluator path (as evaluate.evaluator): makes fvd the default gate."
    ),
    config: Path | None = typer.Option(
        None, "--config", help="pyoco config: its promote: and evaluate: sections give the defaults."
    ),
) -> None:
    """Make the challenger the champion if it beats the champion on the metric (exit 1 if refused)."""
    evaluate_cfg = None
    if config is not None:
        from pyoco.config import load_config

        cfg = load_config(config)
        metric = metric or cfg.promote.metric
        mode = mode or cfg.promote.mode
        min_improvement = cfg.promote.min_improvement if min_improvement is None else min_improvement
        evaluator = evaluator or cfg.evaluate.evaluator
        evaluate_cfg = cfg.evaluate
    if metric is None:  # on stdout: stderr stays the one-line error of a refusal
        from pipelines.registry.promote import default_gate

        typer.echo(default_gate(evaluator)[2])
    from pipelines.registry.promote import promote

    result = promote(
        name,
        metric=metric,
        mode=mode,
        min_improvement=min_improvement or 0.0,
        force=force,
        version=version,
        evaluator=evaluator,
        reevaluate=reevaluate,
        evaluate_cfg=evaluate_cfg,
    )
    if result["promoted"]:
        console.print(f"{name} v{result['version']} is now {CHAMPION}: {result['reason']}")
    else:
        console.print(f"{name}: {result['reason']}")
    print(json.dumps(result, sort_keys=True, default=str))


@cli_errors
def rollback_cmd(name: str = NAME_OPT) -> None:
    """Restore the previous champion."""
    from pipelines.registry.promote import rollback

    result = rollback(name)
    console.print(
        f"{name}: {CHAMPION} rolled back from v{result['rolled_back']} to v{result['champion_version']}"
    )
    print(json.dumps(result, sort_keys=True))


def register(app: typer.Typer) -> None:
    app.command("register")(register_cmd)
    app.command("promote")(promote_cmd)
    app.command("rollback")(rollback_cmd)
    app.add_typer(registry_app, name="registry")
