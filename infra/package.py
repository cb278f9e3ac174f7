"""Build the Lambda deployment artifact: `build/tickweave-lambda.zip` (`make package`).

    python -m infra.package [--output PATH] [--include-boto3] [--extra PATH ...] [--no-examples]

1. builds the project's wheel (orchestrator/ and handler/ with their package data) from the
   checkout;
2. installs it with its runtime dependencies only (not the local/test/dev extras) as binary
   wheels for the Lambda runtime: `pip install --platform manylinux2014_x86_64 --only-binary=:all:
   --python-version 3.11 --implementation cp --target build/package` (psycopg comes as its
   binary build, libpq included);
3. leaves out what the runtime already has: boto3, botocore, s3transfer, jmespath and urllib3
   are part of the AWS Lambda Python runtime, and they are more than half of the artifact
   (`--include-boto3` bundles them to pin the SDK version); also `bin/`, `__pycache__` and `tests`
   directories;
4. adds `examples/` (the default TICKWEAVE_WORKER, `examples.tasks:worker`) and any `--extra`
   module or package (your own tasks);
5. compiles every module to `.pyc` (unchecked-hash: valid whatever the files' timestamps) when
   this Python matches the target version: the deployed code is read-only, so without them every
   cold start would compile every module again;
6. writes a deterministic zip (sorted entries, fixed timestamps: the same tree gives the same
   bytes, so `sam deploy` sees no change when there is none) and prints its sizes.
"""

from __future__ import annotations

import argparse
import compileall
import os
import py_compile
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

ROOT = Path(__file__).resolve().parent.parent
BUILD = ROOT / "build"
DEFAULT_OUTPUT = BUILD / "tickweave-lambda.zip"
TARGET_PLATFORM = "manylinux2014_x86_64"
TARGET_PYTHON = "3.11"

# Provided by the AWS Lambda Python runtime (/var/runtime); bundled only with --include-boto3.
RUNTIME_PROVIDED = ("boto3", "botocore", "s3transfer", "jmespath", "urllib3")
# Directory names never shipped, wherever they are.
SKIPPED_DIRS = frozenset({"__pycache__", "tests"})
# Top-level entries pip writes into --target that the function does not need.
SKIPPED_TOP_LEVEL = frozenset({"bin"})
SKIPPED_SUFFIXES = (".pyc", ".pyo")

# Lambda's own limits; the target is what this project aims for.
TARGET_ZIPPED_BYTES = 25 * 1024 * 1024
LAMBDA_MAX_ZIPPED_BYTES = 50 * 1024 * 1024
LAMBDA_MAX_UNZIPPED_BYTES = 250 * 1024 * 1024
_ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)


def normalize(name: str) -> str:
    """A distribution name as PEP 503 compares them."""
    return name.lower().replace("_", "-").replace(".", "-")


def dist_infos(site: Path) -> dict[str, Path]:
    """Normalized distribution name -> its `.dist-info` directory in an installed tree."""
    found: dict[str, Path] = {}
    for entry in site.glob("*.dist-info"):
        name = entry.name[: -len(".dist-info")].rsplit("-", 1)[0]
        found[normalize(name)] = entry
    return found


def files_of(dist_info: Path) -> set[PurePosixPath]:
    """Every file a distribution installed, from its RECORD (paths relative to the tree), plus
    the dist-info itself."""
    files: set[PurePosixPath] = set()
    record = dist_info / "RECORD"
    if record.exists():
        for line in record.read_text(encoding="utf-8").splitlines():
            path = line.split(",", 1)[0].strip()
            if path and not path.startswith(".."):
                files.add(PurePosixPath(path))
    for path in dist_info.rglob("*"):
        if path.is_file():
            files.add(PurePosixPath(path.relative_to(dist_info.parent).as_posix()))
    return files


def excluded_files(site: Path, distributions: Iterable[str]) -> set[PurePosixPath]:
    """Files of the named distributions (those that are installed) in the tree at `site`."""
    infos = dist_infos(site)
    excluded: set[PurePosixPath] = set()
    for name in distributions:
        info = infos.get(normalize(name))
        if info is not None:
            excluded |= files_of(info)
    return excluded


def is_skipped(relative: PurePosixPath) -> bool:
    """Build junk and test code, by path alone."""
    if relative.parts and relative.parts[0] in SKIPPED_TOP_LEVEL:
        return True
    if any(part in SKIPPED_DIRS for part in relative.parts[:-1]):
        return True
    return relative.name.endswith(SKIPPED_SUFFIXES)


def select_files(site: Path, exclude_distributions: Iterable[str] = RUNTIME_PROVIDED) -> list[PurePosixPath]:
    """The files of the tree at `site` that go into the artifact, sorted."""
    excluded = excluded_files(site, exclude_distributions)
    selected: list[PurePosixPath] = []
    for dirpath, dirnames, filenames in os.walk(site):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIPPED_DIRS)
        for filename in filenames:
            relative = PurePosixPath(Path(dirpath, filename).relative_to(site).as_posix())
            if relative not in excluded and not is_skipped(relative):
                selected.append(relative)
    return sorted(selected)


def prune(site: Path, keep: Iterable[PurePosixPath]) -> None:
    """Delete every file of the tree not in `keep`, then the directories left empty."""
    wanted = set(keep)
    for dirpath, _dirnames, filenames in os.walk(site, topdown=False):
        for filename in filenames:
            path = Path(dirpath, filename)
            if PurePosixPath(path.relative_to(site).as_posix()) not in wanted:
                path.unlink()
        if Path(dirpath) != site and not any(Path(dirpath).iterdir()):
            Path(dirpath).rmdir()


def walk_files(root: Path) -> Iterator[Path]:
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for filename in sorted(filenames):
            yield Path(dirpath, filename)


def write_zip(root: Path, output: Path) -> None:
    """Zip the tree at `root` deterministically: sorted entries, fixed timestamps and modes."""
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_suffix(output.suffix + ".tmp")
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=9) as archive:
        for path in sorted(walk_files(root), key=lambda p: p.relative_to(root).as_posix()):
            info = zipfile.ZipInfo(path.relative_to(root).as_posix(), date_time=_ZIP_EPOCH)
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = (0o100644 if not os.access(path, os.X_OK) else 0o100755) << 16
            archive.writestr(info, path.read_bytes(), compresslevel=9)
    tmp.replace(output)


def tree_size(root: Path) -> int:
    return sum(path.stat().st_size for path in walk_files(root))


def copy_source(source: Path, destination_root: Path) -> None:
    """Copy a module or package (without caches and tests) into the artifact's root."""
    if source.is_file():
        shutil.copy2(source, destination_root / source.name)
        return
    shutil.copytree(source, destination_root / source.name,
                    ignore=shutil.ignore_patterns(*SKIPPED_DIRS, "*.pyc", "*.pyo"), dirs_exist_ok=True)


@dataclass(frozen=True)
class Report:
    output: Path
    zipped_bytes: int
    unzipped_bytes: int
    files: int
    largest: list[tuple[str, int]]

    def lines(self) -> list[str]:
        mb = 1024 * 1024
        verdict = "within" if self.zipped_bytes <= TARGET_ZIPPED_BYTES else "OVER"
        lines = [
            f"artifact:  {self.output}",
            f"zipped:    {self.zipped_bytes / mb:.2f} MB ({self.zipped_bytes} bytes; {verdict} the "
            f"{TARGET_ZIPPED_BYTES // mb} MB target, Lambda's limit is {LAMBDA_MAX_ZIPPED_BYTES // mb} MB)",
            f"unzipped:  {self.unzipped_bytes / mb:.2f} MB ({self.unzipped_bytes} bytes in {self.files} files; "
            f"Lambda's limit is {LAMBDA_MAX_UNZIPPED_BYTES // mb} MB)",
            "largest top-level entries (unzipped):",
        ]
        lines += [f"  {size / mb:7.2f} MB  {name}" for name, size in self.largest]
        return lines


def top_level_sizes(root: Path, count: int = 10) -> list[tuple[str, int]]:
    sizes: dict[str, int] = {}
    for path in walk_files(root):
        top = path.relative_to(root).parts[0]
        sizes[top] = sizes.get(top, 0) + path.stat().st_size
    return sorted(sizes.items(), key=lambda item: -item[1])[:count]


def report(root: Path, output: Path) -> Report:
    return Report(output, output.stat().st_size, tree_size(root), sum(1 for _ in walk_files(root)),
                  top_level_sizes(root))


def run(command: list[str]) -> None:
    print("+ " + " ".join(command), flush=True)
    # SOURCE_DATE_EPOCH makes the wheel (and so the hash pip records for it) reproducible.
    subprocess.run(command, check=True, cwd=ROOT, env={**os.environ, "SOURCE_DATE_EPOCH": "315532800"})


def build(output: Path = DEFAULT_OUTPUT, *, include_boto3: bool = False, extras: Iterable[Path] = (),
          examples: bool = True, python: str = sys.executable) -> Report:
    package_dir = BUILD / "package"
    wheel_dir = BUILD / "wheel"
    for directory in (package_dir, wheel_dir):
        shutil.rmtree(directory, ignore_errors=True)
        directory.mkdir(parents=True)

    run([python, "-m", "pip", "wheel", "--quiet", "--no-deps", "--wheel-dir", str(wheel_dir), str(ROOT)])
    (wheel,) = wheel_dir.glob("tickweave-*.whl")
    run([python, "-m", "pip", "install", "--quiet", "--no-compile", "--upgrade",
         "--platform", TARGET_PLATFORM, "--implementation", "cp", "--python-version", TARGET_PYTHON,
         "--only-binary=:all:", "--no-warn-conflicts", "--target", str(package_dir), str(wheel)])

    keep = select_files(package_dir, () if include_boto3 else RUNTIME_PROVIDED)
    prune(package_dir, keep)
    if examples:
        copy_source(ROOT / "examples", package_dir)
    for extra in extras:
        copy_source(extra.resolve(), package_dir)

    if sys.version_info[:2] == tuple(int(part) for part in TARGET_PYTHON.split(".")):
        compileall.compile_dir(str(package_dir), quiet=1, workers=0,
                               invalidation_mode=py_compile.PycInvalidationMode.UNCHECKED_HASH)
    else:
        print(f"warning: this is Python {sys.version_info[0]}.{sys.version_info[1]}, not {TARGET_PYTHON}: "
              "no .pyc in the artifact, so every cold start compiles the code", file=sys.stderr)

    write_zip(package_dir, output)
    return report(package_dir, output)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m infra.package", description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    parser.add_argument("--include-boto3", action="store_true",
                        help="bundle boto3/botocore instead of using the Lambda runtime's")
    parser.add_argument("--extra", type=Path, action="append", default=[],
                        help="a module or package to add (your worker tasks); repeatable")
    parser.add_argument("--no-examples", dest="examples", action="store_false",
                        help="leave out examples/ (then set the WorkerModule parameter to your own worker)")
    args = parser.parse_args(argv)
    result = build(args.output, include_boto3=args.include_boto3, extras=args.extra, examples=args.examples)
    print("\n".join(result.lines()))
    if result.zipped_bytes > LAMBDA_MAX_ZIPPED_BYTES or result.unzipped_bytes > LAMBDA_MAX_UNZIPPED_BYTES:
        print("error: the artifact exceeds Lambda's limits for a zip deployment", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
