"""The best-fit packer: upstream's rows exactly, its invariants, the prefetch thread, val rows."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest

from harness.data.loader import BestFitPacker, DataExhausted, train_batches, val_rows
from harness.data.tokens import TokenFile, TokenFileWriter

BOS = 0
VOCAB = 60_000


def make_docs(seed: int, num_docs: int, max_len: int) -> list[list[int]]:
    """Documents of random lengths; token values are globally unique (apart from BOS), so a row
    matching the reference says exactly which tokens of which documents it holds."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, max_len + 1, num_docs)
    docs, next_token = [], 1
    for n in lengths:
        docs.append([BOS, *range(next_token, next_token + n - 1)])
        next_token += n - 1
    assert next_token < VOCAB
    return docs


def write(docs: list[list[int]], prefix: Path) -> TokenFile:
    with TokenFileWriter(prefix, bos_id=BOS, vocab_size=VOCAB) as w:
        w.add(docs)
        return w.commit()


def upstream_reference(docs: list[list[int]], T: int, buffer_size: int, refill: int):
    """Upstream's make_dataloader loop, straightforwardly: yields (row, epoch). Document batches of
    `refill` come in file order; the last batch of a pass may be short; then the next epoch."""
    def document_batches():
        epoch = 1
        while True:
            for i in range(0, len(docs), refill):
                yield docs[i : i + refill], epoch
            epoch += 1

    batches = document_batches()
    buffer: list[list[int]] = []
    epoch = 1
    cap = T + 1
    while True:
        row: list[int] = []
        while len(row) < cap:
            while len(buffer) < buffer_size:
                batch, epoch = next(batches)
                buffer.extend(batch)
            remaining = cap - len(row)
            best_idx, best_len = -1, 0
            for i, doc in enumerate(buffer):
                if best_len < len(doc) <= remaining:
                    best_idx, best_len = i, len(doc)
            if best_idx >= 0:
                row.extend(buffer.pop(best_idx))
            else:
                shortest = min(range(len(buffer)), key=lambda i: len(buffer[i]))
                row.extend(buffer.pop(shortest)[:remaining])
        yield row, epoch


@pytest.mark.parametrize(
    "seed, num_docs, max_len, T, buffer_size, refill",
    [
        (0, 300, 40, 16, 20, 4),  # many documents longer than a row
        (1, 97, 12, 31, 10, 7),  # short documents, several per row, odd refill at the end of a pass
        (2, 50, 30, 8, 1000, 128),  # upstream's buffer/refill with a file smaller than the buffer
        (3, 500, 200, 64, 50, 16),  # many ties between equal lengths
    ],
)
def test_rows_equal_upstream_algorithm_across_epochs(tmp_path, seed, num_docs, max_len, T, buffer_size, refill):
    docs = make_docs(seed, num_docs, max_len)
    packer = BestFitPacker(write(docs, tmp_path / "d"), T, buffer_size=buffer_size, refill=refill)
    reference = upstream_reference(docs, T, buffer_size, refill)
    total_doc_tokens = sum(map(len, docs))
    rows_needed = 3 * total_doc_tokens // (T + 1) + 5  # enough rows to run through several epochs
    got = np.concatenate([packer.next_rows(b) for b in (1, 7, rows_needed)])
    want = [next(reference) for _ in range(len(got))]
    assert got.tolist() == [row for row, _ in want]
    assert packer.epoch == want[-1][1] >= 3


def test_rows_start_with_bos_and_are_made_only_of_document_prefixes(tmp_path):
    docs = make_docs(4, 400, 50)
    T = 24
    rows = BestFitPacker(write(docs, tmp_path / "d"), T, buffer_size=30, refill=8).next_rows(64)
    assert rows.shape == (64, T + 1) and rows.dtype == np.int32
    by_first = {d[1] if len(d) > 1 else None: d for d in docs}
    for row in rows.tolist():
        assert row[0] == BOS
        starts = [i for i, t in enumerate(row) if t == BOS] + [len(row)]
        pieces = [row[a:b] for a, b in zip(starts, starts[1:])]
        for k, piece in enumerate(pieces):
            doc = by_first[piece[1] if len(piece) > 1 else None] if len(piece) > 1 else [BOS]
            # every piece is a whole document, except the last one, which may be cropped
            assert piece == doc[: len(piece)] and (len(piece) == len(doc) or k == len(pieces) - 1)


def test_train_batches_shift_and_match_direct_packing(tmp_path):
    docs = make_docs(5, 300, 60)
    tokens = write(docs, tmp_path / "d")
    B, T = 4, 32
    direct = BestFitPacker(tokens, T)
    batches = train_batches(tokens, B, T, prefetch=2)
    for _ in range(10):
        x, y = next(batches)
        rows = direct.next_rows(B)
        assert x.dtype == y.dtype == np.int32 and x.shape == y.shape == (B, T)
        assert x.flags.c_contiguous and y.flags.c_contiguous
        assert np.array_equal(x, rows[:, :-1]) and np.array_equal(y, rows[:, 1:])
    batches.close()


def test_prefetch_thread_errors_reach_the_consumer_and_close_stops_it(tmp_path):
    tokens = write(make_docs(6, 50, 20), tmp_path / "d")
    # Offsets that point past the end of the tokens: the copy in the loader thread fails.
    broken = TokenFile(prefix=tokens.prefix, tokens=tokens.tokens, offsets=tokens.offsets * 100, meta=tokens.meta)
    with pytest.raises(ValueError):
        next(train_batches(broken, 2, 8))

    before = set(threading.enumerate())
    batches = train_batches(tokens, 2, 8)
    next(batches)
    (thread,) = [t for t in set(threading.enumerate()) - before if t.name == "autoresearch-loader"]
    assert thread.daemon
    batches.close()
    thread.join(timeout=5)
    assert not thread.is_alive()


def test_val_rows_are_deterministic_and_match_the_packer(tmp_path):
    docs = make_docs(7, 2000, 40)
    tokens = write(docs, tmp_path / "v")
    T = 16
    a, b = val_rows(tokens, T, 100), val_rows(tokens, T, 100)
    assert a.shape == (100, T + 1) and np.array_equal(a, b)
    assert np.array_equal(a, BestFitPacker(tokens, T).next_rows(100))  # no wrap-around: same rows


def test_val_rows_never_repeat_documents_and_say_how_many_rows_fit(tmp_path):
    docs = make_docs(8, 40, 30)
    tokens = write(docs, tmp_path / "v")
    T = 16
    packer = BestFitPacker(tokens, T, wrap=False)
    with pytest.raises(DataExhausted):
        packer.next_rows(10_000)
    supply = packer.rows_done
    assert 0 < supply < 40
    rows = val_rows(tokens, T, supply)
    # The drained buffer still packs by the same rule, and no document appears twice.
    seen = [t for t in rows[:, 1:].ravel().tolist() if t != BOS]
    assert len(seen) == len(set(seen))
    with pytest.raises(ValueError, match=rf"supplies only {supply} rows.*lower EVAL_TOKENS to at most {supply * T}"):
        val_rows(tokens, T, supply + 1)


@pytest.mark.parametrize("bad", [dict(T=0), dict(buffer_size=0), dict(refill=0)])
def test_packer_rejects_nonsense_sizes(tmp_path, bad):
    tokens = write(make_docs(9, 5, 5), tmp_path / "d")
    kwargs = dict(T=8, **bad) if "T" not in bad else bad
    with pytest.raises(ValueError, match="positive"):
        BestFitPacker(tokens, **kwargs)


def test_packing_is_fast_enough_to_keep_an_accelerator_fed(tmp_path):
    """A smoke check of the fast path (bench/loader.py measures it properly): 64 rows of 2049
    tokens from a 1000-document buffer take milliseconds, not the ~30 ms of a buffer scan."""
    rng = np.random.default_rng(10)
    lengths = np.maximum(2, rng.lognormal(np.log(600) - 0.5, 1.0, 5000).astype(np.int64))
    flat = rng.integers(1, 8000, int(lengths.sum()), dtype=np.uint16)
    flat[np.concatenate(([0], np.cumsum(lengths)[:-1]))] = BOS
    with TokenFileWriter(tmp_path / "f", bos_id=BOS, vocab_size=8192) as w:
        w.add_flat(flat, lengths)
        tokens = w.commit()
    packer = BestFitPacker(tokens, 2048)
    packer.next_rows(64)
    t0 = time.perf_counter()
    for _ in range(5):
        packer.next_rows(64)
    per_batch = (time.perf_counter() - t0) / 5
    assert per_batch < 0.015, f"{per_batch * 1e3:.1f} ms per 64 x 2049 batch"
