"""The ``pyoco`` console script. Each pipelines module adds its own commands through ``register(app)``.

Heavy imports (ray, deepspeed, mlflow) happen inside the commands, so ``pyoco --help`` stays quick.
"""

from __future__ import annotations

import importlib

import typer

app = typer.Typer(
    name="pyoco",
    help=(
        "Finetune an image diffusion model into a video model with the PYoCo correlated noise prior, "
        "on Ray (data + train), DeepSpeed ZeRO and an MLflow model registry."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

# Order is the order of `pyoco --help`.
COMMAND_MODULES = [
    "pipelines.cli.core",  # noise stats, sample
    "pipelines.evaluate.noise_fit",  # noise fit
    "pipelines.cli.data",  # data synth
    "pipelines.cli.preprocess",
    "pipelines.cli.train",
    "pipelines.cli.evaluate",
    "pipelines.evaluate.evaluator",  # evaluator train
    "pipelines.cli.registry",
    "pipelines.cli.workflow",
    "pipelines.cli.submit",
]


def _register_all() -> None:
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as err:
            # Modules still being written are absent; a missing *dependency* of a present module is a bug.
            if err.name == name:
                continue
            raise
        module.register(app)


_register_all()


def main() -> None:
    app()
