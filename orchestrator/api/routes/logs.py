"""Task logs: the log one attempt of a task stored (its `logging` records and prints), read from
an offset, so that a reader polling while the task runs fetches only what is new."""

from __future__ import annotations

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from orchestrator.api.common import get_engine, guarded, parse_uuid
from orchestrator.engine.errors import InvalidInput
from orchestrator.engine.keys import Principal
from orchestrator.engine.task_logs import MAX_ATTEMPT, read_attempt_log

# Far past any log (the SDK caps one at 1 MiB), and small enough for int() of any digits given.
MAX_OFFSET = 2**53
LOG_MEDIA_TYPE = "text/plain; charset=utf-8"


def _whole_number(raw: str, what: str, low: int, high: int) -> int:
    # isascii and isdigit: "²" is a digit to str.isdigit, and "-1", "1.5", " 1" are not numbers here.
    if not (raw.isascii() and raw.isdigit()) or len(raw) > len(str(high)) or not low <= int(raw) <= high:
        raise InvalidInput(f"{what} must be an integer from {low} to {high}, not {raw[:40]!r}")
    return int(raw)


@guarded("viewer")
async def attempt_log(request: Request, principal: Principal) -> Response:
    task_id = parse_uuid(request.path_params["task_id"], "task")
    attempt = _whole_number(request.path_params["attempt"], "the attempt number", 1, MAX_ATTEMPT)
    raw_offset = request.query_params.get("offset")
    offset = 0 if raw_offset is None else _whole_number(raw_offset, "offset (a byte offset into the log)", 0,
                                                         MAX_OFFSET)
    engine = get_engine(request)
    log = await run_in_threadpool(
        read_attempt_log, engine.db, engine.settings, principal.workspace_id, task_id, attempt, offset
    )
    return Response(log.body, media_type=LOG_MEDIA_TYPE, headers={
        "X-Log-Size": str(log.size),
        "X-Log-Complete": "true" if log.complete else "false",
        # A running attempt's log grows between two reads of the same URL.
        "Cache-Control": "no-store",
    })


routes: list[Route] = [
    Route("/api/tasks/{task_id}/attempts/{attempt}/log", attempt_log, methods=["GET"]),
]
