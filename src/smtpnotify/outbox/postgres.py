"""``PostgresOutbox``: the outbox on PostgreSQL, for many workers on many machines.

Install with the extra ``smtpnotify[postgres]`` (psycopg 3 and psycopg-pool).

- **Claims** are one ``UPDATE … WHERE id IN (SELECT … FOR UPDATE SKIP LOCKED)``
  statement: any number of workers share one table, never holding the same
  entry while a lease holds, never waiting on each other's locks.
- **Transactional enqueue**: ``add(..., connection=conn)`` inserts through the
  application's own psycopg connection, inside its open transaction, without
  committing.  The application's commit queues the message; its rollback
  discards it.
- **Wake-ups**: every ``add`` issues ``NOTIFY`` in its transaction (delivered
  on commit only); ``subscribe`` runs a listener thread with its own
  connection doing ``LISTEN``, reconnecting with backoff when it is cut.
- **Schema**: explicit.  ``create_schema()`` creates the table (idempotent)
  and stamps it with a schema version in its ``COMMENT``;
  ``PostgresOutbox.schema_sql()`` returns the DDL for migration tools.  On
  first use the outbox refuses a table that is missing, not its own, or of a
  newer schema version.
- **Broken connections**: an operation whose connection turns out dead runs
  again on another.  Every operation is safe to repeat: ``add`` fixes its id
  before the first try (``ON CONFLICT DO NOTHING``); ``record_*``, ``release``
  and ``retry`` only change a row in the expected state, and on a repeat
  recognise their own committed write (status and ``updated_at = now``); a
  repeated ``claim`` whose first commit went through but whose reply was lost
  leaves those entries leased, unreturned, until the lease runs out (an
  attempt counted for nothing, never a message sent twice).

Schema (version 1), one table, by default ``smtpnotify_outbox``::

    id text PRIMARY KEY            seq bigint IDENTITY (insertion order)
    status text (CHECK)            sender text, recipients text[], message_id text
    data bytea, smtputf8 boolean   created_at, expires_at, next_attempt_at timestamptz
    attempts integer               last_error text, accepted text[], refused jsonb
    lease_owner text               lease_until, updated_at timestamptz
    INDEX (status, next_attempt_at); COMMENT 'smtpnotify outbox schema_version=1'

Time is never read from the database: every ``now`` is the caller's, so an
injected clock governs claims, leases and expiry.  See ``docs/scaling-out.md``.
"""

from __future__ import annotations

import hashlib
import logging
import re
import threading
import uuid
from collections.abc import Callable, Mapping
from datetime import UTC, datetime, timedelta
from typing import Any, ClassVar, TypeVar

try:
    import psycopg
    from psycopg import sql
    from psycopg.conninfo import conninfo_to_dict
    from psycopg.rows import dict_row
    from psycopg.types.json import Jsonb
    from psycopg_pool import ConnectionPool, PoolClosed, PoolTimeout, TooManyRequests
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "smtpnotify.outbox.postgres needs psycopg 3 and psycopg-pool; "
        "install them with: pip install 'smtpnotify[postgres]'"
    ) from exc

from .._prepared import PreparedMessage
from ._base import (
    FINISHED_STATUSES,
    BaseOutbox,
    OutboxEntry,
    OutboxError,
    OutboxSchemaError,
    OutboxStatus,
    as_utc,
    call_subscribers,
    check_limit,
    check_purge_statuses,
    check_remaining,
)

__all__ = ["PostgresOutbox"]

logger = logging.getLogger("smtpnotify.outbox.postgres")

_T = TypeVar("_T")
_Conn = psycopg.Connection[Any]
_Op = Callable[[_Conn, bool], _T]
_ConnInfo = str | Callable[[], str]
_ConnKwargs = dict[str, Any] | Callable[[], dict[str, Any]] | None

SCHEMA_VERSION = 1
"""The version of the table layout this module reads and writes."""

_COMMENT_PREFIX = "smtpnotify outbox schema_version="
_COMMENT_RE = re.compile(r"^smtpnotify outbox schema_version=(\d+)\b")
_IDENTIFIER_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_MAX_TABLE_LEN = 50  # leaves room for the index suffix within PostgreSQL's 63 bytes
_MAX_CHANNEL_LEN = 63
# Connection parameters the outbox adds when the conninfo does not set them:
# keepalives notice a silently dead peer (no FIN), not only a terminated backend.
_CONNECT_DEFAULTS: dict[str, Any] = {
    "application_name": "smtpnotify-outbox",
    "connect_timeout": 10,
    "keepalives": 1,
    "keepalives_idle": 30,
    "keepalives_interval": 10,
    "keepalives_count": 3,
}

# Operational errors never retried: the pool already waited its timeout or is
# closed, or a statement_timeout fired (trying again would wait as long again).
_NOT_RETRIED: tuple[type[BaseException], ...] = (
    PoolTimeout,
    PoolClosed,
    TooManyRequests,
    psycopg.errors.QueryCanceled,
)

_COLUMNS = (
    "id",
    "seq",
    "status",
    "sender",
    "recipients",
    "message_id",
    "data",
    "smtputf8",
    "created_at",
    "expires_at",
    "next_attempt_at",
    "attempts",
    "last_error",
    "accepted",
    "refused",
    "lease_owner",
    "lease_until",
    "updated_at",
)

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

# Accepted recipients are a set kept in first-seen order.
_MERGE_ACCEPTED = """accepted = ARRAY(
        SELECT a FROM unnest(accepted || %(accepted)s::text[]) WITH ORDINALITY AS u(a, n)
        GROUP BY a ORDER BY min(n))"""
_CLEAR_LEASE = "lease_owner = NULL, lease_until = NULL, updated_at = %(now)s"
_HELD = "id = %(id)s AND status = 'sending' AND lease_owner = %(owner)s"


def _identifier(value: str, what: str, max_len: int) -> str:
    if not isinstance(value, str) or not _IDENTIFIER_RE.fullmatch(value) or len(value) > max_len:
        raise ValueError(
            f"{what} must be an identifier of letters, digits and underscores, not starting "
            f"with a digit, at most {max_len} characters; got {value!r}"
        )
    return value


def _utc(value: datetime | None) -> datetime | None:
    return None if value is None else value.astimezone(UTC)


def _refused_json(refused: Mapping[str, tuple[int, str]] | None) -> Jsonb:
    return Jsonb({addr: [int(code), str(text)] for addr, (code, text) in (refused or {}).items()})


def _entry(row: Mapping[str, Any]) -> OutboxEntry:
    created_at = _utc(row["created_at"])
    expires_at = _utc(row["expires_at"])
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
        next_attempt_at=_utc(row["next_attempt_at"]),
        attempts=row["attempts"],
        last_error=row["last_error"],
        accepted=tuple(row["accepted"]),
        refused={addr: (int(v[0]), str(v[1])) for addr, v in row["refused"].items()},
        lease_owner=row["lease_owner"],
        lease_until=_utc(row["lease_until"]),
        updated_at=_utc(row["updated_at"]),
    )


def _storage_error(name: str, exc: psycopg.Error) -> OutboxError:
    return OutboxError(f"PostgresOutbox.{name} failed: {type(exc).__name__}: {exc}")


def _redacted_conninfo_error(exc: Exception) -> ValueError:
    # psycopg quotes pieces of a malformed conninfo, which may hold a password.
    return ValueError(
        f"invalid PostgreSQL conninfo ({type(exc).__name__}; not shown, it may hold a password)"
    )


class PostgresOutbox(BaseOutbox):
    """A durable outbox in a PostgreSQL table, shared by any number of workers.

    ::

        PostgresOutbox("postgresql://app@db/app")              # owns a small pool
        PostgresOutbox(pool=my_pool, table="mail_outbox")       # uses the caller's pool
        PostgresOutbox(dsn, schema="mail", create=True)        # creates the table on first use

    Args:
        conninfo: a libpq connection string or URL.  The outbox then creates
            (and on ``close()`` closes) its own ``psycopg_pool.ConnectionPool``
            of at most ``pool_size`` connections.  Unless the conninfo says
            otherwise, connections get ``application_name=smtpnotify-outbox``,
            ``connect_timeout=10`` and TCP keepalives.
        pool: instead of ``conninfo``, a ``ConnectionPool`` the caller owns
            (it is never closed here).  The listener thread opens one more
            connection with the pool's ``conninfo`` and ``kwargs``.
        table: the table name (letters, digits, ``_``; at most 50 characters).
        schema: the schema holding the table (must exist); ``None`` follows
            the connection's ``search_path``.
        create: run :meth:`create_schema` on first use instead of only
            checking that the table is there.  Off by default: schema changes
            are explicit.
        pool_size: the most connections of an owned pool.
        timeout: seconds to wait for a connection from an owned pool.
        listen_timeout: how often (seconds) the listener thread looks up from
            waiting for notifications to see whether it should stop; bounds
            how long ``close()`` waits for it.

    Every operation runs in its own transaction.  When its connection turns
    out dead it runs again on another connection: once per pooled connection
    plus one, so a pool whose idle connections were all cut recovers at once
    (never an ``add`` through the caller's ``connection``, which is theirs).
    Database errors are raised as :class:`~smtpnotify.outbox.OutboxError` (the
    psycopg error is its ``__cause__``); a table that is missing, foreign or
    newer raises :class:`~smtpnotify.outbox.OutboxSchemaError`.

    A claim is one ``UPDATE … WHERE id IN (SELECT … FOR UPDATE SKIP LOCKED)``:
    rows another worker is claiming are skipped, never waited for.  A retry
    after a connection lost during the commit may leave the first try's entries
    leased to ``owner`` but not returned; they are claimed again when the lease
    runs out (one attempt counted for nothing, never a double send).
    """

    SCHEMA_VERSION: ClassVar[int] = SCHEMA_VERSION

    def __init__(
        self,
        conninfo: str | None = None,
        *,
        pool: ConnectionPool[Any] | None = None,
        table: str = "smtpnotify_outbox",
        schema: str | None = None,
        create: bool = False,
        pool_size: int = 4,
        timeout: float = 30.0,
        listen_timeout: float = 0.25,
    ) -> None:
        if (conninfo is None) == (pool is None):
            raise TypeError("PostgresOutbox needs exactly one of conninfo or pool=")
        self._table = _identifier(table, "table", _MAX_TABLE_LEN)
        self._schema = None if schema is None else _identifier(schema, "schema", 63)
        self._create = create
        self._listen_timeout = listen_timeout
        self._lock = threading.Lock()
        self._ready = False
        self._closed = False
        self._callbacks: list[Callable[[], None]] = []
        self._listener: _Listener | None = None
        # Our own NOTIFY payload, so the listener skips what add() already announced.
        self._token = uuid.uuid4().hex
        self._channel = self._channel_name(self._table, self._schema)
        self._sql = _Statements(self._table, self._schema, self._channel, self._token)

        if pool is not None:
            if not isinstance(pool, ConnectionPool):
                raise TypeError(f"pool must be a psycopg_pool.ConnectionPool, not {type(pool)!r}")
            self._pool = pool
            self._owns_pool = False
            # The listener opens its own connection like the pool's (psycopg_pool
            # also allows callables that compute these at each connect).
            self._listen_conninfo: _ConnInfo = pool.conninfo
            self._listen_kwargs: _ConnKwargs = pool.kwargs
        else:
            assert conninfo is not None
            if pool_size < 1:
                raise ValueError("pool_size must be at least 1")
            try:
                params = conninfo_to_dict(conninfo)
            except psycopg.ProgrammingError as exc:
                raise _redacted_conninfo_error(exc) from None
            kwargs = {k: v for k, v in _CONNECT_DEFAULTS.items() if k not in params}
            # No ``check=``: psycopg_pool backs off a second or more after each
            # failed check, so a few connections killed while idle would stall
            # the next operation for seconds.  _run() notices a dead connection
            # by its first statement failing and retries at once on another.
            self._pool = ConnectionPool(
                conninfo,
                kwargs=kwargs,
                min_size=1,
                max_size=pool_size,
                open=True,
                timeout=timeout,
                name=f"smtpnotify-outbox-{self._table}",
            )
            self._owns_pool = True
            self._listen_conninfo = conninfo
            self._listen_kwargs = kwargs

    def __repr__(self) -> str:
        where = f"{self._schema}.{self._table}" if self._schema else self._table
        owner = "own pool" if self._owns_pool else "caller's pool"
        return f"<PostgresOutbox table={where!r} ({owner}){' closed' if self._closed else ''}>"

    # ------------------------------------------------------------------ schema

    @property
    def table(self) -> str:
        """The table name (without schema)."""
        return self._table

    @property
    def channel(self) -> str:
        """The ``LISTEN``/``NOTIFY`` channel announcing new messages."""
        return self._channel

    @staticmethod
    def _channel_name(table: str, schema: str | None) -> str:
        name = f"{schema}.{table}" if schema else table
        channel = f"smtpnotify:{name}"
        if len(channel) > _MAX_CHANNEL_LEN:
            channel = "smtpnotify:" + hashlib.sha256(name.encode()).hexdigest()[:40]
        return channel

    @classmethod
    def schema_sql(cls, *, table: str = "smtpnotify_outbox", schema: str | None = None) -> str:
        """The DDL that :meth:`create_schema` runs, for a DBA's migration tool.

        Apply it as is (it is idempotent); the ``COMMENT`` carries the schema
        version the outbox checks on first use.
        """
        statements = _Statements(
            _identifier(table, "table", _MAX_TABLE_LEN),
            None if schema is None else _identifier(schema, "schema", 63),
            cls._channel_name(table, schema),
            "",
        )
        return "".join(f"{stmt.as_string(None)};\n" for stmt in statements.ddl)

    def create_schema(self) -> None:
        """Create the table and index if missing, stamped with the schema version.

        Idempotent and safe to run from many workers at once (serialised by an
        advisory lock); a table already at this version is left untouched, so
        only the first run needs ``CREATE`` on the schema.  Raises
        :class:`OutboxSchemaError` when a table of that name exists but is not
        an smtpnotify outbox, or is of a newer version.
        """
        self._check_open()

        def op(conn: _Conn, retried: bool) -> None:
            conn.execute(self._sql.advisory_lock)
            version = self._inspect(conn)
            if version is None:
                for stmt in self._sql.ddl:
                    conn.execute(stmt)
            elif version > SCHEMA_VERSION:
                self._raise_newer(version)
            # An older version would be upgraded here; version 1 is the first.
            # A current table is left alone: no lock taken, no ownership needed.

        self._run(op, "create_schema")
        with self._lock:
            self._ready = True

    def _inspect(self, conn: _Conn) -> int | None:
        """The schema version of the table, ``None`` when it does not exist."""
        rows = self._rows(conn, self._sql.inspect, {"name": self._sql.qualified.as_string(conn)})
        if not rows:
            return None
        relkind, comment = rows[0]["relkind"], rows[0]["comment"]
        match = _COMMENT_RE.match(comment or "")
        if relkind not in ("r", "p") or match is None:
            raise OutboxSchemaError(
                f"{self._describe()} exists but is not an smtpnotify outbox (no "
                f"'{_COMMENT_PREFIX}N' comment); choose another table= or drop it"
            )
        return int(match.group(1))

    def _raise_newer(self, version: int) -> None:
        raise OutboxSchemaError(
            f"{self._describe()} has schema version {version}, newer than the "
            f"{SCHEMA_VERSION} this smtpnotify knows; upgrade smtpnotify"
        )

    def _describe(self) -> str:
        return f"table {self._schema + '.' if self._schema else ''}{self._table}"

    def _ensure_ready(self) -> None:
        if self._ready:
            return
        if self._create:
            self.create_schema()
            return

        def op(conn: _Conn, retried: bool) -> None:
            version = self._inspect(conn)
            if version is None:
                raise OutboxSchemaError(
                    f"{self._describe()} does not exist: run PostgresOutbox.create_schema() "
                    "(or apply PostgresOutbox.schema_sql()), or pass create=True"
                )
            if version > SCHEMA_VERSION:
                self._raise_newer(version)
            if version < SCHEMA_VERSION:  # pragma: no cover - no older version exists yet
                raise OutboxSchemaError(
                    f"{self._describe()} has schema version {version}: run create_schema() "
                    "to upgrade it"
                )

        self._run(op, "schema check")
        with self._lock:
            self._ready = True

    # --------------------------------------------------------------- plumbing

    def _check_open(self) -> None:
        if self._closed:
            raise OutboxError("this PostgresOutbox is closed")

    def _run(self, op: _Op[_T], name: str) -> _T:
        """Run ``op`` in one transaction on a pooled connection, retrying when it breaks.

        A connection found dead (its statement failed and psycopg closed it:
        the backend was terminated, the server restarted, the network cut it)
        is discarded by the pool and ``op`` runs again on another, at most once
        per pooled connection plus one, so a pool of idle connections that all
        died recovers at once.  Another ``OperationalError`` (a deadlock, a
        serialization failure) gets one more try.  ``op`` receives
        ``retried=True`` on a later try, so a conditional update can tell
        "someone else changed it" from "my first try committed but its reply
        was lost".  psycopg's errors leave as :class:`OutboxError`.
        """
        self._check_open()
        lost_budget = self._pool.max_size
        other_budget = 1
        retried = False
        while True:
            used: list[_Conn] = []
            try:
                with self._pool.connection() as conn:
                    used.append(conn)
                    with conn.transaction():
                        return op(conn, retried)
            except psycopg.OperationalError as exc:
                if isinstance(exc, _NOT_RETRIED):
                    raise _storage_error(name, exc) from exc
                if used and used[0].closed and lost_budget > 0:
                    lost_budget -= 1
                elif other_budget > 0:
                    other_budget -= 1
                else:
                    raise _storage_error(name, exc) from exc
                logger.warning("PostgresOutbox %s failed (%s); trying again", name, exc)
                retried = True
            except psycopg.Error as exc:
                raise _storage_error(name, exc) from exc

    def _query(self, op: _Op[_T], name: str) -> _T:
        self._ensure_ready()
        return self._run(op, name)

    def _transition(
        self, stmt: sql.Composed, params: dict[str, Any], target: OutboxStatus, name: str
    ) -> bool:
        """A conditional single-row update; ``True`` when it changed the row.

        On a retry, finding the row already in ``target`` with ``updated_at = now``
        means the first try committed: that is reported as a change.
        """

        def op(conn: _Conn, retried: bool) -> bool:
            if conn.execute(stmt, params).rowcount:
                return True
            if not retried:
                return False
            return bool(self._rows(conn, self._sql.applied, params | {"target": str(target)}))

        return self._query(op, name)

    @staticmethod
    def _rows(conn: _Conn, stmt: sql.Composed, params: Mapping[str, Any]) -> list[dict[str, Any]]:
        """Run ``stmt`` and return its rows as dicts, whatever the connection's row factory."""
        with conn.cursor(row_factory=dict_row) as cur:
            cur.execute(stmt, params)
            return cur.fetchall()

    # --------------------------------------------------------------- protocol

    def add(
        self,
        message: PreparedMessage,
        *,
        now: datetime,
        expires_at: datetime,
        connection: Any = None,
    ) -> str:
        """Insert a ``pending`` message, due at ``now``, and ``NOTIFY`` the channel.

        Without ``connection`` it commits through the pool before returning.
        With ``connection`` (a ``psycopg.Connection`` the caller holds) it
        inserts through it *without committing*: the caller's commit queues the
        message (and delivers the ``NOTIFY``), a rollback discards both.  An
        autocommit connection outside ``conn.transaction()`` commits at once.
        Anything but a psycopg ``Connection`` raises ``TypeError``.
        """
        if connection is not None and not isinstance(connection, psycopg.Connection):
            raise TypeError(
                "PostgresOutbox.add(connection=...) needs a psycopg 3 Connection (with the "
                f"transaction to enqueue in), not {type(connection).__module__}."
                f"{type(connection).__qualname__}; for SQLAlchemy pass "
                "session.connection().connection.driver_connection"
            )
        self._check_open()
        entry_id = uuid.uuid4().hex
        params = {
            "id": entry_id,
            "sender": message.sender,
            "recipients": list(message.recipients),
            "message_id": message.message_id,
            "data": message.data,
            "smtputf8": message.smtputf8,
            "now": as_utc(now, "now"),
            "expires_at": as_utc(expires_at, "expires_at"),
        }
        self._ensure_ready()
        if connection is not None:
            # Inside the caller's transaction: no commit, no retry, no direct
            # wake-up (the row is invisible until they commit; NOTIFY wakes then).
            try:
                connection.execute(self._sql.insert, params)
                connection.execute(self._sql.notify_foreign)
            except psycopg.Error as exc:
                raise _storage_error("add", exc) from exc
            return entry_id

        def op(conn: _Conn, retried: bool) -> None:
            # The id is fixed before the first try, so a retry after a lost
            # commit finds its row (ON CONFLICT DO NOTHING) and adds no duplicate.
            conn.execute(self._sql.insert, params)
            conn.execute(self._sql.notify_own)

        self._run(op, "add")
        self._wake()
        return entry_id

    def _claim(
        self, *, now: datetime, owner: str, lease: timedelta, limit: int
    ) -> list[OutboxEntry]:
        # See the class docstring: SKIP LOCKED, and what a retried claim may leave leased.
        params = {"now": now, "owner": owner, "until": now + lease, "limit": limit}
        rows = self._query(lambda conn, _r: self._rows(conn, self._sql.claim, params), "claim")
        rows.sort(key=lambda r: (r["next_attempt_at"], r["created_at"], r["seq"]))
        return [_entry(r) for r in rows]

    def _finish(
        self,
        entry_id: str,
        owner: str,
        now: datetime,
        status: OutboxStatus,
        *,
        accepted: tuple[str, ...],
        refused: dict[str, tuple[int, str]] | None,
        error: str | None = None,
        set_error: bool = False,
    ) -> bool:
        params = self._result_params(entry_id, owner, now, accepted, refused)
        if status is OutboxStatus.SENT:
            return self._transition(self._sql.record_sent, params, status, "record_sent")
        params["error"] = error
        return self._transition(self._sql.record_failed, params, status, "record_failed")

    def record_retry(
        self,
        entry_id: str,
        *,
        owner: str,
        now: datetime,
        next_attempt_at: datetime,
        error: str,
        accepted: tuple[str, ...] = (),
        refused: dict[str, tuple[int, str]] | None = None,
        remaining: tuple[str, ...] | None = None,
    ) -> bool:
        """Back to ``pending`` until ``next_attempt_at``, if ``owner`` holds the lease."""
        check_remaining(remaining)
        params = self._result_params(entry_id, owner, now, accepted, refused)
        params |= {
            "next": as_utc(next_attempt_at, "next_attempt_at"),
            "error": error,
            "remaining": None if remaining is None else list(remaining),
        }
        return self._transition(
            self._sql.record_retry, params, OutboxStatus.PENDING, "record_retry"
        )

    def record_expired(
        self, entry_id: str, *, owner: str | None, now: datetime, error: str | None = None
    ) -> bool:
        """Mark ``expired``: a ``pending`` entry when ``owner`` is ``None``, else one it holds."""
        params = {"id": entry_id, "owner": owner, "now": as_utc(now, "now"), "error": error}
        return self._transition(
            self._sql.record_expired, params, OutboxStatus.EXPIRED, "record_expired"
        )

    def release(self, entry_id: str, *, owner: str, now: datetime) -> bool:
        """Give a claimed entry back untried: ``pending``, due ``now``, ``attempts - 1``."""
        params = {"id": entry_id, "owner": owner, "now": as_utc(now, "now")}
        return self._transition(self._sql.release, params, OutboxStatus.PENDING, "release")

    @staticmethod
    def _result_params(
        entry_id: str,
        owner: str,
        now: datetime,
        accepted: tuple[str, ...],
        refused: Mapping[str, tuple[int, str]] | None,
    ) -> dict[str, Any]:
        return {
            "id": entry_id,
            "owner": owner,
            "now": as_utc(now, "now"),
            "accepted": list(accepted),
            "refused": _refused_json(refused),
        }

    def expire_due(self, *, now: datetime) -> list[OutboxEntry]:
        """Mark due-to-expire ``pending`` entries and lapsed ``sending`` ones ``expired``.

        Rows locked by a concurrent claim are skipped (the next pass gets them).
        """
        params = {"now": as_utc(now, "now")}
        rows = self._query(
            lambda conn, _r: self._rows(conn, self._sql.expire_due, params), "expire_due"
        )
        rows.sort(key=lambda r: (r["created_at"], r["seq"]))
        return [_entry(r) for r in rows]

    def next_due(self, *, now: datetime) -> datetime | None:
        """The earliest next attempt, expiry or lease end among unfinished entries."""
        as_utc(now, "now")

        def op(conn: _Conn, retried: bool) -> datetime | None:
            return _utc(self._rows(conn, self._sql.next_due, {})[0]["due"])

        return self._query(op, "next_due")

    def get(self, entry_id: str) -> OutboxEntry | None:
        """The entry with this id, or ``None``."""
        rows = self._query(
            lambda conn, _r: self._rows(conn, self._sql.get, {"id": entry_id}), "get"
        )
        return _entry(rows[0]) if rows else None

    def counts(self) -> dict[OutboxStatus, int]:
        """How many entries have each status (every status is a key)."""

        def op(conn: _Conn, retried: bool) -> dict[OutboxStatus, int]:
            result = dict.fromkeys(OutboxStatus, 0)
            for row in self._rows(conn, self._sql.counts, {}):
                result[OutboxStatus(row["status"])] = row["n"]
            return result

        return self._query(op, "counts")

    def entries(self, *, status: OutboxStatus | None = None, limit: int = 100) -> list[OutboxEntry]:
        """Entries, newest first (by ``created_at``, then insertion), optionally of one status."""
        check_limit(limit)
        params = {"status": None if status is None else str(OutboxStatus(status)), "limit": limit}
        rows = self._query(lambda conn, _r: self._rows(conn, self._sql.entries, params), "entries")
        return [_entry(r) for r in rows]

    def retry(self, entry_id: str, *, now: datetime, expires_at: datetime | None = None) -> bool:
        """Put a ``failed`` or ``expired`` entry back to ``pending``, due ``now``.

        It gets a fresh expiration window: ``expires_at`` when given, otherwise
        ``now`` plus the window it was queued with (``expires_at - created_at``).
        """
        params = {
            "id": entry_id,
            "now": as_utc(now, "now"),
            "expires_at": None if expires_at is None else as_utc(expires_at, "expires_at"),
        }
        return self._transition(self._sql.retry, params, OutboxStatus.PENDING, "retry")

    def purge(
        self, *, before: datetime, statuses: tuple[OutboxStatus, ...] = FINISHED_STATUSES
    ) -> int:
        """Delete finished entries last updated before ``before``; return how many."""
        wanted = check_purge_statuses(statuses)
        params = {"before": as_utc(before, "before"), "statuses": [str(s) for s in wanted]}
        return self._query(lambda conn, _r: conn.execute(self._sql.purge, params).rowcount, "purge")

    # ---------------------------------------------------------------- wake-ups

    def subscribe(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` (from any thread, no arguments) after a message is added.

        Local adds call it directly after their commit.  Adds anywhere else
        (other processes, machines, or this process through an application's
        ``connection``) reach it through ``LISTEN``/``NOTIFY``: the first
        subscription starts a daemon listener thread with its own connection.
        When that connection breaks, the thread reconnects with backoff and
        then calls every callback once, since notifications may have been
        missed meanwhile.  A callback may occasionally be called with nothing new.
        """
        with self._lock:
            self._check_open()
            self._callbacks.append(callback)
            listener = self._listener
            start = listener is None
            if listener is None:
                listener = self._listener = _Listener(
                    self._listen_conninfo,
                    self._listen_kwargs,
                    self._sql.listen,
                    self._token,
                    self._wake,
                    self._listen_timeout,
                )
        if start:
            listener.start()

    def _wake(self) -> None:
        with self._lock:
            callbacks = list(self._callbacks)
        call_subscribers(callbacks)

    def close(self) -> None:
        """Stop the listener thread and close the owned pool (a caller's pool stays open)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            listener, self._listener = self._listener, None
        if listener is not None:
            listener.stop()
        if self._owns_pool:
            self._pool.close()


class _Statements:
    """Every SQL statement of one outbox table, composed once."""

    def __init__(self, table: str, schema: str | None, channel: str, token: str) -> None:
        t = sql.Identifier(schema, table) if schema else sql.Identifier(table)
        self.qualified = t
        cols = sql.SQL(", ").join(sql.Identifier(c) for c in _COLUMNS)

        parts = {
            "t": t,
            "cols": cols,
            "held": sql.SQL(_HELD),
            "clear_lease": sql.SQL(_CLEAR_LEASE),
            "finish": sql.SQL(
                f"{_MERGE_ACCEPTED}, refused = refused || %(refused)s, {_CLEAR_LEASE}"
            ),
        }

        def q(text: str) -> sql.Composed:
            return sql.SQL(text).format(**parts)

        self.ddl = [
            sql.SQL(stmt).format(
                t=t,
                idx=sql.Identifier(f"{table}_due_idx"),
                comment=sql.Literal(f"{_COMMENT_PREFIX}{SCHEMA_VERSION}"),
            )
            for stmt in _DDL
        ]
        digest = hashlib.sha256(f"smtpnotify:{schema}.{table}".encode()).digest()
        lock_key = sql.Literal(int.from_bytes(digest[:8], "big", signed=True))
        self.advisory_lock = sql.SQL("SELECT pg_advisory_xact_lock({})").format(lock_key)
        self.inspect = sql.SQL(
            "SELECT c.relkind::text AS relkind, obj_description(c.oid, 'pg_class') AS comment "
            "FROM pg_class c WHERE c.oid = to_regclass(%(name)s)"
        ).format()
        chan = sql.Identifier(channel)
        self.listen = sql.SQL("LISTEN {}").format(chan)
        self.notify_own = sql.SQL("NOTIFY {}, {}").format(chan, sql.Literal(token))
        self.notify_foreign = sql.SQL("NOTIFY {}").format(chan)
        self.insert = q(
            "INSERT INTO {t} (id, status, sender, recipients, message_id, data, smtputf8, "
            "created_at, expires_at, next_attempt_at, attempts, updated_at) "
            "VALUES (%(id)s, 'pending', %(sender)s, %(recipients)s::text[], %(message_id)s, "
            "%(data)s, %(smtputf8)s, %(now)s, %(expires_at)s, %(now)s, 0, %(now)s) "
            "ON CONFLICT (id) DO NOTHING"
        )
        self.claim = q(
            "UPDATE {t} SET status = 'sending', lease_owner = %(owner)s, lease_until = %(until)s, "
            "attempts = attempts + 1, updated_at = %(now)s "
            "WHERE id IN (SELECT id FROM {t} "
            "  WHERE ((status = 'pending' AND next_attempt_at <= %(now)s) "
            "      OR (status = 'sending' AND lease_until <= %(now)s)) "
            "    AND %(now)s < expires_at "
            "  ORDER BY next_attempt_at, created_at, seq LIMIT %(limit)s FOR UPDATE SKIP LOCKED) "
            "RETURNING {cols}"
        )
        self.record_sent = q(
            "UPDATE {t} SET status = 'sent', next_attempt_at = NULL, {finish} WHERE {held}"
        )
        self.record_retry = q(
            "UPDATE {t} SET status = 'pending', next_attempt_at = %(next)s, "
            "last_error = %(error)s, recipients = COALESCE(%(remaining)s::text[], recipients), "
            "{finish} WHERE {held}"
        )
        self.record_failed = q(
            "UPDATE {t} SET status = 'failed', next_attempt_at = NULL, last_error = %(error)s, "
            "{finish} WHERE {held}"
        )
        self.record_expired = q(
            "UPDATE {t} SET status = 'expired', next_attempt_at = NULL, "
            "last_error = COALESCE(%(error)s, last_error), {clear_lease} "
            "WHERE id = %(id)s AND CASE WHEN %(owner)s::text IS NULL "
            "  THEN status = 'pending' OR (status = 'sending' AND lease_until <= %(now)s) "
            "  ELSE status = 'sending' AND lease_owner = %(owner)s END"
        )
        self.release = q(
            "UPDATE {t} SET status = 'pending', next_attempt_at = %(now)s, "
            "attempts = GREATEST(attempts - 1, 0), {clear_lease} WHERE {held}"
        )
        self.retry = q(
            "UPDATE {t} SET status = 'pending', next_attempt_at = %(now)s, "
            "expires_at = COALESCE(%(expires_at)s::timestamptz, "
            "  %(now)s + (expires_at - created_at)), "
            "{clear_lease} WHERE id = %(id)s AND status IN ('failed', 'expired')"
        )
        self.applied = q(
            "SELECT 1 FROM {t} WHERE id = %(id)s AND status = %(target)s AND updated_at = %(now)s"
        )
        self.expire_due = q(
            "UPDATE {t} SET status = 'expired', next_attempt_at = NULL, "
            "lease_owner = NULL, lease_until = NULL, updated_at = %(now)s "
            "WHERE id IN (SELECT id FROM {t} "
            "  WHERE (status = 'pending' AND expires_at <= %(now)s) "
            "     OR (status = 'sending' AND lease_until <= %(now)s AND expires_at <= %(now)s) "
            "  FOR UPDATE SKIP LOCKED) "
            "RETURNING {cols}"
        )
        self.next_due = q(
            "SELECT min(CASE status WHEN 'pending' THEN LEAST(next_attempt_at, expires_at) "
            "WHEN 'sending' THEN lease_until END) AS due "
            "FROM {t} WHERE status IN ('pending', 'sending')"
        )
        self.get = q("SELECT {cols} FROM {t} WHERE id = %(id)s")
        self.counts = q("SELECT status, count(*) AS n FROM {t} GROUP BY status")
        self.entries = q(
            "SELECT {cols} FROM {t} WHERE %(status)s::text IS NULL OR status = %(status)s "
            "ORDER BY created_at DESC, seq DESC LIMIT %(limit)s"
        )
        self.purge = q(
            "DELETE FROM {t} WHERE status = ANY(%(statuses)s::text[]) AND updated_at < %(before)s"
        )


class _Listener:
    """A daemon thread holding one ``LISTEN`` connection, reconnecting with backoff."""

    _BACKOFF_START = 0.1
    _BACKOFF_MAX = 5.0
    _FIRST_CONNECT_WAIT = 5.0

    def __init__(
        self,
        conninfo: _ConnInfo,
        kwargs: _ConnKwargs,
        listen: sql.Composed,
        own_token: str,
        wake: Callable[[], None],
        poll: float,
    ) -> None:
        self._conninfo = conninfo
        self._kwargs = kwargs
        self._listen = listen
        self._token = own_token
        self._wake = wake
        self._poll = poll
        self._stop = threading.Event()
        self._listening = threading.Event()  # LISTEN ran at least once
        self._settled = threading.Event()  # ... or the thread ended
        self._state = threading.Lock()
        self._late = False
        self._backoff = self._BACKOFF_START
        self._thread = threading.Thread(
            target=self._loop, name="smtpnotify-pg-listener", daemon=True
        )

    def start(self) -> None:
        """Start the thread; wait (a little) until it listens, so no add after this is missed."""
        with self._state:
            if self._stop.is_set():  # closed before it started
                return
            self._thread.start()
        if not self._settled.wait(self._FIRST_CONNECT_WAIT):
            with self._state:
                # Not listening yet: wake everyone once it is, for what came meanwhile.
                self._late = not self._listening.is_set()

    def stop(self) -> None:
        """Stop the thread and close its connection."""
        with self._state:
            self._stop.set()
            started = self._thread.ident is not None
        if not started:
            return
        self._thread.join(self._poll + _CONNECT_DEFAULTS["connect_timeout"] + 5)
        if self._thread.is_alive():  # pragma: no cover - a connect hanging past its timeout
            logger.warning("PostgresOutbox listener thread did not stop in time")

    def _loop(self) -> None:
        try:
            while not self._stop.is_set():
                try:
                    self._session()
                except psycopg.Error as exc:
                    if self._stop.is_set():
                        break
                    logger.warning("PostgresOutbox listener connection lost (%s); retrying", exc)
                except Exception:  # pragma: no cover - a bug; keep the thread alive
                    logger.exception("PostgresOutbox listener failed; restarting")
                self._stop.wait(self._backoff)
                self._backoff = min(self._backoff * 2, self._BACKOFF_MAX)
        finally:
            self._settled.set()

    def _connect(self) -> _Conn:
        conninfo = self._conninfo() if callable(self._conninfo) else self._conninfo
        kwargs = dict((self._kwargs() if callable(self._kwargs) else self._kwargs) or {})
        try:
            given = conninfo_to_dict(conninfo) | kwargs
        except psycopg.ProgrammingError as exc:
            raise _redacted_conninfo_error(exc) from None
        kwargs |= {k: v for k, v in _CONNECT_DEFAULTS.items() if k not in given}
        kwargs["autocommit"] = True
        return psycopg.connect(conninfo, **kwargs)

    def _session(self) -> None:
        with self._connect() as conn:
            conn.execute(self._listen)
            self._backoff = self._BACKOFF_START
            with self._state:
                reconnect = self._listening.is_set() or self._late
                self._listening.set()
                self._settled.set()
            if reconnect:
                self._wake()  # notifications sent while we were away are lost
            while not self._stop.is_set():
                for note in conn.notifies(timeout=self._poll):
                    if note.payload != self._token:
                        self._wake()
