"""Object layout, session policies, STS grants and presigned URLs against the moto server."""

from __future__ import annotations

import json
import uuid
from typing import Any

import httpx
import pytest

from infra.s3 import MotoServer
from orchestrator.config import Settings
from orchestrator.storage.layout import (
    attempt_log_key,
    node_attempt_prefix,
    node_output_key,
    pipeline_output_key,
    run_prefix,
)
from orchestrator.storage.s3 import (
    MAX_SESSION_POLICY_CHARS,
    encode_json,
    ensure_bucket,
    issue_storage_grant,
    orchestrator_s3,
    put_json_object,
    read_json_object,
    role_session_name,
    s3_client,
    session_policy,
    sha256_hex,
)

ROLE_ARN = "arn:aws:iam::123456789012:role/tickweave-storage"


@pytest.fixture
def settings(moto_server: MotoServer) -> Settings:
    settings = Settings(s3_endpoint_url=moto_server.endpoint_url, bucket=f"test-{uuid.uuid4().hex[:12]}")
    ensure_bucket(settings)
    return settings


def test_layout() -> None:
    assert node_attempt_prefix("ws", "pipe", "run1", "v1", "node", 2) == "runs/ws/pipe/run1/v1/nodes/node/attempts/2/"
    assert (node_output_key("ws", "pipe", "run1", "v1", "node", 2)
            == "runs/ws/pipe/run1/v1/nodes/node/attempts/2/output.json")
    assert attempt_log_key("ws", "pipe", "run1", "v1", "node", 2) == "runs/ws/pipe/run1/v1/nodes/node/attempts/2/log.txt"
    assert run_prefix("ws", "pipe", "run1") == "runs/ws/pipe/run1/"
    assert node_output_key("ws", "pipe", "run1", "v1", "n", 1).startswith(run_prefix("ws", "pipe", "run1"))
    assert (pipeline_output_key("ws", "pipe", "ex1", "v1", "archive", 3)
            == "outputs/ws/pipe/ex1/v1/archive/attempts/3.json")


def test_attempts_never_share_a_key_or_a_prefix() -> None:
    # attempts/1/ must not be a prefix of attempts/10/ (a session policy grants `prefix*`).
    first, tenth = (node_attempt_prefix("ws", "p", "r", "v", "n", a) for a in (1, 10))
    assert not tenth.startswith(first) and not first.startswith(tenth)
    assert node_output_key("ws", "p", "r", "v", "n", 1) != node_output_key("ws", "p", "r", "v", "n", 2)
    assert pipeline_output_key("ws", "p", "e", "v", "o", 1) != pipeline_output_key("ws", "p", "e", "v", "o", 2)


@pytest.mark.parametrize("bad", ["", "a/b", "..", "."])
def test_layout_rejects_segments_that_escape(bad: str) -> None:
    with pytest.raises(ValueError):
        node_output_key("ws", "pipe", "run", bad, "node", 1)
    with pytest.raises(ValueError):
        pipeline_output_key("ws", bad, "ex", "v", "out", 1)


@pytest.mark.parametrize("bad", [0, -1, True])
def test_layout_rejects_attempts_that_are_not_positive_integers(bad: int) -> None:
    with pytest.raises(ValueError):
        node_output_key("ws", "pipe", "run", "v", "node", bad)
    with pytest.raises(ValueError):
        pipeline_output_key("ws", "pipe", "ex", "v", "out", bad)


def test_session_policy_exact() -> None:
    assert session_policy("bkt", "runs/w/p/r/v/nodes/n", ["runs/w/p/r/v/nodes/a", "outputs/w/q/e/v/o"]) == {
        "Version": "2012-10-17",
        "Statement": [
            {
                "Sid": "WriteOutput",
                "Effect": "Allow",
                "Action": ["s3:PutObject"],
                "Resource": ["arn:aws:s3:::bkt/runs/w/p/r/v/nodes/n"],
            },
            {
                "Sid": "ReadInputs",
                "Effect": "Allow",
                "Action": ["s3:GetObject"],
                "Resource": ["arn:aws:s3:::bkt/runs/w/p/r/v/nodes/a", "arn:aws:s3:::bkt/outputs/w/q/e/v/o"],
            },
        ],
    }


def test_session_policy_with_a_write_prefix_grants_that_attempt_only() -> None:
    prefix = "runs/w/p/r/v/nodes/n/attempts/1/"
    policy = session_policy("bkt", prefix + "output.json", ["runs/w/p/r/v/nodes/a/attempts/3/output.json"],
                            write_prefix=prefix)
    assert policy["Statement"][0] == {
        "Sid": "WriteOutput", "Effect": "Allow", "Action": ["s3:PutObject"],
        "Resource": ["arn:aws:s3:::bkt/runs/w/p/r/v/nodes/n/attempts/1/*"],
    }
    assert policy["Statement"][1]["Resource"] == ["arn:aws:s3:::bkt/runs/w/p/r/v/nodes/a/attempts/3/output.json"]
    with pytest.raises(ValueError):  # without the "/", attempts/1* would cover attempts/10/
        session_policy("bkt", prefix + "output.json", [], write_prefix=prefix.rstrip("/"))
    with pytest.raises(ValueError):  # the output must be under the prefix
        session_policy("bkt", "runs/w/p/r/v/nodes/n/attempts/2/output.json", [], write_prefix=prefix)


def test_session_policy_without_reads_has_no_get() -> None:
    policy = session_policy("bkt", "out", [])
    assert [s["Sid"] for s in policy["Statement"]] == ["WriteOutput"]
    assert "s3:GetObject" not in json.dumps(policy)


def test_role_session_name() -> None:
    assert role_session_name("0b3c") == "tickweave-0b3c"
    long_name = role_session_name("x" * 100 + "/:*")
    assert len(long_name) == 64
    assert role_session_name("a/b:c") == "tickweave-a-b-c"


def test_ensure_bucket_idempotent(moto_server: MotoServer) -> None:
    settings = Settings(s3_endpoint_url=moto_server.endpoint_url, bucket=f"test-{uuid.uuid4().hex[:12]}")
    ensure_bucket(settings)
    ensure_bucket(settings)
    orchestrator_s3(settings).head_bucket(Bucket=settings.bucket)


def test_ensure_bucket_outside_us_east_1(moto_server: MotoServer) -> None:
    settings = Settings(
        s3_endpoint_url=moto_server.endpoint_url,
        aws_region="eu-west-1",
        bucket=f"test-{uuid.uuid4().hex[:12]}",
    )
    ensure_bucket(settings)
    ensure_bucket(settings)
    location = orchestrator_s3(settings).get_bucket_location(Bucket=settings.bucket)
    assert location["LocationConstraint"] == "eu-west-1"


def test_put_and_read_json(settings: Settings) -> None:
    value: dict[str, Any] = {"a": [1, 2], "é": "ü"}
    size, digest = put_json_object(settings, "some/key", value)
    body = encode_json(value)
    assert (size, digest) == (len(body), sha256_hex(body))
    assert read_json_object(settings, "some/key") == value


def test_presigned_grant_round_trip(settings: Settings) -> None:
    put_json_object(settings, "runs/ws/p/r/v/nodes/up", {"up": True})
    grant = issue_storage_grant(
        settings, output_key="runs/ws/p/r/v/nodes/me", read_keys=["runs/ws/p/r/v/nodes/up"], task_id="t1"
    )
    assert grant.credentials is None
    assert grant.presigned_put is not None
    assert set(grant.presigned_get) == {"runs/ws/p/r/v/nodes/up"}
    assert grant.read_keys == ("runs/ws/p/r/v/nodes/up",)
    assert (grant.bucket, grant.endpoint_url, grant.region) == (
        settings.bucket,
        settings.s3_endpoint_url,
        settings.aws_region,
    )

    response = httpx.get(grant.presigned_get["runs/ws/p/r/v/nodes/up"])
    assert response.status_code == 200
    assert response.json() == {"up": True}

    response = httpx.put(
        grant.presigned_put, content=b'{"me":1}', headers={"Content-Type": "application/json"}
    )
    assert response.status_code == 200
    assert read_json_object(settings, "runs/ws/p/r/v/nodes/me") == {"me": 1}


def test_presigned_grant_carries_no_secret(settings: Settings) -> None:
    grant = issue_storage_grant(settings, output_key="o", read_keys=["i"], task_id="t")
    assert grant.credentials is None
    assert "SecretAccessKey" not in json.dumps(grant.to_dict())
    # A SigV4 presigned URL names the signing key and carries a signature, never the secret.
    sigv4_params = {
        "X-Amz-Algorithm",
        "X-Amz-Credential",
        "X-Amz-Date",
        "X-Amz-Expires",
        "X-Amz-SignedHeaders",
        "X-Amz-Security-Token",
        "X-Amz-Signature",
    }
    for url in [grant.presigned_put, *grant.presigned_get.values()]:
        assert url is not None
        params = set(httpx.URL(url).params.keys())
        assert params <= sigv4_params
        assert "X-Amz-Signature" in params
        assert httpx.URL(url).params["X-Amz-Expires"] == str(settings.storage_credentials_ttl_s)


def test_sts_grant_credentials_can_write_output(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    settings = settings.with_overrides(storage_role_arn=ROLE_ARN, storage_credentials_ttl_s=60)
    put_json_object(settings, "runs/ws/p/r/v/nodes/up", [1, 2, 3])
    calls: list[dict[str, Any]] = []
    from orchestrator.storage import s3 as s3_module

    sts = s3_module.orchestrator_sts(settings)
    real_assume_role = sts.assume_role

    def recording_assume_role(**kwargs: Any) -> Any:
        calls.append(kwargs)
        return real_assume_role(**kwargs)

    monkeypatch.setattr(sts, "assume_role", recording_assume_role)
    grant = issue_storage_grant(
        settings,
        output_key="runs/ws/p/r/v/nodes/me",
        read_keys=["runs/ws/p/r/v/nodes/up"],
        task_id="0f8e2c1a-task",
    )
    assert grant.presigned_put is None
    assert grant.presigned_get == {}
    assert grant.credentials is not None
    assert set(grant.credentials) == {"AccessKeyId", "SecretAccessKey", "SessionToken", "Expiration"}
    assert grant.credentials["AccessKeyId"] != "testing"

    (call,) = calls
    assert call["RoleArn"] == ROLE_ARN
    assert call["RoleSessionName"] == "tickweave-0f8e2c1a-task"
    assert call["DurationSeconds"] == 900  # STS minimum, even with a shorter configured TTL
    assert json.loads(call["Policy"]) == session_policy(
        settings.bucket, "runs/ws/p/r/v/nodes/me", ["runs/ws/p/r/v/nodes/up"]
    )

    # moto does not evaluate session policies, so this checks the credentials work, not the scope.
    worker_s3 = s3_client(grant.endpoint_url, grant.region, grant.credentials)
    worker_s3.put_object(
        Bucket=grant.bucket, Key=grant.output_key, Body=b'"hi"', ContentType="application/json"
    )
    assert read_json_object(settings, "runs/ws/p/r/v/nodes/me") == "hi"
    body = worker_s3.get_object(Bucket=grant.bucket, Key="runs/ws/p/r/v/nodes/up")["Body"].read()
    assert json.loads(body) == [1, 2, 3]


def test_sts_grant_falls_back_to_presigned_reads_when_policy_too_big(settings: Settings) -> None:
    settings = settings.with_overrides(storage_role_arn=ROLE_ARN)
    reads = [f"runs/ws/pipeline/{uuid.uuid4()}/v1/nodes/node-{i}" for i in range(40)]
    assert len(json.dumps(session_policy(settings.bucket, "out", reads))) > MAX_SESSION_POLICY_CHARS
    grant = issue_storage_grant(settings, output_key="out", read_keys=reads, task_id="t")
    assert grant.credentials is not None
    assert set(grant.presigned_get) == set(reads)
    assert grant.read_keys == tuple(reads)


# --- read prefixes: a reducer reads the children of a mapped node ---------------------------------

ITEMS = "runs/ws/p/r/v/nodes/parse/items/"
MANIFEST = "runs/ws/p/r/v/nodes/parse/attempts/1/manifest.json"
REDUCER_OUT = "runs/ws/p/r/v/nodes/load/attempts/1/output.json"


def test_session_policy_with_read_prefixes_allows_gets_under_each_folder_only() -> None:
    policy = session_policy("bkt", REDUCER_OUT, [MANIFEST], write_prefix=REDUCER_OUT.removesuffix("output.json"),
                            read_prefixes=[ITEMS, ITEMS, "runs/ws/p/r/v/nodes/other/items/"])
    assert [s["Sid"] for s in policy["Statement"]] == ["WriteOutput", "ReadInputs", "ReadMappedItems"]
    assert policy["Statement"][2] == {
        "Sid": "ReadMappedItems", "Effect": "Allow", "Action": ["s3:GetObject"],
        "Resource": [f"arn:aws:s3:::bkt/{ITEMS}*", "arn:aws:s3:::bkt/runs/ws/p/r/v/nodes/other/items/*"],
    }
    # Without prefixes the policy is what it always was.
    assert session_policy("bkt", "out", ["in"]) == session_policy("bkt", "out", ["in"], read_prefixes=())


@pytest.mark.parametrize("bad", [ITEMS.rstrip("/"), "", "/", "runs/../", "runs//x/"])
def test_session_policy_refuses_a_read_prefix_that_is_not_a_folder(bad: str) -> None:
    # Without the "/", items/1* would also grant items/10/...; "" or "/" would grant the bucket.
    with pytest.raises(ValueError, match="read prefix"):
        session_policy("bkt", "out", [], read_prefixes=[bad])


def test_presigned_grant_carries_read_prefixes_and_presigns_nothing_under_them(settings: Settings) -> None:
    grant = issue_storage_grant(settings, output_key=REDUCER_OUT, read_keys=[MANIFEST], task_id="t",
                                read_prefixes=[ITEMS])
    assert grant.credentials is None
    assert grant.read_prefixes == (ITEMS,)
    assert set(grant.presigned_get) == {MANIFEST}  # the prefix's keys come from the API on demand
    with pytest.raises(ValueError, match="read prefix"):
        issue_storage_grant(settings, output_key=REDUCER_OUT, read_keys=[], task_id="t",
                            read_prefixes=[ITEMS.rstrip("/")])


def test_sts_grant_with_read_prefixes_puts_them_in_the_session_policy(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = settings.with_overrides(storage_role_arn=ROLE_ARN)
    from orchestrator.storage import s3 as s3_module

    sts = s3_module.orchestrator_sts(settings)
    real_assume_role = sts.assume_role
    policies: list[dict[str, Any] | None] = []

    def recording_assume_role(**kwargs: Any) -> Any:
        policies.append(json.loads(kwargs["Policy"]) if "Policy" in kwargs else None)
        return real_assume_role(**kwargs)

    monkeypatch.setattr(sts, "assume_role", recording_assume_role)
    grant = issue_storage_grant(settings, output_key=REDUCER_OUT, read_keys=[MANIFEST], task_id="t",
                                read_prefixes=[ITEMS])
    assert grant.credentials is not None and grant.presigned_get == {}
    assert grant.read_prefixes == (ITEMS,)
    assert policies == [session_policy(settings.bucket, REDUCER_OUT, [MANIFEST], read_prefixes=[ITEMS])]

    # Too many inputs to name: the reads fall back to presigned URLs, the prefix stays in the
    # policy (nothing under it can be presigned at dispatch).
    reads = [f"runs/ws/pipeline/{uuid.uuid4()}/v1/nodes/node-{i}" for i in range(40)]
    grant = issue_storage_grant(settings, output_key=REDUCER_OUT, read_keys=reads, task_id="t",
                                read_prefixes=[ITEMS])
    assert set(grant.presigned_get) == set(reads)
    assert policies[-1] == session_policy(settings.bucket, REDUCER_OUT, [], read_prefixes=[ITEMS])
    assert len(json.dumps(policies[-1], separators=(",", ":"))) <= MAX_SESSION_POLICY_CHARS

    # So many prefixes that even they do not fit (and no run prefix to read instead): the grant
    # falls back to presigned URLs, whose reads under the prefixes the API signs on request.
    many = [f"runs/ws/pipeline/{uuid.uuid4()}/v1/nodes/map-{i}/items/" for i in range(40)]
    asked = len(policies)
    grant = issue_storage_grant(settings, output_key=REDUCER_OUT, read_keys=[], task_id="t", read_prefixes=many)
    assert grant.credentials is None and grant.presigned_put is not None
    assert grant.read_prefixes == tuple(many)
    assert len(policies) == asked + 1 and policies[-1] is None  # the signer: no session policy


def test_presign_get_urls_signs_for_the_given_lifetime(settings: Settings) -> None:
    from orchestrator.storage.s3 import presign_get_urls

    put_json_object(settings, ITEMS + "0/attempts/1/output.json", {"i": 0})
    urls = presign_get_urls(settings, [ITEMS + "0/attempts/1/output.json"], 42)
    url = urls[ITEMS + "0/attempts/1/output.json"]
    assert httpx.URL(url).params["X-Amz-Expires"] == "42"
    assert httpx.get(url).json() == {"i": 0}
    for bad in (0, -1, True):
        with pytest.raises(ValueError):
            presign_get_urls(settings, ["k"], bad)
