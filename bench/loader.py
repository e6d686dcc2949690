"""Loader benchmark: upstream's best-fit packing loop vs `harness.data.loader.BestFitPacker`.

Both pack the same synthetic token file (lognormal document lengths, mean ~600 tokens, vocab
8192) at T=2048, B=128 on one core. The reference is upstream's `make_dataloader` loop verbatim
(Python lists, a linear scan of the 1000-document buffer per placed document, pop by index),
refilled 128 documents at a time from the token file instead of from the tokenizer, so neither
side pays for tokenization. Prints tokens/s of each, the ratio, and whether the rows are identical.

    python bench/loader.py [--docs 50000] [--ref-batches 4] [--batches 100]
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from harness.data.loader import BestFitPacker
from harness.data.tokens import TokenFile, TokenFileWriter

VOCAB = 8192
BOS = VOCAB - 4  # where the specials start, as in the real tokenizer


def synthetic_token_file(prefix: Path, num_docs: int, mean_len: float = 600.0, seed: int = 0) -> TokenFile:
    rng = np.random.default_rng(seed)
    sigma = 1.0  # long tail: ~4 % of documents are longer than a 2049-token row
    lengths = np.maximum(2, rng.lognormal(np.log(mean_len) - sigma**2 / 2, sigma, num_docs).astype(np.int64))
    tokens = rng.integers(0, BOS, int(lengths.sum()), dtype=np.uint16)
    tokens[np.concatenate(([0], np.cumsum(lengths)[:-1]))] = BOS
    with TokenFileWriter(prefix, bos_id=BOS, vocab_size=VOCAB) as writer:
        writer.add_flat(tokens, lengths)
        return writer.commit()


def upstream_rows(tokens: TokenFile, B: int, T: int, buffer_size: int = 1000, refill: int = 128):
    """Upstream's make_dataloader loop (prepare.py), fed from the token file: yields (B, T+1) rows."""
    offsets = tokens.offsets
    flat = np.asarray(tokens.tokens)
    next_doc = 0

    def document_batches():  # upstream's _document_batches + tokenizer.encode, from the token file
        nonlocal next_doc
        while True:
            if next_doc == tokens.num_docs:
                next_doc = 0
            stop = min(next_doc + refill, tokens.num_docs)
            bounds = offsets[next_doc : stop + 1].tolist()
            yield [flat[a:b].tolist() for a, b in zip(bounds, bounds[1:])]
            next_doc = stop

    batches = document_batches()
    row_capacity = T + 1
    doc_buffer: list[list[int]] = []
    row_buffer = np.empty((B, row_capacity), dtype=np.int32)
    while True:
        for row_idx in range(B):
            pos = 0
            while pos < row_capacity:
                while len(doc_buffer) < buffer_size:
                    doc_buffer.extend(next(batches))
                remaining = row_capacity - pos
                best_idx = -1
                best_len = 0
                for i, doc in enumerate(doc_buffer):
                    doc_len = len(doc)
                    if doc_len <= remaining and doc_len > best_len:
                        best_idx = i
                        best_len = doc_len
                if best_idx >= 0:
                    doc = doc_buffer.pop(best_idx)
                    row_buffer[row_idx, pos : pos + len(doc)] = doc
                    pos += len(doc)
                else:
                    shortest_idx = min(range(len(doc_buffer)), key=lambda i: len(doc_buffer[i]))
                    doc = doc_buffer.pop(shortest_idx)
                    row_buffer[row_idx, pos : pos + remaining] = doc[:remaining]
                    pos += remaining
        yield row_buffer.copy()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--docs", type=int, default=50_000, help="documents in the synthetic file")
    parser.add_argument("--T", type=int, default=2048)
    parser.add_argument("--B", type=int, default=128)
    parser.add_argument("--ref-batches", type=int, default=4, help="batches timed for the reference")
    parser.add_argument("--batches", type=int, default=100, help="batches timed for ours")
    args = parser.parse_args()
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})  # one core
    B, T = args.B, args.T
    with tempfile.TemporaryDirectory() as tmp:
        tokens = synthetic_token_file(Path(tmp) / "bench", args.docs)
        lengths = np.diff(tokens.offsets)
        print(f"token file: {tokens.num_docs:,} docs, {tokens.num_tokens:,} tokens, mean doc {lengths.mean():.0f}, "
              f"median {np.median(lengths):.0f}, {np.mean(lengths > T + 1):.1%} longer than a row; vocab {VOCAB}")
        print(f"T={T} B={B}, one core (single thread), tokens per batch = B*T = {B * T:,}")

        reference = upstream_rows(tokens, B, T)
        t0 = time.perf_counter()
        ref_batches = [next(reference) for _ in range(args.ref_batches)]
        ref_s = time.perf_counter() - t0
        ref_rate = args.ref_batches * B * T / ref_s

        packer = BestFitPacker(tokens, T)
        ours_first = [packer.next_rows(B) for _ in range(args.ref_batches)]
        identical = all(np.array_equal(a, b) for a, b in zip(ref_batches, ours_first))

        packer = BestFitPacker(tokens, T)
        packer.next_rows(B)  # warm the page cache and the buffer
        t0 = time.perf_counter()
        for _ in range(args.batches):
            packer.next_rows(B)
        ours_s = time.perf_counter() - t0
        ours_rate = args.batches * B * T / ours_s

    print(f"upstream (reference): {ref_rate / 1e6:8.2f} M tokens/s  ({args.ref_batches} batches, {ref_s * 1e3 / args.ref_batches:.1f} ms/batch)")
    print(f"ours (BestFitPacker): {ours_rate / 1e6:8.2f} M tokens/s  ({args.batches} batches, {ours_s * 1e3 / args.batches:.2f} ms/batch, epoch {packer.epoch})")
    print(f"speed-up: {ours_rate / ref_rate:.1f}x")
    print(f"identical rows for the first {args.ref_batches} batches ({args.ref_batches * B} rows): {identical}")
    target = ours_rate >= 20e6 and ours_rate >= 10 * ref_rate
    print(f"target (>= 10x reference and >= 20 M tokens/s): {'met' if target else 'NOT met'}")
    if not identical:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
