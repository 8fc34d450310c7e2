"""The retry schedule: when a message that failed transiently is tried next.

``retry_interval × retry_backoff^(attempts-1)``, capped by ``max_retry_interval``,
computed by tenacity's ``wait_exponential`` (with ``retry_backoff=1`` that is
the settings page's fixed interval).  A next attempt at or after the message's
expiry is no attempt at all: the message expires instead.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import TYPE_CHECKING

import tenacity

if TYPE_CHECKING:
    from ._config import MailConfig

__all__ = ["RetrySchedule"]


class RetrySchedule:
    """The delays of one :class:`~smtpnotify.MailConfig`.

    >>> from datetime import timedelta
    >>> s = RetrySchedule(timedelta(minutes=5), backoff=2.0, cap=timedelta(minutes=30))
    >>> [s.delay(n).total_seconds() / 60 for n in (1, 2, 3, 4, 5)]
    [5.0, 10.0, 20.0, 30.0, 30.0]
    """

    def __init__(
        self, interval: timedelta, *, backoff: float = 1.0, cap: timedelta | None = None
    ) -> None:
        self.interval = interval
        self.backoff = backoff
        self.cap = cap
        self._wait = tenacity.wait_exponential(
            multiplier=interval.total_seconds(),
            exp_base=backoff,
            max=(cap or timedelta.max).total_seconds(),
        )

    @classmethod
    def from_config(cls, config: MailConfig) -> RetrySchedule:
        """The schedule ``config``'s retry settings describe."""
        return cls(
            config.retry_interval, backoff=config.retry_backoff, cap=config.max_retry_interval
        )

    def delay(self, attempts: int) -> timedelta:
        """How long to wait after the ``attempts``-th attempt failed (``attempts`` ≥ 1)."""
        state = tenacity.RetryCallState(
            retry_object=tenacity.Retrying(), fn=None, args=(), kwargs={}
        )
        state.attempt_number = max(1, attempts)
        try:
            return timedelta(seconds=self._wait(state))
        except OverflowError:  # beyond timedelta's range: "never", in effect
            return timedelta.max

    def next_attempt(
        self, *, now: datetime, attempts: int, expires_at: datetime
    ) -> datetime | None:
        """When to try next, or ``None`` when that would be at or after ``expires_at``."""
        try:
            when = now + self.delay(attempts)
        except OverflowError:
            return None
        return when if when < expires_at else None
