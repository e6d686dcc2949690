"""The training clock and the summary block.

The clock charges wall time only after the first `UNTIMED_STEPS` steps, so that compilation and
warm-up are not charged to the budget; schedules read `progress`, stopping reads `done`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

UNTIMED_STEPS = 10


@dataclass
class Budget:
    """Wall-clock training budget. Call `start_step()` and `end_step(tokens)` around each
    optimizer step, after synchronising the device (asynchronous devices would otherwise
    be charged too little)."""

    time_budget: float
    untimed_steps: int = UNTIMED_STEPS
    clock: Callable[[], float] = time.perf_counter
    step: int = 0
    training_seconds: float = 0.0
    timed_tokens: int = 0
    total_tokens: int = 0
    _t0: float | None = field(default=None, repr=False)

    def start_step(self) -> None:
        self._t0 = self.clock()

    def end_step(self, tokens: int) -> float:
        """Close the step begun by `start_step`; returns its duration in seconds."""
        if self._t0 is None:
            raise RuntimeError("Budget.end_step() called without start_step()")
        dt = self.clock() - self._t0
        self._t0 = None
        if self.step >= self.untimed_steps:
            self.training_seconds += dt
            self.timed_tokens += tokens
        self.total_tokens += tokens
        self.step += 1
        return dt

    @property
    def timed_steps(self) -> int:
        return max(0, self.step - self.untimed_steps)

    @property
    def progress(self) -> float:
        """Fraction of the budget spent, in [0, 1]; 0 during the untimed steps."""
        if self.time_budget <= 0:
            return 1.0
        return min(self.training_seconds / self.time_budget, 1.0)

    @property
    def done(self) -> bool:
        return self.step > self.untimed_steps and self.training_seconds >= self.time_budget

    @property
    def remaining_seconds(self) -> float:
        return max(0.0, self.time_budget - self.training_seconds)

    @property
    def tokens_per_sec(self) -> float:
        return self.timed_tokens / self.training_seconds if self.training_seconds > 0 else 0.0


# Upstream-compatible keys first (grep "^val_bpb:" keeps working), then ours.
SUMMARY_KEYS = (
    "val_bpb", "training_seconds", "total_seconds", "peak_vram_mb", "mfu_percent",
    "total_tokens_M", "num_steps", "num_params_M", "depth",
    "backend", "device", "preset", "eval_tokens", "tokens_per_sec", "unigram_bpb",
)
_FORMATS = {
    "val_bpb": "{:.6f}", "unigram_bpb": "{:.6f}", "training_seconds": "{:.1f}",
    "total_seconds": "{:.1f}", "peak_vram_mb": "{:.1f}", "mfu_percent": "{:.2f}",
    "total_tokens_M": "{:.1f}", "num_params_M": "{:.1f}", "tokens_per_sec": "{:.0f}",
}


def format_summary(values: dict) -> str:
    """The block printed after `---`: `key: value` lines, key and colon padded to 18 columns."""
    lines = ["---"]
    for key in SUMMARY_KEYS:
        value = values.get(key)
        if value is None:
            text = "unknown"
        elif key in _FORMATS:
            text = _FORMATS[key].format(value)
        else:
            text = str(value)
        lines.append(f"{key + ':':<18}{text}")
    return "\n".join(lines)
