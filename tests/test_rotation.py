"""The tied table's rotation (quantize/rotation.py): exact Hadamard factors, logits unchanged in fp32, the head's
int8 activations helped where an outlier channel sets their range, and every path (plan, cache re-run, validate's
reference, Core ML's graph) sees the same rotated model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from mlexport.quantize import QuantPlan, TensorQuant, plan_quantization
from mlexport.quantize.rotation import build_rotation, factors, hadamard, plan_tie_rotation, rotate_tie
from mlexport.quantize.torchao_map import apply_plan
from tiny import llama_config, save_hf_dir

from mlexport.errors import MlexportError
from mlexport.model import build_decoder
from mlexport.sources import load_model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("rotation") / "llama"
    save_hf_dir(directory, llama_config(hidden_size=96, intermediate_size=192, num_hidden_layers=2))
    return directory


@pytest.mark.parametrize("order", [1, 2, 12, 24, 48, 64, 96])
def test_hadamard_matrices_are_orthonormal_with_equal_magnitudes(order: int) -> None:
    h = hadamard(order)
    assert h is not None and torch.allclose(h @ h.T, torch.eye(order), atol=1e-6)
    assert torch.allclose(h.abs(), torch.full_like(h, order**-0.5))  # every channel spread evenly


def test_factors_split_the_width_into_two_hadamard_orders() -> None:
    assert factors(576) == (24, 24)  # the demo: 576 has no single Sylvester/Paley order
    assert factors(64) == (8, 8) and factors(96) == (8, 12)
    assert hadamard(9) is None and factors(40) is None  # no Hadamard matrix of order 9, 10, 20 or 40 here
    rotation = build_rotation(96, {"kind": "hadamard", "factors": [8, 12], "sign_seed": 0})
    dense = rotation(torch.eye(96))
    x = torch.randn(2, 5, 96)
    assert torch.allclose(dense @ dense.T, torch.eye(96), atol=1e-5)
    assert torch.allclose(rotation(x), x @ dense, atol=1e-5)
    assert torch.allclose(rotation.undo(rotation(x)), x, atol=1e-5)
    with pytest.raises(MlexportError, match="does not fit"):
        build_rotation(64, {"kind": "hadamard", "factors": [8, 12], "sign_seed": 0})


def test_a_rotated_model_keeps_its_logits_and_the_plan_records_it(tiny: Path) -> None:
    loaded = load_model(str(tiny))
    model = build_decoder(loaded.spec, loaded.state_dict, max_context=32)
    tokens = torch.tensor([[3, 17, 5, 9, 60, 2, 11]])
    with torch.no_grad():
        want = model(tokens)
    table = model.embed_tokens.weight.detach().clone()
    plan = plan_tie_rotation(model, plan_quantization(model, "4bit", 32, "shared8", True, "rtn"))
    assert plan.tie_rotation == {"kind": "hadamard", "factors": [8, 12], "sign_seed": 0}
    assert model.lm_head.weight is model.embed_tokens.weight and not torch.allclose(model.embed_tokens.weight, table)
    with torch.no_grad():
        assert torch.allclose(model(tokens), want, atol=1e-4)
    rotate_tie(model, plan)  # once only: every stage calls it
    with torch.no_grad():
        assert torch.allclose(model(tokens), want, atol=1e-4)
    # A manifest's plan rebuilds the same table on a fresh model (validate's quantized reference).
    again = build_decoder(loaded.spec, loaded.state_dict, max_context=32)
    rotate_tie(again, QuantPlan.from_dict(plan.to_dict()))
    assert torch.equal(again.embed_tokens.weight, model.embed_tokens.weight)
    # Only a head that runs on int8 activations is rotated: not shared4 (ONNX, Core ML) nor an untied head.
    other = build_decoder(loaded.spec, loaded.state_dict, max_context=32)
    assert plan_tie_rotation(other, plan_quantization(other, "4bit", 32, "shared4", True, "rtn")).tie_rotation is None
    assert other.tie_rotation is None


def test_the_rotation_lowers_the_heads_activation_error_where_an_outlier_channel_sets_the_range(tiny: Path) -> None:
    """XNNPACK's 8da8w head quantizes its input per token; one large channel (as in the demo's final hidden state)
    coarsens every other. Rotated, the same int8 plan drifts far less from the fp32 model."""
    loaded = load_model(str(tiny))
    tokens = torch.tensor([list(range(3, 60))])

    def drift(rotated: bool) -> float:
        model = build_decoder(loaded.spec, loaded.state_dict, max_context=64)
        with torch.no_grad():
            model.norm.weight.mul_(8)  # sharper logits than random weights give
            model.norm.weight[5] = 300.0  # an outlier channel of the head's input
            want = F.log_softmax(model(tokens)[0], -1)
        plan = plan_quantization(model, "8bit", 32, "shared8", True, "rtn")
        for name in [n for n in plan.tensors if n.startswith("layers.")]:  # only the tie is quantized
            plan.tensors[name] = TensorQuant("fp32", 32)
        if rotated:
            plan = plan_tie_rotation(model, plan)
        quantized = apply_plan(model, plan)
        with torch.no_grad():
            got = F.log_softmax(quantized(tokens)[0], -1)
        return float((want.exp() * (want - got)).sum(-1).mean())

    plain, rotated = drift(False), drift(True)
    assert rotated < 0.7 * plain, (plain, rotated)  # measured: 0.00162 -> 0.00085


def test_core_ml_graph_undoes_a_rotated_table(tiny: Path) -> None:
    """Core ML's traced wrapper (pipeline.rotate_4bit_tie stores its tie rotated) rotates the lookup's rows back
    and the head's input, so in fp32 its logits are the unrotated model's, prefill and decode."""
    from mlexport.exporters.coreml import StatefulDecoder, causal_mask

    loaded = load_model(str(tiny))
    plain = build_decoder(loaded.spec, loaded.state_dict, max_context=32)
    model = build_decoder(loaded.spec, loaded.state_dict, max_context=32)
    plan_tie_rotation(model, plan_quantization(model, "4bit", 32, "shared8", True, "rtn"))
    assert model.tie_rotation is not None
    tokens = torch.randint(0, loaded.spec.vocab_size, (1, 10), generator=torch.Generator().manual_seed(3))
    wrapper = StatefulDecoder(model).eval()
    with torch.no_grad():
        want = plain(tokens)[0]
        got = [wrapper(tokens[:, :7].int(), torch.from_numpy(causal_mask(0, 7)).float())[0]]
        got += [wrapper(tokens[:, i : i + 1].int(), torch.from_numpy(causal_mask(i, 1)).float())[0] for i in (7, 8, 9)]
    # fp32 compute, fp16 KV caches in the wrapper: agreement to fp16 rounding, not bits
    assert (torch.cat(got) - want).abs().max() <= 5e-3 * max(1.0, float(want.abs().max()))


def test_core_ml_refuses_a_palette_on_a_rotated_table(tiny: Path) -> None:
    """A palette would quantize the rotated table with coremltools' k-means, never the values the plan rotated;
    the pipeline does not rotate for --palettize, and convert refuses the combination before tracing."""
    from mlexport.exporters.coreml import convert

    from mlexport.artifacts import StageLog

    loaded = load_model(str(tiny))
    model = build_decoder(loaded.spec, loaded.state_dict, max_context=32)
    plan = plan_tie_rotation(model, plan_quantization(model, "4bit", 32, "shared8", True, "rtn"))
    with pytest.raises(MlexportError, match="rotated tied table needs mlexport's own quantized values"):
        convert(model, plan, StageLog(), palettize=4)


def test_tie_mode_auto_scores_the_rotated_table_the_export_would_store(tiny: Path) -> None:
    """``--tie-mode auto`` on ExecuTorch measures shared8 as exported: rotated (recorded per candidate)."""
    from mlexport.quantize.tie_choice import choose_tie_mode

    loaded = load_model(str(tiny))
    model = build_decoder(loaded.spec, loaded.state_dict, max_context=64)
    table = model.embed_tokens.weight.detach().clone()
    tokens = list(range(3, 60))
    plain = {c["mode"]: c for c in choose_tie_mode(model, tokens, "4bit", 32)["candidates"]}
    rotated = {c["mode"]: c for c in choose_tie_mode(model, tokens, "4bit", 32, rotate_tie=True)["candidates"]}
    assert plain["shared8"]["rotation"] is None and rotated["shared8"]["rotation"]["factors"] == [8, 12]
    assert rotated["dup4"]["rotation"] is None  # two stored copies, no shared table to rotate
    assert rotated["shared8"]["kld_mean"] != plain["shared8"]["kld_mean"]
    assert torch.equal(model.embed_tokens.weight, table) and model.tie_rotation is None  # left unchanged
