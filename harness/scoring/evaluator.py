"""The evaluator process: loads an exported model and scores it. Nothing the trainer runs is here.

Started by `harness.scoring.evaluator_process` as `python -I -B -c BOOTSTRAP ROOT ...`: isolated
mode (no user site, no PYTHONPATH, no current folder), no bytecode written, this repository's own
harness compiled from source (never from a planted `.pyc`), and a clean environment. It imports
only the harness's scoring modules, numpy and the framework; never the trainer.

It keeps the evaluation set resident (the rows of every stream, the token byte table) and answers
requests, one JSON object per line on stdin, with one JSON line each on the result channel (its
original stdout; anything a library prints goes to stderr):

    {"artifact": DIR, "seed": N}  ->  {"ok": true, "val_bpb": ..., "holdout_bpb": ..., ...}
                                      or {"ok": false, "kind": ..., "reason": ...}
    {"speed": {"slowdown": 1.0}}  ->  {"ok": true, "speed": {...}}  (harness.scoring.speed: the
                                      machine's speed, read before and after every run)

For each artifact: the artifact is checked and loaded (`harness.scoring.artifact`); validation is
scored over exactly its scored rows with causality probes interleaved (`score_stream`); the holdout
likewise; canary rows are scored apart, and a model that predicts them better than chance allows
is a validation leak (`harness.scoring.canaries`).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import numpy as np

from harness.scoring.artifact import ArtifactError, load_forward
from harness.scoring.canaries import canary_score
from harness.scoring.evalset import EvalSet
from harness.scoring.evaluate import CausalityError, EvaluationError, eval_batch, score_stream
from harness.scoring.speed import measure_speed

# Failure kinds, as the runner maps them: "leak" is a rejected experiment, the rest are crashes.
ARTIFACT, CAUSALITY, EVALUATION, LEAK, ERROR = "artifact", "causality", "evaluation", "leak", "error"


@dataclass
class ResidentSet:
    """An evaluation set held in memory between requests."""

    eval_set: EvalSet
    rows: dict[str, np.ndarray]
    token_bytes: np.ndarray
    max_batch_size: int

    @classmethod
    def load(cls, directory: Path, max_batch_size: int) -> "ResidentSet":
        eval_set = EvalSet.load(directory)
        rows = {name: eval_set.rows(name) for name in eval_set.streams}
        return cls(eval_set, rows, eval_set.token_bytes(), max_batch_size)


def evaluate_artifact(resident: ResidentSet, artifact: Path, device: str, seed: int) -> dict:
    """Score one artifact; never raises for a bad model (that is a result, not an error)."""
    start = time.perf_counter()
    eval_set = resident.eval_set
    try:
        framework = json.loads((Path(artifact) / "meta.json").read_text(encoding="utf-8")).get("framework", "torch")
    except (OSError, ValueError):
        framework = "torch"  # load_forward reports what is wrong with the artifact
    batch = eval_batch(eval_set.seq_len, eval_set.vocab_size, resident.max_batch_size, framework=framework, device=device)
    try:
        forward, meta = load_forward(Path(artifact), device, (batch, eval_set.seq_len))
        scores = {}
        for index, (name, stream) in enumerate(eval_set.streams.items()):
            scores[name] = score_stream(
                forward, resident.rows[name], resident.token_bytes, framework=meta.framework, device=device,
                batch=batch, canary_rows=stream.canary_rows,
                probe_seed=seed + index if name == "val" else None,  # causality is the model's: probed once
            )
    except ArtifactError as exc:
        return _failure(ARTIFACT, f"the exported model was refused: {exc}", start)
    except CausalityError as exc:
        return _failure(CAUSALITY, str(exc), start)
    except EvaluationError as exc:
        return _failure(EVALUATION, str(exc), start)
    finally:
        _release(framework)

    canaries = {name: canary_score(s.canary_nats, s.canary_targets, eval_set.streams[name].canary_pool,
                                   s.canary_bytes) for name, s in scores.items() if s.canary_targets}
    result = {
        "ok": True,
        "val_bpb": scores["val"].bpb,
        "holdout_bpb": scores["holdout"].bpb if "holdout" in scores else None,
        "eval_tokens": scores["val"].tokens,
        "holdout_tokens": scores["holdout"].tokens if "holdout" in scores else 0,
        "canaries": {name: c.to_dict() for name, c in canaries.items()},
        "probe": {"seed": seed, "rows": scores["val"].probed_rows},
        "framework": meta.framework,
        "batch": batch,
    }
    leaked = [(name, c) for name, c in canaries.items() if c.leaked]
    if leaked:
        name, worst = max(leaked, key=lambda item: item[1].saved_bits)
        where = "validation" if name == "val" else name
        result.update(ok=False, kind=LEAK, reason=(
            f"validation leak: the model predicts the secret canary rows planted in the {where} data "
            f"{worst.saved_bits:.0f} bits better than any model that never read them can (canary bpb "
            f"{worst.bpb:.3f}, chance {worst.chance_bpb:.3f}): it was trained on the evaluator's files"))
    result.update(seconds=round(time.perf_counter() - start, 3), peak_memory_mb=_peak_memory_mb(framework))
    return result


def _failure(kind: str, reason: str, start: float) -> dict:
    return {"ok": False, "kind": kind, "reason": reason, "seconds": round(time.perf_counter() - start, 3)}


def _release(framework: str) -> None:
    """Give back accelerator memory, so the next trainer gets the device whole."""
    gc.collect()
    if framework == "torch" and "torch" in sys.modules:
        torch = sys.modules["torch"]
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.empty_cache()
    elif framework == "mlx" and "mlx.core" in sys.modules:
        mx = sys.modules["mlx.core"]
        clear = getattr(mx, "clear_cache", None)
        if clear is not None:
            clear()


def _peak_memory_mb(framework: str) -> float:
    if framework == "torch" and "torch" in sys.modules:
        torch = sys.modules["torch"]
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            return torch.cuda.max_memory_allocated() / 2**20
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**20


def _undumpable() -> None:
    """Linux: no other process of this user may attach to this one or write its memory
    (/proc/PID/mem, ptrace), so a trainer cannot reach into a warm evaluator."""
    if sys.platform.startswith("linux"):
        import ctypes

        PR_SET_DUMPABLE = 4
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_DUMPABLE, 0, 0, 0, 0)


def serve(resident: ResidentSet, device: str, framework: str, requests: IO[str], results: IO[str]) -> None:
    """Answer requests until stdin closes."""
    for line in requests:
        if not line.strip():
            continue
        try:
            request = json.loads(line)
            if "speed" in request:
                slowdown = float(request["speed"].get("slowdown", 1.0))
                reply = {"ok": True, "speed": measure_speed(framework or "torch", device, slowdown=slowdown).to_dict()}
            else:
                reply = evaluate_artifact(resident, Path(request["artifact"]), device, int(request["seed"]))
        except Exception as exc:  # noqa: BLE001 - report it, stay up for the next request
            reply = {"ok": False, "kind": ERROR, "reason": f"evaluator error: {type(exc).__name__}: {exc}"}
        results.write(json.dumps(reply) + "\n")
        results.flush()


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="autoresearch-evaluator")
    parser.add_argument("--eval-set", required=True, type=Path)
    parser.add_argument("--device", required=True)
    parser.add_argument("--max-batch-size", required=True, type=int)
    parser.add_argument("--framework", default="", help="import it now, so the first request is not charged")
    args = parser.parse_args(argv)
    _undumpable()
    results = os.fdopen(os.dup(1), "w", encoding="utf-8")
    os.dup2(2, 1)  # whatever a library prints lands in the log, never on the result channel
    resident = ResidentSet.load(args.eval_set, args.max_batch_size)
    if args.framework == "torch":
        import torch  # noqa: F401
    elif args.framework == "mlx":
        import mlx.core  # noqa: F401
    results.write(json.dumps({"ready": True, "pid": os.getpid()}) + "\n")
    results.flush()
    serve(resident, args.device, args.framework, sys.stdin, results)
