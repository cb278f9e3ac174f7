"""A small emulator of Lambda's Runtime API, a function process run by the real runtime interface
client against it, and an HTTP API (payload 2.0) front that turns HTTP requests into events.

`RuntimeApi` serves what `awslambdaric` (the client AWS's Python images and runtimes use) calls:

- `GET  /2018-06-01/runtime/invocation/next`: the next event, in the order they were submitted,
  with `Lambda-Runtime-Aws-Request-Id`, `Lambda-Runtime-Deadline-Ms` (now + the function's
  Timeout), `Lambda-Runtime-Invoked-Function-Arn` and `Lambda-Runtime-Trace-Id`; it blocks until
  there is one, as Lambda's does;
- `POST /2018-06-01/runtime/invocation/{id}/response`: the answer. Over Lambda's 6 MB limit for
  a synchronous response it is refused (413 `RequestEntityTooLarge`) and the invocation fails with
  `Function.ResponseSizeTooLarge`, as Lambda reports it to the caller;
- `POST /2018-06-01/runtime/invocation/{id}/error`: the handler raised;
- `POST /2018-06-01/runtime/init/error`: the handler could not be loaded; every waiting
  invocation then fails with it, as Lambda fails the invokes of an environment that cannot start.

A request for an unknown or already answered invocation is a 400, as Lambda answers it, and is
kept in `protocol_errors` for the tests to assert there are none.

`FunctionProcess` starts `python -m awslambdaric <handler>` in a fresh process with the
environment Lambda gives a function (and its telemetry descriptor: log records arrive framed,
one a frame, as Lambda receives them), and `HttpApiFront` plays API Gateway's HTTP API in front of
one (the public URL workers call back to)."""

from __future__ import annotations

import base64
import copy
import json
import os
import queue
import re
import signal
import subprocess
import threading
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import IO, Any
from urllib.parse import urlsplit

from infra.s3 import free_port

PREFIX = "/2018-06-01/runtime"
# Lambda's limit on a synchronous invocation's response (RAPID refuses a larger body).
MAX_RESPONSE_BYTES = 6 * 1024 * 1024
RESPONSE_TOO_LARGE = "Function.ResponseSizeTooLarge"


@dataclass
class Invocation:
    request_id: str
    event: bytes
    deadline_ms: int = 0
    done: threading.Event = field(default_factory=threading.Event)
    body: bytes | None = None  # the response, as posted
    error: dict[str, Any] | None = None  # errorType, errorMessage, stackTrace
    error_type_header: str | None = None

    @property
    def response(self) -> Any:
        assert self.error is None, f"invocation {self.request_id} failed: {self.error}"
        assert self.body is not None
        return json.loads(self.body)


class RuntimeApi:
    """The Runtime API of one execution environment (one invocation at a time)."""

    _NEXT = re.compile(rf"^{PREFIX}/invocation/next$")
    _ANSWER = re.compile(rf"^{PREFIX}/invocation/([^/]+)/(response|error)$")
    _INIT_ERROR = f"{PREFIX}/init/error"

    def __init__(self, function_arn: str, timeout_s: float) -> None:
        self.function_arn = function_arn
        self.timeout_s = timeout_s
        self.init_error: dict[str, Any] | None = None
        self.init_error_type: str | None = None
        self.init_failed = threading.Event()
        self.protocol_errors: list[str] = []
        self.served: list[Invocation] = []  # in the order they were handed to the function
        self._pending: queue.Queue[Invocation | None] = queue.Queue()
        self._in_flight: dict[str, Invocation] = {}
        self._lock = threading.Lock()
        api = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                api._get(self)

            def do_POST(self) -> None:
                api._post(self)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    @property
    def address(self) -> str:
        """host:port, as AWS_LAMBDA_RUNTIME_API names it."""
        host, port = self._server.server_address[:2]
        return f"{host!s}:{port}"

    def submit(self, event: Any) -> Invocation:
        """Queue an event (a JSON value, or raw bytes) for the function; answered in order."""
        body = event if isinstance(event, bytes) else json.dumps(event).encode()
        invocation = Invocation(str(uuid.uuid4()), body)
        with self._lock:
            if self.init_error is not None:
                self._fail_with_init_error(invocation)
                return invocation
            self._in_flight[invocation.request_id] = invocation
        self._pending.put(invocation)
        return invocation

    def close(self) -> None:
        self._pending.put(None)  # releases a waiting /next
        self._server.shutdown()
        self._server.server_close()

    # --- the endpoints ------------------------------------------------------------------------

    def _get(self, request: BaseHTTPRequestHandler) -> None:
        if not self._NEXT.match(request.path):
            self._reply(request, 404, {"errorType": "NotFound", "errorMessage": request.path})
            return
        invocation = self._pending.get()
        if invocation is None:  # shutting down: the process is about to be stopped
            self._pending.put(None)
            return
        invocation.deadline_ms = int((time.time() + self.timeout_s) * 1000)
        with self._lock:
            self.served.append(invocation)
        self._reply(request, 200, invocation.event, {
            "Lambda-Runtime-Aws-Request-Id": invocation.request_id,
            "Lambda-Runtime-Deadline-Ms": str(invocation.deadline_ms),
            "Lambda-Runtime-Invoked-Function-Arn": self.function_arn,
            "Lambda-Runtime-Trace-Id": f"Root=1-{int(time.time()):08x}-{uuid.uuid4().hex[:24]};Sampled=0",
        })

    def _post(self, request: BaseHTTPRequestHandler) -> None:
        body = read_body(request)
        if request.path == self._INIT_ERROR:
            with self._lock:
                self.init_error = json.loads(body)
                self.init_error_type = request.headers.get("Lambda-Runtime-Function-Error-Type")
                waiting = list(self._in_flight.values())
                self._in_flight.clear()
            for failed in waiting:
                self._fail_with_init_error(failed)
            self.init_failed.set()
            self._reply(request, 202, {"status": "OK"})
            return
        match = self._ANSWER.match(request.path)
        if match is None:
            self._reply(request, 404, {"errorType": "NotFound", "errorMessage": request.path})
            return
        request_id, kind = match.groups()
        with self._lock:
            # only the invocation handed out and not yet answered may be answered
            invocation = self._in_flight.get(request_id)
            if invocation is None or not any(served is invocation for served in self.served):
                self.protocol_errors.append(f"{kind} for unknown or answered invocation {request_id}")
                self._reply(request, 400, {"errorType": "InvalidRequestID",
                                           "errorMessage": f"Invalid request ID: {request_id}"})
                return
            del self._in_flight[request_id]
        if kind == "response" and len(body) > MAX_RESPONSE_BYTES:
            invocation.error = {"errorType": RESPONSE_TOO_LARGE,
                                "errorMessage": f"Response payload size ({len(body)} bytes) exceeded maximum "
                                                f"allowed payload size ({MAX_RESPONSE_BYTES} bytes)."}
            invocation.done.set()
            self._reply(request, 413, {"errorType": "RequestEntityTooLarge",
                                       "errorMessage": f"Exceeded maximum allowed payload size ({MAX_RESPONSE_BYTES} bytes)."})
            return
        if kind == "response":
            invocation.body = body
        else:
            invocation.error = json.loads(body)
            invocation.error_type_header = request.headers.get("Lambda-Runtime-Function-Error-Type")
        invocation.done.set()
        self._reply(request, 202, {"status": "OK"})

    def _fail_with_init_error(self, invocation: Invocation) -> None:
        invocation.error = {"errorType": "Runtime.InitError", "init": self.init_error}
        invocation.done.set()

    @staticmethod
    def _reply(request: BaseHTTPRequestHandler, status: int, body: Any,
               headers: Mapping[str, str] | None = None) -> None:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        request.send_response(status)
        request.send_header("Content-Type", "application/json")
        request.send_header("Content-Length", str(len(data)))
        for name, value in (headers or {}).items():
            request.send_header(name, value)
        request.end_headers()
        request.wfile.write(data)


def read_body(request: BaseHTTPRequestHandler) -> bytes:
    """The request's body, sized by Content-Length or sent in chunks."""
    if "chunked" in request.headers.get("Transfer-Encoding", "").lower():
        chunks: list[bytes] = []
        while True:
            size = int(request.rfile.readline().split(b";")[0].strip(), 16)
            if size == 0:
                while request.rfile.readline() not in (b"\r\n", b"\n", b""):
                    pass
                return b"".join(chunks)
            chunks.append(request.rfile.read(size))
            request.rfile.readline()
    return request.rfile.read(int(request.headers.get("Content-Length") or 0))


@dataclass(frozen=True)
class LogFrame:
    """One record as the runtime framed it: type 0xA55A00LF, L the level (0 none, 0x08 DEBUG,
    0x0C INFO, 0x10 WARN, 0x14 ERROR, 0x18 FATAL), F 2 for JSON and 3 for text."""

    frame_type: int
    message: str

    @property
    def is_json(self) -> bool:
        return self.frame_type & 0x3 == 0x2

    @property
    def level(self) -> str:
        return {0x08: "DEBUG", 0x0C: "INFO", 0x10: "WARN", 0x14: "ERROR", 0x18: "FATAL"}.get(
            self.frame_type & 0xFC, "NONE")


class FunctionProcess:
    """One execution environment: a fresh `python -m awslambdaric <handler>` whose working
    directory and first path entry are the unpacked artifact (Lambda's /var/task), then the
    runtime's own directory (awslambdaric, boto3: Lambda's /var/runtime). `-S`: no site-packages
    of the interpreter, so nothing of this checkout or its virtualenv can be imported."""

    def __init__(self, python: str, handler: str, task_root: Path, runtime_dir: Path,
                 environment: Mapping[str, str], api: RuntimeApi, log_path: Path) -> None:
        self.api = api
        self.handler = handler
        self.log_path = log_path
        self.frames: list[LogFrame] = []  # what the runtime sent through the telemetry descriptor
        # Lambda hands the runtime a descriptor for framed log records (one frame per record,
        # its level and format in the frame type); stdout and stderr are captured beside it.
        read_end, write_end = os.pipe()
        env = {**environment, "AWS_LAMBDA_RUNTIME_API": api.address, "_HANDLER": handler,
               "LAMBDA_TASK_ROOT": str(task_root), "LAMBDA_RUNTIME_DIR": str(runtime_dir),
               "PYTHONPATH": str(runtime_dir), "_LAMBDA_TELEMETRY_LOG_FD": str(write_end)}
        self._log: IO[bytes] = open(log_path, "wb")  # noqa: SIM115 (closed by stop())
        try:
            self.process = subprocess.Popen([python, "-S", "-m", "awslambdaric", handler], cwd=task_root, env=env,
                                            stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT,
                                            pass_fds=(write_end,), start_new_session=True)
        finally:
            os.close(write_end)
        self._frames_done = threading.Thread(target=self._read_frames, args=(read_end,), daemon=True)
        self._frames_done.start()

    def _read_frames(self, fd: int) -> None:
        with os.fdopen(fd, "rb") as stream:
            while len(header := stream.read(16)) == 16:
                length = int.from_bytes(header[4:8], "big")
                self.frames.append(LogFrame(int.from_bytes(header[:4], "big"), stream.read(length).decode()))

    def logs(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def invoke(self, event: Any, timeout_s: float = 60.0) -> Invocation:
        """Submit an event and wait for its answer (or for the process to die)."""
        invocation = self.api.submit(event)
        deadline = time.monotonic() + timeout_s
        while not invocation.done.wait(0.05):
            if self.process.poll() is not None:
                invocation.done.wait(1.0)  # an answer posted just before exiting
                break
            if time.monotonic() > deadline:
                break
        assert invocation.done.is_set(), (f"no answer to invocation {invocation.request_id} "
                                          f"(exit code {self.process.poll()}); log:\n{self.logs()[-5000:]}")
        return invocation

    def wait_exit(self, timeout_s: float = 30.0) -> int:
        return self.process.wait(timeout=timeout_s)

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)  # our own session: only what we started
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=10)
        self.api.close()
        self._frames_done.join(timeout=10)  # the process is gone: its end of the pipe is closed
        self._log.close()


class HttpApiFront:
    """API Gateway's HTTP API (payload format 2.0) in front of a function: each HTTP request
    becomes an event made from `template` (a recorded event), the function's answer becomes the
    HTTP response. Requests reach the function one at a time (one execution environment)."""

    def __init__(self, function: FunctionProcess, template: dict[str, Any]) -> None:
        self.function = function
        self.template = template
        self.requests: list[tuple[str, str, int]] = []  # method, path, status
        front = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                front._forward(self)

            do_POST = do_PUT = do_DELETE = do_PATCH = do_GET

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    def event(self, method: str, path: str, *, headers: Mapping[str, str] | None = None,
              body: bytes | str | None = None, query: str = "") -> dict[str, Any]:
        event = copy.deepcopy(self.template)
        event["rawPath"] = event["requestContext"]["http"]["path"] = path
        event["requestContext"]["http"]["method"] = method
        event["requestContext"]["requestId"] = uuid.uuid4().hex[:16]
        event["rawQueryString"] = query
        event["headers"].update({name.lower(): value for name, value in (headers or {}).items()})
        if body:
            raw = body.encode() if isinstance(body, str) else body
            event["body"] = base64.b64encode(raw).decode()
            event["isBase64Encoded"] = True
        return event

    def _forward(self, request: BaseHTTPRequestHandler) -> None:
        parts = urlsplit(request.path)
        headers = {name: value for name, value in request.headers.items()
                   if name.lower() not in ("content-length", "transfer-encoding", "connection")}
        event = self.event(request.command, parts.path, headers=headers, body=read_body(request), query=parts.query)
        invocation = self.function.invoke(event)
        if invocation.error is not None:
            # HTTP API answers a failed integration with 500 {"message": "Internal Server Error"}
            status, answer_headers, data = 500, {"content-type": "application/json"}, b'{"message":"Internal Server Error"}'
        else:
            answer = invocation.response
            status = int(answer["statusCode"])
            answer_headers = dict(answer.get("headers") or {})
            raw = answer.get("body") or ""
            data = base64.b64decode(raw) if answer.get("isBase64Encoded") else raw.encode()
        self.requests.append((request.command, parts.path, status))
        request.send_response(status)
        for name, value in answer_headers.items():
            if name.lower() not in ("content-length", "transfer-encoding", "connection"):
                request.send_header(name, value)
        request.send_header("Content-Length", str(len(data)))
        request.end_headers()
        request.wfile.write(data)

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
