"""Our export-friendly decoder must equal transformers on the same weights: prefill and step-by-step decode."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from tiny import VOCAB, llama_config, make_transformers_model, save_hf_dir

from mlexport.model import build_decoder
from mlexport.sources import load_model

TOL = 1e-4

CONFIGS = {
    "llama": llama_config(),
    "llama-untied": llama_config(tie_word_embeddings=False),
    "llama3-rope-scaling": llama_config(
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        }
    ),
    "qwen2": llama_config(architectures=["Qwen2ForCausalLM"], model_type="qwen2", tie_word_embeddings=True),
    "qwen3": llama_config(architectures=["Qwen3ForCausalLM"], model_type="qwen3", head_dim=32),
}


def _check_against(reference_logits_fn, model, tokens: torch.Tensor) -> None:  # noqa: ANN001
    with torch.no_grad():
        ref = reference_logits_fn(tokens)
        full = model(tokens)
        assert (full - ref).abs().max() <= TOL, "no-cache forward differs from transformers"
        model.reset_cache()
        split = 7
        pre = model(tokens[:, :split], torch.tensor([0]))
        assert (pre - ref[:, :split]).abs().max() <= TOL, "prefill with cache differs"
        for pos in range(split, tokens.shape[1]):
            step = model(tokens[:, pos : pos + 1], torch.tensor([pos]))
            assert (step[:, 0] - ref[:, pos]).abs().max() <= TOL, f"decode step at {pos} differs"


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_decoder_matches_transformers(tmp_path: Path, name: str) -> None:
    cfg = CONFIGS[name]
    reference = save_hf_dir(tmp_path / name, cfg)
    loaded = load_model(str(tmp_path / name))
    assert loaded.spec.arch == cfg["model_type"]
    model = build_decoder(loaded.spec, loaded.state_dict, max_context=64)
    tokens = torch.randint(0, VOCAB, (1, 12), generator=torch.Generator().manual_seed(1))
    _check_against(lambda t: reference(t).logits, model, tokens)


def test_mobilellm_layer_sharing_matches_repeated_blocks(tmp_path: Path) -> None:
    """MobileLLM-LS: each stored block runs twice in a row, each run with its own KV cache."""
    cfg = llama_config(
        architectures=["MobileLLMForCausalLM"], model_type="mobilellm", share_embedding=True, layer_sharing=True
    )
    cfg.pop("tie_word_embeddings")
    cfg["auto_map"] = {"AutoModelForCausalLM": "modeling_mobilellm.MobileLLMForCausalLM"}
    stored = save_hf_dir(tmp_path / "ls", cfg, fmt="bin")  # fp16 pytorch_model.bin, as the Hub ships it
    loaded = load_model(str(tmp_path / "ls"))
    assert loaded.spec.layer_map == [0, 0, 1, 1]
    assert loaded.spec.tie_embeddings
    model = build_decoder(loaded.spec, loaded.state_dict, max_context=64)
    assert model.layers[0] is model.layers[loaded.spec.layer_map[1]]

    # Reference: a plain transformers Llama with the blocks repeated (fp16-rounded weights, as stored).
    stored.half().float()
    expanded = copy.deepcopy(stored)
    expanded.model.layers = torch.nn.ModuleList(
        copy.deepcopy(stored.model.layers[i // 2]) for i in range(2 * len(stored.model.layers))
    )
    for i, layer in enumerate(expanded.model.layers):
        layer.self_attn.layer_idx = i
    expanded.config.num_hidden_layers = len(expanded.model.layers)
    expanded.config.layer_types = ["full_attention"] * len(expanded.model.layers)
    tokens = torch.randint(0, VOCAB, (1, 12), generator=torch.Generator().manual_seed(2))
    _check_against(lambda t: expanded(t).logits, model, tokens)


def test_per_layer_widths_match_per_layer_transformers_blocks(tmp_path: Path) -> None:
    """Adapt-Pruner style lists: each layer is checked against a transformers layer built with its own widths."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

    heads, kv, ffn = [4, 2], [2, 1], [128, 96]
    cfg = llama_config(num_attention_heads=heads, num_key_value_heads=kv, intermediate_size=ffn)
    torch.manual_seed(3)
    base = {k: v for k, v in cfg.items() if k not in ("architectures", "model_type")}
    layers = []
    for i in range(2):
        layer_cfg = LlamaConfig(
            **{**base, "num_attention_heads": heads[i], "num_key_value_heads": kv[i], "intermediate_size": ffn[i]}
        )
        layer = LlamaDecoderLayer(layer_cfg, layer_idx=i).eval()
        with torch.no_grad():
            for n, p in layer.named_parameters():
                p.copy_(torch.randn_like(p) * (0.1 if "norm" not in n else 0.1) + (1.0 if "norm" in n else 0.0))
        layers.append(layer)
    embed = torch.randn(VOCAB, 64) * 0.5
    norm = 1.0 + 0.1 * torch.randn(64)
    sd = {"model.embed_tokens.weight": embed, "model.norm.weight": norm}
    for i, layer in enumerate(layers):
        sd.update({f"model.layers.{i}.{k}": v for k, v in layer.state_dict().items()})
    directory = tmp_path / "pruned"
    directory.mkdir()
    import json

    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in sd.items()}, str(directory / "model.safetensors"))
    (directory / "config.json").write_text(json.dumps(cfg))
    loaded = load_model(str(directory))
    assert loaded.spec.n_heads == heads and loaded.spec.ffn_dim == ffn
    model = build_decoder(loaded.spec, loaded.state_dict, max_context=64)
    rope = LlamaRotaryEmbedding(
        LlamaConfig(**{**base, "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 128})
    )

    def reference(tokens: torch.Tensor) -> torch.Tensor:
        t = tokens.shape[1]
        h = torch.nn.functional.embedding(tokens, embed)
        pos = torch.arange(t)[None]
        cos_sin = rope(h, pos)
        mask = torch.full((t, t), float("-inf")).triu(1)[None, None]
        for layer in layers:
            h = layer(h, attention_mask=mask, position_ids=pos, position_embeddings=cos_sin)
            h = h[0] if isinstance(h, tuple) else h
        var = h.pow(2).mean(-1, keepdim=True)
        return (norm * (h * torch.rsqrt(var + 1e-5))) @ embed.T

    tokens = torch.randint(0, VOCAB, (1, 12), generator=torch.Generator().manual_seed(4))
    _check_against(reference, model, tokens)


def test_param_count_matches_published_mobilellm_125m() -> None:
    from mlexport.spec import ModelSpec

    spec = ModelSpec(
        name="MobileLLM-125M",
        arch="mobilellm",
        vocab_size=32000,
        dim=576,
        head_dim=64,
        n_heads=[9] * 30,
        n_kv_heads=[3] * 30,
        ffn_dim=[1536] * 30,
        layer_map=list(range(30)),
    )
    assert spec.param_count() == 124_635_456


def test_reference_model_is_deterministic() -> None:
    a = make_transformers_model(llama_config(), seed=0)
    b = make_transformers_model(llama_config(), seed=0)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))
