"""Per-attempt task logs: what a task function logs and prints while it runs, kept per task.

Tasks of one worker process run at the same time on threads (the local worker, the HTTP
service, an SQS batch), all sharing one `sys.stdout`, one `sys.stderr` and one root logger. So
the capture is routed by a context variable, not by swapping streams per task:

- `sys.stdout` and `sys.stderr` are wrapped once (`install`) in a tee: every write still goes
  to the real stream (a `make dev` user keeps seeing it), and is also appended to the log of the
  task running in the current context, if any;
- one handler on the root logger formats each record (time, level, logger, message and any
  traceback) into the current task's log, if any, and does nothing otherwise.

A thread the task starts itself begins with an empty context (Python's rule for new threads),
so its output reaches the real streams but not the task's log, unless it is started with
`contextvars.copy_context().run`.

The log is capped (`LOG_CAP_BYTES`): the first part is kept and a marker line says how many
bytes were dropped, so the stored object is never larger than the cap.
"""

from __future__ import annotations

import contextvars
import logging
import re
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import IO, Any

__all__ = ["LOG_CAP_BYTES", "TASK_LOGGER", "LogUploader", "TaskLog", "capturing", "install"]

# 1 MiB: a log is for reading, and the whole object is uploaded again at every flush (S3 has
# no append), so a chatty task must not turn each heartbeat into a large upload.
LOG_CAP_BYTES = 1024 * 1024
# The parent of every task's `ctx.log` (`tickweave.task.<task name>`).
TASK_LOGGER = "tickweave.task"
# Room kept at the end of a truncated log for its marker line (at most ~55 bytes).
_MARKER_ROOM = 64
# Loggers of the HTTP and AWS clients the SDK itself uses inside the task's context: below
# WARNING they log requests, and a request line may carry a presigned URL (a credential).
_CLIENT_LOGGERS = ("httpx", "httpcore", "botocore", "boto3", "urllib3", "s3transfer")
# The signature and session token of a presigned URL, wherever one ends up in the log.
_SIGNED_PARAM = re.compile(r"(X-Amz-(?:Signature|Security-Token|Credential)=)[^&\s\"'<>]+", re.IGNORECASE)

_current: contextvars.ContextVar[TaskLog | None] = contextvars.ContextVar("tickweave_task_log", default=None)
# Set while a tee writes to the stream it wraps: a tee found further down (one wrapped by
# whatever wrapped ours) then passes the text through without capturing it a second time.
_passing = threading.local()
_install_lock = threading.Lock()
_log = logging.getLogger("tickweave.worker")


class TaskLog:
    """One attempt's log: text appended from any thread, capped; `changed` tells the flusher
    whether there is anything new to upload."""

    def __init__(self, cap_bytes: int = LOG_CAP_BYTES) -> None:
        if cap_bytes <= _MARKER_ROOM:
            raise ValueError(f"a log cap must be more than {_MARKER_ROOM} bytes")
        self._cap = cap_bytes
        self._buffer = bytearray()
        self._dropped = 0
        self._version = 0
        self._lock = threading.Lock()

    def write(self, text: str) -> None:
        if not text:
            return
        if "X-Amz-" in text or "x-amz-" in text:
            text = _SIGNED_PARAM.sub(r"\1[redacted]", text)
        data = text.encode("utf-8", errors="replace")
        with self._lock:
            room = self._cap - len(self._buffer)
            if room >= len(data):
                self._buffer += data
            else:
                # Keep the first part: the start of a runaway log says what set it off.
                self._buffer += data[:max(room, 0)]
                self._dropped += len(data) - max(room, 0)
            self._version += 1

    @property
    def version(self) -> int:
        """Grows with every write: equal versions mean the same content."""
        with self._lock:
            return self._version

    @property
    def dropped(self) -> int:
        """Bytes written past the cap (not counting what the marker displaces)."""
        with self._lock:
            return self._dropped

    def snapshot(self) -> tuple[int, bytes]:
        """(version, the log as stored): the first part and, when it was cut, a marker line
        `[log truncated: N bytes dropped]`, all within the cap."""
        with self._lock:
            version, data, dropped = self._version, bytes(self._buffer), self._dropped
        if not dropped:
            return version, data
        keep = _utf8_boundary(data, self._cap - _MARKER_ROOM)
        dropped += len(data) - keep
        marker = f"\n[log truncated: {dropped} bytes dropped]\n".encode()
        return version, data[:keep] + marker


def _utf8_boundary(data: bytes, limit: int) -> int:
    """The largest length <= limit that does not cut a UTF-8 character in two."""
    if limit >= len(data):
        return len(data)
    end = limit
    # Continuation bytes are 0b10xxxxxx: step back to the start of the character they belong to.
    while end > 0 and (data[end] & 0xC0) == 0x80:
        end -= 1
    return end


@contextmanager
def capturing(task_log: TaskLog) -> Iterator[TaskLog]:
    """Route this context's prints and log records to `task_log` for the block."""
    install()
    token = _current.set(task_log)
    try:
        yield task_log
    finally:
        _current.reset(token)


def install() -> None:
    """Wrap sys.stdout/sys.stderr in tees and add the capture handler to the root logger, once
    (again if something replaced a stream since, as pytest does between tests)."""
    with _install_lock:
        for name in ("stdout", "stderr"):
            stream = getattr(sys, name)
            if stream is not None and not isinstance(stream, _Tee):
                setattr(sys, name, _Tee(stream))
        root = logging.getLogger()
        if not any(isinstance(handler, _CaptureHandler) for handler in root.handlers):
            root.addHandler(_CaptureHandler())
        # `ctx.log.info(...)` is what a task's log is for; Python's default (WARNING, when the
        # process configured no logging) would drop it before any handler sees it. A level set
        # on the logger, or a lower one inherited (DEBUG), is left alone.
        task_logger = logging.getLogger(TASK_LOGGER)
        if task_logger.level == logging.NOTSET and task_logger.getEffectiveLevel() > logging.INFO:
            task_logger.setLevel(logging.INFO)


def _from_stream_handler() -> bool:
    """Whether the write being made comes from logging's StreamHandler.emit: a record that the
    capture handler already put in the log, printed by a handler whose stream is our tee."""
    try:
        caller = sys._getframe(2)
    except ValueError:  # written from C with no Python caller (the interpreter's own traceback)
        return False
    return caller.f_code is _STREAM_HANDLER_EMIT


_STREAM_HANDLER_EMIT = logging.StreamHandler.emit.__code__


class _Tee:
    """A text stream that writes through to the stream it wraps and copies the text into the
    current task's log. Everything else (encoding, fileno, buffer, isatty...) is the wrapped
    stream's."""

    def __init__(self, stream: IO[str]) -> None:
        self._stream = stream

    def write(self, text: str) -> int:
        task_log = _current.get()
        if (task_log is not None and isinstance(text, str) and not getattr(_passing, "active", False)
                and not _from_stream_handler()):
            task_log.write(text)
        outer = getattr(_passing, "active", False)
        _passing.active = True
        try:
            return self._stream.write(text)
        finally:
            _passing.active = outer

    def writelines(self, lines: Iterable[str]) -> None:
        for line in lines:
            self.write(line)

    def flush(self) -> None:
        self._stream.flush()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


class _Formatter(logging.Formatter):
    """`2024-05-01T12:00:00.123Z INFO tickweave.task.parse: message` (UTC), then any traceback."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s.%(msecs)03dZ %(levelname)s %(name)s: %(message)s", "%Y-%m-%dT%H:%M:%S")
        # UTC: workers and readers are rarely in one time zone.
        self.converter = time.gmtime


class _CaptureHandler(logging.Handler):
    """On the root logger: a record logged in a task's context goes to that task's log."""

    def __init__(self) -> None:
        super().__init__(logging.NOTSET)
        self.setFormatter(_Formatter())

    def emit(self, record: logging.LogRecord) -> None:
        task_log = _current.get()
        if task_log is not None and not (record.levelno < logging.WARNING and _is_client_logger(record.name)):
            try:
                task_log.write(self.format(record) + "\n")
            except Exception:
                self.handleError(record)
        self._last_resort(record)

    def handle(self, record: logging.LogRecord) -> bool:
        # Not Handler.handle: no lock is needed (TaskLog locks), and a record is always offered
        # to emit, which decides per context.
        self.emit(record)
        return True

    def _last_resort(self, record: logging.LogRecord) -> None:
        """Keep logging's fallback: with no handler of its own, Python prints WARNING and above
        to stderr (`logging.lastResort`). Being on the root logger, this handler would silence
        that in a process that configured no logging; so when it is the only handler a record
        reaches, the fallback gets the record as before."""
        fallback = logging.lastResort
        if fallback is None or record.levelno < fallback.level:
            return
        logger: logging.Logger | None = logging.getLogger(record.name)
        while logger is not None:
            if any(handler is not self for handler in logger.handlers):
                return
            if not logger.propagate:
                break
            logger = logger.parent
        fallback.handle(record)


def _is_client_logger(name: str) -> bool:
    return any(name == client or name.startswith(client + ".") for client in _CLIENT_LOGGERS)


class LogUploader:
    """Stores a TaskLog with `write` (the grant's PUT of the whole log): on heartbeats when it
    changed, and once more at the end. Uploads are serialised, each of the content at its
    start, so the last one to finish is never older than one before it. A failed upload is
    logged, never raised: a task does not fail because its log could not be stored."""

    def __init__(self, task_log: TaskLog, write: Callable[[bytes], None], *, what: str) -> None:
        self._log = task_log
        self._write = write
        self._what = what
        self._lock = threading.Lock()
        self._stored: int | None = None  # the version stored last; None before the first
        self._warned = False

    @property
    def task_log(self) -> TaskLog:
        return self._log

    def flush(self, *, final: bool = False) -> bool:
        """Upload the log if it changed since the last upload (at the end, also an empty log
        never uploaded: a finished attempt that said nothing has an empty log, not none).
        Whether the stored log is now the current one."""
        with self._lock:
            version, body = self._log.snapshot()
            if version == self._stored or (version == 0 and not final):
                return True
            try:
                self._write(body)
            except Exception as exc:
                # Once at WARNING per attempt; a store that is down would otherwise add a line
                # per heartbeat.
                level = logging.DEBUG if self._warned and not final else logging.WARNING
                _log.log(level, "storing the log of %s failed (%s: %s); the task goes on",
                         self._what, type(exc).__name__, exc)
                self._warned = True
                return False
            self._stored = version
            return True
