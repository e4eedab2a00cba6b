"""Lossless re-export: the integer grid an already-quantized source (GGUF Q4_0 / Q4_1 / Q8_0) stores, as a
``QuantizedWeight``, so a target that can represent that grid reuses it instead of quantizing a second time.

Why: the demo model ships as Q4_1 (asymmetric, group 32, fp16 scale and minimum per group). Its "fp32 weights" are
those blocks dequantized, so re-quantizing them onto another 4-bit grid adds a second rounding on top of the first,
while a runtime with a float zero point per group (ONNX MatMulNBits, Core ML ``constexpr_blockwise_shift_scale``)
can execute the original blocks exactly. Q4_1's ``w = d·u + m`` (u in 0..15) is written in our signed convention
as ``scale · (q − zero)`` with ``q = u − 8``, ``scale = d`` and a *float* ``zero = −8 − m/d``; Q4_0 and Q8_0 are
symmetric (zero 0). This is a property of the source, not a better quantizer: the drift report says which tensors
reused their grid.
"""

from __future__ import annotations

import numpy as np
import torch

from mlexport.weights import QuantizedWeight

GROUP = 32  # every GGUF type read here has 32-element blocks
SOURCE_TYPES = ("Q4_0", "Q4_1", "Q8_0")


def decode_blocks(raw: np.ndarray, kind: str, rows: int, cols: int) -> QuantizedWeight:
    """The grid of one GGUF tensor stored as ``kind`` with ``rows`` x ``cols`` elements (cols along the blocks)."""
    if kind not in SOURCE_TYPES:
        raise ValueError(f"no grid reader for GGUF type {kind}")
    if cols % GROUP:
        raise ValueError(f"{cols} columns are not whole {GROUP}-element blocks")
    n_blocks = rows * cols // GROUP
    data = np.ascontiguousarray(raw).view(np.uint8).reshape(n_blocks, -1)
    d = data[:, 0:2].copy().view(np.float16).astype(np.float32)[:, 0]
    zero = None
    if kind == "Q8_0":
        q = data[:, 2:34].copy().view(np.int8).astype(np.int8)
    else:
        offset = 4 if kind == "Q4_1" else 2
        nibbles = data[:, offset : offset + 16]
        u = np.concatenate([nibbles & 0x0F, nibbles >> 4], axis=1).astype(np.int16)  # low nibbles are 0..15
        q = (u - 8).astype(np.int8)
        if kind == "Q4_1":
            m = data[:, 2:4].copy().view(np.float16).astype(np.float32)[:, 0]
            with np.errstate(divide="ignore", invalid="ignore"):
                zero = np.where(d != 0, -8.0 - m / np.where(d != 0, d, 1.0), 0.0).astype(np.float32)
            # a constant block (d == 0) holds m everywhere: scale m, q 1, zero 0 represents it exactly
            flat = d == 0
            if flat.any():
                d = np.where(flat, m, d)
                q[flat] = 1
    scale = torch.from_numpy(d.reshape(rows, cols // GROUP).copy())
    return QuantizedWeight(
        qdata=torch.from_numpy(q.reshape(rows, cols).copy()),
        scale=scale,
        zero_point=None if zero is None else torch.from_numpy(zero.reshape(rows, cols // GROUP).copy()),
        bits=8 if kind == "Q8_0" else 4,
        group_size=GROUP,
    )


def permute_rows(qw: QuantizedWeight, permute: object) -> QuantizedWeight:
    """Apply a row permutation (e.g. llama.cpp's RoPE un-permutation) to every per-row part of the grid."""
    return QuantizedWeight(
        qdata=permute(qw.qdata),
        scale=permute(qw.scale),
        zero_point=None if qw.zero_point is None else permute(qw.zero_point),
        bits=qw.bits,
        group_size=qw.group_size,
    )
