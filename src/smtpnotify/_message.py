"""Messages: :class:`Notification`, :class:`Attachment` and :func:`prepare`.

:func:`prepare` turns a :class:`Notification` (or an
:class:`email.message.EmailMessage`) into a
:class:`~smtpnotify._prepared.PreparedMessage`: the validated envelope and the
exact bytes for ``DATA``.  Everything that could make a message unsafe or
unsendable is refused here, with :class:`~smtpnotify.errors.InvalidMessage`,
before anything is queued or sent.

What ``data`` looks like:

* CRLF line endings everywhere; no line over 998 octets; not dot-stuffed (the
  SMTP session does that); it ends with CRLF.
* The header block is written by :mod:`smtpnotify._headers`, not by the email
  package's folder, because that folder can corrupt text (it inserts spaces
  when it splits encoded words in display names and long headers).  Text that
  cannot be written as plain ASCII is RFC 2047 encoded (``=?utf-8?b?...?=``);
  the only raw UTF-8 is a non-ASCII local part, which needs SMTPUTF8 anyway.
* A notification's MIME body is written directly by :mod:`smtpnotify._mime`
  (no email package objects); an ``EmailMessage``'s body is serialised by the
  email package (:mod:`smtpnotify._email_input`).  Text bodies go out as 7bit
  when they are short-lined ASCII ending in a line break, as quoted-printable
  otherwise; attachments as base64.  The body is always 7-bit, so neither
  8BITMIME nor BINARYMIME is ever needed.

Where the rest lives: addresses in :mod:`smtpnotify._addresses`, header text
(checks, encoded words, folding) in :mod:`smtpnotify._headers`.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.message import EmailMessage
from email.utils import format_datetime, make_msgid
from types import MappingProxyType
from typing import Any

from ._addresses import Mailbox, address_tuple, dedup, parse_mailbox, validate_address
from ._email_input import prepare_email
from ._errors import InvalidMessage
from ._headers import (
    address_header,
    check_field_name,
    check_header_text,
    check_message_id,
    unstructured,
)
from ._mime import check_wire, parse_content_type, write_body
from ._prepared import PreparedMessage

__all__ = ["Attachment", "Notification", "prepare", "validate_address"]

_RESERVED_HEADERS = frozenset(
    {
        "from",
        "sender",
        "to",
        "cc",
        "bcc",
        "reply-to",
        "subject",
        "date",
        "message-id",
        "mime-version",
        "return-path",
        "orig-date",
    }
)
_RESERVED_PREFIXES = ("content-", "resent-")
_EMPTY_HEADERS: Mapping[str, str] = MappingProxyType({})

_parse_mailbox = parse_mailbox
"""Kept under this name for :mod:`smtpnotify._config` (the sender must parse here too)."""


# ---------------------------------------------------------------------------
# Public values
# ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Attachment:
    """A file attached to a :class:`Notification`.

    ``Attachment("report.pdf", data, "application/pdf")``

    Attributes:
        filename: the name the recipient sees; leading and trailing whitespace
            is removed; CR, LF and other control characters are refused.
        content: the bytes, sent base64-encoded and received unchanged.
        content_type: ``type/subtype``, optionally with parameters
            (``"text/csv; charset=utf-8"``).  ``multipart/*`` and ``message/*``
            are refused.
    """

    filename: str
    content: bytes = field(repr=False)
    content_type: str = "application/octet-stream"

    def __post_init__(self) -> None:
        if not isinstance(self.filename, str):
            raise TypeError(f"filename must be a str, not {type(self.filename).__name__}")
        if isinstance(self.content, bytearray | memoryview):
            object.__setattr__(self, "content", bytes(self.content))
        if not isinstance(self.content, bytes):
            raise TypeError(f"content must be bytes, not {type(self.content).__name__}")
        if not isinstance(self.content_type, str):
            raise TypeError("content_type must be a str")
        check_header_text(self.filename, "attachment filename")
        filename = self.filename.strip()
        if not filename:
            raise InvalidMessage("attachment filename is empty")
        object.__setattr__(self, "filename", filename)
        parse_content_type(self.content_type)

    @property
    def size(self) -> int:
        """The length of ``content`` in bytes."""
        return len(self.content)


@dataclass(frozen=True, slots=True, init=False)
class Notification:
    """A notification email, validated when it is built and again by :func:`prepare`.

    ::

        Notification("ops@example.com", "Disk full", text="/var is at 98 %")
        Notification(["a@example.com", "Bob <b@example.com>"], "Report",
                     html="<p>Done</p>", bcc="audit@example.com",
                     attachments=[Attachment("r.csv", data, "text/csv")])

    ``to``, ``cc``, ``bcc`` and ``reply_to`` take one address or a sequence of
    them; each entry is exactly one mailbox (``addr@example.com`` or
    ``Display Name <addr@example.com>``).  They are kept as tuples.  There is no
    ``From``: the sender is always the configured ``MailConfig.sender``.

    ``headers`` adds custom header fields.  The fields smtpnotify writes itself
    (From, Sender, To, Cc, Bcc, Reply-To, Subject, Date, Message-ID,
    MIME-Version, Return-Path, ``Content-*``, ``Resent-*``) are refused there.

    Raises:
        InvalidMessage: a CR, LF or other control character in a header value,
            an invalid address or header name, no recipient at all, or a
            message with neither subject nor content.
        TypeError: an argument of the wrong type.
    """

    to: tuple[str, ...]
    subject: str
    text: str | None
    html: str | None
    cc: tuple[str, ...]
    bcc: tuple[str, ...]
    reply_to: tuple[str, ...]
    headers: Mapping[str, str] = field(hash=False)
    attachments: tuple[Attachment, ...]

    def __init__(
        self,
        to: str | Sequence[str],
        subject: str,
        text: str | None = None,
        html: str | None = None,
        cc: str | Sequence[str] = (),
        bcc: str | Sequence[str] = (),
        reply_to: str | Sequence[str] | None = None,
        headers: Mapping[str, str] = _EMPTY_HEADERS,
        attachments: Sequence[Attachment] = (),
    ) -> None:
        if not isinstance(subject, str):
            raise TypeError(f"subject must be a str, not {type(subject).__name__}")
        for name, value in (("text", text), ("html", html)):
            if value is not None and not isinstance(value, str):
                raise TypeError(f"{name} must be a str or None, not {type(value).__name__}")
        if not isinstance(headers, Mapping):
            raise TypeError("headers must be a mapping of str to str")
        for key, value in headers.items():
            if not isinstance(key, str) or not isinstance(value, str):
                raise TypeError("headers must be a mapping of str to str")
        atts = tuple(attachments)
        for att in atts:
            if not isinstance(att, Attachment):
                raise TypeError(f"attachments must be Attachment objects, not {type(att).__name__}")
        set_ = object.__setattr__
        set_(self, "to", address_tuple(to, "to"))
        set_(self, "subject", subject)
        set_(self, "text", text)
        set_(self, "html", html)
        set_(self, "cc", address_tuple(cc, "cc"))
        set_(self, "bcc", address_tuple(bcc, "bcc"))
        set_(self, "reply_to", address_tuple(() if reply_to is None else reply_to, "reply_to"))
        set_(self, "headers", MappingProxyType(dict(headers)))
        set_(self, "attachments", atts)
        _validate_notification(self)

    def __reduce__(self) -> tuple[type[Notification], tuple[Any, ...]]:
        # Rebuilt through __init__ (and so validated again) by pickle and copy.
        return (
            Notification,
            (
                self.to,
                self.subject,
                self.text,
                self.html,
                self.cc,
                self.bcc,
                self.reply_to,
                dict(self.headers),
                self.attachments,
            ),
        )


def prepare(
    message: Notification | EmailMessage,
    *,
    sender: str,
    message_id: str | None = None,
    now: datetime | None = None,
    local_hostname: str | None = None,
) -> PreparedMessage:
    """Validate ``message`` and serialise it for SMTP.

    Args:
        message: a :class:`Notification` or an :class:`email.message.EmailMessage`
            (recipients are then read from its To, Cc and Bcc headers).
        sender: ``MailConfig.sender``; always the ``From`` header (any From of
            an EmailMessage is replaced) and the envelope sender.
        message_id: the ``Message-ID`` to use (``<left@right>``).  It wins over
            one already in an EmailMessage; the outbox passes the stored one so
            retries keep it.  Without it an existing Message-ID is kept, or a
            new one is made.
        now: the time for a missing ``Date`` header (timezone-aware); default
            the current UTC time.
        local_hostname: accepted so that callers can pass the whole config;
            not used.  A generated Message-ID always names the sender's domain
            (an EHLO name is often an internal host name that should not leak
            into messages, and may not even be a valid domain).

    Returns:
        The envelope (bare addr-specs, IDNA-encoded domains, recipients
        deduplicated with Bcc included) and ``data``: CRLF line endings, no
        Bcc header, not dot-stuffed, ending with CRLF.

    Raises:
        InvalidMessage: see :class:`Notification`; also, for an EmailMessage,
            a header that cannot be sent safely or a body that cannot be made
            7-bit.
    """
    from_mb = _parse_mailbox(sender, "sender")
    if now is None:
        now = datetime.now(UTC)
    elif now.tzinfo is None or now.utcoffset() is None:
        raise ValueError("now must be a timezone-aware datetime")
    if message_id is not None:
        message_id = check_message_id(message_id, "message_id")
    id_domain = from_mb.domain

    if isinstance(message, Notification):
        return _prepare_notification(message, from_mb, message_id, now, id_domain)
    if isinstance(message, EmailMessage):
        return prepare_email(message, from_mb, message_id, now, id_domain)
    raise TypeError(
        f"message must be a Notification or an email.message.EmailMessage, "
        f"not {type(message).__name__} (for a legacy email.message.Message, parse its bytes "
        f"with policy=email.policy.default)"
    )


# ---------------------------------------------------------------------------
# Notification
# ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Checked:
    to: tuple[Mailbox, ...]
    cc: tuple[Mailbox, ...]
    bcc: tuple[Mailbox, ...]
    reply_to: tuple[Mailbox, ...]


def _validate_notification(n: Notification) -> _Checked:
    def mailboxes(values: tuple[str, ...], what: str) -> tuple[Mailbox, ...]:
        if isinstance(values, str) or not isinstance(values, tuple):
            raise InvalidMessage(f"{what} must be a tuple of addresses")
        return tuple(_parse_mailbox(v, f"{what}[{i}]") for i, v in enumerate(values))

    checked = _Checked(
        to=mailboxes(n.to, "to"),
        cc=mailboxes(n.cc, "cc"),
        bcc=mailboxes(n.bcc, "bcc"),
        reply_to=mailboxes(n.reply_to, "reply_to"),
    )
    if not (checked.to or checked.cc or checked.bcc):
        raise InvalidMessage("the message has no recipient (To, Cc or Bcc)")
    if not isinstance(n.subject, str):
        raise InvalidMessage("subject must be a str")
    check_header_text(n.subject, "subject")
    for name, value in n.headers.items():
        check_field_name(name, "headers")
        key = name.lower()
        if key in _RESERVED_HEADERS or key.startswith(_RESERVED_PREFIXES):
            raise InvalidMessage(
                f"headers: {name!r} is set by smtpnotify and cannot be given as a custom header"
            )
        if not isinstance(value, str):
            raise InvalidMessage(f"headers: the value of {name!r} must be a str")
        check_header_text(value, f"header {name}")
    for attachment in n.attachments:
        if not isinstance(attachment, Attachment):
            raise InvalidMessage("attachments must be Attachment objects")
        check_header_text(attachment.filename, "attachment filename")
        if not attachment.filename.strip():
            raise InvalidMessage("attachment filename is empty")
        parse_content_type(attachment.content_type)
    if not n.subject.strip() and not n.text and not n.html and not n.attachments:
        raise InvalidMessage("the message has neither a subject nor any content")
    return checked


def _prepare_notification(
    n: Notification, sender: Mailbox, message_id: str | None, now: datetime, id_domain: str
) -> PreparedMessage:
    checked = _validate_notification(n)
    if message_id is None:
        message_id = make_msgid(domain=id_domain)

    lines = [address_header("From", [(None, [sender])])]
    if checked.to:
        lines.append(address_header("To", [(None, checked.to)]))
    if checked.cc:
        lines.append(address_header("Cc", [(None, checked.cc)]))
    if checked.reply_to:
        lines.append(address_header("Reply-To", [(None, checked.reply_to)]))
    lines.append(unstructured("Subject", n.subject))
    lines.append(f"Date: {format_datetime(now)}\r\n")
    lines.append(f"Message-ID: {message_id}\r\n")
    lines.extend(unstructured(name, value) for name, value in n.headers.items())
    lines.append("MIME-Version: 1.0\r\n")

    everyone = checked.to + checked.cc + checked.bcc
    smtputf8 = any(mb.needs_smtputf8 for mb in (sender, *everyone, *checked.reply_to))
    head = "".join(lines)
    if not smtputf8 and not head.isascii():
        raise InvalidMessage("non-ASCII header text outside an encoded word")
    encoded_head = head.encode("utf-8")
    check_wire(encoded_head)

    # One buffer, grown in place: BytesIO.getvalue() hands over its bytes without a
    # copy, so a big attachment exists once in base64 and never twice.
    buffer = io.BytesIO()
    buffer.write(encoded_head)
    write_body(buffer, n.text, n.html, n.attachments)
    return PreparedMessage(
        sender=sender.addr_spec,
        recipients=dedup(everyone),
        message_id=message_id,
        data=buffer.getvalue(),
        smtputf8=smtputf8,
    )
