"""SQL of notifications: workspace settings (default targets, signing secret), the outbox's
deliveries (claimed by the tick with a lease, each attempt recorded) and their retention.

Events and deliveries are written by the triggers of migration 0022, in the transaction that
causes each event; nothing here writes an event.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from psycopg.types.json import Jsonb

from orchestrator.db.connection import Connection, Row

DELIVERY_COLUMNS = """d.id, d.event_id, d.workspace_id, d.target_kind, d.target, d.status, d.attempts,
    d.next_attempt_at, d.http_status, d.last_error, d.created_at, d.updated_at, d.delivered_at,
    e.type AS event_type, e.pipeline_id, e.run_id, e.task_id"""


# --- settings ------------------------------------------------------------------------------


def get_settings(conn: Connection, workspace_id: str) -> Row | None:
    return conn.execute(
        """SELECT workspace_id, targets, signing_secret IS NOT NULL AS has_secret, secret_rotated_at,
                  previous_secret_expires_at, updated_at
           FROM notification_settings WHERE workspace_id = %s""",
        (workspace_id,),
    ).fetchone()


def set_default_targets(conn: Connection, workspace_id: str, targets: list[dict[str, Any]] | None) -> Row:
    row = conn.execute(
        """INSERT INTO notification_settings (workspace_id, targets) VALUES (%(ws)s, %(targets)s)
           ON CONFLICT (workspace_id) DO UPDATE SET targets = EXCLUDED.targets, updated_at = tw_now()
           RETURNING workspace_id, targets, updated_at""",
        {"ws": workspace_id, "targets": None if targets is None else Jsonb(targets)},
    ).fetchone()
    assert row is not None  # an upsert returns its row
    return row


def ensure_secret(conn: Connection, workspace_id: str, candidate: str) -> str:
    """The workspace's signing secret; `candidate` becomes it when it has none yet (two callers
    racing agree on the first one written)."""
    row = conn.execute(
        """INSERT INTO notification_settings (workspace_id, signing_secret) VALUES (%s, %s)
           ON CONFLICT (workspace_id) DO UPDATE
               SET signing_secret = COALESCE(notification_settings.signing_secret, EXCLUDED.signing_secret)
           RETURNING signing_secret""",
        (workspace_id, candidate),
    ).fetchone()
    assert row is not None
    return str(row["signing_secret"])


def rotate_secret(conn: Connection, workspace_id: str, new_secret: str, grace_s: int) -> Row:
    """`new_secret` signs from now on; the one it replaces keeps signing alongside it for
    `grace_s` seconds (none when there was none)."""
    row = conn.execute(
        """INSERT INTO notification_settings AS s (workspace_id, signing_secret, secret_rotated_at)
           VALUES (%(ws)s, %(secret)s, tw_now())
           ON CONFLICT (workspace_id) DO UPDATE SET
               previous_secret = s.signing_secret,
               previous_secret_expires_at = CASE WHEN s.signing_secret IS NULL THEN NULL
                                                 ELSE tw_now() + make_interval(secs => %(grace)s) END,
               signing_secret = EXCLUDED.signing_secret,
               secret_rotated_at = tw_now(), updated_at = tw_now()
           RETURNING signing_secret, secret_rotated_at, previous_secret_expires_at""",
        {"ws": workspace_id, "secret": new_secret, "grace": grace_s},
    ).fetchone()
    assert row is not None
    return row


def signing_secrets(conn: Connection, workspace_ids: list[str]) -> dict[str, list[str]]:
    """workspace -> [current secret, previous one while it is still in its grace period]."""
    rows = conn.execute(
        """SELECT workspace_id, signing_secret,
                  CASE WHEN previous_secret_expires_at > tw_now() THEN previous_secret END AS previous
           FROM notification_settings WHERE workspace_id = ANY(%s) AND signing_secret IS NOT NULL""",
        (workspace_ids,),
    ).fetchall()
    return {
        str(r["workspace_id"]): [str(r["signing_secret"])] + ([str(r["previous"])] if r["previous"] else [])
        for r in rows
    }


# --- deliveries ----------------------------------------------------------------------------


def claim_due(conn: Connection, limit: int, lease_s: float) -> list[Row]:
    """Up to `limit` due deliveries, each taken with a new claim token and a lease until
    `next_attempt_at` (now + lease_s): pending ones whose time came, and `sending` ones whose
    lease lapsed (their tick died or hung: sent again, at least once). SKIP LOCKED keeps ticks
    running at once apart; the lease keeps apart a tick and the one after it."""
    return conn.execute(
        """WITH due AS (
               SELECT id FROM notification_deliveries
               WHERE status IN ('pending', 'sending') AND next_attempt_at <= tw_now()
               ORDER BY next_attempt_at
               LIMIT %(limit)s
               FOR UPDATE SKIP LOCKED
           )
           UPDATE notification_deliveries d SET
               status = 'sending', attempts = d.attempts + 1, claim_token = gen_random_uuid(),
               next_attempt_at = tw_now() + make_interval(secs => %(lease)s), updated_at = tw_now()
           FROM due, notification_events e
           WHERE d.id = due.id AND e.id = d.event_id
           RETURNING d.id, d.event_id, d.workspace_id, d.target_kind, d.target, d.attempts, d.claim_token,
                     d.created_at, e.type AS event_type, e.pipeline_id, e.run_id, e.task_id, e.data,
                     e.created_at AS event_created_at""",
        {"limit": limit, "lease": lease_s},
    ).fetchall()


def record_attempt(
    conn: Connection, delivery_id: uuid.UUID, claim_token: uuid.UUID, *, ok: bool, retryable: bool,
    http_status: int | None, error: str | None, duration_ms: float, base_delay_s: float, max_delay_s: float,
    max_attempts: int, give_up_after_s: float,
) -> Row | None:
    """The outcome of one claimed attempt, fenced by its claim token (a lease that lapsed and was
    claimed again is no longer this attempt's to record): delivered; or pending again after
    base_delay_s * 2^(attempts-1) (at most max_delay_s); or failed when it may not be retried,
    its attempts are used up, or the next one would come later than give_up_after_s after the
    event. None when the claim is no longer held."""
    return conn.execute(
        """WITH decided AS (
               SELECT d.id, CASE WHEN %(ok)s::boolean THEN 'delivered'
                                 WHEN NOT %(retryable)s::boolean OR d.attempts >= %(max_attempts)s THEN 'failed'
                                 WHEN tw_now() + make_interval(secs => x.delay)
                                      > d.created_at + make_interval(secs => %(give_up)s) THEN 'failed'
                                 ELSE 'pending' END AS next_status, x.delay
               FROM notification_deliveries d
               CROSS JOIN LATERAL (SELECT LEAST(%(base)s::float8 * power(2, GREATEST(d.attempts - 1, 0)), %(max_delay)s::float8)
                                          AS delay) x
               WHERE d.id = %(id)s AND d.claim_token = %(token)s AND d.status = 'sending'
           )
           UPDATE notification_deliveries d SET
               status = c.next_status,
               next_attempt_at = CASE WHEN c.next_status = 'pending' THEN tw_now() + make_interval(secs => c.delay) END,
               claim_token = NULL,
               http_status = %(http_status)s::int,
               last_error = %(error)s::text,
               delivered_at = CASE WHEN c.next_status = 'delivered' THEN tw_now() END,
               updated_at = tw_now(),
               history = d.history || jsonb_build_array(jsonb_build_object(
                   'attempt', d.attempts, 'at', tw_now(), 'ok', %(ok)s::boolean, 'http_status', %(http_status)s::int,
                   'error', %(error)s::text, 'duration_ms', round(%(duration)s::numeric, 1)))
           FROM decided c
           WHERE d.id = c.id
           RETURNING d.id, d.status, d.attempts, d.next_attempt_at""",
        {"ok": ok, "retryable": retryable, "max_attempts": max_attempts, "give_up": give_up_after_s,
         "base": base_delay_s, "max_delay": max_delay_s, "id": delivery_id, "token": claim_token,
         "http_status": http_status, "error": error, "duration": duration_ms},
    ).fetchone()


def list_deliveries(
    conn: Connection, workspace_id: str, *, status: str | None, limit: int,
    before: tuple[datetime, uuid.UUID] | None,
) -> list[Row]:
    """Newest first, keyset-paginated on (created_at, id)."""
    clauses = ["d.workspace_id = %(ws)s"]
    if status is not None:
        clauses.append("d.status = %(status)s")
    if before is not None:
        clauses.append("(d.created_at, d.id) < (%(before_at)s, %(before_id)s)")
    return conn.execute(
        f"""SELECT {DELIVERY_COLUMNS}
            FROM notification_deliveries d JOIN notification_events e ON e.id = d.event_id
            WHERE {" AND ".join(clauses)}
            ORDER BY d.created_at DESC, d.id DESC
            LIMIT %(limit)s""",
        {"ws": workspace_id, "status": status, "limit": limit,
         "before_at": before[0] if before else None, "before_id": before[1] if before else None},
    ).fetchall()


def get_delivery(conn: Connection, workspace_id: str, delivery_id: uuid.UUID) -> Row | None:
    return conn.execute(
        f"""SELECT {DELIVERY_COLUMNS}, d.history, e.data AS event_data, e.created_at AS event_created_at
            FROM notification_deliveries d JOIN notification_events e ON e.id = d.event_id
            WHERE d.workspace_id = %s AND d.id = %s""",
        (workspace_id, delivery_id),
    ).fetchone()


def retry_delivery(conn: Connection, workspace_id: str, delivery_id: uuid.UUID) -> Row | None:
    """A failed delivery due again now, for one more attempt (its attempts and history stay)."""
    return conn.execute(
        """UPDATE notification_deliveries SET status = 'pending', next_attempt_at = tw_now(), updated_at = tw_now()
           WHERE workspace_id = %s AND id = %s AND status = 'failed'
           RETURNING id, status, next_attempt_at""",
        (workspace_id, delivery_id),
    ).fetchone()


def delivery_status(conn: Connection, workspace_id: str, delivery_id: uuid.UUID) -> str | None:
    row = conn.execute(
        "SELECT status FROM notification_deliveries WHERE workspace_id = %s AND id = %s", (workspace_id, delivery_id)
    ).fetchone()
    return None if row is None else str(row["status"])


def purge_old_events(conn: Connection, older_than_s: float, limit: int) -> int:
    """Delete up to `limit` events older than `older_than_s` whose deliveries are all finished
    (their deliveries go with them), oldest first."""
    row = conn.execute(
        """WITH old AS (
               SELECT e.id FROM notification_events e
               WHERE e.created_at < tw_now() - make_interval(secs => %(age)s)
                 AND NOT EXISTS (SELECT 1 FROM notification_deliveries d
                                 WHERE d.event_id = e.id AND d.status IN ('pending', 'sending'))
               ORDER BY e.created_at
               LIMIT %(limit)s
               FOR UPDATE SKIP LOCKED
           ), gone AS (
               DELETE FROM notification_events e USING old WHERE e.id = old.id RETURNING 1
           )
           SELECT count(*)::int AS n FROM gone""",
        {"age": older_than_s, "limit": limit},
    ).fetchone()
    return 0 if row is None else int(row["n"])
