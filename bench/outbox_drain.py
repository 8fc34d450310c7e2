#!/usr/bin/env python3
"""How fast do smtpnotify's outboxes drain?  A benchmark anyone can run.

::

    python bench/outbox_drain.py                       # PostgreSQL at 127.0.0.1:5432, db test
    python bench/outbox_drain.py --dsn postgresql://me@127.0.0.1/mydb --messages 5000
    python bench/outbox_drain.py --workers 1,2,4,8 --batch-size 20
    python bench/outbox_drain.py --rounds 3             # on a busy machine: the median of 3
    python bench/outbox_drain.py --worker-options '-c synchronous_commit=off'

What it measures, every run against a fresh SMTP sink (``smtpnotify.testing.SMTPSink``,
aiosmtpd, in this process on 127.0.0.1) and a fresh outbox (a new table, dropped
afterwards; a new SQLite file in a temporary folder):

1. **The sink's ceiling**: plain ``smtplib`` sending the same messages over one
   connection, then over 4 connections (4 processes).  aiosmtpd handles every
   connection in one Python thread, so the sink is often the bottleneck; the
   drain rates are also shown as a fraction of the one-connection ceiling.
2. **Drain**: ``--messages`` notifications queued first, then 1, 2, 4 ...
   worker *processes*, each a ``Notifier`` with its worker thread
   (``notifier.start()``), on one ``PostgresOutbox`` table; and one worker on
   an ``SQLiteOutbox``.  Timed from the start signal until every entry is
   ``sent``.
3. **Enqueue**: ``notifier.notify()`` in this process, one message per call and
   per transaction (the rate, and the latency p50 / p99 of each call).

"sink CPU" is this process's CPU time during the run (nearly all of it is the
sink's thread) over the wall time: near 100 % means the sink was the limit.
"workers CPU" is the worker processes' CPU time over the wall time (200 % = two
cores busy).  Only 127.0.0.1 is contacted (and the --dsn you give).  Every wait
is bounded by --timeout; rows that ran out of time say so.  Nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import smtplib
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

try:
    import smtpnotify
except ImportError:  # run from a source checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    import smtpnotify

from smtpnotify import MailConfig, Notification, Notifier, OutboxStatus
from smtpnotify.outbox import Outbox, SQLiteOutbox

DEFAULT_DSN = os.environ.get(
    "TEST_POSTGRES_DSN", "postgresql://postgres@127.0.0.1:5432/test"
)
SENDER = "Bench <noreply@example.com>"
# A typical notification: a subject and a few lines of text (about 1 KB on the wire).
BODY = (
    "Hello,\n\nthe nightly export finished at 02:14 with 1,204 rows written and no errors.\n"
    "The report is attached to the job page; nothing needs doing.\n\n" + "-- \n" + "x" * 600 + "\n"
)


def notification(i: int) -> Notification:
    """The i-th benchmark message."""
    return Notification(to=f"user{i}@example.org", subject=f"Export {i} finished", text=BODY)


def mail_config(host: str = "127.0.0.1", port: int = 25) -> MailConfig:
    return MailConfig(host=host, port=port, sender=SENDER, timeout=30)


# --------------------------------------------------------------------------- children


def child_main(spec: dict[str, Any]) -> None:
    """A child process: a worker or a plain smtplib client; speaks JSON lines on stdio."""
    role = spec["role"]
    if role == "worker":
        child_worker(spec)
    elif role == "smtp":
        child_smtp(spec)
    else:  # pragma: no cover - a bug in this script
        raise SystemExit(f"unknown role {role!r}")


def say(**values: Any) -> None:
    print(json.dumps(values), flush=True)


def child_worker(spec: dict[str, Any]) -> None:
    outbox: Outbox
    if spec["kind"] == "postgres":
        from psycopg.conninfo import make_conninfo

        from smtpnotify.outbox.postgres import PostgresOutbox

        dsn = spec["dsn"]
        if spec.get("options"):
            dsn = make_conninfo(dsn, options=spec["options"])
        outbox = PostgresOutbox(dsn, table=spec["table"], pool_size=2)
    else:
        outbox = SQLiteOutbox(spec["path"])
    config = mail_config(spec["host"], spec["port"])
    with outbox, Notifier(config, outbox, batch_size=spec["batch"]) as notifier:
        outbox.counts()  # connected, table checked
        say(ready=True)
        if sys.stdin.readline().strip() != "go":
            return
        cpu = time.process_time()
        notifier.start()
        sys.stdin.readline()  # "stop", or the parent went away
        notifier.stop()
        say(cpu=time.process_time() - cpu)


def child_smtp(spec: dict[str, Any]) -> None:
    with Notifier(mail_config()) as renderer:
        prepared = [renderer.prepare(notification(i)) for i in spec["numbers"]]
    say(ready=True)
    if sys.stdin.readline().strip() != "go":
        return
    cpu = time.process_time()
    # local_hostname: smtplib would otherwise look up this machine's FQDN (DNS).
    with smtplib.SMTP(spec["host"], spec["port"], local_hostname="localhost", timeout=30) as smtp:
        for message in prepared:
            smtp.sendmail(message.sender, list(message.recipients), message.data)
    sys.stdin.readline()
    say(cpu=time.process_time() - cpu)


# --------------------------------------------------------------------------- the parent


@dataclass
class Row:
    """One line of the drain table."""

    run: str
    workers: str
    messages: int
    seconds: float | None = None
    done: int = 0
    sink_cpu: float | None = None
    workers_cpu: float | None = None
    note: str = ""

    @property
    def rate(self) -> float | None:
        if self.seconds is None or self.done < self.messages:
            return None
        return self.messages / self.seconds


def median_row(rows: list[Row]) -> Row:
    """The round with the median time (of those that finished), noting the spread."""
    finished = sorted((r for r in rows if r.rate is not None), key=lambda r: r.seconds or 0)
    if len(rows) == 1 or not finished:
        return rows[0]
    middle = finished[len(finished) // 2]
    rates = sorted(r.rate or 0 for r in finished)
    note = f"median of {len(finished)}, {rates[0]:.0f}..{rates[-1]:.0f} msg/s"
    if len(finished) < len(rows):
        note += f"; {len(rows) - len(finished)} round(s) ran out of time"
    return replace(middle, note="; ".join(n for n in (note, middle.note) if n))


@dataclass
class Enqueue:
    """Latencies of notify() calls into one outbox."""

    run: str
    seconds: list[float]
    wall: float


class Children:
    """Child processes of this script, talking JSON lines; always reaped."""

    def __init__(self, stack: ExitStack, specs: Sequence[dict[str, Any]], timeout: float) -> None:
        self.timeout = timeout
        self.procs: list[subprocess.Popen[str]] = []
        stack.callback(self.reap)
        for spec in specs:
            self.procs.append(
                subprocess.Popen(
                    [sys.executable, __file__, "--child", json.dumps(spec)],
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    text=True,
                )
            )
        for proc in self.procs:
            self.expect(proc, "ready")

    def expect(self, proc: subprocess.Popen[str], key: str) -> Any:
        line = read_line(proc.stdout, self.timeout)
        if not line:
            raise RuntimeError(f"a child process ended early (exit code {proc.wait()})")
        return json.loads(line)[key]

    def tell(self, word: str) -> None:
        for proc in self.procs:
            assert proc.stdin is not None
            proc.stdin.write(word + "\n")
            proc.stdin.flush()

    def finish(self) -> float:
        """Tell them to stop; return their CPU seconds since "go"."""
        self.tell("stop")
        cpu = sum(float(self.expect(proc, "cpu")) for proc in self.procs)
        for proc in self.procs:
            proc.wait(self.timeout)
        return cpu

    def reap(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
            proc.communicate()


def read_line(stream: IO[str] | None, timeout: float) -> str:
    """One line from a child's stdout, or TimeoutError."""
    import selectors

    assert stream is not None
    with selectors.DefaultSelector() as selector:
        selector.register(stream, selectors.EVENT_READ)
        if not selector.select(timeout):
            raise TimeoutError(f"no answer from a child process within {timeout} s")
    return stream.readline()


def wait_until(predicate: Callable[[], bool], timeout: float, pause: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(pause)
    return True


@contextmanager
def fresh_sink() -> Iterator[Any]:
    from smtpnotify.testing import SMTPSink

    with SMTPSink() as sink:
        yield sink


def progress(row: Row) -> Row:
    took = "-" if row.seconds is None else f"{row.seconds:.1f} s"
    print(f"  {row.run}, {row.workers} worker(s): {took} {row.note}", file=sys.stderr, flush=True)
    return row


def measure_sink(args: argparse.Namespace, connections: int) -> Row:
    n = args.messages
    row = Row(f"sink ceiling: smtplib, {connections} conn.", "-", n)
    numbers = list(range(n))
    with ExitStack() as stack:
        sink = stack.enter_context(fresh_sink())
        where = {"host": sink.host, "port": sink.port}
        specs = [
            {"role": "smtp", **where, "numbers": numbers[k::connections]}
            for k in range(connections)
        ]
        children = Children(stack, specs, args.timeout)
        cpu0, t0 = time.process_time(), time.perf_counter()
        children.tell("go")
        try:
            sink.wait_for(n, timeout=args.timeout)
        except TimeoutError:
            row.note = f"timeout after {args.timeout:g} s"
        row.seconds = time.perf_counter() - t0
        row.sink_cpu = (time.process_time() - cpu0) / row.seconds
        row.done = len(sink.messages)
        row.workers_cpu = children.finish() / row.seconds
    return progress(row)


def fill(notifier: Notifier, n: int) -> Enqueue:
    """Queue n messages with notify(), one call (and transaction) each; time every call."""
    latencies = []
    start = time.perf_counter()
    for i in range(n):
        message = notification(i)
        t = time.perf_counter()
        notifier.notify(message)
        latencies.append(time.perf_counter() - t)
    return Enqueue(type(notifier.outbox).__name__, latencies, time.perf_counter() - start)


def measure_drain(
    args: argparse.Namespace,
    label: str,
    workers: int,
    outbox: Outbox,
    worker_spec: dict[str, Any],
    enqueues: list[Enqueue],
) -> Row:
    n: int = args.messages
    row = Row(label, str(workers), n)
    with ExitStack() as stack:
        sink = stack.enter_context(fresh_sink())
        with Notifier(mail_config(sink.host, sink.port), outbox) as producer:
            enqueues.append(fill(producer, n))
        spec = worker_spec | {"host": sink.host, "port": sink.port, "batch": args.batch_size}
        children = Children(stack, [spec] * workers, args.timeout)

        def all_sent() -> bool:
            return outbox.counts()[OutboxStatus.SENT] >= n

        cpu0, t0 = time.process_time(), time.perf_counter()
        children.tell("go")
        try:
            sink.wait_for(n, timeout=args.timeout)  # sleeps on the sink's condition
            finished = wait_until(all_sent, args.timeout)
        except TimeoutError:
            finished = False
        row.seconds = time.perf_counter() - t0
        row.sink_cpu = (time.process_time() - cpu0) / row.seconds
        row.done = outbox.counts()[OutboxStatus.SENT]
        if not finished:
            row.note = f"timeout after {args.timeout:g} s"
        row.workers_cpu = children.finish() / row.seconds
        duplicates = len(sink.messages) - row.done
        if duplicates:
            row.note = (row.note + f"; {duplicates} sent twice").lstrip("; ")
    return progress(row)


def postgres_rows(
    args: argparse.Namespace, enqueues: list[Enqueue], info: dict[str, str]
) -> list[Row]:
    try:
        import psycopg
        from psycopg import sql

        from smtpnotify.outbox.postgres import PostgresOutbox
    except ImportError as exc:
        info["PostgreSQL"] = f"skipped: {exc} (pip install 'smtpnotify[postgres]')"
        return []
    try:
        with psycopg.connect(args.dsn, connect_timeout=3, autocommit=True) as conn:
            version = conn.execute("SHOW server_version").fetchone()
            sync = conn.execute("SHOW synchronous_commit").fetchone()
            fsync = conn.execute("SHOW fsync").fetchone()
    except psycopg.Error as exc:
        reason = " ".join(str(exc).split())
        info["PostgreSQL"] = (
            f"skipped: not reachable ({type(exc).__name__}: {reason}); "
            "give --dsn or set TEST_POSTGRES_DSN"
        )
        return []
    info["PostgreSQL"] = (
        f"{version[0] if version else '?'} (synchronous_commit={sync[0] if sync else '?'}, "
        f"fsync={fsync[0] if fsync else '?'})"
    )
    rows = []
    for workers in args.workers:
        table = f"smtpnotify_bench_{uuid.uuid4().hex[:12]}"
        try:
            with PostgresOutbox(args.dsn, table=table, create=True) as outbox:
                outbox.create_schema()
                spec = {
                    "role": "worker",
                    "kind": "postgres",
                    "dsn": args.dsn,
                    "table": table,
                    "options": args.worker_options,
                }
                label = "PostgresOutbox" + (" (worker options)" if args.worker_options else "")
                rows.append(measure_drain(args, label, workers, outbox, spec, enqueues))
        finally:
            with psycopg.connect(args.dsn, autocommit=True) as conn:
                conn.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(sql.Identifier(table)))
    return rows


def sqlite_row(args: argparse.Namespace, enqueues: list[Enqueue]) -> Row:
    folder = tempfile.mkdtemp(prefix="smtpnotify-bench-")
    try:
        path = str(Path(folder) / "outbox.db")
        with SQLiteOutbox(path) as outbox:
            spec = {"role": "worker", "kind": "sqlite", "path": path}
            return measure_drain(args, "SQLiteOutbox", 1, outbox, spec, enqueues)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


# --------------------------------------------------------------------------- output


def percentile(values: Sequence[float], q: int) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else 0


def print_report(
    info: dict[str, str], rows: list[Row], ceiling: float | None, enqueues: list[Enqueue]
) -> None:
    for key, value in info.items():
        print(f"{key + ':':<12} {value}")
    print()

    def pct(value: float | None) -> str:
        return "-" if value is None else f"{value * 100:.0f} %"

    header = (
        f"{'run':<34} {'workers':>7} {'messages':>8} {'seconds':>8} {'msg/s':>7} "
        f"{'vs sink':>7} {'sink CPU':>8} {'workers CPU':>11}  note"
    )
    print(header)
    print("-" * len(header))
    for row in rows:
        rate = row.rate
        print(
            f"{row.run:<34} {row.workers:>7} {row.messages:>8} "
            f"{'-' if row.seconds is None else f'{row.seconds:.2f}':>8} "
            f"{'-' if rate is None else f'{rate:.0f}':>7} "
            f"{'-' if rate is None or not ceiling else f'{rate / ceiling:.2f}':>7} "
            f"{pct(row.sink_cpu):>8} {pct(row.workers_cpu):>11}  {row.note}".rstrip()
        )
    print()
    header = f"{'notify() into':<34} {'calls':>8} {'calls/s':>8} {'p50 ms':>8} {'p99 ms':>8}"
    print(header)
    print("-" * len(header))
    by_outbox: dict[str, list[Enqueue]] = {}
    for e in enqueues:
        by_outbox.setdefault(e.run, []).append(e)
    for name, runs in by_outbox.items():
        latencies = [s for e in runs for s in e.seconds]
        wall = sum(e.wall for e in runs)
        print(
            f"{name:<34} {len(latencies):>8} {len(latencies) / wall:>8.0f} "
            f"{percentile(latencies, 50) * 1000:>8.2f} {percentile(latencies, 99) * 1000:>8.2f}"
        )


def loadavg() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg()) + " (1, 5, 15 min)"
    except OSError:  # pragma: no cover - not on every platform
        return "?"


def machine_info(args: argparse.Namespace) -> dict[str, str]:
    import aiosmtpd

    return {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs ({platform.platform()})",
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "smtpnotify": f"{smtpnotify.__version__}, aiosmtpd {aiosmtpd.__version__}",
        "load before": loadavg(),
        "settings": f"{args.messages} messages, batch_size={args.batch_size}, "
        f"PostgresOutbox pool_size=2 per worker"
        + (f", worker options {args.worker_options!r}" if args.worker_options else ""),
    }


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Drain throughput of PostgresOutbox (1, 2, 4 workers) and SQLiteOutbox "
        "into a local SMTP sink, and notify() enqueue rate.",
    )
    parser.add_argument(
        "--dsn", default=DEFAULT_DSN, help="PostgreSQL conninfo (default: %(default)s)"
    )
    parser.add_argument(
        "--messages", type=int, default=2000, help="messages per run (default 2000)"
    )
    parser.add_argument(
        "--workers",
        type=lambda s: [int(x) for x in s.split(",")],
        default=[1, 2, 4],
        help="worker process counts for PostgresOutbox (default 1,2,4)",
    )
    parser.add_argument("--batch-size", type=int, default=10, help="Notifier batch_size (10)")
    parser.add_argument(
        "--timeout", type=float, default=120.0, help="seconds any one wait may take (120)"
    )
    parser.add_argument(
        "--rounds", type=int, default=1, help="repeat everything; show the median round (1)"
    )
    parser.add_argument("--no-postgres", action="store_true", help="skip the PostgreSQL rows")
    parser.add_argument(
        "--worker-options",
        default="",
        metavar="OPTIONS",
        help="libpq 'options' for the workers' connections only, e.g. "
        "'-c synchronous_commit=off' (notify() in this process keeps the server's setting)",
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.messages < 4 or min(args.workers) < 1 or args.batch_size < 1 or args.rounds < 1:
        parser.error("--messages must be at least 4; --workers, --batch-size, --rounds at least 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        child_main(json.loads(args.child))
        return 0
    try:
        import aiosmtpd  # noqa: F401
    except ImportError:
        print("the sink needs aiosmtpd: pip install 'smtpnotify[testing]'", file=sys.stderr)
        return 2
    info = machine_info(args)
    enqueues: list[Enqueue] = []
    print(
        f"running: sink ceiling, SQLite, PostgreSQL x {args.workers} workers ...",
        file=sys.stderr,
        flush=True,
    )
    rounds: list[list[Row]] = []
    for number in range(args.rounds):
        if args.rounds > 1:
            print(f"round {number + 1} of {args.rounds}", file=sys.stderr, flush=True)
        rows = [measure_sink(args, 1), measure_sink(args, 4), sqlite_row(args, enqueues)]
        if args.no_postgres:
            info["PostgreSQL"] = "skipped (--no-postgres)"
        else:
            rows += postgres_rows(args, enqueues, info)
        rounds.append(rows)
    rows = [median_row(list(same)) for same in zip(*rounds, strict=True)]
    ceiling = rows[0].rate
    info["load after"] = loadavg()
    print_report(info, rows, ceiling, enqueues)
    return 0


if __name__ == "__main__":
    sys.exit(main())
