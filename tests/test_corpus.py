"""The builtin offline corpus: enough text, deterministic across runs, a clean train/val split."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from harness.data.corpus import (MANIFEST, VAL_FRACTION, build_builtin_corpus, split_documents,
                            stdlib_dir, stdlib_sources)

PROJECT = Path(__file__).resolve().parent.parent


def texts(files: list[Path]) -> list[str]:
    return [t for f in files for t in pq.read_table(f).column("text").to_pylist()]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """One build here and one in a fresh interpreter with another hash seed, run concurrently."""
    here, there = tmp_path_factory.mktemp("corpus-a"), tmp_path_factory.mktemp("corpus-b")
    code = "import sys; from pathlib import Path; from harness.data.corpus import build_builtin_corpus; " \
           "build_builtin_corpus(Path(sys.argv[1]))"
    env = {**os.environ, "PYTHONHASHSEED": "12345", "PYTHONPATH": str(PROJECT)}
    other = subprocess.Popen([sys.executable, "-c", code, str(there)], env=env, cwd=PROJECT)
    corpus = build_builtin_corpus(here)
    assert other.wait(timeout=120) == 0
    return corpus, there


def test_corpus_has_enough_text(built):
    corpus, _ = built
    train, val = texts(corpus.train_files), texts([corpus.val_file])
    chars = sum(map(len, train)) + sum(map(len, val))
    assert chars == corpus.chars > 1_000_000
    assert len(corpus.train_files) >= 2
    assert len(train) == corpus.train_documents and len(val) == corpus.val_documents > 100
    # validation holds its share of the text, enough for the cpu-tiny evaluation
    assert VAL_FRACTION <= sum(map(len, val)) / chars < VAL_FRACTION + 0.05


def test_train_and_validation_are_disjoint(built):
    corpus, _ = built
    train, val = texts(corpus.train_files), texts([corpus.val_file])
    assert not set(train) & set(val)
    assert len(set(train)) == len(train) and len(set(val)) == len(val)


def test_build_is_deterministic_across_processes(built):
    corpus, other_dir = built
    here = texts([*corpus.train_files, corpus.val_file])
    other = json.loads((other_dir / MANIFEST).read_text())
    there = texts([other_dir / n for n in [*other["train_files"], other["val_file"]]])
    assert here == there  # same documents, same order, same split
    assert other["sha256"] == corpus.sha256


def test_documents_are_stdlib_docs_and_pydoc_topics(built):
    corpus, _ = built
    everything = texts([*corpus.train_files, corpus.val_file])
    assert any(t.startswith("JSON (JavaScript Object Notation)") for t in everything)  # json's docstring
    assert any(t.startswith('The "assert" statement') for t in everything)  # a pydoc topic
    assert all(len(t) >= 40 for t in everything)


def test_tests_and_third_party_code_are_left_out():
    root = stdlib_dir()
    parts = [p.relative_to(root).parts for p in stdlib_sources()]
    assert parts and not any({"test", "tests", "site-packages"} & set(p[:-1]) for p in parts)
    assert ("json", "__init__.py") in parts


def test_split_depends_only_on_the_documents():
    docs = [f"document number {i} " * (1 + i % 7) for i in range(500)]
    train, val = split_documents(docs)
    assert split_documents(list(docs)) == (train, val)
    assert sorted(train + val) == sorted(docs)
    assert [d for d in docs if d in set(val)] == val  # corpus order is kept


def test_existing_corpus_is_reused_and_a_corrupt_one_rebuilt(built, tmp_path):
    corpus, _ = built
    stamps = {p: p.stat().st_mtime_ns for p in [*corpus.train_files, corpus.val_file]}
    assert build_builtin_corpus(corpus.directory) == corpus
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps  # nothing rewritten

    copy = tmp_path / "copy"
    copy.mkdir()
    for path in [*corpus.train_files, corpus.val_file, corpus.directory / MANIFEST]:
        (copy / path.name).write_bytes(path.read_bytes())
    (copy / corpus.val_file.name).write_bytes(b"truncated")
    rebuilt = build_builtin_corpus(copy)
    assert rebuilt.sha256 == corpus.sha256
    assert texts([rebuilt.val_file]) == texts([corpus.val_file])
