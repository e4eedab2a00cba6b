"""Benchmark: every existing artifact of the demo model (and the rivals', when built) under one protocol, one run.

It times each out/demo-*/ artifact with `mlexport bench`'s host protocol (a fresh process per artifact and
runtime), adds the peers that ../shared/peers/setup.sh built ($PEERS), and prints a Markdown table with ratios to
the first row (ours, ExecuTorch 4-bit, when present). Core ML artifacts are timed on macOS only.

    .venv/bin/python benchmarks/bench_demo.py [--repeat 5] [--prompt-tokens 128] [--gen-tokens 64] [--plot FILE]
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from mlexport.validate.bench import BenchResult, BenchSettings, run_bench, write_plot

from mlexport.errors import MlexportError

ROOT = Path(__file__).resolve().parents[1]
PEERS = Path(os.environ.get("PEERS", Path.home() / ".cache" / "mlexport-peers"))
PEER_DIRS = {"optimum-executorch 8da4w": "oe-smol-8da4w", "onnxruntime-genai builder int4": "ogenai-smol-int4"}


def ours() -> list[Path]:
    found = sorted(p for p in (ROOT / "out").glob("demo-*") if (p / "manifest.json").is_file())
    first = [p for p in found if p.name == "demo-executorch-4bit"]
    return first + [p for p in found if p not in first]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--gen-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int)
    parser.add_argument("--plot", type=Path, help="also write an SVG bar chart")
    args = parser.parse_args()
    settings = BenchSettings(args.prompt_tokens, args.gen_tokens, args.threads, args.repeat, args.warmup)
    artifacts = ours()
    if not artifacts:
        sys.exit("no demo artifacts in out/: run `make demo` (or mlexport export --target all) first")
    results: list[tuple[str, BenchResult]] = []
    for artifact in artifacts:
        if artifact.name.startswith("demo-coreml") and sys.platform != "darwin":
            print(f"skipped {artifact.name}: Core ML runs on macOS only", file=sys.stderr)
            continue
        print(f"timing {artifact.name} ...", file=sys.stderr)
        results += [("mlexport", r) for r in run_bench([artifact], "host", settings)]
    tokenizer = PEERS / "smol-hf"
    for label, name in PEER_DIRS.items():
        directory = PEERS / name
        if not directory.is_dir():
            print(f"peer {label} not built ({directory}): run ../shared/peers/setup.sh", file=sys.stderr)
            continue
        print(f"timing peer {label} ...", file=sys.stderr)
        try:
            results += [(label, r) for r in run_bench([directory], "host", settings, tokenizer=tokenizer)]
        except MlexportError as exc:
            print(f"peer {label} failed: {exc}", file=sys.stderr)
    base = results[0][1].summary()
    print(
        f"\n{settings.prompt_tokens} prompt tokens, {settings.gen_tokens} generated; median of {settings.repeat} "
        f"rounds after {settings.warmup} warm-up; ratios to the first row\n"
    )
    print("| who | artifact | runtime | MB | load s | TTFT ms | prefill tok/s | decode tok/s | decode × | RSS MB |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for who, r in results:
        s = r.summary()
        decode = s["decode_tok_s"]["median"]
        cells = [
            who,
            Path(r.artifact).name,
            r.runtime,
            f"{r.size_mb:.1f}",
            f"{s['load_s']['median']:.2f}",
            f"{1000 * s['ttft_s']['median']:.0f}",
            f"{s['prefill_tok_s']['median']:.0f}",
            f"{decode:.0f}",
            f"{decode / base['decode_tok_s']['median']:.2f}",
            f"{r.peak_rss_mb:.0f}" if r.peak_rss_mb else "-",
        ]
        print("| " + " | ".join(cells) + " |")
    if args.plot:
        write_plot([r for _, r in results], args.plot)


if __name__ == "__main__":
    main()
