"""Throw-away certificates for TLS tests: :func:`make_certificates`.

Built with trustme (in the ``smtpnotify[testing]`` extra), imported only when
:func:`make_certificates` is called::

    certs = make_certificates()
    with SMTPSink(tls="starttls", ssl_context=certs.server_context()) as sink:
        ...  # a client trusting certs.ca_pem verifies "localhost" / 127.0.0.1

Every server certificate the bundle can present:

================  ====================================================  =================
kind              certificate                                           names
================  ====================================================  =================
``localhost``     issued by ``ca``                                      localhost,
                                                                        127.0.0.1, ::1
``wrong_name``    issued by ``ca``                                      wrong.example
``other_ca``      issued by ``other_ca`` (a CA nobody trusts)           localhost, ...
``expired``       issued by ``ca``, expired yesterday                   localhost, ...
``self_signed``   self-signed end-entity certificate (``CA:FALSE``)     localhost, ...
``chained``       issued by ``intermediate`` (itself issued by ``ca``); localhost, ...
                  the server sends leaf + intermediate
================  ====================================================  =================
"""

from __future__ import annotations

import datetime
import hashlib
import ipaddress
import ssl
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, TypeAlias

if TYPE_CHECKING:
    import trustme

__all__ = ["CertificateBundle", "ServerCertKind", "make_certificates"]

ServerCertKind: TypeAlias = Literal[
    "localhost", "wrong_name", "other_ca", "expired", "self_signed", "chained"
]
"""Names of the server certificates in a :class:`CertificateBundle`."""

_LOCAL_NAMES = ("localhost", "127.0.0.1", "::1")


@dataclass(frozen=True)
class _Identity:
    """A certificate chain (leaf first) and its private key, PEM."""

    chain_pem: tuple[str, ...]
    key_pem: str


@dataclass(frozen=True)
class CertificateBundle:
    """CAs and server certificates for one test session.

    Attributes:
        ca: the trustme CA a well-configured client trusts.
        other_ca: a second, unrelated trustme CA (for "unknown CA" tests).
        intermediate: a trustme intermediate CA issued by ``ca``.
        ca_pem: ``ca``'s certificate, PEM text.
        other_ca_pem: ``other_ca``'s certificate, PEM text.
        intermediate_pem: ``intermediate``'s certificate, PEM text.
        leaf_pem: the ``"localhost"`` server certificate, PEM text
            (same as ``pem("localhost")``).
        leaf_sha256: SHA-256 of that certificate's DER, 64 lower-case hex
            digits (same as ``sha256("localhost")``).

    Methods give the same for any :data:`ServerCertKind`: :meth:`pem`,
    :meth:`der`, :meth:`sha256`, and :meth:`server_context` builds a fresh
    server-side :class:`ssl.SSLContext` presenting it.
    """

    ca: trustme.CA
    other_ca: trustme.CA
    intermediate: trustme.CA
    ca_pem: str
    other_ca_pem: str
    intermediate_pem: str
    _identities: dict[str, _Identity]

    @property
    def leaf_pem(self) -> str:
        """PEM of the ``"localhost"`` server certificate."""
        return self.pem("localhost")

    @property
    def leaf_sha256(self) -> str:
        """SHA-256 (hex) of the ``"localhost"`` server certificate's DER."""
        return self.sha256("localhost")

    def _identity(self, kind: ServerCertKind) -> _Identity:
        try:
            return self._identities[kind]
        except KeyError:
            raise ValueError(f"unknown certificate kind: {kind!r}") from None

    def pem(self, kind: ServerCertKind = "localhost") -> str:
        """The server (leaf) certificate of ``kind``, PEM text."""
        return self._identity(kind).chain_pem[0]

    def chain_pem(self, kind: ServerCertKind = "localhost") -> str:
        """What the server sends for ``kind``: the leaf, then any intermediates, PEM."""
        return "".join(self._identity(kind).chain_pem)

    def der(self, kind: ServerCertKind = "localhost") -> bytes:
        """The server (leaf) certificate of ``kind``, DER bytes."""
        return ssl.PEM_cert_to_DER_cert(self.pem(kind))

    def sha256(self, kind: ServerCertKind = "localhost") -> str:
        """SHA-256 of the leaf certificate's DER, 64 lower-case hex digits."""
        return hashlib.sha256(self.der(kind)).hexdigest()

    def server_context(self, kind: ServerCertKind = "localhost") -> ssl.SSLContext:
        """A new server-side context presenting the ``kind`` certificate (TLS ≥ 1.2)."""
        import trustme

        identity = self._identity(kind)
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        blob = trustme.Blob((identity.key_pem + "".join(identity.chain_pem)).encode("ascii"))
        with blob.tempfile() as path:
            ctx.load_cert_chain(path)
        return ctx

    def client_context(
        self, trust: Literal["ca", "other_ca"] = "ca", *, check_hostname: bool = True
    ) -> ssl.SSLContext:
        """A client-side context trusting only ``ca`` (or ``other_ca``), for test clients."""
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = check_hostname
        ctx.load_verify_locations(cadata=self.ca_pem if trust == "ca" else self.other_ca_pem)
        return ctx


def make_certificates() -> CertificateBundle:
    """Create two CAs, an intermediate and every :data:`ServerCertKind` certificate.

    Takes a few milliseconds (ECDSA keys); share one bundle per test session.
    """
    import trustme

    ca = trustme.CA()
    other_ca = trustme.CA()
    intermediate = ca.create_child_ca()
    now = datetime.datetime.now(datetime.UTC)

    def from_leaf(leaf: trustme.LeafCert) -> _Identity:
        return _Identity(
            chain_pem=tuple(blob.bytes().decode("ascii") for blob in leaf.cert_chain_pems),
            key_pem=leaf.private_key_pem.bytes().decode("ascii"),
        )

    identities = {
        "localhost": from_leaf(ca.issue_cert(*_LOCAL_NAMES)),
        "wrong_name": from_leaf(ca.issue_cert("wrong.example")),
        "other_ca": from_leaf(other_ca.issue_cert(*_LOCAL_NAMES)),
        "expired": from_leaf(
            ca.issue_cert(
                *_LOCAL_NAMES,
                not_before=now - datetime.timedelta(days=30),
                not_after=now - datetime.timedelta(days=1),
            )
        ),
        "self_signed": _self_signed(now),
        "chained": from_leaf(intermediate.issue_cert(*_LOCAL_NAMES)),
    }
    return CertificateBundle(
        ca=ca,
        other_ca=other_ca,
        intermediate=intermediate,
        ca_pem=ca.cert_pem.bytes().decode("ascii"),
        other_ca_pem=other_ca.cert_pem.bytes().decode("ascii"),
        intermediate_pem=intermediate.cert_pem.bytes().decode("ascii"),
        _identities=identities,
    )


def _self_signed(now: datetime.datetime) -> _Identity:
    """A self-signed end-entity certificate for localhost, 127.0.0.1 and ::1."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=365))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.SubjectAlternativeName(
                [
                    x509.DNSName("localhost"),
                    x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                    x509.IPAddress(ipaddress.ip_address("::1")),
                ]
            ),
            critical=False,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(key, hashes.SHA256())
    )
    return _Identity(
        chain_pem=(cert.public_bytes(serialization.Encoding.PEM).decode("ascii"),),
        key_pem=key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ).decode("ascii"),
    )
