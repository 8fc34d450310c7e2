"""What the server says, and how smtpnotify hears it: SPEC §4 and §5.

Reply classification at every stage, drops at every stage, partial and total
recipient refusal, PIPELINING (RFC 2920, §3.1 included), the connection after
an error reply, the HELO fallback, and SMTP smuggling (dot-stuffing) as
properties against a real aiosmtpd server.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from _helpers import config_for, note, pinned_ca
from scripted_server import (
    Default,
    Delay,
    Drop,
    PerOccurrence,
    Raw,
    Reply,
    Script,
    ScriptedServer,
    Stall,
)
from smtpnotify import (
    ConnectError,
    ConnectTimeout,
    Notifier,
    PermanentError,
    RecipientsRefused,
    ResponseError,
    SendResult,
    SendTimeout,
    SMTPNotifyError,
    TransientError,
)
from smtpnotify._prepared import PreparedMessage
from smtpnotify._smtp import dot_stuff
from smtpnotify.testing import CertificateBundle, SMTPSink

Scripted = Callable[..., ScriptedServer]
MakeSink = Callable[..., SMTPSink]

LINE_BREAK = re.compile(r"\r\n|\r|\n")
BODY_MARKER = "BODY-MARKER-7d1c"

REPLIES = {
    421: ("4.3.2", "service shutting down"),
    451: ("4.3.0", "try again later"),
    452: ("4.5.3", "too many recipients"),
    550: ("5.1.1", "no such user"),
    554: ("5.7.1", "rejected by policy"),
}


def send_error(config: Any, message: Any = None) -> SMTPNotifyError:
    with Notifier(config) as notifier, pytest.raises(SMTPNotifyError) as info:
        notifier.send(message or note())
    return info.value


# ---------------------------------------------------------------------------
# Reply classification
# ---------------------------------------------------------------------------

STAGES = {
    # stage: (phase, command the error names)
    "GREETING": ("connect", "CONNECT"),
    "EHLO": ("connect", "EHLO"),
    "MAIL": ("send", "MAIL"),
    "RCPT": ("send", "RCPT"),
    "DATA": ("send", "DATA"),
    "DATA_END": ("send", "DATA"),
}


@pytest.mark.parametrize("code", list(REPLIES))
@pytest.mark.parametrize("stage", list(STAGES))
def test_reply_classification(scripted: Scripted, stage: str, code: int) -> None:
    enhanced, text = REPLIES[code]
    reply = Reply(code, f"{enhanced} {text}")
    on: dict[str, Any] = {stage: reply}
    phase, command = STAGES[stage]
    if stage == "EHLO":
        on["HELO"] = reply  # a 5xx EHLO falls back to HELO (tls="none", no AUTH)
        if code >= 500:
            command = "HELO"
    server = scripted(Script(on=on))
    error = send_error(config_for(server, timeout=5))

    transient = code < 500
    if stage == "RCPT" and code != 421:
        assert type(error) is RecipientsRefused
        assert error.refused == {"ops@example.com": (code, f"{enhanced} {text}")}
    else:
        assert type(error) is (TransientError if transient else PermanentError)
    assert isinstance(error, ResponseError)
    assert error.code == code
    assert error.enhanced_code == enhanced
    assert error.message == text
    assert error.command == command
    assert error.transient is transient
    assert error.phase == phase
    assert error.ambiguous is False
    assert str(code) in str(error)

    received = server.received
    if phase == "connect":
        assert "MAIL" not in received.verbs
    if stage != "DATA_END":
        assert received.messages == []
    # 421: the server closes; the client writes nothing more.  Otherwise an error
    # in the send phase leaves the connection usable: RSET (unless the transaction
    # is already over, after the final ".") and a polite QUIT.
    [connection] = server.wait_closed()
    if code == 421:
        assert connection.closed_by == "server"
        assert "QUIT" not in connection.verbs and "RSET" not in connection.verbs
    elif stage == "DATA_END":
        assert connection.verbs[-2:] == ["DATA", "QUIT"]
    elif phase == "send":
        assert connection.verbs[-2:] == ["RSET", "QUIT"]


def test_multiline_reply_keeps_the_code_and_enhanced_code(scripted: Scripted) -> None:
    server = scripted(Script(on={"MAIL": Reply(550, "5.7.1 first line\n5.7.1 second line")}))
    error = send_error(config_for(server, timeout=5))
    assert type(error) is PermanentError
    assert (error.code, error.enhanced_code, error.command) == (550, "5.7.1", "MAIL")
    assert "first line" in error.message and "second line" in error.message


def test_reply_without_enhanced_code(scripted: Scripted) -> None:
    server = scripted(Script(on={"DATA_END": Reply(554, "Transaction failed")}))
    error = send_error(config_for(server, timeout=5))
    assert type(error) is PermanentError
    assert error.enhanced_code is None
    assert error.message == "Transaction failed"
    assert error.ambiguous is False  # a reply after "." is an answer, not a doubt


# ---------------------------------------------------------------------------
# Drops
# ---------------------------------------------------------------------------

BIG = "x" * 76 + "\n"


@pytest.mark.parametrize(
    ("stage", "phase"),
    [
        ("GREETING", "connect"),
        ("EHLO", "connect"),
        ("MAIL", "send"),
        ("RCPT", "send"),
        ("DATA", "send"),
        ("DATA_CONTENT", "send"),
        ("DATA_END", "send"),
    ],
)
def test_drop(scripted: Scripted, stage: str, phase: str) -> None:
    if stage == "DATA_CONTENT":
        # The drop must reach the client while it is still writing: far more than
        # the socket buffers hold (the scripted server's caveat).  Prepared directly:
        # building an 8 MB Notification would take seconds.
        script = Script(on={stage: Drop(rst=True)}, mid_data_bytes=1)
        big = PreparedMessage(
            sender="noreply@example.com",
            recipients=("ops@example.com",),
            message_id="<big@example.com>",
            data=BIG.encode().replace(b"\n", b"\r\n") * (8 * 1024 * 1024 // len(BIG)),
        )
    else:
        script = Script(on={stage: Drop()})
    server = scripted(script)
    with Notifier(config_for(server, timeout=10)) as notifier, pytest.raises(ConnectError) as info:
        if stage == "DATA_CONTENT":
            notifier.send_prepared(big)
        else:
            notifier.send(note())
    error = info.value
    assert type(error) is ConnectError, repr(error)
    assert not isinstance(error, ConnectTimeout)
    assert error.transient
    assert error.phase == phase
    assert error.ambiguous is (stage == "DATA_END")
    assert ("may have accepted" in str(error)) is (stage == "DATA_END")
    received = server.received
    if stage == "DATA_END":
        assert len(received.messages) == 1  # the server had it all
    else:
        assert received.messages == []
    if stage == "DATA_CONTENT":
        [connection] = server.wait_closed()
        assert connection.partial_data is not None  # content began, never ended


# ---------------------------------------------------------------------------
# Recipient refusal
# ---------------------------------------------------------------------------


def test_partial_refusal_gives_a_result_with_the_refusals(make_sink: MakeSink) -> None:
    sink = make_sink(
        replies={
            "RCPT": {
                "bad@example.com": (550, "5.1.1 no such user"),
                "later@example.com": (451, "4.2.1 mailbox busy"),
            }
        }
    )
    to = ("bad@example.com", "good@example.com", "later@example.com")
    with Notifier(config_for(sink)) as notifier:
        result = notifier.send(note(to=to))
    assert isinstance(result, SendResult)
    assert result.accepted == ("good@example.com",)
    assert result.refused == {
        "bad@example.com": (550, "5.1.1 no such user"),
        "later@example.com": (451, "4.2.1 mailbox busy"),
    }
    [message] = sink.messages
    assert message.rcpt_tos == ("good@example.com",)
    assert message.message["Message-ID"] == result.message_id


@pytest.mark.parametrize(
    ("codes", "transient"),
    [((550, 554), False), ((550, 451), True), ((452, 451), True)],
)
def test_total_refusal(make_sink: MakeSink, codes: tuple[int, int], transient: bool) -> None:
    to = ("a@example.com", "b@example.com")
    texts = {c: f"{REPLIES[c][0]} {REPLIES[c][1]}" for c in codes}
    sink = make_sink(replies={"RCPT": {r: (c, texts[c]) for r, c in zip(to, codes, strict=True)}})
    error = send_error(config_for(sink), note(to=to))
    assert type(error) is RecipientsRefused
    assert error.refused == {r: (c, texts[c]) for r, c in zip(to, codes, strict=True)}
    assert error.transient is transient
    assert error.phase == "send"
    assert error.command == "RCPT"
    assert (400 <= error.code < 500) is transient  # the code agrees with transient
    assert sink.messages == [] and sink.rejected == []
    assert "DATA" not in sink.verbs  # without PIPELINING, DATA is not even sent
    assert sink.verbs[-2:] == ["RSET", "QUIT"]


# ---------------------------------------------------------------------------
# PIPELINING
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("pipelining", [True, False])
def test_pipelined_commands_go_out_before_any_reply(scripted: Scripted, pipelining: bool) -> None:
    """The server never answers MAIL: with PIPELINING, RCPT and DATA arrived anyway."""
    extensions = ("PIPELINING", "8BITMIME") if pipelining else ("8BITMIME",)
    server = scripted(Script(ehlo_extensions=extensions, on={"MAIL": Stall()}))
    error = send_error(config_for(server, timeout=1), note(to=("a@example.com", "b@example.com")))
    assert type(error) is SendTimeout
    [connection] = server.wait_closed()
    assert connection.verbs == ["EHLO", "MAIL"]  # the server handled only MAIL
    after_ehlo = bytes(connection.raw).split(b"\r\n", 1)[1]
    lines = after_ehlo.split(b"\r\n")
    verbs = [line.split(b" ", 1)[0].split(b":", 1)[0] for line in lines if line]
    if pipelining:
        assert verbs == [b"MAIL", b"RCPT", b"RCPT", b"DATA"]
    else:
        assert verbs == [b"MAIL"]  # one at a time: waiting for the MAIL reply


def test_pipelined_replies_are_matched_to_their_commands(scripted: Scripted) -> None:
    server = scripted(
        Script(
            ehlo_extensions=("PIPELINING",),
            on={
                "MAIL": [Delay(0.2), Default()],
                "RCPT": {
                    "b@example.com": Reply(550, "5.1.1 no b"),
                    "d@example.com": Reply(452, "4.2.2 d is full"),
                },
            },
        )
    )
    to = ("a@example.com", "b@example.com", "c@example.com", "d@example.com")
    with Notifier(config_for(server, timeout=5)) as notifier:
        result = notifier.send(note(to=to))
    assert result.accepted == ("a@example.com", "c@example.com")
    assert result.refused == {
        "b@example.com": (550, "5.1.1 no b"),
        "d@example.com": (452, "4.2.2 d is full"),
    }
    [message] = server.received.messages
    assert b"The disk is full." in message


def test_pipelining_with_a_real_server(make_sink: MakeSink) -> None:
    sink = make_sink(pipelining=True, replies={"RCPT": {"b@example.com": (550, "5.1.1 no")}})
    with Notifier(config_for(sink)) as notifier:
        results = notifier.send_many(
            [note(to=("a@example.com", "b@example.com")), note(to="c@example.com")]
        )
    first, second = results
    assert isinstance(first, SendResult) and isinstance(second, SendResult)
    assert first.refused == {"b@example.com": (550, "5.1.1 no")}
    assert [m.rcpt_tos for m in sink.messages] == [("a@example.com",), ("c@example.com",)]
    assert {m.connection for m in sink.messages} == {1}


@pytest.mark.parametrize("failure", ["MAIL", "every RCPT"])
def test_rfc2920_content_never_sent_when_the_transaction_failed(
    scripted: Scripted, failure: str
) -> None:
    """RFC 2920 §3.1: a server that says 354 to DATA after MAIL or every RCPT failed
    gets an empty content ("."), never the message."""
    on: dict[str, Any] = (
        {"MAIL": Reply(550, "5.7.1 sender refused")}
        if failure == "MAIL"
        else {"RCPT": Reply(550, "5.1.1 no such user")}
    )
    server = scripted(Script(ehlo_extensions=("PIPELINING",), on=on))  # DATA: 354 regardless
    message = note(to=("a@example.com", "b@example.com"), subject=BODY_MARKER, text=BODY_MARKER)
    error = send_error(config_for(server, timeout=5), message)
    if failure == "MAIL":
        assert type(error) is PermanentError and error.command == "MAIL"
    else:
        assert type(error) is RecipientsRefused
        assert set(error.refused) == {"a@example.com", "b@example.com"}
    [connection] = server.wait_closed()
    assert BODY_MARKER.encode() not in bytes(connection.raw)
    assert b"Subject" not in bytes(connection.raw)
    assert connection.messages == [b""]  # the lone "." that ends the 354
    assert connection.verbs == ["EHLO", "MAIL", "RCPT", "RCPT", "DATA", "RSET", "QUIT"]


def test_rfc2920_with_a_real_server_refusing_mail(make_sink: MakeSink) -> None:
    sink = make_sink(pipelining=True, replies={"MAIL": (451, "4.3.0 later")})
    error = send_error(config_for(sink))
    assert type(error) is TransientError and error.command == "MAIL"
    assert sink.messages == [] and sink.rejected == []


# ---------------------------------------------------------------------------
# The connection after an error reply
# ---------------------------------------------------------------------------

REFUSALS = {
    "MAIL": Reply(550, "5.7.1 not you"),
    "RCPT": Reply(550, "5.1.1 no such user"),
    "DATA": Reply(554, "5.3.0 no data"),
    "DATA_END": Reply(554, "5.6.0 content refused"),
}


@pytest.mark.parametrize("code", [550, 421])
@pytest.mark.parametrize("stage", list(REFUSALS))
def test_connection_after_an_error_reply(scripted: Scripted, stage: str, code: int) -> None:
    """send_many, 2nd message refused: same connection after 5xx (RSET), new one after 421."""
    refusal = REFUSALS[stage] if code != 421 else Reply(421, "4.3.2 closing")
    server = scripted([Script(on={stage: PerOccurrence(Default(), refusal, Default())}), Script()])
    with Notifier(config_for(server, timeout=5)) as notifier:
        results = notifier.send_many([note(subject=f"n{i}") for i in range(3)])
    first, second, third = results
    assert isinstance(first, SendResult) and isinstance(third, SendResult)
    assert isinstance(second, ResponseError) and second.code == refusal.code
    connections = server.wait_closed()
    assert sum(len(c.messages) for c in connections) == (3 if stage == "DATA_END" else 2)
    if code == 421:
        assert len(connections) == 2
        assert connections[0].closed_by == "server"
        assert "RSET" not in connections[0].verbs
        assert len(connections[1].messages) == 1
    else:
        [connection] = connections
        assert connection.verbs.count("MAIL") == 3
        assert connection.verbs.count("RSET") == (0 if stage == "DATA_END" else 1)
        assert connection.verbs[-1] == "QUIT"


# ---------------------------------------------------------------------------
# HELO fallback
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("code", [500, 502, 550])
def test_helo_fallback_for_plain_smtp_without_auth(scripted: Scripted, code: int) -> None:
    server = scripted(Script(on={"EHLO": Reply(code, "5.5.1 what is EHLO")}))
    with Notifier(config_for(server, timeout=5)) as notifier:
        result = notifier.send(note())
    assert result.accepted == ("ops@example.com",)
    assert server.received.verbs == ["EHLO", "HELO", "MAIL", "RCPT", "DATA", "QUIT"]
    assert len(server.received.messages) == 1


@pytest.mark.parametrize("case", ["4xx", "starttls", "auth"])
def test_no_helo_fallback(scripted: Scripted, certs: CertificateBundle, case: str) -> None:
    """A 4xx EHLO is a transient refusal; STARTTLS and AUTH need ESMTP: no HELO."""
    code = 421 if case == "4xx" else 502
    server = scripted(Script(on={"EHLO": Reply(code, "no EHLO today")}), cert="localhost")
    kw: dict[str, Any] = {"timeout": 5}
    if case == "starttls":
        kw.update(tls="starttls", **pinned_ca(certs))
    elif case == "auth":
        kw.update(username="alice", password="pw-never-sent")
    error = send_error(config_for(server, **kw))
    assert type(error) is (TransientError if code < 500 else PermanentError)
    assert error.command == "EHLO" and error.phase == "connect"
    verbs = server.received.verbs
    assert "HELO" not in verbs and "MAIL" not in verbs and "AUTH" not in verbs


# ---------------------------------------------------------------------------
# SMTP smuggling and dot-stuffing
# ---------------------------------------------------------------------------

TRICKY = [
    "\n.\n",
    "\r.\r\n",
    ".\r\n",
    "\r\n.\r\n",
    "\r",
    ".",
    "..",
    "\n.\r\nMAIL FROM:<evil@example.net>\r\nRCPT TO:<victim@example.org>\r\nDATA\r\n",
    "\x00",
]

body_text = st.lists(
    st.sampled_from(TRICKY) | st.text(st.characters(exclude_categories=["Cs"]), max_size=30),
    max_size=12,
).map("".join)

wire_bytes = st.lists(
    st.sampled_from([t.encode() for t in TRICKY]) | st.binary(max_size=30), max_size=12
).map(b"".join)

SMUGGLING = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.fixture(scope="module")
def shared_sink() -> Iterator[SMTPSink]:
    """One sink for all hypothesis examples (function-scoped fixtures don't mix with @given)."""
    with SMTPSink() as sink:
        yield sink


def _one_new_message(sink: SMTPSink, before: int, commands_before: int) -> bytes:
    messages = sink.messages
    assert len(messages) == before + 1, "the content became more (or less) than one message"
    assert sink.rejected == []
    verbs = [c.split(" ", 1)[0].split(":", 1)[0].upper() for c in sink.commands[commands_before:]]
    assert verbs == ["EHLO", "MAIL", "RCPT", "DATA", "QUIT"]  # nothing smuggled in as commands
    return messages[-1].data


@SMUGGLING
@given(body=body_text)
def test_any_text_body_arrives_as_one_message(shared_sink: SMTPSink, body: str) -> None:
    before, commands_before = len(shared_sink.messages), len(shared_sink.commands)
    with Notifier(config_for(shared_sink)) as notifier:
        notifier.send(note(subject="smuggling", text=body))
    _one_new_message(shared_sink, before, commands_before)
    part = shared_sink.messages[-1].message.get_body(("plain",))
    assert part is not None
    assert part.get_content() == LINE_BREAK.sub("\r\n", body)


def _normalised(data: bytes) -> bytes:
    data = re.sub(rb"\r\n|\r|\n", b"\r\n", data)
    return data if not data or data.endswith(b"\r\n") else data + b"\r\n"


@SMUGGLING
@given(data=wire_bytes)
def test_any_content_bytes_arrive_as_one_message(shared_sink: SMTPSink, data: bytes) -> None:
    """Below the message layer: whatever bytes the session is handed for DATA, the
    server un-stuffs exactly them (line endings made CRLF) and nothing more."""
    before, commands_before = len(shared_sink.messages), len(shared_sink.commands)
    prepared = PreparedMessage(
        sender="noreply@example.com",
        recipients=("ops@example.com",),
        message_id="<smuggling@example.com>",
        data=data,
    )
    with Notifier(config_for(shared_sink)) as notifier:
        notifier.send_prepared(prepared)
    assert _one_new_message(shared_sink, before, commands_before) == _normalised(data)


def _unstuff(wire: bytes) -> bytes:
    assert wire.endswith(b".\r\n")
    body = wire[: -len(b".\r\n")]
    lines = body.split(b"\r\n")
    assert lines[-1] == b""
    return b"".join((line[1:] if line.startswith(b".") else line) + b"\r\n" for line in lines[:-1])


@settings(max_examples=500, deadline=None)
@given(data=wire_bytes)
def test_dot_stuff_properties(data: bytes) -> None:
    wire = dot_stuff(data)
    # Exactly one end-of-data marker, at the very end.
    assert wire == b".\r\n" or wire.endswith(b"\r\n.\r\n")
    assert b"\r\n.\r\n" not in wire[:-3]
    assert not wire.startswith(b".\r\n") or wire == b".\r\n"
    # No bare CR or LF that a lenient server could take for a line end.
    assert re.search(rb"\r(?!\n)|(?<!\r)\n", wire) is None
    assert _unstuff(wire) == _normalised(data)


@pytest.mark.parametrize(
    ("data", "wire"),
    [
        (b"", b".\r\n"),
        (b".", b"..\r\n.\r\n"),
        (b"a\n.\nb", b"a\r\n..\r\nb\r\n.\r\n"),
        (b"a\r.\r\nb\r\n", b"a\r\n..\r\nb\r\n.\r\n"),
        (b"..x\r\n", b"...x\r\n.\r\n"),
        (b"x\r\n", b"x\r\n.\r\n"),
    ],
)
def test_dot_stuff_examples(data: bytes, wire: bytes) -> None:
    assert dot_stuff(data) == wire


# ---------------------------------------------------------------------------
# Replies that are not SMTP, and cleanup that goes wrong after a refusal
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("stage", "phase"),
    [("GREETING", "connect"), ("EHLO", "connect"), ("MAIL", "send"), ("DATA_END", "send")],
)
def test_a_reply_that_is_not_smtp_is_a_transient_connection_error(
    scripted: Scripted, stage: str, phase: str
) -> None:
    """An HTTP server on the SMTP port (or a broken one) is no permanent refusal
    of the message: the connection is given up, and the outbox may retry."""
    server = scripted(Script(on={stage: Raw(b"HTTP/1.1 400 Bad Request\r\n\r\n")}))
    error = send_error(config_for(server, timeout=5))
    assert type(error) is ConnectError, repr(error)
    assert error.transient and error.phase == phase
    assert error.ambiguous is (stage == "DATA_END")
    assert "malformed" in str(error)
    [connection] = server.wait_closed()
    assert "RSET" not in connection.verbs and "QUIT" not in connection.verbs


@pytest.mark.parametrize(
    "cleanup",
    [
        pytest.param({"RSET": Stall()}, id="RSET-stalls"),
        pytest.param({"RSET": Drop()}, id="RSET-drop"),
        pytest.param({"RSET": Reply(421, "4.3.2 bye")}, id="RSET-421"),
    ],
)
def test_a_refusal_is_reported_even_if_the_cleanup_fails(
    scripted: Scripted, cleanup: dict[str, Any]
) -> None:
    """MAIL refused with 550: that is the error, whatever RSET then does; the
    connection is given up when RSET did not work."""
    server = scripted(Script(on={"MAIL": Reply(550, "5.7.1 sender refused"), **cleanup}))
    error = send_error(config_for(server, timeout=1))
    assert type(error) is PermanentError, repr(error)
    assert (error.code, error.command, error.transient) == (550, "MAIL", False)
    [connection] = server.wait_closed()
    assert connection.verbs[-1] == "RSET"  # no QUIT on a connection whose RSET failed


@pytest.mark.parametrize(
    "after_dot",
    [
        pytest.param(Stall(), id="stall"),
        pytest.param(Drop(), id="drop"),
        pytest.param(Reply(421, "4.3.2 bye"), id="421"),
    ],
)
def test_rfc2920_refusal_survives_a_failing_empty_content(
    scripted: Scripted, after_dot: Any
) -> None:
    """Pipelined, MAIL refused, DATA 354 anyway: the "." that ends the empty content
    gets no proper answer.  The error is still the MAIL refusal."""
    server = scripted(
        Script(
            ehlo_extensions=("PIPELINING",),
            on={"MAIL": Reply(550, "5.7.1 sender refused"), "DATA_END": after_dot},
        )
    )
    error = send_error(config_for(server, timeout=1))
    assert type(error) is PermanentError, repr(error)
    assert (error.code, error.command) == (550, "MAIL")
    [connection] = server.wait_closed()
    assert "RSET" not in connection.verbs and "QUIT" not in connection.verbs
