"""`POST /api/worker/read-urls`: presigned GET URLs for the items a reducer reads.

Worker protocol, like `/api/heartbeat`: authenticated by the task token in the body (no API
key), answered in the one error shape. orchestrator/api/routes/worker_protocol.py mounts it with
the other worker-protocol routes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pydantic import BaseModel, ConfigDict, Field, StrictStr
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response

from orchestrator.api.common import error_response
from orchestrator.api.request import read_json, validate
from orchestrator.api.responses import JSON
from orchestrator.engine import worker_reads
from orchestrator.engine.errors import EngineError

if TYPE_CHECKING:
    from orchestrator.engine.service import Engine

__all__ = ["ReadUrls", "ReadUrlsRequest", "read_urls"]


class ReadUrlsRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    token: str = Field(min_length=1, max_length=16_384)
    # StrictStr: a number is not a key (pydantic would not turn it into one anyway, but say so).
    keys: list[StrictStr] = Field(max_length=worker_reads.MAX_READ_KEYS)


class ReadUrls(BaseModel):
    """The answer: a presigned GET URL for each key asked for."""

    model_config = ConfigDict(extra="allow")
    urls: dict[str, str]


async def read_urls(request: Request) -> Response:
    # The app's engine, built on first use like every route's (create_app sets get_engine).
    engine: Engine = request.app.state.get_engine()
    try:
        body = validate(ReadUrlsRequest, await read_json(request, engine.settings.max_body_bytes))
        urls = await run_in_threadpool(
            worker_reads.presign_reads, engine.settings, engine.keyring, body.token, body.keys
        )
    except EngineError as exc:
        return error_response(exc)  # the one table: this route answers errors as the others do
    return JSON({"urls": urls})
