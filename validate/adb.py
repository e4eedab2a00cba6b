"""Latency on an Android device over adb, with ExecuTorch's own ``llama_main`` runner.

The flow: find the device, push the ``.pte`` (and ``.ptd``), the tokenizer and the runner binary to
``/data/local/tmp/mlexport/<artifact>``, run it once per round, pull each round's log, parse the runner's
``PyTorchObserver {json}`` stats line (and its "RSS after ..." lines), then remove the directory.

The runner is the user's arm64-v8a build of ExecuTorch's ``examples/models/llama`` (``llama_main``), passed with
``--runner`` or ``$MLEXPORT_ANDROID_RUNNER``; docs/performance.md, "Benchmarks on Android", gives the build commands.
Commands are built and outputs parsed by plain functions so tests check them against recorded real outputs.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlexport.errors import MlexportError

REMOTE_ROOT = "/data/local/tmp/mlexport"
OBSERVER = re.compile(r"PyTorchObserver (\{.*\})")
RSS = re.compile(r"RSS after [^:]*: ([0-9.]+) MiB")


@dataclass
class AdbDevice:
    serial: str
    state: str
    model: str = ""


def find_adb() -> str:
    found = shutil.which("adb")
    sdk = os.environ.get("ANDROID_HOME") or os.environ.get("ANDROID_SDK_ROOT")
    if found is None and sdk and (Path(sdk) / "platform-tools" / "adb").is_file():
        found = str(Path(sdk) / "platform-tools" / "adb")
    if found is None:
        raise MlexportError(
            "adb not found: install Android platform-tools (Debian/Ubuntu: apt install adb) or set ANDROID_HOME"
        )
    return found


def parse_devices(text: str) -> list[AdbDevice]:
    """``adb devices -l`` output → devices (any state: device, unauthorized, offline, ...)."""
    devices = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith(("List of devices", "*", "adb server")):
            continue
        fields = line.split()
        if len(fields) < 2:
            continue
        extras = dict(field.split(":", 1) for field in fields[2:] if ":" in field)
        devices.append(AdbDevice(serial=fields[0], state=fields[1], model=extras.get("model", "")))
    return devices


def choose_device(devices: list[AdbDevice], serial: str | None) -> AdbDevice:
    """The device to use, or an error that says what to do."""
    if serial:
        match = [d for d in devices if d.serial == serial]
        if not match:
            listed = ", ".join(d.serial for d in devices) or "none"
            raise MlexportError(f"no Android device {serial} attached (adb lists: {listed}); check `adb devices -l`")
        devices = match
    if not devices:
        raise MlexportError(
            "no Android device attached (adb devices lists none): connect one with USB debugging on, "
            "or use --device host"
        )
    ready = [d for d in devices if d.state == "device"]
    if not ready:
        d = devices[0]
        fix = "accept the USB debugging prompt on the phone" if d.state == "unauthorized" else "reconnect it"
        raise MlexportError(f"Android device {d.serial} is {d.state}: {fix}, then retry")
    if len(ready) > 1:
        raise MlexportError(
            f"{len(ready)} Android devices attached: pick one with --device adb:SERIAL "
            f"({', '.join(d.serial for d in ready)})"
        )
    return ready[0]


def remote_dir(artifact: Path) -> str:
    return f"{REMOTE_ROOT}/{re.sub(r'[^A-Za-z0-9._-]', '_', artifact.resolve().name)}"


def push_commands(adb: str, serial: str, files: list[Path], runner: Path, remote: str) -> list[list[str]]:
    base = [adb, "-s", serial]
    cmds = [[*base, "shell", "mkdir", "-p", remote]]
    cmds += [[*base, "push", str(f), f"{remote}/{f.name}"] for f in [*files, runner]]
    cmds.append([*base, "shell", "chmod", "755", f"{remote}/{runner.name}"])
    return cmds


def run_command(
    adb: str,
    serial: str,
    remote: str,
    runner: str,
    prompt: str,
    seq_len: int,
    threads: int | None,
    has_data: bool,
    log_name: str,
) -> list[str]:
    """One round of ``llama_main`` on the device, its output kept in ``log_name`` next to the model."""
    args = [f"./{runner}", "--model_path=model.pte", "--tokenizer_path=tokenizer.json", "--temperature=0"]
    args += [f"--seq_len={seq_len}", f"--prompt={prompt}"]
    if has_data:
        args.append("--data_paths=model.ptd")
    if threads:
        args.append(f"--cpu_threads={threads}")
    script = f"cd {shlex.quote(remote)} && {shlex.join(args)} > {log_name} 2>&1; echo mlexport-exit=$?"
    return [adb, "-s", serial, "shell", script]


def parse_observer(text: str) -> dict[str, Any]:
    """The last ``PyTorchObserver {json}`` line ExecuTorch's LLM runner prints (its Stats::to_json)."""
    found = OBSERVER.findall(text)
    if not found:
        raise MlexportError("the runner printed no PyTorchObserver stats line; was it built with the LLM runner?")
    return json.loads(found[-1])


def metrics_from_stats(stats: dict[str, Any], log: str = "") -> dict[str, float]:
    """Our metrics from the runner's timestamps, as ExecuTorch's own report defines them (stats.h)."""
    unit = float(stats.get("SCALING_FACTOR_UNITS_PER_SECOND", 1000))
    load = (stats["model_load_end_ms"] - stats["model_load_start_ms"]) / unit
    prefill = (stats["prompt_eval_end_ms"] - stats["inference_start_ms"]) / unit
    decode = (stats["inference_end_ms"] - stats["prompt_eval_end_ms"]) / unit
    out = {
        "load_s": load,
        "ttft_s": (stats["first_token_ms"] - stats["inference_start_ms"]) / unit,
        "prefill_tok_s": stats["prompt_tokens"] / prefill if prefill > 0 else 0.0,
        "decode_tok_s": stats["generated_tokens"] / decode if decode > 0 else 0.0,
        "prompt_tokens": float(stats["prompt_tokens"]),
        "generated_tokens": float(stats["generated_tokens"]),
    }
    rss = [float(v) for v in RSS.findall(log)]
    if rss:
        out["peak_rss_mb"] = max(rss) * 1.048576  # the runner reports MiB
    return out


def _check(cmd: list[str]) -> str:
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise MlexportError(f"`{shlex.join(cmd[:5])} ...` failed: {(done.stderr or done.stdout).strip()[-300:]}")
    return done.stdout


def bench_on_device(
    artifact_dir: Path,
    serial: str | None,
    runner: Path | None,
    prompt: str,
    seq_len: int,
    threads: int | None,
    rounds: int,
    keep: bool = False,
) -> tuple[AdbDevice, list[dict[str, float]], list[str]]:
    """Every round's metrics (warm-up included; the caller drops it) and the raw logs."""
    adb = find_adb()
    device = choose_device(parse_devices(_check([adb, "devices", "-l"])), serial)
    if runner is None and os.environ.get("MLEXPORT_ANDROID_RUNNER"):
        runner = Path(os.environ["MLEXPORT_ANDROID_RUNNER"])
    if runner is None or not runner.is_file():
        raise MlexportError(
            "--device adb needs ExecuTorch's llama_main built for arm64-v8a: pass --runner PATH or set "
            "MLEXPORT_ANDROID_RUNNER (docs/performance.md: Benchmarks on Android)"
        )
    ptd = artifact_dir / "model.ptd"
    files = [artifact_dir / "model.pte", *([ptd] if ptd.is_file() else []), artifact_dir / "tokenizer.json"]
    remote = remote_dir(artifact_dir)
    for cmd in push_commands(adb, device.serial, files, runner, remote):
        _check(cmd)
    results, logs = [], []
    try:
        with tempfile.TemporaryDirectory(prefix="mlexport-adb-") as tmp:
            for i in range(rounds):
                name = f"round-{i}.log"
                cmd = run_command(
                    adb, device.serial, remote, runner.name, prompt, seq_len, threads, ptd.is_file(), name
                )
                status = _check(cmd)
                _check([adb, "-s", device.serial, "pull", f"{remote}/{name}", str(Path(tmp) / name)])
                log = (Path(tmp) / name).read_text(errors="replace")
                if "mlexport-exit=0" not in status:
                    raise MlexportError(f"llama_main failed on {device.serial}: {log.strip()[-300:]}")
                results.append(metrics_from_stats(parse_observer(log), log))
                logs.append(log)
    finally:
        if not keep:
            subprocess.run([adb, "-s", device.serial, "shell", "rm", "-rf", remote], capture_output=True)
    return device, results, logs
