"""Building the evaluator's data at `setup`: validation rows, a disjoint holdout, and canaries.

- Validation: the first EVAL_TOKENS / MAX_SEQ_LEN best-fit packed rows of the validation shard,
  exactly the rows upstream scores (`harness.data.loader.packed_rows`).
- Holdout: rows packed from the shard's documents that no validation row uses, in file order, so
  the two never share a document. Nobody but the evaluator sees it.
- Canaries: `CANARIES_PER_STREAM` secret rows of random word tokens, inserted at random positions
  into each stream (`harness.scoring.canaries`). A fresh secret is drawn whenever the set is built.

The result is an `EvalSet` folder under `private_root()`; an intact one is reused by a later setup.
"""

from __future__ import annotations

import secrets
import shutil
from pathlib import Path
from typing import Callable

import numpy as np

from harness.config import EvaluatorConstants
from harness.data.loader import packed_rows
from harness.data.tokens import TokenFile
from harness.files import atomic_write
from harness.scoring.canaries import CANARIES_PER_STREAM, canary_rows, word_tokens
from harness.scoring.evalset import EVAL_SET_FILE, TOKEN_BYTES_FILE, EvalSet, Stream

Log = Callable[[str], None]


def eval_set_directory(parent: Path, evaluator: EvaluatorConstants) -> Path:
    return parent / f"T{evaluator.MAX_SEQ_LEN}-E{evaluator.eval_rows}-H{evaluator.holdout_rows}"


def ensure_eval_set(val_tokens: TokenFile, token_strings: list[bytes], token_bytes: np.ndarray,
                    evaluator: EvaluatorConstants, directory: Path, val_name: str, source: dict[str, str],
                    log: Log) -> EvalSet:
    """The evaluation set in `directory`: reused when intact and made from the same inputs,
    built (with fresh canaries) otherwise."""
    try:
        existing = EvalSet.load(directory)
        if existing.source == source and all(path.is_file() for path in existing.files()):
            for name in existing.streams:
                existing.rows(name)  # readable, right shape
            log(f"evaluation set: reusing {directory}")
            return existing
    except (FileNotFoundError, ValueError, OSError):
        pass
    if directory.exists():
        shutil.rmtree(directory)
    return build_eval_set(val_tokens, token_strings, token_bytes, evaluator, directory, val_name, source, log)


def build_eval_set(val_tokens: TokenFile, token_strings: list[bytes], token_bytes: np.ndarray,
                   evaluator: EvaluatorConstants, directory: Path, val_name: str, source: dict[str, str],
                   log: Log) -> EvalSet:
    T = evaluator.MAX_SEQ_LEN
    val, used = packed_rows(val_tokens, T, evaluator.eval_rows, name=val_name)
    streams_rows = {"val": val}
    if evaluator.holdout_rows:
        spare = _documents_except(val_tokens, used)
        if spare is None:
            raise ValueError(f"{val_name}: every document is used by the validation rows, none is left for a "
                             f"holdout: lower EVAL_TOKENS, or set HOLDOUT_TOKENS=0 (no holdout)")
        holdout, _ = packed_rows(spare, T, evaluator.holdout_rows,
                                 name=f"{val_name} (the documents the validation rows leave for the holdout)")
        streams_rows["holdout"] = holdout

    rng = np.random.default_rng(secrets.randbits(128))  # the canaries are this set's secret
    pool = word_tokens(token_strings)
    directory.mkdir(parents=True, exist_ok=True)
    streams = {}
    for name, rows in streams_rows.items():
        canaries = canary_rows(rng, pool, val_tokens.bos_id, CANARIES_PER_STREAM, T)
        where = np.sort(rng.choice(len(rows) + len(canaries), size=len(canaries), replace=False))
        merged = np.insert(rows.astype(np.int32), where - np.arange(len(where)), canaries, axis=0)
        file = f"{name}_rows.npy"
        _save_npy(directory / file, merged)
        streams[name] = Stream(rows_file=file, num_rows=len(rows), canary_rows=tuple(int(i) for i in where),
                               canary_pool=len(pool))
    _save_npy(directory / TOKEN_BYTES_FILE, token_bytes.astype(np.int32))
    eval_set = EvalSet(directory=directory, seq_len=T, vocab_size=len(token_bytes), bos_id=val_tokens.bos_id,
                       streams=streams, source=source)
    eval_set.save()  # last: a folder without it is unfinished
    log(f"evaluation set: {evaluator.eval_rows} validation and {evaluator.holdout_rows} holdout rows, "
        f"{CANARIES_PER_STREAM} canaries in each, in {directory}")
    return eval_set


def with_unigram(eval_set: EvalSet, unigram: dict[str, float]) -> EvalSet:
    """The set with its unigram baselines recorded (saved again)."""
    updated = EvalSet(directory=eval_set.directory, seq_len=eval_set.seq_len, vocab_size=eval_set.vocab_size,
                      bos_id=eval_set.bos_id, streams=eval_set.streams, unigram_bpb=unigram, source=eval_set.source)
    updated.save()
    return updated


def scored_rows(eval_set: EvalSet, stream: str) -> np.ndarray:
    """A stream's rows without its canaries."""
    rows = eval_set.rows(stream)
    keep = np.ones(len(rows), dtype=bool)
    keep[list(eval_set.streams[stream].canary_rows)] = False
    return rows[keep]


def _documents_except(tokens: TokenFile, used: np.ndarray) -> TokenFile | None:
    """An in-memory token file of the documents not in `used`, in file order (None if none)."""
    keep = np.ones(tokens.num_docs, dtype=bool)
    keep[used] = False
    docs = np.flatnonzero(keep)
    if len(docs) == 0:
        return None
    starts, ends = tokens.offsets[docs], tokens.offsets[docs + 1]
    flat = np.concatenate([np.asarray(tokens.tokens[s:e]) for s, e in zip(starts, ends)])
    offsets = np.concatenate([[0], np.cumsum(ends - starts)]).astype(np.int64)
    return TokenFile(prefix=tokens.prefix, tokens=flat, offsets=offsets, meta=dict(tokens.meta))


def _save_npy(path: Path, array: np.ndarray) -> None:
    import io

    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    atomic_write(path, buffer.getvalue())
