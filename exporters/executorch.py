"""ExecuTorch exporter: quantized decoder -> one ``.pte`` with XNNPACK delegation and LLM runner metadata.

One torch.export, one to_edge_transform_and_lower, one to_executorch: every extra export or decomposition costs
minutes on a 30-layer model. The decoder is shaped so each layer lowers into one XNNPACK
partition between the KV-cache custom ops.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from mlexport.exporters.profile import TargetProfile
from mlexport.quantize.accounting import BLOCK_OFFSETS
from torch import nn

from mlexport.artifacts import write_bytes_atomic
from mlexport.model import Decoder
from mlexport.spec import ModelSpec

PTE_NAME = "model.pte"
PTD_TAG = "model"
NON_DELEGATED_LABEL = (
    "(program constants outside XNNPACK: norms, RoPE tables, unquantized lookups)"  # external constants go to model.ptd
)
TIED_PREFIXES = ("p_embed_tokens", "p_lm_head", "embed_tokens", "lm_head")


class XnnpackLayoutLookup(nn.Module):
    """The lookup of a 4-bit tie over the head's own XNNPACK bytes: nibbles packed with the even column low, +8, and
    bf16 group scales, so model.ptd stores the table once for both. ExecuTorch's ``embedding_4bit`` reads the high
    nibble first, so each pair of columns comes out swapped, and is swapped back."""

    def __init__(self, qdata: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> None:
        super().__init__()
        q = qdata.to(torch.int16) + 8
        packed = ((q[:, 1::2] << 4) | q[:, 0::2]).to(torch.uint8)
        self.packed = nn.Parameter(packed, requires_grad=False)
        self.scales = nn.Parameter(scale.to(torch.bfloat16).contiguous(), requires_grad=False)
        self.dtype = dtype

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        rows = torch.ops.quantized_decomposed.embedding_4bit.dtype(
            self.packed, self.scales, None, -8, 7, tokens, dtype=self.dtype
        )
        return rows.unflatten(-1, (-1, 2)).flip(-1).flatten(-2)


@contextmanager
def head_bytes_lookup(model: Decoder) -> Iterator[bool]:
    """While exporting a ``shared4`` tie, the lookup reads the head's XNNPACK bytes (``XnnpackLayoutLookup``);
    yields whether it does. Without it the lookup would pack its own copy of the table in ExecuTorch's order."""
    from torchao.quantization.quantize_.workflows.intx.intx_unpacked_to_int8_tensor import IntxUnpackedToInt8Tensor

    embed = model.embed_tokens
    weight = embed.weight.data if isinstance(embed.weight, nn.Parameter) else embed.weight
    head = model.lm_head.weight.data if isinstance(model.lm_head.weight, nn.Parameter) else model.lm_head.weight
    shares_4bit_head = (
        isinstance(weight, IntxUnpackedToInt8Tensor)
        and isinstance(head, IntxUnpackedToInt8Tensor)
        and weight.target_dtype == torch.int4
        and weight.qdata.untyped_storage().data_ptr() == head.qdata.untyped_storage().data_ptr()
    )
    if not shares_4bit_head:
        yield False
        return
    if weight.zero_point is not None and bool(weight.zero_point.any()):
        raise ValueError("XNNPACK's 4-bit head is symmetric: a shared 4-bit table cannot carry zero points")
    model.embed_tokens = XnnpackLayoutLookup(weight.qdata, weight.scale, weight.dtype)
    try:
        yield True
    finally:
        model.embed_tokens = embed


def runner_metadata(spec: ModelSpec, max_context: int) -> dict[str, Any]:
    """Constant methods that ExecuTorch's LLM runners (Python, llama_main, Android LlmModule) read."""
    meta: dict[str, Any] = {
        "get_max_seq_len": max_context,
        "get_max_context_len": max_context,
        "get_vocab_size": spec.vocab_size,
        "get_n_layers": spec.n_layers,
        "use_kv_cache": True,
        "use_sdpa_with_kv_cache": True,
        "enable_dynamic_shape": True,
    }
    if spec.bos_id is not None:
        meta["get_bos_id"] = int(spec.bos_id)
    if spec.eos_ids:
        meta["get_eos_ids"] = [int(e) for e in spec.eos_ids]
    return meta


def _tied_tag(node: torch.fx.Node) -> str | None:
    """External-data tag for the tied embedding/lm_head constants, so model.ptd stores equal bytes once."""
    name = str(node.target) if node.op == "get_attr" else node.name
    return PTD_TAG if name.startswith(TIED_PREFIXES) else None


def export_pte(model: Decoder, out_dir: Path, log: Any, status: Any = None, share_tied: bool = False) -> dict[str, Any]:
    """Export, lower and serialize ``model`` (already quantized) into ``out_dir/model.pte``.

    With ``share_tied`` the tied embedding and lm_head constants move to ``model.ptd``: XNNPACK keys its weights
    by SHA-256, so the head's int8 table and the embedding's identical table are written once there, while inside
    a single ``.pte`` they would be stored twice.

    Returns a report: delegate count and the ops left outside XNNPACK, which the manifest records.
    """
    import executorch.kernels.quantized  # noqa: F401  (registers quantized_decomposed out variants)
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import EdgeCompileConfig, ExecutorchBackendConfig, to_edge_transform_and_lower
    from executorch.exir.passes import MemoryPlanningPass
    from executorch.exir.passes.sym_shape_eval_pass import ConstraintBasedSymShapeEvalPass
    from torch.export import Dim, export

    logging.getLogger("executorch").setLevel(logging.ERROR)
    offset_linears = attach_block_offsets(model)
    max_context = model.max_context
    tokens = torch.zeros((1, 2), dtype=torch.long)
    input_pos = torch.tensor([0], dtype=torch.long)
    dynamic = ({1: Dim("tokens", min=1, max=max_context - 1)}, None)
    _say(status, "torch.export (dynamic token dimension)")
    with log.stage("torch_export"), torch.no_grad(), direct_shape_kernels():
        # Unwrap torchao's tensor subclasses into plain constants ourselves: the tags below must sit on the
        # placeholders that reach the XNNPACK serializer, and lowering's own unwrapping drops node metadata.
        from torchao.utils import unwrap_tensor_subclass

        model.last_logits_only = True  # runners read the last position; validate decodes the others
        try:
            with head_bytes_lookup(model):
                unwrap_tensor_subclass(model)
                program = export(model, (tokens, input_pos), dynamic_shapes=dynamic, strict=False)
        finally:
            model.last_logits_only = False
        if share_tied:
            for node in program.graph.nodes:
                if node.op == "placeholder" and _tied_tag(node):
                    node.meta.setdefault("custom", {})["delegate_constant_tag"] = PTD_TAG
    seconds = 4 * len(model.layer_map) * (2 if offset_linears else 1)  # ~3-4 s a layer on 2 cores, ~2x with offsets
    cost = f"~{seconds / 60:.0f} min" if seconds >= 90 else f"~{seconds} s"
    _say(status, f"lowering to XNNPACK (the long step: expect {cost} on 2 cores)")
    exported_nodes = len(program.graph.nodes)
    partitioner = _one_decomposition(XnnpackPartitioner())
    with (
        log.stage("lower_xnnpack"),
        record_blob_sources() as blob_sources,
        skip_idle_xnnpack_passes(),
        direct_shape_kernels(),
        count_graph_work(status, "lowering: graph nodes traced", LOWERING_NODES_PER_NODE * exported_nodes),
        decomposed_once(program, partitioner) as decomposed,
    ):
        edge = to_edge_transform_and_lower(
            decomposed,
            partitioner=[partitioner],
            constant_methods=runner_metadata(model.spec, max_context),
            compile_config=EdgeCompileConfig(_check_ir_validity=False),
        )
    _say(status, "serializing the .pte")
    with (
        log.stage("to_executorch"),
        direct_shape_kernels(),
        count_graph_work(status, "serializing: graph nodes traced", SERIALIZE_NODES_PER_NODE * exported_nodes),
    ):
        et_program = edge.to_executorch(
            ExecutorchBackendConfig(
                extract_delegate_segments=True,
                do_quant_fusion_and_const_prop=True,
                # Plan activation memory for the largest token count, not the export sample's two tokens.
                memory_planning_pass=MemoryPlanningPass(alloc_graph_input=False),
                sym_shape_eval_pass=ConstraintBasedSymShapeEvalPass(),
                external_constants=_tied_tag if share_tied else False,
            )
        )
        write_bytes_atomic(out_dir / PTE_NAME, et_program.buffer)
        if share_tied:
            et_program.write_tensor_data_to_file(str(out_dir))
    report = delegation_report(et_program.exported_program().graph)
    return {**report, "logits": "last position", "block_offset_linears": offset_linears, "blob_sources": blob_sources}


class OffsetLinear(nn.Linear):
    """A reused Q4_1 grid on XNNPACK, which has no zero points: ``w = d·q + B`` with ``B`` constant per block, so
    ``x·wᵀ = x·(d·q)ᵀ + blocksum(x)·Bᵀ``: the int4 blocks as 8da4w, plus a 32x smaller 8da8w Linear over the
    sums of x's blocks (quantize/block_offsets.py). The sums are a Linear too (a 0/1 matrix shared by every
    Linear of one width), so all of it stays inside XNNPACK."""

    offsets: nn.Linear
    block_sum: nn.Linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias) + self.offsets(self.block_sum(x))


def attach_block_offsets(model: nn.Module) -> int:
    """Turn every Linear whose 4-bit weight has float zero points (a reused Q4_1 grid) into an ``OffsetLinear``;
    return how many. The offsets are rounded to int8 per row, as validate's twin rounds them
    (block_offsets.as_target_stores)."""
    from mlexport.quantize import TensorQuant
    from mlexport.quantize.algorithms import QuantizedWeight
    from mlexport.quantize.block_offsets import block_offsets, has_float_zero
    from mlexport.quantize.torchao_map import to_torchao
    from torchao.quantization.quantize_.workflows.intx.intx_unpacked_to_int8_tensor import (
        IntxUnpackedToInt8Tensor,
    )

    sums: dict[tuple[int, int], nn.Parameter] = {}  # one 0/1 matrix per (width, block): XNNPACK stores it once
    converted: set[int] = set()
    for module in list(model.modules()):
        weight = getattr(module, "weight", None)
        if not isinstance(module, nn.Linear) or id(module) in converted:
            continue
        data = weight.data if isinstance(weight, nn.Parameter) else weight
        if not isinstance(data, IntxUnpackedToInt8Tensor) or data.target_dtype != torch.int4:
            continue
        group = int(data.block_size[1])
        grid = QuantizedWeight(data.qdata, data.scale.float(), data.zero_point, 4, group)
        if not has_float_zero(grid):
            continue
        cols = int(data.shape[1])
        main = QuantizedWeight(data.qdata, data.scale.float(), None, 4, group)
        dtype = data.dtype
        module.weight = nn.Parameter(to_torchao(main, TensorQuant("int4_dynact", 4, group), dtype), requires_grad=False)
        offsets = nn.Linear(cols // group, int(data.shape[0]), bias=False)
        stored = block_offsets(grid)
        offsets.weight = nn.Parameter(
            to_torchao(stored, TensorQuant("int8_dynact", 8, stored.group_size), dtype), requires_grad=False
        )
        if (cols, group) not in sums:
            ones = torch.zeros(cols // group, cols, dtype=dtype)
            ones[torch.arange(cols) // group, torch.arange(cols)] = 1.0
            sums[(cols, group)] = nn.Parameter(ones, requires_grad=False)
        block_sum = nn.Linear(cols, cols // group, bias=False)
        block_sum.weight = sums[(cols, group)]
        module.offsets, module.block_sum = offsets, block_sum
        module.__class__ = OffsetLinear
        converted.add(id(module))
    return len(converted)


def block_sum_bytes(widths: set[tuple[int, int]]) -> int:
    """The fp32 0/1 block-sum matrices OffsetLinear adds, one per (input width, block size)."""
    return sum(cols * (cols // group) * 4 for cols, group in widths)


@contextmanager
def record_blob_sources() -> Iterator[dict[str, list[str]]]:
    """Record which parameter each XNNPACK named-data key was serialized from.

    XNNPACK names its constants by SHA-256 of the packed bytes, so a stored blob cannot be traced back to the
    weights it serves from the file alone. We watch the serializer: while it defines a tensor we know the
    parameter (its placeholder's FQN), and every named blob added meanwhile belongs to it. ``inspect`` joins this
    map with the keys actually found in the ``.pte``/``.ptd``, so a stale or missing record shows up as unknown.
    """
    from executorch.backends.xnnpack.operators.node_visitor import NodeVisitor
    from executorch.exir._serialize._named_data_store import NamedDataStore

    sources: dict[str, set[str]] = {}
    current: list[str | None] = []
    define_tensor, add_named_data = NodeVisitor.define_tensor, NamedDataStore.add_named_data

    def recording_define_tensor(self: Any, tensor: torch.fx.Node, *args: Any, **kwargs: Any) -> Any:
        current.append(_placeholder_fqn(self.exported_program, tensor))
        try:
            return define_tensor(self, tensor, *args, **kwargs)
        finally:
            current.pop()

    def recording_add_named_data(self: Any, key: str, *args: Any, **kwargs: Any) -> Any:
        if current and current[-1]:
            sources.setdefault(key, set()).add(current[-1])
        return add_named_data(self, key, *args, **kwargs)

    NodeVisitor.define_tensor = recording_define_tensor
    NamedDataStore.add_named_data = recording_add_named_data
    result: dict[str, list[str]] = {}
    try:
        yield result
    finally:
        NodeVisitor.define_tensor, NamedDataStore.add_named_data = define_tensor, add_named_data
        result.update({key: sorted(names) for key, names in sources.items()})


def _choose_qparams_shape(
    input: torch.Tensor,
    mapping_type: str,
    block_size: list[int],
    target_dtype: torch.dtype,
    quant_min: Any = None,
    quant_max: Any = None,
    eps: Any = None,
    scale_dtype: torch.dtype | None = None,
    zero_point_dtype: torch.dtype | None = None,
    keepdim: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Shapes and dtypes of ``torchao.choose_qparams_affine`` without running its body."""
    from torchao.quantization.quant_primitives import _get_reduction_params

    reduced_shape, dims = _get_reduction_params(block_size, input.size())
    if keepdim:
        shape = [input.size(i) // block_size[i] for i in range(len(block_size))]
    else:
        shape = [size for i, size in enumerate(reduced_shape) if i not in dims]
    if zero_point_dtype is None:  # symmetric zero points stay in the scale's float dtype
        zero_point_dtype = torch.int32 if mapping_type == "ASYMMETRIC" else input.dtype
    return input.new_empty(shape, dtype=scale_dtype or input.dtype), input.new_empty(shape, dtype=zero_point_dtype)


def _quantize_shape(
    input: torch.Tensor, block_size: Any, scale: Any, zero_point: Any, output_dtype: torch.dtype, *rest: Any
) -> torch.Tensor:
    return input.new_empty(input.shape, dtype=output_dtype)


def _dequantize_shape(
    input: torch.Tensor,
    block_size: Any,
    scale: Any,
    zero_point: Any,
    input_dtype: Any,
    quant_min: Any = None,
    quant_max: Any = None,
    output_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    return input.new_empty(input.shape, dtype=output_dtype)


def _linear_shape(input: torch.Tensor, weight: torch.Tensor, bias: Any = None) -> torch.Tensor:
    return input.new_empty((*input.shape[:-1], weight.shape[0]))


SHAPE_KERNELS = {
    "torchao::choose_qparams_affine": _choose_qparams_shape,
    "torchao::quantize_affine": _quantize_shape,
    "torchao::dequantize_affine": _dequantize_shape,
    "aten::linear": _linear_shape,
}


@contextmanager
def direct_shape_kernels() -> Iterator[None]:
    """Propagate shapes through the quantize ops and linears in one step each, not through their decompositions.

    Lowering re-runs the whole graph on fake tensors with a symbolic token count in every pass, and these ops are
    composite: each call ran its Python body (dozens of symbolic-shape ops) in every pass, half of the lowering
    time. Here a fake tensor skips the composite body (a kernel at AutogradCPU that goes straight below
    autograd) and fake mode uses the shape function above (a Python meta, preferred over decomposing). Real
    tensors still run the composite body, and the graph records the same ops: the ``.pte`` is byte-identical
    (tested).
    """
    import torchao.quantization.quant_primitives  # noqa: F401  (registers the torchao ops)
    from torch._decomp import meta_table
    from torch._library.simple_registry import singleton
    from torch._library.utils import Kernel

    libraries: dict[str, torch.library.Library] = {}
    added: list[tuple[Any, Any, Kernel]] = []
    try:
        for qualname, shape_fn in SHAPE_KERNELS.items():
            namespace, name = qualname.split("::")
            op = getattr(getattr(torch.ops, namespace), name).default
            kernel = Kernel(shape_fn, "mlexport direct_shape_kernels")
            holder = singleton.find(qualname).fake_impl
            holder.kernels.append(kernel)
            added.append((op, holder, kernel))
            if op not in meta_table:
                meta_table[op] = shape_fn

            def below_autograd(*args: Any, _op: Any = op, **kwargs: Any) -> Any:
                with torch._C._AutoDispatchBelowAutograd():
                    return _op(*args, **kwargs)

            if namespace not in libraries:
                libraries[namespace] = torch.library.Library(namespace, "IMPL")
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # "overriding a previously registered kernel": restored on exit
                libraries[namespace].impl(name, below_autograd, "AutogradCPU")
        yield
    finally:
        for op, holder, kernel in added:
            holder.kernels.remove(kernel)
            if meta_table.get(op) in SHAPE_KERNELS.values():
                del meta_table[op]
        for library in libraries.values():
            library._destroy()


# FX nodes the lowering (and the serialization) create per node of the exported graph: every pass re-traces it.
# Measured on 2- and 6-layer decoders (lowering 28-31, serialization 3.8-4.8); a count that runs past the
# estimate extends the bar.
LOWERING_NODES_PER_NODE = 31
SERIALIZE_NODES_PER_NODE = 4


@contextmanager
def count_graph_work(status: Any, label: str, expected: int) -> Iterator[None]:
    """A determinate bar for lowering: its passes re-trace the graph node by node, so the FX nodes created so far
    measure the work done, and the exported graph's size times a measured ratio gives the total."""
    if status is None:
        yield
        return
    create_node = torch.fx.Graph.create_node
    counter = {"done": 0, "total": max(expected, 1), "next": 0}

    def counting_create_node(self: torch.fx.Graph, *args: Any, **kwargs: Any) -> torch.fx.Node:
        counter["done"] += 1
        if counter["done"] >= counter["next"]:
            counter["total"] = max(counter["total"], counter["done"] + counter["total"] // 20)
            counter["next"] = counter["done"] + counter["total"] // 100
            status(f"progress:{label} {counter['done']}/{counter['total']}")
        return create_node(self, *args, **kwargs)

    torch.fx.Graph.create_node = counting_create_node  # type: ignore[method-assign]
    try:
        yield
    finally:
        torch.fx.Graph.create_node = create_node  # type: ignore[method-assign]


# XNNPACK passes that only rewrite ops a decoder never has (convolutions, batch norm, pooling, upsampling, PReLU,
# decomposed SDPA). Each costs ~0.4 s of re-tracing per partition even when it matches nothing. Not
# ChannelsLastTaggedReshapePass: it also fixes the dim order of plain 4-D ops (our RMSNorm), measured.
_IDLE_PASS_TRIGGERS = {
    "ConvertToUpsampleBilinear2d": ("upsample", "index"),
    "ConvertToSDPAPass": ("softmax",),
    "FuseBatchNormPass": ("batch_norm",),
    "DecomposeBatchNorm": ("batch_norm",),
    "Conv1dUnsqueezePass": ("convolution",),
    "PReLUReshapePass": ("prelu",),
    "DecomposeConcatenate": ("cat",),
    "RemoveGetItemPass": ("max_pool",),
    "FuseActivationPass": ("relu", "hardtanh", "clamp"),
    "DimOrderOpsRevertPass": ("dim_order",),
}


@contextmanager
def skip_idle_xnnpack_passes() -> Iterator[None]:
    """Run XNNPACK's default pass list minus the passes whose trigger ops are absent from the partition.

    The choice is made per partition from the ops it contains, so a graph that does have a convolution still
    gets every pass. Parity tests (fp32 ``.pte`` == eager) guard this.
    """
    import executorch.backends.xnnpack.xnnpack_preprocess as preprocess

    manager = preprocess.XNNPACKPassManager

    class PrunedPassManager(manager):  # type: ignore[misc, valid-type]
        def __init__(self, exported_program: Any, passes: Any = None) -> None:
            super().__init__(exported_program, passes)
            if passes:
                return
            ops = " ".join(str(n.target) for n in exported_program.graph.nodes if n.op == "call_function").lower()
            self.passes = [p for p in self.passes if _pass_needed(p.__name__, ops)]

    preprocess.XNNPACKPassManager = PrunedPassManager
    try:
        yield
    finally:
        preprocess.XNNPACKPassManager = manager


@contextmanager
def decomposed_once(program: Any, partitioner: Any) -> Iterator[Any]:
    """Functionalize and decompose ``program`` in one re-trace instead of lowering's two.

    Lowering first re-traces the graph with an empty table (functionalization), then again with the default table
    minus the partitioner's preserved ops (~18 s each on the demo). One call with that table does both. While the
    context is open, asking the result for either of those decompositions again returns it as it is: the table is
    idempotent on its own output (the ``sym_size`` it leaves cannot decompose further, which is why lowering's
    own check would re-run it).
    """
    from executorch.exir.program._program import _default_decomposition_table
    from torch.export import ExportedProgram

    preserved, _ = partitioner.ops_to_not_decompose(program)
    table = _default_decomposition_table()
    for op in preserved:
        table.pop(op, None)
    decomposed = program.run_decompositions(table)
    run_decompositions = ExportedProgram.run_decompositions

    def once(self: Any, decomp_table: Any = None, *args: Any, **kwargs: Any) -> Any:
        asked_again = decomp_table is not None and (not decomp_table or set(decomp_table) == set(table))
        if self is decomposed and asked_again and not args and not kwargs:
            return self
        return run_decompositions(self, decomp_table, *args, **kwargs)

    ExportedProgram.run_decompositions = once  # type: ignore[method-assign]
    try:
        yield decomposed
    finally:
        ExportedProgram.run_decompositions = run_decompositions  # type: ignore[method-assign]


def _one_decomposition(partitioner: Any) -> Any:
    """Let lowering decompose the graph once instead of twice when that changes nothing.

    A partitioner that filters its preserved ops per node (XNNPACK's ``check_constraints``) sends lowering down
    its EDGE_DO_NOT_DECOMP path: two more full ``run_decompositions`` of the graph (~47 s each on the demo).
    When the filter accepts every node of every preserved op, as it does for our decoder's linears, preserving
    them all without a filter gives the same graph, and ExecuTorch then decomposes once. If any node fails the
    filter, the partitioner's own filter is kept.
    """
    original = partitioner.ops_to_not_decompose

    def ops_to_not_decompose(program: Any) -> Any:
        ops, keep = original(program)
        if keep is None:
            return ops, None
        preserved = set(ops)
        nodes = [n for n in program.graph.nodes if n.op == "call_function" and n.target in preserved]
        return (ops, None) if all(keep(n) for n in nodes) else (ops, keep)

    partitioner.ops_to_not_decompose = ops_to_not_decompose
    return partitioner


def _pass_needed(name: str, ops: str) -> bool:
    triggers = _IDLE_PASS_TRIGGERS.get(name)
    return triggers is None or any(t in ops for t in triggers)


def _placeholder_fqn(program: Any, node: torch.fx.Node) -> str | None:
    """The parameter/buffer FQN a (possibly dequantized) constant node reads, following first inputs."""
    for _ in range(8):
        if node.op == "placeholder":
            sig = program.graph_signature
            for table in (sig.inputs_to_parameters, sig.inputs_to_buffers, sig.inputs_to_lifted_tensor_constants):
                if node.name in table:
                    return table[node.name]
            return None
        inputs = [a for a in node.args if isinstance(a, torch.fx.Node)]
        if not inputs:
            return None
        node = inputs[0]
    return None


def stored_blobs(artifact: Path) -> list[dict[str, Any]]:
    """Every blob the artifact stores, read from the files: named data in the .pte and .ptd, and the program's
    own (non-delegated) constants. Keys sharing one buffer are one blob: that is ExecuTorch's dedup."""
    from executorch.exir._serialize._cord import Cord
    from executorch.exir._serialize._program import deserialize_pte_binary
    from executorch.extension.flat_tensor.serialize.serialize import FlatTensorSerializer

    blobs: list[dict[str, Any]] = []
    pte = deserialize_pte_binary((artifact / PTE_NAME).read_bytes())
    blobs += _group_keys(pte.named_data.pte_data, pte.named_data.buffers, PTE_NAME)
    program_constants = sum(len(b.storage) for b in pte.program.constant_buffer)
    if program_constants:
        blobs.append({"file": PTE_NAME, "bytes": program_constants, "keys": [], "label": NON_DELEGATED_LABEL})
    for ptd in sorted(artifact.glob("*.ptd")):
        data = FlatTensorSerializer().deserialize_to_named_data_store_output(Cord(ptd.read_bytes()), ptd.stem)
        for entries in data.external_data.values():
            blobs += _group_keys(entries, data.buffers, ptd.name)
    return blobs


def _group_keys(entries: dict[str, Any], buffers: list[bytes], file: str) -> list[dict[str, Any]]:
    by_buffer: dict[int, list[str]] = {}
    for key, entry in entries.items():
        by_buffer.setdefault(entry.buffer_index, []).append(key)
    return [{"file": file, "bytes": len(buffers[i]), "keys": sorted(keys)} for i, keys in sorted(by_buffer.items())]


# Ops that are expected to stay outside XNNPACK: the KV cache custom ops, the quantized embedding lookup, the
# scalar/shape bookkeeping of the dynamic token dimension, and the RoPE angles of this call's positions ([t, 64]
# elements, computed once per call for all layers; see Decoder.rope).
EXPECTED_NON_DELEGATED = {
    "arange",
    "cat",
    "unsqueeze_copy",
    "update_cache",
    "custom_sdpa",
    "embedding",  # fp32 lookup: XNNPACK has no embedding op
    "embedding_byte",
    "embedding_4bit",
    "flip",  # a shared 4-bit table's column pairs, swapped back after the lookup ([tokens, dim])
    "slice_copy",
    "select_copy",
    "sym_size",
    "_local_scalar_dense",
    "executorch_prim",
    "getitem",
    "alloc",
    "view",
}


def delegation_report(graph: torch.fx.Graph) -> dict[str, Any]:
    """Count delegates and list compute ops left on the portable CPU kernels (a silent slowdown otherwise)."""
    delegates = 0
    others: dict[str, int] = {}
    for node in graph.nodes:
        if node.op != "call_function":
            continue
        name = getattr(node.target, "__name__", str(node.target))
        if name == "executorch_call_delegate":
            delegates += 1
            continue
        base = name.split(".")[0]
        others[base] = others.get(base, 0) + 1
    fallback = {k: v for k, v in others.items() if k not in EXPECTED_NON_DELEGATED}
    return {"xnnpack_delegates": delegates, "non_delegated_ops": others, "unexpected_fallback_ops": fallback}


def _say(status: Any, text: str) -> None:
    if status is not None:
        status(text)


def _export_artifact(
    model: Decoder, plan: Any, out_dir: Path, log: Any, status: Any, quantized: Any, opts: Any
) -> dict[str, Any]:
    # Tied tensors always go to model.ptd: shared8 and shared4 store them once there, and dup4's two copies stay
    # visible to `inspect` under their own names.
    return export_pte(model, out_dir, log, status, share_tied=model.spec.tie_embeddings)


def _fixed_bytes(model: Decoder, plan: Any) -> int:
    """OffsetLinear's 0/1 block-sum matrices for a reused Q4_1 grid; the RoPE tables are computed per call."""
    shapes = {n: p.shape for n, p in model.named_parameters(remove_duplicate=False)}
    return block_sum_bytes({(int(shapes[n][1]), q.group_size) for n, q in plan.tensors.items() if q.float_zero})


PROFILE = TargetProfile(
    name="executorch",
    weight_files=(".pte", ".ptd"),
    # One int8 table; one 4-bit table that the lookup reads in XNNPACK's packing; or a 4-bit tie stored twice.
    tie_modes=("shared8", "shared4", "dup4"),
    rotates_4bit_tie=True,
    large_table_tie_mode="shared4",
    # XNNPACK keeps int4 group scales as bf16 and int8 scales as fp32; a reused Q4_1 grid's zero points become
    # int8 block offsets with an fp32 scale per row (quantize/block_offsets.py).
    scale_bytes={4: 2, 8: 4, BLOCK_OFFSETS: 4},
    scale_dtypes={4: "bfloat16", 8: "float32"},
    # Keeps the demo's .pte + .ptd under 92 MB (docs/quantization.md).
    mixed_slack=0.035,
    asymmetric=False,
    # XNNPACK keeps a source's fp16 scales at bf16 (within 2^-9 of each scale).
    exact_source_types=("Q4_0", "Q4_1"),
    # The offsets' extra Linears more than double the XNNPACK lowering time: reused unasked at --effort max only.
    reuse_grid_efforts=("max",),
    export=_export_artifact,
    stored_blobs=stored_blobs,
    fixed_bytes=_fixed_bytes,
    decoder_backend="executorch",
    int8_activations=True,
    symmetric_only=True,
    # It traces the shared decoder itself, so every decoder feature exports.
    decoder_features=frozenset({"sliding_window", "sandwich_norms", "mlp_activation=gelu_tanh", "embed_scale"}),
    runtimes=("executorch",),
    # The same .pte runs under llama_main on a phone and under the arm64 runner in qemu.
    bench_devices=("host", "macos", "adb", "qemu-arm64"),
    # The cache is a buffer of the decoder, which an fp16 export casts with the rest.
    kv_cache_bytes=lambda quant: 2 if quant == "fp16" else 4,
)
