"""Run a ``.pte`` on emulated arm64 (qemu-user) and compare its logits with the host's.

Why: phones run XNNPACK's arm64 (NEON, dotprod, i8mm, SVE) kernels, which the x86 host never executes. A small
C++ runner (``arm64_runner.cpp``) built against PyPI's aarch64 executorch wheel runs the same schedule of
``forward`` calls as the host, under ``qemu-aarch64-static``; any difference beyond float rounding is an arm64
numerics bug. Timings under emulation mean nothing and are reported only as "emulated".

``mlexport setup qemu-arm64`` installs the toolchain (Debian: qemu-user-static, g++-aarch64-linux-gnu,
patchelf), fetches the aarch64 wheels of the installed executorch and torch versions from the package index,
and builds the runner once into the cache.

Two wheel facts shape the build:
- ExecuTorch's LLM kernels (``llama::update_cache``, ``llama::custom_sdpa``) ship only inside
  ``libcustom_ops_aot_lib.so``, which also registers them with PyTorch and so needs ``libtorch_cpu`` and ``libc10``
  from the aarch64 torch wheel. Its link entries on ``libtorch.so`` (which pulls the CUDA libraries) and on the
  Python extension (which it uses no symbol of) are removed with patchelf.
- The aarch64 torch wheel is a CUDA build: ``libtorch_cpu`` links ``libcudart`` and ``libcupti`` for its
  profiler. Those are not on the package index here, so setup generates stand-in libraries that define each
  referenced symbol as ``abort()``: nothing on the CPU path calls them, and a call would stop loudly.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mlexport.errors import MlexportError

PACKAGES = {
    "qemu-aarch64-static": "qemu-user-static",
    "aarch64-linux-gnu-g++": "g++-aarch64-linux-gnu",
    "patchelf": "patchelf",
}
SYSROOT = "/usr/aarch64-linux-gnu"
PLATFORM = "manylinux_2_28_aarch64"
# qemu 7.2's "max" CPU with SME enabled gives wrong logits on int4 linears (without SME they match the host's),
# and we cannot tell whether qemu's SME emulation or the SME kernel is at fault. So the default is everything
# "max" has but SME: Armv9 SVE2, i8mm, dotprod, bf16.
DEFAULT_CPU = "max,sme=off"
TORCH_LIBS = ("libtorch_cpu.so", "libc10.so", "libgomp.so.1", "libarm_compute.so", "libarm_compute_graph.so")
TORCH_LIBS += ("libnvpl_blas_core.so.0", "libnvpl_blas_lp64_gomp.so.0", "libnvpl_lapack_core.so.0")
TORCH_LIBS += ("libnvpl_lapack_lp64_gomp.so.0", "libgfortran.so.5")
STUBBED = ("libcudart.so.13", "libcupti.so.13")
LLAMA_OPS = "libmlexport_llama_ops.so"


@dataclass
class Toolchain:
    """What the cache holds after setup: the runner and the library path it needs under qemu."""

    root: Path
    runner: Path
    library_path: str
    versions: dict[str, str]


def installed_versions() -> dict[str, str]:
    """The host's executorch and torch versions, without local labels (PyPI's aarch64 wheels have none)."""
    from importlib.metadata import version

    return {name: version(name).split("+")[0] for name in ("executorch", "torch")}


def cache_root() -> Path:
    from mlexport.sources import cache_dir

    v = installed_versions()
    return cache_dir() / "qemu-arm64" / f"executorch-{v['executorch']}-torch-{v['torch']}"


def _run(cmd: list[str], what: str, cwd: Path | None = None) -> str:
    done = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
        raise MlexportError(f"{what} failed ({' | '.join(tail)[:400]}); rerun `mlexport setup qemu-arm64`")
    return done.stdout


def _install_packages(say: Callable[[str], None]) -> None:
    missing = [pkg for tool, pkg in PACKAGES.items() if shutil.which(tool) is None]
    if not missing:
        return
    apt = shutil.which("apt-get")
    if apt is None or os.geteuid() != 0:
        raise MlexportError(
            f"missing {', '.join(missing)}: install them (Debian/Ubuntu: sudo apt-get install {' '.join(missing)}) "
            "and rerun `mlexport setup qemu-arm64`"
        )
    say(f"installing {' '.join(missing)} (apt-get)")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    install = [apt, "install", "-y", "-q", "--no-install-recommends", *missing]
    if subprocess.run(install, capture_output=True, env=env).returncode != 0:
        subprocess.run([apt, "update", "-q"], capture_output=True, env=env)
        done = subprocess.run(install, capture_output=True, text=True, env=env)
        if done.returncode != 0:
            raise MlexportError(f"apt-get install {' '.join(missing)} failed: {done.stderr.strip()[-300:]}")


def _download_wheel(name: str, version: str, into: Path) -> Path:
    python = f"{sys.version_info.major}{sys.version_info.minor}"
    cmd = [sys.executable, "-m", "pip", "download", f"{name}=={version}", "--no-deps", "--only-binary=:all:"]
    cmd += ["--platform", PLATFORM, "--python-version", python, "-d", str(into), "-q"]
    _run(cmd, f"downloading the aarch64 {name}=={version} wheel")
    found = sorted(into.glob(f"{name}-{version}-*aarch64*.whl"))
    if not found:
        raise MlexportError(f"pip saved no aarch64 wheel of {name}=={version}; check the package index")
    return found[0]


def _extract(wheel: Path, into: Path, keep: Callable[[str], bool]) -> None:
    with zipfile.ZipFile(wheel) as archive:
        for member in archive.infolist():
            if keep(member.filename):
                archive.extract(member, into)


def _stub_library(soname: str, symbols: list[str], into: Path) -> None:
    """A stand-in ``soname`` whose every symbol aborts: satisfies the loader, fails loudly if ever called."""
    source = into / f"{soname}.c"
    source.write_text("#include <stdlib.h>\n" + "".join(f"void {s}(void) {{ abort(); }}\n" for s in symbols))
    script = into / f"{soname}.map"
    script.write_text(f"{soname} {{ global: *; }};\n")  # the references are versioned by soname
    out = into / soname
    cmd = ["aarch64-linux-gnu-gcc", "-shared", "-fPIC", "-o", str(out), str(source), f"-Wl,-soname,{soname}"]
    _run([*cmd, f"-Wl,--version-script,{script}"], f"building the {soname} stand-in")


def setup(force: bool = False, say: Callable[[str], None] = lambda _: None) -> Toolchain:
    """Install, fetch and build what the qemu runner needs; cached, so a second call returns at once."""
    if sys.platform != "linux":
        raise MlexportError("qemu-arm64 needs Linux (qemu-user); run it on a Linux machine or in CI")
    root = cache_root()
    stamp = root / "setup.json"
    if stamp.is_file() and not force:
        return _toolchain(root, json.loads(stamp.read_text()))
    _install_packages(say)
    shutil.rmtree(root, ignore_errors=True)
    build = root.with_name(root.name + ".partial")
    shutil.rmtree(build, ignore_errors=True)
    try:
        info = _build(build, say)
    except BaseException:
        shutil.rmtree(build, ignore_errors=True)  # never leave a half-built cache behind
        raise
    build.rename(root)
    return _toolchain(root, info)


def _build(build: Path, say: Callable[[str], None]) -> dict[str, str]:
    wheels = build / "wheels"
    wheels.mkdir(parents=True)
    versions = installed_versions()
    say(f"downloading the aarch64 executorch {versions['executorch']} and torch {versions['torch']} wheels")
    et_wheel = _download_wheel("executorch", versions["executorch"], wheels)
    torch_wheel = _download_wheel("torch", versions["torch"], wheels)
    say("extracting headers and libraries")
    _extract(
        et_wheel,
        build,
        lambda n: (
            n.startswith(("executorch/include/", "executorch/lib/"))
            or n == "executorch/extension/llm/custom_ops/libcustom_ops_aot_lib.so"
        ),
    )
    _extract(torch_wheel, build, lambda n: n.startswith("torch/lib/") and n.rsplit("/", 1)[-1] in TORCH_LIBS)
    shutil.rmtree(wheels)
    lib = build / "lib"
    lib.mkdir()
    for path in (build / "torch" / "lib").iterdir():
        path.rename(lib / path.name)
    shutil.rmtree(build / "torch")
    ops = lib / LLAMA_OPS
    (build / "executorch/extension/llm/custom_ops/libcustom_ops_aot_lib.so").rename(ops)
    python_ext = f"_C.cpython-{sys.version_info.major}{sys.version_info.minor}-aarch64-linux-gnu.so"
    _run(
        ["patchelf", "--remove-needed", "libtorch.so", "--remove-needed", python_ext, "--set-soname", LLAMA_OPS]
        + [str(ops)],
        "patching the LLM custom-ops library",
    )
    undefined = _run(["aarch64-linux-gnu-nm", "-D", "--undefined-only", str(lib / "libtorch_cpu.so")], "nm")
    for soname in STUBBED:
        symbols = sorted({line.split()[-1].split("@")[0] for line in undefined.splitlines() if f"@{soname}" in line})
        _stub_library(soname, symbols, lib)
    say("building the arm64 runner")
    et = build / "executorch"
    source = Path(__file__).with_name("arm64_runner.cpp")
    cmd = ["aarch64-linux-gnu-g++", "-std=c++17", "-O2", "-Wno-deprecated-declarations", str(source)]
    cmd += ["-DC10_USING_CUSTOM_GENERATED_MACROS", "-DET_EVENT_TRACER_ENABLED", "-DET_USE_THREADPOOL"]
    cmd += [f"-I{et / 'include'}", f"-I{et / 'include/executorch/runtime/core/portable_type/c10'}"]
    cmd += ["-o", str(build / "runner"), f"-L{et / 'lib'}", f"-L{lib}", "-Wl,--no-as-needed"]
    libs = ["executorch", "executorch_kernels_optimized", "executorch_kernels_quantized", "executorch_backend_xnnpack"]
    cmd += [f"-l{name}" for name in [*libs, "executorch_threadpool", "mlexport_llama_ops"]]
    _run([*cmd, "-Wl,--as-needed", f"-Wl,-rpath-link,{lib}"], "compiling the arm64 runner")
    info = {**versions, "cpu_default": DEFAULT_CPU, "built": time.strftime("%Y-%m-%dT%H:%M:%S")}
    (build / "setup.json").write_text(json.dumps(info, indent=1))
    return info


def _toolchain(root: Path, info: dict[str, str]) -> Toolchain:
    path = f"{root / 'executorch' / 'lib'}:{root / 'lib'}"
    return Toolchain(root=root, runner=root / "runner", library_path=path, versions=info)


def ready() -> Toolchain | None:
    """The cached toolchain if setup has run and the tools are still installed, else None."""
    stamp = cache_root() / "setup.json"
    if not stamp.is_file() or any(shutil.which(tool) is None for tool in PACKAGES):
        return None
    return _toolchain(stamp.parent, json.loads(stamp.read_text()))


Schedule = list[tuple[int, list[int]]]


def write_schedule(schedule: Schedule, path: Path) -> None:
    values = [len(schedule)]
    for start, tokens in schedule:
        values += [start, len(tokens), *tokens]
    np.asarray(values, dtype="<i8").tofile(path)


def read_logits(path: Path) -> list[np.ndarray]:
    raw = path.read_bytes()
    out, offset = [], 0
    while offset < len(raw):
        rows, cols = np.frombuffer(raw, "<i8", 2, offset)
        offset += 16
        out.append(np.frombuffer(raw, "<f4", int(rows * cols), offset).reshape(int(rows), int(cols)))
        offset += int(rows * cols) * 4
    return out


def run_emulated(pte: Path, ptd: Path | None, schedule: Schedule, cpu: str = DEFAULT_CPU) -> tuple[list, float]:
    """The runner's logits for each call of ``schedule`` on emulated arm64, and the emulated wall time."""
    toolchain = ready()
    if toolchain is None:
        raise MlexportError("the arm64 runner is not built: run `mlexport setup qemu-arm64` first")
    import tempfile

    with tempfile.TemporaryDirectory(prefix="mlexport-qemu-") as tmp:
        sched, logits = Path(tmp) / "schedule.bin", Path(tmp) / "logits.bin"
        write_schedule(schedule, sched)
        cmd = ["qemu-aarch64-static", "-cpu", cpu, "-L", SYSROOT, str(toolchain.runner), str(pte)]
        cmd += [str(ptd) if ptd else "-", str(sched), str(logits)]
        env = dict(os.environ, LD_LIBRARY_PATH=toolchain.library_path)
        started = time.perf_counter()
        done = subprocess.run(cmd, capture_output=True, text=True, env=env)
        elapsed = time.perf_counter() - started
        if done.returncode != 0:
            lines = [line for line in done.stderr.splitlines() if not line.startswith("I ")]
            reason = (lines or [f"exit status {done.returncode}"])[-1][:300]
            raise MlexportError(f"the arm64 runner failed on {pte.name} under qemu ({reason})")
        return read_logits(logits), elapsed
