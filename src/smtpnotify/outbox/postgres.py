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

import threading
import uuid
from collections.abc import Callable, Mapping
from datetime import datetime, timedelta
from typing import Any, ClassVar, TypeVar

try:
    import psycopg
    from psycopg import sql
    from psycopg_pool import ConnectionPool
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "smtpnotify.outbox.postgres needs psycopg 3 and psycopg-pool; "
        "install them with: pip install 'smtpnotify[postgres]'"
    ) from exc

# The pieces, each in its own module (all import psycopg; only this one is public):
# _pg_schema (DDL, identifiers, version check), _pg_statements (the SQL),
# _pg_rows (rows to entries), _pg_connect (connection parameters),
# _pg_retry (dead-connection retries), _pg_listener (the LISTEN thread).
from .._prepared import PreparedMessage
from ._base import (
    FINISHED_STATUSES,
    BaseOutbox,
    OutboxEntry,
    OutboxError,
    OutboxStatus,
    as_utc,
    call_subscribers,
    check_limit,
    check_purge_statuses,
    check_remaining,
)
from ._pg_connect import Conn, ConnInfo, ConnKwargs, pool_kwargs
from ._pg_listener import Listener
from ._pg_retry import Op, run_with_retry, storage_error
from ._pg_rows import entry_from_row, fetch_rows, refused_json, utc
from ._pg_schema import (
    MAX_SCHEMA_LEN,
    MAX_TABLE_LEN,
    SCHEMA_VERSION,
    channel_name,
    check_current,
    create_or_check,
    describe,
    identifier,
    schema_sql,
)
from ._pg_statements import Statements

__all__ = ["PostgresOutbox"]

_T = TypeVar("_T")


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
        self._table = identifier(table, "table", MAX_TABLE_LEN)
        self._schema = None if schema is None else identifier(schema, "schema", MAX_SCHEMA_LEN)
        self._create = create
        self._listen_timeout = listen_timeout
        self._lock = threading.Lock()
        self._ready = False
        self._closed = False
        self._callbacks: list[Callable[[], None]] = []
        self._listener: Listener | None = None
        # Our own NOTIFY payload, so the listener skips what add() already announced.
        self._token = uuid.uuid4().hex
        self._channel = channel_name(self._table, self._schema)
        self._sql = Statements(self._table, self._schema, self._channel, self._token)

        if pool is not None:
            if not isinstance(pool, ConnectionPool):
                raise TypeError(f"pool must be a psycopg_pool.ConnectionPool, not {type(pool)!r}")
            self._pool = pool
            self._owns_pool = False
            # The listener opens its own connection like the pool's (psycopg_pool
            # also allows callables that compute these at each connect).
            self._listen_conninfo: ConnInfo = pool.conninfo
            self._listen_kwargs: ConnKwargs = pool.kwargs
        else:
            assert conninfo is not None
            if pool_size < 1:
                raise ValueError("pool_size must be at least 1")
            kwargs = pool_kwargs(conninfo)
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

    @classmethod
    def schema_sql(cls, *, table: str = "smtpnotify_outbox", schema: str | None = None) -> str:
        """The DDL that :meth:`create_schema` runs, for a DBA's migration tool.

        Apply it as is (it is idempotent); the ``COMMENT`` carries the schema
        version the outbox checks on first use.
        """
        return schema_sql(table, schema)

    def create_schema(self) -> None:
        """Create the table and index if missing, stamped with the schema version.

        Idempotent and safe to run from many workers at once (serialised by an
        advisory lock); a table already at this version is left untouched, so
        only the first run needs ``CREATE`` on the schema.  Raises
        :class:`OutboxSchemaError` when a table of that name exists but is not
        an smtpnotify outbox, or is of a newer version.
        """
        self._check_open()

        def op(conn: Conn, retried: bool) -> None:
            create_or_check(conn, self._sql, describe(self._table, self._schema))

        self._run(op, "create_schema")
        with self._lock:
            self._ready = True

    def _ensure_ready(self) -> None:
        if self._ready:
            return
        if self._create:
            self.create_schema()
            return

        def op(conn: Conn, retried: bool) -> None:
            check_current(conn, self._sql, describe(self._table, self._schema))

        self._run(op, "schema check")
        with self._lock:
            self._ready = True

    # --------------------------------------------------------------- plumbing

    def _check_open(self) -> None:
        if self._closed:
            raise OutboxError("this PostgresOutbox is closed")

    def _run(self, op: Op[_T], name: str) -> _T:
        """Run ``op`` in one transaction, again on another connection if its own died.

        See :func:`~smtpnotify.outbox._pg_retry.run_with_retry`.
        """
        self._check_open()
        return run_with_retry(self._pool, op, name)

    def _query(self, op: Op[_T], name: str) -> _T:
        self._ensure_ready()
        return self._run(op, name)

    def _transition(
        self, stmt: sql.Composed, params: dict[str, Any], target: OutboxStatus, name: str
    ) -> bool:
        """A conditional single-row update; ``True`` when it changed the row.

        On a retry, finding the row already in ``target`` with ``updated_at = now``
        means the first try committed: that is reported as a change.
        """

        def op(conn: Conn, retried: bool) -> bool:
            if conn.execute(stmt, params).rowcount:
                return True
            if not retried:
                return False
            return bool(fetch_rows(conn, self._sql.applied, params | {"target": str(target)}))

        return self._query(op, name)

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
                raise storage_error("add", exc) from exc
            return entry_id

        def op(conn: Conn, retried: bool) -> None:
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
        rows = self._query(lambda conn, _r: fetch_rows(conn, self._sql.claim, params), "claim")
        rows.sort(key=lambda r: (r["next_attempt_at"], r["created_at"], r["seq"]))
        return [entry_from_row(r) for r in rows]

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
            "refused": refused_json(refused),
        }

    def expire_due(self, *, now: datetime) -> list[OutboxEntry]:
        """Mark due-to-expire ``pending`` entries and lapsed ``sending`` ones ``expired``.

        Rows locked by a concurrent claim are skipped (the next pass gets them).
        """
        params = {"now": as_utc(now, "now")}
        rows = self._query(
            lambda conn, _r: fetch_rows(conn, self._sql.expire_due, params), "expire_due"
        )
        rows.sort(key=lambda r: (r["created_at"], r["seq"]))
        return [entry_from_row(r) for r in rows]

    def next_due(self, *, now: datetime) -> datetime | None:
        """The earliest next attempt, expiry or lease end among unfinished entries."""
        as_utc(now, "now")

        def op(conn: Conn, retried: bool) -> datetime | None:
            return utc(fetch_rows(conn, self._sql.next_due, {})[0]["due"])

        return self._query(op, "next_due")

    def get(self, entry_id: str) -> OutboxEntry | None:
        """The entry with this id, or ``None``."""
        rows = self._query(
            lambda conn, _r: fetch_rows(conn, self._sql.get, {"id": entry_id}), "get"
        )
        return entry_from_row(rows[0]) if rows else None

    def counts(self) -> dict[OutboxStatus, int]:
        """How many entries have each status (every status is a key)."""

        def op(conn: Conn, retried: bool) -> dict[OutboxStatus, int]:
            result = dict.fromkeys(OutboxStatus, 0)
            for row in fetch_rows(conn, self._sql.counts, {}):
                result[OutboxStatus(row["status"])] = row["n"]
            return result

        return self._query(op, "counts")

    def entries(self, *, status: OutboxStatus | None = None, limit: int = 100) -> list[OutboxEntry]:
        """Entries, newest first (by ``created_at``, then insertion), optionally of one status."""
        check_limit(limit)
        params = {"status": None if status is None else str(OutboxStatus(status)), "limit": limit}
        rows = self._query(lambda conn, _r: fetch_rows(conn, self._sql.entries, params), "entries")
        return [entry_from_row(r) for r in rows]

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
                listener = self._listener = Listener(
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
