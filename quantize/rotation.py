"""Rotate a tied table whose head runs on int8 activations (ExecuTorch's ``shared8``: XNNPACK's 8da8w head).

The head quantizes its input, the final hidden state, to int8 per token, and a few outlier channels set each
token's range. An orthogonal ``R`` leaves the logits unchanged, ``(x R) (E R)^T = x E^T``, while ``x R`` has no
outliers (QuaRot). So the table is stored as ``E R`` (the int8 rows are rounded from it), the head's input is
rotated, and the embedding lookup rotates its rows back (``HadamardRotation.undo``). ``R`` is a Hadamard matrix
with random signs, built from two small factors so the runtime stores a few KB.

Rotated, the int8 head drifts about as little as with its input in fp32, and less than with diagonal smoothing
(SmoothQuant) instead (docs/quantization.md, item 7). The body's Linears are not rotated: their weights came as a
Q4_1 grid in the original basis, which a 4-bit group quantizer fits far better than the same weights rotated.
"""

from __future__ import annotations

from typing import Any

import torch
from mlexport.quantize import QuantPlan
from torch import nn

from mlexport.errors import MlexportError
from mlexport.model import HadamardRotation

SIGN_SEED = 0


def hadamard(n: int) -> torch.Tensor | None:
    """An orthonormal Hadamard matrix of order n = 2^k or 12 * 2^k (Sylvester, Paley), else None."""
    if n < 1:
        return None
    core = torch.ones(1, 1)
    if n % 12 == 0 and (n // 12) & (n // 12 - 1) == 0:
        core, n = _paley12(), n // 12
    if n & (n - 1):
        return None
    h = torch.ones(1, 1)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)])
    full = torch.kron(core, h)
    return full / full.shape[0] ** 0.5


def _paley12() -> torch.Tensor:
    """Paley's Hadamard matrix of order 12, from the quadratic residues mod 11."""
    q = 11
    squares = {i * i % q for i in range(1, q)}
    jacobsthal = torch.tensor(
        [[0 if i == j else (1 if (j - i) % q in squares else -1) for j in range(q)] for i in range(q)],
        dtype=torch.float32,
    )
    skew = torch.zeros(12, 12)
    skew[0, 1:], skew[1:, 0], skew[1:, 1:] = 1, -1, jacobsthal
    return torch.eye(12) + skew


def factors(dim: int) -> tuple[int, int] | None:
    """The most balanced split dim = a * b with a Hadamard matrix of both orders (576 -> 24 x 24)."""
    pairs = [(a, dim // a) for a in range(1, dim + 1) if dim % a == 0]
    pairs = [(a, b) for a, b in pairs if hadamard(a) is not None and hadamard(b) is not None]
    return min(pairs, key=lambda p: max(p), default=None)


def tie_rotation_record(dim: int) -> dict[str, Any] | None:
    """What the plan records (and a manifest's reader rebuilds the rotation from); None if dim has no split."""
    split = factors(dim)
    if split is None:
        return None
    return {"kind": "hadamard", "factors": list(split), "sign_seed": SIGN_SEED}


def build_rotation(dim: int, record: dict[str, Any]) -> HadamardRotation:
    if record.get("kind") != "hadamard":
        raise MlexportError(f"unknown tie rotation {record.get('kind')!r}; re-export with this mlexport version")
    a, b = record["factors"]
    outer, inner = hadamard(a), hadamard(b)
    if outer is None or inner is None or a * b != dim:
        raise MlexportError(f"tie rotation {a} x {b} does not fit dim {dim}; re-export with this mlexport version")
    generator = torch.Generator().manual_seed(int(record["sign_seed"]))
    signs = torch.randint(0, 2, (dim,), generator=generator).float() * 2 - 1
    return HadamardRotation(signs, outer, inner)


def plan_tie_rotation(model: nn.Module, plan: QuantPlan) -> QuantPlan:
    """Record a rotation in ``plan`` when its tied head runs on int8 activations, and rotate ``model`` to match."""
    head = plan.tensors.get("lm_head.weight")
    if plan.tie_rotation is None and head is not None and head.shares and head.scheme == "int8_dynact":
        plan.tie_rotation = tie_rotation_record(model.embed_tokens.weight.shape[1])
        if plan.tie_rotation is None:
            plan.notes.append("the tied head's input is not rotated: its width has no Hadamard split here")
    rotate_tie(model, plan)
    return plan


def rotate_tie(model: nn.Module, plan: QuantPlan) -> None:
    """Make ``model`` (fp32, tied) store its table rotated as ``plan`` says, once; its logits do not change."""
    if not plan.tie_rotation or getattr(model, "tie_rotation", None) is not None:
        return
    table = model.embed_tokens.weight
    if model.lm_head.weight is not table:
        raise MlexportError("a tie rotation needs the tied embedding and head to be one Parameter")
    rotation = build_rotation(table.shape[1], plan.tie_rotation).to(table.dtype)
    with torch.no_grad():
        table.copy_(rotation(table.detach().float()).to(table.dtype))
    model.tie_rotation = rotation
