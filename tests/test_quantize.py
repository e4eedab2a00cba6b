"""Quantizers on tiny models and fixed-seed weights: the scale search and GPTQ must beat RTN on the same weights;
mixed precision must respect its budget and pick by measured sensitivity; results are cached and reproducible."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest
import torch
from mlexport.quantize import TensorQuant, plan_quantization
from mlexport.quantize.algorithms import gptq, output_error, rtn, search
from mlexport.quantize.calibrate import (
    DEFAULT_CALIBRATION,
    SELF_GENERATED,
    cache_limit_bytes,
    calibration_set,
    calibration_windows,
    default_calibration_text,
    load_cached,
    prepare,
    quantize_weights,
    save_cached,
)
from mlexport.quantize.sensitivity import choose_upgrades, tensor_sensitivity
from mlexport.quantize.torchao_map import apply_plan
from tiny import llama_config, save_hf_dir

from mlexport.errors import MlexportError
from mlexport.model import build_decoder
from mlexport.pipeline import ExportOptions, validate_options
from mlexport.sources import load_model
from mlexport.tokenizer import Tokenizer


def _layer(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A weight with outlier columns and inputs with correlated, unequal channels (what real layers look like)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(192, 256, generator=g) * 0.05
    w[:, :4] *= 6
    mix = torch.eye(256) + 0.3 * torch.randn(256, 256, generator=g) / 16
    x = torch.randn(1024, 256, generator=g) @ mix * (1 + 3 * torch.rand(256, generator=g))
    return w, x.T @ x


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("bits", [4, 8])
def test_search_and_gptq_beat_rtn(symmetric: bool, bits: int) -> None:
    w, h = _layer()
    base = rtn(w, bits, 32, symmetric)
    searched = search(w, bits, 32, symmetric)
    weighted = search(w, bits, 32, symmetric, importance=torch.diag(h))
    calibrated = gptq(w, h, bits, 32, symmetric)
    mse_searched, mse_base = ((searched.dequantize() - w) ** 2).sum(), ((base.dequantize() - w) ** 2).sum()
    assert mse_searched <= mse_base  # the search includes RTN's own range (ratio 1)
    if bits == 4:  # at 8 bits rounding error is already tiny and clipping rarely pays
        assert mse_searched < 0.95 * mse_base
        assert output_error(w, weighted, h) < output_error(w, base, h)
    assert output_error(w, calibrated, h) < 0.85 * output_error(w, base, h)
    for q in (base, searched, calibrated):  # every grid stays representable: values in range, zero points too
        lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
        assert lo <= int(q.qdata.min()) and int(q.qdata.max()) <= hi
        assert (q.zero_point is None) == symmetric


def test_gptaq_matches_the_full_precision_output_on_drifted_inputs() -> None:
    """The layer's input has drifted (earlier layers are quantized): x = x_fp + noise. Plain GPTQ fits the layer's
    own output on x; GPTAQ's cross term fits the full-precision model's output x_fp Wᵀ, which is what the rest of
    the model needs, so its error against that target must be lower. Measured above the unconstrained least-squares
    fit, the part no 4-bit grid can remove (noise)."""
    g = torch.Generator().manual_seed(1)
    w, _ = _layer(2)
    x_fp = torch.randn(2048, 256, generator=g) * (1 + 3 * torch.rand(256, generator=g))
    x = x_fp + 0.3 * torch.randn(2048, 256, generator=g) * x_fp.std(0)
    h, cross = x.T @ x, (x_fp - x).T @ x
    target = x_fp @ w.T

    floor = float(((x @ torch.linalg.solve(h, x.T @ target)) - target).square().sum())

    def excess(q: torch.Tensor) -> float:
        return float(((x @ q.dequantize().T) - target).square().sum()) - floor

    plain, corrected = gptq(w, h, 4, 32), gptq(w, h, 4, 32, cross=cross)
    assert excess(corrected) < 0.95 * excess(plain), (excess(corrected), excess(plain))
    assert int(corrected.qdata.min()) >= -8 and int(corrected.qdata.max()) <= 7
    assert torch.equal(corrected.scale, plain.scale)  # the same static groups; only the rounding moves


def test_rtn_symmetric_is_torchaos_grid() -> None:
    """Our RTN is torchao's 8da4w grid (same scales; integers equal but for rounding ties), so `rtn` means the same
    thing whichever of the two computes it."""
    from torchao.quantization import Int8DynamicActivationIntxWeightConfig, quantize_
    from torchao.quantization.granularity import PerGroup

    w, _ = _layer(1)
    linear = torch.nn.Linear(256, 192, bias=False)
    linear.weight.data = w.clone()
    model = torch.nn.Sequential(linear)
    quantize_(model, Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int4, weight_granularity=PerGroup(32)))
    ours = rtn(w, 4, 32, True)
    diff = (model[0].weight.qdata.int() - ours.qdata.int()).abs()
    # Ours rounds each scale to fp16 first (what Core ML and ONNX store), so a value within that rounding of a
    # boundary may land one step over, and each group's largest magnitude sits exactly on ±7.5 (a tie, 1 value in
    # 32). Nothing else may differ.
    assert int(diff.max()) <= 1 and float((diff > 0).float().mean()) < 1 / 32 + 0.005
    assert torch.allclose(model[0].weight.scale.float(), ours.scale, rtol=2.0**-11)
    assert torch.equal(ours.scale, ours.scale.half().float())


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("quant") / "llama"
    save_hf_dir(directory, llama_config(hidden_size=128, intermediate_size=384, num_hidden_layers=3))
    return directory


def _hessians(model: torch.nn.Module, windows: list[list[int]]) -> dict[str, torch.Tensor]:
    found: dict[str, torch.Tensor] = {}
    hooks = []
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and name.startswith("layers."):

            def hook(_m: torch.nn.Module, args: tuple, name: str = name) -> None:
                x = args[0].reshape(-1, args[0].shape[-1])
                found[name] = found.get(name, 0) + x.T @ x

            hooks.append(module.register_forward_pre_hook(hook))
    with torch.no_grad():
        for w in windows:
            model(torch.tensor([w]))
    for handle in hooks:
        handle.remove()
    return found


def test_sequential_gptq_beats_rtn_on_a_tiny_model(tiny: Path) -> None:
    loaded = load_model(str(tiny))
    model = build_decoder(loaded.spec, loaded.state_dict, max_context=64)
    windows = calibration_windows(Tokenizer(loaded.tokenizer_dir).encode(default_calibration_text()), 1024)
    plan = plan_quantization(model, "4bit", 32, "shared8", True, "gptq")
    values = quantize_weights(model, plan, windows)
    assert set(values) == {n for n, q in plan.tensors.items() if not q.shares and q.bits == 4}
    hessians = _hessians(model, [w[:64] for w in windows])
    modules = dict(model.named_modules())
    ours = sum(output_error(modules[n].weight, values[f"{n}.weight"], h) for n, h in hessians.items())
    base = sum(output_error(modules[n].weight, rtn(modules[n].weight, 4, 32), h) for n, h in hessians.items())
    assert ours < 0.8 * base, (ours, base)
    # and the values reach the model untouched: the torchao tensors hold exactly GPTQ's integers and scales
    apply_plan(model, plan, values)
    q_proj = model.layers[0].self_attn.q_proj.weight
    assert torch.equal(q_proj.qdata, values["layers.0.self_attn.q_proj.weight"].qdata)


@pytest.mark.slow
def test_prepare_is_cached_and_reproducible(tiny: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLEXPORT_CACHE", str(tmp_path / "cache"))
    loaded = load_model(str(tiny))
    model = build_decoder(loaded.spec, loaded.state_dict, max_context=64)
    plan = plan_quantization(model, "4bit", 32, "shared8", True, "gptq", asymmetric=True)
    first = prepare(model, plan, loaded.source["sha256"], loaded.tokenizer_dir)
    assert plan.calibration and plan.calibration["name"] == DEFAULT_CALIBRATION
    assert len(plan.calibration["generated_ids"]) == SELF_GENERATED["sequences"]
    assert len(list((tmp_path / "cache" / "quantized").glob("*.pt"))) == 1
    again = prepare(model, plan, loaded.source["sha256"], loaded.tokenizer_dir)  # from the cache
    windows, _ = calibration_set(model, loaded.source["sha256"], loaded.tokenizer_dir, None)
    fresh = quantize_weights(model, plan, windows)
    for name, q in first.items():
        assert torch.equal(q.qdata, again[name].qdata) and torch.equal(q.qdata, fresh[name].qdata)
        assert q.zero_point is not None and torch.equal(q.zero_point, fresh[name].zero_point)
    legacy = dataclasses.replace(plan, calibration={"name": "python-pydoc-topics", "sha256": "0" * 64})
    with pytest.raises(MlexportError, match="re-export it with this version"):
        prepare(model, legacy, loaded.source["sha256"], loaded.tokenizer_dir)
    changed = tmp_path / "calib.txt"
    changed.write_text("other text " * 50)
    with pytest.raises(MlexportError, match="changed since export"):
        prepare(model, plan, loaded.source["sha256"], loaded.tokenizer_dir, calibration=changed)


def test_the_cache_key_follows_the_quantizer_source(tiny: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An edited quantizer must not be served values its previous code computed under the same version."""
    from mlexport.quantize import calibrate

    loaded = load_model(str(tiny))
    model = build_decoder(loaded.spec, loaded.state_dict, max_context=64)
    plan = plan_quantization(model, "4bit", 32, "shared8", True, "gptq")
    before = calibrate.cache_key("sha", plan)
    assert before == calibrate.cache_key("sha", plan) and len(calibrate.code_digest()) == 16
    monkeypatch.setattr(calibrate, "code_digest", lambda *_: "edited")
    assert calibrate.cache_key("sha", plan) != before
    monkeypatch.undo()
    # GPTQ's values do not depend on the tuning code, a tuned plan's do
    tuned = dataclasses.replace(plan, tune={"method": "e2e-scales"})
    untuned_digest = calibrate.code_digest(calibrate.UNTUNED_CODE)
    tuning_edited = {calibrate.CACHED_CODE: "edited", calibrate.UNTUNED_CODE: untuned_digest}
    keys = before, calibrate.cache_key("sha", tuned)
    monkeypatch.setattr(calibrate, "code_digest", tuning_edited.__getitem__)
    assert calibrate.cache_key("sha", plan) == keys[0] and calibrate.cache_key("sha", tuned) != keys[1]
    monkeypatch.undo()
    # a module whose source cannot be found: a one-line error, never a key that ignores the code
    with pytest.raises(MlexportError, match="mlexport.no_such_module's source"):
        calibrate.code_digest(("mlexport.no_such_module",))


def test_the_quantized_cache_stays_under_its_limit_evicting_the_least_recently_used(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "quantized"
    values = {"w": rtn(torch.randn(8, 64, generator=torch.Generator().manual_seed(0)), 4, 32)}
    paths = [folder / f"{i}.pt" for i in range(4)]
    for i, path in enumerate(paths):
        save_cached(path, values)
        os.utime(path, (1000 + i, 1000 + i))  # written in order: 0 is the oldest
    size = paths[0].stat().st_size
    assert load_cached(paths[0]) is not None  # a hit makes 0 the most recently used
    monkeypatch.setenv("MLEXPORT_CACHE_MAX_GB", str(2.5 * size / 1e9))
    save_cached(folder / "new.pt", values)  # five entries, room for two: the new one and the last used stay
    assert sorted(p.name for p in folder.glob("*.pt")) == ["0.pt", "new.pt"]
    monkeypatch.setenv("MLEXPORT_CACHE_MAX_GB", "0")
    save_cached(folder / "off.pt", values)
    assert not (folder / "off.pt").exists()
    monkeypatch.setenv("MLEXPORT_CACHE_MAX_GB", "lots")
    with pytest.raises(MlexportError, match="MLEXPORT_CACHE_MAX_GB"):
        cache_limit_bytes()


def test_mixed_precision_spends_the_budget_on_the_most_sensitive(tiny: Path) -> None:
    loaded = load_model(str(tiny))
    model = build_decoder(loaded.spec, loaded.state_dict, max_context=64)
    # Make one tensor clearly the most sensitive without changing what it computes: a huge weight on an input
    # channel the norm zeroes makes every 4-bit group of gate_proj coarse, so its other weights round to 0.
    victim = "layers.1.mlp.gate_proj.weight"
    model.layers[1].post_attention_layernorm.weight.data[::32] = 0
    gate = model.layers[1].mlp.gate_proj.weight.data
    gate[:, ::32] = 100 * gate.abs().max()
    plan = plan_quantization(model, "4bit", 32, "shared8", True, "gptq")
    tokens = Tokenizer(loaded.tokenizer_dir).encode(default_calibration_text())
    sensitivity = tensor_sensitivity(model, plan, tokens)
    assert all(v >= -1e-6 for v in sensitivity.values())  # a KLD, up to float rounding
    assert max(sensitivity, key=sensitivity.get) == victim
    none, chosen = choose_upgrades(model, plan, sensitivity, 0, {4: 2, 8: 4}, None)
    assert chosen == [] and none.tensors == plan.tensors
    budget = 40_000
    mixed, chosen = choose_upgrades(model, plan, sensitivity, budget, {4: 2, 8: 4}, None)
    assert chosen and sum(c["extra_bytes"] for c in chosen) <= budget
    assert victim in [c["tensor"] for c in chosen]
    assert all(mixed.tensors[c["tensor"]].bits == 8 for c in chosen)
    assert sum(q.bits == 8 for q in mixed.tensors.values()) == sum(q.bits == 8 for q in plan.tensors.values()) + len(
        chosen
    )


def test_executorch_refuses_zero_points() -> None:
    with pytest.raises(MlexportError, match="symmetric 4-bit weights only"):
        validate_options(ExportOptions(target="executorch", asymmetric=True))
    validate_options(ExportOptions(target="executorch", reuse_source_grid=True))  # int8 block offsets now
    with pytest.raises(MlexportError, match="--quantizer"):
        validate_options(ExportOptions(target="onnx", quantizer="awq"))


@pytest.mark.slow
def test_quantize_sweep_scores_every_preset(tiny: Path) -> None:
    from mlexport.validate.sweep import sweep

    rows = {r["preset"]: r for r in sweep(load_model(str(tiny)), "onnx", max_tokens=96, window=48)}
    assert set(rows) >= {"fp16", "8bit rtn", "4bit rtn", "4bit gptq", "4bit gptq + mixed", "4bit gptq asym"}
    assert rows["fp16"]["kld_mean"] < rows["8bit rtn"]["kld_mean"] < rows["4bit rtn"]["kld_mean"]
    assert rows["4bit gptq"]["bits_per_weight"] < rows["8bit rtn"]["bits_per_weight"] < rows["fp16"]["bits_per_weight"]
    mixed = rows["4bit gptq + mixed"]
    assert mixed["upgrades"] > 0 and mixed["size_mb"] >= rows["4bit gptq"]["size_mb"]
    assert len({r["tokens"] for r in rows.values()}) == 1 and rows["fp16"]["tokens"] >= 90
    # blocks of 64: fewer scale and zero-point bytes than blocks of 32 with the same zero points
    assert rows["4bit gptq block 64"]["bits_per_weight"] < rows["4bit gptq asym"]["bits_per_weight"]


@pytest.mark.slow
def test_quantize_sweep_scores_a_held_out_text_under_llama_cpp_protocol(
    tiny: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The protocol, not the presets (test_quantize_sweep_scores_every_preset scores those): two cheap rows."""
    from mlexport.validate import sweep as sweep_module
    from mlexport.validate.sweep import sweep

    monkeypatch.setattr(sweep_module, "SWEEP_ROWS", sweep_module.SWEEP_ROWS[:2])
    held_out = tmp_path / "held_out.txt"
    held_out.write_text(" ".join(f"clause {i} of the agreement binds party {i % 7}." for i in range(200)))
    loaded = load_model(str(tiny))
    rows = sweep(loaded, "executorch", max_tokens=128, window=64, corpus=held_out, score_from=31)
    assert {r["corpus"] for r in rows} == {str(held_out)}
    assert all(r["tokens"] == 2 * 32 for r in rows)  # two windows of 64, positions 31..62 scored
    with pytest.raises(MlexportError, match="--score-from 64 leaves no scored position"):
        sweep(loaded, "executorch", max_tokens=128, window=64, corpus=held_out, score_from=64)


def test_int8_tie_rows_are_stored_and_run_as_planned(tiny: Path) -> None:
    """A tie's first rows at int8 per row: the values, the eager reference's torchao tensor and the predicted
    bytes all agree, and the bytes come out of the mixed-precision budget rather than raising its cap."""
    from mlexport.quantize.accounting import planned_tensor_bytes
    from mlexport.quantize.algorithms import with_int8_rows
    from mlexport.quantize.torchao_map import to_torchao

    from mlexport.pipeline import StageLog, plan_for_target, stored_bytes

    w, _ = _layer()
    four = rtn(w, 4, 32, symmetric=False)
    split = with_int8_rows(four, w, 40)
    deq = split.dequantize()
    assert torch.equal(deq[40:], four.dequantize()[40:])
    assert (deq[:40] - w[:40]).abs().max() < (four.dequantize()[:40] - w[:40]).abs().max() / 8
    assert split.tail().qdata.shape == (192 - 40, 256) and split.int8_rows.qdata.shape == (40, 256)
    q = TensorQuant("int4_weight", 4, 32, asymmetric=True)
    eager = to_torchao(split, dataclasses.replace(q, int8_rows=40), torch.float32)
    assert torch.allclose(eager.dequantize(), deq)
    rows = dataclasses.replace(q, int8_rows=40)
    assert planned_tensor_bytes(w.shape, rows, {4: 2, 8: 2}) - planned_tensor_bytes(w.shape, q, {4: 2, 8: 2}) == (
        40 * 256 + 40 * 2 - (40 * 256 // 2 + 40 * 8 * 2 + 40 * 8 // 2)
    )

    loaded = load_model(str(tiny))
    model = build_decoder(loaded.spec, loaded.state_dict, max_context=64)
    opts = ExportOptions(model=str(tiny), target="coreml")
    plan = plan_for_target(model, loaded, opts, "coreml", "shared4", lambda _t: None, StageLog())
    off = plan_for_target(
        model, loaded, dataclasses.replace(opts, tie_int8_rows=0), "coreml", "shared4", lambda _t: None, StageLog()
    )
    assert plan.tensors["lm_head.weight"].int8_rows == model.lm_head.weight.shape[0] // 8
    assert off.tensors["lm_head.weight"].int8_rows == 0
    assert plan.mixed["cap_bytes"] == off.mixed["cap_bytes"]  # same cap: the rows are paid from the budget
    assert stored_bytes(model, plan, "coreml")["total"] <= plan.mixed["cap_bytes"]
    vocab = model.lm_head.weight.shape[0]
    costly = plan_for_target(
        model, loaded, dataclasses.replace(opts, tie_int8_rows=vocab - 1), "coreml", "shared4", print, StageLog()
    )
    assert costly.mixed is None and any("lower --tie-int8-rows" in n for n in costly.notes)  # said, not hidden
    with pytest.raises(MlexportError, match="--tie-int8-rows takes 0 to"):
        plan_for_target(
            model, loaded, dataclasses.replace(opts, tie_int8_rows=vocab), "coreml", "shared4", print, StageLog()
        )
    with pytest.raises(MlexportError, match="--tie-int8-rows"):
        validate_options(ExportOptions(target="onnx", tie_int8_rows=100))
    with pytest.raises(MlexportError, match="exclude each other"):
        validate_options(ExportOptions(target="coreml", tie_int8_rows=100, palettize=4))
    with pytest.raises(MlexportError, match="4-bit tied table"):  # 8-bit has no 4-bit tie to split
        eight = dataclasses.replace(opts, quant="8bit", tie_int8_rows=10)
        plan_for_target(model, loaded, eight, "coreml", "shared4", print, StageLog())
    palette = plan_for_target(
        model, loaded, dataclasses.replace(opts, palettize=4), "coreml", "shared4", print, StageLog()
    )
    assert palette.tensors["lm_head.weight"].int8_rows == 0  # a palette replaces the linear quantization
