"""Atomic artifact directories and the export manifest.

An export writes into a hidden temp directory beside the target and renames it into place at the end, so a crash,
Ctrl-C or full disk never leaves a half-written artifact, and a user's directory is only replaced with --force.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import shutil
import tempfile
import time
from collections.abc import Iterator
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


def ensure_writable(target: Path, force: bool) -> None:
    """Refuse to replace a user's file or non-empty directory unless --force."""
    if target.exists() and not force and (target.is_file() or any(target.iterdir())):
        raise MlexportError(f"{target} already exists; pass --force to overwrite it or -o to write elsewhere")


@contextlib.contextmanager
def atomic_output_dir(target: Path, force: bool) -> Iterator[Path]:
    """Yield a temp dir to write into; on success it replaces ``target`` (only with force if that exists)."""
    target = target.resolve()
    ensure_writable(target, force)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield tmp
        old = None
        if target.exists():
            old = target.parent / f".{target.name}.old-{os.getpid()}"
            os.replace(target, old)
        os.replace(tmp, target)
        if old is not None:
            shutil.rmtree(old) if old.is_dir() else old.unlink()
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if exc.errno == 28:  # ENOSPC
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


def read_manifest(artifact: Path) -> tuple[Path, dict[str, Any]]:
    """Accept an artifact directory or any file inside one; return (directory, manifest)."""
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
        return directory, json.loads(path.read_text())
    except json.JSONDecodeError:
        raise MlexportError(f"{path} is corrupt; re-run 'mlexport export --force'") from None
