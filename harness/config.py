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


# The valid range of each numeric evaluator constant: (low, high, unit). A value outside it is
# refused where it enters (`setup --set`, a preset file), never saved and then trained on.
CONSTANT_RANGES: dict[str, tuple[float, float, str]] = {
    "MAX_SEQ_LEN": (16, 131072, "tokens"),
    "EVAL_TOKENS": (16, 10**10, "tokens"),
    "TIME_BUDGET": (1, 86400, "seconds"),
    "VOCAB_SIZE": (260, 65536, "tokens"),
    "EVAL_BATCH_SIZE": (1, 4096, "rows"),
    "BASELINE_REPEATS": (1, 100, "runs"),
    "HOLDOUT_TOKENS": (0, 10**10, "tokens"),
    "WARMUP_ALLOWANCE": (0, 3600, "seconds"),
}


@dataclass(frozen=True)
class EvaluatorConstants:
    """The constants that define what a score means. Changing one starts a new comparison track.

    HOLDOUT_TOKENS sizes the holdout the evaluator scores beside validation and nobody else sees
    (0: none, as in setups made before it existed). WARMUP_ALLOWANCE is the wall time, beyond
    TIME_BUDGET, that the runner grants a trainer from spawn to its exported model (start-up,
    compilation, the uncharged warm-up steps, the export); past it the run is over budget."""

    MAX_SEQ_LEN: int
    EVAL_TOKENS: int
    TIME_BUDGET: float
    VOCAB_SIZE: int
    DATA_SOURCE: str
    EVAL_BATCH_SIZE: int
    BASELINE_REPEATS: int
    HOLDOUT_TOKENS: int = 0
    WARMUP_ALLOWANCE: float = 60.0

    def __post_init__(self) -> None:
        for name, (low, high, unit) in CONSTANT_RANGES.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
                raise ValueError(f"{name} must be between {low:g} and {high:g} {unit}, got {value!r}")
        if not self.DATA_SOURCE:
            raise ValueError("DATA_SOURCE must name a data source, got an empty string")
        for name in ("EVAL_TOKENS", "HOLDOUT_TOKENS"):
            if getattr(self, name) % self.MAX_SEQ_LEN:
                raise ValueError(
                    f"{name} ({getattr(self, name)}) must be a multiple of MAX_SEQ_LEN ({self.MAX_SEQ_LEN})"
                )

    @property
    def eval_rows(self) -> int:
        return self.EVAL_TOKENS // self.MAX_SEQ_LEN

    @property
    def holdout_rows(self) -> int:
        return self.HOLDOUT_TOKENS // self.MAX_SEQ_LEN


@dataclass(frozen=True)
class RunConfig:
    """What `setup` chose and built, as the trainer sees it: the training tokens, never the
    evaluator's data (that lives where `harness.scoring.evalset` points). Nobody edits it."""

    backend: str
    device: str
    preset: str
    evaluator: EvaluatorConstants
    data_dir: str
    tokenizer_dir: str
    tokens_dir: str
    unigram_bpb: float
    reasons: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict) -> "RunConfig":
        data = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}  # older configs named more
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
