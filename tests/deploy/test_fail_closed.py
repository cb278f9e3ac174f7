"""Lambda mode fails closed: without its token keys and tick secret (or with the public
development ones) the API function, the app and the worker refuse to start, naming each setting
to fix; and the unauthenticated /api/info says nothing about keys or secrets."""

from __future__ import annotations

import base64
import importlib
import os
from collections.abc import Iterator
from types import ModuleType

import pytest
from starlette.testclient import TestClient

from infra.s3 import MotoServer
from orchestrator.api.app import create_app
from orchestrator.config import ConfigurationError, Settings, load_settings
from orchestrator.storage.s3 import ensure_bucket
from orchestrator.storage.tokens import TokenKeyring
from orchestrator.worker import Worker

from .conftest import FakeContext, generated_token_key, load_event

DEV_KEY = Settings().token_keys[0][1]  # the development key: derived from a fixed phrase, public


def key_ring_value() -> str:
    return f"k1:{generated_token_key()}"


@pytest.mark.parametrize(("env", "named", "not_named"), [
    ({}, ["TICKWEAVE_TOKEN_KEYS", "TICKWEAVE_TICK_SECRET"], []),
    ({"TICKWEAVE_TICK_SECRET": "s3cret-tick"}, ["TICKWEAVE_TOKEN_KEYS"], ["TICKWEAVE_TICK_SECRET"]),
    ({"TICKWEAVE_TOKEN_KEYS": "GEN"}, ["TICKWEAVE_TICK_SECRET"], ["TICKWEAVE_TOKEN_KEYS"]),
    # the public development values, set explicitly, are as good as unset
    ({"TICKWEAVE_TOKEN_KEYS": f"dev:{DEV_KEY}", "TICKWEAVE_TICK_SECRET": "dev-tick-secret"},
     ["TICKWEAVE_TOKEN_KEYS", "TICKWEAVE_TICK_SECRET"], []),
    ({"TICKWEAVE_TOKEN_KEYS": f"GEN,old:{DEV_KEY}", "TICKWEAVE_TICK_SECRET": "s3cret-tick"},
     ["TICKWEAVE_TOKEN_KEYS"], ["TICKWEAVE_TICK_SECRET"]),
])
def test_lambda_mode_names_every_missing_secret(env: dict[str, str], named: list[str], not_named: list[str]) -> None:
    env = {name: value.replace("GEN", key_ring_value()) for name, value in env.items()}
    settings = load_settings({"TICKWEAVE_MODE": "lambda", **env})
    with pytest.raises(ConfigurationError) as refused:
        settings.check_mode()
    for name in named:
        assert name in str(refused.value)
    for name in not_named:
        assert name not in str(refused.value)
    with pytest.raises(ConfigurationError):
        create_app(settings)
    load_settings(env).check_mode()  # local mode (make dev, tests) keeps its development defaults


def test_lambda_mode_starts_with_its_secrets() -> None:
    settings = load_settings({"TICKWEAVE_MODE": "lambda", "TICKWEAVE_TOKEN_KEYS": key_ring_value(),
                              "TICKWEAVE_TICK_SECRET": "s3cret-tick"})
    settings.check_mode()
    create_app(settings)
    TokenKeyring.from_settings(settings)


def test_a_worker_in_lambda_mode_refuses_the_development_key() -> None:
    with pytest.raises(ConfigurationError, match="TICKWEAVE_TOKEN_KEYS"):
        TokenKeyring.from_settings(Settings(mode="lambda", tick_secret="s3cret-tick"))
    worker = Worker(settings=Settings(mode="lambda"))
    with pytest.raises(ConfigurationError, match="TICKWEAVE_TOKEN_KEYS"):
        worker.execute({"token": "a.b.c.d.e", "callback_url": "http://x/cb", "heartbeat_url": "http://x/hb"},
                       send=lambda url, body: {})
    # The worker needs no tick secret: with its token keys it starts.
    TokenKeyring.from_settings(Settings(mode="lambda", token_keys=(("k1", generated_token_key()),)))


@pytest.fixture
def cold_api(monkeypatch: pytest.MonkeyPatch) -> Iterator[ModuleType]:
    """handler.api as a cold start configured with a database but no secrets."""
    for name in list(os.environ):
        if name.startswith("TICKWEAVE_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("DATABASE_URL", "postgresql://nobody@127.0.0.1:1/none?connect_timeout=1")
    monkeypatch.setenv("TICKWEAVE_LOCAL_WORKER", "")
    import handler.api

    module = importlib.reload(handler.api)
    yield module
    importlib.reload(handler.api)


def test_the_api_function_refuses_every_event_until_its_secrets_are_set(cold_api: ModuleType) -> None:
    for event in (load_event("apigw_v2_get_health.json"), load_event("scheduler_tick.json"),
                  load_event("create_key_invoke.json")):
        with pytest.raises(ConfigurationError) as refused:
            cold_api.lambda_handler(event, FakeContext())
        assert "TICKWEAVE_TOKEN_KEYS" in str(refused.value) and "TICKWEAVE_TICK_SECRET" in str(refused.value)
    assert cold_api._runtime is None  # nothing was built


def test_info_says_nothing_about_keys(database_url: str, moto_server: MotoServer) -> None:
    for mode, keys, tick in (("local", Settings().token_keys, "dev-tick-secret"),
                             ("lambda", (("k1", base64.urlsafe_b64encode(os.urandom(32)).decode()),), "s3cret")):
        settings = Settings(database_url=database_url, s3_endpoint_url=moto_server.endpoint_url,
                            bucket="info-check", local_worker=None, mode=mode, token_keys=keys, tick_secret=tick)
        ensure_bucket(settings)
        with TestClient(create_app(settings)) as client:
            info = client.get("/api/info")
            assert info.status_code == 200, info.text
            body = info.json()
            assert body["database"] == "ok" and body["mode"] == mode
            assert set(body) == {"version", "mode", "database", "storage", "transports"}, body
            assert "key" not in info.text.lower() and "secret" not in info.text.lower()
            client.app.state.get_engine().close()  # type: ignore[attr-defined]
