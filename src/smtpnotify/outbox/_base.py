"""The outbox protocol: what the notifier needs from a durable message queue.

An outbox stores :class:`~smtpnotify._prepared.PreparedMessage` objects with
their delivery state.  The notifier alone decides *what* happens to a message
(retry, give up, expire); the outbox only records it, atomically, and hands out
due messages under a lease so that two workers never hold the same message.

Time is always passed in (``now``), never read from a clock inside the outbox,
so the notifier's injected clock governs everything.  Every ``datetime`` passed
in must be timezone-aware (a naive one raises ``ValueError``); every
``datetime`` handed back is aware UTC.

The rules every implementation follows (``smtpnotify.testing.conformance``
checks them):

* **Owning an entry.**  ``owner`` holds an entry while the entry is ``sending``
  with ``lease_owner == owner``.  A lease that ran out is not lost until another
  worker claims the entry (or :meth:`Outbox.expire_due` expires it): a worker that
  finishes late may still record its outcome, which is better than sending the
  message again.
* **Finishing.**  ``record_sent``, ``record_failed``, ``record_expired`` and
  ``expire_due`` clear ``lease_owner``, ``lease_until`` and ``next_attempt_at``;
  ``record_retry`` and ``release`` clear the lease.  Every change sets
  ``updated_at = now``.
* **Joining.**  ``accepted`` recipients are appended to ``entry.accepted``
  (each address once, in order); ``refused`` is merged into ``entry.refused``
  (a later refusal of the same address replaces the earlier one).
* **Errors.**  Storage failures raise :class:`OutboxError`; a storage that is
  not an outbox, or holds a newer schema, raises :class:`OutboxSchemaError`.
"""

from __future__ import annotations

import abc
import enum
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol, Self, runtime_checkable

from .._prepared import PreparedMessage

__all__ = ["Outbox", "OutboxEntry", "OutboxError", "OutboxSchemaError", "OutboxStatus"]


class OutboxError(Exception):
    """The outbox storage failed (a database error, a closed outbox, a lock timeout)."""


class OutboxSchemaError(OutboxError):
    """The storage is not an smtpnotify outbox, or was written by a newer smtpnotify.

    Raised when an outbox is opened; the storage is left exactly as it was.
    """


class OutboxStatus(enum.StrEnum):
    """Where a queued message stands."""

    PENDING = "pending"
    """Waiting for its next attempt (``next_attempt_at``)."""
    SENDING = "sending"
    """Claimed by a worker under a lease."""
    SENT = "sent"
    """Every recipient accepted it, or refused it permanently (see ``refused``)."""
    FAILED = "failed"
    """A permanent error: it will not be tried again."""
    EXPIRED = "expired"
    """The expiration interval passed before it could be delivered."""


FINISHED_STATUSES: tuple[OutboxStatus, ...] = (
    OutboxStatus.SENT,
    OutboxStatus.FAILED,
    OutboxStatus.EXPIRED,
)
"""The statuses a message never leaves by itself (only an operator's ``retry``)."""


@dataclass(frozen=True, slots=True)
class OutboxEntry:
    """A snapshot of one queued message and its delivery state.

    An entry never changes: it is what the outbox held when it was returned.
    Every ``datetime`` in it is aware UTC.
    """

    id: str
    status: OutboxStatus
    message: PreparedMessage
    """The message; ``message.recipients`` are the recipients still to deliver
    (for a finished entry: those of its last attempt)."""
    created_at: datetime
    expires_at: datetime
    next_attempt_at: datetime | None
    """When a ``pending`` entry becomes due; kept while ``sending``; ``None`` once finished."""
    attempts: int
    last_error: str | None = None
    accepted: tuple[str, ...] = ()
    """Recipients that already accepted the message: never sent it again."""
    refused: dict[str, tuple[int, str]] = field(default_factory=dict)
    """Recipients refused permanently, with ``(code, message)``."""
    lease_owner: str | None = None
    lease_until: datetime | None = None
    updated_at: datetime | None = None

    @property
    def message_id(self) -> str:
        """The message's ``Message-ID``, stable across attempts."""
        return self.message.message_id


@runtime_checkable
class Outbox(Protocol):
    """What an outbox implementation provides.

    ``smtpnotify.testing.conformance.OutboxConformance`` is its conformance suite.

    Every method is safe to call from several threads at once.  State changes
    after a claim (``record_*``, ``release``) take the ``owner`` that claimed the
    entry and return ``False`` without changing anything when that owner does
    not hold the entry (another worker claimed it after the lease ran out, it
    expired, or it is not ``sending`` at all); they also return ``False`` for an
    unknown id.
    """

    def add(
        self,
        message: PreparedMessage,
        *,
        now: datetime,
        expires_at: datetime,
        connection: Any = None,
    ) -> str:
        """Store a new ``pending`` message, due at once; durable when this returns.

        The entry gets ``created_at = updated_at = next_attempt_at = now`` and
        ``attempts = 0``.  ``connection`` is an application's open database
        connection to enqueue inside its transaction; an outbox that cannot do
        that raises ``TypeError`` when it is not ``None``.  Returns the new
        entry's id (a string).  Subscribers (:meth:`subscribe`) are called after
        the message is stored.
        """
        ...

    def claim(
        self, *, now: datetime, owner: str, lease: timedelta, limit: int = 1
    ) -> list[OutboxEntry]:
        """Take up to ``limit`` due messages for ``owner`` and return them as ``sending``.

        Due: ``pending`` with ``next_attempt_at <= now < expires_at``, or ``sending``
        whose lease ran out (``lease_until <= now``) and ``now < expires_at``.
        Oldest ``next_attempt_at`` first (then oldest ``created_at``).  Each claimed
        entry gets ``lease_owner = owner``, ``lease_until = now + lease`` and
        ``attempts + 1``.  ``limit < 1`` or a ``lease`` that is not positive
        raises ``ValueError``.
        """
        ...

    def record_sent(
        self,
        entry_id: str,
        *,
        owner: str,
        now: datetime,
        accepted: tuple[str, ...],
        refused: dict[str, tuple[int, str]],
    ) -> bool:
        """Mark ``sent``: ``accepted`` join ``entry.accepted``, ``refused`` join ``entry.refused``.

        ``last_error`` is kept (it tells what earlier attempts ran into).
        """
        ...

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
        """Back to ``pending`` until ``next_attempt_at``, with ``last_error = error``.

        ``remaining`` (when given) replaces the recipients still to deliver (an
        empty tuple raises ``ValueError``); ``accepted`` and ``refused`` are
        added to what the entry already has.
        """
        ...

    def record_failed(
        self,
        entry_id: str,
        *,
        owner: str,
        now: datetime,
        error: str,
        accepted: tuple[str, ...] = (),
        refused: dict[str, tuple[int, str]] | None = None,
    ) -> bool:
        """Mark ``failed`` (permanent), with ``last_error = error``: it is never claimed again."""
        ...

    def record_expired(
        self, entry_id: str, *, owner: str | None, now: datetime, error: str | None = None
    ) -> bool:
        """Mark ``expired``; ``error`` (when given) becomes ``last_error``.

        ``owner=None`` is for an entry nobody holds: ``pending``, or ``sending``
        with a lease that ran out (``lease_until <= now``).
        """
        ...

    def release(self, entry_id: str, *, owner: str, now: datetime) -> bool:
        """Give a claimed entry back untried: ``pending``, due at once, ``attempts - 1``."""
        ...

    def expire_due(self, *, now: datetime) -> list[OutboxEntry]:
        """Expire what can no longer be attempted, and return it (as ``expired``).

        That is every ``pending`` entry with ``expires_at <= now``, and every
        ``sending`` one whose lease ran out (``lease_until <= now``) with
        ``expires_at <= now``.  ``last_error`` is kept.
        """
        ...

    def next_due(self, *, now: datetime) -> datetime | None:
        """The earliest time something becomes due or expires (may be in the past), or ``None``.

        That is the least of every ``pending`` entry's ``next_attempt_at`` and
        ``expires_at`` and every ``sending`` entry's ``lease_until``.
        """
        ...

    def get(self, entry_id: str) -> OutboxEntry | None:
        """The entry with this id, or ``None``."""
        ...

    def counts(self) -> dict[OutboxStatus, int]:
        """How many entries have each status (every status is a key)."""
        ...

    def entries(self, *, status: OutboxStatus | None = None, limit: int = 100) -> list[OutboxEntry]:
        """Entries, newest ``created_at`` first, optionally of one status.

        ``limit < 1`` raises ``ValueError``.
        """
        ...

    def retry(self, entry_id: str, *, now: datetime, expires_at: datetime | None = None) -> bool:
        """Put a ``failed`` or ``expired`` entry back to ``pending``, due now (an operator's retry).

        The entry gets a fresh expiration window: ``expires_at`` when given,
        otherwise ``now`` plus the window it was queued with
        (``expires_at - created_at``).  ``attempts``, ``last_error``,
        ``accepted`` and ``refused`` are kept.  Returns ``False`` for an entry
        in another status or an unknown id.
        """
        ...

    def purge(self, *, before: datetime, statuses: tuple[OutboxStatus, ...] = ...) -> int:
        """Delete finished entries last updated before ``before``; return how many.

        ``statuses`` defaults to every finished status (``sent``, ``failed``,
        ``expired``); ``pending`` or ``sending`` in it raises ``ValueError``.
        """
        ...

    def subscribe(self, callback: Callable[[], None]) -> None:
        """Have ``callback`` called after a message is added.

        It is called from any thread, without arguments: by this process always;
        by other processes where the outbox can tell (PostgreSQL's
        LISTEN/NOTIFY).  Workers use it to wake at once instead of polling.  An
        exception from a callback is logged, never raised to ``add``'s caller.
        """
        ...

    def close(self) -> None:
        """Release connections and files.  Closing twice is harmless."""
        ...


# --- Shared rules, for implementations in this package -----------------------------------

_log = logging.getLogger("smtpnotify.outbox")


def call_subscribers(callbacks: Iterable[Callable[[], None]]) -> None:
    """Call each callback; log (never raise) what one of them raises."""
    for callback in callbacks:
        try:
            callback()
        except Exception:
            _log.exception("outbox subscriber %r raised", callback)


def as_utc(value: datetime, name: str) -> datetime:
    """``value`` in UTC; ``ValueError`` naming ``name`` when it is naive."""
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError(f"{name} must be a timezone-aware datetime, got {value!r}")
    return value.astimezone(UTC)


def join_accepted(have: tuple[str, ...], new: Iterable[str]) -> tuple[str, ...]:
    """``have`` followed by the addresses of ``new`` it does not hold yet, in order."""
    seen = set(have)
    out = list(have)
    for address in new:
        if address not in seen:
            seen.add(address)
            out.append(address)
    return tuple(out)


def join_refused(
    have: dict[str, tuple[int, str]], new: dict[str, tuple[int, str]] | None
) -> dict[str, tuple[int, str]]:
    """``have`` updated with ``new`` (a copy; neither argument changes)."""
    out = dict(have)
    if new:
        out.update({address: (int(code), str(text)) for address, (code, text) in new.items()})
    return out


def check_limit(limit: int) -> None:
    """``ValueError`` unless ``limit`` is at least 1."""
    if limit < 1:
        raise ValueError(f"limit must be at least 1, got {limit}")


def check_lease(lease: timedelta) -> None:
    """``ValueError`` unless ``lease`` is positive."""
    if lease <= timedelta(0):
        raise ValueError(f"lease must be positive, got {lease!r}")


def check_remaining(remaining: tuple[str, ...] | None) -> None:
    """``ValueError`` when ``remaining`` is given but names no recipient."""
    if remaining is not None and not remaining:
        raise ValueError("remaining must name at least one recipient")


def check_purge_statuses(statuses: tuple[OutboxStatus, ...]) -> tuple[OutboxStatus, ...]:
    """``statuses`` as :class:`OutboxStatus` values; ``ValueError`` for an unfinished one."""
    out = tuple(OutboxStatus(s) for s in statuses)
    for status in out:
        if status not in FINISHED_STATUSES:
            raise ValueError(f"purge deletes finished entries only, not {status.value!r} ones")
    return out


class BaseOutbox(abc.ABC):
    """What this package's outboxes share: the thin protocol wrappers, written once.

    Not part of the protocol (an outbox need not inherit anything).  It checks
    the arguments of :meth:`claim` and turns :meth:`record_sent` and
    :meth:`record_failed` into one :meth:`_finish`; a subclass implements
    :meth:`_claim`, :meth:`_finish` and :meth:`close`, and the rest of
    :class:`Outbox` itself.
    """

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @abc.abstractmethod
    def close(self) -> None:
        """Release connections and files.  Closing twice is harmless."""

    def claim(
        self, *, now: datetime, owner: str, lease: timedelta, limit: int = 1
    ) -> list[OutboxEntry]:
        """Take up to ``limit`` due messages for ``owner`` and return them as ``sending``.

        See :meth:`Outbox.claim`; ``limit < 1`` or a ``lease`` that is not
        positive raises ``ValueError``.
        """
        now = as_utc(now, "now")
        check_limit(limit)
        check_lease(lease)
        return self._claim(now=now, owner=owner, lease=lease, limit=limit)

    @abc.abstractmethod
    def _claim(
        self, *, now: datetime, owner: str, lease: timedelta, limit: int
    ) -> list[OutboxEntry]:
        """:meth:`claim` with checked arguments (``now`` in UTC)."""

    def record_sent(
        self,
        entry_id: str,
        *,
        owner: str,
        now: datetime,
        accepted: tuple[str, ...],
        refused: dict[str, tuple[int, str]],
    ) -> bool:
        """Mark ``sent`` if ``owner`` holds the entry; merge ``accepted`` and ``refused``.

        ``last_error`` is kept (it tells what earlier attempts ran into).
        """
        now = as_utc(now, "now")
        return self._finish(
            entry_id, owner, now, OutboxStatus.SENT, accepted=accepted, refused=refused
        )

    def record_failed(
        self,
        entry_id: str,
        *,
        owner: str,
        now: datetime,
        error: str,
        accepted: tuple[str, ...] = (),
        refused: dict[str, tuple[int, str]] | None = None,
    ) -> bool:
        """Mark ``failed`` (permanent), with ``last_error = error``, if ``owner`` holds it."""
        return self._finish(
            entry_id,
            owner,
            as_utc(now, "now"),
            OutboxStatus.FAILED,
            accepted=accepted,
            refused=refused,
            error=error,
        )

    @abc.abstractmethod
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
        """Finish a held entry as ``status`` (``now`` in UTC); ``False`` if ``owner`` lacks it.

        ``accepted`` and ``refused`` join the entry's; ``last_error`` becomes
        ``error`` when one is given, and is kept otherwise.
        """
