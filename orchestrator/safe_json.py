"""Reading JSON from strangers: every way `json.loads`, or a value it hands back, can hurt later,
refused up front with a message a person can act on.

`json.loads` alone raises RecursionError on deep nesting (`[[[[...]]]]` a few thousand deep),
ValueError on an integer past Python's int-string limit (4300 digits), reads `NaN` and
`Infinity` (not JSON; Postgres' jsonb refuses them) and `1e400` (an infinite float), and keeps
a lone surrogate (`"\\ud800"`) as a str that cannot be encoded to UTF-8, so the database driver
fails on it much later. `loads` refuses the first four; `shape_problem` finds deep nesting,
too many values, lone surrogates and integers too long to write back out in any parsed value
(JSON or YAML: YAML reads `0x...` integers past the decimal limit).

No third-party imports: the API reads every request body through this module.
"""

from __future__ import annotations

import json
import math
import sys
from typing import Any

# Python's own int-string limit (sys.int_info.default_max_str_digits); 0 means "no limit".
MAX_INT_DIGITS = sys.get_int_max_str_digits() or 4300
# An int of at most this many bits has at most MAX_INT_DIGITS decimal digits (2**bits < 10**digits).
# YAML reads 0x..., 0o..., 0b... and 1:59:59 without the decimal limit, so the walk checks bits.
_MAX_INT_BITS = math.floor(MAX_INT_DIGITS * math.log2(10))


class UnsafeJson(ValueError):
    """The text is not JSON this service reads; the message says why."""


def loads(text: str | bytes) -> Any:
    """`json.loads` that raises only UnsafeJson (invalid JSON, NaN/Infinity, an infinite float,
    an integer of more than MAX_INT_DIGITS digits, nesting deeper than the interpreter allows)."""
    try:
        return json.loads(text, parse_int=_parse_int, parse_float=_parse_float, parse_constant=_parse_constant)
    except json.JSONDecodeError as exc:
        raise UnsafeJson(f"invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}") from None
    except UnicodeDecodeError as exc:
        raise UnsafeJson(f"not valid UTF-8 (byte {exc.start})") from None
    except RecursionError:
        raise UnsafeJson("nested too deeply") from None


def _parse_int(text: str) -> int:
    digits = len(text) - text.startswith("-")
    if digits > MAX_INT_DIGITS:
        raise UnsafeJson(f"an integer has {digits} digits; at most {MAX_INT_DIGITS} are read")
    return int(text)


def _parse_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        shown = text if len(text) <= 40 else text[:37] + "..."
        raise UnsafeJson(f"the number {shown} is too large (numbers must be finite)")
    return value


def _parse_constant(name: str) -> Any:
    raise UnsafeJson(f"{name} is not a JSON value (numbers must be finite)")


def shape_problem(value: Any, what: str, *, max_depth: int, max_values: int | None = None) -> str | None:
    """Why `value` must be refused, or None: nested deeper than `max_depth`, more than
    `max_values` values (counting a shared subtree once per reference, so YAML aliases count as
    expanded), or a string or key holding a lone surrogate. Iterative, and it stops at the
    first problem, so its cost is bounded by the limits, not by the value."""
    # Each entry: (value, depth, parent entry's location, key or index) - the path of a problem
    # is built only when one is found.
    stack: list[tuple[Any, int, Any]] = [(value, 1, None)]
    count = 0
    while stack:
        item, depth, where = stack.pop()
        count += 1
        if max_values is not None and count > max_values:
            return f"{what} is too large (more than {max_values} values once expanded)"
        if depth > max_depth:
            return f"{what} is nested too deeply (more than {max_depth} levels)"
        if isinstance(item, str):
            if _lone_surrogate(item):
                return f"{what} holds a string with a lone surrogate (not valid Unicode) at {_path(where)}"
        elif isinstance(item, int):
            if item.bit_length() > _MAX_INT_BITS:
                return f"{what} holds an integer of more than {MAX_INT_DIGITS} digits at {_path(where)}"
        elif isinstance(item, dict):
            for key, child in item.items():
                if isinstance(key, str) and _lone_surrogate(key):
                    return f"{what} holds a key with a lone surrogate (not valid Unicode) at {_path(where)}"
                stack.append((child, depth + 1, (where, key)))
        elif isinstance(item, list | tuple | set | frozenset):
            stack.extend((child, depth + 1, (where, i)) for i, child in enumerate(item))
    return None


def _lone_surrogate(text: str) -> bool:
    if text.isascii():
        return False
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _path(where: Any) -> str:
    parts: list[Any] = []
    while where is not None:
        where, part = where
        parts.append(part)
    path = ""
    for part in reversed(parts):
        if isinstance(part, int):
            path += f"[{part}]"
        else:
            shown = ascii(part)[1:-1] if isinstance(part, str) else repr(part)
            path = f"{path}.{shown}" if path else shown
    return path or "(root)"
