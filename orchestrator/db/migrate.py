"""Apply the numbered SQL files in `migrations/`, each once, under an advisory lock.

The lock makes concurrent migrators (two cold Lambdas, `make dev` beside a test run) queue
instead of racing; the second finds the work done.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from importlib import resources

from orchestrator.db.connection import connect

# Arbitrary constant shared by every migrator: pg_advisory_lock(bigint).
MIGRATION_LOCK_KEY = 7_310_255_112
_FILE_PATTERN = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str


def load_migrations() -> list[Migration]:
    found: list[Migration] = []
    for entry in resources.files("orchestrator.db").joinpath("migrations").iterdir():
        match = _FILE_PATTERN.match(entry.name)
        if match:
            found.append(Migration(int(match.group(1)), match.group(2), entry.read_text(encoding="utf-8")))
    found.sort(key=lambda m: m.version)
    versions = [m.version for m in found]
    if versions != list(range(1, len(found) + 1)):
        raise RuntimeError(f"migration files must be numbered 0001.. without gaps, found {versions}")
    return found


def migrate(url: str) -> list[int]:
    """Apply pending migrations; returns the versions applied by this call."""
    applied_now: list[int] = []
    with connect(url) as conn:
        conn.execute("SELECT pg_advisory_lock(%s)", (MIGRATION_LOCK_KEY,))
        try:
            conn.execute(
                """CREATE TABLE IF NOT EXISTS schema_migrations (
                       version integer PRIMARY KEY,
                       name text NOT NULL,
                       applied_at timestamptz NOT NULL DEFAULT now())"""
            )
            done = {row["version"] for row in conn.execute("SELECT version FROM schema_migrations")}
            for migration in load_migrations():
                if migration.version in done:
                    continue
                with conn.transaction():
                    conn.execute(migration.sql.encode())  # bytes: no client-side % parsing
                    conn.execute(
                        "INSERT INTO schema_migrations (version, name) VALUES (%s, %s)",
                        (migration.version, migration.name),
                    )
                applied_now.append(migration.version)
        finally:
            conn.execute("SELECT pg_advisory_unlock(%s)", (MIGRATION_LOCK_KEY,))
    return applied_now


def applied_versions(url: str) -> list[int]:
    with connect(url) as conn:
        exists = conn.execute("SELECT to_regclass('schema_migrations') IS NOT NULL AS e").fetchone()
        if not exists or not exists["e"]:
            return []
        return [r["version"] for r in conn.execute("SELECT version FROM schema_migrations ORDER BY 1")]
