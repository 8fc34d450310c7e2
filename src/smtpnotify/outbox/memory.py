"""An outbox held in this process's memory: fast, thread-safe, and **not durable**."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Any

from .._prepared import PreparedMessage
from ._base import (
    FINISHED_STATUSES,
    BaseOutbox,
    OutboxEntry,
    OutboxError,
    OutboxStatus,
    as_utc,
    call_subscribers,
    check_limit,
    check_purge_statuses,
    check_remaining,
    join_accepted,
    join_refused,
)

__all__ = ["MemoryOutbox"]


@dataclass(slots=True)
class _Slot:
    seq: int
    entry: OutboxEntry


def _snapshot(entry: OutboxEntry) -> OutboxEntry:
    # OutboxEntry is frozen but ``refused`` is a dict: hand out a copy of it.
    return replace(entry, refused=dict(entry.refused))


class MemoryOutbox(BaseOutbox):
    """An :class:`~smtpnotify.outbox.Outbox` in a dictionary, guarded by a lock.

    Everything is lost when the process ends: use it for tests, scripts and
    development, or where losing queued notifications on a restart is
    acceptable.  :class:`~smtpnotify.outbox.SQLiteOutbox` is the durable choice.
    ``Notifier(config)`` without an outbox uses one of these.

    Args:
        max_finished: how many finished (``sent``, ``failed``, ``expired``)
            entries to remember; beyond it the one finished longest ago is
            forgotten, so a long-running process does not grow without bound.
            ``None`` keeps them all (until :meth:`purge`).  Pending and sending
            entries are never dropped.

    Example::

        outbox = MemoryOutbox()
        entry_id = outbox.add(message, now=now, expires_at=now + timedelta(days=5))
        [entry] = outbox.claim(now=now, owner="worker-1", lease=timedelta(minutes=5))
    """

    def __init__(self, *, max_finished: int | None = 10_000) -> None:
        if max_finished is not None and max_finished < 0:
            raise ValueError(f"max_finished must be at least 0 or None, got {max_finished}")
        self._max_finished = max_finished
        self._lock = threading.Lock()
        self._slots: dict[str, _Slot] = {}
        self._active: dict[str, _Slot] = {}  # pending and sending: what claims look at
        self._finished: dict[str, None] = {}  # finished ids, oldest finish first
        self._seq = 0
        self._subscribers: list[Callable[[], None]] = []
        self._closed = False

    def __repr__(self) -> str:
        return f"<MemoryOutbox entries={len(self._slots)}{' closed' if self._closed else ''}>"

    # -- helpers (call with the lock held) -------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise OutboxError("the outbox is closed")

    def _held(self, entry_id: str, owner: str) -> _Slot | None:
        slot = self._slots.get(entry_id)
        if slot is None:
            return None
        entry = slot.entry
        if entry.status is not OutboxStatus.SENDING or entry.lease_owner != owner:
            return None
        return slot

    def _update_held(
        self, entry_id: str, owner: str, change: Callable[[OutboxEntry], OutboxEntry]
    ) -> bool:
        """Store ``change(entry)`` if ``owner`` holds the entry; ``False`` (nothing done) if not."""
        with self._lock:
            self._check_open()
            slot = self._held(entry_id, owner)
            if slot is None:
                return False
            self._set(slot, change(slot.entry))
            return True

    def _set(self, slot: _Slot, entry: OutboxEntry) -> None:
        """Store ``entry`` in ``slot`` and keep the indexes in step (lock held)."""
        slot.entry = entry
        self._finished.pop(entry.id, None)
        if entry.status in FINISHED_STATUSES:
            self._active.pop(entry.id, None)
            self._finished[entry.id] = None
            if self._max_finished is not None:
                while len(self._finished) > self._max_finished:
                    oldest = next(iter(self._finished))
                    del self._finished[oldest]
                    del self._slots[oldest]
        else:
            self._active[entry.id] = slot

    # -- the protocol ----------------------------------------------------------------------

    def add(
        self,
        message: PreparedMessage,
        *,
        now: datetime,
        expires_at: datetime,
        connection: Any = None,
    ) -> str:
        """Store a new ``pending`` message, due at once, and return its id.

        ``connection`` must be ``None`` (``TypeError`` otherwise): there is no
        database transaction to join.
        """
        if connection is not None:
            raise TypeError("MemoryOutbox cannot enqueue inside a database transaction")
        now = as_utc(now, "now")
        expires_at = as_utc(expires_at, "expires_at")
        entry_id = uuid.uuid4().hex
        entry = OutboxEntry(
            id=entry_id,
            status=OutboxStatus.PENDING,
            message=message,
            created_at=now,
            expires_at=expires_at,
            next_attempt_at=now,
            attempts=0,
            updated_at=now,
        )
        with self._lock:
            self._check_open()
            self._seq += 1
            slot = _Slot(self._seq, entry)
            self._slots[entry_id] = slot
            self._set(slot, entry)
            subscribers = list(self._subscribers)
        call_subscribers(subscribers)
        return entry_id

    def _claim(
        self, *, now: datetime, owner: str, lease: timedelta, limit: int
    ) -> list[OutboxEntry]:
        with self._lock:
            self._check_open()
            due: list[_Slot] = []
            for slot in self._active.values():
                e = slot.entry
                if now >= e.expires_at:
                    continue
                if (
                    e.status is OutboxStatus.PENDING
                    and e.next_attempt_at is not None
                    and e.next_attempt_at <= now
                ) or (
                    e.status is OutboxStatus.SENDING
                    and e.lease_until is not None
                    and e.lease_until <= now
                ):
                    due.append(slot)
            due.sort(key=lambda s: (s.entry.next_attempt_at or now, s.entry.created_at, s.seq))
            claimed: list[OutboxEntry] = []
            for slot in due[:limit]:
                self._set(
                    slot,
                    replace(
                        slot.entry,
                        status=OutboxStatus.SENDING,
                        lease_owner=owner,
                        lease_until=now + lease,
                        attempts=slot.entry.attempts + 1,
                        updated_at=now,
                    ),
                )
                claimed.append(_snapshot(slot.entry))
            return claimed

    def _finish(
        self,
        entry_id: str,
        owner: str,
        now: datetime,
        status: OutboxStatus,
        *,
        accepted: tuple[str, ...],
        refused: dict[str, tuple[int, str]] | None,
        error: str | None = None,
    ) -> bool:
        return self._update_held(
            entry_id,
            owner,
            lambda e: replace(
                e,
                status=status,
                accepted=join_accepted(e.accepted, accepted),
                refused=join_refused(e.refused, refused),
                last_error=e.last_error if error is None else error,
                next_attempt_at=None,
                lease_owner=None,
                lease_until=None,
                updated_at=now,
            ),
        )

    def record_retry(
        self,
        entry_id: str,
        *,
        owner: str,
        now: datetime,
        next_attempt_at: datetime,
        error: str,
        accepted: tuple[str, ...] = (),
        refused: dict[str, tuple[int, str]] | None = None,
        remaining: tuple[str, ...] | None = None,
    ) -> bool:
        """Back to ``pending`` until ``next_attempt_at`` if ``owner`` holds the entry."""
        now = as_utc(now, "now")
        due = as_utc(next_attempt_at, "next_attempt_at")
        check_remaining(remaining)

        def change(e: OutboxEntry) -> OutboxEntry:
            message = e.message
            if remaining is not None:
                message = replace(message, recipients=tuple(remaining))
            return replace(
                e,
                status=OutboxStatus.PENDING,
                message=message,
                accepted=join_accepted(e.accepted, accepted),
                refused=join_refused(e.refused, refused),
                last_error=error,
                next_attempt_at=due,
                lease_owner=None,
                lease_until=None,
                updated_at=now,
            )

        return self._update_held(entry_id, owner, change)

    def record_expired(
        self, entry_id: str, *, owner: str | None, now: datetime, error: str | None = None
    ) -> bool:
        """Mark ``expired`` if ``owner`` holds the entry (or nobody does, for ``owner=None``)."""
        now = as_utc(now, "now")
        with self._lock:
            self._check_open()
            slot = self._slots.get(entry_id)
            if slot is None:
                return False
            e = slot.entry
            if owner is None:
                free = e.status is OutboxStatus.PENDING or (
                    e.status is OutboxStatus.SENDING
                    and e.lease_until is not None
                    and e.lease_until <= now
                )
                if not free:
                    return False
            elif self._held(entry_id, owner) is None:
                return False
            self._set(slot, self._expired(e, now, error))
            return True

    @staticmethod
    def _expired(e: OutboxEntry, now: datetime, error: str | None) -> OutboxEntry:
        return replace(
            e,
            status=OutboxStatus.EXPIRED,
            last_error=e.last_error if error is None else error,
            next_attempt_at=None,
            lease_owner=None,
            lease_until=None,
            updated_at=now,
        )

    def release(self, entry_id: str, *, owner: str, now: datetime) -> bool:
        """Give a claimed entry back untried if ``owner`` holds it."""
        now = as_utc(now, "now")
        return self._update_held(
            entry_id,
            owner,
            lambda e: replace(
                e,
                status=OutboxStatus.PENDING,
                next_attempt_at=now,
                attempts=max(e.attempts - 1, 0),
                lease_owner=None,
                lease_until=None,
                updated_at=now,
            ),
        )

    def expire_due(self, *, now: datetime) -> list[OutboxEntry]:
        """Expire every entry that can no longer be attempted; return them."""
        now = as_utc(now, "now")
        with self._lock:
            self._check_open()
            out: list[OutboxEntry] = []
            active = sorted(self._active.values(), key=lambda s: (s.entry.created_at, s.seq))
            for slot in active:
                e = slot.entry
                if e.expires_at > now:
                    continue
                if e.status is OutboxStatus.PENDING or (
                    e.status is OutboxStatus.SENDING
                    and e.lease_until is not None
                    and e.lease_until <= now
                ):
                    self._set(slot, self._expired(e, now, None))
                    out.append(_snapshot(slot.entry))
            return out

    def next_due(self, *, now: datetime) -> datetime | None:
        """The earliest time something becomes due or expires, or ``None``."""
        as_utc(now, "now")
        with self._lock:
            self._check_open()
            times: list[datetime] = []
            for slot in self._active.values():
                e = slot.entry
                if e.status is OutboxStatus.PENDING:
                    times.append(e.expires_at)
                    if e.next_attempt_at is not None:
                        times.append(e.next_attempt_at)
                elif e.status is OutboxStatus.SENDING and e.lease_until is not None:
                    times.append(e.lease_until)
            return min(times, default=None)

    def get(self, entry_id: str) -> OutboxEntry | None:
        """The entry with this id, or ``None``."""
        with self._lock:
            self._check_open()
            slot = self._slots.get(entry_id)
            return None if slot is None else _snapshot(slot.entry)

    def counts(self) -> dict[OutboxStatus, int]:
        """How many entries have each status (every status is a key)."""
        with self._lock:
            self._check_open()
            out = dict.fromkeys(OutboxStatus, 0)
            for slot in self._slots.values():
                out[slot.entry.status] += 1
            return out

    def entries(self, *, status: OutboxStatus | None = None, limit: int = 100) -> list[OutboxEntry]:
        """Entries, newest first, optionally of one status."""
        check_limit(limit)
        with self._lock:
            self._check_open()
            slots = [s for s in self._slots.values() if status is None or s.entry.status == status]
            slots.sort(key=lambda s: (s.entry.created_at, s.seq), reverse=True)
            return [_snapshot(s.entry) for s in slots[:limit]]

    def retry(self, entry_id: str, *, now: datetime, expires_at: datetime | None = None) -> bool:
        """Put a ``failed`` or ``expired`` entry back to ``pending``, due now."""
        now = as_utc(now, "now")
        new_expiry = None if expires_at is None else as_utc(expires_at, "expires_at")
        with self._lock:
            self._check_open()
            slot = self._slots.get(entry_id)
            if slot is None:
                return False
            e = slot.entry
            if e.status not in (OutboxStatus.FAILED, OutboxStatus.EXPIRED):
                return False
            self._set(
                slot,
                replace(
                    e,
                    status=OutboxStatus.PENDING,
                    next_attempt_at=now,
                    expires_at=new_expiry or now + (e.expires_at - e.created_at),
                    lease_owner=None,
                    lease_until=None,
                    updated_at=now,
                ),
            )
            return True

    def purge(
        self, *, before: datetime, statuses: tuple[OutboxStatus, ...] = FINISHED_STATUSES
    ) -> int:
        """Delete finished entries last updated before ``before``; return how many."""
        before = as_utc(before, "before")
        wanted = check_purge_statuses(statuses)
        with self._lock:
            self._check_open()
            doomed = [
                entry_id
                for entry_id, slot in self._slots.items()
                if slot.entry.status in wanted
                and slot.entry.updated_at is not None
                and slot.entry.updated_at < before
            ]
            for entry_id in doomed:
                del self._slots[entry_id]
                del self._finished[entry_id]
            return len(doomed)

    def subscribe(self, callback: Callable[[], None]) -> None:
        """Have ``callback`` called (in the adding thread) after each ``add``."""
        with self._lock:
            self._subscribers.append(callback)

    def close(self) -> None:
        """Forget every entry; later calls raise :class:`~smtpnotify.outbox.OutboxError`."""
        with self._lock:
            self._closed = True
            self._slots.clear()
            self._active.clear()
            self._finished.clear()
            self._subscribers.clear()
