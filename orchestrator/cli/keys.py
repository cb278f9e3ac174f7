"""API key commands: `keys create`, `keys list`, `keys revoke`, through the API with an admin
key of the workspace (TICKWEAVE_API_KEY), so operating a workspace needs no database access.

`keys create --workspace W` is the one exception: it writes the key in the database
(DATABASE_URL), for the first admin key of a workspace that has none yet.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

from orchestrator.cli.common import (
    EXIT_OK,
    Parents,
    api_client,
    emit_json,
    open_engine,
    read_or_emit,
    require_key,
    seg,
    show_time,
    table,
)

if TYPE_CHECKING:
    from orchestrator.cli.common import Subparsers

ROLES = ("viewer", "operator", "admin")


def cmd_keys_create(args: argparse.Namespace) -> int:
    name: str = args.name or ""
    if args.workspace:
        answer = _create_in_database(args.workspace, args.role, name)
    else:
        require_key(args, "an admin")
        with api_client(args) as client:
            answer = dict(client.request("POST", "/api/keys", json={"role": args.role, "name": name}))
    if args.json:
        emit_json(answer)
    else:
        named = f" '{answer['name']}'" if answer.get("name") else ""
        print(f"key {answer['id']}{named} ({answer['role']} in {answer['workspace']}); shown once:\n{answer['key']}")
    return EXIT_OK


def _create_in_database(workspace: str, role: str, name: str) -> dict[str, Any]:
    engine = open_engine()
    try:
        raw, key_id = engine.create_api_key(workspace, role, name=name)
    finally:
        engine.close()
    return {"id": str(key_id), "key": raw, "workspace": workspace, "role": role, "name": name}


def cmd_keys_list(args: argparse.Namespace) -> int:
    require_key(args, "an admin")
    answer = read_or_emit(args, "/api/keys")
    if answer is None:
        return EXIT_OK
    items = answer.get("items") or []
    rows = [[str(k.get("id")), str(k.get("prefix")), str(k.get("role")), str(k.get("name") or "-"),
             show_time(k.get("created_at")),
             "revoked " + show_time(k["revoked_at"]) if k.get("revoked_at") else "active"]
            for k in items]
    print(table(["ID", "PREFIX", "ROLE", "NAME", "CREATED (UTC)", "STATE"], rows))
    return EXIT_OK


def cmd_keys_revoke(args: argparse.Namespace) -> int:
    require_key(args, "an admin")
    with api_client(args) as client:
        answer = client.request("DELETE", f"/api/keys/{seg(args.key_id)}")
    if args.json:
        emit_json(answer)
    else:
        print(f"key {answer.get('id', args.key_id)} revoked: requests with it now answer 401")
    return EXIT_OK


def register(sub: Subparsers, parents: Parents) -> None:
    api = parents.api
    keys = sub.add_parser("keys", help="API keys of the workspace (admin key)").add_subparsers(
        dest="keys_command", required=True, metavar="COMMAND")
    create = keys.add_parser(
        "create", parents=api, help="create an API key (printed once)",
        description="Create an API key in the workspace of the admin key given (--api-key or TICKWEAVE_API_KEY). "
                    "With --workspace, write it in the database instead (DATABASE_URL): the first admin key of "
                    "a new workspace.")
    create.add_argument("--role", choices=ROLES, default="admin", help="default admin")
    create.add_argument("--name", help="what the key is for; runs it triggers show it")
    create.add_argument("--workspace", help="create it in the database (DATABASE_URL) for this workspace, "
                                            "without the API")
    create.set_defaults(func=cmd_keys_create)
    listing = keys.add_parser("list", parents=api, help="list the workspace's keys (never the keys themselves)")
    listing.set_defaults(func=cmd_keys_list)
    revoke = keys.add_parser("revoke", parents=api, help="revoke a key by its id (`keys list` shows them)")
    revoke.add_argument("key_id", metavar="ID")
    revoke.set_defaults(func=cmd_keys_revoke)
