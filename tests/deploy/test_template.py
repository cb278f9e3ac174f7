"""template.yaml, offline: it transforms with samtranslator (as CloudFormation's SAM transform
would), passes cfn-lint with no errors, and says what the deployment relies on: events, retries,
destinations, secrets as references, least-privilege IAM, a locked-down bucket."""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any

import cfnlint.version
import pytest
from cfnlint.api import lint_all
from cfnlint.decode import decode_str
from samtranslator.translator.transform import transform

import handler.api
import handler.worker
from infra.lock import TARGET_PYTHON
from infra.package import DEFAULT_ARCH, DEFAULT_OUTPUT
from orchestrator.config import REFERABLE_VARIABLES, REFERENCE_SUFFIX
from orchestrator.logs import parse_level

ROOT = Path(__file__).resolve().parent.parent.parent
TEMPLATE = ROOT / "template.yaml"
DB_SECRET = "arn:aws:secretsmanager:us-east-1:123456789012:secret:tickweave/db-AbCdEf"
DB_PARAMETER = "arn:aws:ssm:us-east-1:123456789012:parameter/tickweave/db"


class OfflinePolicyLoader:
    """Stands in for samtranslator's ManagedPolicyLoader, which lists IAM's managed policies over
    the network to turn policy names into ARNs. The template names managed policies by ARN only,
    so the map must never be needed; `calls` proves it."""

    def __init__(self) -> None:
        self.calls = 0

    def load(self) -> dict[str, str]:
        self.calls += 1
        return {}


@cache
def template_text() -> str:
    return TEMPLATE.read_text()


def sam_template() -> dict[str, Any]:
    template, problems = decode_str(template_text())
    assert not problems, problems
    return json.loads(json.dumps(template))  # plain dicts, as the SAM transform receives them


def transformed(**parameters: Any) -> dict[str, Any]:
    template = copy.deepcopy(sam_template())
    # what `sam package` / `sam deploy` do: the local artifact becomes its S3 location
    for resource in template["Resources"].values():
        if resource["Type"] == "AWS::Serverless::Function":
            resource["Properties"]["CodeUri"] = "s3://tickweave-artifacts/tickweave-lambda.zip"
    loader = OfflinePolicyLoader()
    result = transform(template, {"DatabaseSecretArn": DB_SECRET, **parameters}, loader)
    assert loader.calls == 0
    return result


@pytest.fixture(scope="module")
def cfn() -> dict[str, Any]:
    return transformed()


def resources(cfn: dict[str, Any], kind: str) -> dict[str, dict[str, Any]]:
    return {name: r for name, r in cfn["Resources"].items() if r["Type"] == kind}


def branches(value: Any) -> Iterator[Any]:
    """Every value an expression can take across its conditions (`Fn::If` gives both)."""
    if isinstance(value, dict) and set(value) == {"Fn::If"}:
        _, yes, no = value["Fn::If"]
        yield from branches(yes)
        yield from branches(no)
    elif isinstance(value, list):
        yield [item for element in value for item in branches(element)] if any(
            isinstance(e, dict) and "Fn::If" in e for e in value) else value
    else:
        yield value


def as_list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else [value]


def statements(cfn: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    """(resource name, statement) of every identity policy of every role and policy resource."""
    for name, resource in cfn["Resources"].items():
        documents: list[dict[str, Any]] = []
        if resource["Type"] == "AWS::IAM::Role":
            documents = [p["PolicyDocument"] for p in resource["Properties"].get("Policies", [])]
        elif resource["Type"] == "AWS::IAM::Policy":
            documents = [resource["Properties"]["PolicyDocument"]]
        for document in documents:
            for statement in document["Statement"]:
                # A statement under a condition (`Fn::If` with `AWS::NoValue`) counts as its
                # branches: whatever a deployment may be granted is checked.
                for variant in branches(statement):
                    if variant != {"Ref": "AWS::NoValue"}:
                        yield name, variant


def test_the_template_transforms_offline(cfn: dict[str, Any]) -> None:
    kinds = {r["Type"] for r in cfn["Resources"].values()}
    assert {
        "AWS::Lambda::Function", "AWS::ApiGatewayV2::Api", "AWS::Scheduler::Schedule", "AWS::S3::Bucket",
        "AWS::IAM::Role", "AWS::SecretsManager::Secret", "AWS::SSM::Parameter", "AWS::SQS::Queue",
        "AWS::Lambda::EventInvokeConfig", "AWS::Lambda::Permission",
    } <= kinds
    assert set(resources(cfn, "AWS::Lambda::Function")) == {"ApiFunction", "WorkerFunction"}
    assert set(cfn["Outputs"]) >= {"ApiUrl", "BucketName"}


@pytest.mark.parametrize("parameters", [
    {"DatabaseSecretArn": DB_PARAMETER},
    {"SubnetIds": "subnet-0123456789abcdef0,subnet-0fedcba9876543210", "SecurityGroupIds": "sg-0123456789abcdef0",
     "DatabaseHost": "tickweave.proxy-abc.us-east-1.rds.amazonaws.com", "WorkerReservedConcurrency": 50,
     "AlarmTopicArn": "arn:aws:sns:us-east-1:123456789012:ops"},
])
def test_the_template_transforms_with_other_parameters(parameters: dict[str, Any]) -> None:
    assert set(resources(transformed(**parameters), "AWS::Lambda::Function")) == {"ApiFunction", "WorkerFunction"}


def test_cfn_lint_finds_no_errors() -> None:
    problems = [m for m in lint_all(template_text()) if m.rule.severity == "error"]
    assert problems == [], "\n".join(str(m) for m in problems)


def test_cfn_lint_finds_no_errors_in_the_transformed_template(cfn: dict[str, Any]) -> None:
    problems = [m for m in lint_all(json.dumps(cfn)) if m.rule.severity == "error"]
    assert problems == [], "\n".join(str(m) for m in problems)


def test_cfn_lint_finds_no_warnings() -> None:
    warnings = [m for m in lint_all(template_text()) if m.rule.severity == "warning"]
    assert warnings == [], "\n".join(str(m) for m in warnings)


def test_cfn_lint_knows_the_runtime() -> None:
    # The no-warning tests above mean something only if cfn-lint's runtime data judges the
    # runtime: 1.58 (the current release) dates deprecations to 2027; a deprecated runtime in
    # place of ours is a warning (W2531) or, once creation is blocked, an error (E2531).
    assert tuple(int(part) for part in cfnlint.version.__version__.split(".")[:2]) >= (1, 58)
    deprecated = copy.deepcopy(sam_template())
    deprecated["Globals"]["Function"]["Runtime"] = "python3.8"
    assert [m for m in lint_all(json.dumps(deprecated)) if m.rule.id[1:] == "2531"]


def test_the_api_function_serves_http_and_runs_the_tick(cfn: dict[str, Any]) -> None:
    function = cfn["Resources"]["ApiFunction"]["Properties"]
    assert function["Handler"] == "handler.api.lambda_handler"
    assert function["Timeout"] == 30

    route = cfn["Resources"]["HttpApi"]["Properties"]["Body"]["paths"]["$default"]["x-amazon-apigateway-any-method"]
    integration = route["x-amazon-apigateway-integration"]
    assert integration["payloadFormatVersion"] == "2.0" and "${ApiFunction.Arn}" in integration["uri"]["Fn::Sub"]

    (schedule,) = resources(cfn, "AWS::Scheduler::Schedule").values()
    target = schedule["Properties"]["Target"]
    assert target["Arn"] == {"Fn::GetAtt": ["ApiFunction", "Arn"]}
    assert handler.api.is_scheduled_tick(json.loads(target["Input"]))
    assert target["RetryPolicy"] == {"MaximumRetryAttempts": 0, "MaximumEventAgeInSeconds": 60}
    assert "Name" not in schedule["Properties"]  # generated: two stacks in one account do not collide
    assert cfn["Parameters"]["TickScheduleExpression"]["Default"] == "rate(1 minute)"

    invoke_config = cfn["Resources"]["ApiFunctionEventInvokeConfig"]["Properties"]
    assert invoke_config["MaximumRetryAttempts"] == 0  # a failed tick is not retried: the next one comes


def test_failed_async_worker_invokes_go_to_a_queue(cfn: dict[str, Any]) -> None:
    function = cfn["Resources"]["WorkerFunction"]["Properties"]
    assert function["Handler"] == "handler.worker.lambda_handler"
    config = cfn["Resources"]["WorkerFunctionEventInvokeConfig"]["Properties"]
    assert config["MaximumRetryAttempts"] == 0  # the orchestrator retries, through the lease
    assert config["DestinationConfig"]["OnFailure"]["Destination"] == {"Fn::GetAtt": ["WorkerFailedInvokes", "Arn"]}
    worker_actions = {a for name, s in statements(cfn) if name == "WorkerRole" for a in as_list(s["Action"])}
    assert "sqs:SendMessage" in worker_actions


def test_the_api_dispatches_to_the_worker_function(cfn: dict[str, Any]) -> None:
    env = cfn["Resources"]["ApiFunction"]["Properties"]["Environment"]["Variables"]
    assert env["TICKWEAVE_TRANSPORTS"] == "*=lambda" and env["TICKWEAVE_LOCAL_WORKER"] == ""
    assert env["TICKWEAVE_WORKER_FUNCTION"] == {"Ref": "WorkerFunction"}
    invoke = [s for name, s in statements(cfn) if name == "ApiRole" and s["Action"] == "lambda:InvokeFunction"]
    assert invoke and {"Fn::GetAtt": ["WorkerFunction", "Arn"]} in invoke[0]["Resource"]


def test_the_bucket_is_encrypted_private_and_expires_old_run_objects(cfn: dict[str, Any]) -> None:
    bucket = cfn["Resources"]["OutputsBucket"]
    properties = bucket["Properties"]
    assert properties["BucketEncryption"]["ServerSideEncryptionConfiguration"][0]["ServerSideEncryptionByDefault"]
    assert all(properties["PublicAccessBlockConfiguration"].values())
    assert set(properties["PublicAccessBlockConfiguration"]) == {
        "BlockPublicAcls", "BlockPublicPolicy", "IgnorePublicAcls", "RestrictPublicBuckets"}
    rules = {r["Id"]: r for r in properties["LifecycleConfiguration"]["Rules"]}
    assert rules["expire-old-run-objects"]["Prefix"] == "runs/"
    assert rules["expire-old-run-objects"]["ExpirationInDays"] == {"Ref": "OutputRetentionDays"}
    assert bucket["DeletionPolicy"] == "Retain"
    (deny,) = cfn["Resources"]["OutputsBucketPolicy"]["Properties"]["PolicyDocument"]["Statement"]
    assert deny["Effect"] == "Deny" and deny["Condition"] == {"Bool": {"aws:SecureTransport": "false"}}


def test_secrets_reach_the_functions_as_references_only(cfn: dict[str, Any]) -> None:
    text = template_text()
    assert "{{resolve:" not in text  # no dynamic references: values would sit in the function configuration
    api_env = cfn["Resources"]["ApiFunction"]["Properties"]["Environment"]["Variables"]
    worker_env = cfn["Resources"]["WorkerFunction"]["Properties"]["Environment"]["Variables"]
    for name in REFERABLE_VARIABLES:
        # the reference, and the variable itself declared empty (for `sam local --env-vars` only)
        assert name + REFERENCE_SUFFIX in api_env and api_env[name] == ""
    assert api_env["DATABASE_URL_FROM"] == {"Ref": "DatabaseSecretArn"}
    assert worker_env == {"TICKWEAVE_MODE": "lambda", "TICKWEAVE_WORKER": {"Ref": "WorkerModule"},
                          "TICKWEAVE_TOKEN_KEYS_FROM": {"Ref": "TokenKeysSecret"}, "TICKWEAVE_TOKEN_KEYS": ""}
    # every variable the template sets is one the code reads
    sources = "".join((ROOT / path).read_text() for path in ("orchestrator/config.py", "handler/api.py",
                                                             "handler/worker.py"))
    for name in [*api_env, *worker_env]:
        base = name[: -len(REFERENCE_SUFFIX)] if name.endswith(REFERENCE_SUFFIX) else name
        assert f'"{base}' in sources or name.startswith("AWS_"), f"{name} is read by nothing"


def test_iam_is_least_privilege(cfn: dict[str, Any]) -> None:
    for name, statement in statements(cfn):
        assert statement["Effect"] == "Allow", (name, statement)
        for action in as_list(statement["Action"]):
            assert "*" not in action, f"{name}: wildcard action {action}"
        if as_list(statement["Action"]) == ["secretsmanager:BatchGetSecretValue"]:
            # The one exception: BatchGetSecretValue has no resource-level permissions (IAM
            # takes only "*"), and it returns only the secrets GetSecretValue is allowed on,
            # which the statements above name one by one (tests/deploy/test_template_policies.py
            # checks this under enforcement).
            assert statement["Resource"] == "*", name
            continue
        for resource in branches(statement["Resource"]):
            assert resource not in ("*", ["*"]), f"{name}: {statement['Action']} on any resource"
    by_role: dict[str, set[str]] = {}
    for name, statement in statements(cfn):
        by_role.setdefault(name, set()).update(as_list(statement["Action"]))
    assert by_role["WorkerStorageRole"] == {"s3:PutObject", "s3:GetObject"}
    assert by_role["WorkerRole"] == {"logs:CreateLogStream", "logs:PutLogEvents", "secretsmanager:GetSecretValue",
                                     "sqs:SendMessage"}
    assert by_role["ApiAssumeStorageRolePolicy"] == {"sts:AssumeRole"}
    assert by_role["ApiFunctionTickRole"] == {"lambda:InvokeFunction"}
    # workers write only node outputs; the storage role is trusted by the API function's role only
    storage = cfn["Resources"]["WorkerStorageRole"]["Properties"]
    writes = [s for name, s in statements(cfn) if name == "WorkerStorageRole" and s["Action"] == "s3:PutObject"]
    assert writes[0]["Resource"] == {"Fn::Sub": "${OutputsBucket.Arn}/runs/*"}
    (trust,) = storage["AssumeRolePolicyDocument"]["Statement"]
    assert trust["Principal"] == {"AWS": {"Fn::GetAtt": ["ApiRole", "Arn"]}}
    # managed policies: only the VPC one, and only in a VPC
    assert cfn["Resources"]["ApiRole"]["Properties"]["ManagedPolicyArns"]["Fn::If"][0] == "InVpc"
    assert "ManagedPolicyArns" not in cfn["Resources"]["WorkerRole"]["Properties"]


def test_the_code_is_the_packaged_artifact_and_the_handlers_exist() -> None:
    template = sam_template()
    functions = [r["Properties"] for r in template["Resources"].values() if r["Type"] == "AWS::Serverless::Function"]
    # on each function: `sam build` rewrites a function's relative CodeUri, not one in Globals
    assert "CodeUri" not in template["Globals"]["Function"]
    assert {f["CodeUri"] for f in functions} == {DEFAULT_OUTPUT.relative_to(ROOT).as_posix()}
    assert {f["Handler"] for f in functions} == {"handler.api.lambda_handler", "handler.worker.lambda_handler"}
    assert callable(handler.api.lambda_handler) and callable(handler.worker.lambda_handler)
    assert re.fullmatch(r"python3\.\d+", template["Globals"]["Function"]["Runtime"])


def test_every_function_runs_python_3_13_on_arm64_as_the_artifact_is_built(cfn: dict[str, Any]) -> None:
    # The zip holds compiled wheels (pydantic-core, psycopg-binary, ...) for one runtime and one
    # architecture: the template's must be the builder's defaults.
    assert (DEFAULT_ARCH, TARGET_PYTHON) == ("arm64", "3.13")
    for name, function in resources(cfn, "AWS::Lambda::Function").items():
        assert function["Properties"]["Runtime"] == f"python{TARGET_PYTHON}", name
        assert function["Properties"]["Architectures"] == [DEFAULT_ARCH], name


def test_no_api_reservation_by_default_so_the_first_deploy_fits_any_account(cfn: dict[str, Any]) -> None:
    parameter = cfn["Parameters"]["ApiReservedConcurrency"]
    assert parameter["Default"] == 0 and parameter["MinValue"] == 0
    # 0 must leave the property out: ReservedConcurrentExecutions 0 would stop the function
    assert cfn["Conditions"]["HasApiReservedConcurrency"] == {
        "Fn::Not": [{"Fn::Equals": [{"Ref": "ApiReservedConcurrency"}, 0]}]}
    assert cfn["Resources"]["ApiFunction"]["Properties"]["ReservedConcurrentExecutions"] == {
        "Fn::If": ["HasApiReservedConcurrency", {"Ref": "ApiReservedConcurrency"}, {"Ref": "AWS::NoValue"}]}
    assert set(resources(transformed(ApiReservedConcurrency=20), "AWS::Lambda::Function")) == {
        "ApiFunction", "WorkerFunction"}


ALARMED = {  # (namespace, metric, dimension value): what must wake someone
    ("AWS/Lambda", "Errors", "ApiFunction"),
    ("AWS/Lambda", "Throttles", "ApiFunction"),
    ("AWS/Lambda", "Throttles", "WorkerFunction"),  # workers throttled
    ("AWS/Lambda", "AsyncEventAge", "WorkerFunction"),  # invokes waiting in Lambda's queue
    ("AWS/Lambda", "AsyncEventsDropped", "ApiFunction"),  # scheduled ticks dropped
    ("AWS/Scheduler", "InvocationDroppedCount", "default"),  # ticks the Scheduler could not deliver
    ("AWS/SQS", "ApproximateNumberOfMessagesVisible", "WorkerFailedInvokes"),
}


def test_alarms_cover_throttled_workers_old_invokes_and_dropped_ticks(cfn: dict[str, Any]) -> None:
    found = set()
    for name, alarm in resources(cfn, "AWS::CloudWatch::Alarm").items():
        properties = alarm["Properties"]
        (dimension,) = properties["Dimensions"]
        value = dimension["Value"]
        target = value if isinstance(value, str) else (value.get("Ref") or value["Fn::GetAtt"][0])
        found.add((properties["Namespace"], properties["MetricName"], target))
        assert properties["AlarmActions"] == {
            "Fn::If": ["HasAlarmTopic", [{"Ref": "AlarmTopicArn"}], {"Ref": "AWS::NoValue"}]}, name
        assert properties["TreatMissingData"] == "notBreaching", name
    assert found == ALARMED
    ages = [a["Properties"] for a in resources(cfn, "AWS::CloudWatch::Alarm").values()
            if a["Properties"]["MetricName"] == "AsyncEventAge"]
    assert ages[0]["Threshold"] == 300_000  # the metric is in milliseconds: 5 minutes


def test_the_log_level_is_lambdas_application_log_level(cfn: dict[str, Any]) -> None:
    for name, function in resources(cfn, "AWS::Lambda::Function").items():
        logging_config = function["Properties"]["LoggingConfig"]
        assert logging_config["ApplicationLogLevel"] == {"Ref": "LogLevel"}, name
        assert logging_config["LogFormat"] == "JSON", name  # Lambda sets AWS_LAMBDA_LOG_LEVEL only then
    for level in cfn["Parameters"]["LogLevel"]["AllowedValues"]:
        parse_level(level)  # every value Lambda may pass the code understands


def test_the_database_tls_mode_and_ca_bundle_reach_the_api_function(cfn: dict[str, Any]) -> None:
    env = cfn["Resources"]["ApiFunction"]["Properties"]["Environment"]["Variables"]
    assert env["TICKWEAVE_DB_SSLMODE"] == {"Ref": "DatabaseSslMode"}
    assert env["TICKWEAVE_DB_SSLROOTCERT"] == {"Ref": "DatabaseSslRootCert"}
    assert "verify-full" in cfn["Parameters"]["DatabaseSslMode"]["AllowedValues"]


def _api_role_document(cfn: dict[str, Any], bucket: str) -> dict[str, Any]:
    """The ApiRole's statements as AWS evaluates them, `${OutputsBucket.Arn}` resolved."""
    arn = f"arn:aws:s3:::{bucket}"
    found = []
    for name, statement in statements(cfn):
        if name != "ApiRole":
            continue
        resources = []
        for resource in as_list(statement["Resource"]):
            if isinstance(resource, dict) and "Fn::Sub" in resource and isinstance(resource["Fn::Sub"], str):
                resources.append(resource["Fn::Sub"].replace("${OutputsBucket.Arn}", arn))
        if resources:
            found.append({"Effect": statement["Effect"], "Action": statement["Action"], "Resource": resources})
    return {"Version": "2012-10-17", "Statement": found}


def test_the_api_role_writes_map_manifests_and_no_other_run_object(cfn: dict[str, Any]) -> None:
    # The dispatcher writes a map node's manifest (orchestrator.engine.mapping.ensure_manifest)
    # with the API function's own role, at the key the layout builds: AWS evaluates the
    # template's statement, not a restatement of it.
    from moto.iam.access_control import IAMPolicy, PermissionResult

    from orchestrator.storage.layout import map_item_output_key, map_manifest_key, node_output_key

    policy = IAMPolicy(json.dumps(_api_role_document(cfn, "b")))
    where = ("acme", "fan", "0b0e6c8e-0000-4000-8000-000000000000", "default", "parse")

    def can(action: str, key: str) -> bool:
        return bool(policy.is_action_permitted(action, f"arn:aws:s3:::b/{key}") == PermissionResult.PERMITTED)

    assert can("s3:PutObject", map_manifest_key(*where, 3))
    assert can("s3:GetObject", map_manifest_key(*where, 3))  # its HEAD before writing
    assert not can("s3:PutObject", map_item_output_key(*where, 0, 1))
    assert not can("s3:PutObject", node_output_key(*where, 1))


def test_notifications_publish_only_to_the_stack_topic_or_the_named_ones() -> None:
    named = "arn:aws:sns:us-east-1:123456789012:ops-notifications"
    cfn = transformed(NotificationTopic="create", NotificationTopicArns=named)
    assert cfn["Resources"]["NotificationsTopic"]["Condition"] == "CreateNotificationTopic"
    assert cfn["Outputs"]["NotificationTopicArn"]["Value"] == {"Ref": "NotificationsTopic"}
    publish = {name: s for name, s in statements(cfn) if "sns:Publish" in as_list(s["Action"])}
    assert publish == {
        "ApiPublishToNotificationsTopicPolicy": {"Effect": "Allow", "Action": "sns:Publish",
                                                 "Resource": {"Ref": "NotificationsTopic"}},
        "ApiPublishToNamedTopicsPolicy": {"Effect": "Allow", "Action": "sns:Publish",
                                          "Resource": {"Ref": "NotificationTopicArns"}},
    }
    for name in publish:
        assert cfn["Resources"][name]["Properties"]["Roles"] == [{"Ref": "ApiRole"}]
    conditions = {name: cfn["Resources"][name]["Condition"] for name in publish}
    assert conditions == {"ApiPublishToNotificationsTopicPolicy": "CreateNotificationTopic",
                          "ApiPublishToNamedTopicsPolicy": "HasNotificationTopicArns"}


def test_the_lease_of_a_lambda_dispatch_covers_the_worker_functions_maximum_event_age(cfn: dict[str, Any]) -> None:
    """Lambda may keep a throttled async invoke queued up to the worker function's maximum event
    age: the API's TICKWEAVE_LAMBDA_MAX_EVENT_AGE_S (the lease of a task handed to it) is that
    same number, so a queued invoke is never taken for a lost one and sent again."""
    from orchestrator.config import load_settings

    age = cfn["Resources"]["WorkerFunctionEventInvokeConfig"]["Properties"]["MaximumEventAgeInSeconds"]
    env = cfn["Resources"]["ApiFunction"]["Properties"]["Environment"]["Variables"]
    assert int(env["TICKWEAVE_LAMBDA_MAX_EVENT_AGE_S"]) == int(age) == 900
    assert load_settings({"TICKWEAVE_LAMBDA_MAX_EVENT_AGE_S": env["TICKWEAVE_LAMBDA_MAX_EVENT_AGE_S"]}
                         ).lambda_max_event_age_s == int(age)


def test_the_tick_can_come_over_http_and_then_the_scheduler_is_off(cfn: dict[str, Any]) -> None:
    (schedule,) = resources(cfn, "AWS::Scheduler::Schedule").values()
    assert schedule["Properties"]["State"] == {"Fn::If": ["TickViaScheduler", "ENABLED", "DISABLED"]}
    assert cfn["Conditions"]["TickViaScheduler"] == {"Fn::Equals": [{"Ref": "TickVia"}, "scheduler"]}
    assert cfn["Parameters"]["TickVia"]["Default"] == "scheduler"


def test_the_api_destination_add_on_calls_the_tick_route_with_the_secret_and_never_retries() -> None:
    text = (ROOT / "infra" / "tick-api-destination.yaml").read_text()
    # Linted for the regions that offer API destinations (the reason it is an add-on: not all do).
    from cfnlint.api import ManualArgs, lint

    problems = [m for m in lint(text, config=ManualArgs(regions=["us-east-1", "eu-west-1", "ap-southeast-2"]))
                if m.rule.severity in ("error", "warning")]
    assert problems == [], "\n".join(str(m) for m in problems)
    addon, _ = decode_str(text)
    assert addon is not None
    resources_of = addon["Resources"]
    assert {name: r["Type"] for name, r in resources_of.items()} == {
        "TickConnection": "AWS::Events::Connection", "TickApiDestination": "AWS::Events::ApiDestination",
        "TickApiDestinationRole": "AWS::IAM::Role", "TickRule": "AWS::Events::Rule"}
    # the header the tick route checks, from the main stack's tick secret
    key = resources_of["TickConnection"]["Properties"]["AuthParameters"]["ApiKeyAuthParameters"]
    assert key["ApiKeyName"] == "x-tick-secret" and "TickSecretArn" in json.dumps(key["ApiKeyValue"])
    destination = resources_of["TickApiDestination"]["Properties"]
    assert destination["HttpMethod"] == "POST" and "/api/tick" in json.dumps(destination["InvocationEndpoint"])
    (target,) = resources_of["TickRule"]["Properties"]["Targets"]
    assert target["RetryPolicy"]["MaximumRetryAttempts"] == 0  # a retry would start a second tick beside it
    (policy,) = resources_of["TickApiDestinationRole"]["Properties"]["Policies"]
    assert policy["PolicyDocument"]["Statement"] == [{
        "Effect": "Allow", "Action": "events:InvokeApiDestination",
        "Resource": {"Fn::GetAtt": ["TickApiDestination", "Arn"]}}]
    # the header name is the one the route reads
    assert "x-tick-secret" in (ROOT / "orchestrator" / "api" / "routes" / "tick.py").read_text() + (
        ROOT / "orchestrator" / "api" / "common.py").read_text()


def test_a_customer_managed_key_of_the_database_secret_is_decrypted_only_through_secrets_manager_or_ssm(
    cfn: dict[str, Any],
) -> None:
    kms = [s for _, s in statements(cfn) if "kms:Decrypt" in as_list(s.get("Action", []))]
    assert kms == [{"Sid": "DecryptDatabaseSecret", "Effect": "Allow", "Action": "kms:Decrypt",
                    "Resource": {"Ref": "KmsKeyArn"},
                    "Condition": {"StringEquals": {"kms:ViaService": [
                        {"Fn::Sub": "secretsmanager.${AWS::Region}.amazonaws.com"},
                        {"Fn::Sub": "ssm.${AWS::Region}.amazonaws.com"}]}}}]
    assert cfn["Conditions"]["HasKmsKey"] == {"Fn::Not": [{"Fn::Equals": [{"Ref": "KmsKeyArn"}, ""]}]}
    # ... and only when a key is given (the statement sits under HasKmsKey in the API role).
    assert '"HasKmsKey"' in json.dumps(cfn["Resources"]["ApiRole"]["Properties"]["Policies"])
