"""Worker tokens: JWE round trip, every rejection reason, key rotation."""

from __future__ import annotations

import base64
import json
import os
import time

import pytest

from orchestrator.config import Settings
from orchestrator.storage.tokens import StorageGrant, TaskClaims, TokenInvalid, TokenKeyring, params_digest


def new_key() -> str:
    return base64.urlsafe_b64encode(os.urandom(32)).decode()


def claims(*, expires_in: int = 600, storage: StorageGrant | None = None) -> TaskClaims:
    return TaskClaims(
        task_id="task-1",
        attempt=2,
        claim_token="claim-abc",
        workspace="ws",
        task_name="echo",
        params_sha256=params_digest({}),
        expires_at=int(time.time()) + expires_in,
        storage=storage,
    )


def header_of(token: str) -> dict[str, object]:
    raw = token.split(".")[0]
    return dict(json.loads(base64.urlsafe_b64decode(raw + "=" * (-len(raw) % 4))))


GRANT = StorageGrant(
    endpoint_url="http://127.0.0.1:5000",
    region="us-east-1",
    bucket="b",
    output_key="runs/ws/p/r/v1/nodes/n",
    read_keys=("runs/ws/p/r/v1/nodes/a",),
    credentials={"AccessKeyId": "AK", "SecretAccessKey": "SK", "SessionToken": "ST", "Expiration": "x"},
    presigned_put=None,
    presigned_get={"runs/ws/p/r/v1/nodes/a": "http://example/a?sig"},
)


@pytest.fixture
def keyring() -> TokenKeyring:
    return TokenKeyring([("k1", new_key())], issuer="tickweave", audience="tickweave-worker")


def test_round_trip_with_storage(keyring: TokenKeyring) -> None:
    original = claims(storage=GRANT)
    token = keyring.issue(original)
    assert token.count(".") == 4
    assert keyring.read(token) == original
    header = header_of(token)
    assert header == {"alg": "dir", "enc": "A256GCM", "kid": "k1"}
    # Encrypted, not merely signed: the secrets are not readable from the token.
    assert b"SecretAccessKey" not in base64.urlsafe_b64decode(token.split(".")[3] + "==")


def test_round_trip_without_storage(keyring: TokenKeyring) -> None:
    original = claims()
    assert keyring.read(keyring.issue(original)) == original


def test_storage_grant_dict_round_trip() -> None:
    assert StorageGrant.from_dict(json.loads(json.dumps(GRANT.to_dict()))) == GRANT


@pytest.mark.parametrize("part", [0, 2, 3, 4])
def test_tampered(keyring: TokenKeyring, part: int) -> None:
    parts = keyring.issue(claims()).split(".")
    segment = parts[part]
    # Change a character in the middle (the last one may only carry padding bits).
    i = len(segment) // 2
    parts[part] = segment[:i] + ("A" if segment[i] != "A" else "B") + segment[i + 1 :]
    with pytest.raises(TokenInvalid) as info:
        keyring.read(".".join(parts))
    assert info.value.reason in {"tampered", "malformed"}


def test_tampered_ciphertext_is_tampered(keyring: TokenKeyring) -> None:
    parts = keyring.issue(claims()).split(".")
    tag = parts[4]
    parts[4] = ("A" if tag[0] != "A" else "B") + tag[1:]
    with pytest.raises(TokenInvalid) as info:
        keyring.read(".".join(parts))
    assert info.value.reason == "tampered"


@pytest.mark.parametrize("token", ["", "abc", "a.b.c", "a.b.c.d.e", "....."])
def test_malformed(keyring: TokenKeyring, token: str) -> None:
    with pytest.raises(TokenInvalid) as info:
        keyring.read(token)
    assert info.value.reason == "malformed"


def test_expired(keyring: TokenKeyring) -> None:
    token = keyring.issue(claims(expires_in=60))
    keyring.read(token, now=time.time() + 59)
    with pytest.raises(TokenInvalid) as info:
        keyring.read(token, now=time.time() + 61)
    assert info.value.reason == "expired"


def test_wrong_audience_and_issuer() -> None:
    key = new_key()
    issuer = TokenKeyring([("k1", key)], issuer="tickweave", audience="tickweave-worker")
    token = issuer.issue(claims())
    other_aud = TokenKeyring([("k1", key)], issuer="tickweave", audience="someone-else")
    with pytest.raises(TokenInvalid) as info:
        other_aud.read(token)
    assert info.value.reason == "wrong_audience"
    other_iss = TokenKeyring([("k1", key)], issuer="other", audience="tickweave-worker")
    with pytest.raises(TokenInvalid) as info:
        other_iss.read(token)
    assert info.value.reason == "wrong_issuer"


def test_unknown_kid(keyring: TokenKeyring) -> None:
    token = keyring.issue(claims())
    stranger = TokenKeyring([("k2", new_key())], issuer="tickweave", audience="tickweave-worker")
    with pytest.raises(TokenInvalid) as info:
        stranger.read(token)
    assert info.value.reason == "unknown_key"


def test_same_kid_other_key_is_tampered(keyring: TokenKeyring) -> None:
    token = keyring.issue(claims())
    impostor = TokenKeyring([("k1", new_key())], issuer="tickweave", audience="tickweave-worker")
    with pytest.raises(TokenInvalid) as info:
        impostor.read(token)
    assert info.value.reason == "tampered"


def test_rotation() -> None:
    old_key, new_key_ = new_key(), new_key()
    old = TokenKeyring([("old", old_key)], issuer="tickweave", audience="tickweave-worker")
    old_token = old.issue(claims())
    rotated = TokenKeyring(
        [("new", new_key_), ("old", old_key)], issuer="tickweave", audience="tickweave-worker"
    )
    assert rotated.read(old_token).claim_token == "claim-abc"
    new_token = rotated.issue(claims())
    assert header_of(new_token)["kid"] == "new"
    assert rotated.read(new_token).task_id == "task-1"
    # A worker still on the old ring cannot read new tokens: deploy the ring before activating.
    with pytest.raises(TokenInvalid) as info:
        old.read(new_token)
    assert info.value.reason == "unknown_key"


def test_from_settings_uses_first_key() -> None:
    settings = Settings(token_keys=(("a", new_key()), ("b", new_key())), token_audience="aud")
    ring = TokenKeyring.from_settings(settings)
    assert ring.active_kid == "a"
    assert ring.kids == ("a", "b")
    assert ring.audience == "aud"
    assert header_of(ring.issue(claims()))["kid"] == "a"


@pytest.mark.parametrize(
    ("material", "message"),
    [
        (base64.urlsafe_b64encode(os.urandom(16)).decode(), "32 bytes"),
        ("not base64 !!!", "base64url"),
    ],
)
def test_key_validation(material: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        TokenKeyring([("k", material)], issuer="i", audience="a")


def test_empty_and_duplicate_keys_rejected() -> None:
    with pytest.raises(ValueError):
        TokenKeyring([], issuer="i", audience="a")
    key = new_key()
    with pytest.raises(ValueError, match="duplicate"):
        TokenKeyring([("k", key), ("k", key)], issuer="i", audience="a")


def test_unpadded_key_accepted() -> None:
    material = new_key().rstrip("=")
    ring = TokenKeyring([("k", material)], issuer="i", audience="a")
    assert ring.read(ring.issue(claims())).workspace == "ws"


# --- read prefixes (reducers of mapped nodes) and the map binding ---------------------------------

ITEMS = "runs/ws/p/r/v1/nodes/parse/items/"
REDUCER_GRANT = StorageGrant(
    endpoint_url=None,
    region="us-east-1",
    bucket="b",
    output_key="runs/ws/p/r/v1/nodes/load/attempts/1/output.json",
    read_keys=("runs/ws/p/r/v1/nodes/parse/attempts/1/manifest.json",),
    presigned_put="http://example/put?sig",
    read_prefixes=(ITEMS,),
)


def test_a_grant_with_read_prefixes_round_trips_as_a_dict_and_in_a_token(keyring: TokenKeyring) -> None:
    as_dict = REDUCER_GRANT.to_dict()
    assert as_dict["read_prefixes"] == [ITEMS]
    assert StorageGrant.from_dict(json.loads(json.dumps(as_dict))) == REDUCER_GRANT
    original = claims(storage=REDUCER_GRANT)
    assert keyring.read(keyring.issue(original)) == original


def test_a_grant_from_before_read_prefixes_still_parses() -> None:
    old = GRANT.to_dict()
    del old["read_prefixes"]
    parsed = StorageGrant.from_dict(old)
    assert parsed == GRANT
    assert parsed.read_prefixes == ()


@pytest.mark.parametrize("bad", [ITEMS.rstrip("/"), "", "/", "/runs/", "runs/../x/", "runs//x/", 7, None])
def test_a_grant_refuses_read_prefixes_that_are_not_folders(bad: object) -> None:
    data = REDUCER_GRANT.to_dict()
    data["read_prefixes"] = [bad]
    with pytest.raises(ValueError, match=r"read_prefixes|read prefix"):
        StorageGrant.from_dict(data)
    data["read_prefixes"] = ITEMS  # a string is not a list of them
    with pytest.raises(ValueError, match="read_prefixes"):
        StorageGrant.from_dict(data)


def test_what_a_grant_may_read() -> None:
    grant = REDUCER_GRANT
    assert grant.may_read("runs/ws/p/r/v1/nodes/parse/attempts/1/manifest.json")  # an input key
    assert grant.may_read(ITEMS + "0/attempts/1/output.json")
    assert grant.under_read_prefix(ITEMS + "10/attempts/2/output.json")
    assert not grant.under_read_prefix(ITEMS)  # the folder itself is no object
    assert not grant.may_read("runs/ws/p/r/v1/nodes/parse-other/items/0/attempts/1/output.json")
    assert not grant.may_read("runs/ws/p/r/v1/nodes/par/items/0/attempts/1/output.json")
    assert not grant.may_read(ITEMS + "../../secret/output.json")
    assert not grant.may_read(ITEMS + "0//output.json")
    assert not grant.may_read(grant.output_key)  # its own output is written, not read
    assert not grant.may_read(ITEMS + "./0/attempts/1/output.json")
    # ".." inside a segment is no traversal: a data version may be "1..2".
    dotted = StorageGrant(endpoint_url=None, region="r", bucket="b", output_key="o",
                          read_prefixes=("runs/ws/p/r/1..2/nodes/parse/items/",))
    assert dotted.may_read("runs/ws/p/r/1..2/nodes/parse/items/0/attempts/1/output.json")


def test_the_map_binding_round_trips_and_is_absent_for_other_tasks(keyring: TokenKeyring) -> None:
    from dataclasses import replace

    from orchestrator.storage.tokens import map_digest

    slot = {"index": 3, "item": {"file": "c.csv"}, "count": 10}
    bound = replace(claims(), map_sha256=map_digest(slot))
    assert keyring.read(keyring.issue(bound)) == bound
    assert map_digest(dict(reversed(list(slot.items())))) == bound.map_sha256  # canonical: key order
    assert map_digest({**slot, "index": 4}) != bound.map_sha256
    assert keyring.read(keyring.issue(claims())).map_sha256 is None
