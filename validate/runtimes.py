"""Artifact runtimes behind one interface: ``forward(tokens, start) -> logits [T, vocab]`` with a KV cache, or
``[1, vocab]`` where the artifact returns the last position only (ExecuTorch's, as runners read it).

``mlexport run`` and the validation stage both go through this, so what we validate is what users run
(``validate.drift.every_position_logits`` recovers every position from either kind).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from mlexport.exporters import profiles

from mlexport.artifacts import read_manifest
from mlexport.errors import MlexportError


@contextmanager
def _native_stderr_silenced() -> Iterator[None]:
    """Send file descriptor 2 to /dev/null for a moment: C++ logging bypasses Python's sys.stderr."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as sink:
            os.dup2(sink.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


class ArtifactRuntime(Protocol):
    max_context: int
    vocab_size: int
    eos_ids: list[int]
    bos_id: int | None

    def forward(self, tokens: list[int], start: int) -> np.ndarray: ...


def pte_files(directory: Path) -> tuple[Path, Path | None]:
    """An ExecuTorch artifact's program and its weight file, if it has one."""
    pte = directory / "model.pte"
    if not pte.is_file():
        raise MlexportError(f"{directory} has no model.pte; re-export it")
    return pte, next(iter(sorted(directory.glob("*.ptd"))), None)


class ExecuTorchRuntime:
    """A ``.pte`` through ExecuTorch's Python runtime (the same C++ kernels and XNNPACK delegate as on device)."""

    def __init__(self, pte: Path, data_path: Path | None = None) -> None:
        import executorch.extension.llm.custom_ops.custom_ops  # noqa: F401  (llama::update_cache, custom_sdpa)
        import executorch.kernels.quantized  # noqa: F401  (quantized_decomposed kernels)
        import torch
        from executorch.runtime import Runtime

        self._torch = torch
        try:
            with _native_stderr_silenced():  # XNNPACK's cpuinfo logs a few lines per load on stderr
                program = Runtime.get().load_program(pte, data_path=data_path)
                self._method = program.load_method("forward")
        except Exception as exc:
            raise MlexportError(f"ExecuTorch could not load {pte} ({exc}); re-export it") from None

        def const(name: str, default: Any) -> Any:
            if name not in program.method_names:
                return default
            out = program.load_method(name).execute([])
            return out if name == "get_eos_ids" else out[0]

        self.max_context = int(const("get_max_context_len", const("get_max_seq_len", 128)))
        self.max_seq_len = int(const("get_max_seq_len", self.max_context))
        self.vocab_size = int(const("get_vocab_size", 0))
        self.bos_id = const("get_bos_id", None)
        self.eos_ids = [int(e) for e in const("get_eos_ids", [])]

    @classmethod
    def open(cls, directory: Path, manifest: dict[str, Any], threads: int | None = None) -> ExecuTorchRuntime:
        """The artifact's ``model.pte`` with its ``.ptd`` (threads: set once per process, by ``prepare_process``)."""
        return cls(*pte_files(directory))

    @staticmethod
    def prepare_process(threads: int | None) -> None:
        """Load the kernels before a baseline RSS is taken, and size the threadpool the runtime shares."""
        import executorch.extension.llm.custom_ops.custom_ops  # noqa: F401
        import executorch.kernels.quantized  # noqa: F401
        from executorch.extension.pybindings.portable_lib import _unsafe_reset_threadpool

        if threads:
            _unsafe_reset_threadpool(threads)

    def forward(self, tokens: list[int], start: int) -> np.ndarray:
        torch = self._torch
        if start + len(tokens) > self.max_context:
            raise MlexportError(f"context of {self.max_context} tokens exceeded; re-export with a larger --max-context")
        t = torch.tensor([tokens], dtype=torch.long)
        pos = torch.tensor([start], dtype=torch.long)
        logits = self._method.execute((t, pos))[0]
        return logits.reshape(-1, logits.shape[-1]).float().numpy()


class OnnxRuntime:
    """A ``.onnx`` decoder through onnxruntime's CPU provider, carrying ``present.*`` back in as ``past_key_values``."""

    def __init__(self, directory: Path, manifest: dict[str, Any], threads: int | None = None) -> None:
        from mlexport.exporters.onnx import open_session

        try:
            self._session = open_session(directory, threads)
        except Exception as exc:
            raise MlexportError(f"onnxruntime could not load {directory} ({str(exc)[:200]}); re-export it") from None
        spec = manifest["model"]["spec"]
        self.max_context = int(manifest["max_context"])
        self.vocab_size = int(spec["vocab_size"])
        self.bos_id = spec.get("bos_id")
        self.eos_ids = [int(e) for e in spec.get("eos_ids", [])]
        self._past = [i for i in self._session.get_inputs() if i.name.startswith("past_key_values.")]
        self._outputs = ["logits"] + [i.name.replace("past_key_values.", "present.") for i in self._past]
        self._cache: list[np.ndarray] = []
        self._length = 0

    @classmethod
    def open(cls, directory: Path, manifest: dict[str, Any], threads: int | None = None) -> OnnxRuntime:
        return cls(directory, manifest, threads=threads)

    @staticmethod
    def prepare_process(threads: int | None) -> None:
        """Load onnxruntime before a baseline RSS is taken (threads are a session option, set by ``open``)."""
        import onnxruntime  # noqa: F401

    def forward(self, tokens: list[int], start: int) -> np.ndarray:
        if start + len(tokens) > self.max_context:
            raise MlexportError(f"context of {self.max_context} tokens exceeded; re-export with a larger --max-context")
        if start == 0 or not self._cache:
            self._cache = [np.zeros((1, i.shape[1], 0, i.shape[3]), np.float32) for i in self._past]
            self._length = 0
        if start > self._length:
            raise MlexportError(f"position {start} skips tokens: the cache holds {self._length}")
        cache = [c[:, :, :start] for c in self._cache]  # rewinding is a slice: the cache is per call, not static
        feeds = {
            "input_ids": np.array([tokens], np.int64),
            "attention_mask": np.ones((1, start + len(tokens)), np.int64),
            **{i.name: c for i, c in zip(self._past, cache, strict=True)},
        }
        logits, *present = self._session.run(self._outputs, feeds)
        self._cache, self._length = present, start + len(tokens)
        return logits.reshape(-1, logits.shape[-1]).astype(np.float32)


class CoreMLRuntime:
    """A ``.mlpackage``: Core ML's own ``MLModel.predict`` with a state on macOS; our MIL interpreter elsewhere.

    The interpreter is numpy, so it is slow (seconds per token on the demo model) and says so; it exists so that
    Linux CI can check the graph, the KV state and the compressed weights.
    """

    def __init__(self, directory: Path, manifest: dict[str, Any], force_interpreter: bool = False) -> None:
        import sys

        from mlexport.exporters.coreml import PACKAGE_NAME

        package = directory / PACKAGE_NAME
        if not package.is_dir():
            raise MlexportError(f"{directory} has no {PACKAGE_NAME}; re-export it")
        spec = manifest["model"]["spec"]
        self.max_context = int(manifest["max_context"])
        self.vocab_size = int(spec["vocab_size"])
        self.bos_id = spec.get("bos_id")
        self.eos_ids = [int(e) for e in spec.get("eos_ids", [])]
        self.uses_interpreter = force_interpreter or sys.platform != "darwin"
        if self.uses_interpreter:
            from mlexport.validate.mil_interpreter import MilInterpreter

            self._interpreter = MilInterpreter(package)
        else:  # pragma: no cover - needs macOS 15+ (Core ML runtime with states)
            import coremltools as ct

            self._model = ct.models.MLModel(str(package), compute_units=ct.ComputeUnit.CPU_AND_NE)
            self._state = self._model.make_state()

    @classmethod
    def open(cls, directory: Path, manifest: dict[str, Any], threads: int | None = None) -> CoreMLRuntime:
        """Core ML picks its own threads: ``threads`` does not apply."""
        return cls(directory, manifest)

    @staticmethod
    def prepare_process(threads: int | None) -> None:
        """Nothing to load ahead: coremltools is imported when the package opens."""

    def forward(self, tokens: list[int], start: int) -> np.ndarray:
        from mlexport.exporters.coreml import causal_mask

        if start + len(tokens) > self.max_context:
            raise MlexportError(f"context of {self.max_context} tokens exceeded; re-export with a larger --max-context")
        inputs = {"input_ids": np.array([tokens], np.int32), "causal_mask": causal_mask(start, len(tokens))}
        if self.uses_interpreter:
            if start == 0:
                self._interpreter.reset_state()
            logits = self._interpreter.predict(inputs)["logits"]
        else:  # pragma: no cover - macOS only
            if start == 0:
                self._state = self._model.make_state()
            logits = self._model.predict(inputs, state=self._state)["logits"]
        return np.asarray(logits, np.float32).reshape(-1, self.vocab_size)


# The runtimes behind ``TargetProfile.runtimes``, by name; onnxruntime-genai has its own loop (validate/bench.py).
RUNTIMES: dict[str, type[ExecuTorchRuntime] | type[OnnxRuntime] | type[CoreMLRuntime]] = {
    "executorch": ExecuTorchRuntime,
    "onnxruntime": OnnxRuntime,
    "coreml": CoreMLRuntime,
}


def target_runtimes(target: str | None) -> tuple[str, ...]:
    """The runtimes that execute ``target``'s artifacts, as its profile lists them (none for an unknown target)."""
    profile = profiles().get(target or "")
    return profile.runtimes if profile else ()


def open_runtime(artifact: Path) -> tuple[ArtifactRuntime, Path, dict[str, Any]]:
    """Open an artifact directory (or a file inside one) with the first runtime its target's profile names."""
    directory, manifest = read_manifest(artifact)
    names = [n for n in target_runtimes(manifest.get("target")) if n in RUNTIMES]
    if not names:
        raise MlexportError(
            f"{directory}: target {manifest.get('target')!r} has no runtime in this version of mlexport"
        )
    return RUNTIMES[names[0]].open(directory, manifest), directory, manifest
