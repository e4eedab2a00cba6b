"""Benchmark: how the default 4-bit ExecuTorch export scales with the model, at the MobileLLM paper's shapes.

    .venv/bin/python benchmarks/export_scale.py [--shapes 125M,350M,1B,R1-140M,R1-950M] [--effort default] [--work DIR]

Writes a random-weight MobileLLM-format checkpoint per shape (fp16 safetensors, fixed seed, the demo's tokenizer
and so its 49,152-token vocabulary), exports each with `mlexport export --target executorch --quant 4bit` in its own
process (so each peak RSS is its own) and prints a table: parameters, wall time and peak RSS per stage, artifact
MB. Wall time and RSS come from the manifest's stage log, which the exporter measures itself. The 1B shape takes
the longest by far; run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
# MobileLLM (Liu et al., 2024), Table 9: deep-thin shapes with GQA and tied embeddings.
SHAPES = {
    "125M": {"layers": 30, "dim": 576, "heads": 9, "kv": 3, "ffn": 1536},
    "350M": {"layers": 32, "dim": 960, "heads": 15, "kv": 5, "ffn": 2560},
    "1B": {"layers": 54, "dim": 1280, "heads": 20, "kv": 5, "ffn": 3584},
    # MobileLLM-R1 (model card): dense Llama 4 text, head_dim 64, a ~128k vocabulary, tied.
    "R1-140M": {"layers": 15, "dim": 576, "heads": 9, "kv": 3, "ffn": 2048, "family": "llama4", "vocab": 128256},
    "R1-360M": {"layers": 15, "dim": 1024, "heads": 16, "kv": 4, "ffn": 4096, "family": "llama4", "vocab": 128256},
    "R1-950M": {"layers": 22, "dim": 1536, "heads": 24, "kv": 6, "ffn": 6144, "family": "llama4", "vocab": 128256},
}
WEIGHTS = (".pte", ".ptd")


def write_checkpoint(directory: Path, shape: dict[str, Any], tokenizer_dir: Path, seed: int = 0) -> int:
    """A MobileLLM-format folder (config.json with ``share_embedding``, safetensors) with random fp16 weights, or a
    dense Llama 4 text one for the R1 shapes; returns the parameter count (the tied table once)."""
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = json.loads((tokenizer_dir / "tokenizer_config.json").read_text())
    vocab = shape.get("vocab", 49152)
    dim, ffn, heads, kv = shape["dim"], shape["ffn"], shape["heads"], shape["kv"]
    head_dim = shape.get("head_dim", dim // heads)
    r1 = shape.get("family") == "llama4"
    config: dict[str, Any] = {
        "architectures": ["Llama4ForCausalLM" if r1 else "MobileLLMForCausalLM"],
        "model_type": "llama4_text" if r1 else "mobilellm",
        "vocab_size": vocab,
        "hidden_size": dim,
        "intermediate_size": ffn,
        "num_hidden_layers": shape["layers"],
        "num_attention_heads": heads,
        "num_key_value_heads": kv,
        "head_dim": head_dim,
        "rms_norm_eps": 1e-5,
        "max_position_embeddings": 2048,
        "rope_theta": 10000.0,
        "share_embedding": True,
        "bos_token_id": 1,
        "eos_token_id": 2,
    }
    if r1:  # RoPE and QK norm on every layer, no chunking, no experts (llama.cpp: "all layers are full attention")
        del config["share_embedding"]
        config |= {
            "tie_word_embeddings": True,
            "intermediate_size_mlp": ffn,
            "moe_layers": [],
            "no_rope_layers": [1] * shape["layers"],
            "layer_types": ["full_attention"] * shape["layers"],
            "use_qk_norm": True,
        }
    mlp = "feed_forward" if r1 else "mlp"
    (directory / "config.json").write_text(json.dumps(config, indent=1))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy2(tokenizer_dir / name, directory / name)
    del tokenizer
    gen = torch.Generator().manual_seed(seed)

    def normal(*size: int, std: float = 0.02) -> torch.Tensor:
        return (torch.randn(*size, generator=gen) * std).half()

    weights = {"model.embed_tokens.weight": normal(vocab, dim), "model.norm.weight": torch.ones(dim).half()}
    for i in range(shape["layers"]):
        p = f"model.layers.{i}."
        weights |= {
            p + "self_attn.q_proj.weight": normal(heads * head_dim, dim),
            p + "self_attn.k_proj.weight": normal(kv * head_dim, dim),
            p + "self_attn.v_proj.weight": normal(kv * head_dim, dim),
            p + "self_attn.o_proj.weight": normal(dim, heads * head_dim),
            p + f"{mlp}.gate_proj.weight": normal(ffn, dim),
            p + f"{mlp}.up_proj.weight": normal(ffn, dim),
            p + f"{mlp}.down_proj.weight": normal(dim, ffn),
            p + "input_layernorm.weight": torch.ones(dim).half(),
            p + "post_attention_layernorm.weight": torch.ones(dim).half(),
        }
    save_file(weights, str(directory / "model.safetensors"))
    return sum(w.numel() for w in weights.values())


def demo_tokenizer() -> Path:
    from mlexport.sources import load_model

    loaded = load_model("demo")
    assert loaded.tokenizer_dir is not None
    return loaded.tokenizer_dir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="125M,350M,1B")
    parser.add_argument("--effort", default="default")
    parser.add_argument("--work", type=Path, default=ROOT / "out" / "export-scale")
    args = parser.parse_args()
    tokenizer = demo_tokenizer()
    rows = []
    for name in args.shapes.split(","):
        model_dir = args.work / f"{'r1' if SHAPES[name].get('family') else 'mobilellm'}-{name}"
        params = write_checkpoint(model_dir, SHAPES[name], tokenizer)
        out = model_dir.with_name(model_dir.name + "-executorch-4bit")
        cmd = [sys.executable, "-m", "mlexport.cli", "export", "--model", str(model_dir), "--target", "executorch"]
        cmd += ["--quant", "4bit", "--effort", args.effort, "-o", str(out), "--force"]
        started = time.perf_counter()
        subprocess.run(cmd, check=True, cwd=ROOT)
        wall = time.perf_counter() - started
        manifest = json.loads((out / "manifest.json").read_text())
        size = sum(f["bytes"] for f in manifest["files"] if f["path"].endswith(WEIGHTS)) / 1e6
        stages = manifest["stages"]
        rss = max(s["peak_rss_mb"] for s in stages) / 1024
        per_stage = ", ".join(f"{s['name']} {s['seconds']:.0f} s / {s['peak_rss_mb'] / 1024:.1f} GB" for s in stages)
        rows.append((name, params, wall, rss, size, per_stage))
        print(f"{name}: {wall:.0f} s, peak RSS {rss:.2f} GB, {size:.1f} MB", flush=True)
    print(f"\n| shape | params | wall s | peak RSS GB | MB | stages: wall, peak RSS (effort {args.effort}) |")
    print("|---|---|---|---|---|---|")
    for name, params, wall, rss, size, per_stage in rows:
        print(f"| {name} | {params / 1e6:.0f}M | {wall:.0f} | {rss:.2f} | {size:.1f} | {per_stage} |")


if __name__ == "__main__":
    main()
