"""Test helpers for applications that send mail with smtpnotify.

Needs the ``smtpnotify[testing]`` extra (aiosmtpd; trustme for certificates).

* :class:`SMTPSink`: a real SMTP server on loopback (aiosmtpd) that records
  every message and command, with STARTTLS / implicit TLS, AUTH and fault
  injection.
* :func:`make_certificates`: throw-away CAs and server certificates (trustme)
  for TLS tests, as a :class:`CertificateBundle`.

Example::

    from smtpnotify.testing import SMTPSink

    def test_sends_alert():
        with SMTPSink() as sink:
            app.alert(smtp_host=sink.host, smtp_port=sink.port)
            [message] = sink.wait_for(1)
            assert message.message["Subject"] == "Disk full"
"""

from __future__ import annotations

from smtpnotify.testing._certs import CertificateBundle, ServerCertKind, make_certificates
from smtpnotify.testing._sink import ReplySpec, SinkConnection, SinkMessage, SMTPSink

__all__ = [
    "CertificateBundle",
    "ReplySpec",
    "SMTPSink",
    "ServerCertKind",
    "SinkConnection",
    "SinkMessage",
    "make_certificates",
]
