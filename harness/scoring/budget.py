"""The trainer's clock and the summary block.

The clock charges wall time after the first `untimed_steps` steps (compilation and warm-up), and
schedules read `progress`, stopping reads `done`. It is the trainer's own clock, so it only shapes
the run: the runner holds the budget (`harness.scoring.runner`), and stops a trainer that is still
running TIME_BUDGET + WARMUP_ALLOWANCE seconds after it was started. `deadline` is that moment,
less a reserve for exporting the model: when the warm-up ends late, the charged budget shrinks so
that the schedules still finish before it, and `done` turns true at the deadline whatever the
step count.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import IO, Callable

UNTIMED_STEPS = 10  # a trainer that does not compile sets ctx.budget.untimed_steps = 1
EXPORT_RESERVE_S = 3.0  # wall time kept back before the deadline for exporting the model


@dataclass
class Budget:
    """Wall-clock training budget. Call `start_step()` and `end_step(tokens)` around each
    optimizer step, after synchronising the device (asynchronous devices would otherwise
    be charged too little)."""

    time_budget: float
    untimed_steps: int = UNTIMED_STEPS
    deadline: float | None = None  # epoch seconds by which the model must be exported
    clock: Callable[[], float] = time.perf_counter
    wall: Callable[[], float] = time.time
    curve: IO[str] | None = None  # the training curve, one JSON line per step
    step: int = 0
    training_seconds: float = 0.0
    timed_tokens: int = 0
    total_tokens: int = 0
    charged_budget: float = field(default=0.0, init=False)  # time_budget, or less when the warm-up ran late
    last_step_seconds: float = field(default=0.0, init=False)
    _t0: float | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self.charged_budget = self.time_budget

    def start_step(self) -> None:
        self._t0 = self.clock()

    def end_step(self, tokens: int, loss: float | None = None, lrm: float | None = None) -> float:
        """Close the step begun by `start_step`; returns its duration in seconds. `loss` and the
        learning-rate multiplier `lrm` go into the training curve."""
        if self._t0 is None:
            raise RuntimeError("Budget.end_step() called without start_step()")
        dt = self.clock() - self._t0
        self._t0 = None
        self.last_step_seconds = dt
        if self.step >= self.untimed_steps:
            self.training_seconds += dt
            self.timed_tokens += tokens
        self.total_tokens += tokens
        self.step += 1
        if self.step == self.untimed_steps and self.deadline is not None:
            left = self.deadline - self.wall()
            if left < self.time_budget:
                self.charged_budget = max(left, 0.0)
                print(f"\nnote: start-up and warm-up used the allowance; training gets {self.charged_budget:.1f} s "
                      f"instead of TIME_BUDGET {self.time_budget:g} s", flush=True)
        if self.curve is not None:
            record = {"step": self.step - 1, "seconds": round(dt, 6), "tokens": tokens,
                      "tokens_per_sec": round(tokens / dt, 1) if dt > 0 else None,
                      "loss": loss, "lrm": lrm, "timed": self.step > self.untimed_steps}
            self.curve.write(json.dumps(record) + "\n")
        return dt

    @property
    def timed_steps(self) -> int:
        return max(0, self.step - self.untimed_steps)

    @property
    def progress(self) -> float:
        """Fraction of the budget spent, in [0, 1]; 0 during the untimed steps."""
        if self.charged_budget <= 0:
            return 1.0
        return min(self.training_seconds / self.charged_budget, 1.0)

    @property
    def done(self) -> bool:
        """The budget is spent, or the next step would end past the deadline."""
        if self.deadline is not None and self.wall() + self.last_step_seconds >= self.deadline:
            return True
        return self.step > self.untimed_steps and self.training_seconds >= self.charged_budget

    @property
    def remaining_seconds(self) -> float:
        return max(0.0, self.charged_budget - self.training_seconds)

    @property
    def tokens_per_sec(self) -> float:
        return self.timed_tokens / self.training_seconds if self.training_seconds > 0 else 0.0


# Upstream-compatible keys first (grep "^val_bpb:" keeps working), then ours.
SUMMARY_KEYS = (
    "val_bpb", "training_seconds", "total_seconds", "peak_vram_mb", "mfu_percent",
    "total_tokens_M", "num_steps", "num_params_M", "depth",
    "backend", "device", "preset", "eval_tokens", "tokens_per_sec", "unigram_bpb", "energy_j", "mean_watts",
)
OPTIONAL_KEYS = ("energy_j", "mean_watts")  # printed only where measured (a GPU with an energy counter)
_FORMATS = {
    "val_bpb": "{:.6f}", "unigram_bpb": "{:.6f}", "training_seconds": "{:.1f}",
    "total_seconds": "{:.1f}", "peak_vram_mb": "{:.1f}", "mfu_percent": "{:.2f}",
    "total_tokens_M": "{:.1f}", "num_params_M": "{:.1f}", "tokens_per_sec": "{:.0f}",
    "energy_j": "{:.0f}", "mean_watts": "{:.0f}",
}


def format_summary(values: dict) -> str:
    """The block printed after `---`: `key: value` lines, key and colon padded to 18 columns."""
    lines = ["---"]
    for key in SUMMARY_KEYS:
        value = values.get(key)
        if value is None and key in OPTIONAL_KEYS:
            continue
        if value is None:
            text = "unknown"
        elif key in _FORMATS:
            text = _FORMATS[key].format(value)
        else:
            text = str(value)
        if key == "peak_vram_mb" and value is not None and str(values.get("device", "")).startswith("cpu"):
            text += "  (process RSS: a CPU has no device memory)"  # the number stays the 2nd field
        lines.append(f"{key + ':':<18}{text}")
    return "\n".join(lines)
