"""STS off the per-task path (issue 15, part 11): presigned URLs by default, one cached session per
run for `storage: credentials` nodes, PackedPolicyTooLarge falling back instead of failing the
dispatch, the role's partition in the policies, and connection pools sized to the dispatch.

Real Postgres, the moto S3/STS/IAM server, and moto's IAM checks with session policies applied
as AWS applies them (test_attempt_storage_fencing.session_policies_enforced). STS's packed-size
limit, which moto does not check, is stood in for by a botocore event hook on the orchestrator's
real STS client: the call is answered with the error AWS sends, before it leaves the process.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Iterator
from functools import partial
from typing import Any

import pytest

from bench.aws_calls import count_calls
from infra.s3 import MotoServer
from orchestrator.config import Settings
from orchestrator.db.connection import Database
from orchestrator.engine.dispatcher import DISPATCH_THREADS
from orchestrator.engine.service import Engine
from orchestrator.storage import layout
from orchestrator.storage import s3 as s3_module
from orchestrator.storage.s3 import (
    ensure_bucket,
    issue_storage_grant,
    orchestrator_s3,
    orchestrator_sts,
    put_json_object,
    run_session_policy,
    session_policy,
)
from orchestrator.storage.sessions import partition_of
from orchestrator.storage.tokens import StorageGrant
from orchestrator.worker.grant_io import GrantStorage
from tests import capturing

from .test_attempt_storage_fencing import access_denied, create_storage_role, session_policies_enforced

WORKSPACE = "acme"


# --- steady state: AssumeRole per dispatched task ---------------------------------------------------


@pytest.mark.parametrize(("mode", "most"), [("urls", 0.1), ("credentials", 0.1)])
def test_fifty_tasks_of_five_runs_make_at_most_a_tenth_of_an_assume_role_each(
    database_url: str, moto_server: MotoServer, mode: str, most: float,
) -> None:
    counted = count_calls(database_url, moto_server.endpoint_url, mode=mode, runs=5, width=8)
    assert counted.tasks == 50
    assert counted.assume_role_per_task() <= most, counted.calls
    # Presigning is local: the S3 calls are the callbacks' (a HEAD each, the pipeline output's
    # read and copy once per run), the same in every mode.
    assert counted.calls.get("s3:HeadObject") == 50


def test_before_issue_15_every_task_made_an_assume_role(database_url: str, moto_server: MotoServer) -> None:
    # The figure the two above are measured against (and proof that the counter counts).
    counted = count_calls(database_url, moto_server.endpoint_url, mode="per-task", runs=2, width=3)
    assert counted.tasks == 10 and counted.calls.get("sts:AssumeRole") == 10


# --- a run's shared session, under enforced session policies ----------------------------------------

SHARED: dict[str, Any] = {
    "id": "shared",
    "nodes": [
        {"id": "extract", "task": "echo", "storage": "credentials"},
        {"id": "plain", "task": "echo"},
        {"id": "fan", "task": "echo", "storage": "credentials", "params": {"xs": [1, 2]},
         "map": {"over": "params.xs"}},
    ],
}


@pytest.fixture
def engine(database_url: str, moto_server: MotoServer) -> Iterator[Engine]:
    bucket = f"sess-{uuid.uuid4().hex[:10]}"
    settings = Settings(
        database_url=database_url, local_worker=None, s3_endpoint_url=moto_server.endpoint_url, bucket=bucket,
        storage_role_arn=create_storage_role(moto_server.endpoint_url, bucket),
    )
    ensure_bucket(settings)
    eng = Engine(settings, Database(database_url, max_size=8), transports={"local": capturing.CapturingTransport()})
    eng.create_api_key(WORKSPACE, "admin", raw_key="sessions-admin-key")
    yield eng
    eng.close()


def _sent(engine: Engine) -> capturing.CapturingTransport:
    sent = engine.transports["local"]
    assert isinstance(sent, capturing.CapturingTransport)
    return sent


def _grant(engine: Engine, message: dict[str, Any]) -> StorageGrant:
    grant = engine.keyring.read(message["token"]).storage
    assert grant is not None
    return grant


def _start(engine: Engine) -> tuple[uuid.UUID, dict[str, dict[str, Any]]]:
    engine.create_pipeline(WORKSPACE, SHARED)
    run = engine.trigger_run(WORKSPACE, "shared")
    sent = _sent(engine)
    messages = {"extract": sent.take_node("extract"), "plain": sent.take_node("plain")}
    children = sorted(sent.remove(lambda m: m["node"] == "fan"), key=lambda m: m["map"]["index"])
    messages.update({f"fan{m['map']['index']}": m for m in children})
    return run.id, messages


def test_a_runs_credential_nodes_share_one_session_that_stays_in_the_run(engine: Engine) -> None:
    assumed = s3_module._SESSIONS.assumed
    run_id, messages = _start(engine)
    other_run, _ = _start_again(engine)
    grants = {name: _grant(engine, m) for name, m in messages.items()}
    plain = grants.pop("plain")
    # The default node: URLs only. The credential nodes (and each map item): one session.
    assert plain.credentials is None and plain.presigned_put is not None
    keys = {g.credentials["AccessKeyId"] for g in grants.values() if g.credentials is not None}
    assert len(keys) == 1 and all(g.credentials is not None for g in grants.values())
    # Two runs: two sessions for the credential nodes, one signer for the URLs (at most).
    assert s3_module._SESSIONS.assumed - assumed <= 3

    bucket = engine.settings.bucket
    worker = GrantStorage(grants["extract"])._s3()
    here = layout.run_prefix(WORKSPACE, "shared", str(run_id))
    there = layout.run_prefix(WORKSPACE, "shared", str(other_run))
    put_json_object(engine.settings, there + "default/nodes/extract/attempts/1/output.json", {"theirs": True})
    with session_policies_enforced():
        # Its own output and log, and the other credential nodes' keys of this run.
        for key in (grants["extract"].output_key, grants["extract"].log_key, grants["fan0"].output_key,
                    here + "backfill-2/nodes/extract/attempts/1/output.json"):
            assert key is not None
            worker.put_object(Bucket=bucket, Key=key, Body=b"{}")
        # Not a default node's keys, nor the map node's manifest, nor another run's, another
        # workspace's or a pipeline output.
        for key in (plain.output_key, layout.map_manifest_key(WORKSPACE, "shared", str(run_id), "default", "fan", 1),
                    there + "default/nodes/extract/attempts/1/output.json",
                    f"runs/globex/shared/{run_id}/default/nodes/extract/attempts/1/output.json",
                    f"outputs/{WORKSPACE}/shared/{run_id}/default/result/attempts/1.json"):
            assert access_denied(partial(worker.put_object, Bucket=bucket, Key=key, Body=b"x")), key
        # It reads its own run's objects, not another run's.
        assert worker.get_object(Bucket=bucket, Key=grants["fan0"].output_key)["Body"].read() == b"{}"
        assert access_denied(lambda: worker.get_object(Bucket=bucket,
                                                       Key=there + "default/nodes/extract/attempts/1/output.json"))


def _start_again(engine: Engine) -> tuple[uuid.UUID, dict[str, Any]]:
    run = engine.trigger_run(WORKSPACE, "shared")
    sent = _sent(engine)
    taken = sent.remove(lambda m: m["run_id"] == str(run.id))
    assert len(taken) == 4
    return run.id, {m["node"] + str(m.get("map", {}).get("index", "")): m for m in taken}


# --- PackedPolicyTooLarge -------------------------------------------------------------------------


class _Response:
    """What botocore's `before-call` short-circuit takes as the HTTP response of a refused call."""

    status_code = 400
    headers: dict[str, str] = {}


@pytest.fixture
def packed_limit(engine: Engine) -> Iterator[Callable[[Callable[[dict[str, Any]], bool]], list[dict[str, Any]]]]:
    """Install a stand-in for STS's packed-size check on the orchestrator's real STS client: a
    policy for which `too_large(policy)` holds is answered PackedPolicyTooLarge. Returns the
    list of AssumeRole parameters asked (refused ones included)."""
    client = orchestrator_sts(engine.settings)
    installed: list[Callable[..., Any]] = []

    def install(too_large: Callable[[dict[str, Any]], bool]) -> list[dict[str, Any]]:
        asked: list[dict[str, Any]] = []

        def hook(params: dict[str, Any], **_: Any) -> Any:
            # `params`: the serialized request; STS's query protocol keeps the form fields in `body`.
            body = dict(params["body"])
            asked.append(body)
            policy = body.get("Policy")
            if policy is not None and too_large(json.loads(policy)):
                return _Response(), {"Error": {"Code": "PackedPolicyTooLarge", "Message":
                                               "Packed policy consumes 104% of allotted space"}}
            return None

        client.meta.events.register("before-call.sts.AssumeRole", hook)
        installed.append(hook)
        return asked

    s3_module._REFUSED_POLICIES.clear()
    yield install
    for hook in installed:
        client.meta.events.unregister("before-call.sts.AssumeRole", hook)
    s3_module._REFUSED_POLICIES.clear()


def _named_reads(policy: dict[str, Any]) -> int:
    return sum(len(s["Resource"]) for s in policy["Statement"] if s.get("Sid") == "ReadInputs")


def _realistic_inputs(count: int) -> list[str]:
    run = str(uuid.uuid4())
    return [layout.node_output_key(WORKSPACE, "etl", run, "default", f"extract-{i:02d}", 1) for i in range(count)]


def test_packed_policy_too_large_falls_back_to_presigned_reads(
    engine: Engine, packed_limit: Callable[[Callable[[dict[str, Any]], bool]], list[dict[str, Any]]],
) -> None:
    reads = _realistic_inputs(13)
    out = "runs/acme/etl-daily/r/default/nodes/load/attempts/1/output.json"
    policy = session_policy(engine.settings.bucket, out, reads)
    # Under the plaintext limit the code checks itself: only STS's packed measure refuses it.
    assert len(json.dumps(policy, separators=(",", ":"))) < s3_module.MAX_SESSION_POLICY_CHARS
    asked = packed_limit(lambda p: _named_reads(p) >= 13)

    grant = issue_storage_grant(engine.settings, output_key=out, read_keys=reads, task_id="t-13")
    assert grant.credentials is not None
    assert set(grant.presigned_get) == set(reads)  # the inputs as URLs instead of in the policy
    assert [_named_reads(json.loads(p["Policy"])) for p in asked] == [13, 0]


def test_a_policy_sts_never_takes_gives_urls_not_a_failed_dispatch(
    engine: Engine, packed_limit: Callable[[Callable[[dict[str, Any]], bool]], list[dict[str, Any]]],
) -> None:
    asked = packed_limit(lambda p: True)
    _, messages = _start(engine)
    for name in ("extract", "fan0", "fan1"):
        grant = _grant(engine, messages[name])
        assert grant.credentials is None and grant.presigned_put is not None, name
    # Dispatched, not failed: every task is out with its URLs.
    assert set(messages) == {"extract", "plain", "fan0", "fan1"}
    # Each refused policy was asked once, then remembered: the run's later tasks skip it.
    policies = [p["Policy"] for p in asked if "Policy" in p]
    assert len(policies) == len(set(policies))


def test_a_run_policy_refused_falls_back_to_the_nodes_own(
    engine: Engine, packed_limit: Callable[[Callable[[dict[str, Any]], bool]], list[dict[str, Any]]],
) -> None:
    packed_limit(lambda p: any(s.get("Sid") == "WriteNodes" for s in p["Statement"]))
    _, messages = _start(engine)
    extract, fan0, fan1 = (_grant(engine, messages[n]) for n in ("extract", "fan0", "fan1"))
    assert extract.credentials is not None and fan0.credentials is not None and fan1.credentials is not None
    # The nodes' own scopes: one session for the map's items, another for `extract`.
    assert fan0.credentials["AccessKeyId"] == fan1.credentials["AccessKeyId"] != extract.credentials["AccessKeyId"]
    with session_policies_enforced():
        worker = GrantStorage(extract)._s3()
        worker.put_object(Bucket=engine.settings.bucket, Key=extract.output_key, Body=b"{}")
        assert access_denied(lambda: worker.put_object(Bucket=engine.settings.bucket, Key=fan0.output_key, Body=b"x"))


# --- partitions -------------------------------------------------------------------------------------


@pytest.mark.parametrize("partition", ["aws-us-gov", "aws-cn"])
def test_policies_name_the_partition_of_the_role(engine: Engine, partition: str) -> None:
    role = f"arn:{partition}:iam::123456789012:role/tickweave-worker-storage"
    assert partition_of(role) == partition
    settings = engine.settings.with_overrides(storage_role_arn=role)
    client = orchestrator_sts(settings)
    asked: list[dict[str, Any]] = []

    def hook(params: dict[str, Any], **_: Any) -> None:
        asked.append(dict(params["body"]))

    client.meta.events.register("before-call.sts.AssumeRole", hook)
    try:
        issue_storage_grant(settings, output_key="runs/a/p/r/default/nodes/n/attempts/1/output.json",
                            read_keys=["outputs/a/q/r2/default/o/attempts/1.json"], task_id=f"t-{uuid.uuid4()}")
    finally:
        client.meta.events.unregister("before-call.sts.AssumeRole", hook)
    (params,) = asked
    assert params["RoleArn"] == role
    resources = [r for s in json.loads(params["Policy"])["Statement"] for r in s["Resource"]]
    assert resources and all(r.startswith(f"arn:{partition}:s3:::{settings.bucket}/") for r in resources)
    shared = run_session_policy("b", "runs/a/p/r/", ["runs/a/p/r/*/nodes/n/*"], partition=partition)
    assert all(r.startswith(f"arn:{partition}:s3:::b/runs/a/p/r/") for s in shared["Statement"] for r in s["Resource"])


def test_an_arn_without_a_partition_is_refused() -> None:
    with pytest.raises(ValueError, match="not an ARN"):
        partition_of("role/tickweave")


# --- connection pools -------------------------------------------------------------------------------


def test_the_shared_clients_keep_a_connection_per_dispatch_thread(engine: Engine) -> None:
    for client in (orchestrator_s3(engine.settings), orchestrator_sts(engine.settings)):
        # (botocore's Config sets its options as attributes at run time; the stubs do not list them)
        assert getattr(client.meta.config, "max_pool_connections", 0) >= DISPATCH_THREADS


# --- the node's opt-in, through the API ----------------------------------------------------------


def test_the_storage_field_is_checked_and_left_out_of_definitions_while_default(engine: Engine) -> None:
    from starlette.testclient import TestClient

    from orchestrator.api.app import create_app

    auth = {"Authorization": "Bearer sessions-admin-key"}
    with TestClient(create_app(engine.settings, engine), raise_server_exceptions=False) as api:
        bad = {"id": "bad", "nodes": [{"id": "a", "task": "echo", "storage": "keys"}]}
        answer = api.post("/api/pipelines", json=bad, headers=auth)
        assert answer.status_code == 422 and "storage" in answer.text, answer.text
        human = {"id": "human", "nodes": [{"id": "ok", "kind": "approval", "storage": "credentials"}]}
        answer = api.post("/api/pipelines", json=human, headers=auth)
        assert answer.status_code == 422 and "runs no task" in answer.json()["error"]["message"], answer.text
        good = {"id": "good", "nodes": [{"id": "a", "task": "echo"}, {"id": "b", "task": "echo", "storage": "urls"},
                                        {"id": "c", "task": "echo", "storage": "credentials"}]}
        assert api.post("/api/pipelines", json=good, headers=auth).status_code == 201
        stored = api.get("/api/pipelines/good", headers=auth).json()
    nodes = {n["id"]: n for n in stored["definition"]["nodes"]}
    # The default is left out, so the sha256 of a definition written before the field is unchanged.
    assert "storage" not in nodes["a"] and "storage" not in nodes["b"]
    assert nodes["c"]["storage"] == "credentials"
