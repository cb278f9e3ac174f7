"""AWS API calls per dispatched task (issue 15, part 11), counted, not timed.

A storage role is configured (as the template does), the object store and STS are a moto
server, and the benchmark plays the worker: it writes each task's output with the grant from
its token (presigned PUT or credentials) and calls back. Every call the orchestrator's own
botocore clients make is counted by a `before-call` event hook on those clients, by service:
the dispatches' grants (STS AssumeRole) and the callbacks' checks (S3 HeadObject, the pipeline
outputs' reads and writes). Presigning is local and makes none.

Modes:
  per-task     what every dispatch did before issue 15: one AssumeRole per task, its session
               policy scoped to the attempt (forced through the grant issuer)
  urls         the default now: presigned URLs signed with one cached session of the role
  credentials  every node with `storage: credentials`: one session per run and node

`python -m bench.aws_calls [--runs 5] [--width 8]` prints the table; `python -m bench --only aws`
puts it in the report.
"""

from __future__ import annotations

import argparse
import json
import os
import threading
import uuid
from collections import Counter
from dataclasses import dataclass
from typing import Any

from infra.s3 import FAKE_AWS_ENV, MotoServer, start_moto_server
from orchestrator.config import Settings
from orchestrator.db.connection import Database
from orchestrator.engine.service import Engine

for _name, _value in FAKE_AWS_ENV.items():
    os.environ.setdefault(_name, _value)

MODES = ("per-task", "urls", "credentials")
WORKSPACE = "awsbench"
ACCOUNT = "123456789012"


@dataclass(frozen=True)
class CallCounts:
    mode: str
    tasks: int
    calls: dict[str, int]  # "sts:AssumeRole", "s3:HeadObject", ...

    def per_task(self, service: str) -> float:
        return sum(n for name, n in self.calls.items() if name.startswith(service + ":")) / max(1, self.tasks)

    def assume_role_per_task(self) -> float:
        return self.calls.get("sts:AssumeRole", 0) / max(1, self.tasks)


class _Transport:
    name = "local"

    def __init__(self) -> None:
        self.messages: list[dict[str, Any]] = []
        self._lock = threading.Lock()

    def send(self, message: dict[str, Any]) -> None:
        with self._lock:
            self.messages.append(message)

    def take(self) -> list[dict[str, Any]]:
        with self._lock:
            taken, self.messages = self.messages, []
        return taken

    def close(self) -> None:
        return None


def create_role(endpoint_url: str, bucket: str) -> str:
    """The template's WorkerStorageRole in moto: PutObject on runs/*, GetObject on runs/* and outputs/*."""
    import boto3

    iam = boto3.client("iam", endpoint_url=endpoint_url, region_name="us-east-1")
    name = f"storage-{uuid.uuid4().hex[:10]}"
    role = iam.create_role(RoleName=name, AssumeRolePolicyDocument=json.dumps({
        "Version": "2012-10-17",
        "Statement": [{"Effect": "Allow", "Principal": {"AWS": f"arn:aws:iam::{ACCOUNT}:root"},
                       "Action": "sts:AssumeRole"}],
    }))
    iam.put_role_policy(RoleName=name, PolicyName="ceiling", PolicyDocument=json.dumps({
        "Version": "2012-10-17",
        "Statement": [
            {"Effect": "Allow", "Action": "s3:PutObject", "Resource": f"arn:aws:s3:::{bucket}/runs/*"},
            {"Effect": "Allow", "Action": "s3:GetObject",
             "Resource": [f"arn:aws:s3:::{bucket}/runs/*", f"arn:aws:s3:::{bucket}/outputs/*"]},
        ],
    }))
    return str(role["Role"]["Arn"])


def pipeline(width: int, *, credentials: bool) -> dict[str, Any]:
    """root -> `width` parallel nodes -> join, with a pipeline output (a callback reads and copies it)."""
    extra: dict[str, Any] = {"storage": "credentials"} if credentials else {}
    nodes: list[dict[str, Any]] = [{"id": "root", "task": "noop", **extra}]
    nodes += [{"id": f"n{i}", "task": "noop", "depends": ["root"], **extra} for i in range(width)]
    nodes.append({"id": "join", "task": "noop", "depends": [f"n{i}" for i in range(width)], **extra})
    return {"id": f"calls-{uuid.uuid4().hex[:8]}", "nodes": nodes,
            "outputs": {"result": {"from": "join"}}}


def count_calls(database_url: str, endpoint_url: str, *, mode: str, runs: int, width: int) -> CallCounts:
    """Run `runs` runs of the fan pipeline to the end under `mode`; the orchestrator's AWS calls."""
    from orchestrator.storage import s3
    from orchestrator.worker.grant_io import GrantStorage

    if mode not in MODES:
        raise ValueError(f"mode {mode!r}: choose from {', '.join(MODES)}")
    bucket = f"calls-{uuid.uuid4().hex[:10]}"
    settings = Settings(database_url=database_url, local_worker=None, s3_endpoint_url=endpoint_url, bucket=bucket,
                        storage_role_arn=create_role(endpoint_url, bucket))
    s3.ensure_bucket(settings)
    s3._SESSIONS.clear()  # a fresh process's cache: its first sessions are counted too
    transport = _Transport()
    engine = Engine(settings, Database(database_url, max_size=4), transports={"local": transport})
    calls: Counter[str] = Counter()
    lock = threading.Lock()

    def counted(event_name: str, **_: Any) -> None:
        # before-call.<service>.<Operation>
        service, operation = event_name.split(".", 2)[1:]
        with lock:
            calls[f"{service}:{operation}"] += 1

    hooks = [(s3.orchestrator_s3(settings), "before-call.s3"), (s3.orchestrator_sts(settings), "before-call.sts")]
    for client, event in hooks:
        client.meta.events.register(event, counted)
    if mode == "per-task":
        issue = s3.issue_storage_grant

        def per_task(settings: Settings, **kwargs: Any) -> Any:
            # The grant before issue 15: credentials whose session policy names this attempt.
            kwargs.update(access="credentials", scope_prefix=None, run_prefix=None)
            return issue(settings, **kwargs)

        engine.dispatcher._grant_issuer = per_task
    try:
        spec = pipeline(width, credentials=mode == "credentials")
        engine.create_api_key(WORKSPACE, "admin", raw_key=f"bench-{uuid.uuid4().hex}")
        engine.create_pipeline(WORKSPACE, spec)
        for _ in range(runs):
            engine.trigger_run(WORKSPACE, spec["id"])
        tasks = 0
        expected = runs * (width + 2)
        idle = 0
        while tasks < expected:
            messages = transport.take()
            if not messages:
                idle += 1
                if idle > 50:
                    raise RuntimeError(f"stalled after {tasks} of {expected} tasks")
                engine.tick()
                continue
            idle = 0
            for message in messages:
                grant = engine.keyring.read(message["token"]).storage
                assert grant is not None
                body = s3.encode_json({"node": message["node"]})
                GrantStorage(grant).write_output(body)
                result = engine.record_callback(
                    uuid.UUID(message["task_id"]), message["token"], status="succeeded",
                    output={"key": grant.output_key, "size": len(body), "sha256": s3.sha256_hex(body)}, error=None,
                )
                if not result.accepted:
                    raise RuntimeError(f"callback refused: {result.outcome}")
                tasks += 1
    finally:
        for client, event in hooks:
            client.meta.events.unregister(event, counted)
        engine.close()
    return CallCounts(mode, tasks, dict(calls))


def table(counts: list[CallCounts]) -> str:
    rows = ["| grants | tasks | STS AssumeRole per task | other STS per task | S3 calls per task | S3 calls |",
            "|---|---:|---:|---:|---:|---|"]
    for c in counts:
        s3_calls = ", ".join(f"{name.split(':')[1]} {n}" for name, n in sorted(c.calls.items()) if name.startswith("s3:"))
        rows.append(f"| {c.mode} | {c.tasks} | {c.assume_role_per_task():.3f} | "
                    f"{c.per_task('sts') - c.assume_role_per_task():.3f} | {c.per_task('s3'):.2f} | {s3_calls or '-'} |")
    return "\n".join(rows)


def run_all(database_url: str, *, runs: int, width: int, moto: MotoServer | None = None) -> str:
    server = moto or start_moto_server()
    try:
        counts = [count_calls(database_url, server.endpoint_url, mode=m, runs=runs, width=width) for m in MODES]
    finally:
        if moto is None:
            server.stop()
    return table(counts)


def main() -> None:
    from bench.server import postgres_server

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--width", type=int, default=8, help="parallel nodes per run (tasks per run: width + 2)")
    args = parser.parse_args()
    from bench.suite import Suite

    with postgres_server() as server:
        suite = Suite(server, fan_width=2, chain_length=2)
        try:
            print(run_all(suite.copy("aws_calls"), runs=args.runs, width=args.width))
        finally:
            server.drop("aws_calls")
            suite.close()


if __name__ == "__main__":
    main()
