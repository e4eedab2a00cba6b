"""Map a QuantPlan onto torchao configs that ExecuTorch's XNNPACK backend executes (8da4w, 8da8w, int8 embedding)."""

from __future__ import annotations

import torch
from mlexport.quantize import QuantPlan, TensorQuant
from mlexport.quantize.algorithms import QuantizedValues, QuantizedWeight
from torch import nn

from mlexport.errors import MlexportError


def _config(q: TensorQuant):  # noqa: ANN202  (torchao config classes)
    from torchao.quantization import Int8DynamicActivationIntxWeightConfig, IntxWeightOnlyConfig
    from torchao.quantization.granularity import PerAxis, PerGroup

    granularity = PerAxis(0) if q.group_size is None else PerGroup(q.group_size)
    if q.scheme == "int4_dynact":
        return Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int4, weight_granularity=granularity)
    if q.scheme == "int8_dynact":
        return Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int8, weight_granularity=granularity)
    if q.scheme == "int8_weight":
        return IntxWeightOnlyConfig(weight_dtype=torch.int8, granularity=granularity)
    if q.scheme == "int4_weight":
        return IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=granularity)
    raise MlexportError(f"scheme {q.scheme!r} has no ExecuTorch mapping")


def is_quantized(weight: torch.Tensor) -> bool:
    """True for torchao's quantized tensor subclasses (a plain Parameter means the layer stayed float)."""
    data = weight.data if isinstance(weight, nn.Parameter) else weight
    return type(data) is not torch.Tensor


def apply_plan(model: nn.Module, plan: QuantPlan, quantized: QuantizedValues | None = None) -> nn.Module:
    """Quantize in place, then prove every planned tensor was quantized.

    Tensors in ``quantized`` (our own quantizers' values) become torchao tensors holding exactly those values; the
    rest go through torchao's round-to-nearest, one ``quantize_`` call per distinct config. Its float entries
    (tuned norm gains) replace the model's own.
    """
    from mlexport.quantize.rotation import rotate_tie
    from mlexport.quantize.smoothing import smooth
    from torchao.quantization import quantize_

    rotate_tie(model, plan)  # before the table is rounded: the plan's int8 rows are of the rotated table
    smooth(model, plan)  # likewise the smoothed weights (before the tuned gains, which were tuned smoothed)
    if plan.dtype == "fp16":
        model.half()
    quantized = quantized or {}
    set_tuned_floats(model, quantized)
    modules = dict(model.named_modules())
    by_config: dict[tuple, list[str]] = {}
    for name, q in plan.tensors.items():
        if q.scheme in ("fp32", "fp16") or q.shares:
            continue
        if name in quantized:
            module = modules[name.removesuffix(".weight")]
            module.weight = nn.Parameter(to_torchao(quantized[name], q, module.weight.dtype), requires_grad=False)
            continue
        if q.method != "rtn" or q.asymmetric:
            raise MlexportError(f"{name}: the plan asks for {q.method} quantization, but no values were computed")
        by_config.setdefault((q.scheme, q.group_size), []).append(name.removesuffix(".weight"))
    for (scheme, group), names in by_config.items():
        wanted = set(names)
        quantize_(
            model,
            _config(TensorQuant(scheme=scheme, bits=0, group_size=group)),
            filter_fn=lambda mod, fqn, wanted=wanted: fqn in wanted,
        )
    modules = dict(model.named_modules())  # quantize_ replaced some modules' weights
    for name, q in plan.tensors.items():
        if q.shares:
            _share_quantized(modules[name.removesuffix(".weight")], modules[q.shares.removesuffix(".weight")], q)
    left = [
        name
        for name, q in plan.tensors.items()
        if q.scheme not in ("fp32", "fp16") and not is_quantized(modules[name.removesuffix(".weight")].weight)
    ]
    if left:
        raise MlexportError(f"{len(left)} tensors stayed float although the plan quantizes them: {left[:4]}")
    return model


def set_tuned_floats(model: nn.Module, quantized: QuantizedValues) -> None:
    """Write the float parameters the scale tuning changed (``quantized``'s plain tensors) into ``model``."""
    params = dict(model.named_parameters(remove_duplicate=False))
    with torch.no_grad():
        for name, value in quantized.items():
            if isinstance(value, QuantizedWeight):
                continue
            if name not in params or params[name].shape != value.shape:
                raise MlexportError(f"tuned values name {name} {tuple(value.shape)}, which this model does not have")
            params[name].copy_(value)


def to_torchao(qw: QuantizedWeight, q: TensorQuant, dtype: torch.dtype) -> torch.Tensor:
    """torchao's unpacked intx tensor over our values: what ExecuTorch lowers and the eager reference runs."""
    from torchao.quantization.quantize_.workflows.intx.intx_unpacked_to_int8_tensor import (
        IntxUnpackedToInt8Tensor,
        IntxUnpackedToInt8TensorActivationQuantization,
    )

    dynamic = (
        IntxUnpackedToInt8TensorActivationQuantization.INT8_ASYM_PER_TOKEN if q.scheme.endswith("dynact") else None
    )
    zero = qw.zero_point if qw.zero_point is not None else torch.zeros_like(qw.scale, dtype=torch.int8)
    qdata, scale, bits = qw.qdata, qw.scale, qw.bits
    if qw.int8_rows is not None:  # one int8-range table: the head rows' row scale repeated over their groups
        if dynamic is not None:
            raise MlexportError("int8 head rows are for weight-only runtimes (Core ML); XNNPACK cannot run them")
        head = qw.int8_rows
        n, groups = head.qdata.shape[0], qw.scale.shape[1]
        qdata, scale, zero = qdata.clone(), scale.clone(), zero.clone()
        qdata[:n] = head.qdata
        scale[:n] = head.scale.expand(n, groups)
        zero[:n] = 0
        bits = 8
    return IntxUnpackedToInt8Tensor(
        qdata,
        scale.to(dtype),
        zero,
        torch.int4 if bits == 4 else torch.int8,
        (1, qw.group_size),
        dtype,
        dynamic,
    )


def _share_quantized(user: nn.Module, owner: nn.Module, q: TensorQuant) -> None:
    """Point ``user`` at ``owner``'s quantized bytes and scales (the same tensors, not a copy).

    For a tied lm_head this is 8da8w over the embedding's int8 per-row table: per-row symmetric int8 is exactly
    per-output-channel int8 for the head, so both uses read one table. For ``shared4`` it is the other way round:
    the embedding lookup reads the head's 4-bit blocks, weight-only.
    """
    from torchao.quantization.quantize_.workflows.intx.intx_unpacked_to_int8_tensor import (
        IntxUnpackedToInt8Tensor,
        IntxUnpackedToInt8TensorActivationQuantization,
    )

    src = owner.weight.data if isinstance(owner.weight, nn.Parameter) else owner.weight
    if not isinstance(src, IntxUnpackedToInt8Tensor) or q.scheme not in ("int8_dynact", "int4_weight"):
        raise MlexportError(f"cannot share {type(src).__name__} as {q.scheme}; use --tie-mode dup4")
    dynamic = (
        IntxUnpackedToInt8TensorActivationQuantization.INT8_ASYM_PER_TOKEN if q.scheme.endswith("dynact") else None
    )
    shared = IntxUnpackedToInt8Tensor(
        src.qdata, src.scale, src.zero_point, src.target_dtype, src.block_size, src.dtype, dynamic
    )
    user.weight = nn.Parameter(shared, requires_grad=False)
