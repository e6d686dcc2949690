"""Data sources: builtin through prepare_data, local folders of parquet / jsonl / txt, errors."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from harness.data.sources import SOURCES, DataSplit, prepare_data, source_directory


def texts(files: list[Path]) -> list[str]:
    return [t for f in files for t in pq.read_table(f).column("text").to_pylist()]


def write_parquet(path: Path, docs: list[str]) -> Path:
    pq.write_table(pa.table({"text": docs}), path)
    return path


def test_builtin_source(test_cache):
    split = prepare_data("builtin", progress=False)
    assert isinstance(split, DataSplit) and split.source == "builtin"
    assert split.directory == test_cache / "data" / "builtin"
    assert split.train_files and split.val_file not in split.train_files
    assert all(p.parent == split.directory for p in [*split.train_files, split.val_file])
    assert texts([split.val_file]) and not set(texts([split.val_file])) & set(texts(split.train_files))
    assert prepare_data("builtin", progress=False) == split
    assert prepare_data("builtin", num_shards=1, progress=False).train_files == split.train_files[:1]


def test_local_parquet_folder_last_file_is_validation(tmp_path):
    folder = tmp_path / "corpus"
    folder.mkdir()
    for name in ("b.parquet", "a.parquet", "c.parquet"):
        write_parquet(folder / name, [f"{name} first", f"{name} second"])
    (folder / "notes.md").write_text("not data")
    split = prepare_data(f"local:{folder}", cache=tmp_path / "cache", progress=False)
    assert split.train_files == [folder / "a.parquet", folder / "b.parquet"]
    assert split.val_file == folder / "c.parquet"
    assert split.directory == source_directory(f"local:{folder}", tmp_path / "cache")
    assert split.directory.name.startswith("local-") and split.directory.parent == tmp_path / "cache" / "data"


def test_local_validation_file_can_be_named(tmp_path, monkeypatch):
    folder = tmp_path / "corpus"
    folder.mkdir()
    for name in ("a.parquet", "b.parquet", "c.parquet"):
        write_parquet(folder / name, [name])
    monkeypatch.chdir(tmp_path)  # a relative path resolves to the same folder and cache entry
    split = prepare_data("local:corpus::a.parquet", cache=tmp_path / "cache", progress=False)
    assert split.val_file == folder / "a.parquet"
    assert split.train_files == [folder / "b.parquet", folder / "c.parquet"]
    assert split.directory == source_directory(f"local:{folder}", tmp_path / "cache")
    with pytest.raises(ValueError, match="no validation file 'z.parquet'.*a.parquet, b.parquet, c.parquet"):
        prepare_data("local:corpus::z.parquet", cache=tmp_path / "cache", progress=False)


def test_local_jsonl_folder_is_converted_to_parquet(tmp_path):
    folder = tmp_path / "jsonl"
    folder.mkdir()
    (folder / "train.jsonl").write_text(
        json.dumps({"text": "first document\nwith two lines", "id": 1}) + "\n\n"
        + json.dumps({"text": "second document"}) + "\n")
    (folder / "valid.jsonl").write_text(json.dumps({"text": "held out ünïcödé"}) + "\n")
    split = prepare_data(f"local:{folder}", cache=tmp_path / "cache", progress=False)
    assert all(p.suffix == ".parquet" and p.parent == split.directory for p in [*split.train_files, split.val_file])
    assert texts(split.train_files) == ["first document\nwith two lines", "second document"]
    assert texts([split.val_file]) == ["held out ünïcödé"]


def test_local_txt_folder_splits_documents_on_blank_lines(tmp_path):
    folder = tmp_path / "txt"
    folder.mkdir()
    (folder / "01.txt").write_text("Para one, line one.\nPara one, line two.\n\n\n  \nPara two.\n\nPara three.")
    (folder / "02.txt").write_text("\nValidation paragraph.\n")
    split = prepare_data(f"local:{folder}", cache=tmp_path / "cache", progress=False)
    assert texts(split.train_files) == ["Para one, line one.\nPara one, line two.", "Para two.", "Para three."]
    assert texts([split.val_file]) == ["Validation paragraph."]


def test_local_conversion_happens_once_and_again_when_the_source_changes(tmp_path):
    folder = tmp_path / "txt"
    folder.mkdir()
    (folder / "a.txt").write_text("alpha\n\nbeta\n")
    (folder / "b.txt").write_text("gamma\n")
    source = f"local:{folder}"
    split = prepare_data(source, cache=tmp_path / "cache", progress=False)
    stamp = split.train_files[0].stat().st_mtime_ns
    assert prepare_data(source, cache=tmp_path / "cache", progress=False) == split
    assert split.train_files[0].stat().st_mtime_ns == stamp

    (folder / "a.txt").write_text("alpha\n\nbeta\n\ndelta, added later\n")
    os.utime(folder / "a.txt", ns=(stamp + 10**9, stamp + 10**9))
    again = prepare_data(source, cache=tmp_path / "cache", progress=False)
    assert texts(again.train_files) == ["alpha", "beta", "delta, added later"]


def test_local_folder_may_mix_formats_and_limit_shards(tmp_path):
    folder = tmp_path / "mixed"
    folder.mkdir()
    write_parquet(folder / "a.parquet", ["from parquet"])
    (folder / "b.jsonl").write_text(json.dumps({"text": "from jsonl"}) + "\n")
    (folder / "c.txt").write_text("from txt\n")
    split = prepare_data(f"local:{folder}", cache=tmp_path / "cache", progress=False)
    assert texts(split.train_files) == ["from parquet", "from jsonl"] and texts([split.val_file]) == ["from txt"]
    assert prepare_data(f"local:{folder}", num_shards=1, cache=tmp_path / "cache",
                        progress=False).train_files == split.train_files[:1]


def test_local_errors_say_what_is_wrong(tmp_path):
    cache = tmp_path / "cache"
    with pytest.raises(ValueError, match="does not exist"):
        prepare_data(f"local:{tmp_path / 'nowhere'}", cache=cache, progress=False)
    one = tmp_path / "one"
    one.mkdir()
    write_parquet(one / "only.parquet", ["x"])
    with pytest.raises(ValueError, match="at least two"):
        prepare_data(f"local:{one}", cache=cache, progress=False)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "a.jsonl").write_text('{"text": "fine"}\n{"body": "no text field"}\n')
    (bad / "b.jsonl").write_text('{"text": "fine"}\n')
    with pytest.raises(ValueError, match=r"a\.jsonl:2: .*\"text\" field"):
        prepare_data(f"local:{bad}", cache=cache, progress=False)
    wrong = tmp_path / "wrong"
    wrong.mkdir()
    pq.write_table(pa.table({"body": ["x"]}), wrong / "a.parquet")
    write_parquet(wrong / "b.parquet", ["y"])
    with pytest.raises(ValueError, match="no 'text' column"):
        prepare_data(f"local:{wrong}", cache=cache, progress=False)


def test_unknown_source_lists_the_valid_ones(tmp_path):
    with pytest.raises(ValueError) as info:
        prepare_data("wikipedia", cache=tmp_path, progress=False)
    for name in ("climbmix", "fineweb-edu", "tinystories", "builtin", "local:PATH"):
        assert name in str(info.value)
    assert set(SOURCES) == {"climbmix", "fineweb-edu", "tinystories", "builtin", "local:PATH"}


def test_num_shards_must_be_positive_or_minus_one(tmp_path):
    with pytest.raises(ValueError, match="num_shards"):
        prepare_data("builtin", num_shards=0, cache=tmp_path, progress=False)
