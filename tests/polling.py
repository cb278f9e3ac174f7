"""Waiting for state in tests: ask a probe until it answers, with a deadline (never a sleep for
the state itself)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any


def poll(probe: Callable[[], Any], message: str, timeout_s: float = 20.0) -> Any:
    """The probe's first truthy value, asked every 20 ms until `timeout_s`."""
    event = threading.Event()
    for _ in range(int(timeout_s / 0.02)):
        value = probe()
        if value:
            return value
        event.wait(0.02)  # poll interval, not a wait for state
    raise AssertionError(message)
