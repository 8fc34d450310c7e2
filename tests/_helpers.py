"""Small helpers shared by the test files (import as ``from _helpers import ...``).

Keep this module tiny and additive: several test files use it.
"""

from __future__ import annotations

from typing import Any, Protocol

from smtpnotify import MailConfig, Notification

SENDER = "Change Desk <noreply@example.com>"


class _Server(Protocol):
    host: str
    port: int


def config_for(server: _Server, **kw: Any) -> MailConfig:
    """A ``MailConfig`` for a ScriptedServer or SMTPSink on loopback.

    ``sender`` defaults to :data:`SENDER`; every other field comes from ``kw``
    (``tls``, ``timeout``, ``trust``...).
    """
    kw.setdefault("sender", SENDER)
    return MailConfig(host=server.host, port=server.port, **kw)


def pinned_ca(certs: Any) -> dict[str, Any]:
    """``MailConfig`` keywords that trust the test CA (``certs`` is the ``certs`` fixture)."""
    return {"trust": "pinned", "pinned_certificates": (certs.ca_pem,)}


def note(to: str | tuple[str, ...] = "ops@example.com", **kw: Any) -> Notification:
    """A small valid ``Notification``."""
    kw.setdefault("subject", "Disk full")
    kw.setdefault("text", "The disk is full.\n")
    return Notification(to=to, **kw)
