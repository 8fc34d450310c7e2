"""The ``PostgresOutbox`` table: its DDL, identifiers, channel and schema version check.

The table (drawn in the docstring of :mod:`smtpnotify.outbox.postgres`) carries
its schema version in its ``COMMENT``, ``smtpnotify outbox schema_version=N``:
on first use the outbox refuses a table that is missing, has no such stamp
(not its own) or a newer version.
"""

from __future__ import annotations

import hashlib
import re
from typing import TYPE_CHECKING

from psycopg import sql

from ._base import OutboxSchemaError
from ._pg_rows import fetch_rows

if TYPE_CHECKING:
    from ._pg_connect import Conn
    from ._pg_statements import Statements

__all__ = [
    "INSPECT",
    "MAX_SCHEMA_LEN",
    "MAX_TABLE_LEN",
    "SCHEMA_VERSION",
    "advisory_lock",
    "channel_name",
    "check_current",
    "create_or_check",
    "ddl_statements",
    "describe",
    "identifier",
    "qualified_table",
    "schema_sql",
]

SCHEMA_VERSION = 1
"""The version of the table layout this module reads and writes."""

_COMMENT_PREFIX = "smtpnotify outbox schema_version="
_COMMENT_RE = re.compile(r"^smtpnotify outbox schema_version=(\d+)\b")
_IDENTIFIER_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
MAX_TABLE_LEN = 50  # leaves room for the index suffix within PostgreSQL's 63 bytes
MAX_SCHEMA_LEN = 63
_MAX_CHANNEL_LEN = 63

# The DDL.  {t} is the (possibly schema-qualified) table, {idx} the index name,
# {comment} the version stamp.  Kept as text so schema_sql() shows exactly this.
_DDL = (
    """CREATE TABLE IF NOT EXISTS {t} (
    id              text        PRIMARY KEY,
    seq             bigint      GENERATED ALWAYS AS IDENTITY,
    status          text        NOT NULL CHECK (status IN
                                    ('pending', 'sending', 'sent', 'failed', 'expired')),
    sender          text        NOT NULL,
    recipients      text[]      NOT NULL,
    message_id      text        NOT NULL,
    data            bytea       NOT NULL,
    smtputf8        boolean     NOT NULL DEFAULT false,
    created_at      timestamptz NOT NULL,
    expires_at      timestamptz NOT NULL,
    next_attempt_at timestamptz,
    attempts        integer     NOT NULL DEFAULT 0,
    last_error      text,
    accepted        text[]      NOT NULL DEFAULT '{{}}',
    refused         jsonb       NOT NULL DEFAULT '{{}}',
    lease_owner     text,
    lease_until     timestamptz,
    updated_at      timestamptz NOT NULL
)""",
    "CREATE INDEX IF NOT EXISTS {idx} ON {t} (status, next_attempt_at)",
    "COMMENT ON TABLE {t} IS {comment}",
)

INSPECT = sql.SQL(
    "SELECT c.relkind::text AS relkind, obj_description(c.oid, 'pg_class') AS comment "
    "FROM pg_class c WHERE c.oid = to_regclass(%(name)s)"
).format()
"""The kind and comment of the relation named ``%(name)s`` (no row when there is none)."""


def identifier(value: str, what: str, max_len: int) -> str:
    """``value`` when it is a plain identifier of at most ``max_len`` characters."""
    if not isinstance(value, str) or not _IDENTIFIER_RE.fullmatch(value) or len(value) > max_len:
        raise ValueError(
            f"{what} must be an identifier of letters, digits and underscores, not starting "
            f"with a digit, at most {max_len} characters; got {value!r}"
        )
    return value


def qualified_table(table: str, schema: str | None) -> sql.Identifier:
    """The table as an SQL identifier, schema-qualified when ``schema`` is given."""
    return sql.Identifier(schema, table) if schema else sql.Identifier(table)


def channel_name(table: str, schema: str | None) -> str:
    """The ``LISTEN``/``NOTIFY`` channel of a table (hashed when too long for one)."""
    name = f"{schema}.{table}" if schema else table
    channel = f"smtpnotify:{name}"
    if len(channel) > _MAX_CHANNEL_LEN:
        channel = "smtpnotify:" + hashlib.sha256(name.encode()).hexdigest()[:40]
    return channel


def ddl_statements(table: str, schema: str | None) -> list[sql.Composed]:
    """The statements creating the table and its index and stamping its version."""
    return [
        sql.SQL(stmt).format(
            t=qualified_table(table, schema),
            idx=sql.Identifier(f"{table}_due_idx"),
            comment=sql.Literal(f"{_COMMENT_PREFIX}{SCHEMA_VERSION}"),
        )
        for stmt in _DDL
    ]


def schema_sql(table: str, schema: str | None) -> str:
    """The DDL as one script, after checking the identifiers."""
    statements = ddl_statements(
        identifier(table, "table", MAX_TABLE_LEN),
        None if schema is None else identifier(schema, "schema", MAX_SCHEMA_LEN),
    )
    return "".join(f"{stmt.as_string(None)};\n" for stmt in statements)


def advisory_lock(table: str, schema: str | None) -> sql.Composed:
    """A transaction-level advisory lock serialising schema changes to this table."""
    digest = hashlib.sha256(f"smtpnotify:{schema}.{table}".encode()).digest()
    lock_key = sql.Literal(int.from_bytes(digest[:8], "big", signed=True))
    return sql.SQL("SELECT pg_advisory_xact_lock({})").format(lock_key)


def describe(table: str, schema: str | None) -> str:
    """``table [schema.]name``, for error messages."""
    return f"table {schema + '.' if schema else ''}{table}"


def _table_version(conn: Conn, stmts: Statements, where: str) -> int | None:
    """The schema version of the table, ``None`` when it does not exist."""
    rows = fetch_rows(conn, stmts.inspect, {"name": stmts.qualified.as_string(conn)})
    if not rows:
        return None
    relkind, comment = rows[0]["relkind"], rows[0]["comment"]
    match = _COMMENT_RE.match(comment or "")
    if relkind not in ("r", "p") or match is None:
        raise OutboxSchemaError(
            f"{where} exists but is not an smtpnotify outbox (no "
            f"'{_COMMENT_PREFIX}N' comment); choose another table= or drop it"
        )
    return int(match.group(1))


def _newer(where: str, version: int) -> OutboxSchemaError:
    return OutboxSchemaError(
        f"{where} has schema version {version}, newer than the "
        f"{SCHEMA_VERSION} this smtpnotify knows; upgrade smtpnotify"
    )


def create_or_check(conn: Conn, stmts: Statements, where: str) -> None:
    """Create the table if missing (under the advisory lock); refuse a newer one."""
    conn.execute(stmts.advisory_lock)
    version = _table_version(conn, stmts, where)
    if version is None:
        for stmt in stmts.ddl:
            conn.execute(stmt)
    elif version > SCHEMA_VERSION:
        raise _newer(where, version)
    # An older version would be upgraded here; version 1 is the first.
    # A current table is left alone: no lock taken, no ownership needed.


def check_current(conn: Conn, stmts: Statements, where: str) -> None:
    """Raise :class:`OutboxSchemaError` unless the table exists at this schema version."""
    version = _table_version(conn, stmts, where)
    if version is None:
        raise OutboxSchemaError(
            f"{where} does not exist: run PostgresOutbox.create_schema() "
            "(or apply PostgresOutbox.schema_sql()), or pass create=True"
        )
    if version > SCHEMA_VERSION:
        raise _newer(where, version)
    if version < SCHEMA_VERSION:  # pragma: no cover - no older version exists yet
        raise OutboxSchemaError(
            f"{where} has schema version {version}: run create_schema() to upgrade it"
        )
