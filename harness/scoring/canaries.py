"""Canaries: secret random rows planted in the validation and holdout data, to catch a model that
has read the evaluator's files.

A canary is one row of the evaluation data: BOS, then T tokens drawn uniformly and independently
from a set S of m word-like tokens (" the", " model", ...), so it reads like word salad rather
than noise. Whatever a model learned without seeing a canary, its conditional probabilities form a
distribution over token sequences, so by Markov's inequality

    P(code length of the canary's T tokens <= T * log2(m) - k bits) <= 2**-k

for any model that is independent of the draw. A model that predicts the canaries more than
`LEAK_MARGIN_BITS` better than that bound has, with certainty for every practical purpose (a false
alarm has probability 2**-64), read the file they are in. Canary rows are left out of `val_bpb`
and `holdout_bpb` and scored on their own.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Sequence

import numpy as np

CANARIES_PER_STREAM = 4
LEAK_MARGIN_BITS = 64.0
MIN_WORD_TOKENS = 64  # below this many word-like tokens, any regular token may be drawn
_WORD = re.compile(rb"^ [a-z]{3,}$")


def word_tokens(token_strings: Sequence[bytes]) -> np.ndarray:
    """Ids of the tokens that decode to a space and three or more lowercase letters; all the
    regular tokens (non-empty bytes) when the vocabulary has too few of those."""
    words = [i for i, text in enumerate(token_strings) if _WORD.match(text)]
    if len(words) < MIN_WORD_TOKENS:
        words = [i for i, text in enumerate(token_strings) if text]
    return np.asarray(words, dtype=np.int64)


def canary_rows(rng: np.random.Generator, pool: np.ndarray, bos_id: int, count: int, seq_len: int) -> np.ndarray:
    """`count` rows of shape (seq_len + 1): BOS, then tokens drawn uniformly from `pool`."""
    rows = np.empty((count, seq_len + 1), dtype=np.int32)
    rows[:, 0] = bos_id
    rows[:, 1:] = rng.choice(pool, size=(count, seq_len), replace=True)
    return rows


@dataclass(frozen=True)
class CanaryScore:
    """How well a model predicted one stream's canaries, against what chance allows."""

    code_bits: float  # the model's code length for every canary target, in bits
    chance_bits: float  # num_targets * log2(pool size): no model that never read them does better
    num_bytes: int

    @property
    def saved_bits(self) -> float:
        return self.chance_bits - self.code_bits

    @property
    def leaked(self) -> bool:
        return self.saved_bits > LEAK_MARGIN_BITS

    @property
    def bpb(self) -> float:
        return self.code_bits / self.num_bytes if self.num_bytes else float("nan")

    @property
    def chance_bpb(self) -> float:
        return self.chance_bits / self.num_bytes if self.num_bytes else float("nan")

    def to_dict(self) -> dict:
        return {"bpb": self.bpb, "chance_bpb": self.chance_bpb, "saved_bits": self.saved_bits,
                "leaked": self.leaked}


def canary_score(nats: float, num_targets: int, pool_size: int, num_bytes: int) -> CanaryScore:
    return CanaryScore(code_bits=nats / math.log(2), chance_bits=num_targets * math.log2(pool_size),
                       num_bytes=num_bytes)
