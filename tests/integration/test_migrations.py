"""The schema a fresh database gets from the migrations, and the migrator's locking."""

from __future__ import annotations

import threading
import uuid
from typing import Any

import psycopg
import pytest

from infra.postgres import create_database, drop_database, with_database
from orchestrator.db.migrate import applied_versions, load_migrations, migrate

EXPECTED_TABLES = {
    "workspaces", "api_keys", "pipelines", "pipeline_versions", "runs", "tasks", "task_edges",
    "task_attempts", "schema_migrations", "schedules", "schedule_skips", "tw_clock", "dead_letters",
    "workers", "worker_tasks", "task_code_versions", "templates", "template_versions",
    "pipeline_template_refs", "events", "backfills", "pipeline_dependencies", "orchestrations",
    "run_dependencies", "pipeline_outputs", "run_inputs", "pipeline_triggers", "map_items",
    "notification_settings", "notification_events", "notification_deliveries", "dispatch_targets", "join_slots",
}


def _catalog(url: str) -> dict[str, Any]:
    """A comparable description of the schema: columns, indexes, constraints, functions."""
    with psycopg.connect(url) as conn:
        columns = conn.execute(
            """SELECT table_name, column_name, data_type, is_nullable, column_default
               FROM information_schema.columns WHERE table_schema = 'public' ORDER BY 1, 2"""
        ).fetchall()
        indexes = conn.execute(
            "SELECT tablename, indexname, indexdef FROM pg_indexes WHERE schemaname = 'public' ORDER BY 1, 2"
        ).fetchall()
        constraints = conn.execute(
            """SELECT conrelid::regclass::text, conname, pg_get_constraintdef(oid)
               FROM pg_constraint WHERE connamespace = 'public'::regnamespace ORDER BY 1, 2"""
        ).fetchall()
        functions = conn.execute(
            """SELECT proname, pg_get_functiondef(oid) FROM pg_proc
               WHERE pronamespace = 'public'::regnamespace ORDER BY 1"""
        ).fetchall()
    return {"columns": columns, "indexes": indexes, "constraints": constraints, "functions": functions}


def test_fresh_database_migrated_equals_the_template_schema(pg_admin_url: str, template_db_url: str) -> None:
    name = f"tickweave_fresh_{uuid.uuid4().hex[:8]}"
    create_database(pg_admin_url, name)
    url = with_database(pg_admin_url, name)
    try:
        applied = migrate(url)
        assert applied == [m.version for m in load_migrations()]
        fresh = _catalog(url)
        assert {c[0] for c in fresh["columns"]} == EXPECTED_TABLES
        assert fresh == _catalog(template_db_url)
        # the claim order's partial index exists with its predicate
        assert any(
            i[1] == "tasks_ready_idx" and "WHERE (status = 'ready'::text)" in i[2] for i in fresh["indexes"]
        )
        assert migrate(url) == []  # idempotent
        assert applied_versions(url) == applied
    finally:
        drop_database(pg_admin_url, name)


def test_concurrent_migrators_apply_each_migration_once(pg_admin_url: str) -> None:
    name = f"tickweave_race_{uuid.uuid4().hex[:8]}"
    create_database(pg_admin_url, name)
    url = with_database(pg_admin_url, name)
    barrier = threading.Barrier(4)
    results: list[list[int]] = []
    errors: list[BaseException] = []

    def run() -> None:
        barrier.wait()
        try:
            results.append(migrate(url))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(4)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        assert not errors
        applied = sorted(v for r in results for v in r)
        assert applied == [m.version for m in load_migrations()]  # each once, by exactly one migrator
        with psycopg.connect(url) as conn:
            rows = conn.execute("SELECT count(*) FROM schema_migrations").fetchone()
        assert rows is not None and rows[0] == len(load_migrations())
    finally:
        drop_database(pg_admin_url, name)


def _migrate_to(url: str, last: int) -> None:
    """Apply the migrations up to `last` (as `migrate` does, one transaction each): a database
    as a server of that release left it."""
    with psycopg.connect(url) as conn:
        conn.execute("""CREATE TABLE IF NOT EXISTS schema_migrations (
                            version integer PRIMARY KEY, name text NOT NULL,
                            applied_at timestamptz NOT NULL DEFAULT now())""")
        for migration in load_migrations():
            if migration.version > last:
                break
            with conn.transaction():
                conn.execute(migration.sql.encode())
                conn.execute("INSERT INTO schema_migrations (version, name) VALUES (%s, %s)",
                             (migration.version, migration.name))


def test_dead_tasks_of_an_older_release_read_as_failed_and_dead_lettered(pg_admin_url: str) -> None:
    """0021: `dead` rows become `failed` (their dead letters stay theirs), runs count their failed
    tasks, `dead` is refused from then on, and the callback's generic-plan setting stays."""
    name = f"tickweave_dead_{uuid.uuid4().hex[:8]}"
    create_database(pg_admin_url, name)
    url = with_database(pg_admin_url, name)
    run_id, dead_id, rejected_id, ok_id = (uuid.uuid4() for _ in range(4))
    try:
        _migrate_to(url, 20)
        with psycopg.connect(url) as conn:
            conn.execute("INSERT INTO workspaces (id) VALUES ('acme')")
            conn.execute("INSERT INTO pipelines (workspace_id, id, current_version) VALUES ('acme', 'p', 1)")
            conn.execute("""INSERT INTO pipeline_versions (workspace_id, pipeline_id, version, sha256, definition)
                            VALUES ('acme', 'p', 1, 'x', '{}')""")
            conn.execute("""INSERT INTO runs (id, workspace_id, pipeline_id, pipeline_version, status, trigger, versions,
                                              unfinished_tasks, failed_tasks)
                            VALUES (%s, 'acme', 'p', 1, 'succeeded', 'manual', '{default}', 0, 0)""", (run_id,))
            for task_id, node, kind, status in ((dead_id, "a", "task", "dead"), (rejected_id, "b", "approval", "failed"),
                                                (ok_id, "c", "task", "succeeded")):
                conn.execute("""INSERT INTO tasks (id, run_id, workspace_id, pipeline_id, node_id, version, position, kind,
                                                   transport, status, retry, heartbeat_s, on_failure, trigger_rule,
                                                   unfinished_deps)
                                VALUES (%s, %s, 'acme', 'p', %s, 'default', 0, %s, 'local', %s, '{}', 60, 'continue',
                                        'all_success', 0)""", (task_id, run_id, node, kind, status))
            conn.execute("""INSERT INTO dead_letters (workspace_id, pipeline_id, run_id, task_id, node_id, version)
                            VALUES ('acme', 'p', %s, %s, 'a', 'default')""", (run_id, dead_id))
        assert 21 in migrate(url)
        with psycopg.connect(url) as conn:
            rows = conn.execute(
                """SELECT t.id, t.status, EXISTS (SELECT 1 FROM dead_letters d WHERE d.task_id = t.id
                                                  AND d.retried_at IS NULL) AS dead_lettered
                   FROM tasks t""").fetchall()
            assert {r[0]: (r[1], r[2]) for r in rows} == {
                dead_id: ("failed", True), rejected_id: ("failed", False), ok_id: ("succeeded", False)}
            assert conn.execute("SELECT failed_task_count FROM runs WHERE id = %s", (run_id,)).fetchone() == (2,)
            config = conn.execute("SELECT proname, proconfig FROM pg_proc WHERE proname IN "
                                  "('tw_complete_attempts', 'tw_complete_one', 'tw_finish_attempt')").fetchall()
            # (0021 keeps the settings 0020 gave; 0025 adds enable_seqscan=off)
            assert dict(config) == {"tw_complete_attempts": ["plan_cache_mode=force_generic_plan",
                                                             "enable_seqscan=off"],
                                    "tw_complete_one": None, "tw_finish_attempt": None}
            assert not any("'dead'" in body for _, body in conn.execute(
                "SELECT proname, pg_get_functiondef(oid) FROM pg_proc WHERE proname LIKE 'tw\\_%'").fetchall())
            with pytest.raises(psycopg.errors.CheckViolation), conn.transaction():
                conn.execute("UPDATE tasks SET status = 'dead' WHERE id = %s", (ok_id,))
    finally:
        drop_database(pg_admin_url, name)
