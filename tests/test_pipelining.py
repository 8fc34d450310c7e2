"""Pipelining across message boundaries (RFC 2920 §3.1), against real sockets.

With PIPELINING a message's MAIL/RCPT…/DATA go out in one write, and the next
message's group goes out in the same write as this message's content and final
".".  These tests check what that must not change: every reply is matched to
its command, a refusal settles only its own message, no content follows a
refused MAIL or a fully refused RCPT, a 421 or drop ends the connection with
each message settled exactly once (Message-IDs counted at the server), and each
message keeps its own send deadline.  Correctness only: nothing here is timed.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest

from _helpers import config_for, note
from scripted_server import (
    Default,
    Delay,
    Drop,
    PerOccurrence,
    Reply,
    Script,
    ScriptedServer,
    Stall,
)
from smtpnotify import (
    ConnectError,
    InvalidMessage,
    Notification,
    Notifier,
    PermanentError,
    RecipientsRefused,
    SendResult,
    SendTimeout,
    TransientError,
)
from smtpnotify._ratelimit import RateLimiter
from smtpnotify.testing import SMTPSink

Scripted = Callable[..., ScriptedServer]
MakeSink = Callable[..., SMTPSink]

PIPELINING = ("PIPELINING", "8BITMIME")
MESSAGE_ID = re.compile(rb"^Message-ID: *(<[^>]+>)", re.MULTILINE | re.IGNORECASE)
SUBJECT = re.compile(rb"^Subject: *(.+?)\r\n", re.MULTILINE)


def pipelined(**on: Any) -> Script:
    return Script(ehlo_extensions=PIPELINING, on=on)


def notes(count: int, **kw: Any) -> list[Notification]:
    return [note(subject=f"n{i}", **kw) for i in range(count)]


def message_ids(contents: list[bytes]) -> Counter[str]:
    """How often each Message-ID arrived (a retried message must not arrive twice).

    Empty contents (the lone "." that ends a refused transaction) are left out.
    """
    found: Counter[str] = Counter()
    for content in filter(None, contents):
        match = MESSAGE_ID.search(content)
        assert match is not None, content[:200]
        found[match.group(1).decode()] += 1
    return found


def subjects(contents: list[bytes]) -> list[str]:
    return [m.group(1).decode() for c in contents if (m := SUBJECT.search(c))]


def send_many(server: Any, messages: list[Any], **config: Any) -> list[Any]:
    config.setdefault("timeout", 5)
    with Notifier(config_for(server, **config)) as notifier:
        return notifier.send_many(messages)


# ---------------------------------------------------------------------------
# Writes and reply order
# ---------------------------------------------------------------------------


def test_the_next_message_goes_out_before_the_final_reply(scripted: Scripted) -> None:
    """The server never answers message 1's final "." — and still received message 2's
    MAIL/RCPT/DATA, written with message 1's content, after the "." and nothing else."""
    server = scripted([pipelined(DATA_END=Stall()), pipelined()])
    first, second = send_many(server, notes(2), timeout=1)
    assert isinstance(first, SendTimeout) and first.ambiguous  # the "." was out
    assert isinstance(second, SendResult)  # never started on connection 1: sent on 2
    one, two = server.wait_closed()
    assert one.verbs == ["EHLO", "MAIL", "RCPT", "DATA"]  # all the server answered
    after_dot = bytes(one.raw).split(b"\r\n.\r\n", 1)[1]
    assert [line.split(b":")[0] for line in after_dot.split(b"\r\n")] == [
        b"MAIL FROM",
        b"RCPT TO",
        b"DATA",
        b"",
    ]
    assert b"RSET" not in after_dot and b"QUIT" not in after_dot  # discarded after the timeout
    assert subjects(two.messages) == ["n1"]
    arrived = message_ids(one.messages + two.messages)
    assert sorted(arrived.values()) == [1, 1]
    assert second.message_id in arrived


def test_replies_are_matched_to_their_commands_across_messages(scripted: Scripted) -> None:
    """Refusals at different commands of different messages, with slow replies in
    between: each lands on its own message."""
    server = scripted(
        pipelined(
            MAIL=PerOccurrence(Default(), [Delay(0.1), Default()], Default()),
            RCPT={
                "b@example.com": Reply(550, "5.1.1 no b"),
                "d@example.com": Reply(452, "4.2.2 d is full"),
                "e@example.com": Reply(551, "5.1.6 e moved"),
            },
            DATA_END=PerOccurrence([Delay(0.1), Default()], Default()),
        )
    )
    messages = [
        note(to="a@example.com", subject="n0"),
        note(to="b@example.com", subject="n1"),
        note(to=("c@example.com", "d@example.com"), subject="n2"),
        note(to=("e@example.com", "f@example.com", "b@example.com"), subject="n3"),
        note(to="g@example.com", subject="n4"),
    ]
    results = send_many(server, messages)
    assert [type(r) for r in results] == [
        SendResult,
        RecipientsRefused,
        SendResult,
        SendResult,
        SendResult,
    ]
    zero, one, two, three, four = results
    assert zero.accepted == ("a@example.com",) and zero.refused == {}
    assert one.refused == {"b@example.com": (550, "5.1.1 no b")}
    assert two.accepted == ("c@example.com",)
    assert two.refused == {"d@example.com": (452, "4.2.2 d is full")}
    assert three.accepted == ("f@example.com",)
    assert three.refused == {
        "e@example.com": (551, "5.1.6 e moved"),
        "b@example.com": (550, "5.1.1 no b"),
    }
    assert four.accepted == ("g@example.com",)
    [connection] = server.wait_closed()
    assert subjects(connection.messages) == ["n0", "n2", "n3", "n4"]
    assert [r.message_id for r in (zero, two, three, four)] == list(
        message_ids(connection.messages)
    )


def test_a_real_server_gets_every_message_once_in_order(make_sink: MakeSink) -> None:
    sink = make_sink(pipelining=True, replies={"RCPT": {"bad@example.com": (550, "5.1.1 no")}})
    messages = notes(6)
    messages[3] = note(to="bad@example.com", subject="n3")
    results = send_many(sink, messages)
    assert isinstance(results[3], RecipientsRefused)
    delivered = [r for r in results if isinstance(r, SendResult)]
    assert len(delivered) == 5
    assert [m.message["Message-ID"] for m in sink.messages] == [r.message_id for r in delivered]
    assert [m.message["Subject"] for m in sink.messages] == ["n0", "n1", "n2", "n4", "n5"]
    assert {m.connection for m in sink.messages} == {1}
    assert sink.rejected == []


# ---------------------------------------------------------------------------
# A refusal mid-pipeline settles only its message
# ---------------------------------------------------------------------------

REFUSALS: dict[str, tuple[Reply, type[Exception], str]] = {
    "MAIL": (Reply(550, "5.7.1 not you"), PermanentError, "MAIL"),
    "RCPT": (Reply(550, "5.1.1 no such user"), RecipientsRefused, "RCPT"),
    "DATA": (Reply(554, "5.3.0 no data"), PermanentError, "DATA"),
    "DATA_END": (Reply(554, "5.6.0 content refused"), PermanentError, "DATA"),
    "MAIL-4xx": (Reply(451, "4.3.0 later"), TransientError, "MAIL"),
    "DATA_END-4xx": (Reply(452, "4.3.1 full"), TransientError, "DATA"),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_message_two_of_four_refused(scripted: Scripted, case: str) -> None:
    stage = case.split("-")[0]
    refusal, error_type, command = REFUSALS[case]
    server = scripted(pipelined(**{stage: PerOccurrence(Default(), refusal, Default())}))
    results = send_many(server, notes(4))
    first, second, third, fourth = results
    assert all(isinstance(r, SendResult) for r in (first, third, fourth)), results
    assert type(second) is error_type
    assert second.code == refusal.code and second.command == command
    assert not second.ambiguous
    [connection] = server.wait_closed()  # a refusal never costs the connection
    assert connection.verbs.count("MAIL") == 4
    arrived = subjects(connection.messages)
    if stage == "DATA_END":
        assert arrived == ["n0", "n1", "n2", "n3"]  # n1's content came; the server refused it
        assert "RSET" not in connection.verbs  # the transaction was over
    else:
        assert "n1" not in arrived and arrived == ["n0", "n2", "n3"]
        assert connection.verbs.count("RSET") == 1
    if stage in ("MAIL", "RCPT"):
        # RFC 2920 §3.1: DATA was answered 354 regardless; it got a lone ".", not n1.
        assert b"Subject: n1" not in bytes(connection.raw)
        assert b"" in connection.messages
    assert connection.verbs[-1] == "QUIT"
    delivered = [r.message_id for r in (first, third, fourth) if isinstance(r, SendResult)]
    arrived = message_ids(connection.messages)
    assert set(delivered) <= set(arrived) and max(arrived.values()) == 1


def test_a_message_the_server_cannot_take_is_skipped_not_sent(scripted: Scripted) -> None:
    """A non-ASCII local part needs SMTPUTF8, which this server lacks: that message
    fails before its MAIL; the ones around it go through the same pipeline."""
    server = scripted(pipelined())
    messages = notes(3)
    messages[1] = note(to="jörg@example.com", subject="n1")
    first, second, third = send_many(server, messages)
    assert isinstance(first, SendResult) and isinstance(third, SendResult)
    assert isinstance(second, InvalidMessage) and "SMTPUTF8" in str(second)
    [connection] = server.wait_closed()
    assert connection.verbs.count("MAIL") == 2
    assert subjects(connection.messages) == ["n0", "n2"]


# ---------------------------------------------------------------------------
# 421 and drops: the connection ends, nothing is lost or doubled
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("stage", ["MAIL", "RCPT", "DATA", "DATA_END"])
def test_421_in_the_middle(scripted: Scripted, stage: str) -> None:
    """421 to message 3 of 5: 1 and 2 delivered, 3 gets the 421, 4 and 5 go over a
    new connection; every Message-ID reaches the server at most once."""
    closing = Reply(421, "4.3.2 shutting down")
    server = scripted(
        [pipelined(**{stage: PerOccurrence(Default(), Default(), closing)}), pipelined()]
    )
    results = send_many(server, notes(5))
    assert [type(r) for r in results] == [
        SendResult,
        SendResult,
        TransientError,
        SendResult,
        SendResult,
    ]
    third = results[2]
    assert third.code == 421 and not third.ambiguous and third.transient
    one, two = server.wait_closed()
    assert one.closed_by == "server"
    assert "QUIT" not in one.verbs and "RSET" not in one.verbs
    assert subjects(two.messages) == ["n3", "n4"]
    arrived = message_ids(one.messages + two.messages)
    assert max(arrived.values()) == 1
    delivered = {r.message_id for r in results if isinstance(r, SendResult)}
    assert delivered <= set(arrived)
    assert two.verbs[-1] == "QUIT"


def test_a_drop_after_the_final_dot_is_ambiguous_and_not_retried(scripted: Scripted) -> None:
    server = scripted([pipelined(DATA_END=PerOccurrence(Default(), Drop())), pipelined()])
    first, second, third = send_many(server, notes(3))
    assert isinstance(first, SendResult) and isinstance(third, SendResult)
    assert type(second) is ConnectError
    assert second.ambiguous and second.phase == "send" and "may have accepted" in str(second)
    one, two = server.wait_closed()
    assert subjects(one.messages) == ["n0", "n1"]  # n1 arrived: it may well be delivered
    assert subjects(two.messages) == ["n2"]  # only n2, which had not begun, went again
    assert max(message_ids(one.messages + two.messages).values()) == 1


@pytest.mark.parametrize("stage", ["MAIL", "RCPT", "DATA"])
def test_a_drop_before_the_final_dot_is_not_ambiguous(scripted: Scripted, stage: str) -> None:
    server = scripted([pipelined(**{stage: PerOccurrence(Default(), Drop())}), pipelined()])
    first, second, third = send_many(server, notes(3))
    assert isinstance(first, SendResult) and isinstance(third, SendResult)
    assert type(second) is ConnectError and not second.ambiguous
    one, two = server.wait_closed()
    assert subjects(one.messages) == ["n0"] and subjects(two.messages) == ["n2"]


# ---------------------------------------------------------------------------
# Deadlines and the rate limit
# ---------------------------------------------------------------------------


def test_each_pipelined_message_has_its_own_send_deadline(scripted: Scripted) -> None:
    """MAIL answered after 0.6 s, three times, with a 1 s send deadline: one deadline
    for the batch would run out at the second message; one per message never does."""
    server = scripted(pipelined(MAIL=[Delay(0.6), Default()]))
    results = send_many(server, notes(3), timeout=1)
    assert all(isinstance(r, SendResult) for r in results), results
    [connection] = server.wait_closed()
    assert len(connection.messages) == 3


class FakeTime:
    """A clock that only moves when the limiter sleeps."""

    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


@pytest.mark.parametrize("pipelining", [True, False])
def test_the_rate_limit_paces_a_batch(make_sink: MakeSink, pipelining: bool) -> None:
    sink = make_sink(pipelining=pipelining)
    fake = FakeTime()
    config = config_for(sink, max_messages_per_second=4)
    with Notifier(config) as notifier:
        assert notifier._pool.limiter is not None and notifier._pool.limiter.rate == 4
        notifier._pool.limiter = RateLimiter(4, clock=fake.clock, sleep=fake.sleep)
        results = notifier.send_many(notes(9))
    assert all(isinstance(r, SendResult) for r in results)
    assert len(sink.messages) == 9
    assert fake.now == pytest.approx(8 / 4)  # the first is free, then one every 0.25 s
    assert len(fake.sleeps) == 8
