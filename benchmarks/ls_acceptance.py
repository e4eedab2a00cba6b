"""Acceptance run for layer sharing: a MobileLLM-LS model of the 125M shape, random fp16 weights.

1. Export it (`layer_sharing: true`, 60 executed layers over 30 stored blocks) and its twin without layer
   sharing (30 executed layers) at --quant 4bit; the LS artifact must weigh <= 1.03x the twin.
2. Feed the LS artifact a prompt, then decode token by token through its KV caches, and compare every step's
   logits with the eager no-cache, full-sequence forward of the same quantized weights.

Prints a table. Takes ~25 min on 2 cores (most of it XNNPACK lowering of 90 layers in all).
Usage: .venv/bin/python benchmarks/ls_acceptance.py [--work DIR] [--steps N]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from tiny import save_hf_dir  # noqa: E402

SHAPE_125M = {
    "architectures": ["MobileLLMForCausalLM"],
    "model_type": "mobilellm",
    "vocab_size": 32000,
    "hidden_size": 576,
    "intermediate_size": 1536,
    "num_hidden_layers": 30,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "head_dim": 64,
    "rms_norm_eps": 1e-5,
    "max_position_embeddings": 2048,
    "rope_theta": 10000.0,
    "share_embedding": True,
    "bos_token_id": 1,
    "eos_token_id": 2,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("out/ls-acceptance"))
    parser.add_argument("--steps", type=int, default=32, help="decode steps checked against the no-cache forward")
    args = parser.parse_args()

    from mlexport.validate.drift import every_position_logits, quantized_reference
    from mlexport.validate.runtimes import open_runtime

    from mlexport.pipeline import ExportOptions, run_export
    from mlexport.sources import load_model

    rows = {}
    for sharing in (False, True):
        name = "ls" if sharing else "twin"
        model_dir = args.work / f"model-{name}"
        if not (model_dir / "pytorch_model.bin").is_file():
            save_hf_dir(model_dir, {**SHAPE_125M, "layer_sharing": sharing}, seed=0, fmt="bin")
        out = args.work / f"{name}-executorch-4bit"
        if not (out / "manifest.json").is_file():
            run_export(ExportOptions(model=str(model_dir), quant="4bit", out=out, max_context=512, force=True))
        manifest = json.loads((out / "manifest.json").read_text())
        rows[name] = {
            "executed_layers": len(manifest["model"]["spec"]["layer_map"]),
            "bytes": sum(f["bytes"] for f in manifest["files"] if f["path"].startswith("model.")),
            "export_s": round(sum(st["seconds"] for st in manifest["stages"])),
            "accounting_ratio": manifest["accounting"]["ratio"],
            "duplicated_bytes": manifest["storage"]["duplicated_bytes"],
            "out": out,
            "model_dir": model_dir,
        }

    # Every decode step of the LS artifact against the no-cache forward. fp32 is the exact check (same math, so
    # any cache mix-up between a block's two runs shows up); 4-bit adds XNNPACK's own activation rounding and bf16
    # scales against torchao's eager kernels, so it is compared by cosine.
    ls = rows["ls"]
    fp32_out = args.work / "ls-executorch-fp32"
    if not (fp32_out / "manifest.json").is_file():
        run_export(ExportOptions(model=str(ls["model_dir"]), quant="fp32", out=fp32_out, max_context=512, force=True))
    loaded = load_model(str(ls["model_dir"]))
    tokens = torch.randint(3, 32000, (16 + args.steps,), generator=torch.Generator().manual_seed(0)).tolist()
    checks = {}
    for name, out in (("fp32", fp32_out), ("4bit", ls["out"])):
        manifest = json.loads((out / "manifest.json").read_text())
        reference = quantized_reference(loaded, manifest, max_context=512)
        with torch.no_grad():
            want = reference(torch.tensor([tokens]))[0].float().numpy()
        runtime, _, _ = open_runtime(out)
        got = every_position_logits(runtime.forward, tokens, 16)
        checks[name] = {
            "max_rel": float((np.abs(got - want).max(-1) / np.abs(want).max(-1)).max()),
            "min_cos": float(
                ((got * want).sum(-1) / (np.linalg.norm(got, axis=-1) * np.linalg.norm(want, axis=-1))).min()
            ),
            "top1": float((got.argmax(-1) == want.argmax(-1)).mean()),
        }

    ratio = ls["bytes"] / rows["twin"]["bytes"]
    print("| artifact | executed layers | .pte+.ptd bytes | accounting ratio | duplicated bytes | export s |")
    print("|---|---|---|---|---|---|")
    for name, r in rows.items():
        print(
            f"| {name} | {r['executed_layers']} | {r['bytes']:,} | {r['accounting_ratio']} | {r['duplicated_bytes']} "
            f"| {r['export_s']} |"
        )
    print(f"\nLS / twin size: {ratio:.4f} (bar <= 1.03): {'PASS' if ratio <= 1.03 else 'FAIL'}")
    for name, c in checks.items():
        print(
            f"LS {name} .pte with caches vs eager no-cache, 16-token prefill + {args.steps} decode steps: "
            f"max relative error {c['max_rel']:.2e}, min cosine {c['min_cos']:.6f}, same top-1 {c['top1']:.1%}"
        )
    ok = ratio <= 1.03 and checks["fp32"]["max_rel"] <= 1e-3 and checks["4bit"]["min_cos"] > 0.999
    print("PASS" if ok else "FAIL")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
