"""``smtpnotify sink``: a local SMTP server that prints every message it receives."""

from __future__ import annotations

import argparse
import ipaddress
import logging
import ssl
import tempfile
import threading
from datetime import datetime
from email.message import EmailMessage
from pathlib import Path
from typing import TYPE_CHECKING

from ._common import EXIT_FAILED, EXIT_OK, CLIError, StopSignals, write

if TYPE_CHECKING:
    from ..testing import CertificateBundle, SinkMessage

__all__ = ["register", "render_message"]

_HEADERS = ("From", "To", "Cc", "Reply-To", "Subject", "Date", "Message-ID")
_LINE_WIDTH = 200


def register(
    commands: argparse._SubParsersAction[argparse.ArgumentParser],
    common: argparse.ArgumentParser,
) -> None:
    """Add ``sink`` to the command line."""
    parser = commands.add_parser(
        "sink",
        parents=[common],
        help="run a local SMTP server that prints each message it receives (a mail catcher)",
        description=(
            "A development mail catcher: an SMTP server (aiosmtpd) that accepts every message "
            "and prints its envelope, headers and text body as it arrives.  Nothing is "
            "delivered anywhere.  Runs until Ctrl-C or SIGTERM."
        ),
    )
    parser.add_argument(
        "--host", default="127.0.0.1", help="IP address to listen on (default 127.0.0.1)"
    )
    parser.add_argument(
        "--port", type=int, default=1025, help="port to listen on (default 1025; 0: any free port)"
    )
    parser.add_argument(
        "--tls",
        choices=["none", "starttls", "ssl"],
        default="none",
        help="offer STARTTLS or speak implicit TLS, with throwaway certificates (needs trustme)",
    )
    parser.add_argument(
        "--max-lines",
        type=int,
        default=40,
        metavar="N",
        help="body lines printed per message (default 40)",
    )
    parser.set_defaults(func=run)


def _clip(line: str) -> str:
    return line if len(line) <= _LINE_WIDTH else line[: _LINE_WIDTH - 1] + "…"


def _header(message: EmailMessage, name: str) -> str:
    try:
        value = message[name]
    except Exception:  # a malformed header must not stop the sink
        return "?"
    return "" if value is None else " ".join(str(value).split())


def _body(message: EmailMessage, max_lines: int) -> list[str]:
    """The text body (or a note on what there is instead), at most ``max_lines`` lines."""
    try:
        part = message.get_body(preferencelist=("plain",))
        if part is None:
            html = message.get_body(preferencelist=("html",))
            if html is None:
                return ["(no text body)"]
            content = html.get_content()
            label = [f"(no text/plain part; text/html, {len(content)} characters:)"]
        else:
            content = part.get_content()
            label = []
    except Exception as exc:  # undecodable content: say so, keep running
        return [f"(the body could not be decoded: {type(exc).__name__})"]
    if not isinstance(content, str):
        return [f"({len(content)} bytes of non-text content)"]
    lines = content.splitlines()
    shown = [_clip(line) for line in lines[:max_lines]]
    if len(lines) > max_lines:
        shown.append(f"… ({len(lines) - max_lines} more lines)")
    return label + shown


def _attachments(message: EmailMessage) -> list[str]:
    lines = []
    try:
        for part in message.iter_attachments():
            if not isinstance(part, EmailMessage):
                continue
            payload = part.get_payload(decode=True)
            size = len(payload) if isinstance(payload, bytes) else 0
            name = part.get_filename() or "(no name)"
            lines.append(f"attachment: {name} ({part.get_content_type()}, {size} bytes)")
    except Exception as exc:  # a malformed MIME structure
        lines.append(f"(attachments could not be listed: {type(exc).__name__})")
    return lines


def render_message(number: int, received: SinkMessage, max_lines: int) -> list[str]:
    """One received message as lines: envelope, headers, text body (truncated)."""
    message = received.message
    transport = f"TLS {received.tls_version}" if received.tls else "plain"
    if received.authenticated_user:
        transport += f", AUTH as {received.authenticated_user}"
    when = datetime.now().astimezone().strftime("%H:%M:%S")
    lines = [
        f"── message {number} at {when} ── connection {received.connection} ({transport}), "
        f"{len(received.data)} bytes",
        f"envelope: from <{received.mail_from}> to "
        + ", ".join(f"<{r}>" for r in received.rcpt_tos),
    ]
    for name in _HEADERS:
        value = _header(message, name)
        if value:
            lines.append(f"{name}: {_clip(value)}")
    lines.append("")
    lines.extend(_body(message, max_lines))
    lines.extend(_attachments(message))
    lines.append("")
    return lines


def _certificates(folder: Path) -> tuple[CertificateBundle, Path]:
    """Throwaway certificates, and the CA's PEM written to ``folder``."""
    try:
        from ..testing import make_certificates

        certs = make_certificates()
    except ImportError:
        raise CLIError(
            "sink --tls needs trustme for its throwaway certificates: "
            "pip install 'smtpnotify[testing]'"
        ) from None
    ca_file = folder / "ca.pem"
    ca_file.write_text(certs.ca_pem, encoding="ascii")
    return certs, ca_file


class _OneLineErrors(logging.Filter):
    """aiosmtpd's session errors in one line, without the traceback.

    A client that does not trust the throwaway certificate ends its session
    with an exception in aiosmtpd; for a mail catcher that is routine.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        """Fold the exception of ``record`` into its message."""
        error = record.exc_info[1] if record.exc_info else None
        if error is not None:
            parts = [f"{type(error).__name__}: {error}".removesuffix(": ")]
            cause = error.__cause__ or error.__context__
            if cause is not None:
                parts.append(f"caused by {type(cause).__name__}: {cause}")
            record.msg = f"{record.getMessage()}: {'; '.join(parts)}"
            record.args = ()
            record.exc_info = None
            record.exc_text = None
        return True


def run(args: argparse.Namespace) -> int:
    """Serve until SIGINT/SIGTERM, printing each message as it arrives."""
    one_line = _OneLineErrors()
    aiosmtpd_log = logging.getLogger("mail.log")
    if not getattr(args, "verbose", 0):
        aiosmtpd_log.addFilter(one_line)
    try:
        return _serve(args)
    finally:
        aiosmtpd_log.removeFilter(one_line)


def _serve(args: argparse.Namespace) -> int:
    try:
        from ..testing import SMTPSink
    except ImportError:
        raise CLIError("the sink needs aiosmtpd: pip install 'smtpnotify[cli]'") from None
    try:
        address = ipaddress.ip_address(args.host)
    except ValueError:
        raise CLIError(
            f"--host must be an IP address such as 127.0.0.1, not {args.host!r}"
        ) from None
    if not 0 <= args.port <= 65535:
        raise CLIError(f"--port {args.port} is out of range (0-65535)")
    if args.max_lines < 0:
        raise CLIError("--max-lines must not be negative")
    lock = threading.Lock()
    count = 0

    def show(received: SinkMessage) -> None:
        nonlocal count
        with lock:
            count += 1
            write(*render_message(count, received, args.max_lines))

    with tempfile.TemporaryDirectory(prefix="smtpnotify-sink-") as folder:
        context: ssl.SSLContext | None = None
        fingerprint = ca_file = None
        if args.tls != "none":
            certs, ca_file = _certificates(Path(folder))
            context = certs.server_context("localhost")
            fingerprint = certs.leaf_sha256
        sink = SMTPSink(
            host=args.host, port=args.port, tls=args.tls, ssl_context=context, on_message=show
        )
        try:
            sink.start()
        except OSError as exc:
            raise CLIError(
                f"cannot listen on {args.host}:{args.port}: {exc.strerror or exc}",
                status=EXIT_FAILED,
            ) from None
        try:
            with StopSignals() as stop:
                mode = {"none": "plain SMTP", "starttls": "STARTTLS", "ssl": "implicit TLS"}
                write(
                    f"smtpnotify sink: listening on {sink.host}:{sink.port} ({mode[args.tls]}); "
                    "messages are printed, not delivered"
                )
                if not address.is_loopback:
                    write(
                        "smtpnotify: warning: not a loopback address: anyone who can reach "
                        "this port can hand it mail",
                        stream="stderr",
                    )
                write(*_config_snippet(sink.host, sink.port, args.tls, fingerprint, ca_file))
                write("Waiting for mail; Ctrl-C stops.", "")
                while not stop.wait(3600):
                    pass
                received = stop.received
        finally:
            sink.close()
        with lock:
            write(f"{received}: stopped after {count} message{'s' if count != 1 else ''}.")
    return EXIT_OK


def _config_snippet(
    host: str, port: int, tls: str, fingerprint: str | None, ca_file: Path | None
) -> list[str]:
    """How to point a config at the sink (pinned to this run's certificate with TLS)."""
    lines = []
    if fingerprint is not None:
        kind = "STARTTLS offered" if tls == "starttls" else "implicit TLS"
        lines += [
            f"TLS: {kind}, with a throwaway certificate for localhost, 127.0.0.1 and ::1",
            f"  CA certificate (PEM), to trust or pin:  {ca_file}",
            f"  server certificate SHA-256:             {fingerprint}",
        ]
    lines += [
        "Point a config at it:",
        f'  host = "{host}"',
        f"  port = {port}",
        f'  tls = "{tls}"',
    ]
    if fingerprint is not None:
        lines += ['  trust = "pinned"', f'  pinned_fingerprints = ["{fingerprint}"]']
    return lines
