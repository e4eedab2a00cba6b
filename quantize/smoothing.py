"""Group-constant smoothing of the int8 activations of a target that quantizes each Linear's input per token
(ExecuTorch: XNNPACK's 8da4w).

Why: a few channels of a Linear's input (the norms' outputs, SwiGLU's product) set each token's int8 range, so
every other channel is rounded coarsely. SmoothQuant divides each channel by a factor and multiplies the weight's
column by it, but a factor per channel moves the demo's Q4_1 source weights off the grid a 4-bit group quantizer
fits them on (docs/quantization.md, "Tried and not kept": the held-out text lost). Here the factor is constant over each
quantization group of 32 input channels, so it scales whole groups: symmetric group quantization is
scale-equivariant (``rtn(W s) == rtn(W) s`` for a per-group ``s``), the 4-bit weights' error in the output is
exactly what it was, and only the activations' rounding improves. Per-row factors (``up_proj``'s rows for
``down_proj``'s input) keep every row's grid too.

Factor of a group: ``(m_g / median(m))^alpha``, where ``m_g`` is the median over the calibration tokens of the
group's largest magnitude in that token (a per-token range, as the runtime sees it; the maximum over all tokens
is set by a few attention-sink tokens). ``alpha`` is in ``SMOOTH_DEFAULT``; measurements: docs/quantization.md,
item 8.
"""

from __future__ import annotations

from typing import Any

import torch
from mlexport.quantize import QuantPlan
from torch import nn

from mlexport.errors import MlexportError

# alpha 0.5 is SmoothQuant's default, and larger alphas drifted more on both texts.
SMOOTH_DEFAULT: dict[str, Any] = {"kind": "group-median-token-max", "alpha": 0.5}
CALIBRATION_TOKENS = 4096

# Each smoothed input: the module whose output it is (a norm's gain or a Linear's rows take 1/s) and the Linears
# that read it (their columns take s). o_proj's input is left alone: its source, v_proj, feeds several query
# heads per KV head, and of the four inputs it gained least from fp32 activations.
SOURCES = {
    "input_layernorm": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "post_attention_layernorm": ("mlp.gate_proj", "mlp.up_proj"),
    "mlp.up_proj": ("mlp.down_proj",),
}


def _group_size(plan: QuantPlan) -> int | None:
    """The body's 4-bit group size when every 4-bit Linear with int8 activations shares one (None: none/mixed)."""
    sizes = {q.group_size for q in plan.tensors.values() if q.scheme == "int4_dynact" and not q.shares}
    return sizes.pop() if len(sizes) == 1 and None not in sizes else None


def plan_smoothing(model: nn.Module, plan: QuantPlan, windows: list[list[int]]) -> QuantPlan:
    """Record group factors in ``plan.smoothing`` for every input whose consumers all run int8 activations over
    4-bit groups, measured on ``windows`` (calibration text), and smooth ``model`` to match. Call it before the
    8-bit upgrades are chosen: an upgraded consumer (per-channel int8) keeps its input's factors, which its 8-bit
    grid absorbs with a rounding error still far below the 4-bit one (GPTQ quantizes it after the smoothing)."""
    group = _group_size(plan)
    if plan.smoothing is None and plan.preset == "4bit" and group and windows:
        inputs = {
            source: consumers
            for source, consumers in _inputs(model).items()
            if all(_smoothable(plan, f"{c}.weight", group) for c in consumers)
        }
        per_window = max(len(windows[0]), 1)
        factors = _measure(model, inputs, group, windows[: max(1, CALIBRATION_TOKENS // per_window)])
        if factors:
            plan.smoothing = {**SMOOTH_DEFAULT, "group": group, "factors": factors}
    smooth(model, plan)
    return plan


def _smoothable(plan: QuantPlan, name: str, group: int) -> bool:
    q = plan.tensors.get(name)
    return q is not None and q.scheme == "int4_dynact" and q.group_size == group and not q.shares


def _inputs(model: nn.Module) -> dict[str, list[str]]:
    """Each smoothable input by its source module's name, with its consumers' names (one per stored block)."""
    return {
        f"layers.{b}.{source}": [f"layers.{b}.{c}" for c in consumers]
        for b in range(len(model.layers))
        for source, consumers in SOURCES.items()
    }


@torch.no_grad()
def _measure(
    model: nn.Module, inputs: dict[str, list[str]], group: int, windows: list[list[int]]
) -> dict[str, list[float]]:
    modules = dict(model.named_modules())
    ranges: dict[str, list[torch.Tensor]] = {name: [] for name in inputs}

    def hook(source: str):  # noqa: ANN202
        def record(_module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            x = args[0].detach().float()
            x = x.reshape(-1, x.shape[-1]).abs()
            ranges[source].append(x.view(x.shape[0], -1, group).amax(-1))

        return record

    # each input is read at its first consumer (a shared block's two runs both count)
    handles = [modules[names[0]].register_forward_pre_hook(hook(source)) for source, names in inputs.items()]
    try:
        for window in windows:
            model(torch.tensor([window[: model.max_context]]))
    finally:
        for handle in handles:
            handle.remove()
    alpha = SMOOTH_DEFAULT["alpha"]
    factors = {}
    for source, seen in ranges.items():
        if not seen:
            continue
        typical = torch.cat(seen).median(0).values.clamp(min=1e-6)
        factors[source] = [round(float(f), 4) for f in (typical / typical.median()) ** alpha]
    return factors


def smooth(model: nn.Module, plan: QuantPlan) -> None:
    """Make ``model`` (fp32) carry ``plan``'s smoothing, once: each source's gain or rows divided by its group
    factors and each consumer's columns multiplied by them, so the float logits do not change."""
    if not plan.smoothing or getattr(model, "smoothed", False):
        return
    modules = dict(model.named_modules())
    inputs = _inputs(model)
    group = int(plan.smoothing["group"])
    for source, factors in plan.smoothing["factors"].items():
        if source not in inputs or source not in modules:
            raise MlexportError(f"smoothing of {source} does not fit this model; re-export with this mlexport version")
        consumers = inputs[source]
        scale = torch.tensor(factors, dtype=torch.float32).repeat_interleave(group)
        weight = modules[source].weight
        if weight.shape[0] != scale.shape[0]:
            raise MlexportError(f"smoothing of {source}: {len(factors)} groups do not fit; re-export")
        with torch.no_grad():
            # a norm's gain is 1-D; a Linear's rows (up_proj) are its output channels
            weight.div_((scale if weight.dim() == 1 else scale[:, None]).to(weight.dtype))
            for consumer in consumers:
                modules[consumer].weight.mul_(scale.to(modules[consumer].weight.dtype))
    model.smoothed = True
