"""Every SQL statement ``PostgresOutbox`` runs against its table, composed once per table.

Statements that change an entry are conditional on the state they expect
(``status``, ``lease_owner``), so running one twice changes nothing the second
time; ``applied`` recognises a write of one's own that committed.
"""

from __future__ import annotations

from psycopg import sql

from ._pg_schema import INSPECT, advisory_lock, ddl_statements, qualified_table

__all__ = ["COLUMNS", "Statements"]

COLUMNS = (
    "id",
    "seq",
    "status",
    "sender",
    "recipients",
    "message_id",
    "data",
    "smtputf8",
    "created_at",
    "expires_at",
    "next_attempt_at",
    "attempts",
    "last_error",
    "accepted",
    "refused",
    "lease_owner",
    "lease_until",
    "updated_at",
)

# Accepted recipients are a set kept in first-seen order.
_MERGE_ACCEPTED = """accepted = ARRAY(
        SELECT a FROM unnest(accepted || %(accepted)s::text[]) WITH ORDINALITY AS u(a, n)
        GROUP BY a ORDER BY min(n))"""
_CLEAR_LEASE = "lease_owner = NULL, lease_until = NULL, updated_at = %(now)s"
_HELD = "id = %(id)s AND status = 'sending' AND lease_owner = %(owner)s"


class Statements:
    """Every SQL statement of one outbox table, composed once."""

    def __init__(self, table: str, schema: str | None, channel: str, token: str) -> None:
        t = qualified_table(table, schema)
        self.qualified = t
        cols = sql.SQL(", ").join(sql.Identifier(c) for c in COLUMNS)

        parts = {
            "t": t,
            "cols": cols,
            "held": sql.SQL(_HELD),
            "clear_lease": sql.SQL(_CLEAR_LEASE),
            "finish": sql.SQL(
                f"{_MERGE_ACCEPTED}, refused = refused || %(refused)s, {_CLEAR_LEASE}"
            ),
        }

        def q(text: str) -> sql.Composed:
            return sql.SQL(text).format(**parts)

        self.ddl = ddl_statements(table, schema)
        self.advisory_lock = advisory_lock(table, schema)
        self.inspect = INSPECT
        chan = sql.Identifier(channel)
        self.listen = sql.SQL("LISTEN {}").format(chan)
        self.notify_own = sql.SQL("NOTIFY {}, {}").format(chan, sql.Literal(token))
        self.notify_foreign = sql.SQL("NOTIFY {}").format(chan)
        self.insert = q(
            "INSERT INTO {t} (id, status, sender, recipients, message_id, data, smtputf8, "
            "created_at, expires_at, next_attempt_at, attempts, updated_at) "
            "VALUES (%(id)s, 'pending', %(sender)s, %(recipients)s::text[], %(message_id)s, "
            "%(data)s, %(smtputf8)s, %(now)s, %(expires_at)s, %(now)s, 0, %(now)s) "
            "ON CONFLICT (id) DO NOTHING"
        )
        self.claim = q(
            "UPDATE {t} SET status = 'sending', lease_owner = %(owner)s, lease_until = %(until)s, "
            "attempts = attempts + 1, updated_at = %(now)s "
            "WHERE id IN (SELECT id FROM {t} "
            "  WHERE ((status = 'pending' AND next_attempt_at <= %(now)s) "
            "      OR (status = 'sending' AND lease_until <= %(now)s)) "
            "    AND %(now)s < expires_at "
            "  ORDER BY next_attempt_at, created_at, seq LIMIT %(limit)s FOR UPDATE SKIP LOCKED) "
            "RETURNING {cols}"
        )
        self.record_sent = q(
            "UPDATE {t} SET status = 'sent', next_attempt_at = NULL, {finish} WHERE {held}"
        )
        self.record_retry = q(
            "UPDATE {t} SET status = 'pending', next_attempt_at = %(next)s, "
            "last_error = %(error)s, recipients = COALESCE(%(remaining)s::text[], recipients), "
            "{finish} WHERE {held}"
        )
        self.record_failed = q(
            "UPDATE {t} SET status = 'failed', next_attempt_at = NULL, last_error = %(error)s, "
            "{finish} WHERE {held}"
        )
        self.record_expired = q(
            "UPDATE {t} SET status = 'expired', next_attempt_at = NULL, "
            "last_error = COALESCE(%(error)s, last_error), {clear_lease} "
            "WHERE id = %(id)s AND CASE WHEN %(owner)s::text IS NULL "
            "  THEN status = 'pending' OR (status = 'sending' AND lease_until <= %(now)s) "
            "  ELSE status = 'sending' AND lease_owner = %(owner)s END"
        )
        self.release = q(
            "UPDATE {t} SET status = 'pending', next_attempt_at = %(now)s, "
            "attempts = GREATEST(attempts - 1, 0), {clear_lease} WHERE {held}"
        )
        self.retry = q(
            "UPDATE {t} SET status = 'pending', next_attempt_at = %(now)s, "
            "expires_at = COALESCE(%(expires_at)s::timestamptz, "
            "  %(now)s + (expires_at - created_at)), "
            "{clear_lease} WHERE id = %(id)s AND status IN ('failed', 'expired')"
        )
        self.applied = q(
            "SELECT 1 FROM {t} WHERE id = %(id)s AND status = %(target)s AND updated_at = %(now)s"
        )
        self.expire_due = q(
            "UPDATE {t} SET status = 'expired', next_attempt_at = NULL, "
            "lease_owner = NULL, lease_until = NULL, updated_at = %(now)s "
            "WHERE id IN (SELECT id FROM {t} "
            "  WHERE (status = 'pending' AND expires_at <= %(now)s) "
            "     OR (status = 'sending' AND lease_until <= %(now)s AND expires_at <= %(now)s) "
            "  FOR UPDATE SKIP LOCKED) "
            "RETURNING {cols}"
        )
        self.next_due = q(
            "SELECT min(CASE status WHEN 'pending' THEN LEAST(next_attempt_at, expires_at) "
            "WHEN 'sending' THEN lease_until END) AS due "
            "FROM {t} WHERE status IN ('pending', 'sending')"
        )
        self.get = q("SELECT {cols} FROM {t} WHERE id = %(id)s")
        self.counts = q("SELECT status, count(*) AS n FROM {t} GROUP BY status")
        self.entries = q(
            "SELECT {cols} FROM {t} WHERE %(status)s::text IS NULL OR status = %(status)s "
            "ORDER BY created_at DESC, seq DESC LIMIT %(limit)s"
        )
        self.purge = q(
            "DELETE FROM {t} WHERE status = ANY(%(statuses)s::text[]) AND updated_at < %(before)s"
        )
