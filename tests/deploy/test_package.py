"""The package builder's file selection and zip, on a fake installed tree (no download; the real
build is `make package`, its figures are in docs/deploy.md)."""

from __future__ import annotations

import hashlib
import zipfile
from pathlib import Path, PurePosixPath

import pytest

from infra.package import (
    RUNTIME_PROVIDED,
    Report,
    excluded_files,
    prune,
    select_files,
    write_zip,
)


def install(site: Path, dist: str, version: str, files: dict[str, str]) -> None:
    """Lay out a distribution as pip --target does: its files plus a dist-info with a RECORD."""
    info = site / f"{dist}-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Name: {dist}\nVersion: {version}\n")
    records = [f"{info.name}/METADATA,,", f"{info.name}/RECORD,,"]
    for relative, text in files.items():
        path = site / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        records.append(f"{relative},sha256={hashlib.sha256(text.encode()).hexdigest()},{len(text)}")
    records.append("../../bin/jp.py,,")  # scripts land outside the tree's packages
    (info / "RECORD").write_text("\n".join(records) + "\n")


@pytest.fixture
def site(tmp_path: Path) -> Path:
    root = tmp_path / "package"
    install(root, "boto3", "1.40.0", {"boto3/__init__.py": "", "boto3/session.py": "x = 1"})
    install(root, "botocore", "1.40.0", {"botocore/__init__.py": "", "botocore/data/s3/service-2.json": "{}"})
    install(root, "urllib3", "2.5.0", {"urllib3/__init__.py": ""})
    install(root, "python_dateutil", "2.9.0", {"dateutil/__init__.py": "", "dateutil/tz/tz.py": "y = 2"})
    install(root, "psycopg_binary", "3.3.9", {"psycopg_binary/__init__.py": "",
                                              "psycopg_binary.libs/libpq-a1b2c3.so.5": "ELF"})
    install(root, "some_lib", "1.0", {"some_lib/__init__.py": "", "some_lib/tests/test_it.py": "assert True",
                                      "some_lib/testing.py": "helpers = 1"})
    (root / "bin").mkdir()
    (root / "bin" / "jp.py").write_text("#!python")
    (root / "some_lib" / "__pycache__").mkdir()
    (root / "some_lib" / "__pycache__" / "x.cpython-311.pyc").write_bytes(b"\0")
    (root / "orchestrator").mkdir()
    (root / "orchestrator" / "__init__.py").write_text("")
    return root


def test_the_runtime_provided_sdk_is_left_out_by_its_record(site: Path) -> None:
    excluded = excluded_files(site, RUNTIME_PROVIDED)
    assert PurePosixPath("botocore/data/s3/service-2.json") in excluded
    assert PurePosixPath("boto3-1.40.0.dist-info/RECORD") in excluded
    assert not any(p.parts[0] == "dateutil" for p in excluded)  # croniter needs it; not ours to drop


def test_selection_keeps_dependencies_and_drops_junk(site: Path) -> None:
    selected = {p.as_posix() for p in select_files(site)}
    assert {"dateutil/tz/tz.py", "psycopg_binary.libs/libpq-a1b2c3.so.5", "some_lib/testing.py",
            "orchestrator/__init__.py", "python_dateutil-2.9.0.dist-info/METADATA"} <= selected
    assert not {p for p in selected if p.startswith(("boto3", "botocore", "urllib3", "bin/"))}
    assert "some_lib/tests/test_it.py" not in selected
    assert not [p for p in selected if "__pycache__" in p or p.endswith(".pyc")]


def test_selection_can_keep_the_sdk(site: Path) -> None:
    selected = {p.as_posix() for p in select_files(site, exclude_distributions=())}
    assert "botocore/data/s3/service-2.json" in selected and "boto3/session.py" in selected


def test_prune_leaves_exactly_the_selection(site: Path) -> None:
    keep = select_files(site)
    prune(site, keep)
    left = sorted(PurePosixPath(p.relative_to(site).as_posix()) for p in site.rglob("*") if p.is_file())
    assert left == keep
    assert not (site / "botocore").exists() and not (site / "bin").exists()


def test_the_zip_is_deterministic(site: Path, tmp_path: Path) -> None:
    prune(site, select_files(site))
    first, second = tmp_path / "a.zip", tmp_path / "b.zip"
    write_zip(site, first)
    (site / "orchestrator" / "__init__.py").touch()  # a new mtime changes nothing
    write_zip(site, second)
    assert first.read_bytes() == second.read_bytes()
    with zipfile.ZipFile(first) as archive:
        names = archive.namelist()
        assert names == sorted(names) and "orchestrator/__init__.py" in names
        assert {info.date_time for info in archive.infolist()} == {(1980, 1, 1, 0, 0, 0)}
        assert all((info.external_attr >> 16) & 0o444 == 0o444 for info in archive.infolist())


def test_the_report_says_whether_the_target_is_met(tmp_path: Path) -> None:
    mb = 1024 * 1024
    lines = Report(tmp_path / "x.zip", 17 * mb, 48 * mb, 2000, [("cryptography", 14 * mb)]).lines()
    assert "17.00 MB" in lines[1] and "within the 25 MB target" in lines[1]
    assert "48.00 MB" in lines[2] and "2000 files" in lines[2]
    assert "OVER" in Report(tmp_path / "x.zip", 26 * mb, 60 * mb, 1, []).lines()[1]
