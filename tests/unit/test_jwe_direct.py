"""The direct `dir` + `A256GCM` codec against joserfc: the same tokens byte for byte, each reading
the other's, and the key ring answering every altered token as joserfc alone answers it."""

from __future__ import annotations

import base64
import json
import os
import time

import pytest
from joserfc import jwe
from joserfc._rfc7518.jwe_encs import GCMEncModel
from joserfc.errors import JoseError
from joserfc.jwk import OctKey

from orchestrator.storage.jwe_direct import DirectGcm, InvalidTag, b64url
from orchestrator.storage.tokens import StorageGrant, TaskClaims, TokenInvalid, TokenKeyring, params_digest

REGISTRY = jwe.JWERegistry(algorithms=["dir", "A256GCM"])
REGISTRY.max_ciphertext_length = 1_048_576


def joserfc_seal(kid: str, key: bytes, plaintext: bytes) -> str:
    header = {"alg": "dir", "enc": "A256GCM", "kid": kid}
    return jwe.encrypt_compact(header, plaintext, OctKey.import_key(key), registry=REGISTRY)


def joserfc_open(token: str, key: bytes) -> bytes | None:
    return jwe.decrypt_compact(token, OctKey.import_key(key), registry=REGISTRY).plaintext


def open_parts(codec: DirectGcm, token: str) -> bytes | None:
    return codec.open_token(token.split("."), max_ciphertext_chars=1_048_576)


@pytest.mark.parametrize("size", [0, 1, 15, 16, 17, 1_700, 65_537])
def test_sealing_writes_joserfcs_bytes_for_the_same_iv(monkeypatch: pytest.MonkeyPatch, size: int) -> None:
    key, iv = os.urandom(32), os.urandom(12)
    plaintext = os.urandom(size)
    monkeypatch.setattr(GCMEncModel, "generate_iv", lambda self: iv)
    expected = joserfc_seal("k-1", key, plaintext)
    assert DirectGcm("k-1", key).seal(plaintext, iv=iv) == expected


def test_each_reads_the_others_tokens() -> None:
    key = os.urandom(32)
    codec = DirectGcm("k1", key)
    for size in (0, 3, 1_000, 200_000):
        plaintext = os.urandom(size)
        assert joserfc_open(codec.seal(plaintext), key) == plaintext
        # joserfc's token opens on the direct path (not None: it has the very shape sealed here)
        assert open_parts(codec, joserfc_seal("k1", key, plaintext)) == plaintext


def test_two_seals_of_one_plaintext_differ_by_their_iv() -> None:
    codec = DirectGcm("k1", os.urandom(32))
    first, second = codec.seal(b"{}"), codec.seal(b"{}")
    assert first != second and first.split(".")[2] != second.split(".")[2]


def test_a_token_of_another_shape_is_left_to_joserfc() -> None:
    key = os.urandom(32)
    codec = DirectGcm("k1", key)
    token = codec.seal(b'{"a":1}')
    parts = token.split(".")
    reordered = b64url(json.dumps({"kid": "k1", "alg": "dir", "enc": "A256GCM"}, separators=(",", ":")).encode())
    padded_iv = parts[2] + "=="
    others = [
        ".".join([reordered, *parts[1:]]),  # another header: not this codec's
        ".".join([parts[0], "AAAA", *parts[2:]]),  # an encrypted key with `dir`
        ".".join([*parts[:2], padded_iv, *parts[3:]]),  # padding
        ".".join([*parts[:3], parts[3][:1] + "+" + parts[3][2:], parts[4]]),  # base64, not base64url
        ".".join([*parts[:4], parts[4][:-1]]),  # a short tag
        token + ".x",  # six segments
    ]
    for other in others:
        assert open_parts(codec, other) is None, other
    assert codec.open_token(parts, max_ciphertext_chars=len(parts[3]) - 1) is None  # over the cap


def test_a_tampered_token_fails_authentication_on_both() -> None:
    key = os.urandom(32)
    codec = DirectGcm("k1", key)
    parts = codec.seal(b'{"sub":"task"}').split(".")
    tag = parts[4]
    parts[4] = ("B" if tag[0] == "A" else "A") + tag[1:]
    with pytest.raises(InvalidTag):
        codec.open_token(parts, max_ciphertext_chars=1_048_576)
    with pytest.raises(JoseError):
        joserfc_open(".".join(parts), key)
    # the same kid under another key: the header matches, the key does not
    other = DirectGcm("k1", os.urandom(32)).seal(b"{}")
    with pytest.raises(InvalidTag):
        open_parts(codec, other)


def claims() -> TaskClaims:
    return TaskClaims(
        task_id="task-1", attempt=3, claim_token="claim-1", workspace="ws", task_name="echo",
        params_sha256=params_digest({"n": 1}), expires_at=int(time.time()) + 600,
        storage=StorageGrant(endpoint_url=None, region="us-east-1", bucket="b", output_key="runs/o",
                             read_keys=("runs/i",), presigned_put="https://b.s3.amazonaws.com/runs/o?x",
                             presigned_get={"runs/i": "https://b.s3.amazonaws.com/runs/i?y"}),
    )


def answer(keyring: TokenKeyring, token: str) -> object:
    try:
        return keyring.read(token)
    except TokenInvalid as exc:
        return exc.reason


def test_the_keyring_answers_every_altered_token_as_joserfc_alone_does() -> None:
    material = base64.urlsafe_b64encode(os.urandom(32)).decode()
    old = base64.urlsafe_b64encode(os.urandom(32)).decode()
    keyring = TokenKeyring([("k1", material), ("k0", old)], issuer="tickweave", audience="tickweave-worker")
    reference = TokenKeyring([("k1", material), ("k0", old)], issuer="tickweave", audience="tickweave-worker")
    reference._direct.clear()  # every token through joserfc, as before the direct codec
    token = keyring.issue(claims())
    assert answer(keyring, token) == answer(reference, token) == claims()
    alphabet = "Aa0_-=+/."
    altered = {token[:cut] for cut in range(0, len(token), 7)} | {token + "A", token + "=", "." + token}
    for position in range(len(token)):
        for char in alphabet[position % 3:: 3]:
            if token[position] != char:
                altered.add(token[:position] + char + token[position + 1:])
    answers: dict[object, int] = {}
    for candidate in altered:
        expected = answer(reference, candidate)
        assert answer(keyring, candidate) == expected, candidate
        key = expected if isinstance(expected, str) else "accepted"
        answers[key] = answers.get(key, 0) + 1
    # the alterations reached both failures, and some left the token's bytes intact (a stray
    # bit joserfc also ignores is not among them: it refuses non-canonical segments)
    assert answers.get("tampered", 0) > 100 and answers.get("malformed", 0) > 100, answers


def test_an_authentic_token_over_the_size_cap_is_refused_as_malformed() -> None:
    """An enormous token the ring itself sealed: past the ciphertext cap the direct codec does not
    open it, and joserfc refuses it as too large, as before."""
    keyring = TokenKeyring([("k1", base64.urlsafe_b64encode(os.urandom(32)).decode())], issuer="tickweave",
                           audience="tickweave-worker")
    big = claims()
    grant = big.storage
    assert grant is not None
    reads = {f"runs/in/{i:05d}": f"https://b.s3.amazonaws.com/runs/in/{i:05d}?{'x' * 600}" for i in range(1_500)}
    token = keyring.issue(TaskClaims(**{**big.__dict__, "storage": StorageGrant(
        **{**grant.__dict__, "read_keys": tuple(reads), "presigned_get": reads})}))
    assert len(token.split(".")[3]) > 1_048_576
    assert answer(keyring, token) == "malformed"
