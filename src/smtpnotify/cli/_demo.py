"""``smtpnotify demo``: the library's main job on its embedded defaults.

A local SMTP sink in-process, an SQLite outbox in a temporary folder, a
notification sent at once, several queued and delivered by the worker (one of
them deferred by the server and retried), and what arrived.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

from .._config import MailConfig
from .._message import Notification
from .._notifier import Notifier
from ..outbox import OutboxStatus, SQLiteOutbox

__all__ = ["register"]


def register(
    commands: argparse._SubParsersAction[argparse.ArgumentParser],
    common: argparse.ArgumentParser,
) -> None:
    """Add ``demo`` to the command line."""
    demo = commands.add_parser(
        "demo",
        parents=[common],
        help="send and queue notifications through a local sink",
        description=(
            "Run the library's main job on its embedded defaults: a local SMTP sink "
            "in-process, an SQLite outbox, a notification sent at once, several queued and "
            "delivered by the worker (one deferred by the server and retried)."
        ),
    )
    demo.add_argument("--outbox", help="SQLite outbox file to use (default: a temporary one)")
    demo.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run the demo: a sink, an SQLite outbox, a send, queued messages, the worker."""
    try:
        from ..testing import SMTPSink
    except ImportError:
        print("the demo needs aiosmtpd: pip install 'smtpnotify[cli]'", file=sys.stderr)
        return 2
    # The sink defers one recipient with 451 on the first try, then accepts it.
    sink = SMTPSink(
        pipelining=True,
        replies={"RCPT": {"oncall@example.com": (451, "4.2.0 mailbox busy, try later")}},
    )
    with sink, tempfile.TemporaryDirectory(prefix="smtpnotify-demo-") as folder:
        print(
            f"1. A local SMTP sink listens on {sink.host}:{sink.port} (aiosmtpd, in this process)."
        )
        config = MailConfig(
            host=sink.host,
            port=sink.port,
            sender="Change Desk <noreply@example.com>",
            timeout=5,
            retry_interval=timedelta(seconds=1),
            expiration=timedelta(minutes=1),
        )
        print(f"   {config!r}\n")
        outbox_path = Path(args.outbox or Path(folder) / "outbox.db")
        with SQLiteOutbox(outbox_path) as outbox, Notifier(config, outbox) as notifier:
            report = notifier.verify()
            print("2. notifier.verify() — the settings page's confirmation message:")
            print("   " + str(report).replace("\n", "\n   ") + "\n")

            result = notifier.send(
                Notification(
                    to="alice@example.com",
                    subject="Deployment finished",
                    text="Build 1234 is live.\n",
                )
            )
            print(
                f"3. notifier.send(): {result.message_id} accepted by {' '.join(result.accepted)}\n"
            )

            print(f"4. notifier.notify() queues in a durable SQLite outbox: {outbox_path}")
            ids = [
                notifier.notify(
                    Notification(
                        to="ops@example.com",
                        subject="Disk 91% full on db-1",
                        text="Time to clean up.\n",
                    )
                ),
                notifier.notify(
                    Notification(
                        to=["oncall@example.com", "bob@example.com"],
                        subject="Zürich backup: ✓ done",
                        text="Nightly backup finished.\n. <- a lone dot survives dot-stuffing\n",
                    )
                ),
                notifier.notify(
                    Notification(
                        to="carol@example.com",
                        subject="Weekly report",
                        html="<p><b>All green.</b></p>",
                    )
                ),
            ]
            print(f"   queued: {', '.join(ids)}  counts: {_counts(outbox)}\n")

            print("5. notifier.start(): the worker delivers; oncall@ is deferred (451) at first")
            notifier.start()
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline:
                counts = outbox.counts()
                if counts[OutboxStatus.PENDING] == counts[OutboxStatus.SENDING] == 0:
                    break
                if any(e.attempts >= 1 for e in outbox.entries(status=OutboxStatus.PENDING)):
                    sink.replies.clear()  # the server recovers
                time.sleep(0.1)
            notifier.stop()
            for entry_id in ids:
                entry = outbox.get(entry_id)
                assert entry is not None
                note = f"  last error: {entry.last_error}" if entry.last_error else ""
                print(f"   {entry.id[:12]}…  {entry.status:<7} attempts={entry.attempts}{note}")
            print(f"   counts: {_counts(outbox)}\n")

        print(f"6. What the sink received ({len(sink.messages)} messages):")
        for message in sink.messages:
            print(f"   - to {', '.join(message.rcpt_tos)}: {message.message['Subject']}")
        last = sink.messages[-1] if sink.messages else None
        if last is not None:
            print("\n   The last one, as it arrived:\n")
            for line in last.data.decode("utf-8", "replace").splitlines()[:24]:
                print(f"     {line}")
    return 0


def _counts(outbox: SQLiteOutbox) -> str:
    return ", ".join(f"{status}={count}" for status, count in outbox.counts().items() if count)
