"""The deployed topology end to end, in-process: from an empty database to a finished run.

`handler.api` is configured as template.yaml configures the API function (every secret behind a
`*_FROM` reference to Secrets Manager or SSM, the `lambda` transport, no local worker); events are
the recorded Lambda event shapes; the worker function is `handler.worker` behind a stand-in of
Lambda's Invoke API; the database starts empty, so the first thing done is the migration invoke,
as docs/deploy.md says."""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Iterator

import boto3
import pytest

from infra.postgres import create_database, drop_database, with_database
from infra.s3 import MotoServer
from orchestrator.db.migrate import load_migrations

from .conftest import AwsStack, load_event, s3_keys, wait_until


@pytest.fixture
def database_url(pg_admin_url: str) -> Iterator[str]:
    """An empty database (no migrations): the deployed function migrates it itself."""
    name = f"tickweave_empty_{uuid.uuid4().hex[:12]}"
    create_database(pg_admin_url, name)
    yield with_database(pg_admin_url, name)
    drop_database(pg_admin_url, name)


DIAMOND = {
    "id": "deploy-demo",
    "params": {"table": "orders"},
    "nodes": [
        {"id": "extract", "task": "echo"},
        {"id": "clean", "task": "echo", "depends": ["extract"]},
        {"id": "enrich", "task": "echo", "depends": ["extract"]},
        {"id": "load", "task": "echo", "depends": ["clean", "enrich"]},
    ],
}


def test_an_empty_database_to_a_finished_run(aws_stack: AwsStack, moto_server: MotoServer) -> None:
    # 1. the migration invoke, then again: nothing left to apply
    migrated = aws_stack.call(load_event("migrate_invoke.json"))
    every = [m.version for m in load_migrations()]
    assert migrated == {"applied": every, "versions": every}
    assert aws_stack.call(load_event("migrate_invoke.json")) == {"applied": [], "versions": every}

    # 2. the first key, created by an invoke (shown once, in the answer)
    created = aws_stack.call(load_event("create_key_invoke.json"))
    assert created["workspace"] == "deploy" and created["role"] == "admin" and created["key"].startswith("tw_")
    key = created["key"]

    # 3. the API through API Gateway events: info reports what the deployment is wired to
    info = aws_stack.call(aws_stack.http_event("GET", "/api/info"))
    assert info["statusCode"] == 200, info
    body = json.loads(info["body"])
    assert body["database"] == "ok" and body["storage"] == "ok" and body["mode"] == "lambda"
    assert body["transports"] == ["lambda"]
    # unauthenticated: nothing about keys or secrets (lambda mode has no development fallback)
    assert not any("key" in name or "secret" in name for name in body), body

    created_pipeline = aws_stack.call(aws_stack.http_event("POST", "/api/pipelines", key=key, body=DIAMOND))
    assert created_pipeline["statusCode"] == 201, created_pipeline

    # 4. a run: the roots are dispatched at once by async invoke of the worker function, and each
    #    callback (over HTTP to the API's public URL, read from SSM) dispatches the next nodes
    triggered = aws_stack.call(aws_stack.http_event("POST", "/api/pipelines/deploy-demo/runs", key=key,
                                                    body={"params": {"day": "2026-11-28"}}))
    assert triggered["statusCode"] == 201, triggered
    run_id = json.loads(triggered["body"])["id"]

    def finished() -> dict[str, object] | None:
        answer = aws_stack.call(aws_stack.http_event("GET", f"/api/runs/{run_id}", key=key))
        run: dict[str, object] = json.loads(answer["body"])
        return run if run["status"] in ("succeeded", "failed") else None

    run = wait_until(finished, 60, "the run did not finish")
    assert run["status"] == "succeeded", run
    aws_stack.fake_lambda.wait_idle()

    invocations = aws_stack.fake_lambda.invocations
    assert sorted(i.payload["node"] for i in invocations) == ["clean", "enrich", "extract", "load"]
    assert {i.invocation_type for i in invocations} == {"Event"}
    assert all(i.error is None and i.result["accepted"] is True for i in invocations), invocations
    # the worker function read its token keys from Secrets Manager (they are nowhere else)
    assert os.environ["TICKWEAVE_TOKEN_KEYS"] == f"k1:{aws_stack.token_key}"
    # each dispatch carried presigned URLs (signed with the storage role's session, no STS
    # credentials: those are for nodes with `storage: credentials`) for its own output key
    keyring = aws_stack.api.get_runtime().engine.keyring
    for invocation in invocations:
        grant = keyring.read(invocation.payload["token"]).storage
        assert grant is not None and grant.credentials is None and grant.presigned_put is not None
        assert grant.output_key == (f"runs/deploy/deploy-demo/{run_id}/default/nodes/{invocation.payload['node']}"
                                    f"/attempts/{invocation.payload['attempt']}/output.json")

    # 5. the outputs are in the bucket; the join read both branches
    keys = s3_keys(moto_server.endpoint_url, aws_stack.bucket, f"runs/deploy/deploy-demo/{run_id}/")
    # beside each output, the attempt's log (the worker SDK stores it with the same grant)
    assert sorted(k.split("/")[6] for k in keys if k.endswith("/log.txt")) == ["clean", "enrich", "extract", "load"]
    keys = [k for k in keys if k.endswith("/output.json")]
    assert [k.split("/")[6] for k in keys] == ["clean", "enrich", "extract", "load"]
    s3 = boto3.client("s3", endpoint_url=moto_server.endpoint_url, region_name="us-east-1")
    load = json.loads(s3.get_object(Bucket=aws_stack.bucket, Key=keys[-1])["Body"].read())
    assert sorted(load["inputs"]) == ["clean", "enrich"] and load["params"]["day"] == "2026-11-28"

    # 6. the scheduled tick finds nothing left; the HTTP tick needs the secret from Secrets Manager
    summary = aws_stack.call(load_event("scheduler_tick.json"))
    assert summary["claimed"] == 0 and summary["dispatched"] == 0
    tick = aws_stack.http_event("POST", "/api/tick")
    assert aws_stack.call(tick)["statusCode"] == 401
    tick["headers"]["x-tick-secret"] = aws_stack.tick_secret
    assert aws_stack.call(tick)["statusCode"] == 200
