"""Shared fixtures: a moto S3/STS server and settings pointing at it.

Database fixtures live in tests/db_fixtures.py (loaded below) so that unit tests that need
no database stay fast.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

import tests.integration.conftest_hypothesis  # noqa: F401  (registers the "lifecycle" and "long" profiles)
from infra.s3 import FAKE_AWS_ENV, MotoServer, start_moto_server

for _name, _value in FAKE_AWS_ENV.items():
    os.environ.setdefault(_name, _value)

pytest_plugins = ["tests.db_fixtures"]


@pytest.fixture(scope="session")
def moto_server() -> Iterator[MotoServer]:
    server = start_moto_server()
    yield server
    server.stop()
