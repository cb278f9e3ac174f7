"""Build the Lambda deployment artifact: `build/tickweave-lambda.zip` (`make package`).

    python -m infra.package [--arch arm64|x86_64] [--output PATH] [--include-boto3] [--extra PATH ...]
                            [--no-examples] [--compile-python PYTHON]

1. builds the project's wheel (orchestrator/ and handler/ with their package data) from the
   checkout;
2. installs it with its runtime dependencies (not the local/test/dev extras) exactly as
   infra/package-requirements.txt pins and hashes them (`make lock` regenerates it), as binary
   wheels for the Lambda runtime: `pip install --require-hashes -r infra/package-requirements.txt
   --platform manylinux_2_34_aarch64 ... --platform manylinux2014_aarch64 --implementation cp
   --python-version 3.13 --only-binary=:all: --target ...` (psycopg comes as its binary build,
   libpq included). A dependency missing from the lock, or a file whose hash differs, fails the
   build. `--arch x86_64` builds the same for x86_64 (to run the artifact on this machine);
3. leaves out what the runtime already has: boto3, botocore, s3transfer, jmespath and urllib3
   are part of the AWS Lambda Python runtime, and they are more than half of the artifact
   (`--include-boto3` bundles the locked versions to pin the SDK); also `bin/`, `__pycache__` and
   `tests` directories and pip's `direct_url.json` (it names the build directory);
4. adds `examples/` (the default TICKWEAVE_WORKER, `examples.tasks:worker`) and any `--extra`
   module, package or file (your own tasks; a CA bundle);
5. compiles every module to `.pyc` with a Python 3.13 (`--compile-python`, else
   $TICKWEAVE_PACKAGE_PYTHON, else `python3.13` on the PATH; with pyenv: `PYENV_VERSION=3.13.0`):
   unchecked-hash, so valid whatever the files' timestamps, and named as Lambda unpacks them
   (/var/task/...), so the bytes do not depend on where the build ran. The deployed code is
   read-only: without them every cold start would compile every module again;
6. writes a deterministic zip (sorted entries, fixed timestamps and modes: two builds of the same
   checkout give the same bytes, so `sam deploy` sees no change when there is none) and prints
   its sizes.
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from infra.lock import LOCK, TARGET_PYTHON, target_options

ROOT = Path(__file__).resolve().parent.parent
BUILD = ROOT / "build"
DEFAULT_OUTPUT = BUILD / "tickweave-lambda.zip"
# Lambda's names (the template's Architectures) -> the machine names of wheel tags.
ARCHITECTURES = {"arm64": "aarch64", "x86_64": "x86_64"}
DEFAULT_ARCH = "arm64"
# Where Lambda unpacks the zip: the name compiled into each .pyc for tracebacks.
TASK_ROOT = "/var/task"

# Provided by the AWS Lambda Python runtime (/var/runtime); bundled only with --include-boto3.
RUNTIME_PROVIDED = ("boto3", "botocore", "s3transfer", "jmespath", "urllib3")
# Directory names never shipped, wherever they are.
SKIPPED_DIRS = frozenset({"__pycache__", "tests"})
# Top-level entries pip writes into --target that the function does not need.
SKIPPED_TOP_LEVEL = frozenset({"bin"})
# pip's record of where a distribution came from: for the project's wheel, a path on the
# build machine, which would make the artifact differ between checkouts.
SKIPPED_NAMES = frozenset({"direct_url.json"})
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
            recorded = line.split(",", 1)[0].strip()
            if recorded and not recorded.startswith(".."):
                files.add(PurePosixPath(recorded))
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
    if relative.name in SKIPPED_NAMES and relative.parent.name.endswith(".dist-info"):
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


def forget_origins(site: Path) -> None:
    """Delete pip's direct_url.json files and their lines in the RECORDs (which hash them): the
    project's names the wheel's path on this machine."""
    for origin in site.glob("*.dist-info/direct_url.json"):
        record = origin.parent / "RECORD"
        if record.exists():
            name = f"{origin.parent.name}/{origin.name},"
            lines = record.read_text(encoding="utf-8").splitlines(keepends=True)
            record.write_text("".join(line for line in lines if not line.startswith(name)), encoding="utf-8")
        origin.unlink()


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
    """Copy a module, package or file (without caches and tests) into the artifact's root."""
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


def default_output(arch: str) -> Path:
    """build/tickweave-lambda.zip for the template's architecture; another gets its own name, so
    a build to run on this machine never replaces the one `sam deploy` uploads."""
    return DEFAULT_OUTPUT if arch == DEFAULT_ARCH else BUILD / f"tickweave-lambda-{arch}.zip"


def unpacked_tree(arch: str) -> Path:
    """Where `make package` leaves the unpacked artifact: build/package for the template's
    architecture, build/package-x86_64 for the other."""
    return BUILD / ("package" if arch == DEFAULT_ARCH else f"package-{arch}")


def run(command: list[str]) -> None:
    print("+ " + " ".join(command), flush=True)
    # SOURCE_DATE_EPOCH makes the wheel's own timestamps fixed (its hash is taken below anyway).
    subprocess.run(command, check=True, cwd=ROOT, env={**os.environ, "SOURCE_DATE_EPOCH": "315532800"})


def python_version_of(python: str) -> str | None:
    """"3.13" for an interpreter that runs, else None (a pyenv shim without its version selected
    exits non-zero)."""
    try:
        done = subprocess.run([python, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
                              capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def compiling_python(requested: str | None = None) -> str | None:
    """A Python of the target version to compile the artifact's modules with, or None."""
    candidates = [requested] if requested else [
        os.environ.get("TICKWEAVE_PACKAGE_PYTHON", ""), sys.executable, f"python{TARGET_PYTHON}"]
    for candidate in filter(None, candidates):
        if python_version_of(candidate) == TARGET_PYTHON:
            return candidate
    if requested:
        raise SystemExit(f"{requested} is not a Python {TARGET_PYTHON}")
    return None


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def build_wheel(wheel_dir: Path) -> Path:
    """The project's wheel. setuptools builds in the checkout's build/lib, which keeps modules
    deleted from the source: it is emptied first."""
    for stale in [BUILD / "lib", *BUILD.glob("bdist.*")]:
        shutil.rmtree(stale, ignore_errors=True)
    run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--wheel-dir", str(wheel_dir), str(ROOT)])
    (wheel,) = wheel_dir.glob("tickweave-*.whl")
    return wheel


def install(wheel: Path, package_dir: Path, arch: str, lock: Path) -> None:
    """The project's wheel and its locked dependencies into `package_dir`, for `arch`. Every
    requirement carries its hash (the project's wheel the one just built), so pip refuses a
    dependency the lock lacks and a file other than the locked one."""
    project = package_dir.parent / "project-requirements.txt"
    project.write_text(f"tickweave @ {wheel.resolve().as_uri()} --hash=sha256:{sha256_of(wheel)}\n")
    run([sys.executable, "-m", "pip", "install", "--quiet", "--no-compile", "--require-hashes",
         *target_options(ARCHITECTURES[arch]), "--no-warn-conflicts", "--target", str(package_dir),
         "-r", str(lock), "-r", str(project)])


def compile_modules(package_dir: Path, python: str | None) -> None:
    if python is None:
        print(f"warning: no Python {TARGET_PYTHON} found (--compile-python, TICKWEAVE_PACKAGE_PYTHON or "
              f"python{TARGET_PYTHON} on the PATH): no .pyc in the artifact, so every cold start "
              "compiles the code", file=sys.stderr)
        return
    # One process: parallel workers would not change the bytes, but are not needed for ~1 s.
    run([python, "-m", "compileall", "-q", "--invalidation-mode", "unchecked-hash",
         "-d", TASK_ROOT, str(package_dir)])


def build(output: Path | None = None, *, arch: str = DEFAULT_ARCH, include_boto3: bool = False,
          extras: Iterable[Path] = (), examples: bool = True, lock: Path = LOCK,
          compile_python: str | None = None) -> Report:
    """Build the artifact for `arch` (arm64 or x86_64) at `output` (default: default_output)."""
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {arch!r}; one of {', '.join(ARCHITECTURES)}")
    output = output or default_output(arch)
    python = compiling_python(compile_python)
    BUILD.mkdir(parents=True, exist_ok=True)
    # One build at a time per checkout (the wheel is built in the checkout's build/); each in its
    # own directory, so nothing of an earlier build leaks in.
    with open(BUILD / ".package.lock", "w") as guard:
        fcntl.flock(guard, fcntl.LOCK_EX)
        with tempfile.TemporaryDirectory(prefix="package-", dir=BUILD) as work:
            package_dir, wheel_dir = Path(work, "package"), Path(work, "wheel")
            package_dir.mkdir()
            install(build_wheel(wheel_dir), package_dir, arch, lock)
            forget_origins(package_dir)

            keep = select_files(package_dir, () if include_boto3 else RUNTIME_PROVIDED)
            prune(package_dir, keep)
            if examples:
                copy_source(ROOT / "examples", package_dir)
            for extra in extras:
                copy_source(extra.resolve(), package_dir)
            compile_modules(package_dir, python)
            write_zip(package_dir, output)
            result = report(package_dir, output)
            if output == default_output(arch):
                # the unpacked artifact, for bench.cold_start and for looking inside
                tree = unpacked_tree(arch)
                shutil.rmtree(tree, ignore_errors=True)
                package_dir.replace(tree)
            return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m infra.package", description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", choices=sorted(ARCHITECTURES), default=DEFAULT_ARCH,
                        help="the Lambda architecture (default arm64, the template's; x86_64 to run "
                             "the artifact on an x86_64 machine, written to build/tickweave-lambda-x86_64.zip)")
    parser.add_argument("--output", type=Path, default=None)
    parser.add_argument("--include-boto3", action="store_true",
                        help="bundle boto3/botocore instead of using the Lambda runtime's")
    parser.add_argument("--extra", type=Path, action="append", default=[],
                        help="a module, package or file to add (your worker tasks, a CA bundle); repeatable")
    parser.add_argument("--no-examples", dest="examples", action="store_false",
                        help="leave out examples/ (then set the WorkerModule parameter to your own worker)")
    parser.add_argument("--lock", type=Path, default=LOCK, help="the hashed requirements to install")
    parser.add_argument("--compile-python", default=None, help=f"a Python {TARGET_PYTHON} to compile the modules with")
    args = parser.parse_args(argv)
    result = build(args.output, arch=args.arch, include_boto3=args.include_boto3, extras=args.extra,
                   examples=args.examples, lock=args.lock, compile_python=args.compile_python)
    print("\n".join(result.lines()))
    if result.zipped_bytes > LAMBDA_MAX_ZIPPED_BYTES or result.unzipped_bytes > LAMBDA_MAX_UNZIPPED_BYTES:
        print("error: the artifact exceeds Lambda's limits for a zip deployment", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
