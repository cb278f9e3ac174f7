"""The transport interface: deliver one dispatch message to a worker, or raise DispatchError."""

from __future__ import annotations

from typing import Any, Protocol


class DispatchError(Exception):
    """The message did not reach a worker (transport error, throttle, no such worker)."""


class Transport(Protocol):
    name: str

    def send(self, message: dict[str, Any]) -> None:
        """Deliver `message`; return once the worker has accepted it (not when the task ends)."""
        ...

    def close(self) -> None: ...


# A transport may also define `capacity() -> int | None`: how many more tasks it can start now
# (None: it queues without bound, as a remote service that scales out does). When every
# configured transport defines it, a claim takes no more than their sum, so a task is never
# claimed only to wait in a local queue while its lease runs out.
