"""Task templates: create, list, get, update."""

from __future__ import annotations

from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from orchestrator.api.common import body_limit, get_engine, guarded, page_limit
from orchestrator.api.request import read_definition
from orchestrator.api.responses import JSON
from orchestrator.engine.keys import Principal


def _template_view(row: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": row["id"], "version": row["version"], "sha256": row["sha256"], "task": row["task"],
        "description": row["description"] or "", "created_at": row["created_at"], "updated_at": row["updated_at"],
        "used_by": list(row["used_by"]),
    }


@guarded("admin")
async def create_template(request: Request, principal: Principal) -> Response:
    raw = await read_definition(request, body_limit(request), "template")
    saved = await run_in_threadpool(get_engine(request).create_template, principal.workspace_id, raw, actor=principal.actor)
    row = await run_in_threadpool(get_engine(request).get_template, principal.workspace_id, saved.id)
    return JSON({**_template_view(row), "body": row["body"]}, status_code=201)


@guarded("admin")
async def update_template(request: Request, principal: Principal) -> Response:
    template_id = request.path_params["template_id"]
    raw = await read_definition(request, body_limit(request), "template")
    saved = await run_in_threadpool(
        get_engine(request).update_template, principal.workspace_id, template_id, raw, actor=principal.actor
    )
    row = await run_in_threadpool(get_engine(request).get_template, principal.workspace_id, saved.id)
    return JSON({**_template_view(row), "body": row["body"], "changed": saved.changed})


@guarded("viewer")
async def list_templates(request: Request, principal: Principal) -> Response:
    limit = page_limit(request, 100)
    after = request.query_params.get("cursor")
    rows = await run_in_threadpool(
        lambda: get_engine(request).list_templates(principal.workspace_id, limit=limit, after_id=after)
    )
    next_cursor = rows[-1]["id"] if len(rows) == limit else None
    return JSON({"items": [_template_view(r) for r in rows], "next_cursor": next_cursor})


@guarded("viewer")
async def get_template(request: Request, principal: Principal) -> Response:
    row = await run_in_threadpool(get_engine(request).get_template, principal.workspace_id, request.path_params["template_id"])
    return JSON({**_template_view(row), "body": row["body"]})


routes: list[Route] = [
    Route("/api/templates", create_template, methods=["POST"]),
    Route("/api/templates", list_templates, methods=["GET"]),
    Route("/api/templates/{template_id}", get_template, methods=["GET"]),
    Route("/api/templates/{template_id}", update_template, methods=["PUT"]),
]
