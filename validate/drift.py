"""Teacher-forced drift measurement: a corpus through the artifact's runtime and through PyTorch references.

Each window is fed half as one prefill call and half token by token, so both the prefill graph and the KV-cache
decode path are measured. Three comparisons per artifact:
- total: artifact vs fp32 PyTorch (what a user gets);
- export: artifact vs PyTorch running the same quantized weights (the exporter's own error);
- quant: quantized PyTorch vs fp32 PyTorch (the quantization scheme's error).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from mlexport.quantize import QuantPlan
from mlexport.validate import stats

from mlexport.errors import MlexportError
from mlexport.model import build_decoder
from mlexport.sources import LoadedModel

Progress = Callable[[int], None]


@dataclass
class Windows:
    """Corpus tokens cut into windows; scored positions i predict token i+1 inside their window."""

    windows: list[list[int]]

    @property
    def targets(self) -> np.ndarray:
        return np.concatenate([np.array(w[1:]) for w in self.windows])

    @property
    def scored(self) -> int:
        return sum(len(w) - 1 for w in self.windows)

    def positions(self) -> np.ndarray:
        """Each prediction's position inside its window, aligned with ``targets``."""
        return np.concatenate([np.arange(len(w) - 1) for w in self.windows])

    def scored_mask(self, score_from: int) -> np.ndarray:
        """Which predictions count: positions >= ``score_from`` (llama.cpp scores the second half of each 512-token
        window: ``score_from=255``). Refuses a value that leaves none."""
        mask = self.positions() >= score_from
        if not mask.any():
            window = max(len(w) for w in self.windows)
            raise MlexportError(f"--score-from {score_from} leaves no scored position in windows of {window}; lower it")
        return mask


def make_windows(token_ids: list[int], window: int, max_tokens: int) -> Windows:
    if window < 8:
        raise MlexportError("--window must be at least 8 tokens")
    windows = []
    scored = 0
    for start in range(0, len(token_ids) - 1, window):
        chunk = token_ids[start : start + window]
        if len(chunk) < 8 or scored >= max_tokens:
            break
        chunk = chunk[: max_tokens - scored + 1]
        windows.append(chunk)
        scored += len(chunk) - 1
    if not windows:
        raise MlexportError("the corpus tokenizes to fewer than 8 tokens; pass a longer --corpus")
    return Windows(windows)


def every_position_logits(forward: Any, tokens: list[int], split: int) -> np.ndarray:
    """Logits [len(tokens), V] through ``forward(ids, start)``: the first ``split`` tokens as one prefill, the rest
    decoded one at a time through the cache.

    A runtime whose prefill returns the last position only (ExecuTorch's, as runners read it) decodes the earlier
    positions one by one first; the prefill then runs again from position 0, so the steps after it read the cache
    a prefill wrote, as in an app."""
    first = forward(tokens[:split], 0)
    rows = [first]
    if len(first) < split:
        rows = [forward([t], i) for i, t in enumerate(tokens[: split - 1])]
        rows.append(forward(tokens[:split], 0))
    rows += [forward([t], split + i) for i, t in enumerate(tokens[split:])]
    return np.concatenate(rows)


def run_artifact(runtime: Any, windows: Windows, progress: Progress | None = None) -> np.ndarray:
    """Logits [N, V] at every scored position through the artifact's runtime: prefill half, decode half."""
    out = []
    for w in windows.windows:
        out.append(every_position_logits(runtime.forward, w[:-1], max(1, len(w) // 2)))
        if progress:
            progress(len(w) - 1)
    return np.concatenate(out).astype(np.float32)


def run_torch(model: torch.nn.Module, windows: Windows, progress: Progress | None = None) -> np.ndarray:
    """Reference logits with the full-sequence, no-cache forward (independent of any cache logic)."""
    out = []
    with torch.no_grad():
        for w in windows.windows:
            logits = model(torch.tensor([w[:-1]]))
            out.append(logits[0].float().numpy())
            if progress:
                progress(len(w) - 1)
    return np.concatenate(out).astype(np.float32)


def fp32_reference(loaded: LoadedModel, max_context: int) -> torch.nn.Module:
    return build_decoder(loaded.spec, loaded.state_dict, max_context=max_context)


def quantized_reference(loaded: LoadedModel, manifest: dict[str, Any], max_context: int) -> torch.nn.Module:
    """PyTorch running the artifact's own quantization plan (torchao, eager), with the same quantizer's values
    (GPTQ re-runs on the recorded calibration text, or comes from the export's cache)."""
    from mlexport.quantize.calibrate import prepare
    from mlexport.quantize.torchao_map import apply_plan

    plan = QuantPlan.from_dict(manifest["quant_plan"])
    model = build_decoder(loaded.spec, loaded.state_dict, max_context=max_context)
    if plan.preset == "fp32":
        return model
    quantized = prepare(
        model, plan, loaded.source.get("sha256"), loaded.tokenizer_dir, source_grids=loaded.source_grids
    )
    from mlexport.exporters import profiles
    from mlexport.quantize.block_offsets import as_target_stores

    target = profiles().get(manifest.get("target", ""))
    return apply_plan(model, plan, as_target_stores(quantized, bool(target and target.stores_block_offsets)))


def compare(ref: np.ndarray, test: np.ndarray, targets: np.ndarray) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    tok = stats.per_token(ref, test, targets)
    return stats.summarize(tok), tok


def check_reference_matches(loaded: LoadedModel, manifest: dict[str, Any], directory: Path) -> None:
    """Refuse to compare an artifact with a reference of another model (a silent apples-to-oranges report)."""
    want = manifest.get("model", {}).get("sha256")
    have = loaded.source.get("sha256")
    if want and have and want != have:
        raise MlexportError(
            f"{directory} was exported from a model with sha256 {want[:12]}…, but --reference has {have[:12]}…; "
            "pass the model it was exported from"
        )
