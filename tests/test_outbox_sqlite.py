"""SQLiteOutbox: the conformance suite, durability, refusals, and several processes."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import sqlite3
import stat
import subprocess
import sys
import tempfile
import textwrap
from dataclasses import replace
from datetime import timedelta
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    initialize,
    invariant,
    rule,
)

import smtpnotify
from smtpnotify._prepared import PreparedMessage
from smtpnotify.outbox import (
    MemoryOutbox,
    Outbox,
    OutboxEntry,
    OutboxError,
    OutboxSchemaError,
    OutboxStatus,
    SQLiteOutbox,
)
from smtpnotify.outbox.sqlite import APPLICATION_ID, SCHEMA_VERSION
from smtpnotify.testing.conformance import LEASE, T0, WINDOW, OutboxConformance, make_message

# The directory holding the ``smtpnotify`` package, for child processes.
PACKAGE_ROOT = str(Path(smtpnotify.__file__).resolve().parent.parent)


class TestSQLiteOutbox(OutboxConformance):
    """Every protocol rule, on an SQLite file (and a second handle on it)."""

    def make_outbox(self, tmp_path: Path) -> Outbox:
        return SQLiteOutbox(tmp_path / "outbox.db")

    def reopen(self, tmp_path: Path) -> Outbox | None:
        return SQLiteOutbox(tmp_path / "outbox.db")


# -- helpers -------------------------------------------------------------------------------


def snapshot(directory: Path) -> dict[str, str]:
    """Name → SHA-256 of every file in ``directory``."""
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(directory.iterdir())
        if p.is_file()
    }


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = PACKAGE_ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return env


# -- creating and opening ------------------------------------------------------------------


def test_new_file_gets_schema_marker_and_private_mode(tmp_path: Path) -> None:
    path = tmp_path / "new.db"
    with SQLiteOutbox(path) as outbox:
        assert outbox.path == path
        assert outbox._conn is not None
        # The durability settings, on the outbox's own connection.
        assert outbox._conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert outbox._conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    with contextlib.closing(sqlite3.connect(path)) as db:
        assert db.execute("PRAGMA application_id").fetchone()[0] == APPLICATION_ID
        assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        meta = dict(db.execute("SELECT key, value FROM meta").fetchall())
        assert meta == {"application": "smtpnotify.outbox", "schema_version": str(SCHEMA_VERSION)}
        indexes = {
            row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'index'")
        }
        assert "entries_due" in indexes


def test_empty_file_is_initialised(tmp_path: Path) -> None:
    path = tmp_path / "empty.db"
    path.touch()
    with SQLiteOutbox(path) as outbox:
        outbox.add(make_message(), now=T0, expires_at=T0 + WINDOW)
    with SQLiteOutbox(path) as outbox:
        assert outbox.counts()[OutboxStatus.PENDING] == 1


def test_empty_sqlite_database_is_initialised(tmp_path: Path) -> None:
    path = tmp_path / "blank.db"
    with contextlib.closing(sqlite3.connect(path)) as db:
        db.execute("CREATE TABLE t (x)")
        db.execute("DROP TABLE t")
        db.commit()
    assert path.stat().st_size > 0
    with SQLiteOutbox(path) as outbox:
        assert outbox.counts()[OutboxStatus.PENDING] == 0


def test_persists_across_reopen(tmp_path: Path) -> None:
    path = tmp_path / "outbox.db"
    message = PreparedMessage(
        sender="noreply@example.com",
        recipients=("ü@example.com", "b@example.com"),
        message_id="<persist@example.com>",
        data=bytes(range(256)) * 100,
        smtputf8=True,
    )
    with SQLiteOutbox(path) as outbox:
        kept = outbox.add(message, now=T0, expires_at=T0 + WINDOW)
        sent = outbox.add(make_message(2), now=T0 + timedelta(seconds=1), expires_at=T0 + WINDOW)
        outbox.claim(now=T0 + timedelta(seconds=2), owner="w1", lease=LEASE, limit=2)
        assert outbox.record_retry(
            kept,
            owner="w1",
            now=T0 + timedelta(seconds=3),
            next_attempt_at=T0 + timedelta(minutes=5),
            error="451 4.7.1 greylisted",
            accepted=("b@example.com",),
            refused={"x@example.com": (550, "no such user")},
            remaining=("ü@example.com",),
        )
        assert outbox.record_sent(
            sent, owner="w1", now=T0 + timedelta(seconds=3), accepted=(), refused={}
        )
        before = [outbox.get(kept), outbox.get(sent)]
        counts = outbox.counts()
    with SQLiteOutbox(path) as outbox:
        assert [outbox.get(kept), outbox.get(sent)] == before
        assert outbox.counts() == counts
        entry = outbox.get(kept)
        assert entry is not None
        assert entry.message.data == message.data
        assert entry.refused == {"x@example.com": (550, "no such user")}


def test_path_may_be_a_string(tmp_path: Path) -> None:
    with SQLiteOutbox(str(tmp_path / "s.db"), timeout=1) as outbox:
        assert isinstance(outbox.path, Path)


# -- refusing what is not ours, without touching it ----------------------------------------


def test_refuses_another_applications_database(tmp_path: Path) -> None:
    path = tmp_path / "app.db"
    with contextlib.closing(sqlite3.connect(path)) as db:
        db.execute("CREATE TABLE users (id INTEGER PRIMARY KEY, name TEXT)")
        db.execute("INSERT INTO users (name) VALUES ('alice')")
        db.commit()
    before = snapshot(tmp_path)
    with pytest.raises(OutboxSchemaError, match="not an smtpnotify outbox"):
        SQLiteOutbox(path)
    assert snapshot(tmp_path) == before


def test_refuses_another_applications_wal_database(tmp_path: Path) -> None:
    path = tmp_path / "app.db"
    with contextlib.closing(sqlite3.connect(path)) as db:
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("CREATE TABLE entries (x)")  # even with a table of the same name
        db.commit()
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    with pytest.raises(OutboxSchemaError, match="not an smtpnotify outbox"):
        SQLiteOutbox(path)
    assert hashlib.sha256(path.read_bytes()).hexdigest() == digest


def test_refuses_a_database_with_another_application_id(tmp_path: Path) -> None:
    path = tmp_path / "other.db"
    with contextlib.closing(sqlite3.connect(path)) as db:
        db.execute("PRAGMA application_id = 1234")
        db.execute("CREATE TABLE t (x)")
        db.execute("DROP TABLE t")
        db.commit()
    before = snapshot(tmp_path)
    with pytest.raises(OutboxSchemaError, match="another application"):
        SQLiteOutbox(path)
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize(
    "content",
    [
        os.urandom(8192),
        b"hello, this is a text file\n" * 10,
        b"SQLite format 3\x00",  # a header and nothing after it
        b"SQLite format 3\x00" + b"\xff" * 4080,  # the magic, then garbage
    ],
    ids=["random", "text", "truncated-header", "garbage-after-magic"],
)
def test_refuses_a_file_that_is_not_a_database(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "notes.db"
    path.write_bytes(content)
    before = snapshot(tmp_path)
    with pytest.raises(OutboxSchemaError, match="SQLite database"):
        SQLiteOutbox(path)
    assert snapshot(tmp_path) == before
    assert path.read_bytes() == content


def test_refuses_a_newer_schema(tmp_path: Path) -> None:
    path = tmp_path / "outbox.db"
    with SQLiteOutbox(path) as outbox:
        entry_id = outbox.add(make_message(), now=T0, expires_at=T0 + WINDOW)
    with contextlib.closing(sqlite3.connect(path)) as db:
        db.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", (SCHEMA_VERSION + 1,))
        db.commit()
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    with pytest.raises(OutboxSchemaError, match=rf"version {SCHEMA_VERSION + 1}.*newer"):
        SQLiteOutbox(path)
    assert hashlib.sha256(path.read_bytes()).hexdigest() == digest
    # Put the version back: the data was never touched.
    with contextlib.closing(sqlite3.connect(path)) as db:
        db.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", (SCHEMA_VERSION,))
        db.commit()
    with SQLiteOutbox(path) as outbox:
        assert outbox.get(entry_id) is not None


def test_refuses_a_marked_file_without_its_meta(tmp_path: Path) -> None:
    path = tmp_path / "outbox.db"
    with SQLiteOutbox(path):
        pass
    with contextlib.closing(sqlite3.connect(path)) as db:
        db.execute("DELETE FROM meta WHERE key = 'application'")
        db.commit()
    with pytest.raises(OutboxSchemaError, match="marker"):
        SQLiteOutbox(path)


def test_refuses_a_directory(tmp_path: Path) -> None:
    with pytest.raises(OutboxSchemaError, match="not a regular file"):
        SQLiteOutbox(tmp_path)


def test_missing_directory_is_an_outbox_error(tmp_path: Path) -> None:
    with pytest.raises(OutboxError, match="cannot create"):
        SQLiteOutbox(tmp_path / "no" / "such" / "dir" / "outbox.db")


# -- errors at work ------------------------------------------------------------------------


def test_closed_outbox_raises(tmp_path: Path) -> None:
    outbox = SQLiteOutbox(tmp_path / "outbox.db")
    outbox.close()
    with pytest.raises(OutboxError, match="closed"):
        outbox.add(make_message(), now=T0, expires_at=T0 + WINDOW)
    with pytest.raises(OutboxError, match="closed"):
        outbox.counts()
    assert "closed" in repr(outbox)


def test_a_locked_file_times_out_with_an_outbox_error(tmp_path: Path) -> None:
    path = tmp_path / "outbox.db"
    with SQLiteOutbox(path, timeout=0.05) as outbox:
        entry_id = outbox.add(make_message(), now=T0, expires_at=T0 + WINDOW)
        with contextlib.closing(sqlite3.connect(path, isolation_level=None)) as other:
            other.execute("BEGIN IMMEDIATE")  # another process holds the write lock
            with pytest.raises(OutboxError, match="locked"):
                outbox.add(make_message(1), now=T0, expires_at=T0 + WINDOW)
            with pytest.raises(OutboxError, match="locked"):
                outbox.claim(now=T0, owner="w1", lease=LEASE)
            assert outbox.get(entry_id) is not None  # readers are not blocked (WAL)
            other.execute("ROLLBACK")
        assert outbox.claim(now=T0, owner="w1", lease=LEASE)[0].id == entry_id
        assert outbox.counts()[OutboxStatus.PENDING] == 0  # the failed add left nothing


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_refuses_use_in_a_forked_child(tmp_path: Path) -> None:
    with SQLiteOutbox(tmp_path / "outbox.db") as outbox:
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child reports through its exit status
            code = 3
            try:
                outbox.counts()
            except OutboxError:
                code = 0
            except BaseException:
                code = 4
            os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert outbox.counts()[OutboxStatus.PENDING] == 0  # the parent still works


# -- several processes, kill -9 ------------------------------------------------------------

CLAIMER = textwrap.dedent(
    """
    import json, sys, time
    from datetime import UTC, datetime, timedelta
    from smtpnotify.outbox import SQLiteOutbox

    path, owner = sys.argv[1], sys.argv[2]
    now = datetime(2030, 1, 1, 12, 0, tzinfo=UTC)
    mine = []
    with SQLiteOutbox(path, timeout=60) as box:
        print("ready", flush=True)
        sys.stdin.readline()
        while True:
            batch = box.claim(now=now, owner=owner, lease=timedelta(minutes=5), limit=2)
            if not batch:
                break
            for entry in batch:
                mine.append(entry.id)
                time.sleep(0.001)  # "delivering" it, outside any transaction
                assert box.record_sent(entry.id, owner=owner, now=now, accepted=(), refused={})
    print(json.dumps(mine), flush=True)
    """
)


def test_processes_never_claim_one_entry_twice(tmp_path: Path) -> None:
    path = tmp_path / "outbox.db"
    with SQLiteOutbox(path) as outbox:
        ids = {outbox.add(make_message(n), now=T0, expires_at=T0 + WINDOW) for n in range(300)}
    results: list[list[str]] = []
    with contextlib.ExitStack() as stack:
        procs = [
            stack.enter_context(
                subprocess.Popen(
                    [sys.executable, "-c", CLAIMER, str(path), f"proc-{i}"],
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    text=True,
                    env=child_env(),
                )
            )
            for i in range(3)
        ]
        for proc in procs:
            assert proc.stdout is not None
            assert proc.stdout.readline().strip() == "ready", proc.stderr
        for proc in procs:  # start them together
            assert proc.stdin is not None
            proc.stdin.write("go\n")
            proc.stdin.flush()
        for proc in procs:
            out, err = proc.communicate(timeout=90)
            assert proc.returncode == 0, err
            results.append(json.loads(out.strip().splitlines()[-1]))
    claimed = [entry_id for mine in results for entry_id in mine]
    assert len(claimed) == len(set(claimed)), "an entry was claimed by two processes"
    assert set(claimed) == ids
    spread = [len(mine) for mine in results]
    assert sum(1 for n in spread if n) >= 2, f"the processes did not overlap at all: {spread}"
    with SQLiteOutbox(path) as outbox:
        assert outbox.counts()[OutboxStatus.SENT] == 300


OPENER = textwrap.dedent(
    """
    import sys
    from datetime import UTC, datetime, timedelta
    from smtpnotify.outbox import SQLiteOutbox
    from smtpnotify._prepared import PreparedMessage

    print("ready", flush=True)
    sys.stdin.readline()
    now = datetime(2030, 1, 1, 12, 0, tzinfo=UTC)
    with SQLiteOutbox(sys.argv[1], timeout=60) as box:
        for n in range(10):
            message = PreparedMessage("a@example.com", ("b@example.com",), f"<{n}@x>", b"x")
            box.add(message, now=now, expires_at=now + timedelta(days=1))
    """
)


def test_processes_creating_one_new_file_at_once(tmp_path: Path) -> None:
    path = tmp_path / "fresh.db"
    with contextlib.ExitStack() as stack:
        procs = [
            stack.enter_context(
                subprocess.Popen(
                    [sys.executable, "-c", OPENER, str(path)],
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    text=True,
                    env=child_env(),
                )
            )
            for _ in range(4)
        ]
        for proc in procs:
            assert proc.stdout is not None
            assert proc.stdout.readline().strip() == "ready"
        for proc in procs:
            assert proc.stdin is not None
            proc.stdin.write("go\n")
            proc.stdin.flush()
        for proc in procs:
            _, err = proc.communicate(timeout=90)
            assert proc.returncode == 0, err
    with SQLiteOutbox(path) as outbox:
        assert outbox.counts()[OutboxStatus.PENDING] == 40
    with contextlib.closing(sqlite3.connect(path)) as db:
        assert db.execute("SELECT count(*) FROM meta").fetchone()[0] == 2


ADDER = textwrap.dedent(
    """
    import sys, time
    from datetime import UTC, datetime, timedelta
    from smtpnotify.outbox import SQLiteOutbox
    from smtpnotify._prepared import PreparedMessage

    now = datetime(2030, 1, 1, 12, 0, tzinfo=UTC)
    box = SQLiteOutbox(sys.argv[1])
    for n in range(5):
        data = b"Subject: n\\r\\n\\r\\n" + bytes(range(256)) * (n + 1)
        message = PreparedMessage("a@example.com", ("b@example.com",), f"<{n}@x>", data)
        print(box.add(message, now=now, expires_at=now + timedelta(days=1)), flush=True)
    time.sleep(60)  # killed long before
    """
)


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL")
def test_message_survives_sigkill_right_after_add(tmp_path: Path) -> None:
    path = tmp_path / "outbox.db"
    ids: list[str] = []
    with subprocess.Popen(
        [sys.executable, "-c", ADDER, str(path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=child_env(),
    ) as proc:
        assert proc.stdout is not None
        for _ in range(5):
            line = proc.stdout.readline().strip()
            assert line, proc.stderr.read() if proc.stderr else ""
            ids.append(line)
        os.kill(proc.pid, signal.SIGKILL)  # no close(), no checkpoint, no atexit
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    assert (tmp_path / "outbox.db-wal").exists()  # the data is in the WAL, not yet checkpointed
    with SQLiteOutbox(path) as outbox:
        for n, entry_id in enumerate(ids):
            entry = outbox.get(entry_id)
            assert entry is not None
            assert entry.message.message_id == f"<{n}@x>"
            assert entry.message.data == b"Subject: n\r\n\r\n" + bytes(range(256)) * (n + 1)
            assert entry.status is OutboxStatus.PENDING


# -- property tests ------------------------------------------------------------------------

addresses = st.builds(
    "{}@{}".format,
    st.text(st.characters(blacklist_categories=("Cs", "Cc")), min_size=1, max_size=12),
    st.sampled_from(["example.com", "xn--bcher-kva.example", "例子.example"]),
)
messages = st.builds(
    PreparedMessage,
    sender=addresses,
    recipients=st.lists(addresses, min_size=1, max_size=4, unique=True).map(tuple),
    message_id=st.text(min_size=1, max_size=40).map(lambda s: f"<{s}>"),
    data=st.binary(max_size=2048),
    smtputf8=st.booleans(),
)


def test_any_message_roundtrips(tmp_path: Path) -> None:
    with SQLiteOutbox(tmp_path / "outbox.db") as outbox:

        @settings(max_examples=60, deadline=None, database=None)
        @given(message=messages)
        def roundtrip(message: PreparedMessage) -> None:
            entry_id = outbox.add(message, now=T0, expires_at=T0 + WINDOW)
            entry = outbox.get(entry_id)
            assert entry is not None
            assert entry.message == message

        roundtrip()


def _same(a: OutboxEntry | None, b: OutboxEntry | None, ids: dict[str, str]) -> None:
    """``a`` (memory) equals ``b`` (SQLite) once ids are mapped."""
    if a is None or b is None:
        assert a is b
        return
    assert replace(a, id=ids[a.id]) == b


class SameAsMemory(RuleBasedStateMachine):
    """SQLiteOutbox and MemoryOutbox, given the same calls, give the same answers."""

    entries = Bundle("entries")

    def __init__(self) -> None:
        super().__init__()
        self._stack = contextlib.ExitStack()
        directory = self._stack.enter_context(tempfile.TemporaryDirectory())
        self.memory = self._stack.enter_context(MemoryOutbox())
        self.sqlite = self._stack.enter_context(SQLiteOutbox(Path(directory) / "o.db"))
        self.ids: dict[str, str] = {}  # memory id -> sqlite id
        self.now = T0

    def teardown(self) -> None:
        self._stack.close()

    @initialize()
    def start(self) -> None:
        self.now = T0

    @rule(step=st.integers(0, 600))
    def tick(self, step: int) -> None:
        self.now += timedelta(seconds=step)

    @rule(target=entries, n=st.integers(0, 9), hours=st.integers(0, 3))
    def add(self, n: int, hours: int) -> str:
        window = timedelta(hours=hours, minutes=1)
        a = self.memory.add(make_message(n), now=self.now, expires_at=self.now + window)
        b = self.sqlite.add(make_message(n), now=self.now, expires_at=self.now + window)
        self.ids[a] = b
        return a

    @rule(owner=st.sampled_from(["w1", "w2"]), limit=st.integers(1, 3))
    def claim(self, owner: str, limit: int) -> None:
        a = self.memory.claim(now=self.now, owner=owner, lease=LEASE, limit=limit)
        b = self.sqlite.claim(now=self.now, owner=owner, lease=LEASE, limit=limit)
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            _same(x, y, self.ids)

    @rule(entry=entries, owner=st.sampled_from(["w1", "w2"]), outcome=st.integers(0, 4))
    def record(self, entry: str, owner: str, outcome: int) -> None:
        results = []
        for box, entry_id in ((self.memory, entry), (self.sqlite, self.ids[entry])):
            if outcome == 0:
                ok = box.record_sent(
                    entry_id,
                    owner=owner,
                    now=self.now,
                    accepted=("user0@example.com",),
                    refused={"z@example.com": (550, "no")},
                )
            elif outcome == 1:
                ok = box.record_retry(
                    entry_id,
                    owner=owner,
                    now=self.now,
                    next_attempt_at=self.now + timedelta(minutes=10),
                    error="451",
                    accepted=("a@example.com",),
                    remaining=("r@example.com",),
                )
            elif outcome == 2:
                ok = box.record_failed(entry_id, owner=owner, now=self.now, error="550")
            elif outcome == 3:
                ok = box.record_expired(
                    entry_id, owner=None if owner == "w2" else owner, now=self.now
                )
            else:
                ok = box.release(entry_id, owner=owner, now=self.now)
            results.append(ok)
        assert results[0] == results[1]

    @rule(entry=entries)
    def retry(self, entry: str) -> None:
        a = self.memory.retry(entry, now=self.now)
        b = self.sqlite.retry(self.ids[entry], now=self.now)
        assert a == b

    @rule()
    def expire_due(self) -> None:
        a = self.memory.expire_due(now=self.now)
        b = self.sqlite.expire_due(now=self.now)
        assert sorted(self.ids[e.id] for e in a) == sorted(e.id for e in b)

    @rule()
    def purge(self) -> None:
        before = self.now - timedelta(minutes=30)
        assert self.memory.purge(before=before) == self.sqlite.purge(before=before)

    @invariant()
    def same_state(self) -> None:
        assert self.memory.counts() == self.sqlite.counts()
        assert self.memory.next_due(now=self.now) == self.sqlite.next_due(now=self.now)
        for a, b in zip(
            self.memory.entries(limit=1000), self.sqlite.entries(limit=1000), strict=True
        ):
            _same(a, b, self.ids)


TestSameAsMemory = SameAsMemory.TestCase
TestSameAsMemory.settings = settings(
    max_examples=25,
    stateful_step_count=25,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)


def test_new_messages_are_flushed_to_disk_and_outcomes_only_when_asked(tmp_path: Path) -> None:
    """add() always commits with synchronous=FULL; delivery changes with NORMAL unless
    fsync_outcomes=True (read back from the connection after each kind of write)."""
    from smtpnotify.testing.conformance import LEASE, T0, make_message

    def sync_level(outbox: SQLiteOutbox) -> int:
        with outbox._read() as conn:
            return int(conn.execute("PRAGMA synchronous").fetchone()[0])

    full, normal = 2, 1
    for fsync_outcomes, after_claim in ((False, normal), (True, full)):
        with SQLiteOutbox(
            tmp_path / f"o{fsync_outcomes}.db", fsync_outcomes=fsync_outcomes
        ) as outbox:
            outbox.add(make_message(), now=T0, expires_at=T0 + timedelta(days=1))
            assert sync_level(outbox) == full
            assert outbox.claim(now=T0, owner="w", lease=LEASE)
            assert sync_level(outbox) == after_claim
            outbox.add(make_message(), now=T0, expires_at=T0 + timedelta(days=1))
            assert sync_level(outbox) == full
