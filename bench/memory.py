"""Memory of a tick claiming `tasks` ready tasks in one batch, measured in a fresh process.

The parent prepares a database per probe; each probe is `python -m bench.memory URL TASKS
MODE` in a new interpreter: it builds the engine (no-op transport), warms up (imports, one
storage grant), then runs one tick with batch size `tasks`.

rss          peak RSS of the process (VmHWM), and its RSS just before the tick; the peak is
             reset before the tick by writing 5 to /proc/self/clear_refs, so it is the tick's
             own high-water mark, not the imports' (`ru_maxrss` cannot be reset, and carries
             over `exec` from the parent on Linux).
tracemalloc  the peak of Python allocations during the tick (its own process, since
             tracemalloc inflates RSS).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import tracemalloc
from dataclasses import dataclass
from pathlib import Path

from bench.server import Server
from bench.suite import Suite

_STATUS = Path("/proc/self/status")
_REPOSITORY = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class MemoryResult:
    tasks: int
    dispatched: int
    rss_before_mb: float
    peak_rss_mb: float
    peak_reset: bool
    tracemalloc_peak_mb: float
    tick_s: float


def _status_kb(field: str) -> int:
    for line in _STATUS.read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def _reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def probe(url: str, tasks: int, mode: str) -> dict[str, float | int | bool]:
    """In the child: one tick of batch `tasks`; `mode` is rss or tracemalloc."""
    from bench.lifecycle import warm_dispatch
    from bench.suite import noop_engine
    from orchestrator.engine.tick import run_tick

    engine, _ = noop_engine(url, pool=1, keep=False)
    try:
        warm_dispatch(engine)
        result: dict[str, float | int | bool] = {"rss_before_kb": _status_kb("VmRSS")}
        if mode == "tracemalloc":
            tracemalloc.start()
        else:
            result["peak_reset"] = _reset_peak()
        started = time.perf_counter()
        summary = run_tick(engine.db, engine.settings, engine.dispatcher, batch_size=tasks)
        result["tick_s"] = time.perf_counter() - started
        if mode == "tracemalloc":
            result["tracemalloc_peak_b"] = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
        result["peak_rss_kb"] = _status_kb("VmHWM")
        result["dispatched"] = summary.dispatched
        return result
    finally:
        engine.close()


def _child(url: str, tasks: int, mode: str) -> dict[str, float | int | bool]:
    done = subprocess.run([sys.executable, "-m", "bench.memory", url, str(tasks), mode], cwd=_REPOSITORY,
                          capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"memory probe failed ({done.returncode}):\n{done.stderr[-2000:]}")
    values: dict[str, float | int | bool] = json.loads(done.stdout.strip().splitlines()[-1])
    return values


def run_memory(server: Server, suite: Suite, *, tasks: int) -> MemoryResult:
    from bench.lifecycle import trigger_single
    from bench.suite import noop_engine

    results: dict[str, dict[str, float | int | bool]] = {}
    for mode in ("rss", "tracemalloc"):
        database = f"bench_memory_{mode}"
        url = suite.copy(database)
        try:
            engine, _ = noop_engine(url, pool=1, keep=False)
            try:
                trigger_single(engine, tasks)
            finally:
                engine.close()
            server.vacuum_analyze(database)
            results[mode] = _child(url, tasks, mode)
        finally:
            server.drop(database)
    rss, traced = results["rss"], results["tracemalloc"]
    return MemoryResult(
        tasks=tasks, dispatched=int(rss["dispatched"]), rss_before_mb=float(rss["rss_before_kb"]) / 1024,
        peak_rss_mb=float(rss["peak_rss_kb"]) / 1024, peak_reset=bool(rss["peak_reset"]),
        tracemalloc_peak_mb=float(traced["tracemalloc_peak_b"]) / 1024 / 1024, tick_s=float(rss["tick_s"]),
    )


if __name__ == "__main__":
    print(json.dumps(probe(sys.argv[1], int(sys.argv[2]), sys.argv[3])))
