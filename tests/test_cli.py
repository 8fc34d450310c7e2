"""The ``smtpnotify`` command line, driven as a user drives it: in a subprocess.

Every subprocess talks to 127.0.0.1 only (sinks and scripted servers of this
test process, or a port that is known to be closed).  The suite's loopback
guard does not reach into subprocesses, so each config here names 127.0.0.1.
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import shutil
import signal
import smtplib
import socket
import subprocess
import sys
import threading
import time
import tomllib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import timedelta
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest

from _helpers import SENDER
from scripted_server import Script, ScriptedServer, Stall
from smtpnotify import MailConfig, Notification, Notifier, OutboxStatus, SQLiteOutbox
from smtpnotify.cli import main
from smtpnotify.cli._common import (
    CLIError,
    parse_duration,
    parse_outbox_url,
    redact_dsn,
)
from smtpnotify.testing import CertificateBundle, SMTPSink

ROOT = Path(__file__).resolve().parent.parent
PASSWORD = "hunter2-Sup3r-secret"
TIMEOUT = 30  # seconds any one command may take before the test fails

MakeSink = Callable[..., SMTPSink]
pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals and paths")


# --------------------------------------------------------------------------- helpers


def cli_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of a CLI subprocess: no ambient SMTPNOTIFY_* settings, src importable."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SMTPNOTIFY_")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT / "src"), env.get("PYTHONPATH")) if p)
    env["PYTHONIOENCODING"] = "utf-8"
    env.update(extra or {})
    return env


@dataclass(frozen=True)
class Result:
    """What a command did: its exit status and output."""

    returncode: int
    stdout: str
    stderr: str


Runner = Callable[..., Result]


def run_cli(
    *args: str | Path,
    cwd: Path | None = None,
    env: Mapping[str, str] | None = None,
    stdin: str | None = None,
) -> Result:
    """Run ``python -m smtpnotify ARGS`` in a subprocess, to completion."""
    done = subprocess.run(
        [sys.executable, "-m", "smtpnotify", *map(str, args)],
        capture_output=True,
        text=True,
        encoding="utf-8",
        cwd=cwd,
        env=cli_env(env),
        input=stdin,
        timeout=TIMEOUT,
        check=False,
    )
    return Result(done.returncode, done.stdout, done.stderr)


@pytest.fixture
def cli(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> Runner:
    """Run ``smtpnotify.cli.main(ARGS)`` in this process (faster; same output and status).

    Used for the variations; each command also runs in a subprocess somewhere below.
    """

    def run(
        *args: str | Path,
        cwd: Path | None = None,
        env: Mapping[str, str] | None = None,
        stdin: str | None = None,
    ) -> Result:
        capsys.readouterr()
        with monkeypatch.context() as patch:
            for name in os.environ:
                if name.startswith("SMTPNOTIFY_"):
                    patch.delenv(name)
            for name, value in (env or {}).items():
                patch.setenv(name, value)
            if cwd is not None:
                patch.chdir(cwd)
            if stdin is not None:
                patch.setattr(sys, "stdin", io.StringIO(stdin))
            try:
                status = main([str(arg) for arg in args])
            except SystemExit as exc:
                status = exc.code if isinstance(exc.code, int) else 1
        out, err = capsys.readouterr()
        return Result(status, out, err)

    return run


def output(result: Result) -> str:
    """Everything the command printed."""
    return result.stdout + result.stderr


def assert_no_secret(text: str) -> None:
    """Neither the password nor an AUTH PLAIN / LOGIN encoding of it is in ``text``."""
    assert PASSWORD not in text
    assert base64.b64encode(PASSWORD.encode()).decode() not in text
    assert base64.b64encode(f"\0app\0{PASSWORD}".encode()).decode() not in text


class Background:
    """``python -m smtpnotify ARGS`` running in the background, its output read as it comes."""

    def __init__(self, *args: str | Path, cwd: Path | None = None) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "smtpnotify", *map(str, args)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            encoding="utf-8",
            cwd=cwd,
            env=cli_env(),
        )
        self._cond = threading.Condition()
        self._out: list[str] = []
        self._err: list[str] = []
        self._readers = [
            threading.Thread(target=self._read, args=(self.proc.stdout, self._out), daemon=True),
            threading.Thread(target=self._read, args=(self.proc.stderr, self._err), daemon=True),
        ]
        for reader in self._readers:
            reader.start()

    def _read(self, stream: Any, into: list[str]) -> None:
        for line in stream:
            with self._cond:
                into.append(line)
                self._cond.notify_all()

    @property
    def stdout(self) -> str:
        with self._cond:
            return "".join(self._out)

    @property
    def stderr(self) -> str:
        with self._cond:
            return "".join(self._err)

    def wait_for(
        self, pattern: str, timeout: float = TIMEOUT, *, stderr: bool = False
    ) -> re.Match[str]:
        """Wait until stdout (or stderr) matches the regular expression ``pattern``."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                found = re.search(pattern, "".join(self._err if stderr else self._out))
                if found:
                    return found
                ended = not any(reader.is_alive() for reader in self._readers)
                if ended or time.monotonic() >= deadline:
                    raise AssertionError(
                        f"no {pattern!r} in the output (exit status {self.proc.poll()}):\n"
                        f"{''.join(self._out)}{''.join(self._err)}"
                    )
                self._cond.wait(min(deadline - time.monotonic(), 0.2))

    def stop(self, signum: int = signal.SIGTERM) -> int:
        """Send ``signum``; return the exit status once the process ended."""
        self.proc.send_signal(signum)
        status = self.proc.wait(TIMEOUT)
        for reader in self._readers:
            reader.join(TIMEOUT)
        return status

    def close(self) -> None:
        """Kill the process if it still runs; release its pipes."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(TIMEOUT)
        for reader in self._readers:
            reader.join(TIMEOUT)
        for stream in (self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()


@pytest.fixture
def background() -> Iterator[Callable[..., Background]]:
    """Start CLI processes in the background; each is killed (if need be) after the test."""
    started: list[Background] = []

    def factory(*args: str | Path, cwd: Path | None = None) -> Background:
        process = Background(*args, cwd=cwd)
        started.append(process)
        return process

    yield factory
    for process in started:
        process.close()


def toml_value(value: object) -> str:
    """A TOML literal for the simple values configs hold."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    raise TypeError(type(value))


def write_config(folder: Path, name: str = "mail.toml", /, **fields: object) -> Path:
    """A TOML config file with ``fields`` in a ``[smtpnotify]`` table."""
    fields.setdefault("sender", SENDER)
    lines = ["# written by tests/test_cli.py", "[smtpnotify]"]
    lines += [f"{key} = {toml_value(value)}" for key, value in fields.items()]
    path = folder / name
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def server_config(folder: Path, server: SMTPSink | ScriptedServer, **fields: object) -> Path:
    """A config file for a server of this test process (on 127.0.0.1)."""
    fields.setdefault("timeout", 5)
    fields.update(host=server.host, port=server.port)
    return write_config(folder, **fields)


def closed_port() -> int:
    """A loopback port nothing listens on (bound, then closed)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def queue(outbox_path: Path, sink: SMTPSink, *notes: Notification) -> list[str]:
    """Queue ``notes`` in the SQLite outbox at ``outbox_path`` through the Python API."""
    config = MailConfig(host=sink.host, port=sink.port, sender=SENDER, timeout=5)
    with SQLiteOutbox(outbox_path) as outbox, Notifier(config, outbox) as notifier:
        return [notifier.notify(note) for note in notes]


def note(to: str = "ops@example.com", subject: str = "Disk full", **kw: Any) -> Notification:
    """A small notification."""
    kw.setdefault("text", "The disk is full.\n")
    return Notification(to=to, subject=subject, **kw)


# --------------------------------------------------------------------------- check


def test_check_against_a_good_server_shows_every_step(make_sink: MakeSink, tmp_path: Path) -> None:
    sink = make_sink(auth={"app": PASSWORD})
    config = server_config(tmp_path, sink, username="app", password=PASSWORD)

    result = run_cli("-vv", "check", "--config", config)

    assert result.returncode == 0, output(result)
    for step in ("connect", "greeting", "ehlo", "auth"):
        assert re.search(rf"\[ok  \] {step} +\d+\.\d ms", result.stdout), result.stdout
    assert f"Checking {sink.host}:{sink.port}, tls=none, AUTH as app" in result.stdout
    assert "OK: the server accepts these settings" in result.stdout
    assert "FAIL" not in result.stdout
    assert "AUTH" in " ".join(sink.verbs)  # it really authenticated (with DEBUG logging on)
    assert not sink.messages  # a check sends nothing
    assert "Traceback" not in output(result)
    assert_no_secret(output(result))


def test_check_over_tls_shows_the_tls_details(
    tls_sink: Callable[..., SMTPSink],
    certs: CertificateBundle,
    tmp_path: Path,
    cli: Runner,
) -> None:
    sink = tls_sink("starttls")
    config = server_config(
        tmp_path, sink, tls="starttls", trust="pinned", pinned_fingerprints=[certs.leaf_sha256]
    )

    result = cli("check", "-c", config)

    assert result.returncode == 0, output(result)
    assert re.search(r"\[ok  \] tls +\d+\.\d ms +STARTTLS", result.stdout)
    assert re.search(r"\[ok  \] ehlo .* after STARTTLS", result.stdout)
    assert re.search(r"TLS: +TLSv1\.[23], \S+", result.stdout)
    assert f"server certificate SHA-256: {certs.leaf_sha256}" in result.stdout


def test_check_reads_the_environment_with_env(make_sink: MakeSink, cli: Runner) -> None:
    sink = make_sink()
    env = {
        "SMTPNOTIFY_HOST": sink.host,
        "SMTPNOTIFY_PORT": str(sink.port),
        "SMTPNOTIFY_SENDER": SENDER,
        "SMTPNOTIFY_TIMEOUT": "5",
    }
    result = cli("check", "--env", env=env)
    assert result.returncode == 0, output(result)
    assert f"Checking {sink.host}:{sink.port}" in result.stdout

    bad = cli("check", "--env", env={**env, "SMTPNOTIFY_PASSWORD": PASSWORD})
    assert bad.returncode == 2
    assert bad.stderr.splitlines() == [
        "smtpnotify: environment: SMTPNOTIFY_USERNAME: "
        "username and password go together: both or neither"
    ]
    assert_no_secret(output(bad))


def _closed(tmp_path: Path, **_: Any) -> tuple[Path, str, str]:
    config = write_config(
        tmp_path, host="127.0.0.1", port=closed_port(), username="app", password=PASSWORD
    )
    return config, "connect", "check host and port"


def _stalled(
    tmp_path: Path, scripted: Callable[..., ScriptedServer], **_: Any
) -> tuple[Path, str, str]:
    server = scripted(Script(greeting=Stall()))
    config = server_config(tmp_path, server, timeout=1, username="app", password=PASSWORD)
    return config, "greeting", "raise timeout"


def _no_starttls(
    tmp_path: Path, scripted: Callable[..., ScriptedServer], **_: Any
) -> tuple[Path, str, str]:
    server = scripted(Script(ehlo_extensions=("8BITMIME", "AUTH PLAIN")))
    config = server_config(tmp_path, server, tls="starttls", username="app", password=PASSWORD)
    return config, "tls", 'use tls = "ssl" on port 465'


def _untrusted(
    tmp_path: Path, tls_sink: Callable[..., SMTPSink], **_: Any
) -> tuple[Path, str, str]:
    sink = tls_sink("ssl")
    config = server_config(tmp_path, sink, tls="ssl", username="app", password=PASSWORD)
    return config, "tls", f"smtpnotify cert fetch {sink.host} {sink.port} --tls ssl"


def _wrong_password(tmp_path: Path, make_sink: MakeSink, **_: Any) -> tuple[Path, str, str]:
    sink = make_sink(auth={"app": "the-right-one"})
    config = server_config(tmp_path, sink, username="app", password=PASSWORD)
    return config, "auth", "check username and password"


@pytest.mark.parametrize(
    "bad_server",
    [_closed, _stalled, _no_starttls, _untrusted, _wrong_password],
    ids=["closed-port", "stalled-greeting", "no-starttls", "untrusted-cert", "wrong-password"],
)
def test_check_against_a_bad_server_names_the_failing_step_and_a_fix(
    bad_server: Callable[..., tuple[Path, str, str]],
    tmp_path: Path,
    make_sink: MakeSink,
    tls_sink: Callable[..., SMTPSink],
    scripted: Callable[..., ScriptedServer],
    cli: Runner,
) -> None:
    config, step, hint = bad_server(
        tmp_path, make_sink=make_sink, tls_sink=tls_sink, scripted=scripted
    )
    # The closed port runs in a subprocess, as a user runs it; the others in-process.
    run = run_cli if bad_server is _closed else cli

    result = run("check", "--config", config, "--verbose")

    assert result.returncode == 1, output(result)
    assert re.search(rf"\[FAIL\] {step} ", result.stdout), result.stdout
    assert f"FAILED at step {step!r}: " in result.stdout
    assert "what to change: " in result.stdout
    assert hint in result.stdout
    assert "Traceback" not in output(result)
    assert_no_secret(output(result))


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (
            f'sender = "a@example.com"\nport = 99999\npassword = "{PASSWORD}"\n',
            "smtpnotify: {path}: port: Input should be less than or equal to 65535",
        ),
        (
            f'sender = "a@example.com"\npasswd = "{PASSWORD}"\n',
            "smtpnotify: {path}: passwd: Extra inputs are not permitted",
        ),
        (
            f'sender = "a@example.com"\npassword = "{PASSWORD}\n',
            "smtpnotify: {path}: not valid TOML: ",
        ),
        (
            'sender = "a@example.com"\nhost = "smtp.example.com"\nusername = "app"\n'
            f'password = "{PASSWORD}"\n',
            "smtpnotify: {path}: tls: refusing to send username and password without TLS",
        ),
        (None, "smtpnotify: {path}: no such config file"),
    ],
    ids=["bad-port", "unknown-key", "bad-toml", "plaintext-auth", "missing-file"],
)
def test_a_bad_config_is_one_line_and_exit_2(
    content: str | None,
    expected: str,
    tmp_path: Path,
    cli: Runner,
) -> None:
    path = tmp_path / "mail.toml"
    if content is not None:
        path.write_text(content, encoding="utf-8")

    result = cli("check", "--config", path)

    assert result.returncode == 2
    assert result.stdout == ""
    [line] = result.stderr.splitlines()
    assert line.startswith(expected.format(path=path)), line
    assert "Traceback" not in result.stderr
    assert_no_secret(result.stderr)


def test_a_bad_config_file_is_one_line_in_a_subprocess_too(tmp_path: Path) -> None:
    path = write_config(tmp_path, host="127.0.0.1", port=99999, username="app", password=PASSWORD)
    result = run_cli("check", "--config", path)
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.splitlines() == [
        f"smtpnotify: {path}: port: Input should be less than or equal to 65535"
    ]
    assert_no_secret(result.stderr)


def test_each_config_problem_gets_its_own_line(tmp_path: Path, cli: Runner) -> None:
    path = write_config(tmp_path, port=0, timeout=1000, tls="tls")
    result = cli("send", "-c", path, "--to", "a@example.com", "--subject", "s", "--text", "t")
    assert result.returncode == 2
    lines = result.stderr.splitlines()
    assert len(lines) == 3, lines
    assert [line.split(": ")[2] for line in lines] == ["port", "timeout", "tls"]


# --------------------------------------------------------------------------- cert fetch


@pytest.mark.parametrize("tls", ["starttls", "ssl"])
def test_cert_fetch_prints_the_pem_the_fingerprint_and_a_pinned_config(
    tls: str, tls_sink: Callable[..., SMTPSink], certs: CertificateBundle
) -> None:
    sink = tls_sink(tls)

    result = run_cli("cert", "fetch", sink.host, str(sink.port), "--tls", tls, "--timeout", "5")

    assert result.returncode == 0, output(result)
    assert f"SHA-256 fingerprint: {certs.leaf_sha256}\n" in result.stdout
    assert certs.leaf_pem.strip() in result.stdout
    snippet = result.stdout.split("# Pin it in mail.toml", 1)[1].split("\n", 1)[1]
    pinned = tomllib.loads(snippet)
    assert pinned == {
        "host": sink.host,
        "port": sink.port,
        "tls": tls,
        "trust": "pinned",
        "pinned_fingerprints": [certs.leaf_sha256],
    }
    # The snippet is a working config: a check with it passes.
    assert MailConfig(sender=SENDER, **pinned).pinned_fingerprints == (certs.leaf_sha256,)


def test_cert_fetch_pem_only_and_a_wrong_tls_mode(
    tls_sink: Callable[..., SMTPSink],
    certs: CertificateBundle,
    cli: Runner,
) -> None:
    sink = tls_sink("starttls")
    pem = cli("cert", "fetch", sink.host, str(sink.port), "--pem-only")
    assert pem.returncode == 0, output(pem)
    assert pem.stdout.strip() == certs.leaf_pem.strip()

    wrong = cli("cert", "fetch", sink.host, str(sink.port), "--tls", "ssl", "--timeout", "2")
    assert wrong.returncode == 1
    assert wrong.stdout == ""
    assert "cert fetch failed: " in wrong.stderr
    assert "try --tls starttls" in wrong.stderr
    assert "Traceback" not in wrong.stderr


# --------------------------------------------------------------------------- send


def test_send_delivers_through_a_sink(make_sink: MakeSink, tmp_path: Path) -> None:
    sink = make_sink()
    config = server_config(tmp_path, sink)

    result = run_cli(
        "send", "-c", config,
        "--to", "ops@example.com", "--to", "Bob <bob@example.com>", "--cc", "carol@example.com",
        "--subject", "Deploy finished ✓", "--text", "Build 1234 is live.\n",
    )  # fmt: skip

    assert result.returncode == 0, output(result)
    [received] = sink.wait_for(1)
    assert received.message["Subject"] == "Deploy finished ✓"
    assert received.rcpt_tos == ("ops@example.com", "bob@example.com", "carol@example.com")
    assert received.message.get_content().strip() == "Build 1234 is live."
    message_id = received.message["Message-ID"]
    assert f"Message-ID: {message_id}\n" in result.stdout
    assert "accepted: ops@example.com, bob@example.com, carol@example.com" in result.stdout


def test_send_reads_files_and_attaches(make_sink: MakeSink, tmp_path: Path, cli: Runner) -> None:
    sink = make_sink()
    config = server_config(tmp_path, sink)
    (tmp_path / "body.html").write_text("<p>All <b>green</b></p>", encoding="utf-8")
    (tmp_path / "report.csv").write_bytes(b"host,disk\ndb-1,91\n")

    result = cli(
        "send", "-c", config, "--to", "ops@example.com", "--subject", "Report",
        "--text-file", "-", "--html-file", tmp_path / "body.html",
        "--attach", tmp_path / "report.csv", stdin="Plain text from stdin\n",
    )  # fmt: skip

    assert result.returncode == 0, output(result)
    [received] = sink.wait_for(1)
    message = received.message
    assert isinstance(message, EmailMessage)
    plain = message.get_body(preferencelist=("plain",))
    html = message.get_body(preferencelist=("html",))
    assert plain is not None and plain.get_content().splitlines() == ["Plain text from stdin"]
    assert html is not None and "All <b>green</b>" in html.get_content()
    [attachment] = list(message.iter_attachments())
    assert attachment.get_filename() == "report.csv"
    assert attachment.get_content_type() == "text/csv"


def test_send_reports_refused_recipients(make_sink: MakeSink, tmp_path: Path, cli: Runner) -> None:
    sink = make_sink(replies={"RCPT": {"bad@example.com": (550, "5.1.1 no such user")}})
    config = server_config(tmp_path, sink)

    result = cli(
        "send", "-c", config, "--to", "ops@example.com", "--to", "bad@example.com",
        "--subject", "s", "--text", "t",
    )  # fmt: skip

    assert result.returncode == 1, output(result)
    assert "accepted: ops@example.com\n" in result.stdout
    assert "refused:  bad@example.com: 550 " in result.stdout
    assert sink.wait_for(1)[0].rcpt_tos == ("ops@example.com",)


def test_send_failures_are_one_clear_line(make_sink: MakeSink, tmp_path: Path, cli: Runner) -> None:
    closed = write_config(tmp_path, host="127.0.0.1", port=closed_port(), timeout=2)
    down = cli("send", "-c", closed, "--to", "a@example.com", "--subject", "s", "--text", "t")
    assert down.returncode == 1
    assert down.stderr.startswith("smtpnotify: sending failed: ConnectError: cannot connect to")
    assert "what to change: could not connect" in down.stderr

    config = server_config(tmp_path, make_sink())
    invalid = cli("send", "-c", config, "--to", "not an address", "--subject", "s", "--text", "t")
    assert invalid.returncode == 2
    [line] = invalid.stderr.splitlines()
    assert line.startswith("smtpnotify: invalid message: ")

    no_body = cli("send", "-c", config, "--to", "a@example.com", "--subject", "s")
    assert no_body.returncode == 2
    assert no_body.stderr.splitlines() == [
        "smtpnotify: give the message a body: --text, --text-file or --html-file"
    ]

    missing = cli(
        "send", "-c", config, "--to", "a@example.com", "--subject", "s",
        "--text-file", tmp_path / "nope.txt",
    )  # fmt: skip
    assert missing.returncode == 2
    assert missing.stderr.splitlines() == [
        f"smtpnotify: --text-file {tmp_path / 'nope.txt'}: No such file or directory"
    ]
    for result in (down, invalid, no_body, missing):
        assert "Traceback" not in output(result)


def test_send_with_an_outbox_queues_instead(
    make_sink: MakeSink, tmp_path: Path, cli: Runner
) -> None:
    sink = make_sink()
    config = server_config(tmp_path, sink)

    result = cli(
        "send", "-c", config, "--outbox", "sqlite:///queue.db", "--to", "ops@example.com",
        "--subject", "Later", "--text", "t", cwd=tmp_path,
    )  # fmt: skip

    assert result.returncode == 0, output(result)
    entry_id = re.search(r"queued: ([0-9a-f]+) in SQLite ", result.stdout)
    assert entry_id is not None
    with SQLiteOutbox(tmp_path / "queue.db") as outbox:
        entry = outbox.get(entry_id[1])
    assert entry is not None and entry.status is OutboxStatus.PENDING
    assert not sink.messages


# --------------------------------------------------------------------------- worker


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_worker_drains_the_outbox_and_stops_gracefully(
    signum: int,
    make_sink: MakeSink,
    tmp_path: Path,
    background: Callable[..., Background],
) -> None:
    sink = make_sink()
    config = server_config(tmp_path, sink)
    db = tmp_path / "outbox.db"
    ids = queue(db, sink, note("a@example.com"), note("b@example.com"), note("c@example.com"))

    worker = background("worker", "-c", config, "--outbox", f"sqlite:///{db}")
    worker.wait_for(r"smtpnotify worker: SQLite .*outbox\.db")
    sink.wait_for(3, timeout=TIMEOUT)
    worker.wait_for(r"sent 3 · retried 0 · failed 0 · expired 0 · pending 0")
    status = worker.stop(signum)

    assert status == 0, worker.stdout + worker.stderr
    name = signal.Signals(signum).name
    assert f"{name}: stopping" in worker.stdout
    assert worker.stdout.rstrip().endswith(
        "stopped: sent 3 · retried 0 · failed 0 · expired 0 · pending 0"
    )
    assert "Traceback" not in worker.stderr
    assert sorted(m.rcpt_tos[0] for m in sink.messages) == [
        "a@example.com",
        "b@example.com",
        "c@example.com",
    ]
    with SQLiteOutbox(db) as outbox:
        assert all(outbox.get(i).status is OutboxStatus.SENT for i in ids)  # type: ignore[union-attr]


def test_worker_picks_up_messages_queued_while_it_runs(
    make_sink: MakeSink, tmp_path: Path, background: Callable[..., Background]
) -> None:
    sink = make_sink()
    config = server_config(tmp_path, sink)
    db = tmp_path / "outbox.db"
    worker = background("worker", "-c", config, "--outbox", db, "--poll-interval", "0.2")
    worker.wait_for(r"pending 0")

    queue(db, sink, note("late@example.com", "Queued later"))

    [received] = sink.wait_for(1, timeout=TIMEOUT)
    assert received.message["Subject"] == "Queued later"
    worker.wait_for(r"sent 1 · ")
    assert worker.stop() == 0


def test_worker_once_makes_one_pass_and_reports_failures(
    make_sink: MakeSink,
    tmp_path: Path,
    cli: Runner,
) -> None:
    sink = make_sink(replies={"RCPT": {"bad@example.com": (550, "5.1.1 no such user")}})
    config = server_config(tmp_path, sink)
    db = tmp_path / "outbox.db"
    _, bad = queue(db, sink, note("ops@example.com"), note("bad@example.com"))

    result = run_cli("worker", "--once", "-c", config, "--outbox", db)

    assert result.returncode == 0, output(result)
    assert result.stdout.splitlines()[-1] == (
        "sent 1 · retried 0 · failed 1 · expired 0 · pending 0"
    )
    assert re.search(rf"failed: +{bad} to bad@example.com: RecipientsRefused: .*550", result.stdout)
    assert [m.rcpt_tos for m in sink.messages] == [("ops@example.com",)]

    again = cli("worker", "--once", "-c", config, "--outbox", db)
    assert again.stdout.splitlines()[-1] == "sent 0 · retried 0 · failed 0 · expired 0 · pending 0"
    assert len(sink.messages) == 1


def test_worker_refuses_a_bad_outbox_url(make_sink: MakeSink, tmp_path: Path, cli: Runner) -> None:
    config = server_config(tmp_path, make_sink())
    result = cli("worker", "-c", config, "--outbox", "mysql://db/mail")
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        "smtpnotify: unsupported outbox URL scheme 'mysql': use sqlite:///path or postgresql://..."
    ]


# --------------------------------------------------------------------------- outbox


@pytest.fixture
def filled_outbox(make_sink: MakeSink, tmp_path: Path) -> tuple[Path, dict[str, str]]:
    """An SQLite outbox with one sent, one failed and one pending entry."""
    sink = make_sink(replies={"RCPT": {"bad@example.com": (550, "5.1.1 no such user")}})
    db = tmp_path / "outbox.db"
    config = MailConfig(host=sink.host, port=sink.port, sender=SENDER, timeout=5)
    with SQLiteOutbox(db) as outbox, Notifier(config, outbox) as notifier:
        sent = notifier.notify(note("ops@example.com", "Was sent", text="SECRET-BODY one\n"))
        failed = notifier.notify(note("bad@example.com", "Was refused", text="SECRET-BODY two\n"))
        report = notifier.deliver_due()
        assert (report.sent, report.failed) == (1, 1)
        pending = notifier.notify(note("later@example.com", "Still waiting"))
    return db, {"sent": sent, "failed": failed, "pending": pending}


def test_outbox_status_and_list(filled_outbox: tuple[Path, dict[str, str]], cli: Runner) -> None:
    db, ids = filled_outbox
    url = f"sqlite:///{db}"  # an absolute path: sqlite:////tmp/...
    assert url.startswith("sqlite:////")

    status = run_cli("outbox", "--outbox", url, "status")
    assert status.returncode == 0, output(status)
    counts = dict(re.findall(r"^  (\w+) +(\d+)$", status.stdout, re.MULTILINE))
    assert counts == {
        "pending": "1", "sending": "0", "sent": "1", "failed": "1", "expired": "0", "total": "3",
    }  # fmt: skip
    assert "next due: now" in status.stdout

    listing = run_cli("outbox", "list", "--outbox", url)  # --outbox after the action works too
    assert listing.returncode == 0, output(listing)
    rows = listing.stdout.splitlines()[1:]
    assert [row.split()[0] for row in rows] == [ids["pending"], ids["failed"], ids["sent"]]
    assert "Was refused" in listing.stdout
    assert "SECRET-BODY" not in listing.stdout

    failed_only = cli("outbox", "--outbox", url, "list", "--status", "failed")
    assert [row.split()[:3] for row in failed_only.stdout.splitlines()[1:]] == [
        [ids["failed"], "failed", "1"]
    ]
    none = cli("outbox", "--outbox", url, "list", "--status", "expired")
    assert none.stdout.startswith("no expired entries in SQLite ")


def test_outbox_show_hides_the_body_unless_asked(
    filled_outbox: tuple[Path, dict[str, str]],
    cli: Runner,
) -> None:
    db, ids = filled_outbox

    show = run_cli("outbox", "--outbox", db, "show", ids["failed"])

    assert show.returncode == 0, output(show)
    fields = dict(re.findall(r"^([\w -]+): +(.*)$", show.stdout, re.MULTILINE))
    assert fields["status"] == "failed"
    assert fields["attempts"] == "1"
    assert fields["Subject"] == "Was refused"
    assert fields["refused"] == "bad@example.com: 550 5.1.1 no such user"
    assert fields["last error"].startswith("RecipientsRefused: ")
    assert "SECRET-BODY" not in show.stdout
    assert "add --data" in show.stdout

    data = cli("outbox", "--outbox", db, "show", ids["failed"], "--data")
    assert "SECRET-BODY two" in data.stdout

    missing = cli("outbox", "--outbox", db, "show", "0123abcd")
    assert missing.returncode == 1
    assert missing.stderr.splitlines() == ["smtpnotify: no outbox entry '0123abcd'"]


def test_outbox_retry_and_purge(
    filled_outbox: tuple[Path, dict[str, str]], tmp_path: Path, cli: Runner
) -> None:
    db, ids = filled_outbox

    retry = run_cli(
        "outbox", "--outbox", "sqlite:///outbox.db", "retry", ids["failed"], cwd=tmp_path
    )
    assert retry.returncode == 0, output(retry)
    assert retry.stdout.startswith(f"{ids['failed']}: pending again, due now; expires ")
    refused = cli("outbox", "--outbox", "outbox.db", "retry", ids["sent"], cwd=tmp_path)
    assert refused.returncode == 1
    assert refused.stderr.splitlines() == [
        f"smtpnotify: entry {ids['sent']} is sent: only failed or expired entries can be retried"
    ]
    with SQLiteOutbox(db) as outbox:
        entry = outbox.get(ids["failed"])
        assert entry is not None and entry.status is OutboxStatus.PENDING

    kept = cli("outbox", "--outbox", db, "purge", "--older-than", "7d")
    assert kept.returncode == 0, output(kept)
    assert kept.stdout.startswith("purged 0 sent, failed, expired entries last updated before ")

    purged = run_cli("outbox", "--outbox", db, "purge", "--older-than", "PT0S", "--status", "sent")
    assert purged.returncode == 0, output(purged)
    assert purged.stdout.startswith("purged 1 sent entry last updated before ")
    with SQLiteOutbox(db) as outbox:
        assert outbox.get(ids["sent"]) is None
        assert outbox.counts()[OutboxStatus.PENDING] == 2


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["status"], "smtpnotify: which outbox? give --outbox sqlite:///path/to/outbox.db"),
        (["--outbox", "missing.db", "status"], "smtpnotify: no outbox at missing.db"),
        (["--outbox", "mail.toml", "status"], "smtpnotify: not an outbox: "),
        (["--outbox", "sqlite://host/x.db", "status"], "smtpnotify: sqlite://host/x.db: an SQLite"),
        (["--outbox", "x.db", "--table", "t", "status"], "smtpnotify: --table is for PostgreSQL"),
        (
            ["--outbox", "x.db", "purge", "--older-than", "7"],
            "smtpnotify outbox purge: argument --older-than: '7' is not a duration",
        ),
        (["--outbox", "x.db", "frobnicate"], "smtpnotify outbox: argument ACTION: invalid choice"),
    ],
)
def test_outbox_usage_errors_are_one_line(
    args: list[str], expected: str, tmp_path: Path, cli: Runner
) -> None:
    (tmp_path / "mail.toml").write_text('sender = "a@example.com"\n', encoding="utf-8")
    result = cli("outbox", *args, cwd=tmp_path)
    assert result.returncode == 2
    [line] = result.stderr.splitlines()
    assert line.startswith(expected), line
    assert not (tmp_path / "missing.db").exists()


def test_outbox_and_worker_on_postgres(
    postgres_dsn: str,
    make_sink: MakeSink,
    tmp_path: Path,
    cli: Runner,
) -> None:
    from smtpnotify.outbox.postgres import PostgresOutbox

    table = f"cli_test_{os.getpid()}_{int(time.time() * 1000) % 10**8}"
    sink = make_sink()
    config_path = server_config(tmp_path, sink)
    config = MailConfig(host=sink.host, port=sink.port, sender=SENDER, timeout=5)
    try:
        with (
            PostgresOutbox(postgres_dsn, table=table, create=True) as outbox,
            Notifier(config, outbox) as notifier,
        ):
            notifier.notify(note("pg@example.com", "Through PostgreSQL"))

        status = cli("outbox", "--outbox", postgres_dsn, "--table", table, "status")
        assert status.returncode == 0, output(status)
        assert re.search(r"^  pending +1$", status.stdout, re.MULTILINE)
        assert f"table {table}" in status.stdout

        once = run_cli(
            "worker", "--once", "-c", config_path, "--outbox", postgres_dsn, "--table", table
        )
        assert once.returncode == 0, output(once)
        assert once.stdout.splitlines()[-1].startswith("sent 1 · ")
        assert sink.wait_for(1)[0].message["Subject"] == "Through PostgreSQL"
    finally:
        import psycopg

        with psycopg.connect(postgres_dsn, autocommit=True) as conn:
            conn.execute(f"DROP TABLE IF EXISTS {table}")


# --------------------------------------------------------------------------- sink


def test_sink_prints_each_message_and_stops_on_sigterm(
    background: Callable[..., Background],
) -> None:
    sink = background("sink", "--port", "0")
    port = int(sink.wait_for(r"listening on 127\.0\.0\.1:(\d+) \(plain SMTP\)")[1])
    sink.wait_for(r"Waiting for mail")

    message = EmailMessage()
    message["From"] = "app@example.com"
    message["To"] = "ops@example.com"
    message["Subject"] = "Hello from the test"
    message.set_content("First line\n" + "".join(f"line {i}\n" for i in range(100)))
    with smtplib.SMTP("127.0.0.1", port, local_hostname="client.test", timeout=10) as client:
        client.send_message(message)

    sink.wait_for(r"… \(\d+ more lines\)")
    out = sink.stdout
    assert "Subject: Hello from the test" in out
    assert "envelope: from <app@example.com> to <ops@example.com>" in out
    assert "First line" in out
    assert "line 98" not in out  # truncated at --max-lines
    assert sink.stop() == 0
    assert sink.stdout.rstrip().endswith("SIGTERM: stopped after 1 message.")
    assert "Traceback" not in sink.stderr


def test_sink_with_tls_prints_what_to_pin(background: Callable[..., Background]) -> None:
    sink = background("sink", "--port", "0", "--tls", "starttls", "--max-lines", "5")
    port = int(sink.wait_for(r"listening on 127\.0\.0\.1:(\d+) \(STARTTLS\)")[1])
    fingerprint = sink.wait_for(r'pinned_fingerprints = \["([0-9a-f]{64})"\]')[1]
    ca_file = Path(sink.wait_for(r"CA certificate \(PEM\), to trust or pin: +(\S+)")[1])
    assert ca_file.read_text(encoding="ascii").startswith("-----BEGIN CERTIFICATE-----")

    config = MailConfig(
        host="127.0.0.1",
        port=port,
        sender=SENDER,
        tls="starttls",
        trust="pinned",
        pinned_fingerprints=[fingerprint],
        timeout=10,
    )
    with Notifier(config) as notifier:
        notifier.send(note(subject="Over TLS"))

    sink.wait_for(r"Subject: Over TLS")
    assert re.search(r"connection \d+ \(TLS TLSv1\.[23]\)", sink.stdout)

    # A client that does not trust the throwaway certificate: one line, no traceback.
    with Notifier(config.model_copy(update={"trust": "verify", "pinned_fingerprints": ()})) as n:
        assert not n.verify().ok
    sink.wait_for(r"SMTP session exception: .*caused by SSLError", stderr=True)
    assert "Traceback" not in sink.stderr
    assert sink.stop(signal.SIGINT) == 0
    assert not ca_file.exists()  # throwaway: removed on exit


def test_sink_refuses_a_host_name(cli: Runner) -> None:
    result = cli("sink", "--host", "localhost", "--port", "0")
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        "smtpnotify: --host must be an IP address such as 127.0.0.1, not 'localhost'"
    ]


# --------------------------------------------------------------------------- demo and parser


def test_demo_still_runs() -> None:
    result = run_cli("demo")
    assert result.returncode == 0, output(result)
    assert "2. notifier.verify() — the settings page's confirmation message:" in result.stdout
    assert "6. What the sink received (5 messages):" in result.stdout


@pytest.mark.parametrize(
    "args",
    [[], ["check"], ["send", "--env"], ["worker"], ["nope"], ["cert"], ["check", "--x"]],
)
def test_usage_errors_are_one_line(args: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    [line] = captured.err.splitlines()
    assert line.startswith("smtpnotify") and "(see: smtpnotify" in line


@pytest.mark.parametrize(
    "args",
    [[], ["check"], ["send"], ["worker"], ["outbox"], ["outbox", "purge"], ["cert", "fetch"],
     ["sink"], ["demo"]],
)  # fmt: skip
def test_every_command_has_help(args: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main([*args, "--help"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.startswith("usage: smtpnotify")


def test_python_dash_m_and_the_console_script_agree() -> None:
    result = run_cli("--version")
    assert result.returncode == 0
    assert re.fullmatch(r"smtpnotify \d+\.\d+\.\d+\S*\n", result.stdout)
    script = shutil.which("smtpnotify", path=str(Path(sys.executable).parent))
    if script is None:
        pytest.skip("the console script is not installed next to this interpreter")
    console = subprocess.run(
        [script, "--version"], capture_output=True, text=True, timeout=TIMEOUT, check=False
    )
    assert (console.returncode, console.stdout) == (0, result.stdout)


# --------------------------------------------------------------------------- parsing units


@pytest.mark.parametrize(
    ("url", "kind", "target"),
    [
        ("sqlite:///relative.db", "sqlite", "relative.db"),
        ("sqlite:////abs/path.db", "sqlite", "/abs/path.db"),
        ("SQLITE:///dir/x.db", "sqlite", "dir/x.db"),
        ("plain/path.db", "sqlite", "plain/path.db"),
        ("/abs/plain.db", "sqlite", "/abs/plain.db"),
        ("postgresql://app@db.internal/mail", "postgres", "postgresql://app@db.internal/mail"),
        ("postgres://app@db/mail", "postgres", "postgres://app@db/mail"),
    ],
)
def test_outbox_urls(url: str, kind: str, target: str) -> None:
    parsed = parse_outbox_url(url)
    assert (parsed.kind, parsed.target) == (kind, target)


@pytest.mark.parametrize(
    "url", ["", "sqlite://", "sqlite:///", "sqlite:///:memory:", "sqlite://host/x.db", "redis://x"]
)
def test_bad_outbox_urls(url: str) -> None:
    with pytest.raises(CLIError):
        parse_outbox_url(url)


def test_postgres_passwords_are_masked_in_descriptions() -> None:
    url = parse_outbox_url(f"postgresql://app:{PASSWORD}@db/mail?sslmode=require", "mail_outbox")
    assert PASSWORD not in url.describe()
    assert (
        url.describe()
        == "PostgreSQL postgresql://app:***@db/mail?sslmode=require table mail_outbox"
    )
    assert redact_dsn(f"postgresql://db/mail?password={PASSWORD}&x=1") == (
        "postgresql://db/mail?password=***&x=1"
    )


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("7d", timedelta(days=7)),
        ("12h", timedelta(hours=12)),
        ("1d12h", timedelta(days=1, hours=12)),
        ("30m", timedelta(minutes=30)),
        ("45s", timedelta(seconds=45)),
        ("2w", timedelta(weeks=2)),
        ("1.5h", timedelta(minutes=90)),
        ("P7D", timedelta(days=7)),
        ("PT12H", timedelta(hours=12)),
        ("p1dt1m", timedelta(days=1, minutes=1)),
        ("0s", timedelta(0)),
    ],
)
def test_durations(text: str, expected: timedelta) -> None:
    assert parse_duration(text) == expected


@pytest.mark.parametrize("text", ["7", "", "d", "7 days", "-P1D", "P", "1y", "7d-"])
def test_bad_durations(text: str) -> None:
    import argparse

    with pytest.raises(argparse.ArgumentTypeError):
        parse_duration(text)
