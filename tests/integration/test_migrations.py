"""The schema a fresh database gets from the migrations, and the migrator's locking."""

from __future__ import annotations

import threading
import uuid
from typing import Any

import psycopg

from infra.postgres import create_database, drop_database, with_database
from orchestrator.db.migrate import applied_versions, load_migrations, migrate

EXPECTED_TABLES = {
    "workspaces", "api_keys", "pipelines", "pipeline_versions", "runs", "tasks", "task_edges",
    "task_attempts", "schema_migrations", "schedules", "schedule_skips", "tw_clock", "dead_letters",
    "workers", "worker_tasks", "task_code_versions", "templates", "template_versions",
    "pipeline_template_refs", "events", "backfills", "pipeline_dependencies", "orchestrations",
    "run_dependencies", "pipeline_outputs", "run_inputs", "pipeline_triggers", "map_items",
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
