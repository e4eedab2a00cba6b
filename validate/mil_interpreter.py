"""A MIL program interpreter in numpy: Core ML numerics on Linux, where coremltools cannot predict.

It loads the saved ``.mlpackage``'s MIL program (the same proto Core ML compiles), then evaluates each op in
order. Most ops reuse coremltools' own ``value_inference`` (the code coremltools uses to constant-fold), run on
the op's inputs bound to concrete runtime values and shapes. The few ops that have no value inference, or whose
meaning is runtime state, are implemented here: state read/write, SDPA, activations. KV state persists across
calls, so prefill and decode run exactly as on a device.

Precision: values are computed in fp32 and rounded to each op's declared dtype (fp16 in an fp16 program), which
models fp16 storage between ops but not Apple's GPU/ANE kernels. This checks the graph, the state logic and the
compressed weights; timing and bit-exact device arithmetic still need a Mac.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from mlexport.errors import MlexportError


def _np_dtype(builtin: Any) -> Any:
    from coremltools.converters.mil.mil import types

    return types.nptype_from_builtin(builtin)


class MilInterpreter:
    """Evaluate ``main`` of a saved ``.mlpackage``; ``predict(inputs) -> outputs``; states live between calls."""

    def __init__(self, package: Path) -> None:
        import coremltools as ct
        from coremltools.converters.mil.frontend.milproto.load import load

        weights = package / "Data" / "com.apple.CoreML" / "weights"
        try:
            spec = ct.utils.load_spec(str(package))
            self.program = load(spec, spec.specificationVersion, file_weights_dir=str(weights))
        except Exception as exc:
            raise MlexportError(f"cannot read the MIL program of {package} ({exc}); re-export it") from None
        self.function = self.program.functions["main"]
        self.spec = spec
        self.states: dict[str, np.ndarray] = {}
        self._consts: dict[str, np.ndarray] = {}
        self.reset_state()

    @property
    def metadata(self) -> dict[str, str]:
        return dict(self.spec.description.metadata.userDefined)

    def reset_state(self) -> None:
        """Zero every state, as ``MLModel.make_state()`` does."""
        from coremltools.converters.mil.mil import types

        for name, var in self.function.inputs.items():
            if types.is_state(var.sym_type):
                self.states[name] = np.zeros(var.shape, dtype=_np_dtype(var.dtype))

    def predict(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from coremltools.converters.mil.mil import types

        env: dict[str, Any] = {}
        for name, var in self.function.inputs.items():
            if types.is_state(var.sym_type):
                env[name] = _StateRef(name)
            elif name not in inputs:
                raise MlexportError(f"missing input {name!r}")
            else:
                env[name] = np.asarray(inputs[name]).astype(_np_dtype(var.dtype))
        for op in self.function.operations:
            self._run(op, env)
        return {v.name: env[v.name] for v in self.function.outputs}

    # -- ops ------------------------------------------------------------------------------------------------------

    def _run(self, op: Any, env: dict[str, Any]) -> None:
        kind = op.op_type
        if kind == "const" or kind.startswith("constexpr_"):
            name = op.outputs[0].name
            if name not in self._consts:  # materialize once: compressed weights expand here (int4 -> fp16)
                value = op.outputs[0].val if kind == "const" else op.materialized_val_inference()
                array = np.asarray(value)  # floats kept as fp32 (exact for fp16 values): no re-cast per token
                self._consts[name] = array.astype(np.float32) if array.dtype == np.float16 else array
            env[name] = self._consts[name]
            return
        custom = getattr(self, f"_op_{kind}", None)
        if custom is None and kind in _REDUCTIONS:
            custom = lambda v, kind=kind: _reduce(kind, v)  # noqa: E731
        values = {
            name: env[var.name] if not isinstance(var, list | tuple) else [env[v.name] for v in var]
            for name, var in op.inputs.items()
        }
        result = custom(values) if custom else self._value_inference(op, values)
        outputs = result if isinstance(result, tuple | list) and len(op.outputs) > 1 else (result,)
        for var, value in zip(op.outputs, outputs, strict=True):
            env[var.name] = self._cast(var, value)

    @staticmethod
    def _cast(var: Any, value: Any) -> Any:
        if isinstance(value, _StateRef) or value is None:
            return value
        array = np.asarray(value)
        want = _np_dtype(var.dtype)
        return array.astype(want) if array.dtype != want else array

    def _value_inference(self, op: Any, values: dict[str, Any]) -> Any:
        """coremltools' own evaluation of ``op``, with its inputs bound to concrete values and shapes."""
        from coremltools.converters.mil.mil import types

        saved = []
        try:
            for name, var in op.inputs.items():
                for v, value in zip(*_pairs(var, values[name]), strict=True):
                    if v.op is not None and v.op.op_type == "const":
                        continue  # already carries its value (and strings must stay strings)
                    saved.append((v, v._sym_type, v._sym_val))
                    array = np.asarray(value)
                    dtype = types.fp32 if array.dtype.kind == "f" else v.dtype  # we compute floats in fp32
                    if array.ndim:
                        t = types.tensor(dtype, array.shape)
                        holder = t()
                        holder.val = array.astype(np.float32) if array.dtype == np.float16 else array
                    else:
                        t = dtype
                        holder = t()
                        holder.val = array.astype(np.float32) if array.dtype == np.float16 else array
                    v._sym_type, v._sym_val = t, holder
            result = op.value_inference()
        except NotImplementedError:
            raise MlexportError(f"the MIL interpreter has no implementation of op {op.op_type!r}") from None
        finally:
            for v, sym_type, sym_val in reversed(saved):
                v._sym_type, v._sym_val = sym_type, sym_val
        if result is None:
            raise MlexportError(f"coremltools could not evaluate op {op.op_type!r} ({op.name})")
        return result

    # State: read_state returns the stored tensor; coreml_update_state writes it (and returns it).
    def _op_read_state(self, v: dict[str, Any]) -> np.ndarray:
        return self.states[v["input"].name]

    def _op_coreml_update_state(self, v: dict[str, Any]) -> np.ndarray:
        ref, value = v["state"], np.asarray(v["value"])
        self.states[ref.name] = value.astype(self.states[ref.name].dtype)
        return value

    def _op_shape(self, v: dict[str, Any]) -> np.ndarray:
        return np.array(np.shape(v["x"]), np.int32)

    def _op_silu(self, v: dict[str, Any]) -> np.ndarray:
        x = v["x"].astype(np.float32)
        return x / (1.0 + np.exp(-x))

    def _op_select(self, v: dict[str, Any]) -> np.ndarray:
        """By hand: coremltools infers the result's type from ``a`` and ``b`` alone, scalar when both are."""
        return np.where(np.asarray(v["cond"]), v["a"], v["b"])

    def _op_gelu(self, v: dict[str, Any]) -> np.ndarray:
        x = v["x"].astype(np.float32)
        mode = str(v.get("mode", "EXACT"))
        if mode == "TANH_APPROXIMATION":
            return 0.5 * x * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * x**3)))
        if mode == "SIGMOID_APPROXIMATION":
            return x / (1.0 + np.exp(-1.702 * x))
        erf = np.vectorize(math.erf, otypes=[np.float32])
        return 0.5 * x * (1.0 + erf(x / np.sqrt(2.0)))

    def _op_sigmoid(self, v: dict[str, Any]) -> np.ndarray:
        return 1.0 / (1.0 + np.exp(-v["x"].astype(np.float32)))

    def _op_linear(self, v: dict[str, Any]) -> np.ndarray:
        x, w = v["x"].astype(np.float32), v["weight"].astype(np.float32)
        y = x @ w.T
        bias = v.get("bias")
        return y + bias.astype(np.float32) if bias is not None else y

    def _op_matmul(self, v: dict[str, Any]) -> np.ndarray:
        x, y = v["x"].astype(np.float32), v["y"].astype(np.float32)
        if v.get("transpose_x") is not None and bool(v["transpose_x"]):
            x = np.swapaxes(x, -1, -2)
        if v.get("transpose_y") is not None and bool(v["transpose_y"]):
            y = np.swapaxes(y, -1, -2)
        return x @ y

    def _op_scaled_dot_product_attention(self, v: dict[str, Any]) -> np.ndarray:
        q, k, val = (v[n].astype(np.float32) for n in ("query", "key", "value"))
        scores = q @ np.swapaxes(k, -1, -2) / np.sqrt(q.shape[-1])
        mask = v.get("attn_mask")
        if mask is not None:
            mask = np.asarray(mask)
            scores = np.where(mask, scores, -np.inf) if mask.dtype == bool else scores + mask.astype(np.float32)
        scores -= scores.max(-1, keepdims=True)
        weights = np.exp(scores)
        weights /= weights.sum(-1, keepdims=True)
        return weights @ val


_REDUCTIONS = {
    "reduce_max": np.max,
    "reduce_min": np.min,
    "reduce_mean": np.mean,
    "reduce_sum": np.sum,
    "reduce_prod": np.prod,
}


def _reduce(kind: str, v: dict[str, Any]) -> np.ndarray:
    """Reductions by hand: coremltools' value inference passes numpy bools as keepdims, which numpy 2 rejects."""
    axes = v.get("axes")
    axis = tuple(int(a) for a in np.atleast_1d(axes)) if axes is not None else None
    keep = bool(v["keep_dims"]) if v.get("keep_dims") is not None else False
    return _REDUCTIONS[kind](v["x"].astype(np.float32), axis=axis, keepdims=keep)


class _StateRef:
    """A state input: ops receive the reference; read_state/coreml_update_state go through the interpreter."""

    def __init__(self, name: str) -> None:
        self.name = name


def _pairs(var: Any, value: Any) -> tuple[list[Any], list[Any]]:
    if isinstance(var, list | tuple):
        return list(var), list(value)
    return [var], [value]
