"""Registering an http worker endpoint through the API: non-public addresses are refused with a
422 naming the endpoint and why (unless the operator allows them), and the answer carries the
registration's signing secret."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from starlette.testclient import TestClient

from orchestrator.api.app import create_app
from orchestrator.config import Settings
from orchestrator.db.connection import Database
from orchestrator.engine.service import Engine
from orchestrator.storage.signatures import endpoint_secret, signing_root_key

from .conftest import WORKSPACE

AUTH = {"x-api-key": "acme-admin-key"}
REFUSED = [
    ("http://127.0.0.1:9000/dispatch", "loopback"),
    ("http://localhost:9000/dispatch", "loopback"),
    ("http://169.254.169.254/latest/meta-data/", "link-local"),
    ("http://10.0.0.1/dispatch", "private"),
    ("http://[::1]:9000/dispatch", "loopback"),
    ("https://0.0.0.0/dispatch", "unspecified"),
]


def registration(endpoint: str, service: str = "renderer") -> dict[str, object]:
    return {"service": service, "version": "1.0.0", "transport": "http", "endpoint": endpoint,
            "tasks": [{"name": "render", "code_hash": "sha256:aaaaaaaa"}]}


@pytest.fixture
def strict_client(settings: Settings) -> Iterator[tuple[TestClient, Engine]]:
    """The API as deployed: TICKWEAVE_ALLOW_PRIVATE_WORKER_ENDPOINTS unset."""
    strict = settings.with_overrides(allow_private_worker_endpoints=False, worker_auth_token="platform-secret")
    engine = Engine(strict, Database(strict.database_url, max_size=2), transports={})
    engine.create_api_key(WORKSPACE, "admin", raw_key="acme-admin-key")
    with TestClient(create_app(strict, engine), raise_server_exceptions=False) as client:
        yield client, engine
    engine.close()


@pytest.mark.parametrize(("endpoint", "kind"), REFUSED)
def test_non_public_endpoints_are_refused_at_registration(strict_client: tuple[TestClient, Engine],
                                                           endpoint: str, kind: str) -> None:
    client, _ = strict_client
    response = client.post("/api/workers/register", json=registration(endpoint), headers=AUTH)
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert endpoint in error["message"] and kind in error["message"], error["message"]
    assert error["details"][0]["path"] == "endpoint" and kind in error["details"][0]["message"]
    assert client.get("/api/workers", headers=AUTH).json()["items"] == []


def test_a_public_endpoint_is_registered_with_its_own_signing_secret(strict_client: tuple[TestClient, Engine]) -> None:
    client, engine = strict_client
    endpoint = "https://93.184.216.34/dispatch"  # an address literal: no DNS needed
    first = client.post("/api/workers/register", json=registration(endpoint), headers=AUTH)
    assert first.status_code == 200, first.text
    secret = first.json()["signing_secret"]
    assert secret == endpoint_secret(signing_root_key(engine.settings), WORKSPACE, "renderer", endpoint)
    assert "platform-secret" not in first.text
    # Registering again (a restart, another replica) hands out the same secret; another service
    # or endpoint gets another one.
    again = client.post("/api/workers/register", json=registration(endpoint), headers=AUTH).json()
    assert again["signing_secret"] == secret
    other = client.post("/api/workers/register", json=registration(endpoint, "other"), headers=AUTH).json()
    assert other["signing_secret"] not in (None, secret)
    # The secret is shown to the registering admin only: never in listings.
    assert secret not in client.get("/api/workers", headers=AUTH).text
    lam = client.post("/api/workers/register", headers=AUTH, json={
        **registration("tickweave-worker", "fn"), "transport": "lambda"})
    assert lam.status_code == 200 and lam.json()["signing_secret"] is None


@pytest.mark.parametrize(("endpoint", "kind"), REFUSED)
def test_the_operator_setting_allows_private_endpoints(client_allowing: TestClient, endpoint: str, kind: str) -> None:
    response = client_allowing.post("/api/workers/register", json=registration(endpoint), headers=AUTH)
    assert response.status_code == 200, response.text
    assert response.json()["signing_secret"].startswith("twsig_")


@pytest.fixture
def client_allowing(engine: Engine) -> Iterator[TestClient]:
    assert engine.settings.allow_private_worker_endpoints  # the integration settings allow them
    with TestClient(create_app(engine.settings, engine), raise_server_exceptions=False) as client:
        yield client


def test_only_http_and_https_even_when_private_endpoints_are_allowed(client_allowing: TestClient) -> None:
    for endpoint in ("ftp://93.184.216.34/d", "file:///etc/passwd", "gopher://127.0.0.1:6379/_INFO",
                     "http://127.0.0.1/\n"):
        response = client_allowing.post("/api/workers/register", json=registration(endpoint), headers=AUTH)
        assert response.status_code == 422, (endpoint, response.text)
