"""What happens to a claimed outbox entry after an attempt: the outbox state machine.

One attempt ends in exactly one of:

* **sent** — every recipient accepted it or refused it permanently (5xx);
* **retry** — a transient error (or some recipients refused with 4xx): back to
  ``pending`` after the retry interval, with only the recipients still owed;
* **failed** — a permanent error: never tried again;
* **expired** — the next attempt would fall at or after ``created_at + expiration``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

from ._errors import RecipientsRefused, ResponseError, SMTPNotifyError
from ._results import SendResult
from ._retry import RetrySchedule
from .outbox._base import Outbox, OutboxEntry, OutboxStatus

__all__ = ["Outcome", "apply_outcome", "describe_error"]

log = logging.getLogger("smtpnotify.outbox")

Refusals = dict[str, tuple[int, str]]


@dataclass(frozen=True, slots=True)
class Outcome:
    """What was recorded for an entry, for the report and the application's hooks."""

    status: OutboxStatus
    recorded: bool
    """``False`` when the lease had been lost and another worker owns the entry now."""


def describe_error(error: SMTPNotifyError) -> str:
    """The one line stored as ``last_error`` (never holds a secret: errors don't)."""
    text = f"{type(error).__name__}: {error}"
    if error.ambiguous:
        text += " [ambiguous: the server may have accepted it]"
    return text


def _split(refused: Refusals) -> tuple[tuple[str, ...], Refusals]:
    """4xx-refused recipients (to retry) and 5xx-refused ones (final)."""
    transient = tuple(r for r, (code, _) in refused.items() if 400 <= code < 500)
    permanent = {r: v for r, v in refused.items() if not 400 <= v[0] < 500}
    return transient, permanent


def apply_outcome(
    outbox: Outbox,
    entry: OutboxEntry,
    *,
    owner: str,
    now: datetime,
    schedule: RetrySchedule,
    result: SendResult | None = None,
    error: SMTPNotifyError | None = None,
) -> Outcome:
    """Record the result of one attempt at ``entry`` (exactly one of ``result``/``error``)."""
    accepted: tuple[str, ...] = ()
    permanent: Refusals = {}
    if result is not None:
        accepted = result.accepted
        retry_rcpts, permanent = _split(result.refused)
        if not retry_rcpts:
            ok = outbox.record_sent(
                entry.id, owner=owner, now=now, accepted=accepted, refused=permanent
            )
            _log(
                entry,
                OutboxStatus.SENT,
                ok,
                f"accepted by {len(accepted)}, refused {len(permanent)}",
            )
            return Outcome(OutboxStatus.SENT, ok)
        reason = "; ".join(
            f"{r}: {c} {t}" for r, (c, t) in result.refused.items() if r in retry_rcpts
        )
        message = f"recipients deferred (4xx): {reason}"
    else:
        assert error is not None
        message = describe_error(error)
        retry_rcpts = entry.message.recipients
        if isinstance(error, RecipientsRefused):
            retry_rcpts, permanent = _split(error.refused)
        elif not error.transient:
            # A permanent error for the whole message (5xx at MAIL or DATA) refuses
            # every recipient still owed it.
            code = error.code if isinstance(error, ResponseError) else 550
            permanent = {r: (code, message) for r in retry_rcpts}
            retry_rcpts = ()
        if not retry_rcpts and entry.accepted:
            # Delivered to some recipients on an earlier attempt, and the rest have
            # now refused it for good: every recipient is settled, and it was sent.
            ok = outbox.record_sent(entry.id, owner=owner, now=now, accepted=(), refused=permanent)
            _log(entry, OutboxStatus.SENT, ok, f"the other {len(permanent)} refused for good")
            return Outcome(OutboxStatus.SENT, ok)
        if not error.transient or not retry_rcpts:
            ok = outbox.record_failed(
                entry.id, owner=owner, now=now, error=message, refused=permanent
            )
            _log(entry, OutboxStatus.FAILED, ok, message)
            return Outcome(OutboxStatus.FAILED, ok)
    when = schedule.next_attempt(now=now, attempts=entry.attempts, expires_at=entry.expires_at)
    if when is None:
        if accepted or permanent or retry_rcpts != entry.message.recipients:
            # record_expired carries no recipients: first record what this attempt
            # settled (who accepted, who refused for good, who is still owed), parked
            # where no claim can reach it (due at its expiry), then expire it.
            ok = outbox.record_retry(
                entry.id,
                owner=owner,
                now=now,
                next_attempt_at=entry.expires_at,
                error=message,
                accepted=accepted,
                refused=permanent,
                remaining=retry_rcpts,
            ) and outbox.record_expired(entry.id, owner=None, now=now, error=message)
        else:
            ok = outbox.record_expired(entry.id, owner=owner, now=now, error=message)
        _log(entry, OutboxStatus.EXPIRED, ok, message)
        return Outcome(OutboxStatus.EXPIRED, ok)
    ok = outbox.record_retry(
        entry.id,
        owner=owner,
        now=now,
        next_attempt_at=when,
        error=message,
        accepted=accepted,
        refused=permanent,
        remaining=retry_rcpts,
    )
    _log(entry, OutboxStatus.PENDING, ok, f"{message}; next attempt at {when.isoformat()}")
    return Outcome(OutboxStatus.PENDING, ok)


def _log(entry: OutboxEntry, status: OutboxStatus, recorded: bool, detail: str) -> None:
    extra = {
        "smtpnotify_event": str(status),
        "outbox_id": entry.id,
        "message_id": entry.message.message_id,
        "attempts": entry.attempts,
    }
    if not recorded:
        log.warning(
            "outbox %s: lease lost before the outcome (%s) could be recorded",
            entry.id,
            status,
            extra=extra,
        )
        return
    level = (
        logging.WARNING if status in (OutboxStatus.FAILED, OutboxStatus.EXPIRED) else logging.INFO
    )
    log.log(
        level,
        "outbox %s -> %s after %d attempt(s): %s",
        entry.id,
        status,
        entry.attempts,
        detail,
        extra=extra,
    )


Hook = Callable[[OutboxEntry], None]
