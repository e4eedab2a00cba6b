"""The export pipeline: source -> spec + weights -> quant plan -> exporter -> artifact + manifest.

Each stage hands a plain object to the next; this module only sequences them, times them and writes the manifest.
"""

from __future__ import annotations

import re
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlexport.artifacts import (
    MANIFEST,
    MANIFEST_VERSION,
    StageLog,
    atomic_output_dir,
    describe_files,
    ensure_writable,
    tool_versions,
    write_json_atomic,
)
from mlexport.errors import MlexportError
from mlexport.model import build_decoder
from mlexport.quantize import DEFAULT_GROUP_SIZE, PRESETS, TARGET_TIE_MODES, plan_quantization
from mlexport.sharing import SharingPlan, account, build_sharing_plan, map_blobs, predicted_bytes, tensor_bytes
from mlexport.sources import LoadedModel, load_model

TARGETS = ("executorch", "onnx", "coreml")
WEIGHT_FILES = {"executorch": (".pte", ".ptd"), "onnx": (".onnx", ".onnx.data"), "coreml": ("weight.bin", ".mlmodel")}
TARGET_PRESETS = {"executorch": PRESETS, "onnx": PRESETS, "coreml": PRESETS}
# Bytes per quantization scale as each runtime stores them: XNNPACK keeps int4 group scales as bf16 and int8
# scales as fp32; MatMulNBits scales take the activation dtype (fp32 here).
SCALE_BYTES = {"executorch": {4: 2, 8: 4}, "onnx": {4: 4, 8: 4}, "coreml": {4: 2, 8: 2}}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "chat_template.jinja")
DEFAULT_MAX_CONTEXT = 2048

Status = Callable[[str], None]


@dataclass
class ExportOptions:
    model: str = "demo"
    target: str = "executorch"
    quant: str = "4bit"
    out: Path | None = None
    force: bool = False
    max_context: int = DEFAULT_MAX_CONTEXT
    group_size: int = DEFAULT_GROUP_SIZE
    tie_mode: str = "default"  # the target's first layout (TARGET_TIE_MODES); "auto" measures them
    accuracy_level: int = 4  # ONNX MatMulNBits: 4 = int8 activations (fast), 0 = fp32 activations (exact)
    palettize: int | None = None  # Core ML: N-bit k-means palette instead of linear quantization


def model_label(source: str) -> str:
    """Short name for out/<model>-<target>-<quant>/: 'demo', a directory's or file's name, a Hub id's name."""
    if source == "demo":
        return "demo"
    name = Path(source.rstrip("/")).name
    return re.sub(r"[^\w.-]+", "_", Path(name).stem if name.endswith(".gguf") else name)


def default_out_dir(opts: ExportOptions, target: str) -> Path:
    return Path("out") / f"{model_label(opts.model)}-{target}-{opts.quant}"


def validate_options(opts: ExportOptions) -> list[str]:
    """Check flags before the minutes of work start; return the targets to build."""
    if opts.quant not in PRESETS:
        raise MlexportError(f"unknown --quant {opts.quant!r}; choose one of {', '.join(PRESETS)}")
    targets = list(TARGETS) if opts.target == "all" else [opts.target]
    for t in targets:
        if t not in TARGETS:
            raise MlexportError(f"unknown --target {t!r}; choose one of {', '.join(TARGETS)}, all")
        if opts.quant not in TARGET_PRESETS[t]:
            raise MlexportError(f"--target {t} takes --quant {'|'.join(TARGET_PRESETS[t])}, not {opts.quant}")
    from mlexport.quantize import TIE_MODES

    if opts.tie_mode not in (*TIE_MODES, "auto", "default"):
        raise MlexportError(f"unknown --tie-mode {opts.tie_mode!r}; choose one of {', '.join(TIE_MODES)}, auto")
    if opts.palettize is not None and (opts.palettize not in (1, 2, 3, 4, 6, 8) or targets != ["coreml"]):
        raise MlexportError("--palettize takes 1, 2, 3, 4, 6 or 8 bits and applies to --target coreml only")
    if opts.accuracy_level not in (0, 1, 2, 3, 4):
        raise MlexportError("--accuracy-level must be 0 (fp32 activations), 1, 2, 3 or 4 (int8 activations)")
    if opts.max_context < 16:
        raise MlexportError("--max-context must be at least 16")
    if opts.out is not None and len(targets) > 1:
        raise MlexportError("-o names one artifact directory; with --target all, omit -o (writes out/<model>-*/)")
    return targets


def run_export(opts: ExportOptions, status: Status | None = None) -> list[Path]:
    """Export ``opts.model`` to every requested target; return the artifact directories."""
    say = status or (lambda _text: None)
    targets = validate_options(opts)
    outs = [opts.out or default_out_dir(opts, t) for t in targets]
    for out in outs:  # fail before loading anything if we would clobber a user's files
        ensure_writable(out, opts.force)
    log = StageLog()
    say(f"loading model {opts.model!r}")
    with log.stage("load"):
        loaded = load_model(opts.model)
    results = []
    for target, out in zip(targets, outs, strict=True):
        results.append(_export_one(loaded, opts, target, out, StageLog(list(log.stages)), say))
    return results


def _export_one(loaded: LoadedModel, opts: ExportOptions, target: str, out: Path, log: StageLog, say: Status) -> Path:
    spec = loaded.spec
    max_context = min(opts.max_context, spec.max_context)
    started = time.time()
    with atomic_output_dir(out, opts.force) as tmp:
        from mlexport.quantize.torchao_map import apply_plan

        tie_choice = choose_tie(loaded, opts, target, say, log)
        tie_mode = tie_choice["mode"] if tie_choice else _default_tie_mode(opts.tie_mode, target)
        if (
            opts.tie_mode not in ("auto", "default")
            and spec.tie_embeddings
            and tie_mode not in TARGET_TIE_MODES[target]
        ):
            raise MlexportError(
                f"--tie-mode {tie_mode} is not available for --target {target}; "
                f"choose one of {', '.join(TARGET_TIE_MODES[target])} or auto"
            )
        backend = "executorch" if target == "executorch" else "torch"
        model = build_decoder(spec, loaded.state_dict, max_context=max_context, backend=backend)
        sharing = build_sharing_plan(model, spec.layer_map)
        plan = plan_quantization(model, opts.quant, opts.group_size, tie_mode, per_channel_int8=target != "onnx")
        if target == "coreml":
            plan = weight_only(plan)
        predicted = predicted_bytes(model, plan, scale_bytes=SCALE_BYTES[target])
        if target != "coreml":  # coremltools compresses the converted program itself (same plan, its quantizer)
            say(f"quantizing ({opts.quant}: {_plan_text(plan.summary())})")
            with log.stage("quantize"):
                apply_plan(model, plan)
        if target == "executorch":
            from mlexport.exporters.executorch import export_pte

            # Tied tensors always go to model.ptd: shared8 stores them once there, and dup4's two copies stay
            # visible to `inspect` under their own names.
            report = export_pte(model, tmp, log, say, share_tied=spec.tie_embeddings)
        elif target == "onnx":
            from mlexport.exporters.onnx import export_onnx

            report = export_onnx(model, plan, tmp, log, say, accuracy_level=opts.accuracy_level)
        elif target == "coreml":
            from mlexport.exporters.coreml import export_mlpackage

            report = export_mlpackage(model, plan, tmp, log, say, palettize=opts.palettize)
        else:  # guarded by validate_options
            raise MlexportError(f"target {target!r} is not available")
        storage = storage_map(tmp, target, report.pop("blob_sources"), sharing, spec.layer_map)
        warnings = [*plan.notes, *_tie_warnings(spec, plan)]
        if report.get("unexpected_fallback_ops"):
            warnings.append(f"ops left outside XNNPACK (run on portable kernels): {report['unexpected_fallback_ops']}")
        if storage["duplicated_bytes"] and not _tie_warnings(spec, plan):
            warnings.append(f"{storage['duplicated_bytes'] / 1e6:.2f} MB of weights are stored twice (see inspect)")
        accounting = account(describe_files(tmp), predicted["total"], WEIGHT_FILES[target])
        if not accounting["within_slack"]:
            warnings.append(
                f"artifact stores {accounting['excess_bytes'] / 1e6:.1f} MB more than the plan's unique bytes "
                f"(ratio {accounting['ratio']}): some weight is duplicated"
            )
        copy_tokenizer(loaded, tmp)
        manifest: dict[str, Any] = {
            "manifest_version": MANIFEST_VERSION,
            "target": target,
            "quant": opts.quant,
            "created_unix": int(started),
            "model": {"source": opts.model, **loaded.source, "spec": spec.to_dict()},
            "max_context": max_context,
            "quant_plan": plan.to_dict(),
            "sharing": {**sharing.to_dict(), "tie": {**_tie_report(spec, plan, model), "auto": tie_choice}},
            "accounting": accounting,
            "storage": storage,
            "delegation": report,
            "warnings": warnings,
            "files": describe_files(tmp),
            "tools": tool_versions(),
            "stages": log.stages,
        }
        write_json_atomic(tmp / MANIFEST, manifest)
    for warning in warnings:
        say(f"warning: {warning}")
    return out


def weight_only(plan: Any) -> Any:
    """Core ML runs weights-only quantization with fp16 activations: say so in the plan instead of pretending."""
    from mlexport.quantize import TensorQuant

    for name, q in plan.tensors.items():
        if q.scheme.endswith("_dynact"):
            plan.tensors[name] = TensorQuant(
                q.scheme.replace("_dynact", "_weight"), q.bits, q.group_size, q.note, q.shares
            )
    return plan


def _default_tie_mode(requested: str, target: str) -> str:
    return TARGET_TIE_MODES[target][0] if requested in ("auto", "default") else requested


def choose_tie(
    loaded: LoadedModel, opts: ExportOptions, target: str, say: Status, log: StageLog
) -> dict[str, Any] | None:
    """Measure the tied-embedding layouts when there is a choice to make (tied model, 4-bit, --tie-mode auto)."""
    if opts.tie_mode != "auto" or not loaded.spec.tie_embeddings or opts.quant != "4bit":
        return None
    from mlexport.quantize.tie_choice import CHOICE_TOKENS, choose_tie_mode, corpus_tokens
    from mlexport.tokenizer import Tokenizer

    if loaded.tokenizer_dir is None:
        copy_tokenizer(loaded, Path())  # raises the one-line "no tokenizer" error
    modes = TARGET_TIE_MODES[target]
    say(f"--tie-mode auto: scoring {' and '.join(modes)} on {CHOICE_TOKENS} corpus tokens")
    with log.stage("tie_choice"):
        reference = build_decoder(loaded.spec, loaded.state_dict, max_context=CHOICE_TOKENS + 1)
        tokens = corpus_tokens(Tokenizer(loaded.tokenizer_dir))
        choice = choose_tie_mode(
            reference, tokens, opts.quant, opts.group_size, modes, SCALE_BYTES[target], target == "executorch"
        )
    scores = ", ".join(
        f"{c['mode']} KLD {c['kld_mean']:.3f} {c['predicted_bytes'] / 1e6:.1f} MB" for c in choice["candidates"]
    )
    say(f"tie mode {choice['mode']} ({scores})")
    return choice


def storage_map(
    artifact: Path, target: str, blob_sources: dict[str, list[str]], sharing: SharingPlan, layer_map: list[int]
) -> dict[str, Any]:
    """What the artifact's files store, blob by blob, and which logical tensors each blob serves."""
    if target == "executorch":
        from mlexport.exporters.executorch import stored_blobs
    elif target == "onnx":
        from mlexport.exporters.onnx import stored_blobs
    elif target == "coreml":
        from mlexport.exporters.coreml import stored_blobs
    else:
        raise MlexportError(f"no storage reader for target {target!r}")
    mapped = map_blobs(stored_blobs(artifact), blob_sources, sharing, layer_map)
    return {"blob_sources": blob_sources, **mapped}


def _plan_text(summary: dict[str, int]) -> str:
    return ", ".join(f"{n}× {k}" for k, n in sorted(summary.items()))


def _tie_warnings(spec: Any, plan: Any) -> list[str]:
    """A tied matrix quantized two ways is stored twice; say so rather than hide it."""
    if not spec.tie_embeddings or plan.tie_mode != "dup4":
        return []
    emb, head = plan.tensors.get("embed_tokens.weight"), plan.tensors.get("lm_head.weight")
    if emb and head and (emb.scheme, emb.group_size) != (head.scheme, head.group_size):
        return [
            f"tied embedding stored twice: embedding as {emb.scheme}, lm_head as {head.scheme}"
            f"/g{head.group_size} ({spec.vocab_size}x{spec.dim} duplicated)"
        ]
    return []


def _tie_report(spec: Any, plan: Any, model: Any) -> dict[str, Any]:
    if not spec.tie_embeddings:
        return {"tied": False}
    duplicated = 0
    if plan.tie_mode == "dup4":
        q = plan.tensors["embed_tokens.weight"]
        duplicated = tensor_bytes(spec.vocab_size * spec.dim, spec.vocab_size, q.scheme, q.group_size)
    return {"tied": True, "mode": plan.tie_mode, "duplicated_bytes": duplicated}


def copy_tokenizer(loaded: LoadedModel, out: Path) -> None:
    if loaded.tokenizer_dir is None:
        raise MlexportError(
            "the model has no tokenizer (tokenizer.json or tokenizer.model); add it to the model directory"
        )
    for name in TOKENIZER_FILES:
        src = loaded.tokenizer_dir / name
        if src.is_file():
            shutil.copy2(src, out / name)
