"""Sensitivity-driven mixed precision: which 4-bit tensors buy the most drift back per byte at 8 bits.

Sensitivity is measured directly: the KLD of the logits against fp32 on calibration tokens
when only that one tensor is quantized (4-bit round-to-nearest, the plan's group). The fp32 hidden states at every
executed layer are cached, so each measurement runs only the layers from that tensor's block on. The KLDs of
single tensors add up closely for small perturbations, so a greedy pick by KLD per byte within a byte budget is
near-optimal for this knapsack.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
import torch.nn.functional as F
from mlexport.quantize import QuantPlan, TensorQuant
from mlexport.quantize.accounting import planned_tensor_bytes
from mlexport.quantize.algorithms import QuantizedWeight, rtn
from torch import nn

Progress = Callable[[int, int], None]


@torch.no_grad()
def tensor_sensitivity(
    model: nn.Module, plan: QuantPlan, tokens: list[int], progress: Progress | None = None, n_tokens: int = 128
) -> dict[str, float]:
    """KLD(fp32 ‖ only this tensor quantized) per 4-bit Linear weight of the blocks, over the first ``n_tokens``."""
    tokens = tokens[: min(n_tokens, model.max_context)]
    h = model.embed(torch.tensor([tokens]))
    inputs = []  # fp32 input of every executed layer
    for b in model.layer_map:
        inputs.append(h)
        h = model.run_block(model.layers[b], h)
    ref = F.log_softmax(model.lm_head(model.head_input(h)).float(), dim=-1)
    p_ref = ref.exp()
    first_run = {}
    for i, b in enumerate(model.layer_map):
        first_run.setdefault(b, i)
    candidates = [n for n, q in plan.tensors.items() if q.bits == 4 and not q.shares and n.startswith("layers.")]
    by_block: dict[int, list[str]] = {}
    for name in candidates:
        by_block.setdefault(int(name.split(".")[1]), []).append(name)
    modules = dict(model.named_modules())
    result: dict[str, float] = {}
    for b, names in by_block.items():
        start = first_run[b]
        # Each candidate's own perturbed copy of this block's first run, stacked on the batch dim; the rest of the
        # network then runs once for all of them.
        outs = []
        for name in names:
            q = plan.tensors[name]
            module = modules[name.removesuffix(".weight")]
            original = module.weight.data
            module.weight.data = rtn(original, 4, q.group_size or original.shape[1], not q.asymmetric).dequantize()
            try:
                outs.append(model.run_block(model.layers[b], inputs[start]))
                # a stored block that runs again right away (MobileLLM-LS) runs perturbed again
                for layer in model.layer_map[start + 1 :]:
                    if layer != b:
                        break
                    outs[-1] = model.run_block(model.layers[b], outs[-1])
            finally:
                module.weight.data = original
        x = torch.cat(outs)
        runs = 1
        while start + runs < len(model.layer_map) and model.layer_map[start + runs] == b:
            runs += 1
        for layer in model.layer_map[start + runs :]:
            x = model.run_block(model.layers[layer], x)
        logits = model.lm_head(model.head_input(x)).float()
        # one candidate's log-softmax at a time: the temporaries of all of them at once were most of the export's
        # peak memory, and each row's values are the same either way
        kld = [(p_ref * (ref - F.log_softmax(one, dim=-1))).sum(-1).mean(-1).item() for one in logits]
        del logits
        for name, value in zip(names, kld, strict=True):
            result[name] = value
        if progress:
            progress(len(result), len(candidates))
    return result


def upgrade_cost(shape: torch.Size, q: TensorQuant, upgraded: TensorQuant, scale_bytes: dict[int, int]) -> int:
    return planned_tensor_bytes(shape, upgraded, scale_bytes) - planned_tensor_bytes(shape, q, scale_bytes)


def exact_option(q: TensorQuant, grid: QuantizedWeight | None, kinds: tuple[str, ...]) -> TensorQuant | None:
    """The plan entry that reuses a source tensor's own grid (lossless re-export), when the target represents
    it (``kinds``: the GGUF types it can run exactly) and it is the grid the plan asked for (bits and group)."""
    if grid is None or grid.bits != q.bits or grid.group_size != q.group_size:
        return None
    kind = "Q4_0" if grid.zero_point is None else "Q4_1"
    if q.bits != 4 or kind not in kinds:
        return None
    return dataclasses.replace(
        q, method="source", asymmetric=grid.zero_point is not None, source=kind, note=f"reuses the source's {kind} grid"
    )


def choose_upgrades(
    model: nn.Module,
    plan: QuantPlan,
    sensitivity: dict[str, float],
    budget_bytes: int,
    scale_bytes: dict[int, int],
    int8_group: int | None,
    exact: dict[str, TensorQuant] | None = None,
) -> tuple[QuantPlan, list[dict[str, float | str | int]]]:
    """Spend ``budget_bytes`` on the tensors whose 4-bit error costs the most KLD per extra byte; return the new
    plan and the upgrades (for the manifest).

    A tensor's upgrade is 8 bits, or, when ``exact`` offers it, the source's own grid: that removes the tensor's
    re-quantization error entirely for the price of its zero points, an eighth of what 8 bits cost.
    """
    shapes = {n: p.shape for n, p in model.named_parameters(remove_duplicate=False)}
    ranked = []
    for name, kld in sensitivity.items():
        q = plan.tensors[name]
        upgraded = (exact or {}).get(name) or dataclasses.replace(
            q,
            scheme=q.scheme.replace("int4", "int8"),
            bits=8,
            group_size=int8_group,
            asymmetric=False,
            note=None,
            int8_rows=0,
        )
        cost = upgrade_cost(shapes[name], q, upgraded, scale_bytes)
        ranked.append((kld / max(cost, 1), name, upgraded, cost, kld))
    ranked.sort(key=lambda r: r[0], reverse=True)
    tensors = dict(plan.tensors)
    chosen: list[dict[str, float | str | int]] = []
    spent = 0
    for _, name, upgraded, cost, kld in ranked:
        if spent + cost > budget_bytes:
            continue
        tensors[name] = upgraded
        spent += cost
        to = f"source {upgraded.source}" if upgraded.method == "source" else f"int{upgraded.bits}"
        chosen.append({"tensor": name, "kld_alone_at_4bit": round(kld, 6), "extra_bytes": cost, "to": to})
    return dataclasses.replace(plan, tensors=tensors, notes=list(plan.notes)), chosen
