"""Workers: register (with their tasks' code hashes), list (with their health), a task
definition's code history (under /api/task-definitions: /api/tasks/{id} is a task of a run)."""

from __future__ import annotations

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from orchestrator.api.common import body_limit, get_engine, guarded
from orchestrator.api.request import read_json, validate
from orchestrator.api.responses import JSON
from orchestrator.api.schemas import RegisterRequest
from orchestrator.engine.errors import InvalidInput, NotFound
from orchestrator.engine.keys import Principal


@guarded("admin")
async def register_worker(request: Request, principal: Principal) -> Response:
    body = validate(RegisterRequest, await read_json(request, body_limit(request)))
    if len({t.name for t in body.tasks}) != len(body.tasks):
        raise InvalidInput("each task name may be registered once per request")
    registration = await run_in_threadpool(lambda: get_engine(request).register_worker(
        principal.workspace_id, service=body.service, version=body.version, transport=body.transport,
        endpoint=body.endpoint, tasks=[t.model_dump() for t in body.tasks]))
    # The signing secret is the registering admin's to hand to the worker (the SDK keeps it);
    # it is never listed or logged, and registering again returns the same one.
    return JSON({"service": body.service, "version": body.version, "tasks": [
        {"name": t.name, "code_hash": t.code_hash, "new_code_version": t.new_code_version}
        for t in registration.tasks], "signing_secret": registration.signing_secret})


@guarded("viewer")
async def list_workers(request: Request, principal: Principal) -> Response:
    return JSON({"items": await run_in_threadpool(get_engine(request).list_workers, principal.workspace_id)})


@guarded("viewer")
async def task_history(request: Request, principal: Principal) -> Response:
    name = request.path_params["task_name"]
    rows = await run_in_threadpool(get_engine(request).task_code_history, principal.workspace_id, name)
    if not rows:
        raise NotFound(f"no worker has registered a task named '{name}'")
    return JSON({"task": name, "versions": rows})


routes: list[Route] = [
    Route("/api/workers/register", register_worker, methods=["POST"]),
    Route("/api/workers", list_workers, methods=["GET"]),
    Route("/api/task-definitions/{task_name}/history", task_history, methods=["GET"]),
]
