"""``models:/NAME@ALIAS`` (or ``/VERSION``) to a local model package folder, cached and completed atomically."""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

from pipelines.common import PyocoError
from pipelines.registry.client import PYFUNC_ARTIFACT_PATH, _client, _get_run, _one_line
from pipelines.registry.transaction import _version, _version_by_alias


# ------------------------------------------------------------------------------------- models:/ resolver
def parse_model_uri(uri: str) -> tuple[str, str, str]:
    """``models:/NAME@ALIAS`` -> ("alias", NAME, ALIAS); ``models:/NAME/VERSION`` -> ("version", ...);
    ``runs:/RUN_ID/PATH`` -> ("run", RUN_ID, PATH)."""
    if uri.startswith("models:/"):
        rest = uri[len("models:/") :].strip("/")
        if "@" in rest:
            name, alias = rest.rsplit("@", 1)
            if name and alias and "/" not in alias:
                return "alias", name, alias
        elif "/" in rest:
            name, version = rest.rsplit("/", 1)
            if name and version.isdigit():
                return "version", name, version
        raise PyocoError(f"{uri}: expected models:/NAME@ALIAS or models:/NAME/VERSION")
    if uri.startswith("runs:/"):
        rest = uri[len("runs:/") :].strip("/")
        run_id, _, path = rest.partition("/")
        if run_id:
            return "run", run_id, path or PYFUNC_ARTIFACT_PATH
    raise PyocoError(
        f"{uri}: not a registry URI (expected models:/NAME@ALIAS, models:/NAME/VERSION or runs:/RUN/PATH)"
    )


def _cache_root() -> Path:
    from pyoco.storage import cache_root

    return cache_root() / "registry"


def resolve_model_uri(uri: str, *, dst: str | None = None, tracking_uri: str | None = None) -> str:
    """Download a registered model's package (unet/, scheduler/, pyoco_package.json) and return the local
    folder that ``pyoco.package.load_package`` accepts. Versions are immutable, so a download is cached
    per (tracking URI, name, version); an alias is re-resolved on every call."""
    import hashlib

    import mlflow

    kind, a, b = parse_model_uri(uri)
    client = _client(tracking_uri)
    if kind == "run":
        _get_run(client, a)
        if not client.list_artifacts(a, b):
            raise PyocoError(f"run {a} has no model at {b!r} (no artifacts there)")
        artifact_uri = f"runs:/{a}/{b}"
        key_parts = [client.tracking_uri, "run", a, b]
    else:
        mv = _version_by_alias(client, a, b) if kind == "alias" else _version(client, a, b)
        artifact_uri = client.get_model_version_download_uri(a, mv.version)
        key_parts = [client.tracking_uri, "model", a, str(mv.version)]
    key = hashlib.sha256("\0".join(key_parts).encode()).hexdigest()[:24]
    target = Path(dst) if dst else _cache_root() / key
    if (target / ".complete").exists():
        return _complete_package(target, uri)
    # Download into a folder of our own (unique per call), then rename it into place. A complete copy is
    # never deleted or replaced: whoever renames first wins, the others use that copy and drop their own.
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.partial-{os.getpid()}-{uuid.uuid4().hex[:12]}"
    tmp.mkdir()
    try:
        try:
            with _quiet_downloads():
                mlflow.artifacts.download_artifacts(
                    artifact_uri=artifact_uri, dst_path=str(tmp), tracking_uri=client.tracking_uri
                )
        except PyocoError:
            raise
        except Exception as err:  # noqa: BLE001
            if kind == "run":
                raise PyocoError(f"run {a} has no model at {b!r} ({_one_line(err, 160)})") from None
            raise PyocoError(f"{uri}: could not download the model ({_one_line(err, 200)})") from None
        # download_artifacts puts a folder's files under dst/<last path component>/
        found = [tmp] if (tmp / "MLmodel").is_file() else [m.parent for m in tmp.glob("*/MLmodel")]
        if not found or _package_in_model(found[0]) is None:
            raise PyocoError(f"{uri}: not a pyoco model (no 'package' artifact in its MLmodel)")
        root = found[0]
        (root / ".complete").write_text(uri)
        if target.exists() and not (target / ".complete").exists():
            # An incomplete folder at the target (an interrupted copy from an older pyoco, or a partial
            # --dst): nobody can be using it as a model; move it aside atomically, then delete it.
            aside = target.parent / f".{target.name}.stale-{uuid.uuid4().hex[:12]}"
            with contextlib.suppress(FileNotFoundError):
                os.replace(target, aside)
            shutil.rmtree(aside, ignore_errors=True)
        try:
            os.replace(root, target)  # atomic; fails when a concurrent resolver's copy is already there
        except OSError:
            if not (target / ".complete").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return _complete_package(target, uri)


def _complete_package(target: Path, uri: str) -> str:
    package = _package_in_model(target)
    if package is None:
        raise PyocoError(f"{uri}: downloaded model at {target} has no package folder")
    return str(package)


@contextlib.contextmanager
def _quiet_downloads() -> Iterator[None]:
    """No tqdm bars from MLflow downloads: errors must stay one line, and logs readable."""
    key = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"
    before = os.environ.get(key)
    os.environ[key] = "false"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = before


def _package_in_model(model_root: Path) -> Path | None:
    """The local folder of the pyfunc model's ``package`` artifact (path recorded in its MLmodel)."""
    import yaml

    mlmodel = model_root / "MLmodel"
    if not mlmodel.is_file():
        return None
    try:
        meta = yaml.safe_load(mlmodel.read_text()) or {}
        rel = meta["flavors"]["python_function"]["artifacts"]["package"]["path"]
    except (KeyError, TypeError, yaml.YAMLError):
        return None
    package = model_root / rel
    return package if (package / "unet").is_dir() else None
