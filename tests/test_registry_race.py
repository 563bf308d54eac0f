"""Promotion races against a real `mlflow server`: the registry lock keeps aliases and history consistent.

Versions here are bare registry entries with metric tags (promotion reads only tags and aliases), so the
tests exercise the alias/lock logic without logging models.
"""

from __future__ import annotations

import threading
import time

import pytest

from pipelines import registry
from pipelines.common import PyocoError

pytest_plugins = ("tests.fixtures_registry",)


def _bare_versions(client, name: str, losses: list[float]) -> list[str]:
    client.create_registered_model(name)
    out = []
    for i, loss in enumerate(losses):
        mv = client.create_model_version(
            name, source=f"s3://pyoco-test/none/{name}/{i}", tags={f"{registry.V_METRIC}val_loss": repr(loss)}
        )
        out.append(str(mv.version))
    return out


def _race(
    name: str, versions: list[str], *, use_lock: bool, after_read
) -> tuple[list[dict], list[Exception]]:
    results: list[dict] = []
    errors: list[Exception] = []
    start = threading.Barrier(len(versions))

    def go(v: str) -> None:
        start.wait()
        try:
            results.append(
                registry.promote(
                    name, version=v, refuse_raises=False, _use_lock=use_lock, _after_read=after_read
                )
            )
        except Exception as err:  # noqa: BLE001
            errors.append(err)

    threads = [threading.Thread(target=go, args=(v,)) for v in versions]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    return results, errors


def test_concurrent_promotions_with_lock_serialise_and_keep_history_consistent(tracking_env, model_name):
    client = registry._client()
    losses = [0.4, 0.3, 0.2, 0.1]
    versions = _bare_versions(client, model_name, losses)
    # Widen the read-to-write window: without the lock every thread would read the same champion.
    results, errors = _race(model_name, versions, use_lock=True, after_read=lambda: time.sleep(0.2))
    assert errors == [] and len(results) == 4

    state = registry.read_state(client, model_name)
    best = versions[losses.index(min(losses))]
    assert state.champion == best  # gated against the champion of the moment, whatever the order
    events = registry.history(model_name)
    assert [e["generation"] for e in events] == [1, 2, 3, 4]  # one event per promotion, none lost
    assert state.generation == 4
    champion = None
    for e in events:
        assert e["previous_champion"] == champion  # each decision saw the previous one's outcome
        assert e["action"] in ("promote", "refuse")
        if e["action"] == "promote":
            champion = e["version"]
        assert e["champion"] == champion
    assert champion == best
    promoted = [e["version"] for e in events if e["action"] == "promote"]
    # rollback walks back through exactly the promotions that happened, newest first
    for expected in reversed(promoted[:-1]):
        assert registry.rollback(model_name)["champion_version"] == expected
    with pytest.raises(PyocoError, match="no previous champion"):
        registry.rollback(model_name)
    assert client.search_registered_models(f"name = '{model_name}{registry.LOCK_SUFFIX}'") == []


def test_without_the_lock_the_same_race_loses_updates(tracking_env, model_name):
    """Control: the identical race with the lock switched off. All four threads read generation 0 and no
    champion before anyone writes (a barrier between read and write makes that deterministic), so all four
    decide against "no champion", write history generation 1 over each other, and only one event survives.
    Threads whose write was overwritten get a RegistryConflict from the re-read verification (or, when
    the server's own alias upsert collides, an MLflow error): never a silent success with a wrong state."""
    from mlflow.exceptions import MlflowException

    client = registry._client()
    versions = _bare_versions(client, model_name, [0.4, 0.3, 0.2, 0.1])
    all_read = threading.Barrier(len(versions))
    results, errors = _race(model_name, versions, use_lock=False, after_read=all_read.wait)
    assert len(results) + len(errors) == 4
    events = registry.history(model_name)
    assert len(events) == 1  # four promotion decisions, one history entry survived
    assert registry.read_state(client, model_name).generation == 1
    assert all(r["reason"] == "no champion yet" for r in results)
    assert all(isinstance(e, registry.RegistryConflict | MlflowException) for e in errors), errors


def test_lock_waits_for_a_live_holder_and_replaces_an_expired_one(tracking_env, model_name):
    client = registry._client()
    client.create_registered_model(model_name)
    holder = registry.RegistryLock(client, model_name, lease_s=60).acquire()
    with pytest.raises(PyocoError, match="is locked by"):
        registry.RegistryLock(client, model_name, timeout_s=0.3).acquire()
    holder.release()

    # A holder that died: its lease is over, so the next caller takes the lock over.
    dead = registry.RegistryLock(client, model_name, lease_s=-1).acquire()
    taker = registry.RegistryLock(client, model_name, timeout_s=10).acquire()
    rm = client.get_registered_model(model_name + registry.LOCK_SUFFIX)
    assert rm.tags[registry.L_OWNER] == taker.owner
    dead.release()  # no longer the owner: must not delete the new holder's lock
    assert (
        client.get_registered_model(model_name + registry.LOCK_SUFFIX).tags[registry.L_OWNER] == taker.owner
    )
    taker.release()
    assert client.search_registered_models(f"name = '{model_name}{registry.LOCK_SUFFIX}'") == []
