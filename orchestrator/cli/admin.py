"""Commands for the server and the database: `db migrate`, `db check`, `workspaces limit`
(these work on DATABASE_URL directly), `tick` and `dev` (the local stack)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from orchestrator.cli.common import EXIT_FAILED, EXIT_OK, CliError, Parents, emit_json, open_engine
from orchestrator.client import TickweaveClient, resolve_url

if TYPE_CHECKING:
    from orchestrator.cli.common import Subparsers


def cmd_db_migrate(args: argparse.Namespace) -> int:
    from orchestrator.db.migrate import migrate

    url = args.database_url or os.environ.get("DATABASE_URL")
    if not url:
        raise CliError("DATABASE_URL is not set (or pass --database-url)")
    applied = migrate(url)
    if args.json:
        emit_json({"applied": applied})
    else:
        print(f"applied migrations: {applied or 'none (up to date)'}")
    return EXIT_OK


def cmd_db_check(args: argparse.Namespace) -> int:
    """Recompute the DAG's books (dependency and run counters, derived statuses, limits) from
    the edges and task statuses; exit 1 on any violation (docs/reliability.md)."""
    from orchestrator.store.invariants import find_violations

    url = args.database_url or os.environ.get("DATABASE_URL")
    if not url:
        raise CliError("DATABASE_URL is not set (or pass --database-url)")
    violations = find_violations(url)
    if args.json:
        emit_json({"ok": not violations, "violations": [v.to_dict() for v in violations]})
    elif not violations:
        print("the books are clean: every counter and derived state matches the edges and task statuses")
    else:
        for v in violations:
            where = " ".join(f"{k} {val}" for k, val in (("run", v.run_id), ("task", v.task_id)) if val)
            print(f"[{v.check}] {where}: {v.message}".replace(" :", ":"))
        print(f"{len(violations)} violation(s)")
    return EXIT_FAILED if violations else EXIT_OK



def cmd_workspace_limit(args: argparse.Namespace) -> int:
    from orchestrator.engine.errors import EngineError
    from orchestrator.engine.keys import set_workspace_task_limit

    limit = None if args.max_active_tasks == 0 else args.max_active_tasks
    engine = open_engine()
    try:
        set_workspace_task_limit(engine.db, args.workspace, limit)
    except EngineError as exc:
        raise CliError(exc.message) from None
    finally:
        engine.close()
    if args.json:
        emit_json({"workspace": args.workspace, "max_active_tasks": limit})
    else:
        print(f"workspace {args.workspace}: max_active_tasks = {args.max_active_tasks or 'unlimited'}")
    return EXIT_OK



def cmd_tick(args: argparse.Namespace) -> int:
    """POST /api/tick as EventBridge would: the tick runs where the workers' transports live."""
    from orchestrator.config import load_settings

    settings = load_settings()
    url = resolve_url(args.url) if (args.url or os.environ.get("TICKWEAVE_URL")) else settings.public_url
    with TickweaveClient(url, timeout=60) as client:
        summary = client.tick(settings.tick_secret)
    if args.json:
        emit_json(summary)
    else:
        print(json.dumps(summary))
    return EXIT_OK


def cmd_dev(args: argparse.Namespace) -> int:
    # infra/ (local stand-ins for the cloud) ships with the repository, not the wheel.
    if (Path.cwd() / "infra" / "dev.py").exists():
        sys.path.insert(0, str(Path.cwd()))
    try:
        from infra.dev import run_dev
    except ImportError:
        raise CliError("`tickweave dev` runs from a checkout of the repository (it needs infra/ and examples/)") from None
    return int(run_dev(Path.cwd()))


def register(sub: Subparsers, parents: Parents) -> None:
    output = parents.output
    db = sub.add_parser("db", help="database commands (DATABASE_URL)").add_subparsers(
        dest="db_command", required=True, metavar="COMMAND")
    mig = db.add_parser("migrate", parents=[output], help="apply pending SQL migrations (advisory-locked)")
    mig.add_argument("--database-url")
    mig.set_defaults(func=cmd_db_migrate)
    check = db.add_parser("check", parents=[output],
                          help="check the DAG's books (counters, derived states, limits); exit 1 on a violation")
    check.add_argument("--database-url")
    check.set_defaults(func=cmd_db_check)

    workspaces = sub.add_parser("workspaces", help="workspace settings").add_subparsers(
        dest="workspaces_command", required=True, metavar="COMMAND")
    limit = workspaces.add_parser("limit", parents=[output],
                                  help="limit the workspace's tasks out with workers at once (needs DATABASE_URL)")
    limit.add_argument("--workspace", required=True)
    limit.add_argument("--max-active-tasks", type=int, required=True, help="0 removes the limit")
    limit.set_defaults(func=cmd_workspace_limit)

    tick = sub.add_parser("tick", parents=[output], help="ask the API for one tick (expire leases, claim, dispatch)")
    tick.add_argument("--url", default=argparse.SUPPRESS,
                      help="API base URL (default: TICKWEAVE_URL, then TICKWEAVE_PUBLIC_URL); the secret is "
                           "TICKWEAVE_TICK_SECRET")
    tick.set_defaults(func=cmd_tick)

    dev = sub.add_parser("dev", help="run the whole stack locally (make dev)")
    dev.set_defaults(func=cmd_dev)
