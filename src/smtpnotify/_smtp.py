"""One SMTP connection under two deadlines: the session.

:class:`SMTPSession` drives ``smtplib.SMTP`` (for EHLO parsing and AUTH) over a
socket whose every blocking operation is bounded by the running phase's
:class:`~smtpnotify._deadline.Deadline`:

* **connect phase** — DNS, TCP, implicit TLS, greeting, EHLO, STARTTLS and the
  second EHLO, AUTH — within ``connect_timeout``;
* **send phase** — MAIL, RCPT…, DATA, the content and the final reply — within
  ``send_timeout``, once per message.

``smtplib`` reads replies through a buffered file whose every ``recv`` gets the
full socket timeout, so a server that trickles a byte a second keeps it
waiting forever.  :class:`_Wire` replaces the two methods that touch the
socket (``send`` and ``getreply``) and the one that opens it (``_get_socket``)
so that each ``recv``/``send`` waits at most for what is left of the phase.

Every low-level failure is mapped here, once, to the public errors.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import ipaddress
import logging
import re
import smtplib
import socket
import ssl
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from ._deadline import Deadline, DeadlineExceeded, call_with_deadline
from ._errors import (
    AuthenticationError,
    CertificateError,
    ConnectError,
    ConnectTimeout,
    InvalidMessage,
    Phase,
    RecipientsRefused,
    ResponseError,
    SendTimeout,
    SMTPNotifyError,
    StartTLSNotSupported,
    TLSError,
    TransientError,
    response_error,
)
from ._prepared import PreparedMessage
from ._results import SendResult, VerifyStep
from ._tls import ContextKind, TLSPlan, check_fingerprint, sha256_hex

if TYPE_CHECKING:
    from ._config import MailConfig

__all__ = ["SMTPSession", "dot_stuff"]

log = logging.getLogger("smtpnotify.smtp")

_MAXLINE = 8192  # as smtplib: a reply line longer than this is a protocol error
_MAX_REPLY_LINES = 1000  # a reply of more lines is a misbehaving server, deadline or not
_SEND_CHUNK = 256 * 1024
_EOL = re.compile(rb"\r\n|\r|\n")

StepHook = Callable[[VerifyStep], None]


def dot_stuff(data: bytes) -> bytes:
    """The DATA payload for ``data``: every line ending made CRLF, lines starting
    with ``.`` doubled, and the terminating ``CRLF.CRLF`` appended.

    Normalising *before* stuffing is what prevents SMTP smuggling: a bare
    ``\\n.\\n`` or ``\\r.\\r\\n`` in a body becomes ``\\r\\n..\\r\\n`` and can
    never end the message early.
    """
    data = _EOL.sub(b"\r\n", data)
    if data.startswith(b"."):
        data = b"." + data
    data = data.replace(b"\r\n.", b"\r\n..")
    if data and not data.endswith(b"\r\n"):
        data += b"\r\n"
    return data + b".\r\n"


class _Disconnected(Exception):
    """Internal: the server closed the connection (or it broke)."""


class _Wire(smtplib.SMTP):
    """``smtplib.SMTP`` whose socket I/O obeys the current deadline.

    Only ``_get_socket``, ``send`` and ``getreply`` touch the network in
    smtplib's code paths that smtpnotify uses (EHLO, AUTH, plain commands), so
    overriding those three bounds everything.
    """

    def __init__(self, host: str, local_hostname: str) -> None:
        super().__init__(local_hostname=local_hostname)
        self._host = host
        self.deadline = Deadline(1.0)
        self.redact = False
        self._rbuf = bytearray()

    # -- the socket -----------------------------------------------------------
    def open_socket(self, host: str, port: int) -> socket.socket:
        """DNS (in a helper thread) and TCP connect, each bounded by the deadline."""
        try:
            ipaddress.ip_address(host)
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_NUMERICHOST)
        except ValueError:
            try:
                infos = call_with_deadline(
                    socket.getaddrinfo, host, port, 0, socket.SOCK_STREAM, deadline=self.deadline
                )
            except socket.gaierror as exc:
                raise ConnectError(f"cannot resolve {host!r}: {exc}", phase="connect") from exc
        last: OSError | None = None
        for family, kind, proto, _, address in infos:
            sock = socket.socket(family, kind, proto)
            try:
                self.deadline.apply(sock)
                sock.connect(address)
            except (DeadlineExceeded, TimeoutError):
                sock.close()
                raise DeadlineExceeded("connect") from None
            except OSError as exc:
                sock.close()
                last = exc
                continue
            self.sock = sock
            self.file = None
            self._rbuf.clear()
            return sock
        raise ConnectError(f"cannot connect to {host}:{port}: {last}", phase="connect") from last

    def handshake(self, context: ssl.SSLContext) -> ssl.SSLSocket:
        """Wrap the connected socket in TLS and complete the handshake by the deadline."""
        assert self.sock is not None
        if self._rbuf:
            # Bytes that arrived before the handshake must not be read as if they
            # were protected by it (the STARTTLS response-injection attack).
            raise TLSError("the server sent data ahead of the TLS handshake", phase="connect")
        raw = self.sock
        try:
            # On a connection the server has already reset, wrap_socket raises and leaks
            # the socket it took over (CPython gh-113280): find the reset out first.
            raw.getpeername()
            tls = context.wrap_socket(
                raw, server_hostname=self._host, do_handshake_on_connect=False
            )
        except OSError as exc:
            raise TLSError(f"TLS handshake failed: {exc}", phase="connect") from exc
        self.sock = tls
        try:
            self.deadline.apply(tls)
            tls.do_handshake()
        except ssl.SSLCertVerificationError as exc:
            raise CertificateError(
                f"the server's certificate was not trusted: {exc.verify_message}", phase="connect"
            ) from exc
        except (TimeoutError, DeadlineExceeded):
            raise DeadlineExceeded("tls") from None
        except ssl.SSLError as exc:
            raise TLSError(f"TLS handshake failed: {exc.reason or exc}", phase="connect") from exc
        except OSError as exc:
            raise TLSError(f"TLS handshake failed: {exc}", phase="connect") from exc
        return tls

    # -- what smtplib calls ----------------------------------------------------
    def send(self, s: str | bytes) -> None:  # type: ignore[override]
        """Write all of ``s`` before the deadline."""
        data = s.encode(self.command_encoding) if isinstance(s, str) else s
        if log.isEnabledFor(logging.DEBUG):
            log.debug("send: %s", _describe_sent(data, self.redact))
        sock = self.sock
        if sock is None:
            raise _Disconnected("not connected")
        view = memoryview(data)
        try:
            while view:
                self.deadline.apply(sock)
                sent = sock.send(view[:_SEND_CHUNK])
                view = view[sent:]
        except TimeoutError:
            raise DeadlineExceeded("send") from None
        except OSError as exc:
            raise _Disconnected(str(exc)) from exc

    def _readline(self) -> bytes:
        buf = self._rbuf
        while True:
            end = buf.find(b"\n")
            if end >= 0:
                line = bytes(buf[: end + 1])
                del buf[: end + 1]
                return line
            if len(buf) > _MAXLINE:
                line = bytes(buf)
                buf.clear()
                return line
            sock = self.sock
            if sock is None:
                raise _Disconnected("not connected")
            try:
                self.deadline.apply(sock)
                chunk = sock.recv(65536)
            except TimeoutError:
                raise DeadlineExceeded("recv") from None
            except OSError as exc:
                raise _Disconnected(str(exc)) from exc
            if not chunk:
                raise _Disconnected("the server closed the connection")
            buf += chunk

    def getreply(self) -> tuple[int, bytes]:
        """Read one (possibly multi-line) reply before the deadline."""
        lines: list[bytes] = []
        while True:
            line = self._readline()
            if len(line) > _MAXLINE or len(lines) >= _MAX_REPLY_LINES:
                raise _Disconnected("the server sent an over-long reply")
            lines.append(line[4:].strip(b" \t\r\n"))
            if not line[:3].isdigit():
                # Not SMTP (an HTTP server on the port, a broken proxy): no code to act on,
                # and no telling what state the server is in.
                raise _Disconnected(f"the server sent a malformed reply: {line[:40]!r}")
            code = int(line[:3])
            if line[3:4] != b"-":
                break
        reply = b"\n".join(lines)
        if log.isEnabledFor(logging.DEBUG):
            # during AUTH a server may quote the credentials back: log only the code
            shown = "<redacted during authentication>" if self.redact else _text(reply)
            log.debug("reply: %d %s", code, shown)
        return code, reply

    def close(self) -> None:
        """Close the socket without a word to the server."""
        self._rbuf.clear()
        super().close()


def _describe_sent(data: bytes, redact: bool) -> str:
    if redact:
        return "<authentication data redacted>"
    text = data[:200].decode("utf-8", "replace").rstrip("\r\n")
    if text.upper().startswith("AUTH "):
        return " ".join(text.split(" ")[:2]) + " <redacted>"
    return text + (" …" if len(data) > 200 else "")


def _secret_forms(username: str, password: str) -> tuple[str, ...]:
    """The password as AUTH puts it on the wire: as is, in PLAIN's and LOGIN's base64."""
    b64 = base64.b64encode
    return (
        password,
        b64(f"\0{username}\0{password}".encode()).decode(),
        b64(password.encode()).decode(),
    )


def _text(reply: bytes) -> str:
    return reply.decode("utf-8", "replace")


class SMTPSession:
    """One connection to the configured server.

    >>> session = SMTPSession(config, plan)     # doctest: +SKIP
    >>> session.open()                          # connect phase, or raises
    >>> session.send(prepared)                  # send phase, once per message
    >>> session.close()                         # QUIT when the connection is sound

    After any timeout, drop or 421 the session is not ``usable`` and must be
    discarded; an error reply to one message leaves it usable for the next.
    """

    def __init__(self, config: MailConfig, plan: TLSPlan) -> None:
        self.config = config
        self.plan = plan
        self._wire: _Wire | None = None
        self.usable = False
        self.features: dict[str, str] = {}
        self.tls_version: str | None = None
        self.cipher: str | None = None
        self.peer_der: bytes | None = None
        self.messages_sent = 0

    @property
    def peer_sha256(self) -> str | None:
        """SHA-256 (hex) of the server's leaf certificate, once TLS is up."""
        return sha256_hex(self.peer_der) if self.peer_der else None

    # -- connect phase ---------------------------------------------------------
    def open(self, on_step: StepHook | None = None) -> None:
        """Connect, greet, EHLO, STARTTLS, AUTH — all within ``connect_timeout``."""
        deadline = Deadline(self.config.effective_connect_timeout)
        contexts: tuple[tuple[ContextKind | None, ssl.SSLContext | None], ...] = (
            ((None, None),) if self.config.tls == "none" else self.plan.contexts
        )
        for index, (kind, context) in enumerate(contexts):
            # The steps of an attempt that is retried are not reported: a report
            # whose connection worked must not list a failed step.
            attempt: list[VerifyStep] = []
            retrying = False
            try:
                self._open_once(deadline, kind, context, attempt.append if on_step else None)
                return
            except CertificateError:
                if index == len(contexts) - 1:
                    raise
                retrying = True
                log.info("pinned certificates did not match; trying the pinned fingerprints")
            finally:
                if on_step is not None and not retrying:
                    for step in attempt:
                        if index and step.name == "tls" and step.ok:
                            detail = f"{step.detail} (a pinned fingerprint matched, no certificate)"
                            step = dataclasses.replace(step, detail=detail)
                        on_step(step)

    def _open_once(
        self,
        deadline: Deadline,
        kind: ContextKind | None,
        context: ssl.SSLContext | None,
        on_step: StepHook | None,
    ) -> None:
        config = self.config
        wire = _Wire(config.host, config.local_hostname or "localhost")
        wire.deadline = deadline
        self._wire = wire
        steps = _Steps(on_step)
        host, port = config.host, config.effective_port
        with self._guard("connect"):
            with steps("connect", f"{host}:{port}"):
                sock = wire.open_socket(host, port)
            if not config.local_hostname:
                wire.local_hostname = _address_literal(sock.getsockname()[0])
            if config.tls == "ssl":
                assert context is not None and kind is not None
                with steps("tls", "implicit TLS"):
                    self._handshake(wire, kind, context)
            with steps("greeting"):
                code, reply = wire.getreply()
                if code != 220:
                    raise response_error(code, _text(reply), command="CONNECT", phase="connect")
            with steps("ehlo"):
                self._ehlo(wire)
            if config.tls == "starttls":
                assert context is not None and kind is not None
                with steps("tls", "STARTTLS"):
                    self._starttls(wire, kind, context)
                with steps("ehlo", "after STARTTLS"):
                    self._ehlo(wire)
            if config.username is not None:
                with steps("auth", config.username):
                    self._auth(wire)
        self.features = dict(wire.esmtp_features)
        self.usable = True

    def _handshake(self, wire: _Wire, kind: ContextKind, context: ssl.SSLContext) -> None:
        tls = wire.handshake(context)
        der = tls.getpeercert(binary_form=True)
        if kind == "fingerprints":
            check_fingerprint(der, self.plan.fingerprints)
        self.tls_version = tls.version()
        cipher = tls.cipher()
        self.cipher = cipher[0] if cipher else None
        self.peer_der = der

    def _ehlo(self, wire: _Wire) -> None:
        code, reply = wire.ehlo()
        if code == 250:
            return
        if 400 <= code < 500 or self.config.tls != "none" or self.config.username is not None:
            raise response_error(code, _text(reply), command="EHLO", phase="connect")
        code, reply = wire.helo()  # an old server: plain SMTP is all we need
        if code != 250:
            raise response_error(code, _text(reply), command="HELO", phase="connect")

    def _starttls(self, wire: _Wire, kind: ContextKind, context: ssl.SSLContext) -> None:
        if not wire.has_extn("starttls"):
            self._quit_quietly(wire)
            raise StartTLSNotSupported(
                "the server does not offer STARTTLS, and tls='starttls' requires it", phase="connect"
            )
        code, reply = wire.docmd("STARTTLS")
        if code != 220:
            self._quit_quietly(wire)
            if 400 <= code < 500:
                raise TransientError(code, _text(reply), command="STARTTLS", phase="connect")
            raise StartTLSNotSupported(
                f"the server refused STARTTLS: {code} {_text(reply)}", phase="connect"
            )
        self._handshake(wire, kind, context)
        # RFC 3207: forget everything learnt before the handshake.
        wire.helo_resp = wire.ehlo_resp = None
        wire.esmtp_features = {}
        wire.does_esmtp = False

    def _auth(self, wire: _Wire) -> None:
        config = self.config
        assert config.username is not None and config.password is not None
        if not wire.has_extn("auth"):
            raise AuthenticationError("the server offers no AUTH mechanism", phase="connect")
        password = config.password.get_secret_value()
        failure: str | None = None
        wire.redact = True
        try:
            wire.login(config.username, password)
        except smtplib.SMTPAuthenticationError as exc:
            text = _text(exc.smtp_error) if isinstance(exc.smtp_error, bytes) else str(exc.smtp_error)
            failure = f"the server refused the credentials: {exc.smtp_code} {text}"
        except smtplib.SMTPException as exc:
            failure = f"authentication failed: {exc}"
        except UnicodeEncodeError:  # smtplib sends AUTH data as ASCII only
            failure = "authentication failed: smtplib can only send an ASCII user name and password"
        except ValueError:  # binascii.Error: a 334 challenge that is not base64
            failure = "authentication failed: the server sent a malformed AUTH challenge"
        finally:
            wire.redact = False
            wire.password = ""  # smtplib keeps it on the object; don't
        if failure is not None:
            # Raised here, not in the except clause, so that no __context__ holds the
            # server's reply; and a reply that quotes the credentials back is scrubbed.
            for secret in _secret_forms(config.username, password):
                failure = failure.replace(secret, "***")
            raise AuthenticationError(failure, phase="connect")

    # -- send phase ------------------------------------------------------------
    def send(self, message: PreparedMessage) -> SendResult:
        """One transaction within ``send_timeout``; raises the mapped error on failure."""
        wire = self._wire
        if wire is None or not self.usable:
            raise ConnectError("the session is not connected", phase="send")
        if message.smtputf8 and not wire.has_extn("smtputf8"):
            raise InvalidMessage(
                "the message needs SMTPUTF8 (a non-ASCII address), which the server does not offer",
                phase="send",
            )
        wire.deadline = Deadline(self.config.effective_send_timeout)
        with self._guard("send") as state:
            result = self._transaction(wire, message, state)
        self.messages_sent += 1
        return result

    def _transaction(self, wire: _Wire, message: PreparedMessage, state: _State) -> SendResult:
        options = []
        if message.smtputf8:
            options.append("SMTPUTF8")
            wire.command_encoding = "utf-8"
        else:
            wire.command_encoding = "ascii"
        if wire.has_extn("8bitmime") and not message.data.isascii():
            options.append("BODY=8BITMIME")
        if wire.has_extn("size"):
            options.append(f"SIZE={len(message.data)}")
        mail = f"MAIL FROM:<{message.sender}>" + "".join(" " + o for o in options)
        commands = [mail, *(f"RCPT TO:<{r}>" for r in message.recipients), "DATA"]
        if wire.has_extn("pipelining"):
            # RFC 2920: the whole group in one write, then the replies in order.
            wire.send("".join(c + "\r\n" for c in commands))
            replies = [self._reply(wire, verb) for verb in _verbs(commands)]
        else:
            replies = []
            for command, verb in zip(commands, _verbs(commands), strict=True):
                if verb == "DATA" and not any(200 <= c < 300 for c, _ in replies[1:]):
                    break
                wire.send(command + "\r\n")
                replies.append(self._reply(wire, verb))
                if verb == "MAIL" and replies[0][0] != 250:
                    break
        mail_reply, rcpt_replies = replies[0], replies[1 : 1 + len(message.recipients)]
        data_reply = replies[len(commands) - 1] if len(replies) == len(commands) else None
        accepted = tuple(r for r, (c, _) in zip(message.recipients, rcpt_replies, strict=False) if 200 <= c < 300)
        refused = {
            r: (c, t) for r, (c, t) in zip(message.recipients, rcpt_replies, strict=False) if not 200 <= c < 300
        }
        failure: ResponseError | None = None
        if mail_reply[0] != 250:
            failure = response_error(*mail_reply, command="MAIL", phase="send")
        elif not accepted:
            failure = RecipientsRefused(refused)
        elif data_reply is not None and data_reply[0] != 354:
            failure = response_error(*data_reply, command="DATA", phase="send")
        if failure is not None:
            # The refusal is the error, whatever the clean-up runs into; a clean-up that
            # times out, drops or gets a 421 leaves the connection unusable (discarded).
            try:
                if data_reply is not None and data_reply[0] == 354:
                    wire.send(b".\r\n")  # a server that said 354 anyway: end the empty content
                    self._reply(wire, "DATA")
                self._reset(wire)
            except (_Disconnected, DeadlineExceeded, TransientError):
                self.usable = False
            raise failure
        wire.send(dot_stuff(message.data))
        state.after_dot = True
        code, text = self._reply(wire, "DATA")
        if code != 250:
            raise response_error(code, text, command="DATA", phase="send")
        return SendResult(message_id=message.message_id, accepted=accepted, refused=refused)

    def _reply(self, wire: _Wire, verb: str) -> tuple[int, str]:
        code, reply = wire.getreply()
        if code == 421:
            self.usable = False  # the server is closing this connection
            raise TransientError(code, _text(reply), command=verb, phase="send")
        return code, _text(reply)

    def _reset(self, wire: _Wire) -> None:
        try:
            code, _ = wire.docmd("RSET")
        except _Disconnected:
            code = -1
        if code != 250:
            self.usable = False

    # -- errors ------------------------------------------------------------------
    @contextlib.contextmanager
    def _guard(self, phase: Phase) -> Iterator[_State]:
        """Map every low-level failure to the public error for ``phase``; discard the
        connection after anything but a clean error reply."""
        state = _State()
        try:
            yield state
        except DeadlineExceeded:
            self.discard()
            seconds = self.config.effective_connect_timeout if phase == "connect" else self.config.effective_send_timeout
            if phase == "connect":
                raise ConnectTimeout(f"the connect phase took longer than {seconds:g} s", phase=phase) from None
            detail = " after the final '.': the server may have accepted the message" if state.after_dot else ""
            raise SendTimeout(
                f"sending took longer than {seconds:g} s{detail}", phase=phase, ambiguous=state.after_dot
            ) from None
        except _Disconnected as exc:
            self.discard()
            detail = " after the final '.': the server may have accepted the message" if state.after_dot else ""
            raise ConnectError(f"connection lost: {exc}{detail}", phase=phase, ambiguous=state.after_dot) from None
        except ResponseError as exc:
            if phase == "connect" or not self.usable or exc.code == 421:
                self.discard()
            raise
        except SMTPNotifyError:
            self.discard()
            raise
        except (smtplib.SMTPException, OSError) as exc:  # smtplib's own view of a broken link
            self.discard()
            raise ConnectError(f"connection lost: {exc}", phase=phase, ambiguous=state.after_dot) from exc

    def _quit_quietly(self, wire: _Wire) -> None:
        with contextlib.suppress(_Disconnected, DeadlineExceeded):
            wire.send(b"QUIT\r\n")
            wire.getreply()

    def close(self) -> None:
        """Say QUIT (briefly) when the connection is sound, then close it."""
        wire = self._wire
        if wire is not None and self.usable:
            # QUIT is a courtesy: it gets what is left of the last phase (2 s at most, none
            # once it is over), so connect + send still bounds the whole call.
            wire.deadline = Deadline(min(2.0, wire.deadline.expires_at - time.monotonic()))
            self._quit_quietly(wire)
        self.discard()

    def discard(self) -> None:
        """Close the socket at once, with no QUIT; the session is unusable after this."""
        self.usable = False
        wire, self._wire = self._wire, None
        if wire is not None:
            wire.close()


class _State:
    __slots__ = ("after_dot",)

    def __init__(self) -> None:
        self.after_dot = False


def _verbs(commands: list[str]) -> list[str]:
    return [c.split(" ", 1)[0].split(":", 1)[0] for c in commands]


def _address_literal(address: str) -> str:
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    return f"[IPv6:{ip}]" if ip.version == 6 else f"[{ip}]"


class _Steps:
    """Times the connect phase's steps for :meth:`Notifier.verify`."""

    def __init__(self, hook: StepHook | None) -> None:
        self.hook = hook

    @contextlib.contextmanager
    def __call__(self, name: str, detail: str = "") -> Iterator[None]:
        if self.hook is None:
            yield
            return
        start = time.monotonic()
        try:
            yield
        except BaseException as exc:
            self.hook(VerifyStep(name, False, time.monotonic() - start, _failure_detail(exc)))
            raise
        self.hook(VerifyStep(name, True, time.monotonic() - start, detail))


def _failure_detail(exc: BaseException) -> str:
    if isinstance(exc, DeadlineExceeded):
        return "timed out"
    return f"{type(exc).__name__}: {exc}"

