"""One module per architecture family: how its checkpoint's config.json (or GGUF header) maps onto the ModelSpec
that the shared decoder builds from.

Each module declares ``ARCH``, an ``Architecture``; this package finds them, so adding a family is one new module
(plus its tests). What is common to every Llama-style config (layer count, widths, heads, RoPE, token ids) is read
once in ``mlexport.sources``; a module says only what its family does differently.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Architecture:
    name: str  # ModelSpec.arch
    hf_class: str  # config.json "architectures" entry
    model_types: tuple[str, ...]  # config.json "model_type" values
    # (config.json, the common fields) -> this family's ModelSpec fields (the common ones it overrides included).
    hf_fields: Callable[[dict[str, Any], dict[str, Any]], dict[str, Any]]
    gguf_names: tuple[str, ...] = ()  # GGUF "general.architecture" values
    # llama.cpp stores q/k rows permuted for its interleaved RoPE: undo it when reading the GGUF.
    gguf_rope_rows_permuted: bool = False
    # (state dict without ``model.``, the spec, config.json) -> the same weights under the decoder's names and
    # layout, for a family whose checkpoint names or lays them out differently.
    hf_weights: Callable[[dict[str, Any], Any, dict[str, Any]], dict[str, Any]] | None = None
    # (a GGUF header field getter taking the key without the architecture prefix, the common fields) -> this
    # family's ModelSpec fields, for a family whose GGUF header says more than the common fields.
    gguf_fields: Callable[[Callable[[str, Any], Any], dict[str, Any]], dict[str, Any]] | None = None
    # The GGUF architecture transformers converts this family's tokenizer as, when it does not know the family.
    gguf_tokenizer_arch: str | None = None

    def describe(self) -> str:
        return f"{self.hf_class} ({'/'.join(self.model_types)})"


def architectures() -> tuple[Architecture, ...]:
    """Every family module's ``ARCH``, in module-name order."""
    found = []
    for module in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        found.append(importlib.import_module(f"{__name__}.{module.name}").ARCH)
    return tuple(found)


def by_model_type(model_type: str) -> Architecture | None:
    return next((a for a in architectures() if model_type in a.model_types), None)


def by_name(name: str) -> Architecture | None:
    return next((a for a in architectures() if a.name == name), None)


def by_hf_class(name: str) -> Architecture | None:
    return next((a for a in architectures() if a.hf_class == name), None)


def by_gguf_name(name: str) -> Architecture | None:
    return next((a for a in architectures() if name in a.gguf_names), None)


def supported() -> list[str]:
    """For error messages: what can be read, HF classes first, then GGUF."""
    ggufs = "/".join(n for a in architectures() for n in a.gguf_names)
    return [a.describe() for a in architectures()] + [f"GGUF files of general.architecture {ggufs}"]
