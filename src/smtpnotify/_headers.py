"""Header fields: the checks every value passes, RFC 2047 encoded words and folding.

smtpnotify writes header blocks itself rather than through the email package's
folder, which can corrupt text (it inserts spaces when it splits encoded words
in display names and long values).  Everything here returns ``str`` lines that
end with CRLF, at most 998 octets long and folded at 78 characters where the
text allows.  Text that cannot go out as plain ASCII becomes RFC 2047 'B'
encoded words (``=?utf-8?b?...?=``) that decode back exactly.
"""

from __future__ import annotations

import base64
import email.header
import re
from collections.abc import Sequence
from typing import TYPE_CHECKING

from ._errors import InvalidMessage

if TYPE_CHECKING:
    from ._addresses import Mailbox

__all__ = [
    "BAD_HEADER_CHAR",
    "FOLD_AT",
    "MAX_LINE",
    "NEWLINE",
    "SURROGATE",
    "address_header",
    "check_field_name",
    "check_header_text",
    "check_message_id",
    "fold",
    "phrase",
    "unstructured",
]

FOLD_AT = 78
"""Header lines are folded to this length where the text allows (RFC 5322 §2.1.1)."""
MAX_LINE = 998
"""No line of a message is longer than this many octets (RFC 5322 §2.1.1, RFC 5321 §4.5.3.1.6)."""
_EW_MAX = 75
"""Longest RFC 2047 encoded word in unstructured text."""
_MAX_FIELD_NAME = 76

_PLAIN_PHRASE = re.compile(
    r"[A-Za-z0-9!#$%&'*+\-/=?^_`{|}~]+(?: [A-Za-z0-9!#$%&'*+\-/=?^_`{|}~]+)*"
)
_FIELD_NAME = re.compile(r"[\x21-\x39\x3b-\x7e]+")
_MSGID = re.compile(r"<[\x21-\x3b\x3d\x3f\x41-\x7e]+@[\x21-\x3b\x3d\x3f\x41-\x7e]+>")
_WORDS = re.compile(r"[ \t]*[^ \t]+")

# C0 controls except TAB, DEL, C1 controls (NEL among them), the Unicode line and
# paragraph separators, and lone surrogates (undecodable bytes).  ``str.splitlines``
# breaks lines at several of these, and so does the email package.
BAD_HEADER_CHAR = re.compile(r"[\x00-\x08\x0a-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff]")
"""Characters no header value may hold."""
SURROGATE = re.compile(r"[\ud800-\udfff]")
"""A lone surrogate: text decoded with ``surrogateescape`` from undecodable bytes."""
NEWLINE = re.compile(r"\r\n|\r|\n")
"""Any line ending: CRLF, a lone CR or a lone LF."""


def check_header_text(value: str, what: str) -> None:
    """Refuse text that could end or split a header line.

    Raises:
        InvalidMessage: ``value`` holds CR, LF, another control character
            (TAB excepted), U+2028/U+2029 or a lone surrogate.
    """
    bad = BAD_HEADER_CHAR.search(value)
    if bad is None and "=?" in value:
        # Text that looks like RFC 2047 encoded words is decoded by every reader:
        # what it decodes to must pass too ("=?utf-8?q?a=0D=0ABcc:_x?=").
        bad = BAD_HEADER_CHAR.search(_decoded_words(value))
    if bad is None:
        return
    ch = bad.group()
    if ch in "\r\n":
        raise InvalidMessage(f"{what} contains a line break (CR or LF): {value!r}")
    if SURROGATE.match(ch):
        raise InvalidMessage(f"{what} contains undecodable bytes: {value!r}")
    raise InvalidMessage(f"{what} contains control character U+{ord(ch):04X}: {value!r}")


def check_field_name(name: str, what: str) -> None:
    """Refuse a header field name that is not printable ASCII without ``:`` (or too long)."""
    if not isinstance(name, str) or not _FIELD_NAME.fullmatch(name):
        raise InvalidMessage(f"{what}: {name!r} is not a valid header field name")
    if len(name) > _MAX_FIELD_NAME:
        raise InvalidMessage(f"{what}: header field name longer than {_MAX_FIELD_NAME}: {name!r}")


def check_message_id(value: str, what: str) -> str:
    """``value`` without surrounding blanks, checked to be ``<left@right>`` in printable ASCII."""
    if not isinstance(value, str):
        raise TypeError(f"{what} must be a str")
    check_header_text(value, what)
    value = value.strip(" \t")
    if len(value) > 900 or not _MSGID.fullmatch(value):
        raise InvalidMessage(f"{what}: {value!r} is not a Message-ID of the form <left@right>")
    return value


def fold(name: str, pieces: Sequence[str], sep: str) -> str:
    """``name: pieces…`` folded before a piece when a line would pass 78 characters.

    With ``sep=" "`` the pieces are joined by one space (a fold replaces it);
    with ``sep=""`` every piece after the first starts with its own whitespace,
    so unfolding gives back the exact text.
    """
    line = f"{name}:"
    lines: list[str] = []
    for index, piece in enumerate(pieces):
        chunk = (" " if index == 0 else sep) + piece
        if index and len(line) + len(chunk) > FOLD_AT:
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


def unstructured(name: str, value: str) -> str:
    """An unstructured header (Subject, custom fields) that decodes back to ``value``."""
    check_header_text(value, f"header {name}")
    if not value:
        return f"{name}:\r\n"
    plain = (
        value.isascii() and "=?" not in value and value[0] not in " \t" and value[-1] not in " \t"
    )
    if plain:
        folded = fold(name, _WORDS.findall(value), "")
        if all(len(line) <= MAX_LINE for line in folded.split("\r\n")):
            return folded
    return fold(name, _encoded_words(value, FOLD_AT - len(name) - 2), " ")


def phrase(name: str) -> str:
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


def _mailbox_text(mailbox: Mailbox) -> str:
    if not mailbox.display_name:
        return mailbox.addr_spec
    return f"{phrase(mailbox.display_name)} <{mailbox.addr_spec}>"


def address_header(name: str, groups: Sequence[tuple[str | None, Sequence[Mailbox]]]) -> str:
    """An address-list header; ``groups`` pairs a group name (or None) with mailboxes."""
    pieces: list[str] = []
    for index, (group, mailboxes) in enumerate(groups):
        last_group = index == len(groups) - 1
        if group is not None:
            texts = [_mailbox_text(mb) for mb in mailboxes]
            label = phrase(group) + ":"
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
    return fold(name, pieces, " ")


def _decoded_words(value: str) -> str:
    """``value`` with any RFC 2047 encoded words decoded, as a mail reader shows it."""
    try:
        return "".join(
            text.decode(charset or "ascii", "replace") if isinstance(text, bytes) else text
            for text, charset in email.header.decode_header(value)
        )
    except (ValueError, LookupError):  # a malformed word or unknown charset: shown as it stands
        return value
