"""Pipeline definition models (pydantic)."""

from orchestrator.model.pipeline import (
    SLUG_PATTERN,
    TASK_NAME_PATTERN,
    ApprovalPolicy,
    Concurrency,
    NodeDefinition,
    OutputDefinition,
    PipelineDefinition,
    PipelineDependency,
    RetryPolicy,
    ScheduleOptions,
    is_slug,
    slugify,
)
from orchestrator.model.versions import VERSION_PATTERN

__all__ = [
    "SLUG_PATTERN",
    "TASK_NAME_PATTERN",
    "VERSION_PATTERN",
    "ApprovalPolicy",
    "Concurrency",
    "NodeDefinition",
    "OutputDefinition",
    "PipelineDefinition",
    "PipelineDependency",
    "RetryPolicy",
    "ScheduleOptions",
    "is_slug",
    "slugify",
]
