"""template.yaml's IAM roles, made real in the moto server and enforced.

`TemplateRoles` reads the roles and policies of the TRANSFORMED template (what CloudFormation
deploys after the SAM transform), resolves the intrinsics in their documents to the ARNs of the
resources the test created in moto (`Resolver`: Ref, GetAtt, Sub, If and the Conditions; anything
else fails loudly), creates the roles and assumes them as Lambda would for the functions.

`iam_enforced()` turns moto's IAM checks on in-process and completes them where moto is more
forgiving or stricter than AWS, so that what passes here is what AWS allows:

- session policies (an AssumeRole `Policy`) intersect with the role's, as in AWS
  (`session_policies_enforced` of the fencing tests);
- Secrets Manager, SSM and SNS requests are checked against the secret's or parameter's ARN (moto
  checks them against `*`, which no resource-scoped statement matches), each of them for the
  requests naming several (BatchGetSecretValue also needs GetSecretValue on each, as on AWS),
  and refused as those services refuse (AccessDeniedException);
- a presigned S3 URL is the request of the credentials that signed it: signature, policies and
  session policy checked (moto checks only requests signed in their headers);
- HeadBucket needs s3:ListBucket, as AWS documents (moto asks for an `s3:HeadBucket` that IAM
  does not have);
- a trust policy naming a role ARN admits that role's sessions and `:root` the whole account
  (moto compares the principal string only);
- `lambda_invoke_denied` checks an Invoke request reaching the tests' Lambda stand-in with moto's
  own signature and policy evaluation.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any
from unittest import mock

import boto3

from tests.integration.test_attempt_storage_fencing import session_policies_enforced

ACCOUNT = "123456789012"
REGION = "us-east-1"
PARTITION = "aws"


class UnresolvableIntrinsic(AssertionError):
    """A policy document uses an intrinsic function or a name the resolver does not know: the
    test would otherwise evaluate a policy AWS never sees."""


_NO_VALUE = object()  # AWS::NoValue: the property or list element disappears


@dataclass
class Resolver:
    """Intrinsic functions of a transformed template -> the values in the test's moto account.

    `refs`: logical id or parameter -> what `Ref` gives; `attributes`: "Logical.Attr" -> what
    `Fn::GetAtt` gives. Parameters not given take the template's defaults."""

    template: dict[str, Any]
    refs: dict[str, Any]
    attributes: dict[str, str]
    parameters: dict[str, Any] = field(default_factory=dict)
    stack_name: str = "tickweave"

    def __post_init__(self) -> None:
        pseudo = {"AWS::Partition": PARTITION, "AWS::Region": REGION, "AWS::AccountId": ACCOUNT,
                  "AWS::StackName": self.stack_name, "AWS::URLSuffix": "amazonaws.com"}
        values: dict[str, Any] = dict(pseudo)
        for name, spec in self.template.get("Parameters", {}).items():
            if name in self.refs:  # a parameter the test gives the value of (a secret's ARN)
                continue
            value = self.parameters.get(name, spec.get("Default"))
            if value is None:
                raise UnresolvableIntrinsic(f"parameter {name} has no value and no default")
            if spec.get("Type") == "CommaDelimitedList" and isinstance(value, str):
                value = [v for v in value.split(",")] if value else [""]
            values[name] = value
        self._values = {**values, **self.refs}
        self._conditions: dict[str, bool] = {}

    # -- conditions -----------------------------------------------------------------------------

    def condition(self, name: str) -> bool:
        if name not in self._conditions:
            if name not in self.template.get("Conditions", {}):
                raise UnresolvableIntrinsic(f"unknown condition {name}")
            self._conditions[name] = bool(self._evaluate(self.template["Conditions"][name]))
        return self._conditions[name]

    def _evaluate(self, expr: Any) -> Any:
        """Condition functions and the few value functions conditions use here."""
        if not isinstance(expr, dict):
            return expr
        ((fn, args),) = expr.items()
        if fn == "Condition":
            return self.condition(args)
        if fn == "Fn::Not":
            return not self._evaluate(args[0])
        if fn == "Fn::And":
            return all(self._evaluate(a) for a in args)
        if fn == "Fn::Or":
            return any(self._evaluate(a) for a in args)
        if fn == "Fn::Equals":
            left, right = (self._evaluate(a) for a in args)
            return str(left) == str(right)
        if fn == "Fn::Join":
            return args[0].join(str(v) for v in self._evaluate(args[1]))
        if fn == "Fn::Split":
            return str(self._evaluate(args[1])).split(args[0])
        if fn == "Fn::Select":
            return self._evaluate(args[1])[int(args[0])]
        return self.resolve(expr)

    # -- values ---------------------------------------------------------------------------------

    def resolve(self, value: Any, *, absent: Any = _NO_VALUE) -> Any:
        """`value` with every intrinsic resolved; NoValue entries removed. A property that is
        AWS::NoValue as a whole resolves to `absent` (given) or fails."""
        result = self._resolve(value)
        if result is _NO_VALUE and absent is not _NO_VALUE:
            return absent
        if result is _NO_VALUE:
            raise UnresolvableIntrinsic(f"{value!r} resolves to AWS::NoValue at the top level")
        return result

    def _resolve(self, value: Any) -> Any:
        if isinstance(value, list):
            items = [self._resolve(v) for v in value]
            return [v for v in items if v is not _NO_VALUE]
        if not isinstance(value, dict):
            return value
        if len(value) == 1:
            ((key, args),) = value.items()
            if key == "Ref":
                if args == "AWS::NoValue":
                    return _NO_VALUE
                if args not in self._values:
                    raise UnresolvableIntrinsic(f"Ref {args}: no value for it in the test's account")
                return self._values[args]
            if key == "Fn::GetAtt":
                name = ".".join(args) if isinstance(args, list) else args
                if name not in self.attributes:
                    raise UnresolvableIntrinsic(f"Fn::GetAtt {name}: no value for it in the test's account")
                return self.attributes[name]
            if key == "Fn::Sub":
                return self._sub(args)
            if key == "Fn::If":
                name, yes, no = args
                return self._resolve(yes if self.condition(name) else no)
            if key.startswith("Fn::") or key == "Condition":
                raise UnresolvableIntrinsic(f"{key} is not resolved by the test's resolver: {value!r}")
        return {k: r for k, v in value.items() if (r := self._resolve(v)) is not _NO_VALUE}

    def _sub(self, args: Any) -> str:
        text, variables = (args, {}) if isinstance(args, str) else (args[0], args[1])

        def replace(match: re.Match[str]) -> str:
            name = match.group(1)
            if name.startswith("!"):
                return "${" + name[1:] + "}"
            if name in variables:
                return str(self.resolve(variables[name]))
            if "." in name and not name.startswith("AWS::"):
                return str(self.resolve({"Fn::GetAtt": name.split(".", 1)}))
            return str(self.resolve({"Ref": name}))

        return re.sub(r"\$\{([^}]+)\}", replace, text)


def _versioned(document: dict[str, Any]) -> dict[str, Any]:
    """SAM writes some documents without a Version (IAM reads them as 2008-10-17); moto refuses
    those. Without policy variables in them the two versions mean the same, so 2012-10-17."""
    if "Version" in document:
        return document
    if "${aws:" in json.dumps(document):
        raise UnresolvableIntrinsic(f"a document without Version uses policy variables: {document!r}")
    return {"Version": "2012-10-17", **document}


def role_arn(name: str) -> str:
    return f"arn:{PARTITION}:iam::{ACCOUNT}:role/{name}"


@dataclass
class TemplateRoles:
    """The template's roles, created in moto under unique names; `arns` by logical id."""

    arns: dict[str, str]
    names: dict[str, str]
    policies: dict[str, list[dict[str, Any]]]  # logical role id -> the resolved documents given it

    @classmethod
    def create(cls, endpoint_url: str, cfn: dict[str, Any], resolver: Resolver, names: Mapping[str, str]) -> TemplateRoles:
        """Create every AWS::IAM::Role of `cfn` (named `names[logical id]`, which `resolver` must
        already map for Ref/GetAtt), with inline policies, policies of AWS::IAM::Policy
        resources naming the role, and managed policy ARNs."""
        iam = admin_client("iam", endpoint_url)
        roles = {n: r for n, r in cfn["Resources"].items() if r["Type"] == "AWS::IAM::Role"
                 and ("Condition" not in r or resolver.condition(r["Condition"]))}
        missing = set(roles) - set(names)
        if missing:
            raise UnresolvableIntrinsic(f"no name given for the template's roles {sorted(missing)}")
        policies: dict[str, list[dict[str, Any]]] = {n: [] for n in roles}
        for logical, resource in roles.items():
            properties = resource["Properties"]
            iam.create_role(RoleName=names[logical], MaxSessionDuration=int(properties.get("MaxSessionDuration", 3600)),
                            AssumeRolePolicyDocument=json.dumps(resolver.resolve(properties["AssumeRolePolicyDocument"])))
            for policy in properties.get("Policies", []):
                document = _versioned(resolver.resolve(policy["PolicyDocument"]))
                iam.put_role_policy(RoleName=names[logical], PolicyName=policy["PolicyName"],
                                    PolicyDocument=json.dumps(document))
                policies[logical].append(document)
            for arn in resolver.resolve(properties.get("ManagedPolicyArns", []), absent=[]):
                iam.attach_role_policy(RoleName=names[logical], PolicyArn=arn)
        for logical, resource in cfn["Resources"].items():
            if resource["Type"] != "AWS::IAM::Policy":
                continue
            if "Condition" in resource and not resolver.condition(resource["Condition"]):
                continue
            properties = resource["Properties"]
            document = _versioned(resolver.resolve(properties["PolicyDocument"]))
            for ref in properties["Roles"]:
                (target,) = [n for n in roles if ref == {"Ref": n}] or [None]
                if target is None:
                    raise UnresolvableIntrinsic(f"{logical} attaches to {ref!r}, not one of the template's roles")
                iam.put_role_policy(RoleName=names[target], PolicyName=properties["PolicyName"],
                                    PolicyDocument=json.dumps(document))
                policies[target].append(document)
        return cls({n: role_arn(names[n]) for n in roles}, dict(names), policies)

    def assume(self, endpoint_url: str, logical: str, session: str = "function") -> dict[str, str]:
        """Credentials of the role, as the Lambda service hands them to a function (assumed
        before enforcement is on: moto does not model service principals)."""
        sts = admin_client("sts", endpoint_url)
        creds = sts.assume_role(RoleArn=self.arns[logical], RoleSessionName=session)["Credentials"]
        return {"AccessKeyId": creds["AccessKeyId"], "SecretAccessKey": creds["SecretAccessKey"],
                "SessionToken": creds["SessionToken"]}


def admin_client(service: str, endpoint_url: str, credentials: Mapping[str, str] | None = None) -> Any:
    """A client with the test's own credentials (or `credentials`): the fake ones before
    enforcement, an admin user's keys (`admin_credentials`) after."""
    kwargs: dict[str, Any] = {}
    if credentials is not None:
        kwargs = {"aws_access_key_id": credentials["AccessKeyId"],
                  "aws_secret_access_key": credentials["SecretAccessKey"],
                  "aws_session_token": credentials.get("SessionToken")}
    return boto3.session.Session().client(service, endpoint_url=endpoint_url, region_name=REGION, **kwargs)  # type: ignore[call-overload]


def admin_credentials(endpoint_url: str) -> dict[str, str]:
    """An IAM user allowed everything: the test's own hand while IAM is enforced."""
    iam = admin_client("iam", endpoint_url)
    name = f"test-admin-{uuid.uuid4().hex[:8]}"
    iam.create_user(UserName=name)
    iam.put_user_policy(UserName=name, PolicyName="all", PolicyDocument=json.dumps(
        {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}))
    key = iam.create_access_key(UserName=name)["AccessKey"]
    return {"AccessKeyId": key["AccessKeyId"], "SecretAccessKey": key["SecretAccessKey"]}


# --- enforcement --------------------------------------------------------------------------------


# A request naming several resources (BatchGetSecretValue, GetParameters) is checked against each:
# `_determine_resource` joins their ARNs with this, `_check_each` splits them.
_SEVERAL = "\n"


def _secret_arn(response: Any) -> str:
    from moto.secretsmanager.models import secretsmanager_backends

    secrets = secretsmanager_backends[response.current_account][response.region].secrets

    def arn(secret_id: str) -> str:
        secret = secrets.get(secret_id)
        return str(secret.arn) if secret is not None else secret_id

    secret_id = response._get_param("SecretId")
    if secret_id is not None:
        return arn(secret_id)
    listed = response._get_param("SecretIdList")
    if listed:
        return _SEVERAL.join(arn(s) for s in listed)
    return "*"  # ListSecrets, a BatchGetSecretValue by filters: account-level


def _parameter_arn(response: Any) -> str:
    names = response._get_param("Names") or [response._get_param("Name")]
    if not all(isinstance(name, str) for name in names):
        return "*"
    return _SEVERAL.join(
        name if name.startswith("arn:")
        else f"arn:{PARTITION}:ssm:{response.region}:{response.current_account}:parameter/{name.lstrip('/')}"
        for name in names)


def _topic_arn(response: Any) -> str:
    topic = response._get_param("TopicArn")
    return str(topic) if topic else "*"


def _check_each(check: Callable[[Any, str], None]) -> Callable[[Any, str], None]:
    def check_action_permitted(self: Any, resource: str) -> None:
        if self._action == "secretsmanager:BatchGetSecretValue":
            # AWS: the batch action (no resource-level permissions) and GetSecretValue on each
            check(self, "*")
            self._action = "secretsmanager:GetSecretValue"
            try:
                for one in resource.split(_SEVERAL):
                    if one != "*":
                        check(self, one)
            finally:
                self._action = "secretsmanager:BatchGetSecretValue"
            return
        for one in resource.split(_SEVERAL):
            check(self, one)

    return check_action_permitted


def _presigned_s3_request(response: Any) -> Any:
    """moto's S3 IAM request for a presigned URL (SigV4 in the query string), or None for a
    request signed in its headers. moto checks only the latter: with IAM on, a presigned URL
    fails on the missing Authorization header. AWS evaluates a presigned request as a request of
    the credentials that signed it: their policies, their session policy, and the signature."""
    from urllib.parse import parse_qsl, urlparse

    from botocore.auth import S3SigV4QueryAuth
    from botocore.awsrequest import AWSRequest
    from moto.iam.access_control import S3IAMRequest

    if "Authorization" in response.headers:
        return None
    parsed = urlparse(response.uri)
    pairs = parse_qsl(parsed.query, keep_blank_values=True)
    params = dict(pairs)
    if "AWSAccessKeyId" in params:  # SigV2 query auth: not evaluated here, so not let through
        from moto.s3.exceptions import S3AccessDeniedError

        raise S3AccessDeniedError()
    if "X-Amz-Credential" not in params:
        return None  # unsigned: moto's anonymous-access rules apply
    signed_headers = params["X-Amz-SignedHeaders"].split(";")
    real_headers = {name: response.headers.get(name, "") for name in signed_headers}
    synthetic = {
        # what moto's request reads its access key, region, service and signature from
        "Authorization": (f"AWS4-HMAC-SHA256 Credential={params['X-Amz-Credential']}, "
                          f"SignedHeaders={params['X-Amz-SignedHeaders']}, Signature={params['X-Amz-Signature']}"),
        "X-Amz-Date": params["X-Amz-Date"],
        **({"X-Amz-Security-Token": params["X-Amz-Security-Token"]} if "X-Amz-Security-Token" in params else {}),
    }

    class PresignedS3IAMRequest(S3IAMRequest):
        def check_signature(self) -> None:
            unsigned = [(k, v) for k, v in pairs if k != "X-Amz-Signature"]
            host = response.headers.get("Host", "")
            request = AWSRequest(method=response.method, url=f"http://{host}{parsed.path}",
                                 params=dict(unsigned), headers=real_headers)
            request.url = request.prepare().url
            request.context["timestamp"] = params["X-Amz-Date"]
            auth = S3SigV4QueryAuth(self._access_key.create_credentials(), "s3", self._region,
                                    expires=int(params["X-Amz-Expires"]))
            expected = auth.signature(auth.string_to_sign(request, auth.canonical_request(request)), request)
            if expected != params["X-Amz-Signature"]:
                self._raise_signature_does_not_match()

    return PresignedS3IAMRequest(account_id=response.current_account, method=response.method, path=parsed.path,
                                 data=response.data, body=response.raw_body, headers=synthetic,
                                 action=response._get_action())


def _authenticate_presigned(original: Callable[..., None]) -> Callable[..., None]:
    def authenticate(self: Any, iam_request_cls: type, resource: str = "*") -> None:
        from moto.iam.access_control import S3IAMRequest

        presigned = _presigned_s3_request(self) if iam_request_cls is S3IAMRequest else None
        if presigned is None:
            original(self, iam_request_cls, resource)
            return
        presigned.check_signature()
        presigned.check_action_permitted(resource)

    return authenticate


def _raise_access_denied(self: Any) -> None:
    """The refusal as the service words it: the JSON-protocol services answer
    AccessDeniedException (moto answers all with the Query protocol's AccessDenied), and the
    code tells a refused BatchGetSecretValue apart by that name."""
    from moto.core.exceptions import AccessDeniedError, JsonRESTError

    if self._service in ("secretsmanager", "ssm", "lambda"):
        raise JsonRESTError("AccessDeniedException",
                            f"User: {self._access_key.arn} is not authorized to perform: {self._action}")
    raise AccessDeniedError(user_arn=self._access_key.arn, action=self._action)


def _check_principal(statement: Any, principal: str) -> bool:
    """AWS's reading of a trust policy's AWS principal: a role ARN admits that role's sessions,
    an account's root admits every principal of the account."""
    expected = (statement._statement.get("Principal") or {}).get("AWS")
    if expected is None:
        return not statement._statement.get("Principal")
    allowed = expected if isinstance(expected, list) else [expected]
    if "*" in allowed or principal in allowed:
        return True
    session = re.fullmatch(r"arn:([^:]+):sts::(\d{12}):assumed-role/([^/]+)/.+", principal)
    for arn in allowed:
        if session and re.fullmatch(rf"arn:{session[1]}:iam::{session[2]}:role/(.+/)?{re.escape(session[3])}", arn):
            return True
        account = re.fullmatch(r"arn:[^:]+:iam::(\d{12}):root", arn)
        if account and f"::{account[1]}:" in principal:
            return True
    return False


@contextmanager
def iam_enforced() -> Iterator[None]:
    from moto.core.authorization import ActionAuthenticatorMixin
    from moto.iam.access_control import IAMPolicyStatement, IAMRequest, IAMRequestBase
    from moto.s3.responses import ACTION_MAP
    from moto.secretsmanager.responses import SecretsManagerResponse
    from moto.sns.responses import SNSResponse
    from moto.ssm.responses import SimpleSystemManagerResponse

    # Nested: the patches inside wrap `check_action_permitted` as the session-policy patch left it.
    with session_policies_enforced():  # noqa: SIM117
        with mock.patch.object(ActionAuthenticatorMixin, "_authenticate_and_authorize_action",
                               _authenticate_presigned(ActionAuthenticatorMixin._authenticate_and_authorize_action)), \
                mock.patch.object(IAMRequestBase, "check_action_permitted",
                               _check_each(IAMRequestBase.check_action_permitted)), \
                mock.patch.object(IAMRequest, "_raise_access_denied", _raise_access_denied), \
                mock.patch.dict(ACTION_MAP["BUCKET"]["HEAD"], {"DEFAULT": "ListBucket"}), \
                mock.patch.object(SecretsManagerResponse, "_determine_resource", _secret_arn, create=True), \
                mock.patch.object(SimpleSystemManagerResponse, "_determine_resource", _parameter_arn, create=True), \
                mock.patch.object(SNSResponse, "_determine_resource", _topic_arn, create=True), \
                mock.patch.object(IAMPolicyStatement, "_check_principal", _check_principal):
            yield


def lambda_invoke_denied(method: str, path: str, headers: Mapping[str, str], body: bytes) -> str | None:
    """moto's verdict on a Lambda Invoke request (signature, then lambda:InvokeFunction on the
    function's ARN under the caller's policies): None if allowed, else the error."""
    from moto.iam.access_control import IAMRequest
    from werkzeug.exceptions import HTTPException

    match = re.match(r"^/2015-03-31/functions/([^/?]+)/invocations", path)
    if match is None:
        return f"not an Invoke request: {path}"
    function = match.group(1)
    arn = function if function.startswith("arn:") else f"arn:{PARTITION}:lambda:{REGION}:{ACCOUNT}:function:{function}"
    try:
        request = IAMRequest(account_id=ACCOUNT, method=method, path=path, data={}, body=body,
                             headers=dict(headers), action="InvokeFunction")
        request.check_signature()
        request.check_action_permitted(arn)
    except HTTPException as exc:  # moto's AccessDeniedError, InvalidClientTokenIdError, ...
        return f"{type(exc).__name__}: {exc.description}"
    except KeyError as exc:  # no Authorization header: an unsigned request
        return f"unsigned request ({exc})"
    return None

