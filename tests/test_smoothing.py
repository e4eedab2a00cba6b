"""Group-constant smoothing of the int8 activations (quantize/smoothing.py): the weights' 4-bit error is unchanged
(group quantization is scale-equivariant), the float logits are unchanged, the int8 activations' error drops
where an outlier group sets the range, and a manifest's plan rebuilds the same model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from mlexport.quantize import QuantPlan, plan_quantization
from mlexport.quantize.algorithms import rtn
from mlexport.quantize.smoothing import plan_smoothing, smooth
from mlexport.quantize.torchao_map import apply_plan
from tiny import llama_config, save_hf_dir

from mlexport.errors import MlexportError
from mlexport.model import build_decoder
from mlexport.sources import load_model

TOKENS = torch.tensor([[3, 17, 5, 9, 60, 2, 11, 40, 8, 21, 33, 7]])
WINDOWS = [list(range(3, 35)), list(range(40, 72))]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("smoothing") / "llama"
    save_hf_dir(directory, llama_config(hidden_size=96, intermediate_size=192, num_hidden_layers=2))
    return directory


def test_symmetric_group_quantization_is_scale_equivariant() -> None:
    """Why a factor per group (not per channel) leaves the 4-bit weights' error in the output unchanged."""
    torch.manual_seed(0)
    weight = torch.randn(16, 96)
    factors = torch.tensor([0.3, 2.5, 7.0]).repeat_interleave(32)
    plain, scaled = rtn(weight, 4, 32, symmetric=True), rtn(weight * factors, 4, 32, symmetric=True)
    # the same integers, but for a rounding tie the stored scale's own rounding can flip
    assert (plain.qdata == scaled.qdata).float().mean() > 0.98
    error = (plain.dequantize() - weight).norm()
    assert abs(float((scaled.dequantize() / factors - weight).norm() / error) - 1) < 0.02
    per_channel = torch.linspace(0.5, 3.0, 96)  # what SmoothQuant would fold: the grid moves
    moved = rtn(weight * per_channel, 4, 32, symmetric=True)
    assert (moved.qdata == plain.qdata).float().mean() < 0.8


def test_smoothing_keeps_the_logits_and_a_manifest_plan_rebuilds_it(tiny: Path) -> None:
    loaded = load_model(str(tiny))
    model = build_decoder(loaded.spec, loaded.state_dict, max_context=64)
    with torch.no_grad():
        want = model(TOKENS)
    plan = plan_smoothing(model, plan_quantization(model, "4bit", 32, "shared8", True, "rtn"), WINDOWS)
    record = plan.smoothing
    assert record["group"] == 32 and record["alpha"] == 0.5
    sources = {f"layers.{b}.{s}" for b in range(2) for s in ("input_layernorm", "post_attention_layernorm")}
    sources |= {f"layers.{b}.mlp.up_proj" for b in range(2)}
    assert set(record["factors"]) == sources
    assert (
        len(record["factors"]["layers.0.input_layernorm"]) == 3 and len(record["factors"]["layers.0.mlp.up_proj"]) == 6
    )
    with torch.no_grad():
        assert torch.allclose(model(TOKENS), want, atol=1e-4)
        before = model.layers[0].self_attn.q_proj.weight.clone()
        smooth(model, plan)  # once only: every stage calls it
        assert torch.equal(model.layers[0].self_attn.q_proj.weight, before)
    again = build_decoder(loaded.spec, loaded.state_dict, max_context=64)
    smooth(again, QuantPlan.from_dict(plan.to_dict()))
    assert torch.equal(again.layers[1].mlp.down_proj.weight, model.layers[1].mlp.down_proj.weight)
    assert torch.equal(again.layers[1].post_attention_layernorm.weight, model.layers[1].post_attention_layernorm.weight)


def test_weight_only_and_fp_plans_are_not_smoothed(tiny: Path) -> None:
    loaded = load_model(str(tiny))
    model = build_decoder(loaded.spec, loaded.state_dict, max_context=64)
    assert (
        plan_smoothing(model, plan_quantization(model, "8bit", 32, "shared8", True, "rtn"), WINDOWS).smoothing is None
    )
    assert plan_smoothing(model, plan_quantization(model, "fp32", 32), WINDOWS).smoothing is None
    assert getattr(model, "smoothed", False) is False


def test_a_plan_that_does_not_fit_the_model_is_refused(tiny: Path) -> None:
    loaded = load_model(str(tiny))
    model = build_decoder(loaded.spec, loaded.state_dict, max_context=64)
    plan = plan_quantization(model, "4bit", 32, "shared8", True, "rtn")
    plan.smoothing = {
        "kind": "group-median-token-max",
        "alpha": 0.5,
        "group": 32,
        "factors": {"layers.7.mlp.up_proj": [1.0]},
    }
    with pytest.raises(MlexportError, match="re-export"):
        smooth(model, plan)


def test_smoothing_lowers_the_int8_activations_error_where_an_outlier_group_sets_the_range(tiny: Path) -> None:
    """Each smoothed Linear's output error from its int8 input (same 4-bit weights, fp32 input as reference)."""
    loaded = load_model(str(tiny))

    def activation_error(smoothed: bool) -> float:
        model = build_decoder(loaded.spec, loaded.state_dict, max_context=64)
        with torch.no_grad():
            for block in model.layers:  # an outlier group in each norm's output, as the demo's norms have
                block.input_layernorm.weight[32:64] *= 12
                block.post_attention_layernorm.weight[64:96] *= 12
        plan = plan_quantization(model, "4bit", 32, "shared8", True, "rtn")
        if smoothed:
            plan = plan_smoothing(model, plan, WINDOWS)
        quantized = apply_plan(model, plan)
        linears = [m for n, m in quantized.named_modules() if n.endswith(("q_proj", "gate_proj", "down_proj"))]
        inputs: dict[torch.nn.Module, torch.Tensor] = {}
        handles = [m.register_forward_pre_hook(lambda m, a: inputs.__setitem__(m, a[0])) for m in linears]
        with torch.no_grad():
            quantized(TOKENS)
            for handle in handles:
                handle.remove()
            total = 0.0
            for linear in linears:
                got = linear(inputs[linear])
                saved, linear.weight.activation_quantization = linear.weight.activation_quantization, None
                want = linear(inputs[linear])  # the same 4-bit weights on the fp32 input
                linear.weight.activation_quantization = saved
                total += float((got - want).square().mean() / want.square().mean())
        return total

    plain, smoothed = activation_error(False), activation_error(True)
    assert smoothed < 0.8 * plain, (plain, smoothed)  # measured: 0.00056 -> 0.00039


def test_the_export_plan_smooths_or_says_why_not(tiny: Path) -> None:
    """ExecuTorch's plan smooths when every 4-bit Linear shares one group size, and notes it when they do not."""
    from mlexport.pipeline import ExportOptions, StageLog, plan_for_target

    loaded = load_model(str(tiny))
    assert loaded.tokenizer_dir is not None
    for group, smoothed in ((32, True), (64, False)):  # 64: q/k/v and gate/up fall back to 32 (96 wide), down 64
        model = build_decoder(loaded.spec, loaded.state_dict, max_context=64)
        opts = ExportOptions(model=str(tiny), target="executorch", group_size=group, size_budget_mb=0)
        plan = plan_for_target(model, loaded, opts, "executorch", "shared8", lambda _t: None, StageLog())
        assert (plan.smoothing is not None) == smoothed == getattr(model, "smoothed", False)
        assert any("not smoothed" in note for note in plan.notes) != smoothed
    model = build_decoder(loaded.spec, loaded.state_dict, max_context=64)
    opts = ExportOptions(model=str(tiny), target="executorch", size_budget_mb=0, smooth=False)
    plan = plan_for_target(model, loaded, opts, "executorch", "shared8", lambda _t: None, StageLog())
    assert plan.smoothing is None and not getattr(model, "smoothed", False)
    assert "int8 activations not smoothed (--no-smooth)" in plan.notes


def test_smooth_flag_is_refused_where_nothing_runs_int8_activations() -> None:
    from typer.testing import CliRunner

    from mlexport.cli import app

    for args in (["--target", "onnx", "--quant", "4bit"], ["--target", "executorch", "--quant", "8bit"]):
        result = CliRunner().invoke(app, ["export", *args, "--smooth"])  # parsed, then refused before any work
        assert isinstance(result.exception, MlexportError)
        assert "--smooth applies to --target executorch --quant 4bit only" in str(result.exception)


def test_tie_mode_auto_scores_the_smoothed_model_the_export_would_ship(tiny: Path) -> None:
    """``--tie-mode auto`` on ExecuTorch compares layouts on the model ExecuTorch exports: rotated and smoothed.
    Before, its candidates ran unsmoothed int8 activations, a model no export builds."""
    from mlexport.quantize.tie_choice import choose_tie_mode

    loaded = load_model(str(tiny))
    model = build_decoder(loaded.spec, loaded.state_dict, max_context=64)
    gain = model.layers[0].input_layernorm.weight.detach().clone()
    tokens = list(range(3, 60))
    modes = ("shared8", "dup4")  # ExecuTorch's layouts
    plain = {c["mode"]: c for c in choose_tie_mode(model, tokens, "4bit", 32, modes, rotate_tie=True)["candidates"]}
    smoothed = choose_tie_mode(model, tokens, "4bit", 32, modes, rotate_tie=True, smooth_windows=WINDOWS)
    by_mode = {c["mode"]: c for c in smoothed["candidates"]}
    assert set(by_mode) == {"shared8", "dup4"} and all(c["smoothed"] for c in by_mode.values())
    assert not any(c["smoothed"] for c in plain.values())
    assert all(by_mode[m]["kld_mean"] != plain[m]["kld_mean"] for m in by_mode)  # the int8 inputs moved
    assert by_mode["shared8"]["rotation"] == plain["shared8"]["rotation"]
    # the caller's model is left as it was: not smoothed, not rotated
    assert torch.equal(model.layers[0].input_layernorm.weight, gain) and not getattr(model, "smoothed", False)
