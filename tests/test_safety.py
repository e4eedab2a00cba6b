"""Reliability and security: no code from a model's folder, no deleted inputs, one-line errors, corruption caught.

Every bad input gets exit code 2 and one ``error:`` line that names the fix, and no file outside the output
directory changes.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from test_sources import run_cli, write_tiny_gguf
from tiny import llama_config, save_hf_dir

ROOT = Path(__file__).resolve().parents[1]


def _error(code: int, text: str, *needles: str) -> None:
    assert code == 2, text
    lines = [line for line in text.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), text
    for needle in needles:
        assert needle in text, text


def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def hf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("safety") / "hf"
    save_hf_dir(d, llama_config())
    return d


@pytest.fixture(scope="module")
def artifacts(hf: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One fp32 artifact per target that runs here (ExecuTorch, ONNX), exported once for the module."""
    from mlexport.pipeline import ExportOptions, run_export

    root = tmp_path_factory.mktemp("artifacts")
    return {
        t: run_export(ExportOptions(model=str(hf), target=t, quant="fp32", out=root / t, max_context=32))[0]
        for t in ("executorch", "onnx")
    }


# ------------------------------------------------------------------------------------------------ security


def test_gguf_tokenizer_comes_from_the_gguf_only(hf: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """Planted tokenizer code and a foreign tokenizer.json beside a GGUF are never read, let alone run."""
    d = tmp_path / "d"
    d.mkdir()
    write_tiny_gguf(d / "model.gguf", hf)
    marker = tmp_path / "PWNED"
    (d / "tokenization_evil.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    (d / "tokenizer_config.json").write_text(
        json.dumps({"auto_map": {"AutoTokenizer": ["tokenization_evil.EvilTokenizer", None]}})
    )
    foreign = json.loads((hf / "tokenizer.json").read_text())
    foreign["model"]["vocab"] = {f"x{k}": v for k, v in foreign["model"]["vocab"].items()}
    (d / "tokenizer.json").write_text(json.dumps(foreign))
    code, text = run_cli(
        ["export", "--model", str(d / "model.gguf"), "--quant", "fp32", "-o", str(tmp_path / "o")], capsys
    )
    assert code == 0, text
    assert not marker.exists()
    shipped = json.loads((tmp_path / "o" / "tokenizer.json").read_text())
    assert not any(k.startswith("x") for k in list(shipped["model"]["vocab"])[:50])


def test_force_never_deletes_the_source_or_unrelated_files(hf: Path, tmp_path: Path, capsys) -> None:
    victim = tmp_path / "victim"
    shutil.copytree(hf, victim)
    before = _snapshot(victim)
    code, text = run_cli(["export", "--model", str(victim), "-o", str(victim), "--force"], capsys)
    _error(code, text, "overlaps the model source")
    nested = tmp_path / "victim2"
    shutil.copytree(hf, nested / "models" / "m")
    (nested / "notes.txt").write_text("mine")
    code, text = run_cli(["export", "--model", str(nested / "models" / "m"), "-o", str(nested), "--force"], capsys)
    _error(code, text, "overlaps the model source")
    inside = tmp_path / "victim3"
    shutil.copytree(hf, inside)
    code, text = run_cli(["export", "--model", str(inside), "-o", str(inside / "out"), "--force"], capsys)
    _error(code, text, "overlaps the model source")
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    code, text = run_cli(["export", "--model", str(hf), "-o", str(mine), "--force"], capsys)
    _error(code, text, "not an mlexport artifact")
    assert _snapshot(victim) == before and (nested / "notes.txt").read_text() == "mine"
    assert (mine / "thesis.tex").read_text() == "years of work"


def test_artifacts_respect_the_umask(artifacts: dict[str, Path]) -> None:
    mask = os.umask(0)
    os.umask(mask)
    for artifact in artifacts.values():
        assert artifact.stat().st_mode & 0o777 == 0o777 & ~mask
        for path in artifact.rglob("*"):
            want = (0o777 if path.is_dir() else 0o666) & ~mask
            assert path.stat().st_mode & 0o777 == want, path


# ----------------------------------------------------------------------------------- one-line errors


@pytest.mark.parametrize("fault", ["transposed", "wrong_shape", "missing", "extra_layer", "fewer_layers"])
def test_weights_that_disagree_with_the_config(fault: str, hf: Path, tmp_path: Path, capsys) -> None:
    from safetensors.torch import load_file, save_file

    d = tmp_path / "m"
    shutil.copytree(hf, d)
    sd = load_file(str(d / "model.safetensors"))
    cfg = json.loads((d / "config.json").read_text())
    key = "model.layers.0.mlp.up_proj.weight"
    needle = "layers.0.mlp.up_proj.weight"
    if fault == "transposed":
        sd[key] = sd[key].T.contiguous()
        needle = "transposed"
    elif fault == "wrong_shape":
        sd[key] = sd[key][:-8].contiguous()
    elif fault == "missing":
        del sd[key]
    elif fault == "extra_layer":
        cfg["num_hidden_layers"] = 1
        needle = "num_hidden_layers"
    else:
        cfg["num_hidden_layers"] = 3
        needle = "layers.2"
    save_file(sd, str(d / "model.safetensors"))
    (d / "config.json").write_text(json.dumps(cfg))
    code, text = run_cli(["inspect", str(d)], capsys)
    _error(code, text, needle)


def test_gguf_without_tokenizer(hf: Path, tmp_path: Path, capsys) -> None:
    import gguf

    writer = gguf.GGUFWriter(str(tmp_path / "bare.gguf"), "llama")
    writer.add_block_count(1)
    writer.add_embedding_length(64)
    writer.add_tensor("token_embd.weight", torch.zeros(8, 64).numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    code, text = run_cli(["inspect", str(tmp_path / "bare.gguf")], capsys)
    _error(code, text, "tokenizer", "convert_hf_to_gguf")


def test_output_under_a_file_fails_before_loading(hf: Path, tmp_path: Path, capsys) -> None:
    (tmp_path / "afile.txt").write_text("x")
    code, text = run_cli(["export", "--model", "fx/does-not-matter", "-o", str(tmp_path / "afile.txt" / "sub")], capsys)
    _error(code, text, "is a file")


@pytest.mark.parametrize("gate", ["kld_mean<=1.2.3", "kld_mean<=e", "foo>=1"])
def test_bad_gates_fail_before_validation(gate: str, artifacts: dict[str, Path], tmp_path: Path, capsys) -> None:
    report = tmp_path / "report"
    code, text = run_cli(
        ["validate", str(artifacts["onnx"]), "--reference", "nope", "-o", str(report), "--gate", gate], capsys
    )
    _error(code, text, "gate")
    assert not report.exists()


@pytest.mark.parametrize("size", ["0", "-32", "7", "100000"])
def test_group_size_must_be_a_power_of_two(size: str, tmp_path: Path, capsys) -> None:
    code, text = run_cli(
        ["export", "--model", "nope-not-loaded", "--group-size", size, "-o", str(tmp_path / "o")], capsys
    )
    _error(code, text, "--group-size")


def test_missing_relative_folder_is_not_a_hub_download(tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "fx").mkdir()
    code, text = run_cli(["inspect", "fx/nope"], capsys)
    _error(code, text, "does not exist")
    assert "Hub" not in text


@pytest.mark.parametrize(
    ("change", "needle"),
    [({"model_type": None}, '"model_type"'), ({"architectures": ["Gemma3ForCausalLM"]}, "Gemma3ForCausalLM")],
)
def test_config_type_fields(change: dict, needle: str, hf: Path, tmp_path: Path, capsys) -> None:
    d = tmp_path / "m"
    shutil.copytree(hf, d)
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(change)
    cfg = {k: v for k, v in cfg.items() if v is not None}
    (d / "config.json").write_text(json.dumps(cfg))
    code, text = run_cli(["inspect", str(d)], capsys)
    _error(code, text, needle)


def test_legacy_pytorch_bin_loads(hf: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    from mlexport.sources import load_model

    d = tmp_path / "legacy"
    d.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(hf / name, d / name)
    torch.save(load_file(str(hf / "model.safetensors")), d / "pytorch_model.bin", _use_new_zipfile_serialization=False)
    loaded = load_model(str(d))
    reference = load_model(str(hf))
    assert all(torch.equal(loaded.state_dict[k], v) for k, v in reference.state_dict.items())


def test_run_rejects_bad_counts_and_empty_prompts(artifacts: dict[str, Path], capsys) -> None:
    code, text = run_cli(["run", str(artifacts["onnx"]), "--prompt", "hi", "-n", "-3"], capsys)
    _error(code, text, "--max-new-tokens")
    code, text = run_cli(["run", str(artifacts["onnx"]), "--raw", "--prompt", ""], capsys)
    _error(code, text, "--prompt")


def test_nan_weights_are_refused_by_name(hf: Path, tmp_path: Path, capsys) -> None:
    from safetensors.torch import load_file, save_file

    d = tmp_path / "m"
    shutil.copytree(hf, d)
    sd = load_file(str(d / "model.safetensors"))
    sd["model.layers.1.self_attn.v_proj.weight"][3, 5] = float("inf")
    save_file(sd, str(d / "model.safetensors"))
    code, text = run_cli(["export", "--model", str(d), "--quant", "fp32", "-o", str(tmp_path / "o")], capsys)
    _error(code, text, "layers.1.self_attn.v_proj.weight", "NaN/Inf")
    assert not (tmp_path / "o").exists()


# ----------------------------------------------------------------------------- corruption, interruption


def _flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    ("target", "name", "where"),
    [("executorch", "model.ptd", 0.5), ("executorch", "model.pte", 0.98), ("onnx", "model.onnx.data", 0.5)],
)
def test_a_damaged_artifact_does_not_run(
    target: str, name: str, where: float, artifacts: dict[str, Path], hf: Path, tmp_path: Path, capsys
) -> None:
    copy = tmp_path / "a"
    shutil.copytree(artifacts[target], copy)
    path = copy / name
    _flip(path, int(path.stat().st_size * where))
    for command in (
        ["run", str(copy), "--prompt", "hi", "-n", "2"],
        ["bench", str(copy)],
        ["validate", str(copy), "--reference", str(hf), "-o", str(tmp_path / "r")],
    ):
        code, text = run_cli(command, capsys)
        _error(code, text, "re-export")
    if target == "executorch":
        app = tmp_path / "app"
        shutil.copytree(ROOT / "targets" / "android", app)
        before = _snapshot(app)
        code, text = run_cli(["bundle", "android", "--app", str(app), str(copy)], capsys)
        _error(code, text, "re-export")
        assert _snapshot(app) == before
    code, text = run_cli(["inspect", str(copy), "--json"], capsys)
    assert code == 0, text
    damaged = json.loads(text)["damaged_files"]
    assert [d["path"] for d in damaged] == [name] and damaged[0]["found_sha256"] != damaged[0]["sha256"]


def _export_process(hf: Path, out: Path, *flags: str) -> subprocess.Popen:
    cmd = [
        sys.executable,
        "-m",
        "mlexport.cli",
        "export",
        "--model",
        str(hf),
        "--quant",
        "fp32",
        "--target",
        "onnx",
        "--max-context",
        "32",
        "-o",
        str(out),
        *flags,
    ]
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_sigterm_cleans_up_and_stale_temps_are_removed(hf: Path, tmp_path: Path) -> None:
    out = tmp_path / "o"
    proc = _export_process(hf, out)
    deadline = time.time() + 120
    while not list(tmp_path.glob(".o.tmp-*")) and time.time() < deadline:
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    text = proc.communicate(timeout=120)[0]
    assert proc.returncode == 143 and "aborted" in text and "Traceback" not in text, text
    assert not list(tmp_path.glob(".o.*")) and not out.exists()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / f".o.tmp-{dead.pid}-abc").mkdir()  # what a SIGKILLed export leaves
    (tmp_path / f".o.old-{dead.pid}").mkdir()
    proc = _export_process(hf, out)
    assert proc.wait(timeout=300) == 0
    assert not list(tmp_path.glob(".o.*")) and (out / "manifest.json").is_file()


@pytest.mark.parametrize("force", [False, True])
def test_two_exports_racing_to_one_output(force: bool, hf: Path, tmp_path: Path) -> None:
    out = tmp_path / "o"
    flags = ("--force",) if force else ()
    procs = [_export_process(hf, out, *flags) for _ in range(2)]
    results = [(p.wait(timeout=600), p.stdout.read()) for p in procs]
    codes = sorted(code for code, _ in results)
    text = "\n".join(t for _, t in results)
    assert "Traceback" not in text and "OSError" not in text, text
    if force:
        assert codes in ([0, 0], [0, 2]), text
    else:
        assert codes == [0, 2] and "--force" in text, text
    assert not list(tmp_path.glob(".o.*")) and (out / "manifest.json").is_file()


# --------------------------------------------------------------------------------------------------- fuzz


def _variants(data: bytes, header_only: bool) -> list[bytes]:
    """Truncations and bit flips. A source file's weights carry no checksum, so a flip there is only caught if it
    breaks a value (NaN/Inf): source files get their headers flipped; artifacts, checked by sha256, anywhere."""
    n = len(data)
    cuts = [data[:k] for k in (0, 8, n // 3, n - 1)]
    flips = []
    for where in (4, 64) if header_only else (4, 64, n // 2, n - 8):
        b = bytearray(data)
        b[min(where, n - 1)] ^= 0x5A
        flips.append(bytes(b))
    return cuts + flips


def test_fuzzed_inputs_get_one_line_errors(hf: Path, artifacts: dict[str, Path], tmp_path: Path, capsys) -> None:
    """Truncated and bit-flipped safetensors, GGUF, .pte, .ptd and ONNX files: exit 2 and one error line, never a
    traceback; nothing outside the output directory changes."""
    write_tiny_gguf(tmp_path / "good.gguf", hf)
    cases = [("safetensors", hf / "model.safetensors"), ("gguf", tmp_path / "good.gguf")]
    cases += [("pte", artifacts["executorch"] / "model.pte"), ("ptd", artifacts["executorch"] / "model.ptd")]
    cases += [("onnx", artifacts["onnx"] / "model.onnx")]
    for kind, original in cases:
        for i, data in enumerate(_variants(original.read_bytes(), header_only=kind in ("safetensors", "gguf"))):
            if data == original.read_bytes():
                continue
            work = tmp_path / f"{kind}{i}"
            if kind == "safetensors":
                shutil.copytree(hf, work)
                (work / "model.safetensors").write_bytes(data)
                model = str(work)
            elif kind == "gguf":
                work.mkdir()
                (work / "m.gguf").write_bytes(data)
                model = str(work / "m.gguf")
            else:
                shutil.copytree(original.parent, work)
                (work / original.name).write_bytes(data)
                model = None
            before = _snapshot(tmp_path)
            if model is not None:
                commands = [["inspect", model], ["export", "--model", model, "--quant", "fp32", "-o", str(work / "o")]]
            else:
                commands = [["run", str(work), "--prompt", "hi", "-n", "2"], ["bench", str(work)]]
            for command in commands:
                code, text = run_cli(command, capsys)
                assert code == 2 and "Traceback" not in text, (kind, i, command, text)
                lines = [line for line in text.strip().splitlines() if line.strip()]
                assert lines[-1].startswith("error:"), (kind, i, command, text)
            after = {k: v for k, v in _snapshot(tmp_path).items() if not k.startswith(f"{work.name}/o/")}
            assert after == before, (kind, i)
