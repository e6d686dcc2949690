"""Optional: every experiment logged to trackio, a local-first experiment tracker (its runs live in
a SQLite file under TRACKIO_DIR, `~/.cache/huggingface/trackio` by default; `trackio show` opens
them). Off by default; on with `AUTORESEARCH_TRACK=trackio` and the `[track]` extra installed.

Each experiment is one trackio run in the project `autoresearch-TAG`: its training curve (loss,
tokens/s and the learning-rate multiplier per step, from the curve the harness wrote in the run's
folder), then its verdict's figures. The holdout is left out: the tracker is as readable to an
agent as the repository is.
"""

from __future__ import annotations

import json
import os
import sys
from contextlib import redirect_stdout
from pathlib import Path

from harness.scoring.context import CURVE_FILE

TRACK_ENV = "AUTORESEARCH_TRACK"
TRACKERS = ("trackio",)


def tracker() -> str | None:
    """The tracker asked for, if any (ValueError for one we do not know)."""
    name = os.environ.get(TRACK_ENV, "").strip().lower()
    if not name or name in ("0", "off", "no"):
        return None
    if name not in TRACKERS:
        raise ValueError(f"{TRACK_ENV}={name!r}: the trackers are {', '.join(TRACKERS)}")
    return name


def read_curve(run_dir: Path) -> list[dict]:
    path = run_dir / CURVE_FILE
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            continue  # a line cut by a killed trainer
    return records


def track_experiment(project: str, row, run_dir: Path | None) -> str:
    """Log one experiment (a ResultRow, and its run folder's curve) to trackio; returns what
    happened, for the log. Never raises: tracking must not cost an experiment."""
    try:
        import trackio
    except ImportError:
        return f"{TRACK_ENV}=trackio needs trackio: pip install -e '.[track]'"
    curve = read_curve(run_dir) if run_dir is not None else []
    config = {key: getattr(row, key) for key in ("commit", "status", "description", "backend", "device", "preset",
                                                 "trainer_sha", "reason")}
    final = {key: getattr(row, key) for key in ("val_bpb", "seconds", "num_steps", "tokens_per_sec", "best_bpb",
                                                "noise_sigma", "energy_j", "mean_watts")
             if isinstance(getattr(row, key), (int, float)) and getattr(row, key) is not None}
    try:
        with redirect_stdout(sys.stderr):  # stdout carries the verdict lines an agent reads
            trackio.init(project=project, name=f"{row.commit} {row.description}"[:120], config=config, embed=False)
            for record in curve:
                metrics = {k: record[k] for k in ("loss", "tokens_per_sec", "lrm") if record.get(k) is not None}
                if metrics:
                    trackio.log(metrics, step=int(record.get("step", 0)))
            if final:
                trackio.log(final, step=len(curve))
            trackio.finish()
    except Exception as exc:  # noqa: BLE001 - a tracker's failure is reported, never fatal
        return f"trackio could not log {row.commit}: {type(exc).__name__}: {exc}"
    return f"logged {row.commit} to trackio project {project} ({len(curve)} steps)"
