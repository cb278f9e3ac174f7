"""STS sessions the orchestrator reuses across tasks, and the partition of a role's ARN.

One AssumeRole per dispatched task spends an account-wide STS quota and adds a round trip to
every dispatch (issue 15). Sessions are kept here per scope instead, keyed by the exact session
policy they were assumed with (None for the signer: the role's own permissions), and reused
while their expiry leaves the time a task needs; a task never receives a session assumed for
another policy. No boto3 import: the caller passes the function that calls STS.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime

__all__ = ["CachedSession", "SessionCache", "partition_of"]

# Sessions kept at most (LRU): a run's credential sessions outlive the run by at most their
# duration anyway; this bounds memory in a long-lived process serving many runs.
_MAX_SESSIONS = 512


def partition_of(role_arn: str) -> str:
    """The partition of an ARN (`aws`, `aws-cn`, `aws-us-gov`, `aws-iso`, ...): the second of its
    colon-separated fields. Policies and ARNs built for that role use the same partition; `arn:aws`
    in a policy for a China or GovCloud role names resources that do not exist there."""
    parts = role_arn.split(":")
    if len(parts) < 6 or parts[0] != "arn" or not parts[1]:
        raise ValueError(f"{role_arn!r} is not an ARN (arn:PARTITION:service:region:account:resource)")
    return parts[1]


@dataclass(frozen=True)
class CachedSession:
    """Credentials of one AssumeRole (STS shape, `Expiration` as ISO text) and when they expire."""

    credentials: Mapping[str, str]
    expires_at: float  # unix seconds

    def remaining_s(self, now: float | None = None) -> float:
        return self.expires_at - (time.time() if now is None else now)


class SessionCache:
    """Assumed-role sessions by scope, reused while they have `min_remaining_s` left.

    Thread-safe, and single-flight per scope: the dispatcher's threads asking for the same scope
    at once make one AssumeRole, not one each."""

    def __init__(self, max_sessions: int = _MAX_SESSIONS) -> None:
        self._lock = threading.Lock()
        self._scope_locks: dict[object, threading.Lock] = {}
        self._sessions: OrderedDict[object, CachedSession] = OrderedDict()
        self._max = max_sessions
        self.assumed = 0  # AssumeRole calls made through this cache (for logs and tests)

    def get(
        self, scope: object, min_remaining_s: float, assume: Callable[[], Mapping[str, object]],
    ) -> CachedSession:
        """The session of `scope` if it has more than `min_remaining_s` left, else a new one from
        `assume()` (an STS `Credentials` mapping: AccessKeyId, SecretAccessKey, SessionToken,
        Expiration as a datetime). Exceptions of `assume` propagate and nothing is cached."""
        with self._lock:
            scope_lock = self._scope_locks.setdefault(scope, threading.Lock())
        with scope_lock:
            with self._lock:
                cached = self._sessions.get(scope)
                if cached is not None and cached.remaining_s() > min_remaining_s:
                    self._sessions.move_to_end(scope)
                    return cached
            raw = assume()
            expiration = raw["Expiration"]
            if not isinstance(expiration, datetime):
                raise TypeError("STS credentials without an Expiration datetime")
            session = CachedSession(
                credentials={
                    "AccessKeyId": str(raw["AccessKeyId"]),
                    "SecretAccessKey": str(raw["SecretAccessKey"]),
                    "SessionToken": str(raw["SessionToken"]),
                    "Expiration": expiration.isoformat(),
                },
                expires_at=expiration.timestamp(),
            )
            with self._lock:
                self.assumed += 1
                self._sessions[scope] = session
                self._sessions.move_to_end(scope)
                while len(self._sessions) > self._max:
                    old, _ = self._sessions.popitem(last=False)
                    self._scope_locks.pop(old, None)
            return session

    def clear(self) -> None:
        with self._lock:
            self._sessions.clear()
            self._scope_locks.clear()
