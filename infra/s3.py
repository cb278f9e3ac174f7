"""A moto server standing in for S3 and STS on this machine (`make dev` and the tests).

moto keeps objects in memory. For `make dev`, `S3Snapshot` keeps them in a directory
(`.tickweave/s3/`) across restarts: it loads them at start, saves what changed every few seconds
and once more at stop. The tests use a fresh in-memory server unless they pass a directory.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import tempfile
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from moto.server import ThreadedMotoServer

log = logging.getLogger("tickweave.dev.s3")

# moto accepts any credentials; these keep boto3 from searching the machine for real ones.
FAKE_AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SESSION_TOKEN": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_REGION": "us-east-1",
}

# How often `make dev` saves the objects that changed: a crash (SIGKILL, power loss of the
# terminal) loses at most the objects written since the last save.
DEFAULT_SAVE_INTERVAL_S = 2.0

_SNAPSHOT_FORMAT = 1
# The checksums S3 keeps for a whole object, as get_object names them and put_object takes them.
_CHECKSUMS = ("ChecksumSHA256", "ChecksumSHA1", "ChecksumCRC32", "ChecksumCRC32C", "ChecksumCRC64NVME")
_ALGORITHMS = {"ChecksumSHA256": "SHA256", "ChecksumSHA1": "SHA1", "ChecksumCRC32": "CRC32",
               "ChecksumCRC32C": "CRC32C", "ChecksumCRC64NVME": "CRC64NVME"}
# Object headers worth keeping besides the body, the content type and the user metadata.
_HEADERS = ("ContentEncoding", "ContentDisposition", "ContentLanguage", "CacheControl")


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


class S3Snapshot:
    """The objects of every bucket of an S3 endpoint, kept in `directory`.

    Layout: `index.json` lists each bucket (with its region) and each object's key, blob, size,
    ETag, content type, user metadata, checksum and a few headers; `blobs/` holds the bodies,
    named by their sha256. A save fetches only the objects whose ETag, size or last-modified
    time changed since the previous save, writes new blobs first and then replaces the index
    atomically, so a process killed mid-save leaves the previous snapshot whole. Only the
    current version of each object is kept (no versioning, tags, ACLs or bucket policies: the
    local stack uses none of them).
    """

    def __init__(self, directory: Path, endpoint_url: str) -> None:
        import boto3
        from botocore.config import Config

        self.directory = directory
        self.blobs = directory / "blobs"
        self.index_path = directory / "index.json"
        self.blobs.mkdir(parents=True, exist_ok=True)
        # Explicit dummy credentials: the snapshot must not depend on the caller's environment.
        # Checksums only when asked for: a restored object gets back exactly the one it had.
        self._client: Any = boto3.client(
            "s3", endpoint_url=endpoint_url, region_name="us-east-1",
            aws_access_key_id=FAKE_AWS_ENV["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=FAKE_AWS_ENV["AWS_SECRET_ACCESS_KEY"],
            config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 2},
                          request_checksum_calculation="when_required",
                          response_checksum_validation="when_required"),
        )
        self._index: dict[str, Any] = self._read_index()
        self._lock = threading.Lock()  # one save at a time (the timer's and the final one)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # --- load ------------------------------------------------------------------------------

    def load(self) -> int:
        """Put every saved bucket and object into the (empty) server; returns the object count."""
        buckets: dict[str, Any] = self._index.get("buckets", {})
        jobs: list[tuple[str, str, dict[str, Any]]] = []
        for bucket, saved in buckets.items():
            self._create_bucket(bucket, saved.get("region"))
            jobs.extend((bucket, key, entry) for key, entry in saved.get("objects", {}).items())
        with ThreadPoolExecutor(max_workers=8, thread_name_prefix="s3-snapshot-load") as pool:
            restored = sum(pool.map(lambda job: self._put(*job), jobs))
        # The server now has its own ETags and times for what it holds: adopt them, so the next
        # save does not fetch back every object it just received.
        current = {bucket: dict(self._listing(bucket)) for bucket in buckets}
        for bucket, saved in buckets.items():
            for key, entry in saved.get("objects", {}).items():
                if key in current[bucket]:
                    entry.update(current[bucket][key])
        self._write_index(self._index)
        return restored

    def _create_bucket(self, bucket: str, region: str | None) -> None:
        from botocore.exceptions import ClientError

        try:
            if region and region != "us-east-1":
                self._client.create_bucket(Bucket=bucket, CreateBucketConfiguration={"LocationConstraint": region})
            else:
                self._client.create_bucket(Bucket=bucket)
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                raise

    def _put(self, bucket: str, key: str, entry: dict[str, Any]) -> int:
        blob = self.blobs / entry["blob"][:2] / entry["blob"]
        if not blob.exists():
            log.warning("local S3: the saved body of s3://%s/%s is missing from %s; not restored", bucket, key, blob)
            return 0
        extra: dict[str, Any] = {"Metadata": entry.get("metadata") or {}}
        if entry.get("content_type"):
            extra["ContentType"] = entry["content_type"]
        extra.update({name: value for name, value in (entry.get("headers") or {}).items() if name in _HEADERS})
        checksum = entry.get("checksum")
        if checksum and checksum.get("name") in _ALGORITHMS:
            extra["ChecksumAlgorithm"] = _ALGORITHMS[checksum["name"]]
            extra[checksum["name"]] = checksum["value"]
        with blob.open("rb") as body:
            self._client.put_object(Bucket=bucket, Key=key, Body=body, **extra)
        return 1

    # --- save ------------------------------------------------------------------------------

    def save(self) -> int:
        """Save what changed since the last save; returns how many objects were fetched."""
        with self._lock:
            previous = self._index.get("buckets", {})
            buckets: dict[str, Any] = {}
            fetched = 0
            for bucket in self._bucket_names():
                before = previous.get(bucket, {})
                objects: dict[str, Any] = {}
                for key, seen in self._listing(bucket):
                    entry = before.get("objects", {}).get(key)
                    if entry is not None and all(entry.get(name) == seen[name] for name in seen):
                        objects[key] = entry
                        continue
                    fresh = self._fetch(bucket, key)
                    if fresh is not None:  # None: deleted between the listing and the read
                        # Marked with the listing's ETag and time: if the object changed after
                        # the listing, the next listing differs and the next save fetches it.
                        objects[key] = {**fresh, **seen}
                        fetched += 1
                region = before.get("region") if "region" in before else self._region(bucket)
                buckets[bucket] = {"region": region, "objects": objects}
            index = {"format": _SNAPSHOT_FORMAT, "saved_at": datetime.now(UTC).isoformat(), "buckets": buckets}
            if buckets != previous:
                self._write_index(index)
                self._collect_garbage(index)
            self._index = index
            return fetched

    def start_autosave(self, interval_s: float) -> None:
        self._thread = threading.Thread(target=self._autosave, args=(interval_s,), name="s3-snapshot", daemon=True)
        self._thread.start()

    def close(self) -> int:
        """Stop saving on a timer and save once more; returns the number of objects kept."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=60)
        self.save()
        return self.object_count

    @property
    def object_count(self) -> int:
        return sum(len(b.get("objects", {})) for b in self._index.get("buckets", {}).values())

    def _autosave(self, interval_s: float) -> None:
        while not self._stop.wait(interval_s):
            try:
                self.save()
            except Exception as exc:  # the next save tries again; the stack keeps running
                log.warning("local S3: saving the objects to %s failed: %r", self.directory, exc)

    def _bucket_names(self) -> list[str]:
        return [b["Name"] for b in self._client.list_buckets().get("Buckets", [])]

    def _region(self, bucket: str) -> str:
        location = self._client.get_bucket_location(Bucket=bucket).get("LocationConstraint")
        return str(location or "us-east-1")

    def _listing(self, bucket: str) -> Iterator[tuple[str, dict[str, Any]]]:
        """(key, what tells a changed object apart) for every object of the bucket."""
        for page in self._client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
            for obj in page.get("Contents", []):
                yield obj["Key"], {"etag": obj["ETag"], "size": int(obj["Size"]),
                                   "last_modified": obj["LastModified"].astimezone(UTC).isoformat()}

    def _fetch(self, bucket: str, key: str) -> dict[str, Any] | None:
        from botocore.exceptions import ClientError

        try:
            response = self._client.get_object(Bucket=bucket, Key=key, ChecksumMode="ENABLED")
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404", "NoSuchBucket"):
                return None
            raise
        digest = hashlib.sha256()
        with tempfile.NamedTemporaryFile(dir=self.blobs, prefix=".incoming-", delete=False) as tmp:
            for chunk in response["Body"].iter_chunks(1 << 20):
                digest.update(chunk)
                tmp.write(chunk)
        name = digest.hexdigest()
        target = self.blobs / name[:2] / name
        if target.exists():  # same bytes saved before (content-addressed)
            os.unlink(tmp.name)
        else:
            target.parent.mkdir(exist_ok=True)
            os.replace(tmp.name, target)
        checksum = next(
            # A multipart object's checksum is one of its parts' ("...-3"): a single put cannot
            # carry it back, so the restored object goes without.
            ({"name": n, "value": response[n]} for n in _CHECKSUMS if response.get(n) and "-" not in response[n]),
            None,
        )
        return {
            "blob": name, "content_type": response.get("ContentType"), "metadata": response.get("Metadata") or {},
            "headers": {h: response[h] for h in _HEADERS if response.get(h)},
            "checksum": checksum,
        }

    def _read_index(self) -> dict[str, Any]:
        if not self.index_path.exists():
            return {"format": _SNAPSHOT_FORMAT, "buckets": {}}
        index: dict[str, Any] = json.loads(self.index_path.read_text(encoding="utf-8"))
        if index.get("format") != _SNAPSHOT_FORMAT:
            raise SystemExit(f"{self.index_path}: unknown snapshot format {index.get('format')!r}")
        return index

    def _write_index(self, index: dict[str, Any]) -> None:
        tmp = self.index_path.with_name(".index.json.tmp")
        tmp.write_text(json.dumps(index, indent=1, sort_keys=True), encoding="utf-8")
        os.replace(tmp, self.index_path)

    def _collect_garbage(self, index: dict[str, Any]) -> None:
        """Delete the blobs the index no longer names (overwritten or deleted objects), and
        the leftovers of a save that was killed midway."""
        kept = {e["blob"] for b in index["buckets"].values() for e in b["objects"].values()}
        for path in self.blobs.glob("*/*"):
            if path.name not in kept:
                path.unlink(missing_ok=True)
        for path in self.blobs.glob(".incoming-*"):
            path.unlink(missing_ok=True)


@dataclass
class MotoServer:
    host: str
    port: int
    _server: ThreadedMotoServer
    snapshot: S3Snapshot | None = None
    restored: int = 0  # objects loaded from the snapshot at start
    _stopped: bool = field(default=False, repr=False)

    @property
    def endpoint_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def stop(self) -> int:
        """Save the objects (when persistent), then stop; returns the number of objects saved."""
        if self._stopped:
            return 0
        self._stopped = True
        saved = 0
        try:
            if self.snapshot is not None:
                saved = self.snapshot.close()
        finally:
            self._server.stop()
        return saved


def start_moto_server(
    host: str = "127.0.0.1", port: int | None = None, *, data_dir: Path | None = None,
    save_interval_s: float = DEFAULT_SAVE_INTERVAL_S,
) -> MotoServer:
    """A moto server on `host:port` (a free port by default). With `data_dir`, its objects are
    loaded from there now and saved there every `save_interval_s` and at `stop()`."""
    port = port or free_port(host)
    server = ThreadedMotoServer(ip_address=host, port=port, verbose=False)
    server.start()
    moto = MotoServer(host=host, port=port, _server=server)
    if data_dir is not None:
        try:
            moto.snapshot = S3Snapshot(data_dir, moto.endpoint_url)
            moto.restored = moto.snapshot.load()
        except BaseException:
            server.stop()
            raise
        moto.snapshot.start_autosave(save_interval_s)
    return moto


def _main(argv: list[str]) -> int:
    """`python -m infra.s3 ls|cat KEY`: look into the local bucket without the AWS CLI."""
    import json
    import os

    import boto3

    for name, value in FAKE_AWS_ENV.items():
        os.environ.setdefault(name, value)
    endpoint = os.environ.get("S3_ENDPOINT_URL", "http://127.0.0.1:4566")
    bucket = os.environ.get("TICKWEAVE_BUCKET", "tickweave-outputs")
    client = boto3.client("s3", endpoint_url=endpoint)
    if len(argv) >= 1 and argv[0] == "ls":
        prefix = argv[1] if len(argv) > 1 else ""
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            for obj in page.get("Contents", []):
                print(f"{obj['Size']:>8}  {obj['Key']}")
        return 0
    if len(argv) == 2 and argv[0] == "cat":
        body = client.get_object(Bucket=bucket, Key=argv[1])["Body"].read()
        print(json.dumps(json.loads(body), indent=2))
        return 0
    print("usage: python -m infra.s3 ls [PREFIX] | cat KEY")
    return 2


if __name__ == "__main__":
    import sys

    raise SystemExit(_main(sys.argv[1:]))
