"""AUTH (SPEC §1, §3, §4) and keeping the password secret everywhere.

The aiosmtpd :class:`SMTPSink` is the server that really checks credentials;
the :class:`ScriptedServer` records the credentials it was sent (so a test
knows exactly which mechanism and which bytes went over the wire) and logs
nothing itself, so any log line captured there came from smtpnotify.
"""

from __future__ import annotations

import base64
import logging
import traceback
from collections.abc import Callable, Iterator
from typing import Any, Literal

import pydantic
import pytest

from scripted_server import Reply, Script, ScriptedServer
from smtpnotify import (
    AuthenticationError,
    MailConfig,
    Notification,
    Notifier,
    SendResult,
    SMTPNotifyError,
    VerifyReport,
)
from smtpnotify.testing import CertificateBundle, SMTPSink

Scripted = Callable[..., ScriptedServer]
MakeSink = Callable[..., SMTPSink]
TLSSink = Callable[..., SMTPSink]

USER = "alice"
PASSWORD = "s3cret-Pa55-w0rd"
SENDER = "noreply@example.com"
RECIPIENT = "ops@example.com"
NOTE = Notification(RECIPIENT, "AUTH check", text="hello")

# What a careless client could leak: the password, and what AUTH PLAIN and
# AUTH LOGIN put on the wire for it (base64 of "\0user\0password", of "password").
SECRET_FORMS = {
    "password": PASSWORD,
    "PLAIN base64": base64.b64encode(f"\0{USER}\0{PASSWORD}".encode()).decode(),
    "LOGIN base64": base64.b64encode(PASSWORD.encode()).decode(),
}


def make_config(
    port: int,
    tls: Literal["none", "starttls", "ssl"] = "none",
    password: str = PASSWORD,
    **overrides: Any,
) -> MailConfig:
    settings: dict[str, Any] = {
        "host": "127.0.0.1",
        "port": port,
        "tls": tls,
        "sender": SENDER,
        "username": USER,
        "password": password,
        "timeout": 5,
    }
    settings.update(overrides)
    return MailConfig(**settings)


def send_one(config: MailConfig) -> SendResult:
    with Notifier(config) as notifier:
        return notifier.send(NOTE)


def pinned(certs: CertificateBundle) -> dict[str, Any]:
    return {"trust": "pinned", "pinned_certificates": certs.ca_pem}


def sink_closed(sink: SMTPSink) -> None:
    sink.wait_until(lambda: all(c.closed for c in sink.connections), what="connections closed")


# ------------------------------------------------------------------------------ success


@pytest.mark.parametrize("tls", ["none", "starttls"])
def test_auth_against_aiosmtpd(
    tls: Literal["none", "starttls"],
    tls_sink: TLSSink,
    make_sink: MakeSink,
    certs: CertificateBundle,
) -> None:
    if tls == "none":
        sink = make_sink(auth={USER: PASSWORD}, auth_required=True)
        config = make_config(sink.port)  # plain text is fine to 127.0.0.1
    else:
        sink = tls_sink(auth={USER: PASSWORD}, auth_required=True, auth_require_tls=True)
        config = make_config(sink.port, "starttls", **pinned(certs))

    send_one(config)

    [message] = sink.wait_for(1)
    assert message.authenticated_user == USER
    assert message.tls is (tls == "starttls")
    sink_closed(sink)
    expected = ["EHLO", "AUTH", "MAIL", "RCPT", "DATA", "QUIT"]
    if tls == "starttls":
        expected[1:1] = ["STARTTLS", "EHLO"]  # AUTH only after TLS is up
    assert sink.verbs == expected


@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN"])
@pytest.mark.parametrize("tls", ["none", "starttls"])
def test_auth_mechanisms(
    mechanism: str, tls: Literal["none", "starttls"], scripted: Scripted, certs: CertificateBundle
) -> None:
    extensions = (f"AUTH {mechanism}", "8BITMIME")
    if tls == "starttls":
        server = scripted(
            Script(ehlo_extensions=("STARTTLS", *extensions), credentials={USER: PASSWORD}),
            cert="localhost",
        )
        config = make_config(server.port, "starttls", **pinned(certs))
    else:
        server = scripted(Script(ehlo_extensions=extensions, credentials={USER: PASSWORD}))
        config = make_config(server.port)

    send_one(config)

    [log] = server.wait_closed()
    assert [(a.mechanism, a.username, a.password) for a in log.auth] == [
        (mechanism, USER, PASSWORD)
    ]
    assert log.tls is (tls == "starttls")
    assert len(log.messages) == 1
    # the bytes on the wire are the forms the redaction test looks for
    wire = bytes(log.raw).decode()
    assert SECRET_FORMS[f"{mechanism} base64"] in wire


# ------------------------------------------------------------------------------ failure


def assert_refused(error: AuthenticationError) -> None:
    assert error.transient is True  # fixing the credentials lets the queue drain
    assert error.phase == "connect"
    assert error.ambiguous is False


def test_wrong_password_against_aiosmtpd(make_sink: MakeSink) -> None:
    sink = make_sink(auth={USER: "the-right-one"})
    with pytest.raises(AuthenticationError, match="535") as caught:
        send_one(make_config(sink.port))
    assert_refused(caught.value)
    sink_closed(sink)
    assert "MAIL" not in sink.verbs and sink.messages == []
    assert [c.authenticated_user for c in sink.connections] == [None]
    # One mechanism, tried once: a wrong password is not sent again with LOGIN.
    assert sink.verbs.count("AUTH") == 1


@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN"])
def test_wrong_password_with_each_mechanism(mechanism: str, scripted: Scripted) -> None:
    server = scripted(Script(ehlo_extensions=(f"AUTH {mechanism}",), credentials={USER: "other"}))
    with pytest.raises(AuthenticationError) as caught:
        send_one(make_config(server.port))
    assert_refused(caught.value)
    [log] = server.wait_closed()
    assert len(log.auth) == 1 and log.auth[0].mechanism == mechanism
    assert not {"MAIL", "RCPT", "DATA"} & set(log.verbs)


@pytest.mark.parametrize("reply", [Reply(454, "4.7.0 try later"), Reply(534, "5.7.9 too weak")])
def test_other_auth_refusals_are_authentication_errors(scripted: Scripted, reply: Reply) -> None:
    server = scripted(Script(ehlo_extensions=("AUTH PLAIN",), on={"AUTH": reply}))
    with pytest.raises(AuthenticationError, match=str(reply.code)) as caught:
        send_one(make_config(server.port))
    assert_refused(caught.value)
    [log] = server.wait_closed()
    assert not {"MAIL", "RCPT", "DATA"} & set(log.verbs)


def test_credentials_but_no_auth_offered(sink: SMTPSink) -> None:
    with pytest.raises(AuthenticationError, match="AUTH") as caught:
        send_one(make_config(sink.port))
    assert_refused(caught.value)
    sink_closed(sink)
    # no AUTH sent blind, and no mail sent unauthenticated
    assert sink.verbs in (["EHLO"], ["EHLO", "QUIT"])


def test_plaintext_auth_only_to_loopback_unless_allowed() -> None:
    settings: dict[str, Any] = {
        "host": "smtp.example.com",
        "sender": SENDER,
        "username": USER,
        "password": PASSWORD,
    }
    with pytest.raises(pydantic.ValidationError, match="allow_plaintext_auth") as caught:
        MailConfig(**settings)
    assert PASSWORD not in str(caught.value)
    assert PASSWORD not in caught.value.json()
    assert MailConfig(**settings, allow_plaintext_auth=True).allow_plaintext_auth
    assert MailConfig(**settings, tls="starttls").tls == "starttls"
    assert MailConfig(**{**settings, "host": "127.0.0.1"}).username == USER


# ---------------------------------------------------------------------------- redaction


def _chain(error: BaseException) -> Iterator[BaseException]:
    """The error, its __cause__ and __context__, recursively (each once)."""
    seen: set[int] = set()
    todo = [error]
    while todo:
        current = todo.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        todo.extend(e for e in (current.__cause__, current.__context__) if e is not None)


def _error_texts(error: BaseException) -> list[str]:
    texts = ["".join(traceback.format_exception(error))]
    for e in _chain(error):
        texts += [str(e), repr(e), repr(e.args), "".join(traceback.format_exception_only(e))]
        texts += [repr(v) for v in vars(e).values()] if hasattr(e, "__dict__") else []
    return texts


def _record_texts(record: logging.LogRecord) -> list[str]:
    texts = [record.getMessage(), str(record.msg), repr(record.args)]
    texts += [repr(v) for k, v in vars(record).items() if k not in ("msg", "args")]
    if record.exc_info and record.exc_info[1] is not None:
        texts += _error_texts(record.exc_info[1])
    return texts


@pytest.fixture
def debug_logs(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.DEBUG)
    caplog.set_level(logging.DEBUG, logger="smtpnotify")
    return caplog


def test_password_never_leaks(
    debug_logs: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
    scripted: Scripted,
    make_sink: MakeSink,
    tls_sink: TLSSink,
    certs: CertificateBundle,
) -> None:
    texts: list[str] = []
    errors: list[SMTPNotifyError] = []
    reports: list[VerifyReport] = []
    results: list[SendResult] = []
    configs: list[MailConfig] = []

    def run(config: MailConfig, *, fails: bool) -> None:
        configs.append(config)
        with Notifier(config) as notifier:
            texts.extend([repr(notifier), str(notifier)])
            reports.append(notifier.verify())
            if fails:
                with pytest.raises(AuthenticationError) as caught:
                    notifier.send(NOTE)
                errors.append(caught.value)
            else:
                results.append(notifier.send(NOTE))
                outcome = notifier.send_many([NOTE])
                assert all(isinstance(r, SendResult) for r in outcome)

    # success and failure with each mechanism, over plain text and over STARTTLS
    for mechanism in ("PLAIN", "LOGIN"):
        for password, fails in ((PASSWORD, False), ("not-" + PASSWORD, True)):
            server = scripted(
                Script(ehlo_extensions=(f"AUTH {mechanism}",), credentials={USER: password})
            )
            run(make_config(server.port), fails=fails)
            server_tls = scripted(
                Script(
                    ehlo_extensions=("STARTTLS", f"AUTH {mechanism}"), credentials={USER: password}
                ),
                cert="localhost",
            )
            run(make_config(server_tls.port, "starttls", **pinned(certs)), fails=fails)
    # and the real aiosmtpd, plain and implicit TLS, good and bad credentials
    good, bad = make_sink(auth={USER: PASSWORD}), make_sink(auth={USER: "x"})
    run(make_config(good.port), fails=False)
    run(make_config(bad.port), fails=True)
    tls_good = tls_sink(tls="ssl", auth={USER: PASSWORD})
    run(make_config(tls_good.port, "ssl", **pinned(certs)), fails=False)

    assert len(errors) == 5 and len(results) == 6 and len(reports) == 11
    assert [r.ok for r in reports].count(False) == 5
    assert any(
        r.name.startswith("smtpnotify")
        and r.levelno == logging.DEBUG
        and "redacted" in r.getMessage()
        for r in debug_logs.records
    ), "the DEBUG lines of the SMTP conversation were not captured"

    for record in debug_logs.records:
        texts.extend(_record_texts(record))
    texts.append(debug_logs.text)
    for error in errors:
        texts.extend(_error_texts(error))
    for report in reports:
        texts.extend([str(report), repr(report)])
        if report.error is not None:
            texts.extend(_error_texts(report.error))
    texts.extend(repr(r) for r in results)
    texts.extend(str(r) for r in results)
    for config in configs:
        texts.extend(
            [
                repr(config),
                str(config),
                config.model_dump_json(),
                str(config.model_dump()),
                repr(config.model_dump()),
                repr(config.password),
            ]
        )
    captured = capsys.readouterr()
    texts.extend([captured.out, captured.err])

    for name, form in SECRET_FORMS.items():
        leaks = [t for t in texts if form in t]
        assert not leaks, f"the {name} leaked: {leaks[0][:500]!r}"
    # and the secret is still there for whoever asks explicitly
    assert configs[0].password is not None
    assert configs[0].password.get_secret_value() == PASSWORD
    assert PASSWORD in configs[0].model_dump_json(context={"reveal_secrets": True})


def test_a_server_echoing_the_credentials_does_not_make_them_leak(
    debug_logs: pytest.LogCaptureFixture, scripted: Scripted
) -> None:
    """A (broken or hostile) server that quotes the AUTH data back in its refusal."""
    echo = " ".join(SECRET_FORMS.values())
    server = scripted(
        Script(
            ehlo_extensions=("AUTH PLAIN LOGIN",),
            on={"AUTH": Reply(535, f"5.7.8 rejected {echo}")},
        )
    )
    with Notifier(make_config(server.port)) as notifier:
        with pytest.raises(AuthenticationError, match="535") as caught:
            notifier.send(NOTE)
        report = notifier.verify()
    assert isinstance(report.error, AuthenticationError)

    texts = _error_texts(caught.value) + _error_texts(report.error) + [str(report), repr(report)]
    for record in debug_logs.records:
        texts.extend(_record_texts(record))
    texts.append(debug_logs.text)
    for name, form in SECRET_FORMS.items():
        leaks = [t for t in texts if form in t]
        assert not leaks, f"the {name} leaked: {leaks[0][:500]!r}"


def test_a_non_ascii_password_is_an_authentication_error_that_does_not_leak(
    make_sink: MakeSink,
) -> None:
    password = "pässwört-s3cret"
    sink = make_sink(auth={USER: password})
    with pytest.raises(AuthenticationError, match="ASCII") as caught:
        send_one(make_config(sink.port, password=password))
    assert_refused(caught.value)
    for text in _error_texts(caught.value):
        assert password not in text and "pässwört" not in text
    sink_closed(sink)
    assert "MAIL" not in sink.verbs


@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN", "CRAM-MD5"])
def test_a_malformed_auth_challenge_is_an_authentication_error(
    mechanism: str, scripted: Scripted
) -> None:
    """A 334 whose challenge is not base64: a typed error, not binascii.Error."""
    server = scripted(
        Script(ehlo_extensions=(f"AUTH {mechanism}",), on={"AUTH": Reply(334, "abc")})
    )
    with pytest.raises(AuthenticationError, match="malformed") as caught:
        send_one(make_config(server.port))
    assert_refused(caught.value)
    [log] = server.wait_closed()
    assert not {"MAIL", "RCPT", "DATA"} & set(log.verbs)
