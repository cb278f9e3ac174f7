"""The built artifact under the real runtime interface client, as Lambda runs it.

The zip `make package` builds (for this machine's architecture: the template's arm64 wheels cannot
load on an x86_64 host) is unpacked and run in fresh processes by `python -S -m awslambdaric
<handler>`, the client AWS's Python images use, under the template's runtime version (python3.13),
against the Runtime API emulator in runtime_api.py. Nothing else is on the path: the unpacked zip
(Lambda's /var/task) and a directory with awslambdaric and the locked boto3 (what the runtime
provides); not this checkout, not its virtualenv. The handler strings, the runtime, the timeouts and
each function's environment come from template.yaml (transformed as CloudFormation would), its
references resolved to moto's secrets and parameter and the test Postgres.

Events in order: migrate and create-key invokes, API Gateway HTTP API requests, a worker invoke of
each dispatch message the API sent to the lambda transport (its callbacks come back over HTTP
through an HTTP API front to the API function's process), and the Scheduler's tick. The log records come through Lambda's telemetry descriptor, one a frame.
A handler that cannot be imported is reported through /runtime/init/error; a response over
Lambda's 6 MB limit fails the invocation."""

from __future__ import annotations

import glob
import json
import os
import platform
import queue
import re
import shutil
import subprocess
import sys
import uuid
import zipfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3
import pytest
from cfnlint.decode import decode_str
from samtranslator.translator.transform import transform

from infra.lock import LOCK
from infra.package import ARCHITECTURES, RUNTIME_PROVIDED, build
from infra.postgres import create_database, drop_database, with_database
from infra.s3 import FAKE_AWS_ENV, MotoServer
from orchestrator.config import Settings
from orchestrator.db.migrate import load_migrations
from orchestrator.storage.s3 import ensure_bucket

from .conftest import FakeLambda, generated_token_key, load_event, s3_keys
from .runtime_api import MAX_RESPONSE_BYTES, RESPONSE_TOO_LARGE, FunctionProcess, HttpApiFront, RuntimeApi

ROOT = Path(__file__).resolve().parent.parent.parent
TEMPLATE = ROOT / "template.yaml"
# The runtime interface client AWS's Python base images run (PyPI: awslambdaric).
AWSLAMBDARIC = "awslambdaric==4.2.2"
ACCOUNT = "123456789012"  # moto's default account: the ARNs it makes carry it
REGION = FAKE_AWS_ENV["AWS_REGION"]


# --- the template ----------------------------------------------------------------------------


class OfflinePolicyLoader:
    """samtranslator's managed-policy loader without the network (the template names ARNs)."""

    def load(self) -> dict[str, str]:
        return {}


def transformed_template(parameters: Mapping[str, str]) -> dict[str, Any]:
    template, problems = decode_str(TEMPLATE.read_text())
    assert not problems, problems
    plain = json.loads(json.dumps(template))
    for resource in plain["Resources"].values():
        if resource["Type"] == "AWS::Serverless::Function":
            resource["Properties"]["CodeUri"] = "s3://tickweave-artifacts/tickweave-lambda.zip"
    result: dict[str, Any] = transform(plain, dict(parameters), OfflinePolicyLoader())
    return result


def resolve(value: Any, refs: Mapping[str, str], attributes: Mapping[str, str]) -> Any:
    """An expression of the template with Ref, Fn::GetAtt and Fn::Sub resolved; any other
    intrinsic, or a name not given, fails (say here what it stands for in the test)."""
    if isinstance(value, list):
        return [resolve(item, refs, attributes) for item in value]
    if not isinstance(value, dict):
        return value
    if len(value) != 1 or not next(iter(value)).startswith(("Ref", "Fn::")):
        return {key: resolve(item, refs, attributes) for key, item in value.items()}
    ((function, argument),) = value.items()
    if function == "Ref":
        assert argument in refs, f"the test does not know what Ref {argument} stands for"
        return refs[argument]
    if function == "Fn::GetAtt":
        name = ".".join(argument) if isinstance(argument, list) else argument
        assert name in attributes, f"the test does not know what GetAtt {name} stands for"
        return attributes[name]
    if function == "Fn::Sub":
        text, variables = (argument, {}) if isinstance(argument, str) else argument
        names = {**refs, **attributes, **{k: resolve(v, refs, attributes) for k, v in variables.items()}}

        def substitute(match: re.Match[str]) -> str:
            assert match.group(1) in names, f"the test does not know what ${{{match.group(1)}}} stands for"
            return str(names[match.group(1)])

        return re.sub(r"\$\{([^!}][^}]*)\}", substitute, text)
    raise AssertionError(f"the test cannot resolve {function} in {value}")


@dataclass(frozen=True)
class FunctionConfig:
    logical_id: str
    handler: str
    runtime: str
    timeout_s: int
    memory_mb: int
    environment: dict[str, str]
    log_group: str
    log_format: str
    log_level: str


FUNCTION_PROPERTIES = ("Handler", "Runtime", "Timeout", "MemorySize", "Environment", "LoggingConfig")


def lambda_functions(parameters: Mapping[str, str], refs: Mapping[str, str],
                     attributes: Mapping[str, str]) -> dict[str, FunctionConfig]:
    """The template's functions, as CloudFormation would create them with these parameters."""
    template = transformed_template(parameters)
    defaults = {name: str(p["Default"]) for name, p in template["Parameters"].items() if "Default" in p}
    names = {"AWS::Partition": "aws", "AWS::Region": REGION, "AWS::AccountId": ACCOUNT,
             "AWS::URLSuffix": "amazonaws.com", **defaults, **parameters, **refs}
    functions = {}
    for logical_id, resource in template["Resources"].items():
        if resource["Type"] != "AWS::Lambda::Function":
            continue
        # only what the function's process sees (the role and the rest are test_template.py's)
        properties = resolve({name: resource["Properties"].get(name) for name in FUNCTION_PROPERTIES}, names, attributes)
        logging = properties["LoggingConfig"] or {}
        functions[logical_id] = FunctionConfig(
            logical_id, properties["Handler"], properties["Runtime"], int(properties["Timeout"]),
            int(properties["MemorySize"]),
            {name: str(value) for name, value in properties["Environment"]["Variables"].items()},
            logging.get("LogGroup", f"/aws/lambda/{logical_id}"), logging.get("LogFormat", "Text"),
            logging.get("ApplicationLogLevel", ""))
    return functions


# --- the artifact and the runtime ---------------------------------------------------------------


def python_for(runtime: str) -> str | None:
    """An interpreter of the template's runtime ("python3.13"), if this machine has one."""
    version = runtime.removeprefix("python")
    candidates = [os.environ.get("TICKWEAVE_PACKAGE_PYTHON", ""),
                  *sorted(glob.glob(os.path.expanduser(f"~/.pyenv/versions/{version}*/bin/python{version}"))),
                  shutil.which(f"python{version}") or ""]
    for candidate in filter(None, candidates):
        done = subprocess.run([candidate, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
                              capture_output=True, text=True)
        if done.returncode == 0 and done.stdout.strip() == version:
            return candidate
    return None


def host_architecture() -> str:
    """This machine in Lambda's words (arm64 / x86_64), for `python -m infra.package --arch`."""
    machine = platform.machine()
    (arch,) = [name for name, wheel_machine in ARCHITECTURES.items() if wheel_machine == machine]
    return arch


def locked_version(name: str) -> str:
    match = re.search(rf"^{re.escape(name)}==(\S+)", LOCK.read_text(), re.MULTILINE)
    assert match, f"{name} is not in {LOCK}"
    return match.group(1)


TEMPLATE_RUNTIME = transformed_template({"DatabaseSecretArn": f"arn:aws:secretsmanager:{REGION}:{ACCOUNT}:secret:x"}
                                        )["Resources"]["ApiFunction"]["Properties"]["Runtime"]
PYTHON = python_for(TEMPLATE_RUNTIME)



@pytest.fixture(scope="module", autouse=True)
def _the_templates_runtime_is_here() -> None:
    # Required, not skipped: the machine CI runs on has it (PYENV_VERSION=3.13.0 python3.13).
    assert PYTHON is not None, (f"no interpreter for the template's runtime {TEMPLATE_RUNTIME}: install it, or "
                                "point TICKWEAVE_PACKAGE_PYTHON at one")


@dataclass(frozen=True)
class Runtime:
    python: str
    task_root: Path  # the unpacked zip: Lambda's /var/task
    runtime_dir: Path  # awslambdaric and boto3: what the Lambda runtime provides


@pytest.fixture(scope="session")
def runtime(tmp_path_factory: pytest.TempPathFactory) -> Runtime:
    """`make package ARCH=<this machine>` once per session, unpacked; awslambdaric and the
    locked boto3 installed for the runtime's Python into a directory of their own."""
    assert PYTHON is not None
    work = tmp_path_factory.mktemp("lambda")
    artifact = work / "tickweave-lambda.zip"
    build(artifact, arch=host_architecture(), compile_python=PYTHON)
    task_root = work / "task"
    with zipfile.ZipFile(artifact) as archive:
        archive.extractall(task_root)
    runtime_dir = work / "runtime"
    done = subprocess.run([PYTHON, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--no-compile",
                           "--target", str(runtime_dir), AWSLAMBDARIC,
                           *(f"{name}=={locked_version(name)}" for name in RUNTIME_PROVIDED)],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return Runtime(PYTHON, task_root, runtime_dir)


def lambda_environment(function: FunctionConfig, name: str, extra: Mapping[str, str]) -> dict[str, str]:
    """What Lambda sets for a function (its reserved variables), then the template's variables,
    then the test's stand-in endpoints. Nothing of this process's environment."""
    return {
        "PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "en_US.UTF-8", "TZ": ":UTC",
        **FAKE_AWS_ENV,
        "AWS_EXECUTION_ENV": f"AWS_Lambda_{function.runtime}",
        "AWS_LAMBDA_FUNCTION_NAME": name, "AWS_LAMBDA_FUNCTION_VERSION": "$LATEST",
        "AWS_LAMBDA_FUNCTION_MEMORY_SIZE": str(function.memory_mb),
        "AWS_LAMBDA_LOG_GROUP_NAME": function.log_group, "AWS_LAMBDA_LOG_STREAM_NAME": uuid.uuid4().hex,
        "AWS_LAMBDA_INITIALIZATION_TYPE": "on-demand",
        "AWS_LAMBDA_LOG_FORMAT": function.log_format,
        **({"AWS_LAMBDA_LOG_LEVEL": function.log_level} if function.log_level else {}),
        **function.environment,
        **extra,
    }


# --- the deployment ----------------------------------------------------------------------------


@pytest.fixture
def database_url(pg_admin_url: str) -> Iterator[str]:
    """An empty database (no migrations): the migrate invoke applies them."""
    name = f"tickweave_empty_{uuid.uuid4().hex[:12]}"
    create_database(pg_admin_url, name)
    yield with_database(pg_admin_url, name)
    drop_database(pg_admin_url, name)


@dataclass
class Deployment:
    functions: dict[str, FunctionConfig]
    api: FunctionProcess
    worker: FunctionProcess
    front: HttpApiFront
    dispatched: queue.Queue[dict[str, Any]]  # what the API invoked the worker function with
    bucket: str
    s3_endpoint: str

    def http(self, method: str, path: str, *, key: str | None = None, body: Any = None) -> dict[str, Any]:
        """An API Gateway HTTP API request straight to the API function; its raw answer."""
        headers = {"authorization": f"Bearer {key}"} if key else {}
        if body is not None:
            headers["content-type"] = "application/json"
        event = self.front.event(method, path, headers=headers, body=json.dumps(body) if body is not None else None)
        answer: dict[str, Any] = self.api.invoke(event).response
        return answer


def start(runtime: Runtime, function: FunctionConfig, name: str, extra: Mapping[str, str], log_dir: Path,
          handler: str | None = None) -> FunctionProcess:
    arn = f"arn:aws:lambda:{REGION}:{ACCOUNT}:function:{name}"
    api = RuntimeApi(arn, function.timeout_s)
    return FunctionProcess(runtime.python, handler or function.handler, runtime.task_root, runtime.runtime_dir,
                           lambda_environment(function, name, extra), api, log_dir / f"{name}.log")


@pytest.fixture
def deployment(runtime: Runtime, database_url: str, moto_server: MotoServer,
               tmp_path: Path) -> Iterator[Deployment]:
    endpoint = moto_server.endpoint_url
    run_id = uuid.uuid4().hex[:10]
    stack = f"tw-{run_id}"
    bucket = f"runtime-{run_id}"
    ensure_bucket(Settings(s3_endpoint_url=endpoint, bucket=bucket))
    secretsmanager = boto3.client("secretsmanager", endpoint_url=endpoint, region_name=REGION)
    ssm = boto3.client("ssm", endpoint_url=endpoint, region_name=REGION)
    # The template's secrets as it generates them (token keys as JSON, the tick secret a string)
    token_keys = secretsmanager.create_secret(
        Name=f"{stack}/token-keys", SecretString=json.dumps({"kid": "k1", "key": generated_token_key()}))
    tick = secretsmanager.create_secret(Name=f"{stack}/tick", SecretString=uuid.uuid4().hex)
    database = secretsmanager.create_secret(Name=f"{stack}/db", SecretString=database_url)

    dispatched: queue.Queue[dict[str, Any]] = queue.Queue()
    fake_lambda = FakeLambda()  # Lambda's Invoke API: records the API's dispatches to the worker
    fake_lambda.functions["tickweave-worker"] = lambda payload, _context: dispatched.put(payload)

    functions = lambda_functions(
        {"DatabaseSecretArn": database["ARN"]},
        {"AWS::StackName": stack, "WorkerFunction": "tickweave-worker", "OutputsBucket": bucket,
         "TokenKeysSecret": token_keys["ARN"], "TickSecret": tick["ARN"],
         "ApiLogGroup": f"/aws/lambda/{stack}-api", "WorkerLogGroup": f"/aws/lambda/{stack}-worker"},
        {"WorkerStorageRole.Arn": f"arn:aws:iam::{ACCOUNT}:role/{stack}-WorkerStorageRole"})
    # where boto3 finds the stand-ins (on AWS: none of these, the regional endpoints)
    stand_ins = {"S3_ENDPOINT_URL": endpoint, "AWS_ENDPOINT_URL_S3": endpoint, "AWS_ENDPOINT_URL_STS": endpoint,
                 "AWS_ENDPOINT_URL_SECRETS_MANAGER": endpoint, "AWS_ENDPOINT_URL_SSM": endpoint,
                 "AWS_ENDPOINT_URL_LAMBDA": fake_lambda.endpoint_url}
    api = start(runtime, functions["ApiFunction"], f"{stack}-api", stand_ins, tmp_path)
    worker = start(runtime, functions["WorkerFunction"], f"{stack}-worker", stand_ins, tmp_path)
    front = HttpApiFront(api, load_event("apigw_v2_get_health.json"))
    # The stack's PublicUrlParameter, at the name the API function's environment refers to
    ssm.put_parameter(Name=f"/tickweave/{stack}/public-url", Value=front.url, Type="String")
    try:
        yield Deployment(functions, api, worker, front, dispatched, bucket, endpoint)
    finally:
        front.close()
        api.stop()
        worker.stop()
        fake_lambda.close()
        assert not api.api.protocol_errors and not worker.api.protocol_errors


# --- the tests ---------------------------------------------------------------------------------


CHAIN = {
    "id": "runtime-demo",
    "nodes": [{"id": "first", "task": "echo"}, {"id": "second", "task": "echo", "depends": ["first"]}],
}


def test_the_artifact_serves_every_kind_of_event_under_awslambdaric(deployment: Deployment) -> None:
    api, worker = deployment.api, deployment.worker  # the template's handlers, environments, timeouts

    # 1. the migrate invoke: every migration applied to the empty database; again, none
    every = [m.version for m in load_migrations()]
    assert api.invoke(load_event("migrate_invoke.json")).response == {"applied": every, "versions": every}
    assert api.invoke(load_event("migrate_invoke.json")).response == {"applied": [], "versions": every}

    # 2. the create-key invoke answers the key, once
    created = api.invoke(load_event("create_key_invoke.json")).response
    assert created["workspace"] == "deploy" and created["role"] == "admin" and created["key"].startswith("tw_")
    key = created["key"]

    # 3. API Gateway HTTP API requests (payload 2.0)
    unauthenticated = deployment.http("GET", "/api/pipelines")
    assert unauthenticated["statusCode"] == 401, unauthenticated
    listed = deployment.http("GET", "/api/pipelines", key=key)
    assert listed["statusCode"] == 200, listed
    assert "application/json" in listed["headers"]["content-type"]
    created_pipeline = deployment.http("POST", "/api/pipelines", key=key, body=CHAIN)
    assert created_pipeline["statusCode"] == 201, created_pipeline
    names = json.dumps(json.loads(deployment.http("GET", "/api/pipelines", key=key)["body"]))
    assert "runtime-demo" in names

    # 4. a run: the API invokes the worker function with each dispatch message; the worker
    #    function's process runs it and calls back over HTTP through the HTTP API front
    triggered = deployment.http("POST", "/api/pipelines/runtime-demo/runs", key=key, body={"params": {"n": 1}})
    assert triggered["statusCode"] == 201, triggered
    run_id = json.loads(triggered["body"])["id"]
    ran = []
    for _ in CHAIN["nodes"]:
        try:
            message = deployment.dispatched.get(timeout=30)
        except queue.Empty:
            pytest.fail(f"no dispatch to the worker function; API log:\n{api.logs()[-5000:]}")
        assert message["run_id"] == run_id and message["token"]
        answer = worker.invoke(message)
        assert answer.error is None, f"{answer.error}\nworker log:\n{worker.logs()[-5000:]}"
        assert answer.response["accepted"] is True, answer.response
        ran.append(message["node"])
    assert ran == ["first", "second"]
    callbacks = [(method, status) for method, path, status in deployment.front.requests
                 if path.startswith("/api/callback/")]
    assert callbacks and all(status == 200 for _, status in callbacks), deployment.front.requests

    run = deployment.http("GET", f"/api/runs/{run_id}", key=key)
    assert run["statusCode"] == 200 and json.loads(run["body"])["status"] == "succeeded", run
    # the worker's process wrote each output with the credentials its dispatch carried
    outputs = [k for k in s3_keys(deployment.s3_endpoint, deployment.bucket, f"runs/deploy/runtime-demo/{run_id}/")
               if k.endswith("/output.json")]
    assert sorted(k.split("/")[6] for k in outputs) == ["first", "second"], outputs

    # 5. the Scheduler's tick: the template's target input, as Scheduler delivers it
    tick_input = json.loads(transformed_tick_input(deployment))
    summary = api.invoke(tick_input).response
    assert summary["claimed"] == 0 and summary["dispatched"] == 0, summary
    # its deadline is the invocation's remaining time, from the Runtime API's deadline header
    timeout_s = deployment.functions["ApiFunction"].timeout_s
    assert timeout_s - 5 < summary["deadline_s"] <= timeout_s, summary
    assert deployment.dispatched.empty()

    # 6. the logs as Lambda receives them through the telemetry descriptor: one JSON record a
    #    frame, naming its invocation, none below the template's ApplicationLogLevel
    ranks = ["DEBUG", "INFO", "WARN", "ERROR", "FATAL"]
    for process, logical_id in ((api, "ApiFunction"), (worker, "WorkerFunction")):
        served = {invocation.request_id for invocation in process.api.served}
        least = ranks.index(deployment.functions[logical_id].log_level or "DEBUG")
        assert process.frames, process.logs()
        for frame in process.frames:
            record = json.loads(frame.message)
            assert record.get("aws_request_id", record.get("requestId")) in served, record
            level = {"WARNING": "WARN", "CRITICAL": "FATAL"}.get(record["level"], record["level"])
            assert level == frame.level and ranks.index(level) >= least, (frame, record)

    # one execution environment each, answered in order, none restarted
    assert api.process.poll() is None and worker.process.poll() is None
    # (8 events before the run's end, each request through the front, the run's read, the tick)
    assert len(api.api.served) == 8 + len(deployment.front.requests) + 2
    assert len(worker.api.served) == len(CHAIN["nodes"])


def transformed_tick_input(deployment: Deployment) -> str:
    """The Input of the template's Scheduler target for the API function."""
    template = transformed_template({"DatabaseSecretArn": f"arn:aws:secretsmanager:{REGION}:{ACCOUNT}:secret:x"})
    (schedule,) = [r for r in template["Resources"].values() if r["Type"] == "AWS::Scheduler::Schedule"]
    target_input: str = schedule["Properties"]["Target"]["Input"]
    return target_input


# --- what the function's process can import ----------------------------------------------------


def placeholder_functions() -> dict[str, FunctionConfig]:
    """The template's functions with placeholder references (for tests that need no AWS)."""
    arn = f"arn:aws:secretsmanager:{REGION}:{ACCOUNT}:secret:placeholder"
    return lambda_functions(
        {"DatabaseSecretArn": arn},
        {"AWS::StackName": "tw-placeholder", "WorkerFunction": "tickweave-worker", "OutputsBucket": "placeholder",
         "TokenKeysSecret": arn, "TickSecret": arn, "ApiLogGroup": "/aws/lambda/api",
         "WorkerLogGroup": "/aws/lambda/worker"},
        {"WorkerStorageRole.Arn": f"arn:aws:iam::{ACCOUNT}:role/placeholder"})


PROBE = """
import importlib.util, json, sys
found = {name: (importlib.util.find_spec(name) or None) and importlib.util.find_spec(name).origin
         for name in ("handler.api", "handler.worker", "orchestrator", "examples.tasks", "psycopg_binary",
                      "boto3", "botocore", "awslambdaric", "tests", "pytest", "moto", "uvicorn")}
print(json.dumps({"found": found, "path": sys.path, "version": list(sys.version_info[:2])}))
"""


def test_the_process_sees_only_the_artifact_and_the_runtime(runtime: Runtime, tmp_path: Path) -> None:
    function = placeholder_functions()["ApiFunction"]
    env = {**lambda_environment(function, "probe", {}), "PYTHONPATH": str(runtime.runtime_dir)}
    done = subprocess.run([runtime.python, "-S", "-c", PROBE], cwd=runtime.task_root, env=env,
                          capture_output=True, text=True, check=True)
    probe = json.loads(done.stdout)
    assert f"python{'.'.join(map(str, probe['version']))}" == function.runtime
    found = probe["found"]
    for name in ("handler.api", "handler.worker", "orchestrator", "examples.tasks", "psycopg_binary"):
        assert found[name].startswith(str(runtime.task_root)), (name, found[name])
    for name in ("boto3", "botocore", "awslambdaric"):
        assert found[name].startswith(str(runtime.runtime_dir)), (name, found[name])
    # not shipped, and not reachable from this checkout or its virtualenv
    assert found["tests"] is None and found["pytest"] is None and found["moto"] is None and found["uvicorn"] is None
    assert not [entry for entry in probe["path"] if entry.startswith((str(ROOT), sys.prefix))], probe["path"]


# --- failures as Lambda reports them ---------------------------------------------------------


@pytest.mark.parametrize(("broken", "error_type"), [
    (lambda handler: handler.replace("handler.api.", "handler.no_such_module."), "Runtime.ImportModuleError"),
    (lambda handler: handler.replace(".lambda_handler", ".no_such_handler"), "Runtime.HandlerNotFound"),
])
def test_a_handler_that_cannot_load_is_an_init_error(runtime: Runtime, tmp_path: Path, broken: Any,
                                                     error_type: str) -> None:
    function = placeholder_functions()["ApiFunction"]
    handler = broken(function.handler)
    assert handler != function.handler
    process = start(runtime, function, "broken", {}, tmp_path, handler=handler)
    try:
        invocation = process.invoke(load_event("scheduler_tick.json"))
        assert process.api.init_failed.is_set(), process.logs()
        assert process.api.init_error is not None and process.api.init_error["errorType"] == error_type
        assert process.api.init_error_type == error_type
        assert handler.rsplit(".", 1)[0] in process.api.init_error["errorMessage"]
        # the invoke waiting for this environment fails with it; the process gives up
        assert invocation.error is not None and invocation.error["init"] == process.api.init_error
        assert process.api.served == [] and process.wait_exit() == 1
    finally:
        process.stop()


BIG = """
def handler(event, context):
    return "x" * event["characters"]
"""


def test_a_response_over_lambdas_6_mb_limit_fails_the_invocation(runtime: Runtime, tmp_path: Path) -> None:
    # the emulator, under the real client: a handler that answers as much as it is asked for
    task_root = tmp_path / "task"
    task_root.mkdir()
    (task_root / "big.py").write_text(BIG)
    function = placeholder_functions()["ApiFunction"]
    api = RuntimeApi(f"arn:aws:lambda:{REGION}:{ACCOUNT}:function:big", 30)
    process = FunctionProcess(runtime.python, "big.handler", task_root, runtime.runtime_dir,
                              lambda_environment(function, "big", {}), api, tmp_path / "big.log")
    try:
        fits = process.invoke({"characters": MAX_RESPONSE_BYTES - 2})  # with its JSON quotes: the limit
        assert fits.error is None and len(fits.response) == MAX_RESPONSE_BYTES - 2
        too_big = process.invoke({"characters": MAX_RESPONSE_BYTES - 1})
        assert too_big.error is not None and too_big.error["errorType"] == RESPONSE_TOO_LARGE, too_big.error
        assert too_big.body is None
        # awslambdaric gives up on a refused response: the environment ends (Lambda starts anew)
        assert process.wait_exit() == 1 and "Http response code: 413" in process.logs()
    finally:
        process.stop()
