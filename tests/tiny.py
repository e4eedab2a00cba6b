"""Tiny random models with fixed seeds, saved the way their real checkpoints are (no hub, no network)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

VOCAB = 320
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def write_tokenizer(directory: Path) -> None:
    """A small byte-level BPE tokenizer.json trained on fixed text, with <s>/</s> specials."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB - 8,
        special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    text = ["The capital of France is Paris. What is the capital of Italy? Rome is."] * 20
    tok.train_from_iterator(text, trainer)
    tok.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(
        json.dumps({"bos_token": "<s>", "eos_token": "</s>", "chat_template": CHAT_TEMPLATE})
    )


def llama_config(**overrides: Any) -> dict[str, Any]:
    cfg = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": VOCAB,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "rms_norm_eps": 1e-5,
        "max_position_embeddings": 256,
        "rope_theta": 10000.0,
        "tie_word_embeddings": True,
        "bos_token_id": 1,
        "eos_token_id": 2,
    }
    cfg.update(overrides)
    return cfg


def make_transformers_model(cfg: dict[str, Any], seed: int = 0) -> torch.nn.Module:
    """The transformers reference model for a config (MobileLLM maps onto Llama: same math, no remote code)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    kind = cfg["model_type"]
    hf_cfg = {k: v for k, v in cfg.items() if k not in ("architectures", "share_embedding", "layer_sharing")}
    if kind == "mobilellm":
        hf_cfg["model_type"] = "llama"
        hf_cfg["tie_word_embeddings"] = cfg.get("share_embedding", True)
    config = AutoConfig.for_model(**hf_cfg)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).float().eval()
    with torch.no_grad():  # random norms and biases, so a loader that drops them cannot pass
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            elif name.endswith(".bias"):
                p.copy_(0.1 * torch.randn_like(p))
    return model


def save_hf_dir(directory: Path, cfg: dict[str, Any], seed: int = 0, fmt: str = "safetensors") -> torch.nn.Module:
    """Write config.json, weights (safetensors or fp16 pytorch_model.bin) and a tokenizer; return the reference."""
    directory.mkdir(parents=True, exist_ok=True)
    model = make_transformers_model(cfg, seed)
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    if cfg.get("tie_word_embeddings", cfg.get("share_embedding", False)):
        sd.pop("lm_head.weight", None)
    if fmt == "safetensors":
        from safetensors.torch import save_file

        save_file(sd, str(directory / "model.safetensors"))
    else:
        torch.save({k: v.half() for k, v in sd.items()}, directory / "pytorch_model.bin")
    (directory / "config.json").write_text(json.dumps(cfg, indent=2))
    write_tokenizer(directory)
    return model


def random_state_dict(spec, seed: int = 0) -> dict[str, torch.Tensor]:  # noqa: ANN001  (ModelSpec)
    """Random weights in the decoder's own key layout (tied: no lm_head key), for specs transformers cannot build."""
    from mlexport.model import Decoder

    torch.manual_seed(seed)
    return {
        k: torch.randn_like(v) for k, v in Decoder(spec, max_context=8).state_dict().items() if k != "lm_head.weight"
    }


def reference_logits(root: Path, configs: dict[str, dict[str, Any]], tokens: list[int]) -> dict[str, tuple[Path, Any]]:
    """Each config's checkpoint under ``root`` and transformers' logits for ``tokens``: one causal forward, so it is
    the reference for every prefill and decode step of a run over them."""
    out = {}
    for name, cfg in configs.items():
        reference = save_hf_dir(root / name, cfg)
        with torch.no_grad():
            out[name] = (root / name, reference(torch.tensor([tokens])).logits[0].float().numpy())
    return out


def relative_error(got: Any, ref: Any) -> float:
    """Max-abs difference over the reference logits' range."""
    return float(abs(got - ref).max() / (ref.max() - ref.min()))


def inspect_export_and_bundle(model_dir: Path, arch: str, out: Path, max_context: int) -> dict[str, Any]:
    """What a new architecture must get through beyond its logits: ``inspect`` on the checkpoint and on the
    artifact, 8-bit ``.pte`` and ``.mlpackage`` exports, and both demo apps' bundle steps. Returns the Android
    bundle contract."""
    import shutil

    from typer.testing import CliRunner

    from mlexport.bundle import bundle
    from mlexport.cli import app
    from mlexport.pipeline import ExportOptions, run_export

    def inspected(target: Path) -> dict[str, Any]:
        shown = CliRunner().invoke(app, ["inspect", str(target), "--json"])
        assert shown.exit_code == 0, shown.output
        return json.loads(shown.stdout[shown.stdout.index("{") :])

    info = inspected(model_dir)
    assert info["kind"] == "model" and info["spec"]["arch"] == arch and info["params_unique"] > 0
    options = ExportOptions(
        model=str(model_dir), target="executorch", quant="8bit", out=out / "a", max_context=max_context
    )
    artifact = run_export(options)[0]
    shown = inspected(artifact)
    assert shown["kind"] == "artifact" and shown["target"] == "executorch" and shown["quant"] == "8bit"
    android = out / "android"
    shutil.copytree(Path(__file__).parents[1] / "targets" / "android", android, ignore=shutil.ignore_patterns("assets"))
    contract = bundle("android", android, artifact)
    assert {"model.pte", "tokenizer.json"} <= {f["path"] for f in contract["files"]}
    options = ExportOptions(model=str(model_dir), target="coreml", quant="8bit", out=out / "c", max_context=max_context)
    package = run_export(options)[0]
    assert inspected(package)["target"] == "coreml"
    ios = out / "ios"
    shutil.copytree(Path(__file__).parents[1] / "targets" / "ios", ios, ignore=shutil.ignore_patterns("Model"))
    assert bundle("ios", ios, package)["model_file"] == "model.mlpackage"
    return contract


def genai_follows_onnxruntime(model_dir: Path, out: Path, prompt: list[int], new_tokens: int, max_context: int) -> None:
    """onnxruntime-genai runs the fp32 ONNX export as its own model (genai_config.json): its greedy tokens are the
    ones our onnxruntime adapter picks from the same graph."""
    import numpy as np
    import onnxruntime_genai as og
    from mlexport.validate.runtimes import open_runtime

    from mlexport.pipeline import ExportOptions, run_export

    options = ExportOptions(model=str(model_dir), target="onnx", quant="fp32", out=out / "a", max_context=max_context)
    artifact = run_export(options)[0]
    model = og.Model(og.Config(str(artifact)))
    params = og.GeneratorParams(model)
    total = len(prompt) + new_tokens
    params.set_search_options(max_length=total, min_length=total, do_sample=False)
    generator = og.Generator(model, params)
    generator.append_tokens(prompt)
    while not generator.is_done():
        generator.generate_next_token()
    theirs = [int(t) for t in generator.get_sequence(0)][len(prompt) :]
    runtime, _, _ = open_runtime(artifact)
    ours, logits = [], runtime.forward(prompt, 0)[-1]
    for i in range(new_tokens):
        ours.append(int(np.argmax(logits)))
        logits = runtime.forward([ours[-1]], len(prompt) + i)[-1]
    assert theirs == ours
