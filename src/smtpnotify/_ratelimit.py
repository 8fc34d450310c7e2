"""`RateLimiter`: a token bucket for ``MailConfig.max_messages_per_second``.

Providers throttle: past a number of messages a second they answer ``421`` or
``451`` and may block the account for a while.  One limiter is shared by all
the connections of a :class:`~smtpnotify.Notifier`, so the rate holds for the
notifier as a whole, however many connections or threads send.

The bucket holds at most ``burst`` tokens and gains ``rate`` tokens a second;
starting a message takes one.  A caller that finds the bucket empty *reserves*
the next token (the level goes below zero) and sleeps until it is due, so
waiting callers are served in turn and the rate holds exactly: with
``rate=5`` and ``burst=1``, 20 messages take at least 19 / 5 = 3.8 s.

Time is read only through the injected ``clock`` and spent only through the
injected ``sleep``, so tests check the arithmetic without waiting.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable

__all__ = ["RateLimiter"]


class RateLimiter:
    """At most ``rate`` acquisitions a second on average, ``burst`` at once.

    >>> limiter = RateLimiter(5.0)          # 5 messages a second, one at a time
    >>> limiter.acquire()                   # the first is free
    0.0
    >>> limiter.try_acquire()               # the next is 0.2 s away
    False

    Args:
        rate: tokens gained per second (> 0).
        burst: the bucket's size (≥ 1): how many acquisitions may follow one
            another without waiting after a quiet spell.  The bucket starts full.
        clock: a monotonic clock in seconds (default ``time.monotonic``).
        sleep: how to wait (default ``time.sleep``).

    Safe to share between threads.
    """

    def __init__(
        self,
        rate: float,
        *,
        burst: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], object] = time.sleep,
    ) -> None:
        if not (rate > 0 and math.isfinite(rate)):
            raise ValueError("rate must be a positive, finite number of tokens per second")
        if not (burst >= 1 and math.isfinite(burst)):
            raise ValueError("burst must be at least 1")
        self.rate = float(rate)
        self.burst = float(burst)
        self._clock = clock
        self._sleep = sleep
        self._lock = threading.Lock()
        self._tokens = self.burst
        self._updated = clock()

    def __repr__(self) -> str:
        return f"RateLimiter(rate={self.rate:g}/s, burst={self.burst:g})"

    def _refill(self) -> None:
        now = self._clock()
        elapsed = max(0.0, now - self._updated)
        self._updated = now
        self._tokens = min(self.burst, self._tokens + elapsed * self.rate)

    def try_acquire(self) -> bool:
        """Take a token if one is there now; never waits."""
        with self._lock:
            self._refill()
            if self._tokens >= 1:
                self._tokens -= 1
                return True
            return False

    def acquire(self) -> float:
        """Take a token, waiting until it is due; returns the seconds waited."""
        with self._lock:
            self._refill()
            self._tokens -= 1
            wait = -self._tokens / self.rate if self._tokens < 0 else 0.0
        if wait > 0:
            self._sleep(wait)
        return wait
