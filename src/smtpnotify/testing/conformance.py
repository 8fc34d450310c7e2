"""A pytest conformance suite for :class:`~smtpnotify.outbox.Outbox` implementations.

Subclass :class:`OutboxConformance` in a test module (the class name must start
with ``Test`` so pytest collects it) and say how to make an empty outbox::

    from pathlib import Path

    from smtpnotify.outbox import Outbox, SQLiteOutbox
    from smtpnotify.testing.conformance import OutboxConformance


    class TestMyOutbox(OutboxConformance):
        def make_outbox(self, tmp_path: Path) -> Outbox:
            return SQLiteOutbox(tmp_path / "outbox.db")

        def reopen(self, tmp_path: Path) -> Outbox | None:
            # Optional: a second handle on the same storage (enables the
            # persistence and cross-handle tests; they are skipped otherwise).
            return SQLiteOutbox(tmp_path / "outbox.db")

Every test gets a fresh, empty outbox from the ``outbox`` fixture, which calls
``make_outbox(tmp_path)`` and closes the outbox afterwards.  To build it from
other fixtures (a database server, say), override the fixture instead::

    class TestPostgresOutbox(OutboxConformance):
        supports_connection = True  # add(connection=...) is supported

        @pytest.fixture
        def outbox(self, dsn: str) -> Iterator[Outbox]:
            self.dsn = dsn            # for reopen()
            box = PostgresOutbox(dsn, table=fresh_table_name())
            yield box
            box.close()

The suite uses fixed datetimes (never the real clock), runs under
``filterwarnings = error``, and needs nothing but pytest.  It checks the rules
written down in :mod:`smtpnotify.outbox` (``Outbox`` and its module docstring).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import ClassVar

import pytest

from .._prepared import PreparedMessage
from ..outbox._base import Outbox, OutboxEntry, OutboxStatus

__all__ = ["LEASE", "T0", "WINDOW", "OutboxConformance", "make_message"]

T0 = datetime(2030, 1, 1, 12, 0, tzinfo=UTC)
"""The suite's "now": a fixed instant, so no test reads the clock."""
LEASE = timedelta(minutes=5)
"""The lease the suite claims with."""
WINDOW = timedelta(days=5)
"""The expiration window of the messages the suite adds."""

_SEC = timedelta(seconds=1)
_US = timedelta(microseconds=1)

# Every byte value, CRLF, a lone "." line and a NUL: data must come back byte for byte.
_AWKWARD = bytes(range(256)) + b"\r\n.\r\n..\r\n\x00\r\n"


def make_message(
    n: int = 0,
    *,
    recipients: tuple[str, ...] | None = None,
    data: bytes | None = None,
    smtputf8: bool = False,
) -> PreparedMessage:
    """A :class:`PreparedMessage` numbered ``n`` (distinct Message-ID and body)."""
    return PreparedMessage(
        sender="noreply@example.com",
        recipients=recipients or (f"user{n}@example.com", f"other{n}@example.org"),
        message_id=f"<{n}.conformance@example.com>",
        data=data if data is not None else f"Subject: {n}\r\n\r\nbody {n}\r\n".encode(),
        smtputf8=smtputf8,
    )


def _eventually(condition: Callable[[], bool], timeout: float = 10.0) -> bool:
    """Wait until ``condition()`` holds (for callbacks an outbox may make from
    another thread); ``False`` if it still does not after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def _is_utc(value: datetime | None) -> bool:
    return value is None or (value.tzinfo is not None and value.utcoffset() == timedelta(0))


def _assert_utc(entry: OutboxEntry) -> None:
    for name in (
        "created_at",
        "expires_at",
        "next_attempt_at",
        "lease_until",
        "updated_at",
    ):
        value = getattr(entry, name)
        assert _is_utc(value), f"{name} is not aware UTC: {value!r}"


class OutboxConformance:
    """The conformance tests; subclass it and implement :meth:`make_outbox`.

    Attributes:
        supports_connection: ``True`` when ``add(connection=...)`` is supported
            (then the suite does not insist on ``TypeError``; test it yourself).
        concurrency_threads: threads racing in the concurrency tests.
        concurrency_entries: entries they race for.
    """

    supports_connection: ClassVar[bool] = False
    concurrency_threads: ClassVar[int] = 8
    concurrency_entries: ClassVar[int] = 200

    # -- what a subclass provides ----------------------------------------------------------

    def make_outbox(self, tmp_path: Path) -> Outbox:
        """A new, empty outbox (``tmp_path`` is the test's own temporary directory)."""
        raise NotImplementedError(
            f"{type(self).__name__} must implement make_outbox(tmp_path) "
            "or override the outbox fixture"
        )

    def reopen(self, tmp_path: Path) -> Outbox | None:
        """Another handle on the storage the ``outbox`` fixture opened, or ``None``.

        ``None`` (the default) skips the tests that need one.  The suite closes it.
        """
        return None

    @pytest.fixture
    def outbox(self, tmp_path: Path) -> Iterator[Outbox]:
        """A fresh, empty outbox, closed after the test."""
        box = self.make_outbox(tmp_path)
        try:
            yield box
        finally:
            box.close()

    @pytest.fixture
    def other(self, outbox: Outbox, tmp_path: Path) -> Iterator[Outbox]:
        """A second handle on the same storage (skips the test when there is none)."""
        box = self.reopen(tmp_path)
        if box is None:
            pytest.skip("this outbox offers no second handle on its storage (reopen)")
        try:
            yield box
        finally:
            box.close()

    # -- helpers ---------------------------------------------------------------------------

    @staticmethod
    def _add(outbox: Outbox, n: int = 0, *, now: datetime = T0, window: timedelta = WINDOW) -> str:
        return outbox.add(make_message(n), now=now, expires_at=now + window)

    @staticmethod
    def _claim_one(outbox: Outbox, *, now: datetime = T0, owner: str = "w1") -> OutboxEntry:
        claimed = outbox.claim(now=now, owner=owner, lease=LEASE)
        assert len(claimed) == 1, claimed
        return claimed[0]

    # -- the protocol itself ---------------------------------------------------------------

    def test_is_an_outbox(self, outbox: Outbox) -> None:
        assert isinstance(outbox, Outbox)

    def test_empty(self, outbox: Outbox) -> None:
        assert outbox.counts() == dict.fromkeys(OutboxStatus, 0)
        assert outbox.entries() == []
        assert outbox.next_due(now=T0) is None
        assert outbox.claim(now=T0, owner="w1", lease=LEASE, limit=10) == []
        assert outbox.expire_due(now=T0 + 10 * WINDOW) == []
        assert outbox.get("no-such-id") is None

    # -- add / get -------------------------------------------------------------------------

    def test_add_get_roundtrip(self, outbox: Outbox) -> None:
        message = PreparedMessage(
            sender="noreply@example.com",
            recipients=("用户@例子.example", "b@example.com", "a@example.com"),
            message_id="<roundtrip.1@example.com>",
            data=_AWKWARD * 64,
            smtputf8=True,
        )
        expires = T0 + WINDOW
        entry_id = outbox.add(message, now=T0, expires_at=expires)
        assert isinstance(entry_id, str)
        assert entry_id
        entry = outbox.get(entry_id)
        assert entry == OutboxEntry(
            id=entry_id,
            status=OutboxStatus.PENDING,
            message=message,
            created_at=T0,
            expires_at=expires,
            next_attempt_at=T0,
            attempts=0,
            last_error=None,
            accepted=(),
            refused={},
            lease_owner=None,
            lease_until=None,
            updated_at=T0,
        )
        assert entry.message.data == message.data
        assert type(entry.message.data) is bytes
        assert entry.message.recipients == message.recipients
        assert entry.message_id == "<roundtrip.1@example.com>"
        assert entry.status is OutboxStatus.PENDING
        _assert_utc(entry)

    def test_add_plain_message(self, outbox: Outbox) -> None:
        message = make_message(7)
        entry_id = outbox.add(message, now=T0, expires_at=T0 + WINDOW)
        entry = outbox.get(entry_id)
        assert entry is not None
        assert entry.message == message
        assert entry.message.smtputf8 is False

    def test_add_returns_distinct_ids(self, outbox: Outbox) -> None:
        ids = [self._add(outbox, n) for n in range(20)]
        assert len(set(ids)) == 20
        assert all(isinstance(i, str) for i in ids)
        assert outbox.counts()[OutboxStatus.PENDING] == 20

    def test_datetimes_come_back_aware_utc(self, outbox: Outbox) -> None:
        plus_two = timezone(timedelta(hours=2))
        local_now = T0.astimezone(plus_two)
        entry_id = outbox.add(make_message(), now=local_now, expires_at=local_now + WINDOW)
        entry = outbox.get(entry_id)
        assert entry is not None
        assert entry.created_at == T0
        _assert_utc(entry)
        [claimed] = outbox.claim(now=local_now, owner="w1", lease=LEASE)
        _assert_utc(claimed)
        assert claimed.lease_until == T0 + LEASE
        _assert_utc(outbox.entries()[0])
        assert _is_utc(outbox.next_due(now=T0))
        [expired] = outbox.expire_due(now=(T0 + WINDOW + LEASE).astimezone(plus_two))
        _assert_utc(expired)

    def test_naive_datetimes_are_refused(self, outbox: Outbox) -> None:
        naive = datetime(2030, 1, 1, 12, 0)  # no tzinfo: the point of the test
        with pytest.raises(ValueError):
            outbox.add(make_message(), now=naive, expires_at=T0 + WINDOW)
        with pytest.raises(ValueError):
            outbox.add(make_message(), now=T0, expires_at=naive)
        with pytest.raises(ValueError):
            outbox.claim(now=naive, owner="w1", lease=LEASE)
        assert outbox.counts()[OutboxStatus.PENDING] == 0

    def test_add_with_connection_is_a_type_error(self, outbox: Outbox) -> None:
        if self.supports_connection:
            pytest.skip("this outbox enqueues inside an application's transaction")
        with pytest.raises(TypeError):
            outbox.add(make_message(), now=T0, expires_at=T0 + WINDOW, connection=object())
        assert outbox.counts()[OutboxStatus.PENDING] == 0

    def test_snapshots_are_independent(self, outbox: Outbox) -> None:
        entry_id = self._add(outbox)
        self._claim_one(outbox)
        outbox.record_sent(entry_id, owner="w1", now=T0, accepted=("a@example.com",), refused={})
        entry = outbox.get(entry_id)
        assert entry is not None
        entry.refused["x@example.com"] = (550, "meddling")
        again = outbox.get(entry_id)
        assert again is not None
        assert again.refused == {}

    # -- claim -----------------------------------------------------------------------------

    def test_claim_sets_lease_and_counts_the_attempt(self, outbox: Outbox) -> None:
        entry_id = self._add(outbox)
        now = T0 + _SEC
        [entry] = outbox.claim(now=now, owner="worker-a", lease=LEASE)
        assert entry.id == entry_id
        assert entry.status is OutboxStatus.SENDING
        assert entry.lease_owner == "worker-a"
        assert entry.lease_until == now + LEASE
        assert entry.attempts == 1
        assert entry.updated_at == now
        assert entry.next_attempt_at == T0
        assert entry.message == make_message(0)
        assert outbox.get(entry_id) == entry
        assert outbox.counts()[OutboxStatus.SENDING] == 1

    def test_claim_only_due(self, outbox: Outbox) -> None:
        later = self._add(outbox, 1, now=T0 + 10 * _SEC)
        assert outbox.claim(now=T0 + 10 * _SEC - _US, owner="w1", lease=LEASE) == []
        [entry] = outbox.claim(now=T0 + 10 * _SEC, owner="w1", lease=LEASE)  # <= now
        assert entry.id == later

    def test_claim_never_at_or_after_expiry(self, outbox: Outbox) -> None:
        entry_id = self._add(outbox, window=timedelta(hours=1))
        assert outbox.claim(now=T0 + timedelta(hours=1), owner="w1", lease=LEASE) == []
        assert outbox.claim(now=T0 + timedelta(hours=2), owner="w1", lease=LEASE) == []
        [entry] = outbox.claim(now=T0 + timedelta(hours=1) - _US, owner="w1", lease=LEASE)
        assert entry.id == entry_id

    def test_claim_order_oldest_next_attempt_first(self, outbox: Outbox) -> None:
        a = self._add(outbox, 1, now=T0 + 2 * _SEC)
        b = self._add(outbox, 2, now=T0)
        c = self._add(outbox, 3, now=T0 + 1 * _SEC)
        claimed = outbox.claim(now=T0 + 10 * _SEC, owner="w1", lease=LEASE, limit=10)
        assert [e.id for e in claimed] == [b, c, a]

    def test_claim_order_ties_go_to_the_oldest_entry(self, outbox: Outbox) -> None:
        # Added first but created later (the callers' clocks need not agree).
        young = self._add(outbox, 1, now=T0 + 5 * _SEC)
        old = self._add(outbox, 2, now=T0)
        assert self._claim_one(outbox, now=T0).id == old
        assert outbox.record_retry(
            old, owner="w1", now=T0, next_attempt_at=T0 + 5 * _SEC, error="451 later"
        )
        # Both are due at T0 + 5 s now: the one created first goes first.
        claimed = outbox.claim(now=T0 + 5 * _SEC, owner="w1", lease=LEASE, limit=2)
        assert [e.id for e in claimed] == [old, young]

    def test_claim_limit(self, outbox: Outbox) -> None:
        ids = [self._add(outbox, n, now=T0 + n * _SEC) for n in range(5)]
        now = T0 + 10 * _SEC
        first = outbox.claim(now=now, owner="w1", lease=LEASE, limit=2)
        assert [e.id for e in first] == ids[:2]
        second = outbox.claim(now=now, owner="w2", lease=LEASE, limit=2)
        assert [e.id for e in second] == ids[2:4]
        third = outbox.claim(now=now, owner="w3", lease=LEASE, limit=2)
        assert [e.id for e in third] == ids[4:]
        assert outbox.claim(now=now, owner="w4", lease=LEASE, limit=2) == []

    def test_claim_refuses_bad_limit_and_lease(self, outbox: Outbox) -> None:
        self._add(outbox)
        with pytest.raises(ValueError):
            outbox.claim(now=T0, owner="w1", lease=LEASE, limit=0)
        with pytest.raises(ValueError):
            outbox.claim(now=T0, owner="w1", lease=timedelta(0))
        assert outbox.counts()[OutboxStatus.PENDING] == 1

    def test_lease_is_exclusive_until_it_runs_out(self, outbox: Outbox) -> None:
        entry_id = self._add(outbox)
        first = self._claim_one(outbox, owner="a")
        assert first.attempts == 1
        assert outbox.claim(now=T0, owner="b", lease=LEASE) == []
        assert outbox.claim(now=T0 + LEASE - _US, owner="b", lease=LEASE) == []
        assert outbox.claim(now=T0 + LEASE - _US, owner="a", lease=LEASE) == []
        taken = outbox.claim(now=T0 + LEASE, owner="b", lease=LEASE)
        assert [e.id for e in taken] == [entry_id]
        assert taken[0].lease_owner == "b"
        assert taken[0].lease_until == T0 + 2 * LEASE
        assert taken[0].attempts == 2
        # The first owner lost it: its outcome is not recorded.
        before = outbox.get(entry_id)
        assert not outbox.record_sent(
            entry_id, owner="a", now=T0 + LEASE, accepted=("x@example.com",), refused={}
        )
        assert outbox.get(entry_id) == before
        assert outbox.record_sent(
            entry_id, owner="b", now=T0 + LEASE, accepted=("x@example.com",), refused={}
        )

    def test_late_outcome_counts_while_nobody_else_claimed(self, outbox: Outbox) -> None:
        entry_id = self._add(outbox)
        self._claim_one(outbox, owner="a")
        late = T0 + 3 * LEASE
        assert outbox.record_sent(entry_id, owner="a", now=late, accepted=(), refused={})
        entry = outbox.get(entry_id)
        assert entry is not None
        assert entry.status is OutboxStatus.SENT

    # -- record_* and release --------------------------------------------------------------

    def test_record_sent(self, outbox: Outbox) -> None:
        entry_id = self._add(outbox)
        self._claim_one(outbox)
        now = T0 + 2 * _SEC
        assert outbox.record_sent(
            entry_id,
            owner="w1",
            now=now,
            accepted=("user0@example.com",),
            refused={"other0@example.org": (550, "5.1.1 no such user")},
        )
        entry = outbox.get(entry_id)
        assert entry is not None
        assert entry.status is OutboxStatus.SENT
        assert entry.accepted == ("user0@example.com",)
        assert entry.refused == {"other0@example.org": (550, "5.1.1 no such user")}
        assert entry.lease_owner is None
        assert entry.lease_until is None
        assert entry.next_attempt_at is None
        assert entry.updated_at == now
        assert entry.attempts == 1
        assert outbox.claim(now=now + WINDOW, owner="w2", lease=LEASE) == []
        assert outbox.counts()[OutboxStatus.SENT] == 1

    def test_record_retry(self, outbox: Outbox) -> None:
        message = make_message(recipients=("a@example.com", "b@example.com", "c@example.com"))
        entry_id = outbox.add(message, now=T0, expires_at=T0 + WINDOW)
        self._claim_one(outbox)
        now, due = T0 + _SEC, T0 + timedelta(minutes=5)
        assert outbox.record_retry(
            entry_id,
            owner="w1",
            now=now,
            next_attempt_at=due,
            error="451 4.3.0 try later",
            accepted=("a@example.com",),
            refused={"c@example.com": (550, "no")},
            remaining=("b@example.com",),
        )
        entry = outbox.get(entry_id)
        assert entry is not None
        assert entry.status is OutboxStatus.PENDING
        assert entry.message.recipients == ("b@example.com",)
        assert entry.message.data == message.data
        assert entry.message.message_id == message.message_id
        assert entry.accepted == ("a@example.com",)
        assert entry.refused == {"c@example.com": (550, "no")}
        assert entry.last_error == "451 4.3.0 try later"
        assert entry.next_attempt_at == due
        assert entry.lease_owner is None
        assert entry.lease_until is None
        assert entry.updated_at == now
        assert entry.attempts == 1
        assert outbox.claim(now=due - _US, owner="w1", lease=LEASE) == []
        again = self._claim_one(outbox, now=due, owner="w2")
        assert again.attempts == 2
        # A second round joins what the first one recorded.
        assert outbox.record_retry(
            entry_id,
            owner="w2",
            now=due,
            next_attempt_at=due + _SEC,
            error="452 full",
            accepted=("a@example.com", "b@example.com"),
            refused={"c@example.com": (551, "moved"), "d@example.com": (553, "bad")},
        )
        entry = outbox.get(entry_id)
        assert entry is not None
        assert entry.accepted == ("a@example.com", "b@example.com")
        assert entry.refused == {"c@example.com": (551, "moved"), "d@example.com": (553, "bad")}
        assert entry.message.recipients == ("b@example.com",)  # no remaining: unchanged
        assert entry.last_error == "452 full"

    def test_record_retry_needs_a_recipient(self, outbox: Outbox) -> None:
        entry_id = self._add(outbox)
        claimed = self._claim_one(outbox)
        with pytest.raises(ValueError):
            outbox.record_retry(
                entry_id, owner="w1", now=T0, next_attempt_at=T0 + _SEC, error="x", remaining=()
            )
        assert outbox.get(entry_id) == claimed

    def test_record_failed(self, outbox: Outbox) -> None:
        entry_id = self._add(outbox)
        self._claim_one(outbox)
        now = T0 + _SEC
        assert outbox.record_failed(
            entry_id,
            owner="w1",
            now=now,
            error="554 5.7.1 rejected",
            refused={"user0@example.com": (554, "rejected")},
        )
        entry = outbox.get(entry_id)
        assert entry is not None
        assert entry.status is OutboxStatus.FAILED
        assert entry.last_error == "554 5.7.1 rejected"
        assert entry.refused == {"user0@example.com": (554, "rejected")}
        assert entry.accepted == ()
        assert entry.next_attempt_at is None
        assert entry.lease_owner is None
        assert entry.updated_at == now
        assert outbox.claim(now=now + WINDOW / 2, owner="w1", lease=LEASE) == []
        assert outbox.expire_due(now=now + 2 * WINDOW) == []
        assert outbox.next_due(now=now) is None

    def test_record_expired_by_owner(self, outbox: Outbox) -> None:
        entry_id = self._add(outbox)
        self._claim_one(outbox)
        assert outbox.record_expired(entry_id, owner="w1", now=T0 + _SEC, error="gave up")
        entry = outbox.get(entry_id)
        assert entry is not None
        assert entry.status is OutboxStatus.EXPIRED
        assert entry.last_error == "gave up"
        assert entry.lease_owner is None
        assert entry.next_attempt_at is None
        assert entry.updated_at == T0 + _SEC

    def test_record_expired_without_owner(self, outbox: Outbox) -> None:
        held_id = self._add(outbox, 1)
        free_id = self._add(outbox, 2, now=T0 + _SEC)
        assert self._claim_one(outbox, now=T0).id == held_id
        held = outbox.get(held_id)
        # Nobody may expire a held entry without being its owner ...
        assert not outbox.record_expired(held_id, owner=None, now=T0 + _SEC)
        assert outbox.get(held_id) == held
        # ... but a pending one, or one whose lease ran out, yes.
        assert outbox.record_expired(free_id, owner=None, now=T0 + _SEC)
        assert outbox.record_expired(held_id, owner=None, now=T0 + LEASE)
        for entry_id in (held_id, free_id):
            entry = outbox.get(entry_id)
            assert entry is not None
            assert entry.status is OutboxStatus.EXPIRED
            assert entry.lease_owner is None

    def test_record_expired_keeps_last_error_without_one(self, outbox: Outbox) -> None:
        entry_id = self._add(outbox)
        self._claim_one(outbox)
        assert outbox.record_retry(
            entry_id, owner="w1", now=T0, next_attempt_at=T0 + _SEC, error="421 busy"
        )
        assert outbox.record_expired(entry_id, owner=None, now=T0 + _SEC)
        entry = outbox.get(entry_id)
        assert entry is not None
        assert entry.last_error == "421 busy"

    def test_release(self, outbox: Outbox) -> None:
        entry_id = self._add(outbox)
        self._claim_one(outbox)
        now = T0 + 30 * _SEC
        assert outbox.release(entry_id, owner="w1", now=now)
        entry = outbox.get(entry_id)
        assert entry is not None
        assert entry.status is OutboxStatus.PENDING
        assert entry.attempts == 0
        assert entry.next_attempt_at == now
        assert entry.lease_owner is None
        assert entry.lease_until is None
        assert entry.updated_at == now
        again = self._claim_one(outbox, now=now, owner="w2")
        assert again.attempts == 1

    @pytest.mark.parametrize(
        "action",
        ["record_sent", "record_retry", "record_failed", "record_expired", "release"],
    )
    def test_wrong_owner_changes_nothing(self, outbox: Outbox, action: str) -> None:
        entry_id = self._add(outbox)
        self._claim_one(outbox, owner="right")
        before = outbox.get(entry_id)
        assert not self._act(outbox, action, entry_id, owner="wrong")
        assert outbox.get(entry_id) == before
        assert self._act(outbox, action, entry_id, owner="right")

    @pytest.mark.parametrize(
        "action",
        ["record_sent", "record_retry", "record_failed", "record_expired", "release"],
    )
    def test_not_claimed_changes_nothing(self, outbox: Outbox, action: str) -> None:
        pending = self._add(outbox, 1)
        before = outbox.get(pending)
        assert not self._act(outbox, action, pending, owner="w1")
        assert outbox.get(pending) == before
        assert not self._act(outbox, action, "no-such-id", owner="w1")
        # Finished entries stay finished.
        self._claim_one(outbox, owner="w1")
        assert outbox.record_sent(pending, owner="w1", now=T0, accepted=(), refused={})
        sent = outbox.get(pending)
        assert not self._act(outbox, action, pending, owner="w1")
        assert outbox.get(pending) == sent

    @staticmethod
    def _act(outbox: Outbox, action: str, entry_id: str, *, owner: str) -> bool:
        now = T0 + _SEC
        if action == "record_sent":
            return outbox.record_sent(
                entry_id, owner=owner, now=now, accepted=("a@example.com",), refused={}
            )
        if action == "record_retry":
            return outbox.record_retry(
                entry_id,
                owner=owner,
                now=now,
                next_attempt_at=now + LEASE,
                error="451",
                remaining=("b@example.com",),
            )
        if action == "record_failed":
            return outbox.record_failed(entry_id, owner=owner, now=now, error="550")
        if action == "record_expired":
            return outbox.record_expired(entry_id, owner=owner, now=now, error="late")
        assert action == "release"
        return outbox.release(entry_id, owner=owner, now=now)

    # -- expiry, next_due ------------------------------------------------------------------

    def test_expire_due(self, outbox: Outbox) -> None:
        hour = timedelta(hours=1)
        due_pending = self._add(outbox, 1, window=hour)
        not_yet = self._add(outbox, 2, window=2 * hour)
        held = self._add(outbox, 3, now=T0 - _SEC, window=hour)
        lapsed = self._add(outbox, 4, now=T0 - 2 * _SEC, window=hour)
        # ``lapsed`` is claimed long before its expiry, ``held`` just before it.
        assert self._claim_one(outbox, now=T0, owner="early").id == lapsed
        assert self._claim_one(outbox, now=T0 + hour - 2 * _SEC, owner="late").id == held
        now = T0 + hour
        expired = outbox.expire_due(now=now)
        assert sorted(e.id for e in expired) == sorted([due_pending, lapsed])
        for entry in expired:
            assert entry.status is OutboxStatus.EXPIRED
            assert entry.lease_owner is None
            assert entry.lease_until is None
            assert entry.next_attempt_at is None
            assert entry.updated_at == now
            assert outbox.get(entry.id) == entry
        for entry_id, status in (
            (not_yet, OutboxStatus.PENDING),
            (held, OutboxStatus.SENDING),
        ):
            still = outbox.get(entry_id)
            assert still is not None
            assert still.status is status
        assert outbox.expire_due(now=now) == []
        # Once the late lease runs out, ``held`` expires too.
        [last] = outbox.expire_due(now=T0 + hour - 2 * _SEC + LEASE)
        assert last.id == held
        assert last.attempts == 1

    def test_next_due(self, outbox: Outbox) -> None:
        assert outbox.next_due(now=T0) is None
        a = self._add(outbox, 1, now=T0 + 10 * _SEC)
        assert outbox.next_due(now=T0) == T0 + 10 * _SEC
        self._claim_one(outbox, now=T0 + 10 * _SEC)
        assert outbox.next_due(now=T0) == T0 + 10 * _SEC + LEASE
        # A retry scheduled after the expiry: the expiry comes first.
        assert outbox.record_retry(
            a,
            owner="w1",
            now=T0 + 11 * _SEC,
            next_attempt_at=T0 + 10 * _SEC + 2 * WINDOW,
            error="451",
        )
        assert outbox.next_due(now=T0) == T0 + 10 * _SEC + WINDOW
        # In the past is fine: it is due now.
        b = self._add(outbox, 2, now=T0 - timedelta(days=1))
        assert outbox.next_due(now=T0) == T0 - timedelta(days=1)
        self._claim_one(outbox, now=T0)
        assert outbox.record_sent(b, owner="w1", now=T0, accepted=(), refused={})
        assert outbox.next_due(now=T0) == T0 + 10 * _SEC + WINDOW

    # -- reading ---------------------------------------------------------------------------

    def test_counts_every_status(self, outbox: Outbox) -> None:
        ids = [self._add(outbox, n, now=T0 + n * _SEC) for n in range(6)]
        now = T0 + 10 * _SEC
        claimed = outbox.claim(now=now, owner="w1", lease=LEASE, limit=4)
        assert [e.id for e in claimed] == ids[:4]
        assert outbox.record_sent(ids[0], owner="w1", now=now, accepted=(), refused={})
        assert outbox.record_failed(ids[1], owner="w1", now=now, error="550")
        assert outbox.record_expired(ids[2], owner="w1", now=now)
        counts = outbox.counts()
        assert set(counts) == set(OutboxStatus)
        assert counts == {
            OutboxStatus.PENDING: 2,
            OutboxStatus.SENDING: 1,
            OutboxStatus.SENT: 1,
            OutboxStatus.FAILED: 1,
            OutboxStatus.EXPIRED: 1,
        }

    def test_entries_newest_first_with_filter_and_limit(self, outbox: Outbox) -> None:
        ids = [self._add(outbox, n, now=T0 + n * _SEC) for n in range(5)]
        assert [e.id for e in outbox.entries()] == ids[::-1]
        assert [e.id for e in outbox.entries(limit=2)] == [ids[4], ids[3]]
        now = T0 + 10 * _SEC
        outbox.claim(now=now, owner="w1", lease=LEASE, limit=2)  # ids[0], ids[1]
        assert outbox.record_sent(ids[1], owner="w1", now=now, accepted=(), refused={})
        assert [e.id for e in outbox.entries(status=OutboxStatus.SENT)] == [ids[1]]
        assert [e.id for e in outbox.entries(status=OutboxStatus.SENDING)] == [ids[0]]
        pending = outbox.entries(status=OutboxStatus.PENDING)
        assert [e.id for e in pending] == [ids[4], ids[3], ids[2]]
        assert all(e.status is OutboxStatus.PENDING for e in pending)
        assert outbox.entries(status=OutboxStatus.FAILED) == []
        assert outbox.entries()[-1] == outbox.get(ids[0])
        with pytest.raises(ValueError):
            outbox.entries(limit=0)

    # -- operator actions ------------------------------------------------------------------

    def test_retry_failed(self, outbox: Outbox) -> None:
        entry_id = self._add(outbox, window=timedelta(days=2))
        self._claim_one(outbox)
        assert outbox.record_failed(
            entry_id,
            owner="w1",
            now=T0,
            error="550 no",
            accepted=("a@example.com",),
            refused={"b@example.com": (550, "no")},
        )
        now = T0 + timedelta(days=1)
        assert outbox.retry(entry_id, now=now)
        entry = outbox.get(entry_id)
        assert entry is not None
        assert entry.status is OutboxStatus.PENDING
        assert entry.next_attempt_at == now
        assert entry.expires_at == now + timedelta(days=2)  # a fresh window of the same length
        assert entry.attempts == 1
        assert entry.last_error == "550 no"
        assert entry.accepted == ("a@example.com",)
        assert entry.refused == {"b@example.com": (550, "no")}
        assert entry.updated_at == now
        assert entry.created_at == T0
        again = self._claim_one(outbox, now=now)
        assert again.attempts == 2

    def test_retry_expired(self, outbox: Outbox) -> None:
        entry_id = self._add(outbox, window=timedelta(hours=1))
        [expired] = outbox.expire_due(now=T0 + timedelta(hours=2))
        assert expired.id == entry_id
        now = T0 + timedelta(days=3)
        assert outbox.retry(entry_id, now=now, expires_at=now + timedelta(minutes=10))
        entry = outbox.get(entry_id)
        assert entry is not None
        assert entry.status is OutboxStatus.PENDING
        assert entry.expires_at == now + timedelta(minutes=10)
        assert outbox.expire_due(now=now) == []
        assert self._claim_one(outbox, now=now).id == entry_id

    def test_retry_only_finished_unsent(self, outbox: Outbox) -> None:
        pending = self._add(outbox, 1)
        sending = self._add(outbox, 2, now=T0 + _SEC)
        sent = self._add(outbox, 3, now=T0 + 2 * _SEC)
        outbox.claim(now=T0 + 5 * _SEC, owner="w1", lease=LEASE, limit=3)
        assert outbox.release(pending, owner="w1", now=T0 + 5 * _SEC)
        assert outbox.record_sent(sent, owner="w1", now=T0 + 5 * _SEC, accepted=(), refused={})
        for entry_id in (pending, sending, sent, "no-such-id"):
            before = outbox.get(entry_id)
            assert not outbox.retry(entry_id, now=T0 + timedelta(hours=1))
            assert outbox.get(entry_id) == before

    def test_purge(self, outbox: Outbox) -> None:
        ids = [self._add(outbox, n, now=T0 + n * _SEC) for n in range(5)]
        now = T0 + 10 * _SEC
        outbox.claim(now=now, owner="w1", lease=LEASE, limit=4)
        assert outbox.record_sent(ids[0], owner="w1", now=now, accepted=(), refused={})
        assert outbox.record_failed(ids[1], owner="w1", now=now + _SEC, error="550")
        assert outbox.record_expired(ids[2], owner="w1", now=now)
        # ids[3] is sending, ids[4] pending: never purged.
        assert outbox.purge(before=now) == 0  # strictly before
        assert outbox.purge(before=now + _SEC, statuses=(OutboxStatus.FAILED,)) == 0
        assert outbox.purge(before=now + _SEC, statuses=(OutboxStatus.SENT,)) == 1
        assert outbox.get(ids[0]) is None
        assert outbox.purge(before=now + timedelta(days=365)) == 2
        assert outbox.get(ids[1]) is None
        assert outbox.get(ids[2]) is None
        assert outbox.purge(before=now + timedelta(days=365)) == 0
        counts = outbox.counts()
        assert counts[OutboxStatus.SENDING] == 1
        assert counts[OutboxStatus.PENDING] == 1
        with pytest.raises(ValueError):
            outbox.purge(before=now + WINDOW, statuses=(OutboxStatus.PENDING,))
        with pytest.raises(ValueError):
            outbox.purge(before=now + WINDOW, statuses=(OutboxStatus.SENDING,))
        assert sum(outbox.counts().values()) == 2

    # -- subscribe, close ------------------------------------------------------------------

    def test_subscribe_is_called_after_add(self, outbox: Outbox) -> None:
        seen: list[int | None] = []

        def count_from_another_thread() -> None:
            # The callback runs after the entry is stored and outside any lock the
            # outbox holds: another thread can read the outbox meanwhile.
            result: list[int] = []
            reader = threading.Thread(
                target=lambda: result.append(outbox.counts()[OutboxStatus.PENDING])
            )
            reader.start()
            reader.join(10)
            seen.append(result[0] if result else None)

        outbox.subscribe(count_from_another_thread)
        assert seen == []
        self._add(outbox, 1)
        assert _eventually(lambda: len(seen) >= 1), "the callback was not called"
        assert seen[0] == 1, "called before the entry was stored, or with a lock held"
        self._add(outbox, 2)
        assert _eventually(lambda: 2 in seen), f"not called after the second add: {seen}"
        assert None not in seen, "the callback ran while the outbox held a lock"

    def test_failing_subscriber_does_not_fail_add(self, outbox: Outbox) -> None:
        calls: list[str] = []

        def broken() -> None:
            calls.append("broken")
            raise RuntimeError("subscriber bug")

        outbox.subscribe(broken)
        outbox.subscribe(lambda: calls.append("fine"))
        entry_id = self._add(outbox)
        assert outbox.get(entry_id) is not None
        assert _eventually(lambda: {"broken", "fine"} <= set(calls)), calls

    def test_close_twice(self, outbox: Outbox) -> None:
        self._add(outbox)
        outbox.close()
        outbox.close()  # and the fixture closes it once more

    # -- threads and handles ---------------------------------------------------------------

    def test_concurrent_adds(self, outbox: Outbox) -> None:
        threads, per_thread = self.concurrency_threads, 25

        def add_many(t: int) -> list[str]:
            return [self._add(outbox, t * 1000 + i) for i in range(per_thread)]

        with ThreadPoolExecutor(threads) as pool:
            ids = [i for chunk in pool.map(add_many, range(threads)) for i in chunk]
        assert len(ids) == len(set(ids)) == threads * per_thread
        assert outbox.counts()[OutboxStatus.PENDING] == threads * per_thread

    def test_concurrent_claims_hand_out_each_entry_once(self, outbox: Outbox) -> None:
        ids = {self._add(outbox, n) for n in range(self.concurrency_entries)}
        claimed = self._race(lambda t: outbox, outbox)
        assert sorted(claimed) == sorted(ids)

    def test_reopened_handle_sees_everything(self, outbox: Outbox, other: Outbox) -> None:
        entry_id = outbox.add(
            make_message(data=_AWKWARD, smtputf8=True), now=T0, expires_at=T0 + WINDOW
        )
        self._claim_one(outbox)
        assert outbox.record_retry(
            entry_id,
            owner="w1",
            now=T0,
            next_attempt_at=T0 + _SEC,
            error="451",
            accepted=("a@example.com",),
            refused={"b@example.com": (550, "no")},
            remaining=("c@example.com",),
        )
        seen = other.get(entry_id)
        assert seen == outbox.get(entry_id)
        assert seen is not None
        assert seen.message.data == _AWKWARD
        # A claim through one handle excludes the other.
        [claimed] = other.claim(now=T0 + _SEC, owner="w2", lease=LEASE)
        assert outbox.claim(now=T0 + _SEC, owner="w3", lease=LEASE) == []
        assert outbox.get(entry_id) == claimed

    def test_concurrent_claims_through_two_handles(self, outbox: Outbox, other: Outbox) -> None:
        ids = {self._add(outbox, n) for n in range(self.concurrency_entries)}
        claimed = self._race(lambda t: (outbox, other)[t % 2], outbox)
        assert sorted(claimed) == sorted(ids)

    def _race(self, handle: Callable[[int], Outbox], outbox: Outbox) -> list[str]:
        """Threads claim (and record) until nothing is left; every claimed id, in a list."""
        threads = self.concurrency_threads
        start = threading.Barrier(threads)

        def work(t: int) -> list[str]:
            box, owner = handle(t), f"worker-{t}"
            mine: list[str] = []
            start.wait(10)
            while True:
                batch = box.claim(now=T0, owner=owner, lease=LEASE, limit=1 + t % 3)
                if not batch:
                    return mine
                for entry in batch:
                    assert entry.lease_owner == owner
                    mine.append(entry.id)
                    assert box.record_sent(
                        entry.id, owner=owner, now=T0, accepted=entry.message.recipients, refused={}
                    )

        with ThreadPoolExecutor(threads) as pool:
            claimed = [i for chunk in pool.map(work, range(threads)) for i in chunk]
        assert len(claimed) == len(set(claimed)), "an entry was claimed twice"
        assert outbox.counts()[OutboxStatus.SENT] == len(claimed)
        return claimed
