"""``pyoco run``: the whole workflow as cached steps, on an embedded Ray or inside a Ray job.

    synth? -> preprocess -> pretrain? -> train -> evaluate -> register -> promote -> sample

(Image pretraining runs after preprocess because it trains on the preprocessed clips' frames.)

Each step has a cache key: the hash of its own resolved config section plus the identities of what it
consumes (the data manifest's hash, the model export's content stamp, the registered version...). The
state lives next to the outputs, in ``{output}/workflow/state.json`` (local or s3://). On a re-run a step
whose key is unchanged is skipped, and the log says so; a step that runs makes every later step run too.
A failing step is recorded as failed with its message, the workflow stops, and the next ``pyoco run``
resumes from it (earlier steps are skipped by their keys).

MLflow mirrors it: one parent run per ``pyoco run`` with a nested run per step (skipped steps included,
tagged ``pyoco.step.status=skipped``); the training run is re-parented under its step.
"""

from __future__ import annotations

import json
import os
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import typer

from pipelines.common import PyocoError, cli_errors, console
from pyoco.config import PyocoConfig, config_hash, load_config

STEP_ORDER = ["synth", "preprocess", "pretrain", "train", "evaluate", "register", "promote", "sample"]


# --------------------------------------------------------------------------------------------------- state
def _fs(uri: str):
    import fsspec

    fs, _, (path,) = fsspec.get_fs_token_paths(uri)
    return fs, path


def join(uri: str, *parts: str) -> str:
    return "/".join([uri.rstrip("/"), *[p.strip("/") for p in parts]])


@dataclass
class WorkflowState:
    uri: str
    steps: dict[str, dict[str, Any]] = field(default_factory=dict)

    @classmethod
    def load(cls, output: str) -> WorkflowState:
        uri = join(output, "workflow", "state.json")
        fs, path = _fs(uri)
        if not fs.exists(path):
            return cls(uri)
        try:
            with fs.open(path, "r") as f:
                data = json.load(f)
        except json.JSONDecodeError as err:
            raise PyocoError(f"{uri}: corrupt workflow state ({err.msg}); delete it to start over") from None
        return cls(uri, data.get("steps", {}))

    def save(self) -> None:
        fs, path = _fs(self.uri)
        fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        with fs.open(path, "w") as f:
            json.dump({"steps": self.steps}, f, indent=2, sort_keys=True, default=str)

    def outputs(self, step: str) -> dict[str, Any]:
        return dict(self.steps.get(step, {}).get("outputs", {}))


# --------------------------------------------------------------------------------------------------- steps
@dataclass
class Step:
    name: str
    enabled: Callable[[PyocoConfig], bool]
    key_inputs: Callable[[PyocoConfig, dict[str, dict]], Any]
    run: Callable[[PyocoConfig, dict[str, dict]], dict[str, Any]]
    describe: str = ""


def _section(cfg: PyocoConfig, name: str) -> Any:
    value = getattr(cfg, name)
    return value.model_dump(mode="json") if value is not None else None


def _dir_stamp(uri: str | None) -> str | None:
    """Content identity of a folder: names, sizes and checksums/mtimes of its files."""
    if not uri:
        return None
    fs, path = _fs(uri)
    try:
        listing = fs.find(path, detail=True)
    except FileNotFoundError:
        return None
    stamp = sorted(
        (k[len(path) :], v.get("size"), str(v.get("ETag") or v.get("mtime") or v.get("created") or ""))
        for k, v in listing.items()
    )
    return config_hash(stamp)


def _resolved(cfg: PyocoConfig) -> PyocoConfig:
    """Fill the defaults that depend on other sections (done once, here)."""
    cfg = cfg.model_copy(deep=True)
    if cfg.synth is not None and cfg.preprocess is not None and not cfg.preprocess.input:
        cfg.preprocess.input = cfg.synth.out
    if cfg.preprocess is not None and cfg.train.data is None:
        cfg.train.data = join(cfg.preprocess.output, "clips", "train")
    # train.output / train.storage_path defaults are filled once, by pipelines.train.resolve_config.
    if cfg.evaluate.output is None:
        cfg.evaluate.output = join(cfg.output, "eval", "metrics.json")
    return cfg


def _step_synth(cfg: PyocoConfig, outs: dict[str, dict]) -> dict[str, Any]:
    from pyoco.synth import write_dataset

    s = cfg.synth
    result = write_dataset(
        s.out, videos=s.videos, shards=s.shards, seed=s.seed, frames=s.frames, size=s.size, fps=s.fps
    )
    return {"uri": s.out, "summary": {k: result[k] for k in ("videos", "bytes") if k in result}}


def _step_preprocess(cfg: PyocoConfig, outs: dict[str, dict]) -> dict[str, Any]:
    from pipelines.preprocess import run_preprocess

    manifest = run_preprocess(cfg.preprocess, ray_address=cfg.ray.address)
    return {
        "output": cfg.preprocess.output,
        "manifest_hash": manifest.get("data_hash") or config_hash(manifest),
        "manifest": manifest,
    }


def _step_pretrain(cfg: PyocoConfig, outs: dict[str, dict]) -> dict[str, Any]:
    from pipelines.train import pretrain_config, run_train

    result = run_train(pretrain_config(cfg), image_pretrain=True)
    return {**result, "stamp": _dir_stamp(result["model_dir"])}


def _step_train(cfg: PyocoConfig, outs: dict[str, dict]) -> dict[str, Any]:
    from pipelines.train import run_train

    cfg = cfg.model_copy(deep=True)
    if "pretrain" in outs and cfg.model.pretrained is None:
        cfg.model.pretrained = outs["pretrain"]["model_dir"]
    result = run_train(cfg)
    return {**result, "stamp": _dir_stamp(result["model_dir"])}


def _step_evaluate(cfg: PyocoConfig, outs: dict[str, dict]) -> dict[str, Any]:
    from pipelines.evaluate import run_evaluate

    data = cfg.preprocess.output if cfg.preprocess is not None else str(Path(cfg.train.data).parent)
    metrics = run_evaluate(
        outs["train"]["model_dir"],
        data,
        cfg.evaluate,
        model_cfg=cfg.model,
        noise=cfg.noise,
        mlflow_run_id=outs["train"].get("mlflow_run_id"),
    )
    return {"metrics": metrics, "metrics_hash": config_hash(metrics)}


def _step_register(cfg: PyocoConfig, outs: dict[str, dict]) -> dict[str, Any]:
    from pipelines.registry import register_model

    result = register_model(
        name=cfg.mlflow.registered_model,
        checkpoint=outs["train"]["model_dir"],
        run_id=outs["train"].get("mlflow_run_id"),
        metrics=outs.get("evaluate", {}).get("metrics"),
        manifest_hash=outs.get("preprocess", {}).get("manifest_hash"),
        config=cfg,
    )
    return result if isinstance(result, dict) else {"version": str(result)}


def _step_promote(cfg: PyocoConfig, outs: dict[str, dict]) -> dict[str, Any]:
    from pipelines.registry import promote

    result = promote(
        cfg.mlflow.registered_model,
        metric=cfg.promote.metric,
        mode=cfg.promote.mode,
        min_improvement=cfg.promote.min_improvement,
        force=False,
        refuse_raises=False,
        evaluator=cfg.evaluate.evaluator,
        reevaluate=cfg.promote.reevaluate,
        evaluate_cfg=cfg.evaluate,
    )
    return result if isinstance(result, dict) else {"result": str(result)}


def _step_sample(cfg: PyocoConfig, outs: dict[str, dict]) -> dict[str, Any]:
    """Sample the champion to {output}/sample.mp4 (+ .gif); remote outputs are written locally, then uploaded."""
    import tempfile

    from pipelines.core_cli import sample_to_files

    remote = "://" in cfg.output
    local_dir = Path(tempfile.mkdtemp(prefix="pyoco-sample-")) if remote else Path(cfg.output)
    result = sample_to_files(
        f"models:/{cfg.mlflow.registered_model}@champion",
        cfg.sample.prompt,
        local_dir / "sample.mp4",
        frames=cfg.sample.num_frames,
        steps=cfg.sample.steps,
        guidance=cfg.sample.guidance,
        seed=cfg.sample.seed,
        fps=cfg.sample.fps,
        gif=True,
    )
    if remote:
        for kind in ("mp4", "gif"):
            fs, path = _fs(join(cfg.output, f"sample.{kind}"))
            fs.put_file(result[kind], path)
            result[kind] = join(cfg.output, f"sample.{kind}")
    return result


STEPS = [
    Step("synth", lambda c: c.synth is not None, lambda c, o: _section(c, "synth"), _step_synth),
    Step(
        "preprocess",
        lambda c: c.preprocess is not None,
        lambda c, o: [_section(c, "preprocess"), o.get("synth", {}).get("summary")],
        _step_preprocess,
    ),
    Step(
        "pretrain",
        lambda c: c.pretrain is not None and c.model.pretrained is None,
        lambda c, o: [
            _section(c, "pretrain"),
            _section(c, "model"),
            o.get("preprocess", {}).get("manifest_hash"),
        ],
        _step_pretrain,
    ),
    Step(
        "train",
        lambda c: True,
        lambda c, o: [
            _section(c, "train"),
            _section(c, "model"),
            _section(c, "noise"),
            o.get("preprocess", {}).get("manifest_hash"),
            o.get("pretrain", {}).get("stamp"),
        ],
        _step_train,
    ),
    Step(
        "evaluate",
        lambda c: True,
        lambda c, o: [_section(c, "evaluate"), o["train"].get("stamp")],
        _step_evaluate,
    ),
    Step(
        "register",
        lambda c: True,
        lambda c, o: [
            c.mlflow.registered_model,
            o["train"].get("stamp"),
            o.get("evaluate", {}).get("metrics_hash"),
        ],
        _step_register,
    ),
    Step(
        "promote",
        lambda c: True,
        lambda c, o: [_section(c, "promote"), o["register"].get("version")],
        _step_promote,
    ),
    Step(
        "sample",
        lambda c: True,
        lambda c, o: [_section(c, "sample"), o.get("promote", {}).get("champion_version")],
        _step_sample,
    ),
]


# ---------------------------------------------------------------------------------------------------- run
@dataclass
class _Mirror:
    """The workflow's MLflow parent run; each step becomes a nested run under it."""

    tracking_uri: str
    experiment: str
    run_id: str

    @classmethod
    def start(cls, cfg: PyocoConfig) -> _Mirror:
        from pipelines import tracking

        uri = tracking.resolve_tracking_uri(cfg.mlflow.tracking_uri)
        run_id = tracking.start_run(
            uri,
            cfg.mlflow.experiment,
            run_name=f"workflow:{cfg.name}",
            config=cfg,
            tags={"pyoco.workflow": cfg.name},
        )
        return cls(uri, cfg.mlflow.experiment, run_id)

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
) -> dict[str, Any]:
    """Run the enabled steps in order; returns {step: {"status", "seconds", "outputs"}}."""
    for flag, value in (("--from", from_step), ("--only", only)):
        if value is not None and value not in STEP_ORDER:
            raise PyocoError(f"{flag} {value!r}: unknown step; steps are {', '.join(STEP_ORDER)}")
    cfg = _resolved(cfg)
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
    mirror = _Mirror.start(cfg) if use_mlflow else None
    status = "FAILED"
    try:
        for i, step in enumerate(enabled):
            forced = (from_step is not None and i >= names.index(from_step)) or only == step.name
            selected = only is None or only == step.name
            prior = state.steps.get(step.name, {})
            key = config_hash(step.key_inputs(cfg, outs))
            unchanged = prior.get("status") == "done" and prior.get("key") == key
            if not selected or (unchanged and not dirty and not forced):
                if not unchanged:
                    raise PyocoError(
                        f"step {step.name} has no up-to-date outputs to reuse; run without --only/--from first"
                    )
                outs[step.name] = prior.get("outputs", {})
                console.print(f"[dim]- {step.name}: unchanged (key {key}), skipped[/dim]")
                summary[step.name] = {"status": "skipped", "seconds": 0.0, "outputs": outs[step.name]}
                _mirror(mirror, step.name, "skipped", key, 0.0, outs[step.name])
                continue
            console.print(f"[bold]> {step.name}[/bold] (key {key})")
            t0 = time.perf_counter()
            try:
                result = step.run(cfg, outs)
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
                raise PyocoError(
                    f"step {step.name} failed: {message} (fix it and re-run; finished steps are kept)",
                    exit_code=1,
                ) from err
            seconds = time.perf_counter() - t0
            dirty = True
            outs[step.name] = result
            state.steps[step.name] = {"status": "done", "key": key, "outputs": result, "seconds": seconds}
            state.save()
            summary[step.name] = {"status": "ran", "seconds": seconds, "outputs": result}
            _mirror(mirror, step.name, "ran", key, seconds, result)
            console.print(f"  {step.name} done in {seconds:.1f}s")
        status = "FINISHED"
    finally:
        if mirror is not None:
            mirror.end(status)
    return summary


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


@cli_errors
def run_cmd(
    config: Path = typer.Option(..., "--config", help="Workflow YAML (see pipelines/configs/)."),
    from_step: str | None = typer.Option(
        None, "--from", help=f"Re-run from this step: {', '.join(STEP_ORDER)}."
    ),
    only: str | None = typer.Option(None, "--only", help="Run just this step (earlier outputs must exist)."),
) -> None:
    """Run the whole workflow: preprocess, train, evaluate, register, promote (cached per step)."""
    if from_step and only:
        raise PyocoError("use --from or --only, not both")
    cfg = load_config(config)
    t0 = time.perf_counter()
    summary = run_workflow(cfg, from_step=from_step, only=only)
    print_summary(cfg, summary)
    console.print(
        f"workflow finished in {time.perf_counter() - t0:.1f}s; state: {join(cfg.output, 'workflow')}"
    )
    from pipelines.tracking import redact_uri, resolve_tracking_uri

    uri = redact_uri(resolve_tracking_uri(cfg.mlflow.tracking_uri))
    ui = f"mlflow ui --backend-store-uri {uri}" if uri.startswith("sqlite") else f"open {uri}"
    console.print(f"MLflow: {uri}  (UI: {ui})")


def register(app: typer.Typer) -> None:
    app.command("run")(run_cmd)
