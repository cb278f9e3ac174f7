"""Transports for registered worker services: one instance per registration (transport,
endpoint, and for http the workspace and service whose secret signs its dispatches), built on
first use and kept, so a warm Lambda reuses its HTTP connections and AWS clients."""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

from orchestrator.config import Settings
from orchestrator.dispatch.base import Transport

if TYPE_CHECKING:
    import httpx


class RoutedTransports:
    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._lock = threading.Lock()
        self._cache: dict[tuple[str, str, str, str], Transport] = {}
        self._root_key: bytes | None = None
        # One connection pool for every registered http endpoint, however many there are.
        self._http_client: httpx.Client | None = None

    def get(self, kind: str, endpoint: str, *, workspace: str = "", service: str = "") -> Transport:
        # Only http dispatches are signed per registration; the others share one per endpoint.
        key = (kind, endpoint, workspace, service) if kind == "http" else (kind, endpoint, "", "")
        with self._lock:
            transport = self._cache.get(key)
            if transport is None:
                transport = self._build(kind, endpoint, workspace, service)
                self._cache[key] = transport
            return transport

    def _build(self, kind: str, endpoint: str, workspace: str, service: str) -> Transport:
        if kind == "http":
            import httpx

            from orchestrator.dispatch.http import CONNECT_TIMEOUT_S, READ_TIMEOUT_S, HttpTransport
            from orchestrator.storage.signatures import endpoint_secret, signing_root_key

            if not workspace or not service:
                raise ValueError("a registered http endpoint needs its workspace and service (its secret)")
            if self._root_key is None:
                self._root_key = signing_root_key(self._settings)
            if self._http_client is None:
                self._http_client = httpx.Client(timeout=httpx.Timeout(READ_TIMEOUT_S, connect=CONNECT_TIMEOUT_S))
            # Never the configured worker_auth_token: that secret is the platform's own worker's.
            return HttpTransport.registered(
                endpoint, signing_secret=endpoint_secret(self._root_key, workspace, service, endpoint),
                allow_private=self._settings.allow_private_worker_endpoints, client=self._http_client,
            )
        if kind == "lambda":
            from orchestrator.dispatch.aws_lambda import LambdaTransport

            return LambdaTransport(endpoint, region=self._settings.aws_region,
                                   max_event_age_s=self._settings.lambda_max_event_age_s)
        if kind == "sqs":
            from orchestrator.dispatch.sqs import SqsTransport

            return SqsTransport(endpoint, region=self._settings.aws_region, endpoint_url=self._settings.s3_endpoint_url)
        raise ValueError(f"unknown transport {kind!r}")

    def close(self) -> None:
        with self._lock:
            for transport in self._cache.values():
                transport.close()
            self._cache.clear()
            client, self._http_client = self._http_client, None
        if client is not None:
            client.close()
