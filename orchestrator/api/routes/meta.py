"""The dashboard page and the unauthenticated answers: /health, /api/info, /api/openapi.json."""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import FileResponse, Response
from starlette.routing import Route

from orchestrator.api.common import app_settings, get_engine
from orchestrator.api.responses import JSON

STATIC_DIR = Path(__file__).parent.parent / "static"  # orchestrator/api/static


def _version() -> str:
    from importlib import metadata  # ~25 ms at import; only /api/info needs it

    try:
        return metadata.version("tickweave")
    except metadata.PackageNotFoundError:
        return "0+unknown"


def _dashboard_csp() -> str:
    """Only the page's own inline script (by hash) runs, and it may talk only to this origin."""
    import hashlib
    import re

    html = (STATIC_DIR / "index.html").read_bytes()
    hashes = " ".join(
        f"'sha256-{base64.b64encode(hashlib.sha256(s).digest()).decode()}'"
        for s in re.findall(rb"<script>(.*?)</script>", html, re.S)
    )
    return (f"default-src 'none'; script-src {hashes}; style-src 'unsafe-inline'; connect-src 'self'; "
            "img-src data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


_dashboard_csp_cache: dict[str, str] = {}


async def dashboard(request: Request) -> Response:
    if "csp" not in _dashboard_csp_cache:  # computed on first use: a cold Lambda pays nothing for it
        _dashboard_csp_cache["csp"] = _dashboard_csp()
    return FileResponse(STATIC_DIR / "index.html", media_type="text/html", headers={
        "Content-Security-Policy": _dashboard_csp_cache["csp"], "Cache-Control": "no-cache",
        "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer"})


async def health(request: Request) -> Response:
    return JSON({"status": "ok"})


async def info(request: Request) -> Response:
    settings = app_settings(request)

    def probe() -> dict[str, Any]:
        result: dict[str, Any] = {"version": _version(), "mode": settings.mode}
        try:
            with get_engine(request).db.connection() as conn:
                conn.execute("SELECT 1")
            result["database"] = "ok"
        except Exception as exc:
            result["database"] = f"error: {type(exc).__name__}"
        try:
            from orchestrator.storage.s3 import orchestrator_s3

            orchestrator_s3(settings).head_bucket(Bucket=settings.bucket)
            result["storage"] = "ok"
        except Exception as exc:
            result["storage"] = f"error: {type(exc).__name__}"
        # Nothing about keys or secrets: this answer needs no authentication.
        result["transports"] = sorted(get_engine(request).transports)
        return result

    return JSON(await run_in_threadpool(probe))


async def openapi(request: Request) -> Response:
    # Built once per app, from the routes that app really mounts.
    doc: dict[str, Any] | None = getattr(request.app.state, "openapi_doc", None)
    if doc is None:
        from orchestrator.api.openapi import build_openapi  # the models' schemas: only when asked

        doc = request.app.state.openapi_doc = build_openapi(request.app.routes, version=_version())
    return JSON(doc)


routes: list[Route] = [
    Route("/", dashboard, methods=["GET"]),
    Route("/health", health, methods=["GET"]),
    Route("/api/info", info, methods=["GET"]),
    Route("/api/openapi.json", openapi, methods=["GET"]),
]
