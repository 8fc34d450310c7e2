"""smtpnotify: notification email an application can rely on.

A typed :class:`MailConfig`, a :class:`Notifier` that sends through ``smtplib``
under a connect deadline and a send deadline, TLS with ``verify`` / ``all`` /
``pinned`` trust, and a durable outbox that retries until the expiration
interval.  See https://github.com/ (docs/) for the guide.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ._certfetch import fetch_server_certificate
from ._config import MailConfig
from ._errors import (
    AuthenticationError,
    CertificateError,
    ConnectError,
    ConnectTimeout,
    InsecureTrustWarning,
    InvalidMessage,
    PermanentError,
    RecipientsRefused,
    ResponseError,
    SendTimeout,
    SMTPNotifyError,
    StartTLSNotSupported,
    TLSError,
    TransientError,
)
from ._message import Attachment, Notification
from ._notifier import Notifier
from ._results import DeliveryReport, SendResult, VerifyReport, VerifyStep
from ._tls import ServerCertificate
from .outbox import MemoryOutbox, Outbox, OutboxEntry, OutboxStatus, SQLiteOutbox

if TYPE_CHECKING:
    from .outbox.postgres import PostgresOutbox

__version__ = "0.1.0"

__all__ = [
    "Attachment",
    "AuthenticationError",
    "CertificateError",
    "ConnectError",
    "ConnectTimeout",
    "DeliveryReport",
    "InsecureTrustWarning",
    "InvalidMessage",
    "MailConfig",
    "MemoryOutbox",
    "Notification",
    "Notifier",
    "Outbox",
    "OutboxEntry",
    "OutboxStatus",
    "PermanentError",
    "PostgresOutbox",
    "RecipientsRefused",
    "ResponseError",
    "SMTPNotifyError",
    "SQLiteOutbox",
    "SendResult",
    "SendTimeout",
    "ServerCertificate",
    "StartTLSNotSupported",
    "TLSError",
    "TransientError",
    "VerifyReport",
    "VerifyStep",
    "fetch_server_certificate",
]


def __getattr__(name: str) -> Any:
    # PostgresOutbox needs the optional psycopg; import it only when asked for.
    if name == "PostgresOutbox":
        from .outbox.postgres import PostgresOutbox

        return PostgresOutbox
    raise AttributeError(f"module 'smtpnotify' has no attribute {name!r}")
