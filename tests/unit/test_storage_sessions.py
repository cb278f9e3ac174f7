"""The per-process cache of assumed-role sessions (orchestrator.storage.sessions)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import pytest

from orchestrator.storage.sessions import SessionCache, partition_of


def _assumer(lifetime_s: float, calls: list[int]) -> Callable[[], dict[str, object]]:
    def assume() -> dict[str, object]:
        calls.append(1)
        n = len(calls)
        return {"AccessKeyId": f"ASIA{n}", "SecretAccessKey": "s", "SessionToken": "t",
                "Expiration": datetime.now(UTC) + timedelta(seconds=lifetime_s)}
    return assume


def test_a_session_is_reused_while_it_has_the_time_asked_for_then_replaced() -> None:
    cache, calls = SessionCache(), list[int]()
    first = cache.get("run-1", 600, _assumer(3600, calls))
    assert cache.get("run-1", 600, _assumer(3600, calls)) is first
    # A task that needs more than the session has left gets a new one.
    second = cache.get("run-1", 3600, _assumer(3600, calls))
    assert second is not first and second.credentials["AccessKeyId"] == "ASIA2"
    assert 3590 < second.remaining_s() <= 3600
    # Another scope never gets this one.
    assert cache.get("run-2", 1, _assumer(3600, calls)).credentials["AccessKeyId"] == "ASIA3"
    assert len(calls) == cache.assumed == 3


def test_a_failed_assume_caches_nothing() -> None:
    cache, calls = SessionCache(), list[int]()

    def refused() -> dict[str, object]:
        raise RuntimeError("PackedPolicyTooLarge")

    with pytest.raises(RuntimeError):
        cache.get("s", 1, refused)
    assert cache.get("s", 1, _assumer(900, calls)).credentials["AccessKeyId"] == "ASIA1"


def test_threads_asking_for_one_scope_at_once_make_one_assume_role() -> None:
    cache, calls = SessionCache(), list[int]()
    threads_n = 8
    barrier = threading.Barrier(threads_n)
    slow = _assumer(3600, calls)

    arrived = threading.Semaphore(0)

    def assume() -> dict[str, object]:
        # The STS round trip lasts until every other thread has come to ask (each is then
        # inside cache.get, or about to be: it finds the session this call stores).
        for _ in range(threads_n - 1):
            assert arrived.acquire(timeout=10), "the other threads never came to ask"
        return slow()

    got: list[str] = []

    def ask() -> None:
        barrier.wait()
        arrived.release()
        got.append(cache.get("run", 60, assume).credentials["AccessKeyId"])

    workers = [threading.Thread(target=ask) for _ in range(threads_n)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert len(calls) == 1 and got == ["ASIA1"] * threads_n


def test_the_cache_is_bounded() -> None:
    cache, calls = SessionCache(max_sessions=2), list[int]()
    for scope in ("a", "b", "c"):
        cache.get(scope, 1, _assumer(900, calls))
    cache.get("a", 1, _assumer(900, calls))  # evicted: assumed again
    assert len(calls) == 4


@pytest.mark.parametrize(("arn", "partition"), [
    ("arn:aws:iam::123456789012:role/x", "aws"),
    ("arn:aws-cn:iam::123456789012:role/x", "aws-cn"),
    ("arn:aws-us-gov:iam::123456789012:role/x", "aws-us-gov"),
])
def test_partition_of(arn: str, partition: str) -> None:
    assert partition_of(arn) == partition
