"""Gemma 3 text (``Gemma3ForCausalLM``, ``gemma3_text``): Gemma-3-270M and its larger siblings' text stacks.

What differs from Llama, and how the shared decoder runs it:
- RMSNorm scales by ``1 + w``: the checkpoint's gains are stored as ``w`` and loaded as ``1 + w``.
- Four norms a layer ("sandwich"): Gemma's ``post_attention_layernorm`` and ``post_feedforward_layernorm`` normalize
  each branch's output before its residual add (``attn_out_norm``, ``mlp_out_norm`` here); its
  ``pre_feedforward_layernorm`` is the MLP's input norm (Llama's ``post_attention_layernorm``).
- GeGLU (``gelu_pytorch_tanh``), the embedding scaled by sqrt(hidden), a weighted QK norm (Qwen3's).
- Attention scores scale by ``query_pre_attn_scalar ** -0.5``: folded into the q norm's gains, so every target keeps
  its default 1/sqrt(head_dim).
- Sliding-window layers (``layer_types``, by default 5 of every 6) attend to their last ``sliding_window`` positions
  and use their own RoPE base; the full-attention layers use the global base and its scaling.
Logit soft-capping and bidirectional attention are refused by name.
"""

from __future__ import annotations

import math
from typing import Any

from mlexport.architectures import Architecture
from mlexport.errors import MlexportError

GLOBAL_THETA, LOCAL_THETA = 1_000_000.0, 10_000.0  # transformers' defaults when the config names none


def _layer_types(cfg: dict[str, Any], n: int) -> list[str]:
    types = cfg.get("layer_types")
    if types:
        if len(types) < n:
            raise MlexportError(f"config.json: layer_types lists {len(types)} values for {n} layers; fix it")
        return list(types[:n])
    pattern = int(cfg.get("sliding_window_pattern", 6))
    return ["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(n)]


def _rope(cfg: dict[str, Any]) -> tuple[float, dict[str, Any] | None, float]:
    """(global theta, global scaling, local theta) from either config layout transformers reads."""
    params = cfg.get("rope_parameters") or {}
    full = dict(params.get("full_attention") or {})
    local = dict(params.get("sliding_attention") or {})
    if cfg.get("rope_scaling"):
        full.update(cfg["rope_scaling"])
    theta = float(full.get("rope_theta", cfg.get("rope_theta", GLOBAL_THETA)))
    local_theta = float(local.get("rope_theta", cfg.get("rope_local_base_freq", LOCAL_THETA)))
    if local.get("rope_type", "default") != "default":
        raise MlexportError("config.json: the sliding layers' RoPE has a scaling type, which mlexport does not read")
    kind = full.get("rope_type", full.get("type", "default"))
    scaling = None if kind == "default" else {k: v for k, v in full.items() if k != "rope_theta"}
    return theta, scaling, local_theta


def hf_fields(cfg: dict[str, Any], common: dict[str, Any]) -> dict[str, Any]:
    for key in ("final_logit_softcapping", "attn_logit_softcapping"):
        if cfg.get(key) is not None:
            raise MlexportError(f"config.json: {key} is set, which mlexport does not export (Gemma 3 leaves it null)")
    if cfg.get("use_bidirectional_attention"):
        raise MlexportError("config.json: use_bidirectional_attention is set; mlexport exports causal decoders only")
    act = cfg.get("hidden_activation", "gelu_pytorch_tanh")
    if act != "gelu_pytorch_tanh":
        raise MlexportError(f"config.json: hidden_activation {act!r} is not gelu_pytorch_tanh, the one mlexport runs")
    n = len(common["layer_map"])
    types = _layer_types(cfg, n)
    unknown = sorted(set(types) - {"sliding_attention", "full_attention"})
    if unknown:
        raise MlexportError(f"config.json: layer_types has {unknown[0]!r}; mlexport knows sliding and full attention")
    theta, scaling, local_theta = _rope(cfg)
    sliding = [t == "sliding_attention" for t in types]
    return {
        **common,
        "norm_eps": float(cfg.get("rms_norm_eps", 1e-6)),
        "rope_theta": theta,
        "rope_scaling": scaling,
        "tie_embeddings": bool(cfg.get("tie_word_embeddings", True)),
        "qkv_bias": bool(cfg.get("attention_bias", False)),
        "qk_norm": True,
        "mlp_activation": "gelu_tanh",
        "sandwich_norms": True,
        "embed_scale": math.sqrt(common["dim"]),
        "sliding_window": int(cfg.get("sliding_window") or 4096) if any(sliding) else None,
        "sliding_blocks": sliding if any(sliding) else None,
        "local_rope_theta": local_theta if any(sliding) else None,
    }


_NORM_NAMES = {  # Gemma's per-layer norm -> the decoder's
    "input_layernorm": "input_layernorm",
    "post_attention_layernorm": "attn_out_norm",
    "pre_feedforward_layernorm": "post_attention_layernorm",
    "post_feedforward_layernorm": "mlp_out_norm",
}


def hf_weights(sd: dict[str, Any], spec: Any, cfg: dict[str, Any]) -> dict[str, Any]:
    # q·k / sqrt(head_dim) * sqrt(head_dim / query_pre_attn_scalar) = q·k / sqrt(query_pre_attn_scalar)
    q_gain = math.sqrt(spec.head_dim / float(cfg.get("query_pre_attn_scalar", 256)))
    out = {}
    for key, value in sd.items():
        parts = key.split(".")
        if parts[0] == "layers" and parts[2] in _NORM_NAMES:
            parts[2] = _NORM_NAMES[parts[2]]
            key = ".".join(parts)
        if key.endswith("norm.weight"):
            value = 1.0 + value  # Gemma's RMSNorm scales by 1 + w
            if key.endswith("self_attn.q_norm.weight"):
                value = value * q_gain
        out[key] = value
    return out


# llama.cpp's Gemma 3 layout, which the GGUF header does not carry: every 6th layer global, the local base 10,000.
# Its GGUF already stores the norms' gains as 1 + w, and the attention scale as 1/sqrt(head_dim) (all but 27B).
GGUF_PATTERN = 6


def gguf_fields(field: Any, common: dict[str, Any]) -> dict[str, Any]:
    n = len(common["layer_map"])
    window = field("attention.sliding_window", None)
    sliding = [(i + 1) % GGUF_PATTERN != 0 for i in range(n)] if window else None
    return {
        **common,
        "qk_norm": True,
        "mlp_activation": "gelu_tanh",
        "sandwich_norms": True,
        "embed_scale": math.sqrt(common["dim"]),
        "sliding_window": int(window) if window else None,
        "sliding_blocks": sliding,
        "local_rope_theta": float(field("rope.freq_base_swa", LOCAL_THETA)) if window else None,
    }


ARCH = Architecture(
    name="gemma3",
    hf_class="Gemma3ForCausalLM",
    model_types=("gemma3_text",),
    hf_fields=hf_fields,
    hf_weights=hf_weights,
    gguf_names=("gemma3",),
    gguf_fields=gguf_fields,
)
