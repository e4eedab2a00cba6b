"""Sharing analysis: which logical uses read one stored tensor, and what the artifact should therefore weigh.

The plan covers tied embeddings (same Parameter, or equal bytes in a checkpoint that stores both), MobileLLM-LS
block repeats (from the layer map), and any other parameters with identical storage or bytes in any nn.Module.
Exporters are held to it by ``mlexport.quantize.accounting.account``: an artifact must not weigh more than the
unique bytes the plan predicts.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn


@dataclass
class ShareGroup:
    stored: str  # the one tensor (or block) that is stored
    uses: list[str]  # every logical use that reads it
    reason: str  # "same-parameter" | "equal-bytes" | "layer-sharing"
    numel: int  # elements stored once


@dataclass
class SharingPlan:
    groups: list[ShareGroup] = field(default_factory=list)
    unique_params: int = 0
    naive_params: int = 0  # parameters as executed, each use counted

    def to_dict(self) -> dict[str, Any]:
        return {
            "unique_params": self.unique_params,
            "naive_params": self.naive_params,
            "groups": [asdict(g) for g in self.groups],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SharingPlan:
        groups = [ShareGroup(**g) for g in data.get("groups", [])]
        return cls(groups, data.get("unique_params", 0), data.get("naive_params", 0))


def _digest(t: torch.Tensor) -> str:
    data = t.detach().contiguous().cpu()
    return hashlib.sha256(
        f"{data.dtype}{tuple(data.shape)}".encode() + data.view(torch.uint8).numpy().tobytes()
    ).hexdigest()


def build_sharing_plan(model: nn.Module, layer_map: list[int] | None = None) -> SharingPlan:
    """Group the parameters of ``model`` by identity, then by bytes; add executed-layer repeats from layer_map."""
    plan = SharingPlan()
    by_id: dict[int, list[str]] = {}
    params: dict[int, nn.Parameter] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        by_id.setdefault(id(p), []).append(name)
        params[id(p)] = p
    by_bytes: dict[str, list[int]] = {}
    for pid, p in params.items():
        by_bytes.setdefault(_digest(p), []).append(pid)
    for pids in by_bytes.values():
        names = [n for pid in pids for n in by_id[pid]]
        numel = params[pids[0]].numel()
        if len(pids) > 1:
            plan.groups.append(ShareGroup(names[0], names, "equal-bytes", numel))
        elif len(names) > 1:
            plan.groups.append(ShareGroup(names[0], names, "same-parameter", numel))
        plan.unique_params += numel
    plan.naive_params = sum(params[pid].numel() * len(names) for pid, names in by_id.items())
    if layer_map:
        for block in sorted(set(layer_map)):
            runs = [i for i, b in enumerate(layer_map) if b == block]
            if len(runs) > 1:
                prefix = f"layers.{block}."
                numel = sum(p.numel() for n, p in model.named_parameters() if n.startswith(prefix))
                uses = [f"executed layer {i}" for i in runs]
                plan.groups.append(ShareGroup(f"layers.{block}", uses, "layer-sharing", numel))
                plan.naive_params += numel * (len(runs) - 1)
    return plan
