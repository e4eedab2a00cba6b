"""The normalized model spec: the one description of a decoder every later stage reads.

Every supported source (HF Llama/Qwen/MobileLLM configs, GGUF metadata) is reduced to this dataclass, so the
decoder, the sharing analysis, the quantizers and the exporters never look at a source format again.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any


@dataclass
class ModelSpec:
    """Architecture of a Llama-style decoder, with per-block widths and an executed-layer → block map."""

    name: str
    arch: str  # an ``mlexport.architectures`` family (all Llama-style: RMSNorm, SwiGLU, RoPE)
    vocab_size: int
    dim: int
    head_dim: int
    n_heads: list[int]  # per stored block
    n_kv_heads: list[int]  # per stored block
    ffn_dim: list[int]  # per stored block
    layer_map: list[int]  # executed layer index -> stored block index (MobileLLM-LS repeats blocks)
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    tie_embeddings: bool = True
    qkv_bias: bool = False
    qk_norm: bool = False  # a weighted RMSNorm on each head's q and k (Qwen3)
    # Blocks that rotate q and k (RoPE); None: all. The others attend without positions (Llama 4's NoPE layers).
    rope_blocks: list[bool] | None = None
    qk_l2_norm: bool = False  # a weightless RMSNorm on each head's q and k, on RoPE blocks only (Llama 4)
    # The longest context the model's attention is plain causal attention over: a chunked-attention layer's chunk,
    # or where Llama 4's attention temperature tuning starts scaling q. An export may not reach past it.
    causal_limit: int | None = None
    causal_limit_reason: str | None = None
    mlp_activation: str = "silu"  # the gate's activation: "silu" (SwiGLU) or "gelu_tanh" (Gemma's GeGLU)
    # Gemma's extra norms on the attention's and the MLP's outputs, before each residual add.
    sandwich_norms: bool = False
    embed_scale: float | None = None  # the lookup's rows times this (Gemma: sqrt(dim)); the tied head reads them as is
    # Sliding-window attention: the blocks that attend to their last ``sliding_window`` positions only, and the
    # RoPE base those blocks use (Gemma 3's local layers); the others attend to the whole context.
    sliding_window: int | None = None
    sliding_blocks: list[bool] | None = None
    local_rope_theta: float | None = None
    max_context: int = 2048
    bos_id: int | None = None
    eos_ids: list[int] = field(default_factory=list)
    chat_template: str | None = None

    @property
    def n_blocks(self) -> int:
        return len(self.n_heads)

    def uses_rope(self, block: int) -> bool:
        return self.rope_blocks is None or bool(self.rope_blocks[block])

    def window(self, block: int) -> int | None:
        """The sliding window of ``block``, or None when it attends to the whole context."""
        if self.sliding_window is None or not self.sliding_blocks or not self.sliding_blocks[block]:
            return None
        return self.sliding_window

    def features(self) -> set[str]:
        """What this spec needs of an exporter beyond the plain Llama decoder (each target says what it runs)."""
        used = set()
        if any(self.window(b) for b in range(self.n_blocks)):
            used.add("sliding_window")
        if self.sandwich_norms:
            used.add("sandwich_norms")
        if self.mlp_activation != "silu":
            used.add(f"mlp_activation={self.mlp_activation}")
        if self.embed_scale is not None:
            used.add("embed_scale")
        return used

    @property
    def n_layers(self) -> int:
        """Executed layers: each needs its own KV cache, even when it reuses a stored block's weights."""
        return len(self.layer_map)

    def __post_init__(self) -> None:
        n = len(self.n_heads)
        if not (len(self.n_kv_heads) == len(self.ffn_dim) == n):
            raise ValueError("per-block lists n_heads, n_kv_heads and ffn_dim must have one entry per block")
        if any(b < 0 or b >= n for b in self.layer_map):
            raise ValueError(f"layer_map refers to a block outside 0..{n - 1}")
        for name in ("rope_blocks", "sliding_blocks"):
            flags = getattr(self, name)
            if flags is not None and len(flags) != n:
                raise ValueError(f"{name} lists {len(flags)} blocks, the spec has {n}")
        if self.mlp_activation not in ("silu", "gelu_tanh"):
            raise ValueError(f"mlp_activation {self.mlp_activation!r} is not silu or gelu_tanh")
        for h, kv in zip(self.n_heads, self.n_kv_heads, strict=True):
            if kv <= 0 or h % kv:
                raise ValueError(f"n_heads {h} is not a multiple of n_kv_heads {kv}")

    def param_count(self, unique: bool = True) -> int:
        """Parameters stored (unique=True, the tie and repeated blocks counted once) or executed (naive)."""
        blocks = range(self.n_blocks) if unique else self.layer_map
        total = 0
        d, hd = self.dim, self.head_dim
        for b in blocks:
            h, kv, f = self.n_heads[b], self.n_kv_heads[b], self.ffn_dim[b]
            total += 2 * d * hd * h + 2 * d * hd * kv + 3 * d * f + (4 if self.sandwich_norms else 2) * d
            if self.qkv_bias:
                total += hd * (h + 2 * kv)
            if self.qk_norm:
                total += 2 * hd
        total += d + self.vocab_size * d
        if not self.tie_embeddings or not unique:
            total += self.vocab_size * d
        return total

    def weight_shapes(self) -> dict[str, tuple[int, ...]]:
        """Every stored tensor's name and shape (Hugging Face names without ``model.``): what a checkpoint must
        hold for this spec."""
        d, hd = self.dim, self.head_dim
        shapes: dict[str, tuple[int, ...]] = {"embed_tokens.weight": (self.vocab_size, d), "norm.weight": (d,)}
        if not self.tie_embeddings:
            shapes["lm_head.weight"] = (self.vocab_size, d)
        for b in range(self.n_blocks):
            h, kv, f, p = self.n_heads[b], self.n_kv_heads[b], self.ffn_dim[b], f"layers.{b}."
            shapes |= {
                p + "self_attn.q_proj.weight": (h * hd, d),
                p + "self_attn.k_proj.weight": (kv * hd, d),
                p + "self_attn.v_proj.weight": (kv * hd, d),
                p + "self_attn.o_proj.weight": (d, h * hd),
                p + "mlp.gate_proj.weight": (f, d),
                p + "mlp.up_proj.weight": (f, d),
                p + "mlp.down_proj.weight": (d, f),
                p + "input_layernorm.weight": (d,),
                p + "post_attention_layernorm.weight": (d,),
            }
            if self.qkv_bias:
                shapes |= {
                    p + "self_attn.q_proj.bias": (h * hd,),
                    p + "self_attn.k_proj.bias": (kv * hd,),
                    p + "self_attn.v_proj.bias": (kv * hd,),
                }
            if self.qk_norm:
                shapes |= {p + "self_attn.q_norm.weight": (hd,), p + "self_attn.k_norm.weight": (hd,)}
            if self.sandwich_norms:
                shapes |= {p + "attn_out_norm.weight": (d,), p + "mlp_out_norm.weight": (d,)}
        return shapes

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelSpec:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)
