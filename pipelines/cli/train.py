"""``pyoco train`` and ``pyoco pretrain-image``: the commands and their flag overrides."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from pipelines.common import cli_errors, console
from pyoco.config import load_config


# ==================================================================================================== CLI
def _overrides(prefix: str, **values) -> dict:
    return {f"{prefix}.{k}": v for k, v in values.items() if v is not None}


def parse_sets(items: list[str]) -> dict:
    """``["train.lr=5e-4", "model.pretrained=./x"]`` -> dotted overrides, each value read as YAML (numbers,
    booleans, lists); a malformed item is a one-line ConfigError."""
    import yaml

    from pyoco.config import ConfigError

    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip() or "." not in key:
            raise ConfigError(f"--set {item!r}: expected SECTION.FIELD=VALUE, e.g. train.lr=5e-4")
        try:
            parsed = yaml.safe_load(value)
        except yaml.YAMLError as err:
            raise ConfigError(f"--set {item!r}: the value is not YAML ({err.problem})") from None
        if parsed is None:  # load_config skips None overrides: refuse rather than ignore it
            raise ConfigError(f"--set {item!r}: an empty or null value cannot be set here; edit the config")
        out[key.strip()] = parsed
    return out


def register(app: typer.Typer) -> None:
    @app.command("train")
    @cli_errors
    def train_cmd(
        config: Path = typer.Option(
            ..., "--config", help="Workflow YAML (train:, model:, noise:, mlflow: sections)."
        ),
        data: str | None = typer.Option(
            None, "--data", help="Clips folder (default: {preprocess.output}/clips/train)."
        ),
        output: str | None = typer.Option(None, "--output", help="Where the exported model package goes."),
        storage_path: str | None = typer.Option(
            None, "--storage-path", help="Ray Train storage (local or s3://)."
        ),
        max_steps: int | None = typer.Option(
            None, "--max-steps", min=1, help="Optimizer steps to train for."
        ),
        num_workers: int | None = typer.Option(None, "--num-workers", help="Ray Train workers."),
        zero_stage: int | None = typer.Option(None, "--zero-stage", help="DeepSpeed ZeRO stage 0-3."),
        sets: list[str] = typer.Option(
            [], "--set", help="Any config field, SECTION.FIELD=VALUE (repeatable), e.g. --set train.lr=5e-4."
        ),
    ) -> None:
        """Finetune the inflated video model on Ray Train + DeepSpeed; export it and log to MLflow."""
        over = parse_sets(sets) | _overrides(
            "train",
            data=data,
            output=output,
            storage_path=storage_path,
            num_workers=num_workers,
            zero_stage=zero_stage,
        )
        cfg = load_config(config, over)
        if max_steps is not None:  # --max-steps replaces the config's stop (max_steps or epochs)
            cfg.train = cfg.train.model_copy(update={"max_steps": max_steps, "epochs": None})
        from pipelines.train.driver import run_train

        _print_result(run_train(cfg))

    @app.command("pretrain-image")
    @cli_errors
    def pretrain_cmd(
        config: Path = typer.Option(
            ..., "--config", help="Workflow YAML (its pretrain: section, else defaults)."
        ),
        data: str | None = typer.Option(None, "--data", help="Clips folder (default: train.data)."),
        output: str | None = typer.Option(None, "--output", help="Where the image model package goes."),
        max_steps: int | None = typer.Option(
            None, "--max-steps", min=1, help="Optimizer steps to train for."
        ),
    ) -> None:
        """Train the 2-D image UNet on single frames (T = 1, iid noise): a base model to finetune from."""
        cfg = load_config(config)
        from pipelines.train.driver import run_train
        from pipelines.train.plan import pretrain_config

        p = pretrain_config(cfg)
        if data is not None:
            p.train.data = data
        if output is not None:
            p.train.output = output
        if max_steps is not None:
            p.train = p.train.model_copy(update={"max_steps": max_steps, "epochs": None})
        _print_result(run_train(p, image_pretrain=True))


def _print_result(result: dict) -> None:
    console.print(
        f"done: step {result['final_step']}, model ({result['weights']} weights) at {result['model_dir']}\n"
        f"checkpoint {result['checkpoint']}\nMLflow run {result['mlflow_run_id']} at {result['tracking_uri']}"
    )
    print(json.dumps({k: v for k, v in result.items() if k != "metrics"}))
