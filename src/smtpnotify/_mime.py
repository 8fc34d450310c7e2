"""MIME bodies: transfer encodings and the lean serializer for a ``Notification``.

:func:`write_body` writes the MIME entity of a notification (text, HTML,
attachments) straight into a buffer, without building ``email.message``
objects or running the email package's generator and folder.  The layout is
the one the email package's generator writes, so ``email.message_from_bytes``
reads it back to the same structure, headers and content:

* one part, or ``multipart/alternative`` (plain first) for text and HTML, in a
  ``multipart/mixed`` when there are attachments;
* text parts as ``7bit`` when they are short-lined ASCII ending in a line
  break, otherwise ``quoted-printable``; attachments as ``base64`` in lines of
  76 characters, encoded slice by slice so that no copy of the whole
  attachment is ever made besides the message itself;
* parameters quoted, or RFC 2231 encoded (``filename*=utf-8''…``, split into
  ``filename*0*=…`` sections when long) when they are not plain ASCII.

Everything written is ASCII with CRLF line endings and lines of at most 998
octets (78 in headers where the text allows).  Delimiter lines start with
``--==``: base64 has no ``-`` and quoted-printable never writes ``==``, so only
the 7bit parts need to be (and are) checked for a clash.
"""

from __future__ import annotations

import binascii
import io
import random
import re
import sys
from collections.abc import Sequence
from email import policy as email_policy
from email.headerregistry import ParameterizedMIMEHeader
from typing import TYPE_CHECKING
from urllib.parse import quote

from ._errors import InvalidMessage
from ._headers import FOLD_AT, MAX_LINE, NEWLINE, SURROGATE, check_header_text

if TYPE_CHECKING:
    from ._message import Attachment

__all__ = [
    "base64_lines",
    "check_wire",
    "fits_7bit",
    "parse_content_type",
    "qp_encode",
    "write_base64",
    "write_body",
]

_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
# Quoted-printable: every byte but printable ASCII (less "="), space and tab is =XX.
_QP_TABLE = {byte: f"={byte:02X}" for byte in range(256) if not (33 <= byte <= 126 and byte != 61)}
_QP_TABLE.pop(9)
_QP_TABLE.pop(32)
# A parameter value written as a quoted string: printable ASCII but '"' and '\'.
_QUOTABLE = re.compile(r"[\x20\x21\x23-\x5b\x5d-\x7e]*")

_B64_LINE = 76
_B64_SLICE = 57 * 1024
"""Attachment bytes encoded per step: whole lines (57 bytes → 76 characters), ~57 KiB."""


# ---------------------------------------------------------------------------
# Content types and parameters
# ---------------------------------------------------------------------------


def parse_content_type(value: str) -> tuple[str, str, dict[str, str]]:
    """``type/subtype; params`` of an attachment: the lower-cased type, subtype and params.

    Raises:
        InvalidMessage: not ``type/subtype``, a ``multipart/*`` or ``message/*``
            type, malformed parameters, or a parameter value that decodes to a
            control character.
    """
    check_header_text(value, "attachment content_type")
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
        for name, param in params.items():
            check_header_text(param, f"attachment content_type {value!r}, parameter {name}")
    return maintype, subtype, params


def _parameter(name: str, value: str) -> list[str]:
    """``name="value"``, or RFC 2231 ``name*=utf-8''…`` pieces of at most 76 characters."""
    if (
        _QUOTABLE.fullmatch(value)
        and "=?" not in value
        and value == value.strip(" ")
        and len(name) + len(value) <= 72
    ):
        return [f'{name}="{value}"']
    if SURROGATE.search(value):
        raise InvalidMessage(f"parameter {name} holds undecodable bytes: {value!r}")
    encoded = quote(value, safe="")
    if len(name) + len(encoded) <= 67:
        return [f"{name}*=utf-8''{encoded}"]
    # Sections, each decodable on its own: split between characters, never inside one.
    pieces: list[str] = []
    chunk: list[str] = []
    prefix = f"{name}*0*=utf-8''"
    size = len(prefix)
    for ch in value:
        code = quote(ch, safe="")
        if chunk and size + len(code) > FOLD_AT - 2:
            pieces.append(prefix + "".join(chunk))
            chunk, prefix = [], f"{name}*{len(pieces)}*="
            size = len(prefix)
        chunk.append(code)
        size += len(code)
    pieces.append(prefix + "".join(chunk))
    return pieces


def _parameterised(field: str, value: str, params: Sequence[tuple[str, str]]) -> str:
    """``field: value; p1="…"; …`` with CRLF, folded before a parameter past 78 characters."""
    line = f"{field}: {value}"
    lines: list[str] = []
    for name, param in params:
        for piece in _parameter(name, param):
            if len(line) + 2 + len(piece) > FOLD_AT:
                lines.append(line + ";")
                line = " " + piece
            else:
                line += "; " + piece
    lines.append(line)
    return "\r\n".join(lines) + "\r\n"


# ---------------------------------------------------------------------------
# Transfer encodings
# ---------------------------------------------------------------------------


def qp_encode(data: bytes, eol: str = "\n") -> str:
    """Quoted-printable for bytes whose line breaks are ``\\n``, lines ending in ``eol``.

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
    return eol.join(out) + eol


def fits_7bit(text: str) -> bool:
    """Whether ``text`` (``\\n`` line breaks) can go out as is and come back unchanged.

    That is: ASCII without control characters (TAB allowed), every line at
    most 78 characters without trailing blanks, and a final line break.
    """
    if text and not text.endswith("\n"):
        return False
    if not text.isascii() or " \n" in text or "\t\n" in text:
        return False
    lines = text.split("\n")
    # For ASCII, isprintable() is exactly "no control character" (0x00-0x1f, 0x7f).
    return max(map(len, lines)) <= FOLD_AT and "".join(lines).replace("\t", "").isprintable()


def base64_lines(data: bytes) -> str:
    """``data`` in base64, lines of 76 characters each ending in ``\\n``."""
    buffer = io.BytesIO()
    write_base64(buffer, data, b"\n")
    return buffer.getvalue().decode("ascii")


def write_base64(out: io.BytesIO, data: bytes, eol: bytes = b"\r\n") -> None:
    """Write ``data`` to ``out`` in base64, lines of 76 characters each ending in ``eol``.

    Encoded one slice of about 57 KiB at a time: besides ``out`` itself, no
    more than one slice's worth of memory is used, whatever the size of ``data``.
    """
    view = memoryview(data)
    b2a = binascii.b2a_base64
    for start in range(0, len(view), _B64_SLICE):
        encoded = b2a(view[start : start + _B64_SLICE], newline=False)
        out.write(eol.join([encoded[i : i + _B64_LINE] for i in range(0, len(encoded), _B64_LINE)]))
        out.write(eol)


# ---------------------------------------------------------------------------
# The wire check
# ---------------------------------------------------------------------------


def check_wire(data: bytes) -> None:
    """Refuse bytes with a bare CR or LF, or a line longer than 998 octets.

    Raises:
        InvalidMessage: one of those; nothing that holds them is ever sent.
    """
    crlf = data.count(b"\r\n")  # every CR starts a CRLF and every LF ends one
    if data.count(b"\r") != crlf or data.count(b"\n") != crlf:
        raise InvalidMessage("the message holds a bare CR or LF")
    if len(data) > MAX_LINE and max(map(len, data.split(b"\r\n"))) > MAX_LINE:
        raise InvalidMessage(f"the message holds a line longer than {MAX_LINE} octets")


# ---------------------------------------------------------------------------
# The notification's MIME entity
# ---------------------------------------------------------------------------


def _text_part(text: str, subtype: str, what: str) -> tuple[bytes, bool]:
    """The whole part (headers and content) and whether it went out as 7bit."""
    body = NEWLINE.sub("\n", text) if "\r" in text else text
    if not body.isascii() and SURROGATE.search(body):
        raise InvalidMessage(f"{what} holds a lone surrogate and cannot be encoded as UTF-8")
    seven_bit = fits_7bit(body)
    if seven_bit:
        cte, content = "7bit", body.replace("\n", "\r\n")
    else:
        cte, content = "quoted-printable", qp_encode(body.encode("utf-8"), "\r\n")
    part = (
        f'Content-Type: text/{subtype}; charset="utf-8"\r\n'
        f"Content-Transfer-Encoding: {cte}\r\n\r\n{content}"
    ).encode("ascii")
    check_wire(part)
    return part, seven_bit


def _boundary(seven_bit_parts: Sequence[bytes], taken: str = "") -> str:
    """A boundary like the email package's, found in none of the 7bit parts."""
    while True:
        boundary = f"==============={random.randrange(sys.maxsize):019d}=="
        delimiter = b"--" + boundary.encode("ascii")
        if boundary != taken and not any(delimiter in part for part in seven_bit_parts):
            return boundary


def _multipart_header(subtype: str, boundary: str) -> bytes:
    head = _parameterised("Content-Type", f"multipart/{subtype}", [("boundary", boundary)])
    return (head + "\r\n").encode("ascii")


def _attachment_head(attachment: Attachment) -> bytes:
    maintype, subtype, params = parse_content_type(attachment.content_type)
    head = (
        _parameterised("Content-Type", f"{maintype}/{subtype}", list(params.items()))
        + "Content-Transfer-Encoding: base64\r\n"
        + _parameterised("Content-Disposition", "attachment", [("filename", attachment.filename)])
        + "\r\n"
    ).encode("ascii")
    check_wire(head)
    return head


def write_body(
    out: io.BytesIO, text: str | None, html: str | None, attachments: Sequence[Attachment]
) -> None:
    """Write the MIME entity of a notification (its ``Content-*`` headers and content).

    Raises:
        InvalidMessage: a body with a lone surrogate, or an attachment whose
            content type or file name cannot be written.
    """
    texts: list[tuple[bytes, bool]] = []
    if text is not None:
        texts.append(_text_part(text, "plain", "text"))
    if html is not None:
        texts.append(_text_part(html, "html", "html"))
    if not texts and not attachments:
        texts.append(_text_part("", "plain", "text"))
    heads = [_attachment_head(a) for a in attachments]  # every check before any writing
    seven_bit = [part for part, is_7bit in texts if is_7bit]

    mixed = b""
    if attachments:
        boundary = _boundary(seven_bit)
        mixed = boundary.encode("ascii")
        out.write(_multipart_header("mixed", boundary))
        out.write(b"--" + mixed + b"\r\n")
    if len(texts) == 2:
        boundary = _boundary(seven_bit, mixed.decode("ascii"))
        alternative = boundary.encode("ascii")
        out.write(_multipart_header("alternative", boundary))
        out.write(b"--" + alternative + b"\r\n")
        out.write(texts[0][0])
        out.write(b"\r\n--" + alternative + b"\r\n")
        out.write(texts[1][0])
        out.write(b"\r\n--" + alternative + b"--\r\n")
    elif texts:
        out.write(texts[0][0])
    for index, (attachment, head) in enumerate(zip(attachments, heads, strict=True)):
        if index or texts:
            out.write(b"\r\n--" + mixed + b"\r\n")
        out.write(head)
        write_base64(out, attachment.content)
    if attachments:
        out.write(b"\r\n--" + mixed + b"--\r\n")
