"""Benchmark: export the demo model at 4-bit and print export time, peak RSS, size and prefill/decode tok/s.

Decode and prefill go through ExecuTorch's stock TextLLMRunner (the runner the apps use), median of --rounds,
with the optimum-executorch peer .pte interleaved when ../shared/peers/setup.sh has built it ($PEERS).

    .venv/bin/python benchmarks/export_demo.py [--artifact out/demo-executorch-4bit] [--rounds 3]
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
BARS = {"export_s": 300, "peak_rss_gb": 3.0, "size_mb": 105.0}  # the bars: 5 min, 3 GB; the peer .pte is 104.8 MB
PROMPT = "<|im_start|>user\nWrite a short story about a robot who learns to paint.<|im_end|>\n<|im_start|>assistant\n"


def export(out: Path) -> float:
    started = time.perf_counter()
    cmd = [sys.executable, "-m", "mlexport.cli", "export", "--quant", "4bit", "-o", str(out), "--force"]
    subprocess.run(cmd, check=True, cwd=ROOT)
    return time.perf_counter() - started


def runner_speed(pte: Path, tokenizer: Path, ptd: Path | None, rounds: int) -> dict[str, float]:
    import executorch.extension.llm.custom_ops.custom_ops  # noqa: F401
    import executorch.kernels.quantized  # noqa: F401
    from executorch.extension.llm.runner import GenerationConfig, TextLLMRunner

    runner = TextLLMRunner(str(pte), str(tokenizer), str(ptd) if ptd else None)
    decode, prefill = [], []
    for _ in range(rounds + 1):  # the first round warms up
        collected: list[dict] = []
        config = GenerationConfig(max_new_tokens=128, temperature=0.0, echo=False)
        runner.generate(PROMPT, config, None, lambda s, out=collected: out.append(json.loads(s.to_json_string())))
        runner.reset()
        decode.append(collected[-1]["decode_token_per_sec"])
        prefill.append(collected[-1]["prefill_token_per_sec"])
    return {"decode": statistics.median(decode[1:]), "prefill": statistics.median(prefill[1:])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--artifact", type=Path, help="reuse an existing artifact instead of exporting")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    out = args.artifact or ROOT / "out" / "bench-demo-executorch-4bit"
    wall = export(out) if args.artifact is None else None
    manifest = json.loads((out / "manifest.json").read_text())
    stages = manifest["stages"]
    export_s = wall if wall is not None else sum(s["seconds"] for s in stages)
    peak_gb = max(s["peak_rss_mb"] for s in stages) / 1024
    size_mb = sum(f["bytes"] for f in manifest["files"] if f["path"].startswith("model.")) / 1e6
    ptd = out / "model.ptd"
    ours = runner_speed(out / "model.pte", out / "tokenizer.json", ptd if ptd.is_file() else None, args.rounds)
    peers = Path(os.environ.get("PEERS", Path.home() / ".cache" / "mlexport-peers"))
    peer_pte = peers / "oe-smol-8da4w" / "model.pte"
    peer = None
    if peer_pte.is_file():
        tok = next(
            (
                p
                for p in [peers / "oe-smol-8da4w" / "tokenizer.json", peers / "smol-hf" / "tokenizer.json"]
                if p.is_file()
            ),
            None,
        )
        peer = runner_speed(peer_pte, tok, None, args.rounds) if tok else None

    rows = [
        ("export wall (s)", f"{export_s:.0f}", f"≤ {BARS['export_s']}", "389 (peer)"),
        ("export peak RSS (GB)", f"{peak_gb:.2f}", f"≤ {BARS['peak_rss_gb']}", "2.83 (peer)"),
        (".pte + .ptd (MB)", f"{size_mb:.1f}", f"≤ {BARS['size_mb']}", "104.8 (peer)"),
        ("prefill tok/s", f"{ours['prefill']:.0f}", "", f"{peer['prefill']:.0f}" if peer else "peer not built"),
        ("decode tok/s", f"{ours['decode']:.0f}", "≥ 0.9× peer", f"{peer['decode']:.0f}" if peer else "peer not built"),
    ]
    if peer:
        rows.append(("decode ratio ours/peer", f"{ours['decode'] / peer['decode']:.2f}", "≥ 0.9", ""))
    print("| metric | mlexport | bar | peer |\n|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    print("\nstages: " + ", ".join(f"{s['name']} {s['seconds']:.0f}s" for s in stages))


if __name__ == "__main__":
    main()
