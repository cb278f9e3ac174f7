"""Workspace metrics over a window: run and task counts, duration percentiles, failures by
error code, retry and dead-letter rates, approvals, schedule lag; as a JSON-ready dict, or in
the Prometheus text exposition format.

The window selects the runs created in it (see orchestrator/store/metrics.py); tasks, attempts
and approvals are those of these runs. Database time is the clock.
"""

from __future__ import annotations

import math
import re
from typing import Any

from orchestrator.db.connection import Database, Row
from orchestrator.engine.errors import InvalidInput
from orchestrator.store import metrics as metrics_store

DEFAULT_WINDOW_S = 86_400
MAX_WINDOW_S = 90 * 86_400
RUN_STATUSES = ("pending", "running", "succeeded", "failed", "cancelled")
TASK_STATUSES = ("pending", "ready", "dispatched", "running", "waiting", "succeeded", "failed", "skipped",
                 "cancelled")
TERMINAL_TASK_STATUSES = ("succeeded", "failed", "skipped", "cancelled")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86_400, "w": 7 * 86_400}
_WINDOW = re.compile(r"^\s*(\d{1,9})\s*([smhdw]?)\s*$", re.IGNORECASE)


def parse_window(raw: str | None) -> int:
    """`3600`, `90s`, `15m`, `1h`, `24h`, `7d`, `2w` -> seconds; None -> 24 hours."""
    if raw is None or raw == "":
        return DEFAULT_WINDOW_S
    match = _WINDOW.match(raw)
    if match is None:
        raise InvalidInput(
            f"window must be a number of seconds or a number with a unit s, m, h, d or w "
            f"(e.g. 3600, 1h, 24h, 7d); got {raw!r}",
            details=[{"path": "window", "message": "not a duration"}],
        )
    seconds = int(match.group(1)) * _UNITS[(match.group(2) or "s").lower()]
    if not 1 <= seconds <= MAX_WINDOW_S:
        raise InvalidInput(
            f"window must be from 1 second to 90 days ({MAX_WINDOW_S} s); got {raw!r} = {seconds} s",
            details=[{"path": "window", "message": "out of range"}],
        )
    return seconds


def _num(value: Any) -> float | None:
    return None if value is None else float(value)


def _ratio(part: int, whole: int) -> float | None:
    return None if whole == 0 else part / whole


def _summary(row: Row | None, labels: tuple[str, ...] = ("p50", "p95", "p99")) -> dict[str, Any]:
    """count, the quantiles, max and sum of one duration aggregate (nulls when it is empty)."""
    count = 0 if row is None else int(row["n"])
    quantiles = (row or {}).get("q") or [None] * len(labels)
    result: dict[str, Any] = {"count": count}
    for label, value in zip(labels, quantiles, strict=True):
        result[label] = None if count == 0 else _num(value)
    result["max"] = None if count == 0 or row is None else _num(row["max_s"])
    if row is not None and "sum_s" in row:
        result["sum"] = 0.0 if count == 0 else _num(row["sum_s"])
    return result


def _split(rows: list[Row]) -> tuple[Row | None, dict[str, Row]]:
    overall = next((r for r in rows if r["overall"]), None)
    return overall, {str(r["pipeline_id"]): r for r in rows if not r["overall"]}


def collect(db: Database, workspace_id: str, *, window_s: int, pipeline_id: str | None = None) -> dict[str, Any]:
    """Every metric of the workspace over the window, in one read-only transaction (one clock)."""
    with db.transaction() as conn:
        conn.execute("SET TRANSACTION READ ONLY")
        bounds = metrics_store.window_bounds(conn, window_s)
        since = bounds["since"]
        run_rows = metrics_store.run_counts(conn, workspace_id, since, pipeline_id)
        run_durations = metrics_store.run_durations(conn, workspace_id, since, pipeline_id)
        task_rows = metrics_store.task_counts(conn, workspace_id, since, pipeline_id)
        attempt_rows = metrics_store.attempt_stats(conn, workspace_id, since, pipeline_id)
        failures = metrics_store.failures_by_code(conn, workspace_id, since, pipeline_id)
        approvals = metrics_store.approval_stats(conn, workspace_id, since, pipeline_id)
        lag = metrics_store.schedule_lag(conn, workspace_id, since, pipeline_id)

    runs_by_status = dict.fromkeys(RUN_STATUSES, 0)
    runs_by_pipeline: dict[str, dict[str, int]] = {}
    for row in run_rows:
        runs_by_status[row["status"]] += int(row["n"])
        per = runs_by_pipeline.setdefault(str(row["pipeline_id"]), dict.fromkeys(RUN_STATUSES, 0))
        per[row["status"]] += int(row["n"])
    run_all, run_per = _split(run_durations)

    tasks_by_status = dict.fromkeys(TASK_STATUSES, 0)
    dead_lettered = 0  # failed tasks in the dead-letter queue (a worker's task out of attempts)
    for row in task_rows:
        tasks_by_status[row["status"]] += int(row["n"])
        if row["dead_lettered"]:
            dead_lettered += int(row["n"])
    finished = sum(tasks_by_status[s] for s in TERMINAL_TASK_STATUSES)

    attempt_all, attempt_per = _split(attempt_rows)
    attempts = 0 if attempt_all is None else int(attempt_all["attempts"])
    retries = 0 if attempt_all is None else int(attempt_all["retries"])

    approved, rejected, timed_out = (int(approvals[k]) for k in ("approved", "rejected", "timed_out"))
    decided = approved + rejected + timed_out
    decision_time = _summary({"n": approvals["decided"], "q": approvals["q"], "max_s": approvals["max_s"],
                              "sum_s": approvals["sum_s"]},
                             ("p50", "p95"))
    lag_summary = _summary(lag, ("p50", "p95"))

    return {
        "workspace": workspace_id,
        "pipeline": pipeline_id,
        "window_s": window_s,
        "since": bounds["since"],
        "now": bounds["now"],
        "runs": {
            "total": sum(runs_by_status.values()),
            "by_status": runs_by_status,
            "by_pipeline": dict(sorted(runs_by_pipeline.items())),
            "duration_s": {
                "all": _summary(run_all),
                "by_pipeline": {p: _summary(r) for p, r in sorted(run_per.items())},
            },
        },
        "tasks": {
            "total": sum(tasks_by_status.values()),
            "by_status": tasks_by_status,
            "finished": finished,
            "dead_lettered": dead_lettered,
            "dead_letter_rate": _ratio(dead_lettered, finished),
        },
        "attempts": {
            "total": attempts,
            "retries": retries,
            "retry_rate": _ratio(retries, attempts),
            "duration_s": {
                "all": _summary(attempt_all),
                "by_pipeline": {p: _summary(r) for p, r in sorted(attempt_per.items())},
            },
        },
        "failures": {
            "total": sum(int(r["n"]) for r in failures),
            "by_code": [{"code": r["code"], "type": r["type"], "count": int(r["n"])} for r in failures],
        },
        "approvals": {
            "total": int(approvals["total"]),
            "approved": approved,
            "rejected": rejected,
            "timed_out": timed_out,
            "escalated": int(approvals["escalated"]),
            "waiting": int(approvals["waiting"]),
            "approval_rate": _ratio(approved, decided),
            "decision_time_s": decision_time,
        },
        "schedule_lag_s": lag_summary,
    }


# Prometheus text exposition format (version 0.0.4).
PROMETHEUS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(labels: dict[str, str]) -> str:
    return "{" + ",".join(f'{k}="{_escape(v)}"' for k, v in labels.items()) + "}" if labels else ""


def _value(value: float | int | None) -> str:
    if value is None:
        return "NaN"
    if isinstance(value, float) and math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if isinstance(value, int) or float(value).is_integer():
        return str(int(value))
    return repr(float(value))


class _Exposition:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def family(self, name: str, kind: str, help_text: str) -> None:
        self.lines.append(f"# HELP {name} {help_text}")
        self.lines.append(f"# TYPE {name} {kind}")

    def sample(self, name: str, labels: dict[str, str], value: float | int | None) -> None:
        self.lines.append(f"{name}{_labels(labels)} {_value(value)}")

    def summary(self, name: str, labels: dict[str, str], data: dict[str, Any], quantiles: dict[str, str]) -> None:
        for key, q in quantiles.items():
            self.sample(name, {**labels, "quantile": q}, data.get(key))
        if "sum" in data:
            self.sample(f"{name}_sum", labels, data["sum"] or 0)
        self.sample(f"{name}_count", labels, data["count"])

    def text(self) -> str:
        return "\n".join(self.lines) + "\n"


def to_prometheus(metrics: dict[str, Any]) -> str:
    """The metrics as Prometheus text: gauges over the window, durations as summaries."""
    base = {"workspace": str(metrics["workspace"])}
    out = _Exposition()
    q3 = {"p50": "0.5", "p95": "0.95", "p99": "0.99"}
    q2 = {"p50": "0.5", "p95": "0.95"}
    out.family("tickweave_window_seconds", "gauge", "Length of the window these metrics cover.")
    out.sample("tickweave_window_seconds", base, metrics["window_s"])

    out.family("tickweave_runs", "gauge", "Runs created in the window, by status.")
    for status, n in metrics["runs"]["by_status"].items():
        out.sample("tickweave_runs", {**base, "status": status}, n)
    out.family("tickweave_pipeline_runs", "gauge", "Runs created in the window, by pipeline and status.")
    for pipeline, counts in metrics["runs"]["by_pipeline"].items():
        for status, n in counts.items():
            out.sample("tickweave_pipeline_runs", {**base, "pipeline": pipeline, "status": status}, n)
    out.family("tickweave_run_duration_seconds", "summary",
               "Duration of finished runs (started to finished), by pipeline.")
    for pipeline, data in metrics["runs"]["duration_s"]["by_pipeline"].items():
        out.summary("tickweave_run_duration_seconds", {**base, "pipeline": pipeline}, data, q3)

    out.family("tickweave_tasks", "gauge", "Tasks of the window's runs, by status.")
    for status, n in metrics["tasks"]["by_status"].items():
        out.sample("tickweave_tasks", {**base, "status": status}, n)
    out.family("tickweave_dead_lettered_tasks", "gauge",
               "Failed tasks of the window's runs in the dead-letter queue.")
    out.sample("tickweave_dead_lettered_tasks", base, metrics["tasks"]["dead_lettered"])
    out.family("tickweave_dead_letter_ratio", "gauge", "Dead-lettered tasks over finished tasks.")
    out.sample("tickweave_dead_letter_ratio", base, metrics["tasks"]["dead_letter_rate"])

    out.family("tickweave_task_attempts", "gauge", "Task attempts of the window's runs.")
    out.sample("tickweave_task_attempts", base, metrics["attempts"]["total"])
    out.family("tickweave_task_retries", "gauge", "Attempts beyond a task's first.")
    out.sample("tickweave_task_retries", base, metrics["attempts"]["retries"])
    out.family("tickweave_retry_ratio", "gauge", "Attempts beyond a task's first over all attempts.")
    out.sample("tickweave_retry_ratio", base, metrics["attempts"]["retry_rate"])
    out.family("tickweave_attempt_duration_seconds", "summary",
               "Duration of ended task attempts (dispatched to finished), by pipeline.")
    for pipeline, data in metrics["attempts"]["duration_s"]["by_pipeline"].items():
        out.summary("tickweave_attempt_duration_seconds", {**base, "pipeline": pipeline}, data, q3)

    out.family("tickweave_task_failures", "gauge", "Failed attempts by error code and type.")
    for row in metrics["failures"]["by_code"]:
        out.sample("tickweave_task_failures", {**base, "code": str(row["code"]), "type": str(row["type"] or "")},
                   row["count"])

    approvals = metrics["approvals"]
    out.family("tickweave_approvals", "gauge", "Approval gates of the window's runs, by outcome.")
    for outcome in ("approved", "rejected", "timed_out", "escalated", "waiting"):
        out.sample("tickweave_approvals", {**base, "outcome": outcome}, approvals[outcome])
    out.family("tickweave_approval_decision_seconds", "summary", "Time from a gate waiting to a person's decision.")
    out.summary("tickweave_approval_decision_seconds", base, approvals["decision_time_s"], q2)

    lag = metrics["schedule_lag_s"]
    out.family("tickweave_schedule_lag_seconds", "summary", "Scheduled runs: creation time minus slot time.")
    out.summary("tickweave_schedule_lag_seconds", base, lag, q2)
    out.family("tickweave_schedule_lag_max_seconds", "gauge", "Largest schedule lag in the window.")
    out.sample("tickweave_schedule_lag_max_seconds", base, lag["max"])
    return out.text()
