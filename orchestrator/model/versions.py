"""Data-version names: the one rule every entry point applies (pipeline definitions, triggers,
orchestrations, backfills, event-started runs).

A version name becomes a path segment of S3 keys (`runs/.../{version}/nodes/...`) and of the
resource of an STS session policy, so it must not be able to mean anything there: no `/`, no
`*` (a policy wildcard), no `.` or `..` (a relative segment), no whitespace. It starts with a
letter or digit, which rules out `.`, `..` and hidden-file-looking names in one stroke.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

__all__ = [
    "MAX_VERSIONS",
    "VERSION_PATTERN",
    "VERSION_RULE",
    "is_version_name",
    "version_list_problems",
    "version_name_problem",
]

# Anchored for JSON Schema readers; Python code matches it with fullmatch, never `match`: `$`
# also matches before a trailing newline, which is how "v1\n" used to get through.
VERSION_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$"
VERSION_RULE = "use 1 to 128 letters, digits, '.', '_', ':' or '-', starting with a letter or digit"
# Versions per run, per definition and per backfill: each is a task per node.
MAX_VERSIONS = 1000

_VERSION_RE = re.compile(VERSION_PATTERN)


def is_version_name(value: object) -> bool:
    return isinstance(value, str) and _VERSION_RE.fullmatch(value) is not None


def version_name_problem(value: object) -> str | None:
    """Why `value` is not a valid version name, or None when it is one."""
    if is_version_name(value):
        return None
    if not isinstance(value, str):
        return f"{_shown(value)} is not a valid version name: it must be a string ({VERSION_RULE})"
    return f"{_shown(value)} is not a valid version name: {VERSION_RULE}"


def _shown(value: object) -> str:
    # repr shows what is wrong (a trailing "\n", a "/"); a huge value is cut to keep errors small.
    text = repr(value)
    return text if len(text) <= 80 else f"{text[:60]}... ({len(text)} characters)"


def version_list_problems(versions: Sequence[object], path: str = "versions") -> list[tuple[str, str]]:
    """Every problem of a list of version names as (path, message), e.g.
    `("versions[1]", "'..' is not a valid version name: ...")`; empty when the list is good.

    A good list is non-empty, at most MAX_VERSIONS long, and holds distinct valid names.
    """
    if not versions:
        return [(path, "at least one version is required (leave the field out for the pipeline's own versions)")]
    if len(versions) > MAX_VERSIONS:
        return [(path, f"at most {MAX_VERSIONS} versions are allowed, got {len(versions)}")]
    problems: list[tuple[str, str]] = []
    first_seen: dict[str, int] = {}
    for index, value in enumerate(versions):
        where = f"{path}[{index}]"
        problem = version_name_problem(value)
        if problem is not None:
            problems.append((where, problem))
            continue
        assert isinstance(value, str)
        if value in first_seen:
            problems.append((where, f"version {value!r} is listed more than once (first at {path}[{first_seen[value]}])"))
        else:
            first_seen[value] = index
    return problems
