"""Byte accounting: what a quantization plan stores, per target layout, and whether an artifact stores more.

Every size figure (mixed precision's budget, ``--tie-mode auto``, the manifest's accounting and blob map) comes
from here, so that a prediction and its check cannot disagree.
"""

from __future__ import annotations

import re
from typing import Any

import torch
from mlexport.quantize import QuantPlan
from mlexport.quantize.block_offsets import offset_form_bytes
from torch import nn

from mlexport.sharing import SharingPlan

ACCOUNTING_SLACK = 1.03  # headroom for alignment and scale layouts
PROGRAM_OVERHEAD = 64 * 1024  # the program itself: graph, instructions, delegate headers (~30 KB measured)


def tensor_bytes(
    numel: int, rows: int, scheme: str, group_size: int | None, scale_bytes: dict[int, int] | None = None
) -> int:
    """Bytes one stored tensor takes under a scheme, as the runtime stores it (``scale_bytes`` per bit width;
    the default is XNNPACK's: bf16 scales for int4 groups, fp32 for int8)."""
    per_scale = scale_bytes or {4: 2, 8: 4}
    if scheme == "fp32":
        return 4 * numel
    if scheme == "fp16":
        return 2 * numel
    if scheme in ("int4_dynact", "int4_weight"):
        groups = numel // group_size if group_size else rows
        return numel // 2 + per_scale[4] * groups
    if scheme in ("int8_dynact", "int8_weight"):
        groups = numel // group_size if group_size else rows
        return numel + per_scale[8] * groups
    raise ValueError(f"unknown scheme {scheme}")


# A ``scale_bytes`` key: the target stores a reused Q4_1 grid's float zero points as int8 block offsets
# (quantize/block_offsets.py; Core ML) rather than as floats as wide as its scales.
BLOCK_OFFSETS = "block_offsets"


def planned_tensor_bytes(shape: Any, q: Any, scale_bytes: dict[Any, int] | None = None) -> int:
    """Bytes of one planned tensor (a ``TensorQuant``) with its zero points: integer ones are 4-bit, two to a
    byte (MatMulNBits, Core ML uint4 offsets); a reused Q4_1 grid's are floats as wide as its scales, or int8
    block offsets where the target says so (``BLOCK_OFFSETS``)."""
    rows, cols = int(shape[0]), int(torch.Size(shape).numel()) // int(shape[0])
    head = min(q.int8_rows, rows)  # stored at int8 per row instead (TensorQuant.int8_rows)
    numel = (rows - head) * cols
    total = tensor_bytes(numel, rows - head, q.scheme, q.group_size, scale_bytes)
    if head:
        total += tensor_bytes(head * cols, head, "int8_weight", None, scale_bytes)
    if q.asymmetric:
        groups = numel // (q.group_size or cols)
        if q.float_zero and scale_bytes and scale_bytes.get(BLOCK_OFFSETS):  # int8 per block, a scale per row
            total += offset_form_bytes(rows - head, cols, q.group_size or cols, scale_bytes[BLOCK_OFFSETS])
        else:
            total += groups * (scale_bytes or {4: 2, 8: 4})[q.bits] if q.float_zero else (groups + 1) // 2
    return total


def predicted_bytes(
    model: nn.Module, plan: QuantPlan, scale_bytes: dict[int, int] | None = None, rope_table_bytes: int = 0
) -> dict[str, int]:
    """Unique bytes the plan implies: planned tensors once each (shared uses free), plus float leftovers and the
    RoPE tables a target stores (``rope_table_bytes``: the decoder computes them per call, ONNX and Core ML keep
    a table)."""
    params = dict(model.named_parameters(remove_duplicate=False))
    shapes = {name: p.shape for name, p in params.items()}
    planned = 0
    counted: set[int] = set()
    for name, q in plan.tensors.items():
        if q.shares or (q.bits >= 16 and id(params[name]) in counted):  # a float tie is one tensor
            continue
        counted.add(id(params[name]))
        planned += planned_tensor_bytes(shapes[name], q, scale_bytes)
    float_bytes = 0
    seen: set[int] = set()
    for name, p in model.named_parameters(remove_duplicate=False):
        if name in plan.tensors or id(p) in seen:
            continue
        seen.add(id(p))
        float_bytes += p.numel() * (2 if plan.dtype == "fp16" else 4)
    for name, b in model.named_buffers():  # constant tables; KV caches are planned memory, not stored
        if not name.startswith("caches."):
            float_bytes += b.numel() * b.element_size()
    float_bytes += rope_table_bytes
    return {"quantized": planned, "float": float_bytes, "total": planned + float_bytes}


def account(
    files: list[dict[str, Any]], predicted_total: int, weight_suffixes: tuple[str, ...], container_bytes: int = 0
) -> dict[str, Any]:
    """Compare what an artifact stores with what the plan predicts; over the slack means duplicated bytes.

    ``container_bytes`` is the weight file's own fixed cost that no plan predicts (Core ML's per-blob records),
    so that a tiny model, where that cost is a large fraction, is not reported as duplicating weights."""
    stored = sum(f["bytes"] for f in files if f["path"].endswith(weight_suffixes))
    fixed = PROGRAM_OVERHEAD + container_bytes
    excess = max(0, stored - fixed - predicted_total)
    ratio = stored / predicted_total if predicted_total else 0.0
    return {
        "stored_bytes": stored,
        "predicted_unique_bytes": predicted_total,
        "ratio": round(ratio, 4),
        "within_slack": stored <= ACCOUNTING_SLACK * predicted_total + fixed,
        "excess_bytes": excess,
    }


_PARAMETRIZED = re.compile(r"\.parametrizations\.(\w+)\.original(\d+)$")
_PARTS = {"0": "data", "1": "scale", "2": "zero_point"}


def logical_tensor(key: str, source_fqn: str) -> tuple[str, str]:
    """(logical tensor, part) for a stored key: torchao's unwrapped `x.parametrizations.weight.original1` is
    `x.weight`'s scale; XNNPACK prefixes scale keys with `scale_`."""
    if "#" in source_fqn:  # exporters that know the part say so: "layers.0.q_proj.weight#scale"
        name, part = source_fqn.split("#", 1)
        return name, part
    match = _PARAMETRIZED.search(source_fqn)
    name = source_fqn[: match.start()] + "." + match.group(1) if match else source_fqn
    part = _PARTS.get(match.group(2), "aux") if match else "data"
    if key.endswith((".zero_points", ".block_offsets")):  # ONNX zero points, or their exact per-block offsets
        return name, "zero_point"
    return name, "scale" if key.startswith("scale_") or key.endswith(".scales") else part


def map_blobs(
    blobs: list[dict[str, Any]], key_sources: dict[str, list[str]], plan: SharingPlan, layer_map: list[int] | None
) -> dict[str, Any]:
    """Join an artifact's stored blobs with the logical tensors each serves, and flag duplicated bytes.

    A blob serves the tensors its keys came from (``key_sources``, recorded at export) or that its keys name
    (FQN keys). Two blobs serving the same source tensor and part, after sharing groups are applied, mean the same
    weight is stored twice: the second one's bytes are counted as duplicated.
    """
    canonical = {use: g.stored for g in plan.groups if g.reason != "layer-sharing" for use in g.uses}
    runs: dict[int, list[int]] = {}
    for executed, block in enumerate(layer_map or []):
        runs.setdefault(block, []).append(executed)
    rows, seen, duplicated = [], {}, 0
    for blob in blobs:
        serves: set[str] = set()
        parts: set[tuple[str, str]] = set()
        for key in blob["keys"]:
            for fqn in key_sources.get(key, [key] if "." in key else []):
                name, part = logical_tensor(key, fqn)
                serves.add(name)
                parts.add((canonical.get(name, name), part))
        duplicate_of = sorted({seen[p] for p in parts if p in seen})
        row = {**blob, "serves": [_with_runs(n, runs) for n in sorted(serves)] or [blob.get("label", "(unknown)")]}
        if duplicate_of:
            row["duplicate_of_blob"] = duplicate_of
            duplicated += blob["bytes"]
        for p in parts:
            seen.setdefault(p, len(rows))
        rows.append(row)
    return {"blobs": rows, "stored_bytes": sum(b["bytes"] for b in blobs), "duplicated_bytes": duplicated}


def _with_runs(name: str, runs: dict[int, list[int]]) -> str:
    match = re.match(r"layers\.(\d+)\.", name)
    executed = runs.get(int(match.group(1)), []) if match else []
    return f"{name} (executed layers {', '.join(map(str, executed))})" if len(executed) > 1 else name
