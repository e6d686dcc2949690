"""What the ledger says about noise: every run's score and machine speed, the repeated measurements
sigma is pooled over, the incumbent's runs, and what the verdicts cost.

A row keeps its individual runs (`runs`, `;`-separated scores) and the speed the machine ran at
before and after each (`speed`, `speed_after`, GFLOP/s from `harness.scoring.speed`). Rows of the
same trainer (its SHA-256) are one group of repeated measurements: the baseline repeats, a
candidate's confirmation run, and re-checks of the incumbent (status `recheck`). Sigma is pooled
over all of them (`loop.decide.pooled_noise`), so the estimate improves as the night goes on.
"""

from __future__ import annotations

import math
from collections import defaultdict

from loop.decide import Noise, Run, pooled_noise
from loop.results import ResultRow

MEASURED = ("baseline", "keep", "discard", "recheck")  # statuses whose runs are measurements


def encode(values: list[float | None], spec: str = ".6f") -> str:
    return ";".join("" if v is None else format(v, spec) for v in values)


def decode(text: str) -> list[float | None]:
    values: list[float | None] = []
    for part in (text or "").split(";"):
        try:
            value = float(part)
            values.append(value if math.isfinite(value) else None)
        except ValueError:
            values.append(None)
    return values if text else []


def row_runs(row: ResultRow) -> list[Run]:
    """The runs behind a row's verdict: its `runs` column, or its one score (older rows)."""
    scores = [v for v in decode(row.runs) if v is not None] or ([row.val_bpb] if row.scored else [])
    before, after = decode(row.speed), decode(row.speed_after)
    return [Run(score, before[i] if i < len(before) else None, after[i] if i < len(after) else None)
            for i, score in enumerate(scores)]


def noise(rows: list[ResultRow]) -> Noise:
    """Sigma pooled over every trainer measured more than once, and its degrees of freedom."""
    groups: dict[str, list[float]] = defaultdict(list)
    for row in rows:
        if row.status in MEASURED and row.scored and row.trainer_sha:
            groups[row.trainer_sha].extend(r.val_bpb for r in row_runs(row) if r.val_bpb is not None)
    return pooled_noise(groups.values())


def incumbent_runs(rows: list[ResultRow], trainer_sha: str) -> list[Run]:
    """Every measured run of the incumbent trainer, oldest first."""
    return [run for row in rows if row.status in MEASURED and row.scored and row.trainer_sha == trainer_sha
            for run in row_runs(row)]


def experiments_since_recheck(rows: list[ResultRow]) -> int:
    """Experiments judged since the incumbent was last re-run (a re-check, a keep or the baseline)."""
    count = 0
    for row in reversed(rows):
        if row.status in ("recheck", "keep", "baseline"):
            break
        if row.status in ("discard", "crash", "void"):
            count += 1
    return count


def runs_per_experiment(rows: list[ResultRow]) -> dict[str, float]:
    """What the verdicts cost: training runs per experiment, and the parts (confirmations, voided
    runs, re-checks of the incumbent)."""
    experiments = [r for r in rows if r.status in ("keep", "discard", "crash", "void")]
    if not experiments:
        return {"experiments": 0, "runs_per_experiment": 0.0}
    counted = sum(1 if r.status == "crash" else len(row_runs(r)) for r in experiments)
    confirmations = sum(max(len(row_runs(r)) - 1, 0) for r in experiments)
    voids = sum(r.voids or 0 for r in experiments)
    rechecks = sum(1 for r in rows if r.status == "recheck")
    n = len(experiments)
    return {"experiments": n, "runs_per_experiment": (counted + voids + rechecks) / n,
            "confirmations": confirmations / n, "voids": voids / n, "rechecks": rechecks / n}
