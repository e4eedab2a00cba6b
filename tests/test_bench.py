"""`mlexport bench`: the host protocol on tiny artifacts, adb against recorded outputs, arm64 numerics under qemu."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from mlexport.validate import adb, arm64
from mlexport.validate.bench import (
    BenchSettings,
    artifact_size_mb,
    bench_host,
    bench_manifest,
    decode_bytes_per_token,
    parse_device,
    run_bench,
)
from tiny import llama_config, save_hf_dir
from typer.testing import CliRunner

from mlexport.cli import app
from mlexport.errors import MlexportError
from mlexport.pipeline import ExportOptions, run_export

DATA = Path(__file__).parent / "data" / "adb"
QUICK = BenchSettings(prompt_tokens=12, gen_tokens=6, repeat=2, warmup=1)


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bench")
    save_hf_dir(root / "llama", llama_config())
    out = {}
    for name, target, quant in [("et4", "executorch", "4bit"), ("onnx4", "onnx", "4bit")]:
        options = ExportOptions(model=str(root / "llama"), target=target, quant=quant, out=root / name, max_context=64)
        out[name] = run_export(options)[0]
    return out


@pytest.mark.slow
def test_host_protocol_on_executorch_and_onnx(artifacts: dict[str, Path]) -> None:
    results = run_bench([artifacts["et4"], artifacts["onnx4"]], "host", QUICK)
    runtimes = [r.runtime for r in results]
    assert runtimes[:2] == ["executorch", "onnxruntime"]
    for r in results:
        assert len(r.rounds) == QUICK.repeat  # the warm-up round is dropped
        summary = r.summary()
        for metric in ("load_s", "ttft_s", "prefill_tok_s", "decode_tok_s"):
            assert 0 < summary[metric]["min"] <= summary[metric]["median"] <= summary[metric]["p90"]
        assert r.peak_rss_mb > r.baseline_rss_mb > 0  # measured in the artifact's own process
        assert r.size_mb > 0
        # the roofline: weights plus the cache at the mean decode position, at the measured tok/s
        line = r.roofline
        assert line["bandwidth_gb_s"] > 0 and line["fraction"] > 0
        assert line["achieved_gb_s"] == pytest.approx(line["bytes_per_token"] * summary["decode_tok_s"]["median"] / 1e9)


def test_decode_reads_the_weights_and_the_cache_up_to_the_position(artifacts: dict[str, Path]) -> None:
    _, manifest = bench_manifest(artifacts["et4"])
    spec = manifest["model"]["spec"]
    per_position = sum(2 * spec["n_kv_heads"][b] * spec["head_dim"] * 4 for b in spec["layer_map"])  # fp32 cache
    at_10, at_20 = (decode_bytes_per_token(manifest, p) for p in (10, 20))
    assert at_20["kv_bytes"] == 2 * at_10["kv_bytes"] == 20 * per_position
    assert 0 < at_10["weight_bytes"] <= artifact_size_mb(manifest) * 1e6
    assert decode_bytes_per_token({**manifest, "peer": True}, 10) is None  # a rival's: no spec to count from


def test_long_protocol_needs_the_context(artifacts: dict[str, Path]) -> None:
    """The long protocol is refused before the short one spends its time."""
    args = ["bench", str(artifacts["et4"]), "--long", "--prompt-tokens", "8", "--gen-tokens", "4"]
    shown = CliRunner().invoke(app, args)
    assert isinstance(shown.exception, MlexportError) and "= 978 exceeds the artifact's context of 64" in str(
        shown.exception
    )


def test_genai_uses_the_same_protocol(artifacts: dict[str, Path]) -> None:
    pytest.importorskip("onnxruntime_genai", reason="onnxruntime-genai is the optional [genai] extra")
    result = bench_host(artifacts["onnx4"], "onnxruntime-genai", QUICK)
    assert result.summary()["decode_tok_s"]["median"] > 0
    assert result.settings == bench_host(artifacts["onnx4"], "onnxruntime", QUICK).settings


@pytest.mark.slow
def test_a_rivals_pte_runs_under_the_same_protocol(artifacts: dict[str, Path], tmp_path: Path) -> None:
    """A directory with a model.pte and no manifest (how a peer's export looks) is timed the same way."""
    peer = tmp_path / "peer"
    peer.mkdir()
    for name in ("model.pte", "model.ptd"):
        shutil.copy(artifacts["et4"] / name, peer / name)
    with pytest.raises(MlexportError, match="pass --tokenizer DIR"):
        run_bench([peer], "host", QUICK)
    (result,) = run_bench([peer], "host", QUICK, tokenizer=artifacts["et4"])
    assert result.quant == "peer" and result.runtime == "executorch" and result.summary()["decode_tok_s"]["min"] > 0
    with pytest.raises(MlexportError, match="is not an artifact"):
        run_bench([tmp_path], "host", QUICK)


@pytest.mark.slow
def test_cli_table_json_and_plot(artifacts: dict[str, Path], tmp_path: Path) -> None:
    args = ["bench", str(artifacts["et4"]), "--prompt-tokens", "8", "--gen-tokens", "4", "--repeat", "1"]
    shown = CliRunner().invoke(app, [*args, "--plot", str(tmp_path / "b.svg")])
    assert shown.exit_code == 0, shown.output
    assert "decode tok/s" in shown.output and "et4" in shown.output
    assert (tmp_path / "b.svg").read_text().startswith("<svg")
    listed = CliRunner().invoke(app, [*args, "--json"])
    rows = json.loads(listed.stdout[listed.stdout.index("[") :])
    assert rows[0]["runtime"] == "executorch" and rows[0]["summary"]["decode_tok_s"]["median"] > 0


def test_bad_requests_are_one_line_errors(artifacts: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(arm64, "ready", lambda: None)  # a fresh machine: the artifact's error still comes first
    with pytest.raises(MlexportError, match="exceeds the artifact's context of 64"):
        run_bench([artifacts["et4"]], "host", BenchSettings(prompt_tokens=60, gen_tokens=10))
    with pytest.raises(MlexportError, match="not one of host"):
        parse_device("phone")
    with pytest.raises(MlexportError, match="does not run executorch"):
        run_bench([artifacts["et4"]], "host", QUICK, runtime="onnxruntime")
    with pytest.raises(MlexportError, match="--device qemu-arm64 runs executorch artifacts; .* is onnx"):
        run_bench([artifacts["onnx4"]], "qemu-arm64", QUICK)
    assert parse_device("adb:R58M12ABCDE") == ("adb", "R58M12ABCDE")


@pytest.mark.skipif(sys.platform == "darwin", reason="on macOS --device macos runs Core ML for real")
def test_macos_device_needs_a_mac(artifacts: dict[str, Path]) -> None:
    with pytest.raises(MlexportError, match="needs a Mac"):
        run_bench([artifacts["et4"]], "macos", QUICK)


# ---------------------------------------------------------------- adb: recorded real outputs


def test_adb_devices_parsing() -> None:
    assert adb.parse_devices((DATA / "devices_none.txt").read_text()) == []
    pixel = adb.parse_devices((DATA / "devices_pixel.txt").read_text())
    assert [(d.serial, d.state, d.model) for d in pixel] == [("XXXXXXXXXXXXXX", "device", "Pixel_4a")]
    mixed = adb.parse_devices((DATA / "devices_mixed.txt").read_text())
    assert [d.serial for d in mixed] == ["ce11182b8452d0070b", "10.21.100.53:5555"]
    assert adb.choose_device(mixed, "10.21.100.53:5555").model == "Android_SDK_built_for_x86"


@pytest.mark.parametrize(
    ("fixture", "serial", "message"),
    [
        ("devices_none.txt", None, "no Android device attached"),
        ("devices_mixed.txt", None, "pick one with --device adb:SERIAL"),
        ("devices_unauthorized.txt", None, "accept the USB debugging prompt"),
        ("devices_pixel.txt", "0123", "no Android device 0123 attached"),
    ],
)
def test_adb_device_choice_errors(fixture: str, serial: str | None, message: str) -> None:
    with pytest.raises(MlexportError, match=message):
        adb.choose_device(adb.parse_devices((DATA / fixture).read_text()), serial)


def test_llama_main_stats_parsing() -> None:
    s24 = (DATA / "llama_main_s24.log").read_text()
    m = adb.metrics_from_stats(adb.parse_observer(s24), s24)
    # The runner's own report in the same log: load 2.277 s, first token 0.164 s, 85.37 and 52.68 tok/s.
    assert m["load_s"] == pytest.approx(2.277)
    assert m["ttft_s"] == pytest.approx(0.164)
    assert m["prefill_tok_s"] == pytest.approx(85.365854)
    assert m["decode_tok_s"] == pytest.approx(52.682927)
    assert "peak_rss_mb" not in m  # that build logged no RSS lines
    phone = (DATA / "llama_main_android_rss.log").read_text()
    m = adb.metrics_from_stats(adb.parse_observer(phone), phone)
    assert m["decode_tok_s"] == pytest.approx(39.296794) and m["load_s"] == pytest.approx(3.926)
    assert m["peak_rss_mb"] == pytest.approx(1223.152344 * 1.048576)
    with pytest.raises(MlexportError, match="no PyTorchObserver"):
        adb.parse_observer("Segmentation fault\n")


def test_adb_command_construction(tmp_path: Path) -> None:
    files = [tmp_path / "model.pte", tmp_path / "model.ptd", tmp_path / "tokenizer.json"]
    remote = adb.remote_dir(tmp_path / "demo executorch")
    assert remote == "/data/local/tmp/mlexport/demo_executorch"
    cmds = adb.push_commands("adb", "SER1", files, tmp_path / "llama_main", remote)
    assert cmds[0] == ["adb", "-s", "SER1", "shell", "mkdir", "-p", remote]
    assert cmds[1] == ["adb", "-s", "SER1", "push", str(files[0]), f"{remote}/model.pte"]
    assert cmds[-1] == ["adb", "-s", "SER1", "shell", "chmod", "755", f"{remote}/llama_main"]
    run = adb.run_command("adb", "SER1", remote, "llama_main", "It's a test", 200, 4, True, "round-0.log")
    assert run[:4] == ["adb", "-s", "SER1", "shell"]
    script = run[4]
    assert script.startswith(f"cd {remote} && ./llama_main --model_path=model.pte --tokenizer_path=tokenizer.json")
    assert "--seq_len=200" in script and "--data_paths=model.ptd" in script and "--cpu_threads=4" in script
    assert "'--prompt=It'\"'\"'s a test'" in script  # quoted for the device shell
    assert script.endswith("> round-0.log 2>&1; echo mlexport-exit=$?")


def test_adb_without_a_device_is_a_clean_error(artifacts: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    """With the real adb (if installed) and no phone, or with no adb at all: one line that says what to do."""
    if shutil.which("adb") is None:
        with pytest.raises(MlexportError, match="adb not found"):
            run_bench([artifacts["et4"]], "adb", QUICK)
        return
    try:
        with pytest.raises(MlexportError, match="no Android device attached"):
            run_bench([artifacts["et4"]], "adb", QUICK)
    finally:
        subprocess.run(["adb", "kill-server"], capture_output=True)


# ---------------------------------------------------------------- emulated arm64


def _qemu_toolchain() -> arm64.Toolchain:
    """Build the runner once (apt-get needs root; the wheels come from the package index)."""
    if sys.platform != "linux":
        pytest.skip("qemu-user runs on Linux only")
    try:
        return arm64.setup()
    except MlexportError as exc:
        if "missing" in str(exc) and "sudo" in str(exc):
            pytest.skip(f"cannot install the qemu toolchain here: {exc}")
        raise


@pytest.mark.slow
def test_qemu_arm64_logits_match_the_host(artifacts: dict[str, Path]) -> None:
    _qemu_toolchain()
    (result,) = run_bench([artifacts["et4"]], "qemu-arm64", BenchSettings(prompt_tokens=12, gen_tokens=6))
    n = result.numerics
    # one prefill and five decode steps, each returning the last position (what runners read)
    assert result.emulated and n["calls"] == 6 and n["rows"] == 6
    assert n["same_argmax"] == 1.0
    assert n["max_abs_diff"] <= 1e-5 * max(1.0, n["max_abs_logit"])  # float rounding, not a kernel bug


def test_qemu_schedule_round_trip(tmp_path: Path) -> None:
    schedule = [(0, [5, 6, 7]), (3, [8])]
    arm64.write_schedule(schedule, tmp_path / "s.bin")
    import numpy as np

    assert np.fromfile(tmp_path / "s.bin", "<i8").tolist() == [2, 0, 3, 5, 6, 7, 3, 1, 8]


@pytest.mark.skipif(sys.platform != "darwin", reason="Core ML prediction (MLModel with a state) needs macOS 15+")
def test_macos_times_coreml(tmp_path: Path) -> None:
    save_hf_dir(tmp_path / "llama", llama_config())
    options = ExportOptions(model=str(tmp_path / "llama"), target="coreml", quant="fp16", out=tmp_path / "cm")
    artifact = run_export(options)[0]
    (result,) = run_bench([artifact], "macos", QUICK)
    assert result.runtime == "coreml" and result.summary()["decode_tok_s"]["median"] > 0


def test_qemu_setup_without_tools_or_root_names_the_command(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(arm64.shutil, "which", lambda _tool: None)
    monkeypatch.setattr(arm64.os, "geteuid", lambda: 1000)
    with pytest.raises(MlexportError, match="sudo apt-get install qemu-user-static g\\+\\+-aarch64-linux-gnu patchelf"):
        arm64._install_packages(lambda _: None)


def test_qemu_bench_before_setup_is_a_clean_error(artifacts: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(arm64, "ready", lambda: None)
    with pytest.raises(MlexportError, match="run `mlexport setup qemu-arm64` first"):
        run_bench([artifacts["et4"]], "qemu-arm64", QUICK)
