"""BOS-aligned best-fit packing of pre-tokenized documents into (B, T+1) rows.

Same rows as upstream's `make_dataloader` (autoresearch `prepare.py`), in the same order:
- a buffer of at least `buffer_size` documents, refilled `refill` documents at a time in document
  order (upstream's tokenizer batches of 128), cycling to the start of the file (a new epoch);
- each row (capacity T+1) is filled by repeatedly taking the LARGEST buffered document that fits
  entirely in the remaining space (ties: the one buffered first); when none fits, the SHORTEST
  document (ties: buffered first) is cropped to fill the row exactly and its tail is dropped;
- so every row starts with BOS and there is no padding.

Upstream scans the whole buffer for every document it places. Here the buffer is a queue of
document starts per length plus a sorted list of the lengths present, so each choice is a binary
search, and tokens are copied as numpy slices out of the memory-mapped token file.
"""

from __future__ import annotations

import queue
import threading
from bisect import bisect_right, insort
from collections import deque
from typing import Iterator

import numpy as np

from harness.data.tokens import TokenFile


class DataExhausted(ValueError):
    """A non-wrapping packer ran out of documents in the middle of a row."""


class BestFitPacker:
    """Upstream's best-fit packing over a `TokenFile`, without the per-document buffer scan.

    `wrap=False` never re-reads a document: at the end of the file the buffer drains, and a row
    that cannot be completed raises `DataExhausted` (the validation stream must not repeat)."""

    def __init__(self, tokens: TokenFile, T: int, buffer_size: int = 1000, refill: int = 128, wrap: bool = True) -> None:
        if T < 1 or buffer_size < 1 or refill < 1:
            raise ValueError(f"T, buffer_size and refill must be positive (got {T}, {buffer_size}, {refill})")
        self.row_capacity = T + 1
        self.buffer_size = buffer_size
        self.refill = refill
        self.wrap = wrap
        self.epoch = 1  # epoch of the last documents read into the buffer, as upstream reports it
        self.rows_done = 0
        self._tokens = np.asarray(tokens.tokens)  # plain ndarray view: slicing a memmap subclass is slower
        self._offsets = tokens.offsets
        self._num_docs = tokens.num_docs
        self._next_doc = 0  # next document to read into the buffer
        self._exhausted = False
        self._count = 0  # documents in the buffer
        self._lengths: list[int] = []  # distinct lengths present, sorted
        self._by_length: dict[int, deque[int]] = {}  # length -> starts of the documents, in buffer order
        self.used_starts: list[int] = []  # start offset of every document placed in a row, cropped or whole

    def _fill(self) -> None:
        """Read up to `refill` documents (not past the end of the file) into the buffer."""
        if self._next_doc == self._num_docs:
            if not self.wrap:
                self._exhausted = True
                return
            self._next_doc = 0
            self.epoch += 1
        stop = min(self._next_doc + self.refill, self._num_docs)
        bounds = self._offsets[self._next_doc : stop + 1].tolist()
        by_length, lengths = self._by_length, self._lengths
        for start, end in zip(bounds, bounds[1:]):
            q = by_length.get(end - start)
            if q is None:
                by_length[end - start] = deque((start,))
                insort(lengths, end - start)
            else:
                q.append(start)
        self._count += stop - self._next_doc
        self._next_doc = stop

    def next_rows(self, B: int) -> np.ndarray:
        """The next B packed rows, int32 of shape (B, T+1)."""
        cap = self.row_capacity
        rows = np.empty((B, cap), dtype=np.int32)
        tokens, lengths, by_length = self._tokens, self._lengths, self._by_length
        for r in range(B):
            row = rows[r]
            pos = 0
            while pos < cap:
                while self._count < self.buffer_size and not self._exhausted:
                    self._fill()
                if self._count == 0:
                    raise DataExhausted(f"the token file ran out of documents after {self.rows_done} full rows")
                remaining = cap - pos
                i = bisect_right(lengths, remaining)
                if i:  # the largest length that fits; its queue is in buffer order
                    length = lengths[i - 1]
                    take = length
                else:  # nothing fits: crop the shortest
                    i = 1
                    length = lengths[0]
                    take = remaining
                q = by_length[length]
                start = q.popleft()
                if not q:
                    del by_length[length]
                    del lengths[i - 1]
                self._count -= 1
                self.used_starts.append(start)
                row[pos : pos + take] = tokens[start : start + take]
                pos += take
            self.rows_done += 1
        return rows


def train_batches(tokens: TokenFile, B: int, T: int, prefetch: int = 2) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Endless (inputs, targets) int32 batches of shape (B, T): inputs = rows[:, :-1], targets =
    rows[:, 1:], packed on a background thread `prefetch` batches ahead so the accelerator never
    waits on packing. An error in the thread is raised here, in the consumer."""
    packer = BestFitPacker(tokens, T)
    ready: queue.Queue = queue.Queue(maxsize=max(1, prefetch))
    stop = threading.Event()

    def put(item: object) -> None:
        while not stop.is_set():  # wake up now and then to notice a consumer that went away
            try:
                ready.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def produce() -> None:
        try:
            while not stop.is_set():
                rows = packer.next_rows(B)
                put((np.ascontiguousarray(rows[:, :-1]), np.ascontiguousarray(rows[:, 1:])))
        except BaseException as exc:  # handed to the consumer
            put(exc)

    def consume() -> Iterator[tuple[np.ndarray, np.ndarray]]:
        thread = threading.Thread(target=produce, name="autoresearch-loader", daemon=True)
        thread.start()
        try:
            while True:
                item = ready.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:  # the consumer stopped (or closed the generator): let the thread exit
            stop.set()

    return consume()


def val_rows(tokens: TokenFile, T: int, num_rows: int, name: str | None = None) -> np.ndarray:
    """The first `num_rows` packed rows (num_rows, T+1) of the validation file: deterministic (a
    fresh packer from document 0), never re-reading a document."""
    return packed_rows(tokens, T, num_rows, name)[0]


def packed_rows(tokens: TokenFile, T: int, num_rows: int, name: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """`val_rows`, plus the sorted indices of the documents those rows use (in part or whole).
    `name` is what an error calls the file (the user's data, not a cache path)."""
    packer = BestFitPacker(tokens, T, wrap=False)
    try:
        rows = packer.next_rows(num_rows)
    except DataExhausted:
        what = name or str(tokens.prefix)
        if packer.rows_done == 0:
            raise ValueError(
                f"{what} is too small to evaluate on: it does not fill a single row of {T + 1} tokens "
                f"({tokens.num_tokens:,} tokens in {tokens.num_docs:,} documents); use a larger validation split"
            ) from None
        raise ValueError(
            f"{what} supplies only {packer.rows_done} rows of {T + 1} tokens without repeating documents, "
            f"but {num_rows} are needed: lower EVAL_TOKENS to at most {packer.rows_done * T} "
            "(or use a larger validation split)"
        ) from None
    used = np.searchsorted(tokens.offsets, np.asarray(packer.used_starts, dtype=np.int64))
    return rows, np.unique(used)
