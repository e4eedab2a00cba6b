"""The package imports one way: each module may import only from its own layer or the layers below it.

Imports inside functions count too: a deferred import is still a dependency, only a later one.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"mlexport": "mlexport", "mlexport.exporters": "exporters", "mlexport.quantize": "quantize"}
PACKAGES["mlexport.validate"] = "validate"
PACKAGES["mlexport.architectures"] = "mlexport/architectures"
# Lowest first, in the order data flows: plain data and text, model sources, the decoder, sharing analysis,
# quantization and its byte accounting, artifact writing, the exporters, the export pipeline, what reads artifacts
# back (validation, bench, generation, build, bundle), and the CLI on top.
LAYERS = (
    ("mlexport", "mlexport.errors", "mlexport.spec", "mlexport.weights", "mlexport.corpus"),
    ("mlexport.architectures",),
    ("mlexport.sources", "mlexport.source_grid", "mlexport.tokenizer"),
    ("mlexport.model",),
    ("mlexport.sharing",),
    ("mlexport.quantize",),
    ("mlexport.artifacts",),
    ("mlexport.exporters",),
    ("mlexport.pipeline",),
    ("mlexport.validate", "mlexport.generate", "mlexport.build", "mlexport.bundle"),
    ("mlexport.cli",),
)


def modules() -> dict[str, Path]:
    found = {}
    for package, folder in PACKAGES.items():
        for path in sorted((ROOT / folder).glob("*.py")):
            found[package if path.stem == "__init__" else f"{package}.{path.stem}"] = path
    return found


def layer(module: str) -> int:
    """The layer of ``module``: its own entry, else its package's (``mlexport.quantize.tune`` is quantize's)."""
    name = module
    while name:
        for index, members in enumerate(LAYERS):
            if name in members:
                return index
        name = name.rpartition(".")[0]
    raise AssertionError(f"{module} has no layer: add it to LAYERS")


def imports(known: dict[str, Path]) -> dict[str, set[str]]:
    """Module -> the package modules it imports anywhere in its body (``from a import b`` counts ``a.b`` when that
    is a module, else ``a``). Relative imports are not used in this package."""
    graph: dict[str, set[str]] = {}
    for module, path in known.items():
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                names = [f"{node.module}.{alias.name}" for alias in node.names]
            for name in names:
                while name and name not in known:
                    name = name.rpartition(".")[0]
                if name:
                    targets.add(name)
        graph[module] = targets - {module}
    return graph


def test_no_module_imports_from_a_higher_layer() -> None:
    known = modules()
    upward = [
        f"{module} (layer {layer(module)}) imports {target} (layer {layer(target)})"
        for module, targets in imports(known).items()
        for target in sorted(targets)
        if layer(target) > layer(module)
    ]
    assert not upward, "\n".join(upward)


def test_no_import_cycle() -> None:
    graph = imports(modules())
    cycles = []
    for start in graph:
        stack, seen = [(start, [start])], set()
        while stack:
            node, path = stack.pop()
            for target in graph[node]:
                if target == start:
                    cycles.append(" -> ".join([*path, start]))
                elif target not in seen:
                    seen.add(target)
                    stack.append((target, [*path, target]))
    assert not cycles, "\n".join(sorted(cycles)[:10])


def test_no_private_name_is_imported_across_modules() -> None:
    private = [
        f"{module} imports {node.module}.{alias.name}"
        for module, path in modules().items()
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("mlexport")
        for alias in node.names
        if alias.name.startswith("_")
    ]
    assert not private, "\n".join(private)


def test_pipeline_compares_no_target_name() -> None:
    """The pipeline reads each target's choices from its profile (exporters/profile.py), never from its name."""
    tree = ast.parse((ROOT / "mlexport" / "pipeline.py").read_text())
    targets = {"executorch", "onnx", "coreml"}
    compared = [
        node.lineno
        for node in ast.walk(tree)
        if isinstance(node, ast.Compare)
        for side in (node.left, *node.comparators)
        for value in ([side] if not isinstance(side, ast.Tuple | ast.List | ast.Set) else side.elts)
        if isinstance(value, ast.Constant) and value.value in targets
    ]
    assert not compared, f"pipeline.py compares target names at lines {compared}"


def test_an_export_calls_no_higher_layer_back(tmp_path: Path) -> None:
    """At run time too, a 4-bit export (calibration, sensitivity, GPTQ, the tie, the exporter, byte accounting)
    flows one way: no lower-layer function calls into a higher layer, except the status relays the pipeline hands
    down (its ``say`` lambda and ``progress`` closures), which only print."""
    import sys

    from tiny import llama_config, save_hf_dir

    from mlexport.pipeline import ExportOptions, run_export

    save_hf_dir(tmp_path / "m", llama_config(tie_word_embeddings=True))
    opts = ExportOptions(model=str(tmp_path / "m"), target="onnx", quant="4bit", out=tmp_path / "o")
    upward: set[str] = set()

    def package_module(frame: object) -> str | None:
        name = frame.f_globals.get("__name__", "")  # type: ignore[attr-defined]
        return name if name.startswith("mlexport") else None

    def watch(frame: object, event: str, _arg: object) -> None:
        caller_frame = frame.f_back  # type: ignore[attr-defined]
        if event != "call" or caller_frame is None:
            return
        callee, caller = package_module(frame), package_module(caller_frame)
        if callee is None or caller is None or layer(callee) <= layer(caller):
            return
        relay = callee == "mlexport.pipeline" and frame.f_code.co_name in ("<lambda>", "progress")  # type: ignore[attr-defined]
        if not relay:
            upward.add(f"{caller}.{caller_frame.f_code.co_name} -> {callee}.{frame.f_code.co_name}")  # type: ignore[attr-defined]

    sys.setprofile(watch)
    try:
        run_export(opts, status=lambda _text: None)
    finally:
        sys.setprofile(None)
    assert not upward, "\n".join(sorted(upward))
