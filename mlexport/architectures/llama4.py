"""Llama 4 text, dense (``Llama4ForCausalLM``, ``llama4_text``): MobileLLM-R1.

What differs from Llama, and how the shared decoder runs it:
- RoPE rotates adjacent pairs of each head, not its two halves. The checkpoint's q and k rows are permuted per head
  so pairs become halves; q·k is unchanged because q and k are permuted alike, and the QK norm has no weight.
- Some layers attend without RoPE (``no_rope_layers``: 1 = RoPE; by default every 4th layer has none).
- ``use_qk_norm``: a weightless RMSNorm of each head's q and k on the RoPE layers. Llama 4 applies it after RoPE;
  a rotation keeps each head's norm, so applying it before is the same.
- Dense MLPs are ``intermediate_size_mlp`` wide and named ``feed_forward``.
- Chunked attention and attention temperature tuning change nothing below their thresholds (8,192 by default),
  so an export up to that context is exact; past it the export is refused (``ModelSpec.causal_limit``).
Mixture-of-experts layers are refused by name.

GGUF (llama.cpp's ``llama4``): q/k rows stay in the checkpoint's interleaved order, which is the order llama.cpp's
Llama permutation produces, so the same regrouping applies. The header carries no ``no_rope_layers``, QK-norm flag
or chunk size: llama.cpp's converter writes ``attention.sliding_window = 0`` when every layer is full attention
(MobileLLM), read here as RoPE and QK-norm on every layer, as the checkpoint it converted had them (llama.cpp's own
runtime skips RoPE on the last layer there). Without that key, llama.cpp's Llama 4 defaults apply: every 4th layer
NoPE and chunked attention of 8,192 on the others.
"""

from __future__ import annotations

from typing import Any

import torch

from mlexport.architectures import Architecture
from mlexport.errors import MlexportError

DEFAULT_THETA = 500000.0  # transformers' Llama4TextConfig default when the config names none


def _moe_layers(cfg: dict[str, Any], n: int) -> list[int]:
    """transformers' rule: ``moe_layers`` if given, else every ``interleave_moe_layer_step``-th layer."""
    if cfg.get("moe_layers") is not None:
        return [int(i) for i in cfg["moe_layers"]]
    step = int(cfg.get("interleave_moe_layer_step", 1))
    return list(range(step - 1, n, step)) if step > 0 else []


def _rope_layers(cfg: dict[str, Any], n: int) -> list[bool]:
    given = cfg.get("no_rope_layers")
    if given:  # transformers treats an empty list as unset
        if len(given) < n:
            raise MlexportError(f"config.json: no_rope_layers lists {len(given)} values for {n} layers; fix it")
        return [bool(v) for v in given[:n]]
    interval = int(cfg.get("no_rope_layer_interval", 4))
    return [(i + 1) % interval != 0 for i in range(n)]


def hf_fields(cfg: dict[str, Any], common: dict[str, Any]) -> dict[str, Any]:
    n = len(common["layer_map"])
    moe = _moe_layers(cfg, n)
    if moe:
        raise MlexportError(
            f"config.json: layers {moe[:4]}{'...' if len(moe) > 4 else ''} are mixture-of-experts (moe_layers / "
            "interleave_moe_layer_step), which mlexport does not export; only dense Llama 4 text models "
            '(MobileLLM-R1: "moe_layers": []) are supported'
        )
    rope = _rope_layers(cfg, n)
    limits = []
    types = cfg.get("layer_types") or ["chunked_attention" if r else "full_attention" for r in rope]
    if "chunked_attention" in types:
        chunk = cfg.get("attention_chunk_size", 8192)  # transformers' default when the key is absent
        if chunk is None:
            raise MlexportError(
                "config.json: layer_types has chunked_attention layers but attention_chunk_size is unset; set it "
                'or make those layers "full_attention"'
            )
        limits.append((int(chunk), f"chunked attention (attention_chunk_size {int(chunk)})"))
    if cfg.get("attn_temperature_tuning", True) and not all(rope):
        floor = int(cfg.get("floor_scale", 8192))
        # q is scaled by 1 + attn_scale * log1p(floor((pos + 1) / floor_scale)): exactly 1 below floor_scale - 1.
        limits.append((floor - 1, f"attention temperature tuning (floor_scale {floor})"))
    limit, reason = min(limits) if limits else (None, None)
    theta = (cfg.get("rope_parameters") or {}).get("rope_theta", cfg.get("rope_theta", DEFAULT_THETA))
    return {
        **common,
        "ffn_dim": [int(cfg.get("intermediate_size_mlp", 16384))] * n,
        "rope_theta": float(theta),
        "tie_embeddings": bool(cfg.get("tie_word_embeddings", False)),
        "qkv_bias": bool(cfg.get("attention_bias", False)),
        "rope_blocks": rope,
        "qk_l2_norm": bool(cfg.get("use_qk_norm", True)),
        "causal_limit": limit,
        "causal_limit_reason": reason,
    }


def _pairs_to_halves(weight: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Rows of each head from (x0, y0, x1, y1, ...) to (x0, x1, ..., y0, y1, ...): interleaved RoPE's pairs become
    rotate-half's halves, with the same frequency per pair."""
    heads = weight.shape[0] // head_dim
    tail = weight.shape[1:]
    return weight.reshape(heads, head_dim // 2, 2, *tail).transpose(1, 2).reshape(weight.shape).contiguous()


def hf_weights(sd: dict[str, Any], spec: Any, cfg: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for key, value in sd.items():
        key = key.replace(".feed_forward.", ".mlp.")
        parts = key.split(".")
        if parts[0] == "layers" and parts[-2] in ("q_proj", "k_proj") and spec.uses_rope(int(parts[1])):
            value = _pairs_to_halves(value, spec.head_dim)
        out[key] = value
    return out


GGUF_NOPE_INTERVAL = 4  # llama.cpp's Llama 4 layer pattern when the header does not say every layer is full
GGUF_CHUNK = 8192


def gguf_fields(field: Any, common: dict[str, Any]) -> dict[str, Any]:
    n = len(common["layer_map"])
    experts, step = int(field("expert_count", 0) or 0), int(field("interleave_moe_layer_step", 0) or 0)
    if experts and step:
        raise MlexportError(
            f"the GGUF's llama4 layers are mixture-of-experts ({experts} experts every {step} layers), which mlexport "
            "does not export; only dense Llama 4 text models (MobileLLM-R1) are supported"
        )
    window = field("attention.sliding_window", None)
    if window is not None and int(window) == 0:
        rope, limit, reason = [True] * n, None, None
    else:
        chunk = int(window) if window else GGUF_CHUNK
        rope = [(i + 1) % GGUF_NOPE_INTERVAL != 0 for i in range(n)]
        limit, reason = min(
            (chunk, f"chunked attention (attention.sliding_window {chunk})"),
            (GGUF_CHUNK - 1, f"attention temperature tuning (floor_scale {GGUF_CHUNK})"),
        )
    return {**common, "rope_blocks": rope, "qk_l2_norm": True, "causal_limit": limit, "causal_limit_reason": reason}


ARCH = Architecture(
    name="llama4",
    hf_class="Llama4ForCausalLM",
    model_types=("llama4_text",),
    hf_fields=hf_fields,
    hf_weights=hf_weights,
    gguf_names=("llama4",),
    # Interleaved pairs, as llama.cpp's Llama permutation leaves q/k: regrouped into halves the same way.
    gguf_rope_rows_permuted=True,
    gguf_fields=gguf_fields,
    # Llama 3's byte-level BPE vocabulary, which transformers converts for "llama" GGUFs (it has no "llama4").
    gguf_tokenizer_arch="llama",
)
