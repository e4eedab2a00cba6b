"""Llama (``LlamaForCausalLM``): SmolLM, Llama 3.2 and any plain Llama-style decoder; the common fields as they are."""

from __future__ import annotations

from typing import Any

from mlexport.architectures import Architecture


def hf_fields(cfg: dict[str, Any], common: dict[str, Any]) -> dict[str, Any]:
    return {
        **common,
        "tie_embeddings": bool(cfg.get("tie_word_embeddings", False)),
        "qkv_bias": bool(cfg.get("attention_bias", False)),
    }


ARCH = Architecture(
    name="llama",
    hf_class="LlamaForCausalLM",
    model_types=("llama",),
    hf_fields=hf_fields,
    gguf_names=("llama",),
    gguf_rope_rows_permuted=True,
)
