"""The lean serializer (smtpnotify._mime, smtpnotify._headers) and streaming dot-stuffing.

A ``Notification`` is written without the email package, so these properties
prove that what it writes is what a receiver reads: every random notification
is parsed back with ``email.message_from_bytes(data, policy=email.policy.default)``
(and, for attachment names, with the legacy ``compat32`` parser too), and each
header, structure, text and attachment must come back exactly, with no parser
defect anywhere.  ``iter_dot_stuffed`` must give exactly ``dot_stuff``'s bytes
whatever the input and however it is sliced.
"""

from __future__ import annotations

import email
import email.errors
import email.header
import email.policy
import email.utils
import re
import tracemalloc
from collections.abc import Callable
from email.headerregistry import AddressHeader, HeaderRegistry
from email.message import EmailMessage, Message
from urllib.parse import quote

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from _helpers import config_for
from smtpnotify import Notifier
from smtpnotify._message import Attachment, Notification, prepare
from smtpnotify._prepared import PreparedMessage
from smtpnotify._smtp import dot_stuff, iter_dot_stuffed
from smtpnotify.testing import SMTPSink

SENDER = "Änderungs-Desk <noreply@example.com>"
LINE_BREAK = re.compile(r"\r\n|\r|\n")
ADDRESS_FIELDS = ("From", "To", "Cc", "Reply-To")

# Each example parses a multipart message (a few ms): keep the counts modest.
roundtrip = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
quick = settings(max_examples=300, deadline=None)

# ---------------------------------------------------------------------------
# Strategies
# ---------------------------------------------------------------------------

# Anything a header value may hold: no controls (TAB excepted), no line or
# paragraph separators, no lone surrogates.
header_char = st.characters(exclude_categories=["Cs", "Cc", "Zl", "Zp"]) | st.sampled_from(
    [" ", "\t", '"', "\\", "=", "?", "%", "'", "*", ";", ","]
)
header_text = st.text(header_char, max_size=120)
# Display names in any script; quoted when written, so specials are fine.
name_text = st.one_of(
    st.text(header_char, max_size=40),
    st.sampled_from(
        [
            "Jörg Müller",
            "株式会社サンプル カスタマーサポートセンター",
            "Ольга Петрова",
            "محمد عبد الله",
            "Ελένη Παπαδοπούλου",
            "דוד כהן",
            "Nguyễn Văn An",
            "=?utf-8?q?not_a_word?=",
            'O\'Brien, "Pat" \\ Co.',
        ]
    ),
)
local_part = st.sampled_from(["ops", "a.b", "x+tag", "o'hara", "jörg", "用户"])
domain = st.sampled_from(
    ["example.com", "bücher.example", "xn--bcher-kva.example", "[192.0.2.1]", "例え.jp"]
)
subject_text = st.one_of(
    header_text,
    st.text(header_char, min_size=100, max_size=400),
    st.sampled_from(["x" * 2000, "Grüße aus Köln " * 20, "word " * 60, "日本語" * 50]),
)
body_text = st.text(
    st.characters(exclude_categories=["Cs"]) | st.sampled_from(["\r", "\n", ".", " ", "\t"]),
    max_size=300,
) | st.builds(
    lambda a, b: a + b,
    st.sampled_from([".", "\n.\n", "\r.\r\n", "x" * 1200, "é" * 500 + "\n", " \n\t\n", "--=="]),
    st.text(max_size=20),
)
custom_name = st.sampled_from(
    ["X-Ticket", "List-Id", "X-A-Rather-Long-Custom-Header-Name-Used-To-Test-Folding", "X-Notes"]
)
param_value = st.text(header_char, min_size=1, max_size=100)


@st.composite
def mailboxes(draw: st.DrawFn) -> tuple[str, str, str]:
    """(text given to Notification, expected display name, expected addr-spec)."""
    name = draw(name_text)
    local, dom = draw(local_part), draw(domain)
    spec = f"{local}@{dom}"
    expected_domain = dom if dom.startswith("[") else dom.encode("idna").decode("ascii")
    if not name.strip() and draw(st.booleans()):
        return spec, "", f"{local}@{expected_domain}"
    quoted = name.replace("\\", "\\\\").replace('"', '\\"')
    return f'"{quoted}" <{spec}>', " ".join(name.split()), f"{local}@{expected_domain}"


@st.composite
def attachments(draw: st.DrawFn) -> tuple[Attachment, dict[str, str]]:
    """An attachment and the Content-Type parameters it must arrive with."""
    filename = draw(st.text(header_char, min_size=1, max_size=150).filter(lambda f: f.strip()))
    content = draw(st.binary(max_size=2000))
    choice = draw(st.integers(0, 3))
    if choice == 0:
        content_type, params = "application/octet-stream", {}
    elif choice == 1:
        content_type, params = "text/csv; charset=utf-8", {"charset": "utf-8"}
    elif choice == 2:
        content_type, params = (
            'text/plain; charset="us-ascii"; format=flowed',
            {
                "charset": "us-ascii",
                "format": "flowed",
            },
        )
    else:
        value = draw(param_value)
        content_type = f"application/x-note; note*=utf-8''{quote(value, safe='')}"
        params = {"note": value}
    return Attachment(filename, content, content_type), params


# ---------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------


def parse(data: bytes) -> EmailMessage:
    """What a receiver parses; SMTPUTF8 headers are read as UTF-8 text."""
    msg = parse_with(data, email.policy.default)
    assert isinstance(msg, EmailMessage)
    return msg


def parse_with(data: bytes, policy: email.policy.Policy) -> Message:
    """``data`` parsed with ``policy`` (``compat32`` is the legacy parser)."""
    if data.isascii():
        return email.message_from_bytes(data, policy=policy)
    return email.message_from_string(data.decode("utf-8"), policy=policy)


def header_fields(data: bytes) -> list[list[str]]:
    """The top-level header fields, each as its list of physical lines."""
    head = data.split(b"\r\n\r\n", 1)[0].decode("utf-8")
    fields: list[list[str]] = []
    for line in head.split("\r\n"):
        if line[:1] in (" ", "\t"):
            fields[-1].append(line)
        else:
            fields.append([line])
    return fields


def assert_wire_format(p: PreparedMessage) -> None:
    """CRLF only, ≤ 998 octets a line, ends with CRLF, 7-bit body, ASCII unless SMTPUTF8."""
    data = p.data
    assert data.endswith(b"\r\n")
    assert re.search(rb"\r(?!\n)|(?<!\r)\n", data) is None
    assert max(len(line) for line in data.split(b"\r\n")) <= 998
    assert data.split(b"\r\n\r\n", 1)[1].isascii()
    assert data.isascii() or p.smtputf8


def assert_folded(data: bytes) -> None:
    """Every line is at most 78 characters, except a top-level header line that
    holds a single item which cannot be split: one word, or one mailbox."""
    head_lines = {line for field in header_fields(data) for line in field}
    for raw in data.split(b"\r\n"):
        line = raw.decode("utf-8")
        if len(line) <= 78:
            continue
        assert line in head_lines, f"a body or MIME header line over 78: {line!r}"
        name, sep, rest = line.partition(":")
        first = bool(sep) and line[:1] not in (" ", "\t")
        content = (rest if first else line).strip(" \t")
        field = name if first else _field_of(data, line)
        if field in ADDRESS_FIELDS:
            parsed = HeaderRegistry()(field, content.rstrip(","))
            assert isinstance(parsed, AddressHeader)
            assert len(parsed.addresses) == 1, f"two mailboxes on a long line: {line!r}"
        else:
            assert not re.search(r"[ \t]", content), f"could have been folded: {line!r}"


def _field_of(data: bytes, line: str) -> str:
    for field in header_fields(data):
        if line in field:
            return field[0].partition(":")[0]
    raise AssertionError(line)


def assert_no_defects(msg: Message) -> None:
    """No defect in any part or header; a non-ASCII local part (RFC 6532) is no defect."""
    for part in msg.walk():
        assert part.defects == [], part.defects
        for name, value in part.items():
            defects = [
                d
                for d in getattr(value, "defects", ())
                if not isinstance(d, email.errors.NonASCIILocalPartDefect)
            ]
            assert defects == [], (name, value)


def addresses(msg: Message, field: str) -> list[tuple[str, str]]:
    header = msg[field]
    if header is None:
        return []
    assert isinstance(header, AddressHeader)
    return [(a.display_name, a.addr_spec) for a in header.addresses]


def expected_types(n: Notification) -> list[str]:
    """The content types of ``msg.walk()`` for ``n``."""
    texts = (["text/plain"] if n.text is not None else []) + (
        ["text/html"] if n.html is not None else []
    )
    if not texts and not n.attachments:
        texts = ["text/plain"]
    body = ["multipart/alternative", *texts] if len(texts) == 2 else texts
    if not n.attachments:
        return body
    return ["multipart/mixed", *body] + [
        a.content_type.split(";")[0].strip().lower() for a in n.attachments
    ]


# ---------------------------------------------------------------------------
# The whole notification, round trip through the email parser
# ---------------------------------------------------------------------------


@roundtrip
@given(
    to=st.lists(mailboxes(), max_size=4),
    cc=st.lists(mailboxes(), max_size=3),
    reply_to=st.lists(mailboxes(), max_size=2),
    bcc=st.lists(mailboxes(), max_size=2),
    subject=subject_text,
    headers=st.dictionaries(custom_name, header_text, max_size=3),
    text=st.none() | body_text,
    html=st.none() | body_text,
    attached=st.lists(attachments(), max_size=3),
)
def test_any_notification_reads_back_exactly(
    to: list[tuple[str, str, str]],
    cc: list[tuple[str, str, str]],
    reply_to: list[tuple[str, str, str]],
    bcc: list[tuple[str, str, str]],
    subject: str,
    headers: dict[str, str],
    text: str | None,
    html: str | None,
    attached: list[tuple[Attachment, dict[str, str]]],
) -> None:
    if not (to or cc or bcc):
        to = [("ops@example.com", "", "ops@example.com")]
    note = Notification(
        to=[m[0] for m in to],
        cc=[m[0] for m in cc],
        bcc=[m[0] for m in bcc],
        reply_to=[m[0] for m in reply_to],
        subject=subject if subject.strip() or text or html or attached else "s",
        text=text,
        html=html,
        headers=headers,
        attachments=[a for a, _ in attached],
    )
    p = prepare(note, sender=SENDER)
    assert_wire_format(p)
    assert_folded(p.data)
    msg = parse(p.data)
    assert_no_defects(msg)

    # Headers: addresses (names normalised, domains IDNA), subject, custom fields.
    assert addresses(msg, "From") == [("Änderungs-Desk", "noreply@example.com")]
    for field, given_ in (("To", to), ("Cc", cc), ("Reply-To", reply_to)):
        assert addresses(msg, field) == [(name, spec) for _, name, spec in given_]
    assert msg["Bcc"] is None
    assert str(msg["Subject"]) == note.subject
    for name, value in headers.items():
        assert str(msg[name]) == value
    assert msg["Message-ID"] == p.message_id
    assert msg["MIME-Version"] == "1.0"

    # Structure and content.
    assert [part.get_content_type() for part in msg.walk()] == expected_types(note)
    if text is not None:
        plain = msg.get_body(("plain",))
        assert plain is not None
        assert plain.get_content() == LINE_BREAK.sub("\r\n", text)
    if html is not None:
        rich = msg.get_body(("html",))
        assert rich is not None
        assert rich.get_content() == LINE_BREAK.sub("\r\n", html)
    received = list(msg.iter_attachments())
    assert len(received) == len(attached)
    for part, (attachment, params) in zip(received, attached, strict=True):
        assert part.get_filename() == attachment.filename
        assert part["Content-Disposition"].params["filename"] == attachment.filename
        assert part["Content-Disposition"].content_disposition == "attachment"
        assert dict(part["Content-Type"].params) == params
        assert part.get_payload(decode=True) == attachment.content

    # The legacy parser (compat32) reads the same file names and bytes.
    legacy = parse_with(p.data, email.policy.compat32)
    legacy_parts = [part for part in legacy.walk() if part.get_filename() is not None]
    assert [part.get_filename() for part in legacy_parts] == [a.filename for a, _ in attached]
    assert [part.get_payload(decode=True) for part in legacy_parts] == [
        a.content for a, _ in attached
    ]


# ---------------------------------------------------------------------------
# Focused properties and examples
# ---------------------------------------------------------------------------


@roundtrip
@given(subject=subject_text, name=custom_name, value=header_text)
def test_encoded_words_decode_back_exactly(subject: str, name: str, value: str) -> None:
    p = prepare(
        Notification("ops@example.com", subject, text="x\n", headers={name: value}),
        sender=SENDER,
    )
    head = p.data.split(b"\r\n\r\n", 1)[0]
    assert head.isascii()
    for word in re.findall(rb"=\?[^?]*\?[bBqQ]\?[^?]*\?=", head):
        assert len(word) <= 75  # RFC 2047's limit (only display names may pass it)
    msg = parse(p.data)
    assert str(msg["Subject"]) == subject
    assert str(msg[name]) == value
    assert_folded(p.data)
    # Unfolding the raw field and decoding its words gives the text back too.
    raw = next(f for f in header_fields(p.data) if f[0].startswith("Subject:"))
    unfolded = "".join(raw)[len("Subject:") :].removeprefix(" ")
    decoded = email.header.make_header(email.header.decode_header(unfolded))
    assert str(decoded) == subject


@roundtrip
@given(filename=st.text(header_char, min_size=1, max_size=400).filter(lambda f: f.strip()))
def test_non_ascii_and_long_filenames_use_rfc2231(filename: str) -> None:
    p = prepare(
        Notification("ops@example.com", "s", attachments=[Attachment(filename, b"\x00data")]),
        sender=SENDER,
    )
    disposition = re.search(rb"Content-Disposition: [^\r]*(?:\r\n[ \t][^\r]*)*", p.data)
    assert disposition is not None
    field = disposition.group().decode("ascii")
    stripped = filename.strip()
    plain = re.fullmatch(r"[\x20\x21\x23-\x5b\x5d-\x7e]*", stripped) and "=?" not in stripped
    if not plain or len(stripped) > 60:
        assert "filename*" in field  # RFC 2231, split into sections when long
    assert all(len(line) <= 78 for line in field.split("\r\n"))
    (part,) = parse(p.data).iter_attachments()
    assert part.get_filename() == stripped
    assert part.get_payload(decode=True) == b"\x00data"


def test_a_long_non_ascii_filename_is_split_between_characters() -> None:
    filename = "Prüfbericht über die Wartungsarbeiten im Rechenzentrum Köln – März 2024 ✓.pdf"
    p = prepare(
        Notification("ops@example.com", "s", attachments=[Attachment(filename, b"%PDF")]),
        sender=SENDER,
    )
    assert b"filename*0*=utf-8''Pr%C3%BCfbericht" in p.data
    assert b"filename*1*=" in p.data
    (part,) = parse(p.data).iter_attachments()
    assert part.get_filename() == filename
    assert part["Content-Disposition"].params["filename"] == filename


@pytest.mark.parametrize(
    ("kwargs", "types"),
    [
        ({"text": "t\n"}, ["text/plain"]),
        ({"html": "<p>h</p>"}, ["text/html"]),
        ({"text": "t\n", "html": "<p>h</p>"}, ["multipart/alternative", "text/plain", "text/html"]),
        ({"text": None}, ["text/plain"]),
        (
            {"text": "t\n", "attachments": [Attachment("a.bin", b"a")]},
            ["multipart/mixed", "text/plain", "application/octet-stream"],
        ),
        (
            {"text": None, "attachments": [Attachment("a.bin", b""), Attachment("b.txt", b"b")]},
            ["multipart/mixed", "application/octet-stream", "application/octet-stream"],
        ),
        (
            {"text": "t\n", "html": "<b>h</b>", "attachments": [Attachment("a.bin", b"a")]},
            [
                "multipart/mixed",
                "multipart/alternative",
                "text/plain",
                "text/html",
                "application/octet-stream",
            ],
        ),
    ],
)
def test_mime_structure(kwargs: dict[str, object], types: list[str]) -> None:
    p = prepare(Notification("ops@example.com", "s", **kwargs), sender=SENDER)  # type: ignore[arg-type]
    msg = parse(p.data)
    assert [part.get_content_type() for part in msg.walk()] == types
    assert_no_defects(msg)
    assert_wire_format(p)
    for part in msg.walk():
        if part.get_content_maintype() == "text":
            assert part.get_content_charset() == "utf-8"


def test_the_boundary_never_occurs_in_a_7bit_part() -> None:
    # A text that holds the email package's boundary prefix on a line of its own.
    text = "--===============\n" * 3 + "".join(f"--==============={n:019d}==\n" for n in range(5))
    p = prepare(Notification("ops@example.com", "s", text=text, html=text), sender=SENDER)
    msg = parse(p.data)
    body = msg.get_body(("plain",))
    assert body is not None
    assert body.get_content() == text.replace("\n", "\r\n")
    assert_no_defects(msg)


def test_base64_lines_are_76_characters() -> None:
    content = bytes(range(256)) * 40  # 10 KiB: several full lines and a short last one
    p = prepare(
        Notification("ops@example.com", "s", attachments=[Attachment("a.bin", content)]),
        sender=SENDER,
    )
    body = p.data.split(b'Content-Disposition: attachment; filename="a.bin"\r\n\r\n')[1]
    lines = body.split(b"\r\n\r\n--")[0].split(b"\r\n")  # the part's CRLF, then the delimiter
    assert all(len(line) == 76 for line in lines[:-1])
    assert 0 < len(lines[-1]) <= 76
    (part,) = parse(p.data).iter_attachments()
    assert part.get_payload(decode=True) == content


def test_a_big_attachment_crosses_encoding_slices_intact() -> None:
    content = bytes(range(256)) * (3 * 57 * 1024 // 256 + 7)  # three slices and a bit
    p = prepare(
        Notification("ops@example.com", "s", attachments=[Attachment("big.bin", content)]),
        sender=SENDER,
    )
    (part,) = parse(p.data).iter_attachments()
    assert part.get_payload(decode=True) == content


def test_prepare_does_not_copy_a_big_attachment() -> None:
    """The base64 form is built in place: besides the result, a fraction of it at most."""
    content = bytes(range(256)) * (4 * 1024 * 4)  # 4 MiB
    note = Notification("ops@example.com", "s", attachments=[Attachment("big.bin", content)])
    tracemalloc.start()
    try:
        p = prepare(note, sender=SENDER)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(p.data) > 4 * 4 * 1024 * 1024 // 3
    assert peak < 1.3 * len(p.data) + (1 << 20)  # the old path peaked at over 4x


# ---------------------------------------------------------------------------
# Streaming dot-stuffing
# ---------------------------------------------------------------------------

wire_bytes = st.binary(max_size=300) | st.lists(
    st.sampled_from([b"\r", b"\n", b"\r\n", b".", b"..", b"a", b"\r\n.\r\n", b"\n.\n", b" "]),
    max_size=80,
).map(b"".join)


@quick
@given(data=wire_bytes, chunk=st.integers(1, 40))
def test_iter_dot_stuffed_is_dot_stuff_in_pieces(data: bytes, chunk: int) -> None:
    pieces = list(iter_dot_stuffed(data, chunk))
    assert b"".join(pieces) == dot_stuff(data)
    assert all(pieces)
    assert pieces[-1].endswith(b".\r\n")
    # One slice at a time: normalising and stuffing at most double a slice.
    assert all(len(piece) <= 2 * chunk + 5 for piece in pieces)


@quick
@given(
    lines=st.lists(st.sampled_from([b"", b".", b"..x", b"abc", b"x" * 70]), max_size=60),
    chunk=st.integers(1, 200),
)
def test_iter_dot_stuffed_on_crlf_messages(lines: list[bytes], chunk: int) -> None:
    """Prepared messages are CRLF-only: the fast path, with dots at slice starts."""
    data = b"".join(line + b"\r\n" for line in lines)
    assert b"".join(iter_dot_stuffed(data, chunk)) == dot_stuff(data)


def test_iter_dot_stuffed_default_chunk_on_a_big_message() -> None:
    data = (b".leading dot\r\n" + b"x" * 75 + b"\r\n" + b"bare\n.\r.\r\n") * 40_000  # ~4 MiB
    pieces = list(iter_dot_stuffed(data))
    assert len(pieces) > 10
    assert b"".join(pieces) == dot_stuff(data)


def test_iter_dot_stuffed_edge_cases() -> None:
    assert list(iter_dot_stuffed(b"")) == [b".\r\n"]
    assert b"".join(iter_dot_stuffed(b"\r", 1)) == b"\r\n.\r\n"
    assert b"".join(iter_dot_stuffed(b"\r\n.", 2)) == b"\r\n..\r\n.\r\n"
    assert b"".join(iter_dot_stuffed(b"a\r", 2)) == b"a\r\n.\r\n"
    assert b"".join(iter_dot_stuffed(b"a\r\n", 2)) == b"a\r\n.\r\n"
    with pytest.raises(ValueError, match="chunk"):
        list(iter_dot_stuffed(b"x", 0))


def test_a_big_attachment_is_sent_intact(make_sink: Callable[..., SMTPSink]) -> None:
    """Through a real server: the content goes out in slices and arrives whole."""
    sink = make_sink()
    content = bytes(range(256)) * 4096  # 1 MiB: several slices of the session's writes
    text = ".\r\n" * 50_000 + "end\n"  # 150 kB of dot lines to stuff across slices
    with Notifier(config_for(sink)) as notifier:
        prepared = notifier.prepare(
            Notification(
                "ops@example.com",
                "big",
                text=text,
                attachments=[Attachment("big.bin", content)],
            )
        )
        notifier.send_prepared(prepared)
    (received,) = sink.messages
    assert received.data == prepared.data
    (part,) = received.message.iter_attachments()
    assert part.get_payload(decode=True) == content
