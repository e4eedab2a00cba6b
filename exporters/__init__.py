"""One module per target: executorch, onnx, coreml. Each declares its ``PROFILE`` (exporters/profile.py)."""

from __future__ import annotations

from mlexport.exporters.profile import TargetProfile


def profiles() -> dict[str, TargetProfile]:
    """Every target's profile, by name, in the order ``--target all`` builds them."""
    from mlexport.exporters import coreml, executorch, onnx

    return {p.name: p for p in (executorch.PROFILE, onnx.PROFILE, coreml.PROFILE)}
