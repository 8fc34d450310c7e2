"""``smtpnotify send``: send one notification now (or queue it in an outbox)."""

from __future__ import annotations

import argparse
import mimetypes
import sys
from pathlib import Path

from .._errors import InvalidMessage, SMTPNotifyError
from .._message import Attachment, Notification
from .._notifier import Notifier
from ._common import (
    EXIT_FAILED,
    EXIT_OK,
    CLIError,
    add_config_options,
    load_config,
    open_outbox,
    parse_outbox_url,
    write,
)
from ._hints import hint_for

__all__ = ["register"]


def register(
    commands: argparse._SubParsersAction[argparse.ArgumentParser],
    common: argparse.ArgumentParser,
) -> None:
    """Add ``send`` to the command line."""
    parser = commands.add_parser(
        "send",
        parents=[common],
        help="send one notification now (or queue it with --outbox)",
        description=(
            "Send one message now, on a connection of its own, and print its Message-ID and "
            "which recipients the server accepted or refused.  Exit status: 0 every recipient "
            "accepted it, 1 sending failed or some recipient was refused, 2 bad settings or "
            "arguments.  With --outbox the message is queued durably instead, for a worker."
        ),
    )
    add_config_options(parser)
    message = parser.add_argument_group("the message")
    message.add_argument(
        "--to", action="append", required=True, metavar="ADDR", help="a recipient (repeatable)"
    )
    message.add_argument("--cc", action="append", default=[], metavar="ADDR", help="repeatable")
    message.add_argument("--bcc", action="append", default=[], metavar="ADDR", help="repeatable")
    message.add_argument("--reply-to", action="append", default=[], metavar="ADDR")
    message.add_argument("--subject", required=True)
    body = message.add_mutually_exclusive_group()
    body.add_argument("--text", help="the plain-text body")
    body.add_argument(
        "--text-file",
        type=Path,
        metavar="FILE",
        help="read the plain-text body (UTF-8) from FILE ('-': stdin)",
    )
    message.add_argument("--html-file", type=Path, metavar="FILE", help="an HTML body (UTF-8)")
    message.add_argument(
        "--attach", action="append", default=[], type=Path, metavar="FILE", help="repeatable"
    )
    parser.add_argument(
        "--outbox",
        metavar="URL",
        help="queue the message in this outbox (sqlite:///path or postgresql://...) "
        "instead of sending it now",
    )
    parser.add_argument("--table", metavar="NAME", help="PostgreSQL outbox table")
    parser.set_defaults(func=run)


def _read_text(path: Path, what: str) -> str:
    try:
        if str(path) == "-":
            return sys.stdin.read()
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise CLIError(f"{what} {path}: not UTF-8 text") from None
    except OSError as exc:
        raise CLIError(f"{what} {path}: {exc.strerror or exc}") from None


def _attachment(path: Path) -> Attachment:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise CLIError(f"--attach {path}: {exc.strerror or exc}") from None
    content_type, encoding = mimetypes.guess_type(path.name)
    if content_type is None or encoding is not None:
        content_type = "application/octet-stream"
    return Attachment(path.name, data, content_type)


def build_notification(args: argparse.Namespace) -> Notification:
    """The :class:`Notification` the arguments describe."""
    text: str | None = args.text
    if args.text_file is not None:
        text = _read_text(args.text_file, "--text-file")
    html = _read_text(args.html_file, "--html-file") if args.html_file is not None else None
    if text is None and html is None:
        raise CLIError("give the message a body: --text, --text-file or --html-file")
    return Notification(
        to=args.to,
        subject=args.subject,
        text=text,
        html=html,
        cc=args.cc,
        bcc=args.bcc,
        reply_to=args.reply_to or None,
        attachments=[_attachment(path) for path in args.attach],
    )


def run(args: argparse.Namespace) -> int:
    """Send (or queue) the message; print what happened."""
    config = load_config(args)
    try:
        notification = build_notification(args)
    except InvalidMessage as exc:
        raise CLIError(f"invalid message: {exc}") from None
    if args.outbox is not None or args.table is not None:
        url = parse_outbox_url(args.outbox, args.table)
        outbox = open_outbox(url, must_exist=False)
        try:
            with Notifier(config, outbox) as notifier:
                entry_id = notifier.notify(notification)
                entry = outbox.get(entry_id)
        finally:
            outbox.close()
        write(f"queued: {entry_id} in {url.describe()}")
        if entry is not None:
            write(f"Message-ID: {entry.message_id}")
        write("a worker delivers it: smtpnotify worker --outbox ...")
        return EXIT_OK
    with Notifier(config) as notifier:
        try:
            result = notifier.send(notification)
        except InvalidMessage as exc:
            raise CLIError(f"invalid message: {exc}") from None
        except SMTPNotifyError as exc:
            write(f"smtpnotify: sending failed: {type(exc).__name__}: {exc}", stream="stderr")
            hint = hint_for(exc, config)
            if hint:
                write(f"  what to change: {hint}", stream="stderr")
            return EXIT_FAILED
    write(f"Message-ID: {result.message_id}")
    write(f"accepted: {', '.join(result.accepted) if result.accepted else '-'}")
    for address, (code, text) in result.refused.items():
        write(f"refused:  {address}: {code} {text}")
    return EXIT_FAILED if result.refused else EXIT_OK
