"""Transports for registered worker services: one instance per (transport, endpoint), built on
first use and kept, so a warm Lambda reuses its HTTP connections and AWS clients."""

from __future__ import annotations

import threading

from orchestrator.config import Settings
from orchestrator.dispatch.base import Transport


class RoutedTransports:
    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._lock = threading.Lock()
        self._cache: dict[tuple[str, str], Transport] = {}

    def get(self, kind: str, endpoint: str) -> Transport:
        with self._lock:
            transport = self._cache.get((kind, endpoint))
            if transport is None:
                transport = self._build(kind, endpoint)
                self._cache[(kind, endpoint)] = transport
            return transport

    def _build(self, kind: str, endpoint: str) -> Transport:
        if kind == "http":
            from orchestrator.dispatch.http import HttpTransport

            return HttpTransport(endpoint, auth_token=self._settings.worker_auth_token)
        if kind == "lambda":
            from orchestrator.dispatch.aws_lambda import LambdaTransport

            return LambdaTransport(endpoint, region=self._settings.aws_region)
        if kind == "sqs":
            from orchestrator.dispatch.sqs import SqsTransport

            return SqsTransport(endpoint, region=self._settings.aws_region, endpoint_url=self._settings.s3_endpoint_url)
        raise ValueError(f"unknown transport {kind!r}")

    def close(self) -> None:
        with self._lock:
            for transport in self._cache.values():
                transport.close()
            self._cache.clear()
