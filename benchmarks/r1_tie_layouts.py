"""Benchmark: the tied-table layouts of an R1-140M-shaped model, where the 128k x 576 table is most of the model.

    .venv/bin/python benchmarks/r1_tie_layouts.py [--work DIR] [--effort fast] [--only TARGET:MODE ...]

Writes a random-weight dense Llama 4 text checkpoint at MobileLLM-R1-140M's shape (benchmarks/export_scale.py),
exports it at 4 bits with each layout each target offers (`--tie-mode`), and prints a table: stored MB, the bar
(unique parameters x 4.5 bits x 1.1), host decode tok/s (`mlexport bench`; Core ML needs macOS) and the table's
reconstruction error ||E - Q(E)|| / ||E|| (random weights make a KLD against fp32 meaningless).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch
from export_scale import SHAPES, WEIGHTS, demo_tokenizer, write_checkpoint

ROOT = Path(__file__).resolve().parents[1]
LAYOUTS = [  # (target, tie mode, how the table is stored)
    ("executorch", "shared8", "int8 per row, read by the lookup and the head"),
    ("executorch", "shared4", "4-bit groups of 32, the lookup reading the head's XNNPACK bytes"),
    ("executorch", "dup4", "4-bit groups of 32, once for the lookup and once for the head"),
    ("onnx", "shared4", "4-bit groups of 32 with zero points, one initializer"),
    ("onnx", "shared8", "int8 per row, one initializer"),
    ("coreml", "shared4", "4-bit groups of 32 with zero points, first 1,000 rows int8"),
]


def reconstruction_error(table: torch.Tensor, mode: str, target: str) -> float:
    from mlexport.quantize.algorithms import rtn

    if mode == "shared8":
        approx = rtn(table, 8, table.shape[1], True).dequantize()
    else:
        approx = rtn(table, 4, 32, target == "executorch").dequantize()
        if target == "coreml":
            approx[:1000] = rtn(table[:1000], 8, table.shape[1], True).dequantize()
    return float((table - approx).norm() / table.norm())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=ROOT / "out" / "r1-ties")
    parser.add_argument("--effort", default="fast", help="4-bit effort for every export (the layout is what varies)")
    parser.add_argument("--only", nargs="*", default=None, help="TARGET:MODE rows to run (default: every layout)")
    args = parser.parse_args()
    model_dir = args.work / "r1-140M"
    params = write_checkpoint(model_dir, SHAPES["R1-140M"], demo_tokenizer())
    bar = params * 4.5 / 8 * 1.1 / 1e6
    from safetensors.torch import load_file

    table = load_file(str(model_dir / "model.safetensors"))["model.embed_tokens.weight"].float()
    rows = []
    for target, mode, layout in LAYOUTS:
        if args.only and f"{target}:{mode}" not in args.only:
            continue
        out = args.work / f"{target}-{mode}"
        cmd = [sys.executable, "-m", "mlexport.cli", "export", "--model", str(model_dir), "--target", target]
        cmd += ["--quant", "4bit", "--effort", args.effort, "--tie-mode", mode, "-o", str(out), "--force"]
        subprocess.run(cmd, check=True, cwd=ROOT)
        manifest = json.loads((out / "manifest.json").read_text())
        suffixes = WEIGHTS if target == "executorch" else ((".onnx", ".data") if target == "onnx" else (".bin",))
        size = sum(f["bytes"] for f in manifest["files"] if f["path"].endswith(suffixes)) / 1e6
        decode = "needs macOS"
        if target != "coreml":
            bench = [sys.executable, "-m", "mlexport.cli", "bench", str(out), "--json"]
            result = json.loads(subprocess.run(bench, check=True, cwd=ROOT, capture_output=True, text=True).stdout)
            result = result[0] if isinstance(result, list) else result
            decode = f"{result['summary']['decode_tok_s']['median']:.1f}"
        error = reconstruction_error(table, mode, target)
        rows.append((target, mode, layout, size, decode, error))
        print(f"{target} {mode}: {size:.1f} MB, decode {decode} tok/s, table error {error:.4f}", flush=True)
    print(f"\nR1-140M shape, {params / 1e6:.0f}M unique parameters; bar {bar:.1f} MB (x 4.5 bits x 1.1)\n")
    print("| target | --tie-mode | table stored as | MB | within bar | host decode tok/s | table error |")
    print("|---|---|---|---|---|---|---|")
    for target, mode, layout, size, decode, error in rows:
        within = "yes" if size <= bar else "no"
        print(f"| {target} | {mode} | {layout} | {size:.1f} | {within} | {decode} | {error:.4f} |")


if __name__ == "__main__":
    main()
