"""Object layout, worker tokens and S3/STS access.

The S3 helpers live in `orchestrator.storage.s3` and are not re-exported here, so that code that
only needs keys or tokens does not pay for importing boto3.
"""

from orchestrator.storage.layout import (
    attempt_log_key,
    map_item_attempt_prefix,
    map_item_log_key,
    map_item_output_key,
    map_items_prefix,
    map_manifest_key,
    node_attempt_prefix,
    node_output_key,
    pipeline_output_key,
    run_prefix,
)
from orchestrator.storage.tokens import StorageGrant, TaskClaims, TokenInvalid, TokenKeyring

__all__ = [
    "StorageGrant",
    "TaskClaims",
    "TokenInvalid",
    "TokenKeyring",
    "attempt_log_key",
    "map_item_attempt_prefix",
    "map_item_log_key",
    "map_item_output_key",
    "map_items_prefix",
    "map_manifest_key",
    "node_attempt_prefix",
    "node_output_key",
    "pipeline_output_key",
    "run_prefix",
]
