"""Drift reports (report.json / report.md / report.html) and the gates CI exits on."""

from __future__ import annotations

import html
import operator
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mlexport.artifacts import write_bytes_atomic, write_json_atomic
from mlexport.errors import MlexportError

SCHEMA_VERSION = 1
LEVELS = ("total", "export", "quant")
_OPS = {"<=": operator.le, ">=": operator.ge, "<": operator.lt, ">": operator.gt, "==": operator.eq}


@dataclass
class Gate:
    level: str  # total | export | quant | delta (change against --baseline, total level)
    metric: str
    op: str
    value: float

    def __str__(self) -> str:
        prefix = "" if self.level == "total" else f"{self.level}."
        return f"{prefix}{self.metric}{self.op}{self.value:g}"


def parse_gates(text: str | None, table: dict[str, Any] | None = None) -> list[Gate]:
    """``"kld_mean<=0.05,same_top1>=0.9"`` (prefix export./quant./delta. for other levels), or a [gates] table."""
    specs = [s.strip() for s in (text or "").split(",") if s.strip()]
    for key, value in (table or {}).items():  # {"kld_mean": "<=0.05"} or {"kld_mean": {"max": 0.05}}
        if isinstance(value, dict):
            specs += [f"{key}<={value['max']}"] if "max" in value else []
            specs += [f"{key}>={value['min']}"] if "min" in value else []
        else:
            specs.append(f"{key}{value}")
    from mlexport.validate.stats import metric_names

    known = metric_names()
    gates = []
    for spec in specs:
        m = re.fullmatch(r"(?:(total|export|quant|delta)\.)?([\w.]+?)\s*(<=|>=|==|<|>)\s*(\S+)", spec)
        try:
            value = float(m.group(4)) if m else None
        except ValueError:
            value = None
        if m is None or value is None or value != value:
            raise MlexportError(f"bad gate {spec!r}; write it like kld_mean<=0.05 or export.max_abs<=1e-3")
        if m.group(2) not in known:
            raise MlexportError(f"gate {spec!r}: unknown metric {m.group(2)!r}; known: {', '.join(known)}")
        gates.append(Gate(m.group(1) or "total", m.group(2), m.group(3), value))
    return gates


def evaluate_gates(entry: dict[str, Any], gates: list[Gate]) -> list[dict[str, Any]]:
    results = []
    for gate in gates:
        values = entry.get("delta") if gate.level == "delta" else entry["levels"].get(gate.level)
        if values is None:
            results.append({"gate": str(gate), "passed": False, "reason": f"no {gate.level} values to gate on"})
            continue
        if gate.metric not in values:
            raise MlexportError(f"gate {gate}: unknown metric {gate.metric!r}; known: {', '.join(sorted(values))}")
        actual = values[gate.metric]
        ok = bool(_OPS[gate.op](actual, gate.value))
        results.append(
            {
                "gate": str(gate),
                "passed": ok,
                "actual": actual,
                "reason": None if ok else f"{gate} failed: {gate.metric} is {actual:.6g}",
            }
        )
    return results


def baseline_deltas(entry: dict[str, Any], baseline: dict[str, Any]) -> dict[str, float] | None:
    """Change of the total-level numbers against the same artifact (target + quant) in an older report."""
    for old in baseline.get("artifacts", []):
        if (old["target"], old["quant"]) == (entry["target"], entry["quant"]):
            cur, prev = entry["levels"]["total"], old["levels"]["total"]
            return {k: cur[k] - prev[k] for k in cur if isinstance(cur[k], float) and isinstance(prev.get(k), float)}
    return None


def reused_grids(plan: dict[str, Any], target: str | None = None) -> dict[str, Any] | None:
    """How much of the artifact is the source's own grid re-exported unchanged (e.g. GGUF Q4_1 blocks): their
    drift is the source's, not our quantizer's, and the report must say so. Core ML keeps a Q4_1 grid's 4-bit
    values and scales but rounds its block offsets to int8 (quantize/block_offsets.py): nearly, not exactly."""
    tensors = plan.get("tensors", {})
    reused = sorted(n for n, q in tensors.items() if q.get("method") == "source")
    if not reused:
        return None
    quantized = [n for n, q in tensors.items() if q.get("bits", 32) < 16 and not q.get("shares")]
    kinds = sorted({tensors[n].get("source") for n in reused})
    found = {"types": kinds, "tensors": len(reused), "of_quantized": len(quantized)}
    from mlexport.exporters import profiles

    profile = profiles().get(target)
    if profile and profile.stores_block_offsets and "Q4_1" in kinds:
        found["offsets"] = "int8 per row"
    return found


def histogram(kld: np.ndarray, bins: int = 30) -> dict[str, list[float]]:
    logk = np.log10(np.maximum(kld, 1e-8))
    counts, edges = np.histogram(logk, bins=bins, range=(-8, max(1.0, float(logk.max()))))
    return {"log10_edges": [float(e) for e in edges], "counts": [int(c) for c in counts]}


def per_position(kld: np.ndarray, positions: np.ndarray, bucket: int = 16) -> list[float]:
    """Mean KLD by position in the window: drift that grows along the KV cache shows up here."""
    out = []
    for start in range(0, int(positions.max()) + 1, bucket):
        sel = (positions >= start) & (positions < start + bucket)
        out.append(float(kld[sel].mean()) if sel.any() else 0.0)
    return out


def write_reports(report: dict[str, Any], out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out_dir / "report.json", report)
    write_bytes_atomic(out_dir / "report.md", render_markdown(report).encode())
    write_bytes_atomic(out_dir / "report.html", render_html(report).encode())


def _row(entry: dict[str, Any]) -> list[str]:
    t, e, q = (entry["levels"].get(k) or {} for k in LEVELS)
    gates = entry.get("gates") or []
    verdict = "—" if not gates else ("pass" if all(g["passed"] for g in gates) else "**FAIL**")
    return [
        entry["target"],
        entry["quant"],
        f"{entry['size_bytes'] / 1e6:.1f}",
        f"{t['kld_mean']:.4f} ± {t['kld_stderr']:.4f}",
        f"{t['kld_p99']:.4f}",
        f"{100 * t['same_top1']:.1f} ± {100 * t['same_top1_stderr']:.1f}",
        f"{t['ppl_ratio']:.3f}",
        f"{e.get('kld_mean', float('nan')):.2e}",
        f"{e.get('max_abs', float('nan')):.2e}",
        f"{q.get('kld_mean', float('nan')):.4f}",
        verdict,
    ]


HEADER = [
    "target",
    "quant",
    "MB",
    "KLD mean",
    "KLD p99",
    "same top-1 %",
    "PPL ratio",
    "export KLD",
    "export max-abs",
    "quant KLD",
    "gates",
]


def render_markdown(report: dict[str, Any]) -> str:
    lines = [
        f"### mlexport drift report: {report['reference']['source']}",
        "",
        f"{report['corpus']['scored_tokens']} scored tokens of `{report['corpus']['name']}` "
        f"(sha256 `{report['corpus']['sha256'][:12]}`), windows of {report['corpus']['window']} "
        "(half prefill, half KV-cache decode"
        + (f"; positions >= {report['corpus']['score_from']} scored" if report["corpus"].get("score_from") else "")
        + "). KLD = KL(fp32 reference ‖ artifact), per token; "
        "export = artifact vs PyTorch with the same quantized weights; quant = quantized PyTorch vs fp32.",
        "",
        "| " + " | ".join(HEADER) + " |",
        "|" + "---|" * len(HEADER),
    ]
    lines += ["| " + " | ".join(_row(e)) + " |" for e in report["artifacts"]]
    for e in report["artifacts"]:
        if e.get("source_grid_reused"):
            r = e["source_grid_reused"]
            head = f"**{e['name']}: {r['tensors']} of its {r['of_quantized']} quantized tensors re-export the source's"
            if r.get("offsets"):
                lines += [
                    "",
                    f"{head} own {'/'.join(r['types'])} grid** (the reference is that grid dequantized): its 4-bit "
                    f"values and scales unchanged, its block offsets rounded to {r['offsets']}. Their share of the "
                    "drift above is that rounding alone, not a property of mlexport's quantizers.",
                ]
            else:
                lines += [
                    "",
                    f"{head} own {'/'.join(r['types'])} grid unchanged** (lossless; the reference is that grid "
                    "dequantized). Their share of the drift above is zero by construction, not a property of "
                    "mlexport's quantizers.",
                ]
    notes = [n for e in report["artifacts"] for n in e.get("notes", [])]
    if notes:
        lines += ["", *[f"**Note:** {n}." for n in notes]]
    failures = [g["reason"] for e in report["artifacts"] for g in e.get("gates", []) if not g["passed"]]
    if failures:
        lines += ["", "**Gate failures:**", *[f"- {f}" for f in failures]]
    deltas = [(e, e["delta"]) for e in report["artifacts"] if e.get("delta")]
    if deltas:
        lines += ["", "Change against the baseline (total level):", ""]
        for e, d in deltas:
            lines.append(
                f"- {e['target']} {e['quant']}: KLD mean {d.get('kld_mean', 0):+.4f}, "
                f"same top-1 {100 * d.get('same_top1', 0):+.1f} pts, PPL ratio {d.get('ppl_ratio', 0):+.3f}"
            )
    return "\n".join(lines) + "\n"


def _svg_hist(hist: dict[str, list[float]], width: int = 360, height: int = 120) -> str:
    counts = hist["counts"]
    top = max(counts) or 1
    bw = width / len(counts)
    bars = "".join(
        f'<rect class="bar" x="{i * bw:.1f}" y="{height - 20 - (c / top) * (height - 30):.1f}" '
        f'width="{bw - 1:.1f}" height="{(c / top) * (height - 30):.1f}"/>'
        for i, c in enumerate(counts)
    )
    e = hist["log10_edges"]
    axis = (
        f'<text x="0" y="{height - 4}">1e{e[0]:.0f}</text><text x="{width - 30}" y="{height - 4}">1e{e[-1]:.0f}</text>'
    )
    return f'<svg class="hist" width="{width}" height="{height}">{bars}{axis}</svg>'


def _svg_line(values: list[float], width: int = 360, height: int = 120) -> str:
    if not values:
        return ""
    top = max(values) or 1.0
    step = width / max(len(values) - 1, 1)
    pts = " ".join(f"{i * step:.1f},{height - 20 - (v / top) * (height - 30):.1f}" for i, v in enumerate(values))
    return (
        f'<svg class="line" width="{width}" height="{height}"><polyline fill="none" stroke="#c33" '
        f'points="{pts}"/><text x="0" y="{height - 4}">pos 0</text>'
        f'<text x="{width - 80}" y="{height - 4}">max {top:.3g}</text></svg>'
    )


def render_html(report: dict[str, Any]) -> str:
    esc = html.escape
    head = "".join(f"<th>{esc(h)}</th>" for h in HEADER)
    rows = "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in _row(e)) + "</tr>" for e in report["artifacts"])
    plots = "".join(
        f'<div class="artifact"><h3>{esc(e["target"])} {esc(e["quant"])}</h3>'
        f"<figure><figcaption>KLD per token (log10 histogram)</figcaption>{_svg_hist(e['histogram'])}</figure>"
        f"<figure><figcaption>mean KLD by position in window</figcaption>{_svg_line(e['per_position'])}</figure>"
        "</div>"
        for e in report["artifacts"]
    )
    style = (
        "body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}td,th{border:1px solid #ccc;"
        "padding:4px 8px;text-align:right}.bar{fill:#36c}.artifact{display:flex;gap:2em;align-items:center}"
        "figure{margin:0}svg text{font-size:10px}"
    )
    corpus = report["corpus"]
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>mlexport drift report</title>"
        f"<style>{style}</style></head><body><h1>Drift report: {esc(str(report['reference']['source']))}</h1>"
        f"<p>{corpus['scored_tokens']} scored tokens of {esc(corpus['name'])} (sha256 {corpus['sha256'][:12]}).</p>"
        f"<table id='summary'><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>{plots}</body></html>"
    )
