"""What the commands share: user errors, the mail-settings and outbox options,
durations, time formatting and stopping on SIGINT/SIGTERM."""

from __future__ import annotations

import argparse
import json
import re
import signal
import sys
import threading
import tomllib
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import FrameType, TracebackType
from typing import Literal, NoReturn

from pydantic import TypeAdapter, ValidationError

from .._config import MailConfig
from ..outbox import Outbox, SQLiteOutbox

__all__ = [
    "EXIT_FAILED",
    "EXIT_OK",
    "EXIT_USAGE",
    "CLIError",
    "OutboxURL",
    "Parser",
    "StopSignals",
    "add_config_options",
    "add_outbox_options",
    "format_delta",
    "format_relative",
    "format_time",
    "load_config",
    "open_outbox",
    "parse_duration",
    "parse_outbox_url",
    "redact_dsn",
    "utcnow",
    "validation_lines",
    "write",
]

EXIT_OK = 0
"""Everything worked."""
EXIT_FAILED = 1
"""The command ran, and what it tried failed (a server refused, a check failed)."""
EXIT_USAGE = 2
"""The command could not run as given: a usage error, bad settings, a missing file."""


class CLIError(Exception):
    """A problem the user can fix: printed as one line per entry of ``lines``, no traceback."""

    def __init__(self, *lines: str, status: int = EXIT_USAGE) -> None:
        super().__init__(lines[0] if lines else "error")
        self.lines: tuple[str, ...] = lines
        self.status = status


class Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose usage errors are one line (and ``--help`` says the rest)."""

    def error(self, message: str) -> NoReturn:
        """Print ``message`` as one line on stderr and exit with status 2."""
        self.exit(EXIT_USAGE, f"{self.prog}: {message} (see: {self.prog} --help)\n")


# --------------------------------------------------------------------------- settings


def add_config_options(parser: argparse.ArgumentParser) -> None:
    """``--config FILE`` or ``--env`` (with ``--env-prefix``): where the mail settings come from."""
    group = parser.add_argument_group("mail settings (one of --config or --env)")
    source = group.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "-c",
        "--config",
        metavar="FILE",
        type=Path,
        help="a .toml or .json file with the MailConfig fields (top level or a [smtpnotify] table)",
    )
    source.add_argument(
        "--env",
        action="store_true",
        help="read the settings from environment variables (SMTPNOTIFY_HOST, SMTPNOTIFY_PORT, ...)",
    )
    group.add_argument(
        "--env-prefix",
        default="SMTPNOTIFY_",
        metavar="PREFIX",
        help="prefix of the environment variables for --env (default: SMTPNOTIFY_)",
    )


def validation_lines(
    exc: ValidationError, where: str, names: dict[str, str] | None = None
) -> list[str]:
    """One line per problem of ``exc``: where, the field, the rule.  Never the input."""
    lines = []
    for error in exc.errors(include_url=False, include_input=False, include_context=False):
        loc = [str(part) for part in error["loc"]]
        if loc and names and loc[0] in names:
            loc[0] = names[loc[0]]
        message = error["msg"].removeprefix("Value error, ")
        field = ".".join(loc)
        lines.append(f"{where}: {field}: {message}" if field else f"{where}: {message}")
    return lines


def load_config(args: argparse.Namespace) -> MailConfig:
    """The :class:`MailConfig` from ``--config`` or ``--env``; :class:`CLIError` when it is bad."""
    if args.env:
        prefix: str = args.env_prefix
        names = {name: prefix + name.upper() for name in MailConfig.model_fields}
        try:
            return MailConfig.from_env(prefix)
        except ValidationError as exc:
            raise CLIError(*validation_lines(exc, "environment", names)) from None
        except ValueError as exc:
            raise CLIError(f"environment: {exc}") from None
    path: Path = args.config
    try:
        return MailConfig.from_file(path)
    except ValidationError as exc:
        raise CLIError(*validation_lines(exc, str(path))) from None
    except tomllib.TOMLDecodeError as exc:
        raise CLIError(f"{path}: not valid TOML: {exc}") from None
    except json.JSONDecodeError as exc:
        raise CLIError(f"{path}: not valid JSON: {exc.msg} (line {exc.lineno})") from None
    except UnicodeDecodeError:
        raise CLIError(f"{path}: not UTF-8 text") from None
    except FileNotFoundError:
        raise CLIError(f"{path}: no such config file") from None
    except OSError as exc:
        raise CLIError(f"{path}: cannot read the config file: {exc.strerror or exc}") from None
    except ValueError as exc:  # an unsupported file type
        raise CLIError(f"{path}: {exc}") from None


# --------------------------------------------------------------------------- outboxes


def add_outbox_options(parser: argparse.ArgumentParser, *, suppress: bool = False) -> None:
    """``--outbox URL`` and ``--table``; ``suppress`` leaves them unset when absent.

    (Suppressed defaults let ``smtpnotify outbox --outbox X status`` and
    ``smtpnotify outbox status --outbox X`` both work.)
    """
    default = argparse.SUPPRESS if suppress else None
    parser.add_argument(
        "--outbox",
        metavar="URL",
        default=default,
        help="sqlite:///relative.db, sqlite:////absolute.db, a plain file path (SQLite), "
        "or postgresql://user@host/db",
    )
    parser.add_argument(
        "--table",
        metavar="NAME",
        default=default,
        help="PostgreSQL only: the outbox table (default: smtpnotify_outbox)",
    )


@dataclass(frozen=True, slots=True)
class OutboxURL:
    """Where an outbox lives: an SQLite file or a PostgreSQL database."""

    kind: Literal["sqlite", "postgres"]
    target: str
    """The file path, or the PostgreSQL connection URL."""
    table: str | None = None

    def describe(self) -> str:
        """A human description, with any password in a PostgreSQL URL masked."""
        if self.kind == "sqlite":
            return f"SQLite {Path(self.target).resolve()}"
        table = self.table or "smtpnotify_outbox"
        return f"PostgreSQL {redact_dsn(self.target)} table {table}"


def redact_dsn(dsn: str) -> str:
    """``dsn`` with the password of ``user:password@`` or ``password=`` replaced by ``***``."""
    dsn = re.sub(r"(://[^:/@?#]*:)[^@/?#]*@", r"\1***@", dsn)
    return re.sub(r"(password\s*=\s*)[^&\s]*", r"\1***", dsn, flags=re.IGNORECASE)


def parse_outbox_url(text: str | None, table: str | None = None) -> OutboxURL:
    """Read ``--outbox``: ``sqlite:///rel.db``, ``sqlite:////abs.db``, ``postgresql://…``, a path.

    ``table`` (``--table``) is accepted for PostgreSQL only.
    """
    if not text:
        raise CLIError(
            "which outbox? give --outbox sqlite:///path/to/outbox.db (or postgresql://...)"
        )
    scheme, sep, rest = text.partition("://")
    if sep and scheme.lower() in ("postgresql", "postgres"):
        return OutboxURL("postgres", text, table)
    if table is not None:
        raise CLIError("--table is for PostgreSQL outboxes only")
    if sep and scheme.lower() == "sqlite":
        if not rest.startswith("/"):
            raise CLIError(
                f"{text}: an SQLite URL has no host: use sqlite:///relative.db "
                "or sqlite:////absolute/path.db"
            )
        path = rest[1:]
        if not path or path == ":memory:":
            raise CLIError(f"{text}: name an SQLite file, like sqlite:///outbox.db")
        return OutboxURL("sqlite", path)
    if sep and re.fullmatch(r"[A-Za-z][A-Za-z0-9+.-]*", scheme):
        raise CLIError(
            f"unsupported outbox URL scheme {scheme!r}: use sqlite:///path or postgresql://..."
        )
    return OutboxURL("sqlite", text)


def open_outbox(url: OutboxURL, *, must_exist: bool, create: bool = False) -> Outbox:
    """Open the outbox ``url`` names.

    ``must_exist`` refuses to create a new SQLite file (for commands that only
    look at or manage an outbox); ``create`` creates a missing PostgreSQL table.
    """
    if url.kind == "sqlite":
        path = Path(url.target)
        if must_exist and not path.exists():
            raise CLIError(
                f"no outbox at {path}: the application (or `smtpnotify worker`) creates it"
            )
        if path.is_dir():
            raise CLIError(f"{path} is a directory: name the outbox file in it")
        return SQLiteOutbox(path)
    try:
        from ..outbox.postgres import PostgresOutbox
    except ImportError:
        raise CLIError(
            "a PostgreSQL outbox needs psycopg: pip install 'smtpnotify[postgres]'"
        ) from None
    table = url.table or "smtpnotify_outbox"
    try:
        return PostgresOutbox(url.target, table=table, create=create, timeout=10.0)
    except ValueError as exc:
        raise CLIError(f"--outbox: {exc}") from None


# --------------------------------------------------------------------------- time


_UNIT_SECONDS = {"w": 604800, "d": 86400, "h": 3600, "m": 60, "s": 1}
_SIMPLE_DURATION = re.compile(r"(?:\d+(?:\.\d+)?[wdhms])+", re.IGNORECASE)
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)([wdhms])", re.IGNORECASE)
_TIMEDELTA: TypeAdapter[timedelta] = TypeAdapter(timedelta)


def parse_duration(text: str) -> timedelta:
    """``7d``, ``12h``, ``1d12h``, ``30m``, ``45s``, ``2w`` or ISO 8601 (``P7D``, ``PT12H``).

    Raises ``argparse.ArgumentTypeError`` (argparse turns it into a usage error).
    """
    value = text.strip()
    if _SIMPLE_DURATION.fullmatch(value):
        seconds = sum(
            float(number) * _UNIT_SECONDS[unit.lower()]
            for number, unit in _DURATION_PART.findall(value)
        )
        return timedelta(seconds=seconds)
    if value[:1] in ("P", "p", "-"):
        try:
            duration = _TIMEDELTA.validate_python(value.upper())
        except ValidationError:
            pass
        else:
            if duration < timedelta(0):
                raise argparse.ArgumentTypeError(f"{text!r}: a duration cannot be negative")
            return duration
    raise argparse.ArgumentTypeError(
        f"{text!r} is not a duration: use a number with a unit (7d, 12h, 30m, 45s, 1d12h) "
        "or ISO 8601 (P7D, PT12H)"
    )


def utcnow() -> datetime:
    """Now, aware UTC."""
    return datetime.now(UTC)


def format_time(value: datetime | None) -> str:
    """``2026-01-31 14:05:09 UTC``, or ``-`` for ``None``."""
    if value is None:
        return "-"
    return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def format_delta(delta: timedelta) -> str:
    """A short human duration: ``3d 4h``, ``5m 10s``, ``0.4s``."""
    seconds = abs(delta.total_seconds())
    if seconds < 10:
        return f"{seconds:.1f}s"
    parts = []
    for unit in ("d", "h", "m", "s"):
        size = _UNIT_SECONDS[unit]
        count, seconds = divmod(seconds, size)
        if count:
            parts.append(f"{int(count)}{unit}")
    return " ".join(parts[:2])


def format_relative(value: datetime | None, now: datetime) -> str:
    """``2026-01-31 14:05:09 UTC (in 5m 10s)`` or ``(... ago)``."""
    if value is None:
        return "-"
    delta = value - now
    when = f"in {format_delta(delta)}" if delta >= timedelta(0) else f"{format_delta(delta)} ago"
    return f"{format_time(value)} ({when})"


# --------------------------------------------------------------------------- signals


class StopSignals:
    """Turns the first SIGINT or SIGTERM into a stop request the main thread waits for.

    A second signal raises ``KeyboardInterrupt`` (stop now, without waiting).
    Handlers are installed only in the main thread and restored on exit.
    """

    def __init__(self) -> None:
        self._event = threading.Event()
        self.received: str | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)  # type: ignore[arg-type]
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self._event.is_set():
            raise KeyboardInterrupt
        self.received = signal.Signals(signum).name
        self._event.set()

    @property
    def stopping(self) -> bool:
        """Whether a stop was requested."""
        return self._event.is_set()

    def wait(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for a stop request; True once one came."""
        return self._event.wait(timeout)


def write(*lines: str, stream: str = "stdout") -> None:
    """Print ``lines`` to stdout (or stderr) and flush, so pipes see them at once."""
    out = sys.stdout if stream == "stdout" else sys.stderr
    for line in lines:
        out.write(line + "\n")
    out.flush()
