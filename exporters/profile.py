"""What the rest of mlexport needs to know about one target, declared once, by its exporter module.

The pipeline reads a target's choices from its profile instead of comparing target names, so adding a target, or
changing one target's default, is an edit in one exporter module.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlexport.quantize import PRESETS
from mlexport.quantize.accounting import BLOCK_OFFSETS


@dataclass(frozen=True)
class TargetProfile:
    """One target's storage, defaults and entry points. Options documented as "None = the target's default" are
    resolved against these fields in ``mlexport.pipeline`` only."""

    name: str
    # Files that hold weights: what byte accounting compares with the plan's prediction.
    weight_files: tuple[str, ...]
    # Tied-embedding layouts the runtime executes, the default first (quantize.TIE_MODES).
    tie_modes: tuple[str, ...]
    # Bytes per quantization scale as the runtime stores them, per bit width (and accounting.BLOCK_OFFSETS, whose
    # presence means a reused Q4_1 grid's zero points are stored as int8 block offsets), and the dtype per bit width
    # (what the scale tuning rounds to).
    scale_bytes: Mapping[Any, int]
    scale_dtypes: Mapping[int, str]
    # Default 4-bit size budget over all-4-bit, spent on the most sensitive tensors.
    mixed_slack: float
    # Zero points by default (only where the runtime executes them at full speed).
    asymmetric: bool
    # GGUF grids the runtime re-executes exactly, and the efforts at which it reuses them unasked.
    exact_source_types: tuple[str, ...]
    reuse_grid_efforts: tuple[str, ...]
    # (model, plan, out_dir, log, say, quantized, opts) -> the exporter's report; writes the artifact's files.
    export: Callable[..., dict[str, Any]]
    # The artifact's stored blobs, read back from its files (for the blob map and `inspect`).
    stored_blobs: Callable[[Path], list[dict[str, Any]]]
    # Bytes the target stores beyond the plan's tensors: (model, plan) -> bytes (RoPE tables, block-sum matrices).
    fixed_bytes: Callable[[Any, Any], int]
    presets: tuple[str, ...] = PRESETS
    # The decoder variant it traces (``build_decoder(backend=...)``).
    decoder_backend: str = "torch"
    # The runtime rounds every Linear's input to int8 per token (XNNPACK): the tie is rotated and the activations
    # smoothed for it (--smooth applies).
    int8_activations: bool = False
    # 8-bit weights per output channel; else per group (MatMulNBits takes its 8-bit upgrades per group).
    int8_per_channel: bool = True
    # Weights-only quantization (float activations), given the export options.
    weight_only: Callable[[Any], bool] = lambda _opts: False
    # Only symmetric 4-bit weights execute (--asymmetric is refused).
    symmetric_only: bool = False
    # A 4-bit tie: its block size with zero points, its first rows kept at int8 (default count), stored rotated.
    tie_group: int | None = None
    tie_int8_rows: int = 0
    rotates_4bit_tie: bool = False
    # The default tie layout for a table over half the model's parameters whose width rotates (quantize/rotation.py),
    # when it differs from ``tie_modes[0]``: such a table at int8 would outweigh the rest of the model.
    large_table_tie_mode: str | None = None
    # Options only this target takes (CLI flag names), and whether its default effort calibrates on the full recipe.
    own_options: tuple[str, ...] = ()
    full_calibration: bool = False
    # The weight file's fixed cost per blob, which no plan predicts.
    blob_record_bytes: int = 0
    # Quantized values reach the artifact at conversion time (Core ML), not through the eager model.
    values_at_conversion: bool = False
    # What the target's graph implements beyond the plain Llama decoder (``ModelSpec.features``).
    decoder_features: frozenset[str] = frozenset()
    # The runtimes that execute its artifacts (keys of validate.runtimes.RUNTIMES, or a runtime bench drives
    # itself), the one `run` and `validate` use first; and the `bench --device` kinds that run them.
    runtimes: tuple[str, ...] = ()
    bench_devices: tuple[str, ...] = ("host",)
    # Bytes per cached K or V element, given the --quant preset (what a decode step reads from the cache).
    kv_cache_bytes: Callable[[str], int] = lambda _quant: 4

    @property
    def stores_block_offsets(self) -> bool:
        """A reused Q4_1 grid's float zero points become int8 block offsets (quantize/block_offsets.py)."""
        return BLOCK_OFFSETS in self.scale_bytes
