"""`ConnectionPool`: the SMTP connections one :class:`~smtpnotify.Notifier` shares.

At most ``max_connections`` sessions exist at once, each used by one thread at a
time.  :meth:`ConnectionPool.send` spreads messages over as many connections as
are free (up to the number asked for), one thread per connection, each sending
its share pipelined (:meth:`SMTPSession.send_batch`); outcomes come back to the
calling thread in the order they settle.

Between calls a connection waits in the pool, idle, for the next one.  Before an
idle connection carries a message it is checked: one idle longer than
``max_idle`` seconds, or one on which anything arrived while it idled (the server
closed it after its idle timeout, or said ``421``), is replaced by a new one.  A
server may still close it just as the next message goes out; when the first
message then meets a drop or a ``421`` before any of its commands was answered,
it is sent again on a new connection — never once its final ``.`` was written,
so no message is lost or sent twice.

After ``max_messages_per_connection`` messages a connection is closed (QUIT) and
the next message opens a new one.  A shared :class:`RateLimiter` paces message
starts over all connections (``max_messages_per_second``).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TypeVar

from ._errors import ConnectError, SMTPNotifyError
from ._prepared import PreparedMessage
from ._ratelimit import RateLimiter
from ._smtp import Outcome, SMTPSession

__all__ = ["ConnectionPool"]

log = logging.getLogger("smtpnotify.pool")

T = TypeVar("T")

MAX_IDLE_SECONDS = 30.0
"""An idle connection older than this is replaced rather than reused."""

QUIT_SECONDS = 1.0
"""What QUIT may take when :meth:`ConnectionPool.close` closes an idle connection."""

Report = Callable[[T, Outcome | None], None]


@dataclass(eq=False)
class _Slot:
    """The right to one connection: held by one thread, with its session (if open)."""

    session: SMTPSession | None = None
    reused: bool = False  # the session idled in the pool since it last carried a message
    idle_since: float = 0.0


class _Done:
    """End-of-lane marker on the event queue (with what the lane raised, if anything)."""

    __slots__ = ("error",)

    def __init__(self, error: BaseException | None) -> None:
        self.error = error


class ConnectionPool:
    """Up to ``max_connections`` SMTP sessions, shared by the threads of one notifier.

    Args:
        factory: makes a new, unopened :class:`SMTPSession`.  It must not hold the
            notifier (the pool outlives nothing it does not own).
        max_connections: the most sessions open (or opening) at once.
        max_messages_per_connection: close a session (QUIT) after this many
            messages; ``None``: no limit.
        limiter: paces message starts over all the sessions; ``None``: no pacing.
        max_idle: seconds a session may idle and still be reused.
        clock: monotonic seconds, for the idle ages.
    """

    def __init__(
        self,
        factory: Callable[[], SMTPSession],
        *,
        max_connections: int = 1,
        max_messages_per_connection: int | None = None,
        limiter: RateLimiter | None = None,
        max_idle: float = MAX_IDLE_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_connections < 1:
            raise ValueError("max_connections must be at least 1")
        if max_messages_per_connection is not None and max_messages_per_connection < 1:
            raise ValueError("max_messages_per_connection must be at least 1")
        self.factory = factory
        self.max_connections = max_connections
        self.max_messages_per_connection = max_messages_per_connection
        self.limiter = limiter
        self.max_idle = max_idle
        self.clock = clock
        self._cond = threading.Condition()
        self._idle: list[_Slot] = []  # the most recently used last
        self._taken = 0  # slots held by threads or idle: never above max_connections
        self._closed = False

    def __repr__(self) -> str:
        with self._cond:
            return (
                f"ConnectionPool(max_connections={self.max_connections}, "
                f"open={self._taken}, idle={len(self._idle)})"
            )

    @property
    def idle(self) -> int:
        """How many connections wait in the pool."""
        with self._cond:
            return len(self._idle)

    # -- sending ---------------------------------------------------------------------
    def send(
        self,
        items: Sequence[T],
        message_of: Callable[[T], PreparedMessage | None],
        report: Report[T],
    ) -> None:
        """Send ``items`` over up to ``max_connections`` connections in parallel.

        The items are split, in order, into one contiguous share per connection
        obtained: the first is waited for, more are used only when free now.
        ``message_of(item)`` is called (in a sending thread) just before the item
        would be sent; ``None`` means "skip it".  ``report(item, outcome)`` is
        called in the calling thread exactly once per item, as each settles: the
        :class:`SendResult` or error, or ``None`` for a skipped item.  When a
        connection cannot be opened, that error is the outcome of every item of
        its share still to send.  If ``report`` raises, the other connections stop
        taking items (those get no report) and the exception propagates.
        """
        if not items:
            return
        slots = self._lease(min(len(items), self.max_connections))
        shares = _split(items, len(slots))
        if len(slots) == 1:
            self._lane(slots[0], shares[0], message_of, report, threading.Event())
            return
        events: queue.SimpleQueue[tuple[T, Outcome | None] | _Done] = queue.SimpleQueue()
        abort = threading.Event()

        def lane(slot: _Slot, share: Sequence[T]) -> None:
            error: BaseException | None = None
            try:
                self._lane(slot, share, message_of, lambda i, o: events.put((i, o)), abort)
            except BaseException as exc:  # handed to the calling thread
                error = exc
            finally:
                events.put(_Done(error))

        threads = [
            threading.Thread(
                target=lane, args=(slot, share), name="smtpnotify-sender", daemon=True
            )
            for slot, share in zip(slots, shares, strict=True)
        ]
        for thread in threads:
            thread.start()
        failure: BaseException | None = None
        running = len(threads)
        try:
            while running:
                event = events.get()
                if isinstance(event, _Done):
                    running -= 1
                    if failure is None:
                        failure = event.error
                elif not abort.is_set():
                    report(*event)
        finally:
            abort.set()  # if report() raised: the lanes take no more items
            for thread in threads:
                thread.join()
        if failure is not None:
            raise failure

    def _lane(
        self,
        slot: _Slot,
        items: Sequence[T],
        message_of: Callable[[T], PreparedMessage | None],
        report: Report[T],
        abort: threading.Event,
    ) -> None:
        """Send ``items`` over the connection of ``slot``, reconnecting as needed."""
        pending: deque[tuple[T, PreparedMessage]] = deque()  # taken, to be sent again
        source = iter(items)

        def next_item() -> tuple[T, PreparedMessage] | None:
            if pending:
                return pending.popleft()
            for item in source:
                if abort.is_set():
                    return None
                message = message_of(item)
                if message is None:
                    report(item, None)
                    continue
                return item, message
            return None

        try:
            while (head := next_item()) is not None:
                pending.appendleft(head)
                try:
                    session = self._ready(slot)
                except SMTPNotifyError as exc:
                    while (rest := next_item()) is not None:
                        report(rest[0], exc)
                    return
                unsent, count = self._round(session, slot.reused, next_item, report)
                if unsent and len(unsent) == count and not slot.reused:
                    # Never happens by send_batch's contract; never loop on it either.
                    item, _ = unsent.pop(0)
                    report(item, ConnectError("the connection failed", phase="send"))
                pending.extendleft(reversed(unsent))
                if unsent:
                    log.debug("%d message(s) go again on a new connection", len(unsent))
                slot.reused = False
        finally:
            self._release(slot)

    def _round(
        self,
        session: SMTPSession,
        reused: bool,
        next_item: Callable[[], tuple[T, PreparedMessage] | None],
        report: Report[T],
    ) -> tuple[list[tuple[T, PreparedMessage]], int]:
        """One ``send_batch`` on ``session``, as many items as it has room for.

        Returns the items to send again elsewhere, and how many were taken.
        """
        taken: list[tuple[T, PreparedMessage]] = []
        room = self._room(session)

        def messages() -> Iterator[PreparedMessage]:
            while room is None or len(taken) < room:
                nxt = next_item()
                if nxt is None:
                    return
                taken.append(nxt)
                yield nxt[1]

        results = session.send_batch(
            messages(),
            limiter=self.limiter,
            on_result=lambda position, outcome: report(taken[position][0], outcome),
            retry_stale=reused,
        )
        return [taken[p] for p, outcome in enumerate(results) if outcome is None], len(results)

    def _room(self, session: SMTPSession) -> int | None:
        limit = self.max_messages_per_connection
        return None if limit is None else max(0, limit - session.transactions)

    def _spent(self, session: SMTPSession) -> bool:
        room = self._room(session)
        return room is not None and room <= 0

    # -- slots and sessions ----------------------------------------------------------
    def _lease(self, want: int) -> list[_Slot]:
        """Between 1 and ``want`` slots: waits for the first, takes more only if free now."""
        slots: list[_Slot] = []
        with self._cond:
            while not self._idle and self._taken >= self.max_connections:
                self._cond.wait()
            while len(slots) < want:
                if self._idle:
                    slots.append(self._idle.pop())
                elif self._taken < self.max_connections:
                    self._taken += 1
                    slots.append(_Slot())
                else:
                    break
        return slots

    def _ready(self, slot: _Slot) -> SMTPSession:
        """The slot's session, fit for a message: the idle one if still good, else a new one."""
        session = slot.session
        if session is not None:
            if not session.usable or self._spent(session):
                pass
            elif not slot.reused:
                return session
            elif self.clock() - slot.idle_since > self.max_idle:
                log.debug("replacing a connection idle for over %g s", self.max_idle)
            elif not session.quiet():
                log.debug("replacing an idle connection the server closed (or spoke on)")
                session.discard()
            else:
                return session
            session.close()
            slot.session = None
        slot.reused = False
        session = self.factory()
        try:
            session.open()
        except BaseException:
            session.discard()
            raise
        slot.session = session
        return session

    def _release(self, slot: _Slot) -> None:
        session = slot.session
        keep = session is not None and session.usable and not self._spent(session)
        with self._cond:
            if keep and not self._closed:
                slot.reused = True
                slot.idle_since = self.clock()
                self._idle.append(slot)
                self._cond.notify()
                return
        # Closed before the slot is given up: never more than max_connections open.
        slot.session = None
        try:
            if session is not None:
                session.close()
        finally:
            self._give_up(1)

    def _give_up(self, count: int) -> None:
        with self._cond:
            self._taken -= count
            self._cond.notify_all()

    def close(self) -> None:
        """Close the idle connections (QUIT, briefly); the ones in use close when released.

        The pool still works afterwards, but keeps no connection open between calls.
        """
        with self._cond:
            self._closed = True
            idle, self._idle = self._idle, []
        try:
            for slot in idle:
                if slot.session is not None:
                    slot.session.close(quit_timeout=QUIT_SECONDS)
        finally:
            self._give_up(len(idle))

    def discard_idle(self) -> None:
        """Close the idle connections' sockets at once, without QUIT (at garbage collection)."""
        with self._cond:
            idle, self._idle = self._idle, []
        try:
            for slot in idle:
                if slot.session is not None:
                    slot.session.discard()
        finally:
            self._give_up(len(idle))


def _split(items: Sequence[T], parts: int) -> list[Sequence[T]]:
    """``items`` in ``parts`` contiguous shares, as equal as can be, in order."""
    size, extra = divmod(len(items), parts)
    shares: list[Sequence[T]] = []
    start = 0
    for index in range(parts):
        end = start + size + (1 if index < extra else 0)
        shares.append(items[start:end])
        start = end
    return shares

