"""What to change when talking to the server failed: one hint per kind of failure."""

from __future__ import annotations

from .._config import MailConfig
from .._errors import (
    AuthenticationError,
    CertificateError,
    ConnectError,
    ConnectTimeout,
    InvalidMessage,
    RecipientsRefused,
    ResponseError,
    SendTimeout,
    SMTPNotifyError,
    StartTLSNotSupported,
    TLSError,
)

__all__ = ["hint_for"]

_TLS_PORTS = {465: "ssl", 587: "starttls", 25: "starttls"}


def _fetch_command(config: MailConfig) -> str:
    tls = "ssl" if config.tls == "ssl" else "starttls"
    return f"smtpnotify cert fetch {config.host} {config.effective_port} --tls {tls}"


def _tls_mismatch(config: MailConfig, step: str | None) -> str | None:
    """A hint when the port and ``tls`` do not fit together (the usual cause of a hang)."""
    port = config.effective_port
    if config.tls == "ssl" and step == "tls" and port != 465:
        return (
            f'tls = "ssl" starts TLS at once, but port {port} usually speaks plain SMTP first: '
            'use tls = "starttls" (port 587), or port 465 with tls = "ssl"'
        )
    if config.tls != "ssl" and step == "greeting" and port == 465:
        return (
            'port 465 expects TLS from the first byte: use tls = "ssl" '
            '(or port 587 with tls = "starttls")'
        )
    return None


def hint_for(error: SMTPNotifyError, config: MailConfig, step: str | None = None) -> str | None:
    """What the user could change, for ``error`` met in ``step`` with ``config``; None if unsure."""
    host, port = config.host, config.effective_port
    if step is None and isinstance(error, TLSError) and not isinstance(error, StartTLSNotSupported):
        step = "tls"
    if isinstance(error, CertificateError):
        text = str(error)
        if "pinned fingerprint" in text:
            return (
                "the server presents a certificate that is not pinned (was it renewed?): "
                f"fetch it with `{_fetch_command(config)}`, confirm the fingerprint with the "
                "server's administrator, and add it to pinned_fingerprints"
            )
        if "hostname" in text.lower() or "ip address mismatch" in text.lower():
            return (
                f"the certificate does not name {host!r}: set host to a name the certificate "
                'holds, or pin it (trust = "pinned") and set check_hostname = false'
            )
        return (
            "the server's certificate is not trusted: pin it "
            f'(`{_fetch_command(config)}`, then trust = "pinned") or fix check_hostname'
        )
    if isinstance(error, StartTLSNotSupported):
        return (
            'the server does not offer STARTTLS here: use tls = "ssl" on port 465, '
            'or tls = "none" if the server is on a network you trust'
        )
    if isinstance(error, ConnectTimeout):
        mismatch = _tls_mismatch(config, step)
        if mismatch:
            return mismatch
        if step == "connect":
            return (
                f"nothing answered at {host}:{port} in time: check host and port, and "
                "whether a firewall drops the connection; raise timeout (or connect_timeout) "
                "if the server is just slow"
            )
        return (
            f"the connect phase took longer than {config.effective_connect_timeout:g} s: raise "
            "timeout (or connect_timeout), and check that host and port are the mail server's"
        )
    if isinstance(error, TLSError):
        mismatch = _tls_mismatch(config, step)
        if mismatch:
            return mismatch
        suggested = _TLS_PORTS.get(port)
        if suggested and suggested != config.tls:
            return f'the TLS handshake failed: port {port} usually needs tls = "{suggested}"'
        return "the TLS handshake failed: check tls and port, and that the server speaks TLS 1.2+"
    if isinstance(error, ConnectError) and error.phase != "send":
        if "resolve" in str(error):
            return f"the name {host!r} does not resolve: check host (and your DNS)"
        return (
            f"could not connect to {host}:{port}: check host and port, that the server is "
            "running, and that no firewall is in the way"
        )
    if isinstance(error, AuthenticationError):
        if "no AUTH" in str(error):
            return (
                "the server offers no authentication here: it may want STARTTLS first "
                '(tls = "starttls"), or no username and password at all'
            )
        return "check username and password (and that this account may send through the server)"
    if isinstance(error, SendTimeout):
        if error.ambiguous:
            return "the server may have accepted the message: check before sending it again"
        return "the server was too slow: raise timeout (or send_timeout)"
    if isinstance(error, RecipientsRefused):
        return "the server refused every recipient: check the addresses"
    if isinstance(error, InvalidMessage):
        return None
    if isinstance(error, ResponseError):
        if error.phase == "connect":
            return (
                f"the server refused {error.command or 'the connection'}: ask its administrator "
                "whether this machine may send through it"
            )
        if error.command == "MAIL":
            return "the server refused the sender: check sender (and whether AUTH is required)"
        return None
    return None
