"""Benchmark: Core ML 4-bit layouts of the demo, by greedy top-1 agreement with fp32 and by bytes.

    .venv/bin/python benchmarks/coreml_layouts.py

Eager PyTorch, fp32 compute, weight-only: each layout's weights are dequantized into the decoder, which then runs
six chat prompts teacher-forced over the fp32 model's own 64-token greedy continuation. The first prompt is the one
tests/test_demo_e2e.py checks through the MIL interpreter. "weights MB" counts the quantized tensors as Core ML
stores them (its profile's scale_bytes), not the norms, RoPE tables, zero biases and blob records that weight.bin
also holds (~0.26 MB for the exported default). Prints the table docs/performance.md's Core ML section shows.
About 5 minutes on 2 cores once the tie's GPTQ values are cached (~1 minute each the first time).
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any

import torch
from mlexport.quantize import plan_quantization
from mlexport.quantize.accounting import predicted_bytes
from mlexport.quantize.algorithms import QuantizedWeight, with_int8_rows
from mlexport.quantize.block_offsets import with_rounded_offsets
from mlexport.quantize.calibrate import prepare
from mlexport.quantize.sensitivity import exact_option

from mlexport.model import build_decoder
from mlexport.pipeline import profile, rotate_4bit_tie, tie_grid, weight_only
from mlexport.sources import load_model
from mlexport.tokenizer import Tokenizer

PROMPTS = (
    "Explain why the sky is blue in two sentences.",
    "What is the capital of France?",
    "Write a haiku about autumn.",
    "Give me three tips for learning Python.",
    "How do vaccines work?",
    "Summarize the plot of Romeo and Juliet.",
)
TOKENS = 64
CONTEXT = 256


def main() -> None:
    loaded = load_model("demo")
    reference = build_decoder(loaded.spec, loaded.state_dict, max_context=CONTEXT).eval()
    tokenizer = Tokenizer(loaded.tokenizer_dir, chat_template=loaded.spec.chat_template)
    cases = []
    with torch.no_grad():
        for prompt in PROMPTS:
            ids = tokenizer.encode(tokenizer.render_chat(prompt, None))
            start = len(ids)
            for _ in range(TOKENS):
                ids.append(int(reference(torch.tensor([ids]))[0, -1].argmax()))
            cases.append((ids, start, reference(torch.tensor([ids]))[0, start - 1 : -1].argmax(-1)))
    grids = {n: g for n, g in loaded.source_grids.items() if g.zero_point is not None}
    bodies = {
        "exact (fp16 zero points)": {n: g.dequantize() for n, g in grids.items()},
        "int8 offsets per row": {n: with_rounded_offsets(g).dequantize() for n, g in grids.items()},
    }
    print("| body | tied table | test prompt | six prompts | weights MB |")
    print("|---|---|---|---|---|")
    layouts = [
        ("int8 offsets per row", False, True, (1000,)),
        ("int8 offsets per row", False, False, (1000,)),
        ("exact (fp16 zero points)", True, True, (1000,)),
        ("int8 offsets per row", True, True, (0, 500, 1000)),
        ("int8 offsets per row", True, False, (0, 500, 1000)),
    ]
    for body, rotated, asymmetric, rows in layouts:
        model, plan, tie = tie_values(loaded, rotated, asymmetric)
        float_table = model.embed_tokens.weight.detach().clone()  # rotated when the plan rotates it
        params = dict(model.named_parameters(remove_duplicate=False))
        for name, weight in bodies[body].items():
            params[name].data.copy_(weight)
        scale_bytes = profile("coreml").scale_bytes if body.startswith("int8") else {4: 2, 8: 2}
        for n in rows:
            table = (with_int8_rows(tie, float_table, n) if n else tie).dequantize()
            params["embed_tokens.weight"].data.copy_(table)
            sized = copy.deepcopy(plan)
            sized.tensors["lm_head.weight"] = dataclasses.replace(sized.tensors["lm_head.weight"], int8_rows=n)
            mb = predicted_bytes(model, sized, scale_bytes)["quantized"] / 1e6
            per_prompt = agreement(model, cases)
            kind = f"{'rotated' if rotated else 'not rotated'}, {'asymmetric' if asymmetric else 'symmetric'} GPTQ"
            print(
                f"| {body} | {kind}, {n:,} int8 rows | {per_prompt[0]} | "
                f"{sum(per_prompt) / (TOKENS * len(PROMPTS)):.1%} ({per_prompt}) | {mb:.2f} |",
                flush=True,
            )


def tie_values(loaded: Any, rotated: bool, asymmetric: bool) -> tuple[Any, Any, QuantizedWeight]:
    """The Core ML plan with the whole body on its source grid and the tie GPTQ'd (rotated or not), as the
    exporter builds it; the tie's values without int8 rows (added per layout)."""
    model = build_decoder(loaded.spec, loaded.state_dict, max_context=CONTEXT).eval()
    vocab = model.lm_head.weight.shape[0]
    plan = plan_quantization(model, "4bit", 32, "shared4", True, "gptq", False)
    plan = tie_grid(plan, "coreml", 32, vocab, 0)
    if rotated:
        plan = rotate_4bit_tie(model, plan, asymmetric)
    else:
        head = plan.tensors["lm_head.weight"]
        plan.tensors["lm_head.weight"] = dataclasses.replace(head, asymmetric=asymmetric)
    plan = weight_only(plan)
    for name, q in plan.tensors.items():
        option = exact_option(q, loaded.source_grids.get(name), ("Q4_0", "Q4_1"))
        if option is not None:
            plan.tensors[name] = option
    values = prepare(model, plan, loaded.source.get("sha256"), loaded.tokenizer_dir, source_grids=loaded.source_grids)
    return model, plan, values["lm_head.weight"]


def agreement(model: Any, cases: list[tuple[list[int], int, torch.Tensor]]) -> list[int]:
    out = []
    with torch.no_grad():
        for ids, start, want in cases:
            got = model(torch.tensor([ids]))[0, start - 1 : -1].argmax(-1)
            out.append(int((got == want).sum()))
    return out


if __name__ == "__main__":
    main()
