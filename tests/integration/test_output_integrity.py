"""A succeeded callback's output reference is checked against the object before the success is
recorded: one HeadObject (with S3's own SHA-256 checksum, which the SDK's PUT carries), outside
any transaction. An object that is not there, or is not what the callback reports, fails the
attempt (retryable, with a code naming the key) instead of handing downstream a bad input.

Real Postgres and the moto S3/STS server; the engine, the capturing transport and the
`s3_calls` recorder are those of test_attempt_storage_fencing.
"""

from __future__ import annotations

import uuid
from typing import Any

import httpx
import pytest

from orchestrator.engine.service import Engine
from orchestrator.storage.s3 import encode_json, orchestrator_s3, sha256_hex
from orchestrator.worker.grant_io import GrantStorage

from . import test_attempt_storage_fencing as fencing
from .test_attempt_storage_fencing import PIPELINE, WORKSPACE, call_back, grant_of, transport, write_as

engine = fencing.engine  # the fixtures: an engine on moto with a storage role, its S3 call recorder
s3_calls = fencing.s3_calls

# No pipeline outputs: nothing on the server reads the node's object, so before this check a
# success naming a missing object went through and `down` died on NoSuchKey.
CHAIN: dict[str, Any] = {
    "id": "integrity",
    "nodes": [
        # Credentials: their PUT carries S3's own SHA-256 checksum, which the callback checks.
        {"id": "up", "task": "echo", "retry": {"max_attempts": 3, "base_delay_s": 0}, "storage": "credentials"},
        {"id": "down", "task": "echo", "depends": ["up"]},
    ],
}
ZEROS = "0" * 64


def start(engine: Engine, pipeline: dict[str, Any] = CHAIN) -> tuple[uuid.UUID, dict[str, Any]]:
    engine.create_pipeline(WORKSPACE, pipeline)
    run = engine.trigger_run(WORKSPACE, pipeline["id"])
    message = transport(engine).take("up")
    accepted, _, _ = engine.record_heartbeat(message["token"], progress=None, message=None)
    assert accepted
    return run.id, message


def task_and_attempts(engine: Engine, message: dict[str, Any]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    return engine.get_task(WORKSPACE, uuid.UUID(message["task_id"]))


def nodes_sent(engine: Engine) -> list[str]:
    return [m["node"] for m in transport(engine).sent]


def test_a_success_naming_a_never_written_object_fails_the_attempt_and_the_task_retries(engine: Engine) -> None:
    run_id, first = start(engine)
    key = grant_of(engine, first).output_key
    result = call_back(engine, first, {"key": key, "size": 12, "sha256": ZEROS})

    assert (result.accepted, result.outcome, result.task_status) == (True, "retrying", "ready")
    task, attempts = task_and_attempts(engine, first)
    assert task["error"]["code"] == "output_missing"
    assert task["error"]["key"] == key and key in task["error"]["message"]
    assert task["error"]["retryable"] is True
    assert [(a["attempt"], a["status"]) for a in attempts] == [(1, "failed")]
    assert "down" not in nodes_sent(engine)  # the run does not proceed with a bad input
    assert engine.get_run(WORKSPACE, run_id)[0]["status"] == "running"

    # The retry writes its output and reports it truly: downstream gets that object.
    engine.tick()
    second = transport(engine).take("up")
    assert second["attempt"] == 2
    output = write_as(grant_of(engine, second), {"attempt": 2})
    assert call_back(engine, second, output).outcome == "succeeded"
    assert transport(engine).take("down")["inputs"] == {"up": {"key": output["key"]}}


@pytest.mark.parametrize(("field", "wrong", "code"), [
    ("sha256", ZEROS, "output_checksum_mismatch"),
    ("size", 1, "output_size_mismatch"),
])
def test_a_success_whose_sha256_or_size_differs_from_the_object_fails_the_attempt(
    engine: Engine, s3_calls: list[tuple[str, bool]], field: str, wrong: Any, code: str,
) -> None:
    _, first = start(engine)
    output = write_as(grant_of(engine, first), {"attempt": 1})
    s3_calls.clear()
    result = call_back(engine, first, {**output, field: wrong})

    assert (result.outcome, result.task_status) == ("retrying", "ready")
    task, _ = task_and_attempts(engine, first)
    assert task["error"]["code"] == code
    assert task["error"]["key"] == output["key"] and output["key"] in task["error"]["message"]
    assert (task["error"]["expected"], task["error"]["actual"]) == (wrong, output[field])
    assert s3_calls == [("head_object", False)]  # one HEAD, no read, no transaction open
    assert "down" not in nodes_sent(engine)


def test_a_true_success_is_checked_with_one_head_outside_the_transaction(
    engine: Engine, s3_calls: list[tuple[str, bool]],
) -> None:
    _, first = start(engine)
    output = write_as(grant_of(engine, first), {"attempt": 1})
    # The SDK's PUT carried the sha256 as S3's own checksum, which a HEAD returns.
    head = orchestrator_s3(engine.settings).head_object(
        Bucket=engine.settings.bucket, Key=output["key"], ChecksumMode="ENABLED")
    assert head["ChecksumSHA256"] is not None
    s3_calls.clear()

    assert call_back(engine, first, output).outcome == "succeeded"
    assert s3_calls == [("head_object", False)]
    assert transport(engine).take("down")["inputs"] == {"up": {"key": output["key"]}}


def test_with_pipeline_outputs_the_head_and_the_read_both_happen_outside_the_transaction(
    engine: Engine, s3_calls: list[tuple[str, bool]],
) -> None:
    _, first = start(engine, PIPELINE)
    output = write_as(grant_of(engine, first), {"attempt": 1})
    s3_calls.clear()
    assert call_back(engine, first, output).outcome == "succeeded"
    assert [name for name, _ in s3_calls] == ["head_object", "get_object", "put_object"]
    assert [call for call in s3_calls if call[1]] == []


def test_a_presigned_put_is_checked_by_existence_and_size_and_by_sha256_where_the_server_reads_it(
    engine: Engine,
) -> None:
    # No storage role: the grant is a presigned PUT, which cannot carry S3's checksum (it is
    # signed at dispatch, before the output exists).
    engine.settings = engine.settings.with_overrides(storage_role_arn=None)
    engine.dispatcher.settings = engine.settings
    _, chain = start(engine)

    grant = engine.keyring.read(chain["token"]).storage
    assert grant is not None and grant.presigned_put is not None
    missing = call_back(engine, chain, {"key": grant.output_key, "size": 2, "sha256": ZEROS})
    assert missing.outcome == "retrying"
    assert task_and_attempts(engine, chain)[0]["error"]["code"] == "output_missing"

    engine.tick()
    second = transport(engine).take("up")
    grant = engine.keyring.read(second["token"]).storage
    assert grant is not None
    body = encode_json({"attempt": 2})
    GrantStorage(grant).write_output(body)
    assert "ChecksumSHA256" not in orchestrator_s3(engine.settings).head_object(
        Bucket=engine.settings.bucket, Key=grant.output_key, ChecksumMode="ENABLED")
    short = call_back(engine, second, {"key": grant.output_key, "size": len(body) + 1, "sha256": sha256_hex(body)})
    assert task_and_attempts(engine, second)[0]["error"]["code"] == "output_size_mismatch"
    assert short.outcome == "retrying"

    # A node whose object the server reads (it produces a pipeline output): the sha256 is
    # compared with the bytes read.
    _, producer = start(engine, PIPELINE)
    grant = engine.keyring.read(producer["token"]).storage
    assert grant is not None and grant.presigned_put is not None
    body = encode_json({"attempt": 1})
    assert httpx.put(grant.presigned_put, content=body, headers={"Content-Type": "application/json"}).is_success
    result = call_back(engine, producer, {"key": grant.output_key, "size": len(body), "sha256": ZEROS})
    assert result.outcome == "retrying"
    assert task_and_attempts(engine, producer)[0]["error"]["code"] == "output_checksum_mismatch"
