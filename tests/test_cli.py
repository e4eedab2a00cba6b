"""The console entry point: help text and usage errors, through the real CLI process."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest


def test_help_shows_bracketed_defaults_verbatim() -> None:
    """Help texts carry "[default: ...]" and "[gates]"; a markup-parsing help renderer silently dropped them."""

    def shown(command: str) -> str:  # one line: click wraps help at 80 columns
        run = [sys.executable, "-m", "mlexport.cli", command, "--help"]
        return " ".join(subprocess.run(run, capture_output=True, text=True).stdout.split())

    assert "[gates]" in shown("validate") and "[default: Python stdlib docs]" in shown("validate")
    assert "[default: out/<model>-<target>-<quant>]" in shown("export")


def test_a_bad_flag_is_a_usage_error_not_a_traceback() -> None:
    """Newer typers raise their own vendored copy of click's usage errors; main() must still catch them."""
    run = subprocess.run(
        [sys.executable, "-m", "mlexport.cli", "export", "--no-such-flag"], capture_output=True, text=True
    )
    assert run.returncode == 2, run.stderr
    assert "No such option: --no-such-flag" in run.stderr and "Traceback" not in run.stderr, run.stderr


@pytest.mark.slow
def test_coremltools_progress_bars_stay_out_of_export_output(tmp_path: Path) -> None:
    """coremltools prints a tqdm bar per conversion pass; the CLI shows its own progress instead. tqdm reads
    TQDM_DISABLE only when torch first imports it, which an early import once made too late."""
    from tiny import llama_config, save_hf_dir

    save_hf_dir(tmp_path / "m", llama_config())
    run = subprocess.run(
        [sys.executable, "-m", "mlexport.cli", "export", "--model", str(tmp_path / "m"), "--target", "coreml"]
        + ["--quant", "fp16", "-o", str(tmp_path / "out"), "--max-context", "32"],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    assert (tmp_path / "out" / "model.mlpackage").is_dir()
    assert "Running MIL" not in run.stderr + run.stdout and "Converting PyTorch" not in run.stderr + run.stdout


@pytest.mark.slow
def test_cache_shows_and_clears_only_what_is_recomputed(tmp_path: Path) -> None:
    """`mlexport cache` lists the cache; --clear drops what is only recomputed, --clear --all also the downloads,
    and a folder this version did not write is never deleted."""
    root = tmp_path / "cache"
    for folder, size in (("quantized", 3000), ("calibration", 10), ("demo", 2000), ("mine", 5)):
        (root / folder).mkdir(parents=True)
        (root / folder / "entry").write_bytes(b"x" * size)
    env = {**os.environ, "MLEXPORT_CACHE": str(root), "COLUMNS": "200"}

    def cache(*flags: str) -> subprocess.CompletedProcess[str]:
        cmd = [sys.executable, "-m", "mlexport.cli", "cache", *flags]
        return subprocess.run(cmd, capture_output=True, text=True, env=env)

    shown = cache()
    assert shown.returncode == 0 and "quantized" in shown.stderr and "demo" in shown.stderr, shown.stderr
    assert sorted(p.name for p in root.iterdir()) == ["calibration", "demo", "mine", "quantized"]
    assert cache("--all").returncode == 2  # --all alone would read as "clear everything": refused
    assert cache("--clear").returncode == 0
    assert sorted(p.name for p in root.iterdir()) == ["demo", "mine"]
    assert cache("--clear", "--all").returncode == 0
    assert sorted(p.name for p in root.iterdir()) == ["mine"]
