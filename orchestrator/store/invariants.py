"""The books of the DAG, recomputed from the edges and the task statuses.

The engine keeps derived state so that a callback touches a handful of rows: each pending
task's `unfinished_deps` / `failed_deps` / `skipped_deps`, each run's `unfinished_tasks`,
`failed_tasks` and `failed_task_count`, each orchestration run's `blocked_upstreams`, the
statuses those counters decide, and which failed tasks have an open dead letter. Every path that
changes a task's status must keep them true. This module recomputes each of them from first
principles and reports every place where the books disagree; it changes nothing.

It runs after every integration and end-to-end test (tests/db_fixtures.py) and for operators as
`tickweave db check`. Each check is one read-only statement; on a large database run it off-peak
(it scans the non-terminal tasks and their edges).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from orchestrator.db.connection import Connection, connect

# Kept in step with orchestrator/store/tasks.py TERMINAL; spelled out as SQL for the checks.
_TERMINAL = "('succeeded', 'failed', 'skipped', 'cancelled')"
_ACTIVE = "('dispatched', 'running')"
_RUN_TERMINAL = "('succeeded', 'failed', 'cancelled')"


@dataclass(frozen=True)
class Violation:
    check: str  # which invariant: a short stable name
    message: str  # what is wrong, for a person
    workspace_id: str | None = None
    run_id: str | None = None
    task_id: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"check": self.check, "message": self.message, "workspace_id": self.workspace_id,
                "run_id": self.run_id, "task_id": self.task_id}


# (name, statement, message template). Each statement returns workspace_id, run_id, task_id and
# the columns its message names; a row is one violation.
_CHECKS: tuple[tuple[str, str, str], ...] = (
    (
        "pending_task_counters",
        # A join counted through slots (migration 0027) has the ends its open slots hold still
        # to come on its row.
        f"""WITH expected AS (
                SELECT t.id, t.workspace_id, t.run_id, t.node_id, t.version,
                       t.unfinished_deps - COALESCE((SELECT sum(s.arrived) FROM join_slots s
                                                     WHERE s.task_id = t.id AND s.remaining > 0), 0)
                           AS unfinished_deps,
                       t.failed_deps, t.skipped_deps,
                       count(u.id) FILTER (WHERE u.status NOT IN {_TERMINAL}) AS want_unfinished,
                       count(u.id) FILTER (WHERE u.status = 'failed') AS want_failed,
                       count(u.id) FILTER (WHERE u.status = 'skipped') AS want_skipped
                FROM tasks t
                LEFT JOIN task_edges e ON e.downstream_task_id = t.id
                LEFT JOIN tasks u ON u.id = e.upstream_task_id
                WHERE t.status = 'pending'
                GROUP BY t.id
            )
            SELECT workspace_id, run_id, id AS task_id, node_id, version, unfinished_deps, failed_deps,
                   skipped_deps, want_unfinished, want_failed, want_skipped
            FROM expected
            WHERE (unfinished_deps, failed_deps, skipped_deps) <> (want_unfinished, want_failed, want_skipped)""",
        "pending task {node_id} ({version}) counts unfinished/failed/skipped deps "
        "{unfinished_deps}/{failed_deps}/{skipped_deps}, its upstreams say "
        "{want_unfinished}/{want_failed}/{want_skipped}",
    ),
    (
        "pending_task_undecided",
        """SELECT t.workspace_id, t.run_id, t.id AS task_id, t.node_id, t.version
           FROM tasks t JOIN runs r ON r.id = t.run_id
           WHERE t.status = 'pending' AND r.status = 'running' AND t.unfinished_deps = 0""",
        "task {node_id} ({version}) of a running run has no unfinished dependency but is still pending",
    ),
    (
        "run_unfinished_counter",
        # Each task not finished counts itself and what was carried to it (migration 0026), and
        # each open slot of a join what was carried to it (0027).
        f"""WITH slots AS (
                SELECT run_id, sum(carried) AS carried FROM join_slots WHERE remaining > 0 GROUP BY run_id
            )
            SELECT r.workspace_id, r.id AS run_id, NULL::uuid AS task_id, r.status, r.unfinished_tasks,
                   count(t.id) FILTER (WHERE t.status NOT IN {_TERMINAL}) AS open,
                   COALESCE(sum(t.carried_tasks) FILTER (WHERE t.status NOT IN {_TERMINAL}), 0)
                       + COALESCE(min(s.carried), 0) AS carried
            FROM runs r LEFT JOIN tasks t ON t.run_id = r.id LEFT JOIN slots s ON s.run_id = r.id
            WHERE r.status IN ('pending', 'running') OR r.unfinished_tasks <> 0
            GROUP BY r.id
            HAVING r.unfinished_tasks <> count(t.id) FILTER (WHERE t.status NOT IN {_TERMINAL})
                   + COALESCE(sum(t.carried_tasks) FILTER (WHERE t.status NOT IN {_TERMINAL}), 0)
                   + COALESCE(min(s.carried), 0)""",
        "{status} run counts {unfinished_tasks} unfinished tasks, its tasks say {open} not finished "
        "carrying {carried}",
    ),
    (
        "join_slot_remaining",
        # A slot's `remaining` (migration 0027) is its upstreams not finished, in running runs
        # (a cancelled run's slots are left as they were).
        f"""SELECT r.workspace_id, r.id AS run_id, j.task_id, d.node_id, d.version, j.slot, j.remaining,
                   count(*) FILTER (WHERE u.status NOT IN {_TERMINAL}) AS want
            FROM join_slots j JOIN runs r ON r.id = j.run_id JOIN tasks d ON d.id = j.task_id
            JOIN task_edges e ON e.downstream_task_id = j.task_id AND e.slot = j.slot
            JOIN tasks u ON u.id = e.upstream_task_id
            WHERE r.status = 'running'
            GROUP BY r.workspace_id, r.id, j.task_id, d.node_id, d.version, j.slot, j.remaining
            HAVING j.remaining <> count(*) FILTER (WHERE u.status NOT IN {_TERMINAL})""",
        "slot {slot} of join {node_id} ({version}) counts {remaining} upstreams not finished, they say {want}",
    ),
    (
        "terminal_run_with_open_task",
        f"""SELECT r.workspace_id, r.id AS run_id, t.id AS task_id, r.status AS run_status, t.node_id,
                   t.version, t.status
            FROM runs r JOIN tasks t ON t.run_id = r.id
            WHERE r.status IN ('succeeded', 'failed', 'cancelled') AND t.status NOT IN {_TERMINAL}""",
        "{run_status} run has task {node_id} ({version}) still {status}",
    ),
    (
        "queued_run_with_started_task",
        """SELECT r.workspace_id, r.id AS run_id, t.id AS task_id, t.node_id, t.version, t.status
           FROM runs r JOIN tasks t ON t.run_id = r.id
           WHERE r.status = 'pending' AND t.status <> 'pending'""",
        "pending (not started) run has task {node_id} ({version}) {status}",
    ),
    (
        "running_run_without_way_forward",
        """SELECT r.workspace_id, r.id AS run_id, NULL::uuid AS task_id, r.unfinished_tasks
           FROM runs r
           WHERE r.status = 'running'
             AND NOT EXISTS (SELECT 1 FROM tasks t WHERE t.run_id = r.id
                             AND t.status IN ('ready', 'dispatched', 'running', 'waiting'))""",
        "running run has nothing ready, dispatched, running or waiting ({unfinished_tasks} unfinished): "
        "it can never end",
    ),
    (
        "started_task_with_unsatisfied_upstreams",
        f"""WITH ups AS (
                SELECT t.id, t.workspace_id, t.run_id, t.node_id, t.version, t.status, t.trigger_rule,
                       count(u.id) FILTER (WHERE u.status NOT IN {_TERMINAL}) AS open_ups,
                       count(u.id) FILTER (WHERE u.status = 'failed') AS failed_ups,
                       count(u.id) FILTER (WHERE u.status IN ('skipped', 'cancelled')) AS skipped_ups
                FROM tasks t
                JOIN task_edges e ON e.downstream_task_id = t.id
                JOIN tasks u ON u.id = e.upstream_task_id
                WHERE t.status IN ('ready', 'dispatched', 'running', 'waiting')
                GROUP BY t.id
            )
            SELECT workspace_id, run_id, id AS task_id, node_id, version, status, trigger_rule, open_ups,
                   failed_ups, skipped_ups
            FROM ups
            WHERE open_ups > 0
               OR (trigger_rule = 'all_success' AND skipped_ups > 0)
               OR (trigger_rule = 'none_failed' AND failed_ups > 0)
               OR (trigger_rule = 'one_failed' AND failed_ups = 0)""",
        "task {node_id} ({version}) is {status} but its rule {trigger_rule} does not hold: "
        "{open_ups} upstreams unfinished, {failed_ups} failed, {skipped_ups} skipped",
    ),
    (
        "active_task_without_lease",
        f"""SELECT workspace_id, run_id, id AS task_id, node_id, version, status FROM tasks
            WHERE status IN {_ACTIVE} AND (claim_token IS NULL OR lease_expires_at IS NULL)""",
        "task {node_id} ({version}) is {status} with no claim token or lease: it cannot be fenced or expired",
    ),
    (
        "pipeline_task_limit",
        f"""SELECT p.workspace_id, NULL::uuid AS run_id, NULL::uuid AS task_id, p.id AS pipeline_id,
                   p.max_active_tasks, count(*) AS active
            FROM pipelines p JOIN tasks t ON t.workspace_id = p.workspace_id AND t.pipeline_id = p.id
            WHERE p.max_active_tasks IS NOT NULL AND t.status IN {_ACTIVE}
            GROUP BY p.workspace_id, p.id HAVING count(*) > p.max_active_tasks""",
        "pipeline {pipeline_id} has {active} tasks out with workers, over its max_active_tasks {max_active_tasks}",
    ),
    (
        "workspace_task_limit",
        f"""SELECT w.id AS workspace_id, NULL::uuid AS run_id, NULL::uuid AS task_id, w.max_active_tasks,
                   count(*) AS active
            FROM workspaces w JOIN tasks t ON t.workspace_id = w.id
            WHERE w.max_active_tasks IS NOT NULL AND t.status IN {_ACTIVE}
            GROUP BY w.id HAVING count(*) > w.max_active_tasks""",
        "workspace has {active} tasks out with workers, over its max_active_tasks {max_active_tasks}",
    ),
    (
        "orchestration_run_blocked_on_finished_upstream",
        f"""SELECT r.workspace_id, r.id AS run_id, NULL::uuid AS task_id, r.blocked_upstreams,
                   count(*) FILTER (WHERE d.released_at IS NULL) AS unreleased,
                   count(*) FILTER (WHERE d.released_at IS NULL AND u.status IN {_RUN_TERMINAL}) AS stranded
            FROM runs r JOIN run_dependencies d ON d.downstream_run_id = r.id JOIN runs u ON u.id = d.upstream_run_id
            WHERE r.status = 'pending'
            GROUP BY r.id
            HAVING r.blocked_upstreams <> count(*) FILTER (WHERE d.released_at IS NULL)
                OR count(*) FILTER (WHERE d.released_at IS NULL AND u.status IN {_RUN_TERMINAL}) > 0""",
        "pending run waits for {blocked_upstreams} upstream runs of its orchestration; {unreleased} have not "
        "released it, {stranded} of those already finished: it will never be released",
    ),
    (
        "run_failed_counter",
        """SELECT r.workspace_id, r.id AS run_id, NULL::uuid AS task_id, r.failed_tasks,
                  count(t.id) FILTER (WHERE t.status = 'failed' AND t.on_failure = 'stop') AS want
           FROM runs r LEFT JOIN tasks t ON t.run_id = r.id
           WHERE r.status = 'running'
           GROUP BY r.id
           HAVING r.failed_tasks <> count(t.id) FILTER (WHERE t.status = 'failed' AND t.on_failure = 'stop')""",
        "running run counts {failed_tasks} stopping failures, its tasks say {want}",
    ),
    (
        # Every run, ended or not: the count is what run answers show (`failed_tasks`,
        # `succeeded_with_failures`) long after the run ended. Reads the failed tasks only.
        "run_failed_task_count",
        """SELECT r.workspace_id, r.id AS run_id, NULL::uuid AS task_id, r.status, r.failed_task_count,
                  COALESCE(f.n, 0) AS want
           FROM runs r LEFT JOIN (SELECT run_id, count(*) AS n FROM tasks WHERE status = 'failed' GROUP BY run_id) f
                ON f.run_id = r.id
           WHERE r.failed_task_count <> COALESCE(f.n, 0)""",
        "{status} run counts {failed_task_count} failed tasks, its tasks say {want}",
    ),
    (
        # The dead-letter queue holds failures: an entry still open (not retried) is of a failed
        # task, and only a worker's task (not a person's decision, not a map node) is dead-lettered.
        "open_dead_letter_of_unfailed_task",
        """SELECT t.workspace_id, t.run_id, t.id AS task_id, t.node_id, t.version, t.kind, t.status
           FROM dead_letters d JOIN tasks t ON t.id = d.task_id
           WHERE d.retried_at IS NULL AND (t.status <> 'failed' OR t.kind <> 'task')""",
        "task {node_id} ({version}), a {kind} node, has an open dead letter but is {status}",
    ),
)

# Map nodes (migration 0016): a map node is never left ready (it is expanded or settled in the
# transaction that made it ready) nor out with a worker; an expanded one has exactly its width of
# children, of its run, node and version; it is pending while any child is open and settles only
# when they are all done; and no more of its children are out with workers than max_concurrency.
_MAP_CHECKS: tuple[tuple[str, str, str], ...] = (
    (
        "map_node_unresolved",
        """SELECT workspace_id, run_id, id AS task_id, node_id, version, status FROM tasks
           WHERE kind = 'map' AND status IN ('ready', 'dispatched', 'running', 'waiting')""",
        "map node {node_id} ({version}) is {status}: it should have been expanded or settled where it became ready",
    ),
    (
        "map_width",
        """SELECT p.workspace_id, p.run_id, p.id AS task_id, p.node_id, p.version, p.map_width,
                  count(c.id) AS children,
                  count(c.id) FILTER (WHERE c.run_id <> p.run_id OR c.node_id <> p.node_id
                                       OR c.version <> p.version OR c.kind <> 'task') AS foreign,
                  count(DISTINCT c.map_index) FILTER (WHERE c.map_index BETWEEN 0 AND p.map_width - 1) AS indexes
           FROM tasks p LEFT JOIN tasks c ON c.map_parent_id = p.id
           WHERE p.kind = 'map'
           GROUP BY p.id
           HAVING count(c.id) <> COALESCE(p.map_width, 0)
               OR count(c.id) FILTER (WHERE c.run_id <> p.run_id OR c.node_id <> p.node_id
                                       OR c.version <> p.version OR c.kind <> 'task') > 0
               OR count(DISTINCT c.map_index) FILTER (WHERE c.map_index BETWEEN 0 AND p.map_width - 1)
                  <> COALESCE(p.map_width, 0)""",
        "map node {node_id} ({version}) has width {map_width} but {children} children "
        "({indexes} distinct indexes in range, {foreign} not of its run, node and version)",
    ),
    (
        "map_child_of_settled_node",
        f"""SELECT c.workspace_id, c.run_id, c.id AS task_id, c.node_id, c.version, c.map_index, c.status,
                   p.status AS node_status
            FROM tasks c JOIN tasks p ON p.id = c.map_parent_id
            WHERE c.status NOT IN {_TERMINAL} AND p.status <> 'pending'""",
        "item {map_index} of map node {node_id} ({version}) is {status} but the map node is {node_status}",
    ),
    (
        "map_concurrency_limit",
        f"""SELECT p.workspace_id, p.run_id, p.id AS task_id, p.node_id, p.version, p.map_max_concurrency,
                   count(*) AS active
            FROM tasks p JOIN tasks c ON c.map_parent_id = p.id
            WHERE p.map_max_concurrency IS NOT NULL AND c.status IN {_ACTIVE}
            GROUP BY p.id HAVING count(*) > p.map_max_concurrency""",
        "map node {node_id} ({version}) has {active} items out with workers, over its max_concurrency "
        "{map_max_concurrency}",
    ),
)

_CHECKS = _CHECKS + _MAP_CHECKS

CHECK_NAMES: tuple[str, ...] = tuple(name for name, _, _ in _CHECKS)


def check_books(conn: Connection) -> list[Violation]:
    """Every violation of the DAG's invariants in the database, in check order (empty: clean).

    Run it in one REPEATABLE READ transaction, or on a quiet database, so that every check
    reads the same snapshot (`find_violations` does that)."""
    violations: list[Violation] = []
    for name, statement, template in _CHECKS:
        for row in conn.execute(statement).fetchall():  # type: ignore[call-overload]
            violations.append(Violation(
                check=name, message=template.format(**row),
                workspace_id=None if row.get("workspace_id") is None else str(row["workspace_id"]),
                run_id=None if row.get("run_id") is None else str(row["run_id"]),
                task_id=None if row.get("task_id") is None else str(row["task_id"]),
            ))
    return violations


def find_violations(url: str) -> list[Violation]:
    """check_books on one consistent snapshot of the database at `url`."""
    with connect(url, autocommit=True) as conn, conn.transaction():
        conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
        return check_books(conn)
