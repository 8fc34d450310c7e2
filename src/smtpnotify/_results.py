"""What the notifier hands back: send results, delivery and verification reports."""

from __future__ import annotations

from dataclasses import dataclass, field

from ._errors import SMTPNotifyError

__all__ = ["DeliveryReport", "SendResult", "VerifyReport", "VerifyStep"]


@dataclass(frozen=True, slots=True)
class SendResult:
    """The outcome of one message the server took.

    Attributes:
        message_id: the ``Message-ID`` sent.
        accepted: recipients the server accepted.
        refused: recipients the server refused, ``{address: (code, message)}``
            (a message some recipients refused still counts as sent to the rest).
    """

    message_id: str
    accepted: tuple[str, ...]
    refused: dict[str, tuple[int, str]] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class VerifyStep:
    """One step of :meth:`~smtpnotify.Notifier.verify`: its name, outcome and duration."""

    name: str
    ok: bool
    seconds: float
    detail: str = ""


@dataclass(frozen=True, slots=True)
class VerifyReport:
    """The "Save → confirmation message" of a settings page: each step of reaching the server.

    Steps, in order, as far as they got: ``connect`` (DNS and TCP), ``tls``
    (implicit TLS comes before ``greeting``; STARTTLS after ``ehlo``),
    ``greeting``, ``ehlo``, ``auth``.  ``ok`` is true when every step passed.
    No message is ever sent.
    """

    ok: bool
    steps: tuple[VerifyStep, ...]
    tls_version: str | None = None
    cipher: str | None = None
    peer_certificate_sha256: str | None = None
    extensions: dict[str, str] = field(default_factory=dict)
    error: SMTPNotifyError | None = None

    def __str__(self) -> str:
        lines = [f"{'OK' if self.ok else 'FAILED'}: SMTP settings check"]
        for step in self.steps:
            mark = "ok " if step.ok else "FAIL"
            detail = f"  {step.detail}" if step.detail else ""
            lines.append(f"  [{mark}] {step.name:<9} {step.seconds * 1000:8.1f} ms{detail}")
        if self.tls_version:
            lines.append(f"  TLS: {self.tls_version}, {self.cipher}")
        if self.peer_certificate_sha256:
            lines.append(f"  server certificate SHA-256: {self.peer_certificate_sha256}")
        if self.extensions:
            lines.append("  extensions: " + ", ".join(sorted(self.extensions)))
        if self.error is not None:
            lines.append(f"  error: {type(self.error).__name__}: {self.error}")
        return "\n".join(lines)


@dataclass(slots=True)
class DeliveryReport:
    """Counts from one pass over due outbox messages (:meth:`~smtpnotify.Notifier.deliver_due`)."""

    sent: int = 0
    retried: int = 0
    failed: int = 0
    expired: int = 0

    @property
    def total(self) -> int:
        """How many messages the pass touched."""
        return self.sent + self.retried + self.failed + self.expired

    def __iadd__(self, other: DeliveryReport) -> DeliveryReport:
        self.sent += other.sent
        self.retried += other.retried
        self.failed += other.failed
        self.expired += other.expired
        return self
