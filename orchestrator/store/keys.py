"""Workspaces and API keys. Keys are stored as sha256 digests: they are 32 random bytes, so a
fast hash is enough (no dictionary to attack), and a lookup is one indexed equality."""

from __future__ import annotations

from orchestrator.db.connection import Connection, Row


def ensure_workspace(conn: Connection, workspace_id: str) -> None:
    conn.execute("INSERT INTO workspaces (id) VALUES (%s) ON CONFLICT (id) DO NOTHING", (workspace_id,))


def insert_api_key(
    conn: Connection, *, workspace_id: str, key_hash: bytes, prefix: str, role: str, name: str
) -> Row | None:
    """The new key's row, or None when a key with this hash exists (it is left untouched: it
    may be another workspace's, or revoked, and an insert must never change either)."""
    return conn.execute(
        """INSERT INTO api_keys (workspace_id, key_hash, prefix, role, name)
           VALUES (%s, %s, %s, %s, %s)
           ON CONFLICT (key_hash) DO NOTHING
           RETURNING id, workspace_id, prefix, role, name, created_at""",
        (workspace_id, key_hash, prefix, role, name),
    ).fetchone()


def find_key_by_hash(conn: Connection, key_hash: bytes) -> Row | None:
    """Any key with this hash, revoked or not, whatever its workspace."""
    return conn.execute(
        "SELECT id, workspace_id, role, revoked_at FROM api_keys WHERE key_hash = %s", (key_hash,)
    ).fetchone()


def find_active_key(conn: Connection, key_hash: bytes) -> Row | None:
    return conn.execute(
        """SELECT id, workspace_id, role, prefix, name FROM api_keys
           WHERE key_hash = %s AND revoked_at IS NULL""",
        (key_hash,),
    ).fetchone()


def set_workspace_task_limit(conn: Connection, workspace_id: str, max_active_tasks: int | None) -> bool:
    row = conn.execute(
        "UPDATE workspaces SET max_active_tasks = %s WHERE id = %s RETURNING id", (max_active_tasks, workspace_id)
    ).fetchone()
    return row is not None


def list_keys(conn: Connection, workspace_id: str) -> list[Row]:
    return conn.execute(
        """SELECT id, prefix, role, name, created_at, revoked_at FROM api_keys
           WHERE workspace_id = %s ORDER BY created_at, id""",
        (workspace_id,),
    ).fetchall()


def revoke_key(conn: Connection, workspace_id: str, key_id: object) -> Row | None:
    return conn.execute(
        """UPDATE api_keys SET revoked_at = tw_now()
           WHERE workspace_id = %s AND id = %s AND revoked_at IS NULL RETURNING id""",
        (workspace_id, key_id),
    ).fetchone()


def key_exists(conn: Connection, workspace_id: str, key_id: object) -> bool:
    return conn.execute(
        "SELECT 1 FROM api_keys WHERE workspace_id = %s AND id = %s", (workspace_id, key_id)
    ).fetchone() is not None
