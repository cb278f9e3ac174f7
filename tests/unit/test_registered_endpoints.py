"""Dispatches to tenant-registered http endpoints: public addresses only, signed with the
registration's own secret (never the platform's worker secret), and nothing of the endpoint's
answer but its status in the error the tenant sees."""

from __future__ import annotations

import base64
import json
import os
import re
from collections.abc import Sequence
from typing import Any

import httpx
import pytest

from orchestrator.config import Settings
from orchestrator.dispatch.addresses import endpoint_problem
from orchestrator.dispatch.base import DispatchError
from orchestrator.dispatch.http import HttpTransport
from orchestrator.dispatch.routing import RoutedTransports
from orchestrator.storage.signatures import (
    TIMESTAMP_HEADER,
    endpoint_secret,
    sign_dispatch,
    signing_root_key,
    verify_dispatch,
)

MESSAGE: dict[str, Any] = {"task_id": "t1", "task": "render", "params": {"page": "about"}, "token": "x"}
NAMES = {"public.example": ["93.184.216.34"], "internal.example": ["93.184.216.34", "10.1.2.3"],
         "metadata.example": ["169.254.169.254"], "v6.example": ["2606:2800:220:1:248:1893:25c8:1946"]}


def resolve(host: str, port: int) -> Sequence[str]:
    if host not in NAMES:
        raise OSError("no such name")
    return NAMES[host]


@pytest.mark.parametrize(("url", "kind"), [
    ("http://127.0.0.1:9000/dispatch", "loopback"),
    ("http://127.8.9.10/dispatch", "loopback"),
    ("http://169.254.169.254/latest/meta-data/", "link-local"),
    ("http://10.0.0.1/dispatch", "private"),
    ("http://172.16.5.4/dispatch", "private"),
    ("http://192.168.1.1/dispatch", "private"),
    ("http://[::1]:9000/dispatch", "loopback"),
    ("http://[fe80::1]/dispatch", "link-local"),
    ("http://[fc00::1]/dispatch", "private"),
    ("http://[::ffff:127.0.0.1]/dispatch", "loopback"),  # IPv4-mapped: judged as the IPv4 host
    ("http://[64:ff9b::a00:1]/dispatch", "private"),      # NAT64 of 10.0.0.1
    ("http://0.0.0.0:9000/dispatch", "unspecified"),
    ("http://[::]/dispatch", "unspecified"),
    ("http://224.0.0.1/dispatch", "multicast"),
    ("http://100.64.0.1/dispatch", "non-public"),         # carrier-grade NAT
    ("https://internal.example/dispatch", "10.1.2.3, a private"),   # any of its addresses
    ("https://metadata.example/dispatch", "link-local"),
])
def test_non_public_endpoints_are_refused(url: str, kind: str) -> None:
    problem = endpoint_problem(url, allow_private=False, resolve=resolve)
    assert problem is not None and kind in problem, problem
    assert endpoint_problem(url, allow_private=True, resolve=resolve) is None


def test_names_are_resolved_with_the_system_resolver() -> None:
    for url in ("http://localhost:9000/dispatch", "http://2130706433/dispatch", "http://0x7f.1/dispatch"):
        problem = endpoint_problem(url, allow_private=False)
        assert problem is not None and "loopback" in problem, (url, problem)


def test_public_endpoints_and_bad_urls() -> None:
    for url in ("https://93.184.216.34/dispatch", "https://public.example/dispatch", "http://v6.example:8443/d",
                "https://[2606:2800:220:1:248:1893:25c8:1946]/d"):
        assert endpoint_problem(url, allow_private=False, resolve=resolve) is None, url
    assert "does not resolve" in str(endpoint_problem("https://nowhere.example/d", allow_private=False, resolve=resolve))
    assert "only http and https" in str(endpoint_problem("ftp://93.184.216.34/d", allow_private=True))
    assert "only http and https" in str(endpoint_problem("file:///etc/passwd", allow_private=True))
    assert "not a valid URL" in str(endpoint_problem("http://93.184.216.34:99999/d", allow_private=True))


def test_secrets_are_per_registration_and_the_same_on_every_replica() -> None:
    key = base64.urlsafe_b64encode(os.urandom(32)).decode()
    settings = Settings(token_keys=(("k1", key),))
    root = signing_root_key(settings)
    assert root == signing_root_key(Settings(token_keys=(("k1", key),)))  # another replica
    secret = endpoint_secret(root, "acme", "renderer", "https://w.example/dispatch")
    assert secret == endpoint_secret(signing_root_key(settings), "acme", "renderer", "https://w.example/dispatch")
    others = {endpoint_secret(root, *where) for where in [
        ("other", "renderer", "https://w.example/dispatch"), ("acme", "other", "https://w.example/dispatch"),
        ("acme", "renderer", "https://w.example/other")]}
    assert secret not in others and len(others) == 3
    # A dedicated signing key decouples the secrets from the token keys (which may rotate).
    rotated = Settings(token_keys=(("k2", base64.urlsafe_b64encode(os.urandom(32)).decode()), ("k1", key)),
                       worker_signing_key="a-long-dedicated-signing-key")
    fixed = Settings(token_keys=(("k1", key),), worker_signing_key="a-long-dedicated-signing-key")
    assert signing_root_key(rotated) == signing_root_key(fixed) != root


def test_signatures_verify_only_with_the_secret_the_body_and_a_fresh_timestamp() -> None:
    body = json.dumps(MESSAGE).encode()
    headers = sign_dispatch("twsig_one", body, now=1_000_000)
    assert verify_dispatch(["twsig_other", "twsig_one"], headers, body, now=1_000_100) is None
    assert verify_dispatch(["twsig_other"], headers, body, now=1_000_100) == "signature_invalid"
    assert verify_dispatch(["twsig_one"], headers, body + b" ", now=1_000_100) == "signature_invalid"
    assert verify_dispatch(["twsig_one"], headers, body, now=1_000_301) == "signature_expired"
    assert verify_dispatch(["twsig_one"], headers, body, now=999_600) == "signature_expired"
    assert verify_dispatch(["twsig_one"], {}, body, now=1_000_000) == "signature_missing"
    moved = {**headers, TIMESTAMP_HEADER: "1000001"}  # the timestamp is signed too
    assert verify_dispatch(["twsig_one"], moved, body, now=1_000_000) == "signature_invalid"
    assert verify_dispatch(["twsig_one"], {**headers, TIMESTAMP_HEADER: "-5"}, body) == "signature_invalid"


class Recorder:
    def __init__(self, status: int = 202, text: str = '{"accepted": true}') -> None:
        self.requests: list[httpx.Request] = []
        self.status = status
        self.text = text

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        return httpx.Response(self.status, text=self.text)


def test_a_registered_endpoint_gets_a_signed_body_and_no_platform_secret() -> None:
    recorder = Recorder()
    client = httpx.Client(transport=httpx.MockTransport(recorder))
    transport = HttpTransport.registered("https://w.example/dispatch", signing_secret="twsig_reg",
                                         allow_private=True, client=client)
    transport.send(MESSAGE)
    (request,) = recorder.requests
    assert "authorization" not in request.headers
    assert json.loads(request.content) == MESSAGE and request.headers["content-type"] == "application/json"
    assert verify_dispatch(["twsig_reg"], request.headers, request.content) is None
    transport.close()
    assert not client.is_closed  # a shared client is not the transport's to close
    client.close()


def test_routed_http_transports_never_carry_the_configured_worker_secret() -> None:
    settings = Settings(worker_auth_token="platform-secret", allow_private_worker_endpoints=True)
    routed = RoutedTransports(settings)
    a = routed.get("http", "https://w.example/d", workspace="acme", service="renderer")
    b = routed.get("http", "https://w.example/d", workspace="other", service="renderer")
    assert a is not b  # one secret per registration, even for the same URL
    assert a is routed.get("http", "https://w.example/d", workspace="acme", service="renderer")
    assert isinstance(a, HttpTransport) and isinstance(b, HttpTransport)
    assert a._headers == {} and b._headers == {}
    root = signing_root_key(settings)
    assert a._signing_secret == endpoint_secret(root, "acme", "renderer", "https://w.example/d")
    with pytest.raises(ValueError, match="workspace and service"):
        routed.get("http", "https://w.example/d")
    routed.close()


def test_a_failed_dispatch_to_a_registered_endpoint_keeps_only_the_status() -> None:
    page = "<html>ami-id: i-0123 AccessKeyId: ASIAXXXX internal admin console</html>"
    client = httpx.Client(transport=httpx.MockTransport(Recorder(500, page)))
    transport = HttpTransport.registered("https://w.example/dispatch", signing_secret="s", allow_private=True,
                                         client=client)
    with pytest.raises(DispatchError) as failed:
        transport.send(MESSAGE)
    assert str(failed.value) == "POST https://w.example/dispatch answered 500"

    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("[Errno 111] Connection refused by 10.0.0.7:6379 (redis banner)", request=request)

    refusing = HttpTransport.registered("https://w.example/dispatch", signing_secret="s", allow_private=True,
                                        client=httpx.Client(transport=httpx.MockTransport(refuse)))
    with pytest.raises(DispatchError) as unreachable:
        refusing.send(MESSAGE)
    assert str(unreachable.value) == "POST https://w.example/dispatch failed: ConnectError"
    # The platform's own configured service keeps its short reason in the error.
    configured = HttpTransport("https://platform.example/d", auth_token="platform-secret",
                               client=httpx.Client(transport=httpx.MockTransport(Recorder(503, '{"error": "busy"}'))))
    with pytest.raises(DispatchError, match=re.escape('answered 503: {"error": "busy"}')):
        configured.send(MESSAGE)


def test_the_address_is_checked_again_at_each_dispatch() -> None:
    recorder = Recorder()
    transport = HttpTransport.registered("http://127.0.0.1:9/dispatch", signing_secret="s", allow_private=False,
                                         client=httpx.Client(transport=httpx.MockTransport(recorder)))
    with pytest.raises(DispatchError, match=re.escape("refused: 127.0.0.1 is a loopback address")):
        transport.send(MESSAGE)
    assert recorder.requests == []  # nothing left the orchestrator


def test_the_allow_setting_is_off_unless_set() -> None:
    from orchestrator.config import load_settings

    assert load_settings({}).allow_private_worker_endpoints is False
    assert load_settings({"TICKWEAVE_ALLOW_PRIVATE_WORKER_ENDPOINTS": "true"}).allow_private_worker_endpoints is True
    assert load_settings({"TICKWEAVE_ALLOW_PRIVATE_WORKER_ENDPOINTS": "0"}).allow_private_worker_endpoints is False
    with pytest.raises(ValueError, match="TICKWEAVE_ALLOW_PRIVATE_WORKER_ENDPOINTS"):
        load_settings({"TICKWEAVE_ALLOW_PRIVATE_WORKER_ENDPOINTS": "maybe"})
    assert load_settings({"TICKWEAVE_WORKER_SIGNING_KEY": "k" * 40}).worker_signing_key == "k" * 40
