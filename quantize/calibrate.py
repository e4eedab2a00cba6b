"""Run a plan's quantizers over a decoder: calibration text, per-block Hessians, sequential GPTQ, and a disk cache.

GPTQ goes block by block, as in the paper: a block's Linears see inputs that already went through the *quantized*
blocks before it, so each block corrects what the earlier ones got wrong. A stored block that runs several times
in a row (MobileLLM-LS) accumulates its Hessian over every execution and is quantized once, before any of them
runs quantized.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import hashlib
import importlib.util
import json
import os
import tempfile
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Any

import torch
from mlexport.quantize import QuantPlan, TensorQuant
from mlexport.quantize.algorithms import QuantizedValues, QuantizedWeight, gptq, rtn, search, with_int8_rows
from torch import nn

from mlexport.errors import MlexportError

CALIBRATION_TOKENS = 8192
CALIBRATION_WINDOW = 256
ALGORITHM_VERSION = "7"  # bump when a quantizer's output changes, so cached results are not reused
# The modules whose code decides the cached values. Their source goes into the cache key too: a manual version
# alone lets values computed by an edited, uncommitted quantizer outlive the edit under the same key.
CACHED_CODE = (
    "mlexport.quantize",
    "mlexport.quantize.accounting",
    "mlexport.quantize.algorithms",
    "mlexport.quantize.calibrate",
    "mlexport.quantize.sensitivity",
    "mlexport.quantize.tune",
    "mlexport.quantize.rotation",
    "mlexport.quantize.smoothing",
    "mlexport.model",
    "mlexport.weights",
)
# What GPTQ's values (and the sensitivity pass, and the sampled text) depend on: all but the tuning. Keyed by this,
# a tuning change re-runs only the tuning, and a --no-tune-scales export reuses a tuned export's GPTQ stage.
UNTUNED_CODE = tuple(m for m in CACHED_CODE if m != "mlexport.quantize.tune")
DEFAULT_CALIBRATION = "python-pydoc-topics+self-generated"
# The default text's second part: the model's own samples (LLM-QAT's data-free calibration), 3,072 of the 8,192
# tokens. They keep GPTQ from fitting the pydoc topics' one domain (Python docs), which costs held-out text
# (docs/quantization.md, item 1).
SELF_GENERATED = {"sequences": 24, "length": 128, "top_k": 50, "greedy_prefix": 4, "seed": 0}
Progress = Callable[[int, int], None]  # (done, total) blocks
# Calibration recipes (``QuantPlan.gptq``): ``tokens`` in all, of which ``self_generated`` sequences of
# SELF_GENERATED["length"] tokens the model samples itself; GPTAQ's full-precision ``reference_pass``; and the tokens
# the sensitivity pass scores each tensor on. GPTQ's passes and the sensitivity pass grow linearly with them.
FULL_GPTQ = {"tokens": 8192, "self_generated": 24, "reference_pass": True, "sensitivity_tokens": 128}  # plan.gptq None
# --effort default: half the tokens, none of them sampled, for a demo export within 5 minutes on 2 cores. Chosen on
# the built-in corpus among the recipes that fit that time (docs/performance.md, benchmarks/effort_frontier.py).
DEFAULT_GPTQ = {"tokens": 4096, "self_generated": 0, "reference_pass": True, "sensitivity_tokens": 128}
# The light recipe: a quarter of the text, no samples, plain GPTQ, no sensitivity pass: about a third of the time.
LIGHT_GPTQ = {"tokens": 2048, "self_generated": 0, "reference_pass": False, "sensitivity_tokens": 0}
# The built-in text alone, its first ``tokens`` tokens (recorded beside the name); the older name is still read.
TEXT_CALIBRATION = "python-pydoc-topics-first-tokens"
TEXT_CALIBRATION_NAMES = (TEXT_CALIBRATION, "python-pydoc-topics-light")


def default_calibration_text() -> str:
    """Python's own reference-manual topics (``pydoc_data``): real English prose shipped with every Python, and a
    different text from the validation corpus (module docstrings), so drift is never measured on what was fitted."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[key] for key in sorted(topics))


def calibration_info(path: Path | None) -> tuple[str, dict[str, Any]]:
    if path is None:
        text, name = default_calibration_text(), "python-pydoc-topics"
    else:
        if not path.is_file():
            raise MlexportError(f"--calibration {path} does not exist; pass a UTF-8 text file or omit the flag")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise MlexportError(f"--calibration {path} is not UTF-8 text; convert it or pass another file") from None
        name = str(path)
    digest = hashlib.sha256(text.encode()).hexdigest()
    return text, {"name": name, "sha256": digest, "tokens": CALIBRATION_TOKENS, "window": CALIBRATION_WINDOW}


def calibration_windows(token_ids: list[int], n_tokens: int = CALIBRATION_TOKENS) -> list[list[int]]:
    windows = [
        token_ids[i : i + CALIBRATION_WINDOW]
        for i in range(0, min(len(token_ids), n_tokens), CALIBRATION_WINDOW)
        if len(token_ids[i : i + CALIBRATION_WINDOW]) >= 16
    ]
    if not windows:
        raise MlexportError("the calibration text tokenizes to fewer than 16 tokens; pass a longer --calibration file")
    return windows


@torch.no_grad()
def self_generated(
    model: nn.Module,
    sequences: int,
    length: int,
    top_k: int,
    greedy_prefix: int,
    seed: int,
    prefix: list[int] | None = None,
) -> list[list[int]]:
    """Sample ``sequences`` texts of ``length`` tokens from the model itself, all in one batch through its KV cache.

    Each starts from a random token, or from ``prefix`` (a chat template's opening), continues greedily up to
    ``greedy_prefix`` tokens in (so a stray first token settles into text), then samples from the top ``top_k``.
    What comes out follows the model's training distribution, not one domain. Fixed seed: the same model gives
    the same tokens on the same machine, and the tokens are recorded in the plan, so validation elsewhere reuses
    them rather than sampling again.
    """
    work = copy.deepcopy(model).eval()
    work.backend = "torch"  # plain attention over the widened caches below
    length = min(length, work.max_context)
    work.max_context = length
    for cache in work.caches:  # the caches are batch 1 and max_context long (the export layout): resize this copy's
        shape = (sequences, length, *cache.k.shape[2:])
        cache.k, cache.v = torch.zeros(shape, dtype=cache.k.dtype), torch.zeros(shape, dtype=cache.v.dtype)
    generator = torch.Generator().manual_seed(seed)
    vocab = work.lm_head.weight.shape[0]
    if prefix:
        tokens = torch.full((sequences, 1), prefix[0])
    else:
        tokens = torch.randint(0, vocab, (sequences, 1), generator=generator)
    forced = len(prefix) if prefix else 1
    out = [tokens]
    for pos in range(length - 1):
        logits = work(tokens, torch.tensor([pos]))[:, -1].float()
        if pos + 1 < forced:
            tokens = torch.full((sequences, 1), prefix[pos + 1])  # type: ignore[index]
        elif pos + 1 < greedy_prefix:
            tokens = logits.argmax(-1, keepdim=True)
        else:
            top = torch.softmax(logits, -1).topk(top_k, -1)
            tokens = top.indices.gather(1, torch.multinomial(top.values, 1, generator=generator))
        out.append(tokens)
    return torch.cat(out, 1).tolist()


def calibration_set(
    model: nn.Module,
    model_sha256: str | None,
    tokenizer_dir: Path,
    path: Path | None,
    recorded: dict[str, Any] | None = None,
    light: dict[str, Any] | None = None,
) -> tuple[list[list[int]], dict[str, Any]]:
    """GPTQ's calibration windows and their record for the plan: ``path``'s text, or by default the pydoc topics
    plus the model's own samples (from ``recorded`` when a manifest has them, else cached per model, else sampled).
    ``light`` (a recipe: DEFAULT_GPTQ, LIGHT_GPTQ) sets how many tokens in all and how many of them are samples."""
    from mlexport.tokenizer import Tokenizer

    text, info = calibration_info(path)
    token_ids = Tokenizer(tokenizer_dir).encode(text)
    recipe = {**FULL_GPTQ, **(light or {})}
    tokens, sequences = recipe["tokens"], int(recipe["self_generated"] or 0)
    if light is not None:
        info = {**info, "tokens": tokens}
        if path is None and not sequences:
            info["name"] = TEXT_CALIBRATION
    if path is not None or not sequences:
        return calibration_windows(token_ids, tokens), info
    sampling = {**SELF_GENERATED, "sequences": sequences}
    generated = (recorded or {}).get("generated_ids") or _cached_self_generated(model, model_sha256, sampling)
    n_generated = sum(len(g) for g in generated)
    windows = calibration_windows(token_ids, tokens - n_generated) + generated
    digest = hashlib.sha256((info["sha256"] + json.dumps(generated)).encode()).hexdigest()
    info = {
        **info,
        "name": DEFAULT_CALIBRATION,
        "sha256": digest,
        "self_generated": sampling,
        "generated_ids": generated,
    }
    return windows, info


def _cached_self_generated(
    model: nn.Module,
    model_sha256: str | None,
    sampling: dict[str, int] = SELF_GENERATED,
    prefix: list[int] | None = None,
) -> list[list[int]]:
    from mlexport.sources import cache_dir

    params = json.dumps({**sampling, "prefix": prefix} if prefix else sampling, sort_keys=True)
    key = hashlib.sha256(f"{model_sha256}{params}{torch.__version__}{code_digest(UNTUNED_CODE)}".encode())
    key = key.hexdigest()[:32]
    path = cache_dir() / "calibration" / f"{key}.json" if model_sha256 else None
    return _json_cached(path, lambda: self_generated(model, **sampling, prefix=prefix))


def tuning_samples(
    model: nn.Module, model_sha256: str | None, tokenizer_dir: Path | None, recipe: dict[str, Any]
) -> tuple[list[list[int]], str | None]:
    """Scale tuning's own samples of the model: free text from random tokens, plus conversations the model
    writes itself after its chat template's opening (an instruct model's other half of its training
    distribution). Returns the token ids and the opening used (None: no chat samples)."""
    from mlexport.tokenizer import Tokenizer

    generated = _cached_self_generated(model, model_sha256, recipe["extra_generated"])
    chat = recipe.get("chat_generated")
    tokenizer = Tokenizer(tokenizer_dir) if chat and tokenizer_dir else None
    opening = tokenizer.chat_opening() if tokenizer else None
    if not opening:
        return generated, None
    prefix = tokenizer.encode(opening)  # type: ignore[union-attr]
    if len(prefix) >= min(chat["length"], model.max_context) // 2:
        return generated, None  # a long system turn would leave the model little to write
    return generated + _cached_self_generated(model, model_sha256, chat, prefix), opening


def _json_cached(path: Path | None, compute: Callable[[], Any]) -> Any:
    """``compute()``, cached as JSON at ``path`` (None: not cached). A torn or unreadable file is recomputed, and
    failing to write the cache is not an error: it is only an optimization."""
    if path and path.is_file():
        try:
            return json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            pass
    result = compute()
    if path:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        try:
            tmp.write_text(json.dumps(result))
            os.replace(tmp, path)
        except OSError:
            tmp.unlink(missing_ok=True)
    return result


def quantize_weights(
    model: nn.Module,
    plan: QuantPlan,
    windows: list[list[int]] | None,
    progress: Progress | None = None,
    source_grids: dict[str, QuantizedWeight] | None = None,
    reference_pass: bool = True,
) -> dict[str, QuantizedWeight]:
    """Quantized values for every tensor the plan gives a method other than torchao's RTN.

    Tensors planned as ``source`` take the grid the source already stores (``source_grids``, lossless re-export);
    their float weights are that grid dequantized, so GPTQ on later blocks sees them exactly as they will run.
    Returns ``{weight name: QuantizedWeight}``; ``model`` itself is not changed.
    """
    wanted = {name: q for name, q in plan.tensors.items() if q.bits in (4, 8) and not q.shares and _ours(q)}
    results: dict[str, QuantizedWeight] = {}
    for name in [n for n, q in wanted.items() if q.method == "source"]:
        grid = (source_grids or {}).get(name)
        if grid is None:
            raise MlexportError(f"{name}: the plan reuses the source's grid, but the source stores none for it")
        results[name] = grid
        del wanted[name]
    if not wanted:
        return results
    needs_data = any(q.method == "gptq" for q in wanted.values())
    if needs_data and not windows:
        raise MlexportError("GPTQ needs calibration text; pass --calibration FILE or choose --quantizer search")
    modules = dict(model.named_modules())
    with torch.no_grad():
        if needs_data:
            _sequential(model, reference_pass, wanted, windows or [], results, progress)
        for name, q in wanted.items():  # what the block pass did not cover: embedding, head, data-free methods
            if name not in results:
                weight = modules[name.removesuffix(".weight")].weight
                results[name] = quantize_one(weight.detach(), q, None)
    return results


def _ours(q: TensorQuant) -> bool:
    """torchao's own quantizer covers symmetric RTN; everything else needs our values."""
    return q.method != "rtn" or q.asymmetric or bool(q.int8_rows)


def quantize_one(
    weight: torch.Tensor, q: TensorQuant, hessian: torch.Tensor | None, cross: torch.Tensor | None = None
) -> QuantizedWeight:
    group = q.group_size or weight.shape[1]
    symmetric = not q.asymmetric
    if q.method == "gptq" and hessian is not None:
        return gptq(weight, hessian, q.bits, group, symmetric, cross=cross)
    if q.method in ("search", "gptq"):  # GPTQ without a Hessian (embedding, tied head): the data-free search
        return search(weight, q.bits, group, symmetric)
    return rtn(weight, q.bits, group, symmetric)


# A block's Linears by the input they read; each group is one GPTQ pass over its stacked rows. Every step's
# statistics come from one pass over the block before any of it is quantized. Collecting o_proj's after q/k/v were
# quantized ("true sequential") fitted the calibration text closer and did worse on held-out text.
_STEPS = (
    ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    ("self_attn.o_proj",),
    ("mlp.gate_proj", "mlp.up_proj"),
    ("mlp.down_proj",),
)


def _sequential(
    model: nn.Module,
    reference_pass: bool,
    wanted: dict[str, TensorQuant],
    windows: list[list[int]],
    results: dict[str, QuantizedWeight],
    progress: Progress | None,
) -> None:
    """GPTAQ block by block. ``model`` never changes: each block is copied, quantized in place and run on the
    quantized stream, while the model's own block gives the full-precision inputs each Linear should have seen
    (``reference_pass``; without it, plain GPTQ). One block's copy at a time, not the whole model's."""
    limit = model.max_context  # the RoPE tables end there: cut longer windows into pieces
    pieces = [w[i : i + limit] for w in windows for i in range(0, len(w), limit)]
    hidden = [model.embed(torch.tensor([w])) for w in pieces]
    hidden_fp = [h.clone() for h in hidden] if reference_pass else []
    layer_map = list(model.layer_map)
    n_blocks = len(set(layer_map))
    quantized_blocks: dict[int, nn.Module] = {}  # a block's quantized copy, kept while the layer map reuses it
    done: set[int] = set()
    i = 0
    while i < len(layer_map):
        b = layer_map[i]
        runs = 1
        while i + runs < len(layer_map) and layer_map[i + runs] == b:
            runs += 1
        fp_block = model.layers[b] if reference_pass else None
        next_fp = None  # the full-precision stream after this block, when the capture pass already ran it
        block = quantized_blocks.get(b)
        if b not in done:
            prefix = f"layers.{b}."
            block = copy.deepcopy(model.layers[b])
            if any(name.startswith(prefix) for name in wanted):  # a block kept exact needs no Hessian
                fp_inputs: dict[str, list[torch.Tensor]] | None = None
                if fp_block is not None:
                    fp_inputs = {step[0]: [] for step in _STEPS}
                    next_fp = _run_with_hooks(
                        model, fp_block, hidden_fp, runs, fp_inputs, lambda n, x, store=fp_inputs: store[n].append(x)
                    )
                stats = _step_statistics(model, block, hidden, runs, fp_inputs)
                for step in _STEPS:
                    names = [n for n in step if f"{prefix}{n}.weight" in wanted]
                    if names:
                        _quantize_step(block, prefix, names, wanted, *stats[step[0]], results)
            quantized_blocks[b] = block
            done.add(b)
            if progress:
                progress(len(done), n_blocks)
        hidden = _run_with_hooks(model, block, hidden, runs, {}, None)
        if fp_block is not None:
            hidden_fp = next_fp if next_fp is not None else _run_with_hooks(model, fp_block, hidden_fp, runs, {}, None)
        i += runs
        if b not in layer_map[i:]:  # the layer map never runs it again: free its copy
            del quantized_blocks[b]
    # The head reads the final norm's output. For a tied model its 4-bit values are also the embedding table
    # (shared4), so GPTQ on the head helps the logits most, which is where a 4-bit tie costs the most drift.
    head = wanted.get("lm_head.weight")
    if head is not None and head.method == "gptq":
        x = torch.cat([model.head_input(h).reshape(-1, h.shape[-1]) for h in hidden]).float()
        cross = None
        if reference_pass:
            x_fp = torch.cat([model.head_input(h).reshape(-1, h.shape[-1]) for h in hidden_fp]).float()
            cross = (x_fp - x).T @ x
        results["lm_head.weight"] = quantize_one(model.lm_head.weight.detach(), head, x.T @ x, cross)


def _run_with_hooks(
    model: nn.Module,
    block: nn.Module,
    hidden: list[torch.Tensor],
    runs: int,
    names: Collection[str],
    seen: Callable[[str, torch.Tensor], None] | None,
) -> list[torch.Tensor]:
    """Run ``block`` ``runs`` times over every piece, handing each named Linear's input ([tokens, K], fp32) to
    ``seen`` in call order; returns the block's outputs."""
    modules = dict(block.named_modules())
    hooks = [
        modules[n].register_forward_pre_hook(
            lambda _m, args, n=n: seen(n, args[0].reshape(-1, args[0].shape[-1]).float())
        )
        for n in names
    ]
    out = []
    try:
        for h in hidden:
            for _ in range(runs):
                h = _run_block(model, block, h)
            out.append(h)
    finally:
        for handle in hooks:
            handle.remove()
    return out


def _step_statistics(
    model: nn.Module,
    block: nn.Module,
    hidden: list[torch.Tensor],
    runs: int,
    fp_inputs: dict[str, list[torch.Tensor]] | None,
) -> dict[str, tuple[torch.Tensor, torch.Tensor | None]]:
    """Per step: (Σ x xᵀ, Σ (x_fp − x) xᵀ) of its input over all calibration tokens and all ``runs`` consecutive
    executions of the block, pairing each input with the full-precision one of the same call (no ``fp_inputs``:
    the Hessian alone)."""
    names = [step[0] for step in _STEPS]
    stats: dict[str, list[Any]] = {name: [0, None, 0] for name in names}  # hessian, cross, calls seen

    def seen(name: str, x: torch.Tensor) -> None:
        acc = stats[name]
        acc[0] = acc[0] + x.T @ x
        if fp_inputs is not None:
            acc[1] = (0 if acc[1] is None else acc[1]) + (fp_inputs[name][acc[2]] - x).T @ x
        acc[2] += 1

    _run_with_hooks(model, block, hidden, runs, names, seen)
    return {name: (acc[0], acc[1]) for name, acc in stats.items()}


def _quantize_step(
    block: nn.Module,
    prefix: str,
    names: list[str],
    wanted: dict[str, TensorQuant],
    hessian: torch.Tensor,
    cross: torch.Tensor | None,
    results: dict[str, QuantizedWeight],
) -> None:
    """GPTQ treats rows independently, so Linears that read one input and share a plan run as one stacked pass."""
    modules = dict(block.named_modules())
    by_plan: dict[tuple, list[str]] = {}
    for n in names:
        by_plan.setdefault(_key(wanted[f"{prefix}{n}.weight"]), []).append(n)
    for group in by_plan.values():
        q = wanted[f"{prefix}{group[0]}.weight"]
        weights = [modules[n].weight.detach() for n in group]
        stacked = quantize_one(torch.cat(weights), q, hessian, cross)
        start = 0
        for n, w in zip(group, weights, strict=True):
            rows = slice(start, start + w.shape[0])
            start += w.shape[0]
            part = QuantizedWeight(
                stacked.qdata[rows],
                stacked.scale[rows],
                None if stacked.zero_point is None else stacked.zero_point[rows],
                stacked.bits,
                stacked.group_size,
            )
            results[f"{prefix}{n}.weight"] = part
            modules[n].weight.data = part.dequantize().to(w.dtype)  # later steps and blocks see it quantized


def _key(q: TensorQuant) -> tuple:
    return (q.method, q.bits, q.group_size, q.asymmetric)


def _run_block(model: nn.Module, block: nn.Module, h: torch.Tensor) -> torch.Tensor:
    return model.run_block(block, h)


# --- cache: GPTQ is deterministic for a model, plan and calibration text, so validate need not run it again ---


@functools.cache
def code_digest(modules: tuple[str, ...] = CACHED_CODE) -> str:
    """sha256 over the source of ``modules``, read from the files (an installed or an edited checkout alike),
    once per process: an edit made while an export runs cannot key its stages under two digests."""
    digest = hashlib.sha256()
    for name in modules:
        spec = importlib.util.find_spec(name)
        if spec is None or spec.origin is None:
            raise MlexportError(f"cannot find {name}'s source to key the quantization cache; reinstall mlexport")
        digest.update(Path(spec.origin).read_bytes())
    return digest.hexdigest()[:16]


def cache_key(model_sha256: str | None, plan: QuantPlan) -> str | None:
    """The cache entry of ``plan``'s values: a tuned plan's depends on the tuning code too, an untuned one's not."""
    if not model_sha256:
        return None
    payload = json.dumps(
        {
            "model": model_sha256,
            "plan": plan.to_dict(),
            "version": ALGORITHM_VERSION,
            "code": code_digest(CACHED_CODE if plan.tune else UNTUNED_CODE),
            "torch": torch.__version__,
        },
        sort_keys=True,
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:32]


# Quantized values cost ~150 MB per plan for the demo model, and every preset, group size or budget is its own
# plan, so a sweep or a few experiments would fill a disk. Keep the most recently used entries under this many GB
# (MLEXPORT_CACHE_MAX_GB; 0 keeps nothing).
CACHE_MAX_GB = 4.0


def cache_limit_bytes() -> int:
    raw = os.environ.get("MLEXPORT_CACHE_MAX_GB", "")
    try:
        return int(float(raw) * 1e9) if raw else int(CACHE_MAX_GB * 1e9)
    except ValueError:
        raise MlexportError(f"MLEXPORT_CACHE_MAX_GB={raw!r} is not a number of GB; set it to e.g. 4") from None


def prune_cache(folder: Path, keep: Path | None = None, limit: int | None = None) -> list[Path]:
    """Delete the least recently used ``*.pt`` entries until the rest fit in ``limit`` bytes (default
    ``cache_limit_bytes()``); ``keep`` (the entry just written) always stays. Returns what was deleted."""
    limit = cache_limit_bytes() if limit is None else limit
    entries = []
    for path in folder.glob("*.pt"):
        try:
            stat = path.stat()
        except OSError:  # removed by a concurrent run
            continue
        entries.append((stat.st_mtime, stat.st_size, path))
    total = sum(size for _, size, _ in entries)
    removed = []
    for _, size, path in sorted(entries, key=lambda e: e[0]):
        if total <= limit:
            break
        if keep is not None and path == keep:
            continue
        path.unlink(missing_ok=True)
        removed.append(path)
        total -= size
    return removed


def _to_raw(qw: QuantizedWeight) -> dict[str, Any]:
    """A QuantizedWeight as plain tensors and ints (``torch.load(weights_only=True)`` reads them back)."""
    return {
        "qdata": qw.qdata,
        "scale": qw.scale,
        **({"zero_point": qw.zero_point} if qw.zero_point is not None else {}),
        "bits": qw.bits,
        "group_size": qw.group_size,
        **({"int8_rows": _to_raw(qw.int8_rows)} if qw.int8_rows is not None else {}),
    }


def _from_raw(v: dict[str, Any]) -> QuantizedWeight:
    rows = _from_raw(v["int8_rows"]) if "int8_rows" in v else None
    return QuantizedWeight(v["qdata"], v["scale"], v.get("zero_point"), int(v["bits"]), int(v["group_size"]), rows)


def load_cached(path: Path) -> QuantizedValues | None:
    if not path.is_file():
        return None
    try:
        raw = torch.load(path, weights_only=True)
        results: QuantizedValues = {name: v["float"] if "float" in v else _from_raw(v) for name, v in raw.items()}
    except Exception:  # noqa: BLE001  (a torn or stale cache file is recomputed, never trusted)
        return None
    with contextlib.suppress(OSError):  # a read-only cache still serves hits
        os.utime(path)  # a hit counts as a use: prune_cache evicts by last use
    return results


def save_cached(path: Path, results: QuantizedValues) -> None:
    if cache_limit_bytes() == 0:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    raw = {name: _to_raw(qw) if isinstance(qw, QuantizedWeight) else {"float": qw} for name, qw in results.items()}
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    os.close(fd)
    try:
        torch.save(raw, tmp)
        os.replace(tmp, path)
    except OSError:
        Path(tmp).unlink(missing_ok=True)  # the cache is an optimization: failing to write it is not an error
        return
    prune_cache(path.parent, keep=path)


def prepare(
    model: nn.Module,
    plan: QuantPlan,
    model_sha256: str | None,
    tokenizer_dir: Path | None,
    calibration: Path | None = None,
    progress: Progress | None = None,
    source_grids: dict[str, QuantizedWeight] | None = None,
    tune_progress: Progress | None = None,
) -> QuantizedValues:
    """The plan's quantized values, from the cache when this model, plan and text were quantized before.

    Records the calibration text in ``plan.calibration``. When the plan already names one (a manifest's plan,
    re-run by validate), the text must still hash the same. A plan with ``tune`` gets its scales (and norm gains)
    tuned end to end after GPTQ (quantize/tune.py), on the calibration windows plus the recipe's own samples of
    the model, which are recorded in ``plan.tune`` the same way.
    """
    from mlexport.quantize.rotation import rotate_tie
    from mlexport.quantize.smoothing import smooth

    rotate_tie(model, plan)  # a manifest's plan: the values were computed on the rotated table
    smooth(model, plan)  # and on the smoothed weights
    planned = [q for q in plan.tensors.values() if q.bits in (4, 8) and not q.shares]
    if not any(_ours(q) for q in planned):
        return {}
    methods = {q.method for q in planned}
    windows = None
    if "gptq" in methods:
        recorded = plan.calibration
        if recorded and recorded["name"] == "python-pydoc-topics":  # the default before ALGORITHM_VERSION 4
            raise MlexportError(
                "this artifact was quantized by an older mlexport (pydoc-only calibration, GPTQ damping 0.01), "
                "whose values this version does not reproduce; re-export it with this version"
            )
        if calibration is None and recorded and recorded["name"] not in (DEFAULT_CALIBRATION, *TEXT_CALIBRATION_NAMES):
            calibration = Path(recorded["name"])
        if tokenizer_dir is None:
            raise MlexportError("GPTQ needs the model's tokenizer for calibration; use --quantizer search")
        windows, info = calibration_set(model, model_sha256, tokenizer_dir, calibration, recorded, plan.gptq)
        if recorded and recorded["sha256"] != info["sha256"]:
            raise MlexportError(
                f"the calibration text {info['name']} changed since export (sha256 {info['sha256'][:12]}… vs "
                f"{recorded['sha256'][:12]}…); restore it or re-export"
            )
        plan.calibration = info
    if plan.tune:
        if windows is None:
            raise MlexportError("scale tuning runs after GPTQ; use --quantizer gptq or --no-tune-scales")
        if not plan.tune.get("generated_ids"):  # a manifest's plan brings its own
            generated, opening = tuning_samples(model, model_sha256, tokenizer_dir, plan.tune)
            plan.tune = {**plan.tune, "generated_ids": generated, "chat_opening": opening}
    from mlexport.sources import cache_dir

    cache_limit_bytes()  # a malformed MLEXPORT_CACHE_MAX_GB fails here, before minutes of GPTQ

    def entry(of: QuantPlan) -> Path | None:
        key = cache_key(model_sha256, of)
        return cache_dir() / "quantized" / f"{key}.pt" if key else None

    gptq_path, path = entry(dataclasses.replace(plan, tune=None)), entry(plan)
    results = load_cached(path) if path else None
    if results is None:
        results = load_cached(gptq_path) if gptq_path and plan.tune else None  # GPTQ ran for this plan before
        if results is None:
            # the int8 head rows join before tuning: the tuning must see the table the target stores, and tunes them
            reference = (plan.gptq or {}).get("reference_pass", True)
            values = quantize_weights(model, plan, windows, progress, source_grids, reference)
            results = _attach_int8_rows(model, plan, values)
            if gptq_path and plan.tune:
                save_cached(gptq_path, results)
        if plan.tune:
            from mlexport.quantize.tune import stored_scale_dtypes, tune_scales

            text = (windows or []) + plan.tune["generated_ids"]
            dtypes = stored_scale_dtypes(plan.tune)
            results = tune_scales(model, plan, results, text, dtypes, plan.tune, tune_progress)
        if path:
            save_cached(path, results)
    return _attach_int8_rows(model, plan, results)


def _attach_int8_rows(model: nn.Module, plan: QuantPlan, results: QuantizedValues) -> QuantizedValues:
    """Give each tensor planned with ``int8_rows`` its int8 head rows (RTN from the float weights), unless it has
    them already (a cache entry written with them, tuned or not)."""
    params = dict(model.named_parameters(remove_duplicate=False))
    for name, q in plan.tensors.items():
        planned = results.get(name)
        if q.int8_rows and isinstance(planned, QuantizedWeight) and planned.int8_rows is None:
            results[name] = with_int8_rows(planned, params[name].detach(), q.int8_rows)
    return results


def sensitivity_cached(
    model: nn.Module,
    plan: QuantPlan,
    model_sha256: str | None,
    tokenizer_dir: Path,
    calibration: Path | None,
    progress: Progress | None = None,
    tokens: int = FULL_GPTQ["sensitivity_tokens"],
) -> dict[str, float]:
    """Per-tensor sensitivity on the calibration text (see mlexport.quantize.sensitivity), cached like GPTQ."""
    from mlexport.quantize.sensitivity import tensor_sensitivity

    from mlexport.sources import cache_dir
    from mlexport.tokenizer import Tokenizer

    text, info = calibration_info(calibration)
    # each tensor is measured alone at its full 4 bits, so the tie's int8 rows do not change the numbers
    plan = plan.without_int8_rows()
    key = cache_key(model_sha256, dataclasses.replace(plan, calibration=info, mixed={"n": tokens}))
    path = cache_dir() / "quantized" / f"{key}.sensitivity.json" if key else None
    ids = Tokenizer(tokenizer_dir).encode(text)
    return _json_cached(path, lambda: tensor_sensitivity(model, plan, ids, progress, tokens))
