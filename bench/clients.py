"""The clients the bench measures; each sends ``n`` 1 KiB text notifications and
returns the seconds it took (connection set-up included, process start-up not).

Every client sends the same kind of message: From ``bench@example.com``, To
``ops@example.com``, a short subject, and a 1 KiB ASCII text body.  Building
the message is part of the work measured (an application builds one per
notification), so ``smtplib`` builds an ``EmailMessage`` per message and
smtpnotify a ``Notification`` per message.  All traffic goes to 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import resource
import smtplib
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from email.message import EmailMessage
from pathlib import Path
from typing import Any

try:
    import smtpnotify
except ImportError:  # a clean clone that was not installed: use its src/ directory
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))
    import smtpnotify

from servers import Endpoint

from smtpnotify import MailConfig, Notification, Notifier, SendResult, SQLiteOutbox

SENDER = "bench@example.com"
RECIPIENT = "ops@example.com"
LOCAL_HOSTNAME = "bench.localhost"  # given to every client, so none looks up the host's FQDN
BODY_SIZE = 1024
POOL_SIZE = 4


@dataclass(frozen=True)
class Timing:
    """One run of a client: wall-clock seconds, and CPU seconds the client used.

    CPU time is this process's (all its threads) for the Python clients, and the
    child's for ``smtp-source``; the server's CPU is never included.  On a busy
    machine wall time includes waiting for a CPU; CPU time does not.
    """

    wall: float
    cpu: float


class Stopwatch:
    """Measures wall and CPU time from its creation to :meth:`stop`."""

    def __init__(self, *, children: bool = False) -> None:
        self._children = children
        self._cpu0 = self._cpu()
        self._wall0 = time.perf_counter()

    def _cpu(self) -> float:
        if self._children:
            usage = resource.getrusage(resource.RUSAGE_CHILDREN)
            return usage.ru_utime + usage.ru_stime
        return time.process_time()

    def stop(self) -> Timing:
        """The time since creation."""
        wall = time.perf_counter() - self._wall0
        return Timing(wall, self._cpu() - self._cpu0)


ClientFn = Callable[[Endpoint, int], Timing]


def _body(size: int) -> str:
    line = "The nightly job finished; nothing needs your attention. Status: OK.\n"
    text = (line * (size // len(line) + 1))[: size - 1]
    return text + "\n"


BODY = _body(BODY_SIZE)
assert len(BODY.encode()) == BODY_SIZE


def subject(i: int) -> str:
    """The subject of message number ``i``."""
    return f"Nightly job report #{i}"


def has_aiosmtplib() -> bool:
    """Whether aiosmtplib can be imported (it is optional)."""
    return importlib.util.find_spec("aiosmtplib") is not None


def has_pool() -> bool:
    """Whether this smtpnotify has ``MailConfig.max_connections`` (the connection pool)."""
    return "max_connections" in MailConfig.model_fields


def has_notify_many() -> bool:
    """Whether this smtpnotify has a batched ``Notifier.notify_many``."""
    return callable(getattr(Notifier, "notify_many", None))


def mail_config(endpoint: Endpoint, *, connections: int | None = None) -> MailConfig:
    """The smtpnotify settings for ``endpoint``; ``connections`` sets ``max_connections``."""
    extra: dict[str, Any] = {}
    if connections is not None:
        extra["max_connections"] = connections
    return MailConfig(
        host=endpoint.host,
        port=endpoint.port,
        sender=SENDER,
        timeout=60,
        local_hostname=LOCAL_HOSTNAME,
        **extra,
    )


def email_message(i: int) -> EmailMessage:
    """The message ``smtplib`` and aiosmtplib send: built the way applications do."""
    msg = EmailMessage()
    msg["From"] = SENDER
    msg["To"] = RECIPIENT
    msg["Subject"] = subject(i)
    msg.set_content(BODY)
    return msg


def notification(i: int) -> Notification:
    """The message smtpnotify sends."""
    return Notification(RECIPIENT, subject(i), text=BODY)


# -- the clients ------------------------------------------------------------------------
def run_smtplib(endpoint: Endpoint, n: int) -> Timing:
    """``smtplib.SMTP``, one connection reused, an ``EmailMessage`` per message."""
    watch = Stopwatch()
    with smtplib.SMTP(endpoint.host, endpoint.port, LOCAL_HOSTNAME, timeout=60) as smtp:
        for i in range(n):
            refused = smtp.send_message(email_message(i))
            if refused:
                raise RuntimeError(f"smtplib: refused {refused}")
    return watch.stop()


def run_aiosmtplib(endpoint: Endpoint, n: int) -> Timing:
    """aiosmtplib, one connection reused, an ``EmailMessage`` per message."""
    import aiosmtplib

    async def send_all() -> Timing:
        watch = Stopwatch()
        smtp = aiosmtplib.SMTP(
            hostname=endpoint.host,
            port=endpoint.port,
            local_hostname=LOCAL_HOSTNAME,
            use_tls=False,
            start_tls=False,
            timeout=60,
        )
        await smtp.connect()
        try:
            for i in range(n):
                refused, _ = await smtp.send_message(email_message(i))
                if refused:
                    raise RuntimeError(f"aiosmtplib: refused {refused}")
        except BaseException:
            smtp.close()  # no QUIT: the connection may be mid-reply
            raise
        await smtp.quit()
        return watch.stop()

    # Not asyncio.run(): its SIGINT handler turns Ctrl-C into a cancellation, which
    # aiosmtplib may report as an SMTP error, and the bench would carry on.  A plain
    # loop lets KeyboardInterrupt through (and servers.interrupted() catches the rest).
    loop = asyncio.new_event_loop()
    task = loop.create_task(send_all())
    try:
        return loop.run_until_complete(task)
    finally:
        if not task.done():  # interrupted: let the coroutine close its connection
            task.cancel()
            with contextlib.suppress(BaseException):
                loop.run_until_complete(task)
        loop.close()


def smtp_source_runner(binary: str) -> ClientFn:
    """Postfix's ``smtp-source`` (C): one session (``-s 1``) reused (``-d``), 1 KiB bodies."""

    def run(endpoint: Endpoint, n: int) -> Timing:
        argv = [
            binary,
            "-s", "1", "-d",
            "-l", str(BODY_SIZE),
            "-m", str(n),
            "-f", SENDER,
            "-t", RECIPIENT,
            "-M", LOCAL_HOSTNAME,
            f"{endpoint.host}:{endpoint.port}",
        ]  # fmt: skip
        watch = Stopwatch(children=True)
        done = subprocess.run(argv, capture_output=True, timeout=600, check=False)
        timing = watch.stop()
        if done.returncode != 0:
            raise RuntimeError(f"smtp-source failed: {done.stderr.decode(errors='replace')}")
        return timing

    return run


def _check(results: list[SendResult | smtpnotify.SMTPNotifyError]) -> None:
    errors = [r for r in results if not isinstance(r, SendResult)]
    if errors:
        raise RuntimeError(f"smtpnotify: {len(errors)} message(s) failed, first: {errors[0]!r}")


def smtpnotify_runner(connections: int | None = None) -> ClientFn:
    """``Notifier.send_many``; ``connections`` sets ``MailConfig.max_connections``."""

    def run(endpoint: Endpoint, n: int) -> Timing:
        with Notifier(mail_config(endpoint, connections=connections)) as notifier:
            watch = Stopwatch()
            results = notifier.send_many([notification(i) for i in range(n)])
            timing = watch.stop()
        _check(results)
        return timing

    return run


def cpu_split(endpoint: Endpoint, n: int) -> dict[str, float]:
    """CPU seconds for ``n`` messages: building them, ``Notifier.prepare``, and the rest of
    ``send_many`` (the SMTP session; this smtpnotify prepares inside ``send_many`` too,
    so the rest is ``send_many`` minus ``prepare``)."""
    with Notifier(mail_config(endpoint)) as notifier:
        watch = Stopwatch()
        notes = [notification(i) for i in range(n)]
        build = watch.stop().cpu
        watch = Stopwatch()
        for note in notes:
            notifier.prepare(note)
        prepare = watch.stop().cpu
        watch = Stopwatch()
        _check(notifier.send_many(notes))
        send_many = watch.stop().cpu
    return {
        "Notification(...)": build,
        "Notifier.prepare (serializer)": prepare,
        "send_many minus prepare (SMTP session)": max(0.0, send_many - prepare),
    }


# -- the outbox ---------------------------------------------------------------------------
@dataclass
class OutboxRun:
    """One round of the outbox measurement."""

    messages: int
    mode: str
    enqueue_seconds: float
    latencies: list[float] = field(repr=False)
    drain_seconds: float
    drain_cpu_seconds: float
    batched_enqueue_seconds: float | None = None


def run_outbox(endpoint: Endpoint, n: int, directory: Path) -> OutboxRun:
    """Queue ``n`` messages with ``notify()`` into a fresh ``SQLiteOutbox``, then drain it
    with 4 connections: one ``Notifier`` with ``max_connections=4`` when the pool exists,
    otherwise 4 ``Notifier`` workers (one connection each) sharing the outbox."""
    notes = [notification(i) for i in range(n)]
    batched: float | None = None
    if has_notify_many():
        with (
            SQLiteOutbox(directory / "batched.db") as outbox,
            Notifier(mail_config(endpoint), outbox) as notifier,
        ):
            start = time.perf_counter()
            notifier.notify_many(notes)  # type: ignore[attr-defined]
            batched = time.perf_counter() - start

    done = threading.Event()
    finished = 0
    trouble: list[str] = []
    lock = threading.Lock()

    def count(entry: object, *, bad: bool = False) -> None:
        nonlocal finished
        with lock:
            finished += 1
            if bad:
                trouble.append(repr(entry))
            if finished >= n:
                done.set()

    def failed(entry: object) -> None:
        count(entry, bad=True)

    hooks: dict[str, Any] = {"on_sent": count, "on_failed": failed, "on_expired": failed}
    with SQLiteOutbox(directory / "outbox.db") as outbox:
        with Notifier(mail_config(endpoint), outbox) as enqueuer:
            latencies = []
            start = time.perf_counter()
            for note in notes:
                t0 = time.perf_counter()
                enqueuer.notify(note)
                latencies.append(time.perf_counter() - t0)
            enqueue = time.perf_counter() - start
        if has_pool():
            mode = f"1 worker, max_connections={POOL_SIZE}"
            workers = [Notifier(mail_config(endpoint, connections=POOL_SIZE), outbox, **hooks)]
        else:
            mode = f"{POOL_SIZE} workers x 1 connection"
            workers = [Notifier(mail_config(endpoint), outbox, **hooks) for _ in range(POOL_SIZE)]
        try:
            watch = Stopwatch()
            for worker in workers:
                worker.start()
            if not done.wait(600):
                raise RuntimeError(f"outbox drain: only {finished} of {n} finished in 600 s")
            drain = watch.stop()
        finally:
            for worker in workers:
                worker.close()
        if trouble:
            raise RuntimeError(f"outbox drain: {len(trouble)} failed, first {trouble[0]}")
    for leftover in directory.iterdir():
        leftover.unlink()
    return OutboxRun(n, mode, enqueue, latencies, drain.wall, drain.cpu, batched)
