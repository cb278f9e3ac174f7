"""Storage of mapped nodes: the object layout of children and manifests, and the presigned reads
a reducer asks for (orchestrator.engine.worker_reads, POST /api/worker/read-urls) against moto."""

from __future__ import annotations

import base64
import os
import time
import uuid
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.routing import Route
from starlette.testclient import TestClient

from infra.s3 import MotoServer
from orchestrator import storage
from orchestrator.config import Settings
from orchestrator.engine.errors import Forbidden, InvalidInput, Unauthorized
from orchestrator.engine.worker_reads import MAX_READ_KEYS, presign_reads
from orchestrator.storage.layout import (
    map_item_attempt_prefix,
    map_item_log_key,
    map_item_output_key,
    map_items_prefix,
    map_manifest_key,
    node_attempt_prefix,
    node_output_key,
)
from orchestrator.storage.s3 import ensure_bucket, issue_storage_grant, put_json_object
from orchestrator.storage.tokens import StorageGrant, TaskClaims, TokenKeyring, params_digest

W = ("ws", "pipe", "run1", "v1")


# --- layout -------------------------------------------------------------------------------------


def test_map_layout() -> None:
    assert map_items_prefix(*W, "parse") == "runs/ws/pipe/run1/v1/nodes/parse/items/"
    assert map_item_attempt_prefix(*W, "parse", 0, 1) == "runs/ws/pipe/run1/v1/nodes/parse/items/0/attempts/1/"
    assert (map_item_output_key(*W, "parse", 7, 2)
            == "runs/ws/pipe/run1/v1/nodes/parse/items/7/attempts/2/output.json")
    assert map_item_log_key(*W, "parse", 7, 2) == "runs/ws/pipe/run1/v1/nodes/parse/items/7/attempts/2/log.txt"
    assert map_manifest_key(*W, "parse", 1) == "runs/ws/pipe/run1/v1/nodes/parse/attempts/1/manifest.json"
    # Exported with the rest of the layout.
    assert storage.map_item_output_key is map_item_output_key
    assert storage.map_manifest_key is map_manifest_key
    assert {"map_items_prefix", "map_item_attempt_prefix", "map_item_log_key"} <= set(storage.__all__)


def test_an_items_prefix_covers_its_children_and_nothing_else() -> None:
    items = map_items_prefix(*W, "a")
    for index in (0, 1, 10, 99_999):
        assert map_item_output_key(*W, "a", index, 3).startswith(items)
    # Node "a"'s items never cover node "ab"'s, nor anything node "a" writes as a plain node.
    assert not map_item_output_key(*W, "ab", 0, 1).startswith(items)
    assert not map_items_prefix(*W, "ab").startswith(items)
    assert not node_output_key(*W, "a", 1).startswith(items)
    # A manifest is beside the items, not under them: no child's grant reaches it.
    assert not map_manifest_key(*W, "a", 1).startswith(items)
    for index in range(12):
        for attempt in (1, 2):
            assert not map_manifest_key(*W, "a", 1).startswith(map_item_attempt_prefix(*W, "a", index, attempt))


def test_a_childs_prefix_never_covers_another_index_or_attempt() -> None:
    first, tenth = map_item_attempt_prefix(*W, "n", 1, 1), map_item_attempt_prefix(*W, "n", 10, 1)
    assert not tenth.startswith(first) and not first.startswith(tenth)
    assert not map_item_output_key(*W, "n", 10, 1).startswith(first)
    assert not map_item_attempt_prefix(*W, "n", 1, 10).startswith(first)
    keys = {map_item_output_key(*W, "n", i, a) for i in range(0, 30) for a in range(1, 12)}
    assert len(keys) == 30 * 11
    # A child's output is written under its own attempt prefix, as a session policy requires.
    assert map_item_output_key(*W, "n", 3, 2).startswith(map_item_attempt_prefix(*W, "n", 3, 2))
    # And under no plain attempt prefix of the node.
    assert not map_item_output_key(*W, "n", 1, 1).startswith(node_attempt_prefix(*W, "n", 1))


@pytest.mark.parametrize("bad", [-1, True, False, 1.0, "1", None])
def test_map_layout_refuses_indexes_that_are_not_integers_from_zero(bad: Any) -> None:
    with pytest.raises(ValueError, match="index"):
        map_item_attempt_prefix(*W, "n", bad, 1)
    with pytest.raises(ValueError, match="index"):
        map_item_output_key(*W, "n", bad, 1)
    with pytest.raises(ValueError, match="index"):
        map_item_log_key(*W, "n", bad, 1)


@pytest.mark.parametrize("bad", [0, -1, True])
def test_map_layout_refuses_attempts_and_generations_below_one(bad: Any) -> None:
    with pytest.raises(ValueError, match="attempt"):
        map_item_output_key(*W, "n", 0, bad)
    with pytest.raises(ValueError, match="generation"):
        map_manifest_key(*W, "n", bad)


@pytest.mark.parametrize("bad", ["", "a/b", "..", "."])
def test_map_layout_refuses_segments_that_escape(bad: str) -> None:
    with pytest.raises(ValueError):
        map_items_prefix("ws", "pipe", "run", "v", bad)
    with pytest.raises(ValueError):
        map_item_output_key("ws", bad, "run", "v", "n", 0, 1)
    with pytest.raises(ValueError):
        map_manifest_key("ws", "pipe", bad, "v", "n", 1)


# --- presigned reads for a reducer ---------------------------------------------------------------


def _key_material() -> str:
    return base64.urlsafe_b64encode(os.urandom(32)).decode()


class Reads:
    """Settings, a real key ring, and a reducer's token whose grant reads one map node's items."""

    def __init__(self, moto: MotoServer) -> None:
        self.settings = Settings(s3_endpoint_url=moto.endpoint_url, bucket=f"test-{uuid.uuid4().hex[:12]}",
                                 token_keys=(("k1", _key_material()),))
        ensure_bucket(self.settings)
        self.keyring = TokenKeyring.from_settings(self.settings)
        self.run = uuid.uuid4().hex
        self.where = ("ws", "pipe", self.run, "v1")
        self.items = map_items_prefix(*self.where, "parse")
        self.manifest = map_manifest_key(*self.where, "parse", 1)

    def item_key(self, index: int, attempt: int = 1) -> str:
        return map_item_output_key(*self.where, "parse", index, attempt)

    def token(self, *, read_prefixes: tuple[str, ...] | None = None, expires_in: int = 600,
              storage_grant: bool = True, keyring: TokenKeyring | None = None) -> str:
        prefix = node_attempt_prefix(*self.where, "load", 1)
        grant: StorageGrant | None = issue_storage_grant(
            self.settings, output_key=prefix + "output.json", write_prefix=prefix, read_keys=[self.manifest],
            task_id="t", read_prefixes=(self.items,) if read_prefixes is None else read_prefixes,
        )
        return (keyring or self.keyring).issue(TaskClaims(
            task_id=str(uuid.uuid4()), attempt=1, claim_token=uuid.uuid4().hex, workspace="ws", task_name="load",
            params_sha256=params_digest({}), expires_at=int(time.time()) + expires_in,
            storage=grant if storage_grant else None,
        ))


@pytest.fixture
def reads(moto_server: MotoServer) -> Reads:
    return Reads(moto_server)


def test_presign_reads_signs_keys_under_the_grants_prefix(reads: Reads) -> None:
    keys = [reads.item_key(i) for i in range(3)]
    for i, key in enumerate(keys):
        put_json_object(reads.settings, key, {"i": i})
    # A token that outlives the grant's configured lifetime (3600 s), as a long task's does.
    urls = presign_reads(reads.settings, reads.keyring, reads.token(expires_in=7200), [*keys, keys[0]])
    assert set(urls) == set(keys)
    assert [httpx.get(urls[key]).json() for key in keys] == [{"i": 0}, {"i": 1}, {"i": 2}]
    # No longer than a grant's credentials, and never past the token that asked.
    assert httpx.URL(urls[keys[0]]).params["X-Amz-Expires"] == str(reads.settings.storage_credentials_ttl_s)
    short = presign_reads(reads.settings, reads.keyring, reads.token(expires_in=30), keys[:1])
    assert 1 <= int(httpx.URL(short[keys[0]]).params["X-Amz-Expires"]) <= 30
    assert presign_reads(reads.settings, reads.keyring, reads.token(), []) == {}


def test_presign_reads_refuses_keys_outside_the_prefix(reads: Reads) -> None:
    token = reads.token()
    other_node = map_item_output_key(*reads.where, "parse2", 0, 1)  # node "parse2" starts like "parse"
    own_output = node_attempt_prefix(*reads.where, "load", 1) + "output.json"
    for key in (other_node, own_output, reads.manifest, "outputs/ws/other/x.json",
                map_item_output_key("ws", "pipe", "another-run", "v1", "parse", 0, 1)):
        with pytest.raises(Forbidden, match="not under a read prefix") as info:
            presign_reads(reads.settings, reads.keyring, token, [reads.item_key(0), key])
        assert info.value.details["path"] == "keys.1"
    # A grant without read prefixes reads none; a token without a grant reads nothing.
    with pytest.raises(Forbidden):
        presign_reads(reads.settings, reads.keyring, reads.token(read_prefixes=()), [reads.item_key(0)])
    with pytest.raises(Forbidden, match="no storage grant"):
        presign_reads(reads.settings, reads.keyring, reads.token(storage_grant=False), [reads.item_key(0)])


@pytest.mark.parametrize("bad", ["{items}0/../../../load/attempts/1/output.json", "{items}0//attempts/1/output.json",
                                 "{items}0/./attempts/1/output.json", "{items}..", "{items}",
                                 "{items}x\ud800", "{items}" + "x" * 1100, "", 7, None, ["k"]])
def test_presign_reads_refuses_malformed_keys(reads: Reads, bad: Any) -> None:
    key = bad.format(items=reads.items) if isinstance(bad, str) else bad
    with pytest.raises(InvalidInput, match=r"keys\[0\]"):
        presign_reads(reads.settings, reads.keyring, reads.token(), [key])


def test_dots_inside_a_segment_are_ordinary_characters(reads: Reads) -> None:
    # A data version may be "1..2" (VERSION_PATTERN allows it): its keys are no traversal.
    reads.where = ("ws", "pipe", reads.run, "1..2")
    reads.items = map_items_prefix(*reads.where, "parse")
    reads.manifest = map_manifest_key(*reads.where, "parse", 1)
    put_json_object(reads.settings, reads.item_key(0), "dotted")
    urls = presign_reads(reads.settings, reads.keyring, reads.token(), [reads.item_key(0)])
    assert httpx.get(urls[reads.item_key(0)]).json() == "dotted"


def test_presign_reads_refuses_too_many_keys(reads: Reads) -> None:
    keys = [reads.item_key(i) for i in range(MAX_READ_KEYS + 1)]
    with pytest.raises(InvalidInput, match=f"at most {MAX_READ_KEYS} keys"):
        presign_reads(reads.settings, reads.keyring, reads.token(), keys)
    assert len(presign_reads(reads.settings, reads.keyring, reads.token(), keys[:MAX_READ_KEYS])) == MAX_READ_KEYS
    with pytest.raises(InvalidInput, match="list"):
        presign_reads(reads.settings, reads.keyring, reads.token(), reads.item_key(0))  # type: ignore[arg-type]


def test_presign_reads_refuses_a_token_of_another_key_ring_or_an_expired_one(reads: Reads) -> None:
    stranger = TokenKeyring([("k1", _key_material())], issuer=reads.keyring.issuer, audience=reads.keyring.audience)
    with pytest.raises(Unauthorized, match="tampered"):  # same kid, other key
        presign_reads(reads.settings, reads.keyring, reads.token(keyring=stranger), [reads.item_key(0)])
    other_kid = TokenKeyring([("k9", _key_material())], issuer=reads.keyring.issuer,
                             audience=reads.keyring.audience)
    with pytest.raises(Unauthorized, match="unknown_key"):
        presign_reads(reads.settings, reads.keyring, reads.token(keyring=other_kid), [reads.item_key(0)])
    with pytest.raises(Unauthorized, match="expired"):
        presign_reads(reads.settings, reads.keyring, reads.token(expires_in=-1), [reads.item_key(0)])
    # The token is checked before anything about the keys is said.
    with pytest.raises(Unauthorized):
        presign_reads(reads.settings, reads.keyring, "not-a-token", ["../x"] * (MAX_READ_KEYS + 1))


# --- the endpoint ---------------------------------------------------------------------------------


def _client(reads: Reads) -> TestClient:
    from orchestrator.api.worker_reads import read_urls

    app = Starlette(routes=[Route("/api/worker/read-urls", read_urls, methods=["POST"])])
    engine = SimpleNamespace(settings=reads.settings, keyring=reads.keyring)
    app.state.get_engine = lambda: engine  # as create_app sets it
    return TestClient(app)


def test_the_read_urls_endpoint_answers_urls_and_errors_in_the_api_shape(reads: Reads) -> None:
    client = _client(reads)
    put_json_object(reads.settings, reads.item_key(4), [4])
    token = reads.token()

    ok = client.post("/api/worker/read-urls", json={"token": token, "keys": [reads.item_key(4)]})
    assert ok.status_code == 200
    assert httpx.get(ok.json()["urls"][reads.item_key(4)]).json() == [4]

    outside = client.post("/api/worker/read-urls", json={"token": token, "keys": [reads.manifest]})
    assert outside.status_code == 403
    assert outside.json()["error"]["code"] == "forbidden"

    stranger = TokenKeyring([("k1", _key_material())], issuer=reads.keyring.issuer, audience=reads.keyring.audience)
    refused = client.post("/api/worker/read-urls",
                          json={"token": reads.token(keyring=stranger), "keys": [reads.item_key(4)]})
    assert refused.status_code == 401
    assert refused.headers["www-authenticate"] == "Bearer"
    assert refused.json()["error"]["code"] == "unauthorized"

    for body in ({"token": token}, {"token": token, "keys": [1]}, {"token": "", "keys": []},
                 {"token": token, "keys": [], "extra": 1},
                 {"token": token, "keys": [reads.item_key(i) for i in range(MAX_READ_KEYS + 1)]},
                 {"token": token, "keys": [reads.items + "0/../x"]}):
        answer = client.post("/api/worker/read-urls", json=body)
        assert answer.status_code == 422, body
        assert set(answer.json()["error"]) == {"code", "message", "details"}
    assert client.post("/api/worker/read-urls", content=b"{not json").status_code == 422
    assert client.post("/api/worker/read-urls", content=b"").status_code == 422
    too_big = client.post("/api/worker/read-urls", content=b" " * (reads.settings.max_body_bytes + 1))
    assert too_big.status_code == 413
