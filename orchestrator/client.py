"""A small typed client for the Tickweave HTTP API (DESIGN.md, "HTTP API").

It imports nothing of the server (no Starlette, psycopg or engine), only httpx, so scripts,
workers and the `tickweave` CLI can use it::

    from orchestrator.client import ApiError, TickweaveClient

    with TickweaveClient("http://localhost:8000", api_key="dev-key") as api:
        run = api.trigger("hello-diamond", params={"day": "2026-11-28"})
        print(api.get_run(run["id"])["status"])

Every method returns the decoded JSON answer. A 4xx/5xx answer raises `ApiError` carrying the
API's `{"error": {"code", "message", "details"}}`; a server that cannot be reached (refused,
DNS, timeout) or that answers something that is not the API raises `ConnectionFailed`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from types import TracebackType
from typing import Any
from urllib.parse import quote

import httpx

DEFAULT_URL = "http://localhost:8000"
TERMINAL_RUN_STATUSES = frozenset({"succeeded", "failed", "cancelled"})


class ClientError(Exception):
    """Anything that kept a request from getting an answer from the API."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class ConnectionFailed(ClientError):
    """The server could not be reached, timed out, or did not answer like the Tickweave API."""


class ApiError(ClientError):
    """The API answered with an error: `status` is the HTTP status, `code`, `message` and
    `details` come from its `{"error": {...}}` body."""

    def __init__(self, status: int, code: str, message: str, details: Any = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.details = details

    @property
    def detail_lines(self) -> list[str]:
        """`details` as lines a person can read: `path: message` for located errors."""
        details = self.details
        if not details:
            return []
        if isinstance(details, Mapping):
            details = [details]
        lines: list[str] = []
        if isinstance(details, Sequence) and not isinstance(details, str):
            for item in details:
                if isinstance(item, Mapping) and "message" in item:
                    path = item.get("path") or ""
                    lines.append(f"{path}: {item['message']}" if path else str(item["message"]))
                elif isinstance(item, Mapping):
                    lines.extend(f"{key}: {value}" for key, value in item.items())
                else:
                    lines.append(str(item))
        else:
            lines.append(str(details))
        return lines

    def __str__(self) -> str:
        return f"{self.message} (HTTP {self.status} {self.code})"


def _error_from_response(response: httpx.Response) -> ApiError:
    try:
        body = response.json()
    except ValueError:
        body = None
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        error = body["error"]
        return ApiError(response.status_code, str(error.get("code") or "error"),
                        str(error.get("message") or response.reason_phrase), error.get("details"))
    if isinstance(body, dict) and isinstance(body.get("message"), str):  # API Gateway's own answers
        return ApiError(response.status_code, "gateway", body["message"])
    text = response.text.strip().splitlines()[0][:200] if response.text.strip() else response.reason_phrase
    return ApiError(response.status_code, "http_error", f"HTTP {response.status_code}: {text}")


class TickweaveClient:
    """The API at `base_url` (without `/api`), authenticated with `api_key` (Bearer)."""

    def __init__(
        self,
        base_url: str = DEFAULT_URL,
        api_key: str | None = None,
        *,
        timeout: float = 30.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.api_key = api_key
        headers = {"Accept": "application/json", "User-Agent": "tickweave-client"}
        if api_key:
            headers["Authorization"] = f"Bearer {api_key}"
        self._http = httpx.Client(base_url=self.base_url, headers=headers, timeout=timeout, transport=transport)

    @classmethod
    def from_env(cls, *, url: str | None = None, api_key: str | None = None, timeout: float = 30.0) -> TickweaveClient:
        """Arguments first, then TICKWEAVE_URL / TICKWEAVE_API_KEY, then the default URL."""
        return cls(resolve_url(url), api_key or os.environ.get("TICKWEAVE_API_KEY") or None, timeout=timeout)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> TickweaveClient:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    # --- transport -----------------------------------------------------------------------

    def request(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        params: Mapping[str, str | int | bool] | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> Any:
        """One call; the decoded JSON answer, or ApiError / ConnectionFailed."""
        query = {k: (str(v).lower() if isinstance(v, bool) else v) for k, v in (params or {}).items()}
        try:
            response = self._http.request(method, path, json=json, params=query or None, headers=headers)
        except httpx.TimeoutException as exc:
            raise ConnectionFailed(f"{method} {self.base_url}{path} timed out ({type(exc).__name__})") from exc
        except httpx.HTTPError as exc:
            raise ConnectionFailed(f"could not reach {self.base_url}: {exc}") from exc
        if response.status_code >= 400:
            raise _error_from_response(response)
        try:
            return response.json()
        except ValueError:
            raise ConnectionFailed(
                f"{method} {self.base_url}{path} answered HTTP {response.status_code} with a body that is not JSON; "
                "is this the Tickweave API?"
            ) from None

    def request_bytes(
        self, method: str, path: str, *, params: Mapping[str, str | int | bool] | None = None
    ) -> tuple[bytes, httpx.Headers]:
        """One call answered with something other than JSON (a task's log): the body's bytes and
        the headers, or ApiError / ConnectionFailed as `request` raises them."""
        query = {k: (str(v).lower() if isinstance(v, bool) else v) for k, v in (params or {}).items()}
        try:
            response = self._http.request(method, path, params=query or None, headers={"Accept": "text/plain"})
        except httpx.TimeoutException as exc:
            raise ConnectionFailed(f"{method} {self.base_url}{path} timed out ({type(exc).__name__})") from exc
        except httpx.HTTPError as exc:
            raise ConnectionFailed(f"could not reach {self.base_url}: {exc}") from exc
        if response.status_code >= 400:
            raise _error_from_response(response)
        return response.content, response.headers

    # --- server --------------------------------------------------------------------------

    def info(self) -> dict[str, Any]:
        return dict(self.request("GET", "/api/info"))

    def tick(self, tick_secret: str) -> dict[str, Any]:
        return dict(self.request("POST", "/api/tick", headers={"x-tick-secret": tick_secret}))

    # --- pipelines -----------------------------------------------------------------------

    def list_pipelines(self, *, limit: int | None = None, cursor: str | None = None) -> dict[str, Any]:
        return dict(self.request("GET", "/api/pipelines", params=_query(limit=limit, cursor=cursor)))

    def get_pipeline(self, pipeline_id: str) -> dict[str, Any]:
        return dict(self.request("GET", f"/api/pipelines/{_seg(pipeline_id)}"))

    def find_pipeline(self, pipeline_id: str) -> dict[str, Any] | None:
        """The pipeline, or None when the workspace has none by that id."""
        try:
            return self.get_pipeline(pipeline_id)
        except ApiError as exc:
            if exc.status == 404:
                return None
            raise

    def create_pipeline(self, definition: Mapping[str, Any]) -> dict[str, Any]:
        return dict(self.request("POST", "/api/pipelines", json=definition))

    def update_pipeline(self, pipeline_id: str, definition: Mapping[str, Any]) -> dict[str, Any]:
        """A new version when the definition changed; the answer's `changed` says which."""
        return dict(self.request("PUT", f"/api/pipelines/{_seg(pipeline_id)}", json=definition))

    def validate_pipelines(self, definitions: Sequence[Any]) -> dict[str, Any]:
        """POST /api/pipelines/validate: a dry run of the definitions; nothing is stored."""
        return dict(self.request("POST", "/api/pipelines/validate", json={"pipelines": list(definitions)}))

    def trigger(
        self,
        pipeline_id: str,
        *,
        versions: Sequence[str] | None = None,
        params: Mapping[str, Any] | None = None,
        idempotency_key: str | None = None,
    ) -> dict[str, Any]:
        """Start a run; the answer is the run with its tasks (and `created`: false for a replay
        of the same Idempotency-Key)."""
        body: dict[str, Any] = {"params": dict(params or {})}
        if versions is not None:
            body["versions"] = list(versions)
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else None
        return dict(self.request("POST", f"/api/pipelines/{_seg(pipeline_id)}/runs", json=body, headers=headers))

    def backfill(self, pipeline_id: str, body: Mapping[str, Any]) -> dict[str, Any]:
        return dict(self.request("POST", f"/api/pipelines/{_seg(pipeline_id)}/backfill", json=dict(body)))

    # --- runs ----------------------------------------------------------------------------

    def list_runs(
        self, *, pipeline: str | None = None, status: str | None = None, limit: int | None = None,
        cursor: str | None = None,
    ) -> dict[str, Any]:
        return dict(self.request("GET", "/api/runs", params=_query(pipeline=pipeline, status=status, limit=limit,
                                                                   cursor=cursor)))

    def get_run(self, run_id: str, *, limit: int | None = None) -> dict[str, Any]:
        """The run with its tasks counted by status (`counts`) and by node (`nodes`, a first page),
        and a first page of `limit` tasks (default 100): `tasks`, `tasks_next_cursor`."""
        return dict(self.request("GET", f"/api/runs/{_seg(run_id)}", params=_query(limit=limit)))

    def list_run_tasks(
        self, run_id: str, *, status: str | None = None, node: str | None = None, limit: int | None = None,
        cursor: str | None = None,
    ) -> dict[str, Any]:
        """A page of the run's tasks (`items`, `next_cursor`), in (node, version) order."""
        return dict(self.request("GET", f"/api/runs/{_seg(run_id)}/tasks", params=_query(
            status=status, node=node, limit=limit, cursor=cursor)))

    def list_run_nodes(self, run_id: str, *, limit: int | None = None, cursor: str | None = None) -> dict[str, Any]:
        """A page of the run's nodes with their tasks counted by status (`items`, `next_cursor`)."""
        return dict(self.request("GET", f"/api/runs/{_seg(run_id)}/nodes", params=_query(limit=limit, cursor=cursor)))

    def cancel_run(self, run_id: str) -> dict[str, Any]:
        return dict(self.request("POST", f"/api/runs/{_seg(run_id)}/cancel"))

    def retry_run(self, run_id: str) -> dict[str, Any]:
        return dict(self.request("POST", f"/api/runs/{_seg(run_id)}/retry"))

    # --- dead letters --------------------------------------------------------------------

    def list_dead_letters(
        self, *, pipeline: str | None = None, include_retried: bool = False, limit: int | None = None,
        cursor: str | None = None,
    ) -> dict[str, Any]:
        return dict(self.request("GET", "/api/dlq", params=_query(
            pipeline=pipeline, include_retried=include_retried or None, limit=limit, cursor=cursor)))

    def retry_dead_letter(self, entry_id: str) -> dict[str, Any]:
        return dict(self.request("POST", f"/api/dlq/{_seg(entry_id)}/retry"))


def resolve_url(url: str | None = None) -> str:
    """`url`, else TICKWEAVE_URL, else TICKWEAVE_PUBLIC_URL (the server's own setting), else
    http://localhost:8000."""
    return (url or os.environ.get("TICKWEAVE_URL") or os.environ.get("TICKWEAVE_PUBLIC_URL") or DEFAULT_URL).rstrip("/")


def _seg(value: str) -> str:
    return quote(value, safe="")


def _query(**values: str | int | bool | None) -> dict[str, str | int | bool]:
    return {key: value for key, value in values.items() if value is not None}
