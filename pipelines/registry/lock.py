"""The registry lock: a registered model ``NAME.pyoco-lock`` whose lease runs on the tracking server's clock
(see :mod:`pipelines.registry.transaction` for the protocol)."""

from __future__ import annotations

import contextlib
import os
import random
import socket
import threading
import time
import uuid

from pipelines.common import PyocoError
from pipelines.registry.client import (
    L_LEASE_MS,
    L_OWNER,
    LOCK_SUFFIX,
    RegistryConflict,
    _error_code,
    _one_line,
)


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
