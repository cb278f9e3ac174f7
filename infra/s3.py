"""A moto server standing in for S3 and STS on this machine (`make dev` and the tests)."""

from __future__ import annotations

import socket
from dataclasses import dataclass

from moto.server import ThreadedMotoServer

# moto accepts any credentials; these keep boto3 from searching the machine for real ones.
FAKE_AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SESSION_TOKEN": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_REGION": "us-east-1",
}


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


@dataclass
class MotoServer:
    host: str
    port: int
    _server: ThreadedMotoServer

    @property
    def endpoint_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def stop(self) -> None:
        self._server.stop()


def start_moto_server(host: str = "127.0.0.1", port: int | None = None) -> MotoServer:
    port = port or free_port(host)
    server = ThreadedMotoServer(ip_address=host, port=port, verbose=False)
    server.start()
    return MotoServer(host=host, port=port, _server=server)


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
