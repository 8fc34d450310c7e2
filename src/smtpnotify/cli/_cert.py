"""``smtpnotify cert fetch``: read a server's certificate to pin it."""

from __future__ import annotations

import argparse
import json
from typing import Literal

from pydantic import ValidationError

from .._certfetch import fetch_server_certificate
from .._config import MailConfig
from .._errors import ConnectTimeout, SMTPNotifyError, StartTLSNotSupported, TLSError
from .._tls import ServerCertificate
from ._common import EXIT_FAILED, EXIT_OK, CLIError, validation_lines, write
from ._hints import hint_for

__all__ = ["register"]


def register(
    commands: argparse._SubParsersAction[argparse.ArgumentParser],
    common: argparse.ArgumentParser,
) -> None:
    """Add ``cert`` (with ``fetch``) to the command line."""
    parser = commands.add_parser(
        "cert",
        parents=[common],
        help="server certificates: `cert fetch HOST [PORT]` prints one to pin",
        description="Work with server certificates.",
    )
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    fetch = actions.add_parser(
        "fetch",
        parents=[common],
        help="print a server's certificate (PEM) and SHA-256 fingerprint, with a config snippet",
        description=(
            "Connect to HOST (STARTTLS on port 587 by default; --tls ssl or port 465 for "
            "implicit TLS), read the certificate the server presents WITHOUT verifying it, and "
            "print it with its SHA-256 fingerprint and a TOML snippet that pins it.  Compare the "
            "fingerprint with what the server's administrator tells you before you trust it."
        ),
    )
    fetch.add_argument("host", help="the mail server's host name or IP address")
    fetch.add_argument("port", nargs="?", type=int, help="default: 587 (starttls) or 465 (ssl)")
    fetch.add_argument(
        "--tls",
        choices=["starttls", "ssl"],
        help="how TLS starts: STARTTLS after the greeting, or implicit TLS "
        "(default: ssl for port 465, starttls otherwise)",
    )
    fetch.add_argument(
        "--timeout",
        type=float,
        default=10.0,
        metavar="SECONDS",
        help="connect deadline (default 10)",
    )
    fetch.add_argument(
        "--pem-only", action="store_true", help="print only the PEM (to redirect into a file)"
    )
    fetch.set_defaults(func=run_fetch)


def _details(cert: ServerCertificate) -> list[str]:
    """Subject, issuer, validity and names, when the ``cryptography`` package is there."""
    try:
        from cryptography import x509
    except ImportError:
        return []
    try:
        parsed = x509.load_pem_x509_certificate(cert.pem.encode("ascii"))
        lines = [
            f"# subject:  {parsed.subject.rfc4514_string()}",
            f"# issuer:   {parsed.issuer.rfc4514_string()}",
            f"# valid:    {parsed.not_valid_before_utc:%Y-%m-%d} to "
            f"{parsed.not_valid_after_utc:%Y-%m-%d}",
        ]
        try:
            names = parsed.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
            shown = [str(n.value) for n in names]
            lines.append(f"# names:    {', '.join(shown)}")
        except x509.ExtensionNotFound:
            pass
        return lines
    except ValueError:
        return []


def _hint(error: SMTPNotifyError, config: MailConfig) -> str | None:
    """What to try instead, in terms of this command's options."""
    port = config.effective_port
    if isinstance(error, StartTLSNotSupported):
        return "the server does not offer STARTTLS here: try --tls ssl (usually port 465)"
    if isinstance(error, TLSError) and config.tls == "ssl":
        return "the server did not start TLS at once: try --tls starttls (usually port 587 or 25)"
    if isinstance(error, ConnectTimeout) and config.tls == "starttls" and port == 465:
        return "port 465 expects TLS from the first byte: try --tls ssl"
    return hint_for(error, config)


def run_fetch(args: argparse.Namespace) -> int:
    """Fetch the certificate and print it, its fingerprint and a pinned-config snippet."""
    port: int | None = args.port
    tls: Literal["starttls", "ssl"] = args.tls or ("ssl" if port == 465 else "starttls")
    if port is not None and not 1 <= port <= 65535:
        raise CLIError(f"port {port} is out of range (1-65535)")
    try:
        cert = fetch_server_certificate(args.host, port, tls, timeout=args.timeout)
    except ValidationError as exc:
        raise CLIError(*validation_lines(exc, "cert fetch")) from None
    except SMTPNotifyError as exc:
        config = MailConfig(
            host=args.host, port=port, tls=tls, sender="certificate-check@example.invalid"
        )
        write(f"smtpnotify: cert fetch failed: {type(exc).__name__}: {exc}", stream="stderr")
        hint = _hint(exc, config)
        if hint:
            write(f"  what to change: {hint}", stream="stderr")
        return EXIT_FAILED
    if args.pem_only:
        write(cert.pem.rstrip("\n"))
        return EXIT_OK
    effective_port = port or (465 if tls == "ssl" else 587)
    colons = ":".join(cert.sha256[i : i + 2] for i in range(0, 64, 2)).upper()
    write(
        f"# The certificate {args.host}:{effective_port} presents ({tls}), NOT verified.",
        "# Compare the fingerprint with what the server's administrator tells you.",
        *_details(cert),
        f"# SHA-256:  {colons}",
        "",
        f"SHA-256 fingerprint: {cert.sha256}",
        "",
        cert.pem.rstrip("\n"),
        "",
        "# Pin it in mail.toml (trust only this certificate; hostname and expiry not checked):",
        f"host = {json.dumps(args.host)}",
        f"port = {effective_port}",
        f'tls = "{tls}"',
        'trust = "pinned"',
        f'pinned_fingerprints = ["{cert.sha256}"]',
        "# To rotate without downtime, list the old and the new fingerprint together.",
    )
    return EXIT_OK
