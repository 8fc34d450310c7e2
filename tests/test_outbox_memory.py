"""MemoryOutbox: the conformance suite, plus what is particular to it."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest

from smtpnotify.outbox import MemoryOutbox, Outbox, OutboxError, OutboxStatus
from smtpnotify.testing.conformance import T0, WINDOW, OutboxConformance, make_message


class TestMemoryOutbox(OutboxConformance):
    """Every protocol rule, on the in-memory outbox."""

    def make_outbox(self, tmp_path: Path) -> Outbox:
        return MemoryOutbox()


def test_closed_outbox_refuses_work() -> None:
    outbox = MemoryOutbox()
    entry_id = outbox.add(make_message(), now=T0, expires_at=T0 + WINDOW)
    outbox.close()
    with pytest.raises(OutboxError, match="closed"):
        outbox.get(entry_id)
    with pytest.raises(OutboxError, match="closed"):
        outbox.add(make_message(), now=T0, expires_at=T0 + WINDOW)


def test_context_manager_closes() -> None:
    with MemoryOutbox() as outbox:
        outbox.add(make_message(), now=T0, expires_at=T0 + WINDOW)
        assert outbox.counts()[OutboxStatus.PENDING] == 1
    with pytest.raises(OutboxError):
        outbox.counts()


def test_separate_instances_share_nothing() -> None:
    with MemoryOutbox() as a, MemoryOutbox() as b:
        a.add(make_message(), now=T0, expires_at=T0 + WINDOW)
        assert b.counts()[OutboxStatus.PENDING] == 0
        assert b.claim(now=T0, owner="w", lease=timedelta(minutes=1)) == []


def test_finished_entries_are_capped_oldest_first() -> None:
    lease = timedelta(minutes=1)
    with MemoryOutbox(max_finished=2) as outbox:
        ids = [outbox.add(make_message(n), now=T0, expires_at=T0 + WINDOW) for n in range(5)]
        claimed = outbox.claim(now=T0, owner="w", lease=lease, limit=4)
        assert [e.id for e in claimed] == ids[:4]
        for n, entry_id in enumerate(ids[:3]):
            when = T0 + timedelta(seconds=n)
            assert outbox.record_sent(entry_id, owner="w", now=when, accepted=(), refused={})
        assert outbox.get(ids[0]) is None  # finished first, forgotten first
        assert outbox.get(ids[1]) is not None
        assert outbox.record_failed(ids[3], owner="w", now=T0, error="550")
        assert outbox.get(ids[1]) is None
        # An operator's retry makes an entry active again: it no longer counts.
        assert outbox.retry(ids[3], now=T0)
        assert outbox.counts() == {
            OutboxStatus.PENDING: 2,
            OutboxStatus.SENDING: 0,
            OutboxStatus.SENT: 1,
            OutboxStatus.FAILED: 0,
            OutboxStatus.EXPIRED: 0,
        }
        assert outbox.get(ids[4]) is not None  # pending is never dropped


def test_uncapped_keeps_everything() -> None:
    with MemoryOutbox(max_finished=None) as outbox:
        for n in range(30):
            entry_id = outbox.add(make_message(n), now=T0, expires_at=T0 + WINDOW)
            outbox.claim(now=T0, owner="w", lease=timedelta(minutes=1))
            assert outbox.record_sent(entry_id, owner="w", now=T0, accepted=(), refused={})
        assert outbox.counts()[OutboxStatus.SENT] == 30


def test_bad_cap_is_refused() -> None:
    with pytest.raises(ValueError, match="max_finished"):
        MemoryOutbox(max_finished=-1)


def test_repr_shows_size_not_content() -> None:
    with MemoryOutbox() as outbox:
        outbox.add(make_message(), now=T0, expires_at=T0 + WINDOW)
        text = repr(outbox)
    assert "entries=1" in text
    assert "body" not in text
