"""The engine as one object: settings, database, token keyring, transports and dispatcher,
wired once per process (per cold start on Lambda) and shared by the API, the CLI and tests."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any

from orchestrator.config import Settings
from orchestrator.db.connection import Database, Row
from orchestrator.dispatch.base import Transport
from orchestrator.engine import (
    backfills,
    events,
    keys,
    notifications,
    operations,
    orchestrations,
    outputs,
    pipelines,
    runs,
    scheduling,
    templates,
    tick,
    worker_protocol,
    workers,
)
from orchestrator.engine.completion import AttemptResult
from orchestrator.engine.dispatcher import Dispatcher, DispatchSummary
from orchestrator.engine.errors import EngineError
from orchestrator.storage.tokens import TokenKeyring
from orchestrator.store import schedules as schedule_store
from orchestrator.store import tasks as task_store

log = logging.getLogger(__name__)


def build_transports(settings: Settings) -> dict[str, Transport]:
    transports: dict[str, Transport] = {}
    if settings.local_worker:
        from orchestrator.dispatch.local import LocalTransport, load_worker

        transports["local"] = LocalTransport(
            load_worker(settings.local_worker), settings=settings, threads=settings.local_worker_threads
        )
    if settings.worker_function:
        from orchestrator.dispatch.aws_lambda import LambdaTransport

        transports["lambda"] = LambdaTransport(settings.worker_function, region=settings.aws_region,
                                               max_event_age_s=settings.lambda_max_event_age_s)
    elif "lambda" in settings.transports.values():
        log.warning("TICKWEAVE_TRANSPORTS names 'lambda' but TICKWEAVE_WORKER_FUNCTION is not set")
    if settings.worker_url:
        from orchestrator.dispatch.http import HttpTransport

        transports["http"] = HttpTransport(settings.worker_url, auth_token=settings.worker_auth_token)
    elif "http" in settings.transports.values():
        log.warning("TICKWEAVE_TRANSPORTS names 'http' but TICKWEAVE_WORKER_URL is not set")
    if settings.worker_queue_url:
        from orchestrator.dispatch.sqs import SqsTransport

        # Locally moto serves SQS on the same endpoint as S3; on AWS both are None (the default
        # regional endpoints).
        transports["sqs"] = SqsTransport(
            settings.worker_queue_url, region=settings.aws_region, endpoint_url=settings.s3_endpoint_url
        )
    elif "sqs" in settings.transports.values():
        log.warning("TICKWEAVE_TRANSPORTS names 'sqs' but TICKWEAVE_WORKER_QUEUE_URL is not set")
    return transports


class Engine:
    def __init__(
        self, settings: Settings, db: Database | None = None, transports: dict[str, Transport] | None = None
    ) -> None:
        self.settings = settings
        self.db = db or Database(settings.database_url)
        self.keyring = TokenKeyring.from_settings(settings)
        self.transports = build_transports(settings) if transports is None else transports
        self.dispatcher = Dispatcher(settings, self.db, self.keyring, self.transports)
        self.sightings = workers.WorkerSightings()
        # A batch's output checks (HeadObject each), several at a time.
        self.output_checks = worker_protocol.OutputChecks()

    def close(self) -> None:
        self.dispatcher.close()
        self.output_checks.close()
        for transport in self.transports.values():
            transport.close()
        self.dispatcher.routed.close()
        self.db.close()

    # keys
    def authenticate(self, raw_key: str | None) -> keys.Principal:
        return keys.authenticate(self.db, raw_key)

    def create_api_key(self, workspace_id: str, role: str, *, name: str = "", raw_key: str | None = None) -> tuple[str, str]:
        return keys.create_api_key(self.db, workspace_id, role, name=name, raw_key=raw_key)

    # events
    def record_event(
        self, workspace_id: str, name: str, event_id: str, payload: dict[str, Any] | None = None, *,
        actor: str | None = None, dispatch_now: bool = True,
    ) -> events.RecordedEvent:
        result = events.record_event(
            self.db, self.settings, workspace_id, name, event_id, payload or {}, actor
        )
        if result.created and dispatch_now:
            # Start the roots now rather than at the next tick; a repeated post dispatches
            # nothing (its runs were dispatched by the first, or are the tick's to heal).
            for run_id in result.run_ids:
                self.dispatch_ready(run_id)
        return result

    def get_event(self, workspace_id: str, event_id: str) -> Row:
        return events.get_event(self.db, workspace_id, event_id)

    def list_events(
        self, workspace_id: str, *, name: str | None = None, limit: int = 50,
        before: tuple[datetime, str] | None = None,
    ) -> list[Row]:
        return events.list_events(self.db, workspace_id, name=name, limit=limit, before=before)

    # templates
    def create_template(self, workspace_id: str, raw: Any, *, actor: str | None = None) -> templates.SavedTemplate:
        return templates.create_template(self.db, workspace_id, raw, actor=actor)

    def update_template(
        self, workspace_id: str, template_id: str, raw: Any, *, actor: str | None = None, create_missing: bool = False
    ) -> templates.SavedTemplate:
        return templates.update_template(self.db, workspace_id, template_id, raw, actor=actor, create_missing=create_missing)

    def get_template(self, workspace_id: str, template_id: str) -> Row:
        return templates.get_template(self.db, workspace_id, template_id)

    def list_templates(self, workspace_id: str, *, limit: int = 100, after_id: str | None = None) -> list[Row]:
        return templates.list_templates(self.db, workspace_id, limit=limit, after_id=after_id)

    def pipeline_templates(self, workspace_id: str, pipeline_id: str) -> Row:
        """The current version's definition as written and {node: {template, version}}."""
        return templates.pipeline_templates(self.db, workspace_id, pipeline_id)

    # backfills
    def start_backfill(self, workspace_id: str, pipeline_id: str, **request: Any) -> dict[str, Any]:
        result = backfills.start_backfill(self.db, self.settings, workspace_id, pipeline_id, **request)
        # The roots of its runs that are not queued start now; only its own runs (a claim with
        # no run would dispatch any workspace's ready tasks from this request).
        for run_id in result.get("run_ids", []):
            self.dispatch_ready(run_id)
        return result

    def get_backfill(self, workspace_id: str, backfill_id: uuid.UUID) -> tuple[Row, list[Row]]:
        return backfills.get_backfill(self.db, workspace_id, backfill_id)

    def cancel_backfill(self, workspace_id: str, backfill_id: uuid.UUID, *, actor: str) -> int:
        cancelled = backfills.cancel_backfill(self.db, workspace_id, backfill_id, actor=actor)
        row, _ = self.get_backfill(workspace_id, backfill_id)
        self._start_queued(workspace_id, str(row["pipeline_id"]))
        return cancelled

    # worker services
    def register_worker(self, workspace_id: str, **registration: Any) -> workers.Registration:
        return workers.register(self.db, self.settings, workspace_id, **registration)

    def list_workers(self, workspace_id: str) -> list[Row]:
        return workers.list_workers(self.db, workspace_id, self.settings.worker_stale_after_s)

    def task_code_history(self, workspace_id: str, task_name: str) -> list[Row]:
        return workers.code_history(self.db, workspace_id, task_name)

    def list_api_keys(self, workspace_id: str) -> list[Row]:
        return keys.list_api_keys(self.db, workspace_id)

    def revoke_api_key(self, principal: keys.Principal, key_id: uuid.UUID) -> None:
        keys.revoke_api_key(self.db, principal, key_id)

    # pipelines
    def create_pipeline(self, workspace_id: str, raw: Any, *, actor: str | None = None) -> pipelines.SavedPipeline:
        notifications.check_definition_targets(self.settings, raw)  # the deployment's address policy
        return pipelines.create_pipeline(self.db, workspace_id, raw, actor=actor)

    def update_pipeline(
        self, workspace_id: str, pipeline_id: str, raw: Any, *, actor: str | None = None, create_missing: bool = False
    ) -> pipelines.SavedPipeline:
        notifications.check_definition_targets(self.settings, raw)
        return pipelines.update_pipeline(self.db, workspace_id, pipeline_id, raw, actor=actor, create_missing=create_missing)

    def get_pipeline(self, workspace_id: str, pipeline_id: str) -> Row:
        return pipelines.get_pipeline(self.db, workspace_id, pipeline_id)

    def list_pipelines(self, workspace_id: str, *, limit: int = 100, after_id: str | None = None) -> list[Row]:
        return pipelines.list_pipelines(self.db, workspace_id, limit=limit, after_id=after_id)

    def set_paused(self, workspace_id: str, pipeline_id: str, paused: bool) -> Row:
        return pipelines.set_paused(self.db, workspace_id, pipeline_id, paused)

    def delete_pipeline(
        self, workspace_id: str, pipeline_id: str, *, cancel_runs: bool = False, actor: str = "api"
    ) -> pipelines.DeletedPipeline:
        return pipelines.delete_pipeline(self.db, workspace_id, pipeline_id, cancel_runs=cancel_runs, actor=actor)

    def list_schedules(self, workspace_id: str, pipeline_ids: list[str] | None = None) -> list[Row]:
        """Schedules with their next fire times (computed from database time)."""
        with self.db.connection() as conn:
            now = schedule_store.db_now(conn)
            rows = schedule_store.list_schedules(conn, workspace_id, pipeline_ids)
        for row in rows:
            row["next_fire_times"] = scheduling.next_fire_times(row, now)
        return rows

    # runs
    def trigger_run(
        self, workspace_id: str, pipeline_id: str, *, versions: list[str] | None = None,
        params: dict[str, Any] | None = None, trigger: str = "manual", triggered_by: str | None = None,
        idempotency_key: str | None = None, dispatch_now: bool = True,
    ) -> runs.TriggeredRun:
        result = runs.trigger_run(
            self.db, self.settings, workspace_id, pipeline_id, versions=versions, params=params or {},
            trigger=trigger, triggered_by=triggered_by, idempotency_key=idempotency_key,
        )
        if result.created and dispatch_now:
            # Start the roots now rather than at the next tick (up to a minute away on AWS).
            self.dispatch_ready(result.id)
        return result

    def get_run(self, workspace_id: str, run_id: uuid.UUID) -> tuple[Row, list[Row]]:
        """A run with every one of its tasks: for in-process callers and tests. The API answers
        with `run_summary` and pages (`list_run_tasks`, `list_run_nodes`): a run may have 100,000 tasks."""
        return runs.get_run(self.db, workspace_id, run_id)

    def run_summary(
        self, workspace_id: str, run_id: uuid.UUID, *, tasks_limit: int = runs.FIRST_TASK_PAGE,
        include_attempts: bool = False, items: bool = True,
    ) -> Row:
        return runs.run_summary(self.db, workspace_id, run_id, tasks_limit=tasks_limit,
                                include_attempts=include_attempts, items=items)

    def list_run_tasks(
        self, workspace_id: str, run_id: uuid.UUID, *, status: str | None = None, node: str | None = None,
        after: tuple[Any, ...] | None = None, limit: int = runs.FIRST_TASK_PAGE, include_attempts: bool = False,
        items: bool = True,
    ) -> runs.TaskPage:
        return runs.list_run_tasks(self.db, workspace_id, run_id, status=status, node=node, after=after,
                                   limit=limit, include_attempts=include_attempts, items=items)

    def list_run_nodes(
        self, workspace_id: str, run_id: uuid.UUID, *, after: int | None = None, limit: int = runs.FIRST_NODE_PAGE,
    ) -> runs.NodePage:
        return runs.list_run_nodes(self.db, workspace_id, run_id, after=after, limit=limit)

    # orchestrations and outputs
    def trigger_orchestration(
        self, workspace_id: str, *, root: str | None = None, include: str = "upstream",
        pipeline_ids: list[str] | None = None, versions: list[str] | None = None,
        params: dict[str, Any] | None = None, trigger: str = "manual", triggered_by: str | None = None,
        idempotency_key: str | None = None, dispatch_now: bool = True,
    ) -> orchestrations.Orchestration:
        result = orchestrations.trigger_orchestration(
            self.db, self.settings, workspace_id, root=root, include=include, pipeline_ids=pipeline_ids,
            versions=versions, params=params or {}, trigger=trigger, triggered_by=triggered_by,
            idempotency_key=idempotency_key,
        )
        if result.created and dispatch_now:
            for run in result.runs:
                if run["status"] == "running":
                    self.dispatch_ready(run["id"])
        return result

    def get_orchestration(self, workspace_id: str, orchestration_id: uuid.UUID) -> tuple[Row, list[Row]]:
        return orchestrations.get_orchestration(self.db, workspace_id, orchestration_id)

    def validate_pipelines(self, workspace_id: str, raws: list[Any]) -> dict[str, Any]:
        report = pipelines.validate_pipelines(self.db, workspace_id, raws)
        for entry in report["pipelines"]:  # the deployment's address policy for `notify` targets
            problems = notifications.definition_target_problems(self.settings, raws[entry["index"]])
            if problems:
                entry["valid"] = False
                entry["errors"] = [*entry["errors"], *problems]
                report["valid"] = False
        return report

    def list_outputs(
        self, workspace_id: str, *, pipeline_id: str | None = None, version: str | None = None,
        output: str | None = None, limit: int = 50, before: tuple[datetime, uuid.UUID] | None = None,
    ) -> list[Row]:
        return outputs.list_outputs(
            self.db, workspace_id, pipeline_id=pipeline_id, version=version, output=output, limit=limit, before=before
        )

    def get_output(self, workspace_id: str, output_id: uuid.UUID) -> Row:
        return outputs.get_output(self.db, workspace_id, output_id)

    def output_content(self, workspace_id: str, output_id: uuid.UUID) -> bytes:
        return outputs.output_content(self.db, self.settings, workspace_id, output_id)

    def task_output_content(self, workspace_id: str, task_id: uuid.UUID) -> bytes:
        return outputs.task_output_content(self.db, self.settings, workspace_id, task_id)

    def list_runs(
        self, workspace_id: str, *, pipeline_id: str | None = None, status: str | None = None, limit: int = 50,
        before: tuple[datetime, uuid.UUID] | None = None,
    ) -> list[Row]:
        return runs.list_runs(self.db, workspace_id, pipeline_id=pipeline_id, status=status, limit=limit, before=before)

    def get_task(self, workspace_id: str, task_id: uuid.UUID) -> tuple[Row, list[Row]]:
        return runs.get_task(self.db, workspace_id, task_id)

    # operators
    def cancel_run(self, workspace_id: str, run_id: uuid.UUID, *, actor: str) -> Row:
        run = operations.cancel_run(self.db, workspace_id, run_id, actor=actor)
        self._start_queued(workspace_id, str(run["pipeline_id"]))
        return run

    def redrive_run(self, workspace_id: str, run_id: uuid.UUID) -> int:
        count = operations.redrive_run(self.db, workspace_id, run_id)
        self.dispatch_ready(run_id)
        return count

    def decide(
        self, workspace_id: str, task_id: uuid.UUID, *, kind: str, succeeded: bool, actor: str,
        comment: str | None = None,
    ) -> AttemptResult:
        result = operations.decide(
            self.db, workspace_id, task_id, kind=kind, succeeded=succeeded, actor=actor, comment=comment
        )
        self._after_settled(result)
        return result

    def list_dead_letters(
        self, workspace_id: str, *, pipeline_id: str | None = None, include_retried: bool = False, limit: int = 50,
        before: tuple[datetime, uuid.UUID] | None = None,
    ) -> list[Row]:
        return operations.list_dead_letters(
            self.db, workspace_id, pipeline_id=pipeline_id, include_retried=include_retried, limit=limit,
            before=before,
        )

    def retry_dead_letter(self, workspace_id: str, entry_id: uuid.UUID) -> Row:
        entry = operations.retry_dead_letter(self.db, workspace_id, entry_id)
        self.dispatch_ready(entry["run_id"])
        return entry

    def get_dead_letter(self, workspace_id: str, entry_id: uuid.UUID) -> Row:
        return operations.get_dead_letter(self.db, workspace_id, entry_id)

    def purge_dead_letters(self, workspace_id: str, older_than_days: Any) -> int:
        return operations.purge_dead_letters(self.db, workspace_id, older_than_days)

    def _start_queued(self, workspace_id: str, pipeline_id: str) -> None:
        for run_id in self.db.run_in_transaction(lambda conn: runs.start_queued_runs(conn, workspace_id, pipeline_id)):
            self.dispatch_ready(run_id)

    def _after_settled(self, result: AttemptResult) -> None:
        """Eager continuation after a task settled: dispatch what it made ready, and start a run
        queued behind its run if that one ended. The tick is only the safety net."""
        if result.claimed:
            self.dispatcher.dispatch(result.claimed, result.context)
        elif result.accepted and (result.newly_ready or result.frees_map_slot) and result.run_id is not None:
            self.dispatch_ready(result.run_id)
        for run_id in result.started_runs:  # downstream runs of its orchestration, released
            self.dispatch_ready(run_id)
        if result.run_status in ("succeeded", "failed") and result.workspace_id and result.pipeline_id:
            self._start_queued(result.workspace_id, result.pipeline_id)
            self.start_pipeline_triggers()

    def start_pipeline_triggers(self) -> list[uuid.UUID]:
        """Create the runs of later triggers decided by runs that ended, and dispatch their roots."""
        created = orchestrations.process_pipeline_triggers(self.db, self.settings, self.settings.tick_batch_size)
        for run_id in created:
            self.dispatch_ready(run_id)
        return created

    # worker protocol
    # `seen`: the request came from a worker over the API (its routes pass True), so the worker
    # serving the task is marked seen (engine.workers.WorkerSightings: throttled, after the
    # callback's own statement). In-process callers (the local transport, tests) leave it off.
    def record_callback(
        self, task_id: uuid.UUID, token: str, *, status: str, output: dict[str, Any] | None,
        error: dict[str, Any] | None, seen: bool = False,
    ) -> AttemptResult:
        heard: list[tuple[str, str]] = []
        result = worker_protocol.record_callback(
            self.db, self.keyring, task_id, token, status=status, output=output, error=error, settings=self.settings,
            claim_limit=self.dispatcher.claim_limit(self.settings.tick_batch_size), heard=heard,
        )
        self._after_settled(result)
        if seen:
            self.sightings.record(self.db, heard)
        return result

    def record_callbacks(
        self, callbacks: Sequence[worker_protocol.CallbackInput], *, seen: bool = False
    ) -> list[AttemptResult | EngineError]:
        """A batch of callbacks (POST /api/callbacks): one answer each, in order; what they made
        ready is claimed in the batch's transaction and dispatched here."""
        heard: list[tuple[str, str]] = []
        batch = worker_protocol.record_callbacks(
            self.db, self.keyring, callbacks, settings=self.settings,
            claim_limit=self.dispatcher.claim_limit(self.settings.tick_batch_size), heard=heard,
            output_checks=self.output_checks,
        )
        if seen:
            self.sightings.record(self.db, heard)
        if batch.claimed:
            self.dispatcher.dispatch(batch.claimed, batch.context)
        for run_id in batch.started_runs:
            self.dispatch_ready(run_id)
        ended: set[tuple[str, str]] = set()
        for index, answer in enumerate(batch.answers):
            if not isinstance(answer, AttemptResult):
                continue
            if index in batch.by_engine:
                self._after_settled(answer)
            elif answer.run_status in ("succeeded", "failed") and answer.workspace_id and answer.pipeline_id:
                ended.add((answer.workspace_id, answer.pipeline_id))
        for workspace_id, pipeline_id in sorted(ended):
            self._start_queued(workspace_id, pipeline_id)
        if ended:
            self.start_pipeline_triggers()
        return batch.answers

    def record_heartbeat(
        self, token: str, *, progress: float | None, message: str | None, seen: bool = False
    ) -> tuple[bool, str, uuid.UUID]:
        heard: list[tuple[str, str]] = []
        answer = worker_protocol.record_heartbeat(
            self.db, self.keyring, token, progress=progress, message=message, heard=heard)
        if seen:
            self.sightings.record(self.db, heard)
        return answer

    # metrics
    def metrics(self, workspace_id: str, *, window_s: int = 86_400, pipeline_id: str | None = None) -> dict[str, Any]:
        """Counts, duration percentiles, failures, rates, approvals and schedule lag of the runs
        created in the last `window_s` seconds (database time)."""
        from orchestrator.engine import metrics

        return metrics.collect(self.db, workspace_id, window_s=window_s, pipeline_id=pipeline_id)

    # tick
    def dispatch_ready(self, run_id: uuid.UUID | None = None, limit: int | None = None) -> DispatchSummary:
        batch = self.dispatcher.claim_limit(limit or self.settings.tick_batch_size)
        if batch == 0:
            return DispatchSummary(0, 0)
        with self.db.transaction() as conn:
            claimed = task_store.claim_ready_tasks(conn, batch, run_id=run_id)
        return self.dispatcher.dispatch(claimed)

    def tick(self, remaining_s: Callable[[], float] | None = None) -> tick.TickSummary:
        return tick.run_tick(
            self.db, self.settings, self.dispatcher, batch_size=self.settings.tick_batch_size, remaining_s=remaining_s
        )
