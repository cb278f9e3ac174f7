from __future__ import annotations

from collections.abc import Iterator

import pytest

from orchestrator.config import Settings
from orchestrator.db.connection import Database
from orchestrator.engine.service import Engine

WORKSPACE = "acme"


@pytest.fixture
def settings(database_url: str) -> Settings:
    # Tests register worker services on loopback (127.0.0.1:9 and the like).
    return Settings(database_url=database_url, local_worker=None, allow_private_worker_endpoints=True)


@pytest.fixture
def engine(settings: Settings) -> Iterator[Engine]:
    """An engine with no transports: tests claim and finish tasks themselves."""
    eng = Engine(settings, Database(settings.database_url, max_size=4), transports={})
    eng.create_api_key(WORKSPACE, "admin", raw_key="acme-admin-key")
    yield eng
    eng.close()
