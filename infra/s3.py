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
