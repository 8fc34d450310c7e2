"""How applications call smtpnotify, checked by ``mypy --strict`` (never run)."""

from __future__ import annotations

from datetime import timedelta

import smtpnotify
from smtpnotify import (
    DeliveryReport,
    MailConfig,
    Notification,
    Notifier,
    OutboxStatus,
    SendResult,
    SMTPNotifyError,
    SQLiteOutbox,
    VerifyReport,
)


def application() -> None:
    config = MailConfig(
        host="mail.example.com",
        tls="starttls",
        sender="Change Desk <noreply@example.com>",
        retry_interval=timedelta(minutes=5),
    )
    port: int = config.effective_port
    pooled = MailConfig(
        sender="noreply@example.com",
        max_connections=4,
        max_messages_per_connection=100,
        max_messages_per_second=2.5,
    )
    limits: tuple[int, int | None, float | None] = (
        pooled.max_connections,
        pooled.max_messages_per_connection,
        pooled.max_messages_per_second,
    )
    print(limits)
    with Notifier(config, SQLiteOutbox("outbox.db")) as notifier:
        result: SendResult = notifier.send(
            Notification(to="ops@example.com", subject="s", text="t")
        )
        accepted: tuple[str, ...] = result.accepted
        outcomes: list[SendResult | SMTPNotifyError] = notifier.send_many([])
        entry_id: str = notifier.notify(Notification(to=["a@example.com"], subject="s", text="t"))
        report: DeliveryReport = notifier.deliver_due()
        verify: VerifyReport = notifier.verify()
        entry = notifier.outbox.get(entry_id)
        if entry is not None and entry.status is OutboxStatus.SENT:
            print(
                entry.attempts, entry.message_id, report.sent, verify.ok, port, accepted, outcomes
            )
    try:
        notifier.send(Notification(to="x@example.com", subject="s", text="t"))
    except smtpnotify.TransientError as exc:
        code: int = exc.code
        print(code, exc.transient, exc.phase, exc.ambiguous)
