"""Benchmark: the time/KLD frontier of 4-bit recipes for one target, scored in eager PyTorch.

    .venv/bin/python benchmarks/effort_frontier.py [--model demo] [--target executorch] [--rows fast,default,...]

Each row plans and quantizes the model as `mlexport export --effort ...` would (the same plan_for_target and
compute_quantized), then scores it against fp32 on the built-in corpus (1,024 tokens, windows of 256: how recipes
are chosen) and on the held-out GPL-3 text under llama.cpp's protocol (windows of 512, second halves scored: the
check). Eager KLD tracks the exported artifact's closely (validate's "quant KLD" column). "quantize s" is the
plan + quantization time of the row; the quantized-values cache is off, but the model's self-generated calibration
samples are cached after the first row that samples them (~40 s on the demo), as a second export would find them.
Lowering is not included: it is the same for every row of a target (docs/performance.md, "Where the time goes now").
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
HELD_OUT = ROOT / "tests" / "data" / "GPL-3"


# Calibration recipes (quantize/calibrate.FULL_GPTQ's keys): tokens in all, sequences the model samples itself
# (128 tokens each), GPTAQ's reference pass, tokens the sensitivity pass scores on (0: no pass).
def recipe(tokens: int, samples: int, reference: bool, sensitivity: int) -> dict[str, Any]:
    return {"tokens": tokens, "self_generated": samples, "reference_pass": reference, "sensitivity_tokens": sensitivity}


# label, ExportOptions overrides, the calibration recipe --effort default runs for the row (None: as shipped)
ROWS: dict[str, tuple[str, dict[str, Any], dict[str, Any] | None]] = {
    "fast": ("--effort fast: round to nearest", {"effort": "fast"}, None),
    "light": (
        "light GPTQ (2,048 tokens, plain), no sensitivity: the default above 400M",
        {},
        recipe(2048, 0, False, 0),
    ),
    "light+ref": ("GPTQ on 2,048 tokens + reference pass (GPTAQ)", {}, recipe(2048, 0, True, 0)),
    "light8k": ("GPTQ on 8,192 text tokens, plain", {}, recipe(8192, 0, False, 0)),
    "light+sens": ("GPTQ on 2,048 tokens, plain + sensitivity", {}, recipe(2048, 0, False, 128)),
    "light+ref+sens": ("GPTQ on 2,048 tokens + reference pass + sensitivity", {}, recipe(2048, 0, True, 128)),
    "4k+12s+ref+sens64": (
        "GPTQ on 4,096 tokens (1,536 sampled) + GPTAQ + sensitivity on 64",
        {},
        recipe(4096, 12, True, 64),
    ),
    "4k+12s+ref+sens128": (
        "GPTQ on 4,096 tokens (1,536 sampled) + GPTAQ + sensitivity on 128",
        {},
        recipe(4096, 12, True, 128),
    ),
    "4k+ref+sens128": ("GPTQ on 4,096 text tokens + GPTAQ + sensitivity on 128", {}, recipe(4096, 0, True, 128)),
    "3k+8s+ref+sens128": (
        "GPTQ on 3,072 tokens (1,024 sampled) + GPTAQ + sensitivity on 128",
        {},
        recipe(3072, 8, True, 128),
    ),
    "4k+ref+sens64": ("GPTQ on 4,096 text tokens + GPTAQ + sensitivity on 64", {}, recipe(4096, 0, True, 64)),
    "full": ("GPTQ on 8,192 tokens (3,072 sampled) + GPTAQ + sensitivity on 128", {}, recipe(8192, 24, True, 128)),
    "default": ("--effort default", {}, None),
    "max": ("--effort max (a Q4 GGUF: its grid reused, Q4_1 offsets at int8)", {"effort": "max"}, None),
    "max-tuned": (
        "--effort max --no-reuse-source-grid: GPTQ + end-to-end tuning",
        {"effort": "max", "reuse_source_grid": False},
        None,
    ),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="demo")
    parser.add_argument("--target", default="executorch")
    parser.add_argument("--rows", default="fast,light,light+ref+sens,4k+12s+ref+sens64,full,default,max")
    parser.add_argument("--tie", default=None, help="the tie layout (default: the target's first)")
    parser.add_argument("--size-budget-mb", type=float, default=None, help="as export's --size-budget")
    args = parser.parse_args()
    os.environ["MLEXPORT_CACHE_MAX_GB"] = "0"  # every row quantizes cold

    import dataclasses
    import time

    import mlexport.quantize.calibrate as calibrate
    from mlexport.quantize.block_offsets import as_target_stores
    from mlexport.quantize.torchao_map import apply_plan
    from mlexport.validate import drift

    import mlexport.pipeline as pipeline
    from mlexport.corpus import load_corpus
    from mlexport.model import build_decoder
    from mlexport.pipeline import ExportOptions, StageLog, compute_quantized, plan_for_target, stored_bytes
    from mlexport.sources import load_model
    from mlexport.tokenizer import Tokenizer

    loaded = load_model(args.model)
    tokenizer = Tokenizer(loaded.tokenizer_dir)
    texts = []  # (windows, scored mask, fp32 logits): built-in 1,024 tokens / 256; GPL-3 llama.cpp protocol
    for corpus, max_tokens, window, score_from in ((None, 1024, 256, 0), (HELD_OUT, 2048, 512, 255)):
        windows = drift.make_windows(tokenizer.encode(load_corpus(corpus)[0]), window, max_tokens)
        scored = windows.scored_mask(score_from)
        fp32 = drift.run_torch(build_decoder(loaded.spec, loaded.state_dict, max_context=window), windows)[scored]
        texts.append((windows, scored, fp32, window))
    shipped = dict(calibrate.DEFAULT_GPTQ)
    shipped_threshold = pipeline.LIGHT_ABOVE_PARAMS
    print("| recipe | quantize s | MB | built-in KLD | built-in top-1 % | GPL-3 KLD | GPL-3 top-1 % |")
    print("|---|---|---|---|---|---|---|")
    for key in args.rows.split(","):
        label, overrides, row_recipe = ROWS[key]
        calibrate.DEFAULT_GPTQ.clear()
        calibrate.DEFAULT_GPTQ.update(row_recipe or shipped)
        pipeline.LIGHT_ABOVE_PARAMS = 1 << 62 if row_recipe else shipped_threshold
        opts = dataclasses.replace(ExportOptions(target=args.target, size_budget_mb=args.size_budget_mb), **overrides)
        model = build_decoder(loaded.spec, loaded.state_dict, max_context=512)
        started = time.perf_counter()
        tie = args.tie or ("shared8" if args.target == "executorch" else "shared4")
        plan = plan_for_target(model, loaded, opts, args.target, tie, lambda _t: None, StageLog())
        values = compute_quantized(model, plan, loaded, None, lambda _t: None)
        values = as_target_stores(values, pipeline.profile(args.target).stores_block_offsets)
        apply_plan(model, plan, values)
        seconds = time.perf_counter() - started
        size = stored_bytes(model, plan, args.target)["total"] / 1e6
        cells = []
        for windows, scored, fp32, _window in texts:
            stats, _ = drift.compare(fp32, drift.run_torch(model, windows)[scored], windows.targets[scored])
            cells.append(f"{stats['kld_mean']:.4f} ± {stats['kld_stderr']:.4f} | {100 * stats['same_top1']:.1f}")
        print(f"| {label} | {seconds:.0f} | {size:.1f} | {' | '.join(cells)} |", flush=True)


if __name__ == "__main__":
    main()
