"""The background worker (``Notifier.start``/``stop``), in real time against a real sink.

Waits use generous timeouts and never assert how fast something was; where a
test checks a wake-up, the alternative (the poll interval) is 30 s, far beyond
the few seconds it allows.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from _helpers import config_for, note
from smtpnotify import MemoryOutbox, Notifier, OutboxStatus, SQLiteOutbox
from smtpnotify.outbox import OutboxError
from smtpnotify.testing import SinkMessage, SMTPSink

WAIT = 10.0  # seconds: generous, for a slow CI machine


def eventually(condition: Callable[[], bool], timeout: float = WAIT) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not true within {timeout} s: {condition}")
        time.sleep(0.01)


def worker_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "smtpnotify-worker" and t.is_alive()]


@pytest.fixture
def notifiers() -> Iterator[list[Notifier]]:
    """Notifiers to close after the test (stopping their workers), even when it fails."""
    made: list[Notifier] = []
    yield made
    for notifier in made:
        notifier.close()


def make(notifiers: list[Notifier], server: Any, outbox: Any = None, **kw: Any) -> Notifier:
    config_kw = kw.pop("config", {})
    config_kw.setdefault("timeout", 5)
    notifier = Notifier(config_for(server, **config_kw), outbox, **kw)
    notifiers.append(notifier)
    return notifier


def test_start_delivers_the_queue(
    sink: SMTPSink, notifiers: list[Notifier], tmp_path: Path
) -> None:
    with SQLiteOutbox(tmp_path / "outbox.db") as outbox:
        notifier = make(notifiers, sink, outbox, poll_interval=0.05)
        ids = [notifier.notify(note(f"user{n}@example.com")) for n in range(5)]
        notifier.start()
        sink.wait_for(5, timeout=WAIT)
        eventually(lambda: outbox.counts()[OutboxStatus.SENT] == 5)
        notifier.stop()
        assert worker_threads() == []
        assert {str(m.message["Message-ID"]) for m in sink.messages} == {
            e.message_id for e in (outbox.get(i) for i in ids) if e is not None
        }


def test_notify_wakes_an_idle_worker_at_once(sink: SMTPSink, notifiers: list[Notifier]) -> None:
    notifier = make(notifiers, sink, poll_interval=30)
    notifier.start()
    notifier.notify(note("first@example.com"))
    sink.wait_for(1, timeout=WAIT)
    # The worker has nothing left: it sleeps up to poll_interval (30 s) unless woken.
    eventually(lambda: notifier.counts()[OutboxStatus.SENT] == 1)
    time.sleep(0.2)
    started = time.monotonic()
    notifier.notify(note("second@example.com"))
    sink.wait_for(2, timeout=5)  # far less than 30 s: notify() woke it
    woke_after = time.monotonic() - started
    notifier.stop()
    assert [m.rcpt_tos for m in sink.messages] == [("first@example.com",), ("second@example.com",)]
    assert woke_after < 5


def test_the_worker_wakes_when_a_retry_falls_due(
    make_sink: Callable[..., SMTPSink], notifiers: list[Notifier]
) -> None:
    sink = make_sink(replies={"MAIL": (451, "4.3.0 try later")})
    notifier = make(
        notifiers, sink, poll_interval=30, config={"retry_interval": timedelta(seconds=1)}
    )
    entry_id = notifier.notify(note())
    notifier.start()

    def failed_once() -> bool:
        entry = notifier.outbox.get(entry_id)
        return entry is not None and entry.status is OutboxStatus.PENDING and entry.attempts == 1

    eventually(failed_once)
    sink.replies.clear()
    # Due again one second after the failure; the worker sleeps until then, not 30 s.
    sink.wait_for(1, timeout=8)
    eventually(lambda: notifier.counts()[OutboxStatus.SENT] == 1)
    notifier.stop()
    entry = notifier.outbox.get(entry_id)
    assert entry is not None and entry.attempts == 2


def test_stop_finishes_the_message_in_flight_and_releases_the_rest(
    make_sink: Callable[..., SMTPSink], notifiers: list[Notifier], tmp_path: Path
) -> None:
    in_flight = threading.Event()

    def slow_final_reply(message: SinkMessage) -> None:
        in_flight.set()
        time.sleep(1.0)  # the server takes its time before the final 250

    sink = make_sink(on_message=slow_final_reply)
    with SQLiteOutbox(tmp_path / "outbox.db") as outbox:
        notifier = make(notifiers, sink, outbox, batch_size=5, poll_interval=0.05)
        ids = [notifier.notify(note(f"user{n}@example.com")) for n in range(5)]
        notifier.start()
        assert in_flight.wait(WAIT)
        notifier.stop()  # while the first message waits for its final reply
        assert worker_threads() == []

        [delivered] = sink.messages
        entries = [outbox.get(i) for i in ids]
        assert all(e is not None for e in entries)
        first = next(e for e in entries if e and e.message_id == delivered.message["Message-ID"])
        assert first.status is OutboxStatus.SENT  # finished, and recorded, before stop returned
        rest = [e for e in entries if e is not first]
        assert len(rest) == 4
        for entry in rest:
            assert entry is not None
            assert entry.status is OutboxStatus.PENDING  # released, not left under a lease
            assert entry.attempts == 0  # the claim's attempt was given back
            assert entry.lease_owner is None and entry.lease_until is None

        # After stop() the notifier still delivers by hand.
        sink.on_message = None
        assert notifier.deliver_due().sent == 4
        assert len(sink.messages) == 5


def test_start_and_stop_are_idempotent(sink: SMTPSink, notifiers: list[Notifier]) -> None:
    notifier = make(notifiers, sink, poll_interval=0.05)
    notifier.stop()  # never started: nothing to do
    notifier.start()
    notifier.start()
    assert len(worker_threads()) == 1
    notifier.notify(note("one@example.com"))
    sink.wait_for(1, timeout=WAIT)
    notifier.stop()
    notifier.stop()
    assert worker_threads() == []

    notifier.start()  # a stopped notifier starts again
    assert len(worker_threads()) == 1
    notifier.notify(note("two@example.com"))
    sink.wait_for(2, timeout=WAIT)
    notifier.close()  # close stops the worker
    assert worker_threads() == []
    notifier.close()
    with pytest.raises(RuntimeError, match="closed"):
        notifier.start()


def test_many_threads_notify_at_once_and_each_message_is_delivered_once(
    sink: SMTPSink, notifiers: list[Notifier], tmp_path: Path
) -> None:
    threads, per_thread = 16, 25
    with SQLiteOutbox(tmp_path / "outbox.db") as outbox:
        notifier = make(notifiers, sink, outbox, poll_interval=0.05)
        notifier.start()  # delivering while the threads queue
        barrier = threading.Barrier(threads)
        ids: list[str] = []
        errors: list[BaseException] = []
        lock = threading.Lock()

        def queue(t: int) -> None:
            try:
                barrier.wait()
                for n in range(per_thread):
                    entry_id = notifier.notify(note(f"t{t}-n{n}@example.com"))
                    with lock:
                        ids.append(entry_id)
            except BaseException as exc:
                errors.append(exc)

        workers = [threading.Thread(target=queue, args=(t,)) for t in range(threads)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        assert errors == []
        total = threads * per_thread
        assert len(set(ids)) == total
        sink.wait_for(total, timeout=60)
        eventually(lambda: outbox.counts()[OutboxStatus.SENT] == total, timeout=30)
        notifier.stop()

        assert len(sink.messages) == total  # exactly once
        received = [str(m.message["Message-ID"]) for m in sink.messages]
        assert len(set(received)) == total
        assert set(received) == {e.message_id for e in outbox.entries(limit=total)}
        assert {m.rcpt_tos for m in sink.messages} == {
            (f"t{t}-n{n}@example.com",) for t in range(threads) for n in range(per_thread)
        }


class FlakyOutbox:
    """A MemoryOutbox whose ``claim`` fails the first ``failures`` times (a database hiccup)."""

    def __init__(self, failures: int) -> None:
        self.inner = MemoryOutbox()
        self.failures = failures
        self.claims = 0

    def claim(self, **kw: Any) -> Any:
        self.claims += 1
        if self.failures > 0:
            self.failures -= 1
            raise OutboxError("database is locked (simulated)")
        return self.inner.claim(**kw)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def test_the_worker_survives_a_failing_pass_and_keeps_going(
    sink: SMTPSink, notifiers: list[Notifier], caplog: pytest.LogCaptureFixture
) -> None:
    outbox = FlakyOutbox(failures=3)
    notifier = make(notifiers, sink, outbox, poll_interval=0.05)
    with caplog.at_level(logging.ERROR, logger="smtpnotify"):
        notifier.notify(note("first@example.com"))
        notifier.start()
        sink.wait_for(1, timeout=WAIT)
        assert len(worker_threads()) == 1  # still alive
        notifier.notify(note("second@example.com"))
        sink.wait_for(2, timeout=WAIT)
        notifier.stop()
    failures = [r for r in caplog.records if "delivery pass failed" in r.getMessage()]
    assert len(failures) == 3
    assert all(r.exc_info is not None and r.exc_info[0] is OutboxError for r in failures)
    assert outbox.failures == 0 and outbox.claims > 3
    assert outbox.inner.counts()[OutboxStatus.SENT] == 2


def test_restarting_the_worker_subscribes_to_the_outbox_once(sink: SMTPSink) -> None:
    from smtpnotify import MailConfig, MemoryOutbox, Notifier

    class CountingOutbox(MemoryOutbox):
        subscriptions = 0

        def subscribe(self, callback: Callable[[], None]) -> None:
            CountingOutbox.subscriptions += 1
            super().subscribe(callback)

    config = MailConfig(host=sink.host, port=sink.port, sender="noreply@example.com", timeout=5)
    with Notifier(config, CountingOutbox(), poll_interval=0.05) as notifier:
        for _ in range(3):
            notifier.start()
            notifier.stop()
    assert CountingOutbox.subscriptions == 1
