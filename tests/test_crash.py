"""Crash safety with real processes: SIGKILL after notify(), SIGKILL mid-drain, two drainers.

Each child is ``sys.executable -c <script>`` working on an SQLite outbox in the
test's temporary directory; the SMTP sink runs in this (the parent) process and
the children reach it over loopback.  Every child is killed and reaped in a
``finally`` (``with subprocess.Popen``), whatever the test does.
"""

from __future__ import annotations

import collections
import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from _helpers import config_for, note
from smtpnotify import Notifier, OutboxEntry, OutboxStatus, SQLiteOutbox
from smtpnotify.testing import SinkMessage, SMTPSink

pytestmark = pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs POSIX signals")

# -- child scripts ---------------------------------------------------------------------------

# argv: outbox path.  Queues messages without end, printing each id once notify() returned.
QUEUE_FOREVER = """
import sys
from smtpnotify import MailConfig, Notification, Notifier, SQLiteOutbox

outbox = SQLiteOutbox(sys.argv[1])
notifier = Notifier(MailConfig(sender="noreply@example.com"), outbox)
n = 0
while True:
    entry_id = notifier.notify(
        Notification(to=f"user{n}@example.com", subject=f"message {n}", text="hello\\n")
    )
    print(entry_id, flush=True)
    n += 1
"""

# argv: host, port, outbox path, batch size, lease seconds.  Prints "ready", waits
# for a line on stdin, then drains the outbox; prints how many it sent.
DRAIN = """
import sys, time
from datetime import timedelta
from smtpnotify import MailConfig, Notifier, OutboxStatus, SQLiteOutbox

host, port, path, batch, lease = sys.argv[1:6]
config = MailConfig(host=host, port=int(port), sender="noreply@example.com", timeout=10)
with SQLiteOutbox(path) as outbox:
    notifier = Notifier(
        config, outbox, batch_size=int(batch), lease=timedelta(seconds=float(lease))
    )
    print("ready", flush=True)
    sys.stdin.readline()
    sent = 0
    while True:
        report = notifier.deliver_due()
        sent += report.sent
        if report.total == 0:
            counts = outbox.counts()
            if counts[OutboxStatus.PENDING] + counts[OutboxStatus.SENDING] == 0:
                break
            time.sleep(0.01)  # the other process holds the rest
    print(f"sent {sent}", flush=True)
"""


@contextmanager
def child(script: str, *args: str) -> Iterator[subprocess.Popen[str]]:
    """A running child; killed (if still alive) and reaped on the way out."""
    with subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(script), *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    ) as proc:
        try:
            yield proc
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.communicate(timeout=30)  # reap, and close the pipes


def read_line(proc: subprocess.Popen[str]) -> str:
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line:
        proc.wait(timeout=30)
        assert proc.stderr is not None
        raise AssertionError(f"child exited ({proc.returncode}): {proc.stderr.read()}")
    return line.strip()


def queue(path: Path, sink: SMTPSink, count: int) -> list[str]:
    with SQLiteOutbox(path) as outbox, Notifier(config_for(sink), outbox) as notifier:
        return [notifier.notify(note(f"user{n}@example.com")) for n in range(count)]


def message_ids(messages: Sequence[SinkMessage]) -> list[str]:
    return [str(m.message["Message-ID"]) for m in messages]


# -- (a) killed right after notify() returned -------------------------------------------------


def test_a_process_killed_right_after_notify_keeps_the_message(tmp_path: Path) -> None:
    path = tmp_path / "outbox.db"
    with child(QUEUE_FOREVER, str(path)) as proc:
        ids = [read_line(proc) for _ in range(3)]
        proc.send_signal(signal.SIGKILL)  # at once: it is already queueing the next one
        assert proc.wait(timeout=30) == -signal.SIGKILL
    with SQLiteOutbox(path) as outbox:  # reopening replays the WAL the dead process left
        for entry_id in ids:
            entry = outbox.get(entry_id)
            assert entry is not None, f"{entry_id} was lost"
            assert entry.status is OutboxStatus.PENDING
            assert entry.attempts == 0
        counts = outbox.counts()
        assert counts[OutboxStatus.PENDING] >= len(ids)
        assert sum(counts.values()) == counts[OutboxStatus.PENDING]


# -- (b) a worker killed mid-drain ---------------------------------------------------------------


def test_a_worker_killed_mid_drain_loses_nothing_and_resends_only_what_was_in_flight(
    tmp_path: Path,
) -> None:
    total, batch, kill_at, lease = 200, 5, 37, 30.0
    path = tmp_path / "outbox.db"
    killed: list[str] = []
    pid: list[int] = []

    def kill_mid_send(message: SinkMessage) -> None:
        # The kill-at-th message arrived and the worker waits for the final reply:
        # it dies having sent it without being able to record it.
        if not killed and len(sink.messages) == kill_at:
            killed.append(str(message.message["Message-ID"]))
            os.kill(pid[0], signal.SIGKILL)

    with SMTPSink(on_message=kill_mid_send) as sink:
        queue(path, sink, total)
        with child(DRAIN, sink.host, str(sink.port), str(path), str(batch), str(lease)) as proc:
            pid.append(proc.pid)
            assert read_line(proc) == "ready"
            assert proc.stdin is not None
            proc.stdin.write("go\n")
            proc.stdin.flush()
            assert proc.wait(timeout=60) == -signal.SIGKILL
        sink.on_message = None
        assert killed, "the worker finished before it could be killed"
        received_before = len(sink.messages)
        assert received_before == kill_at

        with SQLiteOutbox(path) as outbox:
            counts = outbox.counts()
            held = outbox.entries(status=OutboxStatus.SENDING, limit=total)
            # the dead worker held one batch at most, the in-flight message among it
            assert 1 <= len(held) <= batch
            assert killed[0] in {e.message_id for e in held}
            assert counts[OutboxStatus.SENT] == kill_at - 1
            assert counts[OutboxStatus.SENT] + counts[OutboxStatus.PENDING] + len(held) == total

            # A new worker: nothing is due until the dead worker's lease runs out...
            clock_now = datetime.now(UTC)
            with Notifier(
                config_for(sink, timeout=10),
                outbox,
                clock=lambda: clock_now,
                batch_size=batch,
            ) as notifier:
                assert notifier.deliver_due().sent == total - kill_at + 1 - len(held)
                assert outbox.counts()[OutboxStatus.SENDING] == len(held)
                # ...then it takes over the held batch too.
                clock_now += timedelta(seconds=lease + 1)
                assert notifier.deliver_due().sent == len(held)
            assert outbox.counts()[OutboxStatus.SENT] == total

    ids = message_ids(sink.messages)
    assert set(ids) == {e.message_id for e in all_entries(path, total)}
    duplicates = {mid for mid, n in collections.Counter(ids).items() if n > 1}
    assert duplicates == {killed[0]}  # only the message in flight went out twice
    assert len(ids) == total + 1


def all_entries(path: Path, limit: int) -> list[OutboxEntry]:
    with SQLiteOutbox(path) as outbox:
        return outbox.entries(limit=limit)


# -- (c) two processes draining one file --------------------------------------------------------


def test_two_processes_draining_one_file_never_send_a_message_twice(tmp_path: Path) -> None:
    total, batch = 200, 5
    path = tmp_path / "outbox.db"
    with SMTPSink() as sink:
        queue(path, sink, total)
        with ExitStack() as stack:
            procs = [
                stack.enter_context(
                    child(DRAIN, sink.host, str(sink.port), str(path), str(batch), "300")
                )
                for _ in range(2)
            ]
            for proc in procs:
                assert read_line(proc) == "ready"
            for proc in procs:  # both start draining together
                assert proc.stdin is not None
                proc.stdin.write("go\n")
                proc.stdin.flush()
            results = [read_line(proc) for proc in procs]
            for proc in procs:
                assert proc.wait(timeout=60) == 0
        sent = [int(r.split()[1]) for r in results]
        assert sum(sent) == total
        assert all(n > 0 for n in sent), f"one process did all the work: {sent}"

    ids = message_ids(sink.messages)
    assert len(ids) == total
    assert len(set(ids)) == total  # no message twice
    with SQLiteOutbox(path) as outbox:
        assert set(ids) == {e.message_id for e in outbox.entries(limit=total)}
        assert outbox.counts()[OutboxStatus.SENT] == total
