"""The embedded durable outbox: one SQLite file, shared by threads and processes.

Durability: the file is in WAL mode and every change is one ``BEGIN IMMEDIATE``
… ``COMMIT`` transaction.  ``add()`` commits with ``synchronous=FULL``: the new
message is on disk (the WAL fsynced) when it returns, so neither a killed process
nor a power loss loses it, unless the disk acknowledges writes it has not made.
The state changes of delivery (claims, outcomes) commit with
``synchronous=NORMAL`` by default: a killed process loses none of them, but a power
loss or OS crash may roll back the last few, and those messages are then delivered
again (at-least-once; nothing is lost).  ``fsync_outcomes=True`` makes them as
durable as ``add()``, at the price of one disk flush per delivered message.

Concurrency: one connection per :class:`SQLiteOutbox`, used under a lock by
the threads of a process; processes sharing the file serialise their writes on
SQLite's own lock (``BEGIN IMMEDIATE`` waits up to ``timeout`` seconds).  A claim
selects and updates inside one such transaction, so no two workers, in any
process, ever claim the same entry under a live lease.  SQLite's locks need a
local file system: never put the file on NFS/SMB.

Schema (version 1)::

    meta(key TEXT PRIMARY KEY, value TEXT)      application, schema_version
    entries(seq INTEGER PRIMARY KEY, id TEXT UNIQUE, status TEXT,
            sender TEXT, recipients TEXT (JSON), message_id TEXT, data BLOB,
            smtputf8 INTEGER, created_at/updated_at/expires_at/next_attempt_at/
            lease_until INTEGER (microseconds since 1970-01-01 UTC),
            attempts INTEGER, last_error TEXT, accepted TEXT (JSON),
            refused TEXT (JSON {address: [code, text]}), lease_owner TEXT)

``PRAGMA application_id`` is ``0x736D7470`` (``"smtp"``).  A file that is not an
SQLite database, an SQLite database that is not an outbox, or an outbox written
by a newer smtpnotify is refused with :class:`~smtpnotify.outbox.OutboxSchemaError`
and left untouched.
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import stat
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Literal

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
    join_accepted,
    join_refused,
)

__all__ = ["APPLICATION_ID", "SCHEMA_VERSION", "SQLiteOutbox"]

APPLICATION_ID = 0x736D7470
"""``PRAGMA application_id`` of an outbox file (the bytes ``"smtp"``)."""
SCHEMA_VERSION = 1
"""The schema version this module writes (``meta.schema_version``)."""
_MARKER = "smtpnotify.outbox"
_SQLITE_MAGIC = b"SQLite format 3\x00"

_SCHEMA = (
    """CREATE TABLE meta (
        key TEXT PRIMARY KEY,
        value TEXT NOT NULL
    )""",
    """CREATE TABLE entries (
        seq INTEGER PRIMARY KEY,
        id TEXT NOT NULL UNIQUE,
        status TEXT NOT NULL
            CHECK (status IN ('pending', 'sending', 'sent', 'failed', 'expired')),
        sender TEXT NOT NULL,
        recipients TEXT NOT NULL,
        message_id TEXT NOT NULL,
        data BLOB NOT NULL,
        smtputf8 INTEGER NOT NULL CHECK (smtputf8 IN (0, 1)),
        created_at INTEGER NOT NULL,
        updated_at INTEGER NOT NULL,
        expires_at INTEGER NOT NULL,
        next_attempt_at INTEGER,
        attempts INTEGER NOT NULL DEFAULT 0,
        last_error TEXT,
        accepted TEXT NOT NULL DEFAULT '[]',
        refused TEXT NOT NULL DEFAULT '{}',
        lease_owner TEXT,
        lease_until INTEGER
    )""",
    "CREATE INDEX entries_due ON entries (status, next_attempt_at, created_at)",
    "CREATE INDEX entries_expiry ON entries (status, expires_at)",
    "CREATE INDEX entries_lease ON entries (status, lease_until)",
    "CREATE INDEX entries_updated ON entries (status, updated_at)",
    "CREATE INDEX entries_created ON entries (created_at)",
    f"PRAGMA application_id = {APPLICATION_ID}",
    f"PRAGMA user_version = {SCHEMA_VERSION}",
)
"""The statements that create an outbox (in one transaction)."""

_COLUMNS = (
    "seq, id, status, sender, recipients, message_id, data, smtputf8, created_at, updated_at,"
    " expires_at, next_attempt_at, attempts, last_error, accepted, refused, lease_owner,"
    " lease_until"
)

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)


def _us(value: datetime) -> int:
    """Microseconds since the epoch (``value`` must be aware)."""
    return (value - _EPOCH) // _MICROSECOND


def _dt(value: int) -> datetime:
    return _EPOCH + timedelta(microseconds=value)


def _opt_dt(value: int | None) -> datetime | None:
    return None if value is None else _dt(value)


def _refused_json(refused: dict[str, tuple[int, str]]) -> str:
    return json.dumps({k: [code, text] for k, (code, text) in refused.items()}, ensure_ascii=False)


def _entry(row: sqlite3.Row, **changes: Any) -> OutboxEntry:
    """The entry a row holds, with ``changes`` (already-converted values) applied."""
    values: dict[str, Any] = {
        "id": str(row["id"]),
        "status": OutboxStatus(row["status"]),
        "message": PreparedMessage(
            sender=str(row["sender"]),
            recipients=tuple(json.loads(row["recipients"])),
            message_id=str(row["message_id"]),
            data=bytes(row["data"]),
            smtputf8=bool(row["smtputf8"]),
        ),
        "created_at": _dt(row["created_at"]),
        "expires_at": _dt(row["expires_at"]),
        "next_attempt_at": _opt_dt(row["next_attempt_at"]),
        "attempts": int(row["attempts"]),
        "last_error": row["last_error"],
        "accepted": tuple(json.loads(row["accepted"])),
        "refused": {k: (int(v[0]), str(v[1])) for k, v in json.loads(row["refused"]).items()},
        "lease_owner": row["lease_owner"],
        "lease_until": _opt_dt(row["lease_until"]),
        "updated_at": _dt(row["updated_at"]),
    }
    values.update(changes)
    return OutboxEntry(**values)


def _schema_state(conn: sqlite3.Connection, where: str) -> Literal["empty", "ours"]:
    """``"empty"`` (no tables, no marker), ``"ours"``, or :class:`OutboxSchemaError`.

    Only reads, all from one snapshot: another process may be creating the schema
    at this very moment, and reads from both sides of its commit would see tables
    without the marker.
    """
    if conn.in_transaction:
        return _schema_state_now(conn, where)
    conn.execute("BEGIN")
    try:
        return _schema_state_now(conn, where)
    finally:
        conn.execute("COMMIT")


def _schema_state_now(conn: sqlite3.Connection, where: str) -> Literal["empty", "ours"]:
    application_id = int(conn.execute("PRAGMA application_id").fetchone()[0])
    names = {
        str(row[0])
        for row in conn.execute(
            "SELECT name FROM sqlite_master WHERE name NOT LIKE 'sqlite\\_%' ESCAPE '\\'"
        )
    }
    if application_id == 0 and not names:
        return "empty"
    if application_id != APPLICATION_ID:
        found = ", ".join(sorted(names)[:5]) or "none"
        raise OutboxSchemaError(
            f"{where} is an SQLite database but not an smtpnotify outbox "
            f"(application_id {application_id:#x}, tables: {found}); refusing to touch it"
        )
    if not {"meta", "entries"} <= names:
        raise OutboxSchemaError(
            f"{where} is marked as an smtpnotify outbox but its tables are missing"
        )
    meta = {str(k): str(v) for k, v in conn.execute("SELECT key, value FROM meta")}
    if meta.get("application") != _MARKER:
        raise OutboxSchemaError(
            f"{where} is not an smtpnotify outbox (no marker in its meta table)"
        )
    try:
        version = int(meta["schema_version"])
    except (KeyError, ValueError):
        raise OutboxSchemaError(f"{where} has no valid outbox schema_version") from None
    if version > SCHEMA_VERSION:
        raise OutboxSchemaError(
            f"{where} holds outbox schema version {version}, written by a newer smtpnotify; "
            f"this one reads version {SCHEMA_VERSION} only: upgrade smtpnotify"
        )
    if version < SCHEMA_VERSION:  # pragma: no cover - no older version exists yet
        raise OutboxSchemaError(f"{where} holds outbox schema version {version}: no migration")
    return "ours"


def _inspect(path: Path, timeout: float) -> Literal["new", "ours"]:
    """Decide, without writing anything, whether ``path`` may be opened as an outbox."""
    try:
        info = path.stat()
    except FileNotFoundError:
        return "new"
    except OSError as exc:
        raise OutboxError(f"cannot open outbox {path}: {exc}") from exc
    if not stat.S_ISREG(info.st_mode):
        raise OutboxSchemaError(f"{path} is not a regular file")
    if info.st_size == 0:
        return "new"
    try:
        with path.open("rb") as f:
            header = f.read(100)
    except OSError as exc:
        raise OutboxError(f"cannot read outbox {path}: {exc}") from exc
    if len(header) < 100 or not header.startswith(_SQLITE_MAGIC):
        raise OutboxSchemaError(f"{path} is not an SQLite database; refusing to touch it")
    header_id = int.from_bytes(header[68:72], "big", signed=True)
    if header_id not in (0, APPLICATION_ID):
        raise OutboxSchemaError(
            f"{path} is an SQLite database of another application "
            f"(application_id {header_id:#x}); refusing to touch it"
        )
    # A read-only connection never writes the file (nor checkpoints a WAL into it).
    uri = path.resolve().as_uri() + "?mode=ro"
    try:
        ro = sqlite3.connect(uri, uri=True, timeout=timeout)
    except sqlite3.Error as exc:
        raise OutboxError(f"cannot open outbox {path}: {exc}") from exc
    try:
        state = _schema_state(ro, str(path))
    except sqlite3.OperationalError as exc:  # locked, cannot open, I/O
        raise OutboxError(f"cannot read outbox {path}: {exc}") from exc
    except sqlite3.DatabaseError as exc:  # not a database, corrupt
        raise OutboxSchemaError(f"{path} is not a readable SQLite database: {exc}") from exc
    finally:
        ro.close()
    return "new" if state == "empty" else "ours"


def _create_private(path: Path) -> bool:
    """Create ``path`` empty, readable by its owner only; ``False`` if it appeared meanwhile."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return False
    except OSError as exc:
        raise OutboxError(f"cannot create outbox {path}: {exc}") from exc
    os.close(fd)
    return True


def _fsync_directory(path: Path) -> None:
    """Make a new file's directory entry durable (best effort: not on every platform)."""
    with contextlib.suppress(OSError):
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


class SQLiteOutbox(BaseOutbox):
    """A durable :class:`~smtpnotify.outbox.Outbox` in one SQLite file.

    ``SQLiteOutbox(path)`` opens the outbox at ``path``, creating the file
    (mode 0600) and its schema when it does not exist or is empty.  Several
    threads may share one instance; several processes may open the same file.

    Args:
        path: the database file.  It must be on a local file system.
        timeout: seconds a write waits for another process's transaction to
            finish before :class:`~smtpnotify.outbox.OutboxError` (SQLite's
            busy timeout).
        fsync_outcomes: flush every delivery state change to disk as well, not
            only new messages (see the module's note on durability).

    Raises:
        OutboxSchemaError: the file is not an SQLite database, is another
            application's database, or holds a newer outbox schema.  The file
            is left exactly as it was.
        OutboxError: the file cannot be opened or created.

    Example::

        with SQLiteOutbox("/var/lib/myapp/outbox.db") as outbox:
            notifier = Notifier(config, outbox=outbox)

    Open the outbox after forking, in the process that uses it; an instance
    used in a forked child raises :class:`~smtpnotify.outbox.OutboxError`.

    A claim selects and updates in one ``BEGIN IMMEDIATE`` transaction, so it is
    atomic across threads and processes.
    """

    def __init__(
        self, path: str | os.PathLike[str], *, timeout: float = 10.0, fsync_outcomes: bool = False
    ) -> None:
        self._path = Path(path)
        self._timeout = float(timeout)
        self._outcome_sync = "FULL" if fsync_outcomes else "NORMAL"
        self._sync = "FULL"  # what _open leaves the connection at
        self._lock = threading.Lock()
        self._subscribers: list[Callable[[], None]] = []
        self._pid = os.getpid()
        self._conn: sqlite3.Connection | None = None
        state = _inspect(self._path, self._timeout)
        created = state == "new" and _create_private(self._path)
        self._conn = self._open()
        if created:
            _fsync_directory(self._path)

    def _open(self) -> sqlite3.Connection:
        try:
            conn = sqlite3.connect(
                self._path,
                timeout=self._timeout,
                isolation_level=None,
                check_same_thread=False,
            )
        except sqlite3.Error as exc:
            raise OutboxError(f"cannot open outbox {self._path}: {exc}") from exc
        where = str(self._path)
        try:
            conn.row_factory = sqlite3.Row
            _schema_state(conn, where)  # only reads: refuse a foreign file before any write
            mode = _enable_wal(conn, self._timeout)
            if mode.lower() != "wal":
                raise OutboxError(
                    f"outbox {where}: SQLite cannot use WAL mode here (journal_mode={mode})"
                )
            conn.execute("PRAGMA synchronous=FULL")
            conn.execute("BEGIN IMMEDIATE")
            try:
                # Again under the write lock: another process may have created it meanwhile.
                if _schema_state(conn, where) == "empty":
                    for statement in _SCHEMA:
                        conn.execute(statement)
                    conn.executemany(
                        "INSERT INTO meta (key, value) VALUES (?, ?)",
                        [("application", _MARKER), ("schema_version", str(SCHEMA_VERSION))],
                    )
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
        except sqlite3.OperationalError as exc:  # locked, cannot open, I/O
            conn.close()
            raise OutboxError(f"cannot open outbox {where}: {exc}") from exc
        except sqlite3.DatabaseError as exc:  # not a database, corrupt
            conn.close()
            raise OutboxSchemaError(f"{where} is not a usable outbox database: {exc}") from exc
        except BaseException:
            conn.close()
            raise
        return conn

    def __repr__(self) -> str:
        return f"<SQLiteOutbox {str(self._path)!r}{' closed' if self._conn is None else ''}>"

    @property
    def path(self) -> Path:
        """The database file."""
        return self._path

    # -- plumbing --------------------------------------------------------------------------

    def _connection(self) -> sqlite3.Connection:
        """The connection (call with the lock held)."""
        if self._conn is None:
            raise OutboxError(f"the outbox {self._path} is closed")
        if os.getpid() != self._pid:
            raise OutboxError(
                "an SQLiteOutbox cannot be used in a forked child process: "
                "open a new one in the child"
            )
        return self._conn

    @contextlib.contextmanager
    def _write(self, *, durable: bool = False) -> Iterator[sqlite3.Connection]:
        """One ``BEGIN IMMEDIATE`` … ``COMMIT`` transaction, under the lock.

        ``durable`` commits with ``synchronous=FULL`` whatever ``fsync_outcomes`` says.
        """
        with self._lock:
            conn = self._connection()
            try:
                sync = "FULL" if durable else self._outcome_sync
                if sync != self._sync:
                    conn.execute(f"PRAGMA synchronous={sync}")
                    self._sync = sync
                conn.execute("BEGIN IMMEDIATE")
                try:
                    yield conn
                    conn.execute("COMMIT")
                except BaseException:
                    if conn.in_transaction:
                        conn.execute("ROLLBACK")
                    raise
            except sqlite3.Error as exc:
                raise OutboxError(f"outbox {self._path}: {exc}") from exc

    @contextlib.contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            conn = self._connection()
            try:
                yield conn
            except sqlite3.Error as exc:
                raise OutboxError(f"outbox {self._path}: {exc}") from exc

    @staticmethod
    def _row(conn: sqlite3.Connection, entry_id: str) -> sqlite3.Row | None:
        row: sqlite3.Row | None = conn.execute(
            f"SELECT {_COLUMNS} FROM entries WHERE id = ?",  # noqa: S608 - constant columns
            (entry_id,),
        ).fetchone()
        return row

    @staticmethod
    def _held(row: sqlite3.Row | None, owner: str) -> bool:
        return row is not None and row["status"] == "sending" and row["lease_owner"] == owner

    # -- the protocol ----------------------------------------------------------------------

    def add(
        self,
        message: PreparedMessage,
        *,
        now: datetime,
        expires_at: datetime,
        connection: Any = None,
    ) -> str:
        """Store a new ``pending`` message, due at once; committed to disk when this returns.

        ``connection`` must be ``None`` (``TypeError`` otherwise): enqueueing in an
        application's transaction needs :class:`~smtpnotify.outbox.PostgresOutbox`.
        """
        if connection is not None:
            raise TypeError("SQLiteOutbox cannot enqueue inside an application's transaction")
        at = _us(as_utc(now, "now"))
        until = _us(as_utc(expires_at, "expires_at"))
        entry_id = uuid.uuid4().hex
        with self._write(durable=True) as conn:
            conn.execute(
                "INSERT INTO entries (id, status, sender, recipients, message_id, data, smtputf8,"
                " created_at, updated_at, expires_at, next_attempt_at, attempts)"
                " VALUES (?, 'pending', ?, ?, ?, ?, ?, ?, ?, ?, ?, 0)",
                (
                    entry_id,
                    message.sender,
                    json.dumps(list(message.recipients), ensure_ascii=False),
                    message.message_id,
                    bytes(message.data),
                    int(bool(message.smtputf8)),
                    at,
                    at,
                    until,
                    at,
                ),
            )
            subscribers = list(self._subscribers)
        call_subscribers(subscribers)
        return entry_id

    def _claim(
        self, *, now: datetime, owner: str, lease: timedelta, limit: int
    ) -> list[OutboxEntry]:
        # The selection and the update are one BEGIN IMMEDIATE transaction, so
        # the claim is atomic across threads and processes.
        at, until = _us(now), _us(now + lease)
        select = f"""
            SELECT * FROM (
                SELECT {_COLUMNS} FROM entries
                WHERE status = 'pending' AND next_attempt_at <= :now AND expires_at > :now
                ORDER BY next_attempt_at, created_at, seq LIMIT :limit)
            UNION ALL
            SELECT * FROM (
                SELECT {_COLUMNS} FROM entries
                WHERE status = 'sending' AND lease_until <= :now AND expires_at > :now
                ORDER BY next_attempt_at, created_at, seq LIMIT :limit)
            ORDER BY next_attempt_at, created_at, seq LIMIT :limit
        """  # noqa: S608 - constant columns
        with self._write() as conn:
            rows = conn.execute(select, {"now": at, "limit": limit}).fetchall()
            conn.executemany(
                "UPDATE entries SET status = 'sending', lease_owner = ?, lease_until = ?,"
                " attempts = attempts + 1, updated_at = ? WHERE seq = ?",
                [(owner, until, at, row["seq"]) for row in rows],
            )
        return [
            _entry(
                row,
                status=OutboxStatus.SENDING,
                lease_owner=owner,
                lease_until=_dt(until),
                attempts=int(row["attempts"]) + 1,
                updated_at=now,
            )
            for row in rows
        ]

    def _finish(
        self,
        entry_id: str,
        owner: str,
        now: datetime,
        status: OutboxStatus,
        *,
        accepted: Sequence[str],
        refused: dict[str, tuple[int, str]] | None,
        error: str | None = None,
    ) -> bool:
        at = _us(now)
        with self._write() as conn:
            row = self._row(conn, entry_id)
            if row is None or not self._held(row, owner):
                return False
            have = _entry(row)
            conn.execute(
                "UPDATE entries SET status = ?, accepted = ?, refused = ?, last_error = ?,"
                " next_attempt_at = NULL, lease_owner = NULL, lease_until = NULL,"
                " updated_at = ? WHERE seq = ?",
                (
                    status.value,
                    json.dumps(list(join_accepted(have.accepted, accepted)), ensure_ascii=False),
                    _refused_json(join_refused(have.refused, refused)),
                    have.last_error if error is None else error,
                    at,
                    row["seq"],
                ),
            )
            return True

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
        """Back to ``pending`` until ``next_attempt_at`` if ``owner`` holds the entry."""
        at = _us(as_utc(now, "now"))
        due = _us(as_utc(next_attempt_at, "next_attempt_at"))
        check_remaining(remaining)
        with self._write() as conn:
            row = self._row(conn, entry_id)
            if row is None or not self._held(row, owner):
                return False
            have = _entry(row)
            recipients = have.message.recipients if remaining is None else tuple(remaining)
            conn.execute(
                "UPDATE entries SET status = 'pending', recipients = ?, accepted = ?,"
                " refused = ?, last_error = ?, next_attempt_at = ?, lease_owner = NULL,"
                " lease_until = NULL, updated_at = ? WHERE seq = ?",
                (
                    json.dumps(list(recipients), ensure_ascii=False),
                    json.dumps(list(join_accepted(have.accepted, accepted)), ensure_ascii=False),
                    _refused_json(join_refused(have.refused, refused)),
                    error,
                    due,
                    at,
                    row["seq"],
                ),
            )
            return True

    def record_expired(
        self, entry_id: str, *, owner: str | None, now: datetime, error: str | None = None
    ) -> bool:
        """Mark ``expired`` if ``owner`` holds the entry (or nobody does, for ``owner=None``)."""
        at = _us(as_utc(now, "now"))
        with self._write() as conn:
            row = self._row(conn, entry_id)
            if row is None:
                return False
            if owner is None:
                free = row["status"] == "pending" or (
                    row["status"] == "sending" and row["lease_until"] <= at
                )
                if not free:
                    return False
            elif not self._held(row, owner):
                return False
            conn.execute(
                "UPDATE entries SET status = 'expired', last_error = coalesce(?, last_error),"
                " next_attempt_at = NULL, lease_owner = NULL, lease_until = NULL,"
                " updated_at = ? WHERE seq = ?",
                (error, at, row["seq"]),
            )
            return True

    def release(self, entry_id: str, *, owner: str, now: datetime) -> bool:
        """Give a claimed entry back untried if ``owner`` holds it."""
        at = _us(as_utc(now, "now"))
        with self._write() as conn:
            row = self._row(conn, entry_id)
            if not self._held(row, owner):
                return False
            assert row is not None
            conn.execute(
                "UPDATE entries SET status = 'pending', next_attempt_at = ?,"
                " attempts = max(attempts - 1, 0), lease_owner = NULL, lease_until = NULL,"
                " updated_at = ? WHERE seq = ?",
                (at, at, row["seq"]),
            )
            return True

    def expire_due(self, *, now: datetime) -> list[OutboxEntry]:
        """Expire every entry that can no longer be attempted; return them."""
        now = as_utc(now, "now")
        at = _us(now)
        where = (
            "(status = 'pending' AND expires_at <= :now)"
            " OR (status = 'sending' AND expires_at <= :now AND lease_until <= :now)"
        )
        with self._write() as conn:
            rows = conn.execute(
                f"SELECT {_COLUMNS} FROM entries WHERE {where} ORDER BY created_at, seq",  # noqa: S608
                {"now": at},
            ).fetchall()
            if rows:
                conn.execute(
                    "UPDATE entries SET status = 'expired', next_attempt_at = NULL,"  # noqa: S608
                    f" lease_owner = NULL, lease_until = NULL, updated_at = :now WHERE {where}",
                    {"now": at},
                )
        return [
            _entry(
                row,
                status=OutboxStatus.EXPIRED,
                next_attempt_at=None,
                lease_owner=None,
                lease_until=None,
                updated_at=now,
            )
            for row in rows
        ]

    def next_due(self, *, now: datetime) -> datetime | None:
        """The earliest time something becomes due or expires, or ``None``."""
        as_utc(now, "now")
        with self._read() as conn:
            value = conn.execute(
                "SELECT min(t) FROM ("
                " SELECT min(next_attempt_at) AS t FROM entries WHERE status = 'pending'"
                " UNION ALL SELECT min(expires_at) FROM entries WHERE status = 'pending'"
                " UNION ALL SELECT min(lease_until) FROM entries WHERE status = 'sending')"
            ).fetchone()[0]
        return _opt_dt(value)

    def get(self, entry_id: str) -> OutboxEntry | None:
        """The entry with this id, or ``None``."""
        with self._read() as conn:
            row = self._row(conn, entry_id)
            return None if row is None else _entry(row)

    def counts(self) -> dict[OutboxStatus, int]:
        """How many entries have each status (every status is a key)."""
        out = dict.fromkeys(OutboxStatus, 0)
        with self._read() as conn:
            for status, n in conn.execute("SELECT status, count(*) FROM entries GROUP BY status"):
                out[OutboxStatus(status)] = int(n)
        return out

    def entries(self, *, status: OutboxStatus | None = None, limit: int = 100) -> list[OutboxEntry]:
        """Entries, newest first, optionally of one status."""
        check_limit(limit)
        with self._read() as conn:
            if status is None:
                rows = conn.execute(
                    f"SELECT {_COLUMNS} FROM entries"  # noqa: S608 - constant columns
                    " ORDER BY created_at DESC, seq DESC LIMIT ?",
                    (limit,),
                ).fetchall()
            else:
                rows = conn.execute(
                    f"SELECT {_COLUMNS} FROM entries WHERE status = ?"  # noqa: S608
                    " ORDER BY created_at DESC, seq DESC LIMIT ?",
                    (OutboxStatus(status).value, limit),
                ).fetchall()
            return [_entry(row) for row in rows]

    def retry(self, entry_id: str, *, now: datetime, expires_at: datetime | None = None) -> bool:
        """Put a ``failed`` or ``expired`` entry back to ``pending``, due now."""
        at = _us(as_utc(now, "now"))
        new_expiry = None if expires_at is None else _us(as_utc(expires_at, "expires_at"))
        with self._write(durable=True) as conn:  # an operator re-queues it: as add()
            row = self._row(conn, entry_id)
            if row is None or row["status"] not in ("failed", "expired"):
                return False
            if new_expiry is None:
                new_expiry = at + (int(row["expires_at"]) - int(row["created_at"]))
            conn.execute(
                "UPDATE entries SET status = 'pending', next_attempt_at = ?, expires_at = ?,"
                " lease_owner = NULL, lease_until = NULL, updated_at = ? WHERE seq = ?",
                (at, new_expiry, at, row["seq"]),
            )
            return True

    def purge(
        self, *, before: datetime, statuses: tuple[OutboxStatus, ...] = FINISHED_STATUSES
    ) -> int:
        """Delete finished entries last updated before ``before``; return how many."""
        at = _us(as_utc(before, "before"))
        wanted = check_purge_statuses(statuses)
        if not wanted:
            return 0
        marks = ", ".join("?" * len(wanted))
        with self._write(durable=True) as conn:  # an operator re-queues it: as add()
            cursor = conn.execute(
                f"DELETE FROM entries WHERE status IN ({marks}) AND updated_at < ?",  # noqa: S608
                (*(s.value for s in wanted), at),
            )
            return int(cursor.rowcount)

    def subscribe(self, callback: Callable[[], None]) -> None:
        """Have ``callback`` called after each ``add`` *in this process*.

        Other processes adding to the same file are not seen: workers there
        must poll (``next_due``) as well.
        """
        with self._lock:
            self._subscribers.append(callback)

    def close(self) -> None:
        """Close the connection; later calls raise :class:`~smtpnotify.outbox.OutboxError`."""
        with self._lock:
            conn, self._conn = self._conn, None
            self._subscribers.clear()
        if conn is not None:
            conn.close()


def _enable_wal(conn: sqlite3.Connection, timeout: float) -> str:
    """Switch to WAL, waiting while another process holds the lock.

    SQLite reports "database is locked" for a journal-mode change at once, without
    calling the busy handler, when another connection is creating or switching the
    same new file; so wait here, up to the outbox's lock timeout.
    """
    give_up = time.monotonic() + timeout
    pause = 0.005
    while True:
        try:
            return str(conn.execute("PRAGMA journal_mode=WAL").fetchone()[0])
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() + pause > give_up:
                raise
        time.sleep(pause)
        pause = min(pause * 2, 0.1)
