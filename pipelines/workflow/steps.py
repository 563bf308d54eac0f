"""The workflow's steps: each one's run function and the inputs its cache key covers, in ``STEPS`` order.

Over 400 lines on purpose: the ten step adapters and their key inputs sit side by side, so what each
step's cache key covers can be checked against what it reads in one file."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipelines.common import ProgressLine, PyocoError, console
from pipelines.context import RunContext, ensure_ray
from pipelines.evaluate.summary import summary_lines
from pipelines.workflow.state import _fs, join
from pyoco.config import PyocoConfig, config_hash

STEP_ORDER = [
    "synth",
    "preprocess",
    "evaluator",
    "pretrain",
    "noise_fit",
    "train",
    "evaluate",
    "register",
    "promote",
    "sample",
]


# --------------------------------------------------------------------------------------------------- steps
@dataclass
class Step:
    name: str
    enabled: Callable[[PyocoConfig], bool]
    key_inputs: Callable[[PyocoConfig, dict[str, dict], RunContext], Any]
    run: Callable[..., dict[str, Any]]  # (cfg, outs, ctx, *, key) -> outputs
    describe: str = ""
    # What each element of key_inputs' list is, for the error that says why a step's outputs are stale.
    key_names: tuple[str, ...] = ()
    # Console lines that say what the step's outputs mean (run or reused), e.g. evaluate's metrics.
    report: Callable[[dict[str, Any]], list[str]] | None = None


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
    if cfg.preprocess is not None and (cfg.model.pretrained or cfg.model.text_encoder or cfg.model.vae):
        _preprocess_follows_model(cfg)
    # train.output / train.storage_path defaults are filled once, by pipelines.train.plan.resolve_config.
    if cfg.evaluate.output is None:
        cfg.evaluate.output = join(cfg.output, "eval", "metrics.json")
    return cfg


def _preprocess_follows_model(cfg: PyocoConfig) -> None:
    """The clips are embedded (and VAE-encoded) by the model's own encoder and VAE, unless the preprocess
    section names its own: one encoder for preprocess, train, evaluate and sample."""
    from pyoco.pretrained import resolve_pretrained

    spec = resolve_pretrained(cfg.model)
    p, given = cfg.preprocess, cfg.preprocess.model_fields_set
    if "text_encoder" not in given:
        p.text_encoder = spec.text_encoder
    if "text_max_length" not in given:
        p.text_max_length = spec.text_len
    if p.vae is None and spec.vae is not None:
        p.vae = spec.vae


def _step_synth(cfg: PyocoConfig, outs: dict[str, dict], ctx: RunContext, *, key: str) -> dict[str, Any]:
    from pyoco.synth import write_config

    result = write_config(cfg.synth)
    return {"uri": cfg.synth.out, "summary": {k: result[k] for k in ("videos", "bytes") if k in result}}


def _step_preprocess(cfg: PyocoConfig, outs: dict[str, dict], ctx: RunContext, *, key: str) -> dict[str, Any]:
    from pipelines.preprocess.step import run_preprocess
    from pipelines.train.data import manifest_data_hash

    ensure_ray(cfg.ray.address)  # the workflow's one Ray (run_preprocess then reuses it)
    with ProgressLine("preprocess", unit="video") as bar:  # Ray Data's own bars only with -v
        manifest = run_preprocess(
            cfg.preprocess, ray_address=cfg.ray.address, progress=ctx.verbose, on_progress=bar.update
        )
    return {
        "output": cfg.preprocess.output,
        "manifest_hash": manifest_data_hash(manifest),  # the hash train and register record too
        "manifest": manifest,
    }


def _step_pretrain(cfg: PyocoConfig, outs: dict[str, dict], ctx: RunContext, *, key: str) -> dict[str, Any]:
    from pipelines.train.driver import run_train
    from pipelines.train.plan import pretrain_config

    result = run_train(pretrain_config(cfg), image_pretrain=True, ctx=ctx, run_key=key)
    return {**result, "stamp": _dir_stamp(result["model_dir"])}


def _evaluator_path(cfg: PyocoConfig, outs: dict[str, dict]) -> str | None:
    """The evaluator evaluate and the gate use: ``evaluate.evaluator``, else the one the workflow trained."""
    return cfg.evaluate.evaluator or outs.get("evaluator", {}).get("path")


def _step_evaluator(cfg: PyocoConfig, outs: dict[str, dict], ctx: RunContext, *, key: str) -> dict[str, Any]:
    """Train the learned evaluator on the preprocessed clips (train split; held-out accuracy on val)."""
    from pipelines.evaluate.evaluator import run_evaluator_train, unread_line

    e = cfg.evaluator
    out = e.output or join(cfg.output, "evaluator")
    with ProgressLine("evaluator", unit="step", per_item=True) as bar:
        meta = run_evaluator_train(
            cfg.preprocess.output,
            out,
            labels=e.labels,
            steps=e.steps,
            size=e.size,
            seed=e.seed,
            lr=e.lr,
            progress=lambda done, total, loss: bar.update(done, total, loss=loss),
        )
    acc = ", ".join(f"{k} {v:.2f}" for k, v in meta["heldout_accuracy"].items())
    console.print(f"  evaluator held-out accuracy on {meta['val_clips']} val clips: {acc}", soft_wrap=True)
    warning = unread_line(meta)
    if warning:
        console.print("  " + warning, soft_wrap=True)
    return {"path": meta["path"], "heldout_accuracy": meta["heldout_accuracy"], "stamp": _dir_stamp(out)}


def _image_model(cfg: PyocoConfig, outs: dict[str, dict]) -> str | None:
    return cfg.model.pretrained or outs.get("pretrain", {}).get("model_dir")


def _step_noise_fit(cfg: PyocoConfig, outs: dict[str, dict], ctx: RunContext, *, key: str) -> dict[str, Any]:
    """``noise: auto``: fit the prior to the val clips DDIM-inverted by the image model (pyoco noise fit)."""
    from pipelines.evaluate.noise_fit import run_noise_fit

    model = _image_model(cfg, outs)
    if model is None:
        raise PyocoError("noise 'auto' needs an image model: set model.pretrained or a pretrain: section")
    res = run_noise_fit(
        model=model,
        data=cfg.preprocess.output,
        out=join(cfg.output, "noise_fit", "fit.json"),
        png=None if "://" in cfg.output else join(cfg.output, "noise_fit", "fit.png"),
        num_clips=cfg.noise.fit_clips,
        steps=cfg.noise.fit_steps,
        seed=cfg.seed,
        tracking_uri=ctx.tracking_uri,
        experiment=ctx.experiment,
    )
    kind = res.kind if cfg.noise.kind == "auto" else cfg.noise.kind
    if cfg.noise.kind == "auto":
        alpha = res.alpha
    else:  # a fixed kind: that kind's own best alpha, not the other kind's
        from pyoco import storage

        alpha = json.loads(storage.read_bytes(res.json_uri))["fit"]["params"][kind]["alpha"]
    console.print(
        f"  noise fit: lag-1 correlation {res.lag1:.3f} -> noise.kind={kind} noise.alpha={alpha:.3f}"
    )
    return {"kind": kind, "alpha": float(alpha), "lag1": res.lag1, "report": res.json_uri}


def _fitted_noise(cfg: PyocoConfig, outs: dict[str, dict]) -> PyocoConfig:
    """``cfg`` with ``noise: auto`` replaced by what the noise_fit step found."""
    if not cfg.noise.is_auto:
        return cfg
    fit = outs["noise_fit"]
    noise = cfg.noise.model_copy(update={"kind": fit["kind"], "alpha": round(float(fit["alpha"]), 4)})
    return cfg.model_copy(update={"noise": noise})


def _step_train(cfg: PyocoConfig, outs: dict[str, dict], ctx: RunContext, *, key: str) -> dict[str, Any]:
    """Ray Train's run name comes from this step's key (unless train.run_name is set): a changed config
    starts a new run instead of resuming the old one; a re-run after a crash resumes it."""
    from pipelines.train.driver import run_train

    cfg = _fitted_noise(cfg, outs).model_copy(deep=True)
    if "pretrain" in outs and cfg.model.pretrained is None:
        cfg.model.pretrained = outs["pretrain"]["model_dir"]
    result = run_train(cfg, ctx=ctx, run_key=key)
    return {**result, "stamp": _dir_stamp(result["model_dir"])}


def _step_evaluate(cfg: PyocoConfig, outs: dict[str, dict], ctx: RunContext, *, key: str) -> dict[str, Any]:
    """Scores the package under the noise prior it was trained with (recorded in the package), the same
    prior that register tags the version with."""
    from pipelines.evaluate.step import run_evaluate

    if cfg.preprocess is not None:
        data = cfg.preprocess.output
    else:  # train.data is DATA/clips/train (or DATA/clips, or DATA): evaluate wants DATA
        data = str(cfg.train.data).rstrip("/")
        for tail in ("/clips/train", "/clips"):
            data = data.removesuffix(tail)
    evaluate_cfg = cfg.evaluate.model_copy(update={"evaluator": _evaluator_path(cfg, outs)})
    with ProgressLine("evaluate: sampling", unit="video") as bar:
        metrics = run_evaluate(
            outs["train"]["model_dir"],
            data,
            evaluate_cfg,
            model_cfg=cfg.model,
            noise=None,
            mlflow_run_id=outs["train"].get("mlflow_run_id"),
            tracking_uri=ctx.tracking_uri,
            experiment=ctx.experiment,
            progress=bar.update,
            ray_address=cfg.ray.address,
        )
    return {"metrics": metrics, "metrics_hash": config_hash(metrics)}


def _step_register(cfg: PyocoConfig, outs: dict[str, dict], ctx: RunContext, *, key: str) -> dict[str, Any]:
    from pipelines.registry.register import register_model

    result = register_model(
        name=ctx.registered_model,
        checkpoint=outs["train"]["model_dir"],
        run_id=outs["train"].get("mlflow_run_id"),
        metrics=outs.get("evaluate", {}).get("metrics"),
        manifest_hash=outs.get("preprocess", {}).get("manifest_hash"),
        config=cfg,
        tracking_uri=ctx.tracking_uri,
        experiment=ctx.experiment,
    )
    result = result if isinstance(result, dict) else {"version": str(result)}
    if "tracking_uri" in result:
        from pipelines.tracking import redact_uri

        result["tracking_uri"] = redact_uri(result["tracking_uri"])  # the state never holds credentials
    return result


def _step_promote(cfg: PyocoConfig, outs: dict[str, dict], ctx: RunContext, *, key: str) -> dict[str, Any]:
    from pipelines.registry.promote import promote

    result = promote(
        ctx.registered_model,
        metric=cfg.promote.metric,
        mode=cfg.promote.mode,
        min_improvement=cfg.promote.min_improvement,
        force=False,
        refuse_raises=False,
        tracking_uri=ctx.tracking_uri,
        evaluator=_evaluator_path(cfg, outs),
        reevaluate=cfg.promote.reevaluate,
        evaluate_cfg=cfg.evaluate.model_copy(update={"evaluator": _evaluator_path(cfg, outs)}),
    )
    return result if isinstance(result, dict) else {"result": str(result)}


def _step_sample(cfg: PyocoConfig, outs: dict[str, dict], ctx: RunContext, *, key: str) -> dict[str, Any]:
    """Sample the champion to {output}/sample.mp4 (+ .gif); remote outputs are written locally, then uploaded."""
    import tempfile

    from pipelines.cli.core import sample_to_files
    from pipelines.registry.resolve import resolve_model_uri

    remote = "://" in cfg.output
    local_dir = Path(tempfile.mkdtemp(prefix="pyoco-sample-")) if remote else Path(cfg.output)
    # Resolved here against the workflow's server (sample_to_files alone would use the default one).
    model_dir = resolve_model_uri(f"models:/{ctx.registered_model}@champion", tracking_uri=ctx.tracking_uri)
    result = sample_to_files(
        str(model_dir),
        cfg.sample.prompt,
        local_dir / "sample.mp4",
        frames=cfg.sample.num_frames,
        steps=cfg.sample.steps,
        guidance=cfg.sample.guidance,
        eta=cfg.sample.eta,
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


def _tracking(c: PyocoConfig, ctx: RunContext) -> list:
    """The MLflow part of a key: the config's mlflow section and the server actually used (from the env
    when the config leaves it unset), without credentials."""
    return [_section(c, "mlflow"), ctx.cache_identity()]


STEPS = [
    Step(
        "synth",
        lambda c: c.synth is not None,
        lambda c, o, x: _section(c, "synth"),
        _step_synth,
        key_names=("the synth section",),
    ),
    Step(
        "preprocess",
        lambda c: c.preprocess is not None,
        lambda c, o, x: [_section(c, "preprocess"), o.get("synth", {}).get("summary")],
        _step_preprocess,
        key_names=("the preprocess section", "synth's output"),
    ),
    Step(
        "evaluator",
        lambda c: c.evaluator is not None and c.evaluate.evaluator is None and c.preprocess is not None,
        lambda c, o, x: [_section(c, "evaluator"), o.get("preprocess", {}).get("manifest_hash")],
        _step_evaluator,
        key_names=("the evaluator section", "preprocess's output"),
    ),
    Step(
        "pretrain",
        lambda c: c.pretrain is not None and c.model.pretrained is None,
        lambda c, o, x: [
            _section(c, "pretrain"),
            _section(c, "model"),
            o.get("preprocess", {}).get("manifest_hash"),
            _tracking(c, x),
        ],
        _step_pretrain,
        key_names=("the pretrain section", "the model section", "preprocess's output", "the MLflow settings"),
    ),
    Step(
        "noise_fit",
        lambda c: c.noise.is_auto,
        lambda c, o, x: [
            _section(c, "noise"),
            c.model.pretrained,
            o.get("pretrain", {}).get("stamp"),
            o.get("preprocess", {}).get("manifest_hash"),
            c.seed,
            _tracking(c, x),
        ],
        _step_noise_fit,
        key_names=(
            "the noise section",
            "model.pretrained",
            "pretrain's model",
            "preprocess's output",
            "seed",
            "the MLflow settings",
        ),
    ),
    Step(
        "train",
        lambda c: True,
        lambda c, o, x: [
            _section(c, "train"),
            _section(c, "model"),
            _section(c, "noise"),
            o.get("noise_fit", {}).get("kind"),
            o.get("noise_fit", {}).get("alpha"),
            o.get("preprocess", {}).get("manifest_hash"),
            o.get("pretrain", {}).get("stamp"),
            _tracking(c, x),
        ],
        _step_train,
        key_names=(
            "the train section",
            "the model section",
            "the noise section",
            "the fitted noise kind",
            "the fitted alpha",
            "preprocess's output",
            "pretrain's model",
            "the MLflow settings",
        ),
    ),
    Step(
        "evaluate",
        lambda c: True,
        lambda c, o, x: [
            _section(c, "evaluate"),
            o["train"].get("stamp"),
            o.get("preprocess", {}).get("manifest_hash"),
            o.get("evaluator", {}).get("stamp"),
            _tracking(c, x),
        ],
        _step_evaluate,
        key_names=(
            "the evaluate section",
            "train's model",
            "preprocess's output",
            "the evaluator",
            "the MLflow settings",
        ),
        report=lambda out: summary_lines(out["metrics"]),
    ),
    Step(
        "register",
        lambda c: True,
        lambda c, o, x: [o["train"].get("stamp"), o.get("evaluate", {}).get("metrics_hash"), _tracking(c, x)],
        _step_register,
        key_names=("train's model", "evaluate's metrics", "the MLflow settings"),
    ),
    Step(
        "promote",
        lambda c: True,
        lambda c, o, x: [
            _section(c, "promote"),
            o["register"].get("version"),
            o.get("evaluator", {}).get("stamp"),
            _tracking(c, x),
        ],
        _step_promote,
        key_names=("the promote section", "register's version", "the evaluator", "the MLflow settings"),
    ),
    Step(
        "sample",
        lambda c: True,
        lambda c, o, x: [
            _section(c, "sample"),
            o.get("promote", {}).get("champion_version"),
            _tracking(c, x),
        ],
        _step_sample,
        key_names=("the sample section", "promote's champion", "the MLflow settings"),
    ),
]
