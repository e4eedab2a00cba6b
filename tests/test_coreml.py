"""Core ML exporter + MIL interpreter on tiny models: state across calls, fp32/fp16/int4, LS and tie stored once,
and the known coremltools pitfalls."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from mlexport.exporters.coreml import PACKAGE_NAME, StatefulDecoder, _norm, causal_mask
from mlexport.validate.mil_interpreter import MilInterpreter
from mlexport.validate.runtimes import CoreMLRuntime, open_runtime
from tiny import VOCAB, llama_config, save_hf_dir

from mlexport.model import RMSNorm, build_decoder
from mlexport.pipeline import ExportOptions, run_export
from mlexport.sources import load_model

TOKENS = [int(t) for t in torch.randint(3, VOCAB, (14,), generator=torch.Generator().manual_seed(5))]
PREFILL = 9


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("coreml-models")
    ls = llama_config(architectures=["MobileLLMForCausalLM"], model_type="mobilellm", share_embedding=True)
    ls.pop("tie_word_embeddings")
    configs = {
        "llama": llama_config(),
        "qwen3": llama_config(architectures=["Qwen3ForCausalLM"], model_type="qwen3", head_dim=32),
        "ls": {**ls, "layer_sharing": True, "hidden_size": 128, "intermediate_size": 256, "head_dim": 32},
    }
    for name, cfg in configs.items():
        save_hf_dir(root / name, cfg)
    return {name: root / name for name in configs}


@pytest.fixture(scope="module")
def exported(models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, str], Path]:
    out = tmp_path_factory.mktemp("coreml-out")
    done = {}
    for name, quant in (("llama", "fp32"), ("llama", "fp16"), ("llama", "4bit"), ("qwen3", "fp16"), ("ls", "4bit")):
        opts = ExportOptions(
            model=str(models[name]), target="coreml", quant=quant, out=out / f"{name}-{quant}", max_context=64
        )
        done[(name, quant)] = run_export(opts)[0]
    return done


def _interpreted(artifact: Path) -> np.ndarray:
    runtime, _, _ = open_runtime(artifact)
    assert isinstance(runtime, CoreMLRuntime) and runtime.uses_interpreter == (sys.platform != "darwin")
    rows = [runtime.forward(TOKENS[:PREFILL], 0)]
    rows += [runtime.forward([t], PREFILL + i) for i, t in enumerate(TOKENS[PREFILL:])]
    return np.concatenate(rows)


def _wrapper_logits(model_dir: Path) -> np.ndarray:
    """The traced module itself in PyTorch (fp16 caches included): what the MIL program must reproduce."""
    loaded = load_model(str(model_dir))
    wrapper = StatefulDecoder(build_decoder(loaded.spec, loaded.state_dict, max_context=64)).eval()
    with torch.no_grad():
        rows = [wrapper(torch.tensor([TOKENS[:PREFILL]]), torch.from_numpy(causal_mask(0, PREFILL)).float())]
        for i, t in enumerate(TOKENS[PREFILL:]):
            rows.append(wrapper(torch.tensor([[t]]), torch.from_numpy(causal_mask(PREFILL + i, 1)).float()))
    return torch.cat(rows, dim=1)[0].numpy()


def _eager(model_dir: Path) -> np.ndarray:
    loaded = load_model(str(model_dir))
    with torch.no_grad():
        return build_decoder(loaded.spec, loaded.state_dict, max_context=64)(torch.tensor([TOKENS]))[0].numpy()


@pytest.mark.slow
def test_interpreter_fp32_matches_pytorch_with_state(exported: dict, models: dict[str, Path]) -> None:
    got = _interpreted(exported[("llama", "fp32")])
    # fp32 compute, but K/V live in fp16 state in both: a last-bit difference before the fp16 rounding of a cache
    # entry can flip it by one fp16 ulp (~5e-4 relative), which is this comparison's floor.
    assert np.abs(got - _wrapper_logits(models["llama"])).max() <= 1e-3
    # and the wrapper (fp16 caches, overflow-safe norm) stays close to the shared decoder
    assert np.abs(got - _eager(models["llama"])).max() <= 5e-3


@pytest.mark.parametrize("name", ["llama", "qwen3"])
def test_interpreter_fp16_is_consistent_with_fp16(name: str, exported: dict, models: dict[str, Path]) -> None:
    got, ref = _interpreted(exported[(name, "fp16")]), _eager(models[name])
    assert np.abs(got - ref).max() <= 2e-2 * max(1.0, np.abs(ref).max())  # fp16 has ~3 decimal digits
    assert (got.argmax(-1) == ref.argmax(-1)).mean() >= 0.9


def test_int4_program_state_and_storage(exported: dict, models: dict[str, Path]) -> None:
    artifact = exported[("ls", "4bit")]
    manifest = json.loads((artifact / "manifest.json").read_text())
    assert "constexpr_blockwise_shift_scale" in manifest["delegation"]["ops"]
    assert manifest["quant_plan"]["tie_mode"] == "shared4"
    plan = manifest["quant_plan"]
    upgraded = {u["tensor"] for u in plan["mixed"]["upgrades"]}  # mixed precision: the most sensitive at 8 bits
    assert {n for n, q in plan["tensors"].items() if q["scheme"] == "int8_weight"} == upgraded
    assert {q["scheme"] for n, q in plan["tensors"].items() if n not in upgraded} == {"int4_weight"}
    assert plan["tensors"]["lm_head.weight"]["int8_rows"] == VOCAB // 8  # the default, capped for a tiny vocab
    blobs = manifest["storage"]["blobs"]
    tie = [b for b in blobs if b["serves"] == ["embed_tokens.weight", "lm_head.weight"]]
    # the int8 head rows (data + scales) and the symmetric 4-bit rest (data + fp16 scales), each stored once for
    # both the gather and the head; the table is stored rotated, and the rotation's factors are tiny consts
    assert len(tie) == 4 and plan["tie_rotation"]["kind"] == "hadamard"
    assert not plan["tensors"]["lm_head.weight"]["asymmetric"]
    dim = 128  # the "ls" model's hidden size
    assert sum(b["bytes"] for b in tie) < 1.05 * (VOCAB // 8 * (dim + 2) + VOCAB * 7 // 8 * dim * 4.5 / 8)
    block = [b for b in blobs if any(s.startswith("layers.0.self_attn.q_proj") for s in b["serves"])]
    assert block and all(s.endswith("(executed layers 0, 1)") for b in block for s in b["serves"])
    assert manifest["storage"]["duplicated_bytes"] == 0
    # a tiny model's blob records are a large part of weight.bin: no false "duplicated" warning from them
    assert manifest["accounting"]["within_slack"] and not manifest["warnings"], manifest["accounting"]
    got, ref = _interpreted(artifact), _eager(models["ls"])
    cos = (got * ref).sum(-1) / (np.linalg.norm(got, axis=-1) * np.linalg.norm(ref, axis=-1))
    assert cos.min() > 0.9, cos


def test_int8_tie_rows_match_the_eager_reference(exported: dict, models: dict[str, Path]) -> None:
    """The tie split into int8 head rows and 4-bit rest (two tables, a select in the lookup, a concat after the
    head) computes what the eager reference computes, for token ids on both sides of the split."""
    from mlexport.validate.drift import quantized_reference

    artifact = exported[("llama", "4bit")]
    manifest = json.loads((artifact / "manifest.json").read_text())
    rows = manifest["quant_plan"]["tensors"]["lm_head.weight"]["int8_rows"]
    assert rows > 0 and {"select", "concat"} <= set(manifest["delegation"]["ops"])
    assert any(t < rows for t in TOKENS) and any(t >= rows for t in TOKENS)
    got = _interpreted(artifact)
    with torch.no_grad():
        model = quantized_reference(load_model(str(models["llama"])), manifest, max_context=64)
        ref = model(torch.tensor([TOKENS]))[0].numpy()
    assert np.abs(got - ref).max() <= 2e-3 * max(1.0, np.abs(ref).max())  # fp16 compute against fp32
    assert (got.argmax(-1) == ref.argmax(-1)).all()


@pytest.mark.slow
def test_tuned_norm_gains_reach_the_package(models: dict[str, Path], tmp_path: Path, small_tuning: None) -> None:
    """--tune-scales on Core ML: the values reach the package at compression time, but the tuned norm gains must be
    in the model before conversion. LS blocks run twice, so each gain is tuned and stored once for both runs."""
    from mlexport.quantize.tune import TUNE_DEFAULT
    from mlexport.validate.drift import quantized_reference

    opts = ExportOptions(
        model=str(models["ls"]), target="coreml", quant="4bit", out=tmp_path / "tuned", max_context=64, tune_scales=True
    )
    artifact = run_export(opts)[0]
    manifest = json.loads((artifact / "manifest.json").read_text())
    assert manifest["quant_plan"]["tune"]["norm_lr"] == TUNE_DEFAULT["norm_lr"] > 0
    loaded = load_model(str(models["ls"]))
    with torch.no_grad():
        model = quantized_reference(loaded, manifest, max_context=64)
        ref = model(torch.tensor([TOKENS]))[0].numpy()
    plain = build_decoder(loaded.spec, loaded.state_dict, max_context=64)
    assert not torch.equal(model.norm.weight, plain.norm.weight)  # the reference runs tuned gains
    got = _interpreted(artifact)
    assert np.abs(got - ref).max() <= 2e-3 * max(1.0, np.abs(ref).max())  # fp16 compute against fp32
    assert (got.argmax(-1) == ref.argmax(-1)).all()


def test_state_persists_and_resets(exported: dict) -> None:
    interpreter = MilInterpreter(exported[("llama", "fp16")] / PACKAGE_NAME)
    first = interpreter.predict({"input_ids": np.array([TOKENS[:4]], np.int32), "causal_mask": causal_mask(0, 4)})
    assert any(np.abs(s).sum() > 0 for s in interpreter.states.values())
    again = interpreter.predict({"input_ids": np.array([TOKENS[:4]], np.int32), "causal_mask": causal_mask(0, 4)})
    np.testing.assert_array_equal(first["logits"], again["logits"])  # start 0 overwrites; nothing stale leaks
    interpreter.reset_state()
    assert all(np.abs(s).sum() == 0 for s in interpreter.states.values())
    metadata = interpreter.metadata
    assert metadata["mlexport.max_context"] == "64" and json.loads(metadata["mlexport.eos_ids"]) == [2]


def test_coremltools_pitfalls_are_handled(exported: dict) -> None:
    """The known pitfalls: numpy >= 2.4, the `diff` op of transformers masks, torch.export `alias` nodes, lost SDPA."""
    major, minor = (int(x) for x in np.__version__.split(".")[:2])
    assert (major, minor) < (2, 4), "numpy >= 2.4 breaks coremltools 9.0 conversions (coremltools#2633)"
    ops = set(json.loads((exported[("llama", "fp16")] / "manifest.json").read_text())["delegation"]["ops"])
    assert "diff" not in ops  # we pass an explicit additive mask instead of transformers' mask code
    assert "alias" not in ops  # torch.jit.trace, not torch.export, so no alias nodes reach the converter
    assert "scaled_dot_product_attention" in ops  # SDPA without an explicit `scale` stays fused
    assert {"read_state", "coreml_update_state"} <= ops


def test_fp16_norm_does_not_overflow() -> None:
    """x² of activations in the hundreds overflows fp16; the scaled RMSNorm stays finite and exact."""
    norm = RMSNorm(8, 1e-5).half()
    x = torch.full((1, 1, 8), 300.0, dtype=torch.float16)
    assert torch.isinf(x.pow(2).mean(-1)).any()  # the naive form overflows
    out = _norm(norm, x)
    assert torch.isfinite((torch.tensor(0.1).sqrt() / x.abs().amax()) ** 2)  # the eps term never goes through x²
    assert torch.isfinite(out).all() and torch.allclose(out.float(), torch.ones(1, 1, 8), atol=1e-2)


def test_palettized_package_runs_in_the_interpreter(models: dict[str, Path], tmp_path: Path) -> None:
    opts = ExportOptions(
        model=str(models["llama"]), target="coreml", quant="4bit", out=tmp_path / "pal", max_context=64, palettize=4
    )
    artifact = run_export(opts)[0]
    manifest = json.loads((artifact / "manifest.json").read_text())
    assert any(op.startswith("constexpr_lut") for op in manifest["delegation"]["ops"])
    got, ref = _interpreted(artifact), _eager(models["llama"])
    cos = (got * ref).sum(-1) / (np.linalg.norm(got, axis=-1) * np.linalg.norm(ref, axis=-1))
    assert cos.min() > 0.9, cos


@pytest.mark.slow
def test_q4_1_gguf_body_is_reexported_as_int4_blocks_plus_int8_offsets(tmp_path: Path) -> None:
    """The re-export of a Q4_1 body on Core ML (quantize/block_offsets.py): each block's GGUF 4-bit values
    and fp16 scale as constexpr_blockwise_shift_scale with no offset, and the blocks' offsets (−d·zero) as an int8
    [rows, blocks] weight of a second Linear over block sums. Main plus offsets is the source weight to within an
    int8 step of each row's offsets; the interpreter runs the package like the eager twin validate builds."""
    from mlexport.exporters.coreml import _SUFFIXES, offset_attr
    from mlexport.quantize import QuantPlan
    from mlexport.quantize.block_offsets import block_offsets
    from mlexport.validate.drift import quantized_reference
    from mlexport.validate.mil_interpreter import MilInterpreter
    from test_sources import write_tiny_gguf

    save_hf_dir(tmp_path / "hf", llama_config())
    write_tiny_gguf(tmp_path / "m.gguf", tmp_path / "hf", blocks="Q4_1")
    opts = ExportOptions(
        model=str(tmp_path / "m.gguf"),
        target="coreml",
        quant="4bit",
        out=tmp_path / "cm",
        max_context=64,
        size_budget_mb=50,
    )
    artifact = run_export(opts)[0]
    manifest = json.loads((artifact / "manifest.json").read_text())
    plan = QuantPlan.from_dict(manifest["quant_plan"])
    body = [k for k in plan.tensors if k.startswith("layers.")]
    assert all((plan.tensors[k].method, plan.tensors[k].source) == ("source", "Q4_1") for k in body)
    loaded = load_model(str(tmp_path / "m.gguf"))
    program = MilInterpreter(artifact / PACKAGE_NAME)
    expanded = {}
    for op in program.function.operations:
        if op.op_type == "constexpr_blockwise_shift_scale":
            assert op.offset is None  # no float zero points: the offsets are their own int8 weight
            expanded[_SUFFIXES.sub("", op.name)] = np.asarray(op.materialized_val_inference(), np.float32)
    for key in body:
        grid = loaded.source_grids[key]
        main = expanded[("model_" + key).replace(".", "_")]
        np.testing.assert_allclose(main, (grid.qdata.float() * grid.scale.repeat_interleave(32, 1)).numpy(), rtol=1e-3)
        offsets = expanded[offset_attr(key)]
        stored = block_offsets(grid)
        assert stored.qdata.dtype == torch.int8 and offsets.shape == tuple(grid.scale.shape)
        np.testing.assert_allclose(offsets, stored.dequantize().numpy(), rtol=1e-3, atol=1e-7)
        step = stored.scale.float().numpy()  # per row; RTN against an fp16-rounded scale can miss by > half
        weight = main + np.repeat(offsets, 32, axis=1)
        fp16 = (np.abs(main) + np.abs(weight - main)) * 2.0**-11 + 1e-7  # both expand to fp16, as computed
        assert (np.abs(weight - loaded.state_dict[key].numpy()) <= step + fp16).all(), key
    sources = manifest["storage"]["blob_sources"].values()
    assert any(s.startswith("layers.0.mlp.up_proj.weight#block offsets data") for uses in sources for s in uses)
    assert manifest["accounting"]["within_slack"], manifest["accounting"]
    got = _interpreted(artifact)
    with torch.no_grad():
        ref = quantized_reference(loaded, manifest, max_context=64)(torch.tensor([TOKENS]))[0].numpy()
    assert np.abs(got - ref).max() <= 2e-2 * max(1.0, np.abs(ref).max())
    # the drift report does not call these blocks lossless: their offsets were rounded
    from mlexport.validate.pipeline import run_validation

    result, _ = run_validation([artifact], str(tmp_path / "m.gguf"), tmp_path / "report", max_tokens=32, window=16)
    assert result["artifacts"][0]["source_grid_reused"]["offsets"] == "int8 per row"
    text = (tmp_path / "report" / "report.md").read_text()
    assert "block offsets rounded to int8 per row" in text and "lossless" not in text
