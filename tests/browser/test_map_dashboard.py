"""A mapped node in the dashboard (issue 19): one box in the run graph labelled with its items'
counts, opening to a paged list of its items, read from the tasks endpoint a page at a time. An
item is shown as text, whatever it holds.

The run maps over a param, so no worker runs: the test plays the workers through the store (no
ticks run in this stack). Every wait is Playwright's `expect(...)`; nothing sleeps.
"""

from __future__ import annotations

import re
import uuid
from typing import Any

import pytest
from playwright.sync_api import Dialog, Request, expect

from orchestrator.db.connection import Row
from orchestrator.engine.completion import finish_attempt
from orchestrator.engine.service import Engine
from orchestrator.store import tasks as task_store
from tests.e2e.conftest import WORKSPACE

from .conftest import Dashboard

pytestmark = pytest.mark.e2e

WIDTH = 120
XSS = "<img src=x onerror=alert(1)>"
TIMES = "\u00d7"  # the multiplication sign: "parse", TIMES, "120"
FILES: list[Any] = [f"file-{i:03d}.csv" for i in range(WIDTH)]
FILES[7] = XSS
FILES[8] = {"key": "<b>bold</b>", "size": 3}
PIPELINE = {
    "id": "fanout", "description": "a mapped step", "params": {"files": FILES},
    "nodes": [
        {"id": "prep", "task": "prep-files"},
        {"id": "parse", "task": "parse-file", "depends": ["prep"],
         "map": {"over": "params.files", "max_concurrency": 1000, "tolerated_failures": "10%"}},
        {"id": "load", "task": "load-all", "depends": ["parse"]},
    ],
}


def claim(engine: Engine, run_id: uuid.UUID, limit: int) -> list[Row]:
    with engine.db.transaction() as conn:
        return task_store.claim_ready_tasks(conn, limit, run_id=run_id)


def finish(engine: Engine, task: Row, ok: bool) -> None:
    with engine.db.transaction() as conn:
        assert finish_attempt(
            conn, task["id"], task["attempt"], task["claim_token"], succeeded=ok,
            output={"key": f"k/{task['id']}"} if ok else None,
            error=None if ok else {"code": "bad_file", "message": "cannot parse <script>x</script>\nsecond line"},
            retryable=False).accepted


def start_run(engine: Engine) -> uuid.UUID:
    """prep succeeds (the map expands), then items 0-99 succeed, 100-102 fail, 103-109 run and
    110-119 are dispatched: "parse x120 · 100 ok · 3 failed · 17 running" (with a multiplication sign)."""
    engine.create_pipeline(WORKSPACE, PIPELINE)
    run_id = engine.trigger_run(WORKSPACE, "fanout", dispatch_now=False).id
    (prep,) = claim(engine, run_id, 10)
    finish(engine, prep, True)
    assert len(claim(engine, run_id, WIDTH)) == WIDTH
    with engine.db.connection() as conn:
        items = conn.execute(
            """SELECT id, map_index, attempt, claim_token FROM tasks
               WHERE run_id = %s AND map_parent_id IS NOT NULL ORDER BY map_index""", (run_id,)).fetchall()
    for item in items[:100]:
        finish(engine, item, True)
    for item in items[100:103]:
        finish(engine, item, False)
    with engine.db.transaction() as conn:
        for item in items[103:110]:
            assert task_store.mark_running(conn, item["id"], item["attempt"], item["claim_token"], None, None)
    return run_id


def test_a_mapped_node_is_one_box_that_opens_to_its_items(dashboard: Dashboard) -> None:
    page, stack = dashboard.page, dashboard.stack
    run_id = start_run(stack.engine)
    dialogs: list[str] = []

    def dismiss(dialog: Dialog) -> None:
        dialogs.append(dialog.message)
        dialog.dismiss()

    page.on("dialog", dismiss)
    item_pages: list[str] = []

    def record(request: Request) -> None:
        if "/tasks?" in request.url and "node=parse" in request.url:
            item_pages.append(request.url)

    page.on("request", record)
    dashboard.open(f"#/runs/{run_id}")
    dashboard.sign_in()

    # The run: 3 steps drawn whole, the mapped one a single box with its items' counts.
    expect(page.locator("#run-counts")).to_contain_text(f"{WIDTH + 3} tasks ({WIDTH} map items)")
    expect(page.locator("#dag g.node")).to_have_count(3)
    box = page.locator('#dag g.node[data-node="parse"]')
    expect(box).to_have_attribute("data-kind", "map")
    expect(box).to_have_attribute("data-status", "running")
    expect(box).to_have_attribute("data-map-label", f"parse {TIMES}{WIDTH} · 100 ok · 3 failed · 17 running")
    expect(box).to_contain_text(f"parse {TIMES}{WIDTH}")
    expect(box).to_contain_text("100 ok · 3 failed · 17 running")
    expect(page.locator("#dag path.edge")).to_have_count(2)
    expect(page.locator('#steps tr[data-node="parse"]')).to_contain_text(f"map {TIMES}{WIDTH}")
    expect(page.locator(f'#banner a[data-run="{run_id}"] .dot')).to_have_count(3)
    dashboard.screenshot("map-box")

    # Its items, a page at a time, each item as text.
    box.click()
    expect(page).to_have_url(re.compile(r"map=parse"))
    items = page.locator("#map-item-list tbody tr")
    expect(items).to_have_count(49)  # a page of 50: the map node, then items 0-48
    expect(page.locator("#map-items [data-map-summary]")).to_have_text(
        f"parse {TIMES}{WIDTH} · 100 ok · 3 failed · 17 running")
    expect(page.locator("#map-items")).to_contain_text("mapped over params.files")
    expect(items.first).to_have_attribute("data-item", "0")
    xss = page.locator('#map-item-list tr[data-item="7"]')
    expect(xss.locator("td").nth(1)).to_have_text(XSS)
    expect(xss).to_contain_text("succeeded")
    expect(page.locator('#map-item-list tr[data-item="8"] td').nth(1)).to_have_text('{ "key": "<b>bold</b>", "size": 3 }')
    expect(page.locator("#map-items img, #map-items b, #map-items script")).to_have_count(0)
    dashboard.screenshot("map-items")

    page.locator("#map-items [data-next-items]").click()
    expect(items.first).to_have_attribute("data-item", "49")
    expect(items).to_have_count(50)
    page.locator("#map-items [data-next-items]").click()
    expect(items.first).to_have_attribute("data-item", "99")
    expect(items).to_have_count(WIDTH - 99)
    expect(page.locator("#map-items [data-next-items]")).to_have_count(0)
    failed = page.locator('#map-item-list tr[data-item="100"]')
    expect(failed).to_have_attribute("data-status", "failed")
    expect(failed.locator("td").nth(4)).to_have_text("cannot parse <script>x</script>")  # the first line
    expect(page.locator('#map-item-list tr[data-item="105"]')).to_have_attribute("data-status", "running")
    expect(page.locator('#map-item-list tr[data-item="115"]')).to_have_attribute("data-status", "dispatched")
    expect(page.locator('#map-item-list tr[data-item="115"] td').nth(3)).to_have_text("1/1")
    page.locator("#map-items a", has_text="First items").click()
    expect(items.first).to_have_attribute("data-item", "0")
    page.locator("#map-items [data-close-map]").click()
    expect(page.locator("#map-items")).to_be_hidden()
    expect(page).not_to_have_url(re.compile(r"map=parse"))

    # A filtered view collapses the graph to a row per step: the mapped one counts its items.
    dashboard.go(f"#/runs/{run_id}?status=running")
    row = page.locator('#node-summary tr[data-node="parse"]')
    expect(row).to_contain_text(f"{WIDTH} items")
    expect(row).to_contain_text("succeeded 100")
    expect(row).to_contain_text("running 7")
    expect(page.locator("#steps tbody tr")).to_have_count(8)  # the map node and its 7 running items
    expect(page.locator('#steps tr[data-item="103"]')).to_contain_text("parse #103")
    row.locator("[data-open-map]").click()
    expect(items).to_have_count(49)

    assert dialogs == [], f"an item ran as markup: {dialogs}"
    assert all("limit=50" in url for url in item_pages), item_pages
    assert dashboard.page_errors == []
