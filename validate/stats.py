"""Drift statistics between a reference and a test model, per scored token, as llama.cpp's --kl-divergence defines.

Inputs are logits [N, V] for the same N positions plus the true next token of each. Everything is computed in
float64 from log-softmax, so the numbers do not depend on how the runtimes scale their logits.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

PERCENTILES = (50, 90, 95, 99, 99.9)


def log_softmax(logits: np.ndarray) -> np.ndarray:
    x = logits.astype(np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


# Rows per float64 pass: each row is independent, and a 262k-token vocabulary makes 2,048 rows ~4 GB per copy.
ROWS_PER_CHUNK = 128


def per_token(ref_logits: np.ndarray, test_logits: np.ndarray, targets: np.ndarray) -> dict[str, np.ndarray]:
    """Per-position KL(ref||test), top-1 agreement, true-token probabilities and NLLs, cosine and error energy;
    computed a chunk of rows at a time, so memory stays flat in the vocabulary's size."""
    chunks = [
        _per_token(
            ref_logits[i : i + ROWS_PER_CHUNK], test_logits[i : i + ROWS_PER_CHUNK], targets[i : i + ROWS_PER_CHUNK]
        )
        for i in range(0, len(targets), ROWS_PER_CHUNK)
    ]
    return {key: np.concatenate([c[key] for c in chunks]) for key in chunks[0]}


def _per_token(ref_logits: np.ndarray, test_logits: np.ndarray, targets: np.ndarray) -> dict[str, np.ndarray]:
    lr, lt = log_softmax(ref_logits), log_softmax(test_logits)
    pr = np.exp(lr)
    kld = np.maximum((pr * (lr - lt)).sum(-1), 0.0)
    idx = np.arange(len(targets))
    r64, t64 = ref_logits.astype(np.float64), test_logits.astype(np.float64)
    cosine = (r64 * t64).sum(-1) / np.maximum(np.linalg.norm(r64, axis=-1) * np.linalg.norm(t64, axis=-1), 1e-30)
    return {
        "kld": kld,
        "same_top1": (ref_logits.argmax(-1) == test_logits.argmax(-1)).astype(np.float64),
        "p_ref": np.exp(lr[idx, targets]),
        "p_test": np.exp(lt[idx, targets]),
        "nll_ref": -lr[idx, targets],
        "nll_test": -lt[idx, targets],
        "cosine": cosine,
        "signal": (r64**2).sum(-1),
        "noise": ((r64 - t64) ** 2).sum(-1),
        "max_abs": np.abs(r64 - t64).max(-1),
    }


def _spread(values: np.ndarray) -> dict[str, float]:
    n = len(values)
    out = {
        "mean": float(values.mean()),
        "stderr": float(values.std(ddof=1) / math.sqrt(n)) if n > 1 else 0.0,
    }
    for p in PERCENTILES:
        out["median" if p == 50 else f"p{p:g}"] = float(np.percentile(values, p))
    out["max"] = float(values.max())
    return out


def summarize(tok: dict[str, np.ndarray]) -> dict[str, Any]:
    """The statistics a report shows and gates read (flat names, so a gate can name any of them)."""
    n = len(tok["kld"])
    kld = _spread(tok["kld"])
    same = float(tok["same_top1"].mean())
    dp = tok["p_test"] - tok["p_ref"]
    dp_pct = {("dp_median" if p == 50 else f"dp_p{p:g}"): float(np.percentile(dp, p)) for p in (1, 5, 50, 95, 99)}
    noise = tok["noise"].sum()
    return {
        "tokens": n,
        "kld_mean": kld["mean"],
        "kld_stderr": kld["stderr"],
        "kld_median": kld["median"],
        "kld_p90": kld["p90"],
        "kld_p95": kld["p95"],
        "kld_p99": kld["p99"],
        "kld_p99.9": kld["p99.9"],
        "kld_max": kld["max"],
        "same_top1": same,
        "same_top1_stderr": math.sqrt(same * (1 - same) / n) if n else 0.0,
        "dp_rms": float(np.sqrt((dp**2).mean())),
        **dp_pct,
        "ppl_ref": float(np.exp(tok["nll_ref"].mean())),
        "ppl_test": float(np.exp(tok["nll_test"].mean())),
        "ppl_ratio": float(np.exp(tok["nll_test"].mean() - tok["nll_ref"].mean())),
        "cosine_mean": float(tok["cosine"].mean()),
        "cosine_min": float(tok["cosine"].min()),
        "sqnr_db": float(10 * np.log10(tok["signal"].sum() / noise)) if noise > 0 else float("inf"),
        "max_abs": float(tok["max_abs"].max()),
    }


def metric_names() -> list[str]:
    """Every statistic ``summarize`` reports, hence every name a gate may use."""
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((4, 8)).astype(np.float32)
    return sorted(summarize(per_token(logits, logits + 0.1, np.array([0, 1, 2, 3]))))
