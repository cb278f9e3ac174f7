"""Scale: one big pipeline through its whole life, and a big workspace's pipeline-level check.

big pipeline  `nodes` nodes as chains of 100 (so edges too): validated (`parse_definition`,
              the model and the node graph), registered (`Engine.create_pipeline`), triggered
              (`Engine.trigger_run`: tasks and edges bulk-inserted) and completed (no-op
              transport, callbacks as in the lifecycle part, `callers` tick callers).
workspace     `pipelines` definitions whose `depends` form a DAG across the workspace (each on
              the one before it and on one further back, naming its output): every definition
              validated, then `orchestrator.graph.pipeline_level_errors` over all of them.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import psycopg

from bench.lifecycle import drive, warm_dispatch
from bench.server import Server
from bench.suite import WORKSPACE, Suite, noop_engine
from orchestrator.engine.pipelines import parse_definition
from orchestrator.graph import pipeline_level_errors, validate_pipeline
from orchestrator.model.pipeline import PipelineDefinition

SEGMENT = 100
BIG = "big"


@dataclass(frozen=True)
class BigPipeline:
    nodes: int
    edges: int
    validate_s: float
    register_s: float
    trigger_s: float
    complete_s: float
    callers: int


@dataclass(frozen=True)
class Workspace:
    pipelines: int
    depends: int
    validate_each_s: float
    pipeline_level_s: float


def big_definition(nodes: int) -> dict[str, Any]:
    return {"id": BIG, "nodes": [
        {"id": f"n{i:05d}", "task": "echo", "depends": [f"n{i - 1:05d}"] if i % SEGMENT else []}
        for i in range(nodes)
    ]}


def run_big(server: Server, suite: Suite, *, nodes: int, callers: int, batch: int) -> BigPipeline:
    raw = big_definition(nodes)
    started = time.perf_counter()
    parse_definition(raw)
    validated = time.perf_counter()
    database = "bench_scale_big"
    url = suite.copy(database)
    engine, transport = noop_engine(url, pool=2 * callers + 2)
    try:
        t0 = time.perf_counter()
        engine.create_pipeline(WORKSPACE, raw)
        t1 = time.perf_counter()
        run = engine.trigger_run(WORKSPACE, BIG, dispatch_now=False)
        t2 = time.perf_counter()
        warm_dispatch(engine)
        t3 = time.perf_counter()
        done, _ = drive(engine, transport, total=nodes, callers=callers, batch=batch)
        t4 = time.perf_counter()
        with psycopg.connect(url) as conn:
            row = conn.execute("SELECT status FROM runs WHERE id = %s", (run.id,)).fetchone()
        if done != nodes or row is None or row[0] != "succeeded":
            raise RuntimeError(f"the big run ended {row[0] if row else None} after {done} of {nodes} callbacks")
    finally:
        engine.close()
        server.drop(database)
    return BigPipeline(nodes=nodes, edges=nodes - (nodes + SEGMENT - 1) // SEGMENT,
                       validate_s=validated - started, register_s=t1 - t0, trigger_s=t2 - t1,
                       complete_s=t4 - t3, callers=callers)


def workspace_definitions(count: int) -> list[dict[str, Any]]:
    definitions: list[dict[str, Any]] = []
    for i in range(count):
        upstream = sorted({i - 1, i // 2} - {i}) if i else []
        definitions.append({
            "id": f"p{i:04d}",
            "nodes": [{"id": "extract", "task": "echo"}, {"id": "load", "task": "echo", "depends": ["extract"]}],
            "outputs": {"table": {"from": "load"}},
            "depends": [{"pipeline": f"p{u:04d}", "outputs": ["table"]} for u in upstream],
        })
    return definitions


def run_workspace(*, pipelines: int) -> Workspace:
    raws = workspace_definitions(pipelines)
    started = time.perf_counter()
    parsed: dict[str, PipelineDefinition] = {}
    for raw in raws:
        definition = validate_pipeline(raw)
        parsed[definition.id] = definition
    validated = time.perf_counter()
    errors = pipeline_level_errors(parsed)
    checked = time.perf_counter()
    if errors:
        raise RuntimeError(f"the workspace should be valid: {errors[:3]}")
    return Workspace(pipelines=pipelines, depends=sum(len(r["depends"]) for r in raws),
                     validate_each_s=validated - started, pipeline_level_s=checked - validated)
