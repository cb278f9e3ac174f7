"""A batch of callbacks whose outputs are checked against S3 with a round trip's latency.

Every success a callback reports is checked against the object it names (one HeadObject, before
the callback's transaction: engine.outputs.check_node_output). The `lifecycle` and `batched`
parts run no object store, so this cost is not in their figures; on AWS each check is a round
trip to S3. Here the object store is a moto server behind a proxy that holds every request
`latency_ms` before passing it on (a stand-in for S3's round trip from Lambda, which moto on
this machine does not have), and `Engine.record_callbacks` (POST /api/callbacks) records
batches of `batch` successes of a pipeline of independent nodes, their outputs written first
(untimed):

  one after the other   the checks run on the calling thread (OutputChecks(at_once=1): what
                        every batch did before)
  16 at a time          the engine's OutputChecks (engine.worker_protocol.OUTPUT_CHECKS_AT_ONCE)

The moto server and the proxy run in processes of their own. Wall time per batch and per
callback, and the HeadObject requests the engine sent. Nothing here asserts a figure.
"""

from __future__ import annotations

import http.client
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from bench.suite import NoopTransport
from infra.s3 import FAKE_AWS_ENV, free_port
from orchestrator.config import Settings
from orchestrator.db.connection import Database
from orchestrator.engine import worker_protocol
from orchestrator.engine.completion import AttemptResult
from orchestrator.engine.service import Engine
from orchestrator.storage import s3
from orchestrator.worker.grant_io import GrantStorage

for _name, _value in FAKE_AWS_ENV.items():
    os.environ.setdefault(_name, _value)

WORKSPACE = "checksbench"
_HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "proxy-connection"}


def _make_handler(upstream_port: int, latency_s: float) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as S3 is used

        def log_message(self, format: str, *args: Any) -> None:
            pass

        def _forward(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else None
            time.sleep(latency_s)  # the round trip's latency, not a wait for state
            upstream = http.client.HTTPConnection("127.0.0.1", upstream_port, timeout=30)
            try:
                headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP}
                upstream.request(self.command, self.path, body=body, headers=headers)
                response = upstream.getresponse()
                data = response.read()
            finally:
                upstream.close()
            self.send_response(response.status, response.reason)
            for key, value in response.getheaders():
                if key.lower() not in _HOP_BY_HOP and key.lower() != "content-length":
                    self.send_header(key, value)
            length_header = response.getheader("Content-Length")
            self.send_header("Content-Length", length_header if self.command == "HEAD" and length_header
                             else str(len(data)))
            self.end_headers()
            if self.command != "HEAD" and data:
                self.wfile.write(data)

        do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _forward

    return Handler


def serve_proxy(upstream_port: int, latency_ms: float) -> None:
    """The delaying proxy, in a process of its own (`python -m bench.output_checks`): prints its
    port, then serves until killed."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _make_handler(upstream_port, latency_ms / 1000))
    server.daemon_threads = True
    print(server.server_address[1], flush=True)
    server.serve_forever()


@contextmanager
def s3_with_latency(latency_ms: float) -> Iterator[str]:
    """A moto server and the delaying proxy in front of it, each a process of its own (neither
    shares this process's interpreter with the engine's threads); yields the proxy's URL."""
    moto_port = free_port("127.0.0.1")
    processes = [subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(moto_port)],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                with socket.create_connection(("127.0.0.1", moto_port), timeout=1):
                    break
            except OSError:
                if time.monotonic() > deadline or processes[0].poll() is not None:
                    raise RuntimeError("the moto server did not start") from None
                time.sleep(0.05)  # polling for the port, with a deadline
        proxy = subprocess.Popen([sys.executable, "-m", "bench.output_checks", str(moto_port), str(latency_ms)],
                                 stdout=subprocess.PIPE, text=True)
        processes.append(proxy)
        assert proxy.stdout is not None
        port = proxy.stdout.readline().strip()
        if not port.isdigit():
            raise RuntimeError("the delaying proxy did not start")
        yield f"http://127.0.0.1:{port}"
    finally:
        for process in processes:
            process.terminate()
            process.wait(timeout=10)


@dataclass(frozen=True)
class ChecksResult:
    mode: str
    batches: int
    batch: int
    latency_ms: float
    ms_per_batch: float  # median
    heads: int

    @property
    def ms_per_callback(self) -> float:
        return self.ms_per_batch / self.batch


def measure_batches(database_url: str, endpoint_url: str, *, mode: str, batches: int, batch: int,
                    latency_ms: float) -> ChecksResult:
    settings = Settings(database_url=database_url, local_worker=None, s3_endpoint_url=endpoint_url,
                        bucket=f"checks-{uuid.uuid4().hex[:10]}")
    s3.ensure_bucket(settings)
    transport = NoopTransport()
    engine = Engine(settings, Database(database_url, max_size=4), transports={"local": transport})
    if mode == "one after the other":
        engine.output_checks.close()
        engine.output_checks = worker_protocol.OutputChecks(at_once=1)
    timings: list[float] = []
    heads = 0
    lock = threading.Lock()

    def head_sent(**_: Any) -> None:
        nonlocal heads
        with lock:
            heads += 1

    client = s3.orchestrator_s3(settings)
    client.meta.events.register("before-call.s3.HeadObject", head_sent)
    try:
        engine.create_api_key(WORKSPACE, "admin", raw_key=f"bench-{uuid.uuid4().hex}")
        spec = {"id": f"checks-{uuid.uuid4().hex[:8]}", "nodes": [{"id": f"n{i:03d}", "task": "echo"}
                                                                   for i in range(batch)]}
        engine.create_pipeline(WORKSPACE, spec)
        for _ in range(batches):
            engine.trigger_run(WORKSPACE, spec["id"])
            callbacks = []
            while not transport.messages.empty():  # the worker's part, untimed: each output written
                message = transport.messages.get()
                grant = engine.keyring.read(message["token"]).storage
                assert grant is not None
                body = s3.encode_json({"node": message["node"]})
                GrantStorage(grant).write_output(body)
                callbacks.append(worker_protocol.CallbackInput(
                    uuid.UUID(message["task_id"]), message["token"], "succeeded",
                    {"key": grant.output_key, "size": len(body), "sha256": s3.sha256_hex(body)}))
            if len(callbacks) != batch:
                raise RuntimeError(f"{len(callbacks)} tasks dispatched, {batch} expected")
            started = time.perf_counter()
            answers = engine.record_callbacks(callbacks)
            timings.append((time.perf_counter() - started) * 1000)
            refused = [a for a in answers if not isinstance(a, AttemptResult) or a.outcome != "succeeded"]
            if refused:
                raise RuntimeError(f"{len(refused)} callbacks not recorded as succeeded: {refused[:1]}")
    finally:
        client.meta.events.unregister("before-call.s3.HeadObject", head_sent)
        engine.close()
    return ChecksResult(mode, batches, batch, latency_ms, statistics.median(timings), heads)


def run_output_checks(database_url: str, *, batches: int, batch: int, latency_ms: float) -> list[ChecksResult]:
    with s3_with_latency(latency_ms) as endpoint_url:
        return [measure_batches(database_url, endpoint_url, mode=mode, batches=batches, batch=batch,
                                latency_ms=latency_ms)
                for mode in ("one after the other", "16 at a time")]


def report(results: list[ChecksResult]) -> str:
    rows = ["| output checks | batches | callbacks per batch | latency added per S3 request | ms per batch (median) "
            "| ms per callback | HeadObject requests |", "|---|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        rows.append(f"| {r.mode} | {r.batches} | {r.batch} | {r.latency_ms:.0f} ms | {r.ms_per_batch:,.1f} "
                    f"| {r.ms_per_callback:.2f} | {r.heads} |")
    if len(results) == 2 and results[1].ms_per_batch:
        rows.append(f"\nOne after the other ÷ 16 at a time: {results[0].ms_per_batch / results[1].ms_per_batch:.1f}x "
                    "per batch.")
    return "\n".join(rows)


if __name__ == "__main__":
    serve_proxy(int(sys.argv[1]), float(sys.argv[2]))
