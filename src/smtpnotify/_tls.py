"""TLS contexts and trust policies: ``verify``, ``all`` and ``pinned``.

Every TLS connection smtpnotify makes uses a context built here (never
``smtplib``'s unverified default), with TLS 1.2 as the floor.

``pinned`` trusts only what the configuration lists.  Python 3.11's ``ssl``
has no verification callback, so the two kinds of pin are checked in two ways:

* pinned **certificates** become the context's only trust anchors, with
  ``VERIFY_X509_PARTIAL_CHAIN`` so that a listed leaf or intermediate anchors a
  chain by itself; OpenSSL checks the chain (and the hostname) in the handshake;
* pinned **fingerprints** are compared, in constant time, with the SHA-256 of
  the leaf certificate right after the handshake (CA and expiry not consulted).

With both kinds configured, the certificate context is tried first; if it
rejects the server, the session reconnects once with a fingerprint-only
context, so that either match passes.
"""

from __future__ import annotations

import hashlib
import hmac
import ssl
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import certifi

from ._errors import CertificateError

if TYPE_CHECKING:
    from ._config import MailConfig

__all__ = [
    "ServerCertificate",
    "TLSPlan",
    "check_fingerprint",
    "plan_tls",
    "sha256_hex",
]

ContextKind = Literal["verify", "all", "certificates", "fingerprints"]


def sha256_hex(der: bytes) -> str:
    """Lower-case hex SHA-256 of a DER certificate (what a fingerprint pin holds)."""
    return hashlib.sha256(der).hexdigest()


@dataclass(frozen=True, slots=True)
class ServerCertificate:
    """A server's leaf certificate, as :func:`~smtpnotify.fetch_server_certificate` returns it.

    Attributes:
        pem: the certificate in PEM form, ready for ``pinned_certificates``.
        sha256: lower-case hex SHA-256 of its DER form, ready for ``pinned_fingerprints``.
    """

    pem: str
    sha256: str

    @classmethod
    def from_der(cls, der: bytes) -> ServerCertificate:
        """Build from the DER bytes ``SSLSocket.getpeercert(binary_form=True)`` gives."""
        return cls(pem=ssl.DER_cert_to_PEM_cert(der), sha256=sha256_hex(der))


def _base_context() -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx


def _unverified_context() -> ssl.SSLContext:
    ctx = _base_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def build_context(kind: ContextKind, config: MailConfig | None = None) -> ssl.SSLContext:
    """The client context for one way of trusting a server."""
    if kind in ("all", "fingerprints"):
        return _unverified_context()
    assert config is not None
    ctx = _base_context()
    if kind == "verify":
        ctx.load_verify_locations(cafile=certifi.where())
    else:
        ctx.load_verify_locations(cadata="\n".join(config.pinned_certificates))
        ctx.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.check_hostname = config.check_hostname
    return ctx


@dataclass(frozen=True, slots=True)
class TLSPlan:
    """How the session should trust the server: contexts to try in order, and the pins.

    ``contexts`` holds one context, or two (certificates, then fingerprints) when
    both kinds of pin are configured.  ``fingerprints`` is checked after a
    handshake made with a context that did not verify the chain itself.
    """

    contexts: tuple[tuple[ContextKind, ssl.SSLContext], ...]
    fingerprints: tuple[str, ...]


def plan_tls(config: MailConfig) -> TLSPlan:
    """Build the contexts for ``config`` once; the session reuses them for every connection."""
    if config.trust == "verify":
        return TLSPlan((("verify", build_context("verify", config)),), ())
    if config.trust == "all":
        return TLSPlan((("all", build_context("all")),), ())
    kinds: list[tuple[ContextKind, ssl.SSLContext]] = []
    if config.pinned_certificates:
        kinds.append(("certificates", build_context("certificates", config)))
    if config.pinned_fingerprints:
        kinds.append(("fingerprints", build_context("fingerprints")))
    return TLSPlan(tuple(kinds), tuple(config.pinned_fingerprints))


def check_fingerprint(der: bytes | None, fingerprints: tuple[str, ...]) -> None:
    """Raise :class:`CertificateError` unless the leaf's SHA-256 equals one of ``fingerprints``.

    Each comparison takes the same time whatever the digits (``hmac.compare_digest``),
    and every pin is compared.
    """
    if der is None:
        raise CertificateError("the server presented no certificate", phase="connect")
    actual = sha256_hex(der).encode()
    matched = False
    for pin in fingerprints:
        matched |= hmac.compare_digest(actual, pin.encode())
    if not matched:
        raise CertificateError(
            f"the server's certificate (SHA-256 {actual.decode()}) matches no pinned fingerprint",
            phase="connect",
        )
