"""`tickweave dev` / `make dev`: the whole stack on this machine, the same code as on Lambda.

Embedded Postgres (unless DATABASE_URL), a moto server for S3 and STS (unless S3_ENDPOINT_URL),
migrations, the dev API key, the example pipelines, the API under uvicorn with the local worker
in-process, and a ticker playing EventBridge. The S3 objects are kept in .tickweave/s3 and
the rows in .tickweave/pgdata, so a restart picks up where the last run left off.

Ctrl-C or SIGTERM stops all of it, in order: the ticker (nothing new is claimed), the local
worker (running tasks get TICKWEAVE_DEV_STOP_GRACE_S to finish and call back; the rest are
handed back and run again at the next start), the API, S3 (saving its objects), Postgres.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
from collections.abc import Callable
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
from infra.s3 import DEFAULT_SAVE_INTERVAL_S, FAKE_AWS_ENV, start_moto_server
from infra.ticker import Ticker
from orchestrator.api.app import create_app
from orchestrator.config import load_settings
from orchestrator.db.migrate import migrate
from orchestrator.dispatch.local import LocalTransport
from orchestrator.engine.errors import Conflict
from orchestrator.engine.hand_back import hand_back
from orchestrator.engine.service import Engine
from orchestrator.engine.templates import load_example_templates
from orchestrator.graph import parse_definition_text
from orchestrator.logs import configure_logging
from orchestrator.storage.s3 import ensure_bucket

log = logging.getLogger("tickweave.dev")

# moto accepts any role; naming one makes workers get scoped STS credentials, as on AWS.
DEV_STORAGE_ROLE = "arn:aws:iam::123456789012:role/tickweave-worker-storage"

# How long a stop waits for the local worker's running tasks before handing them back.
DEFAULT_STOP_GRACE_S = 30.0
HAND_BACK_REASON = "make dev stopped before this attempt finished; the task runs again at the next start"


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


class _Stop:
    """Ctrl-C / SIGTERM once: stop in order. Twice: stop in order without waiting for the
    local tasks (they are handed back at once)."""

    def __init__(self) -> None:
        self.requested = threading.Event()
        self.hurry = threading.Event()

    def __call__(self, signum: int, frame: object) -> None:
        if self.requested.is_set():
            self.hurry.set()
        self.requested.set()


def _say(message: str) -> None:
    print(message, flush=True)


def _step(what: str, action: Callable[[], object]) -> None:
    try:
        action()
    except Exception:
        log.exception("%s failed", what)


def run_dev(root: Path | None = None) -> int:
    configure_logging()  # JSON lines, as on Lambda; LOG_LEVEL (default INFO)
    root = (root or Path.cwd()).resolve()
    data_dir = root / ".tickweave"
    data_dir.mkdir(exist_ok=True)
    port = int(os.environ.get("PORT", "8000"))
    host = os.environ.get("HOST", "127.0.0.1")
    interval = float(os.environ.get("TICK_INTERVAL_S", "2"))
    dev_key = os.environ.get("TICKWEAVE_DEV_API_KEY", "dev-key")
    grace_s = float(os.environ.get("TICKWEAVE_DEV_STOP_GRACE_S", str(DEFAULT_STOP_GRACE_S)))
    save_interval_s = float(os.environ.get("TICKWEAVE_DEV_S3_SAVE_INTERVAL_S", str(DEFAULT_SAVE_INTERVAL_S)))

    pg_handle = None
    moto = None
    ticker = None
    engine = None
    server: uvicorn.Server | None = None
    server_thread: threading.Thread | None = None
    abandoned = 0  # local tasks handed back whose threads still run at the end
    exit_code = 0
    # Until the API runs, a signal unwinds through `finally` at once (nothing is in flight yet).
    signal.signal(signal.SIGTERM, _exit_on_signal)
    signal.signal(signal.SIGINT, _exit_on_signal)
    try:
        if not os.environ.get("DATABASE_URL"):
            pg_handle = start_embedded_postgres(data_dir / "pgdata")
            create_database(server_url(pg_handle), "tickweave")
            os.environ["DATABASE_URL"] = with_database(server_url(pg_handle), "tickweave")
        if not os.environ.get("S3_ENDPOINT_URL"):
            # The objects outlive the process in .tickweave/s3 (loaded now, saved every
            # few seconds and at stop), as the rows do in .tickweave/pgdata.
            moto = start_moto_server(port=int(os.environ.get("MOTO_PORT", "4566")),
                                     data_dir=data_dir / "s3", save_interval_s=save_interval_s)
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
        # uvicorn runs on a thread, where it installs no signal handlers: the main thread owns
        # Ctrl-C and SIGTERM, so the stop below goes in our order, not uvicorn's.
        server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning"))
        server_thread = threading.Thread(target=server.run, name="tickweave-api", daemon=True)
        server_thread.start()
        while not server.started:
            if not server_thread.is_alive():  # it could not bind the port (uvicorn said why)
                raise SystemExit(f"the API could not start on {host}:{port}")
            server_thread.join(0.05)
        stop = _Stop()
        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)
        ticker = Ticker(f"http://{host}:{port}/api/tick", settings.tick_secret, interval)
        ticker.start()
        s3_line = f"{settings.s3_endpoint_url}  bucket {settings.bucket}"
        if moto is not None and moto.snapshot is not None:
            s3_line += f"  ({moto.restored} objects restored from {moto.snapshot.directory})"
        _say(
            "\nTickweave is running\n"
            f"  API        http://{host}:{port}/api   (API key: {dev_key}, workspace: default)\n"
            f"  Dashboard  http://{host}:{port}/\n"
            f"  Database   {_redacted(settings.database_url)}  (migrations applied now: {applied or 'none'})\n"
            f"  S3         {s3_line}\n"
            f"  Ticker     every {interval:g}s -> POST /api/tick\n"
            f"  Worker     in-process: {settings.local_worker}\n"
            f"  Pipelines  {', '.join(loaded) or 'none'}\n"
            f"  Templates  {', '.join(str(t) for t in templates_loaded) or 'none'}\n"
            f"  Data       {data_dir}\n"
            "Ctrl-C stops everything.\n"
        )
        while not stop.requested.wait(0.5):
            if not server_thread.is_alive():
                log.error("the API server stopped on its own; stopping the stack")
                exit_code = 1
                break

        # The stop, in order: nothing new starts, running work ends or is handed back while
        # the API and S3 it reports to are still up, then the servers go, S3 saving its objects.
        _say("Stopping: ticker")
        ticker.stop()
        ticker = None
        local = engine.transports.get("local")
        if isinstance(local, LocalTransport):
            _say(f"Stopping: local worker (running tasks get up to {grace_s:g}s to finish; Ctrl-C again to skip)")
            unfinished = local.drain(grace_s, hurry=stop.hurry)
            if unfinished:
                handed = hand_back(engine.db, unfinished, reason=HAND_BACK_REASON)
                abandoned = len(unfinished)
                _say(f"Stopping: local worker handed back {len(handed)} unfinished task(s); "
                     "they run again at the next start")
        _say("Stopping: API")
        server.should_exit = True
        server_thread.join(timeout=30)
        return exit_code
    finally:
        if ticker is not None:
            ticker.stop()
        if server is not None and server_thread is not None and server_thread.is_alive():
            server.should_exit = True
            server_thread.join(timeout=30)
        # Each step runs even if one before it failed: a failed save must not leave Postgres up.
        if engine is not None:
            _step("closing the engine", engine.close)
        if moto is not None:
            if moto.snapshot is not None:
                _say(f"Stopping: S3 (saving its objects to {moto.snapshot.directory})")
            else:
                _say("Stopping: S3")
            _step("stopping S3", moto.stop)
        if pg_handle is not None:
            _say("Stopping: Postgres")
            _step("stopping Postgres", lambda: stop_embedded_postgres(pg_handle))
        _say("Tickweave stopped.")
        if abandoned and sys.exc_info()[0] is None:
            # The threads of handed-back tasks may run for a long time yet (a task that never
            # calls the SDK cannot be told); their attempts are already given back and their
            # callbacks would be refused, so do not wait for them at interpreter exit.
            sys.stdout.flush()
            sys.stderr.flush()
            logging.shutdown()
            os._exit(exit_code)


if __name__ == "__main__":
    raise SystemExit(run_dev())
