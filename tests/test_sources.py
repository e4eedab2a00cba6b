"""Model sources (GGUF, HF dirs) and every bad-input path: one line naming the fix, exit code 2, nothing lost."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny import VOCAB, llama_config, save_hf_dir

from mlexport import cli
from mlexport.errors import MlexportError
from mlexport.model import build_decoder
from mlexport.sources import load_model


def run_cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    old = sys.argv
    sys.argv = ["mlexport", *args]
    try:
        cli.main()
        code = 0
    except SystemExit as exc:
        code = int(exc.code or 0)
    finally:
        sys.argv = old
    captured = capsys.readouterr()
    return code, captured.err + captured.out


def _permute_for_gguf(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf permutation of q/k rows."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_tiny_gguf(path: Path, hf_dir: Path, blocks: str | None = None, arch: str = "llama") -> None:
    """A GGUF of the tiny HF model, as llama.cpp's converter writes it; ``blocks`` (e.g. "Q4_1") stores the
    decoder's 2-D weights quantized like llama.cpp does (the embedding as Q8_0), as the demo model's file is.
    ``arch="llama4"``: a dense Llama 4 text model (MobileLLM-R1): q/k rows unpermuted, the dense FFN width, and
    the header keys its converter writes when every layer is full attention."""
    import gguf

    cfg = json.loads((hf_dir / "config.json").read_text())
    from safetensors.torch import load_file

    sd = load_file(str(hf_dir / "model.safetensors"))
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(cfg["num_hidden_layers"])
    writer.add_context_length(cfg["max_position_embeddings"])
    writer.add_embedding_length(cfg["hidden_size"])
    if arch == "llama4":
        writer.add_feed_forward_length(cfg["intermediate_size_mlp"])
        writer.add_expert_feed_forward_length(cfg["intermediate_size"])
        writer.add_interleave_moe_layer_step(0)
        writer.add_expert_count(0)
        writer.add_expert_used_count(cfg.get("num_experts_per_tok", 1))
        writer.add_sliding_window(0)
    else:
        writer.add_feed_forward_length(cfg["intermediate_size"])
    writer.add_head_count(cfg["num_attention_heads"])
    writer.add_head_count_kv(cfg["num_key_value_heads"])
    writer.add_key_length(cfg["head_dim"])
    writer.add_value_length(cfg["head_dim"])
    writer.add_rope_freq_base(cfg["rope_theta"])
    writer.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    writer.add_vocab_size(VOCAB)
    tok = json.loads((hf_dir / "tokenizer.json").read_text())
    vocab = sorted(tok["model"]["vocab"].items(), key=lambda kv: kv[1])
    tokens = [t for t, _ in vocab] + [f"<pad{i}>" for i in range(VOCAB - len(vocab))]
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([1] * len(tokens))
    writer.add_token_merges([" ".join(m) if isinstance(m, list) else m for m in tok["model"]["merges"]])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    names = {
        "self_attn.q_proj": "attn_q",
        "self_attn.k_proj": "attn_k",
        "self_attn.v_proj": "attn_v",
        "self_attn.o_proj": "attn_output",
        "mlp.gate_proj": "ffn_gate",
        "mlp.up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down",
        "feed_forward.gate_proj": "ffn_gate",
        "feed_forward.up_proj": "ffn_up",
        "feed_forward.down_proj": "ffn_down",
        "input_layernorm": "attn_norm",
        "post_attention_layernorm": "ffn_norm",
    }

    def add(name: str, arr: np.ndarray, kind: str | None) -> None:
        if kind is None or arr.ndim != 2:
            writer.add_tensor(name, arr)
            return
        qtype = gguf.GGMLQuantizationType[kind]
        writer.add_tensor(name, gguf.quants.quantize(arr, qtype), raw_dtype=qtype)

    for key, value in sd.items():
        arr = value.float().numpy()
        if key == "model.embed_tokens.weight":
            add("token_embd.weight", arr, blocks and "Q8_0")
        elif key == "model.norm.weight":
            writer.add_tensor("output_norm.weight", arr)
        else:
            _, _, idx, *rest = key.split(".")
            module = ".".join(rest[:-1])
            if module == "self_attn.q_proj" and arch == "llama":
                arr = _permute_for_gguf(arr, cfg["num_attention_heads"])
            if module == "self_attn.k_proj" and arch == "llama":
                arr = _permute_for_gguf(arr, cfg["num_key_value_heads"])
            add(f"blk.{idx}.{names[module]}.weight", arr, blocks)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_gguf_loads_and_matches_transformers(tmp_path: Path) -> None:
    cfg = llama_config(tie_word_embeddings=True)
    reference = save_hf_dir(tmp_path / "hf", cfg)
    write_tiny_gguf(tmp_path / "tiny.gguf", tmp_path / "hf")
    loaded = load_model(str(tmp_path / "tiny.gguf"))
    assert loaded.source["kind"] == "gguf" and len(loaded.source["sha256"]) == 64
    assert loaded.spec.tie_embeddings and loaded.spec.n_kv_heads == [2, 2]
    model = build_decoder(loaded.spec, loaded.state_dict, max_context=32)
    tokens = torch.randint(0, VOCAB, (1, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (model(tokens) - reference(tokens).logits).abs().max() < 1e-4
    assert (loaded.tokenizer_dir / "tokenizer.json").is_file()


def test_untied_but_equal_lm_head_is_tied(tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    save_hf_dir(tmp_path / "m", llama_config())
    sd = load_file(str(tmp_path / "m" / "model.safetensors"))
    sd["lm_head.weight"] = sd["model.embed_tokens.weight"].clone()
    save_file(sd, str(tmp_path / "m" / "model.safetensors"))
    loaded = load_model(str(tmp_path / "m"))
    assert loaded.spec.tie_embeddings and "lm_head.weight" not in loaded.state_dict
    sd["lm_head.weight"] = sd["lm_head.weight"] + 1
    save_file(sd, str(tmp_path / "m" / "model.safetensors"))
    loaded = load_model(str(tmp_path / "m"))
    assert not loaded.spec.tie_embeddings and "lm_head.weight" in loaded.state_dict


# ------------------------------------------------------------------------------------------- error paths


def _one_line_error(code: int, text: str, *needles: str) -> None:
    assert code == 2, text
    lines = [line for line in text.strip().splitlines() if line.strip()]
    assert lines and lines[-1].startswith("error:"), text
    assert "Traceback" not in text
    for needle in needles:
        assert needle in text, text


def test_missing_path(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, text = run_cli(["export", "--model", str(tmp_path / "nope.gguf"), "-o", str(tmp_path / "o")], capsys)
    _one_line_error(code, text, "does not exist")


def test_dir_without_config(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    code, text = run_cli(["export", "--model", str(tmp_path / "empty"), "-o", str(tmp_path / "o")], capsys)
    _one_line_error(code, text, "config.json")


def test_corrupt_safetensors(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    save_hf_dir(tmp_path / "m", llama_config())
    (tmp_path / "m" / "model.safetensors").write_bytes(b"\x00garbage" * 10)
    code, text = run_cli(["export", "--model", str(tmp_path / "m"), "-o", str(tmp_path / "o")], capsys)
    _one_line_error(code, text, "safetensors", "re-download")
    assert not (tmp_path / "o").exists()


def test_corrupt_bin(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    save_hf_dir(tmp_path / "m", llama_config(), fmt="bin")
    (tmp_path / "m" / "pytorch_model.bin").write_bytes(b"not a zip file")
    code, text = run_cli(["inspect", str(tmp_path / "m")], capsys)
    _one_line_error(code, text, "pytorch_model.bin", "re-download")


def test_bin_with_code_is_refused(tmp_path: Path) -> None:
    """A pickle that would execute code is rejected by weights_only=True."""
    save_hf_dir(tmp_path / "m", llama_config(), fmt="bin")

    class Evil:
        def __reduce__(self):  # noqa: ANN204
            return (print, ("pwned",))

    torch.save({"x": Evil()}, tmp_path / "m" / "pytorch_model.bin")
    with pytest.raises(MlexportError, match="not a readable PyTorch checkpoint"):
        load_model(str(tmp_path / "m"))


def test_corrupt_gguf(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    (tmp_path / "bad.gguf").write_bytes(b"GGUF" + b"\x00" * 40)
    code, text = run_cli(["inspect", str(tmp_path / "bad.gguf")], capsys)
    _one_line_error(code, text, "not a readable GGUF")


def test_unsupported_architecture(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    save_hf_dir(tmp_path / "m", llama_config())
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    cfg.update(model_type="gpt2", architectures=["GPT2LMHeadModel"])
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    code, text = run_cli(["inspect", str(tmp_path / "m")], capsys)
    _one_line_error(code, text, "GPT2LMHeadModel", "LlamaForCausalLM", "Qwen3ForCausalLM")


def test_bad_quant_fails_before_loading(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, text = run_cli(["export", "--model", str(tmp_path / "x"), "--quant", "3bit"], capsys)
    _one_line_error(code, text, "3bit", "4bit")


def test_unknown_target(capsys: pytest.CaptureFixture[str]) -> None:
    code, text = run_cli(["export", "--target", "tflite"], capsys)
    _one_line_error(code, text, "tflite")


def test_existing_output_needs_force(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    code, text = run_cli(["export", "--model", "demo", "-o", str(out)], capsys)
    _one_line_error(code, text, "--force")
    assert (out / "precious.txt").read_text() == "keep me"


def test_hub_id_offline(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code, text = run_cli(["inspect", "someone/some-model"], capsys)
    _one_line_error(code, text, "--model path/to/dir")


def test_run_on_missing_artifact(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, text = run_cli(["run", str(tmp_path / "nothing"), "--prompt", "hi"], capsys)
    _one_line_error(code, text, "mlexport export")


def test_inspect_model_json(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    save_hf_dir(tmp_path / "m", llama_config())
    code, text = run_cli(["inspect", str(tmp_path / "m"), "--json"], capsys)
    assert code == 0
    info = json.loads(text[text.index("{") :])
    assert info["params_unique"] < info["params_executed"]  # the tie is counted once


@pytest.mark.parametrize("kind", ["Q4_0", "Q4_1", "Q8_0"])
def test_gguf_grid_decodes_to_ggufs_own_dequantization(kind: str) -> None:
    """The grid read from the raw blocks dequantizes to exactly what the gguf package's dequantizer gives."""
    import gguf

    from mlexport.source_grid import decode_blocks

    rng = np.random.default_rng(0)
    w = rng.standard_normal((8, 96)).astype(np.float32)
    w[0, :32] = 0.25  # a constant block: Q4_1 stores d = 0 there
    qtype = gguf.GGMLQuantizationType[kind]
    raw = gguf.quants.quantize(w, qtype)
    grid = decode_blocks(raw, kind, 8, 96)
    want = gguf.quants.dequantize(raw, qtype).reshape(8, 96)
    assert grid.group_size == 32 and grid.bits == (8 if kind == "Q8_0" else 4)
    assert (grid.zero_point is not None) == (kind == "Q4_1")
    assert np.abs(grid.dequantize().numpy() - want).max() <= 1e-6 * np.abs(want).max()


def test_gguf_loader_keeps_the_grid_of_quantized_tensors(tmp_path: Path) -> None:
    save_hf_dir(tmp_path / "hf", llama_config())
    write_tiny_gguf(tmp_path / "tiny.gguf", tmp_path / "hf", blocks="Q4_1")
    loaded = load_model(str(tmp_path / "tiny.gguf"))
    body = [k for k in loaded.state_dict if k.startswith("layers.") and loaded.state_dict[k].ndim == 2]
    assert set(loaded.source_grids) == {*body, "embed_tokens.weight"}
    for key, grid in loaded.source_grids.items():  # q/k rows un-permuted along with the weights
        assert (grid.dequantize() - loaded.state_dict[key]).abs().max() <= 1e-6, key


def test_each_architecture_module_maps_its_own_config() -> None:
    """Every family module in mlexport/architectures is found, claims its own names only, and maps a config that
    names it onto a spec of that family (the common fields read once, its own on top)."""
    from mlexport import architectures
    from mlexport.sources import spec_from_hf_config

    found = architectures.architectures()
    assert {a.name for a in found} >= {"llama", "llama4", "mobilellm", "qwen2", "qwen3"}
    for key in ("name", "hf_class"):
        assert len({getattr(a, key) for a in found}) == len(found), key
    assert len({t for a in found for t in a.model_types}) == sum(len(a.model_types) for a in found)
    for family in found:
        cfg = llama_config(
            architectures=[family.hf_class], model_type=family.model_types[0], layer_sharing=True, moe_layers=[]
        )
        spec = spec_from_hf_config(cfg, "tiny")
        assert spec.arch == family.name and spec.n_blocks == 2
    assert spec_from_hf_config(llama_config(model_type="qwen2", architectures=["Qwen2ForCausalLM"]), "q").qkv_bias
    assert spec_from_hf_config(llama_config(model_type="qwen3", architectures=["Qwen3ForCausalLM"]), "q").qk_norm
    r1 = spec_from_hf_config(
        llama_config(model_type="llama4_text", architectures=["Llama4ForCausalLM"], moe_layers=[]), "r"
    )
    assert r1.qk_l2_norm and r1.rope_blocks == [True, True]  # two layers: the NoPE one would be the 4th
    ls = spec_from_hf_config(llama_config(model_type="mobilellm", architectures=["MobileLLMForCausalLM"]), "m")
    assert ls.layer_map == [0, 1] and ls.tie_embeddings  # share_embedding defaults on; no layer_sharing here
