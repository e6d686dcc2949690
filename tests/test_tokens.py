"""Token files: one tokenization pass into memory-mapped uint16 tokens plus document offsets."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from harness.data.tokenizer import train_tokenizer
from harness.data.tokens import CorruptTokenFile, TokenFile, TokenFileWriter, write_token_file

DOCS = [
    "The quick brown fox jumps over the lazy dog.",
    "Numbers: 1234567890, and Unicode: 你好, мир, café 🙂",
    "x",
    "Line one\nLine two\n\n  indented",
] * 5 + ["A longer document. " * 50]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory):
    from pydoc_data.topics import topics

    return train_tokenizer(list(topics.values()), 512, tmp_path_factory.mktemp("tok"))


@pytest.fixture
def written(tokenizer, tmp_path):
    return write_token_file(iter(DOCS), tokenizer, tmp_path / "val", progress=False, chunk_docs=3)


def test_documents_round_trip_with_bos_and_offsets(tokenizer, written):
    tf = written
    assert tf.num_docs == len(DOCS)
    assert tf.tokens.dtype == np.uint16 and tf.offsets.dtype == np.int64
    assert tf.offsets[0] == 0 and tf.offsets[-1] == tf.num_tokens == len(tf.tokens)
    expected = tokenizer.encode_batch(DOCS)
    for i, (text, ids) in enumerate(zip(DOCS, expected)):
        doc = tf.doc(i)
        assert doc[0] == tokenizer.bos_id
        assert doc.tolist() == ids
        assert tokenizer.decode(doc[1:]) == text
    assert tf.doc(-1).tolist() == expected[-1]
    with pytest.raises(IndexError):
        tf.doc(len(DOCS))


def test_reopen_matches_and_records_what_made_it(tokenizer, written):
    again = TokenFile.open(written.prefix, verify=True)
    assert np.array_equal(again.tokens, written.tokens) and np.array_equal(again.offsets, written.offsets)
    assert (again.bos_id, again.vocab_size) == (tokenizer.bos_id, tokenizer.vocab_size)
    assert again.meta["tokenizer"] == tokenizer.fingerprint
    names = sorted(p.name for p in written.prefix.parent.iterdir())
    assert names == ["val.bin", "val.idx", "val.json"]  # no temporaries left behind


def test_progress_goes_to_stderr_only(tokenizer, tmp_path, capfd):
    write_token_file(DOCS, tokenizer, tmp_path / "p", progress=True, total=len(DOCS))
    out, err = capfd.readouterr()
    assert out == ""
    assert "tokenizing" in err


def test_truncated_bin_is_detected(written):
    path = written.prefix.with_name("val.bin")
    data = path.read_bytes()
    path.write_bytes(data[:-2])
    with pytest.raises(CorruptTokenFile, match="val.bin holds"):
        TokenFile.open(written.prefix)


def test_interrupted_write_without_commit_marker_is_detected(tokenizer, written):
    # A rewrite that dies midway has removed the old commit marker and leaves only temporaries.
    def docs():
        yield from DOCS
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_token_file(docs(), tokenizer, written.prefix, progress=False, chunk_docs=4)
    assert not written.prefix.with_name("val.bin.tmp").exists()
    with pytest.raises(CorruptTokenFile, match="val.json is missing"):
        TokenFile.open(written.prefix)
    rebuilt = write_token_file(DOCS, tokenizer, written.prefix, progress=False)
    assert rebuilt.num_docs == len(DOCS)


def test_flipped_token_is_caught_by_verify(written):
    path = written.prefix.with_name("val.bin")
    data = bytearray(path.read_bytes())
    data[10] ^= 0xFF
    path.write_bytes(bytes(data))
    TokenFile.open(written.prefix)  # sizes and offsets still agree: the cheap check passes
    with pytest.raises(CorruptTokenFile, match="checksum"):
        TokenFile.open(written.prefix, verify=True)


def test_bad_offsets_and_bad_metadata_are_detected(written):
    idx = written.prefix.with_name("val.idx")
    offsets = np.fromfile(idx, dtype=np.int64)
    offsets[[2, 3]] = offsets[[3, 2]]
    offsets.tofile(idx)
    with pytest.raises(CorruptTokenFile, match="offsets"):
        TokenFile.open(written.prefix)
    meta = written.prefix.with_name("val.json")
    meta.write_text(meta.read_text()[:20])
    with pytest.raises(CorruptTokenFile, match="unreadable"):
        TokenFile.open(written.prefix)


def test_writer_rejects_bad_input(tmp_path):
    with pytest.raises(ValueError, match="no documents"):
        with TokenFileWriter(tmp_path / "e", bos_id=7, vocab_size=8) as w:
            w.commit()
    with TokenFileWriter(tmp_path / "w", bos_id=7, vocab_size=8) as w:
        with pytest.raises(ValueError, match="start with BOS"):
            w.add([[7, 1, 2], [3, 7]])
        with pytest.raises(ValueError, match="vocab_size"):
            w.add([[7, 9]])
        w.add([[7, 1, 2], [7]])
        tf = w.commit()
    assert tf.offsets.tolist() == [0, 3, 4] and tf.tokens.tolist() == [7, 1, 2, 7]
    with pytest.raises(ValueError, match="uint16"):
        TokenFileWriter(tmp_path / "v", bos_id=0, vocab_size=70_000)


def test_missing_file_is_reported_with_the_fix(tmp_path: Path):
    with pytest.raises(CorruptTokenFile, match="autoresearch setup"):
        TokenFile.open(tmp_path / "train")


def test_metadata_counts(written):
    meta = json.loads(written.prefix.with_name("val.json").read_text())
    assert meta["num_docs"] == written.num_docs and meta["num_tokens"] == written.num_tokens
