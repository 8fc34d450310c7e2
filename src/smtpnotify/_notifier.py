"""The :class:`Notifier`: what an application holds to send and queue notifications."""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import uuid
import warnings
import weakref
from collections.abc import Callable, Iterable, Sequence
from datetime import UTC, datetime, timedelta
from email.message import EmailMessage
from functools import partial
from types import TracebackType
from typing import Any

from ._config import MailConfig
from ._delivery import apply_outcome
from ._errors import InsecureTrustWarning, SMTPNotifyError
from ._message import Notification, prepare
from ._pool import ConnectionPool
from ._prepared import PreparedMessage
from ._ratelimit import RateLimiter
from ._results import DeliveryReport, SendResult, VerifyReport, VerifyStep
from ._retry import RetrySchedule
from ._smtp import Outcome, SMTPSession
from ._tls import TLSPlan, plan_tls
from ._worker import Worker
from .outbox._base import Outbox, OutboxEntry, OutboxStatus

__all__ = ["Clock", "Message", "Notifier"]

log = logging.getLogger("smtpnotify")

Message = Notification | EmailMessage
Clock = Callable[[], datetime]
EntryHook = Callable[[OutboxEntry], None]


def _utcnow() -> datetime:
    return datetime.now(UTC)


class Notifier:
    """Sends notifications now (:meth:`send`) or through a durable outbox (:meth:`notify`).

    >>> notifier = Notifier(MailConfig(sender="noreply@example.com"))    # doctest: +SKIP
    >>> notifier.send(Notification(to="ops@example.com", subject="Hi", text="…"))
    >>> notifier.notify(Notification(...))      # queued; returns the outbox id
    >>> notifier.start()                        # a worker thread delivers the queue

    Args:
        config: the mail settings.
        outbox: where :meth:`notify` queues messages.  ``None`` gives a
            :class:`~smtpnotify.MemoryOutbox`, which is **not durable**: what it
            holds is lost with the process.  Use :class:`~smtpnotify.SQLiteOutbox`
            (or :class:`~smtpnotify.PostgresOutbox`) for mail that must not be lost.
        clock: returns the current time as an aware UTC ``datetime``; the retry
            and expiration logic reads time only through it.
        lease: how long a worker holds a claimed message before another worker
            may take it.  Default: connect deadline + ``batch_size`` × send
            deadline + 60 s (+ ``batch_size`` / ``max_messages_per_second`` when
            the rate is limited), so a live worker never loses a lease mid-send.
        batch_size: messages claimed at once by one delivery pass (and spread
            over up to ``config.max_connections`` connections).
        poll_interval: how often (seconds) an idle worker looks for messages that
            other processes queued, when the outbox cannot signal it.
        on_sent: called with the entry after it was sent (from the delivering
            thread).  Exceptions the hooks raise are logged.
        on_failed: called with the entry after it failed for good; use it to
            alert someone that a notification could not be delivered.
        on_expired: called with the entry after its expiration passed unsent.

    One ``Notifier`` is safe to use from many threads at once.  Its connections
    are pooled: at most ``config.max_connections`` are open at once, shared by
    :meth:`send`, :meth:`send_many` and the worker; an idle one is reused by the
    next call and closed by :meth:`close`.
    """

    def __init__(
        self,
        config: MailConfig,
        outbox: Outbox | None = None,
        *,
        clock: Clock | None = None,
        lease: timedelta | None = None,
        batch_size: int = 10,
        poll_interval: float = 1.0,
        on_sent: EntryHook | None = None,
        on_failed: EntryHook | None = None,
        on_expired: EntryHook | None = None,
    ) -> None:
        if not isinstance(config, MailConfig):
            raise TypeError(f"config must be a MailConfig, not {type(config).__name__}")
        if batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        if poll_interval <= 0:
            raise ValueError("poll_interval must be positive")
        self.config = config
        self._owns_outbox = outbox is None
        if outbox is None:
            from .outbox.memory import MemoryOutbox

            outbox = MemoryOutbox()
        self.outbox: Outbox = outbox
        self._clock: Clock = clock or _utcnow
        self._plan: TLSPlan | None = plan_tls(config) if config.tls != "none" else None
        self.schedule = RetrySchedule.from_config(config)
        self.batch_size = batch_size
        self.poll_interval = poll_interval
        rate = config.max_messages_per_second
        self.lease = lease or timedelta(
            seconds=config.effective_connect_timeout
            + batch_size * config.effective_send_timeout
            + (batch_size / rate if rate else 0)
            + 60
        )
        # The factory holds the config and plan, never the notifier: the finalizer
        # below must be able to run when the notifier is garbage.
        self._pool = ConnectionPool(
            partial(SMTPSession, config, self._plan or TLSPlan((), ())),
            max_connections=config.max_connections,
            max_messages_per_connection=config.max_messages_per_connection,
            limiter=RateLimiter(rate) if rate else None,
        )
        # A notifier dropped without close(): its idle connections' sockets are closed.
        weakref.finalize(self, self._pool.discard_idle)
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:12]}"
        self.on_sent, self.on_failed, self.on_expired = on_sent, on_failed, on_expired
        self._worker: Worker | None = None
        self._worker_lock = threading.Lock()
        self._pass_lock = threading.RLock()  # a hook may call deliver_due()
        self._stopping = threading.Event()
        self._wakeup = threading.Event()
        self._subscribed = False
        self._closed = False
        if config.tls != "none" and config.trust == "all":
            warnings.warn(
                f"trust='all': the certificate of {config.host} is not verified; anyone on the "
                "path can read the mail and the credentials. Use trust='verify' or 'pinned'.",
                InsecureTrustWarning,
                stacklevel=2,
            )

    def __repr__(self) -> str:
        return f"Notifier({self.config!r}, outbox={type(self.outbox).__name__})"

    # -- time and messages ---------------------------------------------------------
    def now(self) -> datetime:
        """The notifier's idea of now (its clock), an aware UTC ``datetime``."""
        now = self._clock()
        if now.tzinfo is None:
            raise ValueError("the clock must return an aware datetime (UTC)")
        return now.astimezone(UTC)

    def prepare(self, message: Message, *, message_id: str | None = None) -> PreparedMessage:
        """Validate ``message`` and render it for the wire (raises :class:`InvalidMessage`)."""
        return prepare(
            message,
            sender=self.config.sender,
            message_id=message_id,
            now=self.now(),
            local_hostname=self.config.local_hostname,
        )

    def _session(self) -> SMTPSession:
        return SMTPSession(self.config, self._plan or TLSPlan((), ()))

    # -- sending now ----------------------------------------------------------------
    def send(self, message: Message) -> SendResult:
        """Send one message now; raise on failure.

        It goes over an idle pooled connection when there is one (else a new
        one, kept open for the next call; :meth:`close` closes it).  Takes at
        most ``connect_timeout + send_timeout``, once a connection is free (with
        ``max_connections`` in use by other threads, it waits for one).  Refused
        recipients are in the result's ``refused`` as long as one recipient
        accepted; when all are refused, :class:`~smtpnotify.RecipientsRefused`
        is raised.
        """
        prepared = self.prepare(message)
        return self.send_prepared(prepared)

    def send_prepared(self, prepared: PreparedMessage) -> SendResult:
        """Send an already prepared message now (what :meth:`send` does after :meth:`prepare`)."""
        outcomes: list[Outcome | None] = [None]

        def record(_: int, outcome: Outcome | None) -> None:
            outcomes[0] = outcome

        self._pool.send([0], lambda _: prepared, record)
        [outcome] = outcomes
        if isinstance(outcome, SMTPNotifyError):
            raise outcome
        assert outcome is not None
        return outcome

    def send_many(self, messages: Iterable[Message]) -> list[SendResult | SMTPNotifyError]:
        """Send several messages now over pooled connections; never raises for one message.

        Each item of the result is the :class:`SendResult` or the error for the
        message at the same position.  The messages are split, in order, over up
        to ``config.max_connections`` connections in parallel (as many as are
        free), and pipelined on each when the server offers PIPELINING.  A
        connection the server closes (or that reaches
        ``max_messages_per_connection``) is replaced; if reopening fails, the
        rest of its messages get that error.  Takes at most connect + N × send
        deadlines per connection opened, N its messages.
        """
        results: list[SendResult | SMTPNotifyError | None] = []
        prepared: list[PreparedMessage | None] = []
        for message in messages:
            try:
                prepared.append(self.prepare(message))
                results.append(None)
            except SMTPNotifyError as exc:
                prepared.append(None)
                results.append(exc)

        def record(index: int, outcome: Outcome | None) -> None:
            results[index] = outcome

        todo = [index for index, item in enumerate(prepared) if item is not None]
        self._pool.send(todo, prepared.__getitem__, record)
        return [r for r in results if r is not None]

    def verify(self) -> VerifyReport:
        """Check the settings step by step, as a settings page's "Save" would; sends no message.

        Never raises for a server problem: the report says which step failed and why.
        """
        steps: list[VerifyStep] = []
        session = self._session()
        error: SMTPNotifyError | None = None
        try:
            session.open(on_step=steps.append)
        except SMTPNotifyError as exc:
            error = exc
        finally:
            session.close()
        return VerifyReport(
            ok=error is None,
            steps=tuple(steps),
            tls_version=session.tls_version,
            cipher=session.cipher,
            peer_certificate_sha256=session.peer_sha256,
            extensions=dict(session.features),
            error=error,
        )

    # -- the outbox -------------------------------------------------------------------
    def notify(self, message: Message, *, connection: Any = None) -> str:
        """Queue ``message`` durably and return its outbox id.

        Returns only once the outbox holds it (for a durable outbox: on disk).
        ``connection`` is an application's open database connection: the message
        is queued inside that connection's transaction (outboxes that cannot do
        this raise ``TypeError``).  An invalid message raises
        :class:`~smtpnotify.InvalidMessage` and nothing is queued.
        """
        prepared = self.prepare(message)
        now = self.now()
        entry_id = self.outbox.add(
            prepared, now=now, expires_at=now + self.config.expiration, connection=connection
        )
        log.info(
            "queued %s as outbox %s for %d recipient(s)",
            prepared.message_id,
            entry_id,
            len(prepared.recipients),
            extra={
                "smtpnotify_event": "queued",
                "outbox_id": entry_id,
                "message_id": prepared.message_id,
            },
        )
        return entry_id

    def deliver_due(self) -> DeliveryReport:
        """One pass over the messages due now: expire, claim, send, record.

        Messages are claimed ``batch_size`` at a time under a lease; a batch is
        spread over up to ``config.max_connections`` pooled connections (one with
        the default).  A message that failed in this pass is not tried again in
        the same pass.  The hooks (``on_sent``…) of a batch run once its
        messages are all settled and its connections are back in the pool.
        """
        report = DeliveryReport()
        with self._pass_lock:
            for entry in self.outbox.expire_due(now=self.now()):
                report.expired += 1
                self._hook(self.on_expired, entry)
            seen: set[str] = set()
            while not self._stopping.is_set():
                batch = self.outbox.claim(
                    now=self.now(), owner=self.owner, lease=self.lease, limit=self.batch_size
                )
                if not batch:
                    break
                fresh = [e for e in batch if e.id not in seen]
                for entry in batch:
                    if entry.id in seen:
                        self.outbox.release(entry.id, owner=self.owner, now=self.now())
                if not fresh:
                    break
                seen.update(e.id for e in fresh)
                report += self._deliver_batch(fresh)
        return report

    def _deliver_batch(self, batch: Sequence[OutboxEntry]) -> DeliveryReport:
        """Send a claimed batch over the pool and record each outcome as it settles.

        Outcomes are recorded in this thread, one by one as the messages settle;
        the application's hooks run after the whole batch, once its connections
        are back in the pool (a hook may send mail itself).
        """
        report = DeliveryReport()
        hooks: list[tuple[EntryHook | None, OutboxEntry]] = []

        started: set[str] = set()

        def message_of(entry: OutboxEntry) -> PreparedMessage | None:
            # Asked just before the entry would go out: not once stop() was called,
            # and never at or after its expiry.
            started.add(entry.id)
            if self._stopping.is_set() or self.now() >= entry.expires_at:
                return None
            return entry.message

        def record(entry: OutboxEntry, outcome: Outcome | None) -> None:
            now = self.now()
            if outcome is None:
                # Never attempted: give back the claim (and the attempt it counted);
                # if it is due to expire, expire it, keeping the last error it really
                # ran into.
                self.outbox.release(entry.id, owner=self.owner, now=now)
                if now >= entry.expires_at and self.outbox.record_expired(
                    entry.id, owner=None, now=now
                ):
                    report.expired += 1
                    hooks.append((self.on_expired, entry))
                return
            result = outcome if isinstance(outcome, SendResult) else None
            error = outcome if isinstance(outcome, SMTPNotifyError) else None
            applied = apply_outcome(
                self.outbox, entry, owner=self.owner, now=now, schedule=self.schedule,
                result=result, error=error,
            )
            if not applied.recorded:
                return
            if applied.status is OutboxStatus.SENT:
                report.sent += 1
                hooks.append((self.on_sent, entry))
            elif applied.status is OutboxStatus.PENDING:
                report.retried += 1
            elif applied.status is OutboxStatus.FAILED:
                report.failed += 1
                hooks.append((self.on_failed, entry))
            else:
                report.expired += 1
                hooks.append((self.on_expired, entry))

        try:
            self._pool.send(batch, message_of, record)
        except BaseException:
            # The pass broke (the database went away, say): give back at once what was
            # never started, instead of leaving it to wait out the lease.  Best effort.
            for entry in batch:
                if entry.id not in started:
                    with contextlib.suppress(Exception):
                        self.outbox.release(entry.id, owner=self.owner, now=self.now())
            raise
        finally:
            for hook, entry in hooks:
                self._hook(hook, entry, reload=True)
        return report

    def _hook(self, hook: EntryHook | None, entry: OutboxEntry, *, reload: bool = False) -> None:
        if hook is None:
            return
        if reload:  # the entry as recorded: read back only when a hook wants it
            entry = self.outbox.get(entry.id) or entry
        try:
            hook(entry)
        except Exception:
            log.exception("the application's hook %r raised for outbox %s", hook, entry.id)

    # -- the worker ---------------------------------------------------------------------
    def start(self) -> None:
        """Start the background delivery thread (idempotent).

        It wakes when :meth:`notify` queues a message, when the next message is
        due, and at least every ``poll_interval`` seconds.
        """
        with self._worker_lock:
            if self._closed:
                raise RuntimeError("the notifier is closed")
            if self._worker is not None and self._worker.is_alive():
                if self._stopping.is_set():
                    raise RuntimeError("the previous worker is still stopping; call stop() again")
                return
            if not self._subscribed:
                # Once per notifier: the wake-up event outlives each worker thread.
                self.outbox.subscribe(self._wakeup.set)
                self._subscribed = True
            self._stopping.clear()
            self._worker = Worker(self, self._wakeup)
            self._worker.start()

    def stop(self, timeout: float | None = None) -> None:
        """Stop the worker: the message being sent is finished, the rest it holds released."""
        with self._worker_lock:
            worker = self._worker
            if worker is None:
                return
            self._stopping.set()
            self._wakeup.set()
            worker.join(timeout)
            if worker.is_alive():
                log.warning("the delivery worker did not stop within %s s", timeout)
                return  # still ours: start() refuses to run a second one beside it
            self._worker = None
            self._stopping.clear()  # deliver_due() works again after stop()

    def close(self) -> None:
        """Stop the worker, close the pooled connections (QUIT) and the outbox the
        notifier created itself (not one you passed)."""
        self.stop()
        self._pool.close()
        with self._worker_lock:
            if self._closed:
                return
            self._closed = True
        if self._owns_outbox:
            self.outbox.close()

    def __enter__(self) -> Notifier:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def counts(self) -> dict[OutboxStatus, int]:
        """The outbox's count of entries per status."""
        return self.outbox.counts()

