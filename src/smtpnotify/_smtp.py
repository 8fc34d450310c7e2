"""One SMTP connection under two deadlines: the session.

:class:`SMTPSession` drives ``smtplib.SMTP`` (for EHLO parsing and AUTH) over a
socket whose every blocking operation is bounded by the running phase's
:class:`~smtpnotify._deadline.Deadline`:

* **connect phase** — DNS, TCP, implicit TLS, greeting, EHLO, STARTTLS and the
  second EHLO, AUTH — within ``connect_timeout``;
* **send phase** — MAIL, RCPT…, DATA, the content and the final reply — within
  ``send_timeout``, once per message.

``smtplib`` alone cannot keep such a deadline: why, and the socket I/O that
does, is :mod:`smtpnotify._wire`.

Every low-level failure is mapped here, once, to the public errors.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import ipaddress
import logging
import smtplib
import ssl
import time
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING

from ._deadline import Deadline, DeadlineExceeded
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
    TransientError,
    response_error,
)
from ._prepared import PreparedMessage
from ._results import SendResult, VerifyStep
from ._tls import ContextKind, TLSPlan, check_fingerprint, sha256_hex
from ._wire import _SEND_CHUNK, _Disconnected, _text, _Wire, dot_stuff, iter_dot_stuffed

if TYPE_CHECKING:
    from ._config import MailConfig
    from ._ratelimit import RateLimiter

# dot_stuff and iter_dot_stuffed live in ._wire; still importable from here.
__all__ = ["SMTPSession", "dot_stuff", "iter_dot_stuffed"]

log = logging.getLogger("smtpnotify.smtp")

_NO_SMTPUTF8 = "the message needs SMTPUTF8 (a non-ASCII address), which the server does not offer"
_AFTER_DOT = " after the final '.': the server may have accepted the message"

StepHook = Callable[[VerifyStep], None]
Outcome = SendResult | SMTPNotifyError
ResultHook = Callable[[int, Outcome], None]


def _secret_forms(username: str, password: str) -> tuple[str, ...]:
    """The password as AUTH puts it on the wire: as is, in PLAIN's and LOGIN's base64."""
    b64 = base64.b64encode
    return (
        password,
        b64(f"\0{username}\0{password}".encode()).decode(),
        b64(password.encode()).decode(),
    )


class SMTPSession:
    """One connection to the configured server.

    >>> session = SMTPSession(config, plan)     # doctest: +SKIP
    >>> session.open()                          # connect phase, or raises
    >>> session.send(prepared)                  # send phase, once per message
    >>> session.send_batch(messages)            # several, pipelined across messages
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
        self.transactions = 0  # messages begun (MAIL written): max_messages_per_connection
        self._answered = 0  # replies to the current message's commands read so far

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
                "the server does not offer STARTTLS, and tls='starttls' requires it",
                phase="connect",
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
        offered = wire.esmtp_features.get("auth", "").upper().split()
        # One mechanism, once: smtplib's login() would try every mechanism in turn and
        # so send a wrong password several times (locking accounts out sooner).
        mechanism = next((m for m in ("PLAIN", "LOGIN", "CRAM-MD5") if m in offered), None)
        try:
            if mechanism is None:
                raise smtplib.SMTPException(
                    f"no supported mechanism (PLAIN, LOGIN, CRAM-MD5) among {' '.join(offered)}"
                )
            wire.user, wire.password = config.username, password
            wire.auth(mechanism, getattr(wire, "auth_" + mechanism.lower().replace("-", "_")))
        except smtplib.SMTPAuthenticationError as exc:
            error = exc.smtp_error
            text = _text(error) if isinstance(error, bytes) else str(error)
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
            raise InvalidMessage(_NO_SMTPUTF8, phase="send")
        wire.deadline = Deadline(self.config.effective_send_timeout)
        self.transactions += 1
        self._answered = 0
        with self._guard("send") as state:
            result = self._transaction(wire, message, state)
        self.messages_sent += 1
        return result

    def _transaction(self, wire: _Wire, message: PreparedMessage, state: _State) -> SendResult:
        wire.command_encoding = "utf-8" if message.smtputf8 else "ascii"
        commands = _commands(wire, message)
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
        accepted, refused, data_reply, failure = _verdict(message, replies)
        if failure is not None:
            self._clean_up(wire, data_reply)
            raise failure
        self._write_content(wire, message, state)
        code, text = self._reply(wire, "DATA")
        if code != 250:
            raise response_error(code, text, command="DATA", phase="send")
        return SendResult(message_id=message.message_id, accepted=accepted, refused=refused)

    def _clean_up(self, wire: _Wire, data_reply: tuple[int, str] | None) -> None:
        """End a refused transaction: a lone "." if DATA was answered 354 anyway, then RSET.

        The refusal is the message's error, whatever the clean-up runs into; a
        clean-up that times out, drops or gets a 421 leaves the connection
        unusable (to be discarded).
        """
        try:
            if data_reply is not None and data_reply[0] == 354:
                wire.send(b".\r\n")  # RFC 2920 §3.1: end the empty content, never the message
                self._reply(wire, "DATA")
            self._reset(wire)
        except (_Disconnected, DeadlineExceeded, TransientError):
            self.usable = False

    def _write_content(
        self, wire: _Wire, message: PreparedMessage, state: _State, then: bytes = b""
    ) -> None:
        """Write ``message``'s content, dot-stuffed, with the final ``.`` — the one
        place message content goes out — followed by ``then`` (the next message's
        pipelined commands), in the same write when the content is small.

        Sets ``state.after_dot`` once the ``.`` is out, also when writing ``then``
        fails after it: from then on a failure is ambiguous.
        """
        # Stuffed a slice at a time (a big attachment is never copied whole); every
        # write is under the send deadline.  ``payload`` ends as the last piece, the
        # one that holds the final ``.``.
        payload = b""
        for piece in iter_dot_stuffed(message.data):
            if payload:
                wire.send(payload)
            payload = piece
        start = wire.bytes_sent
        try:
            if then and len(payload) + len(then) <= _SEND_CHUNK:
                wire.send(payload + then)  # one write, one segment: no round trip between
            else:
                wire.send(payload)
                state.after_dot = True
                if then:
                    wire.send(then)
        finally:
            if wire.bytes_sent - start >= len(payload):
                state.after_dot = True

    # -- several messages ------------------------------------------------------------
    def send_batch(
        self,
        messages: Iterable[PreparedMessage],
        *,
        limiter: RateLimiter | None = None,
        on_result: ResultHook | None = None,
        retry_stale: bool = False,
    ) -> list[Outcome | None]:
        """Send messages one after another on this connection; never raises for one message.

        When the server offers PIPELINING the transactions overlap (RFC 2920
        §3.1): message *i*'s content and final ``.`` go out in one write with
        message *i+1*'s ``MAIL``/``RCPT``…/``DATA``, then the replies are read in
        order — *i*'s final reply, then *i+1*'s — so a message costs about one
        round trip.  Without PIPELINING they go one at a time, as :meth:`send`.

        ``messages`` is consumed lazily: the next one is taken only when the
        connection is ready to begin it, so a caller stops the batch by ending
        the iterable.  The list returned has one item per message taken, in
        order: its :class:`SendResult`, its error, or ``None`` when the
        connection ended before anything of that message could have been
        accepted (no reply settled it, its ``.`` was never written): send it on
        another connection.  A refusal (4xx/5xx) settles only its own message;
        the message a timeout, drop or ``421`` hit gets that error
        (``ambiguous`` once its ``.`` was written), the ones begun after it get
        ``None``, and the connection is discarded.

        Each message has its own ``send_timeout`` from when its commands are
        written, so N messages take at most N send deadlines.

        Args:
            limiter: one token per message, taken before its ``MAIL`` is
                written.  When none is at hand the next message is not pipelined:
                the current one is finished first, so no deadline runs while
                waiting.
            on_result: called with ``(position, outcome)`` as each message is
                settled, in this thread.  An exception it raises discards the
                connection and propagates.
            retry_stale: the connection was idle (in a pool): if the first
                message meets a drop or ``421`` before any of its commands was
                answered, the connection had gone stale, and that message gets
                ``None`` (send it again) instead of the error.
        """
        results: list[Outcome | None] = []
        wire = self._wire
        if wire is None or not self.usable:
            return results

        def settle(position: int, outcome: Outcome) -> None:
            results[position] = outcome
            if on_result is not None:
                try:
                    on_result(position, outcome)
                except BaseException as exc:
                    self.discard()
                    raise _HookFailed from exc

        def source(items: Iterator[PreparedMessage]) -> Iterator[PreparedMessage]:
            # What the caller's iterable raises is the caller's, not the connection's.
            while True:
                try:
                    message = next(items)
                except StopIteration:
                    return
                except BaseException as exc:
                    self.discard()
                    raise _HookFailed from exc
                yield message

        try:
            if wire.has_extn("pipelining"):
                self._pipeline(wire, source(iter(messages)), results, settle, limiter, retry_stale)
            else:
                self._one_by_one(source(iter(messages)), results, settle, limiter, retry_stale)
        except _HookFailed as wrapped:
            assert wrapped.__cause__ is not None
            raise wrapped.__cause__ from None
        return results

    def _one_by_one(
        self,
        messages: Iterator[PreparedMessage],
        results: list[Outcome | None],
        settle: Callable[[int, Outcome], None],
        limiter: RateLimiter | None,
        retry_stale: bool,
    ) -> None:
        for message in messages:
            position = len(results)
            results.append(None)
            if limiter is not None:
                limiter.acquire()
            outcome: Outcome
            try:
                outcome = self.send(message)
            except SMTPNotifyError as exc:
                if retry_stale and position == 0 and self._stale(exc):
                    return
                outcome = exc
            settle(position, outcome)
            if not self.usable:
                return

    def _pipeline(
        self,
        wire: _Wire,
        messages: Iterator[PreparedMessage],
        results: list[Outcome | None],
        settle: Callable[[int, Outcome], None],
        limiter: RateLimiter | None,
        retry_stale: bool,
    ) -> None:
        seconds = self.config.effective_send_timeout
        utf8 = wire.has_extn("smtputf8")

        def take() -> _Job | None:
            """The next message this connection can carry; the others are settled."""
            for message in messages:
                results.append(None)
                position = len(results) - 1
                commands = _commands(wire, message)
                try:
                    if message.smtputf8 and not utf8:
                        raise InvalidMessage(_NO_SMTPUTF8, phase="send")
                    encoding = "utf-8" if message.smtputf8 else "ascii"
                    try:
                        group = "".join(c + "\r\n" for c in commands).encode(encoding)
                    except UnicodeEncodeError:
                        raise InvalidMessage(
                            "an address is not ASCII but the message is not marked SMTPUTF8",
                            phase="send",
                        ) from None
                except InvalidMessage as exc:
                    settle(position, exc)
                    continue
                return _Job(position, message, group, _verbs(commands))
            return None

        job = take()
        first = job
        failing = job
        try:
            with self._guard("send") as state:
                while job is not None:
                    failing, state.after_dot, self._answered = job, False, 0
                    if job.deadline is None:  # not pipelined behind the previous message
                        if limiter is not None:
                            limiter.acquire()
                        job.deadline = Deadline(seconds)
                        wire.deadline = job.deadline
                        self.transactions += 1
                        wire.send(job.group)
                    wire.deadline = job.deadline
                    replies = [self._reply(wire, verb) for verb in job.verbs]
                    accepted, refused, data_reply, failure = _verdict(job.message, replies)
                    if failure is not None:
                        self._clean_up(wire, data_reply)
                        if not self.usable:
                            self.discard()
                        settle(job.position, failure)
                        job = take() if self.usable else None
                        continue
                    upcoming = take()
                    then = b""
                    if upcoming is not None and (limiter is None or limiter.try_acquire()):
                        then = upcoming.group
                    self._write_content(wire, job.message, state, then)
                    if upcoming is not None and then:
                        upcoming.deadline = Deadline(seconds)
                        self.transactions += 1
                    code, text = self._reply(wire, "DATA")
                    outcome: Outcome
                    if code == 250:
                        self.messages_sent += 1
                        outcome = SendResult(job.message.message_id, accepted, refused)
                    else:
                        outcome = response_error(code, text, command="DATA", phase="send")
                    settle(job.position, outcome)
                    job = upcoming
        except SMTPNotifyError as exc:
            assert failing is not None
            if not (retry_stale and failing is first and self._stale(exc)):
                settle(failing.position, exc)

    def _stale(self, error: SMTPNotifyError) -> bool:
        """Whether ``error`` is how a connection that went stale while idle fails:
        a drop or a ``421`` before the server answered any of the message's commands."""
        if self._answered or error.ambiguous:
            return False
        if isinstance(error, ResponseError):
            return error.code == 421
        return type(error) is ConnectError

    def _reply(self, wire: _Wire, verb: str) -> tuple[int, str]:
        code, reply = wire.getreply()
        if code == 421:
            self.usable = False  # the server is closing this connection
            raise TransientError(code, _text(reply), command=verb, phase="send")
        self._answered += 1
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
            if phase == "connect":
                seconds = self.config.effective_connect_timeout
                raise ConnectTimeout(
                    f"the connect phase took longer than {seconds:g} s", phase=phase
                ) from None
            seconds = self.config.effective_send_timeout
            detail = _AFTER_DOT if state.after_dot else ""
            raise SendTimeout(
                f"sending took longer than {seconds:g} s{detail}",
                phase=phase,
                ambiguous=state.after_dot,
            ) from None
        except _Disconnected as exc:
            self.discard()
            detail = _AFTER_DOT if state.after_dot else ""
            raise ConnectError(
                f"connection lost: {exc}{detail}", phase=phase, ambiguous=state.after_dot
            ) from None
        except ResponseError as exc:
            if phase == "connect" or not self.usable or exc.code == 421:
                self.discard()
            raise
        except SMTPNotifyError:
            self.discard()
            raise
        except (smtplib.SMTPException, OSError) as exc:  # smtplib's own view of a broken link
            self.discard()
            raise ConnectError(
                f"connection lost: {exc}", phase=phase, ambiguous=state.after_dot
            ) from exc

    def _quit_quietly(self, wire: _Wire) -> None:
        with contextlib.suppress(_Disconnected, DeadlineExceeded):
            wire.send(b"QUIT\r\n")
            wire.getreply()

    def close(self, quit_timeout: float | None = None) -> None:
        """Say QUIT (briefly) when the connection is sound, then close it.

        QUIT is a courtesy: by default it gets what is left of the last phase (2 s
        at most, none once it is over), so connect + send still bounds the call
        that ends with it.  ``quit_timeout`` gives it that many seconds instead
        (for a connection closed after idling in a pool).
        """
        wire = self._wire
        if wire is not None and self.usable:
            left = wire.deadline.expires_at - time.monotonic()
            wire.deadline = Deadline(min(2.0, left if quit_timeout is None else quit_timeout))
            self._quit_quietly(wire)
        self.discard()

    def quiet(self) -> bool:
        """Whether the connection looks fit for another message after idling: usable,
        and nothing arrived since the last reply (neither the end of the stream nor
        an unasked ``421``)."""
        return self._wire is not None and self.usable and self._wire.quiet()

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


class _HookFailed(Exception):
    """Internal: carries what the caller's code (``on_result``, the message
    iterable) raised past the error mapping."""


class _Job:
    """One message of a pipelined batch: its place, its command group, its deadline."""

    __slots__ = ("deadline", "group", "message", "position", "verbs")

    def __init__(
        self, position: int, message: PreparedMessage, group: bytes, verbs: list[str]
    ) -> None:
        self.position = position
        self.message = message
        self.group = group  # MAIL, RCPT…, DATA: written as one
        self.verbs = verbs
        self.deadline: Deadline | None = None  # set when the group is written


def _commands(wire: _Wire, message: PreparedMessage) -> list[str]:
    """MAIL FROM (with its parameters), one RCPT TO per recipient, DATA."""
    options = []
    if message.smtputf8:
        options.append("SMTPUTF8")
    if wire.has_extn("8bitmime") and not message.data.isascii():
        options.append("BODY=8BITMIME")
    if wire.has_extn("size"):
        options.append(f"SIZE={len(message.data)}")
    mail = f"MAIL FROM:<{message.sender}>" + "".join(" " + o for o in options)
    return [mail, *(f"RCPT TO:<{r}>" for r in message.recipients), "DATA"]


def _verdict(
    message: PreparedMessage, replies: list[tuple[int, str]]
) -> tuple[
    tuple[str, ...], dict[str, tuple[int, str]], tuple[int, str] | None, ResponseError | None
]:
    """What the replies to MAIL, RCPT… and DATA (as far as they went) say.

    Returns the accepted recipients, the refused ones, DATA's reply (``None``
    when DATA was not sent) and the transaction's refusal, if any: MAIL refused,
    every recipient refused, or DATA not answered 354.
    """
    count = len(message.recipients)
    mail_reply, rcpt_replies = replies[0], replies[1 : 1 + count]
    data_reply = replies[count + 1] if len(replies) == count + 2 else None
    pairs = list(zip(message.recipients, rcpt_replies, strict=False))
    accepted = tuple(r for r, (c, _) in pairs if 200 <= c < 300)
    refused = {r: (c, t) for r, (c, t) in pairs if not 200 <= c < 300}
    failure: ResponseError | None = None
    if mail_reply[0] != 250:
        failure = response_error(*mail_reply, command="MAIL", phase="send")
    elif not accepted:
        failure = RecipientsRefused(refused)
    elif data_reply is not None and data_reply[0] != 354:
        failure = response_error(*data_reply, command="DATA", phase="send")
    return accepted, refused, data_reply, failure


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
