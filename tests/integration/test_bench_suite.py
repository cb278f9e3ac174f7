"""`python -m bench` runs its parts end to end (tiny sizes): results are produced, nothing about
timings is asserted. The peers (optional packages) and pgbench are left out."""

from __future__ import annotations

import re

import pytest

from bench.__main__ import PARTS, main, parse_args

TINY = [
    "--quick", "--claim-tasks", "20", "--claim-batches", "1,10", "--callers", "1,2", "--fan-width", "5",
    "--chain-length", "4", "--chain-runs", "2", "--profile-callbacks", "5", "--schedules", "0,50",
    "--finished-tasks", "500", "--idle-ticks", "2", "--big-nodes", "50", "--workspace-pipelines", "20",
    "--memory-tasks", "20", "--map-widths", "30", "--map-settle-max", "30", "--map-concurrency", "3",
]


def test_parse_args_selects_parts_and_sizes() -> None:
    args = parse_args(["--quick", "--only", "idle", "--only", "scale,memory", "--big-nodes", "30"])
    assert args.parts == ["idle", "scale", "memory"]
    assert args.big_nodes == 30 and args.finished_tasks == 5000
    assert parse_args([]).parts == list(PARTS)
    with pytest.raises(SystemExit):
        parse_args(["--only", "nonsense"])


@pytest.mark.timeout(120)
def test_bench_quick_parts_produce_a_report(
    pg_admin_url: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("DATABASE_URL", pg_admin_url)
    assert main([*TINY, "--only", "claim,lifecycle,floor,profile,idle,scale,memory,map"]) == 0
    out = capsys.readouterr().out
    for heading in ("## Claim and dispatch", "## Full lifecycle", "## The callback's statement beside its floor",
                    "## One callback taken apart",
                    "## Idle tick latency", "## Scale", "## Memory of one tick", "## Dynamic fan-out (map)",
                    "## Targets"):
        assert heading in out
    assert "tick claim+dispatch (batch 10)" in out and "lifecycle deep (2x4)" in out
    assert "completions.complete_attempts" in out  # the profile's statements
    # the floor part: the statement and its floor, one at a time and batched, each checked against
    # the tasks it ended (a part that fails prints its error instead of its section)
    for case in ("callback statement alone, deep (2x4)", "floor: the four writes alone, deep (2x4)",
                 "floor: the four writes alone, deep (2x4), batches of 20",
                 "below the floor: the two task rows alone, deep (2x4), batches of 20"):
        assert case in out
    assert "| one at a time | floor: the four writes alone |" in out
    assert "| in batches | callback statement alone |" in out
    # the idle tick's one statement, explained (which plan the planner takes on these tiny tables is its own)
    assert "`SELECT EXISTS (SELECT 1 FROM schedules" in out and "Execution Time" in out
    assert "trigger of a 50-node pipeline" in out
    # The map part: the expansion's transactions, the settle, and the map beside the static DAG.
    assert "rolled back" in out and "manifest built s" in out
    assert "static wide (1x(2+5))" in out and "map lifecycle (1x(2+5), max_concurrency 3)" in out


@pytest.mark.timeout(120)
def test_bench_checks_part_times_a_batchs_output_checks_both_ways(
    pg_admin_url: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("DATABASE_URL", pg_admin_url)
    assert main(["--quick", "--only", "checks", "--check-batches", "1", "--check-batch", "4",
                 "--check-latency-ms", "1"]) == 0
    out = capsys.readouterr().out
    assert "## A batch's output checks against S3 with a round trip's latency" in out
    # every success checked once (4 HeadObject requests), both ways; a failed part prints its error instead
    for mode in ("one after the other", "16 at a time"):
        assert re.search(rf"\| {mode} \| 1 \| 4 \| 1 ms \| [\d.,]+ \| [\d.]+ \| 4 \|", out), out
