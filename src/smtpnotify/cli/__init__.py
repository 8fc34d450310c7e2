"""The ``smtpnotify`` command line.

============  ===============================================================
command       what it does
============  ===============================================================
``check``     verify mail settings against the server, step by step
``send``      send one notification now (or queue it in an outbox)
``worker``    deliver an outbox until SIGINT/SIGTERM (or one pass: ``--once``)
``outbox``    ``status``, ``list``, ``show ID``, ``retry ID``, ``purge``
``cert``      ``fetch HOST [PORT]``: a server's certificate and fingerprint
``sink``      a local SMTP server printing what it receives (mail catcher)
``demo``      the library's main job, end to end, on a local sink
============  ===============================================================

Exit status: 0 success; 1 the command ran and what it tried failed (a step of
``check``, a refused message, an unknown outbox entry); 2 usage or settings
errors.  Errors are one line each on stderr, never a traceback (``-v`` shows
the traceback of an unexpected error), and never a password.
"""

from __future__ import annotations

import argparse
import io
import logging
import os
import sys
import traceback
import warnings
from collections.abc import Sequence
from typing import TextIO

from pydantic import ValidationError

from .._errors import InvalidMessage, SMTPNotifyError
from ..outbox import OutboxError, OutboxSchemaError
from . import _cert, _check, _demo, _outbox, _send, _sink, _worker
from ._common import EXIT_FAILED, EXIT_USAGE, CLIError, Parser, validation_lines

__all__ = ["build_parser", "main"]

_INTERRUPTED = 130
_NOISY_LOGGERS = ("psycopg.pool", "mail.log")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``smtpnotify`` command."""
    from .. import __version__

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "-v",
        "--verbose",
        action="count",
        default=argparse.SUPPRESS,
        help="log what happens (-v: INFO, -vv: DEBUG, SMTP commands without secrets)",
    )
    parser = Parser(
        prog="smtpnotify",
        description="Reliable notification email: check settings, send, run the outbox worker.",
        epilog="Run `smtpnotify COMMAND --help` for a command's options.",
    )
    parser.add_argument(
        "-v", "--verbose", action="count", default=0, help="log what happens (-vv: more)"
    )
    parser.add_argument("--version", action="version", version=f"smtpnotify {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in (_check, _send, _worker, _outbox, _cert, _sink, _demo):
        module.register(commands, common)
    return parser


def _show_warning(
    message: Warning | str,
    category: type[Warning],
    filename: str,
    lineno: int,
    file: TextIO | None = None,
    line: str | None = None,
) -> None:
    print(f"smtpnotify: warning: {message}", file=sys.stderr)


def _say(*lines: str) -> None:
    for line in lines:
        print(f"smtpnotify: {line}", file=sys.stderr)


def _run(args: argparse.Namespace) -> int:
    """Run the chosen command; turn the errors a user can meet into one line and a status."""
    try:
        return int(args.func(args))
    except CLIError as exc:
        _say(*exc.lines)
        return exc.status
    except ValidationError as exc:
        _say(*validation_lines(exc, "invalid value"))
        return EXIT_USAGE
    except InvalidMessage as exc:
        _say(f"invalid message: {exc}")
        return EXIT_USAGE
    except SMTPNotifyError as exc:
        _say(f"{type(exc).__name__}: {exc}")
        return EXIT_FAILED
    except OutboxSchemaError as exc:
        _say(f"not an outbox: {exc}")
        return EXIT_USAGE
    except OutboxError as exc:
        more = " (-v shows why connecting failed)" if "PoolTimeout" in str(exc) else ""
        _say(f"outbox error: {exc}{more}")
        return EXIT_FAILED
    except BrokenPipeError:
        # The reader went away (`smtpnotify outbox list | head`): stop quietly.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_FAILED
    except OSError as exc:
        where = f"{exc.filename}: " if exc.filename else ""
        _say(f"{where}{exc.strerror or exc}")
        return EXIT_FAILED
    except KeyboardInterrupt:
        _say("interrupted")
        return _INTERRUPTED
    except Exception as exc:
        if getattr(args, "verbose", 0):
            traceback.print_exc()
        _say(
            f"unexpected error: {type(exc).__name__}: {exc} "
            "(run with -v for the traceback, and please report it)"
        )
        return EXIT_FAILED


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status.

    Usable in-process too: the log handler and warning display it installs are
    removed again before it returns.
    """
    args = build_parser().parse_args(argv)
    verbosity: int = getattr(args, "verbose", 0)
    for stream in (sys.stdout, sys.stderr):
        if isinstance(stream, io.TextIOWrapper):
            stream.reconfigure(errors="backslashreplace")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    level = root.level
    root.addHandler(handler)
    root.setLevel(
        logging.DEBUG if verbosity > 1 else logging.INFO if verbosity else logging.WARNING
    )
    # Chatty third-party loggers (a warning per failed pool connection, per odd client
    # line) would bury the one-line error; -v shows them.
    quieted = {name: logging.getLogger(name).level for name in _NOISY_LOGGERS}
    if not verbosity:
        for name in _NOISY_LOGGERS:
            logging.getLogger(name).setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _show_warning
            return _run(args)
    finally:
        root.removeHandler(handler)
        root.setLevel(level)
        for name, previous in quieted.items():
            logging.getLogger(name).setLevel(previous)
