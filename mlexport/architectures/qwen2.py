"""Qwen2 (``Qwen2ForCausalLM``, Qwen2.5): a Llama with biases on q, k and v."""

from __future__ import annotations

from typing import Any

from mlexport.architectures import Architecture


def hf_fields(cfg: dict[str, Any], common: dict[str, Any]) -> dict[str, Any]:
    return {**common, "tie_embeddings": bool(cfg.get("tie_word_embeddings", False)), "qkv_bias": True}


ARCH = Architecture(
    name="qwen2", hf_class="Qwen2ForCausalLM", model_types=("qwen2",), hf_fields=hf_fields, gguf_names=("qwen2",)
)
