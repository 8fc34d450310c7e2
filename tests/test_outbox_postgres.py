"""PostgresOutbox against a real PostgreSQL server.

The protocol itself is checked by the conformance suite
(:class:`TestPostgresOutbox`); the tests below cover what is particular to
PostgreSQL: the schema, SKIP LOCKED claims across threads and processes,
enqueueing inside the application's transaction, LISTEN/NOTIFY wake-ups and
connections killed mid-use.  Every test works in a table of its own (a random
name), dropped afterwards.  ``postgres_dsn`` (conftest) skips these tests when
no server is reachable, or fails them with ``REQUIRE_POSTGRES_TESTS=1``.
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import subprocess
import sys
import threading
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from psycopg import Connection

    Admin = Connection[tuple[Any, ...]]

psycopg = pytest.importorskip("psycopg", reason="the postgres extra (psycopg 3) is not installed")

from psycopg import sql  # noqa: E402
from psycopg.conninfo import make_conninfo  # noqa: E402
from psycopg_pool import ConnectionPool  # noqa: E402

from smtpnotify import MailConfig, Notification, Notifier  # noqa: E402
from smtpnotify._prepared import PreparedMessage  # noqa: E402
from smtpnotify.outbox import Outbox, OutboxError, OutboxSchemaError, OutboxStatus  # noqa: E402
from smtpnotify.outbox.postgres import PostgresOutbox  # noqa: E402
from smtpnotify.testing import SMTPSink  # noqa: E402
from smtpnotify.testing.conformance import OutboxConformance  # noqa: E402

pytestmark = pytest.mark.postgres

SRC = str(Path(__file__).resolve().parents[1] / "src")
T0 = datetime(2030, 1, 1, 12, 0, tzinfo=UTC)  # far from the server's clock, on purpose
DAY = timedelta(days=1)
LEASE = timedelta(minutes=5)
WAIT = 10.0  # seconds: how long a wake-up may take before a test fails (it takes ms)


# --------------------------------------------------------------------------- fixtures


@pytest.fixture
def admin(postgres_dsn: str) -> Iterator[Admin]:
    """An autocommit connection for looking at and tampering with the server."""
    with psycopg.connect(postgres_dsn, autocommit=True) as conn:
        yield conn


@pytest.fixture
def table(admin: Admin) -> Iterator[str]:
    """A fresh table name, dropped after the test."""
    name = f"smtpnotify_test_{uuid.uuid4().hex[:12]}"
    yield name
    admin.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(sql.Identifier(name)))


@pytest.fixture
def app_dsn(postgres_dsn: str) -> str:
    """The DSN with an application_name unique to this test, to find its backends."""
    return make_conninfo(postgres_dsn, application_name=f"smtpnotify-test-{uuid.uuid4().hex[:8]}")


@pytest.fixture
def make_outbox(app_dsn: str, table: str) -> Iterator[Callable[..., PostgresOutbox]]:
    """Open PostgresOutbox instances on the test's table; all closed afterwards."""
    opened: list[PostgresOutbox] = []

    def make(**kwargs: object) -> PostgresOutbox:
        kwargs.setdefault("table", table)
        kwargs.setdefault("create", True)
        if "pool" not in kwargs:
            kwargs.setdefault("conninfo", app_dsn)
        outbox = PostgresOutbox(**kwargs)  # type: ignore[arg-type]
        opened.append(outbox)
        return outbox

    yield make
    for outbox in opened:
        outbox.close()


@pytest.fixture
def outbox(make_outbox: Callable[..., PostgresOutbox]) -> PostgresOutbox:
    """A PostgresOutbox on a fresh table (created)."""
    return make_outbox()


def message(n: int = 0, recipients: tuple[str, ...] = ("to@example.org",)) -> PreparedMessage:
    """A small distinct message."""
    return PreparedMessage(
        sender="noreply@example.com",
        recipients=recipients,
        message_id=f"<{n}.{uuid.uuid4().hex}@example.com>",
        data=f"Subject: n{n}\r\n\r\nbody {n} ü\r\n".encode(),
    )


def terminate(admin: Admin, app_dsn: str) -> int:
    """Terminate every backend of this test's outboxes; return how many."""
    app = psycopg.conninfo.conninfo_to_dict(app_dsn)["application_name"]
    rows = admin.execute(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
        "WHERE application_name = %s AND pid <> pg_backend_pid()",
        [app],
    ).fetchall()
    return sum(1 for (ok,) in rows if ok)


def subprocess_env() -> dict[str, str]:
    path = os.pathsep.join(p for p in (SRC, os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "PYTHONPATH": path}


# --------------------------------------------------------------------------- the protocol


class TestPostgresOutbox(OutboxConformance):
    """Every protocol rule, on PostgreSQL (a second instance is the "reopened" handle)."""

    supports_connection = True

    @pytest.fixture
    def outbox(self, postgres_dsn: str, table: str) -> Iterator[Outbox]:
        self.dsn, self.table = postgres_dsn, table
        box = PostgresOutbox(postgres_dsn, table=table, create=True)
        try:
            yield box
        finally:
            box.close()

    def reopen(self, tmp_path: Path) -> Outbox | None:
        return PostgresOutbox(self.dsn, table=self.table)


# --------------------------------------------------------------------------- schema


def test_create_schema_is_idempotent_and_matches_schema_sql(
    outbox: PostgresOutbox,
    admin: Admin,
    table: str,
    postgres_dsn: str,
) -> None:
    outbox.create_schema()
    outbox.create_schema()
    comment = admin.execute(
        "SELECT obj_description(to_regclass(%s), 'pg_class')", [table]
    ).fetchone()
    assert comment == ("smtpnotify outbox schema_version=1",)
    indexes = admin.execute(
        "SELECT indexdef FROM pg_indexes WHERE tablename = %s", [table]
    ).fetchall()
    assert any("(status, next_attempt_at)" in d for (d,) in indexes)

    # The DDL handed to DBAs builds a table the outbox accepts without create=.
    other = f"{table}_dba"
    try:
        admin.execute(PostgresOutbox.schema_sql(table=other).encode())
        with PostgresOutbox(postgres_dsn, table=other) as dba_outbox:
            assert dba_outbox.counts()[OutboxStatus.PENDING] == 0
    finally:
        admin.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(sql.Identifier(other)))


def test_missing_table_is_not_created_without_create(
    make_outbox: Callable[..., PostgresOutbox],
    admin: Admin,
    table: str,
) -> None:
    outbox = make_outbox(create=False)
    with pytest.raises(OutboxSchemaError, match="create_schema"):
        outbox.counts()
    assert admin.execute("SELECT to_regclass(%s)", [table]).fetchone() == (None,)


def test_refuses_a_foreign_table_and_leaves_it_alone(
    make_outbox: Callable[..., PostgresOutbox],
    admin: Admin,
    table: str,
) -> None:
    admin.execute(sql.SQL("CREATE TABLE {} (id int, status text)").format(sql.Identifier(table)))
    for create in (False, True):
        outbox = make_outbox(create=create)
        with pytest.raises(OutboxSchemaError, match="not an smtpnotify outbox"):
            outbox.get("x")
        with pytest.raises(OutboxSchemaError, match="not an smtpnotify outbox"):
            outbox.add(message(), now=T0, expires_at=T0 + DAY)
    assert admin.execute(
        "SELECT obj_description(to_regclass(%s), 'pg_class')", [table]
    ).fetchone() == (None,)
    columns = admin.execute(
        "SELECT column_name FROM information_schema.columns WHERE table_name = %s "
        "ORDER BY ordinal_position",
        [table],
    ).fetchall()
    assert columns == [("id",), ("status",)]


def test_refuses_a_newer_schema_version(
    outbox: PostgresOutbox,
    make_outbox: Callable[..., PostgresOutbox],
    admin: Admin,
    table: str,
) -> None:
    outbox.create_schema()
    admin.execute(
        sql.SQL("COMMENT ON TABLE {} IS 'smtpnotify outbox schema_version=99'").format(
            sql.Identifier(table)
        )
    )
    for create in (False, True):
        with pytest.raises(OutboxSchemaError, match="newer"):
            make_outbox(create=create).counts()


def test_schema_argument_puts_the_table_in_that_schema(postgres_dsn: str, admin: Admin) -> None:
    schema = f"smtpnotify_s_{uuid.uuid4().hex[:8]}"
    admin.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(schema)))
    try:
        with PostgresOutbox(postgres_dsn, schema=schema, create=True) as outbox:
            entry_id = outbox.add(message(), now=T0, expires_at=T0 + DAY)
            assert outbox.get(entry_id) is not None
        row = admin.execute(
            "SELECT count(*) FROM pg_tables WHERE schemaname = %s AND tablename = %s",
            [schema, "smtpnotify_outbox"],
        ).fetchone()
        assert row == (1,)
    finally:
        admin.execute(sql.SQL("DROP SCHEMA {} CASCADE").format(sql.Identifier(schema)))


@pytest.mark.parametrize("name", ["", "1abc", "a-b", 'x"; DROP TABLE y; --', "ä", "a" * 51])
def test_table_and_schema_names_must_be_identifiers(name: str) -> None:
    # Refused before any connection is made.
    with pytest.raises(ValueError, match="identifier"):
        PostgresOutbox("dbname=never_connected", table=name)
    with pytest.raises(ValueError, match="identifier"):
        PostgresOutbox("dbname=never_connected", schema=(name or "1") + "-" * (len(name) > 50))
    with pytest.raises(ValueError, match="identifier"):
        PostgresOutbox.schema_sql(table=name)


def test_constructor_needs_exactly_one_source(postgres_dsn: str) -> None:
    with pytest.raises(TypeError, match="exactly one"):
        PostgresOutbox()
    with (
        ConnectionPool(postgres_dsn, min_size=1, max_size=1, open=True) as pool,
        pytest.raises(TypeError, match="exactly one"),
    ):
        PostgresOutbox(postgres_dsn, pool=pool)


def test_a_malformed_conninfo_is_not_echoed() -> None:
    with pytest.raises(ValueError, match="invalid PostgreSQL conninfo") as info:
        PostgresOutbox("host=db password=hunter2 oops")
    assert "hunter2" not in str(info.value)
    assert "oops" not in str(info.value)


# --------------------------------------------------------------------------- protocol


def test_closed_outbox_raises_outbox_error(
    make_outbox: Callable[..., PostgresOutbox],
) -> None:
    outbox = make_outbox()
    outbox.close()
    outbox.close()
    with pytest.raises(OutboxError, match="closed"):
        outbox.counts()


def test_channel_names_fit_postgresql_limits(postgres_dsn: str) -> None:
    short = PostgresOutbox(postgres_dsn, table="mail", schema="app")
    long_a = PostgresOutbox(postgres_dsn, table="a" * 50, schema="s" * 63)
    long_b = PostgresOutbox(postgres_dsn, table="b" * 50, schema="s" * 63)
    try:
        assert short.channel == "smtpnotify:app.mail"
        assert len(long_a.channel) <= 63
        assert long_a.channel != long_b.channel
    finally:
        for outbox in (short, long_a, long_b):
            outbox.close()
    with pytest.raises(OutboxError, match="closed"):
        short.subscribe(lambda: None)


def test_a_caller_pool_is_used_and_left_open(postgres_dsn: str, table: str) -> None:
    with ConnectionPool(postgres_dsn, min_size=1, max_size=2, open=True) as pool:
        with PostgresOutbox(pool=pool, table=table, create=True) as outbox:
            entry_id = outbox.add(message(), now=T0, expires_at=T0 + DAY)
        assert not pool.closed
        with pool.connection() as conn:
            row = conn.execute(
                sql.SQL("SELECT status FROM {} WHERE id = %s").format(sql.Identifier(table)),
                [entry_id],
            ).fetchone()
        assert row == ("pending",)


# --------------------------------------------------------------------------- concurrency


def fill(outbox: PostgresOutbox, dsn: str, n: int) -> set[str]:
    """Queue ``n`` messages in one transaction (through the caller-connection path)."""
    with psycopg.connect(dsn) as conn:
        return {
            outbox.add(message(i), now=T0, expires_at=T0 + DAY, connection=conn) for i in range(n)
        }


def test_threads_never_claim_one_entry_twice(
    make_outbox: Callable[..., PostgresOutbox], app_dsn: str
) -> None:
    outbox = make_outbox(pool_size=4)
    ids = fill(outbox, app_dsn, 1000)
    start = threading.Barrier(4)
    claimed: list[list[str]] = [[] for _ in range(4)]

    def worker(k: int) -> None:
        start.wait()
        while batch := outbox.claim(now=T0, owner=f"t{k}", lease=LEASE, limit=7):
            claimed[k].extend(e.id for e in batch)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    every = [i for c in claimed for i in c]
    assert len(every) == len(set(every)) == 1000
    assert set(every) == ids
    assert sum(1 for c in claimed if c) > 1  # they really shared the work
    assert outbox.counts()[OutboxStatus.SENDING] == 1000
    assert {e.attempts for e in outbox.entries(limit=1000)} == {1}


CLAIMER = """
import json, os, sys
from datetime import datetime, timedelta
from smtpnotify.outbox.postgres import PostgresOutbox
dsn, table, now = sys.argv[1], sys.argv[2], datetime.fromisoformat(sys.argv[3])
with PostgresOutbox(dsn, table=table, pool_size=1) as outbox:
    outbox.get("warm-up")  # connect and check the table before the start signal
    print("ready", flush=True)
    sys.stdin.readline()
    claimed = []
    owner = f"p{os.getpid()}"
    while batch := outbox.claim(now=now, owner=owner, lease=timedelta(minutes=5), limit=7):
        claimed.extend(e.id for e in batch)
    print(json.dumps(claimed), flush=True)
"""


def test_processes_never_claim_one_entry_twice(
    outbox: PostgresOutbox, app_dsn: str, table: str
) -> None:
    ids = fill(outbox, app_dsn, 1000)
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", CLAIMER, app_dsn, table, T0.isoformat()],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=subprocess_env(),
        )
        for _ in range(4)
    ]
    try:
        for p in procs:
            assert p.stdout is not None and p.stdout.readline().strip() == "ready"
        for p in procs:
            assert p.stdin is not None
            p.stdin.write("go\n")
            p.stdin.flush()
        results = [p.communicate(timeout=60)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate()
    assert [p.returncode for p in procs] == [0, 0, 0, 0]
    claimed = [json.loads(r.strip().splitlines()[-1]) for r in results]
    every = [i for c in claimed for i in c]
    assert len(every) == len(set(every)) == 1000
    assert set(every) == ids
    assert sum(1 for c in claimed if c) > 1
    assert {e.attempts for e in outbox.entries(limit=1000)} == {1}


# --------------------------------------------------------------------------- transactional enqueue


def test_enqueue_inside_the_callers_transaction(
    make_outbox: Callable[..., PostgresOutbox], app_dsn: str
) -> None:
    outbox = make_outbox()
    listener = make_outbox()
    woken = threading.Event()
    listener.subscribe(woken.set)

    with psycopg.connect(app_dsn) as conn:
        # Rolled back: nothing is queued.
        with pytest.raises(ZeroDivisionError), conn.transaction():
            lost = outbox.add(message(1), now=T0, expires_at=T0 + DAY, connection=conn)
            assert conn.info.transaction_status is psycopg.pq.TransactionStatus.INTRANS
            1 / 0  # noqa: B018
        assert outbox.get(lost) is None

        # Not committed yet: invisible to others, nobody woken.
        kept = outbox.add(message(2), now=T0, expires_at=T0 + DAY, connection=conn)
        assert conn.info.transaction_status is psycopg.pq.TransactionStatus.INTRANS
        assert outbox.get(kept) is None
        assert outbox.claim(now=T0, owner="w", lease=LEASE) == []
        assert not woken.is_set()
        conn.rollback()
        assert outbox.get(kept) is None

        # Committed: queued, and the NOTIFY wakes subscribers elsewhere.
        kept = outbox.add(message(3), now=T0, expires_at=T0 + DAY, connection=conn)
        assert not woken.is_set()
        conn.commit()
    assert woken.wait(WAIT)
    entry = outbox.get(kept)
    assert entry is not None and entry.status is OutboxStatus.PENDING
    assert [e.id for e in outbox.claim(now=T0, owner="w", lease=LEASE, limit=5)] == [kept]


def test_enqueue_needs_a_psycopg_connection(outbox: PostgresOutbox, postgres_dsn: str) -> None:
    lite = sqlite3.connect(":memory:")
    try:
        with psycopg.connect(postgres_dsn) as conn, conn.cursor() as cursor:
            for wrong in (object(), postgres_dsn, lite, cursor):
                with pytest.raises(TypeError, match="psycopg 3 Connection"):
                    outbox.add(message(), now=T0, expires_at=T0 + DAY, connection=wrong)
    finally:
        lite.close()
    assert outbox.counts()[OutboxStatus.PENDING] == 0


# --------------------------------------------------------------------------- wake-ups


def test_local_add_calls_subscribers_at_once(outbox: PostgresOutbox) -> None:
    calls: list[str] = []
    outbox.subscribe(lambda: calls.append("a"))

    def broken() -> None:
        raise RuntimeError("subscriber bug")

    outbox.subscribe(broken)  # logged, never raised to add()'s caller
    outbox.add(message(), now=T0, expires_at=T0 + DAY)
    assert calls == ["a"]  # synchronously, and not again through its own NOTIFY


def test_another_instance_wakes_a_subscriber(make_outbox: Callable[..., PostgresOutbox]) -> None:
    subscriber, producer = make_outbox(), make_outbox()
    woken = threading.Event()
    subscriber.subscribe(woken.set)
    producer.add(message(), now=T0, expires_at=T0 + DAY)
    assert woken.wait(WAIT)


ADDER = """
import sys
from datetime import datetime, timedelta
from smtpnotify._prepared import PreparedMessage
from smtpnotify.outbox.postgres import PostgresOutbox
dsn, table, now = sys.argv[1], sys.argv[2], datetime.fromisoformat(sys.argv[3])
with PostgresOutbox(dsn, table=table) as outbox:
    msg = PreparedMessage("a@example.com", ("b@example.org",), "<p@example.com>", b"x\\r\\n")
    print(outbox.add(msg, now=now, expires_at=now + timedelta(days=1)))
"""


def test_another_process_wakes_a_subscriber(
    outbox: PostgresOutbox, app_dsn: str, table: str
) -> None:
    outbox.create_schema()
    woken = threading.Event()
    outbox.subscribe(woken.set)
    done = subprocess.run(
        [sys.executable, "-c", ADDER, app_dsn, table, T0.isoformat()],
        capture_output=True,
        text=True,
        env=subprocess_env(),
        timeout=60,
        check=True,
    )
    assert woken.wait(WAIT)
    assert outbox.get(done.stdout.strip()) is not None


# --------------------------------------------------------------------------- with the Notifier


def test_notify_through_the_callers_connection_and_deliver(
    make_outbox: Callable[..., PostgresOutbox], app_dsn: str, sink: SMTPSink
) -> None:
    outbox = make_outbox()
    host, port = sink.address
    config = MailConfig(host=host, port=port, sender="noreply@example.com")
    with Notifier(config, outbox) as notifier, psycopg.connect(app_dsn) as conn:
        with conn.transaction():
            kept = notifier.notify(
                Notification(to="kept@example.org", subject="s", text="t"), connection=conn
            )
        with pytest.raises(KeyError), conn.transaction():
            notifier.notify(
                Notification(to="lost@example.org", subject="s", text="t"), connection=conn
            )
            raise KeyError("rolled back")
        report = notifier.deliver_due()
    assert (report.sent, report.total) == (1, 1)
    assert [m.rcpt_tos for m in sink.messages] == [("kept@example.org",)]
    entry = outbox.get(kept)
    assert entry is not None and entry.status is OutboxStatus.SENT
    assert outbox.counts()[OutboxStatus.SENT] == sum(outbox.counts().values())


def test_an_idle_worker_is_woken_by_a_commit_elsewhere(
    make_outbox: Callable[..., PostgresOutbox], app_dsn: str, sink: SMTPSink
) -> None:
    host, port = sink.address
    config = MailConfig(host=host, port=port, sender="noreply@example.com")
    worker_outbox, app_outbox = make_outbox(), make_outbox()
    worker_outbox.create_schema()
    # The worker would sleep a minute: only the NOTIFY can wake it in time.
    with (
        Notifier(config, worker_outbox, poll_interval=60) as worker,
        Notifier(config, app_outbox) as app,
    ):
        worker.start()
        with psycopg.connect(app_dsn) as conn, conn.transaction():
            app.notify(Notification(to="woken@example.org", subject="s", text="t"), connection=conn)
        [received] = sink.wait_for(1, timeout=WAIT)
        worker.stop()
    assert received.rcpt_tos == ("woken@example.org",)


# --------------------------------------------------------------------------- killed connections


def test_survives_terminated_pool_and_listener_connections(
    make_outbox: Callable[..., PostgresOutbox],
    admin: Admin,
    app_dsn: str,
) -> None:
    outbox = make_outbox(pool_size=2)
    producer = make_outbox()
    woken = threading.Event()
    outbox.subscribe(woken.set)
    first = outbox.add(message(1), now=T0, expires_at=T0 + DAY)
    producer.get(first)
    woken.clear()

    assert terminate(admin, app_dsn) >= 3  # both pools' connections and the listener's
    # The listener reconnects and wakes its subscribers (it may have missed something).
    assert woken.wait(WAIT)
    woken.clear()
    # Every operation carries on over fresh connections.
    second = outbox.add(message(2), now=T0, expires_at=T0 + DAY)
    assert {e.id for e in outbox.claim(now=T0, owner="w", lease=LEASE, limit=5)} == {first, second}
    assert outbox.record_sent(first, owner="w", now=T0, accepted=("to@example.org",), refused={})
    # ... and the new listener connection is listening again.
    woken.clear()
    producer.add(message(3), now=T0, expires_at=T0 + DAY)
    assert woken.wait(WAIT)
    assert outbox.counts()[OutboxStatus.SENT] == 1
    assert producer.counts()[OutboxStatus.PENDING] == 1


def test_an_operation_on_dead_pooled_connections_is_retried(
    app_dsn: str,
    table: str,
    admin: Admin,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Every connection of the pool died while idle: each is tried, found dead
    # and discarded, and the operation goes through on a fresh one.
    with (
        ConnectionPool(app_dsn, min_size=4, max_size=4, open=True) as pool,
        PostgresOutbox(pool=pool, table=table, create=True) as outbox,
    ):
        entry_id = outbox.add(message(), now=T0, expires_at=T0 + DAY)
        pool.wait()
        assert terminate(admin, app_dsn) == 4
        with caplog.at_level(logging.WARNING, logger="smtpnotify.outbox.postgres"):
            [entry] = outbox.claim(now=T0, owner="w", lease=LEASE)
        assert entry.id == entry_id
        assert "claim failed" in caplog.text
        pool.wait()
        assert terminate(admin, app_dsn) == 4
        assert outbox.record_sent(entry_id, owner="w", now=T0, accepted=(), refused={})
        status = outbox.get(entry_id)
        assert status is not None and status.status is OutboxStatus.SENT


def test_a_drain_loses_nothing_while_connections_are_killed(
    make_outbox: Callable[..., PostgresOutbox],
    admin: Admin,
    app_dsn: str,
    postgres_dsn: str,
) -> None:
    outbox = make_outbox(pool_size=2)
    ids = fill(outbox, postgres_dsn, 300)
    stop = threading.Event()
    kills = 0

    def killer() -> None:
        nonlocal kills
        with psycopg.connect(postgres_dsn, autocommit=True) as conn:
            while not stop.wait(0.05):
                kills += terminate(conn, app_dsn)

    delivered: list[str] = []
    unsure: set[str] = set()  # record_sent raised: the entry may be delivered again
    errors = 0

    def drain(now: datetime) -> None:
        nonlocal errors
        for _ in range(10_000):
            try:
                batch = outbox.claim(now=now, owner="w", lease=LEASE, limit=5)
            except OutboxError:
                errors += 1
                continue
            if not batch:
                return
            for entry in batch:
                delivered.append(entry.id)  # "sent" over SMTP
                try:
                    outbox.record_sent(entry.id, owner="w", now=now, accepted=(), refused={})
                except OutboxError:
                    errors += 1
                    unsure.add(entry.id)

    thread = threading.Thread(target=killer)
    thread.start()
    try:
        drain(T0)
    finally:
        stop.set()
        thread.join()
    # Entries whose claim or record was cut off come back when their lease runs out.
    drain(T0 + LEASE)
    assert kills > 0
    assert outbox.counts()[OutboxStatus.SENT] == 300
    assert set(delivered) == ids
    twice = {i for i, n in Counter(delivered).items() if n > 1}
    assert twice <= unsure
