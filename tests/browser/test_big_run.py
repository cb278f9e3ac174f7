"""A big run in the dashboard (issue 17): the page reads a run's counts and pages of its tasks, never
one request per task, and a 10,000-task run stays usable (its graph collapses to a row per step
with its counts; the steps table pages).

Every wait is Playwright's `expect(...)` or an awaited request; nothing sleeps.
"""

from __future__ import annotations

import re

import pytest
from playwright.sync_api import Request, expect

from tests.e2e.conftest import WORKSPACE

from .conftest import Dashboard

pytestmark = pytest.mark.e2e

STEPS = 10_000


def test_a_10000_task_run_is_read_in_pages_with_a_few_requests(dashboard: Dashboard) -> None:
    page, stack = dashboard.page, dashboard.stack
    # One root and 9,999 steps that wait for it: one layer of 9,999 boxes if drawn one by one.
    nodes = [{"id": "root", "task": "echo"}] + [
        {"id": f"n{i:05d}", "task": "echo", "depends": ["root"]} for i in range(STEPS - 1)]
    stack.engine.create_pipeline(WORKSPACE, {"id": "wide", "description": "ten thousand steps", "nodes": nodes})
    run_id = str(stack.engine.trigger_run(WORKSPACE, "wide", dispatch_now=False).id)  # stays running: no ticks

    api_requests: list[str] = []

    def record(request: Request) -> None:
        if "/api/" in request.url:
            api_requests.append(request.url.split("/api/", 1)[1])

    page.on("request", record)
    dashboard.open(f"#/runs/{run_id}")
    dashboard.sign_in()

    counts = page.locator("#run-counts")
    expect(counts).to_contain_text(f"{STEPS} tasks")
    expect(counts).to_contain_text("ready 1")
    expect(counts).to_contain_text(f"pending {STEPS - 1}")
    # The graph is collapsed to a page of steps with their counts; the table shows a page of tasks.
    expect(page.locator("#graph [data-collapsed]")).to_contain_text(f"{STEPS} tasks")
    expect(page.locator("#node-summary tbody tr")).to_have_count(100)
    expect(page.locator('#node-summary tr[data-node="root"]')).to_contain_text("ready 1")
    expect(page.locator("#dag")).to_have_count(0)
    expect(page.locator("#steps tbody tr")).to_have_count(200)
    expect(page.locator("#banner a[data-run] [data-counts]")).to_contain_text(f"pending {STEPS - 1}")
    dashboard.screenshot("big-run")

    # Two more polls of the open run (it is live: every 1.5 s), then count what the page asked for.
    for _ in range(2):
        with page.expect_request(lambda r: f"/api/runs/{run_id}?" in r.url and "include=attempts" in r.url,
                                 timeout=15_000):
            pass
    print(f"\n{len(api_requests)} API requests for the page view and two polls:", api_requests)
    assert not [r for r in api_requests if r.startswith("tasks/")], "a request per task"
    assert len(api_requests) <= 30, api_requests
    height = page.evaluate("document.documentElement.scrollHeight")
    assert height < 20_000, f"the page is {height} px tall"

    # Navigable: a step lists its tasks; the next page of steps and of tasks are one request each.
    page.locator('#node-summary a:text-is("n00042")').click()
    expect(page.locator("#steps tbody tr")).to_have_count(1)
    expect(page.locator('#steps tr[data-node="n00042"]')).to_contain_text("pending")
    expect(page.locator('#node-summary tr.current-node[data-node="n00042"]')).to_have_count(1)
    page.locator("#graph [data-next-nodes]").click()
    expect(page.locator('#node-summary tbody tr[data-node="n00099"]')).to_have_count(1)
    expect(page.locator("#graph")).to_contain_text(f"steps 101\u2013200 of {STEPS}")

    page.locator("#step-filters select").select_option("pending")
    page.locator("#step-filters input").fill("")
    page.locator("#step-filters button").click()
    expect(page.locator("#steps tbody tr")).to_have_count(200)
    first = page.locator("#steps tbody tr").first.get_attribute("data-node")
    page.locator("#steps [data-next-steps]").click()
    expect(page).to_have_url(re.compile(r"cursor="))
    expect(page.locator("#steps tbody tr")).to_have_count(200)
    expect(page.locator("#steps tbody tr").first).not_to_have_attribute("data-node", first or "")
    assert not [r for r in api_requests if r.startswith("tasks/")]
