"""`tickweave dev` / `make dev`: the whole stack on this machine, the same code as on Lambda.

Embedded Postgres (unless DATABASE_URL), a moto server for S3 and STS (unless S3_ENDPOINT_URL),
migrations, the dev API key, the example pipelines, the API under uvicorn with the local worker
in-process, and a ticker playing EventBridge. Ctrl-C or SIGTERM stops all of it.
"""

from __future__ import annotations

import logging
import os
import signal
from pathlib import Path

import psycopg
import uvicorn

from infra.postgres import (
    create_database,
    server_url,
    start_embedded_postgres,
    stop_embedded_postgres,
    with_database,
)
from infra.s3 import FAKE_AWS_ENV, start_moto_server
from infra.ticker import Ticker
from orchestrator.api.app import create_app
from orchestrator.config import load_settings
from orchestrator.db.migrate import migrate
from orchestrator.engine.errors import Conflict
from orchestrator.engine.service import Engine
from orchestrator.engine.templates import load_example_templates
from orchestrator.graph import parse_definition_text
from orchestrator.logs import configure_logging
from orchestrator.storage.s3 import ensure_bucket

log = logging.getLogger("tickweave.dev")

# moto accepts any role; naming one makes workers get scoped STS credentials, as on AWS.
DEV_STORAGE_ROLE = "arn:aws:iam::123456789012:role/tickweave-worker-storage"


def load_example_pipelines(engine: Engine, workspace: str, directory: Path) -> list[str]:
    loaded = []
    for path in sorted(directory.glob("*.y*ml")) + sorted(directory.glob("*.json")):
        raw = parse_definition_text(path.read_bytes(), "application/json" if path.suffix == ".json" else None)
        saved = engine.update_pipeline(workspace, raw["id"], raw, actor="make-dev", create_missing=True)
        loaded.append(f"{saved.id} v{saved.version}")
    return loaded


def _redacted(url: str) -> str:
    """The database URL without its password: the banner ends up in terminals and logs."""
    info = psycopg.conninfo.conninfo_to_dict(url)
    if info.get("password"):
        info["password"] = "***"
    return psycopg.conninfo.make_conninfo("", **{k: str(v) for k, v in info.items() if v is not None})


def _exit_on_signal(signum: int, frame: object) -> None:
    raise SystemExit(0)


def run_dev(root: Path | None = None) -> int:
    configure_logging()  # JSON lines, as on Lambda; LOG_LEVEL (default INFO)
    root = (root or Path.cwd()).resolve()
    data_dir = root / ".tickweave"
    data_dir.mkdir(exist_ok=True)
    port = int(os.environ.get("PORT", "8000"))
    host = os.environ.get("HOST", "127.0.0.1")
    interval = float(os.environ.get("TICK_INTERVAL_S", "2"))
    dev_key = os.environ.get("TICKWEAVE_DEV_API_KEY", "dev-key")

    pg_handle = None
    moto = None
    ticker = None
    engine = None
    try:
        if not os.environ.get("DATABASE_URL"):
            pg_handle = start_embedded_postgres(data_dir / "pgdata")
            create_database(server_url(pg_handle), "tickweave")
            os.environ["DATABASE_URL"] = with_database(server_url(pg_handle), "tickweave")
        if not os.environ.get("S3_ENDPOINT_URL"):
            moto = start_moto_server(port=int(os.environ.get("MOTO_PORT", "4566")))
            os.environ["S3_ENDPOINT_URL"] = moto.endpoint_url
            for name, value in FAKE_AWS_ENV.items():
                os.environ.setdefault(name, value)
            os.environ.setdefault("TICKWEAVE_STORAGE_ROLE_ARN", DEV_STORAGE_ROLE)
        os.environ.setdefault("TICKWEAVE_PUBLIC_URL", f"http://{host}:{port}")
        # Worker services you run next to `make dev` listen on loopback: let them register.
        # Never set this on a shared deployment (see docs/workers.md).
        os.environ.setdefault("TICKWEAVE_ALLOW_PRIVATE_WORKER_ENDPOINTS", "true")
        settings = load_settings()

        applied = migrate(settings.database_url)
        ensure_bucket(settings)
        engine = Engine(settings)
        try:
            # A no-op on a restart against the same database, while the key is still active.
            engine.create_api_key("default", "admin", name="dev", raw_key=dev_key)
        except Conflict:
            raise SystemExit(
                f"the dev API key {dev_key!r} exists in this database but was revoked or belongs to "
                "another workspace or role; set TICKWEAVE_DEV_API_KEY to a new value"
            ) from None
        templates_loaded = load_example_templates(engine, "default", root / "examples" / "templates")
        loaded = load_example_pipelines(engine, "default", root / "examples" / "pipelines")

        app = create_app(settings, engine)
        server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning"))
        ticker = Ticker(f"http://{host}:{port}/api/tick", settings.tick_secret, interval)
        ticker.start()
        print(
            "\nTickweave is running\n"
            f"  API        http://{host}:{port}/api   (API key: {dev_key}, workspace: default)\n"
            f"  Dashboard  http://{host}:{port}/\n"
            f"  Database   {_redacted(settings.database_url)}  (migrations applied now: {applied or 'none'})\n"
            f"  S3         {settings.s3_endpoint_url}  bucket {settings.bucket}\n"
            f"  Ticker     every {interval:g}s -> POST /api/tick\n"
            f"  Worker     in-process: {settings.local_worker}\n"
            f"  Pipelines  {', '.join(loaded) or 'none'}\n"
            f"  Templates  {', '.join(str(t) for t in templates_loaded) or 'none'}\n"
            f"  Data       {data_dir}\n"
            "Ctrl-C stops everything.\n",
            flush=True,
        )
        # uvicorn shuts down gracefully on SIGINT/SIGTERM and then re-raises the signal to the
        # handler that was installed before it: make that one unwind through `finally` below, so
        # Postgres, moto and the ticker stop too instead of the process dying on the spot.
        signal.signal(signal.SIGTERM, _exit_on_signal)
        signal.signal(signal.SIGINT, _exit_on_signal)
        server.run()
        return 0
    finally:
        if ticker is not None:
            ticker.stop()
        if engine is not None:
            engine.close()
        if moto is not None:
            moto.stop()
        if pg_handle is not None:
            stop_embedded_postgres(pg_handle)
        print("Tickweave stopped.", flush=True)


if __name__ == "__main__":
    raise SystemExit(run_dev())
