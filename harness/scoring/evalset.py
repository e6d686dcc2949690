"""The evaluator's data: validation and holdout rows with their canaries, out of the trainer's reach.

`setup` writes one folder per evaluation set under `private_root()` (see `harness.data.evalset`):

    evaluator.json     this description (written last: a folder without it is unfinished)
    val_rows.npy       int32 (N + canaries, T + 1): the scored validation rows, canaries among them
    holdout_rows.npy   int32 (H + canaries, T + 1): documents of the validation shard that no
                       validation row uses, never shown to the trainer or the agent
    token_bytes.npy    int32 bytes per token id (the bpb denominator; 0 for special tokens)

The trainer's run configuration names the training tokens only; where this folder is lives in a
separate pointer (`eval_pointer_path`). Every file is loaded without pickle.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from harness.files import atomic_write_text
from harness.paths import cache_dir, state_dir

EVAL_SET_FILE = "evaluator.json"
EVAL_POINTER_FILE = "evaluator.json"  # in the repository's state folder
TOKEN_BYTES_FILE = "token_bytes.npy"
FORMAT_VERSION = 1
STREAMS = ("val", "holdout")


def private_root() -> Path:
    """Where every evaluation set lives; a confined trainer cannot read below it."""
    return cache_dir() / "private"


@dataclass(frozen=True)
class Stream:
    """One scored stream: its rows file and which of its rows are canaries."""

    rows_file: str  # relative to the evaluation set's folder
    num_rows: int  # scored rows, canaries excluded
    canary_rows: tuple[int, ...]  # row indices in the file
    canary_pool: int  # how many tokens each canary token was drawn from (harness.scoring.canaries)

    @classmethod
    def from_dict(cls, data: dict) -> "Stream":
        return cls(rows_file=data["rows_file"], num_rows=int(data["num_rows"]),
                   canary_rows=tuple(int(i) for i in data["canary_rows"]), canary_pool=int(data["canary_pool"]))


@dataclass(frozen=True)
class EvalSet:
    """What the evaluator scores, described by `evaluator.json` in `directory`."""

    directory: Path
    seq_len: int
    vocab_size: int
    bos_id: int
    streams: dict[str, Stream]
    unigram_bpb: dict[str, float] = field(default_factory=dict)
    source: dict[str, str] = field(default_factory=dict)  # what it was made from (val shard, tokenizer)

    @classmethod
    def load(cls, directory: Path) -> "EvalSet":
        directory = Path(directory)
        path = directory / EVAL_SET_FILE
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            if data.get("version") != FORMAT_VERSION:
                raise ValueError(f"format version {data.get('version')}, expected {FORMAT_VERSION}")
            return cls(directory=directory, seq_len=int(data["seq_len"]), vocab_size=int(data["vocab_size"]),
                       bos_id=int(data["bos_id"]),
                       streams={name: Stream.from_dict(s) for name, s in data["streams"].items()},
                       unigram_bpb={k: float(v) for k, v in data.get("unigram_bpb", {}).items()},
                       source=dict(data.get("source", {})))
        except FileNotFoundError:
            raise FileNotFoundError(f"no evaluation set at {directory}: run `autoresearch setup`") from None
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"{path} is unreadable ({exc}): run `autoresearch setup` to rebuild it") from None

    def save(self) -> None:
        data = asdict(self)
        data.pop("directory")
        data["version"] = FORMAT_VERSION
        atomic_write_text(self.directory / EVAL_SET_FILE, json.dumps(data, indent=1, sort_keys=True))

    def rows(self, stream: str) -> np.ndarray:
        """Every row of `stream` (canaries included), int64 (N, T + 1)."""
        path = self.directory / self.streams[stream].rows_file
        rows = np.load(path, allow_pickle=False)
        if rows.ndim != 2 or rows.shape[1] != self.seq_len + 1 or not np.issubdtype(rows.dtype, np.integer):
            raise ValueError(f"{path}: expected integer rows of {self.seq_len + 1} tokens, got {rows.dtype} {rows.shape}")
        return rows.astype(np.int64)

    def token_bytes(self) -> np.ndarray:
        table = np.load(self.directory / TOKEN_BYTES_FILE, allow_pickle=False)
        if table.ndim != 1 or not np.issubdtype(table.dtype, np.integer):
            raise ValueError(f"{self.directory / TOKEN_BYTES_FILE}: expected a 1-D integer table")
        return table.astype(np.int64)

    def files(self) -> list[Path]:
        """Every file the evaluator reads, for the session's manifest."""
        names = [EVAL_SET_FILE, TOKEN_BYTES_FILE, *(s.rows_file for s in self.streams.values())]
        return [self.directory / name for name in names]


def eval_pointer_path(root: Path) -> Path:
    return state_dir(root) / EVAL_POINTER_FILE


def save_eval_pointer(root: Path, directory: Path) -> None:
    atomic_write_text(eval_pointer_path(root), json.dumps({"eval_set": str(directory)}))


def load_eval_pointer(root: Path) -> Path:
    """The evaluation set `setup` made for this repository."""
    path = eval_pointer_path(root)
    try:
        return Path(json.loads(path.read_text(encoding="utf-8"))["eval_set"])
    except (OSError, ValueError, KeyError) as exc:
        raise FileNotFoundError(f"no evaluation set recorded at {path} ({exc}): run `autoresearch setup`") from None
