"""What a cold start loads, in fresh interpreters. Structural only: no wall times are asserted
(bench/cold_start.py measures them, docs/benchmarks.md records them)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import boto3

from infra.s3 import MotoServer, free_port

ROOT = Path(__file__).resolve().parent.parent.parent
EVENTS = ROOT / "tests" / "fixtures" / "events"
HEAVY = ("boto3", "botocore", "psycopg", "starlette", "mangum", "pydantic", "joserfc", "yaml", "httpx", "croniter")

PROBE = """
import json, sys
import {module}
def loaded():
    return sorted(name for name in sys.modules if "." not in name or name.startswith(("orchestrator.", "handler.")))
at_import = loaded()
result = None
if len(sys.argv) > 1:
    try:
        result = {module}.lambda_handler(json.loads(sys.argv[1]), None)
    except Exception as exc:
        result = {{"raised": type(exc).__name__}}
print(json.dumps({{"at_import": at_import, "result": result, "after_event": loaded()}}))
"""


def probe(module: str, event: dict[str, Any] | None = None, **env: str) -> dict[str, Any]:
    # A database nobody listens on: any attempt to connect fails.
    environment = {k: v for k, v in os.environ.items() if not k.startswith(("TICKWEAVE_", "DATABASE_URL"))}
    # Lambda mode refuses to start without its token keys and tick secret: give it both.
    environment.update({"DATABASE_URL": f"postgresql://nobody@127.0.0.1:{free_port()}/none?connect_timeout=1",
                        "TICKWEAVE_LOCAL_WORKER": "", "TICKWEAVE_TICK_SECRET": "cold-import-tick-secret",
                        "TICKWEAVE_TOKEN_KEYS": "k1:" + "A" * 43, **env})
    argv = [json.dumps(event)] if event is not None else []
    done = subprocess.run([sys.executable, "-c", PROBE.format(module=module), *argv], env=environment,
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    answer: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return answer


def test_importing_the_api_handler_loads_no_sdk_driver_or_framework() -> None:
    loaded = set(probe("handler.api")["at_import"])
    assert not loaded & set(HEAVY), sorted(loaded & set(HEAVY))
    # of the library, only the configuration
    assert {name for name in loaded if name.startswith("orchestrator.")} == {"orchestrator.config"}


def test_importing_the_worker_handler_loads_no_sdk() -> None:
    loaded = set(probe("handler.worker")["at_import"])
    assert not loaded & set(HEAVY), sorted(loaded & set(HEAVY))
    assert {name for name in loaded if name.startswith("orchestrator.")} == {"orchestrator.config"}


def test_importing_the_api_handler_resolves_no_reference() -> None:
    """References are resolved by the first event: at import, not even a bad one is looked at."""
    loaded = probe("handler.api", TICKWEAVE_TICK_SECRET_FROM="not a reference")["at_import"]
    assert "boto3" not in loaded


def test_the_first_http_event_opens_no_database_connection() -> None:
    """GET /health builds the app but needs no database: the unreachable database is not
    contacted (which would fail the request)."""
    event = json.loads((EVENTS / "apigw_v2_get_health.json").read_text())
    answer = probe("handler.api", event)
    assert answer["result"]["statusCode"] == 200, answer["result"]
    assert json.loads(answer["result"]["body"]) == {"status": "ok"}


def test_the_migration_invoke_does_not_build_the_app() -> None:
    """A migration needs psycopg only, not Starlette, Mangum or boto3. (Against the unreachable
    database it fails, after importing what it needs.)"""
    answer = probe("handler.api", {"tickweave": "migrate"})
    assert answer["result"] == {"raised": "OperationalError"}
    assert "psycopg" in answer["after_event"]
    assert not {"boto3", "botocore", "starlette", "mangum"} & set(answer["after_event"])


def test_the_first_event_reads_the_references_with_botocore_alone(moto_server: MotoServer) -> None:
    """Settings from Secrets Manager and SSM (as the template configures them): the first event
    imports botocore, not boto3 (20-40 ms more), and reads the three secrets in one call and
    the parameter in another."""
    secrets = boto3.client("secretsmanager", endpoint_url=moto_server.endpoint_url, region_name="us-east-1")
    ssm = boto3.client("ssm", endpoint_url=moto_server.endpoint_url, region_name="us-east-1")
    run = uuid.uuid4().hex
    arns = {name: secrets.create_secret(Name=f"cold/{run}/{name}", SecretString=value)["ARN"] for name, value in {
        "db": f"postgresql://nobody@127.0.0.1:{free_port()}/none?connect_timeout=1",
        "tokens": json.dumps({"kid": "k1", "key": "A" * 43}), "tick": "cold-import-tick-secret"}.items()}
    ssm.put_parameter(Name=f"/cold/{run}/public-url", Value="https://cold.example", Type="String")
    answer = probe(
        "handler.api", json.loads((EVENTS / "apigw_v2_get_health.json").read_text()),
        DATABASE_URL="", TICKWEAVE_TOKEN_KEYS="", TICKWEAVE_TICK_SECRET="",
        DATABASE_URL_FROM=arns["db"], TICKWEAVE_TOKEN_KEYS_FROM=arns["tokens"], TICKWEAVE_TICK_SECRET_FROM=arns["tick"],
        TICKWEAVE_PUBLIC_URL_FROM=f"ssm:/cold/{run}/public-url",
        AWS_ENDPOINT_URL_SECRETS_MANAGER=moto_server.endpoint_url, AWS_ENDPOINT_URL_SSM=moto_server.endpoint_url,
        AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1",
    )
    assert answer["result"]["statusCode"] == 200, answer["result"]
    assert "botocore" in answer["after_event"] and "boto3" not in answer["after_event"]
