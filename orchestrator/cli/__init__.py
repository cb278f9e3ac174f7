"""`tickweave`: operate an orchestrator from a shell.

One module per command group, each with its commands and a `register` adding them to the
parser: pipelines.py (`validate`, `apply`, `pipelines ...`), runs.py (`trigger`, `runs`,
`run`, `cancel`, `retry`, `backfill`), tasks.py (`task`, `approve`, `reject`, `complete`,
`logs`), dlq.py, templates.py, workers.py, keys.py, admin.py (`db`, `workspaces`, `tick`,
`dev`). They share common.py (exit codes, output, the API client); definitions.py reads and
validates definition files, progress.py draws runs. Imports go one way: this module imports
the command modules, they import common.py (and definitions.py / progress.py), never each
other.

Commands that talk to the HTTP API find it with `--url` or TICKWEAVE_URL (then
TICKWEAVE_PUBLIC_URL, then http://localhost:8000) and authenticate with `--api-key` or
TICKWEAVE_API_KEY. `db migrate`, `db check`, `keys create --workspace` and `workspaces limit`
work on the database directly (DATABASE_URL); `dev` runs the local stack. docs/cli.md is the
manual.

`--json` (before or after the command) prints only machine-readable JSON on stdout; messages
and errors always go to stderr. API errors print their message and each `path: message` of
their details.

Exit codes, the same for every command, for scripts to rely on:

    0    success (for `trigger --wait` / `run --wait`: the run succeeded)
    1    the thing asked about failed: the run failed or was cancelled, a definition is
         invalid, or the server refused the request in its current state (409 conflict)
    2    usage error or bad input: unknown option, missing or unreadable file, malformed
         `--param`, a request the API rejected as malformed (400, 413, 422 outside apply/validate)
    3    not found: unknown pipeline, run, task, dead letter, template or key (404)
    4    authentication or authorization: missing, unknown or too-weak API key (401, 403)
    5    server or connection error: unreachable, timed out, 5xx, not the Tickweave API
    124  `--wait` gave up after `--timeout` seconds (the run goes on)
    130  interrupted (Ctrl-C); a run being watched goes on
"""

from __future__ import annotations

import argparse

from orchestrator.cli import admin, dlq, keys, pipelines, runs, tasks, templates, workers
from orchestrator.cli.common import (
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_USAGE,
    CliError,
    Parents,
    exit_code_for,
    report_client_error,
    say,
)
from orchestrator.cli.definitions import load_documents, validate_documents
from orchestrator.cli.progress import ProgressView
from orchestrator.cli.runs import parse_params
from orchestrator.client import ClientError

__all__ = ["ProgressView", "build_parser", "load_documents", "main", "parse_params", "validate_documents"]

# In `tickweave --help`'s order.
_GROUPS = (pipelines, runs, tasks, dlq, templates, workers, keys, admin)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tickweave", description="Tickweave pipeline orchestrator",
        epilog="exit codes: 0 ok, 1 failed (run failed, invalid definition, conflict), 2 usage or bad input, "
               "3 not found, 4 authentication, 5 server or connection error, 124 --wait timed out "
               "(docs/cli.md)")
    # The shared options before the command; each command's copy (Parents) takes them after it.
    parser.add_argument("--json", action="store_true", default=False, help="print only machine-readable JSON on stdout")
    parser.add_argument("--url", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--api-key", default=None, help=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    parents = Parents()
    for group in _GROUPS:
        group.register(sub, parents)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help (0) or a usage error (2), already printed by argparse
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    try:
        return int(args.func(args))
    except CliError as exc:
        say(f"error: {exc.message}")
        for line in exc.lines:
            say(f"  {line}")
        return exc.code
    except ClientError as exc:
        report_client_error(exc, args)
        return exit_code_for(exc)
    except KeyboardInterrupt:
        say("interrupted")
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # `tickweave runs | head`
        return EXIT_OK
