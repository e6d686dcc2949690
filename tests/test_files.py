"""Atomic writes and file hashes (harness/files.py): what journals, configs, manifests, tokenizers
and token indexes rely on to survive a crash mid-write."""

from __future__ import annotations

import hashlib
import os

import pytest

from harness.files import atomic_write, atomic_write_text, sha256_file


def test_an_atomic_write_replaces_the_file_whole_and_leaves_nothing_else(tmp_path):
    path = tmp_path / "deep" / "state.json"
    atomic_write_text(path, "old\n")  # creates the folder
    atomic_write(path, b"new\n")
    assert path.read_bytes() == b"new\n"
    assert os.listdir(path.parent) == ["state.json"]


def test_a_failed_write_keeps_the_old_file_and_removes_its_temporary(tmp_path):
    path = tmp_path / "state.json"
    atomic_write_text(path, "old\n")
    with pytest.raises(TypeError):
        atomic_write(path, "not bytes")  # type: ignore[arg-type]
    assert path.read_text() == "old\n"
    assert os.listdir(tmp_path) == ["state.json"]


def test_sha256_of_a_file_larger_than_one_read(tmp_path):
    data = os.urandom(3 * (1 << 20) + 17)
    path = tmp_path / "blob.bin"
    path.write_bytes(data)
    assert sha256_file(path) == hashlib.sha256(data).hexdigest()
