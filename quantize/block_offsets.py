"""A reused Q4_1 grid as Core ML and ExecuTorch store it: int4 blocks times their scale, plus the blocks' offsets
at int8.

Why: Q4_1 is ``w = d·(q − zero)`` with a *float* zero per 32-block. Core ML's ``constexpr_blockwise_shift_scale``
takes a float offset, but at fp16 that is 16 bits a block (0.5 bits a weight), and XNNPACK takes no zero points at
all. Split ``w = d·q + B`` with ``B = −d·zero`` constant over each block: then ``x·wᵀ = x·(d·q)ᵀ + blocksum(x)·Bᵀ``,
a second, 32x smaller Linear over the sums of each block of inputs, and ``B`` rounds to int8 per row (8 bits a block
plus a scale a row), which keeps greedy agreement close to the exact grid's (docs/quantization.md, item 4).
The values stay a ``QuantizedWeight`` with a float zero point (``zero' = −B_int8/d``) so every consumer (the eager
twin validate runs, the byte accounting) sees exactly what the artifact computes.

This module is not part of the quantization cache key (quantize/calibrate.py's CACHED_CODE): it runs after the
cached values are read, on the exporter's and validate's side.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from mlexport.quantize.algorithms import QuantizedWeight, rtn

OFFSET_BITS = 8


def has_float_zero(qw: QuantizedWeight) -> bool:
    """A reused Q4_1 grid (its zero points are fractional floats); GPTQ's zero points are integers."""
    return qw.bits == 4 and qw.zero_point is not None and qw.zero_point.is_floating_point()


def block_offsets(qw: QuantizedWeight) -> QuantizedWeight:
    """``B = −d·zero`` [rows, blocks] rounded to int8 per row (symmetric, fp16 scale): the second Linear's weight."""
    offsets = -(qw.scale.float() * qw.zero_point.float())
    return rtn(offsets, OFFSET_BITS, offsets.shape[1], symmetric=True)


def with_rounded_offsets(qw: QuantizedWeight) -> QuantizedWeight:
    """``qw`` whose float zero points give exactly the int8 offsets Core ML stores: ``zero' = −B_int8 / d``."""
    rounded = block_offsets(qw).dequantize()
    scale = qw.scale.float()
    zero = torch.where(scale != 0, -rounded / torch.where(scale != 0, scale, 1.0), 0.0)
    return dataclasses.replace(qw, zero_point=zero)


def float_zero_grids(values: dict[str, Any]) -> dict[str, QuantizedWeight]:
    """The reused Q4_1 grids among a plan's quantized values, by weight name."""
    return {n: v for n, v in values.items() if isinstance(v, QuantizedWeight) and has_float_zero(v)}


def as_target_stores(values: dict[str, Any], stores_block_offsets: bool) -> dict[str, Any]:
    """A plan's quantized values as the target stores them: where it ``stores_block_offsets`` (its profile), each
    reused Q4_1 grid's offsets rounded to int8 (what the eager twin validate builds and ``quantize-sweep`` scores
    must run); elsewhere unchanged."""
    if not stores_block_offsets:
        return values
    return {**values, **{n: with_rounded_offsets(v) for n, v in float_zero_grids(values).items()}}


def offset_form_bytes(rows: int, cols: int, group: int, row_scale_bytes: int = 2) -> int:
    """The offsets' stored bytes for a [rows, cols] weight: an int8 per block and a scale per row (Core ML fp16,
    XNNPACK fp32)."""
    return rows * (cols // group) * OFFSET_BITS // 8 + rows * row_scale_bytes
