"""MobileLLM (``MobileLLMForCausalLM``): a Llama whose config says ``share_embedding`` for the tie and, in the LS
variants, ``layer_sharing``: each block runs twice in a row (its own KV cache per run, weights stored once)."""

from __future__ import annotations

from typing import Any

from mlexport.architectures import Architecture


def hf_fields(cfg: dict[str, Any], common: dict[str, Any]) -> dict[str, Any]:
    blocks = len(common["layer_map"])
    repeats = 2 if cfg.get("layer_sharing") else 1
    return {
        **common,
        "tie_embeddings": bool(cfg.get("share_embedding", True)),
        "layer_map": [b for b in range(blocks) for _ in range(repeats)],
        "qkv_bias": bool(cfg.get("attention_bias", False)),
    }


ARCH = Architecture(name="mobilellm", hf_class="MobileLLMForCausalLM", model_types=("mobilellm",), hf_fields=hf_fields)
