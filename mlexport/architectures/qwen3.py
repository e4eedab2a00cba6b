"""Qwen3 (``Qwen3ForCausalLM``): a Llama with an RMSNorm on each head's q and k before RoPE."""

from __future__ import annotations

from typing import Any

from mlexport.architectures import Architecture


def hf_fields(cfg: dict[str, Any], common: dict[str, Any]) -> dict[str, Any]:
    return {
        **common,
        "tie_embeddings": bool(cfg.get("tie_word_embeddings", False)),
        "qkv_bias": bool(cfg.get("attention_bias", False)),
        "qk_norm": True,
    }


ARCH = Architecture(
    name="qwen3", hf_class="Qwen3ForCausalLM", model_types=("qwen3",), hf_fields=hf_fields, gguf_names=("qwen3",)
)
