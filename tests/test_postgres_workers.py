"""Whole Notifier workers on one PostgresOutbox, against a real PostgreSQL server and SMTP sink.

``test_outbox_postgres.py`` checks the outbox protocol; these tests run the
real thing end to end (``Notifier.start()``: the worker thread, LISTEN/NOTIFY
wake-ups, SMTP delivery into an :class:`~smtpnotify.testing.SMTPSink`):

- four worker *processes* drain 1,200 messages while one of them is
  SIGKILLed in the middle of a batch: every message arrives, the only
  duplicates are among what the killed worker held, and what it held is
  delivered by the others once its lease ran out;
- a worker thread whose database connections (pool and listener) are
  terminated again and again during a drain reconnects and loses nothing.

Each test works in a table of its own (a random name), dropped afterwards.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from contextlib import ExitStack
from datetime import timedelta
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from psycopg import Connection

    Admin = Connection[tuple[Any, ...]]

psycopg = pytest.importorskip("psycopg", reason="the postgres extra (psycopg 3) is not installed")

from psycopg import sql  # noqa: E402
from psycopg.conninfo import make_conninfo  # noqa: E402

from smtpnotify import MailConfig, Notification, Notifier  # noqa: E402
from smtpnotify.outbox import OutboxStatus  # noqa: E402
from smtpnotify.outbox.postgres import PostgresOutbox  # noqa: E402
from smtpnotify.testing import SinkMessage, SMTPSink  # noqa: E402

pytestmark = pytest.mark.postgres

SRC = str(Path(__file__).resolve().parents[1] / "src")
SENDER = "noreply@example.com"
BATCH = 10
LEASE = timedelta(seconds=3)
DRAIN_WAIT = 45.0  # seconds a drain may take before the test fails (it takes a few)

# One worker process: a Notifier with its worker thread on the shared table.
# It prints its owner name once its pool and listener are up, and stops when
# its stdin says so (or closes).
WORKER = """
import json, sys
from datetime import timedelta
from smtpnotify import MailConfig, Notifier
from smtpnotify.outbox.postgres import PostgresOutbox

dsn, table, host, port, batch, lease = sys.argv[1:7]
config = MailConfig(host=host, port=int(port), sender="noreply@example.com", timeout=10)
with PostgresOutbox(dsn, table=table, pool_size=2) as outbox:
    notifier = Notifier(
        config, outbox, batch_size=int(batch), lease=timedelta(seconds=float(lease)),
        poll_interval=0.5,
    )
    outbox.counts()  # connect and check the table before saying ready
    notifier.start()
    print(json.dumps({"owner": notifier.owner}), flush=True)
    sys.stdin.readline()
    notifier.close()
print(json.dumps({"stopped": True}), flush=True)
"""


# --------------------------------------------------------------------------- helpers


@pytest.fixture
def admin(postgres_dsn: str) -> Iterator[Admin]:
    """An autocommit connection for looking at and tampering with the server."""
    with psycopg.connect(postgres_dsn, autocommit=True) as conn:
        yield conn


@pytest.fixture
def table(admin: Admin) -> Iterator[str]:
    """A fresh table name, dropped after the test."""
    name = f"smtpnotify_workers_{uuid.uuid4().hex[:12]}"
    yield name
    admin.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(sql.Identifier(name)))


def subprocess_env() -> dict[str, str]:
    path = os.pathsep.join(p for p in (SRC, os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "PYTHONPATH": path}


def queue(dsn: str, table: str, n: int) -> set[str]:
    """Queue ``n`` notifications in one committed transaction; return their Message-IDs."""
    config = MailConfig(host="127.0.0.1", port=25, sender=SENDER)
    with (
        PostgresOutbox(dsn, table=table) as outbox,
        Notifier(config, outbox) as producer,
        psycopg.connect(dsn) as conn,
    ):
        with conn.transaction():
            ids = [
                producer.notify(
                    Notification(to=f"user{i}@example.org", subject=f"n{i}", text=f"body {i}\n"),
                    connection=conn,
                )
                for i in range(n)
            ]
        rows = conn.execute(
            sql.SQL("SELECT id, message_id FROM {}").format(sql.Identifier(table))
        ).fetchall()
    by_id = dict(rows)
    assert set(by_id) == set(ids)
    message_ids = set(by_id.values())
    assert len(message_ids) == n
    return message_ids


def message_ids(messages: list[SinkMessage]) -> Counter[str]:
    """How many times each Message-ID arrived."""
    return Counter(str(m.message["Message-ID"]) for m in messages)


def status_counts(admin: Admin, table: str) -> dict[str, int]:
    rows = admin.execute(
        sql.SQL("SELECT status, count(*) FROM {} GROUP BY status").format(sql.Identifier(table))
    ).fetchall()
    return {status: n for status, n in rows}


def wait_all_sent(admin: Admin, table: str, n: int, timeout: float) -> dict[str, int]:
    """Poll until all ``n`` entries are ``sent`` (or time runs out); return the last counts."""
    deadline = time.monotonic() + timeout
    while True:
        counts = status_counts(admin, table)
        if counts.get("sent") == n or time.monotonic() > deadline:
            return counts
        time.sleep(0.1)


def held_by(admin: Admin, table: str, owner: str) -> list[tuple[str, str, Any]]:
    """``(id, message_id, lease_until)`` of the entries ``owner`` holds under a lease."""
    return admin.execute(
        sql.SQL(
            "SELECT id, message_id, lease_until FROM {} "
            "WHERE status = 'sending' AND lease_owner = %s"
        ).format(sql.Identifier(table)),
        [owner],
    ).fetchall()


def read_line(stream: IO[str] | None, proc: subprocess.Popen[str], what: str) -> dict[str, Any]:
    assert stream is not None
    line = stream.readline()
    assert line, f"{what}: no output; exit code {proc.poll()}"
    value: dict[str, Any] = json.loads(line)
    return value


# --------------------------------------------------------------------------- 4 processes, 1 killed


@pytest.mark.timeout(120)
@pytest.mark.skipif(not hasattr(signal, "SIGSTOP"), reason="needs POSIX signals")
def test_four_worker_processes_drain_while_one_is_killed(
    postgres_dsn: str, admin: Admin, table: str, tmp_path: Path
) -> None:
    n = 1200
    with PostgresOutbox(postgres_dsn, table=table, create=True) as setup:
        setup.create_schema()
    with ExitStack() as stack:
        sink = stack.enter_context(SMTPSink())
        procs: list[subprocess.Popen[str]] = []
        logs: list[Path] = []
        try:
            for k in range(4):
                log = tmp_path / f"worker{k}.log"
                logs.append(log)
                err = stack.enter_context(log.open("w"))
                argv = [postgres_dsn, table, sink.host, str(sink.port), str(BATCH)]
                proc = subprocess.Popen(
                    [sys.executable, "-c", WORKER, *argv, str(LEASE.total_seconds())],
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    stderr=err,
                    text=True,
                    env=subprocess_env(),
                )
                procs.append(proc)
            owners = [read_line(p.stdout, p, "worker start")["owner"] for p in procs]

            # All four idle workers are woken by the NOTIFY of this one commit.
            queued = queue(postgres_dsn, table, n)
            sink.wait_for(200, timeout=DRAIN_WAIT)

            # Kill the victim in the middle of a batch: freeze it, and kill it
            # only when it holds leases (else let it run a moment and look again).
            victim, victim_owner = procs[0], owners[0]
            stranded: list[tuple[str, str, Any]] = []
            deadline = time.monotonic() + DRAIN_WAIT
            while not stranded and time.monotonic() < deadline:
                victim.send_signal(signal.SIGSTOP)
                stranded = held_by(admin, table, victim_owner)
                if stranded:
                    victim.kill()
                else:
                    victim.send_signal(signal.SIGCONT)
                    time.sleep(0.003)
            assert stranded, "the victim never held a lease while the others drained"
            assert victim.wait(timeout=10) == -signal.SIGKILL
            arrived_at_kill = len(sink.messages)

            counts = wait_all_sent(admin, table, n, DRAIN_WAIT)
            assert counts == {"sent": n}, (counts, [p.read_text() for p in logs])

            for proc in procs[1:]:
                assert proc.stdin is not None
                proc.stdin.write("stop\n")
                proc.stdin.flush()
            for proc in procs[1:]:
                assert read_line(proc.stdout, proc, "worker stop") == {"stopped": True}
                assert proc.wait(timeout=15) == 0, [p.read_text() for p in logs]
        finally:
            for proc in procs:
                if proc.poll() is None:
                    proc.kill()
                proc.communicate()  # reaps it and closes its pipes
        arrived = sink.messages

    # The drain was really under way when the victim died.
    assert 200 <= arrived_at_kill < n
    # Every message arrived; nothing is in the sink that was not queued.
    seen = message_ids(arrived)
    assert set(seen) == queued
    # Twice only what the killed worker held: the message(s) it had sent but
    # not yet recorded.  Never more than one batch.
    stranded_ids = {message_id for _, message_id, _ in stranded}
    twice = {m for m, count in seen.items() if count > 1}
    assert twice <= stranded_ids
    assert max(seen.values()) <= 2
    assert sum(count - 1 for count in seen.values()) <= BATCH
    assert len(arrived) == n + len(twice)
    # What the victim held was delivered by the others once its lease ran out.
    with PostgresOutbox(postgres_dsn, table=table) as outbox:
        for entry_id, _, lease_until in stranded:
            entry = outbox.get(entry_id)
            assert entry is not None and entry.status is OutboxStatus.SENT
            assert entry.attempts >= 2
            assert entry.updated_at is not None and entry.updated_at >= lease_until
        assert outbox.counts()[OutboxStatus.SENT] == n


# --------------------------------------------------------------------------- killed connections


@pytest.mark.timeout(90)
def test_a_worker_thread_reconnects_when_its_connections_are_killed(
    postgres_dsn: str,
    admin: Admin,
    table: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    n = 400
    # A name of its own (still "smtpnotify…") so that only this worker's
    # backends are terminated, not those of anyone else using the server.
    app_name = f"smtpnotify-workers-{uuid.uuid4().hex[:8]}"
    worker_dsn = make_conninfo(postgres_dsn, application_name=app_name)
    kills: list[int] = []  # messages at the sink at each kill that hit something
    stop = threading.Event()

    def killer(sink: SMTPSink) -> None:
        with psycopg.connect(postgres_dsn, autocommit=True) as conn:
            while not stop.wait(0.05):
                rows = conn.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                    "WHERE application_name = %s "
                    "AND pid <> pg_backend_pid()",
                    [app_name],
                ).fetchall()
                if any(ok for (ok,) in rows):
                    kills.append(len(sink.messages))

    with (
        SMTPSink() as sink,
        PostgresOutbox(worker_dsn, table=table, create=True, pool_size=2) as outbox,
    ):
        outbox.create_schema()
        config = MailConfig(host=sink.host, port=sink.port, sender=SENDER, timeout=10)
        notifier = Notifier(config, outbox, batch_size=BATCH, lease=LEASE, poll_interval=0.2)
        thread = threading.Thread(target=killer, args=(sink,))
        with caplog.at_level(logging.WARNING), notifier:
            notifier.start()
            thread.start()
            try:
                queued = queue(postgres_dsn, table, n)
                # Keep killing until most of the queue went out, then let it finish.
                sink.wait_for(n * 3 // 4, timeout=DRAIN_WAIT)
            finally:
                stop.set()
                thread.join()
            counts = wait_all_sent(admin, table, n, DRAIN_WAIT)
            notifier.stop(timeout=15)
        arrived = sink.messages

    assert counts == {"sent": n}, caplog.text
    # The connections really were cut, while messages were going out.
    assert any(0 < at < n for at in kills), kills
    # Nothing lost.
    seen = message_ids(arrived)
    assert set(seen) == queued
    # A duplicate needs a delivery pass that failed after an SMTP accept (an
    # outcome that could not be recorded even on a fresh connection); each
    # such pass can repeat at most one batch.
    failed_passes = caplog.text.count("delivery pass failed")
    assert sum(count - 1 for count in seen.values()) <= BATCH * failed_passes, caplog.text
