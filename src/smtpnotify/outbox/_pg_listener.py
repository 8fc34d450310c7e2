"""The ``PostgresOutbox`` listener: a thread doing ``LISTEN``, reconnecting with backoff.

It wakes the outbox's subscribers for every notification but the outbox's
own (``add`` in this process already woke them), and once after each
reconnect, since notifications sent while it was away are lost.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

import psycopg
from psycopg import sql

from ._pg_connect import CONNECT_DEFAULTS, Conn, ConnInfo, ConnKwargs, connect_autocommit

__all__ = ["Listener"]

# The logger of smtpnotify.outbox.postgres, whichever of its modules logs.
logger = logging.getLogger("smtpnotify.outbox.postgres")


class Listener:
    """A daemon thread holding one ``LISTEN`` connection, reconnecting with backoff."""

    _BACKOFF_START = 0.1
    _BACKOFF_MAX = 5.0
    _FIRST_CONNECT_WAIT = 5.0

    def __init__(
        self,
        conninfo: ConnInfo,
        kwargs: ConnKwargs,
        listen: sql.Composed,
        own_token: str,
        wake: Callable[[], None],
        poll: float,
    ) -> None:
        self._conninfo = conninfo
        self._kwargs = kwargs
        self._listen = listen
        self._token = own_token
        self._wake = wake
        self._poll = poll
        self._stop = threading.Event()
        self._listening = threading.Event()  # LISTEN ran at least once
        self._settled = threading.Event()  # ... or the thread ended
        self._state = threading.Lock()
        self._late = False
        self._backoff = self._BACKOFF_START
        self._thread = threading.Thread(
            target=self._loop, name="smtpnotify-pg-listener", daemon=True
        )

    def start(self) -> None:
        """Start the thread; wait (a little) until it listens, so no add after this is missed."""
        with self._state:
            if self._stop.is_set():  # closed before it started
                return
            self._thread.start()
        if not self._settled.wait(self._FIRST_CONNECT_WAIT):
            with self._state:
                # Not listening yet: wake everyone once it is, for what came meanwhile.
                self._late = not self._listening.is_set()

    def stop(self) -> None:
        """Stop the thread and close its connection."""
        with self._state:
            self._stop.set()
            started = self._thread.ident is not None
        if not started:
            return
        self._thread.join(self._poll + CONNECT_DEFAULTS["connect_timeout"] + 5)
        if self._thread.is_alive():  # pragma: no cover - a connect hanging past its timeout
            logger.warning("PostgresOutbox listener thread did not stop in time")

    def _loop(self) -> None:
        try:
            while not self._stop.is_set():
                try:
                    self._session()
                except psycopg.Error as exc:
                    if self._stop.is_set():
                        break
                    logger.warning("PostgresOutbox listener connection lost (%s); retrying", exc)
                except Exception:  # pragma: no cover - a bug; keep the thread alive
                    logger.exception("PostgresOutbox listener failed; restarting")
                self._stop.wait(self._backoff)
                self._backoff = min(self._backoff * 2, self._BACKOFF_MAX)
        finally:
            self._settled.set()

    def _connect(self) -> Conn:
        return connect_autocommit(self._conninfo, self._kwargs)

    def _session(self) -> None:
        with self._connect() as conn:
            conn.execute(self._listen)
            self._backoff = self._BACKOFF_START
            with self._state:
                reconnect = self._listening.is_set() or self._late
                self._listening.set()
                self._settled.set()
            if reconnect:
                self._wake()  # notifications sent while we were away are lost
            while not self._stop.is_set():
                for note in conn.notifies(timeout=self._poll):
                    if note.payload != self._token:
                        self._wake()
