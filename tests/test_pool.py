"""The connection pool and the rate limiter: reuse, stale connections, limits, threads.

Real servers on loopback (SMTPSink, the scripted server); the rate limiter's
arithmetic with an injected clock and sleep, so no test waits for it.
Correctness only: nothing here is timed.
"""

from __future__ import annotations

import gc
import re
import threading
from collections import Counter
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest

from _helpers import config_for, note
from scripted_server import Default, Drop, PerOccurrence, Reply, Script, ScriptedServer
from smtpnotify import (
    ConnectError,
    DeliveryReport,
    MailConfig,
    Notifier,
    OutboxEntry,
    OutboxStatus,
    SendResult,
    TransientError,
)
from smtpnotify._ratelimit import RateLimiter
from smtpnotify.testing import SinkMessage, SMTPSink

Scripted = Callable[..., ScriptedServer]
MakeSink = Callable[..., SMTPSink]

MESSAGE_ID = re.compile(rb"^Message-ID: *(<[^>]+>)", re.MULTILINE | re.IGNORECASE)
EXTENSIONS = {"pipelining": ("PIPELINING", "8BITMIME"), "one-by-one": ("8BITMIME",)}


def ids_at(server: ScriptedServer) -> Counter[str]:
    """Message-IDs of every content the scripted server received, with their counts."""
    found: Counter[str] = Counter()
    for content in server.received.messages:
        match = MESSAGE_ID.search(content)
        assert match is not None
        found[match.group(1).decode()] += 1
    return found


# ---------------------------------------------------------------------------
# Reuse across calls
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("pipelining", [True, False])
def test_send_reuses_the_idle_connection(make_sink: MakeSink, pipelining: bool) -> None:
    sink = make_sink(pipelining=pipelining)
    with Notifier(config_for(sink)) as notifier:
        results = [notifier.send(note(subject=f"n{i}")) for i in range(3)]
        results += notifier.send_many([note(subject="n3"), note(subject="n4")])
        assert notifier._pool.idle == 1
        assert "QUIT" not in sink.verbs  # kept open between the calls
    assert [m.connection for m in sink.messages] == [1] * 5
    assert [m.message["Message-ID"] for m in sink.messages] == [
        r.message_id for r in results if isinstance(r, SendResult)
    ]
    assert sink.verbs.count("EHLO") == 1
    assert sink.verbs[-1] == "QUIT"  # close() said goodbye
    sink.wait_until(lambda: all(c.closed for c in sink.connections))


def test_close_quits_and_a_closed_notifier_keeps_nothing_open(make_sink: MakeSink) -> None:
    sink = make_sink()
    notifier = Notifier(config_for(sink))
    notifier.send(note())
    notifier.close()
    assert sink.verbs[-1] == "QUIT"
    notifier.send(note())  # still works, on a connection closed right after
    assert notifier._pool.idle == 0
    assert [m.connection for m in sink.messages] == [1, 2]
    assert sink.verbs.count("QUIT") == 2


def test_a_dropped_notifier_closes_its_idle_connection(make_sink: MakeSink) -> None:
    """No close(): garbage collection closes the pooled socket (no ResourceWarning,
    which this suite turns into an error)."""
    sink = make_sink()
    notifier = Notifier(config_for(sink))
    notifier.send(note())
    del notifier
    gc.collect()
    sink.wait_until(lambda: all(c.closed for c in sink.connections), what="the close")


# ---------------------------------------------------------------------------
# Stale pooled connections
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("extensions", list(EXTENSIONS))
def test_a_connection_the_server_closed_while_idle_is_replaced(
    scripted: Scripted, extensions: str
) -> None:
    """The server hangs up right after its reply (an idle timeout): the next send
    notices before writing anything and opens a new connection."""
    ext = EXTENSIONS[extensions]
    server = scripted(
        [
            Script(ehlo_extensions=ext, on={"DATA_END": [Default(), Drop()]}),
            Script(ehlo_extensions=ext),
        ]
    )
    with Notifier(config_for(server, timeout=5)) as notifier:
        first = notifier.send(note(subject="n0"))
        server.wait_until(lambda: server.received.connections[0].closed)
        second = notifier.send(note(subject="n1"))
    one, two = server.wait_closed()
    assert one.verbs == ["EHLO", "MAIL", "RCPT", "DATA"]  # nothing written after the close
    assert len(two.messages) == 1
    assert ids_at(server) == {first.message_id: 1, second.message_id: 1}


@pytest.mark.parametrize("extensions", list(EXTENSIONS))
@pytest.mark.parametrize(
    "stale",
    [
        pytest.param(Drop(), id="drop"),
        pytest.param(Drop(rst=True), id="reset"),
        pytest.param(Reply(421, "4.4.2 idle too long"), id="421"),
    ],
)
def test_a_connection_that_goes_stale_as_the_message_starts_is_retried(
    scripted: Scripted, extensions: str, stale: Any
) -> None:
    """The server closes the idle connection just as the next MAIL goes out: nothing of
    that message can have been accepted, so it goes again on a new connection, once."""
    ext = EXTENSIONS[extensions]
    server = scripted(
        [
            Script(ehlo_extensions=ext, on={"MAIL": PerOccurrence(Default(), stale)}),
            Script(ehlo_extensions=ext),
        ]
    )
    with Notifier(config_for(server, timeout=5)) as notifier:
        first = notifier.send(note(subject="n0"))
        second = notifier.send(note(subject="n1"))  # no error: retried
        third = notifier.send(note(subject="n2"))  # the new connection, reused
    one, two = server.wait_closed()
    assert one.verbs == ["EHLO", "MAIL", "RCPT", "DATA", "MAIL"]  # the server went there
    assert len(one.messages) == 1
    assert len(two.messages) == 2
    assert ids_at(server) == {first.message_id: 1, second.message_id: 1, third.message_id: 1}


def test_a_fresh_connection_that_fails_is_not_retried(scripted: Scripted) -> None:
    """Only a connection that idled in the pool may have gone stale: a 421 on a new one
    is the server's answer, and the error."""
    server = scripted(Script(on={"MAIL": Reply(421, "4.3.2 busy")}))
    with Notifier(config_for(server, timeout=5)) as notifier, pytest.raises(TransientError):
        notifier.send(note())
    assert server.connection_count == 1


def test_a_drop_after_the_final_dot_on_a_reused_connection_is_never_retried(
    scripted: Scripted,
) -> None:
    server = scripted(
        [Script(on={"DATA_END": PerOccurrence(Default(), Drop())}), Script()]
    )
    with Notifier(config_for(server, timeout=5)) as notifier:
        notifier.send(note(subject="n0"))
        with pytest.raises(ConnectError) as info:
            notifier.send(note(subject="n1"))
        assert info.value.ambiguous
        notifier.send(note(subject="n2"))
    assert sorted(ids_at(server).values()) == [1, 1, 1]  # n1 arrived once, never again
    assert server.connection_count == 2


def test_a_drop_later_in_a_reused_connections_first_message_is_the_error(
    scripted: Scripted,
) -> None:
    """MAIL was accepted, then the server dropped: not the stale case, so the error
    stands (nothing is retried behind the application's back)."""
    server = scripted([Script(on={"RCPT": PerOccurrence(Default(), Drop())}), Script()])
    with Notifier(config_for(server, timeout=5)) as notifier:
        notifier.send(note(subject="n0"))
        with pytest.raises(ConnectError) as info:
            notifier.send(note(subject="n1"))
        assert not info.value.ambiguous
    assert server.connection_count == 1


def test_an_idle_connection_past_the_idle_limit_is_replaced(make_sink: MakeSink) -> None:
    sink = make_sink()
    now = [1000.0]
    with Notifier(config_for(sink)) as notifier:
        notifier._pool.clock = lambda: now[0]
        notifier.send(note())
        now[0] += notifier._pool.max_idle - 1
        notifier.send(note())  # young enough: reused
        now[0] += notifier._pool.max_idle + 1
        notifier.send(note())  # too old: a new one
    assert [m.connection for m in sink.messages] == [1, 1, 2]
    sink.wait_until(lambda: all(c.closed for c in sink.connections))


# ---------------------------------------------------------------------------
# max_connections and max_messages_per_connection
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("pipelining", [True, False])
def test_send_many_spreads_over_max_connections(make_sink: MakeSink, pipelining: bool) -> None:
    sink = make_sink(pipelining=pipelining)
    messages = [note(subject=f"n{i}") for i in range(40)]
    with Notifier(config_for(sink, max_connections=4)) as notifier:
        results = notifier.send_many(messages)
    assert all(isinstance(r, SendResult) for r in results), results
    by_id = {m.message["Message-ID"]: m for m in sink.messages}
    assert len(by_id) == len(sink.messages) == 40  # each message once
    # In input order: result i is the message with subject n<i>.
    assert [by_id[r.message_id].message["Subject"] for r in results] == [
        f"n{i}" for i in range(40)
    ]
    assert sorted({m.connection for m in sink.messages}) == [1, 2, 3, 4]
    # Contiguous shares of 10, each over its own connection, in order.
    for share in range(4):
        carried = {by_id[r.message_id].connection for r in results[share * 10 : share * 10 + 10]}
        assert len(carried) == 1


def test_max_messages_per_connection_reconnects(make_sink: MakeSink) -> None:
    sink = make_sink(pipelining=True)
    config = config_for(sink, max_messages_per_connection=3)
    with Notifier(config) as notifier:
        results = notifier.send_many([note(subject=f"n{i}") for i in range(7)])
        notifier.send(note(subject="n7"))  # the third connection has room for it
    assert all(isinstance(r, SendResult) for r in results)
    assert [m.connection for m in sink.messages] == [1, 1, 1, 2, 2, 2, 3, 3]
    for connection in sink.connections:
        assert connection.commands[-1] == "QUIT"
        assert [c.split(":")[0] for c in connection.commands].count("MAIL FROM") <= 3


def test_max_connections_holds_for_many_threads(make_sink: MakeSink) -> None:
    """16 threads call send() on one notifier with max_connections=2 (and a reconnect
    every 3 messages): the sink never sees more than 2 connections open at once."""
    most_open = [0]

    def count_open(message: SinkMessage) -> None:
        open_now = sum(1 for c in sink.connections if not c.closed)
        most_open[0] = max(most_open[0], open_now)

    sink = make_sink(pipelining=True, on_message=count_open)
    config = config_for(sink, max_connections=2, max_messages_per_connection=3)
    errors: list[BaseException] = []
    ids: list[str] = []
    with Notifier(config) as notifier:

        def worker(n: int) -> None:
            try:
                for i in range(4):
                    ids.append(notifier.send(note(subject=f"t{n}-{i}")).message_id)
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=worker, args=(n,)) for n in range(16)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert errors == []
    assert sorted(m.message["Message-ID"] for m in sink.messages) == sorted(ids)
    assert len(set(ids)) == 64
    assert 1 <= most_open[0] <= 2
    assert len(sink.connections) >= 64 // 3  # they really were recycled


def test_a_send_many_waits_for_a_free_connection(make_sink: MakeSink) -> None:
    """All connections busy: the call waits (it never opens a third) and then goes on."""
    sink = make_sink()
    release = threading.Event()
    started = threading.Event()

    def hold(message: SinkMessage) -> None:
        if message.message["Subject"] == "slow":
            started.set()
            release.wait(10)

    sink.on_message = hold
    results: list[Any] = []
    with Notifier(config_for(sink, max_connections=1)) as notifier:
        holder = threading.Thread(target=lambda: notifier.send(note(subject="slow")))
        holder.start()
        assert started.wait(10)
        waiter = threading.Thread(target=lambda: results.extend(notifier.send_many([note()])))
        waiter.start()
        waiter.join(0.3)
        assert waiter.is_alive()  # waiting for the only connection
        release.set()
        holder.join()
        waiter.join()
    assert isinstance(results[0], SendResult)
    assert [m.connection for m in sink.messages] == [1, 1]


# ---------------------------------------------------------------------------
# The worker's batches go over the pool
# ---------------------------------------------------------------------------


def test_the_worker_spreads_a_batch_over_the_pool(make_sink: MakeSink) -> None:
    sink = make_sink(pipelining=True)
    sent: list[str] = []
    config = config_for(sink, max_connections=4)
    with Notifier(config, batch_size=8, on_sent=lambda e: sent.append(e.id)) as notifier:
        ids = [notifier.notify(note(subject=f"n{i}")) for i in range(8)]
        report = notifier.deliver_due()
    assert report == DeliveryReport(sent=8)
    assert sorted(sent) == sorted(ids)
    assert sorted({m.connection for m in sink.messages}) == [1, 2, 3, 4]
    assert len({m.message["Message-ID"] for m in sink.messages}) == 8


def test_a_hook_may_send_mail_while_the_only_connection_is_in_use(make_sink: MakeSink) -> None:
    """on_failed alerts someone with send(): with max_connections=1 it must not wait
    for the connection its own batch holds (hooks run once the batch gave it back)."""
    sink = make_sink(replies={"RCPT": {"gone@example.com": (550, "5.1.1 no such user")}})
    alerts: list[SendResult] = []
    box: list[Notifier] = []

    def alert(entry: OutboxEntry) -> None:
        alerts.append(box[0].send(note(to="admin@example.com", subject=f"failed: {entry.id}")))

    with Notifier(config_for(sink), on_failed=alert) as notifier:
        box.append(notifier)
        notifier.notify(note(to="gone@example.com"))
        notifier.notify(note(to="ops@example.com"))
        assert notifier.deliver_due() == DeliveryReport(sent=1, failed=1)
    assert len(alerts) == 1
    assert [m.rcpt_tos for m in sink.messages] == [("ops@example.com",), ("admin@example.com",)]


def test_the_worker_releases_what_it_did_not_send_when_stopping(make_sink: MakeSink) -> None:
    """stop() during a batch: the message being sent is finished, the rest released."""
    sink = make_sink()
    box: list[Notifier] = []

    def stop_after_first(message: SinkMessage) -> None:
        box[0]._stopping.set()

    sink.on_message = stop_after_first
    with Notifier(config_for(sink), batch_size=5) as notifier:
        box.append(notifier)
        for i in range(5):
            notifier.notify(note(subject=f"n{i}"))
        report = notifier.deliver_due()
        notifier._stopping.clear()
        counts = notifier.counts()
    assert report == DeliveryReport(sent=1)
    assert len(sink.messages) == 1
    assert counts[OutboxStatus.SENT] == 1 and counts[OutboxStatus.PENDING] == 4
    assert counts[OutboxStatus.SENDING] == 0  # released, not held until the lease ends


# ---------------------------------------------------------------------------
# The rate limiter's arithmetic (an injected clock: no real time passes)
# ---------------------------------------------------------------------------


class FakeTime:
    """A monotonic clock that moves only when someone sleeps (or the test says so)."""

    def __init__(self) -> None:
        self.now = 0.0
        self.waits: list[float] = []
        self._lock = threading.Lock()

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        with self._lock:
            self.waits.append(seconds)
            self.now += seconds


def test_five_a_second_takes_3_8_seconds_for_twenty() -> None:
    fake = FakeTime()
    limiter = RateLimiter(5, clock=fake.clock, sleep=fake.sleep)
    waited = [limiter.acquire() for _ in range(20)]
    assert waited[0] == 0
    assert waited[1:] == [pytest.approx(0.2)] * 19
    assert fake.now == pytest.approx(3.8)
    assert fake.now >= 3.8 - 1e-9


def test_a_burst_goes_at_once_and_the_rate_holds_after_it() -> None:
    fake = FakeTime()
    limiter = RateLimiter(2, burst=4, clock=fake.clock, sleep=fake.sleep)
    assert [limiter.acquire() for _ in range(4)] == [0, 0, 0, 0]  # a full bucket
    assert fake.now == 0
    assert [limiter.acquire() for _ in range(4)] == [pytest.approx(0.5)] * 4
    assert fake.now == pytest.approx(2.0)
    fake.now += 60  # a quiet minute refills the bucket, but only to its size
    assert [limiter.acquire() for _ in range(4)] == [0, 0, 0, 0]
    assert limiter.acquire() == pytest.approx(0.5)


def test_try_acquire_never_waits() -> None:
    fake = FakeTime()
    limiter = RateLimiter(4, clock=fake.clock, sleep=fake.sleep)
    assert limiter.try_acquire() is True
    assert limiter.try_acquire() is False  # the next token is 0.25 s away
    fake.now += 0.2
    assert limiter.try_acquire() is False
    fake.now += 0.05
    assert limiter.try_acquire() is True
    assert fake.waits == []
    # acquire() waits for the next token (its sleep moves the clock) and takes it.
    assert limiter.acquire() == pytest.approx(0.25)
    assert fake.now == pytest.approx(0.5)
    assert limiter.try_acquire() is False
    fake.now += 0.25
    assert limiter.try_acquire() is True


def test_a_slow_rate_spaces_every_message() -> None:
    fake = FakeTime()
    limiter = RateLimiter(0.5, clock=fake.clock, sleep=fake.sleep)
    for _ in range(3):
        limiter.acquire()
    assert fake.now == pytest.approx(4.0)  # one every 2 s


def test_the_limiter_is_shared_fairly_by_threads() -> None:
    """8 threads × 5 acquisitions at 10 a second: the reservations line up one 0.1 s
    apart, whoever asks, so the last is due at 3.9 s."""
    fake = FakeTime()
    limiter = RateLimiter(10, clock=fake.clock, sleep=lambda s: fake.waits.append(s))
    threads = [
        threading.Thread(target=lambda: [limiter.acquire() for _ in range(5)]) for _ in range(8)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(fake.waits) == 39  # everyone but the very first waited
    assert sorted(fake.waits) == [pytest.approx(0.1 * n) for n in range(1, 40)]


@pytest.mark.parametrize(("rate", "burst"), [(0, 1), (-1, 1), (float("inf"), 1), (1, 0.5)])
def test_the_limiter_refuses_nonsense(rate: float, burst: float) -> None:
    with pytest.raises(ValueError):
        RateLimiter(rate, burst=burst)


def test_the_notifier_limits_its_rate_over_all_its_connections(make_sink: MakeSink) -> None:
    """Time stands still here: the 12 reservations of the three connections line up
    in one queue, 0.2 s apart — one bucket, not one per connection."""
    sink = make_sink(pipelining=True)
    waits: list[float] = []
    config = config_for(sink, max_connections=3, max_messages_per_second=5)
    with Notifier(config) as notifier:
        notifier._pool.limiter = RateLimiter(5, clock=lambda: 0.0, sleep=waits.append)
        results = notifier.send_many([note(subject=f"n{i}") for i in range(12)])
    assert all(isinstance(r, SendResult) for r in results)
    assert len(sink.messages) == 12
    assert len({m.connection for m in sink.messages}) == 3
    assert sorted(waits) == [pytest.approx(0.2 * n) for n in range(1, 12)]


def test_the_lease_covers_the_rate_limit() -> None:
    config = MailConfig(sender="noreply@example.com", timeout=10, max_messages_per_second=2)
    with Notifier(config, batch_size=4) as notifier:
        assert notifier.lease == timedelta(seconds=10 + 4 * 10 + 4 / 2 + 60)


@pytest.mark.parametrize(
    ("after_ehlo", "quiet"),
    [
        pytest.param(Default(), True, id="open"),
        pytest.param([Default(), Drop()], False, id="closed"),
        pytest.param([Default(), Reply(421, "4.4.2 idle timeout"), Drop()], False, id="421"),
    ],
)
def test_an_idle_session_knows_whether_the_server_spoke(
    scripted: Scripted, after_ehlo: Any, quiet: bool
) -> None:
    """What the pool looks at before reusing a connection: did anything arrive while
    it idled (the end of the stream, an unasked 421)?"""
    server = scripted(Script(on={"EHLO": after_ehlo}))
    with Notifier(config_for(server, timeout=5)) as notifier:
        session = notifier._session()
        session.open()
        try:
            if not quiet:
                server.wait_until(lambda: server.received.connections[0].closed)
            assert session.quiet() is quiet
        finally:
            session.close()


@pytest.mark.parametrize("connections", [1, 2])
@pytest.mark.parametrize("where", ["report", "message_of"])
def test_an_exception_from_the_callers_code_propagates_as_is(
    make_sink: MakeSink, where: str, connections: int
) -> None:
    """The outbox failing mid-batch (here an OSError, which a connection could raise
    too): the caller gets its own exception, and a connection it left mid-pipeline
    is discarded, never pooled."""
    sink = make_sink(pipelining=True)
    with Notifier(config_for(sink, max_connections=connections)) as notifier:
        prepared = [notifier.prepare(note(subject=f"n{i}")) for i in range(6)]

        def message_of(index: int) -> Any:
            if where == "message_of" and index == 1:
                raise OSError("disk gone")
            return prepared[index]

        def report(index: int, outcome: Any) -> None:
            if where == "report" and index == 0:
                raise OSError("disk gone")

        with pytest.raises(OSError, match="disk gone"):
            notifier._pool.send(list(range(6)), message_of, report)
        if connections == 1:
            assert notifier._pool.idle == 0
        after = notifier.send(note(subject="after"))
    assert isinstance(after, SendResult)
    assert sink.messages[-1].message["Subject"] == "after"
    assert len({m.message["Message-ID"] for m in sink.messages}) == len(sink.messages)
