"""Weight quantizers, target-agnostic: round-to-nearest, an error-minimizing scale search, and GPTQ.

Each returns a ``QuantizedWeight`` (integer values, per-group scales, optional zero points); the exporters map that
onto what their runtime executes. Grids are signed, ``[-2^(b-1), 2^(b-1) - 1]``, and dequantize as
``scale * (q - zero)`` (zero is 0 for symmetric), which is torchao's, MatMulNBits' (after a +2^(b-1) shift) and
Core ML's ``constexpr_blockwise_shift_scale`` convention alike.

Why these three: RTN is the baseline every runtime reproduces; the scale search lowers the error of each group for
free (no data), which matters most when the weights already sit on another grid (a re-quantized GGUF); GPTQ uses
calibration activations to push each column's rounding error onto the columns not yet quantized, weighted by the
inputs' second moments (Frantar et al., 2022).
"""

from __future__ import annotations

import dataclasses

import torch

from mlexport.weights import QuantizedWeight

METHODS = ("rtn", "search", "gptq")
# Clipping ratios the scale search tries: the group's range times r. Below ~0.6 the clipping never pays at 4 bits.
SEARCH_RATIOS = torch.linspace(1.0, 0.6, 41).tolist()
SEARCH_CHUNK = 1 << 24  # elements per batched step of the search


# What the quantizers hand the exporters, by parameter name: a QuantizedWeight per planned tensor, and a plain tensor
# for a float parameter the scale tuning changed (an RMSNorm's gain: the artifacts store it in float anyway, so
# tuning it costs no size). torchao_map.set_tuned_floats writes those into the model.
QuantizedValues = dict[str, "QuantizedWeight | torch.Tensor"]


def with_int8_rows(quantized: QuantizedWeight, weight: torch.Tensor, rows: int) -> QuantizedWeight:
    """``quantized`` with its first ``rows`` rows re-quantized from ``weight`` to symmetric int8 per row (RTN:
    at 8 bits rounding error is ~1/16 of 4-bit's and needs no data)."""
    if rows <= 0:
        return quantized
    head = rtn(weight[:rows].float(), 8, weight.shape[1], symmetric=True)
    return dataclasses.replace(quantized, int8_rows=head)


def qrange(bits: int) -> tuple[int, int]:
    return -(1 << (bits - 1)), (1 << (bits - 1)) - 1


def _params(
    w: torch.Tensor, bits: int, symmetric: bool, ratio: float | torch.Tensor = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, zero) per row of ``w`` [..., G] for its range shrunk by ``ratio``; zero is 0 when symmetric.

    Scales are rounded to fp16 before anything is rounded against them: Core ML and ONNX store fp16 scales, so the
    integers are chosen for the scale the runtime will actually multiply by."""
    qmin, qmax = qrange(bits)
    if symmetric:
        amax = w.abs().amax(dim=-1) * ratio  # ratio: a float or a tensor broadcasting over leading dims
        scale = _fp16(amax / ((qmax - qmin) / 2))  # torchao's symmetric choice: amax / 7.5 at 4 bits
        return scale, torch.zeros_like(scale)
    lo = (w.amin(dim=-1).clamp(max=0)) * ratio
    hi = (w.amax(dim=-1).clamp(min=0)) * ratio
    scale = _fp16((hi - lo) / (qmax - qmin))
    zero = (qmin - torch.round(lo / scale)).clamp(qmin, qmax)
    return scale, zero


def _fp16(scale: torch.Tensor) -> torch.Tensor:
    """Round to the nearest fp16 (kept as fp32); never below fp16's smallest step, so no scale is zero."""
    return scale.half().float().clamp(min=2.0**-24)


def _round(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, bits: int) -> torch.Tensor:
    """Quantize; ``zero`` None (symmetric) skips adding a zero tensor. In place after the division: this runs
    on [ratios, rows, groups, group] tensors in the search and once per column in GPTQ."""
    qmin, qmax = qrange(bits)
    q = torch.round_(w / scale[..., None])
    if zero is not None:
        q += zero[..., None]
    return q.clamp_(qmin, qmax)


def _grouped(w: torch.Tensor, group: int) -> torch.Tensor:
    n, k = w.shape
    if k % group:
        raise ValueError(f"group {group} does not divide {k} input columns")
    return w.float().reshape(n, k // group, group)


def _pack(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, group: int, symmetric: bool):  # noqa: ANN202
    n = q.shape[0]
    return QuantizedWeight(
        qdata=q.reshape(n, -1).to(torch.int8),
        scale=scale.reshape(n, -1).float(),
        zero_point=None if symmetric else zero.reshape(n, -1).to(torch.int8),
        bits=bits,
        group_size=group,
    )


def rtn(w: torch.Tensor, bits: int, group: int, symmetric: bool = True) -> QuantizedWeight:
    """Round to nearest over each group's full range (the baseline; torchao's grid when symmetric)."""
    g = _grouped(w, group)
    scale, zero = _params(g, bits, symmetric)
    return _pack(_round(g, scale, zero, bits), scale, zero, bits, group, symmetric)


def search(
    w: torch.Tensor, bits: int, group: int, symmetric: bool = True, importance: torch.Tensor | None = None
) -> QuantizedWeight:
    """Per group, the clipping ratio with the least (importance-weighted) squared error. No calibration data needed;
    ``importance`` [K] (e.g. the inputs' mean squares) makes the error the one the layer's output sees."""
    g = _grouped(w, group)
    weight = torch.ones(1) if importance is None else _grouped(importance.reshape(1, -1).float(), group)
    ratios = torch.tensor(SEARCH_RATIOS).reshape(-1, 1, 1)
    rows = max(1, SEARCH_CHUNK // (len(SEARCH_RATIOS) * g.shape[1] * group))
    scales, zeros = [], []
    for start in range(0, g.shape[0], rows):  # all ratios at once, a slice of rows at a time (bounded memory)
        part = g[start : start + rows]
        scale, zero = _params(part.unsqueeze(0), bits, symmetric, ratios)  # [R, rows, G]
        q = _round(part.unsqueeze(0), scale, None if symmetric else zero, bits)
        if not symmetric:
            q -= zero[..., None]
        q *= scale[..., None]  # q is now the dequantized weight; the same float ops as before, fewer buffers
        q -= part
        err = q.square_().mul_(weight).sum(-1)
        best = err.argmin(dim=0, keepdim=True)
        scales.append(scale.gather(0, best)[0])
        zeros.append(zero.gather(0, best)[0])
    scale, zero = torch.cat(scales), torch.cat(zeros)
    return _pack(_round(g, scale, zero, bits), scale, zero, bits, group, symmetric)


def gptq(
    w: torch.Tensor,
    hessian: torch.Tensor,
    bits: int,
    group: int,
    symmetric: bool = True,
    damp: float = 0.1,
    block: int = 128,
    act_order: bool = True,
    cross: torch.Tensor | None = None,
    alpha: float = 0.25,
) -> QuantizedWeight:
    """GPTQ with static groups: each group's scale comes from the importance-weighted scale search.

    ``damp`` (times the mean diagonal, added to H) is 10x the paper's 0.01: a stronger prior toward plain rounding
    fits the calibration text less and generalizes better (docs/quantization.md, item 1).
    ``hessian`` is the sum of x xᵀ over calibration inputs [K, K]. Rows are independent, so callers stack the
    rows of every Linear that reads the same input (q/k/v, gate/up) and run one pass. ``act_order`` quantizes the
    columns with the largest input energy first, so the rest can absorb their error; the groups (and so the
    stored layout) stay contiguous because their scales are fixed before the pass.

    ``cross`` turns it into GPTAQ (Li et al., 2025, "asymmetric calibration"): the sum of (x_fp − x) xᵀ, where x
    is the input the quantized model gives this layer and x_fp the full-precision model's. Each step then also
    moves the remaining columns so that the layer's output approaches the *full-precision* model's output, not
    only its own unquantized output on already-drifted inputs: it corrects the error the earlier layers left,
    which compounds over a deep-thin model's 30 layers. ``alpha`` is the paper's weight on that term.
    """
    n, k = w.shape
    if k % group:
        raise ValueError(f"group {group} does not divide {k} input columns")
    weights = w.float().clone()
    h = hessian.float().clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    weights[:, dead] = 0.0
    importance = torch.diag(hessian).float()
    found = search(weights, bits, group, symmetric, importance)
    scales = found.scale
    zeros = torch.zeros_like(scales) if found.zero_point is None else found.zero_point.float()
    perm = torch.argsort(torch.diag(h), descending=True) if act_order else torch.arange(k)
    weights, h = weights[:, perm], h[perm][:, perm]
    h += damp * torch.mean(torch.diag(h)) * torch.eye(k)
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    p = None  # GPTAQ's correction, strictly upper-triangular in the quantization order
    if cross is not None:
        c = cross.float().clone()
        c[:, dead] = 0.0
        p = alpha * ((c[perm][:, perm] @ hinv.T).triu_(diagonal=1)) @ hinv
    col_group = perm // group
    col_scale = scales[:, col_group].T.contiguous()  # [column, row]: each column's group scale, in order
    col_zero = None if symmetric else zeros[:, col_group].T.contiguous()
    qmin, qmax = qrange(bits)
    q_all = torch.zeros(k, n)  # [column, row] in quantization order
    columns = weights.T.contiguous()  # [column, row]: each column and each rank-1 update is contiguous memory
    for i1 in range(0, k, block):
        i2 = min(i1 + block, k)
        w1 = columns[i1:i2]
        err1 = torch.zeros_like(w1)
        hinv1 = hinv[i1:i2, i1:i2]
        diagonal = torch.diagonal(hinv1).tolist()
        for i in range(i2 - i1):  # GPTQ's critical path: few, fused, in-place torch calls per column
            column = w1[i]
            scale = col_scale[i1 + i]
            q = torch.div(column, scale).round_()
            if col_zero is not None:
                q += col_zero[i1 + i]
            q.clamp_(qmin, qmax)
            q_all[i1 + i] = q
            dequantized = q if col_zero is None else q - col_zero[i1 + i]
            err = (column - dequantized * scale).div_(diagonal[i])
            before = column.clone() if p is not None else None
            w1[i:].addr_(hinv1[i, i:], err, alpha=-1)
            if before is not None:
                w1[i:].addr_(p[i1 + i, i1 + i : i2], before)
            err1[i] = err
        columns[i2:].addmm_(hinv[i1:i2, i2:].T, err1, alpha=-1)
        if p is not None:
            columns[i2:].addmm_(p[i1:i2, i2:].T, w1)
    q_out = torch.empty(n, k)
    q_out[:, perm] = q_all.T
    return _pack(q_out, scales, zeros, bits, group, symmetric)


def output_error(w: torch.Tensor, quantized: QuantizedWeight, hessian: torch.Tensor) -> float:
    """tr(ΔW H ΔWᵀ): the summed squared output error over the calibration inputs (what GPTQ minimizes)."""
    delta = quantized.dequantize() - w.float()
    return float(torch.einsum("nk,kj,nj->", delta, hessian.float(), delta))
