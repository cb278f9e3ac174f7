"""The package builder: its file selection and zip on a fake installed tree (no download), the
hashed lock it installs, and real builds (`make package`; its figures are in docs/deploy.md):
two builds byte-identical, the locked wheels for arm64, x86_64 on request."""

from __future__ import annotations

import glob
import hashlib
import os
import re
import shutil
import subprocess
import zipfile
from pathlib import Path, PurePosixPath

import pytest
from packaging.requirements import Requirement

from infra.lock import ARCHITECTURES as LOCK_ARCHITECTURES
from infra.lock import LOCK, Pin, normalize, platforms, project_dependencies, render, target_options
from infra.package import (
    DEFAULT_OUTPUT,
    RUNTIME_PROVIDED,
    Report,
    build,
    default_output,
    excluded_files,
    forget_origins,
    prune,
    python_version_of,
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


def test_pips_record_of_where_a_wheel_came_from_is_left_out(site: Path) -> None:
    # it names the build directory: the same checkout built elsewhere would give other bytes
    info = site / "orchestrator-0.1.0.dist-info"
    info.mkdir()
    (info / "direct_url.json").write_text('{"url": "file:///home/me/tickweave/build/x.whl"}')
    (info / "METADATA").write_text("Name: tickweave\n")
    selected = {p.as_posix() for p in select_files(site)}
    assert "orchestrator-0.1.0.dist-info/METADATA" in selected
    assert "orchestrator-0.1.0.dist-info/direct_url.json" not in selected


# --- the lock -----------------------------------------------------------------------------


def locked() -> dict[str, tuple[str, list[str]]]:
    """Name -> (version, hashes) of infra/package-requirements.txt, read as pip reads it."""
    pins: dict[str, tuple[str, list[str]]] = {}
    text = LOCK.read_text().replace("\\\n", " ")
    for line in text.splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        requirement, *options = line.split()
        name, version = requirement.split("==")
        assert all(option.startswith("--hash=sha256:") for option in options), line
        pins[name] = (version, [option.split(":", 1)[1] for option in options])
    return pins


def test_the_lock_pins_every_dependency_to_one_version_with_hashes() -> None:
    pins = locked()
    for name, (version, hashes) in pins.items():
        assert re.fullmatch(r"[0-9][0-9A-Za-z.+!-]*", version), name
        # one wheel for both architectures, or one per architecture
        assert 1 <= len(hashes) <= len(LOCK_ARCHITECTURES), name
        assert all(re.fullmatch(r"[0-9a-f]{64}", digest) for digest in hashes), name
    for requirement in map(Requirement, project_dependencies()):
        assert normalize(requirement.name) in pins, f"{requirement.name} is not locked"
        assert requirement.specifier.contains(pins[normalize(requirement.name)][0]), requirement
    assert "psycopg-binary" in pins  # the extra psycopg[binary] brings
    # compiled wheels carry one hash per architecture
    assert len(pins["pydantic-core"][1]) == 2 and len(pins["psycopg-binary"][1]) == 2


def test_the_lock_is_made_from_the_current_pyproject() -> None:
    # `make lock` writes pyproject's dependencies into the header: a dependency changed in
    # pyproject.toml without `make lock` fails here, not at the next deploy
    header = [line[len("#   "):] for line in LOCK.read_text().splitlines() if line.startswith("#   ")]
    assert header == project_dependencies()
    assert LOCK.read_text() == render([Pin(n, v, set(h)) for n, (v, h) in locked().items()], header)


def test_mangum_0_20_is_excluded() -> None:
    # 0.20 ran every invocation in asyncio.run: a new event loop per call
    (spec,) = [Requirement(r) for r in project_dependencies() if Requirement(r).name == "mangum"]
    assert not spec.specifier.contains("0.20.0")
    assert spec.specifier.contains("0.21.0") and spec.specifier.contains(locked()["mangum"][0])


def test_the_target_platforms_are_amazon_linux_2023s() -> None:
    tags = platforms("aarch64")
    assert tags[0] == "manylinux_2_34_aarch64" and tags[-1] == "manylinux2014_aarch64"
    assert "manylinux_2_28_aarch64" in tags  # psycopg-binary 3.3 has no older aarch64 wheel
    options = target_options("x86_64")
    assert options[options.index("--python-version") + 1] == "3.13" and "--only-binary=:all:" in options


# --- real builds (download the locked wheels from PyPI once, then pip's cache) ------------------


def python_3_13() -> str | None:
    """A Python 3.13 to compile the artifact's modules with, if this machine has one."""
    candidates = [os.environ.get("TICKWEAVE_PACKAGE_PYTHON", ""),
                  *sorted(glob.glob(os.path.expanduser("~/.pyenv/versions/3.13*/bin/python3.13"))),
                  shutil.which("python3.13") or ""]
    return next((c for c in candidates if c and python_version_of(c) == "3.13"), None)


ELF_MACHINES = {"arm64": 183, "x86_64": 62}  # e_machine: EM_AARCH64, EM_X86_64


def elf_machine(data: bytes) -> int:
    assert data[:4] == b"\x7fELF"
    return int.from_bytes(data[18:20], "little")


@pytest.fixture(scope="module")
def arm64_builds(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    out = tmp_path_factory.mktemp("artifacts")
    first, second = out / "first.zip", out / "second.zip"
    python = python_3_13()
    build(first, compile_python=python)
    build(second, compile_python=python)
    return first, second


def test_two_builds_are_byte_identical(arm64_builds: tuple[Path, Path]) -> None:
    first, second = arm64_builds
    assert first.read_bytes() == second.read_bytes()


def test_the_build_installs_the_locked_wheels_for_arm64(arm64_builds: tuple[Path, Path]) -> None:
    with zipfile.ZipFile(arm64_builds[0]) as archive:
        names = archive.namelist()
        installed = {normalize(n.split("/")[0][: -len(".dist-info")].rsplit("-", 1)[0]):
                     n.split("/")[0][: -len(".dist-info")].rsplit("-", 1)[1]
                     for n in names if n.split("/")[0].endswith(".dist-info")}
        libraries = [n for n in names if re.search(r"\.so(\.|$)", n)]
        assert libraries and {elf_machine(archive.read(n)[:20]) for n in libraries} == {ELF_MACHINES["arm64"]}
        if python_3_13():
            assert any(n.endswith(".cpython-313.pyc") for n in names)
            assert not any(re.search(r"\.cpython-3(?!13)\d+\.pyc$", n) for n in names)
    bundled = {name: version for name, (version, _) in locked().items() if name not in RUNTIME_PROVIDED}
    installed.pop("tickweave")
    assert installed == bundled  # exactly the lock's versions, the SDK left to the runtime
    assert "boto3" in locked() and "botocore" not in installed


def test_a_dependency_missing_from_the_lock_fails_the_build(tmp_path: Path) -> None:
    # --require-hashes: pip refuses to resolve anything the lock does not name and hash
    text = LOCK.read_text()
    pins = locked()
    start = text.index("\njoserfc==") + 1
    end = text.index("\n", text.index(pins["joserfc"][1][-1], start)) + 1
    partial = tmp_path / "partial.txt"
    partial.write_text(text[:start] + text[end:])
    with pytest.raises(subprocess.CalledProcessError):
        build(tmp_path / "x.zip", lock=partial)
    assert not (tmp_path / "x.zip").exists()


def test_a_build_for_this_machine_is_x86_64(tmp_path: Path) -> None:
    output = tmp_path / "host.zip"
    result = build(output, arch="x86_64", examples=False)
    assert result.output == output and default_output("x86_64") != default_output("arm64") == DEFAULT_OUTPUT
    with zipfile.ZipFile(output) as archive:
        libraries = [n for n in archive.namelist() if re.search(r"\.so(\.|$)", n)]
        assert {elf_machine(archive.read(n)[:20]) for n in libraries} == {ELF_MACHINES["x86_64"]}
        assert not any(n.startswith("examples/") for n in archive.namelist())


def test_pips_record_of_a_wheels_origin_is_forgotten_with_its_record_line(tmp_path: Path) -> None:
    info = tmp_path / "tickweave-0.1.0.dist-info"
    info.mkdir()
    (info / "direct_url.json").write_text('{"url": "file:///tmp/package-x1y2/wheel/t.whl"}')
    (info / "RECORD").write_text("orchestrator/__init__.py,sha256=abc,0\n"
                                 "tickweave-0.1.0.dist-info/direct_url.json,sha256=def,49\n"
                                 "tickweave-0.1.0.dist-info/RECORD,,\n")
    forget_origins(tmp_path)
    assert not (info / "direct_url.json").exists()
    assert (info / "RECORD").read_text() == "orchestrator/__init__.py,sha256=abc,0\ntickweave-0.1.0.dist-info/RECORD,,\n"
