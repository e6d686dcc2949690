"""What a trainer gets from the harness, and what it hands back.

A trainer calls `load_context()`, trains on `ctx.train_batches(B)` while `ctx.budget` allows, then
calls `ctx.finish(forward, ...)`. The harness (not the trainer) evaluates the returned forward
function on the validation stream, prints the summary block and writes the machine-readable
result that `harness.scoring.runner` trusts. Framework code is imported only inside the adapters.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from harness.scoring.budget import Budget, format_summary
from harness.config import RunConfig, load_config
from harness.files import atomic_write_text
from harness.hardware.flops import mfu_percent

RESULT_ENV = "AUTORESEARCH_RESULT"   # where the runner wants the JSON result
NONCE_ENV = "AUTORESEARCH_RUN_NONCE"  # per-run token proving the result came from the harness
DEVICE_ENV = "AUTORESEARCH_DEVICE"    # overrides the configured device (tests use "cpu")
DIVERGED_EXIT_CODE = 3


class DivergedError(RuntimeError):
    """Training loss became NaN or exceeded the divergence threshold."""


@dataclass
class TrainingContext:
    config: RunConfig
    budget: Budget
    bos_id: int
    vocab_size: int
    t_start: float = field(default_factory=time.perf_counter)

    # -- facts the trainer reads ------------------------------------------------------------
    @property
    def MAX_SEQ_LEN(self) -> int:  # noqa: N802 - mirrors the upstream constant name
        return self.config.evaluator.MAX_SEQ_LEN

    @property
    def TIME_BUDGET(self) -> float:  # noqa: N802
        return self.config.evaluator.TIME_BUDGET

    @property
    def device(self) -> str:
        return os.environ.get(DEVICE_ENV) or self.config.device

    # -- data ------------------------------------------------------------------------------
    def train_batches(self, batch_size: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Endless (inputs, targets) int32 batches of shape (batch_size, MAX_SEQ_LEN),
        BOS-aligned best-fit packed, prepared on a background thread."""
        from harness.data.loader import train_batches
        from harness.data.tokens import TokenFile

        tokens = TokenFile.open(Path(self.config.tokens_dir) / "train")
        return train_batches(tokens, batch_size, self.MAX_SEQ_LEN)

    # -- the end of a run ----------------------------------------------------------------------
    def check_loss(self, loss: float) -> None:
        """Fast-fail on divergence: NaN, inf or a loss above 100 stops the run at once."""
        if not math.isfinite(loss) or loss > 100:
            print(f"\nFAIL: training diverged (loss {loss})", flush=True)
            sys.exit(DIVERGED_EXIT_CODE)

    def finish(
        self,
        forward: Callable[[Any], Any],
        *,
        framework: str,
        num_params: int,
        flops_per_token: float,
        depth: int,
        device_name: str,
        peak_memory_mb: Callable[[], float] | float | None = None,
    ) -> dict:
        """Evaluate `forward` (inputs -> logits of shape (B, T, V)) on exactly EVAL_TOKENS
        validation positions, print the summary, write the result. Returns the summary dict."""
        from harness.scoring.evaluate import check_causality, evaluate_bpb
        from harness.data.loader import val_rows
        from harness.data.tokenizer import load_token_bytes
        from harness.data.tokens import TokenFile

        ev = self.config.evaluator
        rows = val_rows(TokenFile.open(Path(self.config.tokens_dir) / "val"), ev.MAX_SEQ_LEN, ev.eval_rows)
        token_bytes = load_token_bytes(Path(self.config.tokenizer_dir))
        check_causality(forward, rows[:1, :-1], framework=framework, device=self.device, vocab_size=self.vocab_size)
        result = evaluate_bpb(
            forward, rows, token_bytes, framework=framework, device=self.device,
            max_batch_size=ev.EVAL_BATCH_SIZE,
        )
        peak = peak_memory_mb() if callable(peak_memory_mb) else peak_memory_mb
        b = self.budget
        summary = {
            "val_bpb": result.val_bpb,
            "training_seconds": b.training_seconds,
            "total_seconds": time.perf_counter() - self.t_start,
            "peak_vram_mb": peak,
            "mfu_percent": mfu_percent(flops_per_token, b.tokens_per_sec, device_name),
            "total_tokens_M": b.total_tokens / 1e6,
            "num_steps": b.step,
            "num_params_M": num_params / 1e6,
            "depth": depth,
            "backend": self.config.backend,
            "device": device_name,
            "preset": self.config.preset,
            "eval_tokens": result.num_tokens,
            "tokens_per_sec": b.tokens_per_sec,
            "unigram_bpb": self.config.unigram_bpb,
        }
        print("\n" + format_summary(summary), flush=True)  # ends any \r progress line
        self._write_result(summary)
        return summary

    def _write_result(self, summary: dict) -> None:
        path = os.environ.get(RESULT_ENV)
        if not path:
            return
        payload = {"nonce": os.environ.get(NONCE_ENV, ""), "summary": summary}
        atomic_write_text(Path(path), json.dumps(payload))


def load_context(config_path: Path | None = None) -> TrainingContext:
    """Build the context for one training run from the setup (or session) configuration."""
    from harness.data.tokenizer import load_tokenizer

    config = load_config(config_path)
    tokenizer = load_tokenizer(Path(config.tokenizer_dir))
    return TrainingContext(
        config=config,
        budget=Budget(time_budget=config.evaluator.TIME_BUDGET),
        bos_id=tokenizer.bos_id,
        vocab_size=tokenizer.vocab_size,
    )
