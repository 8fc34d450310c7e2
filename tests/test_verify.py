"""``Notifier.verify()`` (SPEC §6): the settings page's "Save → confirmation message".

It walks the connect phase step by step against real servers, reports each
step with its timing, never raises for a server problem, and never sends a
message.
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from typing import Any, Literal

import pytest

from scripted_server import Reply, Script, ScriptedServer, Stall
from smtpnotify import (
    AuthenticationError,
    CertificateError,
    ConnectError,
    ConnectTimeout,
    MailConfig,
    Notifier,
    PermanentError,
    SMTPNotifyError,
    StartTLSNotSupported,
    TransientError,
    VerifyReport,
)
from smtpnotify.testing import CertificateBundle, SMTPSink

Scripted = Callable[..., ScriptedServer]
MakeSink = Callable[..., SMTPSink]
TLSSink = Callable[..., SMTPSink]

USER = "alice"
PASSWORD = "verify-Pa55"
SENDER = "noreply@example.com"
MESSAGE_VERBS = {"MAIL", "RCPT", "DATA", "BDAT"}


def make_config(
    port: int, tls: Literal["none", "starttls", "ssl"] = "none", **overrides: Any
) -> MailConfig:
    settings: dict[str, Any] = {
        "host": "127.0.0.1",
        "port": port,
        "tls": tls,
        "sender": SENDER,
        "timeout": 5,
    }
    settings.update(overrides)
    return MailConfig(**settings)


def verify(config: MailConfig) -> VerifyReport:
    with Notifier(config) as notifier:
        return notifier.verify()


def names(report: VerifyReport) -> list[str]:
    return [step.name for step in report.steps]


def sink_closed(sink: SMTPSink) -> None:
    sink.wait_until(lambda: all(c.closed for c in sink.connections), what="connections closed")


# ------------------------------------------------------------------------------- success


def test_verify_plain(sink: SMTPSink) -> None:
    report = verify(make_config(sink.port))

    assert report.ok is True and report.error is None
    assert names(report) == ["connect", "greeting", "ehlo"]
    assert all(step.ok for step in report.steps)
    assert all(step.seconds >= 0 for step in report.steps)
    assert {"size", "8bitmime", "smtputf8"} <= {name.lower() for name in report.extensions}
    assert report.tls_version is None and report.cipher is None
    assert report.peer_certificate_sha256 is None
    sink_closed(sink)
    assert sink.verbs == ["EHLO", "QUIT"]  # it never sends a message
    assert sink.messages == [] and sink.rejected == []


@pytest.mark.parametrize(
    ("tls", "expected"),
    [
        ("starttls", ["connect", "greeting", "ehlo", "tls", "ehlo", "auth"]),
        ("ssl", ["connect", "tls", "greeting", "ehlo", "auth"]),
    ],
)
def test_verify_tls_and_auth(
    tls: Literal["starttls", "ssl"],
    expected: list[str],
    tls_sink: TLSSink,
    certs: CertificateBundle,
) -> None:
    # (aiosmtpd's auth_require_tls only knows STARTTLS: with implicit TLS it hides AUTH)
    sink = tls_sink(tls=tls, auth={USER: PASSWORD}, auth_require_tls=tls == "starttls")
    config = make_config(
        sink.port,
        tls,
        username=USER,
        password=PASSWORD,
        trust="pinned",
        pinned_certificates=certs.ca_pem,
    )
    report = verify(config)

    assert report.ok is True, str(report)
    assert names(report) == expected
    assert all(step.ok and step.seconds >= 0 for step in report.steps)
    assert report.tls_version in ("TLSv1.2", "TLSv1.3")
    assert report.cipher
    assert report.peer_certificate_sha256 == certs.leaf_sha256
    # the extensions are those offered over TLS (AUTH only appears there)
    assert "auth" in {name.lower() for name in report.extensions}
    assert "starttls" not in {name.lower() for name in report.extensions}
    sink_closed(sink)
    assert [c.authenticated_user for c in sink.connections] == [USER]
    assert not MESSAGE_VERBS & set(sink.verbs)
    assert sink.messages == []


def test_verify_with_both_pins_when_only_the_fingerprint_matches(
    tls_sink: TLSSink, certs: CertificateBundle
) -> None:
    """The session falls back to the fingerprint; the report shows a working configuration."""
    sink = tls_sink(tls="starttls")
    report = verify(
        make_config(
            sink.port,
            "starttls",
            trust="pinned",
            pinned_certificates=certs.other_ca_pem,
            pinned_fingerprints=certs.leaf_sha256,
        )
    )
    assert report.ok is True, str(report)
    assert report.error is None
    # one clean walk: the refused first attempt is not listed as a failed step
    assert names(report) == ["connect", "greeting", "ehlo", "tls", "ehlo"], str(report)
    assert all(step.ok for step in report.steps), str(report)
    [tls_step] = [step for step in report.steps if step.name == "tls"]
    assert "fingerprint" in tls_step.detail
    assert report.peer_certificate_sha256 == certs.leaf_sha256
    sink_closed(sink)
    assert len(sink.connections) == 2  # it did reconnect


def test_verify_with_both_pins_when_neither_matches(
    tls_sink: TLSSink, certs: CertificateBundle
) -> None:
    sink = tls_sink(tls="ssl")
    report = verify(
        make_config(
            sink.port,
            "ssl",
            trust="pinned",
            pinned_certificates=certs.other_ca_pem,
            pinned_fingerprints=certs.sha256("other_ca"),
        )
    )
    assert report.ok is False
    assert isinstance(report.error, CertificateError)
    assert names(report) == ["connect", "tls"]
    assert "fingerprint" in report.steps[-1].detail and not report.steps[-1].ok


# ------------------------------------------------------------------------------- failure


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


Case = Callable[[Scripted, CertificateBundle], tuple[MailConfig, ScriptedServer | None]]


def _refused(scripted: Scripted, certs: CertificateBundle) -> tuple[MailConfig, None]:
    return make_config(_closed_port()), None


def _greeting_554(
    scripted: Scripted, certs: CertificateBundle
) -> tuple[MailConfig, ScriptedServer]:
    server = scripted(Script(greeting=Reply(554, "5.3.2 no service here")))
    return make_config(server.port), server


def _ehlo_421(scripted: Scripted, certs: CertificateBundle) -> tuple[MailConfig, ScriptedServer]:
    server = scripted(Script(on={"EHLO": Reply(421, "4.3.2 shutting down")}))
    return make_config(server.port), server


def _starttls_missing(
    scripted: Scripted, certs: CertificateBundle
) -> tuple[MailConfig, ScriptedServer]:
    server = scripted(Script(ehlo_extensions=("AUTH PLAIN",)))
    return make_config(server.port, "starttls", username=USER, password=PASSWORD), server


def _certificate_mismatch(
    scripted: Scripted, certs: CertificateBundle
) -> tuple[MailConfig, ScriptedServer]:
    server = scripted(Script(ehlo_extensions=("STARTTLS", "AUTH PLAIN")), cert="localhost")
    config = make_config(
        server.port,
        "starttls",
        username=USER,
        password=PASSWORD,
        trust="pinned",
        pinned_fingerprints=certs.sha256("other_ca"),
    )
    return config, server


def _implicit_tls_unknown_ca(
    scripted: Scripted, certs: CertificateBundle
) -> tuple[MailConfig, ScriptedServer]:
    server = scripted(Script(ehlo_extensions=("AUTH PLAIN",)), tls="ssl", cert="other_ca")
    config = make_config(
        server.port,
        "ssl",
        username=USER,
        password=PASSWORD,
        trust="pinned",
        pinned_certificates=certs.ca_pem,
    )
    return config, server


def _auth_refused(
    scripted: Scripted, certs: CertificateBundle
) -> tuple[MailConfig, ScriptedServer]:
    server = scripted(Script(ehlo_extensions=("AUTH PLAIN LOGIN",), credentials={USER: "other"}))
    return make_config(server.port, username=USER, password=PASSWORD), server


def _greeting_stalls(
    scripted: Scripted, certs: CertificateBundle
) -> tuple[MailConfig, ScriptedServer]:
    server = scripted(Script(greeting=Stall()))
    return make_config(server.port, timeout=1), server


FAILURES = [
    # (case, error class, steps up to and including the failing one, words its detail holds)
    pytest.param(_refused, ConnectError, ["connect"], "refused", id="connection-refused"),
    pytest.param(_greeting_554, PermanentError, ["connect", "greeting"], "554", id="greeting-554"),
    pytest.param(_ehlo_421, TransientError, ["connect", "greeting", "ehlo"], "421", id="ehlo-421"),
    pytest.param(
        _starttls_missing,
        StartTLSNotSupported,
        ["connect", "greeting", "ehlo", "tls"],
        "STARTTLS",
        id="starttls-missing",
    ),
    pytest.param(
        _certificate_mismatch,
        CertificateError,
        ["connect", "greeting", "ehlo", "tls"],
        "fingerprint",
        id="certificate-mismatch",
    ),
    pytest.param(
        _implicit_tls_unknown_ca,
        CertificateError,
        ["connect", "tls"],
        "certificate",
        id="implicit-tls-unknown-ca",
    ),
    pytest.param(
        _auth_refused,
        AuthenticationError,
        ["connect", "greeting", "ehlo", "auth"],
        "535",
        id="auth-refused",
    ),
    pytest.param(
        _greeting_stalls,
        ConnectTimeout,
        ["connect", "greeting"],
        "timed out",
        id="connect-timeout",
    ),
]


@pytest.mark.parametrize(("case", "error_class", "expected", "detail"), FAILURES)
def test_verify_reports_the_failing_step(
    case: Case,
    error_class: type[SMTPNotifyError],
    expected: list[str],
    detail: str,
    scripted: Scripted,
    certs: CertificateBundle,
) -> None:
    config, server = case(scripted, certs)

    report = verify(config)  # never raises for a server problem

    assert report.ok is False
    assert type(report.error) is error_class, repr(report.error)
    assert report.error.phase == "connect"
    assert report.error.transient is (error_class is not PermanentError)
    assert names(report) == expected
    *passed, failed = report.steps
    assert all(step.ok for step in passed)
    assert failed.ok is False
    assert detail.lower() in failed.detail.lower(), failed.detail
    assert all(step.seconds >= 0 for step in report.steps)
    text = str(report)
    assert "FAILED" in text and type(report.error).__name__ in text
    if server is not None:
        logs = server.wait_closed()
        assert all(log.messages == [] and log.partial_data is None for log in logs)
        assert not MESSAGE_VERBS & set(server.received.verbs)
        if "auth" not in expected:  # nothing after the failing step, credentials least of all
            assert "AUTH" not in server.received.verbs
            assert all(log.auth == [] for log in logs)


# ------------------------------------------------------------------------------ the text


def test_report_text_is_readable(sink: SMTPSink, scripted: Scripted) -> None:
    good = verify(make_config(sink.port))
    text = str(good)
    assert text.splitlines()[0].startswith("OK")
    for name in ("connect", "greeting", "ehlo"):
        assert name in text
    assert "FAIL" not in text
    assert "extensions:" in text and "SMTPUTF8" in text.upper()

    server = scripted(Script(ehlo_extensions=("AUTH PLAIN",), credentials={USER: "other"}))
    bad = verify(make_config(server.port, username=USER, password=PASSWORD))
    text = str(bad)
    assert text.splitlines()[0].startswith("FAILED")
    for name in ("connect", "greeting", "ehlo", "auth"):
        assert name in text
    [auth_line] = [line for line in text.splitlines() if " auth " in line]
    assert "FAIL" in auth_line
    assert "AuthenticationError" in text
    assert PASSWORD not in text and PASSWORD not in repr(bad)
