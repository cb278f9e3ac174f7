"""The dashboard of issue 18 ("The operator's day") in a real browser, over the whole stack: what
each step wrote and received, schedules in words and in their own time zone, a graph that zooms
and pans, inline code in descriptions, the words users know (`failed`, dead-lettered, succeeded
with failures), pipeline names and deletion, worker health and task logs.

Every wait is Playwright's `expect(...)`, which polls the page until a deadline; nothing sleeps.
Where the API answer the page is built for is not served by this stack, the real answer is
extended in the browser (`page.route`), as tests/browser/test_dashboard.py does for lineage.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import Dialog, Page, Route, expect

from .conftest import STATE_TIMEOUT_MS, Dashboard, Stack

pytestmark = pytest.mark.e2e

OUTPUTS = """
id: outs
description: every step writes an output; `d` feeds the persisted one
params: {p: 1, q: 2}
outputs: {report: {from: d}}
nodes:
  - {id: a, task: echo, params: {q: 3}}
  - {id: b, task: echo, depends: [a]}
  - {id: d, task: echo, depends: [b]}
"""


def create_pipeline(stack: Stack, definition: str, content_type: str = "application/yaml") -> None:
    response = stack.client.post("/api/pipelines", content=definition, headers={"Content-Type": content_type})
    assert response.status_code == 201, response.text


def run_to_end(stack: Stack, pipeline: str, params: dict[str, Any] | None = None) -> str:
    response = stack.client.post(f"/api/pipelines/{pipeline}/runs", json={"params": params or {}})
    assert response.status_code in (200, 201, 202), response.text
    run_id: str = response.json()["id"]
    stack.wait_for_run(run_id)
    return run_id


def view_box(page: Page) -> list[float]:
    return [float(v) for v in (page.locator("#dag").get_attribute("viewBox") or "").split()]


def test_the_run_page_shows_what_each_step_wrote_and_the_params_it_received(dashboard: Dashboard) -> None:
    page, stack = dashboard.page, dashboard.stack
    create_pipeline(stack, OUTPUTS)
    run_id = run_to_end(stack, "outs", {"r": 9})
    dashboard.open(f"#/runs/{run_id}")
    dashboard.sign_in()
    expect(page.locator("#run-status")).to_have_attribute("data-status", "succeeded")

    outputs = page.locator("#run-outputs")
    persisted = outputs.locator("#persisted-outputs tbody tr")
    expect(persisted).to_have_count(1)
    expect(persisted).to_contain_text("report")
    expect(persisted).to_contain_text("d")  # the step it comes from
    # Every step stored an output, and each is listed, not only the persisted one.
    expect(outputs.locator("#step-outputs tbody tr")).to_have_count(3)
    for node in "abd":
        expect(outputs.locator(f'#step-outputs tr[data-node="{node}"]')).to_contain_text("runs/")

    # d's output: read through the API (the persisted copy when the API does not serve a step's own).
    outputs.locator('#step-outputs tr[data-node="d"]').get_by_role("button", name="View").click()
    expect(outputs.locator("[data-step-output-content] pre[data-content]")).to_contain_text('"node": "d"')
    outputs.locator("[data-step-output-content]").get_by_role("button", name="Close").click()
    expect(outputs.locator("[data-step-output-content]")).to_have_count(0)

    # The params a step received: the pipeline's, overridden by the step's, then the run's.
    page.locator('#dag g.node[data-node="a"]').click()
    params = page.locator("#task-detail [data-params] pre")
    expect(params).to_contain_text('"p": 1')
    expect(params).to_contain_text('"q": 3')
    expect(params).to_contain_text('"r": 9')
    page.locator('#dag g.node[data-node="b"]').click()
    expect(page.locator("#task-detail [data-params] pre")).to_contain_text('"q": 2')
    dashboard.screenshot("outputs-and-params")


def test_a_long_output_is_cut_with_show_all_and_a_download(dashboard: Dashboard, tmp_path: Path) -> None:
    """The content viewer on a step output the API serves whole (answered in the browser here)."""
    page, stack = dashboard.page, dashboard.stack
    create_pipeline(stack, OUTPUTS)
    run_id = run_to_end(stack, "outs")
    content = {"rows": [{"index": i, "label": f"row <b>{i}</b>"} for i in range(400)]}
    page.route(re.compile(r".*/api/tasks/[0-9a-f-]{36}/output$"),
               lambda route: route.fulfill(status=200, content_type="application/json", body=json.dumps(content)))
    dashboard.open(f"#/runs/{run_id}")
    dashboard.sign_in()

    page.locator('#step-outputs tr[data-node="a"]').get_by_role("button", name="View").click()
    viewer = page.locator("#run-outputs [data-step-output-content]")
    pretty = json.dumps(content, indent=2)
    expect(viewer).to_contain_text(f"4,000 of {len(pretty):,} characters")
    expect(viewer.locator("pre")).not_to_contain_text('"index": 399')
    expect(viewer.locator("b")).to_have_count(0)  # markup in the content stays text
    viewer.get_by_role("button", name="Show all").click()
    expect(viewer.locator("pre")).to_contain_text('"index": 399')
    expect(viewer.get_by_role("button", name="Show all")).to_have_count(0)

    with page.expect_download() as info:
        viewer.get_by_role("link", name="Download").click()
    download = info.value
    assert download.suggested_filename.endswith("-a-default.json")
    saved = tmp_path / "out.json"
    download.save_as(saved)
    assert json.loads(saved.read_text()) == content


SCHEDULED = """
id: tokyo-report
description: opens the day in Tokyo
schedule: "0 9 * * 1-5"
schedule_options: {timezone: Asia/Tokyo}
steps:
  - {id: only, task: echo}
"""

FREQUENT = """
id: frequent
schedule: "*/15 * * * *"
steps:
  - {id: only, task: echo}
"""


def test_schedules_read_in_words_in_their_zone_and_pause_and_resume(dashboard: Dashboard) -> None:
    page, stack = dashboard.page, dashboard.stack
    create_pipeline(stack, SCHEDULED)
    create_pipeline(stack, FREQUENT)
    dashboard.open("#/schedules")
    dashboard.sign_in()

    tokyo = page.locator('#schedules tr[data-pipeline="tokyo-report"]')
    expect(tokyo.locator("[data-cron-words]")).to_have_text("At 09:00 on weekdays")
    expect(tokyo).to_contain_text("0 9 * * 1-5")  # the expression stays beside the words
    expect(tokyo).to_contain_text("time zone Asia/Tokyo")
    # Next fire times as a clock in Tokyo reads them, whatever this browser's zone.
    first = tokyo.locator("[data-fire-times] > div").first
    expect(first).to_contain_text("09:00")
    expect(first).to_contain_text("GMT+9")
    expect(page.locator('#schedules tr[data-pipeline="frequent"] [data-cron-words]')).to_have_text("Every 15 minutes")

    tokyo.get_by_role("button", name="Pause").click()
    expect(page.locator("#flash")).to_contain_text("Paused tokyo-report")
    expect(tokyo).to_contain_text("paused")
    schedules = stack.client.get("/api/schedules?pipeline=tokyo-report").json()["items"]
    assert [s["state"] for s in schedules] == ["paused"]
    tokyo.get_by_role("button", name="Resume").click()
    expect(tokyo.get_by_role("button", name="Pause")).to_be_visible()
    assert [s["state"] for s in stack.client.get("/api/schedules?pipeline=tokyo-report").json()["items"]] == ["active"]

    tokyo.locator("[data-schedule-runs]").click()
    expect(page).to_have_url(re.compile(r"#/runs\?pipeline=tokyo-report$"))
    expect(page.locator('#runs input[name="pipeline"]')).to_have_value("tokyo-report")
    dashboard.screenshot("schedules")


def test_cron_descriptions_of_the_common_forms(dashboard: Dashboard) -> None:
    """The describer's words for the usual five-field forms, and none for what it does not know."""
    dashboard.open()
    cases = {
        "*/5 * * * *": "Every 5 minutes",
        "0 * * * *": "Every hour at :00",
        "30 3 * * *": "Every day at 03:30",
        "0 9 * * 1-5": "At 09:00 on weekdays",
        "0 3 1,15 * *": "At 03:00 on days 1 and 15 of the month",
        "0 3 1 1,7 *": "At 03:00 on day 1 of the month, in January and July",
        "0 6,18 * * SAT,SUN": "At 06:00 and 18:00 on weekends",
        "*/15 9-17 * * 1-5": "Every 15 minutes from 09:00 to 17:59 on weekdays",
        "0 */2 * * *": "Every 2 hours at :00",
        "@daily": "Every day at 00:00",
    }
    # The describer is the page's own: run it on a schedule list answered in the browser.
    items = [{"id": f"s{i}", "pipeline": f"p{i}", "cron": cron, "timezone": "UTC", "state": "active", "catchup": "none",
              "overlap": "allow", "next_fire_times": []} for i, cron in enumerate([*cases, "1-10/3 * * * *"])]
    dashboard.page.route(re.compile(r".*/api/schedules$"), lambda route: route.fulfill(json={"items": items}))
    dashboard.sign_in()
    dashboard.go("#/schedules")
    for i, words in enumerate(cases.values()):
        expect(dashboard.page.locator(f'tr[data-schedule="s{i}"] [data-cron-words]')).to_have_text(words)
    odd = dashboard.page.locator(f'tr[data-schedule="s{len(cases)}"]')
    expect(odd).to_contain_text("1-10/3 * * * *")
    expect(odd.locator("[data-cron-words]")).to_have_count(0)


DIAMOND = """
id: diamond
nodes:
  - {id: a, task: echo}
  - {id: b, task: echo, depends: [a]}
  - {id: c, task: echo, depends: [a]}
  - {id: d, task: echo, depends: [b, c]}
"""


def test_the_graph_zooms_around_the_pointer_pans_and_resets(dashboard: Dashboard) -> None:
    page, stack = dashboard.page, dashboard.stack
    create_pipeline(stack, DIAMOND)
    run_id = run_to_end(stack, "diamond")
    dashboard.open(f"#/runs/{run_id}")
    dashboard.sign_in()
    expect(page.locator('#dag g.node[data-status="succeeded"]')).to_have_count(4)
    full = view_box(page)
    assert full[:2] == [0, 0]
    expect(page.locator("[data-zoom-level]")).to_have_text("100%")

    # The wheel zooms in around the pointer: the point under it stays under it.
    box = page.locator('#dag g.node[data-node="a"]').bounding_box()
    assert box is not None
    cx, cy = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
    page.mouse.move(cx, cy)
    page.mouse.wheel(0, -400)
    expect(page.locator("[data-zoom-level]")).not_to_have_text("100%")
    zoomed = view_box(page)
    assert zoomed[2] < full[2] and zoomed[3] < full[3]
    after = page.locator('#dag g.node[data-node="a"]').bounding_box()
    assert after is not None and after["width"] > box["width"]
    assert abs(after["x"] + after["width"] / 2 - cx) < 3 and abs(after["y"] + after["height"] / 2 - cy) < 3

    # A drag pans, and does not select the step it started on.
    page.mouse.move(cx, cy)
    page.mouse.down()
    page.mouse.move(cx + 60, cy + 20, steps=5)
    page.mouse.up()
    panned = view_box(page)
    assert panned[0] < zoomed[0] and panned[1] < zoomed[1] and panned[2] == zoomed[2]
    expect(page.locator("#task-detail")).to_be_empty()
    dashboard.screenshot("graph-zoomed")

    # A click still selects a step; the zoom survives the redraw that follows.
    page.locator('#dag g.node[data-node="d"]').click()
    expect(page.locator("#task-detail")).to_contain_text("Step d")
    assert view_box(page) == panned
    page.get_by_role("button", name="Reset zoom").click()
    assert view_box(page) == full
    expect(page.locator("[data-zoom-level]")).to_have_text("100%")


def test_descriptions_render_inline_code_and_nothing_else(dashboard: Dashboard) -> None:
    page, stack = dashboard.page, dashboard.stack
    hostile = '<img src=x onerror="window.__pwned=1">'
    create_pipeline(stack, json.dumps({
        "id": "coded", "description": f"run `make dev` then `<b>{hostile}</b>` and <i>{hostile}</i> `unclosed",
        "steps": [{"id": "only", "task": "echo"}]}), "application/json")
    dashboard.open()
    dashboard.sign_in()
    description = page.locator('tr[data-pipeline="coded"] .description')
    expect(description.locator("code")).to_have_count(2)
    expect(description.locator("code").first).to_have_text("make dev")
    expect(description.locator("code").nth(1)).to_have_text(f"<b>{hostile}</b>")
    expect(description).to_contain_text(f"and <i>{hostile}</i> `unclosed")
    expect(description.locator("b, i, img")).to_have_count(0)
    assert page.evaluate("window.__pwned") is None


TOLERANT = """
id: tolerant
steps:
  - {id: first, task: echo}
  - {id: wobbly, task: fail, params: {times: 5, retryable: false}, retry: {max_attempts: 1}, on_failure: continue}
  - {id: last, task: echo}
"""


def test_failed_steps_say_failed_and_a_tolerant_run_says_succeeded_with_failures(dashboard: Dashboard) -> None:
    page, stack = dashboard.page, dashboard.stack
    create_pipeline(stack, TOLERANT)
    run_id = run_to_end(stack, "tolerant")
    wobbly = next(t for t in stack.client.get(f"/api/runs/{run_id}").json()["tasks"] if t["node"] == "wobbly")
    assert wobbly["status"] == "failed" and wobbly["dead_lettered"] is True
    dashboard.open(f"#/runs/{run_id}")
    dashboard.sign_in()

    status = page.locator("#run-status")
    expect(status).to_have_text("succeeded with failures")
    expect(status).to_have_attribute("data-status", "succeeded")
    node = page.locator('#dag g.node[data-node="wobbly"]')
    expect(node).to_have_attribute("data-status", "failed")
    expect(node).to_have_attribute("data-dead-lettered", "")
    row = page.locator('#steps tr[data-node="wobbly"]')
    expect(row.locator('.badge[data-status="failed"]')).to_have_text("failed")
    expect(row.locator("[data-dead-lettered]")).to_have_text("dead-lettered")
    expect(page.locator("#run-counts")).to_contain_text("failed 1")
    expect(page.locator("#run-counts")).not_to_contain_text("dead")
    dashboard.screenshot("succeeded-with-failures")

    # The failed attempt's log, as the worker stored it.
    page.locator('#dag g.node[data-node="wobbly"]').click()
    expect(page.locator("#task-detail pre[data-log]")).to_contain_text("failing on purpose (attempt 1 of 5)")
    expect(page.locator("#task-detail [data-log-status]")).to_have_attribute("data-complete", "true")
    page.locator('#dag g.node[data-node="first"]').click()  # a step that logged nothing says so
    expect(page.locator("#task-detail [data-log-status]")).to_have_text("No log lines")

    # Every list of runs says it too, in its own (amber) badge.
    dashboard.go("#/runs")
    expect(page.locator(f'#runs tr[data-run="{run_id}"] [data-with-failures]')).to_have_text("succeeded with failures")
    dashboard.go("#/")
    expect(page.locator(f'#recent-runs tr[data-run="{run_id}"] [data-with-failures]')).to_have_text("succeeded with failures")


def test_the_step_panel_follows_an_attempt_log_by_offset_until_it_is_complete(dashboard: Dashboard) -> None:
    """The log endpoint of the contract, answered in the browser: two slices, then complete."""
    page, stack = dashboard.page, dashboard.stack
    create_pipeline(stack, DIAMOND)
    run_id = run_to_end(stack, "diamond")
    slices = {0: ("starting <b>up</b>\n", "false"), 19: ("done ✓\n", "true")}
    reads: list[tuple[str, int]] = []  # (task id, offset)

    def log(route: Route) -> None:
        found = re.search(r"/api/tasks/([0-9a-f-]{36})/attempts/1/log\?offset=(\d+)$", route.request.url)
        assert found is not None, route.request.url
        offset = int(found.group(2))
        reads.append((found.group(1), offset))
        text, complete = slices.get(offset, ("", "false"))
        size = 19 + len("done ✓\n".encode()) if complete == "true" else 19
        route.fulfill(status=200, body=text.encode(), content_type="text/plain; charset=utf-8",
                      headers={"X-Log-Size": str(size), "X-Log-Complete": complete})

    page.route(re.compile(r".*/api/tasks/[0-9a-f-]{36}/attempts/1/log\?.*"), log)
    dashboard.open(f"#/runs/{run_id}")
    dashboard.sign_in()
    page.locator('#dag g.node[data-node="b"]').click()
    pre = page.locator("#task-detail pre[data-log]")
    expect(pre).to_have_text("starting <b>up</b>\ndone ✓\n", timeout=STATE_TIMEOUT_MS)
    expect(pre.locator("b")).to_have_count(0)
    expect(page.locator("#task-detail [data-log-status]")).to_have_attribute("data-complete", "true")
    b = page.locator("#task-detail section[data-task]").get_attribute("data-task")
    assert [offset for task, offset in reads if task == b] == [0, 19]
    page.locator('#dag g.node[data-node="a"]').click()  # another step: its own log
    expect(page.locator("#task-detail")).to_contain_text("Step a")
    expect(pre).to_have_text("starting <b>up</b>\ndone ✓\n", timeout=STATE_TIMEOUT_MS)
    page.locator('#dag g.node[data-node="b"]').click()  # back: complete, so not read again
    expect(page.locator("#task-detail")).to_contain_text("Step b")
    expect(pre).to_have_text("starting <b>up</b>\ndone ✓\n")
    assert [offset for task, offset in reads if task == b] == [0, 19]


def test_workers_show_when_they_were_last_seen_and_their_health(dashboard: Dashboard) -> None:
    page, stack = dashboard.page, dashboard.stack
    registered = stack.client.post("/api/workers/register", json={
        "service": "renderer", "version": "7", "transport": "http", "endpoint": "http://127.0.0.1:9/",
        "tasks": [{"name": "render", "code_hash": "sha256:aaaaaaaa"}]})
    assert registered.status_code == 200, registered.text

    def with_health(route: Route) -> None:
        body: Any = route.fetch().json()
        body["items"].append({"service": "old-batch", "transport": "lambda", "registered_at": "2026-01-01T00:00:00Z",
                              "last_seen_at": "2026-01-02T00:00:00Z", "health": "stale", "tasks": []})
        route.fulfill(json=body)

    page.route(re.compile(r".*/api/workers$"), with_health)
    dashboard.open("#/workers")
    dashboard.sign_in()
    renderer = page.locator('#workers tr[data-worker="renderer"]')
    expect(renderer).to_contain_text("render")
    expect(renderer).to_contain_text("version 7")
    expect(renderer.locator("[data-health]")).to_have_text("healthy")
    expect(renderer.locator("time").first).to_contain_text(re.compile(r"just now|s ago"))
    stale = page.locator('#workers tr[data-worker="old-batch"]')
    expect(stale.locator("[data-health]")).to_have_text("stale")
    expect(stale.locator("time").first).to_contain_text("ago")


GATED = """
id: gated
name: The <b>gated</b> one
steps:
  - {id: prepare, task: echo}
  - {id: gate, kind: approval}
"""


def test_a_pipeline_shows_its_name_and_is_deleted_after_cancelling_its_runs(dashboard: Dashboard) -> None:
    page, stack = dashboard.page, dashboard.stack
    create_pipeline(stack, GATED)
    run_id = stack.client.post("/api/pipelines/gated/runs", json={}).json()["id"]
    dialogs: list[str] = []

    def answer(dialog: Dialog) -> None:
        dialogs.append(dialog.message)
        dialog.accept()

    page.on("dialog", answer)
    dashboard.open()
    dashboard.sign_in()
    row = page.locator('tr[data-pipeline="gated"]')
    expect(row.locator("[data-name]")).to_contain_text("The <b>gated</b> one")
    expect(row.locator("b")).to_have_count(0)
    row.get_by_role("button", name="Delete").click()
    # Refused while its run is active (409): asked again, the run is cancelled and the pipeline goes.
    expect(page.locator("#flash")).to_contain_text("Deleted gated; 1 active run cancelled")
    assert len(dialogs) == 2 and "Delete pipeline gated" in dialogs[0], dialogs
    expect(row).to_have_count(0)
    assert stack.client.get("/api/pipelines/gated").status_code == 404
    # Its history stays readable.
    dashboard.go(f"#/runs/{run_id}")
    expect(page.locator("#run-status")).to_have_attribute("data-status", "cancelled")
