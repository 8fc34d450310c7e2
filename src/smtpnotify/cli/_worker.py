"""``smtpnotify worker``: deliver an outbox, with a live status line, until SIGINT/SIGTERM."""

from __future__ import annotations

import argparse
import logging
import sys
import threading
from collections.abc import Callable
from typing import TextIO

from .._config import MailConfig
from .._notifier import Notifier
from .._results import DeliveryReport
from ..outbox import Outbox, OutboxEntry, OutboxError, OutboxStatus
from ._common import (
    EXIT_OK,
    CLIError,
    StopSignals,
    add_config_options,
    add_outbox_options,
    load_config,
    open_outbox,
    parse_outbox_url,
)

__all__ = ["StatusLine", "TallyingNotifier", "register"]

log = logging.getLogger("smtpnotify.cli")

EntryHook = Callable[[OutboxEntry], None]


def register(
    commands: argparse._SubParsersAction[argparse.ArgumentParser],
    common: argparse.ArgumentParser,
) -> None:
    """Add ``worker`` to the command line."""
    parser = commands.add_parser(
        "worker",
        parents=[common],
        help="deliver the messages of an outbox until stopped (or once, with --once)",
        description=(
            "Run the notifier's delivery worker on an outbox: due messages are sent, failures "
            "retried every retry_interval until the expiration.  A status line shows what this "
            "worker sent, retried, failed and expired, and what is pending.  SIGINT (Ctrl-C) or "
            "SIGTERM stops it gracefully: the message being sent is finished, the rest released "
            "(exit status 0).  A second signal stops at once."
        ),
    )
    add_config_options(parser)
    add_outbox_options(parser)
    parser.add_argument(
        "--once",
        action="store_true",
        help="make one delivery pass over the due messages, print what it did, and exit (for cron)",
    )
    parser.add_argument(
        "--create",
        action="store_true",
        help="PostgreSQL: create the outbox table when it is missing",
    )
    parser.add_argument(
        "--batch-size",
        type=int,
        default=10,
        metavar="N",
        help="messages claimed at once and sent over one connection (default 10)",
    )
    parser.add_argument(
        "--poll-interval",
        type=float,
        default=1.0,
        metavar="SECONDS",
        help="how often an idle worker looks for messages queued by other processes (default 1)",
    )
    parser.add_argument(
        "--interval",
        type=float,
        default=1.0,
        metavar="SECONDS",
        help="status refresh: every SECONDS on a terminal; otherwise a line when the counts "
        "changed, at most every SECONDS (default 1)",
    )
    parser.set_defaults(func=run)


class TallyingNotifier(Notifier):
    """A :class:`Notifier` that adds up what its delivery passes did (for the status line)."""

    def __init__(
        self,
        config: MailConfig,
        outbox: Outbox,
        *,
        batch_size: int,
        poll_interval: float,
        on_failed: EntryHook | None = None,
        on_expired: EntryHook | None = None,
    ) -> None:
        super().__init__(
            config,
            outbox,
            batch_size=batch_size,
            poll_interval=poll_interval,
            on_failed=on_failed,
            on_expired=on_expired,
        )
        self._tally_lock = threading.Lock()
        self._tally = DeliveryReport()

    def deliver_due(self) -> DeliveryReport:
        """One pass (see :meth:`Notifier.deliver_due`), added to :attr:`totals`."""
        report = super().deliver_due()
        with self._tally_lock:
            self._tally += report
        return report

    @property
    def totals(self) -> DeliveryReport:
        """What every pass so far did, added up (a copy)."""
        with self._tally_lock:
            return DeliveryReport(
                self._tally.sent, self._tally.retried, self._tally.failed, self._tally.expired
            )


class StatusLine:
    """One status line: redrawn in place on a terminal, printed as plain lines otherwise.

    Event lines (a message failed or expired) go above it.  Safe from several threads.
    """

    def __init__(self, stream: TextIO, *, tty: bool) -> None:
        self.stream = stream
        self.tty = tty
        self._lock = threading.Lock()
        self._shown = ""

    def show(self, text: str) -> None:
        """Replace the status line with ``text`` (on a terminal), or print it as a line."""
        with self._lock:
            if self.tty:
                self.stream.write("\r\x1b[K" + text)
            else:
                self.stream.write(text + "\n")
            self._shown = text
            self.stream.flush()

    def event(self, text: str) -> None:
        """Print ``text`` as a line of its own, keeping the status line below it."""
        with self._lock:
            if self.tty and self._shown:
                self.stream.write("\r\x1b[K" + text + "\n" + self._shown)
            else:
                self.stream.write(text + "\n")
            self.stream.flush()

    def end(self) -> None:
        """Finish the in-place line (a newline on a terminal)."""
        with self._lock:
            if self.tty and self._shown:
                self.stream.write("\n")
                self.stream.flush()
            self._shown = ""


def status_text(totals: DeliveryReport, outbox: Outbox) -> str:
    """``sent 3 · retried 1 · failed 0 · expired 0 · pending 2``: this worker, then the queue."""
    text = (
        f"sent {totals.sent} · retried {totals.retried} · failed {totals.failed} · "
        f"expired {totals.expired}"
    )
    try:
        counts = outbox.counts()
    except OutboxError as exc:
        log.warning("could not count the outbox: %s", exc)
        return text + " · pending ?"
    text += f" · pending {counts[OutboxStatus.PENDING]}"
    if counts[OutboxStatus.SENDING]:
        text += f" ({counts[OutboxStatus.SENDING]} sending)"
    return text


def _describe_entry(entry: OutboxEntry) -> str:
    recipients = ", ".join(entry.message.recipients) or "-"
    return f"{entry.id} to {recipients}: {entry.last_error or 'no error recorded'}"


def run(args: argparse.Namespace) -> int:
    """Deliver the outbox until stopped, or make one pass with ``--once``."""
    config = load_config(args)
    if args.batch_size < 1:
        raise CLIError("--batch-size must be at least 1")
    if args.poll_interval <= 0 or args.interval <= 0:
        raise CLIError("--poll-interval and --interval must be positive")
    url = parse_outbox_url(args.outbox, args.table)
    tty = sys.stdout.isatty()
    status = StatusLine(sys.stdout, tty=tty)

    def on_failed(entry: OutboxEntry) -> None:
        status.event(f"failed:  {_describe_entry(entry)}")

    def on_expired(entry: OutboxEntry) -> None:
        status.event(f"expired: {_describe_entry(entry)}")

    outbox = open_outbox(url, must_exist=False, create=args.create)
    try:
        notifier = TallyingNotifier(
            config,
            outbox,
            batch_size=args.batch_size,
            poll_interval=args.poll_interval,
            on_failed=on_failed,
            on_expired=on_expired,
        )
        with notifier:
            if args.once:
                report = notifier.deliver_due()
                status.event(status_text(report, outbox))
                return EXIT_OK
            status.event(
                f"smtpnotify worker: {url.describe()} -> {config.host}:{config.effective_port} "
                f"(tls={config.tls}); Ctrl-C or SIGTERM stops it"
            )
            _serve(notifier, outbox, status, args.interval)
            status.event(f"stopped: {status_text(notifier.totals, outbox)}")
    finally:
        outbox.close()
    return EXIT_OK


def _serve(notifier: TallyingNotifier, outbox: Outbox, status: StatusLine, interval: float) -> None:
    """Run the worker, refreshing the status line, until SIGINT or SIGTERM."""
    with StopSignals() as stop:
        notifier.start()
        last_text = status_text(notifier.totals, outbox)
        status.show(last_text)
        while not stop.wait(interval):
            text = status_text(notifier.totals, outbox)
            if status.tty or text != last_text:
                status.show(text)
                last_text = text
        if status.tty:
            status.show(status_text(notifier.totals, outbox))
            status.end()
        status.event(f"{stop.received}: stopping (finishing the message being sent)")
        notifier.stop()
