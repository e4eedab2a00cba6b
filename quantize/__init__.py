"""Quantization presets -> a per-tensor plan, independent of any target.

The plan is a plain data object: for each weight tensor of the decoder, the scheme, bit width and group size.
Each exporter maps the plan onto what its runtime executes (``mlexport.quantize.torchao_map`` for ExecuTorch) and
must refuse, never silently skip, a tensor it cannot represent as planned.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any

from torch import nn

from mlexport.errors import MlexportError

PRESETS = ("4bit", "8bit", "fp16", "fp32")
DEFAULT_GROUP_SIZE = 32
# How a tied embedding/lm_head is quantized: "shared8" = one int8 table that both the lookup and an 8-bit head
# read (stored once); "shared4" = one 4-bit block table for both (stored once; needs a gather that reads the head's
# blocks: ONNX GatherBlockQuantized, ExecuTorch's embedding_4bit over XNNPACK's packing); "dup4" = a 4-bit table plus
# a separate 4-bit head (stored twice).
TIE_MODES = ("shared8", "shared4", "dup4")


@dataclass
class TensorQuant:
    """How one stored weight is quantized. ``group_size`` None means per output channel."""

    scheme: str  # "int4_dynact" | "int8_dynact" | "int8_weight" | "int4_weight" | "fp16" | "fp32"
    bits: int
    group_size: int | None = None
    note: str | None = None
    shares: str | None = None  # this use reads another tensor's quantized bytes (quantized once, stored once)
    method: str = "rtn"  # "rtn" | "search" | "gptq" (mlexport.quantize.algorithms) | "source" (the source's grid)
    asymmetric: bool = False  # a zero point per group
    source: str | None = None  # "source" method: the GGUF type whose grid is reused exactly (Q4_0 | Q4_1)
    # A tied table's first rows at int8 per row, the rest as planned. Token ids follow the tokenizer's merge or
    # score order, so low ids are the frequent tokens, whose logits decide most next-token choices.
    int8_rows: int = 0

    @property
    def float_zero(self) -> bool:
        """Q4_1's zero points (-8 - min/scale) are fractional: stored as floats, not 4-bit integers."""
        return self.source == "Q4_1"


@dataclass
class QuantPlan:
    preset: str
    dtype: str  # activation / float weight dtype: "fp32" or "fp16"
    tie_mode: str | None = None
    tensors: dict[str, TensorQuant] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    calibration: dict[str, Any] | None = None  # the text GPTQ saw (name, sha256, tokens)
    mixed: dict[str, Any] | None = None  # sensitivity-driven 8-bit upgrades: budget and the tensors chosen
    tune: dict[str, Any] | None = None  # end-to-end scale tuning after GPTQ (quantize/tune.py): recipe and text
    tie_rotation: dict[str, Any] | None = None  # the tied table stored rotated (quantize/rotation.py)
    smoothing: dict[str, Any] | None = None  # int8 activations' group factors, folded in (quantize/smoothing.py)
    gptq: dict[str, Any] | None = None  # a lighter GPTQ recipe (quantize/calibrate.LIGHT_GPTQ); None = the full one

    def without_int8_rows(self) -> QuantPlan:
        """This plan with every tensor at its own width throughout: the all-4-bit baseline the size budget is
        measured from, and what per-tensor sensitivity depends on."""
        return replace(self, tensors={name: replace(q, int8_rows=0) for name, q in self.tensors.items()})

    def to_dict(self) -> dict[str, Any]:
        return {
            "preset": self.preset,
            "dtype": self.dtype,
            "tie_mode": self.tie_mode,
            "notes": self.notes,
            "calibration": self.calibration,
            "mixed": self.mixed,
            "tune": self.tune,
            **({"tie_rotation": self.tie_rotation} if self.tie_rotation else {}),
            **({"smoothing": self.smoothing} if self.smoothing else {}),
            **({"gptq": self.gptq} if self.gptq else {}),
            "tensors": {name: asdict(q) for name, q in self.tensors.items()},
        }

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> QuantPlan:
        """Inverse of to_dict: the plan a manifest recorded."""
        return cls(
            preset=raw["preset"],
            dtype=raw["dtype"],
            tie_mode=raw.get("tie_mode"),
            tensors={k: TensorQuant(**v) for k, v in raw["tensors"].items()},
            notes=raw.get("notes", []),
            calibration=raw.get("calibration"),
            mixed=raw.get("mixed"),
            tune=raw.get("tune"),
            tie_rotation=raw.get("tie_rotation"),
            smoothing=raw.get("smoothing"),
            gptq=raw.get("gptq"),
        )

    def summary(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for q in self.tensors.values():
            key = q.scheme if q.group_size is None else f"{q.scheme}/g{q.group_size}"
            if q.bits < 16 and not q.shares:
                key += f" {q.method}{' ' + q.source if q.source else ' asym' if q.asymmetric else ''}"
            if q.int8_rows:
                key += f" (rows < {q.int8_rows} int8)"
            counts[key] = counts.get(key, 0) + 1
        return counts


def valid_group_size(in_features: int, requested: int) -> int | None:
    """Largest power-of-two group <= requested that divides in_features (min 16); None if there is none."""
    group = requested
    while group >= 16:
        if in_features % group == 0:
            return group
        group //= 2
    return None


def plan_quantization(
    model: nn.Module,
    preset: str,
    group_size: int = DEFAULT_GROUP_SIZE,
    tie_mode: str = "shared8",
    per_channel_int8: bool = True,
    method: str = "rtn",
    asymmetric: bool = False,
) -> QuantPlan:
    """Decide the scheme of every Linear and Embedding weight in ``model`` for a preset.

    A group size that does not divide a Linear's ``in_features`` is lowered to the largest valid one and the
    change is recorded; with none valid, that Linear falls back to per-channel, also recorded. int8 tensors are
    per-channel unless ``per_channel_int8`` is False (ONNX MatMulNBits needs power-of-two blocks).
    ``method`` (rtn | search | gptq) picks the quantizer of every stored tensor; ``asymmetric`` gives the 4-bit
    tensors a zero point per group.
    """
    from mlexport.quantize.algorithms import METHODS

    if method not in METHODS:
        raise MlexportError(f"unknown --quantizer {method!r}; choose one of {', '.join(METHODS)}")
    if preset not in PRESETS:
        raise MlexportError(f"unknown --quant {preset!r}; choose one of {', '.join(PRESETS)}")
    if tie_mode not in TIE_MODES:
        raise MlexportError(f"unknown --tie-mode {tie_mode!r}; choose one of {', '.join(TIE_MODES)}")
    plan = QuantPlan(preset=preset, dtype="fp16" if preset == "fp16" else "fp32")
    int8_group = None if per_channel_int8 else group_size
    embed, head = getattr(model, "embed_tokens", None), getattr(model, "lm_head", None)
    tied = embed is not None and head is not None and head.weight is embed.weight
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear | nn.Embedding):
            continue
        key = f"{name}.weight"
        if preset in ("fp32", "fp16"):
            plan.tensors[key] = TensorQuant(scheme=preset, bits=32 if preset == "fp32" else 16)
            continue
        if tied and preset == "4bit" and tie_mode == "shared4":
            plan.tie_mode = "shared4"
            if isinstance(module, nn.Embedding):  # the lookup reads the head's 4-bit blocks
                plan.tensors[key] = TensorQuant("int4_weight", 4, group_size, shares="lm_head.weight")
                continue
        elif tied and module is head and (preset == "8bit" or tie_mode == "shared8"):
            plan.tie_mode = "shared8"
            plan.tensors[key] = TensorQuant("int8_dynact", 8, int8_group, shares="embed_tokens.weight")
            continue
        if isinstance(module, nn.Embedding):
            if tied and preset == "4bit" and tie_mode == "dup4":
                plan.tie_mode = "dup4"
                plan.tensors[key] = TensorQuant(scheme="int4_weight", bits=4, group_size=group_size)
            else:
                plan.tensors[key] = TensorQuant(scheme="int8_weight", bits=8, group_size=int8_group)
            continue
        if preset == "8bit":
            plan.tensors[key] = TensorQuant(scheme="int8_dynact", bits=8, group_size=int8_group)
            continue
        group = valid_group_size(module.in_features, group_size)
        note = None
        if group is None:
            note = f"in_features {module.in_features} has no power-of-two group >= 16: per-channel instead"
        elif group != group_size:
            note = f"group {group_size} does not divide in_features {module.in_features}: using {group}"
        if note:
            plan.notes.append(f"{key}: {note}")
        plan.tensors[key] = TensorQuant(scheme="int4_dynact", bits=4, group_size=group, note=note)
    for key, q in plan.tensors.items():
        if q.bits in (4, 8) and not q.shares:
            # an int8 embedding table has no input statistics and next to no rounding error: RTN is its optimum
            q.method = "rtn" if (q.bits == 8 and key == "embed_tokens.weight") else method
            q.asymmetric = asymmetric and q.bits == 4
    return plan
