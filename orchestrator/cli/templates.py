"""Template commands: `templates list`, `show`, `create FILE` and `update FILE` (a template is
a reusable node body; docs/pipelines.md). Creating and updating need an admin key."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from orchestrator.cli.common import (
    EXIT_OK,
    CliError,
    Parents,
    api_client,
    emit_json,
    one_line,
    page_size,
    read_or_emit,
    require_key,
    seg,
    show_time,
    table,
)

if TYPE_CHECKING:
    from orchestrator.cli.common import Subparsers


def read_template(name: str) -> dict[str, Any]:
    """One template from a YAML or JSON file (`-`: stdin)."""
    from orchestrator.graph import DefinitionInvalid, parse_definition_text

    try:
        text = sys.stdin.read() if name == "-" else Path(name).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise CliError(f"{name}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise CliError(f"{name}: cannot read: {exc}") from None
    try:
        data = parse_definition_text(text, "application/json" if name.lower().endswith(".json") else None)
    except DefinitionInvalid as exc:
        raise CliError(f"{name}: cannot parse it", lines=[e.message for e in exc.errors]) from None
    if not isinstance(data, dict):
        raise CliError(f"{name}: a template must be an object with an `id` (one template per file)")
    return data


def cmd_templates_list(args: argparse.Namespace) -> int:
    page = read_or_emit(args, "/api/templates", params=_page(args))
    if page is None:
        return EXIT_OK
    items = page.get("items") or []
    if not items:
        print("no templates (create one with `tickweave templates create FILE`)")
        return EXIT_OK
    rows = [[str(t.get("id")), f"v{t.get('version')}", str(t.get("task") or "-"),
             one_line(", ".join(str(p) for p in t.get("used_by") or []) or "-", 40), show_time(t.get("updated_at")),
             one_line(str(t.get("description") or ""), 50)] for t in items]
    print(table(["TEMPLATE", "VERSION", "TASK", "USED BY", "UPDATED (UTC)", "DESCRIPTION"], rows))
    if page.get("next_cursor"):
        print(f"more: --cursor {page['next_cursor']}")
    return EXIT_OK


def _page(args: argparse.Namespace) -> dict[str, str | int | bool]:
    params: dict[str, str | int | bool] = {"limit": args.limit}
    if args.cursor:
        params["cursor"] = args.cursor
    return params


def _print_template(template: dict[str, Any]) -> None:
    import yaml

    print(f"template {template.get('id')}  v{template.get('version')}  task {template.get('task') or '-'}")
    if template.get("description"):
        print(f"  description  {one_line(str(template['description']), 100)}")
    print(f"  updated      {show_time(template.get('updated_at'))}  (created {show_time(template.get('created_at'))})")
    print(f"  used by      {', '.join(str(p) for p in template.get('used_by') or []) or 'no pipeline'}")
    if template.get("body"):
        print()
        print(str(yaml.safe_dump(template["body"], sort_keys=False, default_flow_style=False,
                                 allow_unicode=True, width=100)).rstrip())


def cmd_templates_show(args: argparse.Namespace) -> int:
    template = read_or_emit(args, f"/api/templates/{seg(args.template_id)}")
    if template is not None:
        _print_template(template)
    return EXIT_OK


def cmd_templates_create(args: argparse.Namespace) -> int:
    body = read_template(args.file)
    require_key(args, "an admin")
    with api_client(args) as client:
        template = client.request("POST", "/api/templates", json=body)
    if args.json:
        emit_json(template)
    else:
        print(f"template {template.get('id')}: created (version {template.get('version')})")
    return EXIT_OK


def cmd_templates_update(args: argparse.Namespace) -> int:
    body = read_template(args.file)
    template_id = body.get("id")
    if not isinstance(template_id, str) or not template_id:
        raise CliError(f"{args.file}: the template has no `id`; it names the template to update")
    require_key(args, "an admin")
    with api_client(args) as client:
        template = client.request("PUT", f"/api/templates/{seg(template_id)}", json=body)
    if args.json:
        emit_json(template)
    elif template.get("changed", True):
        print(f"template {template.get('id')}: updated to version {template.get('version')} (pipelines pick it up "
              "on their next `apply`)")
    else:
        print(f"template {template.get('id')}: unchanged (version {template.get('version')})")
    return EXIT_OK


def register(sub: Subparsers, parents: Parents) -> None:
    api = parents.api
    templates = sub.add_parser("templates", help="reusable node bodies: list, show, create, update").add_subparsers(
        dest="templates_command", required=True, metavar="COMMAND")
    listing = templates.add_parser("list", parents=api, help="list the workspace's templates")
    listing.add_argument("--limit", type=page_size, default=100, help="1 to 500 (default 100)")
    listing.add_argument("--cursor", help="next page: the cursor the previous page printed")
    listing.set_defaults(func=cmd_templates_list)
    show = templates.add_parser("show", parents=api, help="show a template and its body")
    show.add_argument("template_id", metavar="TEMPLATE")
    show.set_defaults(func=cmd_templates_show)
    create = templates.add_parser("create", parents=api, help="create a template from a YAML/JSON file (admin key)")
    create.add_argument("file", metavar="FILE", help="one template (YAML or JSON), or - (stdin)")
    create.set_defaults(func=cmd_templates_create)
    update = templates.add_parser("update", parents=api,
                                  help="store a new version of the template the file names by its id (admin key)")
    update.add_argument("file", metavar="FILE", help="one template (YAML or JSON), or - (stdin)")
    update.set_defaults(func=cmd_templates_update)
