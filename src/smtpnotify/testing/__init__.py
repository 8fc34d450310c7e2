"""Test helpers for applications that send mail with smtpnotify.

Needs the ``smtpnotify[testing]`` extra (aiosmtpd; trustme for certificates).

* :class:`SMTPSink`: a real SMTP server on loopback (aiosmtpd) that records
  every message and command, with STARTTLS / implicit TLS, AUTH and fault
  injection.
* :func:`make_certificates`: throw-away CAs and server certificates (trustme)
  for TLS tests, as a :class:`CertificateBundle`.
* :mod:`smtpnotify.testing.plugin`: pytest fixtures (``smtp_sink``,
  ``mail_config``, ``notifier``, ...), registered with pytest automatically;
  :func:`mail_config_for` builds a config for any sink.
* :mod:`smtpnotify.testing.strategies`: hypothesis strategies for configs,
  addresses and notifications (needs hypothesis).
* :mod:`smtpnotify.testing.conformance`: the test suite every outbox passes.

Example::

    from smtpnotify.testing import SMTPSink

    def test_sends_alert():
        with SMTPSink() as sink:
            app.alert(smtp_host=sink.host, smtp_port=sink.port)
            [message] = sink.wait_for(1)
            assert message.message["Subject"] == "Disk full"
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from smtpnotify.testing._certs import CertificateBundle, ServerCertKind, make_certificates

if TYPE_CHECKING:
    from smtpnotify.testing._sink import ReplySpec, SinkConnection, SinkMessage, SMTPSink
    from smtpnotify.testing.plugin import mail_config_for

__all__ = [
    "CertificateBundle",
    "ReplySpec",
    "SMTPSink",
    "ServerCertKind",
    "SinkConnection",
    "SinkMessage",
    "mail_config_for",
    "make_certificates",
]

# Imported on first use: the pytest plugin (registered by entry point, so loaded
# by every pytest run where smtpnotify is installed) imports this package, which
# must then work without aiosmtpd, and cheaply.
_LAZY = {
    "ReplySpec": "_sink",
    "SMTPSink": "_sink",
    "SinkConnection": "_sink",
    "SinkMessage": "_sink",
    "mail_config_for": "plugin",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value
