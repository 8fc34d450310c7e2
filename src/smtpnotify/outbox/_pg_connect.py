"""Connecting ``PostgresOutbox`` to PostgreSQL: default parameters, redacted errors.

Unless the conninfo sets them, connections get ``application_name``,
``connect_timeout`` and TCP keepalives (which notice a silently dead peer, not
only a terminated backend).  A malformed conninfo is reported without quoting
it, since it may hold a password.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import psycopg
from psycopg.conninfo import conninfo_to_dict

__all__ = [
    "CONNECT_DEFAULTS",
    "Conn",
    "ConnInfo",
    "ConnKwargs",
    "connect_autocommit",
    "pool_kwargs",
    "redacted_conninfo_error",
]

Conn = psycopg.Connection[Any]
ConnInfo = str | Callable[[], str]
ConnKwargs = dict[str, Any] | Callable[[], dict[str, Any]] | None

# Connection parameters the outbox adds when the conninfo does not set them:
# keepalives notice a silently dead peer (no FIN), not only a terminated backend.
CONNECT_DEFAULTS: dict[str, Any] = {
    "application_name": "smtpnotify-outbox",
    "connect_timeout": 10,
    "keepalives": 1,
    "keepalives_idle": 30,
    "keepalives_interval": 10,
    "keepalives_count": 3,
}


def redacted_conninfo_error(exc: Exception) -> ValueError:
    """A ``ValueError`` for a malformed conninfo that does not quote it."""
    # psycopg quotes pieces of a malformed conninfo, which may hold a password.
    return ValueError(
        f"invalid PostgreSQL conninfo ({type(exc).__name__}; not shown, it may hold a password)"
    )


def pool_kwargs(conninfo: str) -> dict[str, Any]:
    """The :data:`CONNECT_DEFAULTS` that ``conninfo`` does not set itself."""
    try:
        params = conninfo_to_dict(conninfo)
    except psycopg.ProgrammingError as exc:
        raise redacted_conninfo_error(exc) from None
    return {k: v for k, v in CONNECT_DEFAULTS.items() if k not in params}


def connect_autocommit(conninfo: ConnInfo, kwargs: ConnKwargs) -> Conn:
    """Open an autocommit connection like a pool's (either may be a callable).

    :data:`CONNECT_DEFAULTS` fill in what neither the conninfo nor the kwargs set.
    """
    conninfo = conninfo() if callable(conninfo) else conninfo
    kwargs = dict((kwargs() if callable(kwargs) else kwargs) or {})
    try:
        given = conninfo_to_dict(conninfo) | kwargs
    except psycopg.ProgrammingError as exc:
        raise redacted_conninfo_error(exc) from None
    kwargs |= {k: v for k, v in CONNECT_DEFAULTS.items() if k not in given}
    kwargs["autocommit"] = True
    return psycopg.connect(conninfo, **kwargs)
