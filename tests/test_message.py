"""Tests for smtpnotify._message: Notification, Attachment, prepare, validate_address.

The oracle for "what a receiver sees" is the stdlib parser,
``email.message_from_bytes(data, policy=email.policy.default)``.  It keeps the
CRLF line endings of ``data`` in decoded text, so a body comes back with its
line endings normalised to CRLF (and to LF when ``data`` is parsed after a
CRLF → LF conversion, as a Unix mailbox would store it).
"""

from __future__ import annotations

import copy
import dataclasses
import email
import email.policy
import email.utils
import pickle
import re
from datetime import UTC, datetime, timedelta, timezone
from email.message import EmailMessage, Message
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from smtpnotify._errors import InvalidMessage
from smtpnotify._message import Attachment, Notification, prepare, validate_address
from smtpnotify._prepared import PreparedMessage

SENDER = "Change Desk <noreply@example.com>"
NOW = datetime(2024, 5, 17, 9, 30, tzinfo=UTC)
LINE_BREAK = re.compile(r"\r\n|\r|\n")

fast = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
# For properties that parse a multipart message per example (about 10 ms each).
heavy = settings(fast, max_examples=100)

# Text allowed in a header value: anything but controls (TAB excepted), line or
# paragraph separators and lone surrogates.
header_char = st.characters(exclude_categories=["Cs", "Cc", "Zl", "Zp"]) | st.sampled_from(
    [" ", "\t"]
)
header_text = st.text(header_char, max_size=120)
short_header_text = st.text(header_char, max_size=50)
line_break = st.sampled_from(["\r", "\n", "\r\n"])
with_line_break = st.builds(lambda a, nl, b: a + nl + b, header_text, line_break, header_text)


def make(text: str | None = "hello\n", **kwargs: object) -> PreparedMessage:
    """A prepared Notification with defaults for everything not under test."""
    kwargs.setdefault("to", "Alice <alice@example.com>")
    kwargs.setdefault("subject", "Subject")
    return prepare(Notification(text=text, **kwargs), sender=SENDER, now=NOW)  # type: ignore[arg-type]


def parse(data: bytes) -> EmailMessage:
    """What a receiver parses; for SMTPUTF8 messages the headers are UTF-8 text."""
    try:
        head = data.decode("ascii")
    except UnicodeDecodeError:
        head = data.decode("utf-8")
        msg = email.message_from_string(head, policy=email.policy.default)
    else:
        msg = email.message_from_bytes(data, policy=email.policy.default)
    assert isinstance(msg, EmailMessage)
    return msg


def header_block(data: bytes) -> bytes:
    return data.split(b"\r\n\r\n", 1)[0] + b"\r\n"


def assert_wire_format(data: bytes) -> None:
    """CRLF everywhere, no line over 998 octets, ends with CRLF, 7-bit body."""
    assert data.endswith(b"\r\n")
    assert re.search(rb"\r(?!\n)|(?<!\r)\n", data) is None
    assert max(len(line) for line in data.split(b"\r\n")) <= 998
    assert data.split(b"\r\n\r\n", 1)[1].isascii()


def plain_body(msg: EmailMessage) -> str:
    body = msg.get_body(("plain",))
    assert body is not None
    content = body.get_content()
    assert isinstance(content, str)
    return content


# ---------------------------------------------------------------------------
# Notification and Attachment values
# ---------------------------------------------------------------------------


def test_notification_normalises_address_fields_to_tuples() -> None:
    n = Notification("a@example.com", "s", cc=["b@example.com"], bcc=("c@example.com",))
    assert n.to == ("a@example.com",)
    assert n.cc == ("b@example.com",)
    assert n.bcc == ("c@example.com",)
    assert n.reply_to == ()
    assert Notification("a@example.com", "s", reply_to="r@example.com").reply_to == (
        "r@example.com",
    )


def test_notification_is_frozen_hashable_and_comparable() -> None:
    a = Notification("a@example.com", "s", text="x", headers={"X-A": "1"})
    b = Notification(["a@example.com"], "s", text="x", headers={"X-A": "1"})
    assert a == b
    assert hash(a) == hash(b)
    with pytest.raises(dataclasses.FrozenInstanceError):
        a.subject = "other"  # type: ignore[misc]
    with pytest.raises(TypeError):
        a.headers["X-B"] = "2"  # type: ignore[index]


def test_notification_pickles_and_copies() -> None:
    n = Notification(
        "a@example.com",
        "s",
        text="t",
        headers={"X-A": "1"},
        attachments=[Attachment("a.bin", b"\x00")],
    )
    assert pickle.loads(pickle.dumps(n)) == n  # noqa: S301 - our own bytes
    assert copy.deepcopy(n) == n
    assert copy.copy(n) == n
    assert pickle.loads(pickle.dumps(n.attachments[0])) == n.attachments[0]  # noqa: S301


def test_notification_keeps_a_copy_of_headers() -> None:
    headers = {"X-A": "1"}
    n = Notification("a@example.com", "s", headers=headers)
    headers["X-B"] = "2"
    assert dict(n.headers) == {"X-A": "1"}


def test_dataclasses_replace_revalidates() -> None:
    n = Notification("a@example.com", "s")
    assert dataclasses.replace(n, subject="t").subject == "t"
    with pytest.raises(InvalidMessage):
        dataclasses.replace(n, subject="t\r\nBcc: x@example.com")


@pytest.mark.parametrize(
    "kwargs",
    [
        {"to": 123, "subject": "s"},
        {"to": [b"a@example.com"], "subject": "s"},
        {"to": b"a@example.com", "subject": "s"},
        {"to": None, "subject": "s"},
        {"to": "a@example.com", "subject": None},
        {"to": "a@example.com", "subject": "s", "text": b"bytes"},
        {"to": "a@example.com", "subject": "s", "headers": {"X-A": 1}},
        {"to": "a@example.com", "subject": "s", "headers": [("X-A", "1")]},
        {"to": "a@example.com", "subject": "s", "attachments": [b"data"]},
    ],
)
def test_notification_rejects_wrong_types(kwargs: dict[str, object]) -> None:
    with pytest.raises(TypeError):
        Notification(**kwargs)  # type: ignore[arg-type]


def test_attachment_normalises_and_validates() -> None:
    att = Attachment("  report.pdf ", bytearray(b"%PDF"), "Application/PDF")  # type: ignore[arg-type]
    assert att.filename == "report.pdf"
    assert att.content == b"%PDF"
    assert type(att.content) is bytes
    assert att.size == 4
    assert "PDF" not in repr(att).replace("report.pdf", "").replace("Application/PDF", "")


@pytest.mark.parametrize(
    ("filename", "content", "content_type", "error"),
    [
        ("a\r\nb.txt", b"", "text/plain", InvalidMessage),
        ("a.txt\n", b"", "text/plain", InvalidMessage),
        ("   ", b"", "text/plain", InvalidMessage),
        ("", b"", "text/plain", InvalidMessage),
        ("a\x00.txt", b"", "text/plain", InvalidMessage),
        ("a.txt", b"", "textplain", InvalidMessage),
        ("a.txt", b"", "text/", InvalidMessage),
        ("a.txt", b"", "text/plain\r\nX-Evil: 1", InvalidMessage),
        ("a.txt", b"", "multipart/mixed", InvalidMessage),
        ("a.eml", b"", "message/rfc822", InvalidMessage),
        ("a.txt", b"", "text/plain; charset", InvalidMessage),
        ("a.txt", "text", "text/plain", TypeError),
        (b"a.txt", b"", "text/plain", TypeError),
    ],
)
def test_attachment_rejects(
    filename: object, content: object, content_type: str, error: type
) -> None:
    with pytest.raises(error):
        Attachment(filename, content, content_type)  # type: ignore[arg-type]


def test_attachment_content_type_parameters_are_kept() -> None:
    att = Attachment("r.csv", "a;b\nü;1\n".encode(), "text/csv; charset=utf-8")
    msg = parse(make(attachments=[att]).data)
    (part,) = msg.iter_attachments()
    assert part.get_content_type() == "text/csv"
    assert part.get_param("charset") == "utf-8"
    assert part.get_payload(decode=True) == att.content


# ---------------------------------------------------------------------------
# Addresses
# ---------------------------------------------------------------------------

INVALID_ADDRESSES = [
    "alice@example.org(<bob@example.com>",
    "no-at-sign",
    "a@b@c",
    "a@b@example.com",
    "",
    "   ",
    "alice smith@example.com",
    "<alice@example.com",
    "alice@example.com>",
    "Alice <alice@example.com",
    "Alice alice@example.com>",
    "Alice <alice@example.com> trailing",
    "Alice <<alice@example.com>>",
    "<>",
    "a@example.com, b@example.com",
    "a@example.com b@example.com",
    "Ali@ce <alice@example.com>",
    "Ops (EU) <ops@example.com>",
    '"unterminated <a@example.com>',
    "a..b@example.com",
    ".a@example.com",
    "a.@example.com",
    "@example.com",
    "a@",
    "a@-example.com",
    "a@example-.com",
    "a@example..com",
    "a@example.com.",
    "a@exa_mple.com",
    "a@exa mple.com",
    '"a b"@example.com',
    "a(comment)@example.com",
    "a@[999.1.1.1]",
    "a@[IPv6:not-an-ip]",
    "a@[example.com]",
    "a@straße.de",  # IDNA 2003 and 2008 disagree: refuse rather than guess
    "x" * 65 + "@example.com",
    "a@" + "l" * 64 + ".example",
    "a@" + ".".join(["label"] * 50),
    "a@exam\u00a0ple.com",
    "al\u200bice@example.com",
    "Alice <alice@example.com>\r\nBcc: eve@example.com",
    "alice@example.com\n",
]


@pytest.mark.parametrize("address", INVALID_ADDRESSES)
def test_validate_address_rejects(address: str) -> None:
    with pytest.raises(InvalidMessage):
        validate_address(address)


@pytest.mark.parametrize("address", INVALID_ADDRESSES)
def test_invalid_address_in_any_field_is_rejected(address: str) -> None:
    for field in ("to", "cc", "bcc", "reply_to"):
        kwargs: dict[str, object] = {"to": "ok@example.com", field: [address]}
        with pytest.raises(InvalidMessage, match=field):
            prepare(Notification(subject="s", **kwargs), sender=SENDER)  # type: ignore[arg-type]
    with pytest.raises(InvalidMessage, match="sender"):
        prepare(Notification("ok@example.com", "s"), sender=address)


@pytest.mark.parametrize(
    ("address", "envelope"),
    [
        ("a@example.com", "a@example.com"),
        ("  a@example.com\t", "a@example.com"),
        ("<a@example.com>", "a@example.com"),
        ("Alice <alice@example.com>", "alice@example.com"),
        ('"Doe, Jane" <jane@example.com>', "jane@example.com"),
        ('"Ali@ce <x>" <alice@example.com>', "alice@example.com"),
        ('"Say \\"hi\\"" <hi@example.com>', "hi@example.com"),
        ("Dr. Who <who@example.com>", "who@example.com"),
        ("O'Brien <ob@example.com>", "ob@example.com"),
        ("Jörg Müller <joerg@example.com>", "joerg@example.com"),
        ("Family 👨‍👩‍👧 <fam@example.com>", "fam@example.com"),
        ("first.last+tag@sub.example.co.uk", "first.last+tag@sub.example.co.uk"),
        ("!#$%&'*+-/=?^_`{|}~@example.com", "!#$%&'*+-/=?^_`{|}~@example.com"),
        ("user@bücher.example", "user@xn--bcher-kva.example"),
        ("user@BÜCHER.example", "user@xn--bcher-kva.example"),
        ("user@xn--bcher-kva.example", "user@xn--bcher-kva.example"),
        ("jörg@example.com", "jörg@example.com"),
        ("用户@例子.测试", "用户@xn--fsqu00a.xn--0zwm56d"),  # IANA IDN test domain
        ("root@localhost", "root@localhost"),
        ("a@[192.0.2.1]", "a@[192.0.2.1]"),
        ("Ops <a@[IPv6:2001:db8::1]>", "a@[IPv6:2001:db8::1]"),
    ],
)
def test_validate_address_returns_the_envelope_form(address: str, envelope: str) -> None:
    assert validate_address(address) == envelope


def test_validate_address_needs_a_str() -> None:
    with pytest.raises(TypeError):
        validate_address(b"a@example.com")  # type: ignore[arg-type]


def test_idna_domain_in_envelope_and_headers() -> None:
    p = make(to="Jörg <user@bücher.example>")
    assert p.recipients == ("user@xn--bcher-kva.example",)
    assert not p.smtputf8
    assert p.data.isascii()
    (address,) = parse(p.data)["To"].addresses
    assert (address.display_name, address.addr_spec) == ("Jörg", "user@xn--bcher-kva.example")


@pytest.mark.parametrize("field", ["to", "cc", "bcc", "reply_to"])
def test_non_ascii_local_part_sets_smtputf8(field: str) -> None:
    kwargs: dict[str, object] = {"to": "ok@example.com", field: "jörg@example.com"}
    p = make(**kwargs)  # type: ignore[arg-type]
    assert p.smtputf8
    if field != "reply_to":
        assert "jörg@example.com" in p.recipients


def test_non_ascii_sender_local_part_sets_smtputf8() -> None:
    p = prepare(Notification("ok@example.com", "s"), sender="Jörg <jörg@example.com>")
    assert p.smtputf8
    assert p.sender == "jörg@example.com"
    assert parse(p.data)["From"].addresses[0].username == "jörg"


def test_ascii_local_parts_do_not_set_smtputf8() -> None:
    p = make(to="Jörg Müller <joerg@bücher.example>", subject="Grüße", text="Grüße\n")
    assert not p.smtputf8
    assert p.data.isascii()


def test_smtputf8_headers_are_raw_utf8_only_in_the_local_part() -> None:
    p = make(to="Jörg <jörg@example.com>", subject="Grüße")
    head = header_block(p.data).decode("utf-8")
    assert "jörg@example.com" in head
    assert "Jörg" not in head  # the display name is still RFC 2047 encoded
    assert "Grüße" not in head
    msg = parse(p.data)
    assert msg["To"].addresses[0].display_name == "Jörg"
    assert str(msg["Subject"]) == "Grüße"


# ---------------------------------------------------------------------------
# Recipients, From, Bcc
# ---------------------------------------------------------------------------


def test_recipients_are_to_cc_bcc_deduplicated_first_spelling_kept() -> None:
    p = make(
        to=["Alice <Alice@Example.com>", "bob@example.com"],
        cc=["alice@example.com", "carol@example.com", "BOB@EXAMPLE.COM"],
        bcc=["dave@example.com", "carol@example.com", "Alice <alice@EXAMPLE.com>"],
    )
    assert p.recipients == (
        "Alice@Example.com",
        "bob@example.com",
        "carol@example.com",
        "dave@example.com",
    )


def test_dedup_compares_the_idna_form() -> None:
    p = make(to="user@bücher.example", cc="user@xn--bcher-kva.example")
    assert p.recipients == ("user@xn--bcher-kva.example",)


def test_no_recipient_is_rejected() -> None:
    with pytest.raises(InvalidMessage, match="no recipient"):
        Notification((), "s", text="x")
    with pytest.raises(InvalidMessage, match="no recipient"):
        Notification([], "s", reply_to="r@example.com")


def test_bcc_only_message_has_no_to_header() -> None:
    p = make(to=(), bcc="hidden@example.com")
    assert p.recipients == ("hidden@example.com",)
    head = header_block(p.data)
    assert b"hidden" not in p.data
    assert not re.search(rb"(?im)^(to|cc|bcc):", head)


def test_from_is_always_the_sender_and_envelope_is_bare() -> None:
    p = make()
    assert p.sender == "noreply@example.com"
    msg = parse(p.data)
    (address,) = msg["From"].addresses
    assert (address.display_name, address.addr_spec) == ("Change Desk", "noreply@example.com")
    assert len(msg.get_all("From") or []) == 1


def test_headers_in_order_and_content() -> None:
    p = make(
        to=["Alice <alice@example.com>", "bob@example.com"],
        cc="carol@example.com",
        reply_to=["Help Desk <help@example.com>", "ops@example.com"],
        headers={"X-Ticket": "CHG-42", "In-Reply-To": "<abc@example.com>"},
    )
    msg = parse(p.data)
    assert [a.addr_spec for a in msg["To"].addresses] == ["alice@example.com", "bob@example.com"]
    assert [a.addr_spec for a in msg["Cc"].addresses] == ["carol@example.com"]
    assert [a.addr_spec for a in msg["Reply-To"].addresses] == [
        "help@example.com",
        "ops@example.com",
    ]
    assert str(msg["X-Ticket"]) == "CHG-42"
    assert str(msg["In-Reply-To"]) == "<abc@example.com>"
    assert msg["MIME-Version"] == "1.0"
    names = [
        line.split(b":")[0] for line in header_block(p.data).split(b"\r\n") if line[:1].isalpha()
    ]
    assert names[:7] == [b"From", b"To", b"Cc", b"Reply-To", b"Subject", b"Date", b"Message-ID"]


def test_long_address_lists_are_folded() -> None:
    to = [f"User Number {i} <user{i}@example.com>" for i in range(30)]
    p = make(to=to)
    assert all(len(line) <= 78 for line in header_block(p.data).split(b"\r\n"))
    assert [a.addr_spec for a in parse(p.data)["To"].addresses] == [
        f"user{i}@example.com" for i in range(30)
    ]


# ---------------------------------------------------------------------------
# Header validation
# ---------------------------------------------------------------------------


def _with_header_value(where: str, value: str) -> tuple[Notification, str]:
    """Put ``value`` in one header position; returns the message and the sender."""
    quoted = value.replace("\\", "\\\\").replace('"', '\\"')
    if where == "sender":
        return Notification("a@example.com", "s"), f"{value} <a@example.com>"
    if where == "subject":
        return Notification("a@example.com", value, text="x"), SENDER
    if where == "custom header":
        return Notification("a@example.com", "s", headers={"X-Custom": value}), SENDER
    if where == "reply_to":
        return Notification("a@example.com", "s", reply_to=value), SENDER
    if where == "filename":
        return Notification("a@example.com", "s", attachments=[Attachment(value, b"x")]), SENDER
    kwargs: dict[str, object] = {"to": "a@example.com", where: f'"{quoted}" <x@example.com>'}
    return Notification(subject="s", **kwargs), SENDER  # type: ignore[arg-type]


HEADER_POSITIONS = ["subject", "custom header", "to", "cc", "bcc", "reply_to", "sender", "filename"]


@fast
@given(value=with_line_break, where=st.sampled_from(HEADER_POSITIONS))
def test_line_break_in_any_header_value_is_rejected(value: str, where: str) -> None:
    """Display names (to, cc, bcc), subject, custom header, reply_to, sender, filename."""
    with pytest.raises(InvalidMessage):
        message, sender = _with_header_value(where, value)
        prepare(message, sender=sender)


@pytest.mark.parametrize("where", HEADER_POSITIONS)
@pytest.mark.parametrize("value", ["a\rb", "a\nb", "a\r\nBcc: eve@example.com", "\n", "x\r"])
def test_line_break_examples_in_every_position(where: str, value: str) -> None:
    with pytest.raises(InvalidMessage, match=r"line break|invalid address"):
        message, sender = _with_header_value(where, value)
        prepare(message, sender=sender)


@pytest.mark.parametrize(
    "char", ["\x00", "\x07", "\x0b", "\x0c", "\x1b", "\x7f", "\x85", "\u2028", "\u2029", "\ud800"]
)
def test_other_line_breaking_or_control_characters_are_rejected(char: str) -> None:
    with pytest.raises(InvalidMessage):
        Notification("a@example.com", f"a{char}b")
    with pytest.raises(InvalidMessage):
        Notification("a@example.com", "s", headers={"X-A": f"{char}"})
    with pytest.raises(InvalidMessage):
        Notification(f'"a{char}b" <a@example.com>', "s")


def test_validation_is_repeated_by_prepare() -> None:
    """A Notification changed behind the validator's back is still refused."""
    for field, value in [
        ("subject", "s\r\nBcc: eve@example.com"),
        ("to", ("eve@example.com\r\nX: y",)),
        ("to", ()),
        ("headers", {"Bcc": "eve@example.com"}),
        ("attachments", (object(),)),
    ]:
        n = Notification("a@example.com", "s")
        object.__setattr__(n, field, value)
        with pytest.raises(InvalidMessage):
            prepare(n, sender=SENDER)


@pytest.mark.parametrize(
    "name",
    ["X Bad", "X:Bad", "", "X-\u00e9", "X\r\nBcc", "X\tY", "X" * 77, "X-A\x00"],
)
def test_invalid_header_names_are_rejected(name: str) -> None:
    with pytest.raises(InvalidMessage, match="header"):
        Notification("a@example.com", "s", headers={name: "v"})


@pytest.mark.parametrize(
    "name",
    [
        "From",
        "from",
        "Sender",
        "To",
        "CC",
        "bcc",
        "Reply-To",
        "Subject",
        "Date",
        "Message-ID",
        "MIME-Version",
        "Content-Type",
        "content-transfer-encoding",
        "Content-Disposition",
        "Resent-To",
        "Resent-Bcc",
        "Return-Path",
    ],
)
def test_reserved_headers_cannot_be_set(name: str) -> None:
    with pytest.raises(InvalidMessage, match="set by smtpnotify"):
        Notification("a@example.com", "s", headers={name: "eve@example.com"})


def test_custom_headers_are_written() -> None:
    url = "<https://example.com/unsubscribe?token=" + "x" * 120 + ">"
    p = make(headers={"List-Unsubscribe": url, "X-Empty": "", "X-Priority": "1"})
    msg = parse(p.data)
    assert str(msg["List-Unsubscribe"]) == url
    assert str(msg["X-Empty"]) == ""
    assert str(msg["X-Priority"]) == "1"
    assert bytes(url, "ascii") in p.data  # a long structured value is not encoded


def test_non_ascii_header_name_is_rejected_even_if_value_is_fine() -> None:
    with pytest.raises(InvalidMessage):
        Notification("a@example.com", "s", headers={"X-Über": "ja"})


# ---------------------------------------------------------------------------
# Encodings: round trips through the stdlib parser
# ---------------------------------------------------------------------------


@fast
@given(subject=header_text)
def test_any_subject_round_trips(subject: str) -> None:
    p = make(subject=subject, text="x\n")
    assert_wire_format(p.data)
    assert header_block(p.data).isascii()
    assert str(parse(p.data)["Subject"]) == subject


@fast
@given(value=header_text)
def test_any_custom_header_value_round_trips(value: str) -> None:
    p = make(headers={"X-Custom": value})
    assert_wire_format(p.data)
    assert str(parse(p.data)["X-Custom"]) == value


@fast
@given(name=short_header_text, utf8=st.booleans())
def test_display_names_round_trip_with_whitespace_normalised(name: str, utf8: bool) -> None:
    quoted = name.replace("\\", "\\\\").replace('"', '\\"')
    local = "jörg" if utf8 else "joerg"
    p = make(to=f'"{quoted}" <{local}@example.com>', subject="s")
    assert p.smtputf8 is utf8
    assert_wire_format(p.data)
    (address,) = parse(p.data)["To"].addresses
    assert address.display_name == " ".join(name.split())
    assert address.addr_spec == f"{local}@example.com"


@pytest.mark.parametrize(
    "name",
    [
        "Jörg Müller",
        "株式会社サンプル カスタマーサポートセンター 東京本社",  # longer than one encoded word
        "=?utf-8?q?not_an_encoded_word?=",
        "Ünïcödé" * 20,
        'Say "hi" \\ bye',
        "Dr. Who",
    ],
)
def test_display_name_examples_round_trip(name: str) -> None:
    quoted = name.replace("\\", "\\\\").replace('"', '\\"')
    p = prepare(
        Notification(f'"{quoted}" <a@example.com>', "s"), sender=f'"{quoted}" <s@example.com>'
    )
    msg = parse(p.data)
    assert msg["To"].addresses[0].display_name == name
    assert msg["From"].addresses[0].display_name == name
    assert_wire_format(p.data)


def test_display_name_too_long_is_rejected() -> None:
    with pytest.raises(InvalidMessage, match="display name"):
        Notification(f'"{"ü" * 200}" <a@example.com>', "s")


@heavy
@given(filename=short_header_text.filter(lambda f: f.strip()), content=st.binary(max_size=300))
def test_attachments_round_trip(filename: str, content: bytes) -> None:
    p = make(attachments=[Attachment(filename, content)])
    assert_wire_format(p.data)
    (part,) = parse(p.data).iter_attachments()
    assert part.get_filename() == filename.strip()
    assert part.get_payload(decode=True) == content
    assert part.get_content_type() == "application/octet-stream"


def test_subject_examples() -> None:
    for subject in [
        "",
        "   leading and trailing   ",
        "tab\tinside",
        "=?utf-8?q?looks_encoded?=",
        "Grüße aus Köln – ein sehr langer Betreff, der gefaltet werden muss " * 3,
        "x" * 2000,
        "日本語のテキスト" * 30,
    ]:
        p = make(subject=subject, text="x\n")
        assert str(parse(p.data)["Subject"]) == subject
        assert_wire_format(p.data)


def test_plain_ascii_subject_is_not_encoded() -> None:
    p = make(subject="Disk full on db-01 (98 %)")
    assert b"\r\nSubject: Disk full on db-01 (98 %)\r\n" in p.data


# ---------------------------------------------------------------------------
# Bodies
# ---------------------------------------------------------------------------

body_text = st.text(
    st.characters(exclude_categories=["Cs"]) | st.sampled_from(["\r", "\n", ".", " "]),
    max_size=400,
) | st.builds(
    lambda a, b: a + b,
    st.sampled_from([".", "\n.\n", "\r.\r\n", ".\r\n", "x" * 1500, "é" * 700 + "\n", " \n\t\n"]),
    st.text(max_size=20),
)


@fast
@given(body=body_text)
def test_any_text_body_round_trips(body: str) -> None:
    p = make(text=body)
    assert_wire_format(p.data)
    assert plain_body(parse(p.data)) == LINE_BREAK.sub("\r\n", body)
    unix = email.message_from_bytes(p.data.replace(b"\r\n", b"\n"), policy=email.policy.default)
    assert isinstance(unix, EmailMessage)
    assert plain_body(unix) == LINE_BREAK.sub("\n", body)


@heavy
@given(text=body_text, html=body_text)
def test_text_and_html_round_trip_in_multipart_alternative(text: str, html: str) -> None:
    p = make(text=text, html=html, attachments=[Attachment("a.bin", b"\x00\xff")])
    assert_wire_format(p.data)
    msg = parse(p.data)
    assert msg.get_content_type() == "multipart/mixed"
    assert plain_body(msg) == LINE_BREAK.sub("\r\n", text)
    html_part = msg.get_body(("html",))
    assert html_part is not None
    assert html_part.get_content() == LINE_BREAK.sub("\r\n", html)


@pytest.mark.parametrize(
    ("body", "cte"),
    [
        ("Hello,\n\nyour build failed.\n", "7bit"),
        ("", "7bit"),
        ("no final line break", "quoted-printable"),
        ("Grüße\n", "quoted-printable"),
        ("x" * 100 + "\n", "quoted-printable"),
        ("trailing space \n", "quoted-printable"),
        ("nul\x00\n", "quoted-printable"),
    ],
)
def test_transfer_encoding_choice(body: str, cte: str) -> None:
    part = parse(make(text=body).data)
    assert part["Content-Transfer-Encoding"] == cte
    assert part.get_content_charset() == "utf-8"


def test_dot_lines_are_left_for_the_session_to_stuff() -> None:
    body = "a\n.\nb\r.\r\n..\n"
    p = make(text=body)
    assert b"\r\n.\r\n" in p.data  # not dot-stuffed here: that is the session's job
    assert plain_body(parse(p.data)) == "a\r\n.\r\nb\r\n.\r\n..\r\n"


def test_quoted_printable_encodes_a_leading_dot() -> None:
    p = make(text=".\nü\n")
    assert b"\r\n=2E\r\n" in p.data
    assert plain_body(parse(p.data)) == ".\r\nü\r\n"


def test_long_lines_are_wrapped_and_come_back_whole() -> None:
    body = "word " * 1000 + "\n" + "x" * 5000
    p = make(text=body, html="<p>" + "y" * 5000 + "</p>")
    assert max(len(line) for line in p.data.split(b"\r\n")) <= 78
    assert plain_body(parse(p.data)) == body.replace("\n", "\r\n")


def test_body_shapes() -> None:
    assert parse(make(text="t\n").data).get_content_type() == "text/plain"
    assert parse(make(text=None, html="<p>h</p>").data).get_content_type() == "text/html"
    alt = parse(make(text="t\n", html="<p>h</p>").data)
    assert alt.get_content_type() == "multipart/alternative"
    assert [p.get_content_type() for p in alt.iter_parts()] == ["text/plain", "text/html"]
    only_att = parse(make(text=None, subject="", attachments=[Attachment("a.txt", b"a")]).data)
    assert only_att.get_content_type() == "multipart/mixed"
    assert [p.get_content_type() for p in only_att.iter_parts()] == ["application/octet-stream"]


def test_empty_body_is_allowed_with_a_subject() -> None:
    p = make(text=None, subject="Ping")
    msg = parse(p.data)
    assert msg.get_content_type() == "text/plain"
    assert plain_body(msg) == ""
    assert_wire_format(p.data)


@pytest.mark.parametrize("subject", ["", "   "])
def test_message_with_neither_subject_nor_content_is_rejected(subject: str) -> None:
    with pytest.raises(InvalidMessage, match="neither a subject nor any content"):
        Notification("a@example.com", subject)
    with pytest.raises(InvalidMessage):
        Notification("a@example.com", subject, text="")
    Notification("a@example.com", subject, text="x")


def test_lone_surrogate_in_body_is_rejected() -> None:
    with pytest.raises(InvalidMessage, match="surrogate"):
        make(text="a\ud800b")
    with pytest.raises(InvalidMessage, match="surrogate"):
        make(html="a\udcffb")


# ---------------------------------------------------------------------------
# Message-ID and Date
# ---------------------------------------------------------------------------


def test_message_id_is_generated_with_the_sender_domain() -> None:
    p = prepare(Notification("a@example.com", "s"), sender="Desk <desk@bücher.example>")
    assert re.fullmatch(r"<[^<>@\s]+@xn--bcher-kva\.example>", p.message_id)
    assert parse(p.data)["Message-ID"] == p.message_id
    assert p.data.count(b"Message-ID:") == 1


def test_local_hostname_does_not_leak_into_the_message_id() -> None:
    p = prepare(Notification("a@example.com", "s"), sender=SENDER, local_hostname="[10.0.0.7]")
    assert p.message_id.endswith("@example.com>")
    assert b"10.0.0.7" not in p.data


def test_generated_message_ids_differ() -> None:
    n = Notification("a@example.com", "s")
    assert prepare(n, sender=SENDER).message_id != prepare(n, sender=SENDER).message_id


@heavy
@given(
    left=st.from_regex(r"[A-Za-z0-9.$_+-]{1,40}", fullmatch=True),
    right=st.from_regex(r"[a-z0-9.-]{1,30}", fullmatch=True),
)
def test_passed_message_id_is_used_and_stable(left: str, right: str) -> None:
    message_id = f"<{left}@{right}>"
    n = Notification("a@example.com", "s", text="x")
    first = prepare(n, sender=SENDER, message_id=message_id, now=NOW)
    again = prepare(n, sender=SENDER, message_id=message_id, now=NOW)
    assert first.message_id == again.message_id == message_id
    assert first.data == again.data
    assert parse(first.data)["Message-ID"] == message_id


@pytest.mark.parametrize(
    "bad",
    ["no-brackets@example.com", "<a@b@c>", "<>", "<a b@c>", "<a@c>\r\nBcc: x", "<ab>", "<é@c>"],
)
def test_invalid_message_id_is_rejected(bad: str) -> None:
    with pytest.raises(InvalidMessage):
        prepare(Notification("a@example.com", "s"), sender=SENDER, message_id=bad)


def test_date_comes_from_now() -> None:
    p = prepare(Notification("a@example.com", "s"), sender=SENDER, now=NOW)
    assert parse(p.data)["Date"].datetime == NOW
    eastern = datetime(2024, 5, 17, 9, 30, tzinfo=timezone(timedelta(hours=-4)))
    p = prepare(Notification("a@example.com", "s"), sender=SENDER, now=eastern)
    assert b"\r\nDate: Fri, 17 May 2024 09:30:00 -0400\r\n" in p.data


def test_date_defaults_to_the_current_time() -> None:
    before = datetime.now(UTC).replace(microsecond=0)
    p = prepare(Notification("a@example.com", "s"), sender=SENDER)
    after = datetime.now(UTC)
    assert before <= parse(p.data)["Date"].datetime <= after


def test_naive_now_is_a_programming_error() -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        prepare(Notification("a@example.com", "s"), sender=SENDER, now=datetime(2024, 1, 1))


# ---------------------------------------------------------------------------
# Bcc never written, whatever the input
# ---------------------------------------------------------------------------


@heavy
@given(
    local=st.from_regex(r"[a-z0-9]{12,20}", fullmatch=True),
    name=short_header_text,
    use_email_message=st.booleans(),
)
def test_bcc_is_never_in_data(local: str, name: str, use_email_message: bool) -> None:
    hidden = f"hidden{local}@secret.example"
    quoted = name.replace("\\", "\\\\").replace('"', '\\"')
    if use_email_message:
        msg = EmailMessage()
        msg["To"] = "a@example.com"
        msg["Bcc"] = f'"{quoted}" <{hidden}>' if name.strip() else hidden
        msg["Subject"] = "s"
        msg.set_content("x\n")
        p = prepare(msg, sender=SENDER)
    else:
        p = make(bcc=[f'"{quoted}" <{hidden}>'])
    assert hidden in p.recipients
    assert hidden.encode() not in p.data
    assert b"secret.example" not in p.data
    assert not re.search(rb"(?im)^bcc:", header_block(p.data))


# ---------------------------------------------------------------------------
# EmailMessage input
# ---------------------------------------------------------------------------


def email_message(**headers: str) -> EmailMessage:
    msg = EmailMessage()
    for name, value in headers.items():
        msg[name.replace("_", "-")] = value
    msg.set_content("Body text\n")
    return msg


def test_email_message_recipients_from_to_cc_bcc() -> None:
    msg = email_message(
        From="someone@elsewhere.example",
        To="Alice <alice@example.com>, bob@example.com",
        Cc="carol@example.com, Alice@example.com",
        Bcc="dave@example.com",
        Subject="Hello",
    )
    p = prepare(msg, sender=SENDER, now=NOW)
    assert p.sender == "noreply@example.com"
    assert p.recipients == (
        "alice@example.com",
        "bob@example.com",
        "carol@example.com",
        "dave@example.com",
    )
    out = parse(p.data)
    assert [a.addr_spec for a in out["From"].addresses] == ["noreply@example.com"]
    assert b"elsewhere" not in p.data
    assert out["Bcc"] is None
    assert b"dave" not in p.data
    assert str(out["Subject"]) == "Hello"
    assert plain_body(out) == "Body text\r\n"
    assert_wire_format(p.data)


def test_email_message_is_not_modified() -> None:
    msg = email_message(From="x@elsewhere.example", To="a@example.com", Bcc="b@example.com")
    before = msg.as_bytes()
    prepare(msg, sender=SENDER)
    assert msg.as_bytes() == before


def test_email_message_message_id_and_date() -> None:
    msg = email_message(To="a@example.com")
    p = prepare(msg, sender=SENDER, now=NOW)
    assert p.message_id.endswith("@example.com>")
    assert parse(p.data)["Date"].datetime == NOW

    msg["Message-ID"] = "<kept@example.org>"
    msg["Date"] = "Tue, 01 Jul 2003 10:52:37 +0200"
    p = prepare(msg, sender=SENDER, now=NOW)
    assert p.message_id == "<kept@example.org>"
    out = parse(p.data)
    assert out["Message-ID"] == "<kept@example.org>"
    assert out["Date"].datetime == datetime(2003, 7, 1, 8, 52, 37, tzinfo=UTC)

    p = prepare(msg, sender=SENDER, message_id="<stored@example.com>")
    assert p.message_id == "<stored@example.com>"
    assert parse(p.data).get_all("Message-ID") == ["<stored@example.com>"]


def test_email_message_with_non_ascii_everything() -> None:
    msg = EmailMessage()
    msg["To"] = "Jörg <jörg@bücher.example>"
    msg["Cc"] = "undisclosed-recipients:;"
    msg["Subject"] = "Grüße " * 30
    msg["X-Note"] = "Ünïcödé note"
    msg.set_content("Grüße\nzweite Zeile\n")
    msg.add_attachment(b"\x00\x01", maintype="application", subtype="pdf", filename="bericht ü.pdf")
    p = prepare(msg, sender=SENDER)
    assert p.smtputf8
    assert p.recipients == ("jörg@xn--bcher-kva.example",)
    assert_wire_format(p.data)
    out = parse(p.data)
    assert out["To"].addresses[0].display_name == "Jörg"
    assert str(out["Cc"]) == "undisclosed-recipients:;"
    assert str(out["Subject"]) == "Grüße " * 30
    assert str(out["X-Note"]) == "Ünïcödé note"
    assert plain_body(out) == "Grüße\r\nzweite Zeile\r\n"
    (att,) = out.iter_attachments()
    assert att.get_filename() == "bericht ü.pdf"
    assert att.get_payload(decode=True) == b"\x00\x01"


def test_email_message_8bit_and_long_lines_are_made_7bit() -> None:
    msg = EmailMessage()
    msg["To"] = "a@example.com"
    msg.set_content("Grüße\n", cte="8bit")
    assert msg["Content-Transfer-Encoding"] == "8bit"
    p = prepare(msg, sender=SENDER)
    out = parse(p.data)
    assert out["Content-Transfer-Encoding"] == "quoted-printable"
    assert plain_body(out) == "Grüße\r\n"

    msg = EmailMessage()
    msg["To"] = "a@example.com"
    msg["Content-Type"] = "text/plain"
    msg["Content-Transfer-Encoding"] = "7bit"
    msg.set_payload("y" * 3000 + "\n")
    p = prepare(msg, sender=SENDER)
    assert_wire_format(p.data)
    assert plain_body(parse(p.data)) == "y" * 3000 + "\r\n"


def test_email_message_parsed_from_bytes() -> None:
    raw = (
        b"From: x@elsewhere.example\r\n"
        b"To: a@example.com,\r\n b@example.com (a comment)\r\n"
        b"Subject: =?utf-8?q?Gr=C3=BC=C3=9Fe?=\r\n"
        b"References: <one@example.com>\r\n <two@example.com>\r\n"
        b"Content-Type: text/plain; charset=utf-8\r\n"
        b"Content-Transfer-Encoding: 8bit\r\n"
        b"\r\n"
        b"h\xc3\xa9llo\r\n.\r\n"
    )
    msg = email.message_from_bytes(raw, policy=email.policy.default)
    assert isinstance(msg, EmailMessage)
    p = prepare(msg, sender=SENDER)
    assert p.recipients == ("a@example.com", "b@example.com")
    assert p.data.isascii()
    out = parse(p.data)
    assert str(out["Subject"]) == "Grüße"
    assert str(out["References"]) == "<one@example.com> <two@example.com>"
    assert plain_body(out) == "héllo\r\n.\r\n"
    assert_wire_format(p.data)


@pytest.mark.parametrize(
    "address",
    [
        a
        for a in INVALID_ADDRESSES
        if "\r" not in a
        and "\n" not in a  # in raw text these are real extra headers
        # Valid in a To header, or read so by the email package: a list, RFC 5322
        # comments, and a no-break space it takes for whitespace.
        and a
        not in (
            "a@example.com, b@example.com",
            "Ops (EU) <ops@example.com>",
            "a(comment)@example.com",
            "a@exam\u00a0ple.com",
        )
    ],
)
def test_email_message_invalid_address_is_rejected(address: str) -> None:
    parsed = email.message_from_string(
        f"To: {address}\r\nSubject: s\r\n\r\nx\r\n", policy=email.policy.default
    )
    assert isinstance(parsed, EmailMessage)
    with pytest.raises(InvalidMessage):
        prepare(parsed, sender=SENDER)
    built = EmailMessage()
    try:
        built["To"] = address
    except Exception:  # the email package refused (or crashed on) it already
        return
    built.set_content("x\n")
    with pytest.raises(InvalidMessage):
        prepare(built, sender=SENDER)


def test_email_message_empty_address_header_is_dropped() -> None:
    msg = email_message(To="", Cc="a@example.com")
    p = prepare(msg, sender=SENDER)
    assert p.recipients == ("a@example.com",)
    assert not re.search(rb"(?im)^to:", header_block(p.data))


def test_email_message_without_recipients_is_rejected() -> None:
    msg = email_message(Subject="s")
    with pytest.raises(InvalidMessage, match="no recipient"):
        prepare(msg, sender=SENDER)
    msg["To"] = "undisclosed-recipients:;"
    with pytest.raises(InvalidMessage, match="no recipient"):
        prepare(msg, sender=SENDER)


def test_email_message_header_injection_is_rejected() -> None:
    compat = EmailMessage(policy=email.policy.compat32)
    compat["To"] = "a@example.com"
    compat["Subject"] = "x\r\nBcc: eve@example.com"
    with pytest.raises(InvalidMessage, match="line break"):
        prepare(compat, sender=SENDER)

    raw_set = email_message(To="a@example.com")
    raw_set.set_raw("X-Note", "ok\nBcc: eve@example.com")
    with pytest.raises(InvalidMessage):
        prepare(raw_set, sender=SENDER)

    bad_name = email_message(To="a@example.com")
    bad_name["X-A\r\nBcc"] = "eve@example.com"
    with pytest.raises(InvalidMessage, match="field name"):
        prepare(bad_name, sender=SENDER)

    separator = email_message(To="a@example.com")
    separator["Subject"] = "trailing separator\u2028"
    with pytest.raises(InvalidMessage, match="U\\+2028"):
        prepare(separator, sender=SENDER)

    encoded = email_message(To="a@example.com")
    encoded["Subject"] = "=?utf-8?q?a=0D=0ABcc=3A_eve=40example=2Ecom?="
    with pytest.raises(InvalidMessage, match="line break"):
        prepare(encoded, sender=SENDER)

    in_part = email_message(To="a@example.com")
    in_part.add_attachment(b"x", maintype="application", subtype="octet-stream", filename="a")
    attachment = next(iter(in_part.iter_attachments()))
    attachment.set_raw("X-Part", "v\r\nX-Evil: 1")
    with pytest.raises(InvalidMessage):
        prepare(in_part, sender=SENDER)


def test_email_message_folded_header_is_not_an_injection() -> None:
    compat = EmailMessage(policy=email.policy.compat32)
    compat["To"] = "a@example.com"
    compat["X-Folded"] = "first part\r\n second part"
    compat.set_payload("x\n")
    p = prepare(compat, sender=SENDER)
    assert str(parse(p.data)["X-Folded"]) == "first part second part"


def test_email_message_duplicate_unique_headers_are_rejected() -> None:
    raw = b"To: a@example.com\r\nTo: b@example.com\r\nSubject: s\r\n\r\nx\r\n"
    msg = email.message_from_bytes(raw, policy=email.policy.default)
    assert isinstance(msg, EmailMessage)
    with pytest.raises(InvalidMessage, match="2 to headers"):
        prepare(msg, sender=SENDER)


def test_email_message_invalid_date_or_message_id_is_rejected() -> None:
    raw = b"To: a@example.com\r\nDate: not a date\r\n\r\nx\r\n"
    msg = email.message_from_bytes(raw, policy=email.policy.default)
    assert isinstance(msg, EmailMessage)
    with pytest.raises(InvalidMessage, match="date"):
        prepare(msg, sender=SENDER)
    raw = b"To: a@example.com\r\nMessage-ID: no brackets\r\n\r\nx\r\n"
    msg = email.message_from_bytes(raw, policy=email.policy.default)
    assert isinstance(msg, EmailMessage)
    with pytest.raises(InvalidMessage, match="Message-ID"):
        prepare(msg, sender=SENDER)


def test_email_message_raw_8bit_header_is_rejected() -> None:
    raw = b"To: a@example.com\r\nSubject: caf\xe9\r\n\r\nx\r\n"
    msg = email.message_from_bytes(raw, policy=email.policy.default)
    assert isinstance(msg, EmailMessage)
    with pytest.raises(InvalidMessage, match="undecodable"):
        prepare(msg, sender=SENDER)


def test_legacy_message_and_other_types_are_type_errors() -> None:
    legacy = Message()
    legacy["To"] = "a@example.com"
    with pytest.raises(TypeError, match="EmailMessage"):
        prepare(legacy, sender=SENDER)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        prepare("To: a@example.com\r\n\r\nx", sender=SENDER)  # type: ignore[arg-type]


def test_invalid_message_is_a_permanent_value_error() -> None:
    with pytest.raises(ValueError) as info:
        Notification("no-at-sign", "s")
    assert isinstance(info.value, InvalidMessage)
    assert info.value.transient is False
    assert info.value.phase is None


@pytest.mark.parametrize(
    "field",
    ["subject", "to", "reply_to", "headers"],
)
def test_encoded_words_that_decode_to_a_line_break_are_rejected(field: str) -> None:
    # A reader decodes RFC 2047 words, so "=?utf-8?q?x=0D=0ABcc:_y?=" is a line break too.
    word = "=?utf-8?q?Desk=0D=0ABcc=3A_x?="
    kw: dict[str, Any] = {"to": "ops@example.com", "subject": "s", "text": "t"}
    if field == "subject":
        kw["subject"] = word
    elif field == "headers":
        kw["headers"] = {"X-Note": word}
    else:
        kw[field] = f"{word} <ops@example.com>"
    with pytest.raises(InvalidMessage):
        prepare(Notification(**kw), sender=SENDER)
