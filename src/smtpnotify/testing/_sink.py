"""`SMTPSink`: a real SMTP server on loopback that records what it receives.

The sink runs aiosmtpd's threaded :class:`~aiosmtpd.controller.Controller` on
``127.0.0.1``, port 0 (the kernel picks a free port), and keeps:

* ``messages``: every message it accepted, byte-exact (after dot-unstuffing),
  with its envelope, the parsed :class:`email.message.EmailMessage`, whether
  the connection was TLS and who authenticated;
* ``rejected``: messages whose content arrived but were refused or dropped
  after the final ``.``;
* ``commands``: every SMTP command line that reached it, in order, across
  connections (AUTH arguments redacted);
* ``connections``: one record per client connection.

It can speak STARTTLS or implicit TLS, require AUTH PLAIN / LOGIN, advertise
PIPELINING and SMTPUTF8, and inject faults: a chosen reply for a command, per
recipient for RCPT, for the final reply after the content (``"DATA_END"``), or
closing the connection after a command.  It needs no pytest::

    with SMTPSink() as sink:
        send_something(host=sink.host, port=sink.port)
        [message] = sink.wait_for(1)
        assert message.rcpt_tos == ("ops@example.com",)

aiosmtpd 1.4.6 notes: its Controller cannot start on port 0 (its start-up
probe connects to the *requested* port); the sink reads the bound port before
probing, and leaves the probe connection out of every record.  It never
advertises PIPELINING itself, although it processes pipelined commands in
order; ``pipelining=True`` adds the keyword.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import logging
import re
import socket
import ssl
import threading
import time
from collections.abc import Awaitable, Callable, Collection, Mapping
from dataclasses import dataclass, field, replace
from email import message_from_bytes, policy
from email.message import EmailMessage
from typing import Any, Literal, TypeAlias

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session

__all__ = [
    "ReplySpec",
    "SMTPSink",
    "SinkConnection",
    "SinkMessage",
]

ReplySpec: TypeAlias = tuple[int, str]
"""A reply the sink sends instead of its own: ``(451, "4.3.0 try later")``."""

_RepliesValue: TypeAlias = ReplySpec | Mapping[str, ReplySpec]

_log = logging.getLogger("smtpnotify.testing")
_DEFAULT_DATA_SIZE_LIMIT = 2**25
_AUTH_LINE = re.compile(r"^(\s*AUTH\s+\S+)\s+\S.*$", re.IGNORECASE)
_VERB = re.compile(r"^[A-Z][A-Z0-9_]*\Z")
_SHUTDOWN_GRACE = 5.0


@dataclass(frozen=True)
class SinkMessage:
    """One message whose content reached the sink.

    Attributes:
        connection: the number (from 1) of the connection that carried it; two
            messages with the same number travelled on one reused connection.
        mail_from: the envelope sender of ``MAIL FROM`` (``""`` for ``<>``).
        rcpt_tos: the envelope recipients the sink accepted, in order.
        data: the content exactly as received, after dot-unstuffing
            (CRLF line endings as sent; the final ``.`` line not included).
        message: ``data`` parsed with :data:`email.policy.default`.
        mail_options: ``MAIL FROM`` parameters, upper-cased (``["SMTPUTF8"]``).
        rcpt_options: ``RCPT TO`` parameters, upper-cased, of all recipients.
        smtputf8: whether ``MAIL FROM`` carried the ``SMTPUTF8`` parameter.
        tls: whether the connection was encrypted (STARTTLS or implicit TLS).
        tls_version: ``"TLSv1.3"`` and the like, or ``None``.
        authenticated_user: the user name that authenticated, or ``None``.
        reply: the final reply the sink sent after the content, ``None`` when
            it dropped the connection instead (see ``drop_after``).
    """

    connection: int
    mail_from: str
    rcpt_tos: tuple[str, ...]
    data: bytes
    message: EmailMessage = field(repr=False)
    mail_options: tuple[str, ...] = ()
    rcpt_options: tuple[str, ...] = ()
    smtputf8: bool = False
    tls: bool = False
    tls_version: str | None = None
    authenticated_user: str | None = None
    reply: ReplySpec | None = (250, "OK")


@dataclass
class SinkConnection:
    """One client connection, as the sink saw it (a snapshot when read).

    Attributes:
        number: 1 for the first connection, 2 for the next, ...
        peer: the client's ``(host, port)``.
        commands: the command lines of this connection (see
            :attr:`SMTPSink.commands`).
        tls: whether the connection is (now) encrypted.
        tls_version: the negotiated TLS version, or ``None``.
        authenticated_user: the user name that authenticated, or ``None``.
        closed: whether the connection has ended.
    """

    number: int
    peer: tuple[str, int]
    commands: list[str] = field(default_factory=list)
    tls: bool = False
    tls_version: str | None = None
    authenticated_user: str | None = None
    closed: bool = False


class _Records:
    """What the sink has seen, guarded by one condition variable."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.messages: list[SinkMessage] = []
        self.rejected: list[SinkMessage] = []
        self.commands: list[str] = []
        self.connections: list[SinkConnection] = []
        self.ignored_peers: set[tuple[str, int]] = set()
        self.opened = 0

    def open_connection(self, peer: tuple[str, int]) -> SinkConnection:
        with self.cond:
            if peer in self.ignored_peers:
                # aiosmtpd's start-up probe: tracked, never listed.
                return SinkConnection(number=0, peer=peer)
            self.opened += 1
            conn = SinkConnection(number=self.opened, peer=peer)
            self.connections.append(conn)
            self.cond.notify_all()
            return conn

    def update(self, action: Callable[[], None]) -> None:
        with self.cond:
            action()
            self.cond.notify_all()

    def add_command(self, conn: SinkConnection, line: str) -> None:
        def add() -> None:
            conn.commands.append(line)
            if conn.number:
                self.commands.append(line)

        self.update(add)

    def add_message(self, message: SinkMessage, *, accepted: bool) -> None:
        self.update(lambda: (self.messages if accepted else self.rejected).append(message))


class _SinkHandler:
    """aiosmtpd hooks: EHLO keywords, RCPT faults and the end of DATA."""

    def __init__(self, sink: SMTPSink) -> None:
        self._sink = sink

    async def handle_EHLO(
        self,
        server: _SinkSMTP,
        session: Session,
        envelope: Envelope,
        hostname: str,
        responses: list[str],
    ) -> list[str]:
        session.host_name = hostname
        texts = [line[4:] for line in responses]
        if self._sink.auth is None:
            texts = [t for t in texts if not t.upper().startswith("AUTH")]
        if self._sink.pipelining:
            texts.insert(1, "PIPELINING")
        texts = [t for t in texts if t != "HELP"]
        return [f"250-{t}" for t in texts[:-1]] + [f"250 {texts[-1]}"]

    async def handle_DATA(self, server: _SinkSMTP, session: Session, envelope: Envelope) -> str:
        return await server.finish_data(envelope)


class _SinkSession(Session):
    """aiosmtpd's Session without the deprecation log line on every AUTH."""

    @property
    def login_data(self) -> Any:
        return self._login_data

    @login_data.setter
    def login_data(self, value: Any) -> None:
        self._login_data = value


class _SinkSMTP(SMTP):
    """aiosmtpd's SMTP session with recording and fault injection."""

    def __init__(self, sink: SMTPSink, records: _Records, **kwargs: Any) -> None:
        super().__init__(_SinkHandler(sink), **kwargs)
        self._sink = sink
        self._records = records
        self._conn: SinkConnection | None = None
        self._in_challenge = False
        self._close_after_reply = False
        for verb, method in list(self._smtp_methods.items()):
            self._smtp_methods[verb] = self._guarded(verb, method)

    # -- connection bookkeeping -------------------------------------------------

    def _create_session(self) -> Session:
        return _SinkSession(self.loop)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        first = self._conn is None
        super().connection_made(transport)
        if first:
            peer = transport.get_extra_info("peername")
            self._conn = self._records.open_connection((str(peer[0]), int(peer[1])))
            self._sink._live.add(self)
        self._note_tls()

    def connection_lost(self, error: Exception | None) -> None:
        self.mark_closed()
        super().connection_lost(error)

    def mark_closed(self) -> None:
        """Record that this connection has ended."""
        self._sink._live.discard(self)
        conn = self._conn
        if conn is not None:
            self._records.update(lambda: setattr(conn, "closed", True))

    def _cb_client_connected(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        super()._cb_client_connected(reader, writer)
        read_until = reader.readuntil

        async def recording_readuntil(separator: bytes = b"\n") -> bytes:
            line = await read_until(separator)
            # Command lines are read with the default separator; DATA content
            # uses b"\r\n" and AUTH challenge answers are not commands.
            if separator == b"\n" and not self._in_challenge and self._conn is not None:
                self._records.add_command(self._conn, _command_text(line))
            return line

        setattr(reader, "readuntil", recording_readuntil)  # noqa: B010

    def _tls_object(self) -> ssl.SSLObject | None:
        if self.transport is None:
            return None
        obj = self.transport.get_extra_info("ssl_object")
        return obj if isinstance(obj, ssl.SSLObject) else None

    def _note_tls(self) -> None:
        conn = self._conn
        obj = self._tls_object()
        if conn is None or obj is None:
            return
        version = obj.version()

        def mark() -> None:
            conn.tls = True
            conn.tls_version = version

        self._records.update(mark)

    async def challenge_auth(
        self,
        challenge: str | bytes,
        encode_to_b64: bool = True,
        log_client_response: bool = False,
    ) -> Any:
        """Read an AUTH answer without logging it as a command."""
        self._in_challenge = True
        try:
            return await super().challenge_auth(challenge, encode_to_b64, log_client_response)
        finally:
            self._in_challenge = False

    # -- fault injection ----------------------------------------------------------

    def _drop(self) -> None:
        """Close the connection without a reply, as a crashing server would."""
        if self.transport is not None:
            self.transport.close()
        if self._handler_coroutine is not None:
            self._handler_coroutine.cancel()

    def _guarded(
        self, verb: str, method: Callable[[str], Awaitable[None]]
    ) -> Callable[[str], Awaitable[None]]:
        async def run(arg: str) -> None:
            sink = self._sink
            if verb in sink.drop_after:
                self._drop()
                return
            if (
                sink.auth_required
                and verb in {"MAIL", "RCPT", "DATA"}
                and not (self.session is not None and self.session.authenticated)
            ):
                await self.push("530 5.7.0 Authentication required")
                return
            if verb == "AUTH" and sink.auth is None:
                await self.push("502 5.5.1 AUTH not available")
                return
            reply = self._injected_reply(verb, arg)
            if reply is not None:
                await self.push(f"{reply[0]} {reply[1]}")
                if reply[0] == 421:
                    self._drop()
                return
            await method(arg)
            if verb == "AUTH":
                self._note_auth()
            if self._close_after_reply:
                self._drop()

        return run

    def _injected_reply(self, verb: str, arg: str | None) -> ReplySpec | None:
        spec = self._sink.replies.get(verb)
        if spec is None or verb == "DATA_END":
            return None
        if isinstance(spec, tuple):
            return spec
        if verb != "RCPT" or not arg:
            return None
        stripped = self._strip_command_keyword("TO:", arg)
        address, _ = self._getaddr(stripped or "")
        if not address:
            return None
        by_address = {k.lower(): v for k, v in spec.items()}
        return by_address.get(address.lower())

    def _note_auth(self) -> None:
        conn = self._conn
        session = self.session
        if conn is None or session is None or not session.authenticated:
            return
        user = session.auth_data if isinstance(session.auth_data, str) else None
        self._records.update(lambda: setattr(conn, "authenticated_user", user))

    async def finish_data(self, envelope: Envelope) -> str:
        """Record the content that just arrived and choose the final reply."""
        raw = envelope.original_content or b""
        conn = self._conn
        tls = self._tls_object()
        message = SinkMessage(
            connection=conn.number if conn is not None else 0,
            mail_from=envelope.mail_from or "",
            rcpt_tos=tuple(envelope.rcpt_tos),
            data=raw,
            message=message_from_bytes(raw, policy=policy.default),
            mail_options=tuple(envelope.mail_options),
            rcpt_options=tuple(envelope.rcpt_options),
            smtputf8=bool(envelope.smtp_utf8),
            tls=tls is not None,
            tls_version=tls.version() if tls is not None else None,
            authenticated_user=conn.authenticated_user if conn is not None else None,
        )
        if "DATA_END" in self._sink.drop_after:
            self._deliver(replace(message, reply=None), accepted=False)
            self._drop()
            return "451 4.3.0 dropped"  # never reaches the client
        spec = self._sink.replies.get("DATA_END")
        reply = spec if isinstance(spec, tuple) else (250, "OK")
        self._deliver(replace(message, reply=reply), accepted=200 <= reply[0] < 300)
        self._close_after_reply = reply[0] == 421
        return f"{reply[0]} {reply[1]}"

    def _deliver(self, message: SinkMessage, *, accepted: bool) -> None:
        self._records.add_message(message, accepted=accepted)
        callback = self._sink.on_message
        if callback is not None:
            try:
                callback(message)
            except Exception:
                _log.exception("SMTPSink on_message callback failed")


def _command_text(line: bytes) -> str:
    text = line.rstrip(b"\r\n").decode("utf-8", errors="backslashreplace")
    return _AUTH_LINE.sub(r"\1 ***", text)


class _SinkController(Controller):
    """aiosmtpd's Controller, able to start on port 0 and stop without leaks."""

    def __init__(self, sink: SMTPSink, records: _Records, **kwargs: Any) -> None:
        super().__init__(None, **kwargs)
        self._sink = sink
        self._records = records

    def factory(self) -> _SinkSMTP:
        return _SinkSMTP(self._sink, self._records, loop=self.loop, **self.SMTP_kwargs)

    def _trigger_server(self) -> None:
        # Controller probes self.port, which is still 0: read the real port first.
        assert self.server is not None
        listener = self.server.sockets[0]  # type: ignore[attr-defined]
        address = str(listener.getsockname()[0])
        self.port = int(listener.getsockname()[1])
        if ipaddress.ip_address(address).is_unspecified:
            address = "::1" if listener.family == socket.AF_INET6 else "127.0.0.1"
        with socket.socket(listener.family, socket.SOCK_STREAM) as raw:
            raw.settimeout(self.ready_timeout)
            raw.bind((address, 0))
            local = raw.getsockname()
            with self._records.cond:
                self._records.ignored_peers.add((str(local[0]), int(local[1])))
            raw.connect((address, self.port))
            if self.ssl_context is None:
                _probe(raw)
            else:
                client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
                client.check_hostname = False
                client.verify_mode = ssl.CERT_NONE
                with client.wrap_socket(raw) as tls:
                    _probe(tls)


def _probe(sock: socket.socket) -> None:
    """Read the greeting and say QUIT, so the probe session ends cleanly."""
    sock.recv(1024)
    sock.sendall(b"QUIT\r\n")
    sock.recv(1024)


class SMTPSink:
    """An SMTP server on loopback that records every message it receives.

    Use it as a context manager (or call :meth:`start` and :meth:`close`)::

        SMTPSink()                                       # plain SMTP, accepts all
        SMTPSink(tls="starttls", ssl_context=server_ctx) # offers STARTTLS
        SMTPSink(tls="starttls", ssl_context=server_ctx, require_starttls=True)
        SMTPSink(tls="ssl", ssl_context=server_ctx)      # implicit TLS
        SMTPSink(auth={"alice": "s3cret"}, auth_required=True)
        SMTPSink(pipelining=True, smtputf8=False)
        SMTPSink(replies={"MAIL": (451, "4.3.0 try later")})
        SMTPSink(replies={"RCPT": {"bad@example.com": (550, "5.1.1 no such user")}})
        SMTPSink(replies={"DATA_END": (554, "5.6.0 rejected")})
        SMTPSink(drop_after={"DATA_END"})                # close instead of the final reply

    Args:
        host: IP address to listen on (default ``127.0.0.1``; a name such as
            ``localhost`` is refused, as it may mean several sockets).
        port: port to listen on; 0 (default) lets the kernel choose, read
            :attr:`port` afterwards.
        tls: ``"none"``, ``"starttls"`` (STARTTLS offered) or ``"ssl"``
            (implicit TLS from the first byte).
        ssl_context: the server-side context, required unless ``tls="none"``
            (for example from :func:`smtpnotify.testing.make_certificates`).
        require_starttls: with ``tls="starttls"``, refuse every command but
            EHLO, NOOP, STARTTLS and QUIT with ``530`` until TLS is on.
        auth: ``{username: password}`` accepted by AUTH PLAIN and LOGIN;
            ``None`` (default) means AUTH is neither advertised nor accepted.
        auth_require_tls: advertise and accept AUTH only over TLS.  Off by
            default so that loopback tests can authenticate in plain text.
        auth_required: refuse MAIL, RCPT and DATA with ``530`` until a client
            has authenticated.
        smtputf8: advertise and accept SMTPUTF8 (default on).
        pipelining: advertise PIPELINING (default off, as aiosmtpd).
        replies: a reply to send *instead of* the normal one, by command verb
            (``"EHLO"``, ``"MAIL"``, ``"RCPT"``, ``"DATA"``, ``"AUTH"``, ...) or
            ``"DATA_END"`` (the final reply after the content).  For
            ``"RCPT"`` the value may map recipient addresses (case-insensitive)
            to replies; other recipients are accepted.  A replaced command
            takes no effect (a refused MAIL sets no sender, a refused DATA
            reads no content); a ``421`` reply is followed by closing the
            connection.  :attr:`replies` is a live dict: change it between
            attempts to make a server recover.
        drop_after: verbs (or ``"DATA_END"``) after which the sink closes
            the connection without replying.  With ``"DATA_END"`` the message
            is recorded in :attr:`rejected` with ``reply=None``.  Live set.
        data_size_limit: the ``SIZE`` advertised and enforced (``None``: none).
        hostname: the name in the greeting and the EHLO reply.
        ready_timeout: seconds to wait for the server thread to start.
        on_message: called with each :class:`SinkMessage` whose content
            arrived (accepted, refused or dropped), in the server's thread,
            after it is recorded; an exception it raises is logged (logger
            ``smtpnotify.testing``) and changes nothing else.

    The records (:attr:`messages`, :attr:`rejected`, :attr:`commands`,
    :attr:`connections`) are copies taken when read; they stay valid after
    :meth:`close`.
    """

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        tls: Literal["none", "starttls", "ssl"] = "none",
        ssl_context: ssl.SSLContext | None = None,
        require_starttls: bool = False,
        auth: Mapping[str, str] | None = None,
        auth_require_tls: bool = False,
        auth_required: bool = False,
        smtputf8: bool = True,
        pipelining: bool = False,
        replies: Mapping[str, _RepliesValue] | None = None,
        drop_after: Collection[str] = (),
        data_size_limit: int | None = _DEFAULT_DATA_SIZE_LIMIT,
        hostname: str = "sink.smtpnotify.test",
        ready_timeout: float = 10.0,
        on_message: Callable[[SinkMessage], object] | None = None,
    ) -> None:
        try:
            ipaddress.ip_address(host)
        except ValueError:
            raise ValueError(
                f"host must be an IP address such as 127.0.0.1, not {host!r}"
            ) from None
        if tls not in ("none", "starttls", "ssl"):
            raise ValueError(f"tls must be 'none', 'starttls' or 'ssl', not {tls!r}")
        if tls != "none" and ssl_context is None:
            raise ValueError(f"tls={tls!r} needs a server ssl_context")
        if require_starttls and tls != "starttls":
            raise ValueError("require_starttls needs tls='starttls'")
        if auth_required and auth is None:
            raise ValueError("auth_required needs auth={username: password}")
        self.host = host
        self.port = port
        self.tls = tls
        self.ssl_context = ssl_context
        self.require_starttls = require_starttls
        self.auth: dict[str, str] | None = dict(auth) if auth is not None else None
        self.auth_require_tls = auth_require_tls
        self.auth_required = auth_required
        self.smtputf8 = smtputf8
        self.pipelining = pipelining
        self.replies: dict[str, _RepliesValue] = {}
        for verb, spec in (replies or {}).items():
            verb = _check_verb(verb)
            if not isinstance(spec, tuple) and verb != "RCPT":
                raise ValueError(f"replies[{verb!r}] must be a (code, text) tuple")
            self.replies[verb] = spec
        self.drop_after: set[str] = {_check_verb(v) for v in drop_after}
        self.data_size_limit = data_size_limit
        self.hostname = hostname
        self.ready_timeout = ready_timeout
        self.on_message = on_message
        self._records = _Records()
        self._live: set[_SinkSMTP] = set()
        self._controller: _SinkController | None = None

    def __repr__(self) -> str:
        state = "running" if self._controller is not None else "stopped"
        return f"<SMTPSink {self.host}:{self.port} tls={self.tls} {state}>"

    # -- life cycle -----------------------------------------------------------------

    def start(self) -> SMTPSink:
        """Start serving; returns ``self``.  :attr:`port` is the bound port."""
        if self._controller is not None:
            raise RuntimeError("SMTPSink is already running")
        kwargs: dict[str, Any] = {
            "hostname": self.host,
            "port": self.port,
            "ready_timeout": self.ready_timeout,
            "server_hostname": self.hostname,
            "enable_SMTPUTF8": self.smtputf8,
            "data_size_limit": self.data_size_limit,
            "auth_require_tls": self.auth_require_tls,
            "authenticator": self._authenticate,
        }
        if self.tls == "ssl":
            kwargs["ssl_context"] = self.ssl_context
        elif self.tls == "starttls":
            kwargs["tls_context"] = self.ssl_context
            kwargs["require_starttls"] = self.require_starttls
        controller = _SinkController(self, self._records, **kwargs)
        try:
            controller.start()
        except BaseException:
            _abandon(controller)
            raise
        self.port = controller.port
        self._controller = controller
        return self

    def close(self) -> None:
        """Stop serving: close every connection, stop the thread and its loop.

        Idempotent.  Records stay readable.
        """
        controller = self._controller
        if controller is None:
            return
        self._controller = None
        loop = controller.loop
        try:
            thread = controller._thread
            if thread is not None and thread.is_alive() and loop.is_running():
                future = asyncio.run_coroutine_threadsafe(self._shutdown(controller), loop)
                future.result(_SHUTDOWN_GRACE)
        finally:
            controller.stop()
            if not loop.is_closed():  # pragma: no cover - the controller closes it
                loop.close()

    stop = close

    async def _shutdown(self, controller: _SinkController) -> None:
        """Close the listener and every client connection, then let tasks end."""
        if controller.server is not None:
            controller.server.close()
        for protocol in list(self._live):
            if isinstance(protocol.transport, asyncio.Transport):
                protocol.transport.abort()
        # Also ends connections still in their implicit-TLS handshake, which
        # have no protocol to abort yet: asyncio's accept task owns them.
        current = asyncio.current_task()
        tasks = [t for t in asyncio.all_tasks() if t is not current]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=_SHUTDOWN_GRACE / 2)
        for _ in range(3):  # let transports run their connection_lost callbacks
            await asyncio.sleep(0)
        for protocol in list(self._live):  # aborted mid-STARTTLS: no connection_lost
            protocol.mark_closed()

    def __enter__(self) -> SMTPSink:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- authentication ---------------------------------------------------------

    def _authenticate(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        mechanism: str,
        auth_data: Any,
    ) -> AuthResult:
        if self.auth is None or not isinstance(auth_data, LoginPassword):
            return AuthResult(success=False, handled=False)
        user = auth_data.login.decode("utf-8", errors="surrogateescape")
        expected = self.auth.get(user)
        ok = expected is not None and hmac.compare_digest(
            expected.encode("utf-8"), bytes(auth_data.password)
        )
        return AuthResult(success=ok, handled=False, auth_data=user if ok else None)

    # -- records ---------------------------------------------------------------------

    @property
    def address(self) -> tuple[str, int]:
        """``(host, port)``."""
        return (self.host, self.port)

    @property
    def messages(self) -> list[SinkMessage]:
        """Messages accepted (final reply 2xx), oldest first."""
        with self._records.cond:
            return list(self._records.messages)

    @property
    def rejected(self) -> list[SinkMessage]:
        """Messages whose content arrived but were refused, or dropped (``reply=None``)."""
        with self._records.cond:
            return list(self._records.rejected)

    @property
    def commands(self) -> list[str]:
        """Every command line received, in order, across connections.

        Each line is as the client sent it, without CRLF (``"EHLO host"``,
        ``"STARTTLS"``, ``"MAIL FROM:<a@example.com> SIZE=120"``, ``"DATA"``,
        ``"QUIT"``); the argument of AUTH is redacted (``"AUTH PLAIN ***"``).
        Unknown and refused commands are included; message content and the
        answers to AUTH challenges are not.
        """
        with self._records.cond:
            return list(self._records.commands)

    @property
    def verbs(self) -> list[str]:
        """The first word of each of :attr:`commands`, upper-cased."""
        return [line.split(" ", 1)[0].upper() for line in self.commands]

    @property
    def connections(self) -> list[SinkConnection]:
        """One snapshot per client connection, oldest first."""
        with self._records.cond:
            return [replace(c, commands=list(c.commands)) for c in self._records.connections]

    def wait_for(self, n: int = 1, timeout: float = 5.0) -> list[SinkMessage]:
        """Wait until at least ``n`` messages are accepted; return :attr:`messages`.

        Raises:
            TimeoutError: fewer than ``n`` arrived within ``timeout`` seconds.
        """
        self.wait_until(lambda: len(self._records.messages) >= n, timeout, what=f"{n} message(s)")
        return self.messages

    def wait_until(
        self, predicate: Callable[[], bool], timeout: float = 5.0, *, what: str = "condition"
    ) -> None:
        """Wait until ``predicate()`` is true; it is re-checked on every record change.

        ``predicate`` may read the sink's properties (``lambda:
        all(c.closed for c in sink.connections)``).

        Raises:
            TimeoutError: ``predicate()`` still false after ``timeout`` seconds.
        """
        deadline = time.monotonic() + timeout
        with self._records.cond:
            while not predicate():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"SMTPSink: no {what} within {timeout} s")
                self._records.cond.wait(remaining)

    def reset(self) -> None:
        """Forget every record; connection numbers keep counting up."""
        with self._records.cond:
            self._records.messages.clear()
            self._records.rejected.clear()
            self._records.commands.clear()
            self._records.connections.clear()


def _check_verb(verb: str) -> str:
    upper = verb.upper()
    if not _VERB.match(upper):
        raise ValueError(f"not an SMTP verb: {verb!r}")
    return upper


def _abandon(controller: _SinkController) -> None:
    """Release what a controller that failed to start holds."""
    if controller._thread is not None:
        controller.stop(no_assert=True)
    if not controller.loop.is_closed():
        controller.loop.close()
