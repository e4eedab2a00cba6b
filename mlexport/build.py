"""`mlexport build`: a declarative matrix of models × targets × quant presets, built incrementally for CI.

An entry is rebuilt only when its input hash changes: the model's bytes, the entry's export options, the tool
versions and mlexport's own sources. Validation is cached the same way (input hash + gates + corpus). Entries are
isolated: a failure is recorded and the rest go on, and the exit code says whether all passed. The result is
``<out>/manifest.json`` (files with sha256, quant plan, drift summary, tool versions) and ``<out>/drift.md``.

``--shard K/N`` builds a deterministic slice (the entries sorted by id, every N-th from the K-th), so a CI system's
own matrix spreads the work; ``mlexport build merge`` joins the shard manifests.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import tomllib
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from mlexport.artifacts import describe_files, tool_versions, write_bytes_atomic, write_json_atomic
from mlexport.errors import MlexportError
from mlexport.pipeline import TARGETS, ExportOptions, expand_targets, toml_option_types
from mlexport.quantize import PRESETS as QUANTS
from mlexport.sources import sha256_file

SCHEMA_VERSION = 1
RECORD = ".mlexport-build.json"  # inside each artifact dir: the hashes it was built and validated from
OPTION_TYPES = toml_option_types()  # the export options an entry's TOML may set, and their types


@dataclass
class Entry:
    model: str  # the name in the config; the artifact dir is <model>-<target>-<quant>
    source: str  # demo | DIR | FILE.gguf | HUB_ID
    target: str
    quant: str
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def id(self) -> str:
        return f"{self.model}-{self.target}-{self.quant}"


@dataclass
class BuildConfig:
    path: Path
    entries: list[Entry]
    out: Path
    validate: bool = True
    gate: str | None = None
    validate_tokens: int = 512
    corpus: Path | None = None


def _fail(path: Path, what: str) -> MlexportError:
    return MlexportError(f"{path}: {what}")


def _options(raw: Any, where: str, path: Path) -> dict[str, Any]:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise _fail(path, f"{where}.options must be a table, e.g. options = {{ group_size = 32 }}")
    for key, value in raw.items():
        if key not in OPTION_TYPES:
            raise _fail(path, f"unknown option {key!r} in {where}; known: {', '.join(OPTION_TYPES)}")
        if not isinstance(value, OPTION_TYPES[key]) or (isinstance(value, bool) and OPTION_TYPES[key] is int):
            raise _fail(path, f"{where}.options.{key} = {value!r} has the wrong type")
    return dict(raw)


def load_config(path: Path) -> BuildConfig:
    """Parse and check the whole matrix before any minute of work starts."""
    if not path.is_file():
        raise MlexportError(f"build config {path} does not exist; start from examples/mlexport.toml")
    try:
        raw = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise _fail(path, f"not valid TOML ({exc}); fix the file") from None
    unknown = set(raw) - {"build", "defaults", "models", "override"}
    if unknown:
        raise _fail(path, f"unknown table(s) {', '.join(sorted(unknown))}; use build, defaults, models, override")
    build = raw.get("build", {})
    defaults = _options(raw.get("defaults"), "defaults", path)
    models = raw.get("models") or []
    if not models:
        raise _fail(path, "no [[models]] entries; add one with name, source, targets and quants")
    entries: list[Entry] = []
    for i, m in enumerate(models):
        where = f"models[{i}]"
        for key in ("name", "targets", "quants"):
            if key not in m:
                raise _fail(path, f"{where} needs {key!r}")
        targets = [t for name in m["targets"] for t in expand_targets(name)]
        for t in targets:
            if t not in TARGETS:
                raise _fail(path, f"{where}: unknown target {t!r}; choose from {', '.join(TARGETS)} or all")
        for q in m["quants"]:
            if q not in QUANTS:
                raise _fail(path, f"{where}: unknown quant {q!r}; choose from {', '.join(QUANTS)}")
        options = {**defaults, **_options(m.get("options"), where, path)}
        source = str(m.get("source", m["name"]))
        entries += [Entry(str(m["name"]), source, t, q, dict(options)) for t in targets for q in m["quants"]]
    for i, o in enumerate(raw.get("override") or []):
        where = f"override[{i}]"
        match = {k: o[k] for k in ("model", "target", "quant") if k in o}
        hit = [e for e in entries if all(getattr(e, k) == v for k, v in match.items())]
        if not hit:
            raise _fail(path, f"{where} matches no entry ({match}); check model/target/quant")
        for e in hit:
            e.options.update(_options(o.get("options"), where, path))
    ids = [e.id for e in entries]
    if len(set(ids)) != len(ids):
        raise _fail(path, "two entries share an id (model-target-quant); give the models distinct names")
    corpus = build.get("corpus")
    return BuildConfig(
        path=path,
        entries=sorted(entries, key=lambda e: e.id),
        out=Path(build.get("out", "dist")),
        validate=bool(build.get("validate", True)),
        gate=build.get("gate"),
        validate_tokens=int(build.get("validate_tokens", 512)),
        corpus=(path.parent / corpus) if corpus else None,
    )


def shard(entries: list[Entry], spec: str | None) -> tuple[list[Entry], str]:
    """``K/N``: entries K, K+N, K+2N, ... (1-based) of the id-sorted matrix."""
    if not spec:
        return entries, "1/1"
    try:
        k, n = (int(x) for x in spec.split("/"))
        assert 1 <= k <= n
    except (ValueError, AssertionError):
        raise MlexportError(f"--shard {spec!r} is not K/N with 1 <= K <= N, e.g. --shard 2/3") from None
    return [e for i, e in enumerate(entries) if i % n == k - 1], f"{k}/{n}"


# ---------------------------------------------------------------- hashing


def model_fingerprint(source: str) -> str:
    """What the model's bytes are: a digest of its files, the demo's pinned sha256, or the Hub id as given."""
    if source == "demo":
        from mlexport.sources import DEMO_GGUF_SHA256

        return f"demo:{DEMO_GGUF_SHA256}"
    path = Path(source)
    if path.is_file():
        return f"file:{sha256_file(path)}"
    if path.is_dir():
        digest = hashlib.sha256()
        for f in sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith(".")):
            digest.update(f"{f.name}:{sha256_file(f)}\n".encode())
        return f"dir:{digest.hexdigest()}"
    return f"hub:{source}"  # no revision is known offline: a Hub id rebuilds only when something else changes


def _own_sources() -> str:
    """mlexport's installed sources, so a code change rebuilds (the version string alone would not)."""
    import mlexport
    import mlexport.exporters
    import mlexport.quantize
    import mlexport.validate

    digest = hashlib.sha256()
    for package in (mlexport, mlexport.exporters, mlexport.quantize, mlexport.validate):
        root = Path(package.__file__).parent
        for f in sorted(root.glob("*.py")):
            digest.update(f.name.encode() + f.read_bytes())
    return digest.hexdigest()


def export_options(entry: Entry, out: Path) -> ExportOptions:
    known = {f.name for f in fields(ExportOptions)}
    opts = {k: v for k, v in entry.options.items() if k in known}
    if "calibration" in opts:
        opts["calibration"] = Path(opts["calibration"])
    return ExportOptions(model=entry.source, target=entry.target, quant=entry.quant, out=out, force=True, **opts)


def input_hash(entry: Entry, model_print: str, tools: dict[str, str], sources: str) -> str:
    options = {k: str(v) for k, v in asdict(export_options(entry, Path("."))).items() if k not in ("out", "force")}
    if entry.options.get("calibration"):
        options["calibration_sha256"] = sha256_file(Path(entry.options["calibration"]))
    payload = {"model": model_print, "options": options, "tools": tools, "mlexport_sources": sources}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


# ---------------------------------------------------------------- building


def _intact_files(directory: Path) -> list[dict[str, Any]] | None:
    """The artifact's files if they are still exactly what its manifest recorded, else None (rebuild it)."""
    try:
        recorded = json.loads((directory / "manifest.json").read_text())["files"]
    except (OSError, json.JSONDecodeError, KeyError):
        return None
    files = describe_files(directory, exclude=(RECORD,))
    return files if [f for f in files if f["path"] != "manifest.json"] == recorded else None


def _read_record(directory: Path) -> dict[str, Any]:
    try:
        return json.loads((directory / RECORD).read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def _drift_summary(report: dict[str, Any]) -> dict[str, Any]:
    entry = report["artifacts"][0]
    total = entry["levels"]["total"]
    keys = ("kld_mean", "kld_stderr", "kld_p99", "same_top1", "ppl_ratio")
    return {
        **{k: total[k] for k in keys if k in total},
        "export_kld_mean": entry["levels"]["export"].get("kld_mean"),
        "scored_tokens": report["corpus"]["scored_tokens"],
        "corpus": report["corpus"]["name"],
        "gates": entry.get("gates", []),
        "passed": all(g["passed"] for g in entry.get("gates", [])),
    }


def build_entry(
    entry: Entry, cfg: BuildConfig, out: Path, hashes: dict[str, str], say: Callable[[str], None]
) -> dict[str, Any]:
    """Build (or reuse) one artifact and validate it; the manifest row, never an exception."""
    from mlexport.pipeline import run_export

    directory = out / entry.id
    row: dict[str, Any] = {
        "id": entry.id,
        "model": entry.model,
        "source": entry.source,
        "target": entry.target,
        "quant": entry.quant,
        "options": entry.options,
        "artifact": entry.id,
        "input_hash": hashes["input"],
    }
    started = time.perf_counter()
    try:
        record = _read_record(directory)
        files = _intact_files(directory) if record.get("input_hash") == hashes["input"] else None
        if files is not None:
            row["status"] = "cached"
        else:
            say(f"{entry.id}: exporting")
            run_export(export_options(entry, directory), status=lambda t: say(f"{entry.id}: {t}"))
            record = {"input_hash": hashes["input"]}
            write_json_atomic(directory / RECORD, record)
            row["status"] = "built"
            files = describe_files(directory, exclude=(RECORD,))
        manifest = json.loads((directory / "manifest.json").read_text())
        row["files"] = files
        row["size_bytes"] = sum(f["bytes"] for f in row["files"] if f["path"].startswith("model"))
        row["quant_plan"] = _plan_summary(manifest)
        row["warnings"] = manifest.get("warnings", [])
        if cfg.validate:
            if record.get("validate_hash") == hashes["validate"] and "drift" in record:
                row["drift"], row["validation"] = record["drift"], "cached"
            else:
                row["drift"], row["validation"] = _validate(entry, cfg, out, directory, say), "ran"
                record.update(validate_hash=hashes["validate"], drift=row["drift"])
                write_json_atomic(directory / RECORD, record)
        row["passed"] = row.get("drift", {}).get("passed", True)
    except MlexportError as exc:
        row.update(status="failed", error=str(exc), passed=False)
    except Exception as exc:  # a bug in one entry must not lose the others' results
        row.update(status="failed", error=f"{type(exc).__name__}: {exc}", passed=False)
        row["traceback"] = traceback.format_exc(limit=8)
    row["seconds"] = round(time.perf_counter() - started, 1)
    return row


def _plan_summary(manifest: dict[str, Any]) -> dict[str, Any]:
    from mlexport.quantize import QuantPlan

    raw = manifest.get("quant_plan") or {}
    try:
        summary: dict[str, Any] = {"tensors": QuantPlan.from_dict(raw).summary()}
    except (KeyError, TypeError):
        summary = {}
    summary["preset"] = raw.get("preset")
    if raw.get("mixed"):
        summary["mixed_precision"] = {k: v for k, v in raw["mixed"].items() if k != "sensitivity"}
    return summary


def _validate(entry: Entry, cfg: BuildConfig, out: Path, directory: Path, say: Callable[[str], None]) -> dict:
    from mlexport.validate.pipeline import run_validation
    from mlexport.validate.report import parse_gates

    say(f"{entry.id}: validating")
    report, _ = run_validation(
        [directory],
        entry.source,
        out / "reports" / entry.id,
        cfg.corpus,
        cfg.validate_tokens,
        gates=parse_gates(cfg.gate),
        say=lambda t: say(f"{entry.id}: {t}"),
    )
    return _drift_summary(report)


def run_build(
    cfg: BuildConfig, shard_spec: str | None = None, say: Callable[[str], None] = lambda _: None
) -> dict[str, Any]:
    """Build the (shard of the) matrix into cfg.out; write manifest.json and drift.md; return the manifest."""
    from mlexport.validate.report import parse_gates

    parse_gates(cfg.gate)  # a bad gate fails now, not after an hour of exports
    entries, shard_label = shard(cfg.entries, shard_spec)
    out = cfg.out
    out.mkdir(parents=True, exist_ok=True)
    tools, sources = tool_versions(), _own_sources()
    prints: dict[str, str] = {}
    corpus = sha256_file(cfg.corpus) if cfg.corpus else "built-in"
    rows = []
    for entry in entries:
        try:
            if entry.source not in prints:
                prints[entry.source] = model_fingerprint(entry.source)
            h = input_hash(entry, prints[entry.source], tools, sources)
        except (OSError, MlexportError) as exc:
            rows.append({"id": entry.id, "status": "failed", "error": f"cannot hash inputs: {exc}", "passed": False})
            continue
        v = hashlib.sha256(f"{h}|{cfg.gate}|{cfg.validate_tokens}|{corpus}".encode()).hexdigest()
        rows.append(build_entry(entry, cfg, out, {"input": h, "validate": v}, say))
        # after every entry, so a crash later loses nothing
        _save(out, str(cfg.path), [shard_label], cfg.gate, tools, rows)
    return _save(out, str(cfg.path), [shard_label], cfg.gate, tools, rows)


def _save(out: Path, config: str | None, shards: list[str], gate: str | None, tools: dict, rows: list[dict]) -> dict:
    """Write <out>/manifest.json and drift.md (a shard's or the merged one); return the manifest."""
    manifest = {
        "schema_version": SCHEMA_VERSION,
        "created_unix": int(time.time()),
        "config": config,
        "shards": shards,
        "gate": gate,
        "tools": tools,
        "passed": all(r.get("passed") for r in rows),
        "entries": rows,
    }
    write_json_atomic(out / "manifest.json", manifest)
    write_bytes_atomic(out / "drift.md", render_markdown(manifest).encode())
    return manifest


def merge(manifests: list[Path], out: Path) -> dict[str, Any]:
    """Join shard manifests into ``out/manifest.json``; artifact paths become relative to ``out``."""
    if not manifests:
        raise MlexportError("give the shard manifests to merge, e.g. mlexport build merge dist-*/manifest.json")
    out.mkdir(parents=True, exist_ok=True)
    rows: dict[str, dict[str, Any]] = {}
    shards, tools, gate, config = [], {}, None, None
    for path in manifests:
        try:
            part = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise MlexportError(f"cannot read shard manifest {path} ({exc}); pass the manifest.json files") from None
        if part.get("schema_version") != SCHEMA_VERSION:
            raise MlexportError(f"{path} is not an mlexport build manifest (schema {part.get('schema_version')})")
        if tools and part["tools"] != tools:
            raise MlexportError(f"{path} was built with other tool versions than the first shard; rebuild it")
        shards += part["shards"]
        tools, gate, config = part["tools"], part.get("gate"), part.get("config")
        for row in part["entries"]:
            if row["id"] in rows:
                raise MlexportError(f"entry {row['id']} is in two shards; shard with the same N everywhere")
            if "artifact" in row:
                row = {**row, "artifact": os.path.relpath(path.parent / row["artifact"], out)}
            rows[row["id"]] = row
    return _save(out, config, sorted(shards), gate, tools, [rows[k] for k in sorted(rows)])


def render_markdown(manifest: dict[str, Any]) -> str:
    """The job-summary table: one row per entry, failures named."""
    head = "| entry | status | MB | KLD mean | same top-1 % | PPL ratio | gates | seconds |"
    lines = [
        f"### mlexport build ({', '.join(manifest['shards'])}): {'all passed' if manifest['passed'] else 'FAILED'}",
        "",
        head,
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in manifest["entries"]:
        d = r.get("drift") or {}
        gates = d.get("gates") or []
        verdict = "—" if not gates else ("pass" if d.get("passed") else "**FAIL**")
        kld = f"{d['kld_mean']:.4f} ± {d.get('kld_stderr', 0):.4f}" if "kld_mean" in d else "—"
        top1 = f"{100 * d['same_top1']:.1f}" if "same_top1" in d else "—"
        ppl = f"{d['ppl_ratio']:.3f}" if "ppl_ratio" in d else "—"
        size = f"{r['size_bytes'] / 1e6:.1f}" if "size_bytes" in r else "—"
        status = r["status"] if r["status"] != "failed" else "**failed**"
        lines.append(f"| {r['id']} | {status} | {size} | {kld} | {top1} | {ppl} | {verdict} | {r.get('seconds', '')} |")
    for r in manifest["entries"]:
        if r.get("error"):
            lines.append(f"\n- **{r['id']}**: {r['error']}")
        for g in (r.get("drift") or {}).get("gates", []):
            if not g["passed"]:
                lines.append(f"\n- **{r['id']}** gate: {g['reason']}")
    return "\n".join(lines) + "\n"
