"""`mlexport bundle android|ios --app DIR [ARTIFACT]`: put an artifact into a demo app, with the contract it reads.

The app never guesses: ``bundle.json`` (next to the model files) names every file with its size and sha256, the
runtime version the artifact was exported with, the context length, the stop tokens, and the chat prompt
template rendered from the model's own Jinja template (the apps have no Jinja). The Android Gradle build checks
it before packaging, the iOS app checks it at launch, so app and artifact cannot silently mismatch.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from mlexport.artifacts import describe_files, read_manifest, write_json_atomic
from mlexport.errors import MlexportError

CONTRACT_VERSION = 1
PLACEHOLDER = "\u0000PROMPT\u0000"
PLATFORMS: dict[str, dict[str, Any]] = {
    "android": {
        "target": "executorch",
        "marker": "settings.gradle.kts",
        "assets": "app/src/main/assets/mlexport",
        "files": ["model.pte", "model.ptd", "tokenizer.json"],
        "runtime": "executorch",
    },
    "ios": {
        "target": "coreml",
        "marker": "project.yml",
        "assets": "MLExportDemo/Model",
        "files": ["model.mlpackage", "tokenizer.json", "tokenizer_config.json"],
        "runtime": "coremltools",
    },
}


def _pick_artifact(platform: str, artifact: Path | None) -> Path:
    """An artifact dir, a file in one, or a ``dist/`` from ``mlexport build`` (its first passing entry)."""
    target = PLATFORMS[platform]["target"]
    if artifact is None:
        artifact = Path("out") / f"demo-{target}-4bit"
        if not artifact.is_dir():
            raise MlexportError(
                f"no artifact at {artifact}: run `mlexport export --target {target} --quant 4bit` or pass ARTIFACT_DIR"
            )
    build_manifest = artifact / "manifest.json"
    if artifact.is_dir() and build_manifest.is_file():
        raw = json.loads(build_manifest.read_text())
        if "entries" in raw:  # a dist/ written by `mlexport build`
            usable = [e for e in raw["entries"] if e.get("target") == target and e.get("passed") and "artifact" in e]
            if not usable:
                raise MlexportError(f"{artifact} holds no passing {target} entry; build one or pass ARTIFACT_DIR")
            return artifact / usable[0]["artifact"]
    return artifact


def prompt_template(directory: Path, manifest: dict[str, Any]) -> str:
    """The model's chat template rendered once around a placeholder, as ``{prompt}``: what the app fills in."""
    from mlexport.tokenizer import Tokenizer

    spec = manifest.get("model", {}).get("spec", {})
    rendered = Tokenizer(directory, chat_template=spec.get("chat_template")).render_chat(PLACEHOLDER)
    if PLACEHOLDER not in rendered:
        raise MlexportError("the model's chat template drops the user message; pass a model with a usable template")
    return rendered.replace("{", "{{").replace("}", "}}").replace(PLACEHOLDER, "{prompt}")


def bundle(platform: str, app: Path, artifact: Path | None = None, force: bool = False) -> dict[str, Any]:
    """Copy the artifact's model and tokenizer into the app and write bundle.json; return it."""
    if platform not in PLATFORMS:
        raise MlexportError(f"unknown platform {platform!r}; choose android or ios")
    layout = PLATFORMS[platform]
    if not (app / layout["marker"]).is_file():
        raise MlexportError(
            f"{app} is not the {platform} demo app (no {layout['marker']}); pass --app targets/{platform}"
        )
    directory, manifest = read_manifest(_pick_artifact(platform, artifact))
    if manifest.get("target") != layout["target"]:
        raise MlexportError(
            f"{directory} is a {manifest.get('target')} artifact; the {platform} app runs {layout['target']} "
            f"(mlexport export --target {layout['target']})"
        )
    names = [n for n in layout["files"] if (directory / n).exists()]
    for required in (layout["files"][0], "tokenizer.json"):
        if required not in names:
            raise MlexportError(f"{directory} has no {required}; re-export it")
    dest = app / layout["assets"]
    if dest.exists() and not (dest / "bundle.json").is_file() and any(dest.iterdir()) and not force:
        raise MlexportError(f"{dest} holds files mlexport did not put there; move them or pass --force")
    spec = manifest.get("model", {}).get("spec", {})
    staging = dest.with_name(dest.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        for name in names:
            source = directory / name
            if source.is_dir():
                shutil.copytree(source, staging / name)
            else:
                shutil.copy2(source, staging / name)
        contract = {
            "contract_version": CONTRACT_VERSION,
            "platform": platform,
            "target": manifest["target"],
            "quant": manifest.get("quant"),
            "model": manifest.get("model", {}).get("source") or directory.name,
            "artifact": str(directory),
            "model_file": layout["files"][0],
            "data_files": [n for n in names if n.endswith(".ptd")],
            "tokenizer_file": "tokenizer.json",
            "runtime": {"name": layout["runtime"], "version": manifest.get("tools", {}).get(layout["runtime"])},
            "max_context": manifest.get("max_context"),
            "bos_id": spec.get("bos_id"),
            "eos_ids": spec.get("eos_ids", []),
            "vocab_size": spec.get("vocab_size"),
            "prompt_template": prompt_template(directory, manifest),
            "files": describe_files(staging),  # only the copied files: bundle.json comes after
        }
        write_json_atomic(staging / "bundle.json", contract)
        old = dest.with_name(dest.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        if dest.exists():
            dest.rename(old)
        staging.rename(dest)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return contract
