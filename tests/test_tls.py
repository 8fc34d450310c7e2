"""TLS and trust (SPEC §3): every ``tls`` × ``trust`` combination, succeeding and failing.

Real peers only: the aiosmtpd :class:`SMTPSink` for the conversations that
work, the raw-socket :class:`ScriptedServer` where the proof is what the
server did *not* receive (it records every byte after decryption, every AUTH
attempt and every handshake error), and trustme certificates throughout.

Every failing configuration carries a username and password, so that a
session which went on after the failure would be seen trying AUTH.
"""

from __future__ import annotations

import hashlib
import socket
import ssl
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import certifi
import pytest

from scripted_server import ConnectionLog, Delay, Drop, Raw, Reply, Script, ScriptedServer, Stall
from smtpnotify import (
    CertificateError,
    ConnectError,
    ConnectTimeout,
    InsecureTrustWarning,
    MailConfig,
    Notification,
    Notifier,
    PermanentError,
    SendResult,
    StartTLSNotSupported,
    TLSError,
    TransientError,
    fetch_server_certificate,
)
from smtpnotify.testing import CertificateBundle, ServerCertKind, SMTPSink

Scripted = Callable[..., ScriptedServer]
TLSSink = Callable[..., SMTPSink]
TLSMode = Literal["starttls", "ssl"]
TrustSpec = Callable[[CertificateBundle], dict[str, Any]]

TLS_MODES: tuple[TLSMode, ...] = ("starttls", "ssl")
USER = "alice"
PASSWORD = "tls-test-Pa55"
SENDER = "Change Desk <noreply@example.com>"
RECIPIENT = "ops@example.com"
# Commands that must never reach a server whose certificate was not trusted.
FORBIDDEN = {"AUTH", "MAIL", "RCPT", "DATA"}


# ----------------------------------------------------------------------------- helpers


@pytest.fixture
def trustme_certifi(
    certs: CertificateBundle, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Path:
    """Make ``certifi.where()`` name a bundle that holds the trustme CA (and nothing else).

    ``trust="verify"`` trusts certifi's public CA bundle, and no public CA
    issues certificates for 127.0.0.1, so success under ``verify`` cannot be
    shown against a real public CA.  Replacing the *file* certifi points at is
    the least mock possible: smtpnotify still builds its own context, loads a
    CA file, and OpenSSL still verifies the chain, the dates and the name.
    """
    bundle = tmp_path / "cacert.pem"
    bundle.write_text(certs.ca_pem, encoding="ascii")
    monkeypatch.setattr(certifi, "where", lambda: str(bundle))
    return bundle


def make_config(port: int, tls: Literal["none", "starttls", "ssl"], **overrides: Any) -> MailConfig:
    """A config for 127.0.0.1:``port`` with credentials, so AUTH would follow a good handshake."""
    settings: dict[str, Any] = {
        "host": "127.0.0.1",
        "port": port,
        "tls": tls,
        "sender": SENDER,
        "username": USER,
        "password": PASSWORD,
        "timeout": 5,
    }
    settings.update(overrides)
    return MailConfig(**settings)


def notifier_for(config: MailConfig) -> Notifier:
    """A Notifier; ``trust="all"`` is expected to warn (and must, or this fails)."""
    if config.trust == "all" and config.tls != "none":
        with pytest.warns(InsecureTrustWarning):
            return Notifier(config)
    return Notifier(config)


def send_one(config: MailConfig) -> SendResult:
    with notifier_for(config) as notifier:
        return notifier.send(Notification(RECIPIENT, "TLS check", text="hello over TLS"))


def tls_scripted(
    scripted: Scripted, tls: TLSMode, cert: ServerCertKind = "localhost"
) -> ScriptedServer:
    """A scripted server presenting ``cert``; offers AUTH (and STARTTLS), accepts anything."""
    if tls == "ssl":
        return scripted(
            Script(ehlo_extensions=("AUTH PLAIN LOGIN", "8BITMIME")), tls="ssl", cert=cert
        )
    return scripted(Script(ehlo_extensions=("STARTTLS", "AUTH PLAIN LOGIN", "8BITMIME")), cert=cert)


def assert_nothing_after_tls_failure(logs: list[ConnectionLog], tls: TLSMode) -> None:
    """No credentials, no envelope, no content: only what precedes the handshake."""
    assert logs, "the client never connected"
    for log in logs:
        assert log.auth == []
        assert not FORBIDDEN & set(log.verbs), log.commands
        assert log.messages == [] and log.partial_data is None
        if tls == "ssl":
            # Implicit TLS: the handshake comes first, so no SMTP command at all.
            assert log.commands == [] and bytes(log.raw) == b""
        else:
            assert log.verbs == ["EHLO", "STARTTLS"]
            assert bytes(log.raw).endswith(b"STARTTLS\r\n")


def sink_closed(sink: SMTPSink) -> None:
    sink.wait_until(lambda: all(c.closed for c in sink.connections), what="connections closed")


# ---------------------------------------------------------------------- trust: successes

SUCCESSES: list[tuple[str, ServerCertKind, TrustSpec, int]] = [
    # (id, server certificate, trust settings, connections the sink sees in STARTTLS mode)
    ("verify", "localhost", lambda c: {"trust": "verify"}, 1),
    ("verify-chain-via-intermediate", "chained", lambda c: {"trust": "verify"}, 1),
    (
        "verify-wrong-name-without-hostname-check",
        "wrong_name",
        lambda c: {"trust": "verify", "check_hostname": False},
        1,
    ),
    ("all-unknown-ca", "other_ca", lambda c: {"trust": "all"}, 1),
    ("all-expired", "expired", lambda c: {"trust": "all"}, 1),
    ("all-wrong-name", "wrong_name", lambda c: {"trust": "all"}, 1),
    ("all-self-signed", "self_signed", lambda c: {"trust": "all"}, 1),
    (
        "pinned-cert-ca",
        "localhost",
        lambda c: {"trust": "pinned", "pinned_certificates": c.ca_pem},
        1,
    ),
    (
        "pinned-cert-leaf",
        "localhost",
        lambda c: {"trust": "pinned", "pinned_certificates": c.leaf_pem},
        1,
    ),
    (
        # VERIFY_X509_PARTIAL_CHAIN: a self-signed end-entity certificate is its own anchor
        "pinned-cert-self-signed-leaf",
        "self_signed",
        lambda c: {"trust": "pinned", "pinned_certificates": c.pem("self_signed")},
        1,
    ),
    (
        "pinned-cert-intermediate",
        "chained",
        lambda c: {"trust": "pinned", "pinned_certificates": c.intermediate_pem},
        1,
    ),
    (
        "pinned-cert-leaf-of-chain",
        "chained",
        lambda c: {"trust": "pinned", "pinned_certificates": c.pem("chained")},
        1,
    ),
    (
        "pinned-cert-root-of-chain",
        "chained",
        lambda c: {"trust": "pinned", "pinned_certificates": c.ca_pem},
        1,
    ),
    (
        "pinned-cert-wrong-name-without-hostname-check",
        "wrong_name",
        lambda c: {"trust": "pinned", "pinned_certificates": c.ca_pem, "check_hostname": False},
        1,
    ),
    (
        "pinned-fingerprint",
        "localhost",
        lambda c: {"trust": "pinned", "pinned_fingerprints": c.leaf_sha256},
        1,
    ),
    (
        "pinned-fingerprint-colons-upper-case",
        "localhost",
        lambda c: {
            "trust": "pinned",
            "pinned_fingerprints": ":".join(
                c.leaf_sha256[i : i + 2].upper() for i in range(0, 64, 2)
            ),
        },
        1,
    ),
    (
        # a fingerprint pin consults neither the CA nor the dates nor the name
        "pinned-fingerprint-expired",
        "expired",
        lambda c: {"trust": "pinned", "pinned_fingerprints": c.sha256("expired")},
        1,
    ),
    (
        "pinned-fingerprint-unknown-ca",
        "other_ca",
        lambda c: {"trust": "pinned", "pinned_fingerprints": c.sha256("other_ca")},
        1,
    ),
    (
        "pinned-fingerprint-wrong-name",
        "wrong_name",
        lambda c: {"trust": "pinned", "pinned_fingerprints": c.sha256("wrong_name")},
        1,
    ),
    (
        "pinned-fingerprint-one-of-several",
        "localhost",
        lambda c: {
            "trust": "pinned",
            "pinned_fingerprints": (c.sha256("other_ca"), c.leaf_sha256, c.sha256("expired")),
        },
        1,
    ),
    (
        "pinned-both-match",
        "localhost",
        lambda c: {
            "trust": "pinned",
            "pinned_certificates": c.ca_pem,
            "pinned_fingerprints": c.leaf_sha256,
        },
        1,
    ),
    (
        "pinned-both-only-certificate-matches",
        "localhost",
        lambda c: {
            "trust": "pinned",
            "pinned_certificates": c.ca_pem,
            "pinned_fingerprints": c.sha256("other_ca"),
        },
        1,
    ),
    (
        # the certificate context rejects the server; the session reconnects once
        # with the fingerprint context (see test_pinned_both_reconnects_once_...)
        "pinned-both-only-fingerprint-matches",
        "localhost",
        lambda c: {
            "trust": "pinned",
            "pinned_certificates": c.other_ca_pem,
            "pinned_fingerprints": c.leaf_sha256,
        },
        2,
    ),
]


@pytest.mark.parametrize("tls", TLS_MODES)
@pytest.mark.parametrize(
    ("cert", "trust", "starttls_connections"),
    [pytest.param(*case[1:], id=case[0]) for case in SUCCESSES],
)
def test_trust_accepts(
    tls: TLSMode,
    cert: ServerCertKind,
    trust: TrustSpec,
    starttls_connections: int,
    certs: CertificateBundle,
    tls_sink: TLSSink,
    trustme_certifi: Path,
) -> None:
    sink = tls_sink(tls=tls, cert=cert, auth={USER: PASSWORD})
    result = send_one(make_config(sink.port, tls, **trust(certs)))

    assert result.accepted == (RECIPIENT,)
    [message] = sink.wait_for(1)
    assert message.tls is True
    assert message.tls_version in ("TLSv1.2", "TLSv1.3")
    assert message.authenticated_user == USER
    sink_closed(sink)
    verbs = sink.verbs
    if tls == "starttls":
        assert len(sink.connections) == starttls_connections
        last = sink.connections[-1]
        assert [c.split(" ", 1)[0].upper() for c in last.commands] == [
            "EHLO",
            "STARTTLS",
            "EHLO",
            "AUTH",
            "MAIL",
            "RCPT",
            "DATA",
            "QUIT",
        ]
    else:
        # a connection whose implicit handshake failed never becomes an SMTP session
        assert "STARTTLS" not in verbs
        assert verbs == ["EHLO", "AUTH", "MAIL", "RCPT", "DATA", "QUIT"]


def test_verify_checks_a_dns_name_too(
    tls_sink: TLSSink, trustme_certifi: Path, certs: CertificateBundle
) -> None:
    sink = tls_sink(tls="starttls", auth={USER: PASSWORD})
    send_one(make_config(sink.port, "starttls", host="localhost"))
    assert sink.wait_for(1)[0].tls

    wrong = tls_sink(tls="starttls", cert="wrong_name", auth={USER: PASSWORD})
    with pytest.raises(CertificateError, match=r"[Hh]ostname|name"):
        send_one(make_config(wrong.port, "starttls", host="localhost"))
    sink_closed(wrong)
    assert wrong.verbs == ["EHLO", "STARTTLS"]


@pytest.mark.parametrize("tls", TLS_MODES)
def test_pinned_both_reconnects_once_when_only_the_fingerprint_matches(
    tls: TLSMode, scripted: Scripted, certs: CertificateBundle
) -> None:
    server = tls_scripted(scripted, tls)
    config = make_config(
        server.port,
        tls,
        trust="pinned",
        pinned_certificates=certs.other_ca_pem,
        pinned_fingerprints=certs.leaf_sha256,
    )
    send_one(config)

    first, second = server.wait_closed()
    assert server.connection_count == 2
    # first connection: the certificate context refused the server, nothing else was said
    assert first.tls is False and first.tls_error is not None
    assert_nothing_after_tls_failure([first], tls)
    # second connection: the fingerprint context, then the whole conversation
    assert second.tls is True
    assert [(a.mechanism, a.username, a.password) for a in second.auth] == [
        ("PLAIN", USER, PASSWORD)
    ]
    assert len(second.messages) == 1
    assert b"hello over TLS" in second.messages[0]


# ----------------------------------------------------------------------- trust: failures

FAILURES: list[tuple[str, ServerCertKind, TrustSpec, bool]] = [
    # (id, server certificate, trust settings, with the real certifi bundle?)
    ("verify-unknown-ca-real-certifi", "localhost", lambda c: {"trust": "verify"}, True),
    ("verify-unknown-ca", "other_ca", lambda c: {"trust": "verify"}, False),
    ("verify-wrong-name", "wrong_name", lambda c: {"trust": "verify"}, False),
    ("verify-expired", "expired", lambda c: {"trust": "verify"}, False),
    ("verify-self-signed", "self_signed", lambda c: {"trust": "verify"}, False),
    (
        "verify-expired-without-hostname-check",
        "expired",
        lambda c: {"trust": "verify", "check_hostname": False},
        False,
    ),
    # pinned: certifi (patched to hold the trustme CA) must not be consulted at all
    (
        "pinned-cert-of-other-ca",
        "localhost",
        lambda c: {"trust": "pinned", "pinned_certificates": c.other_ca_pem},
        False,
    ),
    (
        "pinned-cert-another-leaf",
        "localhost",
        lambda c: {"trust": "pinned", "pinned_certificates": c.pem("other_ca")},
        False,
    ),
    (
        "pinned-cert-wrong-name",
        "wrong_name",
        lambda c: {"trust": "pinned", "pinned_certificates": c.ca_pem},
        False,
    ),
    (
        "pinned-cert-expired",
        "expired",
        lambda c: {"trust": "pinned", "pinned_certificates": c.ca_pem},
        False,
    ),
    (
        # a pinned certificate is a trust anchor, and OpenSSL checks an anchor's dates too
        "pinned-cert-expired-leaf-itself",
        "expired",
        lambda c: {"trust": "pinned", "pinned_certificates": c.pem("expired")},
        False,
    ),
    (
        "pinned-cert-intermediate-not-in-chain",
        "localhost",
        lambda c: {"trust": "pinned", "pinned_certificates": c.intermediate_pem},
        False,
    ),
    (
        "pinned-cert-self-signed-other-server",
        "self_signed",
        lambda c: {"trust": "pinned", "pinned_certificates": c.leaf_pem},
        False,
    ),
    (
        "pinned-fingerprint-of-another-certificate",
        "localhost",
        lambda c: {"trust": "pinned", "pinned_fingerprints": c.sha256("other_ca")},
        False,
    ),
    (
        # a fingerprint pins the leaf, never the CA that issued it
        "pinned-fingerprint-of-the-ca",
        "localhost",
        lambda c: {
            "trust": "pinned",
            "pinned_fingerprints": hashlib.sha256(ssl.PEM_cert_to_DER_cert(c.ca_pem)).hexdigest(),
        },
        False,
    ),
    (
        "pinned-both-neither-matches",
        "localhost",
        lambda c: {
            "trust": "pinned",
            "pinned_certificates": c.other_ca_pem,
            "pinned_fingerprints": c.sha256("wrong_name"),
        },
        False,
    ),
]


@pytest.mark.parametrize("tls", TLS_MODES)
@pytest.mark.parametrize(
    ("cert", "trust", "real_certifi"),
    [pytest.param(*case[1:], id=case[0]) for case in FAILURES],
)
def test_trust_refuses(
    tls: TLSMode,
    cert: ServerCertKind,
    trust: TrustSpec,
    real_certifi: bool,
    certs: CertificateBundle,
    scripted: Scripted,
    request: pytest.FixtureRequest,
) -> None:
    if not real_certifi:
        request.getfixturevalue("trustme_certifi")
    server = tls_scripted(scripted, tls, cert)
    config = make_config(server.port, tls, **trust(certs))

    with pytest.raises(CertificateError) as caught:
        send_one(config)

    error = caught.value
    assert isinstance(error, TLSError)
    assert error.transient is True and error.phase == "connect" and error.ambiguous is False
    logs = server.wait_closed()
    both = bool(config.pinned_certificates) and bool(config.pinned_fingerprints)
    assert len(logs) == (2 if both else 1)
    assert_nothing_after_tls_failure(logs, tls)


def test_unknown_ca_against_the_sink_with_the_real_certifi_bundle(tls_sink: TLSSink) -> None:
    assert Path(certifi.where()).is_file()  # the real bundle, not a patched one
    for tls in TLS_MODES:
        sink = tls_sink(tls=tls, auth={USER: PASSWORD})
        with pytest.raises(CertificateError, match="not trusted"):
            send_one(make_config(sink.port, tls))
        sink_closed(sink)
        assert sink.verbs == (["EHLO", "STARTTLS"] if tls == "starttls" else [])
        assert sink.messages == [] and sink.rejected == []


@pytest.mark.parametrize("tls", TLS_MODES)
def test_fingerprint_mismatch_is_checked_right_after_the_handshake(
    tls: TLSMode, tls_sink: TLSSink, certs: CertificateBundle
) -> None:
    """The handshake completes (the sink sees TLS up), then the client leaves without a word."""
    sink = tls_sink(tls=tls, auth={USER: PASSWORD})
    config = make_config(
        sink.port, tls, trust="pinned", pinned_fingerprints=certs.sha256("other_ca")
    )
    with pytest.raises(CertificateError, match="matches no pinned fingerprint") as caught:
        send_one(config)
    assert certs.leaf_sha256 in str(caught.value)  # says what the server presented
    sink.wait_until(lambda: len(sink.connections) == 1 and sink.connections[0].closed)
    [conn] = sink.connections
    assert conn.tls is True  # the handshake finished: the pin was checked after it
    assert conn.authenticated_user is None
    assert conn.commands == ([] if tls == "ssl" else ["ehlo [127.0.0.1]", "STARTTLS"])


# ------------------------------------------------------------------- STARTTLS missing/refused


@pytest.mark.parametrize(
    "script",
    [
        pytest.param(Script(ehlo_extensions=("AUTH PLAIN LOGIN", "8BITMIME")), id="not-offered"),
        pytest.param(
            Script(
                ehlo_extensions=("STARTTLS", "AUTH PLAIN LOGIN"), on={"STARTTLS": Reply(502, "no")}
            ),
            id="refused-502",
        ),
        pytest.param(
            Script(
                ehlo_extensions=("STARTTLS", "AUTH PLAIN LOGIN"),
                on={"STARTTLS": Reply(554, "5.7.3 not for you")},
            ),
            id="refused-554",
        ),
    ],
)
def test_starttls_missing_or_permanently_refused(scripted: Scripted, script: Script) -> None:
    server = scripted(script)
    with pytest.raises(StartTLSNotSupported) as caught:
        send_one(make_config(server.port, "starttls"))
    assert caught.value.transient is True and caught.value.phase == "connect"
    [log] = server.wait_closed()
    assert log.auth == [] and log.messages == [] and not log.tls
    offered = "STARTTLS" in script.ehlo_extensions
    after = log.verbs[2:] if offered else log.verbs[1:]
    assert log.verbs[: 2 if offered else 1] == (["EHLO", "STARTTLS"] if offered else ["EHLO"])
    assert after in ([], ["QUIT"])  # nothing but QUIT: no plaintext fallback


def test_starttls_missing_against_the_sink(sink: SMTPSink) -> None:
    """A real server that does not offer STARTTLS (and would take AUTH in plain text)."""
    with pytest.raises(StartTLSNotSupported, match="does not offer STARTTLS"):
        send_one(make_config(sink.port, "starttls"))
    sink_closed(sink)
    assert sink.verbs in (["EHLO"], ["EHLO", "QUIT"])


@pytest.mark.parametrize("code", [454, 421])
def test_starttls_refused_with_4xx_is_a_transient_reply(scripted: Scripted, code: int) -> None:
    server = scripted(
        Script(
            ehlo_extensions=("STARTTLS", "AUTH PLAIN LOGIN"),
            on={"STARTTLS": Reply(code, "4.7.0 TLS not available now")},
        )
    )
    with pytest.raises(TransientError) as caught:
        send_one(make_config(server.port, "starttls"))
    error = caught.value
    assert error.code == code and error.command == "STARTTLS"
    assert error.enhanced_code == "4.7.0"
    assert error.transient is True and error.phase == "connect"
    [log] = server.wait_closed()
    assert log.auth == [] and not log.tls
    assert log.verbs[:2] == ["EHLO", "STARTTLS"] and log.verbs[2:] in ([], ["QUIT"])


@pytest.mark.parametrize(
    "tls_stage",
    [
        pytest.param(Raw(b"this is not a TLS server hello\r\n"), id="garbage"),
        pytest.param(Reply(250, "OK"), id="smtp-reply"),
        pytest.param(Drop(), id="drop"),
        pytest.param(Drop(rst=True), id="reset"),
    ],
)
@pytest.mark.parametrize("tls", TLS_MODES)
def test_no_tls_handshake_from_the_server(
    tls: TLSMode, scripted: Scripted, certs: CertificateBundle, tls_stage: Raw | Reply | Drop
) -> None:
    """Where the ServerHello belongs: garbage, an SMTP reply, a close or a reset."""
    if tls == "ssl":
        server = scripted(Script(on={"TLS": tls_stage}), tls="ssl")
    else:
        server = scripted(
            Script(ehlo_extensions=("STARTTLS", "AUTH PLAIN LOGIN"), on={"TLS": tls_stage}),
            cert="localhost",
        )
    config = make_config(server.port, tls, trust="pinned", pinned_certificates=certs.ca_pem)
    # a reset right after accept() can reach the client before its connect() returns
    early_reset = tls == "ssl" and tls_stage == Drop(rst=True)
    with pytest.raises((TLSError, ConnectError) if early_reset else TLSError) as caught:
        send_one(config)
    assert not isinstance(caught.value, CertificateError)
    assert caught.value.transient is True and caught.value.phase == "connect"
    assert_nothing_after_tls_failure(server.wait_closed(), tls)


@pytest.mark.parametrize(
    "reply",
    [
        pytest.param(Raw(b"220 go ahead\r\n250 injected\r\n"), id="one-segment"),
        pytest.param(
            [Raw(b"220 go ahead\r\n"), Delay(0.05), Raw(b"250 injected\r\n")], id="late-segment"
        ),
    ],
)
def test_starttls_response_injection_is_refused(
    scripted: Scripted, certs: CertificateBundle, reply: Raw | list[Raw | Delay]
) -> None:
    """Bytes after the 220 to STARTTLS must not be read as if TLS protected them (CVE-2011-0411).

    Arriving with the 220 they are refused before the handshake; arriving later
    they break it (they are no TLS record).  Either way: TLSError, nothing sent.
    """
    server = scripted(
        Script(ehlo_extensions=("STARTTLS", "AUTH PLAIN LOGIN"), on={"STARTTLS": reply}),
        cert="localhost",
    )
    config = make_config(server.port, "starttls", trust="pinned", pinned_certificates=certs.ca_pem)
    with pytest.raises(TLSError) as caught:
        send_one(config)
    assert not isinstance(caught.value, CertificateError)
    assert caught.value.phase == "connect"
    [log] = server.wait_closed()
    assert log.tls is False  # no TLS session was established
    assert log.verbs == ["EHLO", "STARTTLS"]
    assert bytes(log.raw).endswith(b"STARTTLS\r\n")
    assert log.auth == [] and log.messages == []


@pytest.mark.parametrize("tls", TLS_MODES)
def test_a_stalled_handshake_is_a_connect_timeout(
    tls: TLSMode, scripted: Scripted, certs: CertificateBundle
) -> None:
    """TCP is up but the server never answers the ClientHello: the connect deadline ends it."""
    if tls == "ssl":
        server = scripted(Script(on={"TLS": Stall()}), tls="ssl")
    else:
        server = scripted(
            Script(ehlo_extensions=("STARTTLS", "AUTH PLAIN"), on={"TLS": Stall()}),
            cert="localhost",
        )
    config = make_config(
        server.port, tls, timeout=1, trust="pinned", pinned_certificates=certs.ca_pem
    )
    with pytest.raises(ConnectTimeout) as caught:
        send_one(config)
    assert caught.value.transient is True and caught.value.phase == "connect"
    [log] = server.wait_closed()
    assert log.auth == [] and log.messages == [] and not log.tls
    assert log.verbs == ([] if tls == "ssl" else ["EHLO", "STARTTLS"])
    # the stalling server read the ClientHello (a TLS handshake record) and nothing after it
    hello = bytes(log.raw).partition(b"STARTTLS\r\n")[2] if tls == "starttls" else bytes(log.raw)
    assert hello.startswith(b"\x16\x03")
    assert b"AUTH" not in hello and b"MAIL" not in hello


def test_implicit_tls_to_a_plain_server_is_a_tls_error(
    sink: SMTPSink, certs: CertificateBundle
) -> None:
    """tls="ssl" against a port that speaks plain SMTP (a common misconfiguration)."""
    config = make_config(sink.port, "ssl", trust="pinned", pinned_certificates=certs.ca_pem)
    with pytest.raises(TLSError) as caught:
        send_one(config)
    assert not isinstance(caught.value, CertificateError)
    sink_closed(sink)
    # the server's greeting was no ServerHello: the client said nothing but its ClientHello
    assert not {"EHLO", "HELO", *FORBIDDEN} & set(sink.verbs)


def test_starttls_to_an_implicit_tls_port_times_out(
    tls_sink: TLSSink, certs: CertificateBundle
) -> None:
    """tls="starttls" against port 465: each side waits for the other to speak first."""
    sink = tls_sink(tls="ssl", auth={USER: PASSWORD})
    config = make_config(
        sink.port, "starttls", timeout=1, trust="pinned", pinned_certificates=certs.ca_pem
    )
    with pytest.raises(ConnectTimeout):
        send_one(config)
    assert sink.verbs == [] and sink.messages == []


# ------------------------------------------------------------------------ the TLS floor


@pytest.fixture
def tls11_context(certs: CertificateBundle, scripted: Scripted) -> ssl.SSLContext:
    """A server context that speaks at most TLS 1.1, shown to work with a willing client.

    Python deprecates the TLS 1.0/1.1 settings (DeprecationWarning, an error
    in this suite); building the outdated server is the point here.
    """
    context = certs.server_context()
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client.check_hostname = False
    client.verify_mode = ssl.CERT_NONE
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            for ctx in (context, client):
                ctx.minimum_version = ssl.TLSVersion.TLSv1
                ctx.maximum_version = ssl.TLSVersion.TLSv1_1
                ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
        except (ValueError, ssl.SSLError) as exc:
            pytest.skip(f"the local OpenSSL cannot be configured for TLS 1.1: {exc}")
        control = scripted(Script(), tls="ssl", ssl_context=context)
        try:
            with (
                socket.create_connection(control.address, timeout=5) as raw,
                client.wrap_socket(raw) as tls,
            ):
                version = tls.version()
                tls.recv(1024)
        except OSError as exc:
            pytest.skip(f"the local OpenSSL will not speak TLS 1.1 at all: {exc}")
    assert version == "TLSv1.1"
    return context


@pytest.mark.parametrize("tls", TLS_MODES)
def test_tls_below_1_2_is_refused(
    tls: TLSMode, tls11_context: ssl.SSLContext, scripted: Scripted, certs: CertificateBundle
) -> None:
    if tls == "ssl":
        server = scripted(
            Script(ehlo_extensions=("AUTH PLAIN",)), tls="ssl", ssl_context=tls11_context
        )
    else:
        server = scripted(
            Script(ehlo_extensions=("STARTTLS", "AUTH PLAIN")), ssl_context=tls11_context
        )
    # Pinned by fingerprint: no CA, name or date check could be what refuses it.  (Python
    # 3.10+ clients already default to a TLS 1.2 floor and OpenSSL security level 2; this
    # guards against smtpnotify lowering either, e.g. for "compatibility".)
    config = make_config(server.port, tls, trust="pinned", pinned_fingerprints=certs.leaf_sha256)
    with pytest.raises(TLSError) as caught:
        send_one(config)
    assert not isinstance(caught.value, CertificateError)
    assert caught.value.phase == "connect"
    assert_nothing_after_tls_failure(server.wait_closed(), tls)


# ---------------------------------------------------------------- trust="all" and tls="none"


@pytest.mark.parametrize("tls", TLS_MODES)
def test_trust_all_warns_from_the_constructor(tls: TLSMode) -> None:
    config = MailConfig(host="mail.example.com", tls=tls, trust="all", sender=SENDER)
    with pytest.warns(InsecureTrustWarning, match=r"mail\.example\.com") as record:
        first = Notifier(config)
        second = Notifier(config)  # every Notifier, not only the first
    first.close()
    second.close()
    assert len(record) == 2
    assert all(issubclass(w.category, UserWarning) for w in record)
    assert {w.filename for w in record} == {__file__}  # points at the caller


@pytest.mark.parametrize(
    "settings",
    [
        pytest.param({"tls": "none", "trust": "all"}, id="none-all"),
        pytest.param({"tls": "starttls", "trust": "verify"}, id="starttls-verify"),
        pytest.param(
            {"tls": "ssl", "trust": "pinned", "pinned_fingerprints": "ab" * 32}, id="ssl-pinned"
        ),
    ],
)
def test_no_warning_without_tls_or_with_verification(settings: dict[str, Any]) -> None:
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        Notifier(MailConfig(host="mail.example.com", sender=SENDER, **settings)).close()
    assert record == []


@pytest.mark.parametrize("require_starttls", [False, True])
def test_tls_none_never_upgrades(tls_sink: TLSSink, require_starttls: bool) -> None:
    sink = tls_sink(tls="starttls", require_starttls=require_starttls)
    config = make_config(sink.port, "none", username=None, password=None, trust="all")
    if require_starttls:
        # the server insists on TLS; the client still does not upgrade
        with pytest.raises(PermanentError) as caught:
            send_one(config)
        assert caught.value.code == 530 and caught.value.command == "MAIL"
    else:
        send_one(config)
        [message] = sink.wait_for(1)
        assert message.tls is False
    sink_closed(sink)
    assert "STARTTLS" not in sink.verbs
    assert sink.verbs[0] == "EHLO"
    assert all(not c.tls for c in sink.connections)


# --------------------------------------------------------------- fetch_server_certificate


def _pem_body(pem: str) -> str:
    return "".join(pem.split())


@pytest.mark.parametrize("tls", TLS_MODES)
def test_fetch_server_certificate_then_pin_it(
    tls: TLSMode, tls_sink: TLSSink, certs: CertificateBundle
) -> None:
    sink = tls_sink(tls=tls, auth={USER: PASSWORD})
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # fetching must not warn about trust="all"
        fetched = fetch_server_certificate("127.0.0.1", sink.port, tls, timeout=5)

    assert _pem_body(fetched.pem) == _pem_body(certs.leaf_pem)
    assert fetched.sha256 == certs.leaf_sha256
    sink_closed(sink)
    assert not FORBIDDEN & set(sink.verbs)  # no AUTH, no message

    sink.reset()
    send_one(make_config(sink.port, tls, trust="pinned", pinned_certificates=fetched.pem))
    send_one(make_config(sink.port, tls, trust="pinned", pinned_fingerprints=fetched.sha256))
    assert [m.authenticated_user for m in sink.wait_for(2)] == [USER, USER]


def test_fetch_server_certificate_returns_the_leaf_of_a_chain(
    tls_sink: TLSSink, certs: CertificateBundle
) -> None:
    sink = tls_sink(tls="ssl", cert="chained")
    fetched = fetch_server_certificate("127.0.0.1", sink.port, "ssl", timeout=5)
    assert fetched.sha256 == certs.sha256("chained")
    assert _pem_body(fetched.pem) == _pem_body(certs.pem("chained"))


def test_fetch_server_certificate_needs_tls(sink: SMTPSink) -> None:
    with pytest.raises(ValueError, match="tls"):
        fetch_server_certificate("127.0.0.1", sink.port, "none")  # type: ignore[arg-type]
    with pytest.raises(StartTLSNotSupported):
        fetch_server_certificate("127.0.0.1", sink.port, "starttls", timeout=5)
