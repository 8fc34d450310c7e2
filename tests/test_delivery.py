"""Outbox delivery with an injected clock: retries, backoff, expiry, failures, partial recipients.

Every test drives :meth:`Notifier.deliver_due` by hand against a real
:class:`~smtpnotify.testing.SMTPSink`, with time read only from a
:class:`FakeClock`, so retry intervals of minutes or days take no real time.
"""

from __future__ import annotations

import itertools
import logging
import socket
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from _helpers import config_for, note
from smtpnotify import (
    DeliveryReport,
    InvalidMessage,
    MemoryOutbox,
    Notifier,
    Outbox,
    OutboxEntry,
    OutboxStatus,
    SQLiteOutbox,
)
from smtpnotify.outbox import OutboxError
from smtpnotify.testing import SinkMessage, SMTPSink

T0 = datetime(2030, 1, 1, 12, 0, tzinfo=UTC)
US = timedelta(microseconds=1)
MINUTE = timedelta(minutes=1)


class FakeClock:
    """A clock that moves only when told to: ``clock()`` is an aware UTC datetime."""

    def __init__(self, start: datetime = T0) -> None:
        self.now = start

    def __call__(self) -> datetime:
        return self.now

    def advance(self, delta: timedelta) -> None:
        self.now += delta


def mail_count(sink: SMTPSink) -> int:
    """How many MAIL commands (delivery attempts that reached the server) the sink saw."""
    return sink.verbs.count("MAIL")


def message_id(message: SinkMessage) -> str:
    return str(message.message["Message-ID"])


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def make_notifier(clock: FakeClock) -> Iterator[Callable[..., Notifier]]:
    """``make_notifier(server, outbox=None, notifier_kw={...}, **config_kw)``; closed after."""
    made: list[Notifier] = []

    def factory(
        server: Any,
        outbox: Outbox | None = None,
        *,
        notifier_kw: dict[str, Any] | None = None,
        **config_kw: Any,
    ) -> Notifier:
        config_kw.setdefault("timeout", 5)
        notifier = Notifier(
            config_for(server, **config_kw), outbox, clock=clock, **(notifier_kw or {})
        )
        made.append(notifier)
        return notifier

    yield factory
    for notifier in made:
        notifier.close()


def get(notifier: Notifier, entry_id: str) -> OutboxEntry:
    entry = notifier.outbox.get(entry_id)
    assert entry is not None
    return entry


# -- retry timing -----------------------------------------------------------------------------


def test_transient_error_retries_after_the_interval_not_before(
    make_sink: Callable[..., SMTPSink], make_notifier: Callable[..., Notifier], clock: FakeClock
) -> None:
    sink = make_sink(replies={"MAIL": (451, "4.3.0 try later")})
    notifier = make_notifier(sink, retry_interval=timedelta(minutes=5))
    entry_id = notifier.notify(note())

    assert notifier.deliver_due() == DeliveryReport(retried=1)
    entry = get(notifier, entry_id)
    assert entry.status is OutboxStatus.PENDING
    assert entry.attempts == 1
    assert entry.next_attempt_at == T0 + timedelta(minutes=5)
    assert entry.last_error is not None and "451" in entry.last_error
    assert entry.lease_owner is None and entry.lease_until is None
    assert mail_count(sink) == 1

    sink.replies.clear()  # the server recovers
    clock.now = T0 + timedelta(minutes=5) - US
    assert notifier.deliver_due() == DeliveryReport()
    assert mail_count(sink) == 1
    assert get(notifier, entry_id).status is OutboxStatus.PENDING

    clock.now = T0 + timedelta(minutes=5)
    assert notifier.deliver_due() == DeliveryReport(sent=1)
    entry = get(notifier, entry_id)
    assert (entry.status, entry.attempts, entry.next_attempt_at) == (OutboxStatus.SENT, 2, None)
    assert "451" in (entry.last_error or "")  # kept: it says what the first attempt ran into
    [message] = sink.messages
    assert message.rcpt_tos == ("ops@example.com",)
    assert message_id(message) == entry.message_id


@pytest.mark.parametrize(
    ("config_kw", "expected_minutes"),
    [
        ({}, [5, 5, 5, 5]),  # the settings page: a fixed interval
        ({"retry_interval": MINUTE}, [1, 1, 1, 1]),
        (
            {"retry_interval": MINUTE, "retry_backoff": 2.0, "max_retry_interval": 5 * MINUTE},
            [1, 2, 4, 5, 5, 5],
        ),
        ({"retry_interval": 2 * MINUTE, "retry_backoff": 3.0}, [2, 6, 18, 54, 162]),
    ],
    ids=["default", "fixed-1min", "backoff-2-cap-5", "backoff-3-no-cap"],
)
def test_backoff_and_cap(
    make_sink: Callable[..., SMTPSink],
    make_notifier: Callable[..., Notifier],
    clock: FakeClock,
    config_kw: dict[str, Any],
    expected_minutes: list[int],
) -> None:
    sink = make_sink(replies={"MAIL": (451, "4.3.0 try later")})
    notifier = make_notifier(sink, expiration=timedelta(days=5), **config_kw)
    entry_id = notifier.notify(note())
    delays = []
    for attempt in range(1, len(expected_minutes) + 1):
        attempted_at = clock.now
        assert notifier.deliver_due() == DeliveryReport(retried=1)
        entry = get(notifier, entry_id)
        assert entry.attempts == attempt == mail_count(sink)
        assert entry.next_attempt_at is not None
        delays.append((entry.next_attempt_at - attempted_at) / MINUTE)
        clock.now = entry.next_attempt_at
    assert delays == expected_minutes


# -- expiration ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("expiration", "attempts"),
    [
        (timedelta(minutes=10), 2),  # the third attempt would be at T0+10min == expiry
        (timedelta(minutes=10) + US, 3),  # 1 µs more: the third attempt happens at T0+10min
    ],
    ids=["third-attempt-at-expiry", "third-attempt-just-before-expiry"],
)
def test_an_attempt_whose_next_time_reaches_expiry_expires_at_once(
    make_sink: Callable[..., SMTPSink],
    make_notifier: Callable[..., Notifier],
    clock: FakeClock,
    expiration: timedelta,
    attempts: int,
) -> None:
    sink = make_sink(replies={"MAIL": (451, "4.3.0 try later")})
    expired: list[OutboxEntry] = []
    notifier = make_notifier(
        sink,
        retry_interval=timedelta(minutes=5),
        expiration=expiration,
        notifier_kw={"on_expired": expired.append},
    )
    entry_id = notifier.notify(note())
    attempt_times = []
    for _ in range(5):
        entry = get(notifier, entry_id)
        if entry.status is not OutboxStatus.PENDING:
            break
        assert entry.next_attempt_at is not None
        clock.now = entry.next_attempt_at
        report = notifier.deliver_due()
        attempt_times.append(clock.now)
        assert report.total == 1
    assert attempt_times == [T0 + n * timedelta(minutes=5) for n in range(attempts)]
    assert report == DeliveryReport(expired=1)  # the last attempt's failure expired it
    entry = get(notifier, entry_id)
    assert entry.status is OutboxStatus.EXPIRED
    assert entry.attempts == attempts == mail_count(sink)
    assert entry.next_attempt_at is None
    assert "451" in (entry.last_error or "")
    assert [e.id for e in expired] == [entry_id]
    assert expired[0].status is OutboxStatus.EXPIRED
    # expired is final: no later pass tries it again
    clock.advance(timedelta(days=30))
    assert notifier.deliver_due() == DeliveryReport()
    assert mail_count(sink) == attempts


@pytest.mark.parametrize(
    ("offset", "expect_attempt"), [(-US, True), (timedelta(0), False), (MINUTE, False)]
)
def test_an_entry_due_at_or_after_its_expiry_is_expired_not_attempted(
    make_sink: Callable[..., SMTPSink],
    make_notifier: Callable[..., Notifier],
    clock: FakeClock,
    offset: timedelta,
    expect_attempt: bool,
) -> None:
    sink = make_sink(replies={"MAIL": (451, "4.3.0 try later")})
    expired: list[OutboxEntry] = []
    notifier = make_notifier(
        sink,
        retry_interval=timedelta(minutes=5),
        expiration=timedelta(minutes=7),
        notifier_kw={"on_expired": expired.append},
    )
    entry_id = notifier.notify(note())
    assert notifier.deliver_due() == DeliveryReport(retried=1)  # T0: 451, next at T0+5min
    sink.replies.clear()

    clock.now = T0 + timedelta(minutes=7) + offset  # the worker was down past T0+5min
    report = notifier.deliver_due()
    entry = get(notifier, entry_id)
    if expect_attempt:
        assert report == DeliveryReport(sent=1)
        assert (entry.status, entry.attempts, mail_count(sink)) == (OutboxStatus.SENT, 2, 2)
        assert expired == []
    else:
        assert report == DeliveryReport(expired=1)
        assert (entry.status, entry.attempts, mail_count(sink)) == (OutboxStatus.EXPIRED, 1, 1)
        assert "451" in (entry.last_error or "")  # the reason it never went out is kept
        assert [e.id for e in expired] == [entry_id]
        assert sink.messages == []


def test_an_entry_that_expires_while_its_batch_is_sent_is_not_attempted(
    make_sink: Callable[..., SMTPSink], make_notifier: Callable[..., Notifier], clock: FakeClock
) -> None:
    # Time passes while the batch is being sent: the first message's delivery
    # carries the clock to the second one's expiry, so the second is never tried.
    def time_flies(message: SinkMessage) -> None:
        clock.now = T0 + timedelta(minutes=10)

    sink = make_sink(on_message=time_flies)
    expired: list[OutboxEntry] = []
    notifier = make_notifier(
        sink,
        expiration=timedelta(minutes=10),
        notifier_kw={"batch_size": 5, "on_expired": expired.append},
    )
    first = notifier.notify(note("first@example.com"))
    second = notifier.notify(note("second@example.com"))
    assert notifier.deliver_due() == DeliveryReport(sent=1, expired=1)
    assert [m.rcpt_tos for m in sink.messages] == [("first@example.com",)]
    assert get(notifier, first).status is OutboxStatus.SENT
    entry = get(notifier, second)
    assert entry.status is OutboxStatus.EXPIRED
    assert entry.attempts == 0  # claimed, but never attempted
    assert entry.lease_owner is None
    assert [e.id for e in expired] == [second]


# -- permanent failures -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("replies", "code"),
    [
        ({"MAIL": (550, "5.7.1 sender rejected")}, "550"),
        ({"DATA": (554, "5.3.4 no DATA for you")}, "554"),
        ({"DATA_END": (554, "5.6.0 content rejected")}, "554"),
    ],
    ids=["MAIL-550", "DATA-554", "final-554"],
)
def test_a_permanent_error_fails_at_once_and_is_never_retried(
    make_sink: Callable[..., SMTPSink],
    make_notifier: Callable[..., Notifier],
    clock: FakeClock,
    replies: dict[str, Any],
    code: str,
) -> None:
    sink = make_sink(replies=replies)
    failed: list[OutboxEntry] = []
    notifier = make_notifier(sink, notifier_kw={"on_failed": failed.append})
    entry_id = notifier.notify(note())
    assert notifier.deliver_due() == DeliveryReport(failed=1)
    entry = get(notifier, entry_id)
    assert (entry.status, entry.attempts, entry.next_attempt_at) == (OutboxStatus.FAILED, 1, None)
    assert code in (entry.last_error or "")
    assert [e.id for e in failed] == [entry_id] and failed[0].status is OutboxStatus.FAILED

    sink.replies.clear()
    for _ in range(3):
        clock.advance(timedelta(hours=1))
        assert notifier.deliver_due() == DeliveryReport()
    assert mail_count(sink) == 1
    assert sink.messages == []


def test_every_recipient_refused_permanently_fails_with_the_refusals(
    make_sink: Callable[..., SMTPSink], make_notifier: Callable[..., Notifier], clock: FakeClock
) -> None:
    refusals = {"a@example.com": (550, "5.1.1 no such user"), "b@example.com": (553, "5.1.3 bad")}
    sink = make_sink(replies={"RCPT": refusals})
    notifier = make_notifier(sink)
    entry_id = notifier.notify(note(("a@example.com", "b@example.com")))
    assert notifier.deliver_due() == DeliveryReport(failed=1)
    entry = get(notifier, entry_id)
    assert entry.status is OutboxStatus.FAILED
    assert entry.attempts == 1
    assert entry.accepted == ()
    assert entry.refused == refusals
    assert "DATA" not in sink.verbs
    clock.advance(timedelta(days=1))
    assert notifier.deliver_due() == DeliveryReport()
    assert mail_count(sink) == 1


# -- partial recipients -------------------------------------------------------------------------

OK, LATER, GONE = "ok@example.com", "later@example.com", "gone@example.com"


def rcpt_count(sink: SMTPSink, address: str) -> int:
    return sum(1 for line in sink.commands if line.upper().startswith("RCPT") and address in line)


def test_only_the_recipients_deferred_with_4xx_are_retried(
    make_sink: Callable[..., SMTPSink], make_notifier: Callable[..., Notifier], clock: FakeClock
) -> None:
    sink = make_sink(
        replies={"RCPT": {LATER: (451, "4.2.0 mailbox busy"), GONE: (550, "5.1.1 no such user")}}
    )
    sent: list[OutboxEntry] = []
    notifier = make_notifier(sink, notifier_kw={"on_sent": sent.append})
    entry_id = notifier.notify(note((OK, LATER, GONE)))

    assert notifier.deliver_due() == DeliveryReport(retried=1)
    entry = get(notifier, entry_id)
    assert entry.status is OutboxStatus.PENDING
    assert entry.message.recipients == (LATER,)
    assert entry.accepted == (OK,)
    assert entry.refused == {GONE: (550, "5.1.1 no such user")}
    assert entry.next_attempt_at == T0 + timedelta(minutes=5)
    assert LATER in (entry.last_error or "") and "451" in (entry.last_error or "")
    [first] = sink.messages
    assert first.rcpt_tos == (OK,)

    del sink.replies["RCPT"]  # the busy mailbox frees up; gone@ would now be accepted too
    clock.now = entry.next_attempt_at
    assert notifier.deliver_due() == DeliveryReport(sent=1)
    entry = get(notifier, entry_id)
    assert entry.status is OutboxStatus.SENT
    assert entry.attempts == 2
    assert entry.accepted == (OK, LATER)
    assert entry.refused == {GONE: (550, "5.1.1 no such user")}
    second = sink.messages[1]
    assert second.rcpt_tos == (LATER,)  # ONLY the deferred one, never ok@ or gone@ again
    assert rcpt_count(sink, OK) == rcpt_count(sink, GONE) == 1
    assert message_id(first) == message_id(second) == entry.message_id
    assert first.data == second.data  # the very same message, headers included
    assert [e.id for e in sent] == [entry_id]


def test_some_refused_for_good_the_rest_accepted_is_sent(
    make_sink: Callable[..., SMTPSink], make_notifier: Callable[..., Notifier]
) -> None:
    sink = make_sink(replies={"RCPT": {GONE: (550, "5.1.1 no such user")}})
    notifier = make_notifier(sink)
    entry_id = notifier.notify(note((OK, GONE)))
    assert notifier.deliver_due() == DeliveryReport(sent=1)
    entry = get(notifier, entry_id)
    assert (entry.status, entry.accepted) == (OutboxStatus.SENT, (OK,))
    assert entry.refused == {GONE: (550, "5.1.1 no such user")}


def test_a_deferred_recipient_later_refused_for_good_still_leaves_the_message_sent(
    make_sink: Callable[..., SMTPSink], make_notifier: Callable[..., Notifier], clock: FakeClock
) -> None:
    # Delivered to ok@ on the first attempt; later@ refuses for good on the retry.
    # Every recipient is settled and one got it: that is "sent", as in one attempt.
    sink = make_sink(replies={"RCPT": {LATER: (451, "4.2.0 mailbox busy")}})
    failed: list[OutboxEntry] = []
    sent: list[OutboxEntry] = []
    notifier = make_notifier(sink, notifier_kw={"on_failed": failed.append, "on_sent": sent.append})
    entry_id = notifier.notify(note((OK, LATER)))
    assert notifier.deliver_due() == DeliveryReport(retried=1)
    sink.replies["RCPT"] = {LATER: (550, "5.1.1 mailbox gone")}
    clock.now = T0 + timedelta(minutes=5)
    assert notifier.deliver_due() == DeliveryReport(sent=1)
    entry = get(notifier, entry_id)
    assert entry.status is OutboxStatus.SENT
    assert entry.accepted == (OK,)
    assert entry.refused == {LATER: (550, "5.1.1 mailbox gone")}
    assert failed == [] and [e.id for e in sent] == [entry_id]
    assert [m.rcpt_tos for m in sink.messages] == [(OK,)]


@pytest.mark.parametrize("verb", ["MAIL", "DATA"])
def test_a_deferred_recipient_whose_retry_gets_a_5xx_for_the_message_still_leaves_it_sent(
    make_sink: Callable[..., SMTPSink],
    make_notifier: Callable[..., Notifier],
    clock: FakeClock,
    verb: str,
) -> None:
    # ok@ has it from the first attempt; the retry for later@ is refused for the whole
    # message (5xx at MAIL or DATA): later@ is refused for good, and the message was sent.
    sink = make_sink(replies={"RCPT": {LATER: (451, "4.2.0 mailbox busy")}})
    failed: list[OutboxEntry] = []
    notifier = make_notifier(sink, notifier_kw={"on_failed": failed.append})
    entry_id = notifier.notify(note((OK, LATER)))
    assert notifier.deliver_due() == DeliveryReport(retried=1)
    sink.replies.clear()
    sink.replies[verb] = (554, "5.7.1 policy says no")
    clock.now = T0 + timedelta(minutes=5)
    assert notifier.deliver_due() == DeliveryReport(sent=1)
    entry = get(notifier, entry_id)
    assert entry.status is OutboxStatus.SENT
    assert entry.accepted == (OK,)
    assert entry.refused[LATER][0] == 554
    assert failed == []


def test_a_partial_delivery_that_then_expires_keeps_who_got_it(
    make_sink: Callable[..., SMTPSink], make_notifier: Callable[..., Notifier], clock: FakeClock
) -> None:
    # The attempt that delivers to ok@ and is refused for gone@ is also the last
    # one (its retry would fall on the expiry): the entry expires, but it must
    # still record ok@ as accepted, so that an operator's retry never resends to ok@.
    sink = make_sink(
        replies={"RCPT": {LATER: (451, "4.2.0 mailbox busy"), GONE: (550, "5.1.1 no such user")}}
    )
    notifier = make_notifier(
        sink, retry_interval=timedelta(minutes=5), expiration=timedelta(minutes=5)
    )
    entry_id = notifier.notify(note((OK, LATER, GONE)))
    assert notifier.deliver_due() == DeliveryReport(expired=1)
    entry = get(notifier, entry_id)
    assert entry.status is OutboxStatus.EXPIRED
    assert entry.accepted == (OK,)
    assert entry.refused == {GONE: (550, "5.1.1 no such user")}
    assert entry.message.recipients == (LATER,)
    assert entry.attempts == 1

    # An operator puts it back; only later@ is still owed the message.
    del sink.replies["RCPT"]
    clock.advance(MINUTE)
    assert notifier.outbox.retry(entry_id, now=clock.now)
    assert notifier.deliver_due() == DeliveryReport(sent=1)
    assert [m.rcpt_tos for m in sink.messages] == [(OK,), (LATER,)]
    assert get(notifier, entry_id).accepted == (OK, LATER)


def test_every_recipient_refused_some_with_4xx_retries_only_those(
    make_sink: Callable[..., SMTPSink], make_notifier: Callable[..., Notifier], clock: FakeClock
) -> None:
    sink = make_sink(
        replies={"RCPT": {LATER: (452, "4.2.2 mailbox full"), GONE: (550, "5.1.1 no such user")}}
    )
    notifier = make_notifier(sink)
    entry_id = notifier.notify(note((LATER, GONE)))
    assert notifier.deliver_due() == DeliveryReport(retried=1)
    entry = get(notifier, entry_id)
    assert entry.status is OutboxStatus.PENDING
    assert entry.message.recipients == (LATER,)
    assert entry.refused == {GONE: (550, "5.1.1 no such user")}
    assert "DATA" not in sink.verbs
    del sink.replies["RCPT"]
    clock.now = T0 + timedelta(minutes=5)
    assert notifier.deliver_due() == DeliveryReport(sent=1)
    assert [m.rcpt_tos for m in sink.messages] == [(LATER,)]


# -- the ambiguous case ------------------------------------------------------------------------


def test_the_message_id_is_stable_through_an_ambiguous_failure(
    make_sink: Callable[..., SMTPSink], make_notifier: Callable[..., Notifier], clock: FakeClock
) -> None:
    sink = make_sink(drop_after={"DATA_END"})  # takes the message, then hangs up: no reply
    notifier = make_notifier(sink)
    entry_id = notifier.notify(note())
    assert notifier.deliver_due() == DeliveryReport(retried=1)
    entry = get(notifier, entry_id)
    assert entry.status is OutboxStatus.PENDING
    assert "ambiguous" in (entry.last_error or "")
    [dropped] = sink.rejected
    assert dropped.reply is None

    sink.drop_after.clear()
    clock.now = entry.next_attempt_at or clock.now
    assert notifier.deliver_due() == DeliveryReport(sent=1)
    entry = get(notifier, entry_id)
    assert (entry.status, entry.attempts) == (OutboxStatus.SENT, 2)
    [delivered] = sink.messages
    # at-least-once: the recipient may see it twice, with one Message-ID to fold them
    assert message_id(dropped) == message_id(delivered) == entry.message_id
    assert dropped.data == delivered.data


# -- connecting --------------------------------------------------------------------------------


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class _Nowhere:
    host = "127.0.0.1"

    def __init__(self) -> None:
        self.port = closed_port()


def test_a_refused_connection_is_retried_and_counted(
    make_notifier: Callable[..., Notifier], clock: FakeClock
) -> None:
    notifier = make_notifier(_Nowhere(), notifier_kw={"batch_size": 10})
    ids = [notifier.notify(note(f"user{n}@example.com")) for n in range(3)]
    assert notifier.deliver_due() == DeliveryReport(retried=3)
    for entry_id in ids:
        entry = get(notifier, entry_id)
        assert (entry.status, entry.attempts) == (OutboxStatus.PENDING, 1)
        assert "ConnectError" in (entry.last_error or "")
        assert entry.next_attempt_at == T0 + timedelta(minutes=5)
    clock.advance(timedelta(minutes=5))
    assert notifier.deliver_due() == DeliveryReport(retried=3)
    assert {get(notifier, i).attempts for i in ids} == {2}


def test_a_server_that_comes_back_gets_the_queue(
    make_sink: Callable[..., SMTPSink], clock: FakeClock
) -> None:
    sink = make_sink(replies={"EHLO": (421, "4.3.2 shutting down"), "HELO": (421, "4.3.2 no")})
    with Notifier(config_for(sink, timeout=5), clock=clock) as notifier:
        entry_id = notifier.notify(note())
        assert notifier.deliver_due() == DeliveryReport(retried=1)
        assert "421" in (get(notifier, entry_id).last_error or "")
        sink.replies.clear()
        clock.advance(timedelta(minutes=5))
        assert notifier.deliver_due() == DeliveryReport(sent=1)
        assert get(notifier, entry_id).attempts == 2


# -- leases --------------------------------------------------------------------------------------


def test_a_message_is_held_under_the_notifier_lease_while_it_is_sent(
    make_sink: Callable[..., SMTPSink], make_notifier: Callable[..., Notifier]
) -> None:
    seen: list[OutboxEntry | None] = []
    holder: list[Notifier] = []
    sink = make_sink(on_message=lambda m: seen.append(holder[0].outbox.get(entry_id)))
    notifier = make_notifier(sink, notifier_kw={"lease": timedelta(minutes=3)})
    holder.append(notifier)
    entry_id = notifier.notify(note())
    notifier.deliver_due()
    [during] = seen
    assert during is not None
    assert during.status is OutboxStatus.SENDING
    assert during.lease_owner == notifier.owner
    assert during.lease_until == T0 + timedelta(minutes=3)


def test_a_crashed_workers_claim_is_taken_over_when_its_lease_runs_out(
    make_sink: Callable[..., SMTPSink], make_notifier: Callable[..., Notifier], clock: FakeClock
) -> None:
    sink = make_sink()
    notifier = make_notifier(sink)
    entry_id = notifier.notify(note())
    # Another worker claimed it and died without a word.
    [claimed] = notifier.outbox.claim(now=T0, owner="dead-worker", lease=timedelta(minutes=2))
    assert claimed.attempts == 1
    assert notifier.deliver_due() == DeliveryReport()
    clock.advance(timedelta(minutes=2) - US)
    assert notifier.deliver_due() == DeliveryReport()
    assert sink.messages == []
    clock.advance(US)
    assert notifier.deliver_due() == DeliveryReport(sent=1)
    entry = get(notifier, entry_id)
    assert (entry.status, entry.attempts) == (OutboxStatus.SENT, 2)
    assert (
        notifier.outbox.record_sent(
            entry_id, owner="dead-worker", now=clock.now, accepted=(), refused={}
        )
        is False
    )


def test_a_worker_that_lost_its_lease_mid_send_records_nothing(
    make_sink: Callable[..., SMTPSink],
    make_notifier: Callable[..., Notifier],
    clock: FakeClock,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # The send outlasts the lease and another worker takes the message over
    # meanwhile: the slow worker must not overwrite what the new holder does.
    lease = timedelta(minutes=2)
    holder: list[Notifier] = []

    def stolen(message: SinkMessage) -> None:
        clock.advance(lease)
        holder[0].outbox.claim(now=clock.now, owner="other-worker", lease=lease)

    sink = make_sink(on_message=stolen)
    sent: list[OutboxEntry] = []
    notifier = make_notifier(sink, notifier_kw={"lease": lease, "on_sent": sent.append})
    holder.append(notifier)
    entry_id = notifier.notify(note())
    with caplog.at_level(logging.WARNING, logger="smtpnotify"):
        assert notifier.deliver_due() == DeliveryReport()
    assert sent == []
    entry = get(notifier, entry_id)
    assert (entry.status, entry.lease_owner, entry.attempts) == (
        OutboxStatus.SENDING,
        "other-worker",
        2,
    )
    assert any("lease lost" in r.getMessage() for r in caplog.records)


def test_a_421_in_the_middle_of_a_batch_reconnects_for_the_rest(
    make_sink: Callable[..., SMTPSink], make_notifier: Callable[..., Notifier]
) -> None:
    sink = make_sink(replies={"RCPT": {"second@example.com": (421, "4.3.2 shutting down")}})
    notifier = make_notifier(sink, notifier_kw={"batch_size": 10})
    ids = [notifier.notify(note(f"{n}@example.com")) for n in ("first", "second", "third")]
    assert notifier.deliver_due() == DeliveryReport(sent=2, retried=1)
    assert [(m.rcpt_tos, m.connection) for m in sink.messages] == [
        (("first@example.com",), 1),
        (("third@example.com",), 2),
    ]
    assert "421" in (get(notifier, ids[1]).last_error or "")


def test_an_absurd_backoff_expires_the_message_instead_of_overflowing(
    make_sink: Callable[..., SMTPSink], make_notifier: Callable[..., Notifier], clock: FakeClock
) -> None:
    # The third wait (a million million days) is beyond what a datetime can hold.
    sink = make_sink(replies={"MAIL": (451, "4.3.0 try later")})
    notifier = make_notifier(
        sink,
        retry_interval=timedelta(days=1),
        retry_backoff=1e6,
        expiration=timedelta(days=2_000_000),
    )
    entry_id = notifier.notify(note())
    assert notifier.deliver_due() == DeliveryReport(retried=1)
    clock.now = get(notifier, entry_id).next_attempt_at or clock.now
    assert notifier.deliver_due() == DeliveryReport(retried=1)
    assert get(notifier, entry_id).next_attempt_at == T0 + timedelta(days=1 + 1_000_000)
    clock.now = get(notifier, entry_id).next_attempt_at or clock.now
    assert notifier.deliver_due() == DeliveryReport(expired=1)
    assert get(notifier, entry_id).attempts == 3


# -- hooks and reports ------------------------------------------------------------------------


def test_hooks_receive_the_finished_entries_and_a_raising_hook_breaks_nothing(
    make_sink: Callable[..., SMTPSink],
    make_notifier: Callable[..., Notifier],
    clock: FakeClock,
    caplog: pytest.LogCaptureFixture,
) -> None:
    sink = make_sink(replies={"RCPT": {"bad@example.com": (550, "5.1.1 no such user")}})
    calls: list[tuple[str, str, OutboxStatus]] = []

    def hook(name: str) -> Callable[[OutboxEntry], None]:
        def record(entry: OutboxEntry) -> None:
            calls.append((name, entry.id, entry.status))
            raise RuntimeError(f"the {name} alerting service is down")

        return record

    notifier = make_notifier(
        sink,
        expiration=timedelta(hours=1),
        notifier_kw={
            "batch_size": 10,
            "on_sent": hook("sent"),
            "on_failed": hook("failed"),
            "on_expired": hook("expired"),
        },
    )
    old = notifier.notify(note("old@example.com"))
    clock.advance(timedelta(minutes=59))
    bad = notifier.notify(note("bad@example.com"))
    good1 = notifier.notify(note("good1@example.com"))
    good2 = notifier.notify(note("good2@example.com"))
    clock.advance(MINUTE)  # old@ expires now

    with caplog.at_level(logging.ERROR, logger="smtpnotify"):
        report = notifier.deliver_due()
    assert report == DeliveryReport(sent=2, failed=1, expired=1)
    assert sorted(calls) == sorted(
        [
            ("expired", old, OutboxStatus.EXPIRED),
            ("failed", bad, OutboxStatus.FAILED),
            ("sent", good1, OutboxStatus.SENT),
            ("sent", good2, OutboxStatus.SENT),
        ]
    )
    assert [m.rcpt_tos for m in sink.messages] == [("good1@example.com",), ("good2@example.com",)]
    hook_logs = [r for r in caplog.records if "hook" in r.getMessage()]
    assert len(hook_logs) == 4
    assert all(r.exc_info is not None and r.exc_info[0] is RuntimeError for r in hook_logs)


def test_the_delivery_report_counts_each_outcome(
    make_sink: Callable[..., SMTPSink], make_notifier: Callable[..., Notifier], clock: FakeClock
) -> None:
    sink = make_sink(
        replies={
            "RCPT": {
                "later@example.com": (451, "4.2.0 busy"),
                "bad@example.com": (550, "5.1.1 no such user"),
            }
        }
    )
    notifier = make_notifier(sink, expiration=timedelta(hours=2), notifier_kw={"batch_size": 2})
    notifier.notify(note("old@example.com"))
    clock.advance(timedelta(hours=1))
    for to in ("a@example.com", "later@example.com", "bad@example.com", "b@example.com"):
        notifier.notify(note(to))
    clock.advance(timedelta(hours=1))  # old@ expires; the other four are due
    report = notifier.deliver_due()
    assert report == DeliveryReport(sent=2, retried=1, failed=1, expired=1)
    assert report.total == 5
    counts = notifier.counts()
    assert counts[OutboxStatus.SENT] == 2
    assert counts[OutboxStatus.PENDING] == 1
    assert counts[OutboxStatus.FAILED] == 1
    assert counts[OutboxStatus.EXPIRED] == 1
    assert counts[OutboxStatus.SENDING] == 0
    # batch_size=2: the four due messages go in two batches; the second reuses the
    # first's connection, idle in the pool in between
    assert len(sink.connections) == 1


def test_a_message_that_failed_in_a_pass_is_not_retried_in_the_same_pass(
    make_sink: Callable[..., SMTPSink], make_notifier: Callable[..., Notifier], clock: FakeClock
) -> None:
    # The clock moves on while the pass runs, past the first message's retry time.
    def time_flies(message: SinkMessage) -> None:
        clock.advance(timedelta(minutes=10))

    sink = make_sink(replies={"RCPT": {LATER: (451, "4.2.0 busy")}}, on_message=time_flies)
    notifier = make_notifier(sink, notifier_kw={"batch_size": 1})
    later = notifier.notify(note((OK, LATER)))
    others = [notifier.notify(note(f"user{n}@example.com")) for n in range(2)]
    report = notifier.deliver_due()
    assert report == DeliveryReport(sent=2, retried=1)
    entry = get(notifier, later)
    assert (entry.status, entry.attempts) == (OutboxStatus.PENDING, 1)
    assert rcpt_count(sink, LATER) == 1
    assert all(get(notifier, i).status is OutboxStatus.SENT for i in others)


# -- bad input ----------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["memory", "sqlite"])
def test_an_invalid_message_raises_at_notify_and_nothing_is_queued(
    sink: SMTPSink, clock: FakeClock, tmp_path: Path, kind: str
) -> None:
    outbox: Outbox = MemoryOutbox() if kind == "memory" else SQLiteOutbox(tmp_path / "o.db")
    no_recipient = EmailMessage()
    no_recipient["Subject"] = "to nobody"
    no_recipient.set_content("hello")
    bad_address = EmailMessage()
    bad_address["To"] = "bad@@example.com"
    bad_address["Subject"] = "bad"
    with outbox, Notifier(config_for(sink), outbox, clock=clock) as notifier:
        notifier.notify(note())
        before = outbox.counts()
        for message in (no_recipient, bad_address):
            with pytest.raises(InvalidMessage) as caught:
                notifier.notify(message)
            assert caught.value.transient is False
        assert outbox.counts() == before
        assert len(outbox.entries(limit=10)) == 1
        assert notifier.deliver_due() == DeliveryReport(sent=1)
    assert len(sink.messages) == 1


# -- the schedule never passes expiry (property) -----------------------------------------------


@pytest.fixture(scope="module")
def always_451() -> Iterator[SMTPSink]:
    with SMTPSink(replies={"MAIL": (451, "4.3.0 try later")}) as server:
        yield server


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    interval_s=st.integers(min_value=1, max_value=3600),
    backoff=st.sampled_from([1.0, 1.5, 2.0, 3.0]) | st.floats(min_value=1.0, max_value=4.0),
    cap_factor=st.none() | st.floats(min_value=1.0, max_value=20.0),
    attempts_hint=st.floats(min_value=0.01, max_value=25.0),
    extra_us=st.integers(min_value=-1, max_value=1),
)
def test_the_retry_schedule_never_passes_expiration(
    always_451: SMTPSink,
    interval_s: int,
    backoff: float,
    cap_factor: float | None,
    attempts_hint: float,
    extra_us: int,
) -> None:
    interval = timedelta(seconds=interval_s)
    cap = None if cap_factor is None else interval * cap_factor
    expiration = max(interval * attempts_hint + extra_us * US, US)
    clock = FakeClock()
    config = config_for(
        always_451,
        timeout=5,
        retry_interval=interval,
        retry_backoff=backoff,
        max_retry_interval=cap,
        expiration=expiration,
    )
    with Notifier(config, MemoryOutbox(), clock=clock) as notifier:
        mails_before = mail_count(always_451)
        entry_id = notifier.notify(note())
        created = clock.now
        attempt_times: list[datetime] = []
        for _ in range(200):
            entry = get(notifier, entry_id)
            if entry.status is not OutboxStatus.PENDING:
                break
            assert entry.next_attempt_at is not None
            clock.now = entry.next_attempt_at
            mails = mail_count(always_451)
            notifier.deliver_due()
            if mail_count(always_451) > mails:
                attempt_times.append(clock.now)
        entry = get(notifier, entry_id)
        assert entry.status is OutboxStatus.EXPIRED
        assert entry.attempts == len(attempt_times) == mail_count(always_451) - mails_before
        assert attempt_times[0] == created
        assert all(t < created + expiration for t in attempt_times)
        # each wait is the schedule's: interval × backoff^(n-1), capped
        for n, (earlier, later) in enumerate(itertools.pairwise(attempt_times), 1):
            expected = interval.total_seconds() * backoff ** (n - 1)
            if cap is not None:
                expected = min(expected, cap.total_seconds())
            assert abs((later - earlier).total_seconds() - expected) < 1e-3
        # and it gave up only when the next wait would have reached the expiry
        n = len(attempt_times)
        last_wait = interval.total_seconds() * backoff ** (n - 1)
        if cap is not None:
            last_wait = min(last_wait, cap.total_seconds())
        assert attempt_times[-1] + timedelta(seconds=last_wait) >= created + expiration - 1000 * US


def test_a_pass_broken_by_the_outbox_gives_back_what_it_never_started(
    make_sink: Callable[..., SMTPSink], make_notifier: Callable[..., Notifier], clock: FakeClock
) -> None:
    class BrokenOnce(MemoryOutbox):
        broken = True

        def record_sent(self, entry_id: str, **kw: Any) -> bool:
            if BrokenOnce.broken:
                BrokenOnce.broken = False
                raise OutboxError("the database went away")
            return super().record_sent(entry_id, **kw)

    sink = make_sink()
    outbox = BrokenOnce()
    notifier = make_notifier(sink, outbox, notifier_kw={"batch_size": 6})
    ids = [notifier.notify(note((OK,))) for _ in range(6)]
    with pytest.raises(OutboxError):
        notifier.deliver_due()
    entries = [get(notifier, i) for i in ids]
    held = [e for e in entries if e.status is OutboxStatus.SENDING]
    released = [e for e in entries if e.status is OutboxStatus.PENDING]
    # At most the one whose outcome failed and the one pipelined behind it are still
    # held (their fate is unknown); the rest are due again at once, attempts undone.
    assert 1 <= len(held) <= 2
    assert len(released) == 6 - len(held)
    assert all(e.attempts == 0 and e.next_attempt_at == T0 for e in released)
    assert notifier.deliver_due().sent == len(released)
