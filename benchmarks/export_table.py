"""Benchmark: export the demo model to every target at one preset and print size, wall time and peak RSS.

    .venv/bin/python benchmarks/export_table.py [--quant 4bit] [--reuse]

--reuse reads existing out/demo-<target>-<quant>/ manifests instead of exporting again. Wall time and peak RSS
come from the manifest's per-stage log (measured by the exporter itself), so they are the same numbers a CI
build records.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TARGETS = ("executorch", "onnx", "coreml")
WEIGHTS = {"executorch": (".pte", ".ptd"), "onnx": (".onnx", ".onnx.data"), "coreml": ("weight.bin", ".mlmodel")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quant", default="4bit")
    parser.add_argument("--reuse", action="store_true", help="use existing artifacts instead of exporting")
    args = parser.parse_args()
    print(f"| target | {args.quant} model MB | export wall s | peak RSS GB | slowest stage |")
    print("|---|---|---|---|---|")
    for target in TARGETS:
        out = ROOT / "out" / f"demo-{target}-{args.quant}"
        if not (args.reuse and (out / "manifest.json").is_file()):
            cmd = [sys.executable, "-m", "mlexport.cli", "export", "--target", target, "--quant", args.quant]
            subprocess.run([*cmd, "-o", str(out), "--force"], check=True, cwd=ROOT, capture_output=True)
        manifest = json.loads((out / "manifest.json").read_text())
        size = sum(f["bytes"] for f in manifest["files"] if f["path"].endswith(WEIGHTS[target])) / 1e6
        stages = manifest["stages"]
        wall = sum(s["seconds"] for s in stages)
        rss = max(s["peak_rss_mb"] for s in stages) / 1024
        slowest = max(stages, key=lambda s: s["seconds"])
        print(f"| {target} | {size:.1f} | {wall:.0f} | {rss:.2f} | {slowest['name']} {slowest['seconds']:.0f} s |")


if __name__ == "__main__":
    main()
