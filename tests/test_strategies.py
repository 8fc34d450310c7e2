"""The hypothesis strategies of ``smtpnotify.testing.strategies``.

What they generate must be valid (configs validate and survive a JSON round
trip; notifications are accepted by ``prepare`` and delivered to a real
SMTPSink), varied (every tls / trust combination turns up), and respect the
overrides; the injection strategy's values must all be refused.
"""

from __future__ import annotations

import email
import email.policy
import re
from collections.abc import Callable, Iterator
from email.message import EmailMessage
from typing import TypeVar

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from smtpnotify import Attachment, InvalidMessage, MailConfig, Notification, Notifier
from smtpnotify._message import prepare, validate_address
from smtpnotify.testing import SMTPSink, mail_config_for
from smtpnotify.testing.strategies import (
    LINE_BREAKS,
    addresses,
    header_values_with_newlines,
    mail_configs,
    notifications,
)

SENDER = "Change Desk <noreply@example.com>"
LINE_BREAK = re.compile(r"\r\n|\r|\n")
HEX64 = re.compile(r"[0-9a-f]{64}")

T = TypeVar("T")

quick = settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def parse(data: bytes) -> EmailMessage:
    """What a receiver parses; for SMTPUTF8 messages the headers are UTF-8 text."""
    try:
        data.decode("ascii")
    except UnicodeDecodeError:
        msg = email.message_from_string(data.decode("utf-8"), policy=email.policy.default)
    else:
        msg = email.message_from_bytes(data, policy=email.policy.default)
    assert isinstance(msg, EmailMessage)
    return msg


def envelope(n: Notification) -> tuple[str, ...]:
    """To + Cc + Bcc as bare addresses, first spelling of each kept."""
    seen: dict[str, str] = {}
    for address in (*n.to, *n.cc, *n.bcc):
        spec = validate_address(address)
        seen.setdefault(spec.lower(), spec)
    return tuple(seen.values())


# ------------------------------------------------------------------------------ configs


@quick
@given(config=mail_configs())
def test_every_config_validates_and_round_trips_through_json(config: MailConfig) -> None:
    dumped = config.model_dump_json(context={"reveal_secrets": True})
    again = MailConfig.model_validate_json(dumped)
    assert again == config
    assert MailConfig.model_validate(config.model_dump(context={"reveal_secrets": True})) == config
    validate_address(config.sender)  # the sender is usable by prepare() too
    if config.trust == "pinned":
        assert config.tls != "none"
        assert config.pinned_fingerprints
        assert all(HEX64.fullmatch(fp) for fp in config.pinned_fingerprints)
    if config.password is not None:
        assert "password=SecretStr('**********')" in repr(config)


def sample(strategy: st.SearchStrategy[T], n: int = 100) -> list[T]:
    """``n`` examples of ``strategy``: generation only (no shrinking, no database),
    derandomized so that the coverage checks below cannot be flaky."""
    seen: list[T] = []

    @settings(
        max_examples=n, deadline=None, database=None, phases=[Phase.generate], derandomize=True
    )
    @given(strategy)
    def record(value: T) -> None:
        seen.append(value)

    record()
    return seen


def test_configs_cover_tls_trust_auth_deadlines_and_retries() -> None:
    configs = sample(mail_configs(), n=300)
    combos = {(c.tls, c.trust) for c in configs}
    assert combos == {
        (tls, trust)
        for tls in ("none", "starttls", "ssl")
        for trust in ("verify", "all", "pinned")
        if (tls, trust) != ("none", "pinned")
    }
    assert any(c.username is not None and c.tls == "none" and not c.is_loopback for c in configs)
    assert any(c.username is None for c in configs)
    assert any(c.connect_timeout is not None and c.send_timeout is not None for c in configs)
    assert any(c.retry_backoff > 1 and c.max_retry_interval is not None for c in configs)
    assert any(len(c.pinned_fingerprints) > 1 for c in configs)
    assert len({c.timeout for c in configs}) > 10


@quick
@given(
    config=mail_configs(
        host="127.0.0.1", port=2525, tls="none", timeout=st.sampled_from([2.0, 3.0])
    )
)
def test_fixed_and_strategy_overrides_are_respected(config: MailConfig) -> None:
    assert (config.host, config.port, config.tls) == ("127.0.0.1", 2525, "none")
    assert config.timeout in (2.0, 3.0)
    assert config.trust != "pinned"


@quick
@given(config=mail_configs(trust="pinned"))
def test_fixing_one_field_adapts_the_others(config: MailConfig) -> None:
    assert config.tls in ("starttls", "ssl")
    assert config.pinned_fingerprints


@quick
@given(config=mail_configs(host="smtp.example.com", tls="none", username="app"))
def test_plaintext_auth_to_a_remote_host_is_allowed_explicitly(config: MailConfig) -> None:
    assert config.password is not None
    assert config.allow_plaintext_auth is True


def test_unknown_override_is_an_error() -> None:
    with pytest.raises(TypeError, match="passwd"):
        mail_configs(passwd="x")


# ---------------------------------------------------------------------------- addresses


@quick
@given(address=addresses())
def test_every_address_is_valid_for_messages_and_as_sender(address: str) -> None:
    spec = validate_address(address)
    assert spec.isascii()  # smtputf8=False: ASCII local part, IDNA domain
    assert MailConfig(sender=address).sender_address.lower() == (
        address.rsplit("<", 1)[-1].rstrip(">").lower()
    )


@quick
@given(address=addresses(display_name=True, smtputf8=True))
def test_named_smtputf8_addresses(address: str) -> None:
    assert address.endswith(">")
    validate_address(address)
    Notification(address, "s")


def test_addresses_include_hard_cases() -> None:
    found = sample(addresses(smtputf8=True))
    assert any(not a.rsplit("@", 1)[0].isascii() for a in found if "<" not in a)
    assert any(not a.rsplit("@", 1)[1].isascii() for a in found)  # IDN domain
    assert any(a.startswith('"') for a in found)  # a quoted display name
    assert any("<" not in a for a in found)  # a bare address


# ------------------------------------------------------------------------ notifications


@quick
@given(n=notifications())
def test_every_notification_is_accepted_by_prepare(n: Notification) -> None:
    prepared = prepare(n, sender=SENDER)
    assert prepared.recipients == envelope(n)
    assert prepared.smtputf8 is False
    msg = parse(prepared.data)
    assert "Bcc" not in msg
    assert str(msg["Subject"]) == n.subject
    for name, value in n.headers.items():
        assert str(msg[name]) == value
    got = [part.get_payload(decode=True) for part in msg.iter_attachments()]
    assert got == [a.content for a in n.attachments]


def test_notifications_include_hard_cases() -> None:
    found = sample(notifications(smtputf8=True), 60)
    assert any(not n.subject.isascii() for n in found)
    assert any(n.cc and n.bcc and n.attachments for n in found)
    assert any(n.text and "\n." in LINE_BREAK.sub("\n", n.text) for n in found)
    assert any(not a.filename.isascii() for n in found for a in n.attachments)
    assert any(not a.isascii() for n in found for a in n.to)
    assert any(n.headers for n in found)


@pytest.fixture(scope="module")
def module_sink() -> Iterator[SMTPSink]:
    with SMTPSink() as sink:
        yield sink


@pytest.fixture(scope="module")
def module_notifier(module_sink: SMTPSink) -> Iterator[Notifier]:
    with Notifier(mail_config_for(module_sink, sender=SENDER)) as notifier:
        yield notifier


@settings(
    max_examples=15,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(n=notifications(smtputf8=True))
def test_every_notification_is_delivered(
    n: Notification, module_sink: SMTPSink, module_notifier: Notifier
) -> None:
    module_sink.reset()
    result = module_notifier.send(n)
    [received] = module_sink.wait_for(1)
    assert received.rcpt_tos == envelope(n)
    assert received.mail_from == "noreply@example.com"
    msg = parse(received.data)
    assert msg["Message-ID"] == result.message_id
    assert "Bcc" not in msg
    assert str(msg["Subject"]) == n.subject
    if n.text is not None:
        body = msg.get_body(("plain",))
        assert body is not None
        assert body.get_content() == LINE_BREAK.sub("\r\n", n.text)
    got = [part.get_payload(decode=True) for part in msg.iter_attachments()]
    assert got == [a.content for a in n.attachments]


# ---------------------------------------------------------------------- header injection


@quick
@given(value=header_values_with_newlines())
def test_injection_values_hold_a_line_break(value: str) -> None:
    assert any(br in value for br in LINE_BREAKS)
    assert len(value.splitlines()) >= 2 or value.endswith(tuple(LINE_BREAKS))


@quick
@given(value=header_values_with_newlines())
def test_every_injection_is_refused_everywhere(value: str) -> None:
    quoted = value.replace("\\", "\\\\").replace('"', '\\"')
    attempts: dict[str, Callable[[], object]] = {
        "subject": lambda: Notification("a@example.com", value, text="x"),
        "header": lambda: Notification("a@example.com", "s", headers={"X-Tag": value}),
        "display name": lambda: Notification(f'"{quoted}" <a@example.com>', "s"),
        "cc": lambda: Notification("a@example.com", "s", cc=f"b@example.com{value}"),
        "filename": lambda: Attachment(value, b"data"),
    }
    for where, attempt in attempts.items():
        with pytest.raises(InvalidMessage):
            attempt()
            pytest.fail(f"accepted a line break in the {where}")
    with pytest.raises(ValidationError):
        MailConfig(sender=f'"{quoted}" <a@example.com>')
    with pytest.raises(ValidationError):
        MailConfig(sender="a@example.com", username=value, password="pw")
