"""Pre-tokenized documents on disk, so a training run pays nothing for tokenization.

A token file is three files next to each other:
  `<prefix>.bin`   uint16 tokens of every document, concatenated; each document starts with BOS
  `<prefix>.idx`   int64 document start offsets into `.bin`, num_docs + 1 entries (last = num_tokens)
  `<prefix>.json`  counts, BOS id, vocabulary size, tokenizer fingerprint and sha256 checksums
The `.json` is written last, after `.bin` and `.idx` are renamed into place: a file without it is
an interrupted write. `TokenFile.open` checks sizes and offsets (cheap, every run);
`verify=True` also re-hashes the data and checks the BOS at every document start (setup).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Sequence

import numpy as np

from harness.files import atomic_write, sha256_file

if TYPE_CHECKING:
    from harness.data.tokenizer import Tokenizer

FORMAT_VERSION = 1
TOKEN_DTYPE = np.uint16
OFFSET_DTYPE = np.int64
_REBUILD = "run `autoresearch setup` to rebuild the token files"


class CorruptTokenFile(ValueError):
    """A token file is missing, partial or inconsistent; `autoresearch setup` rebuilds it."""


def _path(prefix: Path, ext: str) -> Path:
    prefix = Path(prefix)
    return prefix.with_name(prefix.name + ext)


@dataclass
class TokenFile:
    """Memory-mapped tokens of a document stream, in document order."""

    prefix: Path
    tokens: np.memmap  # uint16, flat
    offsets: np.ndarray  # int64, num_docs + 1 document starts
    meta: dict = field(default_factory=dict)

    @property
    def num_docs(self) -> int:
        return len(self.offsets) - 1

    @property
    def num_tokens(self) -> int:
        return int(self.offsets[-1])

    @property
    def bos_id(self) -> int:
        return int(self.meta["bos_id"])

    @property
    def vocab_size(self) -> int:
        return int(self.meta["vocab_size"])

    def doc(self, i: int) -> np.ndarray:
        """Tokens of document `i` (a view; starts with BOS)."""
        if not -self.num_docs <= i < self.num_docs:
            raise IndexError(f"document {i} out of range ({self.num_docs} documents)")
        i %= self.num_docs
        return self.tokens[self.offsets[i] : self.offsets[i + 1]]

    @classmethod
    def open(cls, prefix: Path, verify: bool = False) -> "TokenFile":
        """Open and validate `<prefix>.{bin,idx,json}`; raises `CorruptTokenFile` when anything is
        missing or inconsistent. `verify` also checks the checksums and every document's BOS."""
        prefix = Path(prefix)
        meta_path, bin_path, idx_path = (_path(prefix, e) for e in (".json", ".bin", ".idx"))
        for path in (meta_path, bin_path, idx_path):
            if not path.is_file():
                raise CorruptTokenFile(f"{path} is missing (an interrupted write?); {_REBUILD}")
        try:
            meta = json.loads(meta_path.read_text())
            num_docs, num_tokens = int(meta["num_docs"]), int(meta["num_tokens"])
            if meta.get("version") != FORMAT_VERSION:
                raise ValueError(f"format version {meta.get('version')}, expected {FORMAT_VERSION}")
        except (ValueError, KeyError, TypeError) as exc:
            raise CorruptTokenFile(f"{meta_path} is unreadable ({exc}); {_REBUILD}") from exc
        itemsize = np.dtype(TOKEN_DTYPE).itemsize
        if bin_path.stat().st_size != num_tokens * itemsize:
            raise CorruptTokenFile(
                f"{bin_path} holds {bin_path.stat().st_size} bytes, expected {num_tokens * itemsize}; {_REBUILD}"
            )
        if idx_path.stat().st_size != (num_docs + 1) * 8:
            raise CorruptTokenFile(
                f"{idx_path} holds {idx_path.stat().st_size} bytes, expected {(num_docs + 1) * 8}; {_REBUILD}"
            )
        if num_docs < 1 or num_tokens < 1:
            raise CorruptTokenFile(f"{meta_path} records an empty token file; {_REBUILD}")
        tokens = np.memmap(bin_path, dtype=TOKEN_DTYPE, mode="r")
        offsets = np.fromfile(idx_path, dtype=OFFSET_DTYPE)
        # Every document is non-empty (it has its BOS), so offsets rise strictly from 0 to the end.
        if offsets[0] != 0 or offsets[-1] != num_tokens or not np.all(offsets[1:] > offsets[:-1]):
            raise CorruptTokenFile(f"{idx_path}: document offsets are not increasing from 0 to {num_tokens}; {_REBUILD}")
        if verify:
            for path, key in ((bin_path, "bin_sha256"), (idx_path, "idx_sha256")):
                if sha256_file(path) != meta.get(key):
                    raise CorruptTokenFile(f"{path}: checksum mismatch; {_REBUILD}")
            starts = tokens[offsets[:-1]]
            if not np.all(starts == meta["bos_id"]):
                bad = int(np.argmax(starts != meta["bos_id"]))
                raise CorruptTokenFile(f"{bin_path}: document {bad} does not start with BOS; {_REBUILD}")
        return cls(prefix=prefix, tokens=tokens, offsets=offsets, meta=meta)


class TokenFileWriter:
    """Append documents' tokens, then `commit()`: written to temporary files, renamed into place,
    the `.json` (the commit marker) last. Use as a context manager: an error removes the temporaries."""

    def __init__(self, prefix: Path, *, bos_id: int, vocab_size: int, tokenizer_fingerprint: str = "") -> None:
        if vocab_size > np.iinfo(TOKEN_DTYPE).max + 1:
            raise ValueError(f"vocab_size {vocab_size} does not fit uint16 token files (max 65536)")
        self.prefix = Path(prefix)
        self.prefix.parent.mkdir(parents=True, exist_ok=True)
        self.meta = {"bos_id": int(bos_id), "vocab_size": int(vocab_size), "tokenizer": tokenizer_fingerprint}
        _path(self.prefix, ".json").unlink(missing_ok=True)  # an old file stops being valid now
        self._bin_tmp = _path(self.prefix, ".bin.tmp")
        self._bin = open(self._bin_tmp, "wb")
        self._hash = hashlib.sha256()
        self._lengths: list[np.ndarray] = []
        self.num_docs = 0
        self.num_tokens = 0

    def add(self, docs: Sequence[Sequence[int]]) -> None:
        """Append documents given as token id lists (each must start with BOS)."""
        lengths = np.fromiter(map(len, docs), dtype=OFFSET_DTYPE, count=len(docs))
        flat = np.fromiter(itertools.chain.from_iterable(docs), dtype=TOKEN_DTYPE, count=int(lengths.sum()))
        self.add_flat(flat, lengths)

    def add_flat(self, tokens: np.ndarray, lengths: np.ndarray) -> None:
        """Append documents given as one flat token array and their lengths."""
        lengths = np.asarray(lengths, dtype=OFFSET_DTYPE)
        if len(lengths) == 0:
            return
        if np.any(lengths < 1) or int(lengths.sum()) != len(tokens):
            raise ValueError("every document needs at least its BOS token, and lengths must sum to len(tokens)")
        if np.any(np.asarray(tokens) >= self.meta["vocab_size"]):
            raise ValueError(f"token id >= vocab_size {self.meta['vocab_size']}")
        starts = np.concatenate(([0], np.cumsum(lengths)[:-1]))
        if np.any(np.asarray(tokens)[starts] != self.meta["bos_id"]):
            raise ValueError(f"every document must start with BOS ({self.meta['bos_id']})")
        data = np.ascontiguousarray(tokens, dtype=TOKEN_DTYPE).tobytes()
        self._bin.write(data)
        self._hash.update(data)
        self._lengths.append(lengths)
        self.num_docs += len(lengths)
        self.num_tokens += len(tokens)

    def commit(self) -> TokenFile:
        if self.num_docs == 0:
            self.abort()
            raise ValueError(f"no documents to write to {self.prefix}: the data source is empty")
        self._bin.flush()
        os.fsync(self._bin.fileno())
        self._bin.close()
        offsets = np.zeros(self.num_docs + 1, dtype=OFFSET_DTYPE)
        np.cumsum(np.concatenate(self._lengths), out=offsets[1:])
        idx_bytes = offsets.tobytes()
        atomic_write(_path(self.prefix, ".idx"), idx_bytes)
        os.replace(self._bin_tmp, _path(self.prefix, ".bin"))
        self.meta.update(
            version=FORMAT_VERSION,
            num_docs=self.num_docs,
            num_tokens=self.num_tokens,
            dtype="uint16",
            bin_sha256=self._hash.hexdigest(),
            idx_sha256=hashlib.sha256(idx_bytes).hexdigest(),
        )
        atomic_write(_path(self.prefix, ".json"), json.dumps(self.meta, indent=2).encode())
        return TokenFile.open(self.prefix)

    def abort(self) -> None:
        if not self._bin.closed:
            self._bin.close()
        self._bin_tmp.unlink(missing_ok=True)

    def __enter__(self) -> "TokenFileWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()


def write_token_file(
    docs: Iterable[str],
    tokenizer: "Tokenizer",
    prefix: Path,
    progress: bool = True,
    *,
    total: int | None = None,
    chunk_docs: int = 16384,
    num_threads: int | None = None,
) -> TokenFile:
    """Tokenize every document once (tiktoken batches on all cores) into `<prefix>.{bin,idx,json}`.
    `total` (documents, if known) sizes the progress bar, shown on stderr."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    columns = [TextColumn("[bold]tokenizing[/] {task.description}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("docs · {task.fields[tokens]} tokens · {task.fields[rate]}"), TimeElapsedColumn()]
    bar = Progress(*columns, console=Console(stderr=True), disable=not progress, transient=False)
    t0 = time.perf_counter()
    with bar, TokenFileWriter(
        prefix, bos_id=tokenizer.bos_id, vocab_size=tokenizer.vocab_size, tokenizer_fingerprint=tokenizer.fingerprint
    ) as writer:
        task = bar.add_task(Path(prefix).name, total=total, tokens="0", rate="")
        iterator = iter(docs)
        while chunk := list(itertools.islice(iterator, chunk_docs)):
            writer.add(tokenizer.encode_batch(chunk, num_threads=num_threads))
            rate = writer.num_tokens / max(time.perf_counter() - t0, 1e-9)
            bar.update(task, advance=len(chunk), tokens=f"{writer.num_tokens:,}", rate=f"{rate / 1e6:.2f} M tok/s")
        return writer.commit()
