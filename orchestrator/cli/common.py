"""What every command module shares: exit codes, `CliError`, output formatting, the API
client built from `--url`/`--api-key` (or TICKWEAVE_URL / TICKWEAVE_API_KEY), error
reporting, argument types and the parent parsers for the shared options.

Command modules import this module and nothing of each other (orchestrator/cli/__init__.py
assembles them), so a command is found by its group's module.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, TextIO
from urllib.parse import quote

from orchestrator.client import ApiError, ClientError, TickweaveClient, resolve_url

if TYPE_CHECKING:
    from orchestrator.engine.service import Engine

    # What `add_subparsers` returns: each command module adds its commands to it.
    Subparsers = argparse._SubParsersAction[argparse.ArgumentParser]

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_NOT_FOUND = 3
EXIT_AUTH = 4
EXIT_SERVER = 5
EXIT_TIMEOUT = 124
EXIT_INTERRUPTED = 130

RUN_STATUSES = ("pending", "running", "succeeded", "failed", "cancelled")
TASK_STATUSES = ("running", "dispatched", "ready", "waiting", "pending", "succeeded", "failed", "dead", "skipped",
                 "cancelled")
# What `run --status` filters on: `dead` is no status any more (a task that failed for good is
# `failed`, dead-lettered or not), and the API refuses it.
TASK_FILTERS = tuple(status for status in TASK_STATUSES if status != "dead")
DEFINITION_SUFFIXES = (".yaml", ".yml", ".json")


class CliError(Exception):
    """A problem to report on stderr and end the command with `code`."""

    def __init__(self, message: str, code: int = EXIT_USAGE, lines: Sequence[str] = ()) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.lines = list(lines)


# --- output --------------------------------------------------------------------------------


def emit_json(value: Any) -> None:
    print(json.dumps(value, indent=2, sort_keys=False, default=str))


def say(message: str) -> None:
    print(message, file=sys.stderr)


def run_status_text(run: dict[str, Any]) -> str:
    """A run's status as users say it: a run that succeeded with tolerated failures (`on_failure:
    continue`) says so."""
    if run.get("succeeded_with_failures"):
        failed = run.get("failed_tasks")
        return "succeeded with failures" + (f" ({failed} failed)" if isinstance(failed, int) and failed else "")
    return str(run.get("status"))


def run_status_color(run: dict[str, Any]) -> str | None:
    return "33" if run.get("succeeded_with_failures") else STATUS_COLORS.get(str(run.get("status")))


def pipeline_label(item: dict[str, Any]) -> str:
    """A pipeline id, with its display name when the answer carries one."""
    name = item.get("pipeline_name")
    return f"{item.get('pipeline_id')} ({name})" if name else str(item.get("pipeline_id"))


def color_enabled(stream: TextIO) -> bool:
    return stream.isatty() and "NO_COLOR" not in os.environ and os.environ.get("TERM") != "dumb"


STATUS_COLORS = {
    "succeeded": "32", "failed": "31", "dead": "31", "cancelled": "33", "skipped": "2", "running": "36",
    "dispatched": "36", "ready": "34", "waiting": "35", "pending": "2",
}


def paint(text: str, code: str | None, enabled: bool) -> str:
    return f"\x1b[{code}m{text}\x1b[0m" if enabled and code else text


def table(headers: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    rows = [list(r) for r in rows]
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip()]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    return "\n".join(lines)


def parse_time(value: Any) -> datetime | None:
    if not isinstance(value, str) or not value:
        return None
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def show_time(value: Any) -> str:
    parsed = parse_time(value)
    return parsed.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S") if parsed else "-"


def seconds_text(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


def duration(start: Any, end: Any, *, until_now: bool = False) -> str:
    began, ended = parse_time(start), parse_time(end)
    if began is None:
        return "-"
    if ended is None:
        if not until_now:
            return "-"
        ended = datetime.now(UTC)
    return seconds_text(max(0.0, (ended - began).total_seconds()))


def error_text(error: Any) -> str:
    if not error:
        return ""
    if isinstance(error, dict):
        return str(error.get("message") or error.get("code") or json.dumps(error))
    return str(error)


def one_line(text: str, limit: int = 80) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


# --- errors and the API client -------------------------------------------------------------


def exit_code_for(error: ClientError) -> int:
    if isinstance(error, ApiError):
        if error.status in (401, 403):
            return EXIT_AUTH
        if error.status == 404:
            return EXIT_NOT_FOUND
        if error.status == 409:
            return EXIT_FAILED
        if error.status >= 500:
            return EXIT_SERVER
        return EXIT_USAGE
    return EXIT_SERVER


def report_client_error(error: ClientError, args: argparse.Namespace) -> None:
    say(f"error: {error.message}")
    if isinstance(error, ApiError):
        for line in error.detail_lines:
            say(f"  {line}")
        if error.status == 401 and not api_key_of(args):
            say("hint: no API key was given; pass --api-key or set TICKWEAVE_API_KEY")
    else:
        say("hint: is the server running (`tickweave dev`)? Point at it with --url or TICKWEAVE_URL")


def api_key_of(args: argparse.Namespace) -> str | None:
    return getattr(args, "api_key", None) or os.environ.get("TICKWEAVE_API_KEY") or None


def api_client(args: argparse.Namespace) -> TickweaveClient:
    return TickweaveClient(resolve_url(getattr(args, "url", None)), api_key_of(args),
                           timeout=getattr(args, "http_timeout", 30.0))


def read_or_emit(args: argparse.Namespace, path: str, params: dict[str, Any] | None = None) -> Any:
    """GET `path` for a read command. With --json the answer is printed as it came and None is
    returned (the command is done); otherwise the answer, for the command to print its way."""
    with api_client(args) as client:
        answer = client.request("GET", path, params=params)
    if args.json:
        emit_json(answer)
        return None
    return answer



def seg(value: str) -> str:
    """A value as one URL path segment."""
    return quote(value, safe="")


def require_key(args: argparse.Namespace, role: str) -> None:
    """Refuse before calling the API when no key is given: say which role the command needs."""
    if not api_key_of(args):
        raise CliError(f"set TICKWEAVE_API_KEY (or pass --api-key) to {role} key of the workspace", EXIT_AUTH)


def open_engine() -> Engine:
    """The engine on DATABASE_URL, for the few commands that work on the database directly."""
    from orchestrator.config import load_settings
    from orchestrator.engine.service import Engine

    settings = load_settings()
    if not settings.database_url:
        raise CliError("DATABASE_URL is not set")
    return Engine(settings, transports={})


# --- arguments -----------------------------------------------------------------------------


def positive_float(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a number") from None
    if not number > 0:
        raise argparse.ArgumentTypeError("must be more than 0")
    return number


def task_page_size(value: str) -> int:
    if not value.isdigit() or not 1 <= int(value) <= 200:
        raise argparse.ArgumentTypeError("must be an integer from 1 to 200")
    return int(value)


def page_size(value: str) -> int:
    if not value.isdigit() or not 1 <= int(value) <= 500:
        raise argparse.ArgumentTypeError("must be an integer from 1 to 500")
    return int(value)



class Parents:
    """Parent parsers for the shared options. A command's copy leaves the value alone unless
    given (SUPPRESS), so `tickweave --json runs` and `runs --json` agree."""

    def __init__(self) -> None:
        self.output = argparse.ArgumentParser(add_help=False)
        self.output.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                                 help="print only machine-readable JSON on stdout")
        self.server = argparse.ArgumentParser(add_help=False)
        self.server.add_argument(
            "--url", default=argparse.SUPPRESS,
            help="API base URL (default: TICKWEAVE_URL, TICKWEAVE_PUBLIC_URL, http://localhost:8000)")
        self.server.add_argument("--api-key", default=argparse.SUPPRESS, help="API key (default: TICKWEAVE_API_KEY)")

    @property
    def api(self) -> list[argparse.ArgumentParser]:
        """The parents of a command that calls the API."""
        return [self.output, self.server]

