"""The local pyoco stack on 127.0.0.1: a token-auth Ray cluster, ``mlflow server`` and a moto S3 endpoint.

    python infra/local/services.py up [--workers 1] [--bucket pyoco] ...   # start, wait until healthy
    python infra/local/services.py status [--json]                        # exit 0 only if all healthy
    eval "$(python infra/local/services.py env)"                          # point a shell at it
    python infra/local/services.py down                                   # stop what `up` started

(``up.sh``, ``status.sh``, ``down.sh`` next to this file wrap the same commands.)

What runs, all bound to 127.0.0.1 on free ports unless given:
- Ray head (``ray start --head --block``) with ``RAY_AUTH_MODE=token``; the dashboard / Jobs API listens on
  127.0.0.1 only. Optional worker nodes join with ``ray start --address 127.0.0.1:PORT``. Nodes are
  started through ``ray_loopback.py`` because Ray otherwise replaces 127.0.0.1 by the machine's routable
  IP. The head advertises no ``preprocess`` resource and the workers do, like ``ray_cluster.yaml``.
- ``mlflow server``: sqlite backend store and a proxied artifact store (local folder or s3://).
- ``moto_server``: an S3 endpoint; ``--bucket`` creates buckets.

Secrets. The Ray token is generated here (256 random bits, like ``ray get-auth-token --generate``) into
``STATE/auth_token`` (mode 0600); nodes read it through ``RAY_AUTH_TOKEN_PATH`` and it never appears in
argv, logs, state.json or the ``env`` output (which prints the file path). ``~/.ray/auth_token`` is left
alone, so this stack never changes the token of other Ray clusters on the machine. AWS credentials are
inherited from the environment that runs ``up``; Ray nodes keep them, and jobs read them from the node
(``pyoco submit`` passes only references). When the environment has none and moto is started, nodes get
moto's documented dummy pair (``testing``/``testing``).

State (pids, ports, URLs) lives in ``STATE/state.json``; STATE is ``--state-dir``, else ``$PYOCO_LOCAL_DIR``,
else ``.pyoco-local`` at the repository root. Logs go to ``STATE/logs``. ``down`` signals only the
process groups recorded there (never ``ray stop``, which would kill every Ray on the machine).

This module is plain stdlib + psutil (a Ray dependency) so the shell wrappers need nothing else.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
HOST = "127.0.0.1"
STATE_FILE = "state.json"
TOKEN_FILE = "auth_token"
MOTO_DUMMY_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}
# Variables that must not leak from the caller into the nodes: the nodes get their own token and address.
_SCRUB_FROM_NODE_ENV = ("RAY_AUTH_TOKEN", "RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")


class StackError(RuntimeError):
    """An expected failure, printed as one line by the CLI."""


@dataclass
class StackSpec:
    """What ``up`` starts. Ports of 0 are chosen free at start."""

    ray: bool = True
    workers: int = 0
    head_cpus: int = 2
    worker_cpus: int = 2
    head_resources: dict[str, float] = field(default_factory=dict)
    worker_resources: dict[str, float] = field(default_factory=lambda: {"preprocess": 2})
    object_store_mb: int = 256
    ray_port: int = 0
    dashboard_port: int = 0
    mlflow: bool = True
    mlflow_port: int = 0
    mlflow_artifacts: str | None = None  # None: STATE/mlflow/artifacts
    s3: bool = True
    s3_port: int = 0
    buckets: list[str] = field(default_factory=list)
    timeout_s: float = 180.0


# --------------------------------------------------------------------------------------------- utilities
def default_state_dir() -> Path:
    return Path(os.environ.get("PYOCO_LOCAL_DIR") or REPO / ".pyoco-local")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def executable(name: str) -> str:
    """A console script of this interpreter's environment (the venv), else from PATH."""
    here = Path(sys.executable).parent / name
    if here.exists():
        return str(here)
    found = shutil.which(name)
    if not found:
        raise StackError(f"{name} not found next to {sys.executable} nor on PATH")
    return found


def http_get(url: str, *, token: str | None = None, timeout_s: float = 3.0) -> tuple[int, str]:
    """(status, body) of a GET; (0, reason) when nothing answers. Loopback URLs only."""
    req = urllib.request.Request(url)
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=timeout_s) as r:  # noqa: S310 (127.0.0.1 only)
            return r.status, r.read().decode("utf-8", "replace")
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode("utf-8", "replace")
    except (urllib.error.URLError, OSError) as err:
        return 0, str(getattr(err, "reason", err))


def write_token(path: Path) -> str:
    """A fresh 256-bit hex token (Ray's own format), written with mode 0600."""
    token = secrets.token_hex(32)
    path.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token)
    return token


def read_token(state_dir: Path) -> str | None:
    try:
        return (state_dir / TOKEN_FILE).read_text().strip() or None
    except FileNotFoundError:
        return None


# --------------------------------------------------------------------------------------------- processes
_POPEN: dict[int, subprocess.Popen] = {}  # children started by this process, so stop() can reap them


def _spawn(name: str, argv: list[str], env: dict[str, str], log_dir: Path) -> dict[str, Any]:
    """Start ``argv`` in a new session (its own process group) with output to ``log_dir/name.log``."""
    import psutil

    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"{name}.log"
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            argv,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            cwd=str(log_dir),
        )
    _POPEN[proc.pid] = proc
    return {
        "name": name,
        "pid": proc.pid,
        "create_time": psutil.Process(proc.pid).create_time(),
        "log": str(log_path),
    }


def _group_members(rec: dict[str, Any]) -> list:
    """Live processes of the recorded process group that started no earlier than its leader."""
    import psutil

    members = []
    for p in psutil.process_iter(["pid", "create_time", "status"]):
        try:
            if os.getpgid(p.pid) != rec["pid"]:
                continue
            if p.info["create_time"] + 1e-3 < rec["create_time"]:
                continue  # an older process that reuses the number: not ours
            if p.info["status"] == psutil.STATUS_ZOMBIE:
                continue
            members.append(p)
        except (ProcessLookupError, psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return members


def _alive(rec: dict[str, Any] | None) -> bool:
    if not rec:
        return False
    import psutil

    try:
        p = psutil.Process(rec["pid"])
        return abs(p.create_time() - rec["create_time"]) < 1e-3 and p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _reap(pid: int) -> None:
    proc = _POPEN.pop(pid, None)
    if proc is not None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=0.1)


def _terminate(recs: list[dict[str, Any]], timeout_s: float = 30.0) -> None:
    """SIGTERM each recorded group leader (``ray start --block`` then stops its own node's processes),
    all at once; after ``timeout_s`` terminate, then kill, whatever is left in those groups."""
    import psutil

    leaders = [p for rec in recs for p in _group_members(rec) if p.pid == rec["pid"]]
    for p in leaders:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.send_signal(signal.SIGTERM)
    psutil.wait_procs(leaders, timeout=timeout_s)
    rest = [p for rec in recs for p in _group_members(rec)]
    for p in rest:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.terminate()
    _, alive = psutil.wait_procs(rest, timeout=5)
    for p in alive + [p for rec in recs for p in _group_members(rec)]:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()
    for rec in recs:
        _reap(rec["pid"])


# ------------------------------------------------------------------------------------------------- state
def load_state(state_dir: Path) -> dict[str, Any] | None:
    path = Path(state_dir) / STATE_FILE
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise StackError(
            f"{path}: unreadable state ({err.msg}); remove it after checking nothing runs"
        ) from None


def _save_state(state_dir: Path, state: dict[str, Any]) -> None:
    path = Path(state_dir) / STATE_FILE
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(state, indent=2, sort_keys=True))
    tmp.replace(path)


def _all_records(state: dict[str, Any]) -> list[dict[str, Any]]:
    """Process records in stop order: workers, head, mlflow, s3."""
    recs = list((state.get("ray") or {}).get("workers", []))
    recs += [
        state[key]["process"] for key in ("ray", "mlflow", "s3") if (state.get(key) or {}).get("process")
    ]
    return recs


# ------------------------------------------------------------------------------------------------- start
def _wait(what: str, check, deadline: float, state: dict[str, Any]) -> None:
    """Poll ``check() -> (ok, why)`` until ok; fail early when any process started so far has exited."""
    last = ""
    while time.monotonic() < deadline:
        for rec in _all_records(state):
            if not _alive(rec):
                tail = _log_tail(rec.get("log"))
                raise StackError(f"{rec['name']} exited during start-up (log {rec.get('log')}): {tail}")
        ok, last = check()
        if ok:
            return
        time.sleep(0.25)
    raise StackError(
        f"{what} not healthy after the start-up timeout: {last} (logs in {Path(state['state_dir']) / 'logs'})"
    )


def _log_tail(path: str | None, lines: int = 3) -> str:
    if not path or not Path(path).exists():
        return ""
    text = Path(path).read_text(errors="replace").strip().splitlines()
    return " | ".join(line.strip() for line in text[-lines:])


def _node_env(base: dict[str, str], state_dir: Path) -> dict[str, str]:
    env = {k: v for k, v in base.items() if k not in _SCRUB_FROM_NODE_ENV}
    env["RAY_AUTH_MODE"] = "token"
    env["RAY_AUTH_TOKEN_PATH"] = str(state_dir / TOKEN_FILE)
    # On SIGTERM, `ray start --block` first drains its node for up to 30 s (for Serve replicas); a head node
    # never finishes draining, so every `down` waited the full 30 s. Nothing here needs draining.
    env.setdefault("RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S", "0")
    # Idle worker processes live for a minute (pyoco's WORKER_POOL_ENV, pipelines/context.py): Ray's 1 s
    # default restarted workers all through a preprocess run.
    env.setdefault("RAY_idle_worker_killing_time_threshold_ms", "60000")
    return env


def _ray_alive_nodes(dashboard_url: str, token: str) -> tuple[int, str]:
    status, body = http_get(f"{dashboard_url}/nodes?view=summary", token=token)
    if status != 200:
        return -1, f"HTTP {status}"
    try:
        nodes = json.loads(body)["data"]["summary"]
    except (KeyError, ValueError):
        return -1, "unexpected /nodes answer"
    return sum(1 for n in nodes if n.get("raylet", {}).get("state") == "ALIVE"), ""


def start(spec: StackSpec, state_dir: Path | str | None = None) -> dict[str, Any]:
    """Start the stack, wait until every part is healthy, return the state (also in STATE/state.json).

    On any failure, everything started so far is stopped again before the error propagates.
    """
    state_dir = Path(state_dir or default_state_dir()).resolve()
    state_dir.mkdir(parents=True, exist_ok=True)
    old = load_state(state_dir)
    if old and any(_alive(r) for r in _all_records(old)):
        raise StackError(f"a local stack already runs from {state_dir} (see `status`; `down` stops it)")
    if old:
        stop(state_dir)  # a stack that died on its own: clear its leftovers (temp dir, stray processes)

    logs = state_dir / "logs"
    deadline = time.monotonic() + spec.timeout_s
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    env.setdefault("PYTHONUNBUFFERED", "1")
    state: dict[str, Any] = {"state_dir": str(state_dir), "started_at": time.time(), "env": {}}
    _save_state(state_dir, state)

    try:
        # moto and mlflow first (their URLs go into the Ray nodes' environment), then Ray; all three start
        # together and are awaited afterwards.
        if spec.s3:
            port = spec.s3_port or free_port()
            url = f"http://{HOST}:{port}"
            rec = _spawn("s3", [executable("moto_server"), "-H", HOST, "-p", str(port)], env, logs)
            state["s3"] = {"url": url, "port": port, "process": rec, "buckets": list(spec.buckets)}
            env["AWS_ENDPOINT_URL"] = env["AWS_ENDPOINT_URL_S3"] = url
            state["env"].update(AWS_ENDPOINT_URL=url, AWS_ENDPOINT_URL_S3=url)
            env.setdefault("AWS_DEFAULT_REGION", "us-east-1")
            if not (env.get("AWS_ACCESS_KEY_ID") and env.get("AWS_SECRET_ACCESS_KEY")):
                env.update(MOTO_DUMMY_CREDENTIALS)
                state["s3"]["credentials"] = "moto-dummy"
            else:
                state["s3"]["credentials"] = "inherited"
            _save_state(state_dir, state)

        if spec.mlflow:
            port = spec.mlflow_port or free_port()
            url = f"http://{HOST}:{port}"
            root = state_dir / "mlflow"
            root.mkdir(parents=True, exist_ok=True)
            artifacts = spec.mlflow_artifacts or str(root / "artifacts")
            argv = [
                executable("mlflow"),
                "server",
                "--backend-store-uri",
                f"sqlite:///{root / 'mlflow.db'}",
                "--serve-artifacts",
                "--artifacts-destination",
                artifacts,
                "--host",
                HOST,
                "--port",
                str(port),
                "--workers",
                "1",
            ]
            # MLflow's server-side job runner (huey consumers: ~10 processes, slow to stop) serves GenAI
            # features pyoco does not use.
            ml_env = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", **env}
            rec = _spawn("mlflow", argv, ml_env, logs)
            state["mlflow"] = {"url": url, "port": port, "process": rec, "artifacts": artifacts}
            env["MLFLOW_TRACKING_URI"] = url
            state["env"]["MLFLOW_TRACKING_URI"] = url
            _save_state(state_dir, state)

        token = None
        if spec.ray:
            token = write_token(state_dir / TOKEN_FILE)
            node_env = _node_env(env, state_dir)
            gcs_port = spec.ray_port or free_port()
            dash_port = spec.dashboard_port or free_port()
            temp_dir = tempfile.mkdtemp(prefix="pyoco-ray-")  # short: Ray's unix sockets live below it
            shim = str(Path(__file__).with_name("ray_loopback.py"))
            common = [
                "--block",
                "--node-ip-address",
                HOST,
                "--object-store-memory",
                str(spec.object_store_mb * 1024 * 1024),
                "--disable-usage-stats",
                "--log-style",
                "record",
                "--log-color",
                "false",
            ]
            head_argv = [
                sys.executable,
                shim,
                "start",
                "--head",
                "--port",
                str(gcs_port),
                "--include-dashboard=true",
                "--dashboard-host",
                HOST,
                "--dashboard-port",
                str(dash_port),
                "--ray-client-server-port",
                str(free_port()),
                "--dashboard-agent-listen-port",
                str(free_port()),
                "--num-cpus",
                str(spec.head_cpus),
                *(["--resources", json.dumps(spec.head_resources)] if spec.head_resources else []),
                "--temp-dir",
                temp_dir,
                *common,
            ]
            rec = _spawn("ray-head", head_argv, node_env, logs)
            dashboard = f"http://{HOST}:{dash_port}"
            state["ray"] = {
                "address": f"{HOST}:{gcs_port}",
                "dashboard_url": dashboard,
                "dashboard_port": dash_port,
                "temp_dir": temp_dir,
                "worker_temp_dirs": [],
                "token_path": str(state_dir / TOKEN_FILE),
                "process": rec,
                "workers": [],
                "expected_nodes": 1 + spec.workers,
            }
            state["env"].update(RAY_ADDRESS=dashboard, RAY_AUTH_TOKEN_PATH=str(state_dir / TOKEN_FILE))
            _save_state(state_dir, state)

        if spec.ray and spec.workers:
            # Workers join as soon as the GCS accepts connections, while the head's dashboard still boots.
            ray = state["ray"]
            _wait("Ray GCS", lambda: _tcp_open(HOST, gcs_port), deadline, state)
            for i in range(spec.workers):
                # Each node gets its own temp dir, like separate machines: nodes sharing one also share
                # runtime_resources/, and a worker node's runtime-env agent then deletes a job's working_dir
                # (the job driver's cwd on the head) when the job's tasks on that worker are done.
                worker_temp = tempfile.mkdtemp(prefix="pyoco-ray-")
                ray["worker_temp_dirs"].append(worker_temp)
                worker_argv = [
                    sys.executable,
                    shim,
                    "start",
                    "--address",
                    ray["address"],
                    "--dashboard-agent-listen-port",
                    str(free_port()),
                    "--num-cpus",
                    str(spec.worker_cpus),
                    *(["--resources", json.dumps(spec.worker_resources)] if spec.worker_resources else []),
                    "--temp-dir",
                    worker_temp,
                    *common,
                ]
                ray["workers"].append(_spawn(f"ray-worker-{i + 1}", worker_argv, node_env, logs))
                _save_state(state_dir, state)

        if spec.s3:
            s3 = state["s3"]
            _wait("moto S3", lambda: _ok(http_get(s3["url"] + "/moto-api/")), deadline, state)
            for bucket in spec.buckets:
                _make_bucket(s3["url"], bucket, env)
        if spec.mlflow:
            ml = state["mlflow"]
            _wait("mlflow server", lambda: _ok(http_get(ml["url"] + "/health")), deadline, state)
        if spec.ray:
            ray = state["ray"]

            def nodes_up():
                code, body = http_get(ray["dashboard_url"] + "/api/gcs_healthz")
                if code != 200:
                    return False, f"dashboard: HTTP {code} {body[:80]}"
                n, why = _ray_alive_nodes(ray["dashboard_url"], token)
                return n >= ray["expected_nodes"], why or f"{n}/{ray['expected_nodes']} nodes alive"

            _wait("Ray cluster", nodes_up, deadline, state)
    except BaseException:
        with contextlib.suppress(Exception):
            stop(state_dir)
        raise
    state["ready_at"] = time.time()
    _save_state(state_dir, state)
    return state


def _tcp_open(host: str, port: int) -> tuple[bool, str]:
    try:
        with socket.create_connection((host, port), timeout=1):
            return True, ""
    except OSError as err:
        return False, f"{host}:{port}: {err.strerror or err}"


def _ok(answer: tuple[int, str]) -> tuple[bool, str]:
    status, body = answer
    return status == 200, f"HTTP {status} {body[:80]}".strip()


def _make_bucket(endpoint: str, bucket: str, env: dict[str, str]) -> None:
    import boto3

    s3 = boto3.client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
        region_name=env.get("AWS_DEFAULT_REGION", "us-east-1"),
    )
    s3.create_bucket(Bucket=bucket)


# ------------------------------------------------------------------------------------------- status/stop
def status(state_dir: Path | str | None = None) -> dict[str, Any]:
    """Health of each recorded part: ``{"running": bool, "services": {name: {...}}}``."""
    state_dir = Path(state_dir or default_state_dir()).resolve()
    state = load_state(state_dir)
    out: dict[str, Any] = {"state_dir": str(state_dir), "running": False, "services": {}}
    if not state:
        return out
    services = out["services"]
    if state.get("s3"):
        s3 = state["s3"]
        code, _ = http_get(s3["url"] + "/moto-api/")
        services["s3"] = _svc(s3["process"], code == 200, url=s3["url"], buckets=s3.get("buckets", []))
    if state.get("mlflow"):
        ml = state["mlflow"]
        code, _ = http_get(ml["url"] + "/health")
        services["mlflow"] = _svc(ml["process"], code == 200, url=ml["url"], artifacts=ml["artifacts"])
    if state.get("ray"):
        ray = state["ray"]
        code, _ = http_get(ray["dashboard_url"] + "/api/gcs_healthz")
        mode_code, mode_body = http_get(ray["dashboard_url"] + "/api/authentication_mode")
        auth = json.loads(mode_body).get("authentication_mode") if mode_code == 200 else None
        token = read_token(state_dir)
        nodes, _ = _ray_alive_nodes(ray["dashboard_url"], token) if code == 200 and token else (0, "")
        workers_alive = sum(_alive(w) for w in ray.get("workers", []))
        healthy = code == 200 and auth == "token" and nodes >= ray["expected_nodes"]
        services["ray"] = _svc(
            ray["process"],
            healthy,
            url=ray["dashboard_url"],
            address=ray["address"],
            auth=auth,
            nodes_alive=max(nodes, 0),
            nodes_expected=ray["expected_nodes"],
            worker_processes_alive=workers_alive,
        )
    out["running"] = bool(services) and all(s["healthy"] for s in services.values())
    return out


def _svc(rec: dict[str, Any], healthy: bool, **info: Any) -> dict[str, Any]:
    alive = _alive(rec)
    return {"pid": rec["pid"], "alive": alive, "healthy": alive and healthy, "log": rec["log"], **info}


def stop(state_dir: Path | str | None = None) -> list[str]:
    """Stop every recorded process group (workers, head, mlflow, s3); return the names stopped."""
    state_dir = Path(state_dir or default_state_dir()).resolve()
    state = load_state(state_dir)
    if not state:
        return []
    running = [rec for rec in _all_records(state) if _alive(rec) or _group_members(rec)]
    _terminate(running)
    stopped = [rec["name"] for rec in running]
    ray = state.get("ray") or {}
    for temp_dir in [ray.get("temp_dir"), *ray.get("worker_temp_dirs", [])]:
        if temp_dir and Path(temp_dir).name.startswith("pyoco-ray-"):
            shutil.rmtree(temp_dir, ignore_errors=True)
    (state_dir / STATE_FILE).unlink(missing_ok=True)
    return stopped


def env_lines(state_dir: Path | str | None = None) -> list[str]:
    """``export`` lines for a shell: URLs and the token *path* (never a secret value)."""
    state_dir = Path(state_dir or default_state_dir()).resolve()
    state = load_state(state_dir)
    if not state:
        raise StackError(f"no local stack recorded in {state_dir} (start one with `up`)")
    lines = [f"export {k}={_shell_quote(v)}" for k, v in sorted(state.get("env", {}).items())]
    if state.get("ray"):
        # `ray job ...` and other Ray clients attach the token only when they see token mode.
        lines.append("export RAY_AUTH_MODE=token")
    if (state.get("s3") or {}).get("credentials") == "moto-dummy":
        lines.append("# moto accepts any credentials; the nodes use its dummy pair:")
        lines += [f"export {k}={v}" for k, v in MOTO_DUMMY_CREDENTIALS.items()]
    return lines


def _shell_quote(value: str) -> str:
    import shlex

    return shlex.quote(value)


# --------------------------------------------------------------------------------------------------- CLI
def _print_status(report: dict[str, Any]) -> None:
    if not report["services"]:
        print(f"local stack: not running (state dir {report['state_dir']})")
        return
    for name, s in report["services"].items():
        word = "healthy" if s["healthy"] else ("UNHEALTHY" if s["alive"] else "STOPPED")
        extra = ""
        if name == "ray":
            extra = f" auth={s['auth']} nodes={s['nodes_alive']}/{s['nodes_expected']} gcs={s['address']}"
        print(f"{name:<7} {word:<9} {s['url']:<26} pid {s['pid']}{extra}")


def _json_dict(text: str) -> dict[str, float]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise argparse.ArgumentTypeError(f"not JSON ({err.msg}): {text}") from None
    if not isinstance(value, dict) or not all(isinstance(v, int | float) for v in value.values()):
        raise argparse.ArgumentTypeError(
            f'expected a JSON object of numbers, e.g. {{"preprocess": 2}}: {text}'
        )
    return value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="infra/local/services.py", description=__doc__.split("\n\n")[0])
    state_help = "state folder (default: $PYOCO_LOCAL_DIR, else .pyoco-local at the repository root)"
    parser.add_argument("--state-dir", type=Path, default=None, help=state_help)
    # Also accepted after the subcommand (the shell wrappers put the subcommand first).
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--state-dir", type=Path, default=argparse.SUPPRESS, help=state_help)
    sub = parser.add_subparsers(dest="command", required=True)

    up = sub.add_parser("up", parents=[common], help="start the stack and wait until it is healthy")
    up.add_argument("--workers", type=int, default=1, help="Ray worker nodes besides the head (default 1)")
    up.add_argument("--head-cpus", type=int, default=2, help="logical CPUs of the head (default 2)")
    up.add_argument("--worker-cpus", type=int, default=2, help="logical CPUs per worker (default 2)")
    up.add_argument("--head-resources", type=_json_dict, default={}, help="custom resources, JSON")
    up.add_argument(
        "--worker-resources",
        type=_json_dict,
        default={"preprocess": 2},
        help='custom resources per worker, JSON (default {"preprocess": 2})',
    )
    up.add_argument("--object-store-mb", type=int, default=256, help="object store per node (default 256)")
    up.add_argument("--ray-port", type=int, default=0, help="GCS port (default: a free one)")
    up.add_argument("--dashboard-port", type=int, default=0, help="dashboard / Jobs API port")
    up.add_argument("--mlflow-port", type=int, default=0)
    up.add_argument("--mlflow-artifacts", default=None, help="artifact destination (folder or s3://)")
    up.add_argument("--s3-port", type=int, default=0)
    up.add_argument("--bucket", action="append", default=[], help="create this bucket (repeatable)")
    up.add_argument("--no-ray", action="store_true")
    up.add_argument("--no-mlflow", action="store_true")
    up.add_argument("--no-s3", action="store_true")
    up.add_argument("--timeout", type=float, default=180.0, help="start-up timeout in seconds")

    st = sub.add_parser("status", parents=[common], help="report each part; exit 0 only when all are healthy")
    st.add_argument("--json", action="store_true")
    sub.add_parser("env", parents=[common], help="print export lines for a shell (no secret values)")
    sub.add_parser("down", parents=[common], help="stop what `up` started")

    args = parser.parse_args(argv)
    try:
        if args.command == "up":
            spec = StackSpec(
                ray=not args.no_ray,
                workers=args.workers,
                head_cpus=args.head_cpus,
                worker_cpus=args.worker_cpus,
                head_resources=args.head_resources,
                worker_resources=args.worker_resources,
                object_store_mb=args.object_store_mb,
                ray_port=args.ray_port,
                dashboard_port=args.dashboard_port,
                mlflow=not args.no_mlflow,
                mlflow_port=args.mlflow_port,
                mlflow_artifacts=args.mlflow_artifacts,
                s3=not args.no_s3,
                s3_port=args.s3_port,
                buckets=args.bucket,
                timeout_s=args.timeout,
            )
            t0 = time.monotonic()
            try:
                start(spec, args.state_dir)
            except StackError as err:
                # A process that dies during start-up mostly lost a race: a free port taken by another
                # program between choosing and binding it, or (on a loaded machine) Ray's hard-coded 30 s
                # for a node to register with the GCS. start() has stopped everything again: one more try.
                if "exited during start-up" not in str(err):
                    raise
                print(f"retrying once after: {' '.join(str(err).split())[:300]}", file=sys.stderr)
                start(spec, args.state_dir)
            print(f"local stack up in {time.monotonic() - t0:.1f}s", file=sys.stderr)
            _print_status(status(args.state_dir))
            print(
                f'point a shell at it: eval "$({sys.argv[0] if argv is None else "services.py"} env)"',
                file=sys.stderr,
            )
            return 0
        if args.command == "status":
            report = status(args.state_dir)
            print(json.dumps(report, indent=2)) if args.json else _print_status(report)
            return 0 if report["running"] else 1
        if args.command == "env":
            print("\n".join(env_lines(args.state_dir)))
            return 0
        if args.command == "down":
            stopped = stop(args.state_dir)
            print(f"stopped: {', '.join(stopped) if stopped else 'nothing was running'}", file=sys.stderr)
            return 0
    except StackError as err:
        print(f"error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted (everything started was stopped)", file=sys.stderr)
        return 130
    return 2


if __name__ == "__main__":
    sys.exit(main())
