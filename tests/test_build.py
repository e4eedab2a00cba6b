"""`mlexport build`: the matrix, incremental rebuilds, failure isolation, gates, shards and merge (tiny models)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tiny import llama_config, save_hf_dir
from typer.testing import CliRunner

from mlexport.build import load_config, merge, run_build, shard
from mlexport.cli import app
from mlexport.errors import MlexportError


def _config(tmp: Path, model_dir: Path, extra: str = "", gate: str = "kld_mean<=0.001,same_top1>=0.99") -> Path:
    text = f"""
[build]
out = "{tmp / "dist"}"
validate_tokens = 64
gate = "{gate}"

[defaults]
max_context = 64

[[models]]
name = "tiny"
source = "{model_dir}"
targets = ["executorch", "onnx"]
quants = ["fp32"]
{extra}
"""
    path = tmp / "mlexport.toml"
    path.write_text(text)
    return path


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("build") / "tiny-llama"
    save_hf_dir(directory, llama_config())
    return directory


@pytest.mark.slow
def test_rebuilds_only_what_changed(model_dir: Path, tmp_path: Path) -> None:
    cfg_path = _config(tmp_path, model_dir)
    first = run_build(load_config(cfg_path))
    assert first["passed"], first
    assert [(e["id"], e["status"], e["validation"]) for e in first["entries"]] == [
        ("tiny-executorch-fp32", "built", "ran"),
        ("tiny-onnx-fp32", "built", "ran"),
    ]
    et = first["entries"][0]
    assert {"model.pte", "manifest.json", "tokenizer.json"} <= {f["path"] for f in et["files"]}
    assert all(len(f["sha256"]) == 64 for f in et["files"])
    assert et["drift"]["kld_mean"] < 1e-3 and et["drift"]["passed"] and et["quant_plan"]["preset"] == "fp32"
    assert "tools" in first and (tmp_path / "dist" / "drift.md").read_text().count("| tiny-") == 2
    on_disk = json.loads((tmp_path / "dist" / "manifest.json").read_text())
    assert on_disk["entries"][1]["id"] == "tiny-onnx-fp32"

    again = run_build(load_config(cfg_path))
    assert [(e["status"], e["validation"]) for e in again["entries"]] == [("cached", "cached")] * 2

    (tmp_path / "dist" / "tiny-executorch-fp32" / "model.pte").write_bytes(b"damaged")  # not what was recorded
    repaired = run_build(load_config(cfg_path))
    assert [e["status"] for e in repaired["entries"]] == ["built", "cached"]

    override = '\n[[override]]\ntarget = "onnx"\noptions = { max_context = 48 }\n'
    changed = run_build(load_config(_config(tmp_path, model_dir, override)))
    assert [e["status"] for e in changed["entries"]] == ["cached", "built"]
    assert json.loads((tmp_path / "dist" / "tiny-onnx-fp32" / "manifest.json").read_text())["max_context"] == 48


def test_a_failing_entry_keeps_the_others(model_dir: Path, tmp_path: Path) -> None:
    broken = (
        '\n[[models]]\nname = "broken"\nsource = "/nonexistent/model"\ntargets = ["executorch"]\nquants = ["fp32"]\n'
    )
    cfg_path = _config(tmp_path, model_dir, broken)
    result = CliRunner().invoke(app, ["build", "-c", str(cfg_path), "--no-validate"])
    assert result.exit_code == 1, result.output
    manifest = json.loads((tmp_path / "dist" / "manifest.json").read_text())
    status = {e["id"]: e["status"] for e in manifest["entries"]}
    assert status == {"broken-executorch-fp32": "failed", "tiny-executorch-fp32": "built", "tiny-onnx-fp32": "built"}
    assert "does not exist" in manifest["entries"][0]["error"] or "not found" in manifest["entries"][0]["error"]
    assert not manifest["passed"]


def test_a_failed_gate_fails_the_build(model_dir: Path, tmp_path: Path) -> None:
    cfg_path = _config(tmp_path, model_dir, gate="kld_mean<=-1")
    cfg = load_config(cfg_path)
    cfg.entries = cfg.entries[:1]
    manifest = run_build(cfg)
    assert not manifest["passed"] and manifest["entries"][0]["status"] == "built"
    assert "gate" in (tmp_path / "dist" / "drift.md").read_text()


def test_shards_and_merge(model_dir: Path, tmp_path: Path) -> None:
    cfg = load_config(_config(tmp_path, model_dir))
    parts = []
    for k in (1, 2):
        cfg.out = tmp_path / f"dist-{k}"
        cfg.validate = False
        parts.append(run_build(cfg, f"{k}/2"))
    assert [len(p["entries"]) for p in parts] == [1, 1]
    merged = merge([tmp_path / "dist-1" / "manifest.json", tmp_path / "dist-2" / "manifest.json"], tmp_path / "all")
    assert merged["shards"] == ["1/2", "2/2"] and merged["passed"]
    assert [e["artifact"] for e in merged["entries"]] == ["../dist-1/tiny-executorch-fp32", "../dist-2/tiny-onnx-fp32"]
    with pytest.raises(MlexportError, match="in two shards"):
        merge([tmp_path / "dist-1" / "manifest.json"] * 2, tmp_path / "bad")


def test_config_errors_name_the_fix(tmp_path: Path, model_dir: Path) -> None:
    cases = [
        ('\n[[override]]\ntarget = "coreml"\noptions = { max_context = 8 }\n', "matches no entry"),
        ("\n[[override]]\noptions = { group_sise = 8 }\n", "unknown option 'group_sise'"),
        ('\n[[override]]\noptions = { max_context = "big" }\n', "wrong type"),
    ]
    for extra, message in cases:
        with pytest.raises(MlexportError, match=message):
            load_config(_config(tmp_path, model_dir, extra))
    bad = tmp_path / "bad.toml"
    bad.write_text('[[models]]\nname = "m"\ntargets = ["tflite"]\nquants = ["4bit"]\n')
    with pytest.raises(MlexportError, match="unknown target 'tflite'"):
        load_config(bad)
    with pytest.raises(MlexportError, match="does not exist"):
        load_config(tmp_path / "missing.toml")
    entries = load_config(_config(tmp_path, model_dir)).entries
    with pytest.raises(MlexportError, match="K/N"):
        shard(entries, "3/2")


def test_example_config_parses() -> None:
    cfg = load_config(Path(__file__).parents[1] / "examples" / "mlexport.toml")
    assert [e.id for e in cfg.entries] == ["demo-coreml-4bit", "demo-executorch-4bit", "demo-onnx-4bit"]
    assert cfg.entries[0].options["max_context"] == 1024 and cfg.validate and cfg.gate


def test_workflow_runs_shards_then_merge() -> None:
    yaml = pytest.importorskip("yaml")
    flow = yaml.safe_load((Path(__file__).parents[1] / ".github" / "workflows" / "artifacts.yml").read_text())
    build, join = flow["jobs"]["build"], flow["jobs"]["merge"]
    assert len(build["strategy"]["matrix"]["shard"]) == flow["env"]["SHARDS"]
    steps = " ".join(str(s.get("run", "")) for s in build["steps"])
    assert "mlexport build -c" in steps and "--shard ${{ matrix.shard }}/$SHARDS" in steps
    assert "GITHUB_STEP_SUMMARY" in steps
    assert join["needs"] == "build" and any("mlexport build merge" in str(s.get("run")) for s in join["steps"])
    assert (Path(__file__).parents[1] / flow["env"]["CONFIG"]).is_file()


@pytest.mark.slow
def test_builds_the_newer_architectures_on_every_target(tmp_path: Path) -> None:
    """A Gemma 3 checkpoint (the family furthest from Llama) through the same build file as any Llama: each target
    exports at fp32 and passes a tight drift gate (Core ML through the MIL interpreter). R1 and Gemma each match
    transformers on every target in their own tests; this checks the build's path for a newer family."""
    from test_gemma3 import gemma_config

    save_hf_dir(tmp_path / "gemma", gemma_config())
    models = f"""
[[models]]
name = "gemma"
source = "{tmp_path / "gemma"}"
targets = ["executorch", "onnx", "coreml"]
quants = ["fp32"]
"""
    path = tmp_path / "mlexport.toml"
    gate = "kld_mean<=0.0001,same_top1>=0.99"
    path.write_text(f'[build]\nout = "{tmp_path / "dist"}"\nvalidate_tokens = 48\ngate = "{gate}"\n')
    path.write_text(path.read_text() + "\n[defaults]\nmax_context = 64\n" + models)
    manifest = run_build(load_config(path))
    assert manifest["passed"], [(e["id"], e.get("error"), e.get("drift")) for e in manifest["entries"]]
    assert sorted(e["id"] for e in manifest["entries"]) == sorted(
        f"gemma-{t}-fp32" for t in ("coreml", "executorch", "onnx")
    )
