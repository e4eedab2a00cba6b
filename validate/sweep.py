"""``mlexport quantize-sweep``: every quantization preset of one target, scored in one run, to pick one from.

Each row quantizes the model exactly as ``export`` would for that target (same plan, same quantizer values, same
mixed-precision choice, same tie layout) and runs it in eager PyTorch (torchao's kernels) over the validation
corpus. Sizes are the plan's predicted bytes for that target's storage (what ``inspect`` checks artifacts
against). What the sweep leaves out is the exporter's own error, which ``mlexport validate`` measures on the
artifact; it is small next to these differences (docs/quantization.md, "What the export level measures").
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mlexport.validate import drift

from mlexport.corpus import load_corpus
from mlexport.model import build_decoder
from mlexport.pipeline import (
    ExportOptions,
    StageLog,
    compute_quantized,
    plan_for_target,
    profile,
    stored_bytes,
)
from mlexport.sources import LoadedModel
from mlexport.tokenizer import Tokenizer

# (label, export options that differ from the defaults); "asym" rows only where the runtime has zero points.
SWEEP_ROWS: tuple[tuple[str, dict[str, Any]], ...] = (
    ("fp16", {"quant": "fp16"}),
    ("8bit rtn", {"quant": "8bit", "quantizer": "rtn"}),
    ("4bit rtn", {"quant": "4bit", "quantizer": "rtn", "size_budget_mb": 0, "asymmetric": False}),
    ("4bit search", {"quant": "4bit", "quantizer": "search", "size_budget_mb": 0, "asymmetric": False}),
    ("4bit gptq", {"quant": "4bit", "quantizer": "gptq", "size_budget_mb": 0, "asymmetric": False}),
    ("4bit gptq + mixed", {"quant": "4bit", "quantizer": "gptq", "asymmetric": False}),
    # --effort max's scale tuning on the row above, to show what it buys (minutes per target)
    (
        "4bit gptq + mixed + scale tuning",
        {"quant": "4bit", "quantizer": "gptq", "asymmetric": False, "tune_scales": True},
    ),
    ("4bit gptq asym", {"quant": "4bit", "quantizer": "gptq", "asymmetric": True, "size_budget_mb": 0}),
    ("4bit gptq asym + mixed", {"quant": "4bit", "quantizer": "gptq", "asymmetric": True}),
    # blocks of 64 with the target's own zero-point default: the smallest 4-bit row, and on ONNX the fast one
    # (decode there is memory-bound, so fewer bytes decode faster; docs/quantization.md, "ONNX: speed decides the
    # default")
    ("4bit gptq block 64", {"quant": "4bit", "quantizer": "gptq", "group_size": 64, "size_budget_mb": 0}),
)


def sweep(
    loaded: LoadedModel,
    target: str,
    max_tokens: int = 1024,
    window: int = 256,
    say: Callable[[str], None] | None = None,
    corpus: Path | None = None,
    score_from: int = 0,
) -> list[dict[str, Any]]:
    """One row per preset of SWEEP_ROWS. ``corpus``, ``window`` and ``score_from`` mean what they mean for
    ``mlexport validate``, so a held-out text scores the presets under the same protocol (llama.cpp's:
    ``window=512, score_from=255``)."""
    from mlexport.quantize.block_offsets import as_target_stores
    from mlexport.quantize.torchao_map import apply_plan

    from mlexport.pipeline import resolved_tie_mode

    say = say or (lambda _t: None)
    text, corpus_info = load_corpus(corpus)
    windows = drift.make_windows(Tokenizer(loaded.tokenizer_dir).encode(text), window, max_tokens)
    scored = windows.scored_mask(score_from)
    targets = windows.targets[scored]
    say(f"fp32 reference over {int(scored.sum())} tokens")
    fp32_model = build_decoder(loaded.spec, loaded.state_dict, max_context=window)
    fp32 = drift.run_torch(fp32_model, windows)[scored]
    n_params = sum(p.numel() for p in fp32_model.parameters())  # the tie counts once: what is stored
    rows = []
    for label, overrides in SWEEP_ROWS:
        if overrides.get("asymmetric") and profile(target).symmetric_only:
            continue  # XNNPACK runs symmetric weights only
        opts = dataclasses.replace(ExportOptions(target=target), **overrides)
        model = build_decoder(loaded.spec, loaded.state_dict, max_context=window)
        say(f"{label}: planning")
        plan = plan_for_target(
            model, loaded, opts, target, resolved_tie_mode("default", target, loaded.spec), say, StageLog()
        )
        size = stored_bytes(model, plan, target)["total"]
        values = compute_quantized(model, plan, loaded, None, say)
        values = as_target_stores(values, profile(target).stores_block_offsets)  # int8 block offsets
        if opts.quant != "fp32":
            apply_plan(model, plan, values)
        say(f"{label}: scoring")
        logits = drift.run_torch(model, windows)[scored]
        stats, _ = drift.compare(fp32, logits, targets)
        rows.append(
            {
                "preset": label,
                "bits_per_weight": round(8 * size / n_params, 2),
                "size_mb": round(size / 1e6, 1),
                "kld_mean": stats["kld_mean"],
                "kld_stderr": stats["kld_stderr"],
                "same_top1": stats["same_top1"],
                "ppl_ratio": stats["ppl_ratio"],
                "tokens": int(scored.sum()),
                "corpus": corpus_info["name"],
                "upgrades": len(plan.mixed["upgrades"]) if plan.mixed else 0,
                "scales_tuned": bool(plan.tune),
            }
        )
    return rows
