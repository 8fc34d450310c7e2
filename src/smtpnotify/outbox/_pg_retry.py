"""Running a ``PostgresOutbox`` operation, again on another connection when its own died.

Every operation is one transaction on a pooled connection.  A connection found
dead is discarded by the pool and the operation runs again on another, at most
once per pooled connection plus one; any other ``OperationalError`` gets one
more try; pool timeouts and cancelled statements none.  psycopg's errors leave
as :class:`~smtpnotify.outbox.OutboxError`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, TypeVar

import psycopg
from psycopg_pool import ConnectionPool, PoolClosed, PoolTimeout, TooManyRequests

from ._base import OutboxError
from ._pg_connect import Conn

__all__ = ["NOT_RETRIED", "Op", "run_with_retry", "storage_error"]

# The logger of smtpnotify.outbox.postgres, whichever of its modules logs.
logger = logging.getLogger("smtpnotify.outbox.postgres")

_T = TypeVar("_T")
Op = Callable[[Conn, bool], _T]

# Operational errors never retried: the pool already waited its timeout or is
# closed, or a statement_timeout fired (trying again would wait as long again).
NOT_RETRIED: tuple[type[BaseException], ...] = (
    PoolTimeout,
    PoolClosed,
    TooManyRequests,
    psycopg.errors.QueryCanceled,
)


def storage_error(name: str, exc: psycopg.Error) -> OutboxError:
    """The :class:`OutboxError` that operation ``name`` raises for a psycopg error."""
    return OutboxError(f"PostgresOutbox.{name} failed: {type(exc).__name__}: {exc}")


def run_with_retry(pool: ConnectionPool[Any], op: Op[_T], name: str) -> _T:
    """Run ``op`` in one transaction on a connection of ``pool``, retrying when it breaks.

    A connection found dead (its statement failed and psycopg closed it:
    the backend was terminated, the server restarted, the network cut it)
    is discarded by the pool and ``op`` runs again on another, at most once
    per pooled connection plus one, so a pool of idle connections that all
    died recovers at once.  Another ``OperationalError`` (a deadlock, a
    serialization failure) gets one more try.  ``op`` receives
    ``retried=True`` on a later try, so a conditional update can tell
    "someone else changed it" from "my first try committed but its reply
    was lost".  psycopg's errors leave as :class:`OutboxError`.
    """
    lost_budget = pool.max_size
    other_budget = 1
    retried = False
    while True:
        used: list[Conn] = []
        try:
            with pool.connection() as conn:
                used.append(conn)
                with conn.transaction():
                    return op(conn, retried)
        except psycopg.OperationalError as exc:
            if isinstance(exc, NOT_RETRIED):
                raise storage_error(name, exc) from exc
            if used and used[0].closed and lost_budget > 0:
                lost_budget -= 1
            elif other_budget > 0:
                other_budget -= 1
            else:
                raise storage_error(name, exc) from exc
            logger.warning("PostgresOutbox %s failed (%s); trying again", name, exc)
            retried = True
        except psycopg.Error as exc:
            raise storage_error(name, exc) from exc
