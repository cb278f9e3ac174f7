"""The capacity of worker targets that push back (migration 0024): one row per target while it
is throttled or recovering, none for a healthy one. Each function is one statement."""

from __future__ import annotations

from collections.abc import Sequence

from orchestrator.db.connection import Connection, Row


def list_targets(conn: Connection) -> list[Row]:
    """Every target under backpressure (a handful at most: the table holds only those)."""
    return conn.execute(
        """SELECT target, capacity, throttles, window_ends_at, window_used, last_error,
                  GREATEST(0, EXTRACT(EPOCH FROM window_ends_at - tw_now()))::float8 AS rest_s,
                  CASE WHEN window_ends_at <= tw_now() THEN capacity
                       ELSE GREATEST(0, capacity - window_used) END AS available
           FROM dispatch_targets ORDER BY target"""
    ).fetchall()


def take_grants(conn: Connection, wanted: dict[str, int], window_s: float) -> dict[str, tuple[int, bool]]:
    """Take up to `wanted[target]` sends from each limited target's current window, atomically
    across every process (the row lock orders them): a window that has ended opens a new one of
    `window_s` seconds. Answers, per limited target, the sends granted and whether this call
    opened its window; a target with no row is not limited and is not in the answer."""
    if not wanted:
        return {}
    targets = sorted(wanted)
    rows = conn.execute(
        """WITH w AS (SELECT * FROM unnest(%(targets)s::text[], %(wanted)s::int[]) AS w(target, n)),
           old AS (
               SELECT d.target, w.n, d.capacity,
                      CASE WHEN d.window_ends_at <= tw_now() THEN 0 ELSE d.window_used END AS used,
                      d.window_ends_at <= tw_now() AS fresh
               FROM dispatch_targets d JOIN w ON w.target = d.target
               ORDER BY d.target
               FOR UPDATE OF d
           ), granted AS (
               UPDATE dispatch_targets d SET
                   window_used = o.used + GREATEST(0, LEAST(o.n, o.capacity - o.used)),
                   window_ends_at = CASE WHEN o.fresh THEN tw_now() + make_interval(secs => %(window)s)
                                         ELSE d.window_ends_at END
               FROM old o
               WHERE d.target = o.target
               RETURNING d.target, GREATEST(0, LEAST(o.n, o.capacity - o.used)) AS granted, o.fresh
           )
           SELECT target, granted, fresh FROM granted""",
        {"targets": targets, "wanted": [wanted[t] for t in targets], "window": window_s},
    ).fetchall()
    return {r["target"]: (int(r["granted"]), bool(r["fresh"])) for r in rows}


def record_throttled(
    conn: Connection, target: str, *, sent: int, throttled: int, base_rest_s: float, max_rest_s: float,
    error: str,
) -> Row | None:
    """A round in which `target` throttled: its capacity halves (from what it accepted in the
    round, at least 1) and it rests for a backoff doubling per throttled round in a row: the
    resting window counts as used up, so nothing is sent to it before the rest ends."""
    return conn.execute(
        """INSERT INTO dispatch_targets AS d (target, capacity, throttles, window_ends_at, window_used, last_error)
           VALUES (%(target)s, GREATEST(1, (%(sent)s + %(throttled)s) / 2), 1,
                   tw_now() + make_interval(secs => %(base)s), GREATEST(1, (%(sent)s + %(throttled)s) / 2),
                   %(error)s)
           ON CONFLICT (target) DO UPDATE SET
               capacity = GREATEST(1, LEAST(d.capacity, %(sent)s + %(throttled)s) / 2),
               throttles = d.throttles + 1,
               window_ends_at = tw_now() + make_interval(secs => LEAST(%(max)s::float8,
                                    %(base)s * power(2, LEAST(d.throttles, 30)))),
               window_used = GREATEST(1, LEAST(d.capacity, %(sent)s + %(throttled)s) / 2),
               last_error = EXCLUDED.last_error, updated_at = tw_now()
           RETURNING target, capacity, throttles, window_ends_at""",
        {"target": target, "sent": sent, "throttled": throttled, "base": base_rest_s, "max": max_rest_s,
         "error": error[:500]},
    ).fetchone()


def record_clean(conn: Connection, targets: Sequence[str], ceiling: int) -> None:
    """Rounds in which limited targets took every send without throttling: each capacity grows
    by half (plus one), from the next window on (the current one keeps what it had left); a
    target back at `ceiling` is healthy again and its row goes."""
    if not targets:
        return
    # Disjoint rows: the ones reaching the ceiling go, the others grow (a row changed twice in
    # one statement would not be).
    conn.execute(
        """WITH healthy AS (
               DELETE FROM dispatch_targets
               WHERE target = ANY(%(targets)s) AND capacity + capacity / 2 + 1 >= %(ceiling)s
           )
           UPDATE dispatch_targets SET capacity = capacity + capacity / 2 + 1, throttles = 0, updated_at = tw_now(),
                  window_used = window_used + capacity / 2 + 1
           WHERE target = ANY(%(targets)s) AND capacity + capacity / 2 + 1 < %(ceiling)s""",
        {"targets": list(targets), "ceiling": ceiling},
    )
