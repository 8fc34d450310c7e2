"""The exceptions smtpnotify raises.

Every error is an :class:`SMTPNotifyError`; the tree follows SPEC §4::

    SMTPNotifyError                       .transient  .phase  .ambiguous
    ├── InvalidMessage(ValueError)        bad header, bad address, no recipients: permanent
    ├── ConnectError(ConnectionError)     refused, DNS failure, dropped: transient
    │   └── ConnectTimeout(TimeoutError)
    ├── SendTimeout(TimeoutError)         transient; .ambiguous after the final "."
    ├── TLSError                          handshake failure: transient
    │   ├── CertificateError              verification or pin mismatch: transient
    │   └── StartTLSNotSupported          transient
    ├── AuthenticationError               transient (fixing credentials lets the queue drain)
    └── ResponseError                     .code .enhanced_code .message .command
        ├── TransientError                4xx
        ├── PermanentError                5xx
        └── RecipientsRefused             every recipient refused; .refused {addr: (code, msg)}

``transient`` decides what the outbox does with a failure: try again after the
retry interval, or give up now.  ``ambiguous`` is true only when the server may
already have accepted the message (a timeout or drop after the final ``.`` of
DATA): retrying then may deliver the message twice.
"""

from __future__ import annotations

import re
import warnings
from typing import Literal

__all__ = [
    "AuthenticationError",
    "CertificateError",
    "ConnectError",
    "ConnectTimeout",
    "InsecureTrustWarning",
    "InvalidMessage",
    "PermanentError",
    "Phase",
    "RecipientsRefused",
    "ResponseError",
    "SMTPNotifyError",
    "SendTimeout",
    "StartTLSNotSupported",
    "TLSError",
    "TransientError",
]

Phase = Literal["connect", "send"]

_ENHANCED = re.compile(r"^([245]\.\d{1,3}\.\d{1,3})(?:\s+|$)")


class SMTPNotifyError(Exception):
    """Base class of every error smtpnotify raises.

    Attributes:
        transient: ``True`` when trying again later may succeed.
        phase: ``"connect"`` or ``"send"`` when the error happened talking to a
            server, ``None`` otherwise (for example an invalid message).
        ambiguous: ``True`` when the server may have accepted the message even
            though the client saw a failure (timeout or drop after the final ``.``).
    """

    transient: bool = True

    def __init__(
        self,
        message: str,
        *,
        phase: Phase | None = None,
        ambiguous: bool = False,
        transient: bool | None = None,
    ) -> None:
        super().__init__(message)
        self.phase: Phase | None = phase
        self.ambiguous: bool = ambiguous
        if transient is not None:
            self.transient = transient


class InvalidMessage(SMTPNotifyError, ValueError):
    """The message can never be sent as it is: a bad header, address or no recipient."""

    transient = False


class ConnectError(SMTPNotifyError, ConnectionError):
    """The connection could not be made, or was dropped (``phase`` says when)."""


class ConnectTimeout(ConnectError, TimeoutError):
    """The connect phase did not finish within ``connect_timeout``."""


class SendTimeout(SMTPNotifyError, TimeoutError):
    """Sending one message did not finish within ``send_timeout``."""


class TLSError(SMTPNotifyError):
    """The TLS handshake failed."""


class CertificateError(TLSError):
    """The server's certificate failed verification or did not match a pin."""


class StartTLSNotSupported(TLSError):
    """``tls="starttls"`` was required but the server did not offer or accept STARTTLS."""


class AuthenticationError(SMTPNotifyError):
    """The server refused the credentials (or offered no usable mechanism)."""


class ResponseError(SMTPNotifyError):
    """The server answered a command with an error reply.

    Attributes:
        code: the three-digit reply code.
        enhanced_code: the RFC 3463 enhanced status code (``"5.1.1"``) if given.
        message: the reply text without the enhanced code.
        command: the SMTP verb that drew the reply (``"MAIL"``, ``"RCPT"`` …).
    """

    def __init__(
        self,
        code: int,
        message: str,
        *,
        command: str | None = None,
        phase: Phase | None = None,
        ambiguous: bool = False,
        transient: bool | None = None,
    ) -> None:
        match = _ENHANCED.match(message)
        self.enhanced_code: str | None = match.group(1) if match else None
        self.message: str = message[match.end() :] if match else message
        self.code: int = code
        self.command: str | None = command
        where = f" to {command}" if command else ""
        super().__init__(
            f"{code} {message}".strip() + f" (reply{where})",
            phase=phase,
            ambiguous=ambiguous,
            transient=(400 <= code < 500) if transient is None else transient,
        )


class TransientError(ResponseError):
    """A 4xx reply: the server asks to try again later."""

    transient = True


class PermanentError(ResponseError):
    """A 5xx reply: the server will not accept this, now or later."""

    transient = False


class RecipientsRefused(ResponseError):
    """Every recipient was refused.

    ``refused`` maps each address to ``(code, message)``.  ``transient`` is true
    when any refusal was a 4xx (only those recipients are worth retrying).
    """

    def __init__(
        self,
        refused: dict[str, tuple[int, str]],
        *,
        phase: Phase | None = "send",
    ) -> None:
        self.refused: dict[str, tuple[int, str]] = dict(refused)
        # Report the most hopeful refusal: a 4xx if any, so ``code`` agrees with ``transient``.
        code, text = min(self.refused.values(), key=lambda r: r[0])
        super().__init__(
            code,
            text,
            command="RCPT",
            phase=phase,
            transient=any(400 <= c < 500 for c, _ in self.refused.values()),
        )
        self.args = (f"all {len(self.refused)} recipient(s) refused; first: {code} {text}",)


def response_error(
    code: int, message: str, *, command: str | None, phase: Phase | None, ambiguous: bool = False
) -> ResponseError:
    """The most specific :class:`ResponseError` for a reply ``code``."""
    cls: type[ResponseError] = TransientError if 400 <= code < 500 else PermanentError
    return cls(code, message, command=command, phase=phase, ambiguous=ambiguous)


class InsecureTrustWarning(UserWarning):
    """Issued when a :class:`~smtpnotify.Notifier` is created with ``trust="all"`` and TLS on."""


# Like urllib3: show it once per place by default, unless the application says otherwise.
warnings.simplefilter("default", InsecureTrustWarning, append=True)
