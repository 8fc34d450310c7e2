"""``fetch_server_certificate``: read a server's certificate to fill in a pin."""

from __future__ import annotations

from typing import Literal

from ._config import MailConfig
from ._errors import TLSError
from ._smtp import SMTPSession
from ._tls import ServerCertificate, TLSPlan, build_context

__all__ = ["fetch_server_certificate"]


def fetch_server_certificate(
    host: str,
    port: int | None = None,
    tls: Literal["starttls", "ssl"] = "starttls",
    *,
    timeout: float = 30.0,
) -> ServerCertificate:
    """Connect to ``host`` and return its leaf certificate (PEM and SHA-256), unverified.

    This is how to *find out* what to pin: compare the fingerprint with what the
    server's administrator tells you out of band before you trust it.  With
    ``tls="starttls"`` (default port 587) the session greets and asks for
    STARTTLS first; with ``tls="ssl"`` (default port 465) TLS starts at once.
    Nothing is authenticated and no message is sent.

    >>> cert = fetch_server_certificate("mail.example.com", 587)   # doctest: +SKIP
    >>> MailConfig(..., trust="pinned", pinned_fingerprints=(cert.sha256,))
    """
    if tls not in ("starttls", "ssl"):
        raise ValueError("tls must be 'starttls' or 'ssl': a plain connection has no certificate")
    config = MailConfig(
        host=host, port=port, tls=tls, sender="certificate-check@example.invalid", timeout=timeout
    )
    session = SMTPSession(config, TLSPlan((("all", build_context("all")),), ()))
    try:
        session.open()
    finally:
        session.close()
    if session.peer_der is None:
        raise TLSError(f"{host} presented no certificate", phase="connect")
    return ServerCertificate.from_der(session.peer_der)
