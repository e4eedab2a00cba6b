"""Core ML exporter: an iOS 18 ``.mlpackage`` with a stateful KV cache (one per executed layer) and int4 blocks.

Why a separate traced wrapper instead of the shared decoder's forward: Core ML wants the cache as model *state*
updated by slice assignment, positions derived from input shapes (the token count and the mask width), and
attention written so coremltools emits its fused SDPA (no explicit ``scale``). The weights are the decoder's own
modules, so LS blocks stay aliased and the tied table stays one tensor.

What the 4-bit demo needs to fit weight.bin's 80 MB with >= 90% greedy agreement: a reused Q4_1 grid
runs as int4 blocks plus a second Linear over block sums whose weight is the blocks' offsets at int8
(quantize/block_offsets.py); a tied table stored rotated (``E R``, planned in pipeline.rotate_4bit_tie) is
rotated back after the lookup and the head's input rotated; the RoPE cos/sin come from two small tables
(``rope_tables``) instead of a [max_context, head_dim] pair.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import struct
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from mlexport.exporters.profile import TargetProfile
from mlexport.quantize import QuantPlan
from mlexport.quantize.accounting import BLOCK_OFFSETS
from mlexport.quantize.algorithms import QuantizedWeight
from mlexport.quantize.block_offsets import block_offsets, float_zero_grids
from torch import nn

from mlexport.errors import MlexportError
from mlexport.model import Decoder, RMSNorm
from mlexport.spec import ModelSpec

PACKAGE_NAME = "model.mlpackage"
MIN_TARGET = "iOS18"


def _norm(norm: RMSNorm, x: torch.Tensor, scale: float = 1.0, out_scale: float = 1.0) -> torch.Tensor:
    """RMSNorm that cannot overflow in fp16: scale by the row's max first (x / m has mean square <= 1). ``scale``:
    x is the true input times this (a scaled residual stream), so eps scales by its square to give the same result;
    ``out_scale`` multiplies the gains (one constant), so a large gain never meets fp16 unscaled."""
    m = x.abs().amax(dim=-1, keepdim=True).clamp_min(1e-6)
    xs = x / m
    # eps / m² written as (√eps / m)²: m² itself overflows fp16 once |x| > 256
    root_eps = math.sqrt(norm.eps) * scale
    weight = norm.weight if out_scale == 1.0 else norm.weight * out_scale
    return weight * (xs * torch.rsqrt(xs.pow(2).mean(-1, keepdim=True) + (root_eps / m) ** 2))


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


class StatefulDecoder(nn.Module):
    """forward(input_ids [1, T] int32, causal_mask [1, 1, T, S] additive) -> logits [1, T, V].

    S = tokens already cached + T; the new tokens' positions are S-T .. S-1. Caches are fp16 buffers
    [1, kv_heads, max_context, head_dim] that Core ML turns into model state.
    """

    def __init__(
        self,
        model: Decoder,
        int8_rows: int = 0,
        offsets: dict[str, QuantizedWeight] | None = None,
        split_cache: bool = False,
    ) -> None:
        super().__init__()
        self.model = model
        # Core ML state is fp16 only; an fp32 program keeps each K/V entry as an fp16 pair (value and rounding
        # remainder, ~22 bits) so that its numerics stay fp32's.
        self.split_cache = split_cache
        # A tie whose first rows are int8 (TensorQuant.int8_rows) is stored as two tables, each one const that
        # both the lookup and the head read: still stored once, in two compressions.
        self.int8_rows = int8_rows
        if int8_rows:
            table = model.lm_head.weight.detach()
            self.tie_int8 = nn.Parameter(table[:int8_rows].clone(), requires_grad=False)
            self.tie_int4 = nn.Parameter(table[int8_rows:].clone(), requires_grad=False)
        # Reused Q4_1 grids: each Linear also reads the sums of its input's blocks times the blocks' offsets
        # (quantize/block_offsets.py). Keyed by the weight, so LS blocks that share a Linear share its offsets.
        self._offset_of: dict[int, str] = {}
        params = dict(model.named_parameters(remove_duplicate=False))
        for name, qw in (offsets or {}).items():
            attr = offset_attr(name)
            self.register_parameter(attr, nn.Parameter(qw.dequantize(), requires_grad=False))
            self._offset_of[id(params[name])] = attr
        for name, shape in cache_shapes(model, split_cache).items():
            self.register_buffer(name, torch.zeros(shape, dtype=torch.float16))
        for name, table in rope_tables(model).items():
            self.register_buffer(name, table)
        self.windows = sorted({w for w in (model.spec.window(b) for b in model.layer_map) if w is not None})
        self.residual_scale = residual_scale(model.spec)

    def forward(self, input_ids: torch.Tensor, causal_mask: torch.Tensor) -> torch.Tensor:
        m = self.model
        t = input_ids.shape[-1]
        end = causal_mask.shape[-1]
        start = end - t
        ropes = {False: self._rope(start, end)}
        if m.local_rope_inv_freq is not None:
            ropes[True] = self._rope(start, end, "rope_local")
        masks = {None: causal_mask}
        for window in self.windows:  # keys older than the window are masked too, over the whole cache
            masks[window] = causal_mask + self._outside_window(start, end, window).to(causal_mask.dtype)
        h = self._embed(input_ids)
        for i, block_idx in enumerate(m.layer_map):
            block = m.layers[block_idx]
            attn, mlp = block.self_attn, block.mlp
            cos, sin = ropes[attn.local_rope]
            s = self.residual_scale
            x = _norm(block.input_layernorm, h, s)
            q = self._linear(attn.q_proj, x).view(1, t, attn.n_heads, attn.head_dim)
            k = self._linear(attn.k_proj, x).view(1, t, attn.n_kv, attn.head_dim)
            v = self._linear(attn.v_proj, x).view(1, t, attn.n_kv, attn.head_dim)
            if attn.q_norm is not None:
                q, k = _norm(attn.q_norm, q), _norm(attn.k_norm, k)
            q, k = q.transpose(1, 2), k.transpose(1, 2)
            if attn.use_rope:
                q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
            k_cache, v_cache = getattr(self, f"k_cache_{i}"), getattr(self, f"v_cache_{i}")
            k_cache[:, :, start:end] = k.to(torch.float16)
            v_cache[:, :, start:end] = v.transpose(1, 2).to(torch.float16)
            if self.split_cache:
                self._store_remainders(i, k, v.transpose(1, 2), start, end)
            keys = k_cache[:, :, :end].to(q.dtype)
            values = v_cache[:, :, :end].to(q.dtype)
            if self.split_cache:
                keys, values = self._add_remainders(i, keys, values, end)
            reps = attn.n_heads // attn.n_kv
            if reps > 1:
                keys = keys.repeat_interleave(reps, dim=1)
                values = values.repeat_interleave(reps, dim=1)
            # No `scale` argument: coremltools emits its fused SDPA only then.
            out = F.scaled_dot_product_attention(q, keys, values, attn_mask=masks[attn.window].to(q.dtype))
            h = h + self._to_residual(
                self._linear(attn.o_proj, out.transpose(1, 2).reshape(1, t, attn.n_heads * attn.head_dim)),
                block.attn_out_norm,
            )
            x = _norm(block.post_attention_layernorm, h, s)
            # Core ML's own gelu op in its tanh mode: one fused op on device, and no x³ to overflow fp16.
            gated = (
                F.silu(self._linear(mlp.gate_proj, x))
                if mlp.activation == "silu"
                else F.gelu(self._linear(mlp.gate_proj, x), approximate="tanh")
            ) * self._linear(mlp.up_proj, x)
            h = h + self._to_residual(self._linear(mlp.down_proj, gated), block.mlp_out_norm)
        return self._head(_norm(m.norm, h, self.residual_scale))

    def _to_residual(self, branch: torch.Tensor, out_norm: RMSNorm | None) -> torch.Tensor:
        """A branch's output as the residual stream carries it: normalized where the family does, then scaled."""
        if out_norm is not None:
            return _norm(out_norm, branch, out_scale=self.residual_scale)
        return branch if self.residual_scale == 1.0 else branch * self.residual_scale

    def _store_remainders(self, i: int, k: torch.Tensor, v: torch.Tensor, start: Any, end: Any) -> None:
        """What rounding layer i's new K/V entries to fp16 lost, into the ``_low`` caches."""
        for name, new in ((f"k_cache_{i}", k), (f"v_cache_{i}", v)):
            low = (new - new.to(torch.float16).to(new.dtype)).to(torch.float16)
            getattr(self, f"{name}_low")[:, :, start:end] = low

    def _add_remainders(
        self, i: int, keys: torch.Tensor, values: torch.Tensor, end: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer i's cached keys and values with their stored remainders added back."""
        k_low, v_low = getattr(self, f"k_cache_{i}_low"), getattr(self, f"v_cache_{i}_low")
        return keys + k_low[:, :, :end].to(keys.dtype), values + v_low[:, :, :end].to(values.dtype)

    @staticmethod
    def _outside_window(start: Any, end: Any, window: int) -> torch.Tensor:
        """Additive [end - start, end] mask: -30000 where a key is ``window`` or more positions behind its query."""
        queries = torch.arange(start, end)
        keys = torch.arange(0, end)
        old = keys[None, :] <= queries[:, None] - window
        return torch.where(old, torch.full((), -30000.0), torch.zeros(()))

    def _linear(self, linear: nn.Linear, x: torch.Tensor) -> torch.Tensor:
        """``linear(x)``, plus its blocks' offsets times the sums of x's blocks when its grid has them."""
        attr = self._offset_of.get(id(linear.weight))
        if attr is None:
            return linear(x)
        offsets = getattr(self, attr)
        sums = x.reshape(*x.shape[:-1], offsets.shape[1], -1).sum(-1)
        return linear(x) + F.linear(sums, offsets)

    def _rope(self, start: Any, end: Any, prefix: str = "rope") -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin for positions start..end-1 from two small tables: position p = ROPE_SPLIT·a + b, and
        cos(p·f) = cos(a·S·f) cos(b·f) − sin(a·S·f) sin(b·f) (sin likewise). The full [max_context, head_dim]
        pair is 0.5 MB of fp16 at a 2048 context, which the 80 MB weight.bin needs for the model's weights."""
        positions = torch.arange(start, end)
        coarse, fine = positions // ROPE_SPLIT, positions % ROPE_SPLIT
        cos_a, sin_a = getattr(self, f"{prefix}_cos_coarse")[coarse], getattr(self, f"{prefix}_sin_coarse")[coarse]
        cos_b, sin_b = getattr(self, f"{prefix}_cos_fine")[fine], getattr(self, f"{prefix}_sin_fine")[fine]
        return cos_a * cos_b - sin_a * sin_b, sin_a * cos_b + cos_a * sin_b

    def _embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        rotation = self.model.tie_rotation
        if not self.int8_rows:
            rows = self.model.embed_tokens(input_ids)
        else:
            n = self.int8_rows
            low = input_ids < n
            head = F.embedding(torch.where(low, input_ids, 0), self.tie_int8)
            tail = F.embedding(torch.where(low, 0, input_ids - n), self.tie_int4)
            rows = torch.where(low.unsqueeze(-1), head, tail)
        rows = rows if rotation is None else rotation.undo(rows)  # a table stored rotated (E R): rows times R^T
        scale = (self.model.spec.embed_scale or 1.0) * self.residual_scale
        return rows if scale == 1.0 else rows * scale

    def _head(self, x: torch.Tensor) -> torch.Tensor:
        if self.model.tie_rotation is not None:
            x = self.model.tie_rotation(x)  # (x R)(E R)^T = x E^T
        if not self.int8_rows:
            return self.model.lm_head(x)
        return torch.cat((F.linear(x, self.tie_int8), F.linear(x, self.tie_int4)), dim=-1)


ROPE_SPLIT = 64


def residual_scale(spec: ModelSpec) -> float:
    """The factor the residual stream is carried at. Gemma's reaches ~1e5 (Gemma-3-270M on the built-in corpus),
    past fp16's 65504; every branch it receives is normalized (sandwich norms) and every reader is an RMSNorm, so
    carrying it at 1/64 is exact (eps scaled alike) and a power of two rounds nothing. Others keep 1."""
    return 1 / 64 if spec.sandwich_norms else 1.0


def rope_table_bytes(max_context: int, head_dim: int) -> int:
    """What ``rope_tables`` stores in an fp16 program: cos and sin, coarse and fine rows of head_dim each."""
    return 2 * (-(-max_context // ROPE_SPLIT) + ROPE_SPLIT) * head_dim * 2


def rope_tables(model: Decoder) -> dict[str, torch.Tensor]:
    """The two small cos/sin tables ``StatefulDecoder._rope`` combines, per RoPE base (``rope_local_*``: the
    sliding-window layers' own): angles in float64, tables in fp32 (an fp16 program stores them as fp16 consts)."""
    bases = {"rope": model.rope_inv_freq}
    if model.local_rope_inv_freq is not None:
        bases["rope_local"] = model.local_rope_inv_freq
    coarse = torch.arange(0, -(-model.max_context // ROPE_SPLIT), dtype=torch.float64) * ROPE_SPLIT
    fine = torch.arange(ROPE_SPLIT, dtype=torch.float64)
    tables = {}
    for prefix, inv_freq in bases.items():
        for kind, positions in (("coarse", coarse), ("fine", fine)):
            angles = positions[:, None] * inv_freq.double()[None, :]
            angles = torch.cat((angles, angles), dim=-1)  # [n, head_dim], like the rotate-half layout of q and k
            tables[f"{prefix}_cos_{kind}"] = angles.cos().float()
            tables[f"{prefix}_sin_{kind}"] = angles.sin().float()
    return tables


def cache_shapes(model: Decoder, split: bool = False) -> dict[str, tuple[int, ...]]:
    """Every K/V state by name: ``{k,v}_cache_{layer}`` [1, kv_heads, max_context, head_dim], and with ``split``
    each one's ``_low`` remainder."""
    shapes = {}
    for i, block in enumerate(model.layer_map):
        shape = (1, model.spec.n_kv_heads[block], model.max_context, model.spec.head_dim)
        for kind in ("k", "v"):
            shapes[f"{kind}_cache_{i}"] = shape
            if split:
                shapes[f"{kind}_cache_{i}_low"] = shape
    return shapes


def offset_attr(name: str) -> str:
    """The wrapper's parameter holding ``name``'s block offsets (its const in the MIL program has this name)."""
    return "off_" + name.removesuffix(".weight").replace(".", "_")


def causal_mask(past: int, t: int) -> np.ndarray:
    """Additive mask [1, 1, t, past + t]: 0 where a query may attend, -inf-ish (fp16-safe) above the diagonal."""
    mask = np.zeros((1, 1, t, past + t), np.float16)
    mask[0, 0][np.triu(np.ones((t, past + t), bool), k=past + 1)] = -30000.0
    return mask


def convert(
    model: Decoder,
    plan: QuantPlan,
    log: Any,
    status: Any = None,
    palettize: int | None = None,
    quantized: dict[str, QuantizedWeight] | None = None,
) -> Any:
    """Trace the stateful wrapper and convert it with coremltools; then compress weights per the plan."""
    import coremltools as ct

    ctx = model.max_context
    head = plan.tensors.get("lm_head.weight")
    int8_rows = head.int8_rows if head is not None and head.bits == 4 else 0
    if int8_rows and (palettize or not quantized):
        raise MlexportError("the tie's int8 rows need mlexport's own quantized values; drop --palettize")
    if model.tie_rotation is not None and (palettize or not quantized):
        raise MlexportError("a rotated tied table needs mlexport's own quantized values; drop --palettize")
    offsets = {} if palettize else float_zero_offsets(quantized or {})
    split_cache = plan.preset == "fp32"
    wrapper = StatefulDecoder(model, int8_rows, offsets, split_cache).eval()
    example = (torch.zeros((1, 2), dtype=torch.int32), torch.from_numpy(causal_mask(0, 2).astype(np.float32)))
    if status:
        status("tracing the stateful decoder (torch.jit.trace)")
    with log.stage("trace"), torch.no_grad():
        traced = torch.jit.trace(wrapper, example, check_trace=False)
    tokens = ct.RangeDim(lower_bound=1, upper_bound=ctx, default=1)
    width = ct.RangeDim(lower_bound=1, upper_bound=ctx, default=1)
    states = [
        ct.StateType(wrapped_type=ct.TensorType(shape=shape, dtype=np.float16), name=name)
        for name, shape in cache_shapes(model, split_cache).items()
    ]
    if status:
        status(f"converting with coremltools (iOS18, {'fp32' if plan.preset == 'fp32' else 'fp16'} compute)")
    with log.stage("convert"):
        mlmodel = ct.convert(
            traced,
            inputs=[
                ct.TensorType(name="input_ids", shape=(1, tokens), dtype=np.int32),
                ct.TensorType(
                    name="causal_mask",
                    shape=(1, 1, tokens, width),
                    dtype=np.float32 if plan.preset == "fp32" else np.float16,
                ),
            ],
            outputs=[ct.TensorType(name="logits", dtype=np.float32 if plan.preset == "fp32" else np.float16)],
            states=states,
            minimum_deployment_target=ct.target.iOS18,
            # fp32 is for checking numerics; devices run fp16 (the caches are fp16 either way)
            compute_precision=ct.precision.FLOAT32 if plan.preset == "fp32" else ct.precision.FLOAT16,
            skip_model_load=True,
        )
    with log.stage("compress"):
        if quantized and not palettize:
            mlmodel = set_quantized_weights(mlmodel, model, plan, quantized, status, offsets)
        else:
            mlmodel = compress(mlmodel, plan, palettize, status)
    return mlmodel


def float_zero_offsets(quantized: dict[str, Any]) -> dict[str, QuantizedWeight]:
    """Each reused Q4_1 grid's block offsets at int8 (quantize/block_offsets.py), by weight name."""
    return {n: block_offsets(qw) for n, qw in float_zero_grids(quantized).items()}


def compress(mlmodel: Any, plan: QuantPlan, palettize: int | None, status: Any = None) -> Any:
    """Map the plan onto Core ML's weight compression: int4 per-block, int8 per-channel, or an N-bit palette."""
    import coremltools.optimize.coreml as cto

    if palettize:
        if status:
            status(f"palettizing weights to {palettize} bits")
        config = cto.OptimizationConfig(global_config=cto.OpPalettizerConfig(mode="kmeans", nbits=palettize))
        return cto.palettize_weights(mlmodel, config)
    schemes = {q.scheme for q in plan.tensors.values()}
    if schemes <= {"fp16", "fp32"}:
        return mlmodel
    bits = 4 if any(s.startswith("int4") for s in schemes) else 8
    if status:
        status(f"quantizing weights to int{bits} ({'per-block 32' if bits == 4 else 'per-channel'})")
    if bits == 4:
        group = next(q.group_size for q in plan.tensors.values() if q.scheme.startswith("int4"))
        op = cto.OpLinearQuantizerConfig(
            mode="linear_symmetric", dtype="int4", granularity="per_block", block_size=group, weight_threshold=512
        )
    else:
        op = cto.OpLinearQuantizerConfig(
            mode="linear_symmetric", dtype="int8", granularity="per_channel", weight_threshold=512
        )
    return cto.linear_quantize_weights(mlmodel, cto.OptimizationConfig(op_name_configs=_weight_consts(mlmodel, op)))


def set_quantized_weights(
    mlmodel: Any,
    model: Decoder,
    plan: QuantPlan,
    quantized: dict[str, QuantizedWeight],
    status: Any = None,
    offsets: dict[str, QuantizedWeight] | None = None,
) -> Any:
    """Replace each weight const with ``constexpr_blockwise_shift_scale`` over our quantizer's own values (GPTQ,
    the scale search, zero points): the same integers and scales the eager reference runs, not coremltools' RTN.
    A reused Q4_1 grid's float zero points become the int8 ``offsets`` of its second Linear instead
    (StatefulDecoder._linear). Every planned tensor must find its const; anything left over is an error, not a
    silently float weight."""
    from coremltools.converters.mil import Builder as mb
    from coremltools.converters.mil.mil import types
    from coremltools.converters.mil.mil.passes.graph_pass import AbstractGraphPass
    from coremltools.models.utils import _apply_graph_pass
    from mlexport.quantize.calibrate import quantize_one

    params = dict(model.named_parameters(remove_duplicate=False))
    by_flat = {("model_" + n).replace(".", "_"): n for n in params}
    quantized = dict(quantized)
    for name, q in plan.tensors.items():  # tensors the plan leaves to RTN get RTN values on the same path
        if q.bits in (4, 8) and not q.shares and name not in quantized:
            quantized[name] = quantize_one(params[name].detach().float(), q, None)
    offsets = offsets or {}
    by_offset_attr = {offset_attr(n): n for n in offsets}
    done: set[str] = set()

    class SetQuantized(AbstractGraphPass):
        def apply(self, prog: Any) -> None:
            for function in prog.functions.values():
                with function:
                    for op in list(function.operations):
                        if op.op_type != "const" or op.outputs[0].val is None or np.ndim(op.outputs[0].val) != 2:
                            continue
                        base = _SUFFIXES.sub("", op.name)
                        if base in by_offset_attr:  # a Q4_1 grid's block offsets, int8 per row
                            qw = offsets[by_offset_attr[base]]
                            name = owner = base
                        else:
                            name = by_flat.get(base) or by_flat.get(base + "_weight") or _SPLIT_TIE.get(base)
                            q = plan.tensors.get(name) if name else None
                            if q is None or q.bits not in (4, 8):
                                continue
                            owner = q.shares or name
                            qw = quantized[owner]
                        if base in _SPLIT_TIE:  # the tie's int8 head rows, or the 4-bit rest
                            if qw.int8_rows is None:
                                raise MlexportError(f"{name}: split into int8 rows, but no int8 values were computed")
                            qw = qw.int8_rows if base == "tie_int8" else qw.tail()
                            done.add("embed_tokens.weight")
                        if tuple(qw.qdata.shape) != tuple(op.outputs[0].shape):
                            raise MlexportError(
                                f"{name}: const {op.name} has shape {op.outputs[0].shape}, "
                                f"quantized values {tuple(qw.qdata.shape)}"
                            )
                        int_type = types.np_int4_dtype if qw.bits == 4 else np.int8
                        float_type = op.outputs[0].val.dtype
                        offset = None
                        if qw.zero_point is not None and owner not in offsets:  # GPTQ's integer zero points
                            offset = qw.zero_point.numpy().astype(int_type)  # (float ones became `offsets`)
                        new = mb.constexpr_blockwise_shift_scale(
                            data=qw.qdata.numpy().astype(int_type),
                            scale=qw.scale.numpy().astype(float_type),
                            offset=offset,
                            before_op=op,
                            name=op.name + "_quantized",
                        )
                        op.enclosing_block.replace_uses_of_var_after_op(
                            anchor_op=op, old_var=op.outputs[0], new_var=new, force_replace=True
                        )
                        op.enclosing_block.remove_ops([op])
                        done.update({owner, name})

    if status:
        status("setting quantized weights (constexpr_blockwise_shift_scale)")
    import coremltools as ct

    result = _apply_graph_pass(mlmodel, SetQuantized(), spec_version=ct.target.iOS18, skip_model_load=True)
    missing = [n for n, q in plan.tensors.items() if q.bits in (4, 8) and n not in done]
    missing += [n for n, attr in ((n, offset_attr(n)) for n in offsets) if attr not in done]
    if missing:
        raise MlexportError(f"{len(missing)} planned tensors have no Core ML weight const: {missing[:4]}")
    return result


def _weight_consts(mlmodel: Any, config: Any) -> dict[str, Any]:
    """Compress only the weights (consts read by linear layers and the embedding gather), never the RoPE tables
    or other constants a global config would also quantize."""
    names = {}
    for op in mlmodel._mil_program.functions["main"].operations:
        if op.op_type != "const" or op.outputs[0].val is None or np.ndim(op.outputs[0].val) < 2:
            continue
        if op.name.startswith("rope_"):  # the cos/sin tables are gathered too (an all-zero sin row has no scale)
            continue
        consumers = {child.op_type for child in op.outputs[0].child_ops}
        if consumers and consumers <= {"linear", "gather", "matmul"}:
            names[op.name] = config
    return names


def metadata(spec: ModelSpec, max_context: int, plan: QuantPlan) -> dict[str, str]:
    """What an app needs to drive the model, stored in the package's user-defined metadata."""
    return {
        "mlexport.bos_id": json.dumps(spec.bos_id),
        "mlexport.eos_ids": json.dumps(list(spec.eos_ids)),
        "mlexport.max_context": str(max_context),
        "mlexport.vocab_size": str(spec.vocab_size),
        "mlexport.n_executed_layers": str(len(spec.layer_map)),
        "mlexport.quant": plan.preset,
        "mlexport.chat_template": spec.chat_template or "",
    }


def export_mlpackage(
    model: Decoder,
    plan: QuantPlan,
    out_dir: Path,
    log: Any,
    status: Any = None,
    palettize: int | None = None,
    quantized: dict[str, QuantizedWeight] | None = None,
) -> dict[str, Any]:
    """Write ``out_dir/model.mlpackage``; return a report with the MIL ops the program uses."""
    mlmodel = convert(model, plan, log, status, palettize, quantized)
    for key, value in metadata(model.spec, model.max_context, plan).items():
        mlmodel.user_defined_metadata[key] = value
    mlmodel.short_description = "mlexport decoder: input_ids + causal_mask -> logits, stateful KV cache"
    with log.stage("save"):
        target = out_dir / PACKAGE_NAME
        if target.exists():
            shutil.rmtree(target)
        mlmodel.save(str(target))
    ops = sorted({op.op_type for op in mlmodel._mil_program.functions["main"].operations})
    aliases: dict[int, list[str]] = {}
    for n, param in model.named_parameters(remove_duplicate=False):
        aliases.setdefault(id(param), []).append(n)
    names = {n: group for group in aliases.values() for n in group}
    return {
        "minimum_deployment_target": MIN_TARGET,
        "compute_precision": "fp32" if plan.preset == "fp32" else "fp16",
        "weights": "weight-only (Core ML has no dynamic activation quantization)",
        "ops": ops,
        "fused_sdpa": "scaled_dot_product_attention" in ops,
        "blob_sources": blob_sources(target, names),
    }


# The consts of a tie split by StatefulDecoder (TensorQuant.int8_rows): both belong to the tied head.
_SPLIT_TIE = {"tie_int8": "lm_head.weight", "tie_int4": "lm_head.weight"}
_SPLIT_PART = {"tie_int8": " (int8 head rows)", "tie_int4": " (4-bit rows)"}

_SUFFIXES = re.compile(
    r"(_to_fp16|_to_fp32|_quantized|_palettized|_cast_fp16|_fp16|_data|_scale|_offset|_lut|_indices)+$"
)


def blob_sources(package: Path, logical_names: dict[str, list[str]]) -> dict[str, list[str]]:
    """weight.bin blob key -> the logical tensors (and part) it serves, from the const ops' names.

    coremltools names a weight's const after the torch attribute path (``model_layers_0_mlp_up_proj_weight``
    plus suffixes), so we match it against the decoder's parameter names; a tied table has one const for both
    the gather and the head."""
    by_flat = {("model_" + n).replace(".", "_"): n for n in logical_names}
    sources: dict[str, list[str]] = {}
    for key, op_name in _blob_ops(package):
        base = _SUFFIXES.sub("", op_name)
        offsets = base.startswith("off_")  # a Q4_1 grid's block offsets (StatefulDecoder._linear)
        if offsets:
            base = "model_" + base.removeprefix("off_") + "_weight"
        name = by_flat.get(base) or by_flat.get(base + "_weight") or _SPLIT_TIE.get(base)
        part = "scale" if op_name.endswith("_scale") else "offset" if op_name.endswith("_offset") else "data"
        part = f"block offsets {part}" if offsets else part
        part += _SPLIT_PART.get(base, "")
        if name:
            uses = logical_names[name]
        elif re.fullmatch(r"linear_\d+_bias_0", base):  # coremltools gives every bias-free linear a zero bias
            uses = [f"(zero bias coremltools adds to {base.removesuffix('_bias_0')})"]
        else:
            uses = [op_name]
        sources.setdefault(key, []).extend(f"{use}#{part}" for use in uses)
    return sources


def _blob_ops(package: Path) -> list[tuple[str, str]]:
    import coremltools as ct

    spec = ct.utils.load_spec(str(package))
    found = []
    for function in spec.mlProgram.functions.values():
        for block in function.block_specializations.values():
            for op in block.operations:
                name = op.outputs[0].name if op.outputs else op.type
                for attr in op.attributes.values():  # plain consts
                    if attr.WhichOneof("value") == "blobFileValue":
                        found.append((f"weight.bin@{attr.blobFileValue.offset}", name))
                for input_name, arg in op.inputs.items():  # compressed weights: data and scale inline in constexpr ops
                    for binding in arg.arguments:
                        if binding.HasField("value") and binding.value.WhichOneof("value") == "blobFileValue":
                            found.append((f"weight.bin@{binding.value.blobFileValue.offset}", f"{name}_{input_name}"))
    return found


def stored_blobs(artifact: Path) -> list[dict[str, Any]]:
    """Every blob in weight.bin (each starts with a 64-byte header whose sizeInBytes we read)."""
    weights = artifact / PACKAGE_NAME / "Data" / "com.apple.CoreML" / "weights" / "weight.bin"
    data = weights.read_bytes() if weights.is_file() else b""
    blobs = []
    for key, _name in _unique_keys(artifact):
        offset = int(key.split("@")[1])
        sentinel, _dtype, size = struct.unpack_from("<IIQ", data, offset)
        if sentinel != 0xDEADBEEF:
            raise MlexportError(f"{weights} is corrupt at offset {offset}; re-export it")
        blobs.append({"file": "weight.bin", "bytes": size, "keys": [key]})
    return blobs


def _unique_keys(artifact: Path) -> list[tuple[str, str]]:
    seen: dict[str, str] = {}
    for key, name in _blob_ops(artifact / PACKAGE_NAME):
        seen.setdefault(key, name)
    return list(seen.items())


def _export_artifact(
    model: Decoder, plan: QuantPlan, out_dir: Path, log: Any, status: Any, quantized: Any, opts: Any
) -> dict[str, Any]:
    return export_mlpackage(model, plan, out_dir, log, status, palettize=opts.palettize, quantized=quantized)


def _fixed_bytes(model: Decoder, plan: QuantPlan) -> int:
    bases = 1 if model.local_rope_inv_freq is None else 2
    return bases * rope_table_bytes(model.max_context, model.spec.head_dim)


PROFILE = TargetProfile(
    name="coreml",
    # model.mlmodel is the MIL program: coremltools writes every constant of 10 or more elements to weight.bin
    # (should_use_weight_file), so the program is left out.
    weight_files=("weight.bin",),
    tie_modes=("shared4",),
    # fp16 scales; a reused Q4_1 grid's zero points become int8 block offsets with an fp16 scale per row.
    scale_bytes={4: 2, 8: 2, BLOCK_OFFSETS: 2},
    scale_dtypes={4: "float16", 8: "float16"},
    # Keeps the demo's weight.bin under 80 MB with its whole Q4_1 body reused.
    mixed_slack=0.052,
    # Zero points scored better on corpus KLD but answered the demo's Paris prompt wrongly: opt-in.
    asymmetric=False,
    exact_source_types=("Q4_0", "Q4_1"),
    # Core ML expands its constexpr weights when the model loads: a reused grid costs no speed.
    reuse_grid_efforts=("fast", "default", "high", "max"),
    export=_export_artifact,
    stored_blobs=stored_blobs,
    fixed_bytes=_fixed_bytes,
    # fp16 activations: no dynamic activation quantization.
    weight_only=lambda _opts: True,
    # The tie serves every logit: blocks of 32 with zero points unless stored rotated, and its most frequent
    # tokens' rows at int8, whose logits decide most greedy choices.
    tie_group=32,
    tie_int8_rows=1000,
    rotates_4bit_tie=True,
    own_options=("palettize", "tie_int8_rows"),
    # The only GPTQ tensor at the default is the tie (the body reuses the source grid), so the full recipe costs
    # little, and the 64-token continuation bar has no token to spare without the model's own samples.
    full_calibration=True,
    # weight.bin's fixed cost per blob: a 64-byte metadata record, and data aligned to 64 bytes.
    blob_record_bytes=128,
    values_at_conversion=True,
    runtimes=("coreml",),
    # Core ML's runtime exists only on macOS (`run` and `validate` fall back to the MIL interpreter elsewhere).
    bench_devices=("macos",),
    # Core ML state is fp16 only; an fp32 program stores each entry as two fp16 halves.
    kv_cache_bytes=lambda quant: 4 if quant == "fp32" else 2,
    decoder_features=frozenset({"sliding_window", "sandwich_norms", "mlp_activation=gelu_tanh", "embed_scale"}),
)
