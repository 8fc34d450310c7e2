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
* The header block is written by this module, not by the email package's
  folder, because that folder can corrupt text (it inserts spaces when it
  splits encoded words in display names and long headers).  Text that cannot be
  written as plain ASCII is RFC 2047 encoded (``=?utf-8?b?...?=``); the only
  raw UTF-8 is a non-ASCII local part, which needs SMTPUTF8 anyway.
* The MIME body is built and serialised by the email package.  Text bodies go
  out as 7bit when they are short-lined ASCII ending in a line break, as
  quoted-printable otherwise; attachments as base64.  The body is always 7-bit,
  so neither 8BITMIME nor BINARYMIME is ever needed.
"""

from __future__ import annotations

import base64
import copy
import io
import ipaddress
import re
import string
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email import errors as email_errors
from email import policy as email_policy
from email.errors import MessageDefect
from email.generator import BytesGenerator
from email.headerregistry import (
    Address,
    AddressHeader,
    BaseHeader,
    DateHeader,
    Group,
    ParameterizedMIMEHeader,
)
from email.message import EmailMessage, Message, MIMEPart
from email.utils import format_datetime, make_msgid
from types import MappingProxyType
from typing import Any, cast

from ._errors import InvalidMessage
from ._prepared import PreparedMessage

__all__ = ["Attachment", "Notification", "prepare", "validate_address"]

# ---------------------------------------------------------------------------
# Limits and character classes
# ---------------------------------------------------------------------------

_FOLD_AT = 78
"""Header lines are folded to this length where the text allows (RFC 5322 §2.1.1)."""
_MAX_LINE = 998
"""No line of ``data`` is longer than this many octets (RFC 5322 §2.1.1, RFC 5321 §4.5.3.1.6)."""
_EW_MAX = 75
"""Longest RFC 2047 encoded word in unstructured text."""
_MAX_DISPLAY_NAME = 256
"""Longest display name, in UTF-8 octets (keeps every address on one line)."""
_MAX_FIELD_NAME = 76

_ATEXT = frozenset(string.ascii_letters + string.digits + "!#$%&'*+-/=?^_`{|}~")
_PLAIN_PHRASE = re.compile(
    r"[A-Za-z0-9!#$%&'*+\-/=?^_`{|}~]+(?: [A-Za-z0-9!#$%&'*+\-/=?^_`{|}~]+)*"
)
_FIELD_NAME = re.compile(r"[\x21-\x39\x3b-\x7e]+")
_LABEL = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?")
_MSGID = re.compile(r"<[\x21-\x3b\x3d\x3f\x41-\x7e]+@[\x21-\x3b\x3d\x3f\x41-\x7e]+>")
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")

# C0 controls except TAB, DEL, C1 controls (NEL among them), the Unicode line and
# paragraph separators, and lone surrogates (undecodable bytes).  ``str.splitlines``
# breaks lines at several of these, and so does the email package.
_BAD_HEADER_CHAR = re.compile(r"[\x00-\x08\x0a-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff]")
_SURROGATE = re.compile(r"[\ud800-\udfff]")
_NEWLINE = re.compile(r"\r\n|\r|\n")
# Quoted-printable: every byte but printable ASCII (less "="), space and tab is =XX.
_QP_TABLE = {byte: f"={byte:02X}" for byte in range(256) if not (33 <= byte <= 126 and byte != 61)}
_QP_TABLE.pop(9)
_QP_TABLE.pop(32)
_FOLD = re.compile(r"\r?\n(?=[ \t])")

# Characters that IDNA 2003 (the stdlib codec) and IDNA 2008 map differently:
# the two would send the message to two different domains.
_IDNA_DEVIATIONS = frozenset("\u00df\u03c2\u200c\u200d")

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
_UNIQUE_HEADERS = ("to", "cc", "reply-to", "subject", "date", "message-id", "sender")

_GENERATOR_POLICY = email_policy.SMTP.clone(refold_source="none")
_EMPTY_HEADERS: Mapping[str, str] = MappingProxyType({})


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
        _check_header_text(self.filename, "attachment filename")
        filename = self.filename.strip()
        if not filename:
            raise InvalidMessage("attachment filename is empty")
        object.__setattr__(self, "filename", filename)
        _parse_content_type(self.content_type)

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
        set_(self, "to", _address_tuple(to, "to"))
        set_(self, "subject", subject)
        set_(self, "text", text)
        set_(self, "html", html)
        set_(self, "cc", _address_tuple(cc, "cc"))
        set_(self, "bcc", _address_tuple(bcc, "bcc"))
        set_(self, "reply_to", _address_tuple(() if reply_to is None else reply_to, "reply_to"))
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


def validate_address(address: str) -> str:
    """Check one mailbox and return its bare addr-spec as used in the SMTP envelope.

    ``address`` is ``local@domain`` or ``Display Name <local@domain>``; the
    display name may be quoted (``"Doe, Jane" <jane@example.com>``).  The result
    has the domain IDNA-encoded (``user@bücher.example`` →
    ``user@xn--bcher-kva.example``); the local part is kept as written.

    Raises:
        InvalidMessage: the text is not exactly one valid mailbox.
    """
    if not isinstance(address, str):
        raise TypeError(f"address must be a str, not {type(address).__name__}")
    return _parse_mailbox(address, "address").addr_spec


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
        message_id = _check_message_id(message_id, "message_id")
    id_domain = from_mb.domain

    if isinstance(message, Notification):
        return _prepare_notification(message, from_mb, message_id, now, id_domain)
    if isinstance(message, EmailMessage):
        return _prepare_email(message, from_mb, message_id, now, id_domain)
    raise TypeError(
        f"message must be a Notification or an email.message.EmailMessage, "
        f"not {type(message).__name__} (for a legacy email.message.Message, parse its bytes "
        f"with policy=email.policy.default)"
    )


# ---------------------------------------------------------------------------
# Header text and addresses
# ---------------------------------------------------------------------------


def _check_header_text(value: str, what: str) -> None:
    """Refuse text that could end or split a header line."""
    bad = _BAD_HEADER_CHAR.search(value)
    if bad is None:
        return
    ch = bad.group()
    if ch in "\r\n":
        raise InvalidMessage(f"{what} contains a line break (CR or LF): {value!r}")
    if _SURROGATE.match(ch):
        raise InvalidMessage(f"{what} contains undecodable bytes: {value!r}")
    raise InvalidMessage(f"{what} contains control character U+{ord(ch):04X}: {value!r}")


def _check_field_name(name: str, what: str) -> None:
    if not isinstance(name, str) or not _FIELD_NAME.fullmatch(name):
        raise InvalidMessage(f"{what}: {name!r} is not a valid header field name")
    if len(name) > _MAX_FIELD_NAME:
        raise InvalidMessage(f"{what}: header field name longer than {_MAX_FIELD_NAME}: {name!r}")


@dataclass(frozen=True, slots=True)
class _Mailbox:
    display_name: str
    local: str
    domain: str
    """ASCII: IDNA-encoded."""

    @property
    def addr_spec(self) -> str:
        return f"{self.local}@{self.domain}"

    @property
    def needs_smtputf8(self) -> bool:
        return not self.local.isascii()


def _is_atext(ch: str) -> bool:
    return ch in _ATEXT or (not ch.isascii() and ch.isprintable() and not ch.isspace())


def _check_local(local: str, what: str) -> None:
    if not local:
        raise InvalidMessage(f"{what}: empty local part")
    if len(local.encode("utf-8")) > 64:
        raise InvalidMessage(f"{what}: local part longer than 64 octets")
    for atom in local.split("."):
        if not atom:
            raise InvalidMessage(f"{what}: misplaced '.' in local part {local!r}")
        for ch in atom:
            if not _is_atext(ch):
                raise InvalidMessage(
                    f"{what}: character {ch!r} is not allowed in local part {local!r}"
                )


def _ascii_domain(domain: str, what: str) -> str:
    """The domain with IDNA-encoded labels, checked as a host name."""
    if not domain:
        raise InvalidMessage(f"{what}: empty domain")
    if domain.startswith("[") and domain.endswith("]"):
        return _domain_literal(domain, what)
    if domain.isascii():
        ascii_domain = domain
    else:
        deviation = next((ch for ch in domain if ch in _IDNA_DEVIATIONS), None)
        if deviation is not None:
            raise InvalidMessage(
                f"{what}: domain {domain!r} holds {deviation!r}, which IDNA 2003 and "
                f"IDNA 2008 encode differently; give the xn-- form instead"
            )
        try:
            ascii_domain = domain.encode("idna").decode("ascii")
        except UnicodeError as exc:
            raise InvalidMessage(f"{what}: domain {domain!r} cannot be IDNA-encoded") from exc
    if len(ascii_domain) > 253 or not all(
        _LABEL.fullmatch(label) for label in ascii_domain.split(".")
    ):
        raise InvalidMessage(f"{what}: invalid domain {domain!r}")
    return ascii_domain


def _domain_literal(domain: str, what: str) -> str:
    """``[192.0.2.1]`` or ``[IPv6:2001:db8::1]`` (RFC 5321 §4.1.3), kept as written."""
    literal = domain[1:-1]
    try:
        if literal[:5].lower() == "ipv6:" and "%" not in literal:
            ipaddress.IPv6Address(literal[5:])
        else:
            ipaddress.IPv4Address(literal)
    except ValueError:
        raise InvalidMessage(f"{what}: domain literal {domain!r} is not an IP address") from None
    return domain


def _addr_spec(spec: str, display_name: str, what: str) -> _Mailbox:
    if spec.count("@") != 1:
        problem = "no '@'" if "@" not in spec else "more than one '@'"
        raise InvalidMessage(f"{what}: invalid address {spec!r} ({problem})")
    local, domain = spec.split("@")
    _check_local(local, what)
    mailbox = _Mailbox(display_name, local, _ascii_domain(domain, what))
    if len(mailbox.addr_spec.encode("utf-8")) > 254:
        raise InvalidMessage(f"{what}: address longer than 254 octets")
    return mailbox


def _display_name(name: str, what: str) -> str:
    _check_header_text(name, what)
    name = " ".join(name.split())
    if len(name.encode("utf-8")) > _MAX_DISPLAY_NAME:
        raise InvalidMessage(f"{what}: display name longer than {_MAX_DISPLAY_NAME} octets")
    return name


def _parse_mailbox(text: str, what: str) -> _Mailbox:
    """Parse exactly one mailbox: ``addr-spec`` or ``[display-name] <addr-spec>``.

    Strict on purpose: no comments, no groups, no lists, no quoted local parts.
    Specials in a display name must be quoted.
    """
    if not isinstance(text, str):
        raise TypeError(f"{what}: an address must be a str, not {type(text).__name__}")
    _check_header_text(text, what)
    s = text.strip(" \t")
    if not s:
        raise InvalidMessage(f"{what}: empty address")
    if "<" not in s and ">" not in s:
        return _addr_spec(s, "", what)

    words: list[str] = []
    i, n = 0, len(s)
    while True:
        while i < n and s[i].isspace():
            i += 1
        if i >= n:
            raise InvalidMessage(f"{what}: invalid address {text!r} (no '<')")
        ch = s[i]
        if ch == "<":
            break
        if ch == '"':
            j, buf = i + 1, []
            while j < n and s[j] != '"':
                if s[j] == "\\":
                    j += 1
                    if j >= n:
                        break
                buf.append(s[j])
                j += 1
            if j >= n:
                raise InvalidMessage(f"{what}: unterminated quoted display name in {text!r}")
            words.append("".join(buf))
            i = j + 1
            continue
        j = i
        while j < n and (s[j] in _ATEXT or s[j] == "." or not (s[j].isascii() or s[j].isspace())):
            j += 1
        if j == i:
            raise InvalidMessage(
                f"{what}: invalid address {text!r} ({ch!r} in the display name; quote the name)"
            )
        words.append(s[i:j])
        i = j
    close = s.find(">", i)
    if close != n - 1:
        raise InvalidMessage(f"{what}: invalid address {text!r} (text after '>' or no '>')")
    spec = s[i + 1 : close]
    if "<" in spec:
        raise InvalidMessage(f"{what}: invalid address {text!r} (nested '<')")
    return _addr_spec(spec, _display_name(" ".join(words), what), what)


def _address_tuple(value: str | Iterable[str], what: str) -> tuple[str, ...]:
    if isinstance(value, str):
        return (value,)
    if isinstance(value, bytes | bytearray | Mapping):
        raise TypeError(f"{what} must be a str or a sequence of str")
    try:
        items = tuple(value)
    except TypeError:
        raise TypeError(f"{what} must be a str or a sequence of str") from None
    for item in items:
        if not isinstance(item, str):
            raise TypeError(f"{what} must be a str or a sequence of str, not {type(item).__name__}")
    return items


def _mailbox_from_address(address: Address, what: str) -> _Mailbox:
    """Apply the strict rules to an address the email package parsed."""
    name = _display_name(address.display_name or "", what)
    _check_header_text(address.username, what)
    _check_local(address.username, what)
    mailbox = _Mailbox(name, address.username, _ascii_domain(address.domain, what))
    if len(mailbox.addr_spec.encode("utf-8")) > 254:
        raise InvalidMessage(f"{what}: address longer than 254 octets")
    return mailbox


def _check_message_id(value: str, what: str) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{what} must be a str")
    _check_header_text(value, what)
    value = value.strip(" \t")
    if len(value) > 900 or not _MSGID.fullmatch(value):
        raise InvalidMessage(f"{what}: {value!r} is not a Message-ID of the form <left@right>")
    return value


def _parse_content_type(value: str) -> tuple[str, str, dict[str, str]]:
    _check_header_text(value, "attachment content_type")
    head, _, rest = value.partition(";")
    maintype, slash, subtype = head.strip().lower().partition("/")
    if not slash or not _TOKEN.fullmatch(maintype) or not _TOKEN.fullmatch(subtype):
        raise InvalidMessage(f"attachment content_type {value!r} is not type/subtype")
    if maintype in ("multipart", "message"):
        raise InvalidMessage(f"attachment content_type {maintype}/* is not supported")
    params: dict[str, str] = {}
    if rest.strip():
        header = email_policy.default.header_factory("Content-Type", value)
        defects = header.defects
        if defects or not isinstance(header, ParameterizedMIMEHeader):
            problem = defects[0] if defects else "unparsable"
            raise InvalidMessage(f"attachment content_type {value!r}: {problem}")
        params = dict(header.params)
    return maintype, subtype, params


# ---------------------------------------------------------------------------
# Header rendering
# ---------------------------------------------------------------------------


def _fold(name: str, pieces: Sequence[str], sep: str) -> str:
    """``name: pieces…`` folded before a piece when a line would pass 78 characters.

    With ``sep=" "`` the pieces are joined by one space (a fold replaces it);
    with ``sep=""`` every piece after the first starts with its own whitespace,
    so unfolding gives back the exact text.
    """
    line = f"{name}:"
    lines: list[str] = []
    for index, piece in enumerate(pieces):
        chunk = (" " if index == 0 else sep) + piece
        if index and len(line) + len(chunk) > _FOLD_AT:
            lines.append(line)
            line = chunk if chunk[:1] in (" ", "\t") else " " + chunk
        else:
            line += chunk
    lines.append(line)
    return "\r\n".join(lines) + "\r\n"


def _encoded_word(text: str) -> str:
    return "=?utf-8?b?" + base64.b64encode(text.encode("utf-8")).decode("ascii") + "?="


def _encoded_words(text: str, first_room: int) -> list[str]:
    """``text`` as RFC 2047 'B' words, split between characters, ≤ 75 characters each."""
    words: list[str] = []
    chunk: list[str] = []
    size = 0
    room = max(first_room, 16)
    for ch in text:
        width = len(ch.encode("utf-8"))
        if chunk and 12 + 4 * -(-(size + width) // 3) > room:
            words.append(_encoded_word("".join(chunk)))
            chunk, size, room = [], 0, _EW_MAX
        chunk.append(ch)
        size += width
    if chunk:
        words.append(_encoded_word("".join(chunk)))
    return words


def _unstructured(name: str, value: str) -> str:
    """An unstructured header (Subject, custom fields) that decodes back to ``value``."""
    _check_header_text(value, f"header {name}")
    if not value:
        return f"{name}:\r\n"
    plain = (
        value.isascii() and "=?" not in value and value[0] not in " \t" and value[-1] not in " \t"
    )
    if plain:
        folded = _fold(name, re.findall(r"[ \t]*[^ \t]+", value), "")
        if all(len(line) <= _MAX_LINE for line in folded.split("\r\n")):
            return folded
    return _fold(name, _encoded_words(value, _FOLD_AT - len(name) - 2), " ")


def _phrase(name: str) -> str:
    """A display name as an atom phrase, a quoted string or one encoded word.

    A long non-ASCII name is one encoded word, even past RFC 2047's 75
    characters: the stdlib parser keeps the space between adjacent encoded
    words of a display name (RFC 2047 says to drop it), so no split form reads
    back the same everywhere.
    """
    if name.isascii() and "=?" not in name:
        if _PLAIN_PHRASE.fullmatch(name):
            return name
        return '"' + name.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return _encoded_word(name)


def _mailbox_text(mailbox: _Mailbox) -> str:
    if not mailbox.display_name:
        return mailbox.addr_spec
    return f"{_phrase(mailbox.display_name)} <{mailbox.addr_spec}>"


def _address_header(name: str, groups: Sequence[tuple[str | None, Sequence[_Mailbox]]]) -> str:
    """An address-list header; ``groups`` pairs a group name (or None) with mailboxes."""
    pieces: list[str] = []
    for index, (group, mailboxes) in enumerate(groups):
        last_group = index == len(groups) - 1
        if group is not None:
            texts = [_mailbox_text(mb) for mb in mailboxes]
            label = _phrase(group) + ":"
            if not texts:
                pieces.append(label + (";" if last_group else ";,"))
                continue
            pieces.append(label)
            pieces.extend(t + "," for t in texts[:-1])
            pieces.append(texts[-1] + (";" if last_group else ";,"))
        else:
            for position, mb in enumerate(mailboxes):
                last = last_group and position == len(mailboxes) - 1
                pieces.append(_mailbox_text(mb) + ("" if last else ","))
    if pieces and pieces[-1].endswith(","):
        pieces[-1] = pieces[-1][:-1]
    return _fold(name, pieces, " ")


# ---------------------------------------------------------------------------
# Bodies
# ---------------------------------------------------------------------------


def _qp_encode(data: bytes) -> str:
    """Quoted-printable for bytes whose line breaks are ``\\n``.

    Lines of at most 76 characters; trailing whitespace and a ``.`` that starts
    a line are encoded; a final line without a line break ends with a soft
    break, so decoding gives back exactly ``data``.
    """
    out: list[str] = []
    logical = data.split(b"\n")
    ends_with_newline = logical[-1] == b""
    if ends_with_newline:
        logical.pop()
    for line in logical:
        text = line.decode("latin-1").translate(_QP_TABLE)
        if text[-1:] in (" ", "\t"):
            text = f"{text[:-1]}={ord(text[-1]):02X}"
        pos, end = 0, len(text)
        while True:
            prefix = ""
            if text.startswith(".", pos):
                prefix, pos = "=2E", pos + 1
            cut = pos + 75 - len(prefix)
            if end <= cut:
                out.append(prefix + text[pos:])
                break
            if text[cut - 1] == "=":
                cut -= 1
            elif text[cut - 2] == "=":
                cut -= 2
            out.append(prefix + text[pos:cut] + "=")
            pos = cut
    if not out:
        return ""
    if not ends_with_newline:
        out[-1] += "="
    return "\n".join(out) + "\n"


def _fits_7bit(text: str) -> bool:
    """Whether ``text`` (``\\n`` line breaks) can go out as is and come back unchanged."""
    if text and not text.endswith("\n"):
        return False
    if not text.isascii() or _BAD_HEADER_CHAR.search(text.replace("\n", "")):
        return False
    return all(len(line) <= _FOLD_AT and line == line.rstrip(" \t") for line in text.split("\n"))


def _text_part(text: str, subtype: str, what: str) -> MIMEPart:
    body = _NEWLINE.sub("\n", text)
    if _SURROGATE.search(body):
        raise InvalidMessage(f"{what} holds a lone surrogate and cannot be encoded as UTF-8")
    part = MIMEPart()
    part["Content-Type"] = f"text/{subtype}"
    part.set_param("charset", "utf-8")
    if _fits_7bit(body):
        part["Content-Transfer-Encoding"] = "7bit"
        part.set_payload(body)
    else:
        part["Content-Transfer-Encoding"] = "quoted-printable"
        part.set_payload(_qp_encode(body.encode("utf-8")))
    return part


def _multipart(subtype: str, parts: Sequence[MIMEPart]) -> MIMEPart:
    container = MIMEPart()
    container["Content-Type"] = f"multipart/{subtype}"
    for part in parts:
        container.attach(part)
    return container


def _attachment_part(attachment: Attachment) -> MIMEPart:
    maintype, subtype, params = _parse_content_type(attachment.content_type)
    part = MIMEPart()
    part.set_content(
        attachment.content,
        maintype,
        subtype,
        disposition="attachment",
        filename=attachment.filename,
        params=params,
    )
    return part


def _base64_lines(data: bytes) -> str:
    encoded = base64.b64encode(data).decode("ascii")
    return "".join(encoded[i : i + 76] + "\n" for i in range(0, len(encoded), 76))


def _flatten(entity: MIMEPart) -> bytes:
    buffer = io.BytesIO()
    generator = BytesGenerator(buffer, mangle_from_=False, policy=_GENERATOR_POLICY)
    generator.flatten(cast(EmailMessage, entity))
    return buffer.getvalue()


# ---------------------------------------------------------------------------
# Assembly and the final wire check
# ---------------------------------------------------------------------------


def _dedup(mailboxes: Iterable[_Mailbox]) -> tuple[str, ...]:
    seen: set[str] = set()
    result: list[str] = []
    for mailbox in mailboxes:
        key = mailbox.addr_spec.lower()
        if key not in seen:
            seen.add(key)
            result.append(mailbox.addr_spec)
    return tuple(result)


def _finish(
    header_lines: Sequence[str],
    entity: bytes,
    *,
    sender: _Mailbox,
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
    if any(len(line) > _MAX_LINE for line in data.split(b"\r\n")):
        raise InvalidMessage(f"the message holds a line longer than {_MAX_LINE} octets")
    return PreparedMessage(
        sender=sender.addr_spec,
        recipients=recipients,
        message_id=message_id,
        data=data,
        smtputf8=smtputf8,
    )


# ---------------------------------------------------------------------------
# Notification
# ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Checked:
    to: tuple[_Mailbox, ...]
    cc: tuple[_Mailbox, ...]
    bcc: tuple[_Mailbox, ...]
    reply_to: tuple[_Mailbox, ...]


def _validate_notification(n: Notification) -> _Checked:
    def mailboxes(values: tuple[str, ...], what: str) -> tuple[_Mailbox, ...]:
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
    _check_header_text(n.subject, "subject")
    for name, value in n.headers.items():
        _check_field_name(name, "headers")
        key = name.lower()
        if key in _RESERVED_HEADERS or key.startswith(_RESERVED_PREFIXES):
            raise InvalidMessage(
                f"headers: {name!r} is set by smtpnotify and cannot be given as a custom header"
            )
        if not isinstance(value, str):
            raise InvalidMessage(f"headers: the value of {name!r} must be a str")
        _check_header_text(value, f"header {name}")
    for attachment in n.attachments:
        if not isinstance(attachment, Attachment):
            raise InvalidMessage("attachments must be Attachment objects")
        _check_header_text(attachment.filename, "attachment filename")
        if not attachment.filename.strip():
            raise InvalidMessage("attachment filename is empty")
        _parse_content_type(attachment.content_type)
    if not n.subject.strip() and not n.text and not n.html and not n.attachments:
        raise InvalidMessage("the message has neither a subject nor any content")
    return checked


def _prepare_notification(
    n: Notification, sender: _Mailbox, message_id: str | None, now: datetime, id_domain: str
) -> PreparedMessage:
    checked = _validate_notification(n)
    if message_id is None:
        message_id = make_msgid(domain=id_domain)

    lines = [_address_header("From", [(None, [sender])])]
    if checked.to:
        lines.append(_address_header("To", [(None, checked.to)]))
    if checked.cc:
        lines.append(_address_header("Cc", [(None, checked.cc)]))
    if checked.reply_to:
        lines.append(_address_header("Reply-To", [(None, checked.reply_to)]))
    lines.append(_unstructured("Subject", n.subject))
    lines.append(f"Date: {format_datetime(now)}\r\n")
    lines.append(f"Message-ID: {message_id}\r\n")
    lines.extend(_unstructured(name, value) for name, value in n.headers.items())
    lines.append("MIME-Version: 1.0\r\n")

    parts: list[MIMEPart] = []
    if n.text is not None:
        parts.append(_text_part(n.text, "plain", "text"))
    if n.html is not None:
        parts.append(_text_part(n.html, "html", "html"))
    body: MIMEPart | None = parts[0] if parts else None
    if len(parts) == 2:
        body = _multipart("alternative", parts)
    if n.attachments:
        attached: list[MIMEPart] = [] if body is None else [body]
        attached.extend(_attachment_part(a) for a in n.attachments)
        entity: MIMEPart = _multipart("mixed", attached)
    else:
        entity = body if body is not None else _text_part("", "plain", "text")

    everyone = checked.to + checked.cc + checked.bcc
    smtputf8 = any(mb.needs_smtputf8 for mb in (sender, *everyone, *checked.reply_to))
    return _finish(
        lines,
        _flatten(entity),
        sender=sender,
        recipients=_dedup(everyone),
        message_id=message_id,
        smtputf8=smtputf8,
    )


# ---------------------------------------------------------------------------
# EmailMessage
# ---------------------------------------------------------------------------


def _header_object(name: str, raw: Any) -> BaseHeader:
    """The parsed header for a raw value, after checking it cannot inject lines."""
    what = f"header {name}"
    if isinstance(raw, BaseHeader):
        header = raw
    elif isinstance(raw, str):
        if "\r" in raw.replace("\r\n", ""):
            raise InvalidMessage(f"{what} contains a bare CR: {raw!r}")
        unfolded = _FOLD.sub("", raw)
        _check_header_text(unfolded, what)
        try:
            header = email_policy.default.header_factory(name, unfolded)
        except Exception as exc:  # the parser's failure on untrusted text
            raise InvalidMessage(f"{what} cannot be parsed: {raw!r}") from exc
    else:
        raise InvalidMessage(
            f"{what} holds a {type(raw).__name__}, not text; build the message "
            f"with policy=email.policy.default"
        )
    _check_header_text(str(header), what)
    return header


def _groups(
    name: str, text: str, groups: Sequence[Group], defects: Iterable[MessageDefect]
) -> list[tuple[str | None, tuple[_Mailbox, ...]]]:
    """The address header's groups, each address checked by the strict rules."""
    for defect in defects:
        if not isinstance(defect, email_errors.NonASCIILocalPartDefect):
            raise InvalidMessage(f"header {name}: {defect} in {text!r}")
    result: list[tuple[str | None, tuple[_Mailbox, ...]]] = []
    for group in groups:
        label = None if group.display_name is None else _display_name(group.display_name, name)
        members = tuple(_mailbox_from_address(a, f"header {name}") for a in group.addresses)
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
        lines = _NEWLINE.split(payload)
        if payload.isascii() and "\x00" not in payload and all(len(x) <= _MAX_LINE for x in lines):
            if cte != "7bit":
                part.replace_header("Content-Transfer-Encoding", "7bit")
            continue
        data = _payload_bytes(part, payload)
        if part.get_content_maintype() == "text":
            normalised = data.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
            part.set_payload(_qp_encode(normalised))
            new_cte = "quoted-printable"
        else:
            part.set_payload(_base64_lines(data))
            new_cte = "base64"
        if "Content-Transfer-Encoding" in part:
            part.replace_header("Content-Transfer-Encoding", new_cte)
        else:
            part["Content-Transfer-Encoding"] = new_cte


def _payload_bytes(part: Message, payload: str) -> bytes:
    if _SURROGATE.search(payload):
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


def _prepare_email(
    msg: EmailMessage, sender: _Mailbox, message_id: str | None, now: datetime, id_domain: str
) -> PreparedMessage:
    # Every header of every part: a valid name, no way to start another line.
    for part in msg.walk():
        for name, raw in part.raw_items():
            _check_field_name(name, "header")
            _header_object(name, raw)

    top = list(msg.raw_items())
    counts = Counter(name.lower() for name, _ in top)
    for unique in _UNIQUE_HEADERS:
        if counts[unique] > 1:
            raise InvalidMessage(f"the message has {counts[unique]} {unique} headers")

    lines: list[str] = []
    envelope: list[_Mailbox] = []
    listed: list[_Mailbox] = [sender]
    from_line = _address_header("From", [(None, [sender])])
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
                lines.append(_address_header(name, groups))
        elif key == "message-id":
            if message_id is None:
                message_id = _check_message_id(str(header), "header Message-ID")
        elif isinstance(header, DateHeader):
            if header.defects or header.datetime is None:
                raise InvalidMessage(f"header {name}: {str(header)!r} is not a valid date")
            has_date = has_date or key == "date"
            lines.append(f"{name}: {format_datetime(header.datetime)}\r\n")
        elif isinstance(raw, str) and not isinstance(raw, BaseHeader) and raw.isascii():
            # Source text from a parsed message: already encoded and folded; keep it.
            value = "\r\n".join(_NEWLINE.split(raw))
            lines.append(f"{name}: {value}\r\n" if value else f"{name}:\r\n")
        else:
            lines.append(_unstructured(name, str(header)))
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
        recipients=_dedup(envelope),
        message_id=message_id,
        smtputf8=any(mb.needs_smtputf8 for mb in listed),
    )
