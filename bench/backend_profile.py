"""Where the database server's CPU goes in the lifecycle: its backends sampled by `perf`.

The lifecycle part says how much server CPU a task costs; this part says on what. One caller
drives the lifecycle of the deep and the wide DAG (as the lifecycle part does) while
`perf record` samples every CPU with call stacks (DWARF unwinding: the embedded server is built
without frame pointers). The samples of the case database's backends are then sorted into
phases by the functions on their stacks, in this order (a sample counts in the first that
matches):

  commit                 CommitTransaction: the WAL flush (fsync) and the commit record
  parse and plan         the call's own statement text: pg_parse_query, parse analysis, planning
  CHECK constraints      ExecConstraints: each statement that writes a table reads its CHECK
                         expressions from their stored text again (stringToNode), then runs them
  triggers               foreign-key checks and row triggers (AfterTrigger*, ExecAR*Triggers)
  index writes           ExecInsertIndexTuples: index entries of a new row version
  row writes             heap_update / heap_insert / heap_delete
  executor start / end   standard_ExecutorStart / standard_ExecutorEnd: setting up and tearing
                         down each statement's plan (generic plans are cached; this is not)
  plan cache checks      GetCachedPlan: revalidating the cached plans, locking their relations
  reading and joining    the rest of standard_ExecutorRun (index scans, joins, aggregates, CTEs)
  PL/pgSQL expressions   inside the functions, outside any statement's executor (assignments,
                         jsonb building, the functions' glue)
  other                  the protocol, sending results, the kernel's scheduling

Each share is of the backends' samples; "ms per task" is the share times the server's CPU per
task over the same run (from /proc, user and system apart). `perf` needs to be on the PATH and
allowed to sample (root, or kernel.perf_event_paranoid <= 0); without it the part is skipped
with the reason. Nothing here asserts a figure.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg

from bench.lifecycle import LifecycleCase
from bench.server import Server, process_cpu_split
from bench.suite import Suite

# (phase, the functions that put a sample in it), first match wins; see the module's docstring.
PHASES: tuple[tuple[str, frozenset[str]], ...] = (
    ("commit", frozenset({"CommitTransaction"})),
    ("parse and plan", frozenset({"pg_parse_query", "parse_analyze_varparams", "parse_analyze_fixedparams",
                                  "pg_analyze_and_rewrite_varparams", "pg_analyze_and_rewrite_fixedparams",
                                  "pg_plan_query"})),
    ("CHECK constraints", frozenset({"ExecConstraints"})),
    ("triggers", frozenset({"AfterTriggerSaveEvent", "AfterTriggerEndQuery", "AfterTriggerFireDeferred",
                            "ExecARUpdateTriggers", "ExecARInsertTriggers", "ExecARDeleteTriggers",
                            "ExecBRUpdateTriggers", "ExecBRInsertTriggers"})),
    ("index writes", frozenset({"ExecInsertIndexTuples"})),
    ("row writes", frozenset({"heap_update", "heap_insert", "heap_delete", "heap_multi_insert"})),
    ("executor start", frozenset({"standard_ExecutorStart"})),
    ("executor end", frozenset({"standard_ExecutorEnd"})),
    ("plan cache checks", frozenset({"GetCachedPlan"})),
)
# Inside a PL/pgSQL function, a sample under its statements' executors and in none of the above.
READING = "reading and joining"
PLPGSQL = "PL/pgSQL expressions"
OTHER = "other"
ORDER = (*(name for name, _ in PHASES), READING, PLPGSQL, OTHER)

# Samples per second per CPU, and the bytes of stack copied with each (PL/pgSQL nests deeply).
SAMPLE_HZ = 299
STACK_BYTES = 16384


@dataclass(frozen=True)
class BackendProfile:
    """One lifecycle case's server CPU, per task, and its backends' samples by phase."""

    case: str
    tasks: int
    tasks_per_s: float
    user_ms: float  # server CPU per task, user and system (the fsync is system time)
    system_ms: float
    samples: int
    shares: dict[str, float]  # phase -> share of the backends' samples

    def ms(self, phase: str) -> float:
        return self.shares.get(phase, 0.0) * (self.user_ms + self.system_ms)


def find_perf() -> tuple[str | None, str]:
    """The `perf` executable, or None and why it cannot be used here."""
    perf = shutil.which("perf")
    if perf is None:
        return None, "perf not found on the PATH (Debian: apt install linux-perf)"
    try:
        paranoid = int(Path("/proc/sys/kernel/perf_event_paranoid").read_text())
    except (OSError, ValueError):
        paranoid = 2
    if os.geteuid() != 0 and paranoid > 0:
        return None, f"perf may not sample other processes (kernel.perf_event_paranoid is {paranoid}; run as root)"
    return perf, ""


def classify(stack: list[str]) -> str:
    """The phase of one sample, from the function names on its stack (leaf first)."""
    names = set(stack)
    for phase, functions in PHASES:
        if names & functions:
            return phase
    for name in stack:  # from the leaf up: inside a function's statement, or its own code?
        if name == "_SPI_execute_plan":
            return READING
        if name == "plpgsql_call_handler":
            return PLPGSQL
    return OTHER


def parse_samples(script: Iterable[str], pids: set[int]) -> Iterator[list[str]]:
    """The stacks (function names, leaf first) of `perf script -F comm,pid,ip,sym` output whose
    process is one of `pids`."""
    keep = False
    stack: list[str] = []
    for line in script:
        if not line.strip():
            if keep and stack:
                yield stack
            keep, stack = False, []
        elif line[0] in " \t":
            if keep:
                parts = line.split(None, 1)
                stack.append(parts[1].strip().split("+")[0] if len(parts) > 1 else "[unknown]")
        else:  # "comm pid": a sample begins
            fields = line.split()
            keep = len(fields) >= 2 and fields[1].isdigit() and int(fields[1]) in pids
            stack = []
    if keep and stack:
        yield stack


def profile_case(server: Server, case: LifecycleCase, perf: str, workdir: Path) -> BackendProfile:
    """Run one lifecycle case under `perf record`, and sort its backends' samples."""
    case.setup()
    try:
        data = workdir / f"{case.shape}.data"
        before = process_cpu_split(server)
        recorder = subprocess.Popen(
            [perf, "record", "-a", "-F", str(SAMPLE_HZ), "--call-graph", f"dwarf,{STACK_BYTES}", "-o", str(data),
             "--", "sleep", "3600"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            time.sleep(1.0)  # perf opens its events before the case starts
            started = time.perf_counter()
            outcome = case.run()
            elapsed = time.perf_counter() - started
            after = process_cpu_split(server)
        except BaseException:
            recorder.kill()  # a failed case leaves no perf sampling the machine behind it
            recorder.wait()
            raise
        with psycopg.connect(server.url(case.database), autocommit=True) as conn:
            pids = {int(row[0]) for row in conn.execute(
                "SELECT pid FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()")}
        recorder.send_signal(signal.SIGINT)
        _, err = recorder.communicate(timeout=120)
        # perf's exit status after SIGINT is its workload's (the interrupted sleep): judge by its file
        if not data.exists() or b"Captured and wrote" not in err:
            raise RuntimeError(f"perf record failed: {err.decode(errors='replace')[-300:]}")
        with subprocess.Popen([perf, "script", "-i", str(data), "-F", "comm,pid,ip,sym"],
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True) as script:
            assert script.stdout is not None
            counts = Counter(classify(stack) for stack in parse_samples(script.stdout, pids))
        data.unlink(missing_ok=True)
    finally:
        case.teardown()
    samples = sum(counts.values())
    tasks = outcome.items
    return BackendProfile(
        case=f"{case.shape} ({case.runs}x{case.nodes}), 1 caller", tasks=tasks, tasks_per_s=tasks / elapsed,
        user_ms=(after[0] - before[0]) * 1000 / tasks, system_ms=(after[1] - before[1]) * 1000 / tasks,
        samples=samples, shares={phase: counts[phase] / samples for phase in ORDER} if samples else {})


def run_backend_profile(server: Server, suite: Suite, *, fan_width: int, fan_runs: int, chain_length: int,
                        chain_runs: int, batch: int) -> list[BackendProfile]:
    perf, why = find_perf()
    if perf is None:
        raise PerfUnavailable(why)
    cases = [
        LifecycleCase(server, suite, clients=1, shape="deep", runs=chain_runs, nodes=chain_length, batch=batch),
        LifecycleCase(server, suite, clients=1, shape="wide", runs=fan_runs, nodes=fan_width + 2, batch=batch),
    ]
    with tempfile.TemporaryDirectory(prefix="tickweave-perf-") as workdir:
        return [profile_case(server, case, perf, Path(workdir)) for case in cases]


class PerfUnavailable(Exception):
    """perf cannot sample here; the message says why."""


def report(profiles: list[BackendProfile]) -> str:
    head = "| phase | " + " | ".join(f"{p.case}: share | ms per task" for p in profiles) + " |"
    rule = "|---|" + "---|---|" * len(profiles)
    rows = [f"| {phase} | " + " | ".join(f"{100 * p.shares.get(phase, 0.0):.1f} % | {p.ms(phase):.3f}"
                                         for p in profiles) + " |" for phase in ORDER]
    totals = "| **server CPU per task** (user + system) | " + " | ".join(
        f"{p.samples:,} samples | {p.user_ms:.3f} + {p.system_ms:.3f}" for p in profiles) + " |"
    rates = ", ".join(f"{p.case} {p.tasks:,} tasks at {p.tasks_per_s:.0f} tasks/s" for p in profiles)
    return "\n".join([head, rule, *rows, totals]) + f"\n\nUnder perf (it costs the host some CPU): {rates}."
