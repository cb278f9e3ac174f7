"""`tickweave`: operate an orchestrator from a shell."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from orchestrator.config import load_settings
from orchestrator.engine.service import Engine


def _engine() -> Engine:

    settings = load_settings()
    if not settings.database_url:
        sys.exit("DATABASE_URL is not set")
    return Engine(settings, transports={})


def cmd_db_migrate(args: argparse.Namespace) -> int:
    from orchestrator.db.migrate import migrate

    url = args.database_url or os.environ.get("DATABASE_URL")
    if not url:
        print("DATABASE_URL is not set (or pass --database-url)", file=sys.stderr)
        return 2
    applied = migrate(url)
    print(json.dumps({"applied": applied}) if args.json else f"applied migrations: {applied or 'none (up to date)'}")
    return 0


def cmd_keys_create(args: argparse.Namespace) -> int:
    engine = _engine()
    try:
        raw, key_id = engine.create_api_key(args.workspace, args.role, name=args.name or "")
    finally:
        engine.close()
    if args.json:
        print(json.dumps({"id": key_id, "key": raw, "workspace": args.workspace, "role": args.role}))
    else:
        print(f"key {key_id} ({args.role} in {args.workspace}); shown once:\n{raw}")
    return 0


def cmd_workspace_limit(args: argparse.Namespace) -> int:
    from orchestrator.engine.errors import EngineError
    from orchestrator.engine.keys import set_workspace_task_limit

    engine = _engine()
    try:
        set_workspace_task_limit(engine.db, args.workspace, None if args.max_active_tasks == 0 else args.max_active_tasks)
    except EngineError as exc:
        print(exc.message, file=sys.stderr)
        return 2
    finally:
        engine.close()
    print(f"workspace {args.workspace}: max_active_tasks = {args.max_active_tasks or 'unlimited'}")
    return 0


def cmd_backfill(args: argparse.Namespace) -> int:
    """POST /api/pipelines/{id}/backfill with the key in TICKWEAVE_API_KEY; prints the slots."""
    import httpx

    settings = load_settings()
    api_key = os.environ.get("TICKWEAVE_API_KEY")
    if not api_key:
        print("set TICKWEAVE_API_KEY to an operator or admin key", file=sys.stderr)
        return 2
    body: dict[str, object] = {"start": args.start, "end": args.end, "reprocess": args.reprocess,
                               "dry_run": args.dry_run}
    if args.versions:
        body["versions"] = args.versions.split(",")
    if args.max_active_runs:
        body["max_active_runs"] = args.max_active_runs
    url = (args.url or settings.public_url).rstrip("/") + f"/api/pipelines/{args.pipeline}/backfill"
    try:
        response = httpx.post(url, json=body, headers={"Authorization": f"Bearer {api_key}"}, timeout=120)
    except httpx.HTTPError as exc:
        print(f"could not reach {url}: {exc}", file=sys.stderr)
        return 1
    answer = response.json()
    if args.json or response.status_code >= 400:
        print(json.dumps(answer, indent=2))
        return 0 if response.status_code < 400 else 1
    for slot in answer["slots"]:
        print(f"{slot['slot']}  {slot['action']:4}  {slot['reason'] or ''}")
    verb = "would create" if args.dry_run else "created"
    print(f"{verb} {sum(1 for s in answer['slots'] if s['action'] == 'run')} runs, skipped {answer['skipped']}"
          + ("" if args.dry_run else f" (backfill {answer['id']})"))
    return 0


def cmd_tick(args: argparse.Namespace) -> int:
    """POST /api/tick as EventBridge would: the tick runs where the workers' transports live."""
    import httpx

    settings = load_settings()
    url = (args.url or settings.public_url).rstrip("/") + "/api/tick"
    try:
        response = httpx.post(url, headers={"x-tick-secret": settings.tick_secret}, timeout=60)
    except httpx.HTTPError as exc:
        print(f"could not reach {url}: {exc}", file=sys.stderr)
        return 1
    print(response.text)
    return 0 if response.status_code == 200 else 1


def cmd_dev(args: argparse.Namespace) -> int:
    # infra/ (local stand-ins for the cloud) ships with the repository, not the wheel.
    if (Path.cwd() / "infra" / "dev.py").exists():
        sys.path.insert(0, str(Path.cwd()))
    try:
        from infra.dev import run_dev
    except ImportError:
        print("`tickweave dev` runs from a checkout of the repository (it needs infra/ and examples/)", file=sys.stderr)
        return 2
    return run_dev(Path.cwd())


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tickweave", description="Tickweave pipeline orchestrator")
    sub = parser.add_subparsers(dest="command", required=True)

    db = sub.add_parser("db", help="database commands").add_subparsers(dest="db_command", required=True)
    mig = db.add_parser("migrate", help="apply pending SQL migrations (advisory-locked)")
    mig.add_argument("--database-url")
    mig.add_argument("--json", action="store_true")
    mig.set_defaults(func=cmd_db_migrate)

    keys = sub.add_parser("keys", help="API keys").add_subparsers(dest="keys_command", required=True)
    create = keys.add_parser("create", help="create an API key (printed once)")
    create.add_argument("--workspace", required=True)
    create.add_argument("--role", choices=["viewer", "operator", "admin"], default="admin")
    create.add_argument("--name")
    create.add_argument("--json", action="store_true")
    create.set_defaults(func=cmd_keys_create)

    workspaces = sub.add_parser("workspaces", help="workspace settings").add_subparsers(
        dest="workspaces_command", required=True)
    limit = workspaces.add_parser("limit", help="limit the workspace's tasks out with workers at once")
    limit.add_argument("--workspace", required=True)
    limit.add_argument("--max-active-tasks", type=int, required=True, help="0 removes the limit")
    limit.set_defaults(func=cmd_workspace_limit)

    backfill = sub.add_parser("backfill", help="run a pipeline for the schedule slots of a past range")
    backfill.add_argument("pipeline")
    backfill.add_argument("--start", required=True, help="ISO time with a timezone, e.g. 2026-01-01T00:00:00Z")
    backfill.add_argument("--end", required=True)
    backfill.add_argument("--versions", help="comma-separated data versions")
    backfill.add_argument("--max-active-runs", type=int)
    backfill.add_argument("--reprocess", choices=["none", "failed", "all"], default="none")
    backfill.add_argument("--dry-run", action="store_true")
    backfill.add_argument("--url", help="API base URL (default TICKWEAVE_PUBLIC_URL)")
    backfill.add_argument("--json", action="store_true")
    backfill.set_defaults(func=cmd_backfill)

    tick = sub.add_parser("tick", help="ask the API for one tick (expire leases, claim, dispatch)")
    tick.add_argument("--url", help="API base URL (default TICKWEAVE_PUBLIC_URL)")
    tick.set_defaults(func=cmd_tick)

    dev = sub.add_parser("dev", help="run the whole stack locally (make dev)")
    dev.set_defaults(func=cmd_dev)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
