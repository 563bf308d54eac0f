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
import json
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from pipelines.common import PyocoError
from pipelines.registry.client import (
    CHALLENGER,
    CHAMPION,
    T_GENERATION,
    T_HISTORY,
    V_METRIC,
    RegistryConflict,
    _error_code,
    _now,
    _one_line,
    _user,
)
from pipelines.registry.lock import RegistryLock


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
