"""``pyoco submit``: the command."""

from __future__ import annotations

from pathlib import Path

import typer

from pipelines.common import cli_errors


def register(app: typer.Typer) -> None:
    @app.command("submit")
    @cli_errors
    def submit_cmd(
        config: Path = typer.Option(..., "--config", "-c", help="Workflow YAML (validated here first)."),
        address: str = typer.Option(
            None,
            "--address",
            help="Ray dashboard / Jobs API URL, e.g. http://127.0.0.1:8265 (default: $RAY_ADDRESS if a URL).",
        ),
        wait: bool = typer.Option(False, "--wait", help="Stream the logs and exit with the job's status."),
        submission_id: str = typer.Option(None, "--job-id", help="Submission id (default: pyoco-NAME-TIME)."),
        allow_local_paths: bool = typer.Option(
            False,
            "--allow-local-paths",
            help="Submit to a multi-node cluster even though config paths are local (only for a filesystem "
            "every node mounts at the same absolute path).",
        ),
        entrypoint: str = typer.Option(
            None,
            "--entrypoint",
            hidden=True,
            help="Tests only: replace the entrypoint ({config} = the path).",
        ),
    ) -> None:
        """Submit the workflow as a Ray job (token auth; credentials passed by reference only)."""
        from pipelines.workflow.submit import submit_workflow

        code = submit_workflow(
            config,
            address,
            wait=wait,
            submission_id=submission_id,
            entrypoint_override=entrypoint,
            allow_local_paths=allow_local_paths,
        )
        if code:
            raise typer.Exit(code)
