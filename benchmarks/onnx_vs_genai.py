"""Benchmark: the demo model's 4-bit ONNX artifact against the onnxruntime-genai builder's int4 model.

Both run through onnxruntime-genai (the runtime that model builder targets), interleaved in one process (A B, then
B A, and so on), same prompt, greedy, 128 new tokens; medians after a warm-up round. Also prints export time, size
and peak RSS.
The peer dir comes from ../shared/peers/setup.sh ($PEERS, default ~/.cache/mlexport-peers/ogenai-smol-int4).

    .venv/bin/python benchmarks/onnx_vs_genai.py [--artifact out/demo-onnx-4bit] [--rounds 5]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "<|im_start|>user\nWrite a short story about a robot who learns to paint.<|im_end|>\n<|im_start|>assistant\n"
PEER = Path(os.environ.get("PEERS", Path.home() / ".cache/mlexport-peers")) / "ogenai-smol-int4"


def one(og, model, tokenizer) -> tuple[float, float]:  # noqa: ANN001  (onnxruntime_genai objects)
    ids = tokenizer.encode(PROMPT)
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(ids) + 128, do_sample=False)
    generator = og.Generator(model, params)
    t0 = time.perf_counter()
    generator.append_tokens(ids)
    t1 = time.perf_counter()
    n = 0
    while not generator.is_done() and n < 128:
        generator.generate_next_token()
        n += 1
    t2 = time.perf_counter()
    return len(ids) / (t1 - t0), (n - 1) / (t2 - t1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--artifact", type=Path, default=ROOT / "out/demo-onnx-4bit")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    import onnxruntime_genai as og

    if not (args.artifact / "manifest.json").is_file():
        cmd = [sys.executable, "-m", "mlexport.cli", "export", "--target", "onnx", "--quant", "4bit"]
        subprocess.run([*cmd, "-o", str(args.artifact)], check=True, cwd=ROOT)
    manifest = json.loads((args.artifact / "manifest.json").read_text())
    dirs = {"mlexport": args.artifact}
    if PEER.is_dir():
        dirs["ort-genai builder"] = PEER
    else:
        print(f"peer model not found at {PEER}: run ../shared/peers/setup.sh (only our numbers below)")
    models = {name: og.Model(str(d)) for name, d in dirs.items()}
    tokenizers = {name: og.Tokenizer(m) for name, m in models.items()}
    speeds: dict[str, tuple[list[float], list[float]]] = {name: ([], []) for name in dirs}
    for r in range(args.rounds + 1):
        # alternate which model runs first: a fixed A B order read ~1.5% against the first on identical graphs
        for name in list(dirs) if r % 2 else list(dirs)[::-1]:
            prefill, decode = one(og, models[name], tokenizers[name])
            if r:  # round 0 warms up
                speeds[name][0].append(prefill)
                speeds[name][1].append(decode)
    print("| model | MB on disk | prefill tok/s | decode tok/s |")
    print("|---|---|---|---|")
    medians = {}
    for name, d in dirs.items():
        size = sum(f.stat().st_size for f in d.glob("model.onnx*")) / 1e6
        medians[name] = (statistics.median(speeds[name][0]), statistics.median(speeds[name][1]))
        print(f"| {name} | {size:.1f} | {medians[name][0]:.0f} | {medians[name][1]:.0f} |")
    if len(medians) == 2:
        ours, peer = medians["mlexport"], medians["ort-genai builder"]
        print(f"\ndecode ratio {ours[1] / peer[1]:.2f}x (bar >= 1.0), prefill ratio {ours[0] / peer[0]:.2f}x")
    stages = {s["name"]: s for s in manifest["stages"]}
    total = sum(s["seconds"] for s in manifest["stages"])
    peak = max(s["peak_rss_mb"] for s in stages.values())
    print(f"export: {total:.0f} s, peak RSS {peak / 1024:.2f} GB; accounting ratio {manifest['accounting']['ratio']}")


if __name__ == "__main__":
    main()
