"""The invariant checker (orchestrator/store/invariants.py) against books broken on purpose.

Each check gets a real run built through the engine, then one precise corruption with SQL; the
checker must report exactly that check (and name the run or task where it can). A clean run,
finished or in flight, reports nothing; `tickweave db check` exits 0 on a clean database and 1
on a broken one, with `--json` output a script can read.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from orchestrator.cli import main
from orchestrator.db.connection import Connection, Row
from orchestrator.engine.completion import AttemptResult, finish_attempt
from orchestrator.engine.keys import set_workspace_task_limit
from orchestrator.engine.service import Engine
from orchestrator.store import tasks as task_store
from orchestrator.store.invariants import CHECK_NAMES, Violation, check_books, find_violations

from .conftest import WORKSPACE

REPO = Path(__file__).resolve().parents[2]


# --- helpers -------------------------------------------------------------------------------


def claim(engine: Engine, run_id: uuid.UUID | None = None, limit: int = 100) -> list[Row]:
    with engine.db.transaction() as conn:
        return task_store.claim_ready_tasks(conn, limit, run_id=run_id)


def finish(engine: Engine, task: Row, ok: bool = True, retryable: bool = True) -> AttemptResult:
    def work(conn: Connection) -> AttemptResult:
        return finish_attempt(
            conn, task["id"], task["attempt"], task["claim_token"], succeeded=ok,
            output={"key": f"k/{task['node_id']}"} if ok else None,
            error=None if ok else {"message": "boom", "retryable": retryable}, retryable=retryable,
        )

    return engine.db.run_in_transaction(work)


def task_ids(engine: Engine, run_id: uuid.UUID) -> dict[str, uuid.UUID]:
    _, tasks = engine.get_run(WORKSPACE, run_id)
    return {t["node_id"]: t["id"] for t in tasks}


def sql(engine: Engine, statement: str, *params: Any) -> None:
    with engine.db.transaction() as conn:
        conn.execute(statement, params)


def violations(engine: Engine) -> list[Violation]:
    return find_violations(engine.settings.database_url)


def only(found: list[Violation], check: str) -> list[Violation]:
    """Assert every violation is of `check` (and there is at least one); return them."""
    assert found, f"the checker found nothing; expected [{check}]"
    assert {v.check for v in found} == {check}, "\n".join(f"[{v.check}] {v.message}" for v in found)
    return found


def trigger(engine: Engine, definition: dict[str, Any], **kwargs: Any) -> uuid.UUID:
    engine.create_pipeline(WORKSPACE, definition)
    return engine.trigger_run(WORKSPACE, definition["id"], dispatch_now=False, **kwargs).id


DIAMOND: dict[str, Any] = {"id": "diamond", "nodes": [
    {"id": "a", "task": "echo"},
    {"id": "b", "task": "echo", "depends": ["a"]},
    {"id": "c", "task": "echo", "depends": ["a"]},
    {"id": "d", "task": "echo", "depends": ["b", "c"]},
]}


# --- one corruption per check --------------------------------------------------------------
# Each builds a real run through the engine, breaks one thing, and returns (run id, task id)
# the violation must name (None: not asserted).

Corruption = Callable[[Engine], tuple[uuid.UUID | None, uuid.UUID | None]]


def corrupt_pending_task_counters(engine: Engine) -> tuple[uuid.UUID | None, uuid.UUID | None]:
    run = trigger(engine, DIAMOND)
    (a,) = claim(engine)
    finish(engine, a)  # b and c ready, d pending on 2
    d = task_ids(engine, run)["d"]
    sql(engine, "UPDATE tasks SET unfinished_deps = unfinished_deps + 1 WHERE id = %s", d)
    return run, d


def corrupt_pending_task_undecided(engine: Engine) -> tuple[uuid.UUID | None, uuid.UUID | None]:
    # `x` keeps the run a way forward, so only the undecided join is wrong.
    run = trigger(engine, {"id": "p", "nodes": [
        {"id": "a", "task": "echo"}, {"id": "b", "task": "echo", "depends": ["a"]},
        {"id": "x", "task": "echo", "priority": -1}]})
    (a,) = claim(engine, limit=1)
    assert a["node_id"] == "a"
    finish(engine, a)  # b ready: its counters are 0/0/0, all true
    b = task_ids(engine, run)["b"]
    sql(engine, "UPDATE tasks SET status = 'pending' WHERE id = %s AND status = 'ready'", b)
    return run, b


def corrupt_run_unfinished_counter(engine: Engine) -> tuple[uuid.UUID | None, uuid.UUID | None]:
    run = trigger(engine, DIAMOND)
    finish(engine, claim(engine)[0])
    sql(engine, "UPDATE runs SET unfinished_tasks = unfinished_tasks + 1 WHERE id = %s", run)
    return run, None


WIDE_JOIN = {"id": "wide", "nodes": [*({"id": f"u{i}", "task": "echo"} for i in range(8)),
                                     {"id": "j", "task": "echo", "depends": [f"u{i}" for i in range(8)]}]}


def corrupt_join_slot_remaining(engine: Engine) -> tuple[uuid.UUID | None, uuid.UUID | None]:
    # A join of 8 is counted through slots (migration 0027); one slot forgets an end.
    run = trigger(engine, WIDE_JOIN)
    j = task_ids(engine, run)["j"]
    sql(engine, "UPDATE join_slots SET remaining = remaining + 1 WHERE task_id = %s AND slot = 0", j)
    return run, j


def corrupt_terminal_run_with_open_task(engine: Engine) -> tuple[uuid.UUID | None, uuid.UUID | None]:
    # A task left running in a succeeded run (its unfinished count still true: 1).
    run = trigger(engine, {"id": "p", "nodes": [{"id": "a", "task": "echo"}, {"id": "b", "task": "echo"}]})
    a, b = sorted(claim(engine), key=lambda t: t["node_id"])
    finish(engine, a)
    sql(engine, "UPDATE runs SET status = 'succeeded', finished_at = tw_now() WHERE id = %s", run)
    return run, b["id"]


def corrupt_queued_run_with_started_task(engine: Engine) -> tuple[uuid.UUID | None, uuid.UUID | None]:
    # The second run is legitimately queued behind max_active_runs; one of its roots is made ready.
    engine.create_pipeline(WORKSPACE, {**DIAMOND, "concurrency": {"max_active_runs": 1}})
    engine.trigger_run(WORKSPACE, "diamond", dispatch_now=False)
    queued = engine.trigger_run(WORKSPACE, "diamond", dispatch_now=False).id
    assert engine.get_run(WORKSPACE, queued)[0]["status"] == "pending"
    a = task_ids(engine, queued)["a"]
    sql(engine, "UPDATE tasks SET status = 'ready' WHERE id = %s", a)
    return queued, a


def corrupt_running_run_without_way_forward(engine: Engine) -> tuple[uuid.UUID | None, uuid.UUID | None]:
    # The last open task is skipped and counted off, but the run is left running.
    run = trigger(engine, {"id": "p", "steps": [{"id": "a", "task": "echo"}, {"id": "b", "task": "echo"}]})
    finish(engine, claim(engine)[0])
    b = task_ids(engine, run)["b"]
    sql(engine, "UPDATE tasks SET status = 'skipped', finished_at = tw_now() WHERE id = %s", b)
    sql(engine, "UPDATE runs SET unfinished_tasks = unfinished_tasks - 1 WHERE id = %s", run)
    return run, None


def corrupt_started_task_with_unsatisfied_upstreams(engine: Engine) -> tuple[uuid.UUID | None, uuid.UUID | None]:
    # b made ready while its upstream is still out with a worker.
    run = trigger(engine, {"id": "p", "steps": [{"id": "a", "task": "echo"}, {"id": "b", "task": "echo"}]})
    claim(engine)
    b = task_ids(engine, run)["b"]
    sql(engine, "UPDATE tasks SET status = 'ready', available_at = tw_now() WHERE id = %s", b)
    return run, b


def corrupt_active_task_without_lease(engine: Engine) -> tuple[uuid.UUID | None, uuid.UUID | None]:
    run = trigger(engine, DIAMOND)
    (a,) = claim(engine)
    sql(engine, "UPDATE tasks SET lease_expires_at = NULL WHERE id = %s", a["id"])
    return run, a["id"]


def _force_dispatch(engine: Engine, task_id: uuid.UUID) -> None:
    """A ready task put out with a worker behind the claim's back (with a token and a lease, so
    only the limit is broken)."""
    sql(engine, """UPDATE tasks SET status = 'dispatched', attempt = attempt + 1, claim_token = gen_random_uuid(),
                          dispatched_at = tw_now(), lease_expires_at = tw_now() + interval '2 minutes'
                   WHERE id = %s AND status = 'ready'""", task_id)


def corrupt_pipeline_task_limit(engine: Engine) -> tuple[uuid.UUID | None, uuid.UUID | None]:
    run = trigger(engine, {"id": "limited", "concurrency": {"max_active_tasks": 2},
                           "nodes": [{"id": n, "task": "echo"} for n in ("a", "b", "c")]})
    assert len(claim(engine)) == 2  # the claim keeps the limit...
    (left,) = [t["id"] for t in engine.get_run(WORKSPACE, run)[1] if t["status"] == "ready"]
    _force_dispatch(engine, left)  # ...the corruption does not
    return None, None


def corrupt_workspace_task_limit(engine: Engine) -> tuple[uuid.UUID | None, uuid.UUID | None]:
    set_workspace_task_limit(engine.db, WORKSPACE, 2)
    run = trigger(engine, {"id": "wide", "nodes": [{"id": n, "task": "echo"} for n in ("a", "b", "c")]})
    assert len(claim(engine)) == 2
    (left,) = [t["id"] for t in engine.get_run(WORKSPACE, run)[1] if t["status"] == "ready"]
    _force_dispatch(engine, left)
    return None, None


def corrupt_orchestration_run_blocked_on_finished_upstream(engine: Engine) -> tuple[uuid.UUID | None, uuid.UUID | None]:
    # B waits for A in one orchestration; it is made to wait for one more upstream than it has.
    engine.create_pipeline(WORKSPACE, {"id": "up", "nodes": [{"id": "n", "task": "echo"}],
                                       "outputs": {"out": {"from": "n"}}})
    engine.create_pipeline(WORKSPACE, {"id": "down", "nodes": [{"id": "n", "task": "echo"}],
                                       "depends": [{"pipeline": "up", "outputs": ["out"]}]})
    orchestration = engine.trigger_orchestration(WORKSPACE, root="down", include="upstream", dispatch_now=False)
    (down,) = [r for r in orchestration.runs if r["pipeline_id"] == "down"]
    assert down["status"] == "pending"
    sql(engine, "UPDATE runs SET blocked_upstreams = blocked_upstreams + 1 WHERE id = %s", down["id"])
    return down["id"], None


def corrupt_run_failed_counter(engine: Engine) -> tuple[uuid.UUID | None, uuid.UUID | None]:
    # A running run that counts a stopping failure none of its tasks had (a tolerated one is real).
    run = trigger(engine, {"id": "p", "nodes": [
        {"id": "x", "task": "fail", "on_failure": "continue"}, {"id": "y", "task": "echo", "priority": -1}]})
    (x,) = claim(engine, limit=1)
    assert finish(engine, x, ok=False).outcome == "failed"
    assert engine.get_run(WORKSPACE, run)[0]["status"] == "running"
    sql(engine, "UPDATE runs SET failed_tasks = failed_tasks + 1 WHERE id = %s", run)
    return run, None


def corrupt_run_failed_task_count(engine: Engine) -> tuple[uuid.UUID | None, uuid.UUID | None]:
    # A run that succeeded past a tolerated failure, counted as if nothing had failed (it would
    # answer succeeded_with_failures false).
    run = trigger(engine, {"id": "p", "nodes": [{"id": "x", "task": "fail", "on_failure": "continue"}]})
    (x,) = claim(engine)
    assert finish(engine, x, ok=False).run_status == "succeeded"
    assert engine.get_run(WORKSPACE, run)[0]["failed_tasks"] == 1
    sql(engine, "UPDATE runs SET failed_task_count = 0 WHERE id = %s", run)
    return run, None


def corrupt_open_dead_letter_of_unfailed_task(engine: Engine) -> tuple[uuid.UUID | None, uuid.UUID | None]:
    # A task that succeeded, with an open dead letter (a retry of it would run it again).
    run = trigger(engine, {"id": "p", "nodes": [{"id": "x", "task": "echo"}]})
    (x,) = claim(engine)
    assert finish(engine, x).run_status == "succeeded"
    sql(engine, """INSERT INTO dead_letters (workspace_id, pipeline_id, run_id, task_id, node_id, version, task_name,
                                             inputs, attempts, error, code_version)
                   SELECT workspace_id, pipeline_id, run_id, id, node_id, version, task_name, '{}', '[]', '{}', 'x'
                   FROM tasks WHERE id = %s""", x["id"])
    return run, x["id"]


def _mapped_run(engine: Engine, items: list[Any], **options: Any) -> tuple[uuid.UUID, uuid.UUID]:
    """A run whose root map node over params is expanded as it starts (nothing claimed); `x` keeps
    the run a way forward. Returns (run id, map node id)."""
    run = trigger(engine, {"id": "m", "params": {"xs": items}, "nodes": [
        {"id": "each", "task": "echo", "map": {"over": "params.xs", **options}},
        {"id": "after", "task": "echo", "depends": ["each"]},
        {"id": "x", "task": "echo", "priority": -1}]})
    with engine.db.connection() as conn:
        node = conn.execute("SELECT id FROM tasks WHERE run_id = %s AND kind = 'map'", (run,)).fetchone()
    assert node is not None
    return run, node["id"]


def corrupt_map_node_unresolved(engine: Engine) -> tuple[uuid.UUID | None, uuid.UUID | None]:
    # An empty map settles at once; put back to ready (and counted open again), it would wait
    # for a claim that never takes map nodes.
    run, node = _mapped_run(engine, [])
    sql(engine, "UPDATE tasks SET status = 'ready', finished_at = NULL WHERE id = %s AND status = 'succeeded'", node)
    # ...and its successor back to waiting for it, as it would be
    sql(engine, "UPDATE tasks SET status = 'pending', unfinished_deps = 1 WHERE run_id = %s AND node_id = 'after'", run)
    sql(engine, "UPDATE runs SET unfinished_tasks = unfinished_tasks + 1 WHERE id = %s", run)
    return run, node


def corrupt_map_width(engine: Engine) -> tuple[uuid.UUID | None, uuid.UUID | None]:
    run, node = _mapped_run(engine, ["a", "b", "c"])
    sql(engine, "UPDATE tasks SET map_width = 4 WHERE id = %s", node)
    return run, node


def corrupt_map_child_of_settled_node(engine: Engine) -> tuple[uuid.UUID | None, uuid.UUID | None]:
    # The map node skipped (with its successor, both counted off) while its three items are
    # still ready.
    run, node = _mapped_run(engine, ["a", "b", "c"])
    sql(engine, "UPDATE tasks SET status = 'skipped', finished_at = tw_now() WHERE id = %s", node)
    sql(engine, "UPDATE tasks SET status = 'skipped', finished_at = tw_now() WHERE run_id = %s AND node_id = 'after'",
        run)
    sql(engine, "UPDATE runs SET unfinished_tasks = unfinished_tasks - 2 WHERE id = %s", run)
    return run, None


def corrupt_map_concurrency_limit(engine: Engine) -> tuple[uuid.UUID | None, uuid.UUID | None]:
    run, node = _mapped_run(engine, ["a", "b", "c"], max_concurrency=1)
    with engine.db.connection() as conn:
        children = conn.execute("SELECT id FROM tasks WHERE map_parent_id = %s ORDER BY map_index LIMIT 2",
                                (node,)).fetchall()
    for child in children:
        _force_dispatch(engine, child["id"])
    return run, node


CORRUPTIONS: dict[str, Corruption] = {
    "pending_task_counters": corrupt_pending_task_counters,
    "pending_task_undecided": corrupt_pending_task_undecided,
    "run_unfinished_counter": corrupt_run_unfinished_counter,
    "join_slot_remaining": corrupt_join_slot_remaining,
    "terminal_run_with_open_task": corrupt_terminal_run_with_open_task,
    "queued_run_with_started_task": corrupt_queued_run_with_started_task,
    "running_run_without_way_forward": corrupt_running_run_without_way_forward,
    "started_task_with_unsatisfied_upstreams": corrupt_started_task_with_unsatisfied_upstreams,
    "active_task_without_lease": corrupt_active_task_without_lease,
    "pipeline_task_limit": corrupt_pipeline_task_limit,
    "workspace_task_limit": corrupt_workspace_task_limit,
    "orchestration_run_blocked_on_finished_upstream": corrupt_orchestration_run_blocked_on_finished_upstream,
    "run_failed_counter": corrupt_run_failed_counter,
    "run_failed_task_count": corrupt_run_failed_task_count,
    "open_dead_letter_of_unfailed_task": corrupt_open_dead_letter_of_unfailed_task,
    "map_node_unresolved": corrupt_map_node_unresolved,
    "map_width": corrupt_map_width,
    "map_child_of_settled_node": corrupt_map_child_of_settled_node,
    "map_concurrency_limit": corrupt_map_concurrency_limit,
}


def test_every_check_has_a_corruption() -> None:
    missing = [name for name in CHECK_NAMES if name not in CORRUPTIONS]
    assert not missing, f"checks with no corruption test (added or renamed?): {missing}"


@pytest.mark.books_unchecked
@pytest.mark.parametrize("check", CHECK_NAMES)
def test_each_check_reports_exactly_its_own_corruption(engine: Engine, check: str) -> None:
    corrupt = CORRUPTIONS.get(check)
    if corrupt is None:
        pytest.fail(f"no corruption for check {check!r}")
    assert violations(engine) == [], "the books were broken before the corruption"
    run_id, task_id = corrupt(engine)
    found = only(violations(engine), check)
    if run_id is not None:
        assert {v.run_id for v in found} == {str(run_id)}
    if task_id is not None:
        assert {v.task_id for v in found} == {str(task_id)}
    for v in found:
        assert v.message and v.workspace_id == WORKSPACE
        assert v.to_dict()["check"] == check
    # check_books on a connection (no snapshot transaction) says the same
    with engine.db.connection() as conn:
        assert [v.check for v in check_books(conn)] == [v.check for v in found]


@pytest.mark.books_unchecked
@pytest.mark.parametrize(("rule", "upstream_outcome"), [
    ("all_success", "skipped"),
    ("all_success", "cancelled"),
    ("none_failed", "failed"),
    ("one_failed", "succeeded"),
])
def test_a_started_task_whose_trigger_rule_does_not_hold_is_reported(engine: Engine, rule: str, upstream_outcome: str) -> None:
    """Every upstream finished, but not as the downstream's rule needs: it must not have started."""
    run = trigger(engine, {"id": "p", "nodes": [
        {"id": "a", "task": "echo", "on_failure": "continue"},
        {"id": "b", "task": "echo", "depends": ["a"], "trigger_rule": rule},
        {"id": "x", "task": "echo", "priority": -1}]})
    (a,) = claim(engine, limit=1)
    assert a["node_id"] == "a"
    ids = task_ids(engine, run)
    # a ended as `upstream_outcome`, b (decided at once) started as if the rule held
    sql(engine, "UPDATE tasks SET status = %s, finished_at = tw_now(), claim_token = NULL, lease_expires_at = NULL "
                "WHERE id = %s", upstream_outcome, a["id"])
    if upstream_outcome == "failed":  # a worker's task: dead-lettered, and counted against its run
        sql(engine, """INSERT INTO dead_letters (workspace_id, pipeline_id, run_id, task_id, node_id, version, task_name,
                                                 inputs, attempts, error, code_version)
                       SELECT workspace_id, pipeline_id, run_id, id, node_id, version, task_name, '{}', '[]', '{}', 'x'
                       FROM tasks WHERE id = %s AND status = 'failed'""", a["id"])
        sql(engine, "UPDATE runs SET failed_task_count = failed_task_count + 1 WHERE id = %s", run)
    sql(engine, """UPDATE tasks SET status = 'ready', unfinished_deps = 0, available_at = tw_now(),
                          failed_deps = CASE WHEN %s = 'failed' THEN 1 ELSE 0 END,
                          skipped_deps = CASE WHEN %s IN ('skipped', 'cancelled') THEN 1 ELSE 0 END
                   WHERE id = %s""", upstream_outcome, upstream_outcome, ids["b"])
    sql(engine, "UPDATE runs SET unfinished_tasks = unfinished_tasks - 1 WHERE id = %s", run)
    (v,) = only(violations(engine), "started_task_with_unsatisfied_upstreams")
    assert v.task_id == str(ids["b"]) and rule in v.message


@pytest.mark.books_unchecked
def test_several_corruptions_are_all_reported_in_check_order(engine: Engine) -> None:
    run = trigger(engine, DIAMOND)
    (a,) = claim(engine, run)
    finish(engine, a)
    sql(engine, "UPDATE tasks SET unfinished_deps = 5 WHERE id = %s", task_ids(engine, run)["d"])
    sql(engine, "UPDATE runs SET unfinished_tasks = unfinished_tasks + 1 WHERE id = %s", run)
    other = trigger(engine, {"id": "p", "nodes": [{"id": "x", "task": "echo"}]})
    (x,) = claim(engine, other)
    sql(engine, "UPDATE tasks SET claim_token = NULL WHERE id = %s", x["id"])
    found = [v.check for v in violations(engine)]
    assert set(found) == {"run_unfinished_counter", "active_task_without_lease", "pending_task_counters"}
    assert found == sorted(found, key=CHECK_NAMES.index)


@pytest.mark.books_unchecked
def test_what_an_open_task_carries_is_counted_and_a_finished_ones_is_not(engine: Engine) -> None:
    """run_unfinished_counter counts each open task with what was carried to it (migration
    0026); a finished task's carried count was spent when it ended."""
    run = trigger(engine, DIAMOND)
    (a,) = claim(engine, run)
    finish(engine, a)
    ids = task_ids(engine, run)
    sql(engine, "UPDATE tasks SET carried_tasks = 2 WHERE id = %s", ids["a"])  # finished: not counted
    assert violations(engine) == []
    sql(engine, "UPDATE tasks SET carried_tasks = 2 WHERE id = %s", ids["d"])  # pending: counted
    (found,) = only(violations(engine), "run_unfinished_counter")
    assert found.run_id == str(run) and "carrying 2" in found.message, found.message
    sql(engine, "UPDATE runs SET unfinished_tasks = unfinished_tasks + 2 WHERE id = %s", run)
    assert violations(engine) == []


@pytest.mark.books_unchecked
def test_what_a_joins_open_slots_hold_is_counted(engine: Engine) -> None:
    """pending_task_counters takes the ends an open slot holds (arrived) off its join's count,
    and run_unfinished_counter adds what it carries; a completed slot (remaining 0) holds
    nothing for either."""
    run = trigger(engine, WIDE_JOIN)
    j = task_ids(engine, run)["j"]
    assert violations(engine) == []
    sql(engine, "UPDATE join_slots SET arrived = 1 WHERE task_id = %s AND slot = 0", j)  # open: counted
    assert [v.check for v in violations(engine)] == ["pending_task_counters"]
    sql(engine, "UPDATE tasks SET unfinished_deps = unfinished_deps + 1 WHERE id = %s", j)
    assert violations(engine) == []
    sql(engine, "UPDATE join_slots SET carried = 3 WHERE task_id = %s AND slot = 1", j)
    (found,) = only(violations(engine), "run_unfinished_counter")
    assert "carrying 3" in found.message, found.message
    sql(engine, "UPDATE runs SET unfinished_tasks = unfinished_tasks + 3 WHERE id = %s", run)
    assert violations(engine) == []


# --- clean books ---------------------------------------------------------------------------


def test_a_clean_finished_run_reports_nothing(engine: Engine) -> None:
    run = trigger(engine, DIAMOND, versions=["v1", "v2"])
    while tasks := claim(engine):
        for task in tasks:
            finish(engine, task)
    assert engine.get_run(WORKSPACE, run)[0]["status"] == "succeeded"
    assert violations(engine) == []


def test_runs_in_every_state_report_nothing(engine: Engine) -> None:
    """In flight, waiting for a person, failed with a dead letter, redriven, cancelled, queued
    behind max_active_runs, waiting in an orchestration: the books hold at every point."""
    engine.create_pipeline(WORKSPACE, {"id": "gated", "steps": [
        {"id": "build", "task": "echo"}, {"id": "approve", "kind": "approval"}, {"id": "ship", "task": "echo"}]})
    gated = engine.trigger_run(WORKSPACE, "gated", dispatch_now=False).id
    finish(engine, claim(engine, gated)[0])
    assert violations(engine) == []  # approval waiting

    failing = trigger(engine, {"id": "failing", "concurrency": {"max_active_runs": 1}, "nodes": [
        {"id": "x", "task": "fail"}, {"id": "y", "task": "echo", "depends": ["x"]},
        {"id": "alert", "task": "echo", "depends": ["x"], "trigger_rule": "one_failed"}]})
    queued = engine.trigger_run(WORKSPACE, "failing", dispatch_now=False).id
    assert violations(engine) == []  # one running, one queued
    finish(engine, claim(engine, failing)[0], ok=False)
    assert violations(engine) == []  # a stopping failure, the one_failed handler still ready
    (alert,) = claim(engine, failing)
    assert alert["node_id"] == "alert"
    finish(engine, alert)
    assert engine.get_run(WORKSPACE, failing)[0]["status"] == "failed"
    assert violations(engine) == []  # failed, with a dead letter
    engine.redrive_run(WORKSPACE, failing)
    assert violations(engine) == []  # redriven
    engine.cancel_run(WORKSPACE, failing, actor="test")
    assert violations(engine) == []  # cancelled, the queued run started
    assert engine.get_run(WORKSPACE, queued)[0]["status"] == "running"

    engine.create_pipeline(WORKSPACE, {"id": "up", "nodes": [{"id": "n", "task": "echo"}],
                                       "outputs": {"out": {"from": "n"}}})
    engine.create_pipeline(WORKSPACE, {"id": "down", "nodes": [{"id": "n", "task": "echo"}],
                                       "depends": [{"pipeline": "up", "outputs": ["out"]}]})
    engine.trigger_orchestration(WORKSPACE, root="down", include="upstream", dispatch_now=False)
    assert violations(engine) == []  # an orchestration's run waiting for its upstream
    engine.decide(WORKSPACE, task_ids(engine, gated)["approve"], kind="approval", succeeded=True, actor="test")
    assert violations(engine) == []


# --- tickweave db check --------------------------------------------------------------------


@pytest.mark.books_unchecked
def test_cli_db_check_exits_0_when_clean_and_1_naming_the_check_when_broken(
    engine: Engine, capsys: pytest.CaptureFixture[str],
) -> None:
    url = engine.settings.database_url
    run = trigger(engine, DIAMOND)
    capsys.readouterr()
    assert main(["db", "check", "--database-url", url]) == 0
    assert "clean" in capsys.readouterr().out

    assert main(["db", "check", "--database-url", url, "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {"ok": True, "violations": []}

    sql(engine, "UPDATE runs SET unfinished_tasks = unfinished_tasks + 3 WHERE id = %s", run)
    assert main(["db", "check", "--database-url", url]) == 1
    out = capsys.readouterr().out
    assert "[run_unfinished_counter]" in out and str(run) in out and "1 violation" in out

    assert main(["db", "check", "--database-url", url, "--json"]) == 1
    report = json.loads(capsys.readouterr().out)  # stdout holds the JSON document and nothing else
    assert report["ok"] is False
    (item,) = report["violations"]
    assert item["check"] == "run_unfinished_counter" and item["run_id"] == str(run)
    assert item["workspace_id"] == WORKSPACE and item["task_id"] is None and item["message"]


@pytest.mark.books_unchecked
def test_cli_db_check_as_a_process_reads_database_url_and_sets_its_exit_code(engine: Engine) -> None:
    url = engine.settings.database_url
    env = {k: v for k, v in os.environ.items() if not k.startswith("TICKWEAVE_")}
    env["DATABASE_URL"] = url

    def run_cli(*argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "orchestrator.cli", "db", "check", *argv], cwd=REPO, env=env,
                              capture_output=True, text=True, timeout=120)

    run = trigger(engine, DIAMOND)
    clean = run_cli("--json")
    assert clean.returncode == 0, clean.stderr
    assert json.loads(clean.stdout)["ok"] is True

    (a,) = claim(engine)
    sql(engine, "UPDATE tasks SET claim_token = NULL WHERE id = %s", a["id"])
    broken = run_cli("--database-url", url)  # the flag, as well as the environment
    assert broken.returncode == 1, broken.stdout + broken.stderr
    assert "[active_task_without_lease]" in broken.stdout and str(a["id"]) in broken.stdout
    assert engine.get_run(WORKSPACE, run)[0]["status"] == "running"  # the check changed nothing
