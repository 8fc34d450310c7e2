"""A raw-socket SMTP server that misbehaves on purpose, stage by stage.

`ScriptedServer` listens on 127.0.0.1 (port 0) and runs a `Script` on every
connection, one thread per connection.  It answers like a plain SMTP server
unless the script says otherwise for a *stage*:

=================  ==================================================  ====================
stage              when                                                default
=================  ==================================================  ====================
``"TLS"``          implicit TLS (``tls="ssl"``) before the greeting,   the real handshake
                   and after a ``220`` reply to STARTTLS
``"GREETING"``     on connect (also settable as ``Script(greeting=)``)  ``220``
``"EHLO"``         EHLO command                                        ``250`` + extensions
``"HELO"``         HELO command                                        ``250``
``"STARTTLS"``     STARTTLS command; a ``220`` reply starts the        ``220`` with a
                   "TLS" stage                                         context, else ``454``
``"AUTH"``         after the AUTH PLAIN / LOGIN dialog (334            ``235``, or ``535``
                   challenges are sent normally): the final reply      for bad credentials
``"MAIL"``         MAIL command                                        ``250``
``"RCPT"``         RCPT command (may map recipient -> behaviour)       ``250``
``"DATA"``         DATA command; a ``354`` reply starts the content    ``354``
``"DATA_CONTENT"`` once ``Script.mid_data_bytes`` content bytes        nothing (keep
                   arrived after the 354 (mid-DATA); the complete      reading)
                   lines so far are in ``partial_data`` by then
``"DATA_END"``     after the final ``.``                               ``250``
``"RSET"``,        those commands                                      ``250``
``"NOOP"``
``"QUIT"``         QUIT, then the server closes                        ``221``
any other verb     that command                                        ``502``
=================  ==================================================  ====================

A behaviour is an action, a list of actions run in order, `PerOccurrence`
(the n-th time the stage happens on a connection gets the n-th behaviour, the
last one repeats), or, for ``"RCPT"`` only, a mapping from recipient address
(case-insensitive, ``"*"`` for the others) to a behaviour.  Actions:

* ``Reply(code, text="OK")``: a whole reply at once; ``"\\n"`` in ``text``
  makes a multi-line reply (``250-a`` / ``250 b``); ``text=""`` sends the
  bare code.
* ``Raw(b"...")``: exactly these bytes (malformed replies, bare LF, ...).
* ``Default()``: what the stage does by default (only useful in a list).
* ``Trickle(data=None, interval=0.05, forever=False)``: send ``data`` (a
  ``Reply``, bytes, or ``None`` for the stage's default reply) one byte per
  ``interval``; ``forever=True`` repeats the bytes without end.
* ``EndlessContinuation(text="x", interval=0.01)``: ``250-x`` lines forever.
* ``Stall()``: never reply (reads and records what the client sends, until
  the client or the server closes).
* ``Delay(seconds)``: wait, then run the next action of the list.
* ``Drop(rst=False)``: close the connection now (``rst=True``: TCP reset).

A reply starting with ``421`` is followed by closing the connection, as a
real server does.  For the "TLS" stage, anything but ``Default()`` replaces
the handshake and the connection is closed once the actions end.

Examples::

    # greeting 421, trickled EHLO, endless continuation, stalls
    Script(greeting=Reply(421, "4.3.2 busy"))
    Script(on={"EHLO": Trickle(interval=0.2)})              # the default EHLO reply, slowly
    Script(on={"EHLO": EndlessContinuation()})
    Script(on={"MAIL": Stall()})
    Script(on={"DATA_END": [Delay(0.5), Default()]})        # slow but complete final reply

    # reply codes
    Script(on={"MAIL": Reply(451, "4.3.0 try later")})
    Script(on={"RCPT": {"bad@example.com": Reply(550, "5.1.1 no such user")}})
    Script(on={"RCPT": PerOccurrence(Reply(250), Reply(452, "4.5.3 too many"))})
    Script(on={"DATA_END": Reply(554, "5.7.1 rejected")})

    # drops: before the greeting, mid-DATA, after the final "."
    Script(greeting=Drop())
    Script(on={"DATA_CONTENT": Drop(rst=True)}, mid_data_bytes=1)
    Script(on={"DATA_END": Drop()})                          # the ambiguous case

    # TLS
    ScriptedServer(Script(ehlo_extensions=("STARTTLS", "AUTH PLAIN LOGIN")),
                   ssl_context=certs.server_context())      # STARTTLS really upgrades
    ScriptedServer(Script(), tls="ssl", ssl_context=ctx)     # implicit TLS
    Script(on={"TLS": Stall()})                              # TCP up, handshake never answered
    Script(on={"TLS": Trickle(SLOW_SERVER_HELLO, interval=0.1, forever=True)})

    # AUTH accept / reject
    Script(ehlo_extensions=("AUTH PLAIN LOGIN",), credentials={"alice": "pw"})
    Script(ehlo_extensions=("AUTH PLAIN",), on={"AUTH": Reply(535, "5.7.8 no")})

    # one script per connection (the last one repeats): fail once, then work
    ScriptedServer([Script(greeting=Reply(421, "busy")), Script()])

    with ScriptedServer(Script(on={"MAIL": Reply(451, "4.3.0 later")})) as server:
        client = smtplib.SMTP(server.host, server.port)
        ...
        assert "AUTH" not in server.received.verbs
        assert server.received.messages == []

`server.received` is a snapshot (`Received`) of everything so far: the
command lines in arrival order, the contents of finished DATA (un-stuffed),
and per connection the raw bytes received (after TLS decryption), AUTH
attempts, any content of an unfinished DATA, TLS facts and who closed.

Commands are read from a buffer and handled one at a time, so pipelined
commands work (advertise ``"PIPELINING"`` to invite them); plaintext that
arrives after STARTTLS but before the handshake is discarded (RFC 3207).

To see a drop *while the client is still writing* the content, the message
must be larger than the socket buffers (a few MB); otherwise the client has
written everything, ``.`` included, before it notices.  A ``Drop(rst=True)``
as the greeting can reach a client before its ``connect()`` returns
(``ConnectionResetError`` from connect).

In tests use the ``scripted`` fixture of ``tests/conftest.py``:
``server = scripted(Script(...), cert="localhost")``; it closes the server
after the test and turns errors in connection threads into test errors.

`close()` (or leaving the ``with`` block) stops every connection thread
promptly (all waits poll a stop event) and closes every socket.
"""

from __future__ import annotations

import base64
import binascii
import re
import socket
import ssl
import struct
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Literal, TypeAlias

__all__ = [
    "SLOW_SERVER_HELLO",
    "AuthAttempt",
    "ConnectionLog",
    "Default",
    "Delay",
    "Drop",
    "EndlessContinuation",
    "PerOccurrence",
    "Raw",
    "Received",
    "Reply",
    "Script",
    "ScriptedServer",
    "Stall",
    "Trickle",
]

_POLL = 0.02
_HANDSHAKE_LIMIT = 30.0
_JOIN_LIMIT = 5.0

# record header: handshake, TLS 1.2, 16384 bytes; handshake header: ServerHello, 16380
# bytes; server version 3.3; then 32 bytes of "random" (and nothing more, ever)
SLOW_SERVER_HELLO = bytes.fromhex("1603034000" + "02003ffc" + "0303") + bytes(range(32))
"""The start of a TLS record announcing a 16 KiB ServerHello: a client that
reads it waits for the rest.  Trickle it (``forever=True``) at the "TLS" stage."""


# -- actions ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Reply:
    """A whole reply; ``"\\n"`` in ``text`` gives a multi-line reply."""

    code: int
    text: str = "OK"

    def to_bytes(self) -> bytes:
        """The reply on the wire, CRLF-terminated lines."""
        lines = self.text.split("\n")
        out = [f"{self.code}-{line}" for line in lines[:-1]]
        last = f"{self.code} {lines[-1]}" if lines[-1] else str(self.code)
        return ("\r\n".join([*out, last]) + "\r\n").encode("utf-8")


@dataclass(frozen=True)
class Raw:
    """Exactly these bytes."""

    data: bytes


@dataclass(frozen=True)
class Default:
    """What the stage does when the script says nothing."""


@dataclass(frozen=True)
class Trickle:
    """Send ``data`` one byte per ``interval`` seconds (``forever``: repeat it endlessly).

    ``data=None`` trickles the stage's default reply.
    """

    data: Reply | bytes | None = None
    interval: float = 0.05
    forever: bool = False


@dataclass(frozen=True)
class EndlessContinuation:
    """Send ``"<code>-<text>\\r\\n"`` every ``interval`` seconds, forever."""

    text: str = "x"
    interval: float = 0.01
    code: int = 250


@dataclass(frozen=True)
class Stall:
    """Never reply; keep reading until the client or the server closes."""


@dataclass(frozen=True)
class Delay:
    """Wait ``seconds``, then go on with the next action."""

    seconds: float


@dataclass(frozen=True)
class Drop:
    """Close the connection now; ``rst=True`` sends a TCP reset instead of a FIN."""

    rst: bool = False


Action: TypeAlias = Reply | Raw | Default | Trickle | EndlessContinuation | Stall | Delay | Drop


class PerOccurrence:
    """The n-th occurrence of a stage on one connection gets the n-th behaviour.

    The last behaviour repeats: ``PerOccurrence(Reply(451, "later"), Default())``
    refuses the first MAIL of each connection and accepts the others.
    """

    def __init__(self, *behaviours: Behaviour) -> None:
        if not behaviours:
            raise ValueError("PerOccurrence needs at least one behaviour")
        self.behaviours = behaviours

    def __repr__(self) -> str:
        return f"PerOccurrence{self.behaviours!r}"

    def pick(self, occurrence: int) -> Behaviour:
        """The behaviour for the ``occurrence``-th time (from 1)."""
        return self.behaviours[min(occurrence, len(self.behaviours)) - 1]


Behaviour: TypeAlias = "Action | Sequence[Action] | PerOccurrence | Mapping[str, Behaviour]"

_STAGES = frozenset({"TLS", "GREETING", "DATA_CONTENT", "DATA_END"})


@dataclass(frozen=True)
class Script:
    """What the server does on one connection.

    Attributes:
        greeting: the behaviour on connect (``on["GREETING"]`` wins if given);
            by default ``220 <hostname> ESMTP``.
        ehlo_extensions: the keywords of the default EHLO reply, in order
            (``"STARTTLS"``, ``"AUTH PLAIN LOGIN"``, ``"PIPELINING"``,
            ``"SMTPUTF8"``, ``"8BITMIME"``, ``"SIZE 1000000"``, ...);
            ``STARTTLS`` is left out once the connection is encrypted.
        on: behaviour per stage (see the module docstring).
        credentials: ``{user: password}`` the default AUTH reply checks;
            ``None`` accepts anything.
        mid_data_bytes: content bytes to receive before the "DATA_CONTENT"
            stage runs.
        hostname: the name in the default greeting and EHLO reply.
    """

    greeting: Behaviour = Default()
    ehlo_extensions: Sequence[str] = ("8BITMIME",)
    on: Mapping[str, Behaviour] = field(default_factory=dict)
    credentials: Mapping[str, str] | None = None
    mid_data_bytes: int = 1
    hostname: str = "scripted.test"

    def __post_init__(self) -> None:
        for key in self.on:
            if key != key.upper() or not re.fullmatch(r"[A-Z_]+", key):
                raise ValueError(f"stage names are upper-case verbs or {sorted(_STAGES)}: {key!r}")
        if self.mid_data_bytes < 1:
            raise ValueError("mid_data_bytes must be at least 1")


# -- records ------------------------------------------------------------------------------


@dataclass(frozen=True)
class AuthAttempt:
    """Credentials a client sent with AUTH PLAIN or LOGIN (password hidden in repr)."""

    mechanism: str
    username: str
    password: str = field(repr=False)


@dataclass
class ConnectionLog:
    """What happened on one connection.

    Attributes:
        number: 1 for the first connection, then 2, ...
        commands: command lines received (without CRLF), in order.
        raw: every byte received, decrypted after TLS (AUTH answers and
            content included).
        messages: contents of finished DATA, un-stuffed, CRLF as received.
        partial_data: content of a DATA that never finished (drop, stall,
            client gone), un-stuffed complete lines; ``None`` if none.
        auth: AUTH attempts.
        tls: whether a TLS handshake completed.
        tls_version: its version, e.g. ``"TLSv1.3"``.
        tls_error: why a handshake failed (the client refused the
            certificate, ...), or ``None``.
        closed: whether the connection has ended.
        closed_by: ``"client"``, ``"server"`` (script or 421/QUIT) or ``None``
            (still open, or stopped by ``close()``).
    """

    number: int
    commands: list[str] = field(default_factory=list)
    raw: bytearray = field(default_factory=bytearray)
    messages: list[bytes] = field(default_factory=list)
    partial_data: bytes | None = None
    auth: list[AuthAttempt] = field(default_factory=list)
    tls: bool = False
    tls_version: str | None = None
    tls_error: str | None = None
    closed: bool = False
    closed_by: Literal["client", "server"] | None = None

    @property
    def verbs(self) -> list[str]:
        """The upper-cased first word of each command."""
        return [c.split(" ", 1)[0].upper() for c in self.commands]


@dataclass(frozen=True)
class Received:
    """A snapshot of everything a `ScriptedServer` received.

    Attributes:
        commands: every command line, all connections, in arrival order.
        messages: every finished DATA content, in order.
        connections: per-connection logs, oldest first.
    """

    commands: list[str]
    messages: list[bytes]
    connections: list[ConnectionLog]

    @property
    def verbs(self) -> list[str]:
        """The upper-cased first word of each command."""
        return [c.split(" ", 1)[0].upper() for c in self.commands]


class _Closed(Exception):
    """The connection is over (``by`` the client, the server, or ``None`` for stop)."""

    def __init__(self, by: Literal["client", "server"] | None) -> None:
        super().__init__(by)
        self.by = by


class _Handshake:
    """The default of the "TLS" stage."""


# -- the server ----------------------------------------------------------------------------


class ScriptedServer:
    """A thread-per-connection SMTP server that follows a `Script`.

    Args:
        script: the script for every connection, or a list: connection n
            runs ``script[n - 1]``, the last one repeats.
        tls: ``"ssl"`` for implicit TLS (needs ``ssl_context``); ``"none"``
            or ``None`` for plain TCP.
        ssl_context: server-side context for implicit TLS and for STARTTLS
            (without it STARTTLS is refused with ``454``).
        host: loopback address to listen on.
    """

    def __init__(
        self,
        script: Script | Sequence[Script] | None = None,
        *,
        tls: Literal["none", "ssl"] | None = None,
        ssl_context: ssl.SSLContext | None = None,
        host: str = "127.0.0.1",
    ) -> None:
        if script is None:
            self.scripts: tuple[Script, ...] = (Script(),)
        elif isinstance(script, Script):
            self.scripts = (script,)
        else:
            self.scripts = tuple(script)
            if not self.scripts:
                raise ValueError("give at least one Script")
        self.tls = tls or "none"
        if self.tls == "ssl" and ssl_context is None:
            raise ValueError("tls='ssl' needs ssl_context")
        self.ssl_context = ssl_context
        self.host = host
        self.port = 0
        self._stop = threading.Event()
        self._cond = threading.Condition()
        self._commands: list[str] = []
        self._logs: list[ConnectionLog] = []
        self._threads: list[threading.Thread] = []
        self._errors: list[BaseException] = []
        self._listener: socket.socket | None = None
        self._acceptor: threading.Thread | None = None

    def __repr__(self) -> str:
        return f"<ScriptedServer {self.host}:{self.port} tls={self.tls}>"

    @property
    def address(self) -> tuple[str, int]:
        """``(host, port)``."""
        return (self.host, self.port)

    # -- life cycle ----------------------------------------------------------------

    def start(self) -> ScriptedServer:
        """Listen and accept in a thread; returns ``self``."""
        if self._listener is not None:
            raise RuntimeError("already started")
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        listener = socket.socket(family, socket.SOCK_STREAM)
        try:
            listener.bind((self.host, 0))
            listener.listen(64)
            listener.settimeout(_POLL)
        except BaseException:
            listener.close()
            raise
        self._listener = listener
        self.port = int(listener.getsockname()[1])
        self._acceptor = threading.Thread(
            target=self._accept_loop, name=f"scripted-accept-{self.port}", daemon=True
        )
        self._acceptor.start()
        return self

    def close(self) -> None:
        """Stop accepting, end every connection, join every thread.  Idempotent.

        Raises:
            RuntimeError: a connection thread failed (a bug in the script or
                in this server), or did not stop.
        """
        self._stop.set()
        if self._acceptor is not None:
            self._acceptor.join(_JOIN_LIMIT)
        if self._listener is not None:
            self._listener.close()
        with self._cond:
            threads = list(self._threads)
        stuck = []
        for thread in threads:
            thread.join(_JOIN_LIMIT)
            if thread.is_alive():
                stuck.append(thread.name)
        if stuck:
            raise RuntimeError(f"ScriptedServer threads did not stop: {stuck}")
        if self._errors:
            errors, self._errors = self._errors, []
            raise RuntimeError(f"ScriptedServer connection failed: {errors[0]!r}") from errors[0]

    def __enter__(self) -> ScriptedServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- records ---------------------------------------------------------------------

    @property
    def received(self) -> Received:
        """A snapshot of everything received so far."""
        with self._cond:
            return Received(
                commands=list(self._commands),
                messages=[m for log in self._logs for m in log.messages],
                connections=[
                    replace(
                        log,
                        commands=list(log.commands),
                        raw=bytearray(log.raw),
                        messages=list(log.messages),
                        auth=list(log.auth),
                    )
                    for log in self._logs
                ],
            )

    @property
    def connection_count(self) -> int:
        """How many connections were accepted."""
        with self._cond:
            return len(self._logs)

    def wait_until(self, predicate: Callable[[], bool], timeout: float = 5.0) -> None:
        """Wait until ``predicate()`` (re-checked on every record change) is true.

        Raises:
            TimeoutError: still false after ``timeout`` seconds.
        """
        deadline = time.monotonic() + timeout
        with self._cond:
            while not predicate():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"ScriptedServer: condition not met within {timeout} s")
                self._cond.wait(remaining)

    def wait_closed(self, timeout: float = 5.0) -> list[ConnectionLog]:
        """Wait until at least one connection was made and all have ended."""
        self.wait_until(lambda: bool(self._logs) and all(log.closed for log in self._logs), timeout)
        return self.received.connections

    def _update(self, action: Callable[[], object]) -> None:
        with self._cond:
            action()
            self._cond.notify_all()

    # -- threads ---------------------------------------------------------------------

    def _accept_loop(self) -> None:
        assert self._listener is not None
        while not self._stop.is_set():
            try:
                sock, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with self._cond:
                log = ConnectionLog(number=len(self._logs) + 1)
                self._logs.append(log)
                self._cond.notify_all()
                thread = threading.Thread(
                    target=self._serve,
                    args=(sock, log),
                    name=f"scripted-{self.port}-{log.number}",
                    daemon=True,
                )
                self._threads.append(thread)
            thread.start()

    def _serve(self, sock: socket.socket, log: ConnectionLog) -> None:
        script = self.scripts[min(log.number, len(self.scripts)) - 1]
        session = _Session(self, script, _Wire(sock, self._stop, self, log), log)
        closed_by: Literal["client", "server"] | None = None
        try:
            session.run()
        except _Closed as end:
            closed_by = end.by
        except OSError:
            closed_by = "client"  # reset, broken pipe, TLS alert from the client
        except BaseException as exc:
            self._errors.append(exc)
        finally:
            session.wire.close()

            def finish() -> None:
                log.closed = True
                log.closed_by = closed_by

            self._update(finish)


class _Wire:
    """One connection's socket: buffered reads and writes that honour the stop event."""

    def __init__(
        self, sock: socket.socket, stop: threading.Event, server: ScriptedServer, log: ConnectionLog
    ) -> None:
        sock.settimeout(_POLL)
        self.sock = sock
        self.stop = stop
        self.server = server
        self.log = log
        self.buf = bytearray()

    def close(self) -> None:
        self.sock.close()

    def fill(self) -> None:
        """Receive at least one byte into ``buf``."""
        while True:
            if self.stop.is_set():
                raise _Closed(None)
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                continue
            if not data:
                raise _Closed("client")
            self.buf += data
            self.server._update(partial(self.log.raw.extend, data))
            return

    def read_line(self, separator: bytes = b"\n") -> bytes:
        """The next line, separator included."""
        while (i := self.buf.find(separator)) < 0:
            self.fill()
        line = bytes(self.buf[: i + len(separator)])
        del self.buf[: i + len(separator)]
        return line

    def send(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            if self.stop.is_set():
                raise _Closed(None)
            try:
                sent = self.sock.send(view)
            except TimeoutError:
                continue
            view = view[sent:]

    def pause(self, seconds: float) -> None:
        if self.stop.wait(seconds):
            raise _Closed(None)

    def drop(self, rst: bool) -> None:
        if rst:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.sock.close()
        raise _Closed("server")

    def start_tls(self, context: ssl.SSLContext) -> ssl.SSLSocket:
        """Server-side TLS handshake; plaintext that arrived before it is discarded."""
        self.buf.clear()
        tls = context.wrap_socket(self.sock, server_side=True, do_handshake_on_connect=False)
        self.sock = tls
        deadline = time.monotonic() + _HANDSHAKE_LIMIT
        while True:
            if self.stop.is_set():
                raise _Closed(None)
            try:
                tls.do_handshake()
                return tls
            except TimeoutError:
                if time.monotonic() > deadline:
                    raise _Closed("server") from None


class _Session:
    """Runs one `Script` on one connection."""

    def __init__(
        self, server: ScriptedServer, script: Script, wire: _Wire, log: ConnectionLog
    ) -> None:
        self.server = server
        self.script = script
        self.wire = wire
        self.log = log
        self.occurrences: dict[str, int] = {}

    # -- the conversation ---------------------------------------------------------------

    def run(self) -> None:
        if self.server.tls == "ssl":
            self.stage("TLS", _Handshake())
        greeting = self.script.on.get("GREETING", self.script.greeting)
        self.stage("GREETING", Reply(220, f"{self.script.hostname} ESMTP"), greeting)
        while True:
            line = self.wire.read_line()
            text = line.rstrip(b"\r\n").decode("utf-8", errors="backslashreplace")
            self.record_command(text)
            verb = text.split(" ", 1)[0].upper()
            self.command(verb, text)

    def record_command(self, text: str) -> None:
        def add() -> None:
            self.log.commands.append(text)
            self.server._commands.append(text)

        self.server._update(add)

    def command(self, verb: str, text: str) -> None:
        if verb == "EHLO":
            self.stage("EHLO", Reply(250, "\n".join([self.script.hostname, *self.extensions()])))
        elif verb == "HELO":
            self.stage("HELO", Reply(250, self.script.hostname))
        elif verb == "STARTTLS":
            context = self.server.ssl_context
            default = (
                Reply(220, "2.0.0 Ready to start TLS")
                if context is not None and not self.log.tls
                else Reply(454, "4.7.0 TLS not available")
            )
            if self.stage("STARTTLS", default) == 220 and context is not None:
                self.stage("TLS", _Handshake())
        elif verb == "AUTH":
            self.auth(text)
        elif verb == "RCPT":
            match = re.search(r"<([^>]*)>", text)
            self.stage("RCPT", Reply(250, "2.1.5 OK"), address=match.group(1) if match else "")
        elif verb == "DATA":
            if self.stage("DATA", Reply(354, "End data with <CR><LF>.<CR><LF>")) == 354:
                self.data()
        elif verb == "QUIT":
            self.stage("QUIT", Reply(221, "2.0.0 Bye"))
            self.wire.sock.close()
            raise _Closed("server")
        elif verb in {"MAIL", "RSET", "NOOP"}:
            self.stage(verb, Reply(250, "2.1.0 OK" if verb == "MAIL" else "2.0.0 OK"))
        else:
            self.stage(verb, Reply(502, "5.5.2 Command not recognized"))

    def extensions(self) -> list[str]:
        return [
            ext
            for ext in self.script.ehlo_extensions
            if not (self.log.tls and ext.upper() == "STARTTLS")
        ]

    def auth(self, text: str) -> None:
        parts = text.split()
        mechanism = parts[1].upper() if len(parts) > 1 else ""
        initial = parts[2] if len(parts) > 2 else None
        try:
            if mechanism == "PLAIN":
                blob = self.challenge("", initial)
                _, user, password = blob.split(b"\0")
            elif mechanism == "LOGIN":
                user = self.challenge("VXNlcm5hbWU6", initial)
                password = self.challenge("UGFzc3dvcmQ6", None)
            else:
                self.stage("AUTH", Reply(504, "5.5.4 Unrecognized authentication type"))
                return
        except (ValueError, binascii.Error):
            self.stage("AUTH", Reply(501, "5.5.2 Cannot decode response"))
            return
        attempt = AuthAttempt(
            mechanism,
            user.decode("utf-8", errors="backslashreplace"),
            password.decode("utf-8", errors="backslashreplace"),
        )
        self.server._update(lambda: self.log.auth.append(attempt))
        expected = self.script.credentials
        ok = expected is None or expected.get(attempt.username) == attempt.password
        self.stage(
            "AUTH",
            Reply(235, "2.7.0 Authentication successful")
            if ok
            else Reply(535, "5.7.8 Authentication credentials invalid"),
        )

    def challenge(self, prompt: str, initial: str | None) -> bytes:
        if initial is None:
            self.wire.send(f"334 {prompt}\r\n".encode("ascii"))
            initial = self.wire.read_line().strip().decode("ascii", errors="replace")
        if initial == "*":
            raise ValueError("client cancelled AUTH")
        return base64.b64decode(initial, validate=True)

    def set_partial(self, content: bytes) -> None:
        self.server._update(lambda: setattr(self.log, "partial_data", content))

    def data(self) -> None:
        content = bytearray()
        seen = 0  # content bytes consumed, terminator excluded
        pending = "DATA_CONTENT" in self.script.on
        self.set_partial(b"")
        buf = self.wire.buf
        while True:
            i = buf.find(b"\r\n")
            at_end = i >= 0 and buf[: i + 2] == b".\r\n"
            if i >= 0 and not at_end:
                line = bytes(buf[: i + 2])
                del buf[: i + 2]
                seen += len(line)
                content += line[1:] if line.startswith(b".") else line
                self.set_partial(bytes(content))
                continue
            if pending and seen + (0 if at_end else len(buf)) >= self.script.mid_data_bytes:
                pending = False
                self.stage("DATA_CONTENT", None)
                continue
            if at_end:
                del buf[:3]
                break
            self.wire.fill()
        finished = bytes(content)

        def record() -> None:
            self.log.messages.append(finished)
            self.log.partial_data = None

        self.server._update(record)
        self.stage("DATA_END", Reply(250, "2.0.0 OK queued"))

    # -- stages -------------------------------------------------------------------------------

    def stage(
        self,
        name: str,
        default: Reply | _Handshake | None,
        behaviour: Behaviour | None = None,
        *,
        address: str = "",
    ) -> int | None:
        """Run the script for stage ``name``; return the reply code sent, if any."""
        count = self.occurrences[name] = self.occurrences.get(name, 0) + 1
        chosen = behaviour if behaviour is not None else self.script.on.get(name, Default())
        actions = _resolve(chosen, count, address)
        sent = bytearray()
        for action in actions:
            self.act(action, default, sent)
        if name == "TLS" and not any(isinstance(a, Default) for a in actions):
            self.wire.sock.close()
            raise _Closed("server")
        code = int(sent[:3]) if sent[:3].isdigit() else None
        if code == 421:
            self.wire.sock.close()
            raise _Closed("server")
        return code

    def act(self, action: Action, default: Reply | _Handshake | None, sent: bytearray) -> None:
        wire = self.wire
        if isinstance(action, Default):
            if isinstance(default, _Handshake):
                self.handshake()
            elif default is not None:
                self.act(default, None, sent)
        elif isinstance(action, Reply | Raw):
            data = action.to_bytes() if isinstance(action, Reply) else action.data
            wire.send(data)
            sent += data
        elif isinstance(action, Trickle):
            data = self.trickle_bytes(action, default)
            while True:
                for byte in data:
                    wire.send(bytes([byte]))
                    sent.append(byte)
                    wire.pause(action.interval)
                if not action.forever:
                    break
        elif isinstance(action, EndlessContinuation):
            line = f"{action.code}-{action.text}\r\n".encode()
            while True:
                wire.send(line)
                sent += line
                wire.pause(action.interval)
        elif isinstance(action, Stall):
            while True:
                wire.fill()
        elif isinstance(action, Delay):
            wire.pause(action.seconds)
        elif isinstance(action, Drop):
            wire.drop(action.rst)
        else:  # pragma: no cover - guarded by _resolve
            raise TypeError(f"not an action: {action!r}")

    def trickle_bytes(self, action: Trickle, default: Reply | _Handshake | None) -> bytes:
        if isinstance(action.data, bytes):
            return action.data
        if isinstance(action.data, Reply):
            return action.data.to_bytes()
        if isinstance(default, Reply):
            return default.to_bytes()
        raise ValueError("Trickle() without data needs a stage with a default reply")

    def handshake(self) -> None:
        context = self.server.ssl_context
        assert context is not None
        try:
            tls = self.wire.start_tls(context)
        except ssl.SSLError as exc:
            reason = str(exc)
            self.server._update(lambda: setattr(self.log, "tls_error", reason))
            raise _Closed("client") from exc
        version = tls.version()

        def mark() -> None:
            self.log.tls = True
            self.log.tls_version = version

        self.server._update(mark)


def _resolve(behaviour: Behaviour, occurrence: int, address: str) -> list[Action]:
    """Flatten a behaviour to the actions for this occurrence (and recipient)."""
    if isinstance(behaviour, PerOccurrence):
        return _resolve(behaviour.pick(occurrence), occurrence, address)
    if isinstance(behaviour, Mapping):
        lowered = {str(k).lower(): v for k, v in behaviour.items()}
        chosen = lowered.get(address.lower(), lowered.get("*", Default()))
        return _resolve(chosen, occurrence, address)
    items = list(behaviour) if isinstance(behaviour, list | tuple) else [behaviour]
    actions: list[Action] = []
    for item in items:
        if not isinstance(
            item, Reply | Raw | Default | Trickle | EndlessContinuation | Stall | Delay | Drop
        ):
            raise TypeError(f"not a scripted-server action: {item!r}")
        actions.append(item)
    return actions
