"""``smtpnotify check``: the settings page's "Save → confirmation message", step by step."""

from __future__ import annotations

import argparse

from .._config import MailConfig
from .._notifier import Notifier
from .._results import VerifyReport
from ._common import EXIT_FAILED, EXIT_OK, add_config_options, load_config, write
from ._hints import hint_for

__all__ = ["register"]


def register(
    commands: argparse._SubParsersAction[argparse.ArgumentParser],
    common: argparse.ArgumentParser,
) -> None:
    """Add ``check`` to the command line."""
    parser = commands.add_parser(
        "check",
        parents=[common],
        help="check mail settings against the server, step by step (sends no message)",
        description=(
            "Connect to the configured server and go through every step a delivery would: "
            "TCP connect, TLS, greeting, EHLO, STARTTLS, AUTH.  No message is sent.  "
            "Exit status: 0 the settings work, 1 a step failed, 2 the settings are invalid."
        ),
    )
    add_config_options(parser)
    parser.set_defaults(func=run)


def describe_target(config: MailConfig) -> str:
    """``smtp.example.com:587, tls=starttls, trust=verify, AUTH as app``."""
    parts = [f"{config.host}:{config.effective_port}", f"tls={config.tls}"]
    if config.tls != "none":
        parts.append(f"trust={config.trust}")
    parts.append(f"AUTH as {config.username}" if config.username is not None else "no AUTH")
    return ", ".join(parts)


def render(report: VerifyReport, config: MailConfig) -> list[str]:
    """The report as lines: each step with its time, TLS details, then the verdict and a hint."""
    lines = []
    for step in report.steps:
        mark = "ok  " if step.ok else "FAIL"
        detail = f"  {step.detail}" if step.detail else ""
        lines.append(f"  [{mark}] {step.name:<9} {step.seconds * 1000:8.1f} ms{detail}")
    if report.tls_version:
        lines.append(f"  TLS:        {report.tls_version}, {report.cipher}")
    if report.peer_certificate_sha256:
        lines.append(f"  server certificate SHA-256: {report.peer_certificate_sha256}")
    if report.extensions:
        lines.append("  extensions: " + ", ".join(sorted(report.extensions)))
    if report.ok:
        lines.append("OK: the server accepts these settings (no message was sent).")
        return lines
    failed = next((step for step in reversed(report.steps) if not step.ok), None)
    step_name = failed.name if failed is not None else None
    error = report.error
    what = f"{type(error).__name__}: {error}" if error is not None else "unknown error"
    where = f"at step {step_name!r}" if step_name else "before the first step"
    lines.append(f"FAILED {where}: {what}")
    hint = hint_for(error, config, step_name) if error is not None else None
    if hint:
        lines.append(f"  what to change: {hint}")
    return lines


def run(args: argparse.Namespace) -> int:
    """Verify the settings; print the report; exit 0 when every step passed, else 1."""
    config = load_config(args)
    deadline = config.effective_connect_timeout
    write(f"Checking {describe_target(config)} (connect deadline {deadline:g} s)")
    with Notifier(config) as notifier:
        report = notifier.verify()
    write(*render(report, config))
    return EXIT_OK if report.ok else EXIT_FAILED
