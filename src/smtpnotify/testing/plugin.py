"""pytest fixtures for testing an application's notifications.

Installed with ``smtpnotify[testing]``, this plugin is registered with pytest
by an entry point (``pytest11``): the fixtures are there in every test, with
nothing to import.  (With ``PYTEST_DISABLE_PLUGIN_AUTOLOAD`` set, enable it
with ``-p smtpnotify`` or ``pytest_plugins = ["smtpnotify.testing.plugin"]``.)

The fixtures (function-scoped unless said otherwise):

* ``smtp_sink``: a started plain :class:`~smtpnotify.testing.SMTPSink` on
  127.0.0.1, closed after the test.
* ``smtp_sink_factory``: ``smtp_sink_factory(**SMTPSink arguments)`` starts
  another sink; with ``tls="starttls"`` or ``"ssl"`` and no ``ssl_context`` it
  presents a certificate from ``smtp_certificates``.  All closed after the test.
* ``smtp_certificates`` (session): a :class:`~smtpnotify.testing.CertificateBundle`.
* ``mail_config``: a :class:`~smtpnotify.MailConfig` for ``smtp_sink``
  (:func:`mail_config_for`).
* ``mail_config_factory``: ``mail_config_factory(sink, **overrides)``, a config
  for any sink; for a TLS sink it trusts ``smtp_certificates``' CA.
* ``memory_outbox``: an empty :class:`~smtpnotify.MemoryOutbox`, closed after the test.
* ``notifier``: ``Notifier(mail_config, memory_outbox)``, closed after the test.

A test of an application's password-reset mail, for example::

    def test_reset_mail(notifier, smtp_sink):
        myapp.send_reset_mail(notifier, "ann@example.com")
        [message] = smtp_sink.wait_for(1)
        assert message.rcpt_tos == ("ann@example.com",)
        assert "reset" in message.message["Subject"]

The fixture names all start with ``smtp_``, ``mail_``, ``memory_`` or are
``notifier``; a fixture of the same name in a project's ``conftest.py``
takes precedence over the plugin's.

Loading the plugin imports the ``smtpnotify`` package but not aiosmtpd or
trustme: those are imported when a fixture is first used, so test runs that
use no fixture pay nothing for them (and work without them installed).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from smtpnotify import MailConfig, MemoryOutbox, Notifier
    from smtpnotify.testing import CertificateBundle, SMTPSink

__all__ = [
    "DEFAULT_SENDER",
    "mail_config",
    "mail_config_factory",
    "mail_config_for",
    "memory_outbox",
    "notifier",
    "smtp_certificates",
    "smtp_sink",
    "smtp_sink_factory",
]

DEFAULT_SENDER = "smtpnotify tests <noreply@example.com>"
"""The ``sender`` of the configs the fixtures make, unless overridden."""

_DEFAULT_TIMEOUT = 10.0


def mail_config_for(
    sink: SMTPSink, *, certificates: CertificateBundle | None = None, **overrides: Any
) -> MailConfig:
    """A :class:`~smtpnotify.MailConfig` that sends to ``sink``.

    ``host``, ``port`` and ``tls`` come from the sink; ``sender`` is
    :data:`DEFAULT_SENDER` and ``timeout`` 10 s.  For a TLS sink, pass the
    ``certificates`` whose CA issued its certificate: the config then trusts
    that CA only (``trust="pinned"``).  ``overrides`` are any other
    ``MailConfig`` fields, and win over all of the above.
    """
    from smtpnotify import MailConfig

    fields: dict[str, Any] = {
        "host": sink.host,
        "port": sink.port,
        "tls": sink.tls,
        "sender": DEFAULT_SENDER,
        "timeout": _DEFAULT_TIMEOUT,
    }
    if sink.tls != "none" and certificates is not None:
        fields["trust"] = "pinned"
        fields["pinned_certificates"] = (certificates.ca_pem,)
    fields.update(overrides)
    return MailConfig(**fields)


@pytest.fixture(scope="session")
def smtp_certificates() -> CertificateBundle:
    """Throw-away CAs and server certificates (trustme), made once per test session."""
    from smtpnotify.testing import make_certificates

    return make_certificates()


@pytest.fixture
def smtp_sink_factory(request: pytest.FixtureRequest) -> Iterator[Callable[..., SMTPSink]]:
    """Start SMTP sinks: ``smtp_sink_factory(**kwargs)`` takes ``SMTPSink``'s arguments.

    ``smtp_sink_factory(tls="starttls")`` or ``(tls="ssl")`` without an
    ``ssl_context`` presents the ``"localhost"`` certificate of
    ``smtp_certificates``.  Every sink is closed after the test.
    """
    from smtpnotify.testing import SMTPSink

    sinks: list[SMTPSink] = []

    def factory(**kwargs: Any) -> SMTPSink:
        if kwargs.get("tls", "none") != "none" and kwargs.get("ssl_context") is None:
            bundle: CertificateBundle = request.getfixturevalue("smtp_certificates")
            kwargs["ssl_context"] = bundle.server_context()
        sink = SMTPSink(**kwargs).start()
        sinks.append(sink)
        return sink

    try:
        yield factory
    finally:
        for sink in sinks:
            sink.close()


@pytest.fixture
def smtp_sink(smtp_sink_factory: Callable[..., SMTPSink]) -> SMTPSink:
    """A started plain-SMTP sink on 127.0.0.1 that accepts every message."""
    return smtp_sink_factory()


@pytest.fixture
def mail_config_factory(request: pytest.FixtureRequest) -> Callable[..., MailConfig]:
    """``mail_config_factory(sink, **overrides)``: :func:`mail_config_for` with the
    session's ``smtp_certificates`` (so a TLS sink from ``smtp_sink_factory`` is trusted).
    """

    def factory(sink: SMTPSink, **overrides: Any) -> MailConfig:
        certificates = None
        if sink.tls != "none":
            certificates = request.getfixturevalue("smtp_certificates")
        return mail_config_for(sink, certificates=certificates, **overrides)

    return factory


@pytest.fixture
def mail_config(smtp_sink: SMTPSink) -> MailConfig:
    """A :class:`~smtpnotify.MailConfig` that sends to ``smtp_sink``.

    Plain SMTP to 127.0.0.1, ``sender`` :data:`DEFAULT_SENDER`, 10 s
    deadlines.  Change it with ``mail_config.model_copy(update={...})``.
    """
    return mail_config_for(smtp_sink)


@pytest.fixture
def memory_outbox() -> Iterator[MemoryOutbox]:
    """An empty :class:`~smtpnotify.MemoryOutbox`, closed after the test."""
    from smtpnotify import MemoryOutbox

    outbox = MemoryOutbox()
    try:
        yield outbox
    finally:
        outbox.close()


@pytest.fixture
def notifier(mail_config: MailConfig, memory_outbox: MemoryOutbox) -> Iterator[Notifier]:
    """``Notifier(mail_config, memory_outbox)``: sends to ``smtp_sink``; closed after the test.

    ``notifier.send(...)`` delivers at once; ``notifier.notify(...)`` queues
    in ``memory_outbox``, and ``notifier.deliver_due()`` delivers what is due.
    """
    from smtpnotify import Notifier

    instance = Notifier(mail_config, memory_outbox)
    try:
        yield instance
    finally:
        instance.close()
