"""The operator dashboard in a real browser, over the whole stack.

Every wait is Playwright's `expect(...)`, which polls the page until a deadline; nothing sleeps.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import uuid
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import Route, expect

from .conftest import API_KEY, STATE_TIMEOUT_MS, Dashboard, Stack

pytestmark = pytest.mark.e2e

RUN_HASH = re.compile(r"#/runs/[0-9a-f-]{36}$")

DIAMOND = """
id: diamond
description: fan out and join
nodes:
  - {id: a, task: echo}
  - {id: b, task: echo, depends: [a]}
  - {id: c, task: sleep, depends: [a], params: {seconds: 1}}
  - {id: d, task: echo, depends: [b, c]}
"""

GATED = """
id: gated
description: a person approves before publishing
steps:
  - {id: prepare, task: echo}
  - {id: gate, kind: approval}
  - {id: publish, task: echo}
"""

MANUAL = """
id: handoff
steps:
  - {id: prepare, task: echo}
  - {id: sign-off, kind: manual}
"""

FLAKY = """
id: flaky
steps:
  - {id: first, task: echo}
  - {id: wobbly, task: fail, params: {times: 1}, retry: {max_attempts: 1}}
  - {id: last, task: echo}
"""


def create_pipeline(stack: Stack, definition: str) -> None:
    response = stack.client.post("/api/pipelines", content=definition, headers={"Content-Type": "application/yaml"})
    assert response.status_code == 201, response.text


def run_id_from_url(dash: Dashboard) -> str:
    expect(dash.page).to_have_url(RUN_HASH)
    return dash.page.url.rsplit("/", 1)[1]


def trigger_from_overview(dash: Dashboard, pipeline: str) -> str:
    dash.page.locator(f'tr[data-pipeline="{pipeline}"]').get_by_role("button", name="Trigger").click()
    return run_id_from_url(dash)


def test_a_bad_key_is_refused_and_a_good_one_shows_the_empty_states(dashboard: Dashboard) -> None:
    page = dashboard.page
    dashboard.open()
    expect(page.locator("#key-card")).to_contain_text("Sign in with an API key")
    expect(page.locator("#banner")).to_contain_text("Paste an API key")

    dashboard.sign_in("not-a-key")
    expect(page.locator("#key-error")).to_contain_text("not valid")
    dashboard.screenshot("bad-key")

    dashboard.sign_in()
    expect(page.locator("#pipelines")).to_contain_text("No pipelines yet.")
    expect(page.locator("#waiting")).to_contain_text("Nothing is waiting for a decision.")
    expect(page.locator("#recent-runs")).to_contain_text("No runs yet.")
    expect(page.locator("#banner")).to_contain_text("No runs in progress.")
    assert page.evaluate("localStorage.getItem('tickweave.apiKey')") == API_KEY
    dashboard.screenshot("empty-overview")

    page.reload()  # the key is remembered
    expect(page.locator("#pipelines")).to_contain_text("No pipelines yet.")
    expect(page.locator("#key-card")).to_have_count(0)

    for route, section, text in [
        ("#/dlq", "#dlq", "The dead-letter queue is empty."),
        ("#/schedules", "#schedules", "No schedules."),
        ("#/runs", "#runs", "No runs match."),
        ("#/runs/" + str(uuid.uuid4()), "#run-head", "not found"),
        ("#/nowhere", "main", "No such page."),
    ]:
        dashboard.go(route)
        expect(page.locator(section)).to_contain_text(text)
    # Persisted outputs may not be served yet: an empty list or an error, never a blank section.
    dashboard.go("#/outputs")
    expect(page.locator("#outputs .empty, #outputs .errorbox")).to_have_count(1)

    page.get_by_role("button", name="Change key").click()
    expect(page.locator("#key-card")).to_be_visible()
    assert page.evaluate("localStorage.getItem('tickweave.apiKey')") is None


def test_trigger_a_run_and_watch_its_graph_and_timeline_complete(dashboard: Dashboard) -> None:
    page, stack = dashboard.page, dashboard.stack
    create_pipeline(stack, DIAMOND)
    dashboard.open()
    dashboard.sign_in()
    row = page.locator('tr[data-pipeline="diamond"]')
    expect(row).to_contain_text("fan out and join")
    expect(row).to_contain_text("no runs")

    run_id = trigger_from_overview(dashboard, "diamond")
    nodes = page.locator("#dag g.node")
    expect(nodes).to_have_count(4)
    expect(page.locator("#dag path.edge")).to_have_count(4)
    expect(page.locator("#run-status")).to_have_attribute("data-status", "succeeded", timeout=STATE_TIMEOUT_MS)
    expect(page.locator('#dag g.node[data-status="succeeded"]')).to_have_count(4)
    # One bar per attempt in the timeline, each coloured by its outcome.
    expect(page.locator('#gantt g[data-status="succeeded"]')).to_have_count(4)

    # Layered by depth, left to right: a, then b and c side by side, then the join d.
    x = {}
    for node in "abcd":
        box = page.locator(f'#dag g.node[data-node="{node}"]').bounding_box()
        assert box is not None
        x[node] = box["x"]
    assert x["a"] < x["b"] == x["c"] < x["d"]
    dashboard.screenshot("run-succeeded")

    page.locator('#dag g.node[data-node="d"]').click()
    detail = page.locator("#task-detail")
    expect(detail).to_contain_text("Step d")
    expect(detail.locator("table tbody tr")).to_have_count(1)  # its one attempt
    expect(detail).to_contain_text("b, c")

    assert stack.client.get(f"/api/runs/{run_id}").json()["status"] == "succeeded"
    page.get_by_role("link", name="Overview").click()
    expect(row).to_contain_text("succeeded 1")
    expect(page.locator(f'#recent-runs tr[data-run="{run_id}"]')).to_contain_text("succeeded")
    expect(page.locator("#banner")).to_contain_text("No runs in progress.")


def test_approve_a_gate_from_the_waiting_list(dashboard: Dashboard) -> None:
    page, stack = dashboard.page, dashboard.stack
    create_pipeline(stack, GATED)
    dashboard.open()
    dashboard.sign_in()
    run_id = trigger_from_overview(dashboard, "gated")

    expect(page.locator('#dag g.node[data-node="gate"]')).to_have_attribute("data-status", "waiting", timeout=STATE_TIMEOUT_MS)
    banner_run = page.locator(f'#banner a[data-run="{run_id}"]')
    expect(banner_run.locator(".dot")).to_have_count(3)
    expect(banner_run.locator('.dot[data-status="waiting"]')).to_have_count(1)
    expect(banner_run.locator('.dot[data-status="succeeded"]')).to_have_count(1)
    dashboard.screenshot("run-waiting")

    page.get_by_role("link", name="Overview").click()
    waiting = page.locator('#waiting tr', has_text="gate")
    expect(waiting).to_contain_text("approval")
    dashboard.screenshot("waiting-for-approval")
    waiting.get_by_role("button", name="Approve").click()
    expect(page.locator("#flash")).to_contain_text("Approved gate")
    expect(page.locator("#waiting")).to_contain_text("Nothing is waiting for a decision.")

    banner_run.click()
    expect(page.locator("#run-status")).to_have_attribute("data-status", "succeeded", timeout=STATE_TIMEOUT_MS)
    expect(page.locator('#dag g.node[data-status="succeeded"]')).to_have_count(3)
    expect(page.locator("#banner")).to_contain_text("No runs in progress.")
    gate = next(t for t in stack.client.get(f"/api/runs/{run_id}").json()["tasks"] if t["node"] == "gate")
    assert gate["output"]["decision"] == "approve"


def test_mark_a_manual_step_done_on_the_run_page(dashboard: Dashboard) -> None:
    page, stack = dashboard.page, dashboard.stack
    create_pipeline(stack, MANUAL)
    dashboard.open()
    dashboard.sign_in()
    run_id = trigger_from_overview(dashboard, "handoff")

    step = page.locator('#steps tr[data-node="sign-off"]')
    expect(step.get_by_role("button", name="Mark done")).to_be_visible(timeout=STATE_TIMEOUT_MS)
    step.get_by_role("button", name="Mark done").click()
    expect(page.locator("#run-status")).to_have_attribute("data-status", "succeeded", timeout=STATE_TIMEOUT_MS)
    expect(step).to_contain_text("succeeded")
    assert stack.client.get(f"/api/runs/{run_id}").json()["status"] == "succeeded"


def test_retry_a_dead_letter(dashboard: Dashboard) -> None:
    page, stack = dashboard.page, dashboard.stack
    create_pipeline(stack, FLAKY)
    dashboard.open()
    dashboard.sign_in()
    run_id = trigger_from_overview(dashboard, "flaky")
    expect(page.locator("#run-status")).to_have_attribute("data-status", "failed", timeout=STATE_TIMEOUT_MS)
    expect(page.locator('#dag g.node[data-node="wobbly"]')).to_have_attribute("data-status", "failed")
    expect(page.locator('#steps tr[data-node="wobbly"] [data-dead-lettered]')).to_have_text("dead-lettered")
    expect(page.locator('#dag g.node[data-node="last"]')).to_have_attribute("data-status", "skipped")
    dashboard.screenshot("run-failed")

    page.get_by_role("link", name="Dead letters").click()
    entry = page.locator("#dlq tbody tr", has_text="wobbly")
    expect(entry).to_contain_text("failing on purpose")
    dashboard.screenshot("dead-letters")
    entry.get_by_role("button", name="Retry").click()
    expect(page.locator("#flash")).to_contain_text("Retried wobbly")
    expect(page.locator("#dlq")).to_contain_text("The dead-letter queue is empty.")

    dashboard.go(f"#/runs/{run_id}")
    expect(page.locator("#run-status")).to_have_attribute("data-status", "succeeded", timeout=STATE_TIMEOUT_MS)
    # The retried step has two attempts on the timeline: the failure, then the success.
    expect(page.locator('#gantt g[data-node="wobbly"]')).to_have_count(2)
    expect(page.locator('#gantt g[data-node="wobbly"][data-status="succeeded"]')).to_have_count(1)
    dashboard.screenshot("run-retried")


SOURCE = """
id: source
outputs: {report: {from: make}}
steps:
  - {id: make, task: echo}
"""

CONSUMER = """
id: consumer
depends: [{pipeline: source, outputs: [report]}]
steps:
  - {id: use, task: echo}
"""


def test_a_later_trigger_shows_as_lineage_with_the_persisted_output(dashboard: Dashboard) -> None:
    page, stack = dashboard.page, dashboard.stack
    create_pipeline(stack, SOURCE)
    create_pipeline(stack, CONSUMER)
    dashboard.open()
    dashboard.sign_in()
    source_run = trigger_from_overview(dashboard, "source")
    expect(page.locator("#run-status")).to_have_attribute("data-status", "succeeded", timeout=STATE_TIMEOUT_MS)

    report = page.locator("#run-outputs tbody tr", has_text="report")
    report.get_by_role("button", name="View").click()
    expect(page.locator("#run-outputs pre")).to_contain_text('"node": "make"')

    downstream = page.locator("#lineage li[data-downstream]", has_text="consumer")
    expect(downstream).to_be_visible(timeout=STATE_TIMEOUT_MS)
    dashboard.screenshot("source-run")
    downstream.locator("a").click()
    expect(page.locator("#run-status")).to_have_attribute("data-status", "succeeded", timeout=STATE_TIMEOUT_MS)
    upstream = page.locator(f'#lineage li[data-upstream="{source_run}"]')
    expect(upstream).to_contain_text("source")
    expect(upstream).to_contain_text("output report")
    dashboard.screenshot("consumer-run")

    dashboard.go("#/outputs?pipeline=source")
    expect(page.locator("#outputs tbody tr", has_text="report")).to_have_count(1)


HOSTILE = '<img src=x onerror="window.__pwned=1">'


def test_lineage_and_outputs_are_rendered_when_the_api_sends_them(dashboard: Dashboard) -> None:
    """Lineage and outputs may not be served yet: the real run answer is extended in the browser."""
    page, stack = dashboard.page, dashboard.stack
    create_pipeline(stack, DIAMOND)
    run_id = stack.client.post("/api/pipelines/diamond/runs", json={}).json()["id"]
    stack.wait_for_run(run_id)
    upstream_run, downstream_run, output_id = (str(uuid.uuid4()) for _ in range(3))

    def extended_run(route: Route) -> None:
        body: dict[str, Any] = route.fetch().json()
        body.update({
            "trigger": "pipeline", "trigger_source_execution_id": upstream_run, "trigger_source_pipeline_id": "ingest",
            "orchestration_id": "orch-123",
            "lineage": {
                "upstream": [{"run_id": upstream_run, "pipeline_id": "ingest", "output": "archive", "version": "default",
                              "output_id": output_id}],
                "downstream": [{"run_id": downstream_run, "pipeline_id": "publish", "trigger": "pipeline"}],
            },
            "outputs": [{"id": output_id, "output": HOSTILE, "version": "default", "size": 12, "sha256": "ab" * 32}],
        })
        route.fulfill(json=body)

    def outputs_list(route: Route) -> None:
        route.fulfill(json={"items": [{"id": output_id, "pipeline_id": "diamond", "run_id": run_id, "version": "default",
                                       "output": "report", "size": 12, "sha256": "cd" * 32,
                                       "created_at": "2026-11-28T10:00:00Z"}], "next_cursor": None})

    page.route(re.compile(rf".*/api/runs/{run_id}(\?.*)?$"), extended_run)
    page.route(f"**/api/outputs/{output_id}/content", lambda route: route.fulfill(json={"rows": 3}))
    page.route(re.compile(r".*/api/outputs(\?.*)?$"), outputs_list)

    dashboard.open(f"#/runs/{run_id}")
    dashboard.sign_in()
    lineage = page.locator("#lineage")
    expect(lineage.locator(f'li[data-upstream="{upstream_run}"]')).to_contain_text("ingest")
    expect(lineage.locator(f'li[data-upstream="{upstream_run}"]')).to_contain_text("output archive @ default")
    expect(lineage.locator(f'li[data-downstream="{downstream_run}"]')).to_contain_text("publish")
    expect(lineage.locator(f'a[href="#/runs/{downstream_run}"]')).to_have_count(1)
    expect(lineage).to_contain_text("orch-123")

    outputs = page.locator("#run-outputs")
    expect(outputs).to_contain_text(HOSTILE)  # shown as text, not parsed as markup
    expect(outputs.locator("img")).to_have_count(0)
    outputs.locator("#persisted-outputs").get_by_role("button", name="View").click()
    expect(outputs.locator("pre")).to_contain_text('"rows": 3')
    dashboard.screenshot("lineage-and-outputs")

    dashboard.go("#/outputs")
    expect(page.locator(f'#outputs tr[data-output="{output_id}"]')).to_contain_text("report")
    assert page.evaluate("window.__pwned") is None


def test_text_is_escaped_and_an_unreachable_api_is_reported(dashboard: Dashboard) -> None:
    page, stack = dashboard.page, dashboard.stack
    create_pipeline(stack, json.dumps({"id": "hostile", "description": f"<b>bold</b> {HOSTILE}",
                                       "steps": [{"id": "only", "task": "echo"}]}))
    dashboard.open()
    dashboard.sign_in()
    row = page.locator('tr[data-pipeline="hostile"]')
    expect(row).to_contain_text(f"<b>bold</b> {HOSTILE}")
    expect(row.locator("b, img")).to_have_count(0)

    # The API goes away: what was shown stays, greyed out, under a bar that says why.
    page.route("**/api/**", lambda route: route.abort())
    expect(page.locator("#conn")).to_contain_text("Cannot reach the API", timeout=STATE_TIMEOUT_MS)
    expect(page.locator("#pipelines")).to_have_class(re.compile(r"\bstale\b"))
    expect(row).to_be_visible()
    dashboard.screenshot("api-down-after-load")

    # Loaded while the API is down: every section says so; the page is never blank.
    page.reload()
    expect(page.locator("#conn")).to_contain_text("Cannot reach the API")
    for section in ("#waiting", "#pipelines", "#recent-runs"):
        expect(page.locator(f"{section} .errorbox")).to_contain_text("Cannot reach the API")
    expect(page.locator("#banner")).to_contain_text("Cannot reach the API")
    dashboard.screenshot("api-down")

    page.unroute("**/api/**")
    expect(page.locator("#conn")).to_be_empty(timeout=STATE_TIMEOUT_MS)
    expect(row).to_contain_text(f"<b>bold</b> {HOSTILE}")
    assert page.evaluate("window.__pwned") is None


def dashboard_csp() -> str:
    """The policy proposed for `GET /`: only the page's own inline script (by hash), its own API."""
    html = (Path(__file__).resolve().parents[2] / "orchestrator" / "api" / "static" / "index.html").read_bytes()
    scripts = re.findall(rb"<script>(.*?)</script>", html, re.S)
    hashes = " ".join(f"'sha256-{base64.b64encode(hashlib.sha256(s).digest()).decode()}'" for s in scripts)
    return (f"default-src 'none'; script-src {hashes}; style-src 'unsafe-inline'; connect-src 'self'; "
            "img-src data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


def test_the_page_runs_under_a_strict_content_security_policy(dashboard: Dashboard) -> None:
    page, stack = dashboard.page, dashboard.stack
    create_pipeline(stack, GATED)
    violations: list[str] = []
    page.on("console", lambda msg: violations.append(msg.text) if "Content Security Policy" in msg.text else None)

    def with_csp(route: Route) -> None:
        response = route.fetch()
        route.fulfill(response=response, headers={**response.headers, "content-security-policy": dashboard_csp()})

    page.route(f"{stack.base_url}/", with_csp)
    dashboard.open()
    dashboard.sign_in()
    trigger_from_overview(dashboard, "gated")
    expect(page.locator('#dag g.node[data-node="gate"]')).to_have_attribute("data-status", "waiting", timeout=STATE_TIMEOUT_MS)
    page.locator('#steps tr[data-node="gate"]').get_by_role("button", name="Approve").click()
    expect(page.locator("#run-status")).to_have_attribute("data-status", "succeeded", timeout=STATE_TIMEOUT_MS)
    assert violations == []
