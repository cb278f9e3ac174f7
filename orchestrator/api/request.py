"""Reading requests safely: bounded bodies, JSON or YAML, pydantic validation to 4xx."""

from __future__ import annotations

from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError
from starlette.requests import Request

from orchestrator import safe_json
from orchestrator.engine.errors import InvalidInput, TooLarge

M = TypeVar("M", bound=BaseModel)

# Request bodies are small documents; deeper nesting is refused before it reaches pydantic,
# the database (jsonb) or a worker. Pipeline definitions have their own limits (graph.py).
MAX_BODY_DEPTH = 64


class PayloadTooLarge(TooLarge):
    pass


async def read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isascii() and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"the request body is {declared} bytes; the limit is {limit}")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"the request body is over the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


async def read_json(request: Request, limit: int, *, allow_empty: bool = False) -> Any:
    body = await read_body(request, limit)
    if not body.strip():
        if allow_empty:
            return {}
        raise InvalidInput("the request body is empty; send a JSON object")
    try:
        data = safe_json.loads(body)
    except safe_json.UnsafeJson as exc:
        raise InvalidInput(f"the request body is not valid JSON: {exc}") from None
    problem = safe_json.shape_problem(data, "the request body", max_depth=MAX_BODY_DEPTH)
    if problem is not None:
        raise InvalidInput(problem)
    return data


async def read_definition(request: Request, limit: int, what: str = "pipeline definition") -> Any:
    """A definition (a pipeline's, a template's) as JSON or YAML (by Content-Type, or by its
    first character)."""
    from orchestrator.graph import DefinitionInvalid, parse_definition_text  # YAML and the models: on use

    body = await read_body(request, limit)
    if not body.strip():
        raise InvalidInput(f"the request body is empty; send a {what} as JSON or YAML")
    try:
        return parse_definition_text(body, request.headers.get("content-type"))
    except DefinitionInvalid as exc:
        raise InvalidInput(
            f"the {what} could not be parsed: " + "; ".join(e.message for e in exc.errors),
            details=[e.to_dict() for e in exc.errors],
        ) from exc


def validate(model: type[M], data: Any) -> M:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        details = [
            {"path": ".".join(str(p) for p in err["loc"]), "message": err["msg"]}
            for err in exc.errors(include_url=False)
        ]
        raise InvalidInput(
            "the request body is invalid: " + "; ".join(f"{d['path'] or '(root)'}: {d['message']}" for d in details),
            details=details,
        ) from exc
