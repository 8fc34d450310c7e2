"""The socket under an SMTP session: I/O that keeps the phase's deadline.

``smtplib`` reads replies through a buffered file whose every ``recv`` gets the
full socket timeout, so a server that trickles a byte a second keeps it
waiting forever.  :class:`_Wire` replaces the two methods that touch the
socket (``send`` and ``getreply``), and opens the socket itself
(``open_socket``, ``handshake``), so that each ``recv``/``send`` waits at most
for what is left of the phase: its ``deadline``, which
:class:`~smtpnotify._smtp.SMTPSession` sets for each phase.

A deadline that runs out raises :class:`~smtpnotify._deadline.DeadlineExceeded`
and a broken connection :class:`_Disconnected`; the session maps both to the
public errors.  Also here: :func:`dot_stuff` and :func:`iter_dot_stuffed` (the
DATA payload), and what the debug log shows of the traffic, with credentials
redacted.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import re
import select
import smtplib
import socket
import ssl
from collections.abc import Iterator

from ._deadline import Deadline, DeadlineExceeded, call_with_deadline
from ._errors import CertificateError, ConnectError, TLSError

__all__ = ["dot_stuff", "iter_dot_stuffed"]

log = logging.getLogger("smtpnotify.smtp")

_MAXLINE = 8192  # as smtplib: a reply line longer than this is a protocol error
_MAX_REPLY_LINES = 1000  # a reply of more lines is a misbehaving server, deadline or not
_SEND_CHUNK = 256 * 1024
_EOL = re.compile(rb"\r\n|\r|\n")


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


def iter_dot_stuffed(data: bytes, chunk: int = _SEND_CHUNK) -> Iterator[bytes]:
    """:func:`dot_stuff` in pieces: ``b"".join(iter_dot_stuffed(data)) == dot_stuff(data)``.

    ``data`` is read one slice of ``chunk`` bytes at a time, so only about one
    slice (at most twice its size after normalising) exists besides ``data``
    itself, however big the message.  A CR ending one slice and an LF starting
    the next are one line ending, and a ``.`` starting a slice is doubled when
    it starts a line.  The last piece ends with the terminating ``.`` line;
    no piece is empty.  Slices that are already CRLF-only (every prepared
    message) are only scanned, and copied only where a line starts with ``.``.
    """
    if chunk < 1:
        raise ValueError("chunk must be at least 1")
    size = len(data)
    pos = 0
    line_start = True  # the output so far ends a line (or is empty)
    skip_lf = False  # the last slice ended with a CR, already written as CRLF
    held: bytes | None = None  # held back so the terminator can join the last piece
    while pos < size:
        piece = data[pos : pos + chunk]
        pos += chunk
        if skip_lf and piece.startswith(b"\n"):
            piece = piece[1:]
        skip_lf = piece.endswith(b"\r")
        crlf = piece.count(b"\r\n")
        if piece.count(b"\r") != crlf or piece.count(b"\n") != crlf:
            piece = _EOL.sub(b"\r\n", piece)
        if not piece:
            continue
        if line_start and piece.startswith(b"."):
            piece = b"." + piece
        piece = piece.replace(b"\r\n.", b"\r\n..")
        line_start = piece.endswith(b"\n")  # only ever as CRLF by now
        if held is not None:
            yield held
        held = piece
    end = b".\r\n" if line_start else b"\r\n.\r\n"
    yield end if held is None else held + end


class _Disconnected(Exception):
    """Internal: the server closed the connection (or it broke)."""


class _Wire(smtplib.SMTP):
    """``smtplib.SMTP`` whose socket I/O obeys the current deadline.

    Only ``send`` and ``getreply`` touch the network in smtplib's code paths that
    smtpnotify uses (EHLO, AUTH, plain commands), so overriding those two bounds
    everything; the socket itself is opened and wrapped in TLS by
    :meth:`open_socket` and :meth:`handshake`, never by smtplib.
    """

    def __init__(self, host: str, local_hostname: str) -> None:
        super().__init__(local_hostname=local_hostname)
        self._host = host
        self.deadline = Deadline(1.0)
        self.redact = False
        self.bytes_sent = 0  # every byte the kernel took, for "was the final '.' out?"
        self._rbuf = bytearray()

    # -- the socket -----------------------------------------------------------
    def open_socket(self, host: str, port: int) -> socket.socket:
        """DNS (in a helper thread) and TCP connect, each bounded by the deadline."""
        try:
            ipaddress.ip_address(host)
            infos = socket.getaddrinfo(
                host, port, type=socket.SOCK_STREAM, flags=socket.AI_NUMERICHOST
            )
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
            # Commands and groups are written whole: never hold a small write back for
            # an ACK (Nagle), which would cost a round trip per pipelined group.
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
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
                self.bytes_sent += sent
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

    def quiet(self) -> bool:
        """Whether nothing has arrived since the last reply read.

        Anything that did (the end of the stream when the server closed an idle
        connection, an unasked ``421`` before it does) means the connection is
        not fit for another message.
        """
        sock = self.sock
        if sock is None or self._rbuf:
            return False
        if isinstance(sock, ssl.SSLSocket) and sock.pending():
            return False
        try:
            if hasattr(select, "poll"):
                poller = select.poll()
                poller.register(sock, select.POLLIN)
                return not poller.poll(0)
            readable, _, _ = select.select([sock], [], [], 0)
        except (OSError, ValueError):
            return False
        return not readable

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


def _text(reply: bytes) -> str:
    return reply.decode("utf-8", "replace")
