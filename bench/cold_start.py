"""Cold start of the API function: import time and peak memory, in fresh processes.

    .venv/bin/python -m bench.cold_start [--repeat 10] [--package build/package] [--json]

Each measurement is a new Python process that does what a cold Lambda execution environment
does with `handler.api`: import it (the Init phase), then handle its first event (the first
Invoke). Scenarios:

- `import`: `import handler.api` alone;
- `health`: the import, then an API Gateway HTTP API event for `GET /health` (builds the app;
  no database);
- `api-get`: the import, then `GET /api/runs` with an API key (the app, one database connection,
  the key lookup and the query);
- `tick`: the import, then an EventBridge Scheduler tick (nothing due) against the database;
- `migrate`: the import, then `{"tickweave": "migrate"}` (nothing pending).

Figures per scenario: the import's wall time, the first event's wall time, both together, and
the process's peak resident memory: VmHWM from /proc/self/status (`ru_maxrss` will not do on
Linux: it is carried over exec from the forked parent, so in a child of this benchmark it
reports the benchmark's own size). Lambda's "Max Memory Used" is this plus the runtime's own
bootstrap. Median and worst of `--repeat` processes.

Three code trees: `checkout` (the repository through `.venv`, its `__pycache__` warm), and,
when `build/package` exists (`make package`), the deployment artifact: `package, precompiled`
runs it with `python -I -S -B` and only the artifact plus the boto3 family on `sys.path`, as on
Lambda (whose runtime provides boto3); `package, no .pyc` runs a copy of the artifact without
its bytecode, which is what a zip without `.pyc` would cost on Lambda's read-only file system.

Settings come as on AWS: `NAME_FROM` references to Secrets Manager secrets and an SSM parameter
held by a moto server on loopback, so the first event imports boto3, makes its clients and reads
them (`--direct` sets them in the environment instead, as before). Each process counts the AWS
API calls it makes (an audit hook on `http.client`'s sends): the `AWS calls` line.

The database is the embedded Postgres (or DATABASE_URL's server), in a database of its own.
Nothing here is a test: nothing asserts timings.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
EVENTS = ROOT / "tests" / "fixtures" / "events"
API_KEY = "bench-cold-start-key"
RUNTIME_PROVIDED = ("boto3", "botocore", "s3transfer", "jmespath", "urllib3")
SCENARIOS = ("import", "health", "api-get", "tick", "migrate")

# Runs in the measured process. argv: scenario, event JSON (or "").
CHILD = r"""
import json, resource, sys, time
scenario, event_json = sys.argv[1], sys.argv[2]
aws_calls = {}
def count_aws_calls(event, args):
    # Every AWS API call of the process, counted where http.client sends the request's head
    # (an audit hook: nothing is imported for it, so the timings are not shifted). JSON-protocol
    # services name the operation in X-Amz-Target, the others in the method and path.
    if event != "http.client.send" or not isinstance(args[1], (bytes, bytearray)):
        return
    head = bytes(args[1]).split(b"\r\n\r\n", 1)[0].decode("latin-1").split("\r\n")
    if not head or " HTTP/1." not in head[0]:
        return
    headers = {line.partition(":")[0].lower(): line.partition(":")[2].strip() for line in head[1:]}
    name = headers.get("x-amz-target") or " ".join(head[0].split(" ")[:2]).split("?")[0]
    aws_calls[name] = aws_calls.get(name, 0) + 1
sys.addaudithook(count_aws_calls)
started = time.perf_counter()
import handler.api
imported = time.perf_counter()
imported_cpu = time.process_time()
if event_json:
    class Context:
        function_name = "tickweave-api"
        aws_request_id = "bench"
        def get_remaining_time_in_millis(self):
            return 25_000
    result = handler.api.lambda_handler(json.loads(event_json), Context())
    status = result.get("statusCode", 200)
    if status >= 300:
        raise SystemExit(f"{scenario}: unexpected answer {result}")
finished = time.perf_counter()
finished_cpu = time.process_time()
def peak_mb():
    # VmHWM: this process's own high-water mark. ru_maxrss would not do: Linux carries it over
    # exec from the forked parent, so a child of a large process reports the parent's size.
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({
    "import_ms": (imported - started) * 1000,
    "event_ms": (finished - imported) * 1000,
    "total_ms": (finished - started) * 1000,
    # CPU time of the first event (all threads): less disturbed than wall time by other load.
    "event_cpu_ms": (finished_cpu - imported_cpu) * 1000,
    "peak_mb": peak_mb(),
    "modules": len(sys.modules),
    "boto3_loaded": "boto3" in sys.modules,
    "botocore_loaded": "botocore" in sys.modules,
    "aws_calls": aws_calls,
    "psycopg_loaded": "psycopg" in sys.modules,
}))
"""

PACKAGE_PRELUDE = "import sys; sys.path[:0] = {paths!r}\n"


@dataclass(frozen=True)
class Tree:
    """Where `handler` is imported from, and how the interpreter is started."""

    name: str
    flags: tuple[str, ...]
    prelude: str


def _event(scenario: str) -> str:
    if scenario == "import":
        return ""
    if scenario == "tick":
        return (EVENTS / "scheduler_tick.json").read_text()
    if scenario == "migrate":
        return json.dumps({"tickweave": "migrate"})
    event = json.loads((EVENTS / "apigw_v2_get_health.json").read_text())
    if scenario == "api-get":
        event["rawPath"] = event["requestContext"]["http"]["path"] = "/api/runs"
        event["rawQueryString"] = "limit=5"
        event["headers"]["authorization"] = f"Bearer {API_KEY}"
    return json.dumps(event)


def measure_once(tree: Tree, scenario: str, env: dict[str, str]) -> dict[str, Any]:
    command = [sys.executable, *tree.flags, "-c", tree.prelude + CHILD, scenario, _event(scenario)]
    done = subprocess.run(command, env=env, cwd=tempfile.gettempdir(), capture_output=True, text=True, timeout=120)
    if done.returncode != 0:
        raise RuntimeError(f"{tree.name}/{scenario} failed:\n{done.stderr[-3000:]}")
    figures: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return figures


def summarize(samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    for key in ("import_ms", "event_ms", "event_cpu_ms", "total_ms", "peak_mb"):
        values = [s[key] for s in samples]
        summary[key] = {"median": round(statistics.median(values), 1), "max": round(max(values), 1)}
    summary["modules"] = samples[-1]["modules"]
    summary["boto3_loaded"] = samples[-1]["boto3_loaded"]
    summary["aws_calls"] = samples[-1]["aws_calls"]
    summary["psycopg_loaded"] = samples[-1]["psycopg_loaded"]
    return summary


def runtime_sim(site_packages: Path, into: Path) -> Path:
    """A directory holding only what the Lambda Python runtime adds to sys.path (boto3 and its
    family), linked from this venv: the artifact must bring everything else itself."""
    into.mkdir(parents=True, exist_ok=True)
    for entry in site_packages.iterdir():
        top = entry.name.split("-")[0].split(".")[0].lower()
        if top in RUNTIME_PROVIDED:
            link = into / entry.name
            if not link.exists():
                link.symlink_to(entry)
    return into


def trees(package: Path | None, scratch: Path) -> list[Tree]:
    found = [Tree("checkout", (), "")]
    if package is not None and (package / "handler" / "api.py").exists():
        site = Path(next(p for p in sys.path if p.endswith("site-packages")))
        sim = runtime_sim(site, scratch / "runtime")
        paths = [str(package.resolve()), str(sim)]
        prelude = PACKAGE_PRELUDE.format(paths=paths)
        found.append(Tree("package, precompiled", ("-I", "-S", "-B"), prelude))
        # The same artifact as a zip without bytecode would be: -B keeps Python from writing
        # any, as Lambda's read-only file system would.
        bare = scratch / "package-no-pyc"
        shutil.copytree(package, bare, ignore=shutil.ignore_patterns("__pycache__"))
        bare_prelude = PACKAGE_PRELUDE.format(paths=[str(bare), str(sim)])
        found.append(Tree("package, no .pyc", ("-I", "-S", "-B"), bare_prelude))
    return found


@contextmanager
def prepared_database() -> Iterator[str]:
    """A migrated database with the API key, on the embedded server or DATABASE_URL's."""
    from bench.server import postgres_server
    from orchestrator.config import Settings
    from orchestrator.db.migrate import migrate
    from orchestrator.engine.service import Engine

    with postgres_server() as server:
        url = server.fresh_database("bench_cold_start")
        migrate(url)
        engine = Engine(Settings(database_url=url, local_worker=None), transports={})
        engine.create_api_key("bench", "viewer", raw_key=API_KEY)
        engine.close()
        try:
            yield url
        finally:
            server.drop("bench_cold_start")


TOKEN_KEY = "A" * 43
TICK_SECRET = "bench-tick-secret"
PUBLIC_URL = "https://bench.execute-api.us-east-1.amazonaws.com"


@contextmanager
def aws_references(database_url: str) -> Iterator[dict[str, str]]:
    """A moto server holding the API function's secrets and parameter in the shapes the template
    stores them (the database URL and the tick secret as plain strings, the token key as the
    generated `{"kid", "key"}` JSON, the public URL as an SSM String parameter); yields the
    environment that points the function at them (`NAME_FROM` references and the endpoints)."""
    import boto3

    from infra.s3 import start_moto_server

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # the server's request log
    moto = start_moto_server()
    try:
        options: dict[str, Any] = {"endpoint_url": moto.endpoint_url, "region_name": "us-east-1",
                                   "aws_access_key_id": "testing", "aws_secret_access_key": "testing"}
        secrets = boto3.client("secretsmanager", **options)
        ssm = boto3.client("ssm", **options)

        def secret(name: str, value: str) -> str:
            arn: str = secrets.create_secret(Name=f"tickweave/bench/{name}", SecretString=value)["ARN"]
            return arn

        ssm.put_parameter(Name="/tickweave/bench/public-url", Value=PUBLIC_URL, Type="String")
        yield {
            "DATABASE_URL_FROM": secret("db", database_url),
            "TICKWEAVE_TOKEN_KEYS_FROM": secret("token-keys", json.dumps({"kid": "bench", "key": TOKEN_KEY})),
            "TICKWEAVE_TICK_SECRET_FROM": secret("tick", TICK_SECRET),
            "TICKWEAVE_PUBLIC_URL_FROM": ssm.get_parameter(Name="/tickweave/bench/public-url")["Parameter"]["ARN"],
            "AWS_ENDPOINT_URL_SECRETS_MANAGER": moto.endpoint_url, "AWS_ENDPOINT_URL_SSM": moto.endpoint_url,
        }
    finally:
        moto.stop()


def child_env(database_url: str, references: dict[str, str] | None = None) -> dict[str, str]:
    """The API function's configuration on AWS, pointed at the local database. With `references`
    (the default), settings come from Secrets Manager and SSM as the template configures them;
    without, they are set directly (no boto3 on the path to the first event)."""
    env = {key: value for key, value in os.environ.items()
           if not key.startswith(("TICKWEAVE_", "PYTHON", "AWS_", "DATABASE_URL"))}
    env.update({
        "TICKWEAVE_MODE": "lambda", "TICKWEAVE_LOCAL_WORKER": "",
        "TICKWEAVE_TRANSPORTS": "*=lambda", "TICKWEAVE_WORKER_FUNCTION": "tickweave-worker",
        "TICKWEAVE_BUCKET": "tickweave-outputs", "AWS_REGION": "us-east-1", "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
    })
    if references is not None:
        env.update(references)
    else:
        # Lambda mode refuses to start on the development token key and tick secret.
        env.update({"DATABASE_URL": database_url, "TICKWEAVE_TOKEN_KEYS": "bench:" + TOKEN_KEY,
                    "TICKWEAVE_TICK_SECRET": TICK_SECRET, "TICKWEAVE_PUBLIC_URL": PUBLIC_URL})
    return env


def largest_imports(env: dict[str, str], count: int = 12) -> list[tuple[str, float]]:
    """Packages by cumulative import time (their own and what they import first) on the path to
    the first HTTP event, from `python -X importtime`."""
    code = "import handler.api, json, sys; handler.api.lambda_handler(json.loads(sys.argv[1]), None)"
    done = subprocess.run([sys.executable, "-X", "importtime", "-c", code, _event("health")],
                          env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)
    totals: dict[str, float] = {}
    for line in done.stderr.splitlines():
        fields = line[len("import time:"):].split("|") if line.startswith("import time:") else []
        if len(fields) != 3 or not fields[1].strip().isdigit():
            continue
        name = fields[2].strip()
        if "." not in name or name in ("orchestrator.api.app", "orchestrator.engine.service"):
            totals[name] = int(fields[1].strip()) / 1000
    return sorted(totals.items(), key=lambda item: -item[1])[:count]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.cold_start", description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=10)
    parser.add_argument("--package", type=Path, default=ROOT / "build" / "package")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    parser.add_argument("--direct", action="store_true",
                        help="set the secrets directly instead of as references to Secrets Manager/SSM (moto)")
    parser.add_argument("--scenario", action="append", choices=SCENARIOS, help="only these (repeatable)")
    parser.add_argument("--checkout-only", action="store_true", help="skip the packaged trees")
    args = parser.parse_args(argv)

    results: dict[str, dict[str, Any]] = {}
    with ExitStack() as stack:
        url = stack.enter_context(prepared_database())
        scratch = stack.enter_context(tempfile.TemporaryDirectory(prefix="tickweave-cold-"))
        env = child_env(url, None if args.direct else stack.enter_context(aws_references(url)))
        for tree in trees(None if args.checkout_only else args.package, Path(scratch)):
            for scenario in args.scenario or SCENARIOS:
                samples = [measure_once(tree, scenario, env) for _ in range(args.repeat)]
                results[f"{tree.name} / {scenario}"] = summarize(samples)
        imports = largest_imports(env)

    if args.json:
        print(json.dumps({"results": results, "largest_imports": imports}, indent=2))
        return 0
    print(f"python {platform.python_version()} on {platform.machine()}, {os.cpu_count()} CPUs; "
          f"{args.repeat} processes per row; median (max); settings "
          + ("set directly" if args.direct else "from Secrets Manager/SSM references (moto)"))
    print(f"{'tree / scenario':<32} {'import ms':>16} {'first event ms':>16} {'event CPU ms':>16} {'total ms':>16}"
          f" {'peak MB':>14}  boto3 psycopg modules")
    for name, summary in results.items():
        cells = [f"{summary[k]['median']:.1f} ({summary[k]['max']:.1f})"
                 for k in ("import_ms", "event_ms", "event_cpu_ms", "total_ms")]
        peak = f"{summary['peak_mb']['median']:.1f} ({summary['peak_mb']['max']:.1f})"
        print(f"{name:<32} {cells[0]:>16} {cells[1]:>16} {cells[2]:>16} {cells[3]:>16} {peak:>14}"
              f"  {'yes' if summary['boto3_loaded'] else 'no':>5} {'yes' if summary['psycopg_loaded'] else 'no':>7}"
              f" {summary['modules']:>7}")
        if summary["aws_calls"]:
            calls = ", ".join(f"{name} x{count}" for name, count in sorted(summary["aws_calls"].items()))
            print(f"{'':<32} AWS calls: {calls}")
    print("\nlargest imports on the way to the first HTTP event (cumulative ms, checkout):")
    for name, ms in imports:
        print(f"  {ms:8.1f}  {name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
