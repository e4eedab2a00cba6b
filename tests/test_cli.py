"""The console entry point: help text and usage errors, through the real CLI process."""

from __future__ import annotations

import subprocess
import sys


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
