"""The template's IAM policies, enforced: the deployed flow runs under the roles template.yaml
creates, with the policy documents taken from the transformed template (tests/deploy/iam.py), in
the moto server with IAM checks on.

- First, that the enforcement bites: assumed-role credentials get what their role allows and
  nothing else, for every service the code calls.
- Then every AWS call the code makes, each under the role it runs under on AWS (ApiRole: secrets,
  parameter, bucket status, output reads and writes, manifests, STS AssumeRole of the storage role
  with a session policy, Lambda invoke; WorkerRole: token keys, and the on-failure queue Lambda
  sends to with it; WorkerStorageRole narrowed by a session policy: the worker's reads and
  writes), and that removing any statement of the template breaks at least one of them: no
  statement is missing, none is unused.
- Last, the deployed flow end to end: the API function in this process under ApiRole's
  credentials, the worker function in processes of its own under WorkerRole's, a pipeline that
  declares outputs (the API writes `outputs/...`) and a pipeline that reads it (hydration).
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3
import httpx
import pytest
from botocore.config import Config
from botocore.exceptions import ClientError

from infra.s3 import MotoServer
from orchestrator.config import Settings, aws_client, fetch_reference, fetch_references
from orchestrator.dispatch.aws_lambda import LambdaTransport
from orchestrator.dispatch.base import DispatchError
from orchestrator.storage import layout
from orchestrator.storage.s3 import (
    ensure_bucket,
    head_object_facts,
    issue_storage_grant,
    orchestrator_s3,
    put_object_bytes,
    read_object_bytes,
)
from orchestrator.worker.grant_io import GrantStorage

from .conftest import WORKER_FUNCTION, AwsStack, FakeLambda, load_event, wait_until
from .iam import (
    ACCOUNT,
    PARTITION,
    REGION,
    Resolver,
    TemplateRoles,
    UnresolvableIntrinsic,
    admin_client,
    admin_credentials,
    iam_enforced,
    lambda_invoke_denied,
    role_arn,
)
from .test_template import statements, transformed

ROOT = Path(__file__).resolve().parent.parent.parent
WORKER_MODULE = "tests.deploy.enforced_tasks:worker"
API_FUNCTION = "tickweave-api"

# Statements no call of the code needs, each with the reason: the Lambda service's own use of
# the role (log delivery), a service's use of it on the code's behalf (KMS through Secrets
# Manager), or another service's role (the Scheduler's).
NOT_CALLED_BY_THE_CODE = {
    ("ApiRole", "Logs"): "Lambda's runtime writes the function's logs with its role",
    ("WorkerRole", "Logs"): "Lambda's runtime writes the function's logs with its role",
    ("ApiRole", "DecryptDatabaseSecret"): ("Secrets Manager decrypts a customer-managed key's secret on the "
                                           "function's behalf (kms:ViaService); moto's does not call KMS. "
                                           "test_template checks the statement's shape and condition"),
    ("ApiFunctionTickRole", None): "EventBridge Scheduler's role for invoking the API function",
    ("TickApiDestinationRole", None): "EventBridge's role for the optional API-destination tick",
}


# --- the template in the moto account -----------------------------------------------------------


@dataclass
class Account:
    """The resources of one stack in moto, and a resolver for the template's intrinsics."""

    endpoint: str
    stack_name: str
    bucket: str
    secrets: dict[str, str]  # tokens, tick, db, public_url (the SSM parameter's ARN)
    queue_url: str
    queue_arn: str
    topic_arn: str  # the NotificationsTopic the stack creates when NotificationTopic=create
    role_suffix: str = ""  # role names are {logical id}-{suffix}; the stack name by default

    def role_names(self, cfn: dict[str, Any]) -> dict[str, str]:
        return {name: f"{name}-{self.role_suffix or self.stack_name}"[:64] for name, resource in cfn["Resources"].items()
                if resource["Type"] == "AWS::IAM::Role"}  # conditional ones too: TemplateRoles skips them

    def resolver(self, cfn: dict[str, Any], names: Mapping[str, str] | None = None, **parameters: Any) -> Resolver:
        roles = dict(names or self.role_names(cfn))
        log_group = f"arn:{PARTITION}:logs:{REGION}:{ACCOUNT}:log-group:%s:*"
        function = f"arn:{PARTITION}:lambda:{REGION}:{ACCOUNT}:function:%s"
        refs: dict[str, Any] = {
            "OutputsBucket": self.bucket, "TokenKeysSecret": self.secrets["tokens"],
            "TickSecret": self.secrets["tick"], "DatabaseSecretArn": self.secrets["db"],
            "WorkerFunction": WORKER_FUNCTION, "ApiFunction": API_FUNCTION,
            "WorkerFailedInvokes": self.queue_url, "ApiLogGroup": "api-logs", "WorkerLogGroup": "worker-logs",
            "NotificationsTopic": self.topic_arn,
            **roles,
        }
        attributes = {
            "OutputsBucket.Arn": f"arn:{PARTITION}:s3:::{self.bucket}",
            "WorkerFunction.Arn": function % WORKER_FUNCTION, "ApiFunction.Arn": function % API_FUNCTION,
            "ApiLogGroup.Arn": log_group % "api-logs", "WorkerLogGroup.Arn": log_group % "worker-logs",
            "WorkerFailedInvokes.Arn": self.queue_arn,
            **{f"{name}.Arn": role_arn(physical) for name, physical in roles.items()},
        }
        return Resolver(cfn, refs, attributes, {"WorkerModule": WORKER_MODULE, **parameters},
                        stack_name=self.stack_name)

    def create_roles(self, cfn: dict[str, Any], **parameters: Any) -> TemplateRoles:
        return TemplateRoles.create(self.endpoint, cfn, self.resolver(cfn, **parameters), self.role_names(cfn))

    def settings(self, storage_role_arn: str) -> Settings:
        return Settings(s3_endpoint_url=self.endpoint, bucket=self.bucket, storage_role_arn=storage_role_arn)


def new_account(endpoint: str, *, stack_name: str | None = None, bucket: str | None = None,
                secrets: Mapping[str, str] | None = None, role_suffix: str = "", db_in_ssm: bool = False) -> Account:
    """The stack's resources (created with the test's own credentials, before enforcement)."""
    stack_name = stack_name or f"iam{uuid.uuid4().hex[:10]}"
    bucket = bucket or f"policies-{stack_name}"
    ensure_bucket(Settings(s3_endpoint_url=endpoint, bucket=bucket))
    if secrets is None:
        sm = admin_client("secretsmanager", endpoint)
        ssm = admin_client("ssm", endpoint)
        made = {name: sm.create_secret(Name=f"tickweave/{stack_name}/{name}", SecretString=value)["ARN"]
                for name, value in (("tokens", '{"kid": "k1", "key": "x"}'), ("tick", "t"), ("db", "postgresql://x"))}
        if db_in_ssm:  # DatabaseSecretArn may name an SSM SecureString parameter instead
            ssm.put_parameter(Name=f"/tickweave/{stack_name}/db", Value="postgresql://x", Type="SecureString")
            made["db"] = ssm.get_parameter(Name=f"/tickweave/{stack_name}/db")["Parameter"]["ARN"]
        parameter = f"/tickweave/{stack_name}/public-url"
        ssm.put_parameter(Name=parameter, Value="http://127.0.0.1:1", Type="String")
        made["public_url"] = ssm.get_parameter(Name=parameter)["Parameter"]["ARN"]
        secrets = made
    sqs = admin_client("sqs", endpoint)
    queue_url = sqs.create_queue(QueueName=f"failed-{stack_name}")["QueueUrl"]
    queue_arn = sqs.get_queue_attributes(QueueUrl=queue_url, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
    topic_arn = admin_client("sns", endpoint).create_topic(Name=f"notifications-{stack_name}")["TopicArn"]
    return Account(endpoint, stack_name, bucket, dict(secrets), queue_url, queue_arn, topic_arn, role_suffix)


def forget_aws_clients() -> None:
    """Drop the process's cached boto3 sessions and clients (they keep the credentials they were
    built with): a fresh execution environment, whose clients pick up the credentials now in
    the environment."""
    for name, module in list(sys.modules.items()):
        if not name.startswith(("orchestrator.", "handler.")) or module is None:
            continue
        for value in list(vars(module).values()):
            if callable(getattr(value, "cache_clear", None)) and getattr(value, "__module__", None) == name:
                value.cache_clear()


@contextmanager
def running_as(credentials: Mapping[str, str]) -> Iterator[None]:
    """The process's ambient credentials (what a function's code finds in its environment) are
    `credentials` inside the block."""
    names = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")
    saved = {name: os.environ.get(name) for name in names}
    os.environ.update(zip(names, (credentials["AccessKeyId"], credentials["SecretAccessKey"],
                                  credentials.get("SessionToken", "")), strict=True))
    forget_aws_clients()
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        forget_aws_clients()


def denied(call: Callable[[], Any]) -> str | None:
    """The refusal `call` met (AccessDenied from any service, in any wrapping), else None."""
    try:
        call()
    except Exception as exc:  # the code wraps ClientError in its own errors: look at the chain
        text = f"{type(exc).__name__}: {exc}"
        cause: BaseException | None = exc
        while cause is not None:
            if isinstance(cause, ClientError) and cause.response.get("ResponseMetadata", {}).get("HTTPStatusCode") == 403:
                return text
            cause = cause.__cause__ or cause.__context__
        if "AccessDenied" in text or "not authorized" in text.lower() or "HTTP 403" in text:
            return text
        raise
    return None


# --- 1. the enforcement bites ---------------------------------------------------------------------


def test_moto_enforces_an_assumed_roles_policies_for_every_service_the_code_calls(moto_server: MotoServer) -> None:
    endpoint = moto_server.endpoint_url
    account = new_account(endpoint)
    other = admin_client("secretsmanager", endpoint).create_secret(
        Name=f"tickweave/{account.stack_name}/other", SecretString="no")["ARN"]
    iam = admin_client("iam", endpoint)
    name = f"probe-{account.stack_name}"
    iam.create_role(RoleName=name, AssumeRolePolicyDocument=json.dumps({"Version": "2012-10-17", "Statement": [
        {"Effect": "Allow", "Principal": {"Service": "lambda.amazonaws.com"}, "Action": "sts:AssumeRole"}]}))
    iam.put_role_policy(RoleName=name, PolicyName="p", PolicyDocument=json.dumps({"Version": "2012-10-17", "Statement": [
        {"Effect": "Allow", "Action": "s3:GetObject", "Resource": f"arn:aws:s3:::{account.bucket}/allowed/*"},
        {"Effect": "Allow", "Action": "secretsmanager:GetSecretValue", "Resource": account.secrets["tokens"]},
        {"Effect": "Allow", "Action": "ssm:GetParameter", "Resource": account.secrets["public_url"]},
        {"Effect": "Allow", "Action": "sqs:SendMessage", "Resource": account.queue_arn},
        {"Effect": "Allow", "Action": "lambda:InvokeFunction",
         "Resource": f"arn:aws:lambda:{REGION}:{ACCOUNT}:function:{WORKER_FUNCTION}"},
    ]}))
    creds = admin_client("sts", endpoint).assume_role(RoleArn=role_arn(name), RoleSessionName="probe")["Credentials"]
    s3 = admin_client("s3", endpoint)
    for key in ("allowed/a", "elsewhere/a"):
        s3.put_object(Bucket=account.bucket, Key=key, Body=b"{}")
    other_queue = admin_client("sqs", endpoint).create_queue(QueueName=f"other-{account.stack_name}")["QueueUrl"]
    fake_lambda = FakeLambda()
    fake_lambda.functions[WORKER_FUNCTION] = fake_lambda.functions["other"] = lambda event, context: {"ok": True}
    fake_lambda.authorize = lambda_invoke_denied

    def client(service: str) -> Any:
        return boto3.session.Session().client(  # type: ignore[call-overload]
            service, region_name=REGION, aws_access_key_id=creds["AccessKeyId"],
            aws_secret_access_key=creds["SecretAccessKey"], aws_session_token=creds["SessionToken"],
            endpoint_url=fake_lambda.endpoint_url if service == "lambda" else endpoint)

    try:
        with iam_enforced():
            role_s3, sm, ssm, sqs, lam = (client(s) for s in ("s3", "secretsmanager", "ssm", "sqs", "lambda"))
            assert role_s3.get_object(Bucket=account.bucket, Key="allowed/a")["Body"].read() == b"{}"
            assert denied(lambda: role_s3.get_object(Bucket=account.bucket, Key="elsewhere/a"))
            assert denied(lambda: role_s3.put_object(Bucket=account.bucket, Key="allowed/b", Body=b"{}"))
            assert sm.get_secret_value(SecretId=account.secrets["tokens"])["SecretString"]
            assert denied(lambda: sm.get_secret_value(SecretId=other))
            assert ssm.get_parameter(Name=account.secrets["public_url"])["Parameter"]["Value"]
            assert denied(lambda: ssm.get_parameter(Name=f"/tickweave/{account.stack_name}/elsewhere"))
            assert sqs.send_message(QueueUrl=account.queue_url, MessageBody="x")["MessageId"]
            assert denied(lambda: sqs.send_message(QueueUrl=other_queue, MessageBody="x"))
            assert lam.invoke(FunctionName=WORKER_FUNCTION, InvocationType="Event", Payload=b"{}")["StatusCode"] == 202
            assert denied(lambda: lam.invoke(FunctionName="other", InvocationType="Event", Payload=b"{}"))
            assert denied(lambda: role_s3.get_object(Bucket=account.bucket, Key="allowed/a", Range="bytes=0-0")) is None
            # a presigned URL is the request of the credentials that signed it, signature checked
            signer = boto3.session.Session().client(  # type: ignore[call-overload]
                "s3", region_name=REGION, endpoint_url=endpoint, config=Config(signature_version="s3v4"),
                aws_access_key_id=creds["AccessKeyId"], aws_secret_access_key=creds["SecretAccessKey"],
                aws_session_token=creds["SessionToken"])
            allowed = signer.generate_presigned_url("get_object", Params={"Bucket": account.bucket, "Key": "allowed/a"})
            elsewhere = signer.generate_presigned_url("get_object", Params={"Bucket": account.bucket, "Key": "elsewhere/a"})
            put = signer.generate_presigned_url("put_object", Params={"Bucket": account.bucket, "Key": "allowed/b"})
            assert httpx.get(allowed).content == b"{}"
            assert httpx.get(elsewhere).status_code == 403
            assert httpx.put(put, content=b"{}").status_code == 403
            tampered = allowed.replace("X-Amz-Signature=", "X-Amz-Signature=0")
            assert httpx.get(tampered).status_code == 403
            # credentials moto never issued are refused outright, not waved through
            stranger = boto3.session.Session().client(
                "s3", region_name=REGION, endpoint_url=endpoint, aws_access_key_id="AKIAEXAMPLEEXAMPLE00",
                aws_secret_access_key="x")
            with pytest.raises(ClientError, match="InvalidAccessKeyId"):
                stranger.get_object(Bucket=account.bucket, Key="allowed/a")
    finally:
        fake_lambda.wait_idle()
        fake_lambda.close()


def test_the_resolver_fails_loudly_on_what_it_cannot_resolve(moto_server: MotoServer) -> None:
    cfn = transformed()
    account = new_account(moto_server.endpoint_url)
    resolver = account.resolver(cfn)
    for expression in ({"Fn::ImportValue": "shared-bucket"}, {"Ref": "SomethingElse"},
                       {"Fn::GetAtt": ["OutputsBucket", "DomainName"]}, {"Fn::Sub": "${Nowhere.Arn}/x"},
                       {"Fn::If": ["NoSuchCondition", "a", "b"]}):
        with pytest.raises(UnresolvableIntrinsic):
            resolver.resolve(expression)
    # every document of the template resolves to plain JSON naming this account's resources
    for name, statement in statements(cfn):
        if name == "ApiPublishToNotificationsTopicPolicy":  # conditional: not in this stack
            continue
        resolved = json.dumps(resolver.resolve(statement))
        assert "Fn::" not in resolved and '"Ref"' not in resolved, (name, resolved)
    api = resolver.resolve(cfn["Resources"]["ApiRole"]["Properties"]["Policies"][0]["PolicyDocument"])
    by_sid = {s["Sid"]: s for s in api["Statement"]}
    assert by_sid["ReadSecrets"]["Resource"] == [account.secrets[n] for n in ("tokens", "tick", "db")]
    assert by_sid["ReadParameters"]["Resource"] == [account.secrets["public_url"]]


# --- 2. every call of the code, under its role ----------------------------------------------------


@dataclass
class Probe:
    role: str  # the logical role id of the template whose credentials the call runs under
    what: str
    call: Callable[[], Any]


@dataclass
class Calls:
    account: Account
    roles: TemplateRoles
    credentials: dict[str, dict[str, str]]
    fake_lambda: FakeLambda

    def probes(self) -> list[Probe]:
        account = self.account
        settings = account.settings(self.roles.arns["WorkerStorageRole"])
        where = ("acme", "etl", str(uuid.uuid4()), "default")
        output_key = layout.node_output_key(*where, "load", 1)
        upstream_key = layout.node_output_key(*where, "extract", 1)
        hydrated_key = layout.pipeline_output_key("acme", "fetch", str(uuid.uuid4()), "default", "archive", 1)
        admin = admin_client("s3", account.endpoint, self.credentials["admin"])
        for key in (upstream_key, hydrated_key):
            admin.put_object(Bucket=account.bucket, Key=key, Body=b'{"rows": 3}')
        grants: dict[str, Any] = {}

        def grant(access: str) -> None:
            grants[access] = issue_storage_grant(
                settings, output_key=output_key, read_keys=[upstream_key, hydrated_key], task_id="t-1",
                write_prefix=layout.node_attempt_prefix(*where, "load", 1),
                log_key=layout.attempt_log_key(*where, "load", 1), access=access)  # type: ignore[arg-type]

        def worker_storage(access: str = "credentials") -> GrantStorage:
            if access not in grants:
                raise PermissionError("AccessDenied before: no grant (the AssumeRole probe was refused)")
            return GrantStorage(grants[access])

        transport = LambdaTransport(WORKER_FUNCTION, region=REGION)

        def invoke() -> None:
            try:
                transport.send({"probe": True})
            finally:
                transport.close()

        def failure_record() -> None:
            # what Lambda sends, with the worker function's role, for an invoke that failed
            sqs = boto3.session.Session().client("sqs", region_name=REGION, endpoint_url=account.endpoint)
            sqs.send_message(QueueUrl=account.queue_url, MessageBody=json.dumps({"requestPayload": {}}))

        return [
            Probe("ApiRole", "token keys", lambda: fetch_reference(account.secrets["tokens"])),
            Probe("ApiRole", "tick secret", lambda: fetch_reference(account.secrets["tick"])),
            Probe("ApiRole", "database secret", lambda: fetch_reference(account.secrets["db"])),
            Probe("ApiRole", "public URL parameter", lambda: fetch_reference(account.secrets["public_url"])),
            # the first event's reads: BatchGetSecretValue first (a refusal falls back to one
            # GetSecretValue each, so the batch is probed on its own too)
            Probe("ApiRole", "the first event's references, together", lambda: fetch_references(
                [account.secrets[name] for name in ("tokens", "tick", "db", "public_url")])),
            Probe("ApiRole", "secrets in one BatchGetSecretValue", lambda: aws_client("secretsmanager").batch_get_secret_value(
                SecretIdList=[account.secrets[name] for name in ("tokens", "tick", "db")
                              if ":secretsmanager:" in account.secrets[name]])),
            Probe("ApiRole", "bucket status (GET /api/info)",
                  lambda: orchestrator_s3(settings).head_bucket(Bucket=account.bucket)),
            Probe("ApiRole", "node output check (HeadObject)", lambda: head_object_facts(settings, upstream_key)),
            Probe("ApiRole", "node output read", lambda: read_object_bytes(settings, upstream_key)),
            Probe("ApiRole", "pipeline output write", lambda: put_object_bytes(
                settings, layout.pipeline_output_key(*where[:3], "default", "report", 1), b"{}")),
            Probe("ApiRole", "pipeline output read", lambda: read_object_bytes(settings, hydrated_key)),
            Probe("ApiRole", "map manifest write", lambda: put_object_bytes(
                settings, layout.map_manifest_key(*where, "fan", 1), b"{}")),
            Probe("ApiRole", "scoped credentials (AssumeRole + session policy)", lambda: grant("credentials")),
            Probe("ApiRole", "presigned URLs (signed with a storage role session)", lambda: grant("urls")),
            Probe("ApiRole", "dispatch (Lambda invoke)", invoke),
            Probe("WorkerRole", "token keys", lambda: fetch_reference(account.secrets["tokens"])),
            Probe("WorkerRole", "on-failure destination (SQS send)", failure_record),
            Probe("WorkerStorageRole", "upstream node output read", lambda: worker_storage().read_bytes(upstream_key)),
            Probe("WorkerStorageRole", "upstream pipeline output read (hydration)",
                  lambda: worker_storage().read_bytes(hydrated_key)),
            Probe("WorkerStorageRole", "output write", lambda: worker_storage().write_output(b'{"rows": 3}')),
            Probe("WorkerStorageRole", "log write", lambda: worker_storage().write_log(b"done\n")),
            Probe("WorkerStorageRole", "URL: upstream read", lambda: worker_storage("urls").read_bytes(upstream_key)),
            Probe("WorkerStorageRole", "URL: hydration read", lambda: worker_storage("urls").read_bytes(hydrated_key)),
            Probe("WorkerStorageRole", "URL: output write", lambda: worker_storage("urls").write_output(b"{}")),
            Probe("WorkerStorageRole", "URL: log write", lambda: worker_storage("urls").write_log(b"done\n")),
        ]

    def run(self) -> dict[str, str]:
        """Every probe under its role's credentials; the refusals by probe."""
        refusals: dict[str, str] = {}
        with iam_enforced():
            for probe in self.probes():
                if probe.role == "WorkerStorageRole":  # the grant's own credentials, no ambient ones
                    credentials = self.credentials["nobody"]
                else:
                    credentials = self.credentials[probe.role]
                with running_as(credentials):
                    refusal = denied(probe.call)
                if refusal is not None:
                    refusals[f"{probe.role}: {probe.what}"] = refusal
        return refusals


@pytest.fixture
def calls_for(moto_server: MotoServer, restore_environ: None) -> Iterator[Callable[..., Calls]]:
    endpoint = moto_server.endpoint_url
    fake_lambda = FakeLambda()
    fake_lambda.functions[WORKER_FUNCTION] = lambda event, context: None
    fake_lambda.authorize = lambda_invoke_denied
    os.environ["AWS_ENDPOINT_URL_LAMBDA"] = fake_lambda.endpoint_url
    for name in ("AWS_ENDPOINT_URL_SECRETS_MANAGER", "AWS_ENDPOINT_URL_SSM"):
        os.environ[name] = endpoint

    def make(cfn: dict[str, Any], *, db_in_ssm: bool = False, **parameters: Any) -> Calls:
        account = new_account(endpoint, db_in_ssm=db_in_ssm)
        roles = account.create_roles(cfn, **parameters)
        credentials = {role: roles.assume(endpoint, role) for role in ("ApiRole", "WorkerRole")}
        credentials["admin"] = admin_credentials(endpoint)
        credentials["nobody"] = {"AccessKeyId": "AKIANOBODYNOBODY0000", "SecretAccessKey": "x"}
        return Calls(account, roles, credentials, fake_lambda)

    try:
        yield make
    finally:
        fake_lambda.wait_idle()
        fake_lambda.close()


@pytest.mark.parametrize("db_in_ssm", [False, True], ids=["db-in-secrets-manager", "db-in-ssm"])
def test_every_call_the_code_makes_is_allowed_by_the_template(calls_for: Callable[..., Calls], db_in_ssm: bool) -> None:
    calls = calls_for(transformed(), db_in_ssm=db_in_ssm)
    assert calls.run() == {}
    assert [json.loads(i.payload) if isinstance(i.payload, str) else i.payload
            for i in calls.fake_lambda.invocations] == [{"probe": True}]


def _statement_ids(cfn: dict[str, Any]) -> list[tuple[str, str | None, int]]:
    """(resource, Sid, index) of every statement of every role and policy resource."""
    found: list[tuple[str, str | None, int]] = []
    counters: dict[str, int] = {}
    for name, statement in statements(cfn):
        index = counters.get(name, 0)
        counters[name] = index + 1
        found.append((name, statement.get("Sid"), index))
    return found


def _without(cfn: dict[str, Any], resource: str, index: int) -> dict[str, Any]:
    """A copy of the transformed template with one statement of `resource` taken out."""
    copied = copy.deepcopy(cfn)
    properties = copied["Resources"][resource]["Properties"]
    documents = ([p["PolicyDocument"] for p in properties["Policies"]] if "Policies" in properties
                 else [properties["PolicyDocument"]])
    for document in documents:
        if index < len(document["Statement"]):
            del document["Statement"][index]
            if not document["Statement"]:  # IAM refuses an empty document: a no-op stands in
                document["Statement"] = [{"Effect": "Deny", "Action": "s3:GetObject",
                                          "Resource": "arn:aws:s3:::nothing-here/*"}]
            return copied
        index -= len(document["Statement"])
    raise AssertionError(f"{resource} has no statement {index}")


CFN = transformed()


@pytest.mark.parametrize(("resource", "sid", "index"), [
    pytest.param(*ids, id=f"{ids[0]}-{ids[1] or ids[2]}") for ids in _statement_ids(CFN)
    if ids[0] in ("ApiRole", "WorkerRole", "WorkerStorageRole", "ApiAssumeStorageRolePolicy")
    and (ids[0], ids[1]) not in NOT_CALLED_BY_THE_CODE  # each named there with its reason
])
def test_every_statement_is_needed_by_a_call_of_the_code(
    calls_for: Callable[..., Calls], resource: str, sid: str | None, index: int,
) -> None:
    refusals = calls_for(_without(CFN, resource, index)).run()
    assert refusals, f"without {resource}'s statement {sid or index}, every call of the code still passes"


def test_statements_nothing_here_calls_are_only_the_listed_ones() -> None:
    # The statements left out above are exactly those named in NOT_CALLED_BY_THE_CODE, and every
    # resource of the template holding statements is either tested or named there.
    holders = {name for name, _, _ in _statement_ids(CFN)}
    tested = {"ApiRole", "WorkerRole", "WorkerStorageRole", "ApiAssumeStorageRolePolicy",
              *PUBLISH_POLICIES}  # those two by the notifications test below
    assert "ApiFunctionTickRole" in holders
    assert holders - tested <= {name for name, sid in NOT_CALLED_BY_THE_CODE if sid is None}
    sids = {(name, sid) for name, sid, _ in _statement_ids(CFN)}
    assert {key for key in NOT_CALLED_BY_THE_CODE if key[1] is not None} <= sids


# --- 3. the deployed flow under the roles -----------------------------------------------------------


@dataclass
class EnforcedStack:
    aws: AwsStack
    account: Account
    roles: TemplateRoles
    admin: dict[str, str]
    worker_runs: list[subprocess.CompletedProcess[str]]

    def s3(self) -> Any:
        return admin_client("s3", self.account.endpoint, self.admin)

    def keys(self, prefix: str) -> list[str]:
        pages = self.s3().get_paginator("list_objects_v2").paginate(Bucket=self.account.bucket, Prefix=prefix)
        return sorted(obj["Key"] for page in pages for obj in page.get("Contents", []))


ROLE_SUFFIX = f"deploy-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def aws_stack_environment() -> dict[str, str]:
    # The API function's runtime is built by `aws_stack` (uvicorn serves its app): the storage
    # role it assumes must be the one the test creates from the template, named ahead.
    return {"TICKWEAVE_STORAGE_ROLE_ARN": role_arn(f"WorkerStorageRole-{ROLE_SUFFIX}")}


def enforced_stack(aws_stack: AwsStack, moto_server: MotoServer, monkeypatch: pytest.MonkeyPatch,
                   cfn: dict[str, Any]) -> Iterator[EnforcedStack]:
    endpoint = moto_server.endpoint_url
    stack_name = aws_stack.bucket.removeprefix("deploy-")  # aws_stack's SSM parameter: /tickweave/{it}/public-url
    account = new_account(endpoint, stack_name=stack_name, bucket=aws_stack.bucket, secrets=aws_stack.secret_arns,
                          role_suffix=f"{ROLE_SUFFIX}-{uuid.uuid4().hex[:6]}")
    # the storage role under the name the API function was configured with; the others unique
    names = {**account.role_names(cfn), "WorkerStorageRole": f"WorkerStorageRole-{ROLE_SUFFIX}"}
    stale = admin_client("iam", endpoint)
    try:  # the previous test's copy of it (moto's IAM outlives a test)
        for policy in stale.list_role_policies(RoleName=names["WorkerStorageRole"])["PolicyNames"]:
            stale.delete_role_policy(RoleName=names["WorkerStorageRole"], PolicyName=policy)
        stale.delete_role(RoleName=names["WorkerStorageRole"])
    except ClientError:
        pass
    roles = TemplateRoles.create(endpoint, cfn, account.resolver(cfn, names=names), names)
    admin = admin_credentials(endpoint)
    api = roles.assume(endpoint, "ApiRole", "tickweave-api")
    worker = roles.assume(endpoint, "WorkerRole", "tickweave-worker")
    resolver = account.resolver(cfn, names=names)

    # The API function: this process, with ApiRole's credentials (its clients are built lazily,
    # and the cached ones are dropped)
    assert aws_stack.settings.storage_role_arn == resolver.resolve(
        cfn["Resources"]["ApiFunction"]["Properties"]["Environment"]["Variables"]["TICKWEAVE_STORAGE_ROLE_ARN"])
    for name, value in (("AWS_ACCESS_KEY_ID", api["AccessKeyId"]), ("AWS_SECRET_ACCESS_KEY", api["SecretAccessKey"]),
                        ("AWS_SESSION_TOKEN", api["SessionToken"])):
        monkeypatch.setenv(name, value)
    forget_aws_clients()

    # The worker function: a process per invoke, with the template's environment and WorkerRole's
    # credentials; an invoke that fails goes to the on-failure queue, sent with that role.
    worker_env = {name: str(value) for name, value in resolver.resolve(
        cfn["Resources"]["WorkerFunction"]["Properties"]["Environment"]["Variables"]).items()}
    worker_env.update({
        "PATH": os.environ["PATH"], "PYTHONPATH": str(ROOT), "AWS_REGION": REGION, "AWS_DEFAULT_REGION": REGION,
        "AWS_ACCESS_KEY_ID": worker["AccessKeyId"], "AWS_SECRET_ACCESS_KEY": worker["SecretAccessKey"],
        "AWS_SESSION_TOKEN": worker["SessionToken"], "AWS_ENDPOINT_URL_SECRETS_MANAGER": endpoint,
        "AWS_ENDPOINT_URL_SSM": endpoint, "AWS_LAMBDA_FUNCTION_NAME": WORKER_FUNCTION,
    })
    runs: list[subprocess.CompletedProcess[str]] = []

    def worker_function(event: dict[str, Any], context: Any) -> Any:
        done = subprocess.run([sys.executable, "-m", "tests.deploy.run_worker"], input=json.dumps(event),
                              capture_output=True, text=True, env=worker_env, cwd=ROOT, timeout=120, check=False)
        runs.append(done)
        if done.returncode != 0:
            sqs = admin_client("sqs", endpoint, worker)
            sqs.send_message(QueueUrl=account.queue_url, MessageBody=json.dumps(
                {"requestPayload": event, "responseContext": {"functionError": "Unhandled"}}))
            raise RuntimeError(done.stderr[-4000:])
        return json.loads(done.stdout)

    aws_stack.fake_lambda.functions[WORKER_FUNCTION] = worker_function
    aws_stack.fake_lambda.authorize = lambda_invoke_denied
    try:
        with iam_enforced():
            yield EnforcedStack(aws_stack, account, roles, admin, runs)
            aws_stack.fake_lambda.wait_idle(120)
    finally:
        forget_aws_clients()


@pytest.fixture
def enforced(aws_stack: AwsStack, moto_server: MotoServer, monkeypatch: pytest.MonkeyPatch) -> Iterator[EnforcedStack]:
    yield from enforced_stack(aws_stack, moto_server, monkeypatch, transformed())


PRODUCER = {"id": "fetch", "nodes": [{"id": "get", "task": "echo"}],
            "outputs": {"archive": {"from": "get", "schema": {"type": "object", "required": ["rows"]}}}}
CONSUMER = {"id": "parse", "depends": [{"pipeline": "fetch", "outputs": ["archive"], "trigger": "none"}],
            "nodes": [{"id": "read", "task": "echo"}]}


def run_to_the_end(stack: AwsStack, key: str, pipeline: str) -> dict[str, Any]:
    triggered = stack.call(stack.http_event("POST", f"/api/pipelines/{pipeline}/runs", key=key, body={}))
    assert triggered["statusCode"] == 201, triggered
    run_id = json.loads(triggered["body"])["id"]

    def finished() -> dict[str, Any] | None:
        run: dict[str, Any] = json.loads(stack.call(stack.http_event("GET", f"/api/runs/{run_id}", key=key))["body"])
        return run if run["status"] in ("succeeded", "failed", "cancelled") else None

    run: dict[str, Any] = wait_until(finished, 30, f"the run of {pipeline} did not finish")
    return run


def test_a_pipeline_with_outputs_and_its_reader_run_under_the_templates_roles(enforced: EnforcedStack) -> None:
    stack = enforced.aws
    key = stack.call(load_event("create_key_invoke.json"))["key"]
    assert stack.settings.storage_role_arn == enforced.roles.arns["WorkerStorageRole"]
    # secrets and the parameter were read with ApiRole (the tick secret works; the info page's
    # storage check is ListBucket on the bucket)
    info = json.loads(stack.call(stack.http_event("GET", "/api/info"))["body"])
    assert info["database"] == "ok" and info["storage"] == "ok", info
    for pipeline in (PRODUCER, CONSUMER):
        created = stack.call(stack.http_event("POST", "/api/pipelines", key=key, body=pipeline))
        assert created["statusCode"] == 201, created

    produced = run_to_the_end(stack, key, "fetch")
    assert produced["status"] == "succeeded", (produced, [r.stderr[-2000:] for r in enforced.worker_runs])
    # the API function wrote the declared output under outputs/ with its own role
    (output_key,) = enforced.keys(f"outputs/deploy/fetch/{produced['id']}/")
    archive = json.loads(enforced.s3().get_object(Bucket=enforced.account.bucket, Key=output_key)["Body"].read())
    assert archive["rows"] == 3 and archive["node"] == "get"

    consumed = run_to_the_end(stack, key, "parse")
    assert consumed["status"] == "succeeded", (consumed, [r.stderr[-2000:] for r in enforced.worker_runs])
    (read_key,) = [k for k in enforced.keys(f"runs/deploy/parse/{consumed['id']}/") if k.endswith("output.json")]
    read = json.loads(enforced.s3().get_object(Bucket=enforced.account.bucket, Key=read_key)["Body"].read())
    # the worker read the upstream pipeline's output with its grant (hydration)
    assert read["inputs"]["fetch/archive"] == archive

    # every dispatch was an invoke Lambda allowed ApiRole, run by the worker under WorkerRole
    stack.fake_lambda.wait_idle(60)
    assert stack.fake_lambda.denied == []
    assert len(enforced.worker_runs) == 2 and all(r.returncode == 0 for r in enforced.worker_runs)
    assert all(json.loads(r.stdout)["accepted"] is True for r in enforced.worker_runs)
    # an invoke the worker function fails on lands in the on-failure queue, sent with WorkerRole
    lam = boto3.session.Session().client("lambda", region_name=REGION)  # ApiRole's, as the transport's
    assert lam.invoke(FunctionName=WORKER_FUNCTION, InvocationType="Event", Payload=b'"not a dispatch"')["StatusCode"] == 202
    stack.fake_lambda.wait_idle(60)
    assert enforced.worker_runs[-1].returncode == 1
    sqs = admin_client("sqs", enforced.account.endpoint, enforced.admin)
    (failed,) = sqs.receive_message(QueueUrl=enforced.account.queue_url, WaitTimeSeconds=1)["Messages"]
    assert json.loads(failed["Body"])["requestPayload"] == "not a dispatch"
    # the scheduled tick and the HTTP tick (its secret from Secrets Manager) run under ApiRole too
    assert stack.call(load_event("scheduler_tick.json"))["claimed"] == 0
    tick = stack.http_event("POST", "/api/tick")
    tick["headers"]["x-tick-secret"] = stack.tick_secret
    assert stack.call(tick)["statusCode"] == 200


@pytest.fixture
def enforced_without_output_writes(aws_stack: AwsStack, moto_server: MotoServer,
                                   monkeypatch: pytest.MonkeyPatch) -> Iterator[EnforcedStack]:
    """The template as it was before issue 15: ApiRole may not write under outputs/."""
    cfn = transformed()
    api = cfn["Resources"]["ApiRole"]["Properties"]["Policies"][0]["PolicyDocument"]
    before = len(api["Statement"])
    api["Statement"] = [s for s in api["Statement"] if s.get("Sid") != "WritePipelineOutputs"]
    assert len(api["Statement"]) == before - 1
    yield from enforced_stack(aws_stack, moto_server, monkeypatch, cfn)


def test_without_the_output_write_statement_the_pipeline_fails(enforced_without_output_writes: EnforcedStack) -> None:
    # The bug the tests exist for: the callback's PutObject under outputs/ is AccessDenied, the
    # API answers 500, and the worker gives up on the callback (5 s here; 5 minutes by default).
    stack = enforced_without_output_writes.aws
    key = stack.call(load_event("create_key_invoke.json"))["key"]
    assert stack.call(stack.http_event("POST", "/api/pipelines", key=key, body=PRODUCER))["statusCode"] == 201
    triggered = stack.call(stack.http_event("POST", "/api/pipelines/fetch/runs", key=key, body={}))
    run_id = json.loads(triggered["body"])["id"]
    stack.fake_lambda.wait_idle(120)
    (worker_run,) = enforced_without_output_writes.worker_runs
    assert "500" in worker_run.stderr + worker_run.stdout, worker_run
    assert worker_run.returncode == 1  # the callback undelivered: the invoke fails (to the on-failure queue)
    run = json.loads(stack.call(stack.http_event("GET", f"/api/runs/{run_id}", key=key))["body"])
    assert run["status"] != "succeeded"
    assert enforced_without_output_writes.keys("outputs/") == []


def test_the_removed_statement_makes_the_probe_fail_too(calls_for: Callable[..., Calls]) -> None:
    cfn = copy.deepcopy(CFN)
    api = cfn["Resources"]["ApiRole"]["Properties"]["Policies"][0]["PolicyDocument"]
    api["Statement"] = [s for s in api["Statement"] if s.get("Sid") != "WritePipelineOutputs"]
    assert list(calls_for(cfn).run()) == ["ApiRole: pipeline output write"]


def test_dispatch_is_refused_without_invoke_permission(calls_for: Callable[..., Calls]) -> None:
    cfn = copy.deepcopy(CFN)
    api = cfn["Resources"]["ApiRole"]["Properties"]["Policies"][0]["PolicyDocument"]
    api["Statement"] = [s for s in api["Statement"] if s.get("Sid") != "DispatchToWorker"]
    calls = calls_for(cfn)
    refusals = calls.run()
    assert list(refusals) == ["ApiRole: dispatch (Lambda invoke)"]
    assert calls.fake_lambda.invocations == [] and calls.fake_lambda.denied
    assert DispatchError.__name__ in refusals["ApiRole: dispatch (Lambda invoke)"]


PUBLISH_POLICIES = ("ApiPublishToNotificationsTopicPolicy", "ApiPublishToNamedTopicsPolicy")


def test_notifications_publish_under_the_conditional_policies_only(calls_for: Callable[..., Calls]) -> None:
    """The API function's tick publishes notifications (orchestrator.engine.notifications) with
    ApiRole: to the stack's topic when it creates one, to the topics named in the parameter, and
    to nothing else; with neither parameter, nowhere."""
    from orchestrator.engine.notifications import publish_sns

    def outcomes(calls: Calls, topics: list[str]) -> list[bool]:
        settings = calls.account.settings(calls.roles.arns["WorkerStorageRole"])
        message = {"summary": "run failed", "type": "run.failed", "id": "e-1", "data": {}, "workspace": "acme"}
        found = []
        with iam_enforced(), running_as(calls.credentials["ApiRole"]):
            for topic in topics:
                outcome = publish_sns(settings, topic, message, b"{}", uuid.uuid4())
                assert outcome.ok or "not authorized" in str(outcome.error), outcome
                found.append(outcome.ok)
        return found

    first = calls_for(CFN)  # no notification parameters: no publish policy
    named_topic = admin_client("sns", first.account.endpoint).create_topic(Name=f"named-{uuid.uuid4().hex[:8]}")["TopicArn"]
    elsewhere = admin_client("sns", first.account.endpoint).create_topic(Name=f"else-{uuid.uuid4().hex[:8]}")["TopicArn"]
    assert outcomes(first, [first.account.topic_arn, named_topic]) == [False, False]

    parameters = {"NotificationTopic": "create", "NotificationTopicArns": named_topic}
    with_topics = calls_for(transformed(**parameters), **parameters)
    assert outcomes(with_topics, [with_topics.account.topic_arn, named_topic, elsewhere]) == [True, True, False]
