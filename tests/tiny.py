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
