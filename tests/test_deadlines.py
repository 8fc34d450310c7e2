"""The two phase deadlines of SPEC §2, against real sockets and real time.

Every misbehaving server here is the scripted server of ``scripted_server.py``
on 127.0.0.1: it trickles a reply one byte every 0.1 s (a reply of 80+ bytes,
so about 8 s: far beyond the 1 s deadline), sends ``250-`` continuation lines
forever, or sends part of a reply and stalls.  Every deadline is 1 s (the
``MailConfig`` minimum) so the file stays fast; the bound asserted is the
spec's: the call ends no sooner than the deadline and less than 0.25 s after.
"""

from __future__ import annotations

import smtplib
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from _helpers import config_for, note, pinned_ca
from scripted_server import (
    SLOW_SERVER_HELLO,
    Default,
    Delay,
    EndlessContinuation,
    PerOccurrence,
    Raw,
    Reply,
    Script,
    ScriptedServer,
    Stall,
    Trickle,
)
from smtpnotify import (
    ConnectError,
    ConnectTimeout,
    MailConfig,
    Notifier,
    SendResult,
    SendTimeout,
    SMTPNotifyError,
)
from smtpnotify._deadline import Deadline, DeadlineExceeded, call_with_deadline
from smtpnotify.testing import CertificateBundle

DEADLINE = 1.0
OVERSHOOT = 0.25  # SPEC §2: "Overshoot stays under 0.25 s"

Scripted = Callable[..., ScriptedServer]

pytestmark = pytest.mark.slow


def misbehaviour(kind: str, code: int) -> Any:
    """A reply of ``code`` that never completes in time, in one of three ways."""
    if kind == "trickle":  # 86 bytes at one per 0.1 s: about 8.6 s for the whole reply
        return Trickle(Reply(code, "x" * 80), interval=0.1)
    if kind == "endless":  # "250-x" lines forever (100 a second: under the line-count limit)
        return EndlessContinuation(code=code, interval=0.01)
    assert kind == "stall"  # 0.4 s of silence, a first line and half of the last, then nothing
    # (a per-operation timeout would wait 1 s after the half line: 1.4 s in all)
    return [Delay(0.4), Raw(f"{code}-first line\r\n{code} half of a li".encode()), Stall()]


KINDS = ("trickle", "endless", "stall")


def assert_within_deadline(elapsed: float, deadline: float = DEADLINE) -> None:
    assert deadline <= elapsed < deadline + OVERSHOOT, (
        f"{elapsed:.3f} s for a {deadline} s deadline"
    )


def connect_attempt(config: MailConfig) -> tuple[SMTPNotifyError, float]:
    """``Notifier.send`` that must fail in the connect phase: the error and the time it took."""
    with Notifier(config) as notifier:
        message = note()
        start = time.monotonic()
        with pytest.raises(SMTPNotifyError) as info:
            notifier.send(message)
        elapsed = time.monotonic() - start
    return info.value, elapsed


def send_attempt(config: MailConfig) -> tuple[SMTPNotifyError, float]:
    """Connect (must work), then time only the send phase, which must fail."""
    with Notifier(config) as notifier:
        prepared = notifier.prepare(note())
        session = notifier._session()
        session.open()
        try:
            start = time.monotonic()
            with pytest.raises(SMTPNotifyError) as info:
                session.send(prepared)
            elapsed = time.monotonic() - start
            # A timed-out connection is discarded at once, never reused.
            assert not session.usable
            with pytest.raises(ConnectError):
                session.send(prepared)
        finally:
            session.close()
    return info.value, elapsed


def assert_connect_timeout(error: SMTPNotifyError, elapsed: float) -> None:
    assert type(error) is ConnectTimeout, repr(error)
    assert isinstance(error, TimeoutError)
    assert error.phase == "connect"
    assert error.transient
    assert error.ambiguous is False
    assert_within_deadline(elapsed)


# ---------------------------------------------------------------------------
# Connect phase: greeting, EHLO, STARTTLS, TLS handshake, second EHLO, AUTH
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_greeting(scripted: Scripted, kind: str) -> None:
    server = scripted(Script(greeting=misbehaviour(kind, 220)))
    error, elapsed = connect_attempt(config_for(server, timeout=DEADLINE))
    assert_connect_timeout(error, elapsed)
    assert server.received.commands == []


@pytest.mark.parametrize("kind", KINDS)
def test_ehlo(scripted: Scripted, kind: str) -> None:
    server = scripted(Script(on={"EHLO": misbehaviour(kind, 250)}))
    error, elapsed = connect_attempt(config_for(server, timeout=DEADLINE))
    assert_connect_timeout(error, elapsed)
    assert server.received.verbs == ["EHLO"]


@pytest.mark.parametrize("kind", KINDS)
def test_starttls_reply(scripted: Scripted, certs: CertificateBundle, kind: str) -> None:
    server = scripted(
        Script(ehlo_extensions=("STARTTLS",), on={"STARTTLS": misbehaviour(kind, 220)}),
        cert="localhost",
    )
    config = config_for(server, tls="starttls", timeout=DEADLINE, **pinned_ca(certs))
    error, elapsed = connect_attempt(config)
    assert_connect_timeout(error, elapsed)
    assert server.received.verbs == ["EHLO", "STARTTLS"]


TLS_STALLS = {
    "trickle": Trickle(SLOW_SERVER_HELLO, interval=0.1, forever=True),
    "stall": Stall(),
}


@pytest.mark.parametrize("kind", sorted(TLS_STALLS))
def test_implicit_tls_handshake(scripted: Scripted, certs: CertificateBundle, kind: str) -> None:
    server = scripted(Script(on={"TLS": TLS_STALLS[kind]}), tls="ssl")
    config = config_for(server, tls="ssl", timeout=DEADLINE, **pinned_ca(certs))
    error, elapsed = connect_attempt(config)
    assert_connect_timeout(error, elapsed)
    assert server.received.commands == []


@pytest.mark.parametrize("kind", sorted(TLS_STALLS))
def test_tls_handshake_after_starttls(
    scripted: Scripted, certs: CertificateBundle, kind: str
) -> None:
    # The greeting comes 0.4 s late: the handshake gets only what is left of the phase.
    script = Script(
        greeting=[Delay(0.4), Default()],
        ehlo_extensions=("STARTTLS",),
        on={"TLS": TLS_STALLS[kind]},
    )
    server = scripted(script, cert="localhost")
    config = config_for(server, tls="starttls", timeout=DEADLINE, **pinned_ca(certs))
    error, elapsed = connect_attempt(config)
    assert_connect_timeout(error, elapsed)
    assert server.received.verbs == ["EHLO", "STARTTLS"]


@pytest.mark.parametrize("kind", KINDS)
def test_second_ehlo_after_starttls(
    scripted: Scripted, certs: CertificateBundle, kind: str
) -> None:
    server = scripted(
        Script(
            ehlo_extensions=("STARTTLS",),
            on={"EHLO": PerOccurrence(Default(), misbehaviour(kind, 250))},
        ),
        cert="localhost",
    )
    config = config_for(server, tls="starttls", timeout=DEADLINE, **pinned_ca(certs))
    error, elapsed = connect_attempt(config)
    assert_connect_timeout(error, elapsed)
    assert server.received.verbs == ["EHLO", "STARTTLS", "EHLO"]
    assert server.received.connections[0].tls  # the first EHLO was answered, TLS came up


@pytest.mark.parametrize("kind", KINDS)
def test_auth(scripted: Scripted, kind: str) -> None:
    server = scripted(
        Script(ehlo_extensions=("AUTH PLAIN LOGIN",), on={"AUTH": misbehaviour(kind, 235)})
    )
    config = config_for(server, timeout=DEADLINE, username="alice", password="s3cret-pw")
    error, elapsed = connect_attempt(config)
    assert_connect_timeout(error, elapsed)
    assert server.received.verbs == ["EHLO", "AUTH"]
    assert "s3cret-pw" not in str(error)


# ---------------------------------------------------------------------------
# Send phase: MAIL, RCPT, DATA (354), the final reply after "."
# ---------------------------------------------------------------------------


SEND_STAGES = {"MAIL": 250, "RCPT": 250, "DATA": 354, "DATA_END": 250}


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("stage", list(SEND_STAGES))
def test_send_phase(scripted: Scripted, stage: str, kind: str) -> None:
    server = scripted(Script(on={stage: misbehaviour(kind, SEND_STAGES[stage])}))
    error, elapsed = send_attempt(config_for(server, timeout=DEADLINE))
    assert type(error) is SendTimeout, repr(error)
    assert isinstance(error, TimeoutError)
    assert error.phase == "send"
    assert error.transient
    assert_within_deadline(elapsed)
    # Only after the final "." may the server have accepted the message.
    assert error.ambiguous is (stage == "DATA_END")
    assert len(server.received.messages) == (1 if stage == "DATA_END" else 0)
    server.wait_closed()
    assert "QUIT" not in server.received.verbs  # discarded, not politely reused


def test_notifier_send_takes_at_most_connect_plus_send(scripted: Scripted) -> None:
    """Through the public call: a slow greeting (0.6 s) and a final reply that never comes."""
    server = scripted(
        Script(greeting=[Delay(0.6), Default()], on={"DATA_END": misbehaviour("trickle", 250)})
    )
    with Notifier(config_for(server, timeout=DEADLINE)) as notifier:
        start = time.monotonic()
        with pytest.raises(SendTimeout) as info:
            notifier.send(note())
        elapsed = time.monotonic() - start
    assert info.value.ambiguous
    assert 0.6 + DEADLINE <= elapsed < 2 * DEADLINE + OVERSHOOT


# ---------------------------------------------------------------------------
# Why the deadline exists
# ---------------------------------------------------------------------------


def test_plain_smtplib_timeout_does_not_bound_a_trickling_server(scripted: Scripted) -> None:
    """smtplib's ``timeout=1`` bounds each recv, so one byte every 0.1 s never trips it.

    The trickled greeting is 34 bytes: smtplib waits for all of it (about 3.4 s),
    smtpnotify gives up at its 1 s deadline.
    """
    greeting = Trickle(Reply(220, "slow.example ESMTP " + "." * 10), interval=0.1)
    server = scripted(Script(greeting=greeting))
    start = time.monotonic()
    with smtplib.SMTP(server.host, server.port, timeout=1) as client:
        plain = time.monotonic() - start
        assert client.noop()[0] == 250
    assert plain > 2.5  # 1 s was the timeout it was given

    error, elapsed = connect_attempt(config_for(server, timeout=DEADLINE))
    assert_connect_timeout(error, elapsed)


# ---------------------------------------------------------------------------
# The phases are independent; the send deadline is per message
# ---------------------------------------------------------------------------


def test_send_phase_gets_its_own_timeout(scripted: Scripted) -> None:
    """MAIL answered after 2 s: more than connect_timeout, within send_timeout."""
    server = scripted(Script(on={"MAIL": [Delay(2.0), Default()]}))
    config = config_for(server, connect_timeout=1, send_timeout=3)
    with Notifier(config) as notifier:
        start = time.monotonic()
        result = notifier.send(note())
        elapsed = time.monotonic() - start
    assert isinstance(result, SendResult)
    assert result.accepted == ("ops@example.com",)
    assert len(server.received.messages) == 1
    assert elapsed >= 2.0  # the scenario really happened


def test_each_phase_under_its_deadline_succeeds_though_the_sum_is_over(scripted: Scripted) -> None:
    """0.7 s to connect plus 0.7 s to send: 1.4 s in all, each phase under its 1 s."""
    late = [Delay(0.7), Default()]
    server = scripted(Script(greeting=late, on={"MAIL": late}))
    with Notifier(config_for(server, timeout=DEADLINE)) as notifier:
        start = time.monotonic()
        result = notifier.send(note())
        elapsed = time.monotonic() - start
    assert result.accepted == ("ops@example.com",)
    assert len(server.received.messages) == 1
    assert elapsed > DEADLINE  # the total passed one deadline and that was fine


def test_send_many_deadline_is_per_message(scripted: Scripted) -> None:
    """Three messages of 0.6 s each on one connection with a 1 s send deadline."""
    server = scripted(Script(on={"MAIL": [Delay(0.6), Default()]}))
    with Notifier(config_for(server, timeout=DEADLINE)) as notifier:
        start = time.monotonic()
        results = notifier.send_many([note(subject=f"n{i}") for i in range(3)])
        elapsed = time.monotonic() - start
    assert all(isinstance(r, SendResult) for r in results), results
    assert len(server.received.messages) == 3
    assert server.connection_count == 1
    assert elapsed > 1.8


def test_a_timed_out_connection_is_never_reused(scripted: Scripted) -> None:
    """send_many: the 2nd message stalls at MAIL; the 3rd goes over a new connection."""
    server = scripted(
        [
            Script(on={"MAIL": PerOccurrence(Default(), Stall())}),
            Script(),
        ]
    )
    with Notifier(config_for(server, timeout=DEADLINE)) as notifier:
        results = notifier.send_many([note(subject=f"n{i}") for i in range(3)])
    first, second, third = results
    assert isinstance(first, SendResult)
    assert isinstance(second, SendTimeout) and not second.ambiguous
    assert isinstance(third, SendResult)
    connections = server.wait_closed()
    assert len(connections) == 2
    one, two = connections
    assert len(one.messages) == 1 and len(two.messages) == 1
    assert one.verbs == ["EHLO", "MAIL", "RCPT", "DATA", "MAIL"]
    # Nothing more was written on the timed-out connection: no RSET, no QUIT.
    tail = bytes(one.raw).split(b"\r\n.\r\n", 1)[1]
    assert tail.startswith(b"MAIL FROM:") and b"RSET" not in tail and b"QUIT" not in tail
    assert one.closed_by == "client"
    assert two.verbs == ["EHLO", "MAIL", "RCPT", "DATA", "QUIT"]


# ---------------------------------------------------------------------------
# DNS resolution counts against the connect deadline
# ---------------------------------------------------------------------------


def test_call_with_deadline_stops_waiting_for_a_blocked_call() -> None:
    release = threading.Event()
    try:
        deadline = Deadline(DEADLINE)
        start = time.monotonic()
        with pytest.raises(DeadlineExceeded):
            call_with_deadline(release.wait, deadline=deadline)
        assert_within_deadline(time.monotonic() - start)
    finally:
        release.set()  # let the abandoned helper thread end


def test_call_with_deadline_returns_the_value_or_raises_the_error() -> None:
    assert call_with_deadline(lambda a, b: a + b, 2, 3, deadline=Deadline(5)) == 5

    def fail() -> None:
        raise socket.gaierror(socket.EAI_NONAME, "no such host")

    with pytest.raises(socket.gaierror):
        call_with_deadline(fail, deadline=Deadline(5))


SLOW_HOST = "mail.slow-dns.test"


@pytest.fixture
def slow_resolver(monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, Any]]:
    """``socket.getaddrinfo`` made slow for :data:`SLOW_HOST`.

    A mock, because no real peer can produce the case on a machine whose tests may
    only reach loopback: there is no resolver here we could make slow.  The
    resolver sleeps ``delay`` seconds (5 by default; the test's end cuts it short)
    and then resolves the name to 127.0.0.1.
    """
    real = socket.getaddrinfo
    release = threading.Event()
    settings: dict[str, Any] = {"delay": 5.0, "calls": 0}

    def getaddrinfo(host: Any, port: Any, *args: Any, **kwargs: Any) -> Any:
        if host != SLOW_HOST:
            return real(host, port, *args, **kwargs)
        settings["calls"] += 1
        release.wait(settings["delay"])
        return real("127.0.0.1", port, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    try:
        yield settings
    finally:
        release.set()


def test_a_resolver_that_never_answers_is_cut_off(slow_resolver: dict[str, Any]) -> None:
    config = MailConfig(host=SLOW_HOST, port=25, sender="noreply@example.com", timeout=DEADLINE)
    error, elapsed = connect_attempt(config)
    assert_connect_timeout(error, elapsed)
    assert slow_resolver["calls"] == 1


@pytest.mark.parametrize(("greeting_delay", "times_out"), [(0.0, False), (0.6, True)])
def test_resolution_time_is_part_of_the_connect_phase(
    scripted: Scripted, slow_resolver: dict[str, Any], greeting_delay: float, times_out: bool
) -> None:
    """0.6 s of DNS works alone; with a greeting 0.6 s late the 1 s deadline passes."""
    slow_resolver["delay"] = 0.6
    server = scripted(Script(greeting=[Delay(greeting_delay), Default()]))
    config = MailConfig(
        host=SLOW_HOST, port=server.port, sender="noreply@example.com", timeout=DEADLINE
    )
    if not times_out:
        with Notifier(config) as notifier:
            assert notifier.send(note()).accepted == ("ops@example.com",)
        assert len(server.received.messages) == 1
        return
    error, elapsed = connect_attempt(config)
    assert_connect_timeout(error, elapsed)
    assert server.received.messages == []


def test_a_stalled_quit_does_not_stretch_send_past_its_deadlines(scripted: Scripted) -> None:
    """QUIT is a courtesy: it gets what is left of the send deadline, no more."""
    server = scripted(Script(on={"DATA_END": [Delay(0.6), Default()], "QUIT": Stall()}))
    with Notifier(config_for(server, timeout=DEADLINE)) as notifier:
        start = time.monotonic()
        result = notifier.send(note())
        elapsed = time.monotonic() - start
    assert result.accepted == ("ops@example.com",)
    assert elapsed < 2 * DEADLINE  # connect (instant here) + send: the QUIT may not add 1 s more
    assert elapsed < DEADLINE + OVERSHOOT
