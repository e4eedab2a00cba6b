"""``mlexport validate``: artifacts + reference model + corpus -> report files and gate verdicts."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from mlexport.validate import drift, report
from mlexport.validate.runtimes import open_runtime

from mlexport.artifacts import quantizer_code, tool_versions
from mlexport.corpus import load_corpus
from mlexport.errors import MlexportError
from mlexport.sources import load_model
from mlexport.tokenizer import Tokenizer

Say = Callable[[str], None]


def run_validation(
    artifacts: list[Path],
    reference: str,
    out_dir: Path,
    corpus: Path | None = None,
    max_tokens: int = 2048,
    window: int = 256,
    gates: list[report.Gate] | None = None,
    baseline: Path | None = None,
    say: Say | None = None,
    advance: Callable[[int], None] | None = None,
    score_from: int = 0,
) -> tuple[dict[str, Any], list[str]]:
    """Measure every artifact against the reference; return the report and the one-line gate failures.

    ``score_from`` scores only positions from that index of each window on: llama.cpp's perplexity tool scores
    the second half of each 512-token chunk (``window=512, score_from=255``), so its published drift figures
    compare with ours only under the same protocol."""
    say = say or (lambda _t: None)
    opened = [open_runtime(a) for a in artifacts]  # fail on a bad artifact before the slow work
    old = _read_baseline(baseline)
    say(f"loading reference {reference!r}")
    loaded = load_model(reference)
    for _, directory, manifest in opened:
        drift.check_reference_matches(loaded, manifest, directory)
    text, corpus_info = load_corpus(corpus)
    tokenizer = Tokenizer(opened[0][1])
    window = min(window, min(rt.max_context for rt, _, _ in opened))
    windows = drift.make_windows(tokenizer.encode(text), window, max_tokens)
    scored = windows.scored_mask(score_from)
    targets, positions = windows.targets[scored], windows.positions()[scored]
    say(f"fp32 PyTorch reference over {windows.scored} tokens")
    fp32 = drift.run_torch(drift.fp32_reference(loaded, window), windows, advance)[scored]
    quant_refs: dict[str, np.ndarray] = {}
    entries = []
    failures: list[str] = []
    for runtime, directory, manifest in opened:
        plan_key = json.dumps(manifest["quant_plan"], sort_keys=True)
        notes = _other_quantizer_code(manifest, directory)
        for note in notes:
            say(f"warning: {note}")
        if plan_key not in quant_refs:
            say(f"quantized PyTorch reference ({manifest['quant']})")
            model = drift.quantized_reference(loaded, manifest, window)
            quant_refs[plan_key] = drift.run_torch(model, windows, advance)[scored]
        qref = quant_refs[plan_key]
        say(f"running {directory.name} through {manifest['target']} (teacher-forced, prefill + decode)")
        started = time.perf_counter()
        logits = drift.run_artifact(runtime, windows, advance)[scored]
        seconds = time.perf_counter() - started
        total, tok = drift.compare(fp32, logits, targets)
        export_level, _ = drift.compare(qref, logits, targets)
        quant_level, _ = drift.compare(fp32, qref, targets)
        entry: dict[str, Any] = {
            "name": directory.name,
            "path": str(directory),
            "target": manifest["target"],
            "quant": manifest["quant"],
            "size_bytes": sum(f["bytes"] for f in manifest["files"] if not f["path"].startswith("tokenizer")),
            "runtime_seconds": round(seconds, 2),
            "levels": {"total": total, "export": export_level, "quant": quant_level},
            "source_grid_reused": report.reused_grids(manifest["quant_plan"], manifest["target"]),
            "notes": notes,
            "histogram": report.histogram(tok["kld"]),
            "per_position": report.per_position(tok["kld"], positions),
        }
        if old is not None:
            entry["delta"] = report.baseline_deltas(entry, old)
        entry["gates"] = report.evaluate_gates(entry, gates or [])
        failures += [f"{directory.name}: {g['reason']}" for g in entry["gates"] if not g["passed"]]
        entries.append(entry)
    result = {
        "schema_version": report.SCHEMA_VERSION,
        "created_unix": int(time.time()),
        "reference": {"source": reference, "sha256": loaded.source.get("sha256")},
        "corpus": {**corpus_info, "scored_tokens": int(scored.sum()), "window": window, "score_from": score_from},
        "gates": [str(g) for g in gates or []],
        "baseline": str(baseline) if baseline else None,
        "tools": tool_versions(),
        "artifacts": entries,
    }
    report.write_reports(result, out_dir)
    return result, failures


def _read_baseline(path: Path | None) -> dict[str, Any] | None:
    if path is None:
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        raise MlexportError(f"--baseline {path} is not a readable report.json; pass one written by validate") from None
    if data.get("schema_version") != report.SCHEMA_VERSION:
        raise MlexportError(
            f"--baseline {path} has schema {data.get('schema_version')}, expected {report.SCHEMA_VERSION}"
        )
    return data


def _other_quantizer_code(manifest: dict[str, Any], directory: Path) -> list[str]:
    """Say so when the artifact's values came from other quantizer code than this mlexport's: the quantized
    PyTorch reference is then recomputed with this version's (GPTQ and any tuning run again), and the "export"
    level measures the difference between the two quantizers along with the exporter."""
    recorded, ours = manifest.get("quantizer_code"), quantizer_code(manifest["quant_plan"])
    if manifest["quant"] not in ("4bit", "8bit") or not recorded or recorded == ours:
        return []
    return [
        f"{directory.name} was quantized by other mlexport code ({recorded}, this one {ours}): its "
        "quantized reference is recomputed with this version, and its export level also measures what changed; "
        "re-export it with this version for an exporter-only export level"
    ]
