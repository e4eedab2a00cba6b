"""Sharing plans on tied, LS, LS+tied, untied-but-equal and per-layer-width models; store-once accounting."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from mlexport.quantize.accounting import logical_tensor, map_blobs
from tiny import llama_config, random_state_dict, save_hf_dir

from mlexport.model import build_decoder
from mlexport.pipeline import ExportOptions, run_export
from mlexport.sharing import ShareGroup, SharingPlan, build_sharing_plan
from mlexport.sources import load_model


def _plan(tmp_path: Path, cfg: dict, name: str):  # noqa: ANN202
    save_hf_dir(tmp_path / name, cfg)
    loaded = load_model(str(tmp_path / name))
    model = build_decoder(loaded.spec, loaded.state_dict, max_context=16)
    return loaded.spec, build_sharing_plan(model, loaded.spec.layer_map)


def _ls_config(**kw) -> dict:  # noqa: ANN003
    cfg = llama_config(architectures=["MobileLLMForCausalLM"], model_type="mobilellm", **kw)
    cfg.pop("tie_word_embeddings")
    return cfg


def test_tied_plan(tmp_path: Path) -> None:
    spec, plan = _plan(tmp_path, llama_config(), "tied")
    assert [g.reason for g in plan.groups] == ["same-parameter"]
    assert set(plan.groups[0].uses) == {"embed_tokens.weight", "lm_head.weight"}
    assert plan.unique_params == spec.param_count(unique=True)


def test_ls_plan(tmp_path: Path) -> None:
    spec, plan = _plan(tmp_path, _ls_config(share_embedding=False, layer_sharing=True), "ls")
    assert [g.reason for g in plan.groups] == ["layer-sharing", "layer-sharing"]
    assert plan.groups[0].uses == ["executed layer 0", "executed layer 1"]
    assert plan.naive_params == spec.param_count(unique=False)


def test_ls_tied_plan(tmp_path: Path) -> None:
    spec, plan = _plan(tmp_path, _ls_config(share_embedding=True, layer_sharing=True), "lstied")
    assert sorted(g.reason for g in plan.groups) == ["layer-sharing", "layer-sharing", "same-parameter"]
    assert plan.unique_params == spec.param_count(unique=True)
    assert plan.naive_params == spec.param_count(unique=False)


def test_untied_but_equal_and_arbitrary_module() -> None:
    class Odd(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = torch.nn.Linear(8, 8, bias=False)
            self.b = torch.nn.Linear(8, 8, bias=False)
            self.c = torch.nn.Linear(8, 8, bias=False)
            with torch.no_grad():
                self.b.weight.copy_(self.a.weight)

    plan = build_sharing_plan(Odd())
    assert len(plan.groups) == 1 and plan.groups[0].reason == "equal-bytes"
    assert set(plan.groups[0].uses) == {"a.weight", "b.weight"}
    assert plan.unique_params == 128


def test_per_layer_width_plan(tmp_path: Path) -> None:
    cfg = llama_config(num_attention_heads=[4, 2], num_key_value_heads=[2, 1], intermediate_size=[128, 96])
    from safetensors.torch import save_file

    from mlexport.spec import ModelSpec

    spec = ModelSpec(
        name="p",
        arch="llama",
        vocab_size=cfg["vocab_size"],
        dim=64,
        head_dim=16,
        n_heads=[4, 2],
        n_kv_heads=[2, 1],
        ffn_dim=[128, 96],
        layer_map=[0, 1],
    )
    sd = random_state_dict(spec)
    (tmp_path / "p").mkdir()
    save_file({f"model.{k}": v for k, v in sd.items()}, str(tmp_path / "p" / "model.safetensors"))
    (tmp_path / "p" / "config.json").write_text(json.dumps(cfg))
    loaded = load_model(str(tmp_path / "p"))
    plan = build_sharing_plan(build_decoder(loaded.spec, loaded.state_dict, max_context=8), loaded.spec.layer_map)
    assert plan.unique_params == loaded.spec.param_count(unique=True)


@pytest.mark.slow
def test_ls_artifact_stores_blocks_once(tmp_path: Path) -> None:
    """XNNPACK's SHA-256 named data: an LS model (each block run twice) weighs what its stored blocks weigh."""
    big = dict(hidden_size=256, intermediate_size=1024, head_dim=64)
    sizes = {}
    for sharing in (True, False):
        save_hf_dir(tmp_path / f"m{sharing}", _ls_config(share_embedding=True, layer_sharing=sharing, **big))
        out = run_export(
            ExportOptions(
                model=str(tmp_path / f"m{sharing}"),
                quant="4bit",
                out=tmp_path / f"o{sharing}",
                max_context=32,
                tie_mode="auto",
            )
        )[0]
        manifest = json.loads((out / "manifest.json").read_text())
        assert manifest["accounting"]["within_slack"], manifest["accounting"]
        tie = manifest["sharing"]["tie"]
        assert tie["mode"] == tie["auto"]["mode"] in ("shared8", "shared4") and tie["duplicated_bytes"] == 0
        assert [c["mode"] for c in tie["auto"]["candidates"]] == ["shared8", "shared4", "dup4"]
        # the layouts were scored on the model the export ships: its int8 activations smoothed
        assert manifest["quant_plan"]["smoothing"] and all(c["smoothed"] for c in tie["auto"]["candidates"])
        storage = manifest["storage"]
        assert storage["duplicated_bytes"] == 0
        assert storage["stored_bytes"] <= 1.03 * manifest["accounting"]["predicted_unique_bytes"]
        block_rows = [s for b in storage["blobs"] for s in b["serves"] if s.startswith("layers.")]
        assert (
            block_rows
            and all(s.endswith("(executed layers 0, 1)") or s.endswith("(executed layers 2, 3)") for s in block_rows)
            == sharing
        ), block_rows
        sizes[sharing] = sum(f["bytes"] for f in manifest["files"] if f["path"].startswith("model."))
    assert sizes[True] <= 1.03 * sizes[False], sizes


def test_blob_map_names_uses_and_flags_duplicates() -> None:
    """Blobs join with the recorded key sources; a tied tensor stored in two blobs is flagged, once."""
    plan = SharingPlan(
        [ShareGroup("embed_tokens.weight", ["embed_tokens.weight", "lm_head.weight"], "same-parameter", 8)]
    )
    blobs = [
        {"file": "model.pte", "bytes": 100, "keys": ["aa"]},
        {"file": "model.pte", "bytes": 10, "keys": ["scale_aa"]},
        {"file": "model.ptd", "bytes": 50, "keys": ["embed_tokens.parametrizations.weight.original0"]},
        {"file": "model.ptd", "bytes": 70, "keys": ["head", "embed_tokens.weight"]},
        {"file": "model.pte", "bytes": 5, "keys": [], "label": "(program constants)"},
    ]
    sources = {
        "aa": ["layers.0.wq.parametrizations.weight.original0"],
        "scale_aa": ["layers.0.wq.parametrizations.weight.original0"],
        "head": ["lm_head.parametrizations.weight.original0"],
    }
    mapped = map_blobs(blobs, sources, plan, [0, 0, 1, 1])
    rows = mapped["blobs"]
    assert rows[0]["serves"] == ["layers.0.wq.weight (executed layers 0, 1)"]
    assert rows[2]["serves"] == ["embed_tokens.weight"] and "duplicate_of_blob" not in rows[2]
    assert rows[3]["serves"] == ["embed_tokens.weight", "lm_head.weight"] and rows[3]["duplicate_of_blob"] == [2]
    assert rows[4]["serves"] == ["(program constants)"]
    assert mapped["duplicated_bytes"] == 70 and mapped["stored_bytes"] == 235
    assert logical_tensor("scale_x", "a.parametrizations.weight.original0") == ("a.weight", "scale")
    assert logical_tensor("k", "rope_rot_t") == ("rope_rot_t", "data")
