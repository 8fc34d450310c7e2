"""The Notifier itself: send, send_many, construction, lifetime, repr, clock and outbox rules."""

from __future__ import annotations

import socket
from collections.abc import Callable
from datetime import UTC, datetime, timedelta, timezone
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest

from _helpers import config_for, note
from smtpnotify import (
    InvalidMessage,
    MailConfig,
    MemoryOutbox,
    Notifier,
    OutboxStatus,
    RecipientsRefused,
    SendResult,
    SQLiteOutbox,
    TransientError,
)
from smtpnotify.outbox import OutboxError
from smtpnotify.testing import SMTPSink

T0 = datetime(2030, 1, 1, 12, 0, tzinfo=UTC)


def no_recipient() -> EmailMessage:
    message = EmailMessage()
    message["Subject"] = "to nobody"
    message.set_content("hello")
    return message


# -- send --------------------------------------------------------------------------------------


def test_send_delivers_one_message_and_keeps_the_connection_for_the_next(sink: SMTPSink) -> None:
    with Notifier(config_for(sink)) as notifier:
        result = notifier.send(note(("a@example.com", "b@example.com")))
        notifier.send(note("c@example.com"))
    assert isinstance(result, SendResult)
    assert result.accepted == ("a@example.com", "b@example.com")
    assert result.refused == {}
    first, second = sink.messages
    assert first.rcpt_tos == ("a@example.com", "b@example.com")
    assert str(first.message["Message-ID"]) == result.message_id
    assert first.mail_from == "noreply@example.com"
    assert first.connection == second.connection  # the idle pooled connection, reused
    assert sink.verbs.count("QUIT") == 1  # said once, by close()


def test_send_reports_refused_recipients_and_raises_when_all_are(
    make_sink: Callable[..., SMTPSink],
) -> None:
    sink = make_sink(replies={"RCPT": {"gone@example.com": (550, "5.1.1 no such user")}})
    with Notifier(config_for(sink)) as notifier:
        result = notifier.send(note(("ok@example.com", "gone@example.com")))
        assert result.accepted == ("ok@example.com",)
        assert result.refused == {"gone@example.com": (550, "5.1.1 no such user")}
        with pytest.raises(RecipientsRefused) as caught:
            notifier.send(note("gone@example.com"))
    assert caught.value.refused == {"gone@example.com": (550, "5.1.1 no such user")}
    assert caught.value.transient is False
    assert len(sink.messages) == 1


def test_send_raises_invalid_message_before_connecting(sink: SMTPSink) -> None:
    with Notifier(config_for(sink)) as notifier, pytest.raises(InvalidMessage):
        notifier.send(no_recipient())
    assert sink.connections == []


# -- send_many -----------------------------------------------------------------------------------


def test_send_many_reuses_one_connection(sink: SMTPSink) -> None:
    with Notifier(config_for(sink)) as notifier:
        results = notifier.send_many([note(f"user{n}@example.com") for n in range(4)])
    assert all(isinstance(r, SendResult) for r in results)
    assert [m.rcpt_tos for m in sink.messages] == [(f"user{n}@example.com",) for n in range(4)]
    assert {m.connection for m in sink.messages} == {1}
    assert len(sink.connections) == 1
    assert sink.verbs.count("EHLO") == 1 and sink.verbs.count("QUIT") == 1
    assert [r.message_id for r in results if isinstance(r, SendResult)] == [
        str(m.message["Message-ID"]) for m in sink.messages
    ]


def test_send_many_reconnects_after_the_server_closes_and_keeps_positions(
    make_sink: Callable[..., SMTPSink],
) -> None:
    # The server says 421 (closing) at the second message's RCPT and hangs up.
    sink = make_sink(replies={"RCPT": {"second@example.com": (421, "4.3.2 shutting down")}})
    messages: list[Any] = [
        note("first@example.com"),
        note("second@example.com"),
        no_recipient(),
        note("third@example.com"),
        note("fourth@example.com"),
    ]
    with Notifier(config_for(sink)) as notifier:
        results = notifier.send_many(messages)
    assert len(results) == len(messages)
    first, second, invalid, third, fourth = results
    assert isinstance(first, SendResult) and first.accepted == ("first@example.com",)
    assert isinstance(second, TransientError) and second.code == 421
    assert second.transient is True
    assert isinstance(invalid, InvalidMessage)
    assert isinstance(third, SendResult) and third.accepted == ("third@example.com",)
    assert isinstance(fourth, SendResult) and fourth.accepted == ("fourth@example.com",)
    by_rcpt = {m.rcpt_tos: m.connection for m in sink.messages}
    assert by_rcpt == {
        ("first@example.com",): 1,
        ("third@example.com",): 2,  # a new connection after the 421
        ("fourth@example.com",): 2,  # ...reused again
    }


def test_send_many_keeps_going_after_an_error_reply(make_sink: Callable[..., SMTPSink]) -> None:
    sink = make_sink(replies={"RCPT": {"gone@example.com": (550, "5.1.1 no such user")}})
    with Notifier(config_for(sink)) as notifier:
        results = notifier.send_many([note("gone@example.com"), note("ok@example.com")])
    refused, ok = results
    assert isinstance(refused, RecipientsRefused)
    assert isinstance(ok, SendResult)
    assert {m.connection for m in sink.messages} == {1}  # an error reply keeps the connection


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_send_many_gives_every_message_the_connect_error() -> None:
    config = MailConfig(
        host="127.0.0.1", port=closed_port(), sender="noreply@example.com", timeout=5
    )
    with Notifier(config) as notifier:
        results = notifier.send_many([note("a@example.com"), no_recipient(), note("b@example.com")])
    a, invalid, b = results
    assert isinstance(invalid, InvalidMessage)
    assert isinstance(a, ConnectionError) and a.transient and a.phase == "connect"
    assert b is a  # one failed connect, not one per message


def test_send_many_of_nothing_connects_to_nothing(sink: SMTPSink) -> None:
    with Notifier(config_for(sink)) as notifier:
        assert notifier.send_many([]) == []
        assert notifier.send_many([no_recipient()])[0].__class__ is InvalidMessage
    assert sink.connections == []


# -- construction and lifetime -----------------------------------------------------------------


def test_outbox_none_gives_a_memory_outbox_the_notifier_owns(sink: SMTPSink) -> None:
    notifier = Notifier(config_for(sink))
    assert isinstance(notifier.outbox, MemoryOutbox)
    notifier.notify(note())
    notifier.close()
    with pytest.raises(OutboxError):
        notifier.outbox.counts()  # closed with the notifier that made it


def test_close_leaves_an_outbox_it_was_given_open(sink: SMTPSink, tmp_path: Path) -> None:
    with SQLiteOutbox(tmp_path / "o.db") as outbox:
        with Notifier(config_for(sink), outbox) as notifier:
            entry_id = notifier.notify(note())
        assert notifier.outbox is outbox
        entry = outbox.get(entry_id)
        assert entry is not None and entry.status is OutboxStatus.PENDING


def test_the_context_manager_closes(sink: SMTPSink) -> None:
    with Notifier(config_for(sink), poll_interval=0.05) as notifier:
        notifier.start()
    with pytest.raises(RuntimeError, match="closed"):
        notifier.start()
    notifier.close()  # twice is harmless


@pytest.mark.parametrize(
    ("kw", "error"),
    [
        ({"batch_size": 0}, ValueError),
        ({"poll_interval": 0}, ValueError),
        ({"poll_interval": -1.0}, ValueError),
    ],
)
def test_bad_arguments_are_refused(kw: dict[str, Any], error: type[Exception]) -> None:
    with pytest.raises(error):
        Notifier(MailConfig(sender="noreply@example.com"), **kw)


def test_a_config_must_be_a_mailconfig() -> None:
    with pytest.raises(TypeError, match="MailConfig"):
        Notifier({"sender": "noreply@example.com"})  # type: ignore[arg-type]


def test_the_default_lease_outlasts_a_whole_batch() -> None:
    config = MailConfig(sender="noreply@example.com", timeout=10, send_timeout=20)
    assert Notifier(config, batch_size=3).lease == timedelta(seconds=10 + 3 * 20 + 60)
    assert Notifier(MailConfig(sender="noreply@example.com")).lease == timedelta(
        seconds=30 + 10 * 30 + 60
    )
    assert Notifier(config, lease=timedelta(minutes=30)).lease == timedelta(minutes=30)


def test_repr_shows_no_password(sink: SMTPSink) -> None:
    config = config_for(sink, username="notifier", password="hunter2-very-secret")
    with Notifier(config) as notifier:
        text = repr(notifier) + str(notifier)
    assert "hunter2" not in text
    assert "notifier" in text and "MemoryOutbox" in text


# -- notify's rules --------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["memory", "sqlite"])
def test_notify_with_a_connection_needs_an_outbox_that_can_use_it(
    sink: SMTPSink, tmp_path: Path, kind: str
) -> None:
    outbox = MemoryOutbox() if kind == "memory" else SQLiteOutbox(tmp_path / "o.db")
    with outbox, Notifier(config_for(sink), outbox) as notifier:
        with pytest.raises(TypeError, match="transaction"):
            notifier.notify(note(), connection=object())
        assert sum(outbox.counts().values()) == 0
        notifier.notify(note(), connection=None)
        assert outbox.counts()[OutboxStatus.PENDING] == 1


def test_a_naive_clock_is_refused(sink: SMTPSink) -> None:
    with Notifier(config_for(sink), clock=lambda: datetime(2030, 1, 1, 12, 0)) as notifier:
        with pytest.raises(ValueError, match="aware"):
            notifier.notify(note())
        with pytest.raises(ValueError, match="aware"):
            notifier.deliver_due()
        assert sum(notifier.counts().values()) == 0
    assert sink.connections == []


def test_an_aware_clock_in_another_zone_is_read_as_utc(sink: SMTPSink) -> None:
    zone = timezone(timedelta(hours=5, minutes=30))
    with Notifier(config_for(sink), clock=lambda: T0.astimezone(zone)) as notifier:
        assert notifier.now() == T0 and notifier.now().tzinfo is UTC
        entry_id = notifier.notify(note())
        entry = notifier.outbox.get(entry_id)
        assert entry is not None
        assert entry.created_at == T0 and entry.created_at.utcoffset() == timedelta(0)
        assert entry.expires_at == T0 + timedelta(days=5)


def test_notify_returns_the_outbox_id_of_a_prepared_entry(sink: SMTPSink) -> None:
    with Notifier(config_for(sink), clock=lambda: T0) as notifier:
        entry_id = notifier.notify(
            note(("a@example.com",), cc=("b@example.com",), bcc=("c@example.com",))
        )
        entry = notifier.outbox.get(entry_id)
    assert entry is not None
    assert entry.status is OutboxStatus.PENDING
    assert entry.attempts == 0
    assert entry.next_attempt_at == entry.created_at == T0
    assert entry.message.recipients == ("a@example.com", "b@example.com", "c@example.com")
    assert b"c@example.com" not in entry.message.data  # Bcc never in the headers
    assert entry.message_id.startswith("<") and entry.message_id.encode() in entry.message.data
    assert sink.connections == []  # notify() only queues
