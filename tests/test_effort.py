"""--effort: each level runs on a tiny model and the manifest records what it did; the progress a user reads."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from tiny import llama_config, save_hf_dir

from mlexport.pipeline import ExportOptions, run_export, validate_options


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("tiny") / "llama"
    save_hf_dir(directory, llama_config())
    return directory


def _manifest(tiny_dir: Path, out: Path, effort: str, **extra: object) -> dict:
    opts = ExportOptions(model=str(tiny_dir), quant="4bit", out=out, max_context=64, effort=effort, **extra)
    artifact = run_export(opts)[0]
    return json.loads((artifact / "manifest.json").read_text())


@pytest.mark.parametrize(
    "effort",
    [
        *(pytest.param(e, marks=pytest.mark.slow) for e in ("fast", "light")),
        "default",
        *(pytest.param(e, marks=pytest.mark.slow) for e in ("high", "max")),
    ],
)
def test_each_effort_level_runs_and_is_recorded(
    effort: str, tiny_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """fast: round to nearest, nothing calibrated. default: GPTQ on DEFAULT_GPTQ (4,096 text tokens, reference
    pass) and the sensitivity pass; above LIGHT_ABOVE_PARAMS ("light" here) the light GPTQ recipe and no
    sensitivity pass. high: the full recipe (recorded as no recipe). max: high plus the end-to-end tuning."""
    from mlexport.quantize.calibrate import DEFAULT_GPTQ, FULL_GPTQ, LIGHT_GPTQ, SELF_GENERATED, TEXT_CALIBRATION

    import mlexport.pipeline as pipeline

    if effort == "light":
        monkeypatch.setattr(pipeline, "LIGHT_ABOVE_PARAMS", 0)  # as if the tiny model were a 1B one
    manifest = _manifest(tiny_dir, tmp_path / effort, "default" if effort == "light" else effort)
    plan = manifest["quant_plan"]
    body = [q for k, q in plan["tensors"].items() if k.startswith("layers.") and q["bits"] == 4]
    assert manifest["effort"] == ("default" if effort == "light" else effort)
    names = [s["name"] for s in manifest["stages"]]
    if effort == "fast":
        assert body and all(q["method"] == "rtn" for q in body)
        assert not plan.get("calibration") and not plan.get("tune") and not plan.get("smoothing")
        assert "sensitivity" not in names
    elif effort == "light":
        assert body and all(q["method"] == "gptq" for q in body)
        assert plan["gptq"] == LIGHT_GPTQ
        assert plan["calibration"]["name"] == TEXT_CALIBRATION and not plan.get("tune")
        assert "sensitivity" not in names and not plan.get("mixed") and not manifest["warnings"]
    else:
        recipe = DEFAULT_GPTQ if effort == "default" else FULL_GPTQ
        assert plan.get("gptq") == (DEFAULT_GPTQ if effort == "default" else None)
        if recipe["self_generated"]:
            sampled = plan["calibration"]["self_generated"]
            assert sampled == {**SELF_GENERATED, "sequences": recipe["self_generated"]}
            assert len(plan["calibration"]["generated_ids"]) == recipe["self_generated"]
        else:
            assert plan["calibration"]["name"] == TEXT_CALIBRATION
            assert plan["calibration"]["tokens"] == recipe["tokens"]
        assert "sensitivity" in names and plan["mixed"]["sensitivity_sum"] is not None
        assert bool(plan["tune"]) == (effort == "max")


def test_onnx_default_runs_the_same_recipe(tiny_dir: Path, tmp_path: Path) -> None:
    """One default recipe for every target: ONNX calibrates like ExecuTorch, untuned."""
    from mlexport.quantize.calibrate import DEFAULT_GPTQ

    plan = _manifest(tiny_dir, tmp_path / "onnx", "default", target="onnx")["quant_plan"]
    assert plan["gptq"] == DEFAULT_GPTQ and plan["calibration"]["tokens"] == 4096 and not plan.get("tune")


def test_coreml_default_calibrates_on_the_full_recipe(monkeypatch: pytest.MonkeyPatch) -> None:
    """Core ML's only GPTQ tensor at the default is the tie, so the full recipe costs little there and keeps its
    continuation bar; the other targets run DEFAULT_GPTQ, and every target goes light above LIGHT_ABOVE_PARAMS."""
    import torch
    from mlexport.quantize.calibrate import DEFAULT_GPTQ, LIGHT_GPTQ

    import mlexport.pipeline as pipeline

    model = torch.nn.Linear(8, 8)
    default = pipeline.ExportOptions(effort="default")
    assert pipeline.calibration_recipe(default, model, "coreml") is None
    assert pipeline.calibration_recipe(default, model, "executorch") == DEFAULT_GPTQ
    assert pipeline.calibration_recipe(default, model, "onnx") == DEFAULT_GPTQ
    assert pipeline.calibration_recipe(pipeline.ExportOptions(effort="high"), model, "executorch") is None
    monkeypatch.setattr(pipeline, "LIGHT_ABOVE_PARAMS", 0)  # as if the model were a 1B one
    assert pipeline.calibration_recipe(default, model, "coreml") == LIGHT_GPTQ


def test_unknown_effort_is_refused_before_any_work() -> None:
    from mlexport.errors import MlexportError

    with pytest.raises(MlexportError, match="--effort"):
        validate_options(ExportOptions(effort="slow"))


def test_progress_lines_become_a_determinate_bar_with_an_eta() -> None:
    """A step that reports counts shows "GPTQ: block 12/30" with a bar and an ETA; each finished step gets a tick
    and its time."""
    from rich.console import Console

    from mlexport.cli import StepProgress, parse_progress

    assert parse_progress("progress:GPTQ: block 12/30") == ("GPTQ: block", 12, 30)
    assert parse_progress("progress:loading") == ("loading", 0, None)
    stream = io.StringIO()
    console = Console(file=stream, force_terminal=True, width=120, record=True)
    with StepProgress(console) as status:
        status("GPTQ: calibrating block by block")
        for i in range(1, 4):
            status(f"progress:GPTQ: block {i}/30")
        status.bar.refresh()
        task = status.bar.tasks[-1]
        assert (task.total, task.completed, task.description) == (30, 3, "GPTQ: block")
        assert status.bar.columns[-1].__class__.__name__ == "TimeRemainingColumn"
        status("lowering")
        assert status.bar.tasks[-1].total is None  # a new step without counts: back to a spinner
    text = console.export_text()
    assert "GPTQ: block" in text and "3/30" in text and "ETA 0:00" in text
    assert "✓ GPTQ: calibrating block by block" in text and "✓ lowering" in text


def test_every_export_flag_reaches_export_options(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each CLI flag lands in its own ExportOptions field, as given (options are passed by keyword)."""
    from typer.testing import CliRunner

    import mlexport.pipeline as pipeline
    from mlexport.cli import app

    seen: dict[str, ExportOptions] = {}

    def fake_run(opts: ExportOptions, status: object = None) -> list[Path]:
        seen["opts"] = opts
        return []

    monkeypatch.setattr(pipeline, "run_export", fake_run)
    args = ["export", "--model", "m", "--target", "coreml", "--quant", "4bit", "-o", str(tmp_path / "o")]
    args += ["--force", "--max-context", "128", "--group-size", "64", "--tie-mode", "auto", "--accuracy-level", "0"]
    args += ["--quantizer", "search", "--asymmetric", "--size-budget", "70", "--reuse-source-grid"]
    args += ["--tie-int8-rows", "500", "--no-tune-scales", "--effort", "max"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    opts = seen["opts"]
    expected = {
        "model": "m",
        "target": "coreml",
        "quant": "4bit",
        "out": tmp_path / "o",
        "force": True,
        "max_context": 128,
        "group_size": 64,
        "tie_mode": "auto",
        "accuracy_level": 0,
        "quantizer": "search",
        "asymmetric": True,
        "size_budget_mb": 70.0,
        "reuse_source_grid": True,
        "tie_int8_rows": 500,
        "tune_scales": False,
        "effort": "max",
    }
    assert {k: getattr(opts, k) for k in expected} == expected


def test_build_config_takes_every_export_option() -> None:
    """`mlexport build`'s TOML options cover every ExportOptions field but the ones each entry names itself."""
    from dataclasses import fields

    from mlexport.build import OPTION_TYPES

    per_entry = {"model", "target", "quant", "out", "force"}
    assert set(OPTION_TYPES) == {f.name for f in fields(ExportOptions)} - per_entry
