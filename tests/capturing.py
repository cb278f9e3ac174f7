"""A transport that accepts every dispatch and keeps it: the test plays the worker."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any


class CapturingTransport:
    name = "local"

    def __init__(self) -> None:
        self.sent: list[dict[str, Any]] = []
        self._lock = threading.Lock()

    def send(self, message: dict[str, Any]) -> None:
        with self._lock:
            self.sent.append(message)

    def close(self) -> None:
        pass

    def remove(self, keep: Callable[[dict[str, Any]], bool]) -> list[dict[str, Any]]:
        """The messages `keep` selects, removed from the transport."""
        with self._lock:
            mine = [m for m in self.sent if keep(m)]
            self.sent = [m for m in self.sent if not keep(m)]
        return mine

    def matching(self, keep: Callable[[dict[str, Any]], bool]) -> int:
        with self._lock:
            return sum(1 for m in self.sent if keep(m))

    def take_node(self, node: str) -> dict[str, Any]:
        """The one message sent for `node`, removed."""
        (message,) = self.remove(lambda m: m["node"] == node)
        return message

    def take_run(self, run_id: Any, node: str | None = None) -> list[dict[str, Any]]:
        """The messages sent for a run (and node), removed."""
        return self.remove(lambda m: m["run_id"] == str(run_id) and (node is None or m["node"] == node))
