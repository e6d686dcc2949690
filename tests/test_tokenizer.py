"""The tokenizer: rustbpe training, tiktoken loading, the raw-byte table, corrupt-file detection."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from harness.data.tokenizer import (
    BOS_TOKEN,
    SPECIAL_TOKENS,
    SPLIT_PATTERN,
    TOKEN_BYTES_FILE,
    TOKENIZER_FILE,
    CorruptTokenizer,
    capped_texts,
    load_token_bytes,
    load_tokenizer,
    train_tokenizer,
)

VOCAB = 512


def small_corpus() -> list[str]:
    """Real English prose (the stdlib's pydoc topics) plus multilingual text and long numbers,
    so the merges include multi-byte pieces of characters and digit runs."""
    from pydoc_data.topics import topics

    rng = random.Random(0)
    words = ["你好", "世界", "数据", "模型", "训练", "Привет", "мир", "naïve", "café", "日本語", "🙂", "🚀"]
    texts = list(topics.values())
    texts += [" ".join(rng.choice(words) for _ in range(200)) for _ in range(50)]
    texts += [" ".join(str(rng.randrange(10**9)) for _ in range(100)) for _ in range(20)]
    return texts


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("tokenizer")
    return train_tokenizer(small_corpus(), VOCAB, out), out


def test_vocabulary_layout_specials_after_ranks_bos_first(trained):
    tok, _ = trained
    assert tok.vocab_size == VOCAB == tok.encoding.n_vocab
    assert tok.bos_id == VOCAB - 4
    assert [tok.encoding.encode_single_token(s) for s in SPECIAL_TOKENS] == list(range(VOCAB - 4, VOCAB))
    assert tok.encoding.encode_single_token(BOS_TOKEN) == tok.bos_id
    assert tok.encoding._pat_str == SPLIT_PATTERN


def test_split_pattern_keeps_numbers_to_two_digits(trained):
    tok, _ = trained
    # Upstream's pattern splits digit runs into groups of at most two, so no token holds three.
    ids = tok.encode("31415926535 and 2718281828", bos=False)
    pieces = [tok.encoding.decode_single_token_bytes(i) for i in ids]
    assert all(sum(ch.isdigit() for ch in p.decode("utf-8", "replace")) <= 2 for p in pieces)
    assert b"".join(pieces) == b"31415926535 and 2718281828"


def test_encode_batch_starts_every_document_with_bos(trained):
    tok, _ = trained
    texts = ["Hello world!", "", "你好, 世界", "<|reserved_0|> is ordinary text here"]
    batch = tok.encode_batch(texts, num_threads=2)
    assert [ids[0] for ids in batch] == [tok.bos_id] * len(texts)
    assert [ids[1:] for ids in batch] == [tok.encoding.encode_ordinary(t) for t in texts]
    # A special token's text inside a document is not the special token.
    assert batch[3].count(tok.bos_id) == 1
    # Threads encode contiguous slices; the order of documents is kept.
    many = small_corpus()
    assert tok.encode_batch(many, num_threads=3) == [[tok.bos_id, *tok.encoding.encode_ordinary(t)] for t in many]


@settings(max_examples=300, deadline=None)
@given(st.text())
def test_round_trip_on_arbitrary_unicode(trained, text):
    tok, _ = trained
    assert tok.decode(tok.encode(text, bos=False)) == text
    assert tok.decode(tok.encode_batch([text])[0][1:]) == text


def test_token_bytes_are_raw_byte_lengths(trained):
    tok, out = trained
    table = load_token_bytes(out)
    assert table.dtype == np.int32 and table.shape == (VOCAB,)
    enc = tok.encoding
    expected = [len(enc.decode_single_token_bytes(i)) for i in range(VOCAB - 4)]
    assert table[: VOCAB - 4].tolist() == expected
    assert table[VOCAB - 4 :].tolist() == [0, 0, 0, 0]
    # A lone byte >= 0x80 is 1 byte; upstream's table (#384) counts its U+FFFD as 3.
    lone = enc.encode_single_token(b"\x80")
    assert table[lone] == 1 and len(enc.decode([lone]).encode("utf-8")) == 3
    # Merged pieces of multi-byte characters that are not valid UTF-8 alone count their raw bytes too.
    partial = [i for i in range(256, VOCAB - 4) if not _is_utf8(enc.decode_single_token_bytes(i))]
    assert partial, "the corpus should produce merges inside multi-byte characters"
    assert all(table[i] == len(enc.decode_single_token_bytes(i)) for i in partial)


def _is_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


def test_reload_gives_the_same_tokenizer_and_no_temporaries(trained):
    tok, out = trained
    again = load_tokenizer(out)
    assert (again.bos_id, again.vocab_size, again.fingerprint) == (tok.bos_id, tok.vocab_size, tok.fingerprint)
    text = small_corpus()[0]
    assert again.encode(text) == tok.encode(text)
    assert sorted(p.name for p in out.iterdir()) == [TOKEN_BYTES_FILE, TOKENIZER_FILE]


def _copy(out: Path, dest: Path) -> Path:
    dest.mkdir()
    for name in (TOKENIZER_FILE, TOKEN_BYTES_FILE):
        (dest / name).write_bytes((out / name).read_bytes())
    return dest


def test_truncated_tokenizer_file_is_detected(trained, tmp_path):
    _, out = trained
    bad = _copy(out, tmp_path / "t")
    data = (bad / TOKENIZER_FILE).read_bytes()
    (bad / TOKENIZER_FILE).write_bytes(data[: len(data) // 2])
    with pytest.raises(CorruptTokenizer, match="unreadable.*autoresearch setup"):
        load_tokenizer(bad)


def test_truncated_or_edited_token_bytes_are_detected(trained, tmp_path):
    _, out = trained
    bad = _copy(out, tmp_path / "t")
    data = (bad / TOKEN_BYTES_FILE).read_bytes()
    (bad / TOKEN_BYTES_FILE).write_bytes(data[:-100])
    with pytest.raises(CorruptTokenizer, match=TOKEN_BYTES_FILE):
        load_tokenizer(bad)
    table = load_token_bytes(out).copy()
    table[300] += 1  # e.g. a table written with the 3-bytes-per-U+FFFD bug
    np.save(bad / TOKEN_BYTES_FILE, table)
    with pytest.raises(CorruptTokenizer, match="does not match"):
        load_tokenizer(bad)


def test_missing_files_are_detected(trained, tmp_path):
    _, out = trained
    bad = _copy(out, tmp_path / "t")
    (bad / TOKEN_BYTES_FILE).unlink()
    with pytest.raises(CorruptTokenizer, match="missing"):
        load_tokenizer(bad)
    with pytest.raises(CorruptTokenizer, match="missing"):
        load_tokenizer(tmp_path / "nowhere")


def test_corpus_too_small_for_the_vocabulary(tmp_path):
    with pytest.raises(ValueError, match="smaller VOCAB_SIZE"):
        train_tokenizer(["hello world"] * 10, 1000, tmp_path)
    with pytest.raises(ValueError, match="at least 260"):
        train_tokenizer(["hello world"], 100, tmp_path)


def test_training_text_is_capped_like_upstream():
    docs = ["a" * 25_000, "b" * 5, "c" * 10]
    assert [len(d) for d in capped_texts(docs)] == [10_000, 5, 10]
    assert [len(d) for d in capped_texts(docs, max_chars=10_003)] == [10_000, 5]
