"""Atomic artifact directories and the export manifest.

An export writes into a hidden temp directory beside the target and renames it into place at the end, so a crash,
Ctrl-C or full disk never leaves a half-written artifact, and a user's directory is only replaced with --force.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import resource
import shutil
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from mlexport.errors import MlexportError
from mlexport.sources import sha256_file

MANIFEST = "manifest.json"
MANIFEST_VERSION = 1
TOOL_PACKAGES = ("mlexport", "torch", "executorch", "torchao", "transformers", "coremltools", "onnx", "onnxruntime")


def tool_versions() -> dict[str, str]:
    versions = {}
    for pkg in TOOL_PACKAGES:
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            continue
    return versions


def quantizer_code(plan: dict[str, Any]) -> str:
    """The digest of the code a plan's quantized values depend on, as its cache key counts it (an untuned plan's
    values do not depend on the tuning code): what a manifest records and validate compares."""
    from mlexport.quantize.calibrate import CACHED_CODE, UNTUNED_CODE, code_digest

    return code_digest(CACHED_CODE if plan.get("tune") else UNTUNED_CODE)


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(peak / (1024 * 1024) if os.uname().sysname == "Darwin" else peak / 1024, 1)


@dataclass
class StageLog:
    """Wall time and peak RSS per pipeline stage, for the manifest and the benchmark table."""

    stages: list[dict[str, Any]] = field(default_factory=list)

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.stages.append(
                {"name": name, "seconds": round(time.perf_counter() - start, 2), "peak_rss_mb": peak_rss_mb()}
            )


def ensure_writable(target: Path, force: bool, sources: Sequence[Path] = ()) -> None:
    """Refuse, before any work, an output that would lose a user's files.

    The output may not be, hold or lie inside a model source (``sources``), nor sit under a file; an existing
    non-empty directory is replaced only with ``force``, and even then only if it holds a previous artifact.
    """
    target = target.expanduser().resolve()
    for source in sources:
        source = source.expanduser().resolve()
        if target == source or target.is_relative_to(source) or source.is_relative_to(target):
            raise MlexportError(f"-o {target} overlaps the model source {source}; write the artifact elsewhere")
    ancestor = target
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if ancestor != target and not ancestor.is_dir():
        raise MlexportError(f"cannot create {target}: {ancestor} is a file; pick another -o")
    if target.is_file():
        raise MlexportError(f"{target} is a file, not an artifact directory; pick another -o")
    if target.is_dir() and any(target.iterdir()):
        if not force:
            raise MlexportError(f"{target} already exists; pass --force to overwrite it or -o to write elsewhere")
        if not (target / MANIFEST).is_file():
            raise MlexportError(
                f"{target} is not an mlexport artifact (no {MANIFEST}); --force only replaces a previous export, "
                "so pick another -o"
            )
    if not os.access(ancestor, os.W_OK):
        raise MlexportError(f"{ancestor} is not writable; pick another -o")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def remove_stale_temps(target: Path) -> None:
    """Remove the temp and old directories a killed export (SIGKILL, power loss) left beside ``target``."""
    for path in target.parent.glob(f".{target.name}.*-*"):
        kind, _, rest = path.name[len(target.name) + 2 :].partition("-")
        pid = rest.split("-")[0]
        if kind in ("tmp", "old") and pid.isdigit() and int(pid) != os.getpid() and not _pid_alive(int(pid)):
            shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)


def apply_umask(root: Path) -> None:
    """Give an artifact the permissions ``cp`` would (temp dirs and some writers create 0700/0600)."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(root, 0o777 & ~mask)
    for directory, dirs, files in os.walk(root):
        for name in dirs:
            os.chmod(os.path.join(directory, name), 0o777 & ~mask)
        for name in files:
            path = os.path.join(directory, name)
            if not os.path.islink(path):
                os.chmod(path, 0o666 & ~mask)


def _move_into_place(tmp: Path, target: Path, force: bool) -> None:
    """Rename the finished temp dir onto ``target``; a concurrent export that got there first wins cleanly."""
    old = None
    if target.is_dir() and any(target.iterdir()):
        ensure_writable(target, force)  # another export may have written it since we checked
        old = target.parent / f".{target.name}.old-{os.getpid()}"
        try:
            os.replace(target, old)
        except FileNotFoundError:  # a concurrent --force export moved it away first
            old = None
    try:
        os.replace(tmp, target)
    except OSError as exc:
        if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
            if old is not None:
                os.replace(old, target)
            raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        raise MlexportError(
            f"another export wrote {target} at the same time and its artifact is there; re-run with --force to "
            "replace it"
        ) from None
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def atomic_output_dir(target: Path, force: bool, sources: Sequence[Path] = ()) -> Iterator[Path]:
    """Yield a temp dir to write into; on success it replaces ``target`` (only with force if that exists)."""
    target = target.expanduser().resolve()
    ensure_writable(target, force, sources)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(target)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-{os.getpid()}-", dir=target.parent))
    try:
        yield tmp
        apply_umask(tmp)
        _move_into_place(tmp, target, force)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if exc.errno == errno.ENOSPC:
            raise MlexportError(f"disk full while writing {target}; free space or pass -o on another disk") from None
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_bytes_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def write_json_atomic(path: Path, data: Any) -> None:
    write_bytes_atomic(path, (json.dumps(data, indent=2, default=str) + "\n").encode())


def describe_files(directory: Path, exclude: tuple[str, ...] = (MANIFEST,)) -> list[dict[str, Any]]:
    """Every file of an artifact with its size and sha256 (by default the manifest itself excluded)."""
    files = []
    for path in sorted(directory.rglob("*")):
        if path.is_file() and path.name not in exclude:
            files.append(
                {"path": str(path.relative_to(directory)), "bytes": path.stat().st_size, "sha256": sha256_file(path)}
            )
    return files


def file_digest(path: Path) -> str:
    """sha256 of an artifact file, remembered by path, size and mtime so a large file is hashed once."""
    from mlexport.sources import cache_dir

    stat = path.stat()
    key = str(path.resolve())
    stamp = [stat.st_size, stat.st_mtime_ns]
    memo_path = cache_dir() / "verified.json"
    try:
        memo = json.loads(memo_path.read_text())
    except (OSError, ValueError):
        memo = {}
    if memo.get(key, [None])[:2] == stamp:
        return memo[key][2]
    digest = sha256_file(path)
    memo[key] = [*stamp, digest]
    with contextlib.suppress(OSError):
        memo_path.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(memo_path, memo)
    return digest


def corrupt_files(directory: Path, manifest: dict[str, Any]) -> list[dict[str, Any]]:
    """The manifest's files that are missing or whose size or sha256 differ, with both digests."""
    bad = []
    for entry in manifest.get("files", []):
        path = directory / entry["path"]
        if not path.is_file():
            bad.append({**entry, "found_sha256": None, "problem": "missing"})
            continue
        if "sha256" not in entry:
            continue
        found = file_digest(path) if path.stat().st_size == entry["bytes"] else "size differs"
        if found != entry["sha256"]:
            bad.append({**entry, "found_sha256": found, "problem": "changed"})
    return bad


def read_manifest(artifact: Path, verify: bool = True) -> tuple[Path, dict[str, Any]]:
    """Accept an artifact directory or any file inside one; return (directory, manifest).

    With ``verify`` every file must match the manifest's size and sha256: a flipped byte in a weight file would
    otherwise run and print different text without a word.
    """
    artifact = Path(artifact)
    directory = artifact if artifact.is_dir() else artifact.parent
    if not (directory / MANIFEST).is_file() and (directory.parent / MANIFEST).is_file():
        directory = directory.parent  # a package directory inside the artifact (model.mlpackage)
    path = directory / MANIFEST
    if not artifact.exists():
        raise MlexportError(f"{artifact} does not exist; pass a directory written by 'mlexport export'")
    if not path.is_file():
        raise MlexportError(f"{directory} has no {MANIFEST}; pass a directory written by 'mlexport export'")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise MlexportError(f"{path} is corrupt; re-run 'mlexport export --force'") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files", []), list):
        raise MlexportError(f"{path} is corrupt; re-run 'mlexport export --force'")
    if verify:
        bad = corrupt_files(directory, manifest)
        if bad:
            what = "is missing" if bad[0]["problem"] == "missing" else "does not match its manifest (sha256)"
            raise MlexportError(f"{directory / bad[0]['path']} {what}: the artifact is damaged; re-export it")
    return directory, manifest
