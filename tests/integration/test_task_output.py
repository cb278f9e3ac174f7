"""`GET /api/tasks/{id}/output`: the content a step stored, declared under `outputs:` or not,
for the task's workspace only, and never more than an API answer may carry (Lambda stops at
6 MB). Real Postgres, moto, the real SDK and app (the harness of the task-log tests)."""

from __future__ import annotations

import json
import uuid
from typing import Any

from orchestrator.engine.outputs import MAX_CONTENT_ANSWER_BYTES
from orchestrator.storage.s3 import orchestrator_s3
from orchestrator.worker import TaskContext

from .test_task_logs import AUTH, WORKSPACE, Harness, harness  # noqa: F401  (the fixture)


def _output(harness: Harness, task_id: str, headers: dict[str, str] | None = None) -> Any:
    return harness.api.get(f"/api/tasks/{task_id}/output", headers=headers or AUTH)


def test_a_steps_output_is_served_though_the_pipeline_declares_none(harness: Harness) -> None:
    harness.start({"id": "plain", "nodes": [{"id": "first", "task": "emit"}, {"id": "second", "task": "emit",
                                                                             "depends": ["first"]}]})
    first = harness.take("first")

    @harness.worker.task("emit")
    def emit(ctx: TaskContext) -> dict[str, Any]:
        return {"node": ctx.node, "rows": [1, 2, 3]}

    assert harness.worker.execute(first)["accepted"]
    response = _output(harness, first["task_id"])
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/json"
    assert json.loads(response.content) == {"node": "first", "rows": [1, 2, 3]}

    # The second step has not run: no output yet, a 404 that says so.
    second = harness.take("second")
    pending = _output(harness, second["task_id"])
    assert pending.status_code == 404
    assert "has no stored output" in pending.json()["error"]["message"]


def test_another_workspaces_task_a_bad_id_and_no_key_are_refused(harness: Harness) -> None:
    harness.start({"id": "private", "nodes": [{"id": "only", "task": "emit"}]})
    message = harness.take("only")

    @harness.worker.task("emit")
    def emit(ctx: TaskContext) -> dict[str, Any]:
        return {"secret": "only for acme"}

    assert harness.worker.execute(message)["accepted"]
    harness.engine.create_api_key("intruder", "admin", raw_key="intruder-key")
    stolen = _output(harness, message["task_id"], {"Authorization": "Bearer intruder-key"})
    assert stolen.status_code == 404 and "only for acme" not in stolen.text
    assert _output(harness, str(uuid.uuid4())).status_code == 404
    malformed = _output(harness, "not-a-uuid")  # as every task route answers a malformed id
    assert malformed.status_code == 404 and "task" in malformed.json()["error"]["message"]
    assert harness.api.get(f"/api/tasks/{message['task_id']}/output").status_code == 401


def test_an_output_larger_than_an_answer_may_carry_is_refused_with_its_key(harness: Harness) -> None:
    harness.start({"id": "bulky", "nodes": [{"id": "only", "task": "emit"}]})
    message = harness.take("only")

    @harness.worker.task("emit")
    def emit(ctx: TaskContext) -> dict[str, Any]:
        return {"ok": True}

    assert harness.worker.execute(message)["accepted"]
    task, _ = harness.engine.get_task(WORKSPACE, uuid.UUID(message["task_id"]))
    key = task["output"]["key"]
    # Grown in place past the answer limit (a worker may write any size; the API may not answer it).
    orchestrator_s3(harness.engine.settings).put_object(
        Bucket=harness.engine.settings.bucket, Key=key, Body=b"[" + b"0," * (MAX_CONTENT_ANSWER_BYTES // 2) + b"0]")
    response = _output(harness, message["task_id"])
    assert response.status_code == 413, response.text
    message_text = response.json()["error"]["message"]
    assert key in message_text and "6 MB" in message_text
