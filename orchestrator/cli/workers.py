"""`workers list`: the worker services registered in the workspace, with when each was last
seen (heartbeat, callback or registration) and whether that is recent enough (`health`)."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from orchestrator.cli.common import EXIT_OK, Parents, one_line, read_or_emit, show_time, table

if TYPE_CHECKING:
    from orchestrator.cli.common import Subparsers


def cmd_workers_list(args: argparse.Namespace) -> int:
    answer = read_or_emit(args, "/api/workers")
    if answer is None:
        return EXIT_OK
    items = answer.get("items") or []
    if not items:
        print("no worker has registered in this workspace")
        return EXIT_OK
    rows = []
    for w in items:
        tasks = [str(t.get("name")) for t in w.get("tasks") or [] if isinstance(t, dict)]
        rows.append([str(w.get("service")), str(w.get("version") or "-"), str(w.get("transport")),
                     str(w.get("health") or "-"), show_time(w.get("last_seen_at")), show_time(w.get("registered_at")),
                     one_line(", ".join(tasks), 50), str(w.get("endpoint") or "-")])
    print(table(["SERVICE", "VERSION", "TRANSPORT", "HEALTH", "LAST SEEN (UTC)", "REGISTERED (UTC)", "TASKS",
                 "ENDPOINT"], rows))
    return EXIT_OK


def register(sub: Subparsers, parents: Parents) -> None:
    workers = sub.add_parser("workers", help="worker services registered in the workspace").add_subparsers(
        dest="workers_command", required=True, metavar="COMMAND")
    listing = workers.add_parser("list", parents=parents.api,
                                 help="list worker services: health, last seen, tasks, endpoint")
    listing.set_defaults(func=cmd_workers_list)
