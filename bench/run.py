"""smtpnotify's benchmark: throughput and memory against smtplib, aiosmtplib and Postfix's
smtp-source, on loopback and through a 20 ms round-trip delay proxy.

    python bench/run.py                    # full run, about 2 minutes
    python bench/run.py --quick            # a smaller run, under 30 seconds
    python bench/run.py --rounds 7 --messages 1000 --json results.json
    python bench/run.py --profile          # cProfile of Notifier.send_many, nothing else

It starts Postfix's ``smtp-sink`` on a free port of 127.0.0.1 (or, when Postfix
is not installed, a small Python sink, and says so), a delay proxy in front of
it, runs every client in turn over several rounds (the order rotates every
round), and prints the median rate of each client, its ratio to smtplib's
median *measured in the same run*, and the project's targets, MET or NOT MET.
Nothing is installed, and no traffic leaves 127.0.0.1.  Every child process is
stopped on exit, Ctrl-C included.  See bench/README.md.
"""

from __future__ import annotations

import argparse
import cProfile
import datetime as dt
import io
import json
import os
import platform
import pstats
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import clients
from clients import ClientFn
from servers import (
    BENCH_DIR,
    INSTALL_HINT,
    SMTP_SINK_PATHS,
    SMTP_SOURCE_PATHS,
    Children,
    Endpoint,
    find_tool,
    interrupted,
)

import smtpnotify

TARGET_A = 2.0
TARGET_B = 6.0
TARGET_OUTBOX = 1.0
SMTPLIB = "smtplib, 1 connection, EmailMessage per message"
AIOSMTPLIB = "aiosmtplib, 1 connection, EmailMessage per message"
SMTP_SOURCE = "Postfix smtp-source (C), 1 session reused"
SEND_MANY = "smtpnotify send_many, 1 connection"
SEND_MANY_POOL = f"smtpnotify send_many, max_connections={clients.POOL_SIZE}"


# -- results ------------------------------------------------------------------------------
@dataclass
class Row:
    """One client in one scenario: the seconds of every round."""

    scenario: str
    client: str
    messages: int
    seconds: list[float] = field(default_factory=list)
    cpu_seconds: list[float] = field(default_factory=list)
    error: str | None = None

    @property
    def rates(self) -> list[float]:
        """Messages per second of every round."""
        return [self.messages / s for s in self.seconds if s > 0]

    @property
    def cpu_ms_per_message(self) -> float | None:
        """The median CPU time the client spent per message, in milliseconds."""
        if not self.cpu_seconds:
            return None
        return 1000 * statistics.median(self.cpu_seconds) / self.messages

    @property
    def median(self) -> float | None:
        """The median rate (msg/s), or ``None`` when no round succeeded."""
        rates = self.rates
        return statistics.median(rates) if rates else None


@dataclass
class Target:
    """A target from issue 5 and what this run measured."""

    name: str
    goal: str
    measured: str
    met: bool | None  # None: could not be measured in this run
    note: str = ""


@dataclass
class Results:
    """Everything one run measured (what ``--json`` writes)."""

    machine: dict[str, str]
    settings: dict[str, Any]
    rows: list[Row] = field(default_factory=list)
    outbox: dict[str, Any] | None = None
    memory: list[dict[str, Any]] = field(default_factory=list)
    targets: list[Target] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def row(self, scenario: str, client: str) -> Row | None:
        """The row of ``client`` in ``scenario``, if it was measured."""
        for row in self.rows:
            if row.scenario == scenario and row.client == client:
                return row
        return None

    def ratio(self, scenario: str, client: str) -> float | None:
        """``client``'s median rate over smtplib's in the same scenario."""
        row, base = self.row(scenario, client), self.row(scenario, SMTPLIB)
        if row is None or base is None or row.median is None or not base.median:
            return None
        return row.median / base.median

    def cpu_ratio(self, scenario: str, client: str) -> float | None:
        """smtplib's CPU time per message over ``client``'s (robust on a busy machine)."""
        row, base = self.row(scenario, client), self.row(scenario, SMTPLIB)
        if row is None or base is None:
            return None
        ours, theirs = row.cpu_ms_per_message, base.cpu_ms_per_message
        return theirs / ours if ours and theirs else None


# -- the machine --------------------------------------------------------------------------
def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _postfix_version() -> str:
    try:
        done = subprocess.run(
            ["postconf", "-d", "-h", "mail_version"], capture_output=True, timeout=5, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return done.stdout.decode().strip() or "unknown"


def _version(module: str) -> str:
    try:
        from importlib.metadata import version

        return version(module)
    except Exception:
        return "not installed"


def machine_info(sink: str, outbox_dir: Path) -> dict[str, str]:
    """What the figures depend on: CPU, Python, versions, where the outbox lived."""
    return {
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": _cpu_model(),
        "nproc": str(os.cpu_count() or "?"),
        "os": f"{platform.system()} {platform.release()}",
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "smtpnotify": smtpnotify.__version__,
        "aiosmtplib": _version("aiosmtplib"),
        "postfix": _postfix_version() if sink == "smtp-sink" else "not installed",
        "server": sink,
        "load_at_start": _load(),
        "outbox_dir": f"{outbox_dir} ({_filesystem(outbox_dir)})",
    }


def _load() -> str:
    """The 1-minute load average (other work on the machine makes figures noisy)."""
    try:
        return f"{os.getloadavg()[0]:.2f}"
    except OSError:
        return "unknown"


def _filesystem(path: Path) -> str:
    """The file system type of ``path`` (from /proc/mounts), since fsync speed depends on it."""
    best, kind = "", "unknown"
    try:
        with open("/proc/mounts") as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 3 and str(path).startswith(parts[1]) and len(parts[1]) > len(best):
                    best, kind = parts[1], parts[2]
    except OSError:
        pass
    return kind


# -- measuring ----------------------------------------------------------------------------
def log(text: str) -> None:
    """Progress on stderr, so stdout holds only the report."""
    print(text, file=sys.stderr, flush=True)


def measure(
    scenario: str,
    endpoint: Endpoint,
    contenders: Sequence[tuple[str, ClientFn]],
    messages: int,
    rounds: int,
    warmup: int,
) -> list[Row]:
    """Run every contender once per round, rotating the order each round."""
    rows = {name: Row(scenario, name, messages) for name, _ in contenders}
    for name, fn in contenders:  # warm-up: imports, caches, the server's first accept
        try:
            fn(endpoint, warmup)
        except Exception as exc:
            if interrupted():
                raise KeyboardInterrupt from exc
            rows[name].error = f"{type(exc).__name__}: {exc}"
            log(f"  {scenario}: {name}: FAILED in warm-up: {rows[name].error}")
    for r in range(rounds):
        shift = r % len(contenders)
        order = list(contenders[shift:]) + list(contenders[:shift])
        parts = []
        for name, fn in order:
            row = rows[name]
            if row.error:
                continue
            try:
                timing = fn(endpoint, messages)
            except Exception as exc:
                if interrupted():
                    raise KeyboardInterrupt from exc
                row.error = f"{type(exc).__name__}: {exc}"
                log(f"  {scenario}: {name}: FAILED: {row.error}")
                continue
            if interrupted():
                raise KeyboardInterrupt
            row.seconds.append(timing.wall)
            row.cpu_seconds.append(timing.cpu)
            parts.append(f"{name.split(',')[0]} {messages / timing.wall:,.0f}")
        log(f"  {scenario} round {r + 1}/{rounds}: " + "; ".join(parts) + " msg/s")
    return [rows[name] for name, _ in contenders]


def measure_outbox(
    endpoint: Endpoint, messages: int, rounds: int, directory: Path
) -> dict[str, Any]:
    """The outbox figures: notify() latency and rate, and the drain rate (medians of rounds)."""
    runs: list[clients.OutboxRun] = []
    clients.run_outbox(endpoint, max(10, messages // 10), directory)  # warm-up
    for r in range(rounds):
        run = clients.run_outbox(endpoint, messages, directory)
        runs.append(run)
        log(
            f"  outbox round {r + 1}/{rounds}: enqueue {messages / run.enqueue_seconds:,.0f}/s, "
            f"drain {messages / run.drain_seconds:,.0f} msg/s ({run.mode})"
        )
    latencies = sorted(x for run in runs for x in run.latencies)
    batched = [
        messages / run.batched_enqueue_seconds for run in runs if run.batched_enqueue_seconds
    ]
    return {
        "messages": messages,
        "mode": runs[0].mode,
        "enqueue_rate": statistics.median(messages / run.enqueue_seconds for run in runs),
        "notify_p50_ms": 1000 * _percentile(latencies, 50),
        "notify_p99_ms": 1000 * _percentile(latencies, 99),
        "notify_max_ms": 1000 * latencies[-1],
        "batched_enqueue_rate": statistics.median(batched) if batched else None,
        "drain_rate": statistics.median(messages / run.drain_seconds for run in runs),
        "drain_cpu_ms_per_message": 1000
        * statistics.median(run.drain_cpu_seconds for run in runs)
        / messages,
        "drain_rates": [messages / run.drain_seconds for run in runs],
    }


def _percentile(sorted_values: Sequence[float], p: float) -> float:
    index = min(len(sorted_values) - 1, max(0, round(p / 100 * len(sorted_values)) - 1))
    return sorted_values[index]


def measure_memory(
    endpoint: Endpoint, mib: float, names: Sequence[str], *, traced: bool
) -> list[dict[str, Any]]:
    """Run ``memory_probe.py`` once per client, each in its own process (side by side:
    a process's memory figures do not depend on how fast it runs)."""
    procs = []
    for name in names:
        argv = [
            sys.executable,
            str(BENCH_DIR / "memory_probe.py"),
            "--client", name,
            "--port", str(endpoint.port),
            "--mib", str(mib),
        ]  # fmt: skip
        if not traced:
            argv.append("--no-tracemalloc")
        procs.append((name, subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)))
    results = []
    try:
        for name, proc in procs:
            try:
                out, err = proc.communicate(timeout=300)
            except subprocess.TimeoutExpired:
                log(f"  memory: {name}: timed out")
                continue
            if proc.returncode != 0:
                log(f"  memory: {name}: FAILED: {err.decode(errors='replace')[-800:]}")
                continue
            result: dict[str, Any] = json.loads(out.decode().strip().splitlines()[-1])
            results.append(result)
            log(
                f"  memory: {name}: +{result['growth_mib']:.1f} MiB during the send, "
                f"process peak {result['peak_mib']:.0f} MiB"
            )
    finally:
        for _, proc in procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
            for stream in (proc.stdout, proc.stderr):
                if stream is not None:
                    stream.close()
    return results


# -- targets and the report ---------------------------------------------------------------
def _fmt_ratio(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}x"


def evaluate(results: Results) -> list[Target]:
    """The issue's targets against what was measured."""
    targets = []
    a = results.ratio("loopback", SEND_MANY)
    targets.append(
        Target(
            "A  loopback",
            f"send_many, 1 connection >= {TARGET_A:.1f}x smtplib",
            _fmt_ratio(a),
            None if a is None else a >= TARGET_A,
            ""
            if a is None
            else f"CPU time per message: {_fmt_ratio(results.cpu_ratio('loopback', SEND_MANY))}",
        )
    )
    b = results.ratio("rtt", SEND_MANY_POOL)
    single = results.ratio("rtt", SEND_MANY)
    if b is None:
        note = "no MailConfig.max_connections yet" if not clients.has_pool() else "not measured"
        targets.append(
            Target(
                "B  20 ms RTT",
                f"send_many, max_connections={clients.POOL_SIZE} >= {TARGET_B:.0f}x smtplib",
                "n/a" if single is None else f"{_fmt_ratio(single)} (1 connection)",
                False if single is not None and not clients.has_pool() else None,
                note,
            )
        )
    else:
        targets.append(
            Target(
                "B  20 ms RTT",
                f"send_many, max_connections={clients.POOL_SIZE} >= {TARGET_B:.0f}x smtplib",
                _fmt_ratio(b),
                b >= TARGET_B,
            )
        )
    base = results.row("loopback", SMTPLIB)
    if results.outbox is not None and base is not None and base.median:
        ratio = results.outbox["drain_rate"] / base.median
        targets.append(
            Target(
                "Outbox",
                f"SQLiteOutbox drained with {clients.POOL_SIZE} connections "
                f">= {TARGET_OUTBOX:.1f}x smtplib loopback",
                _fmt_ratio(ratio),
                ratio >= TARGET_OUTBOX,
                results.outbox["mode"],
            )
        )
    mem = {m["client"]: m for m in results.memory}
    if "smtplib" in mem and "smtpnotify" in mem:
        ours, theirs = mem["smtpnotify"]["growth_mib"], mem["smtplib"]["growth_mib"]
        targets.append(
            Target(
                "Memory",
                f"{results.settings['attachment_mib']:g} MiB attachment: "
                "peak RSS growth below smtplib's",
                f"+{ours:.1f} MiB vs +{theirs:.1f} MiB",
                ours < theirs,
            )
        )
    return targets


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]], right: set[int]) -> str:
    widths = [max([len(h), *(len(r[i]) for r in rows)]) for i, h in enumerate(headers)]

    def line(cells: Sequence[str]) -> str:
        padded = (
            c.rjust(w) if i in right else c.ljust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        )
        return "  ".join(padded).rstrip()

    return "\n".join([line(headers), line(["-" * w for w in widths]), *(line(r) for r in rows)])


def render(results: Results) -> str:
    """The human-readable report."""
    out = io.StringIO()
    m = results.machine
    print(f"smtpnotify benchmark, {m['date']}", file=out)
    print(
        f"{m['cpu']}, {m['nproc']} CPUs, {m['os']}, {m['python']}; smtpnotify {m['smtpnotify']}, "
        f"aiosmtplib {m['aiosmtplib']}, Postfix {m['postfix']}",
        file=out,
    )
    s = results.settings
    print(
        f"load average {m['load_at_start']} at start, {m.get('load_at_end', '?')} at end; "
        f"outbox file in {m['outbox_dir']}",
        file=out,
    )
    print(
        f"server: {m['server']}; {s['rounds']} round{'s' if s['rounds'] > 1 else ''}; "
        f"{s['messages']} messages per round on "
        f"loopback, {s['rtt_messages']} through the proxy ({s['rtt_ms']:g} ms RTT); "
        f"1 KiB text bodies; medians",
        file=out,
    )
    for note in results.notes:
        print(f"NOTE: {note}", file=out)
    print(file=out)
    labels = {"loopback": "loopback", "rtt": f"{s['rtt_ms']:g} ms RTT"}
    table_rows = []
    for row in results.rows:
        rates = row.rates
        if row.error and not rates:
            table_rows.append(
                [labels[row.scenario], row.client, "failed", "", "", "", row.error[:60]]
            )
            continue
        ratio = results.ratio(row.scenario, row.client)
        cpu = row.cpu_ms_per_message
        table_rows.append(
            [
                labels[row.scenario],
                row.client,
                f"{row.median:,.1f}" if row.median is not None else "-",
                f"{min(rates):,.1f}-{max(rates):,.1f}" if rates else "-",
                _fmt_ratio(ratio),
                "-" if cpu is None else f"{cpu:.3f}",
                row.error or "",
            ]
        )
    if table_rows:
        print(
            _table(
                ["scenario", "client", "msg/s", "min-max", "vs smtplib", "CPU ms/msg", ""],
                table_rows,
                right={2, 3, 4, 5},
            ),
            file=out,
        )
    if results.outbox is not None:
        o = results.outbox
        print(file=out)
        print(f"Outbox (SQLiteOutbox, {o['messages']} messages, loopback):", file=out)
        print(
            f"  notify(): {o['enqueue_rate']:,.0f} msg/s enqueued one by one; latency "
            f"p50 {o['notify_p50_ms']:.2f} ms, p99 {o['notify_p99_ms']:.2f} ms, "
            f"max {o['notify_max_ms']:.2f} ms",
            file=out,
        )
        if o["batched_enqueue_rate"] is not None:
            print(f"  notify_many(): {o['batched_enqueue_rate']:,.0f} msg/s", file=out)
        print(
            f"  drain: {o['drain_rate']:,.0f} msg/s ({o['mode']}), "
            f"{o['drain_cpu_ms_per_message']:.2f} ms CPU per message",
            file=out,
        )
    if results.memory:
        print(file=out)
        print(
            f"Memory: one message with a {s['attachment_mib']:g} MiB attachment, "
            "each client in a fresh process:",
            file=out,
        )
        mem_rows = [
            [
                m_["client"],
                f"+{m_['growth_mib']:.1f}",
                f"{m_['peak_mib']:.0f}",
                "-" if m_["traced_peak_mib"] is None else f"{m_['traced_peak_mib']:.1f}",
                f"{m_['seconds']:.2f}",
            ]
            for m_ in results.memory
        ]
        print(
            _table(
                ["client", "RSS growth MiB", "process peak MiB", "tracemalloc peak MiB", "s"],
                mem_rows,
                right={1, 2, 3, 4},
            ),
            file=out,
        )
    print(file=out)
    print("Targets (issue 5):", file=out)
    target_rows = [
        [
            t.name,
            t.goal,
            t.measured,
            "MET" if t.met else ("NOT MET" if t.met is False else "not measured"),
            t.note,
        ]
        for t in results.targets
    ]
    print(_table(["target", "goal", "measured", "status", ""], target_rows, right=set()), file=out)
    return out.getvalue()


# -- the command --------------------------------------------------------------------------
def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """The command line (see ``--help``)."""
    parser = argparse.ArgumentParser(
        description="Benchmark smtpnotify against smtplib, aiosmtplib and Postfix smtp-source.",
        epilog="See bench/README.md. Traffic goes to 127.0.0.1 only.",
    )
    parser.add_argument("--rounds", type=int, help="rounds per scenario (default 5; --quick 2)")
    parser.add_argument(
        "--messages", type=int, help="messages per loopback run (default 500; --quick 200)"
    )
    parser.add_argument(
        "--rtt-messages",
        type=int,
        help="messages per run through the proxy (default 30; --quick 15)",
    )
    parser.add_argument("--quick", action="store_true", help="a small run, under 30 seconds")
    parser.add_argument("--delay-ms", type=float, default=10.0, help="proxy delay each way")
    parser.add_argument("--attachment-mib", type=float, default=20.0, help="memory test size")
    parser.add_argument(
        "--only",
        default="loopback,rtt,outbox,memory",
        help="comma-separated parts to run: loopback, rtt, outbox, memory",
    )
    parser.add_argument(
        "--outbox-dir",
        type=Path,
        default=None,
        help="where the SQLite outbox file goes (default: the system temp dir; fsync speed counts)",
    )
    parser.add_argument(
        "--python-sink", action="store_true", help="use the Python sink even if smtp-sink exists"
    )
    parser.add_argument("--json", type=Path, help="also write the results as JSON to this file")
    parser.add_argument(
        "--profile", action="store_true", help="only profile Notifier.send_many with cProfile"
    )
    args = parser.parse_args(argv)
    quick = args.quick
    args.rounds = args.rounds or (2 if quick else 5)
    args.messages = args.messages or (200 if quick else 500)
    args.rtt_messages = args.rtt_messages or (15 if quick else 30)
    args.parts = {p.strip() for p in args.only.split(",") if p.strip()}
    unknown = args.parts - {"loopback", "rtt", "outbox", "memory"}
    if unknown:
        parser.error(f"--only: unknown part(s) {', '.join(sorted(unknown))}")
    if args.rounds < 1 or args.messages < 1 or args.rtt_messages < 1:
        parser.error("--rounds, --messages and --rtt-messages must be at least 1")
    if "rtt" in args.parts or "outbox" in args.parts:
        args.parts.add("loopback")  # their ratios need smtplib's loopback rate
    return args


def start_sink(children: Children, args: argparse.Namespace) -> Endpoint:
    """smtp-sink when installed (and not ``--python-sink``), else the Python sink."""
    binary = None if args.python_sink else find_tool("smtp-sink", SMTP_SINK_PATHS)
    if binary is not None:
        return children.smtp_sink(binary)
    if not args.python_sink:
        log(INSTALL_HINT)
        log("Falling back to the Python sink (bench/pysink.py) for the Python clients.")
    return children.python_sink()


def profile(args: argparse.Namespace) -> int:
    """Profile ``send_many`` of ``--messages`` notifications on loopback; print the top costs,
    and (unprofiled) how the CPU time splits between building, ``prepare`` and the wire."""
    n = args.messages
    with Children() as children:
        endpoint = start_sink(children, args)
        run = clients.smtpnotify_runner()
        run(endpoint, 20)
        split = clients.cpu_split(endpoint, n)
        profiler = cProfile.Profile()
        profiler.enable()
        seconds = run(endpoint, n).wall
        profiler.disable()
    print(f"CPU per message, unprofiled, {n} notifications over one connection:")
    total = sum(split.values())
    for part, cpu in split.items():
        print(f"  {part:<40} {1e6 * cpu / n:8.0f} us  {100 * cpu / total:5.1f} %")
    print(f"  {'total':<40} {1e6 * total / n:8.0f} us")
    print(f"\nsend_many of {n} notifications under cProfile: {seconds:.3f} s")
    for order in ("tottime", "cumulative"):
        buffer = io.StringIO()
        stats = pstats.Stats(profiler, stream=buffer)
        stats.strip_dirs().sort_stats(order).print_stats(25)
        print(f"\n=== top 25 by {order} ===")
        print(buffer.getvalue().strip())
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark and print the report."""
    args = parse_args(argv)
    if args.profile:
        return profile(args)
    started = time.monotonic()
    source = find_tool("smtp-source", SMTP_SOURCE_PATHS)
    with (
        Children() as children,
        tempfile.TemporaryDirectory(prefix="smtpnotify-bench-", dir=args.outbox_dir) as tmp,
    ):
        endpoint = start_sink(children, args)
        results = Results(
            machine=machine_info(endpoint.kind, Path(tmp)),
            settings={
                "rounds": args.rounds,
                "messages": args.messages,
                "rtt_messages": args.rtt_messages,
                "rtt_ms": 2 * args.delay_ms,
                "attachment_mib": args.attachment_mib,
                "quick": args.quick,
            },
        )
        if endpoint.kind != "smtp-sink":
            results.notes.append(
                "Postfix's smtp-sink was not used: a Python sink served the clients. It shares "
                "the CPUs with them, which lowers and compresses every figure; use smtp-sink "
                "for figures to publish."
                + ("" if source else " smtp-source is not installed: its rows are skipped.")
                + ("" if args.python_sink else " " + INSTALL_HINT.replace("\n", " "))
            )
        contenders: list[tuple[str, ClientFn]] = [(SMTPLIB, clients.run_smtplib)]
        if clients.has_aiosmtplib():
            contenders.append((AIOSMTPLIB, clients.run_aiosmtplib))
        else:
            results.notes.append("aiosmtplib is not installed: its rows are skipped.")
        if source is not None:
            contenders.append((SMTP_SOURCE, clients.smtp_source_runner(source)))
        elif endpoint.kind == "smtp-sink":
            results.notes.append("smtp-source is not installed: its rows are skipped.")
        contenders.append((SEND_MANY, clients.smtpnotify_runner()))
        if clients.has_pool():
            contenders.append((SEND_MANY_POOL, clients.smtpnotify_runner(clients.POOL_SIZE)))
        else:
            results.notes.append(
                "MailConfig has no max_connections yet: the pooled smtpnotify rows are skipped."
            )

        log(f"server: {endpoint.kind} on 127.0.0.1:{endpoint.port}")
        if "loopback" in args.parts:
            log("loopback:")
            results.rows += measure(
                "loopback", endpoint, contenders, args.messages, args.rounds, warmup=20
            )
        if "rtt" in args.parts:
            proxy = children.delay_proxy(endpoint, args.delay_ms)
            log(f"through the delay proxy on 127.0.0.1:{proxy.port} ({proxy.kind}):")
            results.rows += measure(
                "rtt", proxy, contenders, args.rtt_messages, args.rounds, warmup=2
            )
        if "outbox" in args.parts:
            log("outbox:")
            outbox_dir = Path(tmp)
            results.outbox = measure_outbox(endpoint, args.messages, args.rounds, outbox_dir)
        if "memory" in args.parts:
            log("memory:")
            names = ["smtplib", *(["aiosmtplib"] if clients.has_aiosmtplib() else []), "smtpnotify"]
            results.memory = measure_memory(
                endpoint, args.attachment_mib, names, traced=not args.quick
            )
    results.machine["load_at_end"] = _load()
    busy = [
        float(x)
        for x in (results.machine["load_at_start"], results.machine["load_at_end"])
        if x != "unknown"
    ]
    cpus = os.cpu_count() or 1
    if busy and max(busy) > 0.5 * cpus:
        results.notes.append(
            f"the machine was busy (load average {max(busy):.1f} on {cpus} CPUs): wall-clock "
            "rates are noisy; the ratios come from alternating rounds, and the CPU ms/msg "
            "column is less sensitive to other load"
        )
    results.targets = evaluate(results)
    results.settings["seconds"] = round(time.monotonic() - started, 1)
    print(render(results))
    log(f"(the run took {results.settings['seconds']:.0f} s)")
    if args.json is not None:
        args.json.write_text(json.dumps(asdict(results), indent=2, default=str) + "\n")
        log(f"results written to {args.json}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        log("interrupted; every child process was stopped")
        sys.exit(130)
