"""Durable outboxes: where queued notifications wait for delivery.

* :class:`Outbox` — the protocol the notifier uses (any object with these methods).
* :class:`MemoryOutbox` — in this process's memory; not durable.
* :class:`SQLiteOutbox` — one SQLite file; durable, shared by threads and processes.

Storage failures raise :class:`OutboxError`; opening storage that is not an
outbox (or holds a newer schema) raises :class:`OutboxSchemaError`.
``smtpnotify.testing.conformance.OutboxConformance`` checks an implementation.
"""

from __future__ import annotations

from ._base import Outbox, OutboxEntry, OutboxError, OutboxSchemaError, OutboxStatus
from .memory import MemoryOutbox
from .sqlite import SQLiteOutbox

__all__ = [
    "MemoryOutbox",
    "Outbox",
    "OutboxEntry",
    "OutboxError",
    "OutboxSchemaError",
    "OutboxStatus",
    "SQLiteOutbox",
]
