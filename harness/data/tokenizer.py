"""BPE tokenizer: trained with rustbpe, run with tiktoken, stored as plain merge ranks.

Upstream's recipe (autoresearch `prepare.py`): the GPT-4 split pattern with numbers in groups of at
most two digits, `VOCAB_SIZE - 4` byte-level BPE tokens, then 4 reserved special tokens; the first
one is BOS and starts every document. The files on disk are `tokenizer.pkl` (pattern, ranks and
specials as plain Python data, not a library object) and `token_bytes.npy` (each token's raw byte
length, the denominator of bits per byte).
"""

from __future__ import annotations

import hashlib
import os
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np

from harness.files import atomic_write

SPLIT_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"""
)
SPECIAL_TOKENS = [f"<|reserved_{i}|>" for i in range(4)]
BOS_TOKEN = SPECIAL_TOKENS[0]

TOKENIZER_FILE = "tokenizer.pkl"
TOKEN_BYTES_FILE = "token_bytes.npy"
FORMAT_VERSION = 1

# Upstream's training-text limits: documents capped at 10k characters, 1e9 characters in total.
DOC_CAP_CHARS = 10_000
MAX_TRAIN_CHARS = 1_000_000_000


class CorruptTokenizer(ValueError):
    """The tokenizer files are missing, partial or inconsistent; `autoresearch setup` rebuilds them."""


@dataclass
class Tokenizer:
    """A tiktoken encoding plus the facts the harness needs (BOS id, vocabulary size)."""

    encoding: "tiktoken.Encoding"  # noqa: F821 - imported lazily
    bos_id: int
    vocab_size: int
    fingerprint: str = field(default="")  # sha256 of tokenizer.pkl: token files record it

    def encode(self, text: str, bos: bool = True) -> list[int]:
        ids = self.encoding.encode_ordinary(text)
        return [self.bos_id, *ids] if bos else ids

    def encode_batch(self, texts: Sequence[str], num_threads: int | None = None) -> list[list[int]]:
        """Token ids of every text, each list starting with BOS, encoded on `num_threads` threads
        (default: all cores; tiktoken releases the GIL while it encodes).

        Each thread encodes a contiguous slice: tiktoken's own `encode_ordinary_batch` submits one
        task per text, and that overhead costs more than encoding a short document."""
        texts = list(texts)
        threads = min(num_threads or os.cpu_count() or 1, max(1, len(texts) // 64))
        if threads == 1:
            return self._encode_slice(texts)
        from concurrent.futures import ThreadPoolExecutor

        pieces = 4 * threads  # several slices per thread even out uneven document lengths
        bounds = [len(texts) * k // pieces for k in range(pieces + 1)]
        with ThreadPoolExecutor(threads) as pool:
            parts = pool.map(self._encode_slice, (texts[a:b] for a, b in zip(bounds, bounds[1:])))
            return [ids for part in parts for ids in part]

    def _encode_slice(self, texts: list[str]) -> list[list[int]]:
        encode, bos = self.encoding.encode_ordinary, self.bos_id
        return [[bos, *encode(text)] for text in texts]

    def decode(self, ids: Iterable[int]) -> str:
        return self.encoding.decode([int(i) for i in ids])


def capped_texts(
    texts: Iterable[str], doc_cap: int = DOC_CAP_CHARS, max_chars: int = MAX_TRAIN_CHARS
) -> Iterator[str]:
    """Upstream's training stream: each document cut to `doc_cap` characters, stop after `max_chars`."""
    total = 0
    for text in texts:
        doc = text[:doc_cap]
        total += len(doc)
        yield doc
        if total >= max_chars:
            return


def train_tokenizer(
    texts: Iterable[str],
    vocab_size: int,
    out_dir: Path,
    *,
    doc_cap: int = DOC_CAP_CHARS,
    max_chars: int = MAX_TRAIN_CHARS,
) -> Tokenizer:
    """Train BPE on `texts` with `vocab_size - 4` regular tokens, add the 4 specials (ids
    vocab_size-4 .. vocab_size-1, BOS first), write the files to `out_dir` and return it loaded."""
    import rustbpe

    num_regular = vocab_size - len(SPECIAL_TOKENS)
    if num_regular < 256:
        raise ValueError(f"VOCAB_SIZE must be at least {256 + len(SPECIAL_TOKENS)} (256 bytes + 4 specials), got {vocab_size}")
    if vocab_size > 65536:
        raise ValueError(f"VOCAB_SIZE must fit in uint16 token files (<= 65536), got {vocab_size}")
    bpe = rustbpe.Tokenizer()
    bpe.train_from_iterator(capped_texts(texts, doc_cap, max_chars), num_regular, pattern=SPLIT_PATTERN)
    ranks = {bytes(token): rank for token, rank in bpe.get_mergeable_ranks()}
    if len(ranks) != num_regular:
        raise ValueError(
            f"the training text only supports {len(ranks)} BPE tokens, fewer than the {num_regular} that "
            f"VOCAB_SIZE={vocab_size} needs: use more training text or a smaller VOCAB_SIZE"
        )
    special = {name: num_regular + i for i, name in enumerate(SPECIAL_TOKENS)}
    payload = {"version": FORMAT_VERSION, "pattern": bpe.get_pattern(), "mergeable_ranks": ranks, "special_tokens": special}

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(out_dir / TOKENIZER_FILE, pickle.dumps(payload, protocol=pickle.HIGHEST_PROTOCOL))
    atomic_write(out_dir / TOKEN_BYTES_FILE, _npy_bytes(token_byte_lengths(ranks, vocab_size)))
    tokenizer = load_tokenizer(out_dir)
    probe = "Hello world! Numbers: 123. Unicode: 你好"
    if tokenizer.decode(tokenizer.encode(probe, bos=False)) != probe:  # upstream's sanity check
        raise CorruptTokenizer(f"tokenizer in {out_dir} does not round-trip {probe!r}")
    return tokenizer


def token_byte_lengths(ranks: dict[bytes, int], vocab_size: int) -> np.ndarray:
    """Raw byte length of each token id; 0 for special tokens (ids not in the ranks).

    Uses the token's own bytes, so a token that is not valid UTF-8 on its own (a lone byte
    >= 0x80, half a character) counts its true length, not 3 bytes for U+FFFD (upstream #384)."""
    lengths = np.zeros(vocab_size, dtype=np.int32)
    for token, rank in ranks.items():
        lengths[rank] = len(token)
    return lengths


def load_tokenizer(directory: Path) -> Tokenizer:
    """Load and validate the tokenizer in `directory` (no network: the encoding is built from
    the stored ranks). Raises `CorruptTokenizer` for a missing, partial or inconsistent file."""
    import tiktoken

    directory = Path(directory)
    raw = _read_bytes(directory / TOKENIZER_FILE)
    payload = _parse_payload(directory / TOKENIZER_FILE, raw)
    ranks, special = payload["mergeable_ranks"], payload["special_tokens"]
    num_regular = len(ranks)
    vocab_size = num_regular + len(SPECIAL_TOKENS)
    if sorted(ranks.values()) != list(range(num_regular)):
        raise CorruptTokenizer(f"{directory / TOKENIZER_FILE}: token ranks are not 0..{num_regular - 1}; {_REBUILD}")
    if special != {name: num_regular + i for i, name in enumerate(SPECIAL_TOKENS)}:
        raise CorruptTokenizer(f"{directory / TOKENIZER_FILE}: unexpected special tokens {special}; {_REBUILD}")
    stored = load_token_bytes(directory)
    if stored.shape != (vocab_size,) or not np.array_equal(stored, token_byte_lengths(ranks, vocab_size)):
        raise CorruptTokenizer(f"{directory / TOKEN_BYTES_FILE} does not match {TOKENIZER_FILE}; {_REBUILD}")
    try:
        encoding = tiktoken.Encoding(
            name="autoresearch", pat_str=payload["pattern"], mergeable_ranks=ranks, special_tokens=special
        )
    except Exception as exc:  # a bad pattern or duplicate ranks
        raise CorruptTokenizer(f"{directory / TOKENIZER_FILE}: cannot build the encoding ({exc}); {_REBUILD}") from exc
    return Tokenizer(
        encoding=encoding, bos_id=special[BOS_TOKEN], vocab_size=vocab_size, fingerprint=hashlib.sha256(raw).hexdigest()
    )


def load_token_bytes(directory: Path) -> np.ndarray:
    """The int32 table of raw bytes per token id (0 for special tokens)."""
    path = Path(directory) / TOKEN_BYTES_FILE
    if not path.is_file():
        raise CorruptTokenizer(f"{path} is missing; {_REBUILD}")
    try:
        table = np.load(path, allow_pickle=False)
    except Exception as exc:  # truncated header or data
        raise CorruptTokenizer(f"{path} is unreadable ({exc}); {_REBUILD}") from exc
    if table.dtype != np.int32 or table.ndim != 1:
        raise CorruptTokenizer(f"{path}: expected a 1-D int32 array, got {table.dtype} {table.shape}; {_REBUILD}")
    return table


_REBUILD = "run `autoresearch setup` to rebuild the tokenizer"


def _read_bytes(path: Path) -> bytes:
    if not path.is_file():
        raise CorruptTokenizer(f"{path} is missing; {_REBUILD}")
    return path.read_bytes()


def _parse_payload(path: Path, raw: bytes) -> dict:
    try:
        payload = pickle.loads(raw)
    except Exception as exc:  # truncated or garbage
        raise CorruptTokenizer(f"{path} is unreadable ({type(exc).__name__}: {exc}); {_REBUILD}") from exc
    if not isinstance(payload, dict) or payload.get("version") != FORMAT_VERSION or not {
        "pattern", "mergeable_ranks", "special_tokens"
    } <= payload.keys():
        raise CorruptTokenizer(f"{path} is not an autoresearch tokenizer (format {FORMAT_VERSION}); {_REBUILD}")
    return payload


def _npy_bytes(array: np.ndarray) -> bytes:
    import io

    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()
