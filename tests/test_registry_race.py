"""Promotion races against a real `mlflow server`: the registry lock keeps aliases and history consistent.

Versions here are bare registry entries with metric tags (promotion reads only tags and aliases), so the
tests exercise the alias/lock logic without logging models.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import types

import pytest

from pipelines.common import PyocoError
from pipelines.registry import lock as registry_lock
from pipelines.registry.client import L_OWNER, LOCK_SUFFIX, V_METRIC, RegistryConflict, _client
from pipelines.registry.lock import RegistryLock
from pipelines.registry.promote import history, promote, rollback
from pipelines.registry.transaction import _transaction, read_state

pytest_plugins = ("tests.fixtures_registry",)


def _bare_versions(client, name: str, losses: list[float]) -> list[str]:
    client.create_registered_model(name)
    out = []
    for i, loss in enumerate(losses):
        mv = client.create_model_version(
            name, source=f"s3://pyoco-test/none/{name}/{i}", tags={f"{V_METRIC}val_loss": repr(loss)}
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
                promote(name, version=v, refuse_raises=False, _use_lock=use_lock, _after_read=after_read)
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
    client = _client()
    losses = [0.4, 0.3, 0.2, 0.1]
    versions = _bare_versions(client, model_name, losses)
    # Widen the read-to-write window: without the lock every thread would read the same champion.
    results, errors = _race(model_name, versions, use_lock=True, after_read=lambda: time.sleep(0.2))
    assert errors == [] and len(results) == 4

    state = read_state(client, model_name)
    best = versions[losses.index(min(losses))]
    assert state.champion == best  # gated against the champion of the moment, whatever the order
    events = history(model_name)
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
        assert rollback(model_name)["champion_version"] == expected
    with pytest.raises(PyocoError, match="no previous champion"):
        rollback(model_name)
    assert client.search_registered_models(f"name = '{model_name}{LOCK_SUFFIX}'") == []


def test_without_the_lock_the_same_race_loses_no_event_and_fails_loudly(tracking_env, model_name):
    """Control: the identical race with the lock switched off. All four threads read generation 0 and no
    champion before anyone writes (a barrier between read and write makes that deterministic), so all four
    decide against "no champion" and claim history generation 1. Every event has its own nonce key, so all
    four decisions stay on record; of any two writers at least one sees the other's event on re-read, so at
    most one returns normally and the rest get a RegistryConflict (or, when the server's own alias upsert
    collides, an MLflow error): never a silent success with a lost event."""
    from mlflow.exceptions import MlflowException

    client = _client()
    versions = _bare_versions(client, model_name, [0.4, 0.3, 0.2, 0.1])
    all_read = threading.Barrier(len(versions))
    results, errors = _race(model_name, versions, use_lock=False, after_read=all_read.wait)
    assert len(results) + len(errors) == 4
    assert len(results) <= 1, results
    assert all(r["reason"] == "no champion yet" for r in results)
    assert all(isinstance(e, RegistryConflict | MlflowException) for e in errors), errors
    events = history(model_name)
    assert sorted(e["version"] for e in events) == sorted(versions)  # four decisions, four events
    assert {e["generation"] for e in events} == {1}
    assert len({e["nonce"] for e in events}) == 4
    conflicts = [e for e in errors if isinstance(e, RegistryConflict)]
    assert {c.event["nonce"] for c in conflicts} <= {e["nonce"] for e in events}


def test_two_writers_of_one_generation_never_lose_an_event(tracking_env, model_name):
    """Two transactions that both read generation 0 (the lock bypassed, as a broken lock or a stalled
    holder would) and both commit an event that moves no alias: before nonces they wrote the same history
    key and the same aliases, both re-reads matched, and one event vanished without an error."""
    client = _client()
    client.create_registered_model(model_name)
    both_read = threading.Barrier(2)
    done: dict[str, dict] = {}
    failed: dict[str, RegistryConflict] = {}

    def writer(tag: str) -> None:
        with _transaction(client, model_name, use_lock=False) as txn:
            both_read.wait()
            try:
                done[tag] = txn.commit({"action": "refuse", "version": None, "reason": f"writer {tag}"})
            except RegistryConflict as err:
                failed[tag] = err

    threads = [threading.Thread(target=writer, args=(t,)) for t in ("a", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert set(done) | set(failed) == {"a", "b"}
    assert failed, "both writers of generation 1 returned normally: one of them must see the other"
    written = [*done.values(), *(e.event for e in failed.values())]
    events = history(model_name)
    assert {e["nonce"] for e in written} <= {e["nonce"] for e in events}  # every nonce is on record
    assert sorted(e["reason"] for e in events) == ["writer a", "writer b"]
    for err in failed.values():
        # The loser either sees the winner's generation-1 event, or (when both reach the server's write at
        # once) the server's unique-key refusal of its half-written update; both say so in one line, and its
        # event is on record either way (asserted above).
        assert "another writer recorded generation 1" in str(err) or (
            "update g1 failed halfway" in str(err) and "is in the history" in str(err)
        ), err


def test_lock_waits_for_a_live_holder(tracking_env, model_name):
    client = _client()
    client.create_registered_model(model_name)
    holder = RegistryLock(client, model_name, lease_s=60).acquire()
    with pytest.raises(PyocoError, match="is locked by"):
        RegistryLock(client, model_name, timeout_s=0.3).acquire()
    holder.release()
    assert client.search_registered_models(f"name = '{model_name}{LOCK_SUFFIX}'") == []


# A lock holder in its own process (another host, as far as the lock can tell): it takes the lock, says
# so, holds it for HOLD seconds while its heartbeat renews the lease, then reports whether it still owns the
# lock and releases it.
HOLDER = """
import json, sys, time
from pipelines.registry.client import RegistryConflict, _client
from pipelines.registry.lock import RegistryLock
uri, name, lease_s, hold_s = sys.argv[1], sys.argv[2], float(sys.argv[3]), float(sys.argv[4])
lock = RegistryLock(_client(uri), name, lease_s=lease_s, timeout_s=60).acquire()
print(json.dumps({"acquired": lock.owner}), flush=True)
time.sleep(hold_s)
try:
    getattr(lock, "check", lambda: None)()  # (the lock before heartbeats had no way to find out)
    print(json.dumps({"held": True}), flush=True)
except RegistryConflict as err:
    print(json.dumps({"lost": str(err)}), flush=True)
lock.release()
print(json.dumps({"released": True}), flush=True)
"""


def _start_holder(uri: str, name: str, *, lease_s: float, hold_s: float) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, uri, name, str(lease_s), str(hold_s)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "MLFLOW_TRACKING_URI": uri},
    )
    line = proc.stdout.readline()
    if not line:
        proc.wait(timeout=30)
        raise AssertionError(f"lock holder failed: {proc.stderr.read()[-2000:]}")
    return proc, json.loads(line)["acquired"]


def _finish(proc: subprocess.Popen) -> list[dict]:
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-2000:]
    return [json.loads(line) for line in out.splitlines() if line.strip()]


def _lock_owner(client, name: str) -> str | None:
    found = client.search_registered_models(f"name = '{name}{LOCK_SUFFIX}'")
    return found[0].tags.get(L_OWNER) if found else None


def test_a_renewing_holder_is_never_broken_by_a_reader_with_a_skewed_clock(
    tracking_env, model_name, monkeypatch
):
    """The holder's lease is 2 s and it holds for 8 s; the reader's wall clock runs an hour ahead and it
    waits 5 s. Expiry is judged by the server's stamps, and the heartbeat renews the lease, so the reader
    never takes the lock: before, it broke the lock at once (expiry against its own clock), and even with
    a correct clock after 2 s (no renewal)."""
    client = _client()
    client.create_registered_model(model_name)
    proc, holder_owner = _start_holder(tracking_env.uri, model_name, lease_s=2.0, hold_s=8.0)
    try:
        skewed = types.SimpleNamespace(
            time=lambda: time.time() + 3600.0, monotonic=time.monotonic, sleep=time.sleep
        )
        monkeypatch.setattr(registry_lock, "time", skewed)
        reader = RegistryLock(client, model_name, lease_s=2.0, timeout_s=5.0)
        with pytest.raises(PyocoError, match="is locked by"):
            reader.acquire()
            reader.release()
        monkeypatch.undo()
        assert _lock_owner(client, model_name) == holder_owner
    finally:
        lines = _finish(proc)
    assert {"held": True} in lines and {"released": True} in lines, lines
    assert _lock_owner(client, model_name) is None


def test_a_stalled_holder_is_replaced_finds_out_and_leaves_the_new_lock_alone(tracking_env, model_name):
    """A holder frozen past its lease (SIGSTOP: a long GC pause, a suspended VM) loses the lock to a
    waiter once the server's clock says the lease is over. When it wakes, its heartbeat sees another owner,
    its transaction check raises, and its release must not delete the new holder's lock."""
    client = _client()
    client.create_registered_model(model_name)
    proc, stale_owner = _start_holder(tracking_env.uri, model_name, lease_s=2.0, hold_s=6.0)
    try:
        os.kill(proc.pid, signal.SIGSTOP)
        taker = RegistryLock(client, model_name, lease_s=30.0, timeout_s=30.0)
        t0 = time.monotonic()
        taker.acquire()
        assert time.monotonic() - t0 < 20
        assert _lock_owner(client, model_name) == taker.owner
    finally:
        os.kill(proc.pid, signal.SIGCONT)
        lines = _finish(proc)
    assert any("lost" in line and taker.owner in line["lost"] for line in lines), lines
    assert _lock_owner(client, model_name) == taker.owner  # the stale release left it alone
    taker.check()
    taker.release()
    assert _lock_owner(client, model_name) is None
    assert stale_owner != taker.owner


def test_a_dead_holder_is_replaced_once_its_lease_is_over(tracking_env, model_name):
    client = _client()
    client.create_registered_model(model_name)
    proc, dead_owner = _start_holder(tracking_env.uri, model_name, lease_s=2.0, hold_s=60.0)
    proc.kill()
    proc.wait(timeout=30)
    assert _lock_owner(client, model_name) == dead_owner
    taker = RegistryLock(client, model_name, timeout_s=30.0).acquire()
    assert _lock_owner(client, model_name) == taker.owner
    taker.release()
    assert _lock_owner(client, model_name) is None
