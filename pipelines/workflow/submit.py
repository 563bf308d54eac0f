"""``pyoco submit``: run the workflow (``pyoco run --config FILE``) as a Ray job on a running cluster.

Over 400 lines: most of it is this docstring and the one-line refusals (local paths on a multi-node
cluster, credentials by reference only); the job package itself is built in ``workflow/package.py``.

    pyoco submit --config pipelines/configs/demo.yaml --address http://127.0.0.1:8265 --wait

What the job carries (``runtime_env``):
- ``working_dir``: a zip of the project built here: the files git tracks or would track (or, for an
  installed pyoco, the ``pyoco`` and ``pipelines`` packages), minus tests, virtualenvs, caches, outputs
  and anything that looks like a credential file, plus the config file when it lives outside the project.
  The zip is deterministic, so an unchanged project is uploaded once. The entrypoint is
  ``python -m pipelines.cli run --config PATH``: ``-m`` imports the shipped code, not whatever version
  happens to be installed on the nodes (the nodes provide the dependencies).
- ``env_vars``, by value, only settings that are not secret: ``MLFLOW_TRACKING_URI`` (refused when it
  embeds ``user[:password]@``, as is any forwarded URI; the config itself refuses such URIs at load),
  ``AWS_ENDPOINT_URL[_S3]``, ``AWS_DEFAULT_REGION``/``AWS_REGION``. They
  are used as given on the nodes, so they must be addresses the cluster can reach. ``AWS_PROFILE`` is not
  forwarded: a profile of this machine rarely exists on the nodes, and boto fails on a missing one.
- Credentials by *reference*: for each credential variable set in the submitting shell
  (``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN``, ``MLFLOW_TRACKING_USERNAME``,
  ``MLFLOW_TRACKING_PASSWORD``, ``MLFLOW_TRACKING_TOKEN``) the job gets the literal string ``${NAME}``.
  Ray expands it on the node, from the node's own environment, when it builds the job's environment, so
  the value never leaves this machine and never enters the job's metadata, entrypoint or runtime_env
  (which anyone with Jobs API access can read). The cluster supplies the values: a cluster started by
  ``infra/local`` inherits them from the shell that ran ``up``; on AWS the nodes' instance role serves S3
  (an unset variable expands to empty and boto falls through to the role); on Kubernetes they come from a
  Secret (see ``infra/kuberay``). Before submitting, the payload and every file in the zip are checked
  for the values of those variables and of the Ray token; a hit refuses the submission.

Ray token auth (Ray >= 2.52; the Jobs API refuses calls without it): the token is read like Ray reads it,
``RAY_AUTH_TOKEN``, else the file named by ``RAY_AUTH_TOKEN_PATH``, else ``~/.ray/auth_token``, and sent as
an ``Authorization: Bearer`` header (``JobSubmissionClient(headers=...)``; Ray's own header injection only
runs when ``RAY_AUTH_MODE=token`` is set in this process). It is never printed. No token: a one-line
explanation and exit 2.

Paths the nodes cannot share: before anything is uploaded, the number of ALIVE nodes is read from the
dashboard's State API (``GET /api/v0/nodes``, with the token). On more than one node a config path that is
local (relative, absolute or ``file://``: ``output``, ``synth.out``, ``preprocess.input/output``, the
``pretrain``/``train`` data, output and storage paths, ``model.pretrained``/``vae``, ...) is refused with a
one-line error naming the fields, exit 2: each node has its own disk and each job its own working dir
there, so one step's files are missing for the next step on another node. ``--allow-local-paths``
overrides (a filesystem every node mounts at the same absolute path). On one node, relative paths warn.

Output: the job id on stdout. ``--wait`` streams the job's logs to stdout and exits with the job's status:
0 when it succeeded, the driver's exit code (or 1) when it failed, 1 when it was stopped.
"""

from __future__ import annotations

import json
import os
import shlex
import sys
import tempfile
import time
import uuid
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from pipelines.common import PyocoError, console
from pipelines.tracking import CREDENTIAL_ENV, redact_uri
from pipelines.workflow.package import Package, build_package
from pyoco.config import URI_USERINFO, PyocoConfig, load_config

FORWARD_BY_VALUE = (
    "MLFLOW_TRACKING_URI",
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_DEFAULT_REGION",
    "AWS_REGION",
)
FORWARD_BY_REFERENCE = CREDENTIAL_ENV


_TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


# ------------------------------------------------------------------------------------------------ token
@dataclass
class AuthToken:
    value: str = field(repr=False)
    source: str  # where it came from, safe to print

    def header(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.value}"}


def read_auth_token(environ: dict[str, str] | None = None) -> AuthToken:
    """The Ray token, looked up in Ray's order; PyocoError (exit 2) when there is none."""
    env = os.environ if environ is None else environ
    if env.get("RAY_AUTH_TOKEN", "").strip():
        return AuthToken(env["RAY_AUTH_TOKEN"].strip(), "RAY_AUTH_TOKEN")
    path_var = env.get("RAY_AUTH_TOKEN_PATH", "").strip()
    if path_var:
        path = Path(path_var).expanduser()
        try:
            value = path.read_text().strip()
        except OSError as err:
            raise PyocoError(
                f"RAY_AUTH_TOKEN_PATH={path}: cannot read the Ray token ({err.strerror})"
            ) from None
        if not value:
            raise PyocoError(f"RAY_AUTH_TOKEN_PATH={path}: the token file is empty")
        return AuthToken(value, f"RAY_AUTH_TOKEN_PATH ({path})")
    default = Path(env.get("HOME") or Path.home()) / ".ray" / "auth_token"
    try:
        value = default.read_text().strip()
    except OSError:
        value = ""
    if value:
        return AuthToken(value, str(default))
    raise PyocoError(
        "no Ray auth token: the cluster's Jobs API needs one; set RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH, "
        "or put it in ~/.ray/auth_token (`ray get-auth-token` on the head node prints it; for the local "
        'stack run `eval "$(python infra/local/services.py env)"`)'
    )


# ---------------------------------------------------------------------------------------------- runtime
def job_env_vars(environ: dict[str, str] | None = None) -> tuple[dict[str, str], list[str]]:
    """(env_vars for the runtime_env, names passed by reference). Raises on a URI with credentials."""
    env = os.environ if environ is None else environ
    out: dict[str, str] = {"PYTHONUNBUFFERED": "1"}
    for name in FORWARD_BY_VALUE:
        value = env.get(name)
        if not value:
            continue
        if "://" in value and (urlsplit(value).username is not None or URI_USERINFO.search(value)):
            # a user name alone is often a token (https://TOKEN@host), so any userinfo is refused
            what = (
                "a password (user:password@host)" if urlsplit(value).password else "credentials (user@host)"
            )
            raise PyocoError(
                f"{name} embeds {what}; put them in "
                "MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN, AWS_*), "
                "which are passed by reference"
            )
        out[name] = value
    refs = [name for name in FORWARD_BY_REFERENCE if env.get(name)]
    out.update({name: "${" + name + "}" for name in refs})
    return out, refs


MIN_SECRET_CHARS = 12  # shorter values (moto's "testing") match ordinary text; real keys are 40+ chars


def secret_values(token: AuthToken | None, environ: dict[str, str] | None = None) -> dict[str, str]:
    """{label: value} of everything that must not appear in the job payload or package.

    AWS_ACCESS_KEY_ID is an identifier, not a secret, and values under MIN_SECRET_CHARS are skipped.
    """
    env = os.environ if environ is None else environ
    found = {
        name: env[name]
        for name in (*FORWARD_BY_REFERENCE, "RAY_AUTH_TOKEN")
        if name != "AWS_ACCESS_KEY_ID" and len(env.get(name, "")) >= MIN_SECRET_CHARS
    }
    if token is not None and len(token.value) >= MIN_SECRET_CHARS:
        found["the Ray auth token"] = token.value
    return found


def check_no_secrets(payload: dict, package: Package | None, secrets_: dict[str, str]) -> None:
    """Refuse to submit when a secret value shows up in the job payload or in a shipped file."""
    blob = json.dumps(payload, sort_keys=True, default=str)
    for label, value in secrets_.items():
        if value in blob:
            raise PyocoError(f"refusing to submit: the value of {label} would appear in the job's metadata")
    if package is None:
        return
    needles = {label: value.encode() for label, value in secrets_.items()}
    with zipfile.ZipFile(package.path) as zf:
        for name in zf.namelist():
            data = zf.read(name)
            for label, needle in needles.items():
                if needle in data:
                    raise PyocoError(
                        f"refusing to submit: {name} contains the value of {label}; remove it or git-ignore it"
                    )


LOCAL_PROTOCOLS = ("", "file", "local")


def _is_local(value: str) -> bool:
    """A path on this filesystem (relative, absolute or file://), as opposed to an object-store URI."""
    return value.split("://", 1)[0] in LOCAL_PROTOCOLS if "://" in value else True


def config_paths(cfg: PyocoConfig) -> dict[str, str]:
    """{field: value} of every config path that the job reads or writes on the nodes (unset fields left out).

    ``model.cache_dir`` is meant to be per node and is not listed; text encoders count only as folders.
    """
    fields: dict[str, str | None] = {"output": cfg.output}
    if cfg.synth is not None:
        fields["synth.out"] = cfg.synth.out
    if cfg.preprocess is not None:
        fields["preprocess.input"] = cfg.preprocess.input
        fields["preprocess.output"] = cfg.preprocess.output
        fields["preprocess.text_encoder"] = cfg.preprocess.text_encoder
    for section in ("pretrain", "train"):
        step = getattr(cfg, section)
        if step is not None:
            for name in ("data", "output", "storage_path"):
                fields[f"{section}.{name}"] = getattr(step, name)
    fields["model.pretrained"] = cfg.model.pretrained
    fields["model.vae"] = cfg.model.vae
    fields["model.text_encoder"] = cfg.model.text_encoder
    fields["evaluate.output"] = cfg.evaluate.output
    fields["evaluate.evaluator"] = cfg.evaluate.evaluator
    if cfg.evaluator is not None:
        fields["evaluator.output"] = cfg.evaluator.output
    out = {name: value for name, value in fields.items() if value}
    for name in ("preprocess.text_encoder", "model.text_encoder"):
        if name in out and out[name].lower() == "minilm":
            del out[name]  # the bundled offline encoder, not a path
    return out


def local_paths(cfg: PyocoConfig) -> dict[str, str]:
    """The config paths that are local to whichever node opens them (relative, absolute or file://)."""
    return {name: value for name, value in config_paths(cfg).items() if _is_local(value)}


def local_path_warnings(cfg: PyocoConfig) -> list[str]:
    """Relative local paths resolve inside the job's temporary working dir on the cluster."""
    return [
        f"{name}={value!r} is a relative local path: on the cluster it lands in the job's temporary working "
        "dir; use s3:// (or an absolute path on a shared filesystem)"
        for name, value in local_paths(cfg).items()
        if "://" not in value and not value.startswith("/")
    ]


def check_local_paths(cfg: PyocoConfig, nodes: int | None, *, allow: bool = False) -> list[str]:
    """Refuse local config paths on a multi-node cluster; return the warnings to print otherwise.

    Each node has its own filesystem (and each job its own working dir on each node), so a step that writes
    a local path on one node leaves the next step, on another node, with nothing: the workflow fails half
    way (issue 15). ``allow`` (``--allow-local-paths``) is for a filesystem every node mounts at the same
    absolute path. ``nodes`` None (the count could not be read) or 1 keeps the warnings.
    """
    local = local_paths(cfg)
    if nodes is not None and nodes > 1 and local and not allow:
        listed = ", ".join(f"{name}={value!r}" for name, value in local.items())
        raise PyocoError(
            f"refusing to submit: the cluster has {nodes} nodes and these config paths are local to each node"
            f", so the steps would not see each other's files: {listed}; use s3:// URIs (or pass "
            "--allow-local-paths if every node mounts them at the same absolute path)"
        )
    warnings = local_path_warnings(cfg)
    if nodes is None and local and not allow:
        warnings.append(
            "could not read the cluster's node count; on more than one node the local paths "
            f"{', '.join(local)} would not be shared between the steps"
        )
    return warnings


def alive_nodes(address: str, token: AuthToken, timeout_s: float = 10.0) -> int | None:
    """The number of ALIVE nodes, from the dashboard's State API (``GET /api/v0/nodes``, what ``ray list
    nodes`` reads) with the token; None when the dashboard does not answer that (an older Ray, a proxy)."""
    import requests

    try:
        r = requests.get(
            f"{address}/api/v0/nodes",
            params={"limit": 10000, "detail": "false"},
            headers=token.header(),
            timeout=timeout_s,
        )
    except requests.RequestException:
        return None
    if r.status_code != 200:
        return None
    try:
        nodes = r.json()["data"]["result"]["result"]
    except (ValueError, KeyError, TypeError):
        return None
    return sum(1 for n in nodes if isinstance(n, dict) and n.get("state") == "ALIVE")


def default_submission_id(cfg: PyocoConfig) -> str:
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    safe = "".join(c if c.isalnum() or c in "-_" else "-" for c in cfg.name)[:40]
    return f"pyoco-{safe}-{stamp}-{uuid.uuid4().hex[:6]}"


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("pyoco")
    except PackageNotFoundError:
        return "unknown"


# ----------------------------------------------------------------------------------------------- client
def resolve_address(address: str | None) -> str:
    address = address or os.environ.get("RAY_API_SERVER_ADDRESS") or os.environ.get("RAY_ADDRESS")
    if not address:
        raise PyocoError("no Ray address: pass --address http://HOST:8265 (the dashboard / Jobs API)")
    if "://" not in address:
        raise PyocoError(f"--address {address!r}: expected the dashboard URL, e.g. http://127.0.0.1:8265")
    return address.rstrip("/")


def connect(address: str, token: AuthToken):
    """A JobSubmissionClient that sends the token; one-line errors for the usual failures."""
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    try:
        return JobSubmissionClient(address, headers=token.header())
    except AuthenticationError as err:
        if "401" in str(err) or "Authentication required" in str(err):
            raise PyocoError(f"{address} refused the request: no token was accepted") from None
        raise PyocoError(
            f"{address} rejected the Ray auth token from {token.source}: it is not this cluster's token"
        ) from None
    except ConnectionError:
        raise PyocoError(f"cannot reach the Ray Jobs API at {address} (is the cluster up?)") from None


def exit_code_for(info) -> int:
    status = str(getattr(info.status, "value", info.status))
    if status == "SUCCEEDED":
        return 0
    if status == "FAILED":
        code = getattr(info, "driver_exit_code", None)
        return code if isinstance(code, int) and 0 < code < 256 else 1
    return 1


def follow(client, job_id: str, out=sys.stdout, poll_s: float = 1.0):
    """Stream the job's logs to ``out`` until it ends; return its final JobInfo."""
    import asyncio

    async def _tail() -> None:
        async for chunk in client.tail_job_logs(job_id):
            out.write(chunk)
            out.flush()

    try:
        asyncio.run(_tail())
    except Exception as err:  # noqa: BLE001 - the job itself is unaffected; fall back to polling
        console.print(
            f"[yellow]log stream interrupted ({type(err).__name__}); waiting for the job[/]", soft_wrap=True
        )
    while True:
        info = client.get_job_info(job_id)
        if str(getattr(info.status, "value", info.status)) in _TERMINAL:
            return info
        time.sleep(poll_s)


# ------------------------------------------------------------------------------------------------ submit
def submit_workflow(
    config: Path,
    address: str | None,
    *,
    wait: bool = False,
    submission_id: str | None = None,
    entrypoint_override: str | None = None,
    allow_local_paths: bool = False,
    out=sys.stdout,
) -> int:
    """Validate, package and submit; return the CLI exit code (0 when submitted, or the job's with wait)."""
    cfg = load_config(config)
    address = resolve_address(address)
    token = read_auth_token()
    env_vars, refs = job_env_vars()
    client = connect(address, token)
    for warning in check_local_paths(cfg, alive_nodes(address, token), allow=allow_local_paths):
        console.print(f"[yellow]warning:[/] {warning}", soft_wrap=True)

    with tempfile.TemporaryDirectory(prefix="pyoco-submit-") as tmp:
        package = build_package(Path(config), Path(tmp))
        entrypoint = f"python -m pipelines.cli run --config {shlex.quote(package.config_in_job)}"
        if entrypoint_override:
            entrypoint = entrypoint_override.replace("{config}", shlex.quote(package.config_in_job))
        runtime_env = {"working_dir": str(package.path), "env_vars": env_vars}
        metadata = {
            "pyoco.config": package.config_in_job,
            "pyoco.config_hash": cfg.hash(),
            "pyoco.name": cfg.name,
            "pyoco.version": _version(),
            "pyoco.credentials": ("by-reference:" + ",".join(refs)) if refs else "cluster-default",
        }
        payload = {"entrypoint": entrypoint, "runtime_env": runtime_env, "metadata": metadata}
        check_no_secrets(payload, package, secret_values(token))
        job_id = client.submit_job(
            entrypoint=entrypoint,
            runtime_env=runtime_env,
            metadata=metadata,
            submission_id=submission_id or default_submission_id(cfg),
        )
    shown = redact_uri(address)  # the dashboard address may carry userinfo; the console never shows it
    console.print(
        f"submitted [bold]{job_id}[/] to {shown} ({package.files} files, {package.size_bytes / 2**20:.1f} MiB;"
        f" credentials: {metadata['pyoco.credentials']})",
        soft_wrap=True,
    )
    print(job_id, file=out, flush=True)
    if not wait:
        console.print(f"follow it with: ray job logs --follow {job_id} --address {shown}", soft_wrap=True)
        return 0
    t0 = time.monotonic()
    try:
        info = follow(client, job_id, out=out)
    except KeyboardInterrupt:
        console.print(
            f"stopped following; the job keeps running (ray job stop {job_id} --address {shown})",
            soft_wrap=True,
        )
        return 130
    code = exit_code_for(info)
    status = str(getattr(info.status, "value", info.status))
    first_line = (info.message or "").strip().splitlines()[:1]
    message = f": {first_line[0]}" if status != "SUCCEEDED" and first_line else ""
    console.print(f"job {job_id} {status} after {time.monotonic() - t0:.1f}s{message}", soft_wrap=True)
    return code
