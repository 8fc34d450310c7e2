"""Hypothesis strategies for property tests of code that uses smtpnotify.

Needs hypothesis (in the ``smtpnotify[testing]`` extra)::

    from hypothesis import given, settings
    from smtpnotify.testing.strategies import mail_configs, notifications

    @settings(max_examples=25, deadline=None)
    @given(config=mail_configs(), message=notifications())
    def test_render(config, message):
        ...

* :func:`mail_configs`: valid :class:`~smtpnotify.MailConfig` objects across
  ``tls``, ``trust`` (pinned: with valid fingerprints), AUTH, deadlines,
  retry and connection-pool settings; any field can be fixed, or given a
  strategy of its own.
* :func:`addresses`: mailbox strings (``a@example.com``,
  ``"Doe, Jane" <jane@bücher.example>``) that :class:`~smtpnotify.Notification`
  and ``MailConfig.sender`` accept.
* :func:`notifications`: valid :class:`~smtpnotify.Notification` objects:
  non-ASCII subjects and names, Cc, Bcc, Reply-To, custom headers, text, HTML,
  attachments.
* :func:`header_values_with_newlines`: text with a line break (CR, LF, CRLF, or
  another character that ends a line somewhere) for header injection tests:
  smtpnotify refuses all of them.

Everything generated is accepted by smtpnotify: a failure in a test using
these strategies is a bug in the code under test (or in smtpnotify).
"""

from __future__ import annotations

import functools
import string
from collections.abc import Mapping
from datetime import timedelta
from typing import Any

from hypothesis import strategies as st

from smtpnotify._config import MailConfig, _is_loopback
from smtpnotify._message import Attachment, Notification

__all__ = [
    "LINE_BREAKS",
    "addresses",
    "display_names",
    "header_text",
    "header_values_with_newlines",
    "mail_configs",
    "notifications",
]

LINE_BREAKS: tuple[str, ...] = (
    "\r\n",
    "\n",
    "\r",
    "\r\n ",
    "\n\t",
    "\r\r\n",
    "\x0b",
    "\x0c",
    "\x1c",
    "\x1d",
    "\x1e",
    "\x85",
    "\u2028",
    "\u2029",
)
"""Everything that ends a line for some reader: CR, LF and CRLF (also as the
start of a folded line), and the other characters that :meth:`str.splitlines`
breaks at (VT, FF, FS, GS, RS, NEL, LINE and PARAGRAPH SEPARATOR)."""

_INJECTIONS = (
    "Bcc: attacker@example.net",
    "To: everyone@example.net",
    "Content-Type: text/html",
    "",
    " folded continuation",
    ".",
    "\r\n.\r\nMAIL FROM:<attacker@example.net>",
)

_ATEXT = string.ascii_letters + string.digits + "!#$%&'*+-/=?^_`{|}~"
_PLAIN_WORD = string.ascii_letters + string.digits + "!#$%&'*+-/=?^_`{|}~"
_NON_ASCII_LETTERS = "äöüéèñçåøłžčšæ"
_IDN_LABELS = ("bücher", "münchen", "españa", "пример", "例え", "δοκιμή", "ελληνικά")
_TLDS = ("com", "org", "net", "example", "test", "de", "jp")
_CONTENT_TYPES = (
    "application/octet-stream",
    "application/pdf",
    "application/json",
    "image/png",
    "text/csv; charset=utf-8",
    "text/plain",
)
_FIELDS = frozenset(MailConfig.model_fields)

# Text a header may hold: no control character but TAB, no line or paragraph
# separator, no lone surrogate.
_HEADER_CHAR = st.characters(exclude_categories=["Cs", "Cc", "Zl", "Zp"]) | st.sampled_from(
    [" ", " ", "\t", "ü", "—", "😀", "日"]
)

_NAME_CHAR = st.characters(exclude_categories=["Cs", "Cc", "Zl", "Zp"]) | st.sampled_from(
    [" ", " ", '"', "\\", ",", "@", "<", "ü", "😀", "日"]
)


@functools.cache
def header_text(*, min_size: int = 0, max_size: int = 60) -> st.SearchStrategy[str]:
    """Text that is valid in any header: any Unicode but controls (TAB allowed),
    line and paragraph separators and lone surrogates."""
    return st.text(_HEADER_CHAR, min_size=min_size, max_size=max_size)


@functools.cache
def display_names(*, max_size: int = 40) -> st.SearchStrategy[str]:
    """Non-blank display names: plain ASCII words, or any header text (quotes,
    commas, ``@``, non-ASCII, emoji...)."""
    plain = st.lists(st.text(_PLAIN_WORD, min_size=1, max_size=10), min_size=1, max_size=4).map(
        " ".join
    )
    # No TAB: a header may hold one, but MailConfig.sender refuses every control character.
    names = st.text(_NAME_CHAR, min_size=1, max_size=max_size).filter(lambda s: s.strip() != "")
    return plain | names


@functools.cache
def _label() -> st.SearchStrategy[str]:
    return st.from_regex(r"[a-z0-9](?:[a-z0-9-]{0,14}[a-z0-9])?", fullmatch=True)


@functools.cache
def _domains(*, idn: bool) -> st.SearchStrategy[str]:
    ascii_labels = _label()
    labels = ascii_labels
    if idn:
        labels = (
            ascii_labels
            | st.sampled_from(_IDN_LABELS)
            | st.text(string.ascii_lowercase + _NON_ASCII_LETTERS, min_size=1, max_size=12)
        )
    return st.builds(
        lambda parts, tld: ".".join([*parts, tld]),
        st.lists(labels, min_size=1, max_size=3),
        st.sampled_from(_TLDS),
    )


@functools.cache
def _local_parts(*, smtputf8: bool) -> st.SearchStrategy[str]:
    alphabet = _ATEXT + (_NON_ASCII_LETTERS if smtputf8 else "")
    atom = st.text(alphabet, min_size=1, max_size=12)
    return (
        st.lists(atom, min_size=1, max_size=3)
        .map(".".join)
        .filter(lambda s: len(s.encode("utf-8")) <= 64)
    )


def _quote_display_name(name: str) -> str:
    words = name.split(" ")
    if all(w and all(c in _PLAIN_WORD for c in w) for w in words):
        return name
    return '"' + name.replace("\\", "\\\\").replace('"', '\\"') + '"'


@functools.cache
def addresses(
    *, display_name: bool | None = None, smtputf8: bool = False, idn: bool = True
) -> st.SearchStrategy[str]:
    """One mailbox as text: ``local@domain`` or ``Display Name <local@domain>``.

    Args:
        display_name: ``True``: always with a display name (quoted where it
            needs to be); ``False``: never; ``None`` (default): either.
        smtputf8: allow non-ASCII letters in the local part (the message then
            needs a server that offers SMTPUTF8, as :class:`SMTPSink` does).
        idn: allow internationalised domain names (``bücher.example``); they
            are sent IDNA-encoded, so no server support is needed.
    """
    specs = st.builds(
        lambda local, domain: f"{local}@{domain}",
        _local_parts(smtputf8=smtputf8),
        _domains(idn=idn),
    )
    named = st.builds(
        lambda name, spec: f"{_quote_display_name(name)} <{spec}>", display_names(), specs
    )
    if display_name is None:
        return specs | named
    return named if display_name else specs


@functools.cache
def header_values_with_newlines() -> st.SearchStrategy[str]:
    """Header text holding at least one line break from :data:`LINE_BREAKS`.

    Often followed by what an attacker would add (``Bcc: attacker@example.net``,
    a lone ``.``).  smtpnotify refuses every one of them in any header value,
    address, display name, attachment filename, and in ``MailConfig.sender``.
    """
    after = header_text(max_size=20) | st.sampled_from(_INJECTIONS)
    return st.builds(
        lambda before, br, rest: before + br + rest,
        header_text(max_size=20),
        st.sampled_from(LINE_BREAKS),
        after,
    )


@functools.cache
def _attachments() -> st.SearchStrategy[Attachment]:
    filenames = st.sampled_from(["report.pdf", "data.csv", "Grüße.txt", "image 1.png"]) | (
        header_text(min_size=1, max_size=40).filter(lambda s: s.strip() != "")
    )
    return st.builds(
        Attachment,
        filename=filenames,
        content=st.binary(max_size=2048),
        content_type=st.sampled_from(_CONTENT_TYPES),
    )


_BODY_TRAPS = (
    ".",
    "\n.\n",
    "\r\n.\r\n",
    "\r.\r\n",
    "\n.\r",
    "\n.\r\nMAIL FROM:<attacker@example.net>\r\n",
    "\n..\n",
    "From the start\n",
    "x" * 1200,
    "é" * 600 + "\n",
    " \n\t\n",
)


@functools.cache
def _bodies() -> st.SearchStrategy[str]:
    # Any text, or text around a trap: a lone "." line (the end of DATA), bare CR
    # or LF around one (SMTP smuggling), a line longer than SMTP allows.
    text = st.text(
        st.characters(exclude_categories=["Cs"]) | st.sampled_from(["\r", "\n", ".", " "]),
        max_size=300,
    )
    trapped = st.builds(
        lambda a, trap, b: a + trap + b,
        st.text(max_size=20),
        st.sampled_from(_BODY_TRAPS),
        st.text(max_size=20),
    )
    return text | trapped


_HEADER_NAMES = st.from_regex(r"X-[A-Za-z0-9][A-Za-z0-9-]{0,20}", fullmatch=True)


@functools.cache
def _address_lists(smtputf8: bool, min_size: int, max_size: int) -> st.SearchStrategy[list[str]]:
    return st.lists(addresses(smtputf8=smtputf8), min_size=min_size, max_size=max_size)


@functools.cache
def _message_parts() -> tuple[st.SearchStrategy[Any], ...]:
    """The strategies :func:`_notifications` draws from, built once."""
    return (
        st.none() | _bodies(),
        st.none() | _bodies().map(lambda body: f"<p>{body}</p>"),
        st.lists(_attachments(), max_size=2),
        header_text(max_size=80),
        header_text(min_size=1, max_size=80).filter(lambda s: s.strip() != ""),
        st.dictionaries(_HEADER_NAMES, header_text(max_size=40), max_size=2),
    )


@st.composite
def _notifications(
    draw: st.DrawFn, smtputf8: bool, attachments: bool, max_recipients: int
) -> Notification:
    bodies, htmls, attachment_lists, subjects, nonblank_subjects, headers = _message_parts()
    to = draw(_address_lists(smtputf8, 0, max_recipients))
    cc = draw(_address_lists(smtputf8, 0, 2))
    bcc = draw(_address_lists(smtputf8, 0 if to or cc else 1, 2))
    text = draw(bodies)
    html = draw(htmls)
    files = draw(attachment_lists) if attachments else []
    # Something to send: a subject, or some content.
    subject = draw(subjects if text or html or files else nonblank_subjects)
    return Notification(
        to=to,
        subject=subject,
        text=text,
        html=html,
        cc=cc,
        bcc=bcc,
        reply_to=draw(_address_lists(smtputf8, 0, 1)),
        headers=draw(headers),
        attachments=files,
    )


def notifications(
    *, smtputf8: bool = False, attachments: bool = True, max_recipients: int = 3
) -> st.SearchStrategy[Notification]:
    """Valid notifications.

    Non-ASCII subjects and display names, IDN domains, To / Cc / Bcc /
    Reply-To (at least one recipient), ``X-`` custom headers, text and HTML
    bodies (any Unicode, CR and LF, lines starting with ``.``), and up to two
    attachments with arbitrary bytes.

    Args:
        smtputf8: allow non-ASCII local parts (needs an SMTPUTF8 server).
        attachments: include attachments.
        max_recipients: the most addresses in To (Cc and Bcc: two each).
    """
    return _notifications(smtputf8, attachments, max_recipients)


# ----------------------------------------------------------------------------- configs


@functools.cache
def _fingerprints() -> st.SearchStrategy[str]:
    """A SHA-256 fingerprint in one of the spellings MailConfig accepts."""

    def spell(digest: bytes, upper: bool, colons: bool) -> str:
        text = digest.hex().upper() if upper else digest.hex()
        return ":".join(text[i : i + 2] for i in range(0, 64, 2)) if colons else text

    return st.builds(spell, st.binary(min_size=32, max_size=32), st.booleans(), st.booleans())


@functools.cache
def _hosts() -> st.SearchStrategy[str]:
    return st.sampled_from(["localhost", "127.0.0.1", "::1", "smtp.example.com"]) | _domains(
        idn=False
    )


_SECONDS = st.floats(min_value=1, max_value=300, allow_nan=False, allow_infinity=False)
_MAYBE_SECONDS = st.none() | _SECONDS
_PORTS = st.none() | st.integers(1, 65535)
_LOCAL_HOSTNAMES = st.none() | _domains(idn=False)
_TLS = st.sampled_from(["none", "starttls", "ssl"])
_TLS_WITH_PINS = st.sampled_from(["starttls", "ssl"])
_TRUST = st.sampled_from(["verify", "all"])
_TRUST_WITH_PINS = st.sampled_from(["verify", "all", "pinned"])
_PINS = st.lists(_fingerprints(), min_size=1, max_size=3)
_RETRY_INTERVALS = st.timedeltas(min_value=timedelta(seconds=1), max_value=timedelta(days=1))
_BACKOFFS = st.just(1.0) | st.floats(min_value=1, max_value=10)
_EXPIRATIONS = st.timedeltas(min_value=timedelta(microseconds=1), max_value=timedelta(days=60))
_NAME_TEXT = st.text(
    st.characters(exclude_categories=["Cs", "Cc", "Zl", "Zp"]), min_size=1, max_size=30
)
_PASSWORD = st.text(st.characters(exclude_categories=["Cs"], exclude_characters="\x00"), min_size=1)
_MAX_CONNECTIONS = st.just(1) | st.integers(min_value=1, max_value=32)
_MAX_MESSAGES_PER_CONNECTION = st.none() | st.integers(min_value=1, max_value=1000)
_MAX_MESSAGES_PER_SECOND = st.none() | st.floats(
    min_value=0.01, max_value=1000, allow_nan=False, allow_infinity=False
)


@st.composite
def _configs(draw: st.DrawFn, overrides: Mapping[str, Any]) -> MailConfig:
    values: dict[str, Any] = {
        name: draw(value) if isinstance(value, st.SearchStrategy) else value
        for name, value in overrides.items()
    }

    def fill(name: str, strategy: st.SearchStrategy[Any]) -> Any:
        if name not in values:
            values[name] = draw(strategy)
        return values[name]

    host = fill("host", _hosts())
    fill("port", _PORTS)
    fill("sender", addresses())
    fill("local_hostname", _LOCAL_HOSTNAMES)
    tls = fill("tls", _TLS_WITH_PINS if values.get("trust") == "pinned" else _TLS)
    trust = fill("trust", _TRUST if tls == "none" else _TRUST_WITH_PINS)
    if trust == "pinned" and not (
        values.get("pinned_certificates") or values.get("pinned_fingerprints")
    ):
        values["pinned_fingerprints"] = draw(_PINS)
    fill("check_hostname", st.booleans())

    if "username" in values or "password" in values:
        fill("username", _NAME_TEXT)
        fill("password", _PASSWORD)
    elif draw(st.booleans()):
        values["username"] = draw(_NAME_TEXT)
        values["password"] = draw(_PASSWORD)
    needs_permission = (
        values.get("username") is not None and tls == "none" and not _is_loopback(str(host))
    )
    fill("allow_plaintext_auth", st.just(True) if needs_permission else st.booleans())

    fill("timeout", _SECONDS)
    fill("connect_timeout", _MAYBE_SECONDS)
    fill("send_timeout", _MAYBE_SECONDS)
    retry = fill("retry_interval", _RETRY_INTERVALS)
    fill("retry_backoff", _BACKOFFS)
    if isinstance(retry, timedelta):
        fill(
            "max_retry_interval",
            st.none() | st.timedeltas(min_value=retry, max_value=retry + timedelta(days=2)),
        )
    fill("expiration", _EXPIRATIONS)
    fill("max_connections", _MAX_CONNECTIONS)
    fill("max_messages_per_connection", _MAX_MESSAGES_PER_CONNECTION)
    fill("max_messages_per_second", _MAX_MESSAGES_PER_SECOND)
    return MailConfig.model_validate(values)


def mail_configs(**overrides: Any) -> st.SearchStrategy[MailConfig]:
    """Valid :class:`~smtpnotify.MailConfig` objects.

    Every field varies: host (loopback or a DNS name), port, sender (from
    :func:`addresses`), ``tls`` none / starttls / ssl, ``trust`` verify / all /
    pinned (pinned configs get 1-3 valid SHA-256 fingerprints, in any accepted
    spelling), ``check_hostname``, username and password (or none),
    deadlines, ``retry_interval``, ``retry_backoff``, ``max_retry_interval``,
    ``expiration``, ``local_hostname``, and the connection pool's
    ``max_connections`` (1-32), ``max_messages_per_connection`` and
    ``max_messages_per_second`` (each ``None`` or a limit).

    The pool settings change how many connections a
    :class:`~smtpnotify.Notifier` opens and how fast it sends; fix them
    (``max_connections=1``) when a test counts connections.

    Fix a field with a value, or vary it your way with a strategy; the other
    fields adapt so that the result is valid (``trust="pinned"`` gives a TLS
    mode, ``username`` a password, and so on)::

        mail_configs(host=sink.host, port=sink.port, tls="none")
        mail_configs(trust="pinned", pinned_certificates=[certs.ca_pem])
        mail_configs(timeout=st.floats(1, 5))

    Raises:
        TypeError: an override names no ``MailConfig`` field.

    The generated hosts need not exist: override ``host`` and ``port`` to
    send anywhere.  A :class:`~smtpnotify.Notifier` made from a config with
    TLS and ``trust="all"`` emits :class:`~smtpnotify.InsecureTrustWarning`.
    """
    unknown = sorted(set(overrides) - _FIELDS)
    if unknown:
        raise TypeError(f"mail_configs() got unknown MailConfig fields: {', '.join(unknown)}")
    return _configs(dict(overrides))
