"""``smtpnotify outbox``: look at and manage an outbox (status, list, show, retry, purge)."""

from __future__ import annotations

import argparse
from email import policy
from email.message import EmailMessage
from email.parser import BytesHeaderParser

from ..outbox import Outbox, OutboxEntry, OutboxStatus
from ..outbox._base import FINISHED_STATUSES
from ._common import (
    EXIT_FAILED,
    EXIT_OK,
    CLIError,
    add_outbox_options,
    format_delta,
    format_relative,
    format_time,
    open_outbox,
    parse_duration,
    parse_outbox_url,
    utcnow,
    write,
)

__all__ = ["register"]

_STATUS_NAMES = [status.value for status in OutboxStatus]
_FINISHED_NAMES = [status.value for status in FINISHED_STATUSES]


def register(
    commands: argparse._SubParsersAction[argparse.ArgumentParser],
    common: argparse.ArgumentParser,
) -> None:
    """Add ``outbox`` and its subcommands to the command line."""
    parser = commands.add_parser(
        "outbox",
        parents=[common],
        help="look at and manage an outbox: status, list, show, retry, purge",
        description=(
            "Look at and manage an outbox.  Message bodies are never printed unless asked for "
            "(show --data).  Exit status: 0 done, 1 no such entry / nothing to retry, "
            "2 usage error or no outbox there."
        ),
    )
    add_outbox_options(parser, suppress=True)
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")

    def action(name: str, help_text: str) -> argparse.ArgumentParser:
        sub = actions.add_parser(name, parents=[common], help=help_text, description=help_text)
        add_outbox_options(sub, suppress=True)
        return sub

    status = action("status", "how many entries have each status, and when the next one is due")
    status.set_defaults(func=run_status)

    listing = action("list", "entries, newest first (id, status, attempts, times, recipients)")
    listing.add_argument("--status", choices=_STATUS_NAMES, help="only entries in this status")
    listing.add_argument(
        "--limit", type=int, default=20, metavar="N", help="at most N entries (default 20)"
    )
    listing.set_defaults(func=run_list)

    show = action("show", "one entry in detail: state, envelope, headers (not the body)")
    show.add_argument("id", help="the entry's id (as `list` shows it)")
    show.add_argument(
        "--data", action="store_true", help="also print the raw message, body included"
    )
    show.set_defaults(func=run_show)

    retry = action("retry", "put a failed or expired entry back in the queue, due now")
    retry.add_argument("id", help="the entry's id")
    retry.set_defaults(func=run_retry)

    purge = action("purge", "delete finished entries (sent, failed, expired) older than a duration")
    purge.add_argument(
        "--older-than",
        required=True,
        type=parse_duration,
        metavar="DURATION",
        help="last updated longer ago than this: 7d, 12h, 30m, 1d12h, or ISO 8601 like P7D",
    )
    purge.add_argument(
        "--status",
        action="append",
        choices=_FINISHED_NAMES,
        help="only this status (repeatable; default: sent, failed and expired)",
    )
    purge.set_defaults(func=run_purge)


def _open(args: argparse.Namespace) -> tuple[Outbox, str]:
    url = parse_outbox_url(getattr(args, "outbox", None), getattr(args, "table", None))
    return open_outbox(url, must_exist=True), url.describe()


def _headers(entry: OutboxEntry) -> EmailMessage:
    parsed = BytesHeaderParser(policy=policy.default).parsebytes(entry.message.data)
    assert isinstance(parsed, EmailMessage)
    return parsed


def _header(message: EmailMessage, name: str) -> str:
    try:
        value = message[name]
    except Exception:  # a malformed header: show nothing rather than fail
        return "?"
    return "" if value is None else " ".join(str(value).split())


def _clip(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def run_status(args: argparse.Namespace) -> int:
    """Print the count per status, the total, and when the next entry is due."""
    outbox, where = _open(args)
    try:
        counts = outbox.counts()
        now = utcnow()
        due = outbox.next_due(now=now)
    finally:
        outbox.close()
    write(f"outbox: {where}")
    for status in OutboxStatus:
        write(f"  {status.value:<8} {counts[status]:>8}")
    write(f"  {'total':<8} {sum(counts.values()):>8}")
    if due is not None and due <= now:
        write(f"next due: now (since {format_time(due)})")
    elif due is not None:
        write(f"next due: {format_relative(due, now)}")
    return EXIT_OK


def run_list(args: argparse.Namespace) -> int:
    """Print a table of entries, newest first."""
    if args.limit < 1:
        raise CLIError("--limit must be at least 1")
    outbox, where = _open(args)
    try:
        status = OutboxStatus(args.status) if args.status else None
        entries = outbox.entries(status=status, limit=args.limit)
    finally:
        outbox.close()
    if not entries:
        write(f"no {args.status + ' ' if args.status else ''}entries in {where}")
        return EXIT_OK
    write(f"{'ID':<32}  {'STATUS':<7}  {'TRIES':>5}  {'CREATED':<23}  {'TO':<28}  SUBJECT")
    for entry in entries:
        headers = _headers(entry)
        recipients = ", ".join(entry.message.recipients)
        write(
            f"{entry.id:<32}  {entry.status.value:<7}  {entry.attempts:>5}  "
            f"{format_time(entry.created_at):<23}  {_clip(recipients, 28):<28}  "
            f"{_clip(_header(headers, 'Subject'), 40)}"
        )
    return EXIT_OK


def run_show(args: argparse.Namespace) -> int:
    """Print one entry; its raw message only with ``--data``."""
    outbox, _ = _open(args)
    try:
        entry = outbox.get(args.id)
    finally:
        outbox.close()
    if entry is None:
        write(f"smtpnotify: no outbox entry {args.id!r}", stream="stderr")
        return EXIT_FAILED
    now = utcnow()
    headers = _headers(entry)
    rows = [
        ("id", entry.id),
        ("status", entry.status.value),
        ("message-id", entry.message_id),
        ("attempts", str(entry.attempts)),
        ("created", format_relative(entry.created_at, now)),
        ("updated", format_relative(entry.updated_at, now)),
        ("next attempt", format_relative(entry.next_attempt_at, now)),
        ("expires", format_relative(entry.expires_at, now)),
        ("last error", entry.last_error or "-"),
        ("envelope from", entry.message.sender),
        ("recipients", ", ".join(entry.message.recipients) or "-"),
        ("accepted", ", ".join(entry.accepted) or "-"),
    ]
    if entry.lease_owner is not None:
        rows.append(("lease", f"{entry.lease_owner} until {format_time(entry.lease_until)}"))
    for address, (code, text) in entry.refused.items():
        rows.append(("refused", f"{address}: {code} {text}"))
    rows.append(("size", f"{len(entry.message.data)} bytes"))
    for name in ("From", "To", "Cc", "Reply-To", "Subject", "Date"):
        value = _header(headers, name)
        if value:
            rows.append((name, value))
    width = max(len(label) for label, _ in rows)
    for label, value in rows:
        write(f"{label + ':':<{width + 1}} {value}")
    if args.data:
        write("", "----- raw message -----")
        raw = entry.message.data.decode("utf-8", "replace").replace("\r\n", "\n")
        write(raw.removesuffix("\n"), "----- end -----")
    else:
        write("(the body is not shown; add --data to print the raw message)")
    return EXIT_OK


def run_retry(args: argparse.Namespace) -> int:
    """Put a failed or expired entry back to pending, due now."""
    outbox, _ = _open(args)
    try:
        now = utcnow()
        done = outbox.retry(args.id, now=now)
        entry = outbox.get(args.id)
    finally:
        outbox.close()
    if entry is None:
        write(f"smtpnotify: no outbox entry {args.id!r}", stream="stderr")
        return EXIT_FAILED
    if not done:
        write(
            f"smtpnotify: entry {entry.id} is {entry.status.value}: only failed or expired "
            "entries can be retried",
            stream="stderr",
        )
        return EXIT_FAILED
    window = f"in {format_delta(entry.expires_at - now)}"
    write(f"{entry.id}: pending again, due now; expires {format_time(entry.expires_at)} ({window})")
    write("a running worker picks it up; or run: smtpnotify worker --once ...")
    return EXIT_OK


def run_purge(args: argparse.Namespace) -> int:
    """Delete finished entries last updated before now minus ``--older-than``."""
    statuses = tuple(OutboxStatus(s) for s in (args.status or _FINISHED_NAMES))
    outbox, where = _open(args)
    before = utcnow() - args.older_than
    try:
        removed = outbox.purge(before=before, statuses=statuses)
    finally:
        outbox.close()
    names = ", ".join(s.value for s in statuses)
    noun = "entry" if removed == 1 else "entries"
    write(f"purged {removed} {names} {noun} last updated before {format_time(before)} from {where}")
    return EXIT_OK
