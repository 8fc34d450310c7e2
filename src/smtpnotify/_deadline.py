"""Deadlines: a point in time by which a whole phase must be over.

A socket timeout bounds each ``recv`` or ``send`` on its own, so a server that
trickles one byte every second never trips a two-second timeout.  A
:class:`Deadline` bounds the sum: before each blocking operation the socket's
timeout is set to what is left, and once nothing is left the phase is over.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

__all__ = ["Deadline", "DeadlineExceeded", "call_with_deadline"]

T = TypeVar("T")


class DeadlineExceeded(Exception):
    """Internal: the running phase's deadline has passed (mapped by the session)."""


class Deadline:
    """A monotonic point in time, ``seconds`` from its creation.

    >>> d = Deadline(5.0)
    >>> 0 < d.remaining() <= 5.0
    True
    """

    __slots__ = ("_clock", "expires_at", "seconds")

    def __init__(self, seconds: float, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self.seconds = seconds
        self.expires_at = clock() + seconds

    def remaining(self) -> float:
        """Seconds left; raises :class:`DeadlineExceeded` when none are."""
        left = self.expires_at - self._clock()
        if left <= 0:
            raise DeadlineExceeded(f"deadline of {self.seconds:g} s passed")
        return left

    def expired(self) -> bool:
        """Whether the deadline has passed."""
        return self.expires_at - self._clock() <= 0

    def apply(self, sock: socket.socket) -> None:
        """Set ``sock``'s timeout to the time left (raising when none is)."""
        sock.settimeout(self.remaining())

    def __repr__(self) -> str:
        return f"Deadline({self.seconds:g}s, {self.expires_at - self._clock():.3f}s left)"


def call_with_deadline(func: Callable[..., T], *args: Any, deadline: Deadline) -> T:
    """Run a blocking call that cannot be interrupted (``getaddrinfo``) in a helper
    thread, and stop waiting for it when ``deadline`` passes.

    The helper thread is a daemon: if the call never returns it is abandoned, not
    joined.  Raises :class:`DeadlineExceeded` on timeout, or what ``func`` raised.
    """
    box: dict[str, Any] = {}
    done = threading.Event()

    def run() -> None:
        try:
            box["value"] = func(*args)
        except BaseException as exc:  # handed back to the waiting thread
            box["error"] = exc
        finally:
            done.set()

    threading.Thread(target=run, name="smtpnotify-resolver", daemon=True).start()
    if not done.wait(deadline.remaining()):
        raise DeadlineExceeded(f"deadline of {deadline.seconds:g} s passed")
    if "error" in box:
        raise box["error"]
    value: T = box["value"]
    return value
