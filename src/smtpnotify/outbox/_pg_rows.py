"""Rows of the ``PostgresOutbox`` table: read as dicts, turned into ``OutboxEntry`` values."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from psycopg import sql
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

from .._prepared import PreparedMessage
from ._base import OutboxEntry, OutboxStatus
from ._pg_connect import Conn

__all__ = ["entry_from_row", "fetch_rows", "refused_json", "utc"]


def fetch_rows(conn: Conn, stmt: sql.Composed, params: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Run ``stmt`` and return its rows as dicts, whatever the connection's row factory."""
    with conn.cursor(row_factory=dict_row) as cur:
        cur.execute(stmt, params)
        return cur.fetchall()


def utc(value: datetime | None) -> datetime | None:
    """``value`` in UTC (``None`` stays ``None``)."""
    return None if value is None else value.astimezone(UTC)


def refused_json(refused: Mapping[str, tuple[int, str]] | None) -> Jsonb:
    """Refused recipients as the ``refused jsonb`` column holds them: ``{addr: [code, text]}``."""
    return Jsonb({addr: [int(code), str(text)] for addr, (code, text) in (refused or {}).items()})


def entry_from_row(row: Mapping[str, Any]) -> OutboxEntry:
    """The :class:`OutboxEntry` a row of every column describes."""
    created_at = utc(row["created_at"])
    expires_at = utc(row["expires_at"])
    assert created_at is not None and expires_at is not None
    return OutboxEntry(
        id=row["id"],
        status=OutboxStatus(row["status"]),
        message=PreparedMessage(
            sender=row["sender"],
            recipients=tuple(row["recipients"]),
            message_id=row["message_id"],
            data=bytes(row["data"]),
            smtputf8=row["smtputf8"],
        ),
        created_at=created_at,
        expires_at=expires_at,
        next_attempt_at=utc(row["next_attempt_at"]),
        attempts=row["attempts"],
        last_error=row["last_error"],
        accepted=tuple(row["accepted"]),
        refused={addr: (int(v[0]), str(v[1])) for addr, v in row["refused"].items()},
        lease_owner=row["lease_owner"],
        lease_until=utc(row["lease_until"]),
        updated_at=utc(row["updated_at"]),
    )
