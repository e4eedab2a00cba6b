"""One export-friendly Llama-style decoder, built from a ModelSpec.

Why our own decoder instead of transformers' modules: a static KV cache with one cache per *executed* layer (so
MobileLLM-LS block repeats stay correct), shared blocks that alias the same weight modules, a tied head that
reads the embedding's Parameter, and attention that can be swapped for ExecuTorch's fused custom ops. All of it
traces cleanly with torch.export.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import nn

from mlexport.errors import MlexportError
from mlexport.spec import ModelSpec

ATTENTION_BACKENDS = ("torch", "executorch")


def cast(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``x.to(dtype)`` only when it changes something: export records even a no-op cast as two graph nodes,
    and every lowering pass pays for each node."""
    return x if x.dtype == dtype else x.to(dtype)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, weighted: bool = True) -> None:
        super().__init__()
        self.eps = eps
        if weighted:
            self.weight = nn.Parameter(torch.ones(dim))
        else:  # ones that no checkpoint stores or quantizer tunes; every exporter reads ``weight`` alike
            self.register_buffer("weight", torch.ones(dim), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # XNNPACK delegates a mean only over the last two dims of a 4-D tensor, and a reshape only when its shape
        # is static but for one -1. Anything else falls out of the delegate and splits each layer into several
        # partitions, which slows lowering and inference alike. Hence the 4-D view with -1 for the token dim.
        dtype = x.dtype
        x = cast(x, torch.float32)
        # [B, T, D] -> [B, T, 1, D]; QK-norm's [B, T, H, D] -> [B*T, H, 1, D]
        x4 = x.reshape(x.shape[0], -1, 1, x.shape[-1]) if x.dim() == 3 else x.reshape(-1, x.shape[-2], 1, x.shape[-1])
        ms = x4.pow(2).mean(dim=(-1, -2), keepdim=True)
        x4 = x4 * torch.rsqrt(ms + self.eps)
        x = x4.reshape(x.shape[0], -1, x.shape[-1]) if x.dim() == 3 else x4.reshape(x.shape[0], -1, *x.shape[2:])
        return self.weight * cast(x, dtype)


def rope_inv_freq(spec: ModelSpec) -> torch.Tensor:
    """RoPE inverse frequencies, with the scaling schemes transformers applies for Llama 3.x and linear."""
    hd = spec.head_dim
    inv_freq = 1.0 / (spec.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.int64).float() / hd))
    scaling = spec.rope_scaling or {}
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return inv_freq
    if kind == "linear":
        return inv_freq / float(scaling["factor"])
    if kind == "llama3":
        factor = float(scaling["factor"])
        low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
        old_ctx = float(scaling["original_max_position_embeddings"])
        low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_ctx / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        is_medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        return torch.where(is_medium, smoothed, scaled)
    raise ValueError(f"unsupported rope_scaling type {kind!r} (supported: default, linear, llama3)")


def rotate_half_matrix(head_dim: int) -> torch.Tensor:
    """R with x @ R == cat(-x[..., D/2:], x[..., :D/2]): rotate-half as a constant matmul.

    Slices with a dynamic token dimension are not delegated to XNNPACK; a tiny constant matmul is.
    """
    half = head_dim // 2
    r = torch.zeros(head_dim, head_dim)
    r[torch.arange(half) + half, torch.arange(half)] = -1.0
    r[torch.arange(half), torch.arange(half) + half] = 1.0
    return r


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rot_t: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE (the Hugging Face layout) on x [B, T, H, D] with cos/sin [T, 1, D].

    ``F.linear`` (not matmul) keeps the op whole through export: matmul decomposes into mm plus symbolic views.
    """
    return x * cos + F.linear(x, rot_t) * sin


class KVCache(nn.Module):
    """Static cache [B, max_context, n_kv, head_dim] for one executed layer (ExecuTorch's layout)."""

    def __init__(self, max_context: int, n_kv: int, head_dim: int, dtype: torch.dtype) -> None:
        super().__init__()
        shape = (1, max_context, n_kv, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype), persistent=False)


class Attention(nn.Module):
    def __init__(self, spec: ModelSpec, block: int) -> None:
        super().__init__()
        d, hd = spec.dim, spec.head_dim
        self.n_heads, self.n_kv, self.head_dim = spec.n_heads[block], spec.n_kv_heads[block], hd
        self.q_proj = nn.Linear(d, self.n_heads * hd, bias=spec.qkv_bias)
        self.k_proj = nn.Linear(d, self.n_kv * hd, bias=spec.qkv_bias)
        self.v_proj = nn.Linear(d, self.n_kv * hd, bias=spec.qkv_bias)
        self.o_proj = nn.Linear(self.n_heads * hd, d, bias=False)
        self.use_rope = spec.uses_rope(block)
        self.window = spec.window(block)  # attend to the last ``window`` positions only (None: all of them)
        self.local_rope = self.window is not None and spec.local_rope_theta is not None
        if spec.qk_norm or (spec.qk_l2_norm and self.use_rope):
            self.q_norm = RMSNorm(hd, spec.norm_eps, weighted=spec.qk_norm)
            self.k_norm = RMSNorm(hd, spec.norm_eps, weighted=spec.qk_norm)
        else:
            self.q_norm = self.k_norm = None

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        rot: torch.Tensor,
        cache: KVCache | None,
        start: int | None,
        backend: str,
        window_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``window_mask`` (``Decoder.window_mask``) restricts a sliding-window layer; None is plain causal."""
        b, t = x.shape[0], x.shape[1]  # views use -1 for t: symbolic shapes are not delegated (see RMSNorm)
        q = self.q_proj(x).view(b, -1, self.n_heads, self.head_dim)
        k = self.k_proj(x).view(b, -1, self.n_kv, self.head_dim)
        v = self.v_proj(x).view(b, -1, self.n_kv, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if self.use_rope:
            q, k = apply_rope(q, cos, sin, rot), apply_rope(k, cos, sin, rot)

        if cache is None:  # full-sequence reference path: causal attention over this call's tokens only
            out = _sdpa(q, k, v, window_mask, causal=window_mask is None)
        elif backend == "executorch":
            torch.ops.llama.update_cache(cast(k, cache.k.dtype), cache.k, start)
            torch.ops.llama.update_cache(cast(v, cache.v.dtype), cache.v, start)
            if window_mask is None:
                out = torch.ops.llama.custom_sdpa(q, cache.k, cache.v, start, None, 0, True)
            else:  # an additive mask over the whole cache replaces the causal flag
                out = torch.ops.llama.custom_sdpa(q, cache.k, cache.v, start, window_mask, 0, False)
        else:
            cache.k[:, start : start + t] = k.to(cache.k.dtype)
            cache.v[:, start : start + t] = v.to(cache.v.dtype)
            mask = window_mask
            if mask is None:
                positions = torch.arange(cache.k.shape[1], device=x.device)
                query_pos = start + torch.arange(t, device=x.device)
                mask = positions[None, :] <= query_pos[:, None]
            out = _sdpa(q, cache.k.to(q.dtype), cache.v.to(q.dtype), mask, causal=False)
        return self.o_proj(out.reshape(b, -1, self.n_heads * self.head_dim))


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, causal: bool) -> torch.Tensor:
    """Attention on [B, T, H, D] tensors, expanding KV heads for GQA."""
    reps = q.shape[2] // k.shape[2]
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    if reps > 1:
        k = k.repeat_interleave(reps, dim=1)
        v = v.repeat_interleave(reps, dim=1)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)
    return out.transpose(1, 2)


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """GELU's tanh approximation written out: XNNPACK lowers ``gelu`` as the exact (erf) GELU whatever its
    ``approximate`` argument says, which would silently change Gemma's activation."""
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x * x * x)))


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int, activation: str = "silu") -> None:
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)
        self.activation = activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = self.gate_proj(x)
        gate = F.silu(gate) if self.activation == "silu" else gelu_tanh(gate)
        return self.down_proj(gate * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, spec: ModelSpec, block: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(spec.dim, spec.norm_eps)
        self.self_attn = Attention(spec, block)
        self.post_attention_layernorm = RMSNorm(spec.dim, spec.norm_eps)
        self.mlp = MLP(spec.dim, spec.ffn_dim[block], spec.mlp_activation)
        # Gemma normalizes each branch's output too, before its residual add.
        self.attn_out_norm = RMSNorm(spec.dim, spec.norm_eps) if spec.sandwich_norms else None
        self.mlp_out_norm = RMSNorm(spec.dim, spec.norm_eps) if spec.sandwich_norms else None

    def forward(
        self,
        h: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        rot: torch.Tensor,
        cache: KVCache | None = None,
        start: int | None = None,
        backend: str = "torch",
        window_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        attended = self.self_attn(self.input_layernorm(h), cos, sin, rot, cache, start, backend, window_mask)
        h = h + (attended if self.attn_out_norm is None else self.attn_out_norm(attended))
        fed = self.mlp(self.post_attention_layernorm(h))
        return h + (fed if self.mlp_out_norm is None else self.mlp_out_norm(fed))


class HadamardRotation(nn.Module):
    """``x -> x R`` for an orthogonal ``R = diag(signs) (A kron B)``, A and B Hadamard matrices of orders a * b = dim.

    Why: XNNPACK quantizes the tied head's input to int8 per token, and a few outlier channels of the final hidden
    state set each token's range (demo: max 57 against a median channel max of 3.9). Rotated, every channel is
    spread over all of them (QuaRot). The tied table is stored rotated (``E R``), so the logits are unchanged,
    and the lookup rotates its rows back (``undo``). Both run as two small matmuls on an [a, b] view of each
    vector, so the model stores 4 small matrices instead of a dim x dim one.
    """

    def __init__(self, signs: torch.Tensor, outer: torch.Tensor, inner: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("signs", signs.float())
        # Each matmul's weight as F.linear takes it (static constants, so XNNPACK delegates them).
        self.register_buffer("outer", outer.float().contiguous())
        self.register_buffer("outer_t", outer.float().T.contiguous())
        self.register_buffer("inner", inner.float().contiguous())
        self.register_buffer("inner_t", inner.float().T.contiguous())

    def _mix(self, x: torch.Tensor, right: torch.Tensor, left: torch.Tensor) -> torch.Tensor:
        """Each vector x viewed as X [a, b], times two matrices in F.linear's layout: ``(X right^T)^T left^T``,
        transposed back. Shapes stay static but for one -1, which XNNPACK's reshape needs."""
        shape = x.shape
        x = F.linear(x.reshape(-1, left.shape[0], right.shape[0]), right)
        x = F.linear(x.transpose(-1, -2), left).transpose(-1, -2)
        return x.reshape(*shape[:-2], -1, shape[-1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._mix(x * self.signs, self.inner_t, self.outer_t)

    def undo(self, x: torch.Tensor) -> torch.Tensor:
        """``x R^T``, the inverse of ``forward``."""
        return self._mix(x, self.inner, self.outer) * self.signs


class Decoder(nn.Module):
    """forward(tokens [1, T], input_pos [1]) -> logits [1, T, vocab]; input_pos=None runs without the cache.

    State-dict keys follow Hugging Face Llama naming without the ``model.`` prefix, so checkpoints load as is.
    """

    def __init__(
        self,
        spec: ModelSpec,
        max_context: int | None = None,
        backend: str = "torch",
        cache_dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        if backend not in ATTENTION_BACKENDS:
            raise ValueError(f"backend must be one of {ATTENTION_BACKENDS}")
        if backend == "executorch":
            import executorch.extension.llm.custom_ops.custom_ops  # noqa: F401  (registers llama:: ops)
        self.spec = spec
        self.backend = backend
        limit = spec.causal_limit
        self.max_context = max_context or (min(spec.max_context, limit) if limit else spec.max_context)
        if limit is not None and self.max_context > limit:
            raise MlexportError(
                f"a {self.max_context}-token context reaches past where {spec.causal_limit_reason} changes "
                f"attention, which mlexport does not implement; pass --max-context {spec.causal_limit} or less"
            )
        self.layer_map = list(spec.layer_map)
        self.embed_tokens = nn.Embedding(spec.vocab_size, spec.dim)
        self.layers = nn.ModuleList(Block(spec, b) for b in range(spec.n_blocks))
        self.norm = RMSNorm(spec.dim, spec.norm_eps)
        self.lm_head = nn.Linear(spec.dim, spec.vocab_size, bias=False)
        if spec.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.caches = nn.ModuleList(
            KVCache(self.max_context, spec.n_kv_heads[b], spec.head_dim, cache_dtype) for b in self.layer_map
        )
        # A plain attribute, not a buffer: ``.to(fp16)`` must not round the frequencies (angles reach ctx * f).
        self.rope_inv_freq = rope_inv_freq(spec)
        self.local_rope_inv_freq = (
            rope_inv_freq(dataclasses.replace(spec, rope_theta=spec.local_rope_theta, rope_scaling=None))
            if spec.local_rope_theta is not None
            else None
        )
        # Set by quantize.rotation when the plan stores the tied table rotated (ExecuTorch's int8 head).
        self.tie_rotation: HadamardRotation | None = None
        # The head over the last position only: what generation reads, without the head's work and a
        # [tokens, vocab] logits buffer for every other position of a prefill.
        self.last_logits_only = False
        self.register_buffer("rope_rot_t", rotate_half_matrix(spec.head_dim).T.contiguous(), persistent=False)

    def reset_cache(self) -> None:
        for cache in self.caches:
            cache.k.zero_()
            cache.v.zero_()

    def rope(self, start: int, t: int, local: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin [t, 1, head_dim] for positions start..start+t-1 (broadcast over heads); ``local``: the
        sliding-window layers' own base.

        Computed per call rather than stored: a [max_context, head_dim] table pair is 1 MB of the 4-bit demo
        `.pte` at a 2048 context, more than a dozen 8-bit tensor upgrades cost."""
        positions = torch.arange(start, start + t, dtype=torch.float32)
        inv_freq = self.local_rope_inv_freq if local else self.rope_inv_freq
        freqs = positions[:, None] * inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)[:, None, :]
        dtype = self.norm.weight.dtype
        return cast(emb.cos(), dtype), cast(emb.sin(), dtype)

    def window_mask(self, start: int | None, t: int, window: int) -> torch.Tensor:
        """What each of this call's t queries sees in a sliding-window layer: keys in (q - window, q]. Over this
        call's tokens without a cache, else over the whole cache; additive float for ExecuTorch's SDPA."""
        query = torch.arange(t) + (0 if start is None else start)
        keys = torch.arange(t) if start is None else torch.arange(self.max_context)
        allowed = (keys[None, :] <= query[:, None]) & (keys[None, :] > query[:, None] - window)
        if start is not None and self.backend == "executorch":
            zero = torch.zeros((), dtype=self.caches[0].k.dtype)
            return torch.where(allowed, zero, torch.full((), float("-inf"), dtype=zero.dtype))
        return allowed

    def forward(self, tokens: torch.Tensor, input_pos: torch.Tensor | None = None) -> torch.Tensor:
        t = tokens.shape[1]
        if input_pos is None:
            start = None
        else:
            start = input_pos[0].item()
            torch._check(start >= 0)
            torch._check(start + t <= self.max_context)
        # Each RoPE base and window the layers use, computed once for all of them.
        first = 0 if start is None else start
        ropes = {local: self.rope(first, t, local) for local in {b.self_attn.local_rope for b in self.layers}}
        windows = {b.self_attn.window for b in self.layers} - {None}
        masks = {w: self.window_mask(start, t, w) for w in windows}
        h = self.embed(tokens)
        for layer_idx, block_idx in enumerate(self.layer_map):
            block = self.layers[block_idx]
            attn = block.self_attn
            cache = self.caches[layer_idx] if start is not None else None
            cos, sin = ropes[attn.local_rope]
            mask = masks.get(attn.window) if attn.window else None
            h = block(h, cos, sin, self.rope_rot_t, cache, start, self.backend, mask)
        if self.last_logits_only:
            h = h[:, -1:, :]
        return cast(self.lm_head(self.head_input(h)), torch.float32)

    def run_block(self, block: Block, h: torch.Tensor) -> torch.Tensor:
        """``block`` (a stored block or a copy of one) over whole sequences without the cache: what the quantizers
        run block by block."""
        t = h.shape[1]
        attn = block.self_attn
        cos, sin = self.rope(0, t, attn.local_rope)
        mask = self.window_mask(None, t, attn.window) if attn.window else None
        return block(h, cos, sin, self.rope_rot_t, None, None, "torch", mask)

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """The residual stream's first value: the lookup, rotated back when the table is stored rotated, and
        scaled when the family scales it (Gemma)."""
        h = self.embed_tokens(tokens)
        h = h if self.tie_rotation is None else self.tie_rotation.undo(h)
        return h if self.spec.embed_scale is None else h * self.spec.embed_scale

    def head_input(self, h: torch.Tensor) -> torch.Tensor:
        """What the head reads: the final norm's output, rotated like the table when it is stored rotated."""
        h = self.norm(h)
        return h if self.tie_rotation is None else self.tie_rotation(h)


def build_decoder(
    spec: ModelSpec,
    state_dict: dict[str, torch.Tensor],
    max_context: int | None = None,
    backend: str = "torch",
    dtype: torch.dtype = torch.float32,
) -> Decoder:
    """Build the decoder and load weights strictly: a missing or extra key is a loader bug, never ignored."""
    model = Decoder(spec, max_context=max_context, backend=backend, cache_dtype=dtype)
    sd = dict(state_dict)
    if spec.tie_embeddings:
        sd.pop("lm_head.weight", None)
        sd["lm_head.weight"] = sd["embed_tokens.weight"]
    missing, unexpected = model.load_state_dict(sd, strict=False, assign=False)
    if missing or unexpected:
        raise ValueError(f"weights do not fit the spec: missing {missing[:5]}, unexpected {unexpected[:5]}")
    if spec.tie_embeddings:  # load_state_dict copies; make sure the tie survives as one Parameter
        model.lm_head.weight = model.embed_tokens.weight
    return model.to(dtype).eval()
