"""ExecuTorch exporter: quantized decoder -> one ``.pte`` with XNNPACK delegation and LLM runner metadata.

One torch.export, one to_edge_transform_and_lower, one to_executorch: every extra export or decomposition costs
minutes on a 30-layer model (see REFERENCE §3). The decoder is shaped so each layer lowers into one XNNPACK
partition between the KV-cache custom ops.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from mlexport.artifacts import write_bytes_atomic
from mlexport.model import Decoder
from mlexport.spec import ModelSpec

PTE_NAME = "model.pte"
PTD_TAG = "model"  # external constants go to model.ptd
TIED_PREFIXES = ("p_embed_tokens", "p_lm_head", "embed_tokens", "lm_head")


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
    a single ``.pte`` they would be stored twice (REFERENCE §3).

    Returns a report: delegate count and the ops left outside XNNPACK, which the manifest records.
    """
    import executorch.kernels.quantized  # noqa: F401  (registers quantized_decomposed out variants)
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import EdgeCompileConfig, ExecutorchBackendConfig, to_edge_transform_and_lower
    from executorch.exir.passes import MemoryPlanningPass
    from executorch.exir.passes.sym_shape_eval_pass import ConstraintBasedSymShapeEvalPass
    from torch.export import Dim, export

    logging.getLogger("executorch").setLevel(logging.ERROR)
    max_context = model.max_context
    tokens = torch.zeros((1, 2), dtype=torch.long)
    input_pos = torch.tensor([0], dtype=torch.long)
    dynamic = ({1: Dim("tokens", min=1, max=max_context - 1)}, None)
    _say(status, "torch.export (dynamic token dimension)")
    with log.stage("torch_export"), torch.no_grad():
        # Unwrap torchao's tensor subclasses into plain constants ourselves: the tags below must sit on the
        # placeholders that reach the XNNPACK serializer, and lowering's own unwrapping drops node metadata.
        from torchao.utils import unwrap_tensor_subclass

        unwrap_tensor_subclass(model)
        program = export(model, (tokens, input_pos), dynamic_shapes=dynamic, strict=False)
        if share_tied:
            for node in program.graph.nodes:
                if node.op == "placeholder" and _tied_tag(node):
                    node.meta.setdefault("custom", {})["delegate_constant_tag"] = PTD_TAG
    _say(status, "lowering to XNNPACK (the long step: ~15 s per layer on 2 cores)")
    with log.stage("lower_xnnpack"):
        edge = to_edge_transform_and_lower(
            program,
            partitioner=[XnnpackPartitioner()],
            constant_methods=runner_metadata(model.spec, max_context),
            compile_config=EdgeCompileConfig(_check_ir_validity=False),
        )
    _say(status, "serializing the .pte")
    with log.stage("to_executorch"):
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
    return delegation_report(et_program.exported_program().graph)


# Ops that are expected to stay outside XNNPACK: the KV cache custom ops, the quantized embedding lookup, and the
# scalar/shape bookkeeping of the dynamic token dimension.
EXPECTED_NON_DELEGATED = {
    "update_cache",
    "custom_sdpa",
    "embedding",  # fp32 lookup: XNNPACK has no embedding op
    "embedding_byte",
    "embedding_4bit",
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
