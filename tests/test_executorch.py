"""ExecuTorch export on tiny models: parity with eager, every Linear quantized, stock runner compatibility."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from mlexport.quantize import plan_quantization
from mlexport.quantize.calibrate import TEXT_CALIBRATION
from mlexport.quantize.torchao_map import apply_plan, is_quantized
from mlexport.validate.drift import every_position_logits
from mlexport.validate.runtimes import open_runtime
from tiny import VOCAB, llama_config, random_state_dict, save_hf_dir

from mlexport.generate import generate
from mlexport.model import build_decoder
from mlexport.pipeline import ExportOptions, run_export, stored_bytes
from mlexport.sources import load_model

TOKENS = [int(t) for t in torch.randint(3, VOCAB, (14,), generator=torch.Generator().manual_seed(5))]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("tiny") / "llama"
    save_hf_dir(directory, llama_config())
    return directory


@pytest.fixture(scope="module")
def ls_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    cfg = llama_config(
        architectures=["MobileLLMForCausalLM"], model_type="mobilellm", share_embedding=True, layer_sharing=True
    )
    cfg.pop("tie_word_embeddings")
    directory = tmp_path_factory.mktemp("tiny") / "ls"
    save_hf_dir(directory, cfg, fmt="bin")
    return directory


def _export(model_dir: Path, out: Path, quant: str, size_budget_mb: float | None = None) -> Path:
    opts = ExportOptions(model=str(model_dir), quant=quant, out=out, max_context=64, size_budget_mb=size_budget_mb)
    return run_export(opts)[0]


def _budget_over_all_4bit(model_dir: Path, slack: float) -> float:
    """An explicit mixed-precision cap: the default 1.25% buys no 8-bit tensor on a model this small."""
    loaded = load_model(str(model_dir))
    model = build_decoder(loaded.spec, loaded.state_dict, max_context=64)
    plan = plan_quantization(model, "4bit", 32, "shared8", True, "gptq")
    return stored_bytes(model, plan, "executorch")["total"] * (1 + slack) / 1e6


def _eager_reference(model_dir: Path) -> np.ndarray:
    loaded = load_model(str(model_dir))
    model = build_decoder(loaded.spec, loaded.state_dict, max_context=64)
    with torch.no_grad():
        return model(torch.tensor([TOKENS])).numpy()[0]


def _pte_logits(artifact: Path) -> np.ndarray:
    """Prefill 9 tokens, then decode the rest one by one: both the prefill and the KV-cache paths."""
    runtime, _, _ = open_runtime(artifact)
    return every_position_logits(runtime.forward, TOKENS, 9)


@pytest.mark.parametrize("which", ["tiny", pytest.param("ls", marks=pytest.mark.slow)])
def test_fp32_pte_matches_eager(which: str, tiny_dir: Path, ls_dir: Path, tmp_path: Path) -> None:
    """fp32 parity; for MobileLLM-LS this is the cache-vs-no-cache check at every decode step."""
    model_dir = tiny_dir if which == "tiny" else ls_dir
    artifact = _export(model_dir, tmp_path / "fp32", "fp32")
    diff = np.abs(_pte_logits(artifact) - _eager_reference(model_dir)).max()
    assert diff <= 1e-3, diff
    # A prefill returns what runners read, the last position: no head work or logits buffer for the others.
    runtime, _, manifest = open_runtime(artifact)
    assert runtime.forward(TOKENS[:9], 0).shape[0] == 1 and manifest["delegation"]["logits"] == "last position"


@pytest.mark.slow
def test_fp16_pte_tracks_eager(tiny_dir: Path, tmp_path: Path) -> None:
    artifact = _export(tiny_dir, tmp_path / "fp16", "fp16")
    diff = np.abs(_pte_logits(artifact) - _eager_reference(tiny_dir)).max()
    assert diff <= 1e-2, diff  # fp16 weights and activations against the fp32 reference


def test_every_linear_quantized_with_valid_groups() -> None:
    """Widths that 32 does not divide get the largest valid group, recorded; nothing stays fp32 silently."""
    from mlexport.spec import ModelSpec

    spec = ModelSpec(
        name="odd",
        arch="llama",
        vocab_size=VOCAB,
        dim=64,
        head_dim=16,
        n_heads=[4, 4],
        n_kv_heads=[2, 2],
        ffn_dim=[80, 72],
        layer_map=[0, 1],
    )
    model = build_decoder(spec, random_state_dict(spec), max_context=32)
    plan = plan_quantization(model, "4bit", group_size=32)
    assert plan.tensors["layers.0.mlp.down_proj.weight"].group_size == 16  # 80 = 5 * 16
    assert plan.tensors["layers.1.mlp.down_proj.weight"].group_size is None  # 72: no power-of-two group >= 16
    assert any("layers.1.mlp.down_proj" in note for note in plan.notes)
    apply_plan(model, plan)
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert linears and all(is_quantized(m.weight) for m in linears)
    assert is_quantized(model.embed_tokens.weight)


@pytest.mark.slow
def test_4bit_export_manifest_and_stock_runner(tiny_dir: Path, tmp_path: Path) -> None:
    import json

    artifact = _export(tiny_dir, tmp_path / "q4", "4bit", _budget_over_all_4bit(tiny_dir, 0.05))
    manifest = json.loads((artifact / "manifest.json").read_text())
    assert manifest["quant"] == "4bit" and manifest["target"] == "executorch"
    assert {f["path"] for f in manifest["files"]} >= {"model.pte", "model.ptd", "tokenizer.json"}
    assert all(len(f["sha256"]) == 64 and f["bytes"] > 0 for f in manifest["files"])
    tensors = manifest["quant_plan"]["tensors"]
    assert {q["scheme"] for q in tensors.values()} == {"int4_dynact", "int8_weight", "int8_dynact"}
    upgraded = [u["tensor"] for u in manifest["quant_plan"]["mixed"]["upgrades"]]
    assert upgraded and all(tensors[n]["scheme"] == "int8_dynact" and tensors[n]["method"] == "gptq" for n in upgraded)
    assert (
        tensors["lm_head.weight"]["shares"] == "embed_tokens.weight" and manifest["quant_plan"]["tie_mode"] == "shared8"
    )
    # The int8 head's input is rotated, and the table stored rotated to match (quantize/rotation.py).
    assert manifest["quant_plan"]["tie_rotation"] == {"kind": "hadamard", "factors": [8, 8], "sign_seed": 0}
    # The int8 activations are smoothed per 32-channel group: factors for each block's norms and up_proj rows.
    smoothing = manifest["quant_plan"]["smoothing"]
    assert smoothing["group"] == 32 and set(smoothing["factors"]) >= {
        "layers.0.input_layernorm",
        "layers.1.mlp.up_proj",
    }
    assert manifest["delegation"]["unexpected_fallback_ops"] == {}
    assert {s["name"] for s in manifest["stages"]} >= {"load", "quantize", "torch_export", "lower_xnnpack"}
    assert not any("stored twice" in w for w in manifest["warnings"])

    # inspect ARTIFACT --json: the plan summary and the store-once accounting come back from the manifest.
    import subprocess
    import sys

    shown = subprocess.run(
        [sys.executable, "-m", "mlexport.cli", "inspect", str(artifact), "--json"], capture_output=True, text=True
    )
    info = json.loads(shown.stdout)
    assert info["quant_plan"] == {
        "int4_dynact/g32 gptq": 14 - len(upgraded),
        "int8_dynact gptq": len(upgraded),  # mixed precision: the most sensitive tensors per byte
        "int8_dynact": 1,  # the tied head, reading the embedding's int8 table
        "int8_weight rtn": 1,
    }
    assert info["mixed_precision"]["at_8bit"] == upgraded and info["calibration"]["name"] == TEXT_CALIBRATION
    assert info["accounting"]["within_slack"] and info["tie"]["mode"] == "shared8"
    assert info["tie"]["rotation"]["factors"] == [8, 8]
    assert info["tie"]["auto"] is None  # the default layout is fixed; --tie-mode auto is measured (test_sharing)
    # The blob map read back from the files: the tie is one blob serving both uses, nothing duplicated.
    tie_blobs = [b for b in info["blobs"] if b["serves"] == ["embed_tokens.weight", "lm_head.weight"]]
    assert tie_blobs and all(b["file"] == "model.ptd" for b in tie_blobs)
    assert info["duplicated_bytes"] == 0 and info["blob_accounting"]["within_slack"]
    assert not [b for b in info["blobs"] if b["serves"] == ["(unknown)"]]

    # The 4-bit artifact still tracks eager fp32 loosely (random tiny weights), through the KV cache.
    ref = _eager_reference(tiny_dir)
    got = _pte_logits(artifact)
    cos = (ref * got).sum(-1) / (np.linalg.norm(ref, axis=-1) * np.linalg.norm(got, axis=-1))
    assert cos.min() > 0.9, cos

    # ExecuTorch's own LLM runner loads it and generates with our metadata methods.
    from executorch.extension.llm.runner import GenerationConfig, TextLLMRunner

    runner = TextLLMRunner(str(artifact / "model.pte"), str(artifact / "tokenizer.json"), str(artifact / "model.ptd"))
    pieces: list[str] = []
    runner.generate(
        "The capital of France", GenerationConfig(max_new_tokens=5, temperature=0.0, echo=False), pieces.append
    )
    assert pieces

    # Our generation loop: greedy, stops at max_new_tokens, reports timings.
    runtime, _, _ = open_runtime(artifact / "model.pte")  # a file inside the artifact is accepted too
    stats = generate(runtime, TOKENS[:5], max_new_tokens=6)
    assert 0 < stats.generated_tokens <= 6 and stats.prefill_tok_s > 0


@pytest.mark.slow
def test_dup4_duplication_is_reported(tiny_dir: Path, tmp_path: Path) -> None:
    """dup4 stores the tie twice: the manifest, a warning and inspect's blob map all say so."""
    import json
    import subprocess
    import sys

    out = run_export(
        ExportOptions(model=str(tiny_dir), quant="4bit", out=tmp_path / "d4", max_context=64, tie_mode="dup4")
    )[0]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["sharing"]["tie"]["mode"] == "dup4" and manifest["sharing"]["tie"]["duplicated_bytes"] > 0
    assert any("stored twice" in w for w in manifest["warnings"])
    shown = subprocess.run([sys.executable, "-m", "mlexport.cli", "inspect", str(out)], capture_output=True, text=True)
    assert shown.returncode == 0, shown.stderr
    assert "lm_head.weight" in shown.stdout and "yes" in shown.stdout  # the duplicated column
    assert manifest["storage"]["duplicated_bytes"] > 0


def test_shared4_stores_the_table_once_and_tracks_eager(tiny_dir: Path, tmp_path: Path) -> None:
    """shared4: the lookup reads the head's own XNNPACK bytes (4-bit nibbles and bf16 scales), so model.ptd holds
    one table for both, and the .pte follows PyTorch running the same plan at every step."""
    from mlexport.exporters.executorch import stored_blobs
    from mlexport.validate.drift import quantized_reference

    opts = ExportOptions(
        model=str(tiny_dir), quant="4bit", effort="fast", out=tmp_path / "s4", max_context=64, tie_mode="shared4"
    )
    out = run_export(opts)[0]
    manifest = json.loads((out / "manifest.json").read_text())
    tie = manifest["sharing"]["tie"]
    assert tie["mode"] == "shared4" and tie["duplicated_bytes"] == 0 and tie["rotation"] is not None
    assert manifest["storage"]["duplicated_bytes"] == 0 and not manifest["warnings"]
    dim = llama_config()["hidden_size"]
    table = [b for b in stored_blobs(out) if b["file"] == "model.ptd" and b["bytes"] == VOCAB * dim // 2]
    assert len(table) == 1 and "embed_tokens.packed" in table[0]["keys"] and len(table[0]["keys"]) == 2
    reference = quantized_reference(load_model(str(tiny_dir)), manifest, 64)
    with torch.no_grad():
        want = reference(torch.tensor([TOKENS]))[0].numpy()
    got = _pte_logits(out)
    # the lookup's scales are bf16 where PyTorch keeps fp32; XNNPACK rounds the activations to int8 either way
    assert np.abs(got - want).max() <= 0.05 * np.abs(want).max()
    assert (got.argmax(-1) == want.argmax(-1)).mean() >= 0.9


def test_a_large_rotatable_table_defaults_to_shared4() -> None:
    """The int8 tie would outweigh the rest of an R1-shaped model (a 128k table, half the parameters): there the
    default is the 4-bit table stored once; the demo's shape keeps the int8 table."""
    from mlexport.pipeline import resolved_tie_mode
    from mlexport.spec import ModelSpec

    def spec(vocab: int) -> ModelSpec:
        n = 15
        return ModelSpec("r1", "llama4", vocab, 576, 64, [9] * n, [3] * n, [2048] * n, list(range(n)))

    assert resolved_tie_mode("default", "executorch", spec(128_256)) == "shared4"
    assert resolved_tie_mode("default", "executorch", spec(49_152)) == "shared8"
    assert resolved_tie_mode("dup4", "executorch", spec(128_256)) == "dup4"


@pytest.mark.slow
def test_q4_1_gguf_body_is_reexported_as_int4_blocks_plus_int8_offsets(tmp_path: Path) -> None:
    """A Q4_1 GGUF's body on XNNPACK, which has no zero points: each Linear runs its GGUF 4-bit blocks as 8da4w plus
    a 32x smaller 8da8w Linear over block sums whose weight is the blocks' offsets at int8 (OffsetLinear). No
    calibration runs: no GPTQ, no sensitivity pass, no smoothing. The .pte runs as the eager twin validate builds."""
    from mlexport.exporters.executorch import OffsetLinear, attach_block_offsets
    from mlexport.quantize.block_offsets import block_offsets
    from mlexport.validate.drift import quantized_reference
    from test_sources import write_tiny_gguf

    save_hf_dir(tmp_path / "hf", llama_config())
    write_tiny_gguf(tmp_path / "m.gguf", tmp_path / "hf", blocks="Q4_1")
    opts = ExportOptions(
        model=str(tmp_path / "m.gguf"),
        quant="4bit",
        out=tmp_path / "et",
        max_context=64,
        size_budget_mb=50,
        reuse_source_grid=True,  # on by default at --effort max only: the offsets double the lowering time
    )
    artifact = run_export(opts)[0]
    manifest = json.loads((artifact / "manifest.json").read_text())
    plan = manifest["quant_plan"]
    body = [k for k in plan["tensors"] if k.startswith("layers.")]
    assert all((plan["tensors"][k]["method"], plan["tensors"][k]["source"]) == ("source", "Q4_1") for k in body)
    assert plan["mixed"]["sensitivity_sum"] is None  # every grid fit: nothing was measured
    assert not plan.get("calibration") and not plan.get("smoothing") and not plan.get("tune")
    assert "the 4-bit Linears reuse the source's grid" in " ".join(manifest["warnings"])
    assert manifest["delegation"]["block_offset_linears"] == len(body)
    assert not manifest["delegation"]["unexpected_fallback_ops"]
    assert manifest["accounting"]["within_slack"], manifest["accounting"]
    assert manifest["effort"] == "default"
    loaded = load_model(str(tmp_path / "m.gguf"))
    # the module the exporter builds: main blocks + offsets reproduce the source weight to an int8 offset step
    model = quantized_reference(loaded, manifest, max_context=64)
    attach_block_offsets(model)
    linear = model.layers[0].mlp.up_proj
    assert isinstance(linear, OffsetLinear)
    grid = loaded.source_grids["layers.0.mlp.up_proj.weight"]
    main = linear.weight.dequantize().float()
    offsets = linear.offsets.weight.dequantize().float().repeat_interleave(32, 1)
    step = block_offsets(grid).scale.float()
    assert (
        (main + offsets - loaded.state_dict["layers.0.mlp.up_proj.weight"]).abs() <= step + 1e-2 * main.abs().max()
    ).all()
    reference = quantized_reference(loaded, manifest, max_context=64)
    with torch.no_grad():
        want = reference(torch.tensor([TOKENS])).numpy()[0]
    got = _pte_logits(artifact)
    assert np.abs(got - want).max() <= 0.05 * max(1.0, np.abs(want).max()), np.abs(got - want).max()


@pytest.mark.parametrize(
    ("mapping", "block", "shape", "keepdim", "zero_dtype"),
    [
        ("ASYMMETRIC", [1, 1, 64], [1, 5, 64], False, None),  # per-token activations
        ("SYMMETRIC", [1, 32], [48, 64], False, None),  # per-group weights
        ("SYMMETRIC", [1, 64], [48, 64], True, torch.int8),
        ("ASYMMETRIC", [1, 16], [8, 64], True, torch.int32),
    ],
)
def test_direct_shape_kernels_agree_with_the_ops_they_stand_in_for(
    mapping: str, block: list[int], shape: list[int], keepdim: bool, zero_dtype: torch.dtype | None
) -> None:
    """Lowering's shortcut must give every quantize op and linear the shape and dtype its own body gives."""
    import torchao.quantization.quant_primitives  # noqa: F401  (registers the torchao ops)
    from mlexport.exporters.executorch import direct_shape_kernels
    from torch._subclasses.fake_tensor import FakeTensorMode

    ops = torch.ops.torchao

    def run(x: torch.Tensor, w: torch.Tensor) -> list[torch.Tensor]:
        scale, zero = ops.choose_qparams_affine(
            x, mapping, block, torch.int8, -128, 127, None, None, zero_dtype, keepdim
        )
        q = ops.quantize_affine(x, block, scale, zero, torch.int8, -128, 127)
        d = ops.dequantize_affine(q, block, scale, zero, torch.int8, -128, 127, torch.float32)
        return [scale, zero, q, d, torch.nn.functional.linear(d, w)]

    x, w = torch.randn(shape), torch.randn(24, shape[-1])
    reference = run(x, w)
    with FakeTensorMode(allow_non_fake_inputs=True) as mode, direct_shape_kernels():
        fake = run(mode.from_tensor(x), mode.from_tensor(w))
    assert [(t.shape, t.dtype, t.stride()) for t in fake] == [(t.shape, t.dtype, t.stride()) for t in reference]
    # and the real ops run their real bodies again afterwards
    assert torch.equal(run(x, w)[3], reference[3])


@pytest.mark.slow
def test_direct_shape_kernels_leave_the_pte_byte_identical(
    tiny_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import contextlib

    import mlexport.exporters.executorch as et

    with_kernels = _export(tiny_dir, tmp_path / "with", "4bit")
    monkeypatch.setattr(et, "direct_shape_kernels", contextlib.nullcontext)
    without = _export(tiny_dir, tmp_path / "without", "4bit")
    for name in ("model.pte", "model.ptd"):
        assert (with_kernels / name).read_bytes() == (without / name).read_bytes(), name


@pytest.mark.slow
def test_decomposing_once_leaves_the_pte_byte_identical(
    tiny_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One functionalize-and-decompose re-trace gives the same bytes as lowering's own two."""
    import contextlib

    import mlexport.exporters.executorch as et

    once = _export(tiny_dir, tmp_path / "once", "4bit")

    @contextlib.contextmanager
    def lowering_decomposes(program: Any, partitioner: Any) -> Iterator[Any]:
        yield program

    monkeypatch.setattr(et, "decomposed_once", lowering_decomposes)
    twice = _export(tiny_dir, tmp_path / "twice", "4bit")
    for name in ("model.pte", "model.ptd"):
        assert (once / name).read_bytes() == (twice / name).read_bytes(), name


@pytest.mark.slow
def test_lowering_reports_a_count_toward_a_total(tiny_dir: Path, tmp_path: Path) -> None:
    """The long step's bar moves: lowering and serialization report graph nodes traced out of an estimate."""
    from mlexport.cli import parse_progress

    lines: list[str] = []
    opts = ExportOptions(model=str(tiny_dir), quant="4bit", out=tmp_path / "o", max_context=64, effort="fast")
    run_export(opts, lines.append)
    for label in ("lowering: graph nodes traced", "serializing: graph nodes traced"):
        counts = [parse_progress(line)[1:] for line in lines if line.startswith(f"progress:{label}")]
        assert len(counts) >= 10, label
        assert all(total and done <= total for done, total in counts)
        assert [done for done, _ in counts] == sorted(done for done, _ in counts)
        assert counts[-1][0] >= 0.5 * counts[-1][1], f"{label}: the estimate is far off: {counts[-1]}"
