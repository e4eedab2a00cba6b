"""MobileLLM-R1's architecture (dense Llama 4 text) against transformers' own Llama4ForCausalLM: the shared
decoder and every target's fp32 artifact, step by step over a 40-token prefill-then-decode run."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from mlexport.validate.drift import every_position_logits
from mlexport.validate.runtimes import open_runtime
from tiny import (
    VOCAB,
    genai_follows_onnxruntime,
    inspect_export_and_bundle,
    llama_config,
    reference_logits,
    relative_error,
    save_hf_dir,
)

from mlexport.errors import MlexportError
from mlexport.model import build_decoder
from mlexport.pipeline import ExportOptions, run_export
from mlexport.sources import load_model, spec_from_hf_config

TOKENS = [int(t) for t in torch.randint(3, VOCAB, (40,), generator=torch.Generator().manual_seed(7))]
PREFILL = 20
CONTEXT = 64


def r1_config(**overrides: object) -> dict:
    """A tiny dense Llama 4 text model shaped like MobileLLM-R1 (tied, GQA, head_dim 16)."""
    cfg = llama_config(
        architectures=["Llama4ForCausalLM"],
        model_type="llama4_text",
        num_hidden_layers=4,
        intermediate_size_mlp=96,
        moe_layers=[],
        layer_types=["full_attention"] * 4,
        rope_theta=10000.0,
    )
    cfg.update(overrides)
    return cfg


CONFIGS = {
    # every 4th layer NoPE (the default), QK norm on the RoPE layers, no chunking
    "r1": r1_config(),
    # QK norm off, an explicit NoPE list, chunked layers whose chunk lies past the exported context, untied
    "r1-noqk": r1_config(
        use_qk_norm=False,
        no_rope_layers=[1, 0, 1, 1],
        layer_types=None,
        attention_chunk_size=128,
        tie_word_embeddings=False,
    ),
    # every layer RoPE + QK norm (what llama.cpp says MobileLLM-R1 does), a llama3 RoPE scaling
    "r1-all-rope": r1_config(
        no_rope_layers=[1, 1, 1, 1],
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 32,
        },
    ),
}


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, np.ndarray]]:
    return reference_logits(tmp_path_factory.mktemp("llama4"), CONFIGS, TOKENS)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_decoder_matches_transformers_at_every_step(name: str, models: dict) -> None:
    path, ref = models[name]
    loaded = load_model(str(path))
    assert loaded.spec.arch == "llama4"
    model = build_decoder(loaded.spec, loaded.state_dict, max_context=CONTEXT)

    def forward(tokens: list[int], start: int) -> np.ndarray:
        with torch.no_grad():
            return model(torch.tensor([tokens]), torch.tensor([start]))[0].numpy()

    assert relative_error(every_position_logits(forward, TOKENS, PREFILL), ref) <= 1e-4
    with torch.no_grad():
        assert relative_error(model(torch.tensor([TOKENS]))[0].numpy(), ref) <= 1e-4


@pytest.mark.parametrize(
    ("name", "target"),
    [  # without the QK norm, the slowest export runs in the full suite only
        pytest.param(n, t, marks=pytest.mark.slow) if (n, t) == ("r1-noqk", "executorch") else (n, t)
        for n in ("r1", "r1-noqk")
        for t in ("executorch", "onnx", "coreml")
    ],
)
def test_fp32_artifacts_match_transformers_at_every_step(target: str, name: str, models: dict, tmp_path: Path) -> None:
    path, ref = models[name]
    opts = ExportOptions(model=str(path), target=target, quant="fp32", out=tmp_path / "a", max_context=CONTEXT)
    runtime, _, _ = open_runtime(run_export(opts)[0])
    assert relative_error(every_position_logits(runtime.forward, TOKENS, PREFILL), ref) <= 1e-4


@pytest.mark.slow
@pytest.mark.parametrize("quant", ["8bit", "4bit"])
@pytest.mark.parametrize("target", ["executorch", "onnx", "coreml"])
def test_quantized_exports_run(target: str, quant: str, models: dict, tmp_path: Path) -> None:
    """The default recipe (at 4 bits: calibration, GPTQ, the target's tie) runs through NoPE and QK-norm layers,
    and the artifact stays close to the fp32 reference."""
    path, ref = models["r1"]
    opts = ExportOptions(model=str(path), target=target, quant=quant, out=tmp_path / "a", max_context=CONTEXT)
    runtime, _, _ = open_runtime(run_export(opts)[0])
    logits = every_position_logits(runtime.forward, TOKENS[:PREFILL], PREFILL)
    assert np.isfinite(logits).all() and logits.shape == (PREFILL, VOCAB)
    assert relative_error(logits, ref[:PREFILL]) <= 0.25


def test_moe_layers_are_refused_by_name() -> None:
    with pytest.raises(MlexportError, match="mixture-of-experts"):
        spec_from_hf_config(r1_config(moe_layers=None), "m")  # transformers' default: every layer MoE


def test_chunked_attention_without_a_chunk_size_is_refused() -> None:
    with pytest.raises(MlexportError, match="attention_chunk_size is unset"):
        spec_from_hf_config(r1_config(layer_types=None, attention_chunk_size=None), "m")


def test_context_past_the_chunk_is_refused_naming_the_fix(models: dict) -> None:
    loaded = load_model(str(models["r1-noqk"][0]))
    with pytest.raises(MlexportError, match=r"chunked attention .*--max-context 128"):
        build_decoder(loaded.spec, loaded.state_dict, max_context=256)


def test_context_past_temperature_tuning_is_refused_naming_the_fix() -> None:
    spec = spec_from_hf_config(r1_config(floor_scale=100, max_position_embeddings=4096), "m")
    assert spec.causal_limit == 99
    with pytest.raises(MlexportError, match=r"temperature tuning .*--max-context 99"):
        build_decoder(spec, {}, max_context=128)


@pytest.mark.slow
def test_inspect_export_and_the_android_bundle(models: dict, tmp_path: Path) -> None:
    inspect_export_and_bundle(models["r1"][0], "llama4", tmp_path, CONTEXT)


@pytest.mark.slow
def test_onnxruntime_genai_runs_the_onnx_export(models: dict, tmp_path: Path) -> None:
    genai_follows_onnxruntime(models["r1"][0], tmp_path, TOKENS[:PREFILL], 12, CONTEXT)


def test_a_llama_cpp_gguf_of_r1_matches_transformers(tmp_path: Path) -> None:
    """llama.cpp's ``llama4`` GGUF of a dense R1 (q/k rows in the checkpoint's interleaved order, no NoPE list,
    ``attention.sliding_window = 0``): RoPE and QK-norm on every layer, as the converted checkpoint had them."""
    from test_sources import write_tiny_gguf

    reference = save_hf_dir(tmp_path / "hf", r1_config(no_rope_layers=[1, 1, 1, 1]))
    write_tiny_gguf(tmp_path / "r1.gguf", tmp_path / "hf", arch="llama4")
    loaded = load_model(str(tmp_path / "r1.gguf"))
    spec = loaded.spec
    assert spec.arch == "llama4" and spec.qk_l2_norm and all(spec.rope_blocks) and spec.causal_limit is None
    assert (loaded.tokenizer_dir / "tokenizer.json").is_file()  # read as a "llama" GGUF's by transformers
    model = build_decoder(spec, loaded.state_dict, max_context=CONTEXT)
    with torch.no_grad():
        ref = reference(torch.tensor([TOKENS])).logits[0].numpy()

        def forward(tokens: list[int], start: int) -> np.ndarray:
            return model(torch.tensor([tokens]), torch.tensor([start]))[0].numpy()

        assert relative_error(every_position_logits(forward, TOKENS, PREFILL), ref) <= 1e-4


def test_a_mixture_of_experts_gguf_is_refused_by_name(tmp_path: Path) -> None:
    from mlexport.architectures.llama4 import gguf_fields

    header = {"expert_count": 16, "interleave_moe_layer_step": 1}
    with pytest.raises(MlexportError, match="mixture-of-experts"):
        gguf_fields(lambda key, default: header.get(key, default), {"layer_map": [0, 1]})
    chunked = gguf_fields(lambda key, default: default, {"layer_map": [0, 1, 2, 3]})
    assert chunked["rope_blocks"] == [True, True, True, False] and chunked["causal_limit"] == 8191
