"""The worker protocol: callbacks (one, or a batch), heartbeats, read URLs.

Authenticated by the task token in the body, not an API key. `POST /api/worker/read-urls` is
orchestrator.api.worker_reads.read_urls."""

from __future__ import annotations

from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from orchestrator.api import worker_reads
from orchestrator.api.common import STATUS_BY_ERROR, app_settings, body_limit, get_engine, guarded, parse_uuid
from orchestrator.api.request import read_json, validate
from orchestrator.api.responses import JSON
from orchestrator.api.schemas import BatchedCallback, CallbackBatchEnvelope, CallbackRequest, HeartbeatRequest
from orchestrator.engine.completion import AttemptResult
from orchestrator.engine.errors import EngineError, InvalidInput
from orchestrator.engine.worker_protocol import CallbackInput


def _callback_batch(data: Any, limit: int) -> list[Any]:
    """The items of a `POST /api/callbacks` body, each still unchecked; the envelope refused
    whole (422, nothing recorded) when it is not `{"callbacks": [1 to limit items]}`."""
    shape = f'send {{"callbacks": [{{"task_id", "token", "status", "output" | "error"}}, ...]}} with 1 to {limit} callbacks'
    if not isinstance(data, dict):
        raise InvalidInput(f"the request body is a JSON {_json_type(data)}, not an object; {shape}",
                           details=[{"path": "", "message": "expected an object"}])
    try:
        envelope = validate(CallbackBatchEnvelope, data)
    except InvalidInput as exc:
        raise InvalidInput(f"{exc.message}; {shape}", details=exc.details) from None
    count = len(envelope.callbacks)
    if count == 0:
        raise InvalidInput(f"callbacks is empty; {shape}",
                           details=[{"path": "callbacks", "message": "at least 1 callback"}])
    if count > limit:
        raise InvalidInput(
            f"callbacks holds {count} callbacks, over the limit of {limit} per request; send the rest in "
            "another request", details=[{"path": "callbacks", "message": f"at most {limit} callbacks"}])
    return envelope.callbacks


def _json_type(value: Any) -> str:
    if isinstance(value, list):
        return "array"
    if isinstance(value, str):
        return "string"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    return "null" if value is None else type(value).__name__


def _sent_task_id(item: Any) -> str | None:
    """The item's task_id as sent, echoed in its answer (None unless it is a string)."""
    task_id = item.get("task_id") if isinstance(item, dict) else None
    return task_id if isinstance(task_id, str) else None


def _callback_input(index: int, item: Any) -> CallbackInput:
    """One batched callback checked as the single callback's body is (InvalidInput naming the
    item's position and fields otherwise)."""
    try:
        body = validate(BatchedCallback, item)
    except InvalidInput as exc:
        details = [{**d, "path": f"callbacks.{index}" + (f".{d['path']}" if d["path"] else "")}
                   for d in exc.details or []]
        raise InvalidInput(f"callbacks[{index}] is invalid: " + exc.message.removeprefix("the request body is invalid: "),
                           details=details) from None
    output = body.output.model_dump() if body.output else None
    error = body.error.model_dump(exclude_none=True) if body.error else None
    # The batch is recorded by one statement: a value the database cannot hold would refuse every
    # callback of it (the single callback answers such a value with a 422 of its own).
    for name, value in (("output", output), ("error", error)):
        if _holds_nul(value):
            raise InvalidInput(f"callbacks[{index}].{name} holds a NUL character, which cannot be stored",
                               details=[{"path": f"callbacks.{index}.{name}", "message": "a NUL character"}])
    return CallbackInput(body.task_id, body.token, body.status, output, error)


def _holds_nul(value: Any) -> bool:
    if isinstance(value, str):
        return "\x00" in value
    if isinstance(value, dict):
        return any(_holds_nul(k) or _holds_nul(v) for k, v in value.items())
    if isinstance(value, list):
        return any(_holds_nul(v) for v in value)
    return False


def _batched_answer(task_id: str | None, result: AttemptResult) -> dict[str, Any]:
    """A recorded (or refused) callback of a batch, answered as the single callback answers it."""
    answer: dict[str, Any] = {
        "task_id": task_id, "status": 200, "accepted": result.accepted, "outcome": result.outcome,
        "task_status": result.task_status, "run_status": result.run_status,
    }
    if result.accepted or result.outcome == "duplicate":
        return answer
    return {**answer, "status": 404 if result.outcome == "not_found" else 409,
            "error": {"code": result.outcome, "message": _refusal_message(result.outcome), "details": None}}


def _batched_refusal(task_id: str | None, exc: EngineError) -> dict[str, Any]:
    """A callback of a batch refused before it reached its task (a bad token, a malformed item)."""
    return {"task_id": task_id, "status": STATUS_BY_ERROR.get(type(exc), 400), "accepted": False, "outcome": None,
            "task_status": None, "run_status": None,
            "error": {"code": exc.code, "message": exc.message, "details": exc.details}}


def _refusal_message(outcome: str) -> str:
    return {
        "stale_attempt": "the callback is for an attempt that is no longer current; nothing changed",
        "already_finished": "the task already finished; nothing changed",
        "not_active": "the task is not running; nothing changed",
        "not_found": "no such task",
    }.get(outcome, outcome)


@guarded(None)
async def callback(request: Request) -> Response:
    task_id = parse_uuid(request.path_params["task_id"], "task")
    body = validate(CallbackRequest, await read_json(request, body_limit(request)))
    result = await run_in_threadpool(
        lambda: get_engine(request).record_callback(
            task_id, body.token, status=body.status,
            output=body.output.model_dump() if body.output else None,
            error=body.error.model_dump(exclude_none=True) if body.error else None, seen=True,
        )
    )
    payload = {
        "accepted": result.accepted, "outcome": result.outcome, "task_status": result.task_status,
        "run_status": result.run_status,
    }
    if result.accepted or result.outcome == "duplicate":
        return JSON(payload)  # a duplicate is answered, not an error: the worker may retry safely
    return JSON({**payload, "error": {"code": result.outcome, "message": _refusal_message(result.outcome),
                                      "details": None}},
                status_code=404 if result.outcome == "not_found" else 409)


@guarded(None)
async def callbacks(request: Request) -> Response:
    items = _callback_batch(await read_json(request, body_limit(request)), app_settings(request).max_callbacks_per_batch)
    answers: list[dict[str, Any] | None] = [None] * len(items)
    sent_ids = [_sent_task_id(item) for item in items]
    inputs: list[CallbackInput] = []
    positions: list[int] = []
    for index, item in enumerate(items):
        try:
            inputs.append(_callback_input(index, item))
        except EngineError as exc:  # this item alone is refused; the others are still recorded
            answers[index] = _batched_refusal(sent_ids[index], exc)
            continue
        positions.append(index)
    if inputs:
        results = await run_in_threadpool(lambda: get_engine(request).record_callbacks(inputs, seen=True))
        for index, result in zip(positions, results, strict=True):
            answers[index] = (_batched_answer(sent_ids[index], result) if isinstance(result, AttemptResult)
                              else _batched_refusal(sent_ids[index], result))
    return JSON({"results": answers})


@guarded(None)
async def heartbeat(request: Request) -> Response:
    body = validate(HeartbeatRequest, await read_json(request, body_limit(request)))
    accepted, status, task_id = await run_in_threadpool(
        lambda: get_engine(request).record_heartbeat(
            body.token, progress=body.progress, message=body.message, seen=True)
    )
    if accepted:
        return JSON({"accepted": True, "task_id": task_id, "task_status": status})
    return JSON({"accepted": False, "task_id": task_id, "reason": status,
                 "error": {"code": "refused", "message": f"heartbeat refused: {status}", "details": None}},
                status_code=409)


routes: list[Route] = [
    Route("/api/callback/{task_id}", callback, methods=["POST"]),
    Route("/api/callbacks", callbacks, methods=["POST"]),
    Route("/api/heartbeat", heartbeat, methods=["POST"]),
    Route("/api/worker/read-urls", worker_reads.read_urls, methods=["POST"]),
]
