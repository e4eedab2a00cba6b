"""End-to-end scale tuning: after GPTQ, tune every quantized tensor's group scales together, integers fixed, so the
whole quantized model's next-token distribution moves toward the full-precision model's.

Why: GPTQ fits each Linear's output on its own, one block after another, so errors that only show up several
blocks later (or in the logits) are never corrected. Here the loss is the KL divergence of the logits themselves,
the drift ``mlexport validate`` reports, and every scale sees it at once (EfficientQAT's "E2E-QP" step, on the
logits of the full-precision model instead of labels). Only the scales move (3% of the 4-bit tensors' values),
so the integers, the plan and the stored size stay exactly as GPTQ left them, and every target that reads
``QuantizedWeight`` takes the result unchanged.

The RMSNorm gains move with them (``norm_lr``): each artifact stores them in float anyway, so they cost nothing,
and a gain scales one input channel of the next Linears, which no group scale can do (a group scale spans 32
input channels of one output row). They come back as plain tensors among the values (``QuantizedValues``).

The runtime's arithmetic is emulated in the forward pass: int8 dynamic activations (per token, asymmetric, as
XNNPACK's 8da4w runs them) for ``*_dynact`` schemes, and the scales rounded to the width the target stores
(bf16 for XNNPACK's 4-bit groups), both with straight-through gradients.

The text: the GPTQ calibration windows plus more of the model's own samples (LLM-QAT's data-free calibration),
because the samples follow the model's training distribution rather than one domain: tuned on the calibration
tokens alone, it fitted them far closer and held-out text less. The samples include conversations the
model writes after its chat template's opening: tuned on plain text alone, the demo's chat answers moved (see
``TUNE_DEFAULT``). Measured numbers: docs/quantization.md, item 1.
"""

from __future__ import annotations

import copy
import dataclasses
import random
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from mlexport.quantize import QuantPlan, TensorQuant
from mlexport.quantize.algorithms import QuantizedValues, QuantizedWeight, rtn
from torch import nn
from torch.nn.utils import parametrize

from mlexport.errors import MlexportError
from mlexport.model import RMSNorm

Progress = Callable[[int, int], None]  # (done, total) steps

# The default recipe, recorded in the plan (``QuantPlan.tune``), so a cached or re-run result is the same one.
# lr 2e-4 on each scale's relative change: 1e-3 diverged. norm_lr: the same relative step for the RMSNorm
# gains (0 = scales only, which is what a manifest without it was tuned with); a larger one fitted the calibration
# text closer and held-out text less. Tuning the gains, more free-text samples and a third epoch each lowered
# held-out drift (docs/quantization.md, item 1); the conversations stay a third of the samples. It runs at
# --effort max.
TUNE_DEFAULT: dict[str, Any] = {
    "method": "e2e-scales",
    "epochs": 3,
    "lr": 2e-4,
    "norm_lr": 2e-4,
    "extra_generated": {"sequences": 192, "length": 128, "top_k": 50, "greedy_prefix": 4, "seed": 1},
    # Conversations the model writes after its chat template's opening (calibrate.tuning_samples): without them
    # the tuning sees no chat turns, and the tuned model's chat answers can go wrong.
    "chat_generated": {"sequences": 96, "length": 128, "top_k": 50, "greedy_prefix": 0, "seed": 2},
}


def tunable(q: TensorQuant) -> bool:
    """Which values the tuning may change: our own quantizer's groups. A source grid is exact by construction."""
    return q.method != "source"


def _round_like(value: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``value`` rounded to ``dtype``, with the gradient of the identity."""
    return value + (value.to(dtype).float() - value).detach()


def fake_quant_int8_per_token(x: torch.Tensor) -> torch.Tensor:
    """torchao's INT8_ASYM_PER_TOKEN activations (what XNNPACK's qd8 kernels run), straight-through."""
    low = x.detach().amin(-1, keepdim=True).clamp(max=0)
    high = x.detach().amax(-1, keepdim=True).clamp(min=0)
    scale = ((high - low) / 255).clamp(min=torch.finfo(torch.float32).eps)
    zero = (-128 - torch.round(low / scale)).clamp(-128, 127)
    q = (torch.round(x / scale) + zero).clamp(-128, 127)
    return x + ((q - zero) * scale - x).detach()


class _TunedWeight(nn.Module):
    """``scale * (q - zero)`` with fixed integers and a trainable relative change of each group's scale."""

    def __init__(self, quantized: QuantizedWeight, scale_dtype: torch.dtype) -> None:
        super().__init__()
        zero = 0 if quantized.zero_point is None else quantized.zero_point.float()
        self.register_buffer("centered", quantized.qdata.float() - _expand_groups(zero, quantized))
        self.register_buffer("initial", quantized.scale.float())
        self.change = nn.Parameter(torch.zeros_like(self.initial))
        self.group = quantized.group_size
        self.scale_dtype = scale_dtype

    def scale(self) -> torch.Tensor:
        return _round_like(self.initial * (1 + self.change), self.scale_dtype)

    def forward(self) -> torch.Tensor:
        n, k = self.centered.shape
        return (self.centered.view(n, -1, self.group) * self.scale()[..., None]).view(n, k)


class _TunedLinear(nn.Module):
    """A Linear over a ``_TunedWeight``, with the target's activation rounding."""

    def __init__(self, quantized: QuantizedWeight, dynamic_activations: bool, scale_dtype: torch.dtype) -> None:
        super().__init__()
        self.values = _TunedWeight(quantized, scale_dtype)
        self.dynamic_activations = dynamic_activations

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(fake_quant_int8_per_token(x) if self.dynamic_activations else x, self.values())


class _TunedTable(nn.Module):
    """A tied table, read by the embedding lookup and by the head: its group scales and, where its first rows are
    stored at int8 (Core ML's frequent tokens), their row scales are tuned too. Both uses see every change, as
    they read one stored table."""

    def __init__(self, quantized: QuantizedWeight, scale_dtypes: dict[int, torch.dtype]) -> None:
        super().__init__()
        self.rows = quantized.int8_rows
        self.body = _TunedWeight(quantized.tail(), scale_dtypes[quantized.bits])
        self.head = None if self.rows is None else _TunedWeight(self.rows, scale_dtypes[self.rows.bits])

    def forward(self) -> torch.Tensor:
        return self.body() if self.head is None else torch.cat([self.head(), self.body()])

    def tuned(self, quantized: QuantizedWeight) -> QuantizedWeight:
        """``quantized`` with this table's tuned scales (a head row's unused 4-bit scales stay as they were)."""
        n = quantized.scale.shape[0] - self.body.initial.shape[0]
        scale = torch.cat([quantized.scale[:n], self.body.scale().detach()])
        rows = None if self.head is None else dataclasses.replace(self.rows, scale=self.head.scale().detach().clone())
        return dataclasses.replace(quantized, scale=scale, int8_rows=rows)


class _TableLookup(nn.Module):
    def __init__(self, table: _TunedTable) -> None:
        super().__init__()
        self.table = table

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return F.embedding(tokens, self.table())


class _TableHead(nn.Module):
    def __init__(self, table: _TunedTable, dynamic_activations: bool) -> None:
        super().__init__()
        self.table = table
        self.dynamic_activations = dynamic_activations

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(fake_quant_int8_per_token(x) if self.dynamic_activations else x, self.table())


class _RelativeGain(nn.Module):
    """A norm's gain as ``initial * (1 + change)``: a relative step, as for the scales, because the demo's gains
    span 2e-4 to 3.3, and an absolute step swamps the small ones."""

    def __init__(self, initial: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("initial", initial.detach().float().clone())

    def forward(self, change: torch.Tensor) -> torch.Tensor:
        return self.initial * (1 + change)


def _trainable_gains(student: nn.Module) -> dict[str, RMSNorm]:
    """Put every RMSNorm's gain of ``student`` in relative form, its change starting at zero (trainable)."""
    norms = {name: m for name, m in student.named_modules() if isinstance(m, RMSNorm)}
    for norm in norms.values():
        parametrize.register_parametrization(norm, "weight", _RelativeGain(norm.weight), unsafe=True)
        change = norm.parametrizations.weight.original
        with torch.no_grad():
            change.zero_()
        change.requires_grad_(True)
    return norms


class _FixedLinear(nn.Module):
    """A planned tensor the tuning leaves as it is, run as the target runs it (weights dequantized)."""

    def __init__(self, weight: torch.Tensor, dynamic_activations: bool) -> None:
        super().__init__()
        self.register_buffer("weight", weight)
        self.dynamic_activations = dynamic_activations

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(fake_quant_int8_per_token(x) if self.dynamic_activations else x, self.weight)


def _planned_values(
    model: nn.Module, name: str, q: TensorQuant, quantized: dict[str, QuantizedWeight]
) -> QuantizedWeight:
    """What the target stores for ``name``: our values, else torchao's symmetric round-to-nearest."""
    if name in quantized:
        return quantized[name]
    weight = dict(model.named_parameters(remove_duplicate=False))[name].detach().float()
    return rtn(weight, q.bits, q.group_size or weight.shape[1], symmetric=True)


def _tied(plan: QuantPlan) -> bool:
    """True when one stored table serves the embedding lookup and the head (a ``shares`` between them)."""
    return any(q.shares in ("embed_tokens.weight", "lm_head.weight") for q in plan.tensors.values())


def _expand_groups(zero: torch.Tensor | int, quantized: QuantizedWeight) -> torch.Tensor | int:
    return zero if isinstance(zero, int) else zero.repeat_interleave(quantized.group_size, dim=1)


def tune_scales(
    model: nn.Module,
    plan: QuantPlan,
    quantized: dict[str, QuantizedWeight],
    windows: list[list[int]],
    scale_dtypes: dict[int, torch.dtype],
    recipe: dict[str, Any],
    progress: Progress | None = None,
) -> QuantizedValues:
    """``quantized`` with tuned scales, plus the tuned norm gains when ``recipe["norm_lr"]`` (a new dict; ``model``
    is the full-precision teacher and is not changed). ``scale_dtypes``: the width the target stores a group's
    scale at, per bit width; the tuned scales are rounded to it in training and at the end.

    The student runs the whole plan as the target does: the tensors this does not tune (``tunable``: source grids)
    at their planned values, so the scales learn to correct their error too. A tied table is tuned as one table
    for both of its uses (``_TunedTable``), its int8 head rows included.
    """
    student = copy.deepcopy(model).train(False)
    for parameter in student.parameters():
        parameter.requires_grad_(False)
    modules = dict(student.named_modules())
    tuned: dict[str, _TunedLinear] = {}
    tables: dict[str, _TunedTable] = {}  # a tied table, by its owner's name: one set of scales for both uses
    for name, q in plan.tensors.items():
        if q.bits not in (4, 8):
            continue
        owner = q.shares or name
        values = _planned_values(model, owner, plan.tensors[owner], quantized)
        dynamic = q.scheme.endswith("_dynact")
        parent, _, attr = name.removesuffix(".weight").rpartition(".")
        module = modules[parent]  # "" is the decoder itself (embed_tokens, lm_head)
        lookup = isinstance(getattr(module, attr), nn.Embedding)
        if attr in ("embed_tokens", "lm_head") and _tied(plan) and tunable(plan.tensors[owner]):
            if owner not in tables:
                tables[owner] = _TunedTable(values, scale_dtypes)
            setattr(module, attr, _TableLookup(tables[owner]) if lookup else _TableHead(tables[owner], dynamic))
        elif lookup:
            getattr(module, attr).weight = nn.Parameter(values.dequantize(), requires_grad=False)
        elif owner == name and tunable(q):
            tuned[name] = _TunedLinear(values, dynamic, scale_dtypes[values.bits])
            setattr(module, attr, tuned[name])
        else:
            setattr(module, attr, _FixedLinear(values.dequantize(), dynamic))
    if not tuned and not tables:
        return dict(quantized)
    scales = [layer.values.change for layer in tuned.values()]
    scales += [p for table in tables.values() for p in table.parameters()]
    groups = [{"params": scales, "lr": recipe["lr"]}]
    norm_lr = recipe.get("norm_lr", 0)  # absent in manifests tuned before gains were: scales only, as then
    norms = _trainable_gains(student) if norm_lr else {}
    if norms:
        groups.append({"params": [n.parametrizations.weight.original for n in norms.values()], "lr": norm_lr})
    optimizer = torch.optim.Adam(groups)
    steps = recipe["epochs"] * len(windows)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    limit = student.max_context
    done = 0
    for epoch in range(recipe["epochs"]):
        order = list(range(len(windows)))
        random.Random(epoch).shuffle(order)
        for i in order:
            tokens = torch.tensor([windows[i][:limit]])
            with torch.no_grad():
                teacher = F.log_softmax(model(tokens)[0].float(), -1)
            student_logp = F.log_softmax(student(tokens)[0].float(), -1)
            loss = (teacher.exp() * (teacher - student_logp)).sum(-1).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
            done += 1
            if progress:
                progress(done, steps)
    out: QuantizedValues = dict(quantized)
    with torch.no_grad():
        for name, layer in tuned.items():
            planned = _planned_values(model, name, plan.tensors[name], quantized)
            out[name] = dataclasses.replace(planned, scale=layer.values.scale().detach().clone())
        for name, table in tables.items():
            out[name] = table.tuned(_planned_values(model, name, plan.tensors[name], quantized))
        for name, norm in norms.items():
            out[f"{name}.weight"] = norm.weight.detach().to(norm.parametrizations.weight.original.dtype).clone()
    return out


def stored_scale_dtypes(recipe: dict[str, Any]) -> dict[int, torch.dtype]:
    """The scale widths a tuning record names (``QuantPlan.tune["scale_dtypes"]``, from the target's profile)."""
    names = recipe.get("scale_dtypes")
    if not names:
        raise MlexportError("the plan's tuning record names no scale widths: re-export it with this mlexport")
    return {int(bits): getattr(torch, name) for bits, name in names.items()}
