"""The fan-out example (examples/pipelines/files-fan-out.yaml) end to end: the real worker code
of examples/tasks.py run by the local transport, calling back over HTTP, on real Postgres and
the moto S3/STS server. `list` finds the files, `parse` runs once per file (a map over
list.files, at most 4 at a time), `load` reads every item's output through the manifest.

Both storage grant modes: STS credentials (the reducer reads the items with its session's
credentials) and presigned URLs (no storage role: the reducer asks `POST /api/worker/read-urls`
for the URLs of the items it reads)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
import yaml

from infra.s3 import MotoServer
from orchestrator.engine import worker_reads
from orchestrator.storage.s3 import orchestrator_s3

from .conftest import STORAGE_ROLE, Stack, running_stack, wait_until

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "examples" / "pipelines" / "files-fan-out.yaml"
MAX_CONCURRENCY = 4  # what the example's `map:` says


class FanStack(Stack):
    mode: str
    read_url_requests: list[int]


@pytest.fixture(params=["sts", "presigned"])
def fan_stack(
    request: pytest.FixtureRequest, database_url: str, moto_server: MotoServer, monkeypatch: pytest.MonkeyPatch
) -> Iterator[FanStack]:
    role = STORAGE_ROLE if request.param == "sts" else None
    requests: list[int] = []  # keys asked for, per POST /api/worker/read-urls
    presign = worker_reads.presign_reads

    def counted(settings: Any, keyring: Any, token: str, keys: Any) -> dict[str, str]:
        requests.append(len(keys))
        return presign(settings, keyring, token, keys)

    monkeypatch.setattr(worker_reads, "presign_reads", counted)
    with running_stack(database_url, moto_server, storage_role_arn=role) as running:
        body = EXAMPLE.read_bytes()
        if role is not None:
            # Credentials, not the default URLs: the map's items and the reducer ask for them
            # (`storage: credentials`), and share the run's one session.
            definition = yaml.safe_load(body)
            for node in definition["nodes"]:
                if node["id"] in ("parse", "load"):
                    node["storage"] = "credentials"
            body = json.dumps(definition).encode()
        created = running.client.post("/api/pipelines", content=body,
                                      headers={"Content-Type": "application/yaml"})
        assert created.status_code == 201, created.text
        stack = FanStack(running.settings, running.engine, running.client, running.base_url)
        stack.mode, stack.read_url_requests = request.param, requests
        yield stack


def s3_json(stack: Stack, key: str) -> Any:
    return json.loads(orchestrator_s3(stack.settings).get_object(Bucket=stack.settings.bucket, Key=key)["Body"].read())


def items_out(stack: Stack, run_id: str) -> int:
    """Children of the run's map node out with workers now."""
    with psycopg.connect(stack.settings.database_url) as conn:
        row = conn.execute("""SELECT count(*) FROM tasks WHERE run_id = %s AND map_parent_id IS NOT NULL
                              AND status IN ('dispatched', 'running')""", (run_id,)).fetchone()
    assert row is not None
    return int(row[0])


def run_to_the_end(stack: Stack, params: dict[str, Any]) -> tuple[dict[str, Any], int]:
    """Trigger the example and tick until the run is terminal, sampling how many items are out
    with workers at each poll. The run and the most items seen out at once."""
    triggered = stack.client.post("/api/pipelines/files-fan-out/runs", json={"params": params})
    assert triggered.status_code == 201, triggered.text
    run_id = triggered.json()["id"]
    most = 0

    def probe() -> dict[str, Any] | None:
        nonlocal most
        most = max(most, items_out(stack, run_id))
        return stack._terminal_run(run_id, tick=True)

    run = wait_until(probe, 90, f"run {run_id} of files-fan-out did not finish")
    return run, most


def node_task(stack: Stack, run_id: str, node: str) -> dict[str, Any]:
    """The node-level task of `node` (for a mapped node: its map node, not an item)."""
    with psycopg.connect(stack.settings.database_url, row_factory=psycopg.rows.dict_row) as conn:
        row = conn.execute("SELECT * FROM tasks WHERE run_id = %s AND node_id = %s AND map_index = -1",
                           (run_id, node)).fetchone()
    assert row is not None, f"no task of node {node}"
    return row


def test_the_reducer_reads_every_items_output_in_index_order(fan_stack: FanStack) -> None:
    stack = fan_stack
    count = 20
    run, most = run_to_the_end(stack, {"count": count})
    assert run["status"] == "succeeded", run

    listing = s3_json(stack, node_task(stack, run["id"], "list")["output"]["key"])
    files = listing["files"]
    assert len(files) == count

    # The map node: expanded to one child per file, settled with a manifest of their outputs.
    parse = node_task(stack, run["id"], "parse")
    assert (parse["kind"], parse["status"], parse["map_width"]) == ("map", "succeeded", count)
    manifest_key = parse["output"]["key"]
    assert manifest_key == f"runs/e2e/files-fan-out/{run['id']}/default/nodes/parse/attempts/1/manifest.json"
    manifest = s3_json(stack, manifest_key)
    assert (manifest["format"], manifest["count"], manifest["succeeded"]) == ("tickweave.map-manifest/1", count, count)
    assert [i["index"] for i in manifest["items"]] == list(range(count))
    assert all(i["key"].startswith(f"runs/e2e/files-fan-out/{run['id']}/default/nodes/parse/items/{i['index']}/")
               for i in manifest["items"])

    # The reducer ran once and saw each item's own output, in index order.
    load = node_task(stack, run["id"], "load")
    assert (load["status"], load["attempt"]) == ("succeeded", 1)
    loaded = s3_json(stack, load["output"]["key"])
    assert loaded["files"] == files
    assert loaded["indexes"] == list(range(count))
    assert loaded["failed"] == []
    outputs = [s3_json(stack, i["key"]) for i in manifest["items"]]
    assert [(o["index"], o["file"]) for o in outputs] == list(enumerate(files))
    assert loaded["rows"] == sum(o["rows"] for o in outputs)

    # max_concurrency: never more than 4 items out with workers at any poll.
    assert 1 <= most <= MAX_CONCURRENCY, most
    # With STS credentials the reducer reads the items itself; without, it asked for their URLs
    # (all 20 in one request: a batch is 100).
    assert stack.read_url_requests == ([] if stack.mode == "sts" else [count])


def test_a_tolerated_failure_reaches_the_reducer_and_one_too_many_fails_the_map(fan_stack: FanStack) -> None:
    stack = fan_stack
    names = [f"incoming/part-{i:03d}.csv" for i in range(10)]

    # 10% of 10 items: one failure is tolerated. The run succeeds and the reducer is told.
    run, _ = run_to_the_end(stack, {"count": 10, "bad_files": [names[3]]})
    assert run["status"] == "succeeded", run
    parse = node_task(stack, run["id"], "parse")
    assert parse["status"] == "succeeded" and parse["output"]["failed"] == 1
    loaded = s3_json(stack, node_task(stack, run["id"], "load")["output"]["key"])
    assert loaded["files"] == names[:3] + names[4:]
    assert loaded["indexes"] == [0, 1, 2, 4, 5, 6, 7, 8, 9]
    assert [(f["index"], f["status"]) for f in loaded["failed"]] == [(3, "failed")]
    assert names[3] in loaded["failed"][0]["error"]
    # The failed item is dead-lettered on its own, with its item.
    entries = stack.client.get("/api/dlq", params={"pipeline": "files-fan-out"}).json()["items"]
    assert len(entries) == 1

    # Two failures are one too many: the map node fails, the reducer never runs, the run fails.
    run, _ = run_to_the_end(stack, {"count": 10, "bad_files": [names[1], names[8]]})
    assert run["status"] == "failed", run
    parse = node_task(stack, run["id"], "parse")
    assert parse["status"] == "failed" and parse["error"]["code"] == "map_failures_exceeded"
    assert "2 of 10 items failed" in parse["error"]["message"]
    assert node_task(stack, run["id"], "load")["status"] == "skipped"
