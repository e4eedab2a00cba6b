"""The demo apps: the bundle step on real exports, the bundle.json contract the apps read, their project files.

No Android SDK or Xcode here, so the apps are not compiled; what they depend on is checked instead.
"""

from __future__ import annotations

import json
import re
import shutil
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from tiny import llama_config, save_hf_dir

from mlexport.bundle import bundle
from mlexport.errors import MlexportError
from mlexport.pipeline import ExportOptions, run_export

ROOT = Path(__file__).parents[1]
ANDROID, IOS = ROOT / "targets" / "android", ROOT / "targets" / "ios"
KOTLIN = ANDROID / "app" / "src" / "main" / "java" / "org" / "mlexport" / "demo"


@pytest.fixture(scope="module")
def exports(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("apps")
    save_hf_dir(root / "llama", llama_config())
    out = {}
    for target, quant in [("executorch", "4bit"), ("coreml", "fp16")]:
        options = ExportOptions(
            model=str(root / "llama"), target=target, quant=quant, out=root / target, max_context=64
        )
        out[target] = run_export(options)[0]
    return out


def _app_copy(src: Path, tmp: Path) -> Path:
    app = tmp / src.name
    shutil.copytree(src, app, ignore=shutil.ignore_patterns("assets", "Model"))
    return app


def test_bundle_android(exports: dict[str, Path], tmp_path: Path) -> None:
    app = _app_copy(ANDROID, tmp_path)
    contract = bundle("android", app, exports["executorch"])
    assets = app / "app" / "src" / "main" / "assets" / "mlexport"
    written = json.loads((assets / "bundle.json").read_text())
    assert written == json.loads(json.dumps(contract))
    assert {f["path"] for f in written["files"]} == {"model.pte", "model.ptd", "tokenizer.json"}
    for f in written["files"]:
        assert (assets / f["path"]).stat().st_size == f["bytes"]
    assert written["runtime"]["name"] == "executorch" and written["runtime"]["version"]
    assert written["prompt_template"].count("{prompt}") == 1 and written["max_context"] == 64
    bundle("android", app, exports["executorch"])  # again: our own bundle is replaced without --force
    with pytest.raises(MlexportError, match="runs executorch"):
        bundle("android", app, exports["coreml"])
    with pytest.raises(MlexportError, match="is not the ios demo app"):
        bundle("ios", app, exports["coreml"])


def test_bundle_refuses_foreign_files_and_reads_a_dist(exports: dict[str, Path], tmp_path: Path) -> None:
    app = _app_copy(ANDROID, tmp_path)
    assets = app / "app" / "src" / "main" / "assets" / "mlexport"
    assets.mkdir(parents=True)
    (assets / "mine.txt").write_text("user data")
    with pytest.raises(MlexportError, match="did not put there"):
        bundle("android", app, exports["executorch"])
    assert (assets / "mine.txt").read_text() == "user data"  # nothing lost
    dist = tmp_path / "dist"
    dist.mkdir()
    shutil.copytree(exports["executorch"], dist / "tiny-executorch-4bit")
    entry = {"id": "tiny-executorch-4bit", "target": "executorch", "passed": True, "artifact": "tiny-executorch-4bit"}
    (dist / "manifest.json").write_text(json.dumps({"schema_version": 1, "entries": [entry]}))
    contract = bundle("android", app, dist, force=True)
    assert contract["artifact"].endswith("tiny-executorch-4bit")


def test_bundle_ios(exports: dict[str, Path], tmp_path: Path) -> None:
    app = _app_copy(IOS, tmp_path)
    contract = bundle("ios", app, exports["coreml"])
    model = app / "MLExportDemo" / "Model"
    assert (model / "model.mlpackage" / "Manifest.json").is_file() and (model / "bundle.json").is_file()
    assert contract["model_file"] == "model.mlpackage" and contract["runtime"]["name"] == "coremltools"


def _keys_read(source: str, pattern: str) -> set[str]:
    return set(re.findall(pattern, source))


def test_apps_read_only_keys_the_bundle_writes(exports: dict[str, Path], tmp_path: Path) -> None:
    android = bundle("android", _app_copy(ANDROID, tmp_path), exports["executorch"])
    kotlin = (KOTLIN / "BundleContract.kt").read_text()
    read = _keys_read(kotlin, r'get(?:String|Int|Long|JSONArray|JSONObject)\("(\w+)"\)|optString\("(\w+)"')
    keys = {k for pair in read for k in pair if k}
    nested = {"path", "bytes", "version"}  # inside files[] and runtime{}
    assert keys - nested <= set(android), keys - set(android)
    ios = bundle("ios", _app_copy(IOS, tmp_path / "i"), exports["coreml"])
    swift = (IOS / "MLExportDemo" / "BundleContract.swift").read_text()
    keys_enum = swift[swift.index("enum CodingKeys") :].split("}", 1)[0]
    coding = set(re.findall(r'= "(\w+)"', keys_enum)) | {"target", "quant", "runtime", "files"}
    assert coding <= set(ios), coding - set(ios)


def test_swift_uses_the_core_ml_io_names() -> None:
    coreml = (ROOT / "exporters" / "coreml.py").read_text()
    swift = (IOS / "MLExportDemo" / "Generator.swift").read_text()
    for name in ("input_ids", "causal_mask", "logits"):
        assert f'name="{name}"' in coreml and f'"{name}"' in swift
    assert "-30000" in swift and "-30000.0" in coreml  # the same additive mask value


def test_android_xml_and_gradle_files() -> None:
    ns = "{http://schemas.android.com/apk/res/android}"
    manifest = ET.parse(ANDROID / "app" / "src" / "main" / "AndroidManifest.xml").getroot()
    activity = manifest.find("application/activity")
    assert activity is not None and activity.get(f"{ns}name") == ".MainActivity"
    layout = ET.parse(ANDROID / "app" / "src" / "main" / "res" / "layout" / "activity_main.xml").getroot()
    ids = {e.get(f"{ns}id", "").removeprefix("@+id/") for e in layout.iter()} - {""}
    main = (KOTLIN / "MainActivity.kt").read_text()
    assert set(re.findall(r"R\.id\.(\w+)", main)) <= ids
    strings = ET.parse(ANDROID / "app" / "src" / "main" / "res" / "values" / "strings.xml").getroot()
    names = {s.get("name") for s in strings}
    assert set(re.findall(r"R\.string\.(\w+)", main)) | {"app_name"} <= names
    for kts in [ANDROID / "settings.gradle.kts", ANDROID / "build.gradle.kts", ANDROID / "app" / "build.gradle.kts"]:
        text = kts.read_text()
        for a, b in ("{}", "()", "[]"):
            assert text.count(a) == text.count(b), f"{kts.name}: unbalanced {a}{b}"
    gradle = (ANDROID / "app" / "build.gradle.kts").read_text()
    assert 'implementation("org.pytorch:executorch-android:$executorchVersion")' in gradle
    assert 'register<Exec>("mlexportBundle")' in gradle and "dependsOn(verifyMlexportBundle)" in gradle
    props = dict(line.split("=", 1) for line in (ANDROID / "gradle.properties").read_text().splitlines() if "=" in line)
    from importlib.metadata import version

    assert props["executorch.version"] == version("executorch")  # the AAR matches the exporter we pin


def test_ios_project_spec() -> None:
    yaml = pytest.importorskip("yaml")
    spec = yaml.safe_load((IOS / "project.yml").read_text())
    target = spec["targets"]["MLExportDemo"]
    assert spec["options"]["deploymentTarget"]["iOS"] == "18.0"
    assert target["dependencies"][0]["product"] == "Tokenizers"
    assert "swift-transformers" in spec["packages"]["Transformers"]["url"]
    assert (IOS / target["sources"][0]["path"] / "MLExportDemoApp.swift").is_file()


def test_bundle_without_an_artifact_says_how_to_make_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    app = _app_copy(ANDROID, tmp_path)
    monkeypatch.chdir(tmp_path)  # no out/demo-executorch-4bit here
    with pytest.raises(MlexportError, match="mlexport export --target executorch --quant 4bit"):
        bundle("android", app)
