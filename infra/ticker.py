"""Plays EventBridge locally: POST /api/tick every interval until stopped."""

from __future__ import annotations

import logging
import threading

import httpx

log = logging.getLogger(__name__)


class Ticker:
    def __init__(self, url: str, secret: str, interval_s: float) -> None:
        self.url = url
        self.secret = secret
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="tickweave-ticker", daemon=True)
        self.ticks = 0

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _loop(self) -> None:
        with httpx.Client(timeout=30) as client:
            while not self._stop.wait(self.interval_s):
                try:
                    response = client.post(self.url, headers={"x-tick-secret": self.secret})
                    self.ticks += 1
                    if response.status_code != 200:
                        log.warning("tick answered %s: %s", response.status_code, response.text[:200])
                    elif response.json().get("claimed"):
                        log.info("tick: %s", response.text)
                except httpx.HTTPError as exc:
                    log.warning("tick failed: %s", exc)
