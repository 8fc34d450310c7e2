"""Parsing and checking single `MailConfig` values: host names, the sender,
pinned certificates and fingerprints, numbers and durations.

Each function raises `ValueError` with a message naming the rule, which the
model's validators turn into a `pydantic.ValidationError`.
"""

from __future__ import annotations

import ipaddress
import re
import ssl
import unicodedata
from typing import Any

from ._addresses import Mailbox, parse_mailbox
from ._errors import InvalidMessage

_NUMBER = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)")
_FINGERPRINT = re.compile(r"[0-9a-fA-F]{64}|[0-9a-fA-F]{2}(?::[0-9a-fA-F]{2}){31}")
_SHA1 = re.compile(r"[0-9a-fA-F]{40}|[0-9a-fA-F]{2}(?::[0-9a-fA-F]{2}){19}")
_PEM_BLOCK = re.compile(r"-----BEGIN ([^\r\n-]+)-----(.*?)-----END ([^\r\n-]+)-----", re.DOTALL)
_SENDER_RULE = (
    "sender must be one email address, optionally with a display name, "
    'like "noreply@example.com" or "Change Desk <noreply@example.com>"'
)


def _has_space_or_control(text: str) -> bool:
    """True when ``text`` holds whitespace, a control, format or unassigned character."""
    return any(c.isspace() or unicodedata.category(c)[0] in "CZ" for c in text)


def _has_line_or_control(text: str) -> bool:
    """True when ``text`` holds CR, LF, any other C0/C1 control or a line/paragraph separator."""
    return any(unicodedata.category(c) in ("Cc", "Zl", "Zp") for c in text)


def _ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


def _is_loopback(host: str) -> bool:
    if host.lower() in ("localhost", "localhost."):
        return True
    ip = _ip(host)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip is not None and ip.is_loopback


def _parse_sender(value: str) -> Mailbox:
    """Parse ``value`` into exactly one mailbox, or raise `ValueError`.

    The message module's parser decides, so that a sender the config accepts is
    one every message can carry in ``From``.
    """
    if _has_line_or_control(value):
        raise ValueError("sender must not contain CR, LF or other control characters")
    try:
        return parse_mailbox(value.strip(), "sender")
    except InvalidMessage as exc:
        raise ValueError(f"{_SENDER_RULE}: {exc}") from None


def _split_certificates(text: str, ctx: ssl.SSLContext) -> list[str]:
    """Split PEM text into certificates, each checked by OpenSSL and re-encoded canonically."""
    blocks = list(_PEM_BLOCK.finditer(text))
    if text.count("-----BEGIN ") != len(blocks) or any(m[1] != m[3] for m in blocks):
        raise ValueError("pinned_certificates: a PEM block has no matching -----END line")
    if not blocks:
        raise ValueError(
            "pinned_certificates: no PEM certificate found (expected -----BEGIN CERTIFICATE-----)"
        )
    certificates = []
    for block in blocks:
        if "PRIVATE KEY" in block[1]:
            raise ValueError(
                "pinned_certificates holds a private key: pin the certificate only, "
                "and keep private keys out of the config"
            )
        if block[1] != "CERTIFICATE":
            raise ValueError(f"pinned_certificates: a {block[1]} block is not a CERTIFICATE")
        pem = f"-----BEGIN CERTIFICATE-----\n{block[2].strip()}\n-----END CERTIFICATE-----\n"
        try:
            der = ssl.PEM_cert_to_DER_cert(pem)
            ctx.load_verify_locations(cadata=der)  # OpenSSL parses it as X.509 or raises
        except (ValueError, ssl.SSLError):
            raise ValueError(
                "pinned_certificates: a CERTIFICATE block is not a valid X.509 certificate"
            ) from None
        certificates.append(ssl.DER_cert_to_PEM_cert(der))
    return certificates


def _normalise_fingerprint(index: int, value: str) -> str:
    text = value.strip()
    if _FINGERPRINT.fullmatch(text):
        return text.replace(":", "").lower()
    hint = " (this one looks like SHA-1)" if _SHA1.fullmatch(text) else ""
    raise ValueError(
        f"pinned_fingerprints[{index}] is not a SHA-256 fingerprint: expected 64 hex digits, "
        f"optionally as colon-separated pairs{hint}"
    )


def _not_bool(value: Any) -> Any:
    # pydantic's lax mode reads True as 1; a flag in a number field is a mistake.
    if isinstance(value, bool):
        raise ValueError("expected a number, not a boolean")
    return value


def _duration(value: Any) -> Any:
    # pydantic reads ISO 8601 strings and numbers of seconds, but not "300" (a
    # string of seconds), which is what environment variables hold.
    value = _not_bool(value)
    if isinstance(value, str) and _NUMBER.fullmatch(value.strip()):
        return float(value)
    return value
