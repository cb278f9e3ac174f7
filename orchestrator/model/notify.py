"""`notify:` targets: where a pipeline's (or a workspace's) notifications go.

Pure shape validation, like the rest of orchestrator.model. Whether a private address may be
used depends on the deployment (TICKWEAVE_ALLOW_PRIVATE_WORKER_ENDPOINTS), so that check is the
engine's (orchestrator.engine.notifications), at save time and again before each delivery.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Annotated, Any
from urllib.parse import urlsplit

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    model_serializer,
    model_validator,
)
from pydantic_core import PydanticCustomError

from orchestrator.dispatch.addresses import address_problem

# The events a target can ask for; a target without `events` gets every one of them (and any
# added later).
NOTIFICATION_EVENTS = (
    "run.failed",
    "run.succeeded_with_failures",
    "approval.waiting",
    "approval.escalated",
    "task.dead_lettered",
)
MAX_TARGETS = 20
MAX_URL_LENGTH = 2048
# arn:<partition>:sns:<region>:<12-digit account>:<topic name>; a topic name is 1 to 256
# letters, digits, '-' or '_' (a FIFO topic's ends in '.fifo').
SNS_ARN_PATTERN = r"^arn:aws(?:-[a-z]+)*:sns:[a-z]{2}(?:-[a-z]+)+-\d:\d{12}:[A-Za-z0-9_-]{1,251}(?:\.fifo)?$"
_SNS_ARN_RE = re.compile(SNS_ARN_PATTERN)
_FIELD_KEY = "field"  # == orchestrator.model.pipeline.ERROR_FIELD_KEY (not imported: no cycle)


def _field_error(field: str, message: str) -> PydanticCustomError:
    return PydanticCustomError("invalid_field", message, {_FIELD_KEY: field})


def is_private_host(host: str) -> bool:
    """Whether `host` is, as written, a loopback/private/link-local... address or `localhost`.

    Names other than localhost are not resolved here (that is the delivery's check)."""
    name = host.lower().rstrip(".")
    if name == "localhost" or name.endswith(".localhost"):
        return True
    try:
        return address_problem(ipaddress.ip_address(name.split("%", 1)[0])) is not None
    except ValueError:
        return False


def webhook_problem(url: str) -> str | None:
    """What is wrong with a webhook URL's shape, or None."""
    if len(url) > MAX_URL_LENGTH:
        return f"the URL is longer than {MAX_URL_LENGTH} characters"
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018  (raises ValueError for a bad port)
    except ValueError:
        return f"{url!r} is not a valid URL"
    if parts.scheme not in ("https", "http"):
        return f"{url!r} is not an https URL"
    if not parts.hostname:
        return f"{url!r} has no host"
    if parts.username is not None or parts.password is not None:
        # It would be shown to everyone who can read the pipeline; the body is signed instead.
        return "the URL must not carry a user name or password: receivers check the X-Tickweave-Signature header"
    if parts.fragment:
        return "the URL must not have a #fragment (it is never sent)"
    if parts.scheme == "http" and not is_private_host(parts.hostname):
        return (
            f"{url!r} uses http: use https (http is only accepted for loopback or private addresses, "
            "where TICKWEAVE_ALLOW_PRIVATE_WORKER_ENDPOINTS allows them)"
        )
    return None


def sns_problem(arn: str) -> str | None:
    if _SNS_ARN_RE.fullmatch(arn) is None:
        return f"{arn!r} is not an SNS topic ARN (arn:aws:sns:<region>:<account id>:<topic name>)"
    return None


def sns_region(arn: str) -> str:
    return arn.split(":")[3]


def _check_event(value: str) -> str:
    if value not in NOTIFICATION_EVENTS:
        raise ValueError(f"unknown event {value!r}: use one of {', '.join(NOTIFICATION_EVENTS)}")
    return value


NotificationEvent = Annotated[str, AfterValidator(_check_event)]


class NotifyTarget(BaseModel):
    """One target: `{webhook: https://..., events: [...]}` or `{sns: arn:aws:sns:..., events: [...]}`."""

    model_config = ConfigDict(extra="forbid")

    webhook: str | None = Field(default=None, json_schema_extra={"format": "uri"})
    sns: str | None = Field(default=None, json_schema_extra={"pattern": SNS_ARN_PATTERN})
    # None: every event, including any added later.
    events: list[NotificationEvent] | None = Field(default=None, min_length=1)

    @model_validator(mode="after")
    def _one_target(self) -> NotifyTarget:
        if (self.webhook is None) == (self.sns is None):
            raise _field_error("webhook", "give either webhook (an https URL) or sns (a topic ARN), one per target")
        if self.webhook is not None:
            problem = webhook_problem(self.webhook)
            if problem is not None:
                raise _field_error("webhook", problem)
        if self.sns is not None:
            problem = sns_problem(self.sns)
            if problem is not None:
                raise _field_error("sns", problem)
        if self.events is not None and len(set(self.events)) != len(self.events):
            raise _field_error("events", "an event is listed more than once")
        return self

    @model_serializer(mode="wrap")
    def _omit_absent(self, handler: SerializerFunctionWrapHandler):  # type: ignore[no-untyped-def]
        # A target stores and shows only what was written: `events` absent means all events.
        data: dict[str, Any] = handler(self)
        return {key: value for key, value in data.items() if value is not None}

    @property
    def kind(self) -> str:
        return "webhook" if self.webhook is not None else "sns"

    @property
    def address(self) -> str:
        return self.webhook if self.webhook is not None else str(self.sns)

    def wants(self, event: str) -> bool:
        return self.events is None or event in self.events


def _unique_targets(value: list[NotifyTarget]) -> list[NotifyTarget]:
    seen: set[str] = set()
    for target in value:
        if target.address in seen:
            raise ValueError(f"{target.address!r} is listed more than once; give it one entry with all its events")
        seen.add(target.address)
    return value


# `notify:` on a pipeline (None there: the workspace default applies; [] none at all) and the
# workspace default list.
NotifyList = Annotated[list[NotifyTarget], Field(max_length=MAX_TARGETS), AfterValidator(_unique_targets)]


class NotifyDefaults(BaseModel):
    """The body of PUT /api/notifications/defaults; `notify: null` clears the default."""

    model_config = ConfigDict(extra="forbid")

    notify: NotifyList | None
