"""``--tie-mode auto``: pick the tied-embedding layout by measuring it, not by a rule of thumb.

Each candidate (``shared8``, ``dup4``) is quantized in eager PyTorch and scored against the fp32 model on a slice
of the built-in corpus. The smallest candidate whose KLD is within a tolerance of the best one wins. Eager
PyTorch is the right judge here: the exporter's own error is the same for both layouts and is measured later by
``mlexport validate``.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass
from typing import Any

import torch
from mlexport.quantize import TIE_MODES, plan_quantization
from mlexport.quantize.accounting import predicted_bytes

from mlexport.corpus import default_corpus

CHOICE_TOKENS = 256
KLD_TOLERANCE = 1.10  # a layout may drift up to 10% more than the best one (+ a small floor) if it is smaller
KLD_FLOOR = 1e-3


@dataclass
class TieCandidate:
    mode: str
    predicted_bytes: int
    kld_mean: float
    passes: bool = False
    rotation: dict[str, Any] | None = None  # the table stored rotated, as the export would (quantize/rotation.py)
    smoothed: bool = False  # the int8 activations smoothed, as the export would (quantize/smoothing.py)


def choose_tie_mode(
    model: torch.nn.Module,
    token_ids: list[int],
    preset: str,
    group_size: int,
    modes: tuple[str, ...] = TIE_MODES,
    scale_bytes: dict[int, int] | None = None,
    per_channel_int8: bool = True,
    rotate_tie: bool = False,
    smooth_windows: list[list[int]] | None = None,
    rotate_4bit_tie: bool = False,
) -> dict[str, Any]:
    """Return {"mode": chosen, "candidates": [...], "rule": ...} for a tied fp32 ``model`` (left unchanged).

    ``rotate_tie`` and ``smooth_windows`` (calibration windows): score each layout as the target's export runs it,
    with its tied table rotated where the plan rotates it and its int8 activations smoothed (ExecuTorch), so the
    layouts are compared on the model that will ship, not on one the export never builds. ``rotate_4bit_tie``: a
    ``shared4`` table is stored rotated too, as the target's export stores it."""
    from mlexport.quantize.rotation import plan_tie_rotation, tie_rotation_record
    from mlexport.quantize.rotation import rotate_tie as rotate_table
    from mlexport.quantize.smoothing import plan_smoothing
    from mlexport.quantize.torchao_map import apply_plan

    tokens = torch.tensor([token_ids[:CHOICE_TOKENS]])
    with torch.no_grad():
        ref = torch.log_softmax(model(tokens)[0].double(), -1)
    candidates = []
    for mode in modes:
        plan = plan_quantization(model, preset, group_size, mode, per_channel_int8)
        if plan.tie_mode != mode:  # this preset has only one layout (8-bit is always shared)
            continue
        candidate = copy.deepcopy(model)
        if rotate_tie:
            plan = plan_tie_rotation(candidate, plan)
        if smooth_windows:
            plan = plan_smoothing(candidate, plan, smooth_windows)
        if rotate_4bit_tie and plan.tie_mode == "shared4":
            plan.tie_rotation = tie_rotation_record(candidate.embed_tokens.weight.shape[1])
            rotate_table(candidate, plan)
        quantized = apply_plan(candidate, plan)
        with torch.no_grad():
            test = torch.log_softmax(quantized(tokens)[0].double(), -1)
        kld = float((ref.exp() * (ref - test)).sum(-1).mean())
        size = predicted_bytes(model, plan, scale_bytes)["total"]
        candidates.append(
            TieCandidate(mode, size, kld, rotation=plan.tie_rotation, smoothed=plan.smoothing is not None)
        )
    best = min(c.kld_mean for c in candidates)
    for c in candidates:
        c.passes = c.kld_mean <= best * KLD_TOLERANCE + KLD_FLOOR
    chosen = min((c for c in candidates if c.passes), key=lambda c: c.predicted_bytes)
    return {
        "mode": chosen.mode,
        "rule": f"smallest layout with KLD <= {KLD_TOLERANCE} x best + {KLD_FLOOR} on {tokens.shape[1]} tokens",
        "candidates": [asdict(c) for c in candidates],
    }


def corpus_tokens(tokenizer: Any) -> list[int]:
    """The built-in corpus, tokenized: the same text `mlexport validate` scores by default."""
    return tokenizer.encode(default_corpus())
