"""Benchmark: every existing artifact of the demo model (and the rivals', when built) under one protocol, one run.

It times each out/demo-*/ artifact with `mlexport bench`'s host protocol (a fresh process per artifact and
runtime), adds the peers that ../shared/peers/setup.sh built ($PEERS), and prints a Markdown table with ratios to
the first row (ours, ExecuTorch 4-bit, when present). Core ML artifacts are timed on macOS only.

    .venv/bin/python benchmarks/bench_demo.py [--repeat 5] [--prompt-tokens 128] [--gen-tokens 64] [--long] [--plot F]

--long then times everything again under the long-context protocol (an 850-token prompt, then 128 new tokens: a
chat's system prompt and history), which fits the optimum-executorch peer's 1,024-token context.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from mlexport.validate.bench import LONG_GEN, LONG_PROMPT, BenchResult, BenchSettings, run_bench, write_plot

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
    parser.add_argument("--long", action="store_true", help="then the long protocol: 850-token prompt, 128 new")
    args = parser.parse_args()
    protocols = [BenchSettings(args.prompt_tokens, args.gen_tokens, args.threads, args.repeat, args.warmup)]
    if args.long:
        protocols.append(BenchSettings(LONG_PROMPT, LONG_GEN, args.threads, args.repeat, args.warmup))
    artifacts = ours()
    if not artifacts:
        sys.exit("no demo artifacts in out/: run `make demo` (or mlexport export --target all) first")
    everything = []
    for settings in protocols:
        results = timed(artifacts, settings)
        print_table(results, settings)
        everything += [r for _, r in results]
    if args.plot:
        write_plot(everything, args.plot)


def timed(artifacts: list[Path], settings: BenchSettings) -> list[tuple[str, BenchResult]]:
    """Ours, then each peer that ../shared/peers/setup.sh built, one after the other under ``settings``."""
    results: list[tuple[str, BenchResult]] = []
    for artifact in artifacts:
        if artifact.name.startswith("demo-coreml") and sys.platform != "darwin":
            print(f"skipped {artifact.name}: Core ML runs on macOS only", file=sys.stderr)
            continue
        print(f"timing {artifact.name} ({settings.prompt_tokens}-token prompt) ...", file=sys.stderr)
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
    return results


def print_table(results: list[tuple[str, BenchResult]], settings: BenchSettings) -> None:
    """A Markdown table with ratios to the first row, and each of ours against the memory bandwidth."""
    base = results[0][1].summary()
    bandwidth = next((r.roofline["bandwidth_gb_s"] for _, r in results if r.roofline), None)
    limit = f"; decode GB/s against the {bandwidth:.1f} GB/s this machine copies" if bandwidth else ""
    print(
        f"\n{settings.prompt_tokens} prompt tokens, {settings.gen_tokens} generated; median of {settings.repeat} "
        f"rounds after {settings.warmup} warm-up; ratios to the first row{limit}\n"
    )
    print(
        "| who | artifact | runtime | MB | load s | TTFT ms | prefill tok/s | decode tok/s | decode × | RSS MB "
        "| decode GB/s (% of bandwidth) |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for who, r in results:
        s = r.summary()
        decode = s["decode_tok_s"]["median"]
        line = r.roofline
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
            f"{line['achieved_gb_s']:.1f} ({100 * line['fraction']:.0f}%)" if line else "-",
        ]
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
