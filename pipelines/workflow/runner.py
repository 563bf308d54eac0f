"""``pyoco run``: the whole workflow as cached steps, on an embedded Ray or inside a Ray job.

    synth? -> preprocess -> evaluator? -> pretrain? -> noise_fit? -> train -> evaluate -> register -> promote
    -> sample

(``evaluator`` trains the learned evaluator when the config has an ``evaluator:`` section; ``noise_fit``
runs when ``noise.kind`` or ``noise.alpha`` is ``auto`` and fits them with the image model.)

(Image pretraining runs after preprocess because it trains on the preprocessed clips' frames.)

Each step has a cache key: the hash of its own resolved config section plus the identities of what it
consumes (the data manifest's hash, the model export's content stamp, the registered version...). The
state lives next to the outputs, in ``{output}/workflow/state.json`` (local or s3://). On a re-run a step
whose key is unchanged is skipped, and the log says so; a step that runs makes every later step run too.
A failing step is recorded as failed with its message, the workflow stops, and the next ``pyoco run``
resumes from it (earlier steps are skipped by their keys).

MLflow mirrors it: one parent run per ``pyoco run`` with a nested run per step (skipped steps included,
tagged ``pyoco.step.status=skipped``); the training run is re-parented under its step.

Every step gets the same :class:`pipelines.context.RunContext`, built once from the config and the environment
(``mlflow.tracking_uri`` else ``$MLFLOW_TRACKING_URI``): train, evaluate, register, promote and sample all use
that one MLflow server and experiment, and the keys of the steps that read or write MLflow cover it. The whole
workflow shares one Ray (:func:`pipelines.context.ray_session`), and, unless ``ctx.verbose`` (``pyoco run -v``),
one log file for Ray's, MLflow's and DeepSpeed's own output (:func:`pipelines.console.quiet_logs`): the console
gets a start and an end line per step and the steps' progress lines.

Adding a step: write ``_step_x(cfg, outs, ctx) -> dict`` and insert ``Step("x", enabled, key_inputs, _step_x)``
into ``STEPS`` (and its name into ``STEP_ORDER``); ``key_inputs(cfg, outs, ctx)`` lists everything it reads.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
import traceback
from dataclasses import dataclass
from typing import Any

from pipelines.common import PyocoError, console
from pipelines.console import log_exception, quiet_logs, route_logs, stdout_to_log
from pipelines.context import RunContext, ray_session
from pipelines.workflow.state import WorkflowState
from pipelines.workflow.steps import STEP_ORDER, STEPS, _resolved
from pyoco.config import PyocoConfig, config_hash


# ---------------------------------------------------------------------------------------------------- run
@dataclass
class _Mirror:
    """The workflow's MLflow parent run; each step becomes a nested run under it."""

    tracking_uri: str
    experiment: str
    run_id: str

    @classmethod
    def start(cls, cfg: PyocoConfig, ctx: RunContext) -> _Mirror:
        from pipelines import tracking

        run_id = tracking.start_run(
            ctx.tracking_uri,
            ctx.experiment,
            run_name=f"workflow:{cfg.name}",
            config=cfg,
            tags={"pyoco.workflow": cfg.name},
        )
        return cls(ctx.tracking_uri, ctx.experiment, run_id)

    def step(self, step: str, status: str, key: str, seconds: float, outputs: dict) -> None:
        from pipelines import tracking

        c = tracking.client(self.tracking_uri)
        run = c.create_run(
            c.get_run(self.run_id).info.experiment_id,
            run_name=step,
            tags={"mlflow.parentRunId": self.run_id, "pyoco.step": step, "pyoco.step.status": status},
        )
        c.log_param(run.info.run_id, "cache_key", key)
        c.log_metric(run.info.run_id, "seconds", seconds)
        c.log_text(
            run.info.run_id, tracking.scrub(json.dumps(outputs, indent=2, default=str)), "outputs.json"
        )
        c.set_terminated(run.info.run_id, "FAILED" if status == "failed" else "FINISHED")
        child = outputs.get("mlflow_run_id") if isinstance(outputs, dict) else None
        if child and status == "ran":
            c.set_tag(child, "mlflow.parentRunId", run.info.run_id)

    def end(self, status: str) -> None:
        from pipelines import tracking

        tracking.client(self.tracking_uri).set_terminated(self.run_id, status)


def run_workflow(
    cfg: PyocoConfig,
    *,
    from_step: str | None = None,
    only: str | None = None,
    use_mlflow: bool = True,
    ctx: RunContext | None = None,
) -> dict[str, Any]:
    """Run the enabled steps in order, all with one RunContext (built from ``cfg`` and the environment
    when not given) and one Ray; returns {step: {"status", "seconds", "outputs"}}."""
    for flag, value in (("--from", from_step), ("--only", only)):
        if value is not None and value not in STEP_ORDER:
            raise PyocoError(f"{flag} {value!r}: unknown step; steps are {', '.join(STEP_ORDER)}")
    cfg = _resolved(cfg)
    ctx = ctx or RunContext.from_config(cfg)
    state = WorkflowState.load(cfg.output)
    enabled = [s for s in STEPS if s.enabled(cfg)]
    names = [s.name for s in enabled]
    for flag, value in (("--from", from_step), ("--only", only)):
        if value is not None and value not in names:
            raise PyocoError(
                f"{flag} {value}: that step is not enabled by this config (enabled: {', '.join(names)})"
            )

    summary: dict[str, Any] = {}
    outs: dict[str, dict] = {}
    dirty = False
    session = contextlib.ExitStack()
    session.enter_context(quiet_logs(ctx))  # Ray's, MLflow's, DeepSpeed's output -> ctx.log_file
    quiet = not ctx.verbose and ctx.log_file is not None
    if quiet:
        console.print(
            f"log: {ctx.log_file} (Ray, MLflow, DeepSpeed output; -v shows it here)", soft_wrap=True
        )
    try:
        mirror = _Mirror.start(cfg, ctx) if use_mlflow else None
    except BaseException:
        session.close()
        raise
    status = "FAILED"
    try:
        session.enter_context(ray_session())  # one Ray for all steps, started by the first that needs it
        for i, step in enumerate(enabled):
            forced = (from_step is not None and i >= names.index(from_step)) or only == step.name
            selected = only is None or only == step.name
            prior = state.steps.get(step.name, {})
            inputs = step.key_inputs(cfg, outs, ctx)
            key = config_hash(inputs)
            parts = [config_hash(p) for p in inputs] if isinstance(inputs, list) else [key]
            unchanged = prior.get("status") == "done" and prior.get("key") == key
            if not selected or (unchanged and not dirty and not forced):
                if not unchanged:
                    raise PyocoError(
                        f"step {step.name} has no up-to-date outputs to reuse; run without --only/--from first "
                        f"({_why_stale(step, prior, parts)})"
                    )
                outs[step.name] = prior.get("outputs", {})
                console.print(f"[dim]- {step.name}: unchanged (key {key}), skipped[/dim]")
                _report(step, outs[step.name])
                summary[step.name] = {"status": "skipped", "seconds": 0.0, "outputs": outs[step.name]}
                _mirror(mirror, step.name, "skipped", key, 0.0, outs[step.name])
                continue
            console.print(f"[bold]> {step.name}[/bold] (key {key})")
            t0 = time.perf_counter()
            try:
                route_logs()  # libraries imported by earlier steps may have added console handlers
                with stdout_to_log():
                    result = step.run(cfg, outs, ctx, key=key)
            except Exception as err:  # noqa: BLE001 - recorded, then re-raised as a one-line error
                seconds = time.perf_counter() - t0
                message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
                state.steps[step.name] = {
                    "status": "failed",
                    "key": key,
                    "error": message,
                    "seconds": seconds,
                }
                state.save()
                _mirror(mirror, step.name, "failed", key, seconds, {"error": message})
                if os.environ.get("PYOCO_DEBUG"):
                    traceback.print_exc()
                log_exception(f"step {step.name} failed")
                where = f"; full log: {ctx.log_file}" if quiet else ""
                raise PyocoError(
                    f"step {step.name} failed: {message} (fix it and re-run; finished steps are kept){where}",
                    exit_code=1,
                ) from err
            seconds = time.perf_counter() - t0
            dirty = True
            outs[step.name] = result
            state.steps[step.name] = {
                "status": "done",
                "key": key,
                "key_parts": parts,
                "outputs": result,
                "seconds": seconds,
            }
            state.save()
            summary[step.name] = {"status": "ran", "seconds": seconds, "outputs": result}
            _mirror(mirror, step.name, "ran", key, seconds, result)
            console.print(f"  {step.name} done in {seconds:.1f}s")
            _report(step, result)
        status = "FINISHED"
        if mirror is not None:  # MLflow's own "View run at: URL" lines are off on a quiet console
            console.print(f"mlflow: workflow run {mirror.run_id} in experiment {mirror.experiment!r}")
    finally:
        try:
            if mirror is not None:
                mirror.end(status)
        finally:
            session.close()
    return summary


def _report(step, outputs: dict[str, Any]) -> None:
    if step.report is not None:
        for line in step.report(outputs):
            console.print(f"  {step.name}: {line}", soft_wrap=True)


def _why_stale(step, prior: dict, parts: list[str]) -> str:
    """Why ``step``'s recorded outputs cannot be reused: never run, not finished, or which of its key's
    inputs (``step.key_names``) differ from those of the run that made them."""
    if not prior:
        return "it has never run here"
    if prior.get("status") != "done":
        return f"its last run {prior.get('status', 'did not finish')}"
    before = prior.get("key_parts")
    if not isinstance(before, list) or len(before) != len(parts):
        return "its inputs changed since it ran"
    names = list(step.key_names) + [f"key input {i + 1}" for i in range(len(step.key_names), len(parts))]
    changed = [n for n, a, b in zip(names, before, parts, strict=True) if a != b]
    return f"{' and '.join(changed) or 'its inputs'} changed since it ran"


def _mirror(mirror: _Mirror | None, step: str, status: str, key: str, seconds: float, outputs: dict) -> None:
    if mirror is not None:
        mirror.step(step, status, key, seconds, outputs)


def print_summary(cfg: PyocoConfig, summary: dict[str, Any]) -> None:
    from rich.table import Table

    table = Table(title=f"workflow {cfg.name}")
    table.add_column("step")
    table.add_column("status")
    table.add_column("seconds", justify="right")
    table.add_column("output")
    for name, s in summary.items():
        out = s["outputs"]
        where = (
            out.get("mp4")
            or out.get("model_dir")
            or out.get("output")
            or out.get("uri")
            or out.get("version")
            or ""
        )
        table.add_row(name, s["status"], f"{s['seconds']:.1f}", str(where))
    console.print(table)
