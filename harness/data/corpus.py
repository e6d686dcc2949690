"""The `builtin` data source: an offline corpus made of text every Python install carries.

Documents are the docstrings of the standard library's modules, classes and functions (read with
`ast`, never imported) plus the reference topics of `pydoc_data.topics`: English prose mixed with
code, 1.8 MB on CPython 3.11. The order is fixed (files by relative path, nodes in source order,
topics by name) and the validation documents are chosen by a hash of their text, so the same
Python version yields the same shards on every machine and in every run.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import sys
import sysconfig
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from harness.data.download import InvalidFile, validate_parquet
from harness.files import atomic_write_text

CORPUS_FORMAT = 1  # bump when the collection or split rules change: old shards are rebuilt
MIN_DOCSTRING_CHARS = 40  # shorter docstrings ("Return self.") are mostly boilerplate
# Share of the text held out. cpu-tiny scores 32,768 tokens; 15% (~270 KB, ~70k tokens at vocab
# 4096) leaves room for that, for other Python versions and for packing losses.
VAL_FRACTION = 0.15
TRAIN_SHARDS = 4
ROW_GROUP_SIZE = 1024
MANIFEST = "corpus.json"
VAL_NAME = "val.parquet"

# Folders skipped under the stdlib: tests, third-party packages, generated build data, and the
# packages some Linux distributions ship separately (python3-tk, idle, lib2to3, distutils), so
# that the corpus does not depend on which of those happen to be installed.
SKIPPED_DIRS = frozenset({
    "test", "tests", "idle_test", "__pycache__", "site-packages", "dist-packages",
    "tkinter", "idlelib", "turtledemo", "lib2to3", "distutils", "ensurepip", "pydoc_data",
})
SKIPPED_FILES = frozenset({"turtle.py"})  # ships with tkinter on those distributions


@dataclass(frozen=True)
class BuiltinCorpus:
    """The shards on disk and what they hold."""

    directory: Path
    train_files: list[Path]
    val_file: Path
    train_documents: int
    val_documents: int
    chars: int
    sha256: str  # of all documents in order; equal fingerprints mean equal corpora


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_sources(root: Path | None = None) -> list[Path]:
    """The standard library's .py files that feed the corpus, sorted by relative path."""
    root = root or stdlib_dir()
    found = []
    for path in root.rglob("*.py"):
        parts = path.relative_to(root).parts
        if any(p in SKIPPED_DIRS or p.startswith("config-") for p in parts[:-1]):
            continue
        if path.name in SKIPPED_FILES or path.name.startswith(("_sysconfigdata", "test_")):
            continue
        found.append(path)
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


def _docstrings(tree: ast.Module) -> Iterator[str]:
    """Docstrings of the module and every class/function in it, in source order. Only
    statements are visited: docstrings never sit inside expressions."""
    stack: list[ast.AST] = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node, clean=True)
            if doc:
                yield doc
        children = []
        for field in ("body", "orelse", "finalbody", "handlers", "cases"):
            value = getattr(node, field, None)
            if isinstance(value, list):
                children.extend(value)
        stack.extend(reversed(children))


def stdlib_docstrings(root: Path | None = None) -> Iterator[str]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # old modules raise SyntaxWarning for invalid escapes
        for path in stdlib_sources(root):
            try:
                tree = ast.parse(path.read_bytes(), filename=str(path))
            except (SyntaxError, ValueError, OSError):
                continue  # a file this interpreter cannot parse contributes nothing
            yield from _docstrings(tree)


def pydoc_topics() -> Iterator[str]:
    try:
        from pydoc_data.topics import topics
    except ImportError:  # stripped-down installs may lack it; the docstrings remain
        return
    for name in sorted(topics):
        yield topics[name]


def collect_documents(root: Path | None = None) -> list[str]:
    """Every document of the corpus in its fixed order, exact duplicates dropped."""
    seen: set[str] = set()
    documents = []
    for text in (*stdlib_docstrings(root), *pydoc_topics()):
        text = text.strip()
        if len(text) < MIN_DOCSTRING_CHARS or text in seen:
            continue
        seen.add(text)
        documents.append(text)
    return documents


def _rank(text: str) -> bytes:
    """A stable pseudo-random rank (unlike `hash()`, which is salted per process)."""
    return hashlib.sha256(text.encode("utf-8")).digest()


def split_documents(documents: list[str]) -> tuple[list[str], list[str]]:
    """Validation takes documents in order of their text's hash until it holds `VAL_FRACTION` of
    the characters (a share of text, not of documents: the pydoc topics are long, and a share of
    documents would leave the validation stream's length to chance). Both sides keep corpus order."""
    budget = VAL_FRACTION * sum(map(len, documents))
    chosen: set[int] = set()
    held = 0
    for i in sorted(range(len(documents)), key=lambda i: _rank(documents[i])):
        if held >= budget:
            break
        chosen.add(i)
        held += len(documents[i])
    train = [d for i, d in enumerate(documents) if i not in chosen]
    val = [d for i, d in enumerate(documents) if i in chosen]
    return train, val


def write_text_shard(texts: list[str], path: Path) -> None:
    """A parquet file with one `text` column, written to a temporary name then renamed."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    tmp = path.with_name(path.name + ".tmp")
    pq.write_table(pa.table({"text": pa.array(texts, pa.string())}), tmp, row_group_size=ROW_GROUP_SIZE)
    os.replace(tmp, path)


def _fingerprint(documents: list[str]) -> str:
    digest = hashlib.sha256()
    for text in documents:
        digest.update(text.encode("utf-8"))
        digest.update(b"\0")
    return digest.hexdigest()


def _python_version() -> str:
    return f"{sys.implementation.name}-{'.'.join(map(str, sys.version_info[:3]))}"


def load_builtin_corpus(directory: Path) -> BuiltinCorpus:
    """The corpus already built in `directory`; raises ValueError (`InvalidFile`) or OSError when it is
    missing, partial, corrupt, or was built by another Python version or corpus format."""
    manifest = json.loads((directory / MANIFEST).read_text())
    if not isinstance(manifest, dict) or manifest.get("format") != CORPUS_FORMAT \
            or manifest.get("python") != _python_version():
        raise InvalidFile(f"{directory} was built by another Python or corpus format")
    try:
        train_files = [directory / name for name in manifest["train_files"]]
        val_file = directory / manifest["val_file"]
        counts = manifest["train_documents"], manifest["val_documents"], manifest["chars"], manifest["sha256"]
    except (KeyError, TypeError) as exc:
        raise InvalidFile(f"{directory / MANIFEST} is incomplete ({exc})") from exc
    for path in (*train_files, val_file):
        validate_parquet(path)
    return BuiltinCorpus(directory, train_files, val_file, *counts)


def build_builtin_corpus(directory: Path, train_shards: int = TRAIN_SHARDS) -> BuiltinCorpus:
    """Build (or reuse, when present and valid) the train shards and the validation shard."""
    try:
        return load_builtin_corpus(directory)
    except (OSError, ValueError):
        pass
    documents = collect_documents()
    train, val = split_documents(documents)
    if not train or not val:
        raise RuntimeError(f"the standard library at {stdlib_dir()} gave too little text for a corpus "
                           f"({len(documents)} documents); use `--data local:PATH` instead")
    directory.mkdir(parents=True, exist_ok=True)
    (directory / MANIFEST).unlink(missing_ok=True)  # the manifest is written last: it marks completion
    per_shard = -(-len(train) // train_shards)
    train_files = []
    for i in range(train_shards):
        chunk = train[i * per_shard:(i + 1) * per_shard]
        if chunk:
            path = directory / f"train_{i:05d}.parquet"
            write_text_shard(chunk, path)
            train_files.append(path)
    val_file = directory / VAL_NAME
    write_text_shard(val, val_file)
    corpus = BuiltinCorpus(directory, train_files, val_file, len(train), len(val),
                           sum(map(len, documents)), _fingerprint(documents))
    manifest = {
        "format": CORPUS_FORMAT, "python": _python_version(), "stdlib": str(stdlib_dir()),
        "train_files": [p.name for p in train_files], "val_file": val_file.name,
        "train_documents": corpus.train_documents, "val_documents": corpus.val_documents,
        "chars": corpus.chars, "sha256": corpus.sha256,
    }
    atomic_write_text(directory / MANIFEST, json.dumps(manifest, indent=2) + "\n")
    return corpus
