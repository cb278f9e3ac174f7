"""The per-task capture of the worker SDK (orchestrator.worker.task_log): prints and log records
routed to the log of the task running in the current context, tee'd to the real streams, capped
with a marker. The end-to-end path (S3, the API) is in tests/integration/test_task_logs.py."""

from __future__ import annotations

import logging
import sys
import threading
from typing import Any

import pytest

from orchestrator.worker.task_log import LOG_CAP_BYTES, LogUploader, TaskLog, capturing


def _text(task_log: TaskLog) -> str:
    return task_log.snapshot()[1].decode()


def test_concurrent_tasks_each_get_their_own_prints_and_records_and_the_console_gets_both(
    capsys: pytest.CaptureFixture[str],
) -> None:
    logs = {"a": TaskLog(), "b": TaskLog()}
    barrier = threading.Barrier(2, timeout=10)

    def task(name: str) -> None:
        with capturing(logs[name]):
            # Interleaved on purpose: each step of one task happens while the other is in the
            # same step.
            for step in range(3):
                barrier.wait()
                print(f"print {step} from {name}")
                logging.getLogger(f"user.{name}").warning("record %d from %s", step, name)
                sys.stderr.write(f"stderr {step} from {name}\n")

    threads = [threading.Thread(target=task, args=(name,)) for name in logs]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=20)
    print("outside any task")

    for name, other in (("a", "b"), ("b", "a")):
        text = _text(logs[name])
        for step in range(3):
            assert f"print {step} from {name}\n" in text
            assert f"stderr {step} from {name}\n" in text
            assert f" WARNING user.{name}: record {step} from {name}\n" in text
        assert f"from {other}" not in text
        assert "outside any task" not in text
    console = capsys.readouterr()
    # The tee: what the tasks printed still reached the process's own streams.
    assert "print 2 from a" in console.out and "print 2 from b" in console.out and "outside any task" in console.out
    assert "stderr 1 from b" in console.err


def test_a_record_printed_by_a_stream_handler_on_the_tee_is_in_the_log_once() -> None:
    task_log = TaskLog()
    with capturing(task_log):
        # A handler created after the tee was installed holds the tee as its stream.
        handler = logging.StreamHandler(sys.stderr)
        logger = logging.getLogger("user.twice")
        logger.addHandler(handler)
        try:
            logger.warning("said once")
        finally:
            logger.removeHandler(handler)
    assert _text(task_log).count("said once") == 1


def test_record_lines_carry_time_level_logger_and_the_traceback() -> None:
    task_log = TaskLog()
    with capturing(task_log):
        try:
            raise ValueError("boom")
        except ValueError:
            logging.getLogger("tickweave.task.demo").exception("it failed")
        logging.getLogger("tickweave.task.demo").info("an info line")
    lines = _text(task_log).splitlines()
    assert lines[0].endswith(" ERROR tickweave.task.demo: it failed")
    assert lines[0][:24].endswith("Z") and lines[0][10] == "T"  # 2024-05-01T12:00:00.123Z
    assert "Traceback (most recent call last):" in lines
    assert "ValueError: boom" in lines
    # A task's ctx.log records INFO even where the process configured no logging.
    assert lines[-1].endswith(" INFO tickweave.task.demo: an info line")


def test_nothing_is_captured_outside_a_task_and_the_log_stops_at_the_end_of_the_block() -> None:
    task_log = TaskLog()
    print("before")
    with capturing(task_log):
        print("during")
    print("after")
    logging.getLogger("user.after").warning("after too")
    assert _text(task_log) == "during\n"


def test_the_cap_keeps_the_first_part_and_says_how_much_was_dropped() -> None:
    cap = 1000
    task_log = TaskLog(cap)
    for index in range(50):
        task_log.write(f"line {index:03d} " + "x" * 40 + "\n")  # 50 bytes each, 2,500 in all
    body = task_log.snapshot()[1]
    assert len(body) <= cap
    text = body.decode()
    assert text.startswith("line 000 ")
    kept, marker = text.rsplit("\n[log truncated: ", 1)
    dropped = int(marker.removesuffix(" bytes dropped]\n"))
    assert len(kept.encode()) + dropped == 2500
    assert "line 049" not in text


def test_the_cap_never_cuts_a_character_in_two() -> None:
    task_log = TaskLog(100)
    task_log.write("é" * 200)  # 400 bytes of two-byte characters
    body = task_log.snapshot()[1]
    text = body.decode("utf-8")  # would raise on half a character
    assert text.startswith("é" * 10) and "[log truncated:" in text


def test_the_default_cap_is_one_mebibyte() -> None:
    assert LOG_CAP_BYTES == 1024 * 1024


def test_presigned_url_signatures_are_redacted() -> None:
    task_log = TaskLog()
    with capturing(task_log):
        print("GET https://s3/b/k?X-Amz-Credential=AKIA%2F1&X-Amz-Signature=abc123&X-Amz-Security-Token=tok")
    text = _text(task_log)
    assert "abc123" not in text and "tok" not in text and "AKIA" not in text
    assert "X-Amz-Signature=[redacted]" in text


def test_the_uploader_stores_only_changes_and_a_failure_never_raises(caplog: pytest.LogCaptureFixture) -> None:
    stored: list[bytes] = []
    failing = {"on": False}

    def write(body: bytes) -> None:
        if failing["on"]:
            raise ConnectionError("store unreachable")
        stored.append(body)

    task_log = TaskLog()
    uploader = LogUploader(task_log, write, what="task t attempt 1")
    assert uploader.flush() and stored == []  # nothing yet: no upload while running
    task_log.write("one\n")
    assert uploader.flush() and uploader.flush()
    assert stored == [b"one\n"]
    failing["on"] = True
    task_log.write("two\n")
    with caplog.at_level(logging.WARNING, logger="tickweave.worker"):
        assert uploader.flush() is False
    assert "storing the log of task t attempt 1 failed" in caplog.text
    failing["on"] = False
    assert uploader.flush(final=True)
    assert stored[-1] == b"one\ntwo\n"


def test_a_silent_task_stores_an_empty_log_at_the_end() -> None:
    stored: list[bytes] = []
    uploader = LogUploader(TaskLog(), stored.append, what="t")
    uploader.flush()
    assert stored == []
    uploader.flush(final=True)
    assert stored == [b""]


def test_a_warning_still_reaches_stderr_in_a_process_without_logging_configured(
    capsys: pytest.CaptureFixture[str], monkeypatch: Any,
) -> None:
    # The capture handler sits on the root logger; with no other handler anywhere, Python's
    # last-resort handler must still print a warning, as it did before the SDK was imported.
    root = logging.getLogger()
    monkeypatch.setattr(root, "handlers", [h for h in root.handlers if type(h).__name__ == "_CaptureHandler"])
    with capturing(TaskLog()):
        pass  # installs the handler
    assert [type(h).__name__ for h in root.handlers] == ["_CaptureHandler"]
    logging.getLogger("user.lonely").warning("nobody configured logging")
    assert "nobody configured logging" in capsys.readouterr().err
