"""The background delivery thread behind :meth:`Notifier.start`."""

from __future__ import annotations

import logging
import threading
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ._notifier import Notifier

__all__ = ["Worker"]

log = logging.getLogger("smtpnotify.worker")


class Worker(threading.Thread):
    """Runs :meth:`Notifier.deliver_due` whenever there may be work.

    It sleeps until the earliest of: a wake-up from the outbox (a message was
    queued), the next due time the outbox reports, or ``poll_interval``.  An
    error in a pass (a database that went away) is logged and the pass is tried
    again after ``poll_interval``; the thread never dies of it.
    """

    def __init__(self, notifier: Notifier, wakeup: threading.Event) -> None:
        super().__init__(name="smtpnotify-worker", daemon=True)
        self.notifier = notifier
        self._wakeup = wakeup

    def wake(self) -> None:
        """Cut the current sleep short (called by the outbox after an add, and by ``stop``)."""
        self._wakeup.set()

    def run(self) -> None:
        notifier = self.notifier
        stopping = notifier._stopping
        while not stopping.is_set():
            self._wakeup.clear()
            try:
                report = notifier.deliver_due()
                if report.total:
                    log.debug("delivery pass: %s", report)
                wait = self._seconds_until_due()
            except Exception:
                log.exception("delivery pass failed; trying again in %s s", notifier.poll_interval)
                wait = notifier.poll_interval
            if wait > 0:
                self._wakeup.wait(wait)
        log.debug("worker %s stopped", notifier.owner)

    def _seconds_until_due(self) -> float:
        notifier = self.notifier
        now = notifier.now()
        due = notifier.outbox.next_due(now=now)
        if due is None:
            return notifier.poll_interval
        # Never spin: a due time in the past (a message held by another worker's
        # lease) is looked at again after a short pause.
        return min(notifier.poll_interval, max((due - now).total_seconds(), 0.05))


