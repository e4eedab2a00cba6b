"""Latency of exported artifacts under one protocol on every runtime and device, so the numbers compare.

A round: load the artifact; prefill a fixed prompt (the first N tokens of the built-in corpus, through the
artifact's own tokenizer); pick the first token; then decode G-1 more tokens greedily, ignoring end-of-sequence so
every round does the same work. Time to first token runs from the start of prefill to that first token; decode
tok/s is (G-1) over the decode loop. Warm-up rounds run first and are dropped; the summary gives min, median and
p90 of the rest. On the host each artifact and runtime runs in a fresh process, so its peak RSS is its own.

On ``qemu-arm64`` the point is numerics, not speed: the same prefill-and-decode schedule runs on the host and on
emulated arm64, and the logits are compared (see ``arm64.py``).
"""

from __future__ import annotations

import json
import math
import os
import resource
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mlexport.artifacts import read_manifest, write_bytes_atomic
from mlexport.errors import MlexportError

DEVICES = ("host", "adb", "qemu-arm64", "macos")
METRICS = ("load_s", "ttft_s", "prefill_tok_s", "decode_tok_s")
# The long-context protocol: a chat's system prompt and history, then a reply; it fits a 1,024-token context.
LONG_PROMPT, LONG_GEN = 850, 128
WORKER_TAG = "MLEXPORT-BENCH "


@dataclass
class BenchSettings:
    prompt_tokens: int = 128
    gen_tokens: int = 64
    threads: int | None = None
    repeat: int = 5
    warmup: int = 1


@dataclass
class BenchResult:
    artifact: str
    target: str
    quant: str
    runtime: str
    device: str
    size_mb: float
    settings: dict[str, Any]
    rounds: list[dict[str, float]] = field(default_factory=list)
    peak_rss_mb: float | None = None
    baseline_rss_mb: float | None = None  # the process before the artifact loads: Python and runtime libraries
    emulated: bool = False
    numerics: dict[str, Any] | None = None
    notes: list[str] = field(default_factory=list)
    roofline: dict[str, float] | None = None  # decode against this machine's memory bandwidth (``decode_roofline``)

    def summary(self) -> dict[str, dict[str, float]]:
        out = {}
        for metric in METRICS:
            values = [r[metric] for r in self.rounds if metric in r]
            if values:
                out[metric] = {
                    "min": float(np.min(values)),
                    "median": float(np.median(values)),
                    "p90": float(np.percentile(values, 90)),
                }
        return out

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "summary": self.summary()}


def bench_manifest(artifact: Path) -> tuple[Path, dict[str, Any]]:
    """Our artifact's manifest, or one inferred for a rival's directory (a ``model.pte``, or an onnxruntime-genai
    model), so the peers run under exactly the same protocol as ours."""
    directory = artifact if artifact.is_dir() else artifact.parent
    if (directory / "manifest.json").is_file() or not directory.is_dir():
        return read_manifest(artifact)
    files = [{"path": p.name, "bytes": p.stat().st_size} for p in sorted(directory.iterdir()) if p.is_file()]
    manifest: dict[str, Any] = {"quant": "peer", "peer": True, "files": files, "model": {"spec": {}}}
    if (directory / "model.pte").is_file():
        return directory, {**manifest, "target": "executorch"}
    config = directory / "genai_config.json"
    if config.is_file():
        context = json.loads(config.read_text()).get("model", {}).get("context_length")
        return directory, {**manifest, "target": "onnx", **({"max_context": context} if context else {})}
    raise MlexportError(
        f"{directory} is not an artifact: no manifest.json (export it with mlexport), model.pte or genai_config.json"
    )


def parse_device(text: str) -> tuple[str, str | None]:
    """``host`` | ``adb`` | ``adb:SERIAL`` | ``qemu-arm64`` | ``macos`` → (kind, serial)."""
    kind, _, serial = text.partition(":")
    if kind not in DEVICES or (serial and kind != "adb"):
        raise MlexportError(f"--device {text!r} is not one of host, adb, adb:SERIAL, qemu-arm64, macos")
    return kind, serial or None


def artifact_size_mb(manifest: dict[str, Any]) -> float:
    """The model's own files (weights and graph), not the tokenizer or the manifest."""
    return sum(f["bytes"] for f in manifest.get("files", []) if f["path"].startswith("model")) / 1e6


def prompt_ids(directory: Path, manifest: dict[str, Any], count: int, tokenizer: Path | None = None) -> list[int]:
    """The first ``count`` tokens of the built-in corpus: real text, the same on every machine."""
    from mlexport.corpus import default_corpus
    from mlexport.tokenizer import Tokenizer

    source = tokenizer or directory
    if not (source / "tokenizer.json").is_file():
        raise MlexportError(f"{source} has no tokenizer.json; pass --tokenizer DIR (the model's own directory)")
    ids = Tokenizer(source).encode(default_corpus())
    if len(ids) < count:
        raise MlexportError(f"--prompt-tokens {count} is more than the built-in corpus holds ({len(ids)})")
    return ids[:count]


def check_settings(artifacts: list[Path], settings: BenchSettings) -> None:
    """Refuse a protocol an artifact cannot hold before any timing starts."""
    for artifact in artifacts:
        _check_context(bench_manifest(artifact)[1], settings)


def _check_context(manifest: dict[str, Any], settings: BenchSettings) -> None:
    need = settings.prompt_tokens + settings.gen_tokens
    if need > int(manifest.get("max_context") or need):
        raise MlexportError(
            f"--prompt-tokens + --gen-tokens = {need} exceeds the artifact's context of {manifest['max_context']}; "
            "lower them or re-export with a larger --max-context"
        )
    if settings.gen_tokens < 2 or settings.prompt_tokens < 1 or settings.repeat < 1 or settings.warmup < 0:
        raise MlexportError("need --gen-tokens >= 2, --prompt-tokens >= 1, --repeat >= 1 and --warmup >= 0")


def available_runtimes(target: str, directory: Path, peer: bool = False) -> tuple[list[str], list[str]]:
    """The runtimes to time for a target on this machine, and notes on the ones left out."""
    runtimes, notes = [], []
    from mlexport.validate.runtimes import target_runtimes

    for name in target_runtimes(target):
        if peer and name == "onnxruntime":
            continue  # a rival's ONNX graph has its own inputs; its own runtime (genai) times it
        if name == "onnxruntime-genai":
            try:
                import onnxruntime_genai  # noqa: F401
            except ImportError:
                notes.append("onnxruntime-genai not installed (pip install 'mlexport[genai]'): not timed")
                continue
            if not (directory / "genai_config.json").is_file():
                notes.append("no genai_config.json in the artifact: onnxruntime-genai not timed")
                continue
        runtimes.append(name)
    return runtimes, notes


# ---------------------------------------------------------------- the worker (runs in its own process)


def _rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 1e6


def _peak_rss_mb() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 1e6 if sys.platform == "darwin" else peak * 1024 / 1e6  # bytes on macOS, KiB on Linux


def _timed_rounds(runtime: str, directory: Path, manifest: dict[str, Any], prompt: list[int], s: BenchSettings):  # noqa: ANN202
    from mlexport.validate.runtimes import RUNTIMES

    from mlexport.generate import prefill

    rounds = []
    for _ in range(s.warmup + s.repeat):
        t0 = time.perf_counter()
        model = RUNTIMES[runtime].open(directory, manifest, s.threads)
        t1 = time.perf_counter()
        token = int(np.argmax(prefill(model, prompt)[-1]))
        t2 = time.perf_counter()
        position = len(prompt)
        for _ in range(s.gen_tokens - 1):
            token = int(np.argmax(model.forward([token], position)[-1]))
            position += 1
        t3 = time.perf_counter()
        del model
        rounds.append(_round(t1 - t0, t2 - t1, t3 - t2, len(prompt), s.gen_tokens))
    return rounds[s.warmup :]


def _genai_rounds(directory: Path, prompt: list[int], s: BenchSettings) -> list[dict[str, float]]:
    """onnxruntime-genai's own generator loop: append_tokens runs prefill; each later generate_next_token decodes."""
    import onnxruntime_genai as og

    rounds = []
    for _ in range(s.warmup + s.repeat):
        t0 = time.perf_counter()
        config = og.Config(str(directory))
        if s.threads:
            overlay = {"model": {"decoder": {"session_options": {"intra_op_num_threads": s.threads}}}}
            config.overlay(json.dumps(overlay))
        model = og.Model(config)
        t1 = time.perf_counter()
        params = og.GeneratorParams(model)
        total = len(prompt) + s.gen_tokens
        params.set_search_options(max_length=total, min_length=total, do_sample=False)
        generator = og.Generator(model, params)
        generator.append_tokens(prompt)
        generator.generate_next_token()  # picks the first token from the prefill logits
        t2 = time.perf_counter()
        for _ in range(s.gen_tokens - 1):
            generator.generate_next_token()
        t3 = time.perf_counter()
        del generator, model
        rounds.append(_round(t1 - t0, t2 - t1, t3 - t2, len(prompt), s.gen_tokens))
    return rounds[s.warmup :]


def _round(load: float, first: float, decode: float, prompt: int, gen: int) -> dict[str, float]:
    return {"load_s": load, "ttft_s": first, "prefill_tok_s": prompt / first, "decode_tok_s": (gen - 1) / decode}


def _worker(request: dict[str, Any]) -> dict[str, Any]:
    settings = BenchSettings(**request["settings"])
    directory, manifest = bench_manifest(Path(request["artifact"]))
    runtime = request["runtime"]
    tokenizer = Path(request["tokenizer"]) if request.get("tokenizer") else None
    prompt = prompt_ids(directory, manifest, settings.prompt_tokens, tokenizer)
    from mlexport.validate.runtimes import RUNTIMES

    if runtime in RUNTIMES:
        RUNTIMES[runtime].prepare_process(settings.threads)
    baseline = _rss_mb()
    if runtime == "onnxruntime-genai":
        rounds = _genai_rounds(directory, prompt, settings)
    else:
        rounds = _timed_rounds(runtime, directory, manifest, prompt, settings)
    return {"rounds": rounds, "peak_rss_mb": _peak_rss_mb(), "baseline_rss_mb": baseline}


def _worker_main() -> None:
    """``python -m mlexport.validate.bench REQUEST_JSON``: one artifact and runtime, result on the last line."""
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    try:
        result = _worker(json.loads(sys.argv[1]))
    except MlexportError as exc:
        print(WORKER_TAG + json.dumps({"error": str(exc)}), flush=True)
        return
    print(WORKER_TAG + json.dumps(result), flush=True)


# ---------------------------------------------------------------- the devices


def memory_bandwidth_gb_s(megabytes: int = 256, repeat: int = 5) -> float:
    """What this machine copies per second (bytes read plus written), one copy thread per core: the limit a
    decoder that reads every weight once per token runs against."""
    from concurrent.futures import ThreadPoolExecutor

    threads = max(1, os.cpu_count() or 1)
    src = np.ones(megabytes * 1_000_000 // 8)
    dst = np.empty_like(src)
    parts = list(zip(np.array_split(src, threads), np.array_split(dst, threads), strict=True))
    best = math.inf
    with ThreadPoolExecutor(threads) as pool:  # numpy releases the GIL while it copies
        for _ in range(repeat):
            t0 = time.perf_counter()
            list(pool.map(lambda p: np.copyto(p[1], p[0]), parts))
            best = min(best, time.perf_counter() - t0)
    return 2 * src.nbytes / best / 1e9


def decode_bytes_per_token(manifest: dict[str, Any], position: float) -> dict[str, float] | None:
    """Bytes a decode step reads at ``position``: every stored weight but a lookup-only table (the duplicated tie,
    or an untied embedding, of which a step reads one row), plus each layer's cached K and V up to the position
    (or its sliding window). None for an artifact without our manifest (a rival's)."""
    from mlexport.exporters import profiles
    from mlexport.quantize import TensorQuant
    from mlexport.quantize.accounting import planned_tensor_bytes

    spec = manifest.get("model", {}).get("spec") or {}
    profile = profiles().get(manifest.get("target", ""))
    if not spec.get("layer_map") or profile is None or manifest.get("peer"):
        return None
    weights = artifact_size_mb(manifest) * 1e6
    tie = manifest.get("sharing", {}).get("tie", {})
    if spec.get("tie_embeddings", True):
        weights -= tie.get("duplicated_bytes") or 0
    else:
        entry = manifest.get("quant_plan", {}).get("tensors", {}).get("embed_tokens.weight")
        if entry:
            shape = (spec["vocab_size"], spec["dim"])
            weights -= planned_tensor_bytes(shape, TensorQuant(**entry), profile.scale_bytes)
    element = profile.kv_cache_bytes(manifest.get("quant", ""))
    window, sliding = spec.get("sliding_window"), spec.get("sliding_blocks") or []
    kv = 0.0
    for block in spec["layer_map"]:
        seen = min(position, window) if window and block < len(sliding) and sliding[block] else position
        kv += 2 * spec["n_kv_heads"][block] * spec["head_dim"] * element * seen
    return {"weight_bytes": weights, "kv_bytes": kv, "bytes_per_token": weights + kv}


def decode_roofline(result: BenchResult, manifest: dict[str, Any], bandwidth_gb_s: float) -> dict[str, float] | None:
    """The decode rate as bandwidth: bytes per token (at the mean decode position) times tokens per second, and
    its share of what this machine copies per second."""
    decode = result.summary().get("decode_tok_s", {}).get("median")
    s = result.settings
    read = decode_bytes_per_token(manifest, s["prompt_tokens"] + s["gen_tokens"] / 2)
    if not decode or read is None:
        return None
    achieved = read["bytes_per_token"] * decode / 1e9
    return {**read, "achieved_gb_s": achieved, "bandwidth_gb_s": bandwidth_gb_s, "fraction": achieved / bandwidth_gb_s}


def bench_host(
    artifact: Path, runtime: str, settings: BenchSettings, device: str = "host", tokenizer: Path | None = None
) -> BenchResult:
    """One artifact through one runtime, in a fresh process (so peak RSS is this artifact's alone)."""
    directory, manifest = bench_manifest(artifact)
    _check_context(manifest, settings)
    request = {"artifact": str(directory), "runtime": runtime, "settings": asdict(settings)}
    if tokenizer:
        request["tokenizer"] = str(tokenizer)
    env = dict(os.environ, TORCH_CPP_LOG_LEVEL="ERROR", TQDM_DISABLE="1")
    done = subprocess.run(
        [sys.executable, "-m", "mlexport.validate.bench", json.dumps(request)], capture_output=True, text=True, env=env
    )
    lines = [line for line in done.stdout.splitlines() if line.startswith(WORKER_TAG)]
    if not lines:
        tail = " | ".join(done.stderr.strip().splitlines()[-3:])[-400:]
        raise MlexportError(f"{runtime} crashed while timing {directory.name} (exit {done.returncode}: {tail})")
    payload = json.loads(lines[-1][len(WORKER_TAG) :])
    if "error" in payload:
        raise MlexportError(payload["error"])
    result = _result(directory, manifest, runtime, device, settings)
    result.rounds = payload["rounds"]
    result.peak_rss_mb, result.baseline_rss_mb = payload["peak_rss_mb"], payload["baseline_rss_mb"]
    if settings.threads and runtime == "coreml":
        result.notes.append("--threads does not apply to Core ML")
    return result


def _result(directory: Path, manifest: dict[str, Any], runtime: str, device: str, s: BenchSettings) -> BenchResult:
    return BenchResult(
        artifact=str(directory),
        target=manifest.get("target", "?"),
        quant=manifest.get("quant", "?"),
        runtime=runtime,
        device=device,
        size_mb=artifact_size_mb(manifest),
        settings=asdict(s),
    )


def bench_adb(
    artifact: Path,
    serial: str | None,
    settings: BenchSettings,
    runner: Path | None,
    tokenizer: Path | None = None,
    keep: bool = False,
) -> BenchResult:
    """ExecuTorch's llama_main on a phone; every round is a fresh process, so load time is per round."""
    from mlexport.validate.adb import bench_on_device

    from mlexport.tokenizer import Tokenizer

    directory, manifest = _runs_on(artifact, "adb")
    _check_context(manifest, settings)
    ids = prompt_ids(directory, manifest, settings.prompt_tokens, tokenizer)
    text = Tokenizer(tokenizer or directory).decode(ids)
    seq_len = settings.prompt_tokens + settings.gen_tokens + 8  # the runner counts the prompt it re-tokenizes
    device, rounds, _ = bench_on_device(
        directory, serial, runner, text, seq_len, settings.threads, settings.warmup + settings.repeat, keep
    )
    result = _result(directory, manifest, "executorch (llama_main)", f"adb:{device.serial}", settings)
    result.rounds = rounds[settings.warmup :]
    rss = [r["peak_rss_mb"] for r in rounds if "peak_rss_mb" in r]
    result.peak_rss_mb = max(rss) if rss else None
    if not rss:
        result.notes.append("the runner printed no RSS lines (build it with EXECUTORCH_ENABLE_LOGGING=ON)")
    result.notes.append(f"device {device.model or device.serial}; the runner stops at end-of-sequence")
    return result


def _runs_on(artifact: Path, kind: str) -> tuple[Path, dict[str, Any]]:
    """The artifact's directory and manifest, when its target's profile lists ``kind`` among its bench devices."""
    from mlexport.exporters import profiles

    directory, manifest = bench_manifest(artifact)
    target = manifest.get("target", "?")
    devices = {name: p.bench_devices for name, p in profiles().items()}
    if kind not in devices.get(target, ()):
        runs = " or ".join(name for name, kinds in devices.items() if kind in kinds) or "no"
        where = " or ".join(f"--device {d}" for d in devices.get(target, ())) or "no device"
        raise MlexportError(f"--device {kind} runs {runs} artifacts; {directory.name} is {target} (use {where})")
    return directory, manifest


def bench_qemu(artifact: Path, settings: BenchSettings, cpu: str, tokenizer: Path | None = None) -> BenchResult:
    """The host's and emulated arm64's logits for one prefill-and-decode schedule, compared."""
    from mlexport.validate.arm64 import run_emulated
    from mlexport.validate.runtimes import ExecuTorchRuntime, pte_files

    directory, manifest = _runs_on(artifact, "qemu-arm64")
    _check_context(manifest, settings)
    pte, ptd = pte_files(directory)
    host = ExecuTorchRuntime(pte, ptd)
    prompt = prompt_ids(directory, manifest, settings.prompt_tokens, tokenizer)
    chunk = max(1, getattr(host, "max_seq_len", host.max_context) - 1)
    schedule = [(i, prompt[i : i + chunk]) for i in range(0, len(prompt), chunk)]
    expected = [host.forward(tokens, start) for start, tokens in schedule]
    position = len(prompt)
    for _ in range(settings.gen_tokens - 1):
        token = int(np.argmax(expected[-1][-1]))
        schedule.append((position, [token]))
        expected.append(host.forward([token], position))
        position += 1
    emulated, seconds = run_emulated(pte, ptd, schedule, cpu)
    if [e.shape for e in emulated] != [e.shape for e in expected]:
        raise MlexportError("the arm64 runner returned logits of another shape than the host's; rebuild the runner")
    host_all, arm_all = np.concatenate(expected), np.concatenate(emulated)
    diff = np.abs(host_all - arm_all)
    from mlexport.validate.stats import log_softmax

    log_p, log_q = log_softmax(host_all), log_softmax(arm_all)
    kld = np.sum(np.exp(log_p) * (log_p - log_q), axis=-1)
    result = _result(directory, manifest, "executorch (arm64 runner)", f"qemu-arm64 ({cpu})", settings)
    result.emulated = True
    result.numerics = {
        "cpu": cpu,
        "calls": len(schedule),
        "rows": int(host_all.shape[0]),
        "max_abs_diff": float(diff.max()),
        "max_abs_logit": float(np.abs(host_all).max()),
        "same_argmax": float(np.mean(host_all.argmax(-1) == arm_all.argmax(-1))),
        "kld_mean": float(kld.mean()),  # KL(host || arm64) per row: how far the two distributions drift
        "bitwise_equal": bool(np.array_equal(host_all, arm_all)),
        "emulated_seconds": seconds,
    }
    result.notes.append("emulated s is qemu wall time: it says nothing about device speed")
    return result


def run_bench(
    artifacts: list[Path],
    device: str,
    settings: BenchSettings,
    runtime: str | None = None,
    runner: Path | None = None,
    qemu_cpu: str | None = None,
    on_step: Any = None,
    tokenizer: Path | None = None,
) -> list[BenchResult]:
    from mlexport.validate.runtimes import target_runtimes

    kind, serial = parse_device(device)
    if kind == "macos" and sys.platform != "darwin":
        raise MlexportError("--device macos needs a Mac: Core ML's runtime exists only there (use host or qemu-arm64)")
    if kind == "qemu-arm64":
        from mlexport.validate.arm64 import ready

        for artifact in artifacts:  # a wrong artifact is the user's first fix, whether or not the runner is built
            _runs_on(artifact, "qemu-arm64")
        if ready() is None:  # before any host work, not after the first artifact's reference run
            raise MlexportError("the arm64 runner is not built: run `mlexport setup qemu-arm64` first")
    results = []
    bandwidth: float | None = None  # measured once, after the first artifact's timing, on the same quiet machine
    for artifact in artifacts:
        directory, manifest = bench_manifest(artifact)
        target = manifest.get("target", "?")
        if kind == "adb":
            steps = [("executorch (llama_main)", lambda a=artifact: bench_adb(a, serial, settings, runner, tokenizer))]
        elif kind == "qemu-arm64":
            from mlexport.validate.arm64 import DEFAULT_CPU

            cpu = qemu_cpu or DEFAULT_CPU
            steps = [("arm64 numerics", lambda a=artifact, c=cpu: bench_qemu(a, settings, c, tokenizer))]
        else:
            _runs_on(artifact, kind)
            names, notes = available_runtimes(target, directory, bool(manifest.get("peer")))
            if runtime:
                if runtime not in target_runtimes(target):
                    raise MlexportError(f"--runtime {runtime} does not run {target} artifacts ({directory.name})")
                if runtime not in names:
                    raise MlexportError(f"--runtime {runtime} is not available here: {'; '.join(notes)}")
                names, notes = [runtime], []
            steps = [(n, lambda a=artifact, n=n: bench_host(a, n, settings, kind, tokenizer)) for n in names]
            for note in notes:
                if on_step:
                    on_step(f"note: {directory.name}: {note}")
        for name, step in steps:
            if on_step:
                on_step(f"{directory.name}: {name}")
            results.append(step())
            if kind in ("host", "macos"):
                if bandwidth is None:
                    bandwidth = memory_bandwidth_gb_s()
                results[-1].roofline = decode_roofline(results[-1], manifest, bandwidth)
    return results


# ---------------------------------------------------------------- output


def _fmt(value: float | None) -> str:
    """Three significant figures at most, so the table fits an 80-column CI log."""
    if value is None or not math.isfinite(value):
        return "-"
    magnitude = abs(value)
    if magnitude >= 1e4:
        return f"{value / 1e3:.1f}k"
    if magnitude >= 100:
        return f"{value:.0f}"
    return f"{value:.1f}" if magnitude >= 10 else f"{value:.2f}" if magnitude >= 1 else f"{value:.3f}"


def render_table(results: list[BenchResult]) -> Any:
    """Median per metric, with min and p90 below; decode also as a ratio to the first row."""
    from rich.table import Table

    settings = results[0].settings
    title = (
        f"{settings['prompt_tokens']} prompt tokens, {settings['gen_tokens']} generated, median of "
        f"{settings['repeat']} rounds after {settings['warmup']} warm-up; below: min/p90, and RSS over the bare process"
    )
    lines = [r.roofline for r in results if r.roofline]
    if lines:
        title += (
            f"; decode GB/s: bytes read per token (weights + KV cache at the mean position) x tok/s, below as a share"
            f" of the {lines[0]['bandwidth_gb_s']:.1f} GB/s this machine copies"
        )
    devices = {r.device for r in results}
    one_device = len(devices) == 1
    if one_device:
        title = f"{devices.pop()}: {title}"
    table = Table(title=title, title_style="bold")
    columns = ["artifact", "runtime", *([] if one_device else ["device"]), "MB", "load s", "TTFT ms"]
    for column in [*columns, "prefill tok/s", "decode tok/s"]:
        left = column in ("artifact", "runtime", "device")
        table.add_column(column, justify="left" if left else "right", no_wrap=left)
    table.add_column("peak RSS MB", justify="right")  # below: over the process before the artifact loaded
    roofline = any(r.roofline for r in results)
    if roofline:  # below: the share of the measured memory bandwidth
        table.add_column("decode GB/s", justify="right")
    if len(results) > 1:
        table.add_column("decode ×", justify="right")
    first = results[0].summary().get("decode_tok_s", {}).get("median")
    for r in results:
        s = r.summary()

        def cell(metric: str, scale: float = 1.0, s: dict = s) -> str:
            if metric not in s:
                return "-"
            low, mid, high = (_fmt(s[metric][k] * scale) for k in ("min", "median", "p90"))
            return f"{mid}\n[dim]{low}/{high}[/]"

        row = [Path(r.artifact).name, r.runtime, *([] if one_device else [r.device]), _fmt(r.size_mb), cell("load_s")]
        row += [cell("ttft_s", 1000), cell("prefill_tok_s"), cell("decode_tok_s")]
        rss = _fmt(r.peak_rss_mb) if r.peak_rss_mb else "-"
        if r.baseline_rss_mb:
            rss += f"\n[dim]+{_fmt(r.peak_rss_mb - r.baseline_rss_mb)}[/]"
        row.append(rss)
        if roofline:
            line = r.roofline
            row.append(f"{_fmt(line['achieved_gb_s'])}\n[dim]{100 * line['fraction']:.0f}%[/]" if line else "-")
        if len(results) > 1:
            decode = s.get("decode_tok_s", {}).get("median")
            row.append(f"{decode / first:.2f}" if decode and first else "-")
        table.add_row(*row)
    return table


def render_numerics(results: list[BenchResult]) -> Any:
    from rich.table import Table

    table = Table(title="arm64 (qemu) logits against the host's, same schedule", title_style="bold")
    for column in ("artifact", "qemu CPU", "calls", "rows", "max |Δ|", "max |logit|", "KLD", "same argmax", "bitwise"):
        table.add_column(column, justify="left" if column in ("artifact", "qemu CPU") else "right")
    table.add_column("emulated s", justify="right")
    for r in results:
        n = r.numerics or {}
        table.add_row(
            Path(r.artifact).name,
            n.get("cpu", "?"),
            str(n.get("calls")),
            str(n.get("rows")),
            f"{n.get('max_abs_diff', float('nan')):.3g}",
            f"{n.get('max_abs_logit', float('nan')):.3g}",
            f"{n.get('kld_mean', float('nan')):.2g}",
            f"{100 * n.get('same_argmax', 0):.1f}%",
            "yes" if n.get("bitwise_equal") else "no",
            f"{n.get('emulated_seconds', 0):.1f} (not a speed)",
        )
    return table


def write_plot(results: list[BenchResult], path: Path) -> None:
    """Grouped bars of median prefill and decode tok/s per artifact and runtime, as a standalone SVG."""
    rows = [(f"{Path(r.artifact).name} · {r.runtime}", r.summary()) for r in results if not r.emulated]
    if not rows:
        raise MlexportError("nothing to plot: emulated runs have no speeds")
    label_w, bar_h, gap, width = 300, 14, 10, 760
    top = max(s.get(m, {}).get("median", 0) for _, s in rows for m in ("prefill_tok_s", "decode_tok_s")) or 1
    scale = (width - label_w - 80) / top
    parts, y = [], 30
    for label, s in rows:
        parts.append(f'<text x="4" y="{y + bar_h}" font-size="12">{_escape(label)}</text>')
        for metric, colour in (("prefill_tok_s", "#4a7bd0"), ("decode_tok_s", "#d0784a")):
            value = s.get(metric, {}).get("median", 0)
            parts.append(f'<rect x="{label_w}" y="{y}" width="{value * scale:.1f}" height="{bar_h}" fill="{colour}"/>')
            parts.append(
                f'<text x="{label_w + value * scale + 4:.1f}" y="{y + bar_h - 3}" font-size="11">{value:.0f}</text>'
            )
            y += bar_h + 2
        y += gap
    legend = (
        '<text x="4" y="16" font-size="12">median tok/s: <tspan fill="#4a7bd0">prefill</tspan> · '
        '<tspan fill="#d0784a">decode</tspan></text>'
    )
    svg = (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{y + 10}" font-family="sans-serif">'
        f"{legend}{''.join(parts)}</svg>\n"
    )
    write_bytes_atomic(path, svg.encode())


def _escape(text: str) -> str:
    import html

    return html.escape(text)


if __name__ == "__main__":
    _worker_main()
