"""The wire-ready form of a message, shared by the session and the outbox."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["PreparedMessage"]


@dataclass(frozen=True, slots=True)
class PreparedMessage:
    """A validated message, ready for the SMTP envelope and DATA.

    Attributes:
        sender: the envelope sender (``MAIL FROM``), a bare addr-spec with an
            IDNA-encoded domain.
        recipients: envelope recipients (To, Cc and Bcc), deduplicated, in order,
            bare addr-specs with IDNA-encoded domains.
        message_id: the ``Message-ID`` header value, angle brackets included.
        data: the whole message (headers and body) with CRLF line endings,
            not yet dot-stuffed.  Bcc is never in it.
        smtputf8: ``True`` when an address needs the SMTPUTF8 extension
            (a non-ASCII local part) or a header holds raw UTF-8 (RFC 6532).
    """

    sender: str
    recipients: tuple[str, ...]
    message_id: str
    data: bytes
    smtputf8: bool = False
