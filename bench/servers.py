"""The bench's child processes: the SMTP sink and the delay proxy, on 127.0.0.1 only.

:class:`Children` starts them and kills every one of them on exit, whatever
ends the bench (normal end, an exception, Ctrl-C, SIGTERM).  On Linux the
children also get ``PR_SET_PDEATHSIG``, so even a ``kill -9`` of the bench
takes them down; the Python children also exit when orphaned.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import pwd
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO

HOST = "127.0.0.1"
BENCH_DIR = Path(__file__).resolve().parent
SMTP_SINK_PATHS = ("/usr/sbin/smtp-sink", "/usr/bin/smtp-sink")
SMTP_SOURCE_PATHS = ("/usr/sbin/smtp-source", "/usr/bin/smtp-source")
INSTALL_HINT = (
    "Postfix's smtp-sink/smtp-source are not installed. On Debian/Ubuntu:\n"
    "    sudo apt-get update && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y postfix\n"
    "(choose 'No configuration' if asked; the bench never starts the Postfix daemon). "
    "Fedora/RHEL: 'sudo dnf install postfix'."
)


def find_tool(name: str, candidates: tuple[str, ...]) -> str | None:
    """The path of a Postfix test tool, or ``None`` when it is not installed."""
    for path in candidates:
        if os.access(path, os.X_OK):
            return path
    return shutil.which(name)


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    with contextlib.suppress(Exception):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((HOST, 0))
        return int(probe.getsockname()[1])


def wait_listening(port: int, timeout: float = 5.0) -> bool:
    """True once something accepts TCP connections on 127.0.0.1:``port``."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            probe.settimeout(0.5)
            try:
                probe.connect((HOST, port))
            except OSError:
                time.sleep(0.02)
                continue
            with contextlib.suppress(OSError):
                probe.settimeout(1.0)
                probe.recv(512)  # the greeting, then close before saying anything
            return True
    return False


@dataclass(frozen=True)
class Endpoint:
    """A server the clients can reach: ``kind`` says what it is."""

    kind: str
    port: int
    host: str = HOST


_INTERRUPTED = False


def interrupted() -> bool:
    """Whether Ctrl-C (SIGINT) arrived since the bench started.

    A client may swallow the ``KeyboardInterrupt`` (an event loop that was in a
    callback turns it into a protocol error); the bench checks this after every
    failure, so Ctrl-C always ends it.
    """
    return _INTERRUPTED


def _on_sigint(signum: int, frame: object) -> None:
    global _INTERRUPTED
    _INTERRUPTED = True
    raise KeyboardInterrupt


class Children:
    """Starts the bench's servers and stops them all on exit (a context manager)."""

    def __init__(self) -> None:
        self._procs: list[subprocess.Popen[bytes]] = []
        self._errs: dict[int, IO[bytes]] = {}
        self._old_handlers: dict[int, object] = {}

    def __enter__(self) -> Children:
        for sig in (signal.SIGTERM, signal.SIGHUP):
            self._old_handlers[sig] = signal.signal(sig, self._on_signal)
        if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
            self._old_handlers[signal.SIGINT] = signal.signal(signal.SIGINT, _on_sigint)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop_all()
        for sig, handler in self._old_handlers.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]

    @staticmethod
    def _on_signal(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    def _popen(self, argv: list[str], *, stdout: int) -> subprocess.Popen[bytes]:
        preexec = _die_with_parent if sys.platform.startswith("linux") else None
        # stderr to a file, not a pipe: a chatty child never blocks; closed in stop()
        err = tempfile.TemporaryFile()  # noqa: SIM115
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=stdout,
            stderr=err,
            start_new_session=True,  # Ctrl-C reaches the bench only; the bench stops them
            preexec_fn=preexec,  # only prctl(); the servers start before any thread
        )
        self._procs.append(proc)
        self._errs[proc.pid] = err
        return proc

    def stderr_of(self, proc: subprocess.Popen[bytes]) -> str:
        """What the child wrote to stderr so far (for error messages)."""
        err = self._errs.get(proc.pid)
        if err is None or err.closed:
            return ""
        err.seek(0)
        return err.read().decode("utf-8", "replace").strip()[-2000:]

    def stop(self, proc: subprocess.Popen[bytes]) -> None:
        """Terminate one child (then kill it if it lingers) and reap it."""
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.terminate()
            try:
                proc.wait(2.0)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                proc.wait(2.0)
        if proc.stdout is not None:
            proc.stdout.close()
        err = self._errs.pop(proc.pid, None)
        if err is not None:
            err.close()
        if proc in self._procs:
            self._procs.remove(proc)

    def stop_all(self) -> None:
        """Stop every child this object started, newest first."""
        for proc in reversed(list(self._procs)):
            self.stop(proc)

    def _read_port(self, proc: subprocess.Popen[bytes], timeout: float = 10.0) -> int:
        """Read the ``PORT n`` line a Python child prints once it listens."""
        assert proc.stdout is not None
        ready, _, _ = select.select([proc.stdout], [], [], timeout)
        line = proc.stdout.readline().decode() if ready else ""
        if not line.startswith("PORT "):
            detail = self.stderr_of(proc)
            self.stop(proc)
            raise RuntimeError(f"{proc.args!r} did not start: {line!r} {detail}")
        return int(line.split()[1])

    # -- servers ------------------------------------------------------------------------
    def smtp_sink(self, binary: str) -> Endpoint:
        """Start Postfix's ``smtp-sink`` on a free loopback port."""
        last_error = ""
        for _ in range(5):  # the port may be taken between probing and binding: retry
            port = _free_port()
            argv = [binary]
            if os.geteuid() == 0:  # smtp-sink refuses to run as root without -u
                argv += ["-u", _unprivileged_user()]
            argv += [f"{HOST}:{port}", "256"]
            proc = self._popen(argv, stdout=subprocess.DEVNULL)
            if wait_listening(port) and proc.poll() is None:
                return Endpoint("smtp-sink", port)
            last_error = self.stderr_of(proc)
            self.stop(proc)
        raise RuntimeError(f"smtp-sink did not start: {last_error}")

    def python_sink(self) -> Endpoint:
        """Start the pure-asyncio fallback sink (``bench/pysink.py``)."""
        proc = self._popen([sys.executable, str(BENCH_DIR / "pysink.py")], stdout=subprocess.PIPE)
        port = self._read_port(proc)
        return Endpoint("python fallback sink", port)

    def delay_proxy(self, target: Endpoint, delay_ms: float) -> Endpoint:
        """Start ``bench/proxy.py`` in front of ``target``, ``delay_ms`` each way."""
        proc = self._popen(
            [
                sys.executable,
                str(BENCH_DIR / "proxy.py"),
                "--target",
                f"{target.host}:{target.port}",
                "--delay-ms",
                str(delay_ms),
            ],
            stdout=subprocess.PIPE,
        )
        port = self._read_port(proc)
        return Endpoint(f"{target.kind} behind a {2 * delay_ms:g} ms RTT proxy", port)


def _unprivileged_user() -> str:
    for name in ("nobody", "postfix", "daemon"):
        with contextlib.suppress(KeyError):
            pwd.getpwnam(name)
            return name
    raise RuntimeError("running as root and no unprivileged user for smtp-sink -u")
