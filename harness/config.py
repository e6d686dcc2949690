"""The configuration a run is scored under: evaluator constants plus what `setup` produced.

`RunConfig` is written by `autoresearch setup` as JSON in the state folder and read by every
trainer through `harness.scoring.context`. Everything in it is frozen for a session.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from harness.files import atomic_write_text
from harness.paths import repo_root, state_dir

CONFIG_ENV = "AUTORESEARCH_CONFIG"


@dataclass(frozen=True)
class EvaluatorConstants:
    """The constants that define what a score means. Changing one starts a new comparison track."""

    MAX_SEQ_LEN: int
    EVAL_TOKENS: int
    TIME_BUDGET: float
    VOCAB_SIZE: int
    DATA_SOURCE: str
    EVAL_BATCH_SIZE: int
    BASELINE_REPEATS: int

    def __post_init__(self) -> None:
        if self.EVAL_TOKENS % self.MAX_SEQ_LEN:
            raise ValueError(
                f"EVAL_TOKENS ({self.EVAL_TOKENS}) must be a multiple of MAX_SEQ_LEN ({self.MAX_SEQ_LEN})"
            )

    @property
    def eval_rows(self) -> int:
        return self.EVAL_TOKENS // self.MAX_SEQ_LEN


@dataclass(frozen=True)
class RunConfig:
    """What `setup` chose and built; the trainer and the evaluator read it, nobody edits it."""

    backend: str
    device: str
    preset: str
    evaluator: EvaluatorConstants
    data_dir: str
    tokenizer_dir: str
    tokens_dir: str
    unigram_bpb: float
    reasons: dict[str, str] = field(default_factory=dict)
    val_file: str = ""  # the validation parquet shard ("" in configs written before it was recorded)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict) -> "RunConfig":
        data = dict(data)
        data["evaluator"] = EvaluatorConstants(**data["evaluator"])
        return cls(**data)


def default_config_path(root: Path | None = None) -> Path:
    return state_dir(root or repo_root()) / "setup.json"


def save_config(config: RunConfig, path: Path) -> None:
    atomic_write_text(path, config.to_json())


def load_config(path: Path | None = None) -> RunConfig:
    """Load the run config: `AUTORESEARCH_CONFIG`, else the repository's setup config."""
    if path is None:
        env = os.environ.get(CONFIG_ENV)
        path = Path(env) if env else default_config_path()
    if not path.is_file():
        raise FileNotFoundError(
            f"no run configuration at {path}: run `autoresearch setup` first"
        )
    return RunConfig.from_dict(json.loads(path.read_text()))
