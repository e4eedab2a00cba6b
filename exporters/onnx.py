"""ONNX exporter: the decoder written as onnxruntime's fused contrib ops, sharing-aware, for the CPU provider.

Why we write the graph from the decoder's modules instead of tracing it: the fast path on onnxruntime is a handful
of fused contrib ops (GroupQueryAttention with rotary, SkipSimplifiedLayerNormalization, MatMulNBits,
GatherBlockQuantized) that no exporter emits from a trace, and the stock int4 quantizer silently skips shared
weights. Writing the graph directly gives both, in seconds:

- every stored tensor becomes one initializer, named after its module, whoever uses it: an LS block's weights feed
  both of its executions, and a tied embedding reads the head's int4 blocks through GatherBlockQuantized;
- quantized values come from the same torchao tensors the eager reference runs, so export error is measured
  against exactly these weights;
- the inputs and outputs follow onnxruntime-genai's layout, and a genai_config.json is written next to the model.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from mlexport.exporters.profile import TargetProfile
from mlexport.quantize import QuantPlan
from torch import nn

from mlexport.errors import MlexportError
from mlexport.model import Decoder, RMSNorm
from mlexport.spec import ModelSpec

ONNX_NAME = "model.onnx"
DATA_NAME = "model.onnx.data"
OPSET = 21
IR_VERSION = 10
MS = "com.microsoft"
# SkipSimplifiedLayerNormalization's mean and inverse-std outputs (training only): left unnamed, the kernel skips
# them. Named, they cost ~100 us per decoded token on the demo (60 nodes), 1.5% of decode.
SKIP_STATS = (1, 2)
DEFAULT_ACCURACY_LEVEL = 4  # int8 activations inside MatMulNBits: the fast CPU path, like XNNPACK's 8da4w


class GraphWriter:
    """Collects nodes and initializers; each initializer records the logical tensors it serves."""

    def __init__(self) -> None:
        from onnx import helper, numpy_helper

        self.helper, self.numpy_helper = helper, numpy_helper
        self.nodes: list[Any] = []
        self.initializers: dict[str, Any] = {}
        self.sources: dict[str, list[str]] = {}
        self._count = 0

    def const(self, name: str, array: np.ndarray, serves: list[str] | None = None) -> str:
        if name not in self.initializers:
            self.initializers[name] = self.numpy_helper.from_array(np.ascontiguousarray(array), name)
            self.sources[name] = serves or [name]
        return name

    def fp16_const(self, name: str, array: np.ndarray, serves: list[str] | None = None) -> str:
        """A float constant stored as fp16 and read as fp32 through a Cast: onnxruntime folds the Cast into an fp32
        initializer when the session loads (so MatMulNBits still prepacks it), while the file keeps half the bytes.
        Used for quantization scales and float zero points, whose fp16 rounding is far below the 4-bit step."""
        cast = f"{name}/fp32"
        if name not in self.initializers:  # first use: store it and its one Cast
            stored = self.const(name, np.asarray(array, np.float32).astype(np.float16), serves)
            self.nodes.append(self.helper.make_node("Cast", [stored], [cast], name=f"/cast_{name}", to=1))
        return cast

    def node(
        self,
        op: str,
        inputs: list[str],
        n_out: int = 1,
        domain: str = "",
        name: str = "",
        unused: tuple[int, ...] = (),
        **attrs: Any,
    ) -> Any:
        """Append one node; ``unused`` output slots get the empty name, so the kernel skips computing them."""
        self._count += 1
        base = f"/{name or op.lower()}_{self._count}"
        outputs = ["" if i in unused else f"{base}/out{i}" for i in range(n_out)]
        self.nodes.append(self.helper.make_node(op, inputs, outputs, name=base, domain=domain, **attrs))
        return outputs[0] if n_out == 1 else outputs

    def rename(self, old: str, new: str) -> None:
        """Make a node write a graph output directly. An Identity in between would copy the KV buffers that
        onnxruntime-genai shares between past and present (the whole cache, every layer, every token)."""
        for node in self.nodes:
            for i, name in enumerate(node.output):
                if name == old:
                    node.output[i] = new
            for i, name in enumerate(node.input):
                if name == old:
                    node.input[i] = new


class LinearWriter:
    """Maps one Linear's (quantized) weight onto MatMulNBits or MatMul, once per stored tensor."""

    def __init__(self, g: GraphWriter, plan: QuantPlan, accuracy_level: int) -> None:
        self.g, self.plan, self.accuracy_level = g, plan, accuracy_level
        self._done: dict[int, tuple[str, ...]] = {}
        self.block_offsets: dict[str, str] = {}  # packed key -> [K/block, N] offsets of a float-zero-point grid
        self._block_sums: dict[tuple[str, int, int], str] = {}

    def packed_nbits(
        self, key: str, names: list[str], weights: list[torch.Tensor], serves: list[str] | None = None
    ) -> tuple[str, str, str | None, int, int, int]:
        """(B, scales, zero points or None, bits, block, N) for the row-concatenation of ``weights`` (one packed
        QKV, or a single one). Integer zero points are uint8, shifted like B, two 4-bit ones to a byte, padded per
        row; float ones (a reused Q4_1 grid) are one per block, shifted too. Scales and float zero points are
        stored as fp16 (``GraphWriter.fp16_const``)."""
        parts = [_intx_parts(w, n) for w, n in zip(weights, names, strict=True)]
        bits = {p[2] for p in parts}
        blocks = {p[3] for p in parts}
        zero_kinds = {None if p[4] is None else p[4].dtype.kind for p in parts}
        if len(bits) != 1 or len(blocks) != 1 or len(zero_kinds) != 1:
            raise MlexportError(f"cannot pack {names}: mixed quantization {bits} / {blocks} / zero points {zero_kinds}")
        q = np.concatenate([p[0] for p in parts])
        scale = np.concatenate([p[1] for p in parts]).astype(np.float32)
        bit, block = bits.pop(), blocks.pop()
        n, k = q.shape
        u = (q.astype(np.int16) + (1 << (bit - 1))).astype(np.uint8).reshape(n, k // block, block)
        if bit == 4:
            u = (u[..., 0::2] | (u[..., 1::2] << 4)).astype(np.uint8)
        b = self.g.const(f"{key}.qweight", u, serves or names)
        s = self.g.fp16_const(f"{key}.scales", scale.reshape(n, k // block), serves or names)
        zp = None
        kind = zero_kinds.pop()
        if kind == "f":
            # MatMulNBits with float zero points runs a slow generic path (measured: 2.2 ms against 35 us for one
            # token of a 576x1536 weight). So B runs symmetric, scale * q, on the fast kernel, and the zero points'
            # part, -scale * zero per block, becomes an exact per-block correction: (block sums of x) @ offsets.
            z = np.concatenate([p[4] for p in parts]).astype(np.float32).reshape(n, k // block)
            self.block_offsets[key] = self.g.fp16_const(
                f"{key}.block_offsets", (-scale.reshape(n, -1) * z).T, serves or names
            )
        elif kind is not None:
            z = (np.concatenate([p[4] for p in parts]).astype(np.int16) + (1 << (bit - 1))).astype(np.uint8)
            if bit == 4:
                if z.shape[1] % 2:
                    z = np.concatenate([z, np.zeros((n, 1), np.uint8)], axis=1)
                z = (z[:, 0::2] | (z[:, 1::2] << 4)).astype(np.uint8)
            zp = self.g.const(f"{key}.zero_points", z, serves or names)
        return b, s, zp, bit, block, n

    def block_sums(self, x: str, k: int, block: int) -> str:
        """x [batch, seq, k] summed over each block of ``block`` columns: [batch, seq, k / block]. Once per input."""
        cache = (x, k, block)
        if cache not in self._block_sums:
            shape = self.g.const(f"const.blocks.{k}x{block}", np.array([0, 0, k // block, block], np.int64))
            axes = self.g.const("const.axes.last", np.array([-1], np.int64))
            self._block_sums[cache] = self.g.node("ReduceSum", [self.g.node("Reshape", [x, shape]), axes], keepdims=0)
        return self._block_sums[cache]

    def apply(self, x: str, key: str, modules: list[nn.Linear]) -> str:
        """x @ W.T (+ bias) for the row-concatenation of ``modules``' weights; one initializer per stored tensor."""
        names = [_fqn(m) for m in modules]
        weights = [m.weight for m in modules]
        k = modules[0].in_features
        scheme = self.plan.tensors[names[0]].scheme
        if scheme in ("fp32", "fp16"):
            cache_key = id(modules[0].weight)
            if cache_key not in self._done:
                w = torch.cat([w.detach().float() for w in weights]).T.contiguous().numpy()
                w = w.astype(np.float16 if scheme == "fp16" else np.float32)
                self._done[cache_key] = (self.g.const(f"{key}.weight_t", w, names),)
            (w_name,) = self._done[cache_key]
            if scheme == "fp16":
                w_name = self.g.node("Cast", [w_name], to=1)  # constant-folded once at session load
            y = self.g.node("MatMul", [x, w_name])
        else:
            b, s, zp, bits, block, n = self.packed_nbits(key, names, weights)
            y = self.g.node(
                "MatMulNBits",
                [x, b, s, *([zp] if zp else [])],
                domain=MS,
                K=k,
                N=n,
                bits=bits,
                block_size=block,
                accuracy_level=self.accuracy_level,
            )
            if key in self.block_offsets:
                y = self.g.node(
                    "Add", [y, self.g.node("MatMul", [self.block_sums(x, k, block), self.block_offsets[key]])]
                )
        biases = [m.bias for m in modules if m.bias is not None]
        if biases:
            bias = torch.cat([bb.detach().float() for bb in biases]).numpy()
            bias_names = [n.removesuffix(".weight") + ".bias" for n in names]
            y = self.g.node("Add", [y, self.g.const(f"{key}.bias", bias, bias_names)])
        return y


def _pack_key(q: Any) -> tuple:
    return (q.scheme, q.bits, q.group_size, q.asymmetric, q.source) if q is not None else ()


def _fqn(module: nn.Module) -> str:
    return getattr(module, "_mlexport_fqn", "?") + ".weight"


def _intx_parts(weight: torch.Tensor, name: str) -> tuple[np.ndarray, np.ndarray, int, int, np.ndarray | None]:
    """(int values [N, K], scales [N, K/block], bits, block, zero points [N, K/block] or None) from torchao's
    unpacked intx tensor."""
    data = weight.data if isinstance(weight, nn.Parameter) else weight
    qdata, scale = getattr(data, "qdata", None), getattr(data, "scale", None)
    if qdata is None or scale is None:
        raise MlexportError(f"{name} is not a torchao intx tensor ({type(data).__name__}); cannot map it to ONNX")
    zero = getattr(data, "zero_point", None)
    if zero is not None and zero.any():
        zero = zero.reshape(scale.shape[0], -1)
        zero = (zero.float() if zero.is_floating_point() else zero.to(torch.int8)).numpy()
    else:
        zero = None
    bits = {torch.int4: 4, torch.int8: 8}.get(data.target_dtype)
    if bits is None:
        raise MlexportError(f"{name}: {data.target_dtype} has no MatMulNBits mapping")
    block = int(data.block_size[-1])
    n, k = qdata.shape
    if block == k or block & (block - 1) or block < 16:
        raise MlexportError(
            f"{name}: block {block} is not a power of two >= 16 (per-channel); ONNX MatMulNBits needs blocks. "
            "Plan it with per_channel_int8=False"
        )
    return qdata.to(torch.int8).numpy(), scale.float().reshape(n, k // block).numpy(), bits, block, zero


def build_graph(model: Decoder, plan: QuantPlan, accuracy_level: int = DEFAULT_ACCURACY_LEVEL) -> tuple[Any, dict]:
    """The whole decoder as one ONNX ModelProto plus the initializer -> logical tensor map."""
    from onnx import TensorProto, helper

    spec: ModelSpec = model.spec
    for name, module in model.named_modules():
        module._mlexport_fqn = name  # the first (stored) name wins for aliased LS blocks
    g = GraphWriter()
    linear = LinearWriter(g, plan, accuracy_level)
    hd, eps = spec.head_dim, spec.norm_eps
    n_exec = len(model.layer_map)

    inputs = [
        helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch_size", "sequence_length"]),
        helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch_size", "total_sequence_length"]),
    ]
    outputs = [
        helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch_size", "sequence_length", spec.vocab_size])
    ]
    for i, block in enumerate(model.layer_map):
        kv = spec.n_kv_heads[block]
        for kind in ("key", "value"):
            inputs.append(
                helper.make_tensor_value_info(
                    f"past_key_values.{i}.{kind}", TensorProto.FLOAT, ["batch_size", kv, "past_sequence_length", hd]
                )
            )
            outputs.append(
                helper.make_tensor_value_info(
                    f"present.{i}.{kind}", TensorProto.FLOAT, ["batch_size", kv, "total_sequence_length", hd]
                )
            )

    # Sequence bookkeeping GroupQueryAttention wants: seqlens_k = tokens seen - 1, total length as int32.
    one = g.const("const.int64.1", np.array([1], np.int64))
    seen = g.node("ReduceSum", ["attention_mask", one], keepdims=0)
    seqlens_k = g.node("Cast", [g.node("Sub", [seen, one])], to=TensorProto.INT32)
    total = g.node(
        "Gather", [g.node("Shape", ["attention_mask"]), g.const("const.int64.scalar1", np.array(1, np.int64))]
    )
    total_len = g.node("Cast", [total], to=TensorProto.INT32)
    cos_table, sin_table = model.rope(0, model.max_context)
    cos = g.const("rope.cos_cache", cos_table[:, 0, : hd // 2].float().numpy(), ["rope.cos"])
    sin = g.const("rope.sin_cache", sin_table[:, 0, : hd // 2].float().numpy(), ["rope.sin"])
    local_rotary = [cos, sin]
    if model.local_rope_inv_freq is not None:  # sliding-window layers' own RoPE base (Gemma 3)
        cos_local, sin_local = model.rope(0, model.max_context, local=True)
        local_rotary = [
            g.const("rope.local_cos_cache", cos_local[:, 0, : hd // 2].float().numpy(), ["rope.local_cos"]),
            g.const("rope.local_sin_cache", sin_local[:, 0, : hd // 2].float().numpy(), ["rope.local_sin"]),
        ]

    h = _embedding(g, model, plan)
    if spec.embed_scale is not None:
        h = g.node("Mul", [h, g.const("const.embed_scale", np.array(spec.embed_scale, np.float32))])
    norm_w = _norm_weight(g, model.layers[model.layer_map[0]].input_layernorm, "layers.0.input_layernorm")
    x = g.node("SimplifiedLayerNormalization", [h, norm_w], axis=-1, epsilon=eps, stash_type=1)
    for i, block_idx in enumerate(model.layer_map):
        block = model.layers[block_idx]
        attn = block.self_attn
        prefix = f"layers.{block_idx}"
        heads, kv = attn.n_heads, attn.n_kv
        qkv_plans = {_pack_key(plan.tensors.get(f"{prefix}.self_attn.{p}_proj.weight")) for p in "qkv"}
        if attn.q_norm is None and len(qkv_plans) == 1:
            qkv = linear.apply(x, f"{prefix}.self_attn.qkv_proj", [attn.q_proj, attn.k_proj, attn.v_proj])
            q, k, v = qkv, "", ""
        elif attn.q_norm is None:  # mixed precision (e.g. an 8-bit v_proj): one MatMulNBits per projection
            q = linear.apply(x, f"{prefix}.self_attn.q_proj", [attn.q_proj])
            k = linear.apply(x, f"{prefix}.self_attn.k_proj", [attn.k_proj])
            v = linear.apply(x, f"{prefix}.self_attn.v_proj", [attn.v_proj])
        else:  # QK-norm sits between the projections and the rotary embedding: no packed QKV
            q = _head_norm(g, linear.apply(x, f"{prefix}.self_attn.q_proj", [attn.q_proj]), attn.q_norm, hd, eps)
            k = _head_norm(g, linear.apply(x, f"{prefix}.self_attn.k_proj", [attn.k_proj]), attn.k_norm, hd, eps)
            v = linear.apply(x, f"{prefix}.self_attn.v_proj", [attn.v_proj])
        rotary = (local_rotary if attn.local_rope else [cos, sin]) if attn.use_rope else []  # NoPE: no positions
        gqa = g.node(
            "GroupQueryAttention",
            [q, k, v, f"past_key_values.{i}.key", f"past_key_values.{i}.value", seqlens_k, total_len, *rotary],
            n_out=3,
            domain=MS,
            num_heads=heads,
            kv_num_heads=kv,
            scale=1.0 / float(np.sqrt(hd)),
            do_rotary=int(attn.use_rope),
            rotary_interleaved=0,
            # the same count as transformers' sliding_window (the current position included): tested past it
            local_window_size=attn.window if attn.window else -1,
        )
        g.rename(gqa[1], f"present.{i}.key")
        g.rename(gqa[2], f"present.{i}.value")
        attn_out = _out_norm(g, linear.apply(gqa[0], f"{prefix}.self_attn.o_proj", [attn.o_proj]), block, "attn", eps)
        post_w = _norm_weight(g, block.post_attention_layernorm, f"{prefix}.post_attention_layernorm")
        x, h = _skip_norm(g, h, attn_out, post_w, eps)
        mlp = block.mlp
        gate = linear.apply(x, f"{prefix}.mlp.gate_proj", [mlp.gate_proj])
        up = linear.apply(x, f"{prefix}.mlp.up_proj", [mlp.up_proj])
        if mlp.activation == "silu":
            gated = g.node("Mul", [gate, g.node("Sigmoid", [gate])])
        else:
            gated = g.node("Gelu", [gate], approximate="tanh")
        act = g.node("Mul", [gated, up])
        mlp_out = _out_norm(g, linear.apply(act, f"{prefix}.mlp.down_proj", [mlp.down_proj]), block, "mlp", eps)
        if i + 1 < n_exec:
            nxt = model.layer_map[i + 1]
            next_w = _norm_weight(g, model.layers[nxt].input_layernorm, f"layers.{nxt}.input_layernorm")
        else:
            next_w = _norm_weight(g, model.norm, "norm")
        x, h = _skip_norm(g, h, mlp_out, next_w, eps)
    logits = _head(g, linear, model, plan, x)
    g.rename(logits, "logits")

    graph = helper.make_graph(g.nodes, "mlexport_decoder", inputs, outputs, list(g.initializers.values()))
    proto = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid(MS, 1)], producer_name="mlexport"
    )
    proto.ir_version = IR_VERSION
    return proto, g.sources


def _skip_norm(g: GraphWriter, residual: str, update: str, weight: str, eps: float) -> tuple[str, str]:
    """(normalized, new residual) = RMSNorm(residual + update), residual + update: one fused node. Its mean and
    inverse-std outputs are training-only and left unnamed (SKIP_STATS), so the kernel skips them."""
    x, _, _, h = g.node(
        "SkipSimplifiedLayerNormalization",
        [residual, update, weight],
        n_out=4,
        domain=MS,
        unused=SKIP_STATS,
        epsilon=eps,
    )
    return x, h


def _out_norm(g: GraphWriter, x: str, block: nn.Module, branch: str, eps: float) -> str:
    """Gemma's norm on a branch's output before its residual add; the output itself where the family has none."""
    norm = getattr(block, f"{branch}_out_norm")
    if norm is None:
        return x
    weight = _norm_weight(g, norm, norm._mlexport_fqn)
    return g.node("SimplifiedLayerNormalization", [x, weight], axis=-1, epsilon=eps, stash_type=1)


def _norm_weight(g: GraphWriter, norm: RMSNorm, name: str) -> str:
    return g.const(
        f"{getattr(norm, '_mlexport_fqn', name)}.weight", norm.weight.detach().float().numpy(), [name + ".weight"]
    )


def _head_norm(g: GraphWriter, x: str, norm: RMSNorm, hd: int, eps: float) -> str:
    """Per-head RMSNorm (QK-norm: Qwen3's weighted, Llama 4's all ones): [B, S, H*D] -> [B, S, H, D], normalize,
    back."""
    shape = g.const(f"const.heads.{hd}", np.array([0, 0, -1, hd], np.int64))
    flat = g.const("const.flat_heads", np.array([0, 0, -1], np.int64))
    y = g.node(
        "SimplifiedLayerNormalization",
        [g.node("Reshape", [x, shape]), _norm_weight(g, norm, norm._mlexport_fqn)],
        axis=-1,
        epsilon=eps,
        stash_type=1,
    )
    return g.node("Reshape", [y, flat])


def _embedding(g: GraphWriter, model: Decoder, plan: QuantPlan) -> str:
    q = plan.tensors["embed_tokens.weight"]
    if q.scheme in ("fp32", "fp16"):
        w = model.embed_tokens.weight.detach().float().numpy()
        table = g.const(
            "embed_tokens.weight",
            w.astype(np.float16 if q.scheme == "fp16" else np.float32),
            _uses(model, "embed_tokens.weight"),
        )
        out = g.node("Gather", [table, "input_ids"], axis=0)
        return g.node("Cast", [out], to=1) if q.scheme == "fp16" else out
    linear = LinearWriter(g, plan, 0)
    owner = q.shares or "embed_tokens.weight"
    key = owner.removesuffix(".weight")
    w = model.lm_head.weight if q.shares == "lm_head.weight" else model.embed_tokens.weight
    b, s, zp, bits, block, n = linear.packed_nbits(key, [owner], [w], _uses(model, owner))
    _no_block_offsets(linear, key)
    dim = model.spec.dim
    flat = g.node(
        "Reshape", [b, g.const(f"const.shape.{n}x{dim * bits // 8}", np.array([n, dim * bits // 8], np.int64))]
    )
    return g.node(
        "GatherBlockQuantized",
        [flat, "input_ids", s, *([zp] if zp else [])],
        domain=MS,
        gather_axis=0,
        quantize_axis=1,
        block_size=block,
        bits=bits,
    )


def _no_block_offsets(linear: LinearWriter, key: str) -> None:
    """The tied table has no reused float-zero-point grid (only the blocks' Linears are offered one): refuse
    rather than drop the zero points."""
    if key in linear.block_offsets:
        raise MlexportError(f"{key}: a float-zero-point grid is not supported for the embedding or head on ONNX")


def _uses(model: Decoder, owner: str) -> list[str]:
    tied = model.spec.tie_embeddings
    return ["embed_tokens.weight", "lm_head.weight"] if tied else [owner]


def _head(g: GraphWriter, linear: LinearWriter, model: Decoder, plan: QuantPlan, x: str) -> str:
    q = plan.tensors["lm_head.weight"]
    tied = model.spec.tie_embeddings
    if q.scheme in ("fp32", "fp16"):
        if not tied:
            return linear.apply(x, "lm_head", [model.lm_head])
        # Tied float head: Gemm with transB reads the embedding table itself, no transposed copy.
        table = "embed_tokens.weight"
        if q.scheme == "fp16":
            table = g.node("Cast", [table], to=1)
        flat = g.node("Reshape", [x, g.const("const.flat2d", np.array([-1, model.spec.dim], np.int64))])
        y = g.node("Gemm", [flat, table], transB=1)
        return g.node("Reshape", [y, g.const("const.logits_shape", np.array([1, -1, model.spec.vocab_size], np.int64))])
    owner = q.shares or "lm_head.weight"
    key = owner.removesuffix(".weight")
    w = model.embed_tokens.weight if q.shares == "embed_tokens.weight" else model.lm_head.weight
    b, s, zp, bits, block, n = linear.packed_nbits(key, [owner], [w], _uses(model, owner))
    _no_block_offsets(linear, key)
    return g.node(
        "MatMulNBits",
        [x, b, s, *([zp] if zp else [])],
        domain=MS,
        K=model.spec.dim,
        N=n,
        bits=bits,
        block_size=block,
        accuracy_level=linear.accuracy_level,
    )


def genai_config(spec: ModelSpec, n_executed: int, max_context: int) -> dict[str, Any]:
    """What onnxruntime_genai.Model(dir) reads: names of our inputs/outputs and the model's shape."""
    eos = [int(e) for e in spec.eos_ids] or [0]
    return {
        "model": {
            "bos_token_id": int(spec.bos_id) if spec.bos_id is not None else eos[0],
            "context_length": max_context,
            "decoder": {
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "filename": ONNX_NAME,
                "head_size": spec.head_dim,
                "hidden_size": spec.dim,
                "inputs": {
                    "input_ids": "input_ids",
                    "attention_mask": "attention_mask",
                    "past_key_names": "past_key_values.%d.key",
                    "past_value_names": "past_key_values.%d.value",
                },
                "outputs": {
                    "logits": "logits",
                    "present_key_names": "present.%d.key",
                    "present_value_names": "present.%d.value",
                },
                "num_attention_heads": max(spec.n_heads),
                "num_hidden_layers": n_executed,
                "num_key_value_heads": max(spec.n_kv_heads),
            },
            "eos_token_id": eos if len(eos) > 1 else eos[0],
            "pad_token_id": eos[0],
            "type": "llama",
            "vocab_size": spec.vocab_size,
        },
        "search": {
            "diversity_penalty": 0.0,
            "do_sample": False,
            "early_stopping": True,
            "length_penalty": 1.0,
            "max_length": max_context,
            "min_length": 0,
            "no_repeat_ngram_size": 0,
            "num_beams": 1,
            "num_return_sequences": 1,
            "past_present_share_buffer": True,
            "repetition_penalty": 1.0,
            "temperature": 1.0,
            "top_k": 1,
            "top_p": 1.0,
        },
    }


def export_onnx(
    model: Decoder,
    plan: QuantPlan,
    out_dir: Path,
    log: Any,
    status: Any = None,
    accuracy_level: int = DEFAULT_ACCURACY_LEVEL,
) -> dict[str, Any]:
    """Write model.onnx + model.onnx.data + genai_config.json into ``out_dir``; load it in onnxruntime to prove it."""
    import onnx

    if status:
        status("writing the ONNX graph (fused contrib ops)")
    with log.stage("onnx_graph"):
        proto, sources = build_graph(model, plan, accuracy_level)
    with log.stage("onnx_save"):
        onnx.save_model(
            proto,
            str(out_dir / ONNX_NAME),
            save_as_external_data=True,
            all_tensors_to_one_file=True,
            location=DATA_NAME,
            size_threshold=1024,
        )
        (out_dir / "genai_config.json").write_text(
            json.dumps(genai_config(model.spec, len(model.layer_map), model.max_context), indent=2)
        )
    if status:
        status("loading it in onnxruntime with all graph optimizations")
    with log.stage("onnx_check"):
        session = open_session(out_dir)
        used = sorted({n.op_type for n in proto.graph.node})
    return {
        "opset": OPSET,
        "ir_version": IR_VERSION,
        "ops": used,
        "accuracy_level": accuracy_level,
        "providers": session.get_providers(),
        "blob_sources": sources,
    }


def open_session(artifact: Path, threads: int | None = None) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
    path = artifact / ONNX_NAME if artifact.is_dir() else artifact
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def stored_blobs(artifact: Path) -> list[dict[str, Any]]:
    """Every initializer the artifact stores, with its bytes (external data length or inline size)."""
    import onnx

    model = onnx.load(str(artifact / ONNX_NAME), load_external_data=False)
    blobs = []
    for init in model.graph.initializer:
        ext = {e.key: e.value for e in init.external_data}
        if ext:
            size, file = int(ext.get("length", 0)), ext.get("location", DATA_NAME)
        else:
            size, file = len(init.raw_data) or onnx.numpy_helper.to_array(init).nbytes, ONNX_NAME
        blobs.append({"file": file, "bytes": size, "keys": [init.name]})
    return blobs


def _export_artifact(
    model: Decoder, plan: QuantPlan, out_dir: Path, log: Any, status: Any, quantized: Any, opts: Any
) -> dict[str, Any]:
    return export_onnx(model, plan, out_dir, log, status, accuracy_level=opts.accuracy_level)


def _fixed_bytes(model: Decoder, plan: QuantPlan) -> int:
    """GroupQueryAttention's fp32 cos/sin caches: half the head dim per position."""
    return 2 * model.max_context * model.spec.head_dim // 2 * 4


PROFILE = TargetProfile(
    name="onnx",
    weight_files=(".onnx", ".onnx.data"),
    # GatherBlockQuantized reads the head's 4-bit blocks: no reason to store the tie twice.
    tie_modes=("shared4", "shared8"),
    decoder_features=frozenset({"sliding_window", "sandwich_norms", "mlp_activation=gelu_tanh", "embed_scale"}),
    # MatMulNBits scales take the activation dtype (fp32 here), but the file stores them as fp16 behind a Cast
    # that onnxruntime folds at load (GraphWriter.fp16_const).
    scale_bytes={4: 2, 8: 2},
    scale_dtypes={4: "float16", 8: "float16"},
    # Keeps the demo under the onnxruntime-genai builder's int4 size (86.5 MB).
    mixed_slack=0.095,
    # MatMulNBits takes packed uint4 zero points at no measurable cost per token, and they lower drift.
    asymmetric=True,
    exact_source_types=("Q4_0", "Q4_1"),
    # A Q4_1 grid runs as MatMulNBits plus a per-block offset term (float zero points take a generic path 60x
    # slower), and those extra nodes cost decode speed against the builder's model: reused only when asked.
    reuse_grid_efforts=(),
    export=_export_artifact,
    stored_blobs=stored_blobs,
    fixed_bytes=_fixed_bytes,
    int8_per_channel=False,
    # --accuracy-level 0: MatMulNBits with fp32 activations, weights-only.
    weight_only=lambda opts: opts.accuracy_level == 0,
    runtimes=("onnxruntime", "onnxruntime-genai"),
    bench_devices=("host", "macos"),
)
