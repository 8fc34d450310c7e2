"""Mailboxes: the strict parser, IDNA domains and the envelope form of an address.

One entry is exactly one mailbox: ``local@domain`` or ``[display name]
<local@domain>``.  No comments, groups, lists or quoted local parts: smtpnotify
never guesses what an ambiguous address meant.  Domains are IDNA-encoded; a
non-ASCII local part is kept and needs SMTPUTF8.
"""

from __future__ import annotations

import ipaddress
import re
import string
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from email.headerregistry import Address

from ._errors import InvalidMessage
from ._headers import check_header_text

__all__ = [
    "Mailbox",
    "address_tuple",
    "check_local",
    "dedup",
    "display_name",
    "mailbox_from_address",
    "parse_mailbox",
    "validate_address",
]

_MAX_DISPLAY_NAME = 256
"""Longest display name, in UTF-8 octets (keeps every address on one line)."""

_ATEXT = frozenset(string.ascii_letters + string.digits + "!#$%&'*+-/=?^_`{|}~")
_LABEL = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?")

_PARSED_MAX = 1024
_parsed: dict[str, Mailbox] = {}
"""Mailboxes by the text they were parsed from (a cache; cleared when full)."""

# Characters that IDNA 2003 (the stdlib codec) and IDNA 2008 map differently:
# the two would send the message to two different domains.
_IDNA_DEVIATIONS = frozenset("\u00df\u03c2\u200c\u200d")


@dataclass(frozen=True, slots=True)
class Mailbox:
    """One checked mailbox: a normalised display name, the local part, an ASCII domain."""

    display_name: str
    local: str
    domain: str
    """ASCII: IDNA-encoded."""

    @property
    def addr_spec(self) -> str:
        """``local@domain``, the envelope form."""
        return f"{self.local}@{self.domain}"

    @property
    def needs_smtputf8(self) -> bool:
        """Whether the local part is non-ASCII (SMTPUTF8 is then required)."""
        return not self.local.isascii()


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
    return parse_mailbox(address, "address").addr_spec


def _is_atext(ch: str) -> bool:
    return ch in _ATEXT or (not ch.isascii() and ch.isprintable() and not ch.isspace())


def check_local(local: str, what: str) -> None:
    """Refuse a local part that is not a dot-atom of at most 64 octets."""
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


def _addr_spec(spec: str, name: str, what: str) -> Mailbox:
    if spec.count("@") != 1:
        problem = "no '@'" if "@" not in spec else "more than one '@'"
        raise InvalidMessage(f"{what}: invalid address {spec!r} ({problem})")
    local, domain = spec.split("@")
    check_local(local, what)
    mailbox = Mailbox(name, local, _ascii_domain(domain, what))
    if len(mailbox.addr_spec.encode("utf-8")) > 254:
        raise InvalidMessage(f"{what}: address longer than 254 octets")
    return mailbox


def display_name(name: str, what: str) -> str:
    """``name`` with runs of whitespace made one space, checked for length and controls."""
    check_header_text(name, what)
    name = " ".join(name.split())
    if len(name.encode("utf-8")) > _MAX_DISPLAY_NAME:
        raise InvalidMessage(f"{what}: display name longer than {_MAX_DISPLAY_NAME} octets")
    return name


def parse_mailbox(text: str, what: str) -> Mailbox:
    """Parse exactly one mailbox: ``addr-spec`` or ``[display-name] <addr-spec>``.

    Strict on purpose: no comments, no groups, no lists, no quoted local parts.
    Specials in a display name must be quoted.  ``what`` names the field in
    error messages.  Addresses that parsed are remembered (the same few
    senders and recipients come back in every message); failures are not.
    """
    if type(text) is str:
        known = _parsed.get(text)
        if known is not None:
            return known
    elif not isinstance(text, str):
        raise TypeError(f"{what}: an address must be a str, not {type(text).__name__}")
    mailbox = _parse_mailbox(text, what)
    if type(text) is str:
        if len(_parsed) >= _PARSED_MAX:
            _parsed.clear()
        _parsed[text] = mailbox
    return mailbox


def _parse_mailbox(text: str, what: str) -> Mailbox:
    check_header_text(text, what)
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
    return _addr_spec(spec, display_name(" ".join(words), what), what)


def address_tuple(value: str | Iterable[str], what: str) -> tuple[str, ...]:
    """One address or an iterable of them, as a tuple of str (types checked, not content)."""
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


def mailbox_from_address(address: Address, what: str) -> Mailbox:
    """Apply the strict rules to an address the email package parsed."""
    name = display_name(address.display_name or "", what)
    check_header_text(address.username, what)
    check_local(address.username, what)
    mailbox = Mailbox(name, address.username, _ascii_domain(address.domain, what))
    if len(mailbox.addr_spec.encode("utf-8")) > 254:
        raise InvalidMessage(f"{what}: address longer than 254 octets")
    return mailbox


def dedup(mailboxes: Iterable[Mailbox]) -> tuple[str, ...]:
    """The envelope recipients: addr-specs in order, duplicates (ignoring case) dropped."""
    seen: set[str] = set()
    result: list[str] = []
    for mailbox in mailboxes:
        key = mailbox.addr_spec.lower()
        if key not in seen:
            seen.add(key)
            result.append(mailbox.addr_spec)
    return tuple(result)
