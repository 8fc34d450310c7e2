"""The test servers themselves: SMTPSink, the certificates, ScriptedServer.

Plain smtplib / ssl / socket clients only, so a bug here cannot hide behind a
bug in smtpnotify.
"""

from __future__ import annotations

import gc
import smtplib
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from scripted_server import (
    SLOW_SERVER_HELLO,
    Default,
    Delay,
    Drop,
    EndlessContinuation,
    PerOccurrence,
    Raw,
    Reply,
    Script,
    ScriptedServer,
    Stall,
    Trickle,
)
from smtpnotify.testing import (
    CertificateBundle,
    ServerCertKind,
    SinkMessage,
    SMTPSink,
    make_certificates,
)

Scripted = Callable[..., ScriptedServer]
MakeSink = Callable[..., SMTPSink]

CONTENT = (
    b"From: a@example.com\r\n"
    b"To: b@example.com\r\n"
    b"Subject: =?utf-8?q?caf=C3=A9?=\r\n"
    b"\r\n"
    b".leading dot\r\n"
    b"..two dots\r\n"
    b".\r\n"  # a lone dot line inside the content
    b"caf\xc3\xa9 8-bit line \r\n"
    b"\r\n"
)


def client(host: str, port: int) -> smtplib.SMTP:
    return smtplib.SMTP(host, port, local_hostname="client.test", timeout=5)


def raw_connect(server: ScriptedServer, timeout: float = 5.0) -> socket.socket:
    return socket.create_connection(server.address, timeout=timeout)


def read_reply(sock: socket.socket) -> bytes:
    """Read one complete (possibly multi-line) SMTP reply."""
    data = b""
    while True:
        chunk = sock.recv(4096)
        if not chunk:
            return data
        data += chunk
        lines = data.split(b"\r\n")
        if len(lines) > 1 and any(len(line) >= 4 and line[3:4] == b" " for line in lines[:-1]):
            return data


@pytest.fixture(autouse=True)
def no_leaked_threads() -> Iterator[None]:
    before = set(threading.enumerate())
    yield
    gc.collect()  # surfaces unclosed-socket/transport ResourceWarnings in this test
    leaked = [t for t in threading.enumerate() if t not in before and t.is_alive()]
    assert not leaked, leaked


# ------------------------------------------------------------------------------- SMTPSink


def test_testing_exports() -> None:
    import smtpnotify.testing as testing

    assert testing.__all__ == sorted(testing.__all__)
    assert all(hasattr(testing, name) for name in testing.__all__)


def test_sink_receives_content_byte_exact(sink: SMTPSink) -> None:
    assert sink.port != 0
    with client(sink.host, sink.port) as smtp:
        smtp.sendmail("a@example.com", ["b@example.com", "c@example.com"], CONTENT)
    [message] = sink.wait_for(1)
    assert message.data == CONTENT
    assert message.mail_from == "a@example.com"
    assert message.rcpt_tos == ("b@example.com", "c@example.com")
    assert message.message["Subject"] == "café"
    assert message.connection == 1
    assert message.tls is False
    assert message.authenticated_user is None
    assert message.reply == (250, "OK")
    assert sink.rejected == []


def test_sink_logs_every_command_and_hides_its_probe(sink: SMTPSink) -> None:
    with client(sink.host, sink.port) as smtp:
        smtp.ehlo()
        smtp.docmd("NOOP")
        smtp.docmd("XBOGUS", "arg")
        smtp.sendmail("a@example.com", ["b@example.com"], b"Subject: x\r\n\r\nhi\r\n")
    sink.wait_until(lambda: all(c.closed for c in sink.connections) and bool(sink.connections))
    assert sink.verbs == ["EHLO", "NOOP", "XBOGUS", "MAIL", "RCPT", "DATA", "QUIT"]
    assert sink.commands[0] == "ehlo client.test"
    assert sink.commands[2] == "XBOGUS arg"
    [conn] = sink.connections
    assert conn.number == 1
    assert conn.commands == sink.commands
    assert conn.peer[0] == "127.0.0.1"


def test_sink_counts_connections_and_reused_connections(sink: SMTPSink) -> None:
    with client(sink.host, sink.port) as smtp:
        smtp.sendmail("a@example.com", ["b@example.com"], b"Subject: 1\r\n\r\n1\r\n")
        smtp.sendmail("a@example.com", ["b@example.com"], b"Subject: 2\r\n\r\n2\r\n")
    with client(sink.host, sink.port) as smtp:
        smtp.sendmail("a@example.com", ["b@example.com"], b"Subject: 3\r\n\r\n3\r\n")
    messages = sink.wait_for(3)
    assert [m.connection for m in messages] == [1, 1, 2]
    sink.reset()
    assert sink.messages == [] and sink.commands == [] and sink.connections == []


def test_two_sinks_get_their_own_ports(make_sink: MakeSink) -> None:
    first, second = make_sink(), make_sink()
    assert first.port != second.port
    assert 0 not in (first.port, second.port)


def test_sink_wait_for_times_out(sink: SMTPSink) -> None:
    with pytest.raises(TimeoutError):
        sink.wait_for(1, timeout=0.05)


def test_sink_auth_plain_and_login(make_sink: MakeSink) -> None:
    sink = make_sink(auth={"alice": "s3cret"}, auth_required=True)
    with client(sink.host, sink.port) as smtp:
        smtp.ehlo()
        assert smtp.has_extn("auth")
        code, _ = smtp.mail("a@example.com")
        assert code == 530
        with pytest.raises(smtplib.SMTPAuthenticationError) as refused:
            smtp.login("alice", "wrong")
        assert refused.value.smtp_code == 535
        smtp.login("alice", "s3cret")  # PLAIN first
        smtp.sendmail("a@example.com", ["b@example.com"], b"Subject: x\r\n\r\nhi\r\n")
    with client(sink.host, sink.port) as smtp:
        smtp.ehlo()
        smtp.user, smtp.password = "alice", "s3cret"
        smtp.auth("LOGIN", smtp.auth_login)
        smtp.sendmail("a@example.com", ["b@example.com"], b"Subject: y\r\n\r\nhi\r\n")
    messages = sink.wait_for(2)
    assert [m.authenticated_user for m in messages] == ["alice", "alice"]
    # smtplib's login() tries PLAIN, then LOGIN; answers to 334 challenges are no commands
    assert [line for line in sink.commands if line.startswith("AUTH")] == [
        "AUTH PLAIN ***",
        "AUTH LOGIN ***",
        "AUTH PLAIN ***",
        "AUTH LOGIN ***",
    ]
    assert not any("czNjcmV0" in line for line in sink.commands)


def test_sink_without_auth_neither_advertises_nor_accepts_it(sink: SMTPSink) -> None:
    with client(sink.host, sink.port) as smtp:
        smtp.ehlo()
        assert not smtp.has_extn("auth")
        assert smtp.docmd("AUTH", "PLAIN AGFAAGI=")[0] == 502


def test_sink_pipelining_and_smtputf8_switches(make_sink: MakeSink) -> None:
    default, switched = make_sink(), make_sink(pipelining=True, smtputf8=False)
    with client(default.host, default.port) as smtp:
        smtp.ehlo()
        assert smtp.has_extn("smtputf8") and not smtp.has_extn("pipelining")
    with client(switched.host, switched.port) as smtp:
        smtp.ehlo()
        assert smtp.has_extn("pipelining") and not smtp.has_extn("smtputf8")


def test_sink_accepts_pipelined_commands_in_order(make_sink: MakeSink) -> None:
    sink = make_sink(pipelining=True)
    with socket.create_connection(sink.address, timeout=5) as sock:
        read_reply(sock)
        sock.sendall(b"EHLO client.test\r\n")
        read_reply(sock)
        sock.sendall(b"MAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.com>\r\nDATA\r\n")
        received = b""
        while received.count(b"\r\n") < 3:
            received += sock.recv(4096)
        assert [line[:3] for line in received.split(b"\r\n")[:3]] == [b"250", b"250", b"354"]
        sock.sendall(b"Subject: p\r\n\r\nbody\r\n.\r\nQUIT\r\n")
        assert read_reply(sock).startswith(b"250")
    assert sink.wait_for(1)[0].data == b"Subject: p\r\n\r\nbody\r\n"


def test_sink_injected_replies_take_no_effect_and_can_change(make_sink: MakeSink) -> None:
    sink = make_sink(
        replies={
            "MAIL": (451, "4.3.0 try later"),
            "RCPT": {"Bad@Example.com": (550, "5.1.1 no such user")},
        }
    )
    with client(sink.host, sink.port) as smtp:
        with pytest.raises(smtplib.SMTPSenderRefused) as sender:
            smtp.sendmail("a@example.com", ["b@example.com"], b"Subject: x\r\n\r\nx\r\n")
        assert sender.value.smtp_code == 451
        del sink.replies["MAIL"]  # the server recovers
        smtp.rset()
        refused = smtp.sendmail(
            "a@example.com", ["bad@example.com", "ok@example.com"], b"Subject: x\r\n\r\nx\r\n"
        )
        assert refused == {"bad@example.com": (550, b"5.1.1 no such user")}
    [message] = sink.wait_for(1)
    assert message.rcpt_tos == ("ok@example.com",)


def test_sink_refuses_data_and_final_reply(make_sink: MakeSink) -> None:
    refuse_data = make_sink(replies={"DATA": (554, "5.5.1 no thanks")})
    with client(refuse_data.host, refuse_data.port) as smtp:
        with pytest.raises(smtplib.SMTPDataError) as error:
            smtp.sendmail("a@example.com", ["b@example.com"], b"Subject: x\r\n\r\nx\r\n")
        assert error.value.smtp_code == 554
    assert refuse_data.messages == [] and refuse_data.rejected == []

    refuse_end = make_sink(replies={"DATA_END": (554, "5.6.0 content rejected")})
    with client(refuse_end.host, refuse_end.port) as smtp:
        with pytest.raises(smtplib.SMTPDataError) as error:
            smtp.sendmail("a@example.com", ["b@example.com"], b"Subject: x\r\n\r\nx\r\n")
        assert error.value.smtp_code == 554
    [rejected] = refuse_end.rejected
    assert rejected.data == b"Subject: x\r\n\r\nx\r\n"
    assert rejected.reply == (554, "5.6.0 content rejected")
    assert refuse_end.messages == []


def test_sink_421_closes_the_connection(make_sink: MakeSink) -> None:
    sink = make_sink(replies={"MAIL": (421, "4.3.2 shutting down")})
    with client(sink.host, sink.port) as smtp:
        smtp.ehlo()
        assert smtp.mail("a@example.com")[0] == 421
        with pytest.raises(smtplib.SMTPServerDisconnected):
            smtp.rcpt("b@example.com")
    sink.wait_until(lambda: sink.connections[0].closed)


def test_sink_drop_after_final_dot_is_recorded_without_reply(make_sink: MakeSink) -> None:
    sink = make_sink(drop_after={"DATA_END"})
    with client(sink.host, sink.port) as smtp, pytest.raises(smtplib.SMTPServerDisconnected):
        smtp.sendmail("a@example.com", ["b@example.com"], b"Subject: x\r\n\r\nx\r\n")
    [dropped] = sink.rejected
    assert dropped.reply is None
    assert dropped.data == b"Subject: x\r\n\r\nx\r\n"
    assert sink.messages == []


def test_sink_drop_after_a_command(make_sink: MakeSink) -> None:
    sink = make_sink(drop_after={"rcpt"})
    with client(sink.host, sink.port) as smtp:
        smtp.ehlo()
        smtp.mail("a@example.com")
        with pytest.raises(smtplib.SMTPServerDisconnected):
            smtp.rcpt("b@example.com")
    assert sink.verbs[-1] == "RCPT"


def test_sink_starttls_verifies_with_the_test_ca(
    tls_sink: MakeSink, certs: CertificateBundle
) -> None:
    sink = tls_sink(require_starttls=True, auth={"u": "p"}, auth_require_tls=True)
    with smtplib.SMTP("localhost", sink.port, timeout=5) as smtp:
        smtp.ehlo()
        assert smtp.has_extn("starttls") and not smtp.has_extn("auth")
        assert smtp.mail("a@example.com")[0] == 530
        smtp.starttls(context=certs.client_context())
        smtp.ehlo()
        assert smtp.has_extn("auth") and not smtp.has_extn("starttls")
        smtp.login("u", "p")
        assert isinstance(smtp.sock, ssl.SSLSocket)
        peer = smtp.sock.getpeercert(binary_form=True)
        smtp.sendmail("a@example.com", ["b@example.com"], b"Subject: t\r\n\r\nx\r\n")
    [message] = sink.wait_for(1)
    assert message.tls is True and message.tls_version in {"TLSv1.2", "TLSv1.3"}
    assert message.authenticated_user == "u"
    assert "STARTTLS" in sink.verbs
    assert sink.verbs.index("STARTTLS") < sink.verbs.index("AUTH")
    assert sink.connections[0].tls is True
    assert peer is not None and peer == certs.der("localhost")


def test_sink_implicit_tls(tls_sink: MakeSink, certs: CertificateBundle) -> None:
    sink = tls_sink(tls="ssl")
    with smtplib.SMTP_SSL(
        "localhost", sink.port, timeout=5, context=certs.client_context()
    ) as smtp:
        smtp.sendmail("a@example.com", ["b@example.com"], b"Subject: s\r\n\r\nx\r\n")
    assert sink.wait_for(1)[0].tls is True
    # a client that does not trust the CA fails, and the sink keeps serving
    with pytest.raises(ssl.SSLCertVerificationError):
        smtplib.SMTP_SSL(
            "localhost", sink.port, timeout=5, context=certs.client_context("other_ca")
        )
    with smtplib.SMTP_SSL(
        "localhost", sink.port, timeout=5, context=certs.client_context()
    ) as smtp:
        assert smtp.noop()[0] == 250


def test_sink_closes_cleanly_with_clients_still_connected(
    certs: CertificateBundle,
) -> None:
    sinks = [
        SMTPSink(),
        SMTPSink(tls="starttls", ssl_context=certs.server_context()),
        SMTPSink(tls="ssl", ssl_context=certs.server_context()),
    ]
    clients: list[smtplib.SMTP] = []
    sockets: list[socket.socket] = []
    for sink in sinks:
        sink.start()
    try:
        plain = client(sinks[0].host, sinks[0].port)
        plain.ehlo()
        starttls = client(sinks[1].host, sinks[1].port)
        starttls.starttls(context=certs.client_context(check_hostname=False))
        implicit = smtplib.SMTP_SSL(
            sinks[2].host,
            sinks[2].port,
            timeout=5,
            context=certs.client_context(check_hostname=False),
        )
        implicit.docmd("DATA")  # no envelope: 503, but the session stays open
        clients += [plain, starttls, implicit]
        # connections stuck in a TLS handshake: implicit, and after STARTTLS
        no_hello = socket.create_connection(sinks[2].address, timeout=5)
        half_starttls = socket.create_connection(sinks[1].address, timeout=5)
        read_reply(half_starttls)
        half_starttls.sendall(b"EHLO c\r\n")
        read_reply(half_starttls)
        half_starttls.sendall(b"STARTTLS\r\n")
        assert read_reply(half_starttls).startswith(b"220")
        sockets = [no_hello, half_starttls]
    finally:
        for sink in sinks:
            sink.close()
            sink.close()  # idempotent
        for smtp in clients:
            smtp.close()
        for sock in sockets:
            sock.close()
    assert all(all(c.closed for c in sink.connections) for sink in sinks)


def test_sink_argument_checks() -> None:
    with pytest.raises(ValueError, match="ssl_context"):
        SMTPSink(tls="starttls")
    with pytest.raises(ValueError, match="require_starttls"):
        SMTPSink(require_starttls=True)
    with pytest.raises(ValueError, match="auth_required"):
        SMTPSink(auth_required=True)
    with pytest.raises(ValueError, match="verb"):
        SMTPSink(replies={"MAIL FROM": (250, "x")})
    with pytest.raises(ValueError, match="tuple"):
        SMTPSink(replies={"MAIL": {"a@example.com": (550, "no")}})
    with pytest.raises(ValueError, match="IP address"):
        SMTPSink(host="localhost")


def test_sink_on_message_callback(make_sink: MakeSink, caplog: pytest.LogCaptureFixture) -> None:
    seen: list[bytes] = []

    def callback(message: SinkMessage) -> None:
        seen.append(message.data)
        if len(seen) == 2:
            raise RuntimeError("callback bug")

    sink = make_sink(on_message=callback)
    with client(sink.host, sink.port) as smtp:
        smtp.sendmail("a@example.com", ["b@example.com"], b"Subject: 1\r\n\r\n1\r\n")
        smtp.sendmail("a@example.com", ["b@example.com"], b"Subject: 2\r\n\r\n2\r\n")
    assert len(sink.wait_for(2)) == 2  # a failing callback changes nothing
    assert seen == [b"Subject: 1\r\n\r\n1\r\n", b"Subject: 2\r\n\r\n2\r\n"]
    assert "on_message callback failed" in caplog.text


# --------------------------------------------------------------------------- certificates


def handshake(
    certs: CertificateBundle,
    kind: ServerCertKind,
    client_ctx: ssl.SSLContext,
    hostname: str = "localhost",
) -> bytes:
    """Handshake through a ScriptedServer presenting ``kind``; the leaf DER received."""
    with (
        ScriptedServer(tls="ssl", ssl_context=certs.server_context(kind)) as server,
        raw_connect(server) as sock,
        client_ctx.wrap_socket(sock, server_hostname=hostname) as tls,
    ):
        der = tls.getpeercert(binary_form=True)
        assert der is not None
        return der


@pytest.mark.parametrize("kind", ["localhost", "chained"])
def test_certificates_verify_against_the_ca(certs: CertificateBundle, kind: ServerCertKind) -> None:
    der = handshake(certs, kind, certs.client_context())
    assert der == certs.der(kind)


def test_certificate_fingerprint_matches_the_wire(certs: CertificateBundle) -> None:
    import hashlib

    der = handshake(certs, "localhost", certs.client_context())
    assert hashlib.sha256(der).hexdigest() == certs.leaf_sha256 == certs.sha256("localhost")
    assert len(certs.leaf_sha256) == 64
    assert ssl.DER_cert_to_PEM_cert(der).strip() == certs.leaf_pem.strip()


@pytest.mark.parametrize(
    ("kind", "reason"),
    [
        ("wrong_name", "Hostname mismatch"),
        ("other_ca", "unable to get local issuer certificate"),
        ("expired", "certificate has expired"),
        ("self_signed", "self-signed certificate"),
    ],
)
def test_bad_certificates_fail_verification(
    certs: CertificateBundle, kind: ServerCertKind, reason: str
) -> None:
    with pytest.raises(ssl.SSLCertVerificationError, match=reason):
        handshake(certs, kind, certs.client_context())


@pytest.mark.parametrize(
    ("kind", "anchor"), [("self_signed", "self_signed"), ("chained", "intermediate")]
)
def test_a_leaf_or_intermediate_can_be_the_only_trust_anchor(
    certs: CertificateBundle, kind: ServerCertKind, anchor: str
) -> None:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN
    ctx.load_verify_locations(
        cadata=certs.pem("self_signed") if anchor == "self_signed" else certs.intermediate_pem
    )
    assert handshake(certs, kind, ctx) == certs.der(kind)


def test_certificate_bundles_are_independent() -> None:
    first, second = make_certificates(), make_certificates()
    assert first.ca_pem != second.ca_pem
    assert first.leaf_sha256 != second.leaf_sha256
    assert "BEGIN CERTIFICATE" in first.chain_pem("chained")
    assert first.chain_pem("chained").count("BEGIN CERTIFICATE") == 2
    with pytest.raises(ValueError, match="unknown certificate kind"):
        first.pem("nope")  # type: ignore[arg-type]


# ------------------------------------------------------------------------------- scripted


def test_scripted_default_conversation(scripted: Scripted) -> None:
    server = scripted(Script(ehlo_extensions=("8BITMIME", "SIZE 1000")))
    with client(server.host, server.port) as smtp:
        smtp.ehlo()
        assert smtp.esmtp_features == {"8bitmime": "", "size": "1000"}
        smtp.sendmail("a@example.com", ["b@example.com"], CONTENT)
    [log] = server.wait_closed()
    assert server.received.messages == [CONTENT]
    assert log.verbs == ["EHLO", "MAIL", "RCPT", "DATA", "QUIT"]
    assert log.closed_by == "server"  # after QUIT
    assert b"\r\n...two dots\r\n" in log.raw  # raw is before un-stuffing
    assert log.partial_data is None


def test_scripted_trickle_sends_one_byte_at_a_time(scripted: Scripted) -> None:
    interval = 0.05
    greeting = Reply(220, "slow")
    server = scripted(Script(greeting=Trickle(greeting, interval=interval)))
    expected = greeting.to_bytes()
    with raw_connect(server) as sock:
        started = time.monotonic()
        chunks = [sock.recv(1024)]
        while b"".join(chunks) != expected:
            chunks.append(sock.recv(1024))
        elapsed = time.monotonic() - started
    assert len(chunks[0]) < len(expected)  # the start came before the rest existed
    assert len(chunks) > 2
    assert elapsed >= (len(expected) - 1) * interval * 0.9


def test_scripted_trickle_of_the_default_reply(scripted: Scripted) -> None:
    server = scripted(Script(ehlo_extensions=("PIPELINING",), on={"EHLO": Trickle(interval=0.001)}))
    with client(server.host, server.port) as smtp:
        assert smtp.ehlo() == (250, b"scripted.test\nPIPELINING")


def test_scripted_trickle_forever(scripted: Scripted) -> None:
    server = scripted(Script(on={"EHLO": Trickle(b"250-x\r\n", interval=0.001, forever=True)}))
    with raw_connect(server) as sock:
        read_reply(sock)
        sock.sendall(b"EHLO c\r\n")
        data = b""
        while data.count(b"\r\n") < 5:
            data += sock.recv(1024)
    assert data.startswith(b"250-x\r\n250-x\r\n250-x\r\n250-x\r\n250-x\r\n")


def test_scripted_endless_continuation_never_ends(scripted: Scripted) -> None:
    server = scripted(Script(on={"EHLO": EndlessContinuation(text="x", interval=0.001)}))
    with raw_connect(server) as sock:
        read_reply(sock)
        sock.sendall(b"EHLO c\r\n")
        data = b""
        while data.count(b"\r\n") < 50:
            data += sock.recv(4096)
    lines = data.split(b"\r\n")[:50]
    assert set(lines) == {b"250-x"}


def test_scripted_stall_never_replies_and_nothing_else_arrives(scripted: Scripted) -> None:
    server = scripted(Script(on={"EHLO": Stall()}))
    with raw_connect(server, timeout=0.2) as sock:
        read_reply(sock)
        sock.sendall(b"EHLO c\r\n")
        with pytest.raises(TimeoutError):
            sock.recv(1024)
    server.wait_closed()
    assert server.received.verbs == ["EHLO"]
    assert server.received.connections[0].closed_by == "client"


@pytest.mark.parametrize("rst", [False, True])
def test_scripted_drop_at_greeting(scripted: Scripted, rst: bool) -> None:
    server = scripted(Script(greeting=Drop(rst=rst)))
    if rst:
        # the reset can even beat connect() to its result
        with pytest.raises(ConnectionResetError), raw_connect(server) as sock:
            server.wait_closed()
            sock.recv(1024)
    else:
        with raw_connect(server) as sock:
            assert sock.recv(1024) == b""
    assert server.wait_closed()[0].closed_by == "server"


def test_scripted_drop_mid_data_keeps_the_partial_content(scripted: Scripted) -> None:
    server = scripted(Script(on={"DATA_CONTENT": Drop()}, mid_data_bytes=10))
    with raw_connect(server) as sock:
        read_reply(sock)
        sock.sendall(b"HELO c\r\n")
        read_reply(sock)
        sock.sendall(b"MAIL FROM:<a@x>\r\n")
        read_reply(sock)
        sock.sendall(b"RCPT TO:<b@x>\r\n")
        read_reply(sock)
        sock.sendall(b"DATA\r\n")
        assert read_reply(sock).startswith(b"354")
        sock.sendall(b"Subj")  # 4 bytes: below mid_data_bytes, nothing happens
        sock.sendall(b"ect: x\r\n")  # now 12 >= 10: the server drops
        assert sock.recv(1024) == b""
    [log] = server.wait_closed()
    assert log.partial_data == b"Subject: x\r\n"
    assert log.messages == []
    assert log.closed_by == "server"


def test_scripted_drop_after_final_dot_has_the_message(scripted: Scripted) -> None:
    server = scripted(Script(on={"DATA_END": Drop()}))
    with client(server.host, server.port) as smtp, pytest.raises(smtplib.SMTPServerDisconnected):
        smtp.sendmail("a@example.com", ["b@example.com"], b"Subject: x\r\n\r\nbody\r\n")
    assert server.wait_closed()[0].messages == [b"Subject: x\r\n\r\nbody\r\n"]


@pytest.mark.parametrize(
    ("stage", "error"),
    [
        ("MAIL", smtplib.SMTPSenderRefused),
        ("RCPT", smtplib.SMTPRecipientsRefused),
        ("DATA", smtplib.SMTPDataError),
        ("DATA_END", smtplib.SMTPDataError),
    ],
)
@pytest.mark.parametrize("code", [451, 452, 550, 554])
def test_scripted_reply_codes(
    scripted: Scripted, stage: str, error: type[smtplib.SMTPException], code: int
) -> None:
    server = scripted(Script(on={stage: Reply(code, "no")}))
    with client(server.host, server.port) as smtp, pytest.raises(error):
        smtp.sendmail("a@example.com", ["b@example.com"], b"Subject: x\r\n\r\nbody\r\n")
    received = server.received
    assert received.messages == ([b"Subject: x\r\n\r\nbody\r\n"] if stage == "DATA_END" else [])


def test_scripted_421_greeting_closes(scripted: Scripted) -> None:
    server = scripted(Script(greeting=Reply(421, "4.3.2 busy")))
    with pytest.raises(smtplib.SMTPConnectError) as error:
        client(server.host, server.port)
    assert error.value.smtp_code == 421
    assert server.wait_closed()[0].closed_by == "server"


def test_scripted_per_recipient_and_per_occurrence(scripted: Scripted) -> None:
    server = scripted(
        Script(
            on={
                "RCPT": {"BAD@example.com": Reply(550, "5.1.1 unknown")},
                "MAIL": PerOccurrence(Reply(451, "4.3.0 later"), Default()),
            }
        )
    )
    with client(server.host, server.port) as smtp:
        with pytest.raises(smtplib.SMTPSenderRefused):
            smtp.sendmail("a@example.com", ["b@example.com"], b"Subject: x\r\n\r\n1\r\n")
        smtp.rset()
        refused = smtp.sendmail(
            "a@example.com", ["bad@example.com", "ok@example.com"], b"Subject: x\r\n\r\n2\r\n"
        )
    assert refused == {"bad@example.com": (550, b"5.1.1 unknown")}
    assert server.received.messages == [b"Subject: x\r\n\r\n2\r\n"]


def test_scripted_scripts_per_connection(scripted: Scripted) -> None:
    server = scripted([Script(greeting=Reply(421, "busy")), Script()])
    with pytest.raises(smtplib.SMTPConnectError):
        client(server.host, server.port)
    for _ in range(2):  # the last script repeats
        with client(server.host, server.port) as smtp:
            assert smtp.noop()[0] == 250
    assert server.connection_count == 3


def test_scripted_delay_then_default(scripted: Scripted) -> None:
    server = scripted(Script(on={"NOOP": [Delay(0.1), Default()], "RSET": Raw(b"250 bare\n")}))
    with client(server.host, server.port) as smtp:
        started = time.monotonic()
        assert smtp.noop() == (250, b"2.0.0 OK")
        assert time.monotonic() - started >= 0.09
        assert smtp.rset() == (250, b"bare")


def test_scripted_starttls_upgrades_and_continues(
    scripted: Scripted, certs: CertificateBundle
) -> None:
    server = scripted(
        Script(ehlo_extensions=("STARTTLS", "AUTH PLAIN LOGIN"), credentials={"alice": "pw"}),
        cert="localhost",
    )
    with smtplib.SMTP("localhost", server.port, timeout=5) as smtp:
        smtp.ehlo()
        assert smtp.has_extn("starttls")
        smtp.starttls(context=certs.client_context())
        smtp.ehlo()
        assert not smtp.has_extn("starttls")
        with pytest.raises(smtplib.SMTPAuthenticationError):
            smtp.login("alice", "nope")
        smtp.user, smtp.password = "alice", "pw"
        smtp.auth("LOGIN", smtp.auth_login)
        smtp.sendmail("a@example.com", ["b@example.com"], b"Subject: x\r\n\r\nx\r\n")
    [log] = server.wait_closed()
    assert log.tls is True and log.tls_version in {"TLSv1.2", "TLSv1.3"}
    # smtplib's login() tries PLAIN, then LOGIN
    after_tls = ["AUTH", "AUTH", "AUTH", "MAIL", "RCPT", "DATA", "QUIT"]
    assert log.verbs == ["EHLO", "STARTTLS", "EHLO", *after_tls]
    assert [(a.mechanism, a.username, a.password) for a in log.auth] == [
        ("PLAIN", "alice", "nope"),
        ("LOGIN", "alice", "nope"),
        ("LOGIN", "alice", "pw"),
    ]
    assert "pw" not in repr(log.auth[-1])


def test_scripted_starttls_without_context_is_refused(scripted: Scripted) -> None:
    server = scripted(Script(ehlo_extensions=("STARTTLS",)))
    with client(server.host, server.port) as smtp:
        smtp.ehlo()
        assert smtp.docmd("STARTTLS") == (454, b"4.7.0 TLS not available")


def test_scripted_implicit_tls(scripted: Scripted, certs: CertificateBundle) -> None:
    server = scripted(tls="ssl")
    with smtplib.SMTP_SSL(
        "localhost", server.port, timeout=5, context=certs.client_context()
    ) as smtp:
        smtp.sendmail("a@example.com", ["b@example.com"], b"Subject: x\r\n\r\nx\r\n")
    [log] = server.wait_closed()
    assert log.tls is True
    assert log.messages == [b"Subject: x\r\n\r\nx\r\n"]


def test_scripted_records_a_rejected_certificate(
    scripted: Scripted, certs: CertificateBundle
) -> None:
    server = scripted(tls="ssl", cert="wrong_name")
    with pytest.raises(ssl.SSLCertVerificationError):
        smtplib.SMTP_SSL("localhost", server.port, timeout=5, context=certs.client_context())
    [log] = server.wait_closed()
    assert log.tls is False and log.tls_error is not None
    assert log.commands == []


def test_scripted_tls_stage_stall(scripted: Scripted, certs: CertificateBundle) -> None:
    server = scripted(Script(on={"TLS": Stall()}), tls="ssl")
    with raw_connect(server, timeout=0.2) as sock, pytest.raises(TimeoutError):
        certs.client_context().wrap_socket(sock, server_hostname="localhost")
    assert server.received.connections[0].tls is False


def test_scripted_slow_server_hello_keeps_a_handshake_busy(
    scripted: Scripted, certs: CertificateBundle
) -> None:
    interval = 0.02
    server = scripted(
        Script(on={"TLS": Trickle(SLOW_SERVER_HELLO, interval=interval, forever=True)}), tls="ssl"
    )
    with raw_connect(server) as sock:
        sock.setblocking(False)
        tls = certs.client_context().wrap_socket(
            sock, server_hostname="localhost", do_handshake_on_connect=False
        )
        with tls:
            wakeups = 0
            deadline = time.monotonic() + 20 * interval
            while time.monotonic() < deadline:
                try:
                    tls.do_handshake()
                except ssl.SSLWantReadError:
                    import select

                    if select.select([tls], [], [], 0.5)[0]:
                        wakeups += 1
                else:  # pragma: no cover - would be a broken script
                    pytest.fail("the handshake completed")
    assert wakeups >= 3  # bytes kept arriving, so a per-read timeout never fires


def test_scripted_close_stops_busy_connections_promptly() -> None:
    server = ScriptedServer(
        [
            Script(greeting=Trickle(b"2", interval=0.05, forever=True)),
            Script(on={"EHLO": EndlessContinuation(interval=0.01)}),
            Script(on={"DATA_CONTENT": Stall()}),
        ]
    ).start()
    socks = [raw_connect(server) for _ in range(3)]
    try:
        socks[1].recv(100)
        socks[1].sendall(b"EHLO c\r\n")
        socks[2].recv(100)
        socks[2].sendall(b"HELO c\r\nMAIL FROM:<a@x>\r\nRCPT TO:<b@x>\r\nDATA\r\nabc\r\n")
        server.wait_until(lambda: server.received.connections[2].partial_data is not None)
    finally:
        server.close()  # raises if a connection thread does not stop
        for sock in socks:
            sock.close()
    assert all(log.closed for log in server.received.connections)
