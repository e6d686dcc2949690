"""What a trainer gets from the harness, and what it hands back.

A trainer calls `load_context()`, trains on `ctx.train_batches(B)` while `ctx.budget` allows, then
calls `ctx.finish(forward, ...)`. There the harness exports the forward function to an artifact in
the run's folder (`harness.scoring.artifact`) and writes the training facts (steps, tokens, peak
memory: information, never a score); the process then exits and the runner has the artifact scored
by a separate evaluator process. The trainer's configuration names the training tokens only.

Run on its own (`python backends/cuda/train.py`, no runner), `finish` exports to a temporary folder
and starts the evaluator itself, then prints the summary, as upstream's script did.
"""

from __future__ import annotations

import json
import math
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Callable, Iterator

import numpy as np

from harness.config import RunConfig, load_config
from harness.files import atomic_write_text
from harness.scoring.budget import EXPORT_RESERVE_S, Budget

RUN_DIR_ENV = "AUTORESEARCH_RUN_DIR"  # where the runner wants the artifact, facts and curve
DEADLINE_ENV = "AUTORESEARCH_DEADLINE"  # epoch seconds: the runner stops the trainer then
DEVICE_ENV = "AUTORESEARCH_DEVICE"  # overrides the configured device (tests use "cpu")
IN_TRAINER_ENV = "AUTORESEARCH_IN_TRAINER"  # set for the trainer: session commands refuse to run in it
DIVERGED_EXIT_CODE = 3
EXPORT_FAILED_EXIT_CODE = 4
ARTIFACT_DIR = "artifact"
FACTS_FILE = "train.json"
CURVE_FILE = "curve.jsonl"


class DivergedError(RuntimeError):
    """Training loss became NaN or exceeded the divergence threshold."""


@dataclass
class TrainingContext:
    config: RunConfig
    budget: Budget
    bos_id: int
    vocab_size: int
    run_dir: Path | None = None  # None: run on its own, without the runner
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
        """Hand the model over: export `forward` (int token ids (B, T) -> logits (B, T, V), called
        with the evaluator's fixed B) and record the training facts. Returns the facts; run on
        its own, also scores the model and returns the summary."""
        from harness.scoring.artifact import ArtifactError, export_forward
        from harness.scoring.evaluate import eval_batch

        peak = peak_memory_mb() if callable(peak_memory_mb) else peak_memory_mb
        b = self.budget
        facts = {
            "framework": framework, "num_steps": b.step, "timed_steps": b.timed_steps,
            "trainer_seconds": b.training_seconds, "total_tokens": b.total_tokens,
            "tokens_per_sec": b.tokens_per_sec, "peak_memory_mb": peak, "num_params": num_params,
            "flops_per_token": flops_per_token, "depth": depth, "device_name": device_name,
        }
        run_dir = self.run_dir or Path(tempfile.mkdtemp(prefix="autoresearch-run-"))
        ev = self.config.evaluator
        batch = eval_batch(ev.MAX_SEQ_LEN, self.vocab_size, ev.EVAL_BATCH_SIZE, framework=framework, device=self.device)
        try:
            meta = export_forward(forward, framework=framework, batch=batch, seq_len=ev.MAX_SEQ_LEN,
                                  vocab_size=self.vocab_size, device=self.device, directory=run_dir / ARTIFACT_DIR)
        except ArtifactError as exc:
            print(f"\nFAIL: export: {exc}", flush=True)
            sys.exit(EXPORT_FAILED_EXIT_CODE)
        facts["export_seconds"] = meta.export_seconds
        atomic_write_text(run_dir / FACTS_FILE, json.dumps(facts))
        print(f"\nexported the model for the evaluator ({meta.export_seconds:.1f} s)", flush=True)
        if self.run_dir is None:
            return self._score_on_its_own(run_dir)
        return facts

    def _score_on_its_own(self, run_dir: Path) -> dict:
        """No runner: score the artifact with a fresh evaluator and print the summary (a
        convenience; the ratchet only trusts the runner's own evaluation)."""
        from harness.paths import repo_root
        from harness.scoring.runner import evaluate_run, format_summary

        root = Path(__file__).resolve().parents[2]
        summary, reason = evaluate_run(repo_root(root), self.config, run_dir, device=self.device,
                                       seconds=time.perf_counter() - self.t_start)
        if summary is None:
            print(f"FAIL: {reason}", flush=True)
            sys.exit(1)
        print("\n" + format_summary(summary), flush=True)
        return summary


def load_context(config_path: Path | None = None) -> TrainingContext:
    """Build the context for one training run from the setup (or session) configuration."""
    from harness.data.tokenizer import load_tokenizer

    config = load_config(config_path)
    tokenizer = load_tokenizer(Path(config.tokenizer_dir))
    run_dir = Path(os.environ[RUN_DIR_ENV]) if os.environ.get(RUN_DIR_ENV) else None
    deadline = float(os.environ[DEADLINE_ENV]) - EXPORT_RESERVE_S if os.environ.get(DEADLINE_ENV) else None
    curve: IO[str] | None = None
    if run_dir is not None:
        run_dir.mkdir(parents=True, exist_ok=True)
        curve = open(run_dir / CURVE_FILE, "a", encoding="utf-8", buffering=1)
    return TrainingContext(
        config=config,
        budget=Budget(time_budget=config.evaluator.TIME_BUDGET, deadline=deadline, curve=curve),
        bos_id=tokenizer.bos_id,
        vocab_size=tokenizer.vocab_size,
        run_dir=run_dir,
    )
