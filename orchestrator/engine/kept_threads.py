"""A thread pool started when first needed and kept until closed.

For work that waits on a network (the dispatcher's sends, a batch's output checks): a pool
started per round cost a thread start per item, and on a warm Lambda environment the threads
live on between invocations, as its connections do. `Engine.close` closes the engine's pools.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor


class KeptThreads:
    def __init__(self, max_workers: int, name: str) -> None:
        self.max_workers = max_workers
        self.name = name
        self._pool: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()

    def pool(self) -> ThreadPoolExecutor:
        """The pool, started at the first call."""
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(max_workers=self.max_workers, thread_name_prefix=self.name)
            return self._pool

    def close(self) -> None:
        """Stop the threads (after the work under way); a later `pool()` starts them again."""
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True)
