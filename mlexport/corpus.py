"""The default validation corpus: real English prose that ships with Python itself.

It is neither model-generated nor written for this repo: the module docstrings of a fixed list of standard
library modules, in a fixed order, so every machine with the same Python derives the same text (its sha256 goes
into the report, so a change of Python version that changes the text is visible).
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import re
from pathlib import Path

from mlexport.errors import MlexportError

# Modules whose docstrings are long, prose-heavy English rather than API listings.
STDLIB_MODULES = (
    "argparse", "asyncio", "bisect", "calendar", "cmd", "codecs", "collections", "contextlib", "copy",
    "csv", "dataclasses", "datetime", "decimal", "difflib", "doctest", "email", "fractions", "functools",
    "getopt", "gettext", "heapq", "inspect", "ipaddress", "json", "locale", "logging", "mailbox", "optparse",
    "pickle", "pprint", "pydoc", "queue", "random", "shlex", "shutil", "smtplib", "socketserver", "statistics",
    "string", "subprocess", "tarfile", "textwrap", "threading", "timeit", "tokenize", "trace", "unittest",
    "uuid", "warnings", "weakref", "zipfile",
)  # fmt: skip


def default_corpus() -> str:
    parts = []
    for name in STDLIB_MODULES:
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        doc = inspect.getdoc(module) or ""
        for obj_name in sorted(getattr(module, "__all__", []) or []):
            obj = getattr(module, obj_name, None)
            if inspect.isclass(obj) or inspect.isfunction(obj):
                doc += "\n\n" + (inspect.getdoc(obj) or "")
        doc = re.sub(r"\n{3,}", "\n\n", doc).strip()
        if doc:
            parts.append(doc)
    return "\n\n".join(parts)


def load_corpus(path: Path | None) -> tuple[str, dict[str, str]]:
    """Return the text and its provenance (name + sha256) for the report."""
    if path is None:
        text, name = default_corpus(), "python-stdlib-docstrings"
    else:
        if not path.is_file():
            raise MlexportError(f"corpus {path} does not exist; pass a plain-text file or omit --corpus")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise MlexportError(f"corpus {path} is not UTF-8 text; convert it or pass another file") from None
        name = str(path)
    if len(text) < 200:
        raise MlexportError("the corpus is too short (< 200 characters) to measure drift; pass a longer text")
    return text, {"name": name, "sha256": hashlib.sha256(text.encode()).hexdigest(), "chars": str(len(text))}
