"""``pyoco preprocess``: the command and its config loading (workflow YAML or bare preprocess fields)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from pipelines.common import PyocoError, cli_errors, console
from pyoco.config import ConfigError, PreprocessConfig, PyocoConfig, parse_config, read_yaml


# ----------------------------------------------------------------------------------------------------- CLI
def load_preprocess_config(path: str | None, overrides: dict[str, Any]) -> tuple[PreprocessConfig, dict]:
    """The preprocess section of a workflow YAML, or a YAML of bare preprocess fields; plus extras
    (``ray_address``, ``workflow_hash``)."""
    data = read_yaml(path) if path else {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    extras: dict[str, Any] = {}
    workflow = "preprocess" in data or bool(set(data) - set(PreprocessConfig.model_fields))
    if workflow:
        section = data.get("preprocess") or {}
        if not isinstance(section, dict):
            raise ConfigError(f"{path}: preprocess: must be a mapping")
        data = dict(data)
        data["preprocess"] = {**section, **{k: v for k, v in overrides.items() if v is not None}}
        full = parse_config(data, source=str(path))
        assert isinstance(full, PyocoConfig)
        extras["ray_address"] = full.ray.address
        extras["workflow_hash"] = full.hash()
        return full.preprocess, extras  # type: ignore[return-value]
    data = {**data, **{k: v for k, v in overrides.items() if v is not None}}
    cfg = parse_config(data, source=str(path or "<flags>"), model=PreprocessConfig)
    return cfg, extras  # type: ignore[return-value]


def print_summary(manifest: dict) -> None:
    from rich.table import Table

    table = Table(title=f"preprocess: {manifest['input']} → {manifest['output']}")
    table.add_column("outcome")
    table.add_column("videos", justify="right")
    table.add_row("inputs", str(manifest["inputs"]))
    table.add_row("accepted", str(manifest["accepted_videos"]))
    for reason, n in manifest["rejected"].items():
        table.add_row(f"rejected: {reason}", str(n))
    table.add_row("clips written", str(manifest["clips_written"]))
    for split in ("train", "val"):
        if f"{split}_videos" in manifest:
            table.add_row(
                f"  {split}", f"{manifest[f'{split}_videos']} videos, {manifest[f'{split}_clips']} clips"
            )
    console.print(table)
    console.print(
        f"invariant holds: {manifest['inputs']} = {manifest['accepted_videos']} + "
        f"{sum(manifest['rejected'].values())}; manifest at {manifest['output'].rstrip('/')}/manifest.json "
        f"({manifest['elapsed_s']} s)"
    )


def register(app: typer.Typer) -> None:
    @app.command("preprocess")
    @cli_errors
    def preprocess_cmd(
        config: Path | None = typer.Option(
            None, "--config", help="Workflow YAML (its preprocess: section) or a YAML of preprocess fields."
        ),
        input: str | None = typer.Option(
            None, "--input", help="Shards folder / glob / s3:// prefix, or a video folder."
        ),
        output: str | None = typer.Option(None, "--output", help="Output folder or s3:// prefix."),
        format: str | None = typer.Option(None, "--format", help="auto | webdataset | folder | ucf101."),
        num_frames: int | None = typer.Option(None, "--num-frames", help="Frames per clip."),
        size: int | None = typer.Option(None, "--size", help="Output frame size (square, px)."),
        max_clips: int | None = typer.Option(None, "--max-clips", help="Most clips per video."),
        ray_address: str | None = typer.Option(
            None, "--ray-address", help="Ray cluster (default: $RAY_ADDRESS or local)."
        ),
        no_progress: bool = typer.Option(False, "--no-progress", help="Hide Ray Data progress bars."),
    ) -> None:
        """Turn raw video shards into training clips (parquet), rejects/ and manifest.json."""
        overrides = {
            "input": input,
            "output": output,
            "format": format,
            "num_frames": num_frames,
            "size": size,
            "max_clips_per_video": max_clips,
        }
        if config is None and (input is None or output is None):
            raise PyocoError("give --config FILE, or both --input and --output")
        cfg, extras = load_preprocess_config(str(config) if config else None, overrides)
        from pipelines.preprocess.step import run_preprocess

        manifest = run_preprocess(
            cfg,
            ray_address=ray_address or extras.get("ray_address"),
            progress=not no_progress,
            workflow_hash=extras.get("workflow_hash"),
        )
        print_summary(manifest)
