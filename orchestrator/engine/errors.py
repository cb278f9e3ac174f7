"""Errors the engine raises for the caller's mistakes; the API maps each to one 4xx."""

from __future__ import annotations

from typing import Any


class EngineError(Exception):
    code = "error"

    def __init__(self, message: str, *, details: Any = None) -> None:
        super().__init__(message)
        self.message = message
        self.details = details


class NotFound(EngineError):
    code = "not_found"


class Conflict(EngineError):
    code = "conflict"


class InvalidInput(EngineError):
    code = "invalid"


class Unauthorized(EngineError):
    code = "unauthorized"


class Forbidden(EngineError):
    code = "forbidden"


class TooLarge(EngineError):
    code = "payload_too_large"


class IdempotencyKeyReused(InvalidInput):
    """An Idempotency-Key sent again with a different request (422, as the IETF
    Idempotency-Key draft and payment APIs answer): answering the first result would silently
    drop what the caller asked for this time."""

    code = "idempotency_key_reused"
