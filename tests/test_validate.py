"""Drift statistics against hand-computed cases, reports, gates and exit codes with a damaged artifact."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch
from mlexport.validate import stats
from mlexport.validate.report import parse_gates
from tiny import llama_config, save_hf_dir

from mlexport.corpus import default_corpus, load_corpus
from mlexport.pipeline import ExportOptions, run_export


def test_statistics_hand_computed() -> None:
    # Reference p = [0.25, 0.75]; test q = [0.5, 0.5]; true token 1.
    ref = np.array([[0.0, math.log(3.0)]])
    test = np.array([[0.0, 0.0]])
    tok = stats.per_token(ref, test, np.array([1]))
    kl = 0.25 * math.log(0.25 / 0.5) + 0.75 * math.log(0.75 / 0.5)
    assert tok["kld"][0] == pytest.approx(kl, rel=1e-12)
    assert tok["same_top1"][0] == 0.0
    assert tok["p_test"][0] - tok["p_ref"][0] == pytest.approx(-0.25)
    s = stats.summarize(tok)
    assert s["ppl_ratio"] == pytest.approx(0.75 / 0.5)
    assert s["max_abs"] == pytest.approx(math.log(3.0))
    assert s["cosine_min"] == pytest.approx(0.0, abs=1e-12)  # [0, ln3] . [0, 0] = 0
    assert s["sqnr_db"] == pytest.approx(0.0)  # all of the signal is error


def test_statistics_aggregates() -> None:
    rng = np.random.default_rng(0)
    ref = rng.normal(size=(400, 7))
    test = ref + rng.normal(scale=0.3, size=ref.shape)
    targets = rng.integers(0, 7, size=400)
    tok = stats.per_token(ref, test, targets)
    s = stats.summarize(tok)
    assert s["kld_mean"] == pytest.approx(tok["kld"].mean())
    assert s["kld_stderr"] == pytest.approx(tok["kld"].std(ddof=1) / 20)
    assert s["kld_p99"] == pytest.approx(np.percentile(tok["kld"], 99))
    same = (ref.argmax(1) == test.argmax(1)).mean()
    assert s["same_top1"] == pytest.approx(same)
    assert s["same_top1_stderr"] == pytest.approx(math.sqrt(same * (1 - same) / 400))
    dp = tok["p_test"] - tok["p_ref"]
    assert s["dp_rms"] == pytest.approx(np.sqrt((dp**2).mean()))
    snr = (ref**2).sum() / ((ref - test) ** 2).sum()
    assert s["sqnr_db"] == pytest.approx(10 * np.log10(snr))
    same_model = stats.summarize(stats.per_token(ref, ref, targets))
    assert same_model["kld_max"] == 0 and same_model["same_top1"] == 1 and same_model["ppl_ratio"] == 1


def test_gate_parsing() -> None:
    gates = parse_gates("kld_mean<=0.05, same_top1>=0.9,export.max_abs<=1e-3", {"ppl_ratio": {"max": 1.1}})
    assert [str(g) for g in gates] == ["kld_mean<=0.05", "same_top1>=0.9", "export.max_abs<=0.001", "ppl_ratio<=1.1"]
    from mlexport.errors import MlexportError

    with pytest.raises(MlexportError, match="bad gate"):
        parse_gates("kld_mean=<0.05")


def test_default_corpus_is_real_stdlib_prose() -> None:
    text, info = load_corpus(None)
    assert text == default_corpus() and len(text) > 50_000
    assert "argument" in text and info["sha256"] and info["name"] == "python-stdlib-docstrings"


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    root = tmp_path_factory.mktemp("val")
    save_hf_dir(root / "model", llama_config())
    good = run_export(ExportOptions(model=str(root / "model"), quant="fp32", out=root / "good", max_context=64))[0]
    # A wrong export: one fp32 weight of the .pte perturbed in place, its manifest listing the new bytes (a file
    # that no longer matches its manifest is refused before validation; test_safety covers that).
    import shutil

    from mlexport.sources import load_model

    bad = root / "bad"
    shutil.copytree(good, bad)
    weight = load_model(str(root / "model")).state_dict["layers.0.mlp.down_proj.weight"].contiguous().numpy()
    data = bytearray((bad / "model.pte").read_bytes())
    needle = weight.tobytes()
    at = data.find(needle)
    assert at >= 0, "weight bytes not found in the .pte"
    damaged = (weight + 0.5).astype(np.float32).tobytes()
    data[at : at + len(damaged)] = damaged
    (bad / "model.pte").write_bytes(bytes(data))
    from mlexport.artifacts import describe_files

    manifest = json.loads((bad / "manifest.json").read_text())
    manifest["files"] = describe_files(bad)
    (bad / "manifest.json").write_text(json.dumps(manifest))
    return root / "model", good, bad


def _validate(args: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "mlexport.cli", "validate", *args], capture_output=True, text=True)


@pytest.mark.slow
def test_validate_reports_and_gates(artifacts: tuple[Path, Path, Path], tmp_path: Path) -> None:
    model, good, bad = artifacts
    gate = "export.max_abs<=1e-3,kld_mean<=0.01"
    result = _validate(
        [
            str(good),
            str(bad),
            "--reference",
            str(model),
            "-o",
            str(tmp_path / "r"),
            "--max-tokens",
            "200",
            "--window",
            "48",
            "--gate",
            gate,
        ]
    )
    assert result.returncode == 1, result.stderr
    failures = [line for line in result.stderr.splitlines() if line.startswith("gate failed")]
    assert failures and all("bad:" in line for line in failures), result.stderr
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    assert report["schema_version"] == 1 and report["corpus"]["scored_tokens"] == 200
    by_name = {a["name"]: a for a in report["artifacts"]}
    assert by_name["good"]["levels"]["export"]["max_abs"] <= 1e-3  # fp32 export error
    assert all(g["passed"] for g in by_name["good"]["gates"])
    assert by_name["bad"]["levels"]["export"]["kld_mean"] > by_name["good"]["levels"]["export"]["kld_mean"] * 1e3
    md = (tmp_path / "r" / "report.md").read_text()
    assert md.count("| executorch | fp32 |") == 2 and "**FAIL**" in md

    class Collect(HTMLParser):
        def __init__(self) -> None:
            super().__init__()
            self.tags: list[tuple[str, dict]] = []

        def handle_starttag(self, tag: str, attrs: list) -> None:
            self.tags.append((tag, dict(attrs)))

    parser = Collect()
    parser.feed((tmp_path / "r" / "report.html").read_text())
    tags = [t for t, _ in parser.tags]
    assert ("table", {"id": "summary"}) in parser.tags
    assert tags.count("tr") == 3  # header + one row per artifact
    assert tags.count("svg") == 4 and tags.count("rect") >= 2 and "polyline" in tags

    # A baseline: the same numbers again give zero deltas, and a delta gate passes.
    again = _validate(
        [
            str(good),
            "--reference",
            str(model),
            "-o",
            str(tmp_path / "r2"),
            "--max-tokens",
            "200",
            "--window",
            "48",
            "--baseline",
            str(tmp_path / "r" / "report.json"),
            "--gate",
            "delta.kld_mean<=0.001",
        ]
    )
    assert again.returncode == 0, again.stderr
    report2 = json.loads((tmp_path / "r2" / "report.json").read_text())
    assert abs(report2["artifacts"][0]["delta"]["kld_mean"]) < 1e-9


@pytest.mark.slow
def test_score_from_scores_only_late_positions(artifacts: tuple[Path, Path, Path], tmp_path: Path) -> None:
    """llama.cpp's protocol scores each chunk's second half; --score-from reproduces it."""
    model, good, _ = artifacts
    args = [str(good), "--reference", str(model), "-o", str(tmp_path / "r"), "--max-tokens", "200", "--window", "48"]
    result = _validate([*args, "--score-from", "24"])
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    # windows of 48 tokens score positions 0..46; 200 tokens = four full windows and a 13-token tail
    assert report["corpus"]["scored_tokens"] == 4 * 23 and report["corpus"]["score_from"] == 24
    assert "positions >= 24 scored" in (tmp_path / "r" / "report.md").read_text()
    too_late = _validate([*args, "--score-from", "48"])
    assert too_late.returncode == 2 and "lower it" in too_late.stderr


def test_reference_mismatch_is_refused(artifacts: tuple[Path, Path, Path], tmp_path: Path) -> None:
    _, good, _ = artifacts
    save_hf_dir(tmp_path / "other", llama_config(), seed=1)
    result = _validate([str(good), "--reference", str(tmp_path / "other"), "-o", str(tmp_path / "r")])
    assert result.returncode == 2 and "pass the model it was exported from" in result.stderr


def test_torch_seed_unaffected() -> None:
    torch.manual_seed(0)
    assert torch.rand(1).item() == pytest.approx(0.4962566)


def test_an_artifact_quantized_by_other_code_is_said_so(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """validate recomputes the quantized reference with its own quantizer: when the artifact's values came from
    other code, its export level also measures that difference, and the report must say so."""
    from mlexport.quantize.calibrate import CACHED_CODE, UNTUNED_CODE, code_digest
    from mlexport.validate import report
    from mlexport.validate.pipeline import _other_quantizer_code

    untuned, tuned = {"tensors": {}}, {"tensors": {}, "tune": {"method": "e2e-scales"}}
    ours = {"quant": "4bit", "quant_plan": untuned, "quantizer_code": code_digest(UNTUNED_CODE)}
    assert _other_quantizer_code(ours, tmp_path) == []
    # an untuned plan's values do not depend on the tuning code, a tuned plan's do (as the cache keys count them)
    tuned_ours = {"quant": "4bit", "quant_plan": tuned, "quantizer_code": code_digest(CACHED_CODE)}
    assert _other_quantizer_code(tuned_ours, tmp_path) == []
    assert _other_quantizer_code({**tuned_ours, "quantizer_code": code_digest(UNTUNED_CODE)}, tmp_path)
    assert _other_quantizer_code({**ours, "quant": "fp32", "quantizer_code": "older"}, tmp_path) == []
    assert _other_quantizer_code({"quant": "4bit", "quant_plan": untuned}, tmp_path) == []  # before the record
    notes = _other_quantizer_code({**ours, "quantizer_code": "older"}, tmp_path / "demo-onnx-4bit")
    assert len(notes) == 1 and "demo-onnx-4bit was quantized by other mlexport code (older" in notes[0]
    corpus = {"name": "c", "sha256": "0" * 64, "window": 8, "scored_tokens": 8}
    monkeypatch.setattr(report, "_row", lambda _entry: [])  # the table row is tested above
    md = report.render_markdown({"reference": {"source": "demo"}, "corpus": corpus, "artifacts": [{"notes": notes}]})
    assert "**Note:** demo-onnx-4bit was quantized by other mlexport code" in md
