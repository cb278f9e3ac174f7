"""The local S3 of `make dev` keeps its objects across restarts (infra/s3.py S3Snapshot): what
the code relies on comes back (bytes, keys, content type, user metadata, the checksum it was
written with), and a crash loses only what was written after the last save."""

from __future__ import annotations

import base64
import hashlib
import json
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import boto3
from botocore.config import Config

from infra.s3 import MotoServer

REPO = Path(__file__).resolve().parents[2]

# A moto server in a process of its own (moto's state is global to a process: servers started
# in this one would share it, and a restart would prove nothing). Lines on stdin drive it:
# "save" answers the number of objects fetched, "stop" the number kept, then it exits.
_SERVER = """
import sys
from pathlib import Path
from infra.s3 import start_moto_server
server = start_moto_server(data_dir=Path(sys.argv[1]), save_interval_s=3600)
print(server.endpoint_url, server.restored, flush=True)
for line in sys.stdin:
    if line.strip() == "save":
        print(server.snapshot.save(), flush=True)
    elif line.strip() == "stop":
        print(server.stop(), flush=True)
        break
"""


class MotoProcess:
    def __init__(self, data_dir: Path) -> None:
        self.process = subprocess.Popen([sys.executable, "-c", _SERVER, str(data_dir)], cwd=REPO, text=True,
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        endpoint, restored = self._answer().split()
        self.endpoint_url, self.restored = endpoint, int(restored)

    def _answer(self) -> str:
        line = self.process.stdout.readline()  # type: ignore[union-attr]
        assert line, f"the moto process ended (exit {self.process.wait(timeout=30)})"
        return line.strip()

    def command(self, what: str) -> int:
        self.process.stdin.write(what + "\n")  # type: ignore[union-attr]
        self.process.stdin.flush()  # type: ignore[union-attr]
        return int(self._answer())

    def stop(self) -> int:
        kept = self.command("stop")
        assert self.process.wait(timeout=30) == 0
        return kept

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=30)


def _client(server: MotoServer | MotoProcess, region: str = "us-east-1") -> Any:
    return boto3.client("s3", endpoint_url=server.endpoint_url, region_name=region,
                        aws_access_key_id="testing", aws_secret_access_key="testing",
                        config=Config(s3={"addressing_style": "path"}))


def _everything(s3: Any) -> dict[str, dict[str, Any]]:
    """Every object of every bucket with what a reader sees of it."""
    seen: dict[str, dict[str, Any]] = {}
    for bucket in sorted(b["Name"] for b in s3.list_buckets()["Buckets"]):
        seen[bucket] = {}
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket):
            for obj in page.get("Contents", []):
                got = s3.get_object(Bucket=bucket, Key=obj["Key"], ChecksumMode="ENABLED")
                seen[bucket][obj["Key"]] = {
                    "body": got["Body"].read(), "content_type": got["ContentType"], "metadata": got["Metadata"],
                    "sha256": got.get("ChecksumSHA256"), "encoding": got.get("ContentEncoding"),
                }
    return seen


def test_objects_come_back_after_a_restart(tmp_path: Path) -> None:
    data_dir = tmp_path / "s3"
    first = MotoProcess(data_dir)
    try:
        s3 = _client(first)
        s3.create_bucket(Bucket="outputs-bucket")
        s3.create_bucket(Bucket="empty-bucket")
        s3.create_bucket(Bucket="eu-bucket", CreateBucketConfiguration={"LocationConstraint": "eu-west-1"})
        body = b'{"rows": 3}'
        s3.put_object(Bucket="outputs-bucket", Key="runs/a/output.json", Body=body, ContentType="application/json",
                      ChecksumAlgorithm="SHA256", ChecksumSHA256=base64.b64encode(hashlib.sha256(body).digest()).decode())
        s3.put_object(Bucket="outputs-bucket", Key="odd keys/é ü/%2F+plus.txt", Body=b"text", Metadata={"who": "me"},
                      ContentEncoding="identity")
        s3.put_object(Bucket="outputs-bucket", Key="empty", Body=b"")
        s3.put_object(Bucket="outputs-bucket", Key="same-bytes", Body=body)  # shares a blob
        s3.put_object(Bucket="outputs-bucket", Key="overwritten", Body=b"old")
        s3.put_object(Bucket="outputs-bucket", Key="deleted", Body=b"gone")
        assert first.command("save") == 6
        assert first.command("save") == 0  # nothing changed: nothing fetched again
        s3.put_object(Bucket="outputs-bucket", Key="overwritten", Body=b"new")
        s3.delete_object(Bucket="outputs-bucket", Key="deleted")
        s3.put_object(Bucket="eu-bucket", Key="x", Body=b"eu")
        expected = _everything(s3)
        assert first.stop() == 6
    finally:
        first.kill()

    second = MotoProcess(data_dir)
    try:
        assert second.restored == 6
        s3 = _client(second)
        assert _everything(s3) == expected
        assert expected["outputs-bucket"]["runs/a/output.json"]["sha256"]  # the checksum came back
        assert set(expected) == {"outputs-bucket", "empty-bucket", "eu-bucket"}
        assert s3.get_bucket_location(Bucket="eu-bucket")["LocationConstraint"] == "eu-west-1"
        # Bodies are stored once each, and the replaced and deleted ones are collected.
        blobs = sorted(p.read_bytes() for p in (data_dir / "blobs").glob("*/*"))
        assert blobs == sorted([b"", b'{"rows": 3}', b"text", b"new", b"eu"])
        # Loading adopted the server's marks: a save right after fetches nothing.
        assert second.command("save") == 0
        second.stop()
    finally:
        second.kill()


def test_the_tests_moto_keeps_nothing(moto_server: MotoServer) -> None:
    """The tests' server (tests/conftest.py) starts without a directory: in memory only."""
    assert moto_server.snapshot is None and moto_server.restored == 0


def test_a_crash_loses_only_what_came_after_the_last_save(tmp_path: Path) -> None:
    data_dir = tmp_path / "s3"
    # A process that saves, writes once more and is killed before the next save (SIGKILL: no
    # `finally`, no save at stop).
    script = textwrap.dedent(f"""
        import os, signal, boto3
        from pathlib import Path
        from botocore.config import Config
        from infra.s3 import start_moto_server
        server = start_moto_server(data_dir=Path({str(data_dir)!r}), save_interval_s=3600)
        s3 = boto3.client("s3", endpoint_url=server.endpoint_url, region_name="us-east-1",
                          aws_access_key_id="testing", aws_secret_access_key="testing",
                          config=Config(s3={{"addressing_style": "path"}}))
        s3.create_bucket(Bucket="crash-bucket")
        s3.put_object(Bucket="crash-bucket", Key="saved", Body=b"kept")
        server.snapshot.save()
        s3.put_object(Bucket="crash-bucket", Key="unsaved", Body=b"lost")
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    crashed = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, timeout=120)
    assert crashed.returncode == -9, crashed.stderr.decode()
    assert json.loads((data_dir / "index.json").read_text())["buckets"]["crash-bucket"]["objects"].keys() == {"saved"}

    server = MotoProcess(data_dir)
    try:
        s3 = _client(server)
        assert [o["Key"] for o in s3.list_objects_v2(Bucket="crash-bucket")["Contents"]] == ["saved"]
        assert s3.get_object(Bucket="crash-bucket", Key="saved")["Body"].read() == b"kept"
        server.stop()
    finally:
        server.kill()
