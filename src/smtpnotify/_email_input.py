"""An ``email.message.EmailMessage`` handed to smtpnotify: checked, rewritten, serialised.

The header block is written by :mod:`smtpnotify._headers` (From replaced by the
sender, Bcc dropped, addresses re-checked and IDNA-encoded); the MIME body is
kept and serialised by the email package, after every part that is not 7-bit
or has lines over 998 octets has been re-encoded (text as quoted-printable,
anything else as base64).
"""

from __future__ import annotations

import copy
import io
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from datetime import datetime
from email import errors as email_errors
from email import policy as email_policy
from email.errors import MessageDefect
from email.generator import BytesGenerator
from email.headerregistry import AddressHeader, BaseHeader, DateHeader, Group
from email.message import EmailMessage, Message
from email.utils import format_datetime, make_msgid
from typing import Any, cast

from ._addresses import Mailbox, dedup, display_name, mailbox_from_address
from ._errors import InvalidMessage
from ._headers import (
    MAX_LINE,
    NEWLINE,
    SURROGATE,
    address_header,
    check_field_name,
    check_header_text,
    check_message_id,
    unstructured,
)
from ._mime import base64_lines, qp_encode
from ._prepared import PreparedMessage

__all__ = ["prepare_email"]

_UNIQUE_HEADERS = ("to", "cc", "reply-to", "subject", "date", "message-id", "sender")
_GENERATOR_POLICY = email_policy.SMTP.clone(refold_source="none")
_FOLD = re.compile(r"\r?\n(?=[ \t])")


def _header_object(name: str, raw: Any) -> BaseHeader:
    """The parsed header for a raw value, after checking it cannot inject lines."""
    what = f"header {name}"
    if isinstance(raw, BaseHeader):
        header = raw
    elif isinstance(raw, str):
        if "\r" in raw.replace("\r\n", ""):
            raise InvalidMessage(f"{what} contains a bare CR: {raw!r}")
        unfolded = _FOLD.sub("", raw)
        check_header_text(unfolded, what)
        try:
            header = email_policy.default.header_factory(name, unfolded)
        except Exception as exc:  # the parser's failure on untrusted text
            raise InvalidMessage(f"{what} cannot be parsed: {raw!r}") from exc
    else:
        raise InvalidMessage(
            f"{what} holds a {type(raw).__name__}, not text; build the message "
            f"with policy=email.policy.default"
        )
    check_header_text(str(header), what)
    return header


def _groups(
    name: str, text: str, groups: Sequence[Group], defects: Iterable[MessageDefect]
) -> list[tuple[str | None, tuple[Mailbox, ...]]]:
    """The address header's groups, each address checked by the strict rules."""
    for defect in defects:
        if not isinstance(defect, email_errors.NonASCIILocalPartDefect):
            raise InvalidMessage(f"header {name}: {defect} in {text!r}")
    result: list[tuple[str | None, tuple[Mailbox, ...]]] = []
    for group in groups:
        label = None if group.display_name is None else display_name(group.display_name, name)
        members = tuple(mailbox_from_address(a, f"header {name}") for a in group.addresses)
        result.append((label, members))
    return result


def _reencode_parts(entity: EmailMessage) -> None:
    """Make every leaf 7-bit with lines of at most 998 octets, keeping its content."""
    for part in entity.walk():
        if part.is_multipart():
            continue
        payload = part.get_payload()
        if payload is None:
            continue
        if not isinstance(payload, str):
            raise InvalidMessage("a MIME part holds a payload that is not text")
        cte = str(part.get("Content-Transfer-Encoding", "7bit")).strip().lower()
        if cte not in ("7bit", "8bit", "binary"):
            if not payload.isascii():
                raise InvalidMessage(f"a {cte} MIME part holds non-ASCII data")
            continue
        lines = NEWLINE.split(payload)
        if payload.isascii() and "\x00" not in payload and all(len(x) <= MAX_LINE for x in lines):
            if cte != "7bit":
                part.replace_header("Content-Transfer-Encoding", "7bit")
            continue
        data = _payload_bytes(part, payload)
        if part.get_content_maintype() == "text":
            normalised = data.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
            part.set_payload(qp_encode(normalised))
            new_cte = "quoted-printable"
        else:
            part.set_payload(base64_lines(data))
            new_cte = "base64"
        if "Content-Transfer-Encoding" in part:
            part.replace_header("Content-Transfer-Encoding", new_cte)
        else:
            part["Content-Transfer-Encoding"] = new_cte


def _payload_bytes(part: Message, payload: str) -> bytes:
    if SURROGATE.search(payload):
        try:
            return payload.encode("ascii", "surrogateescape")
        except UnicodeEncodeError as exc:
            raise InvalidMessage("a MIME part mixes raw bytes and text") from exc
    charset = part.get_content_charset() or "utf-8"
    try:
        data = payload.encode(charset)
    except (LookupError, UnicodeError) as exc:
        raise InvalidMessage(f"a MIME part cannot be encoded as {charset!r}") from exc
    if part.get_content_maintype() == "text" and part.get_param("charset") is None:
        part.set_param("charset", charset)
    return data


def _flatten(entity: Message) -> bytes:
    buffer = io.BytesIO()
    generator = BytesGenerator(buffer, mangle_from_=False, policy=_GENERATOR_POLICY)
    generator.flatten(cast(EmailMessage, entity))
    return buffer.getvalue()


def _finish(
    header_lines: Sequence[str],
    entity: bytes,
    *,
    sender: Mailbox,
    recipients: tuple[str, ...],
    message_id: str,
    smtputf8: bool,
) -> PreparedMessage:
    if not recipients:
        raise InvalidMessage("the message has no recipient (To, Cc or Bcc)")
    head = "".join(header_lines)
    if not smtputf8 and not head.isascii():
        raise InvalidMessage("non-ASCII header text outside an encoded word")
    data = head.encode("utf-8") + entity
    if not data.endswith(b"\r\n"):
        data += b"\r\n"
    if re.search(rb"\r(?!\n)|(?<!\r)\n", data):
        raise InvalidMessage("the message holds a bare CR or LF")
    if not entity.isascii():
        raise InvalidMessage("the message body is not 7-bit")
    if any(len(line) > MAX_LINE for line in data.split(b"\r\n")):
        raise InvalidMessage(f"the message holds a line longer than {MAX_LINE} octets")
    return PreparedMessage(
        sender=sender.addr_spec,
        recipients=recipients,
        message_id=message_id,
        data=data,
        smtputf8=smtputf8,
    )


def prepare_email(
    msg: EmailMessage, sender: Mailbox, message_id: str | None, now: datetime, id_domain: str
) -> PreparedMessage:
    """:func:`smtpnotify._message.prepare` for an ``EmailMessage`` (arguments already checked)."""
    # Every header of every part: a valid name, no way to start another line.
    for part in msg.walk():
        for name, raw in part.raw_items():
            check_field_name(name, "header")
            _header_object(name, raw)

    top = list(msg.raw_items())
    counts = Counter(name.lower() for name, _ in top)
    for unique in _UNIQUE_HEADERS:
        if counts[unique] > 1:
            raise InvalidMessage(f"the message has {counts[unique]} {unique} headers")

    lines: list[str] = []
    envelope: list[Mailbox] = []
    listed: list[Mailbox] = [sender]
    from_line = address_header("From", [(None, [sender])])
    from_written = has_date = False
    for name, raw in top:
        key = name.lower()
        if key == "mime-version" or key.startswith("content-"):
            continue
        if key == "from":
            if not from_written:
                lines.append(from_line)
                from_written = True
            continue
        header = _header_object(name, raw)
        if isinstance(header, AddressHeader):
            groups = _groups(name, str(header), header.groups, header.defects)
            mailboxes = [mb for _, members in groups for mb in members]
            listed.extend(mailboxes)
            if key in ("to", "cc", "bcc"):
                envelope.extend(mailboxes)
            if groups and key not in ("bcc", "resent-bcc"):  # an empty list is not valid
                lines.append(address_header(name, groups))
        elif key == "message-id":
            if message_id is None:
                message_id = check_message_id(str(header), "header Message-ID")
        elif isinstance(header, DateHeader):
            if header.defects or header.datetime is None:
                raise InvalidMessage(f"header {name}: {str(header)!r} is not a valid date")
            has_date = has_date or key == "date"
            lines.append(f"{name}: {format_datetime(header.datetime)}\r\n")
        elif isinstance(raw, str) and not isinstance(raw, BaseHeader) and raw.isascii():
            # Source text from a parsed message: already encoded and folded; keep it.
            value = "\r\n".join(NEWLINE.split(raw))
            lines.append(f"{name}: {value}\r\n" if value else f"{name}:\r\n")
        else:
            lines.append(unstructured(name, str(header)))
    if not from_written:
        lines.insert(0, from_line)
    if not has_date:
        lines.append(f"Date: {format_datetime(now)}\r\n")
    if message_id is None:
        message_id = make_msgid(domain=id_domain)
    lines.append(f"Message-ID: {message_id}\r\n")
    lines.append("MIME-Version: 1.0\r\n")

    entity = copy.deepcopy(msg)
    for name in {name for name, _ in top}:
        if not name.lower().startswith("content-"):
            del entity[name]
    try:
        _reencode_parts(entity)
        body = _flatten(entity)
    except InvalidMessage:
        raise
    except (ValueError, TypeError, LookupError, email_errors.MessageError) as exc:
        raise InvalidMessage(f"the message cannot be serialised: {exc}") from exc

    return _finish(
        lines,
        body,
        sender=sender,
        recipients=dedup(envelope),
        message_id=message_id,
        smtputf8=any(mb.needs_smtputf8 for mb in listed),
    )
