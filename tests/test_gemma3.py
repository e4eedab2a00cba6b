"""Gemma 3 text against transformers' own Gemma3ForCausalLM: sandwich norms, (1 + w) gains, GeGLU, the scaled
embedding, query_pre_attn_scalar, and sliding-window layers with their own RoPE base, decoded past the window."""

from __future__ import annotations

import dataclasses
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

TOKENS = [int(t) for t in torch.randint(3, VOCAB, (40,), generator=torch.Generator().manual_seed(11))]
PREFILL = 20
CONTEXT = 64
WINDOW = 8  # shorter than the prefill and the run: decode steps past it must forget the oldest keys


def gemma_config(**overrides: object) -> dict:
    cfg = llama_config(
        architectures=["Gemma3ForCausalLM"],
        model_type="gemma3_text",
        num_hidden_layers=4,
        layer_types=["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"],
        sliding_window=WINDOW,
        query_pre_attn_scalar=24,
        rope_parameters={
            "full_attention": {"rope_type": "default", "rope_theta": 1_000_000.0},
            "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
        },
        rms_norm_eps=1e-6,
    )
    cfg.pop("rope_theta")
    cfg.update(overrides)
    return cfg


CONFIGS = {
    "gemma3": gemma_config(),
    # the default 5:1 pattern from sliding_window_pattern, a linearly scaled global RoPE, untied
    "gemma3-pattern": gemma_config(
        num_hidden_layers=6,
        layer_types=None,
        rope_parameters={
            "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1_000_000.0},
            "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
        },
        tie_word_embeddings=False,
    ),
}


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, np.ndarray]]:
    return reference_logits(tmp_path_factory.mktemp("gemma3"), CONFIGS, TOKENS)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_decoder_matches_transformers_at_every_step(name: str, models: dict) -> None:
    path, ref = models[name]
    loaded = load_model(str(path))
    assert loaded.spec.arch == "gemma3" and loaded.spec.sliding_window == WINDOW
    model = build_decoder(loaded.spec, loaded.state_dict, max_context=CONTEXT)

    def forward(tokens: list[int], start: int) -> np.ndarray:
        with torch.no_grad():
            return model(torch.tensor([tokens]), torch.tensor([start]))[0].numpy()

    assert relative_error(every_position_logits(forward, TOKENS, PREFILL), ref) <= 1e-4
    with torch.no_grad():
        assert relative_error(model(torch.tensor([TOKENS]))[0].numpy(), ref) <= 1e-4


@pytest.mark.parametrize(
    ("name", "target"),
    [  # the 6-layer pattern's slower exports run in the full suite only
        pytest.param(n, t, marks=pytest.mark.slow) if n == "gemma3-pattern" and t != "onnx" else (n, t)
        for n in sorted(CONFIGS)
        for t in ("executorch", "onnx", "coreml")
    ],
)
def test_fp32_artifacts_match_transformers_at_every_step(name: str, target: str, models: dict, tmp_path: Path) -> None:
    path, ref = models[name]
    opts = ExportOptions(model=str(path), target=target, quant="fp32", out=tmp_path / "a", max_context=CONTEXT)
    runtime, _, _ = open_runtime(run_export(opts)[0])
    assert relative_error(every_position_logits(runtime.forward, TOKENS, PREFILL), ref) <= 1e-4


@pytest.mark.slow
@pytest.mark.parametrize("quant", ["8bit", "4bit"])
@pytest.mark.parametrize("target", ["executorch", "onnx", "coreml"])
def test_quantized_exports_track_the_reference(target: str, quant: str, models: dict, tmp_path: Path) -> None:
    """Each target's default recipe (at 4 bits: calibration, GPTQ, its tie layout) through sandwich norms, GeGLU
    and sliding windows: KL divergence from transformers' fp32 logits over the 40-token run."""
    path, ref = models["gemma3"]
    opts = ExportOptions(model=str(path), target=target, quant=quant, out=tmp_path / "a", max_context=CONTEXT)
    runtime, _, _ = open_runtime(run_export(opts)[0])
    logits = torch.from_numpy(every_position_logits(runtime.forward, TOKENS, PREFILL)).log_softmax(-1)
    reference = torch.from_numpy(ref).log_softmax(-1)
    kld = float((reference.exp() * (reference - logits)).sum(-1).mean())
    assert kld <= 0.05, kld


def test_a_target_without_the_features_refuses_before_quantizing(
    models: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mlexport.exporters import coreml

    monkeypatch.setattr(coreml, "PROFILE", dataclasses.replace(coreml.PROFILE, decoder_features=frozenset()))
    opts = ExportOptions(model=str(models["gemma3"][0]), target="coreml", quant="4bit", out=tmp_path / "a")
    with pytest.raises(MlexportError, match=r"does not implement .*sliding_window.*use --target executorch or onnx"):
        run_export(opts)
    assert not (tmp_path / "a").exists()


def test_soft_capping_is_refused_by_name() -> None:
    with pytest.raises(MlexportError, match="final_logit_softcapping"):
        spec_from_hf_config(gemma_config(final_logit_softcapping=30.0), "g")


@pytest.mark.slow
def test_inspect_export_and_the_android_bundle(models: dict, tmp_path: Path) -> None:
    inspect_export_and_bundle(models["gemma3"][0], "gemma3", tmp_path, CONTEXT)


@pytest.mark.slow
def test_onnxruntime_genai_runs_the_onnx_export(models: dict, tmp_path: Path) -> None:
    genai_follows_onnxruntime(models["gemma3"][0], tmp_path, TOKENS[:PREFILL], 12, CONTEXT)


@pytest.mark.slow
def test_an_fp16_package_carries_a_residual_stream_past_fp16s_range(tmp_path: Path) -> None:
    """Gemma's residual stream outgrows fp16 (Gemma-3-270M's reaches ~1e5): with feed-forward output gains of 3e4
    here it passes 65504 in the first layer, and the fp16 Core ML program must still track transformers."""
    from safetensors.torch import save_file

    directory = tmp_path / "loud"
    reference = save_hf_dir(directory, gemma_config())
    with torch.no_grad():
        for layer in reference.model.layers:
            layer.post_feedforward_layernorm.weight.fill_(3e4)  # Gemma scales by 1 + w
        state = {k: v.contiguous() for k, v in reference.state_dict().items() if k != "lm_head.weight"}
        save_file(state, str(directory / "model.safetensors"))
        ref = reference(torch.tensor([TOKENS])).logits[0].float().numpy()
        loaded = load_model(str(directory))
        decoder = build_decoder(loaded.spec, loaded.state_dict)
        residual = decoder.run_block(decoder.layers[0], decoder.embed(torch.tensor([TOKENS])))
    assert residual.abs().max() > 65504
    opts = ExportOptions(model=str(directory), target="coreml", quant="fp16", out=tmp_path / "a", max_context=CONTEXT)
    runtime, _, _ = open_runtime(run_export(opts)[0])
    logits = every_position_logits(runtime.forward, TOKENS, PREFILL)
    assert np.isfinite(logits).all() and relative_error(logits, ref) <= 0.02
