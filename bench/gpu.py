"""The CUDA path at full speed, measured on one NVIDIA GPU for the h100 preset: for each attention
path (FA3, FA4, compiled flex_attention, SDPA) tokens/s, MFU, peak memory, compile seconds (first
and cached), per-experiment overhead and joules, under upstream's published H100 line.

    autoresearch setup --preset h100 --data builtin --set TIME_BUDGET=60   # builtin data: offline
    python bench/gpu.py [--paths fa3,fa4,flex,sdpa] [--timeout 900] [--json]

Each path is two real experiments through `autoresearch run --json` (what a user runs), with
AUTORESEARCH_ATTENTION naming the path and the compile caches of
`harness.hardware.platform.compile_cache_env` in a fresh folder: the first run compiles cold, the
second finds the caches. The figures are the run's own summary; compile seconds come from when the
trainer's log lines appear (model forward+backward, between "Estimated FLOPs" and "Time budget"),
plus the first step's excess over the median step (the compiled optimizer); overhead is the runner's
spawn-to-verdict seconds minus TIME_BUDGET; joules are the GPU's energy counter around each run.
A path whose kernel does not load or fails its test call is reported with the reason the trainer
printed. Without a CUDA device it prints "no CUDA device: nothing to measure" and exits 0.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from harness.hardware.energy import EnergyMeter  # noqa: E402
from harness.hardware.platform import ATTENTION_CHOICES, ATTENTION_ENV, compile_cache_env  # noqa: E402

# Upstream's H100 run (reference/upstream.md, section 5): FA3, 300 s budget, 325.9 s total.
UPSTREAM = {"tokens_per_sec": 1.65e6, "mfu_percent": 39.8, "peak_vram_mb": 45060.2, "overhead_s": 26.0}
TARGET = "target (issue 14): MFU >= 45 %, overhead <= 10 s, never below 1.65 M tokens/s"
MARKERS = ("Estimated FLOPs per token", "Time budget:")
USED = {"fa3": ("attention", "FA3"), "fa4": ("attention", "FA4"), "flex": ("windows", "flex_attention"),
        "sdpa": ("attention", "SDPA")}


@dataclass
class Run:
    status: str
    reason: str
    seconds: float | None = None
    summary: dict = field(default_factory=dict)
    compile_s: float | None = None
    joules: float | None = None
    platform: dict = field(default_factory=dict)  # "attention" / "windows" -> the trainer's line


def watch_log(log: Path, seen: dict[str, float], stop: threading.Event) -> None:
    """Note when each marker line first appears in the trainer's log (a 0.2 s resolution)."""
    while not stop.is_set():
        try:
            text = log.read_text(errors="replace")
        except OSError:
            text = ""
        for marker in MARKERS:
            if marker in text and marker not in seen:
                seen[marker] = time.monotonic()
        stop.wait(0.2)


def platform_lines(text: str) -> dict:
    found = {}
    for key in ("attention", "windows"):
        match = re.search(rf"^\s+{key}:\s+(.*)$", text, re.MULTILINE)
        if match:
            found[key] = match.group(1).strip()
    return found


def optimizer_compile_seconds(text: str) -> float:
    """The first step's time beyond the median of the next ones: the compiled optimizer steps."""
    dts = {int(step): int(ms) / 1000 for step, ms in re.findall(r"step (\d+) .*?dt: (\d+)ms", text)}
    later = [dts[s] for s in sorted(dts) if s >= 1][:9]
    return max(0.0, dts[0] - statistics.median(later)) if 0 in dts and later else 0.0


def run_once(path: str, cache: Path, log: Path, timeout: float, meter: EnergyMeter | None) -> Run:
    env = {**os.environ, ATTENTION_ENV: path, **compile_cache_env(cache)}
    seen: dict[str, float] = {}
    stop = threading.Event()
    watcher = threading.Thread(target=watch_log, args=(log, seen, stop), daemon=True)
    log.unlink(missing_ok=True)
    watcher.start()
    before = meter.read_joules() if meter else None
    done = subprocess.run([sys.executable, "-m", "autoresearch", "run", "--json", "--log", str(log),
                           "--timeout", str(timeout)], cwd=ROOT, env=env, capture_output=True, text=True)
    joules = meter.read_joules() - before if meter else None
    stop.set()
    watcher.join()
    try:
        reply = json.loads(done.stdout)
    except json.JSONDecodeError:
        return Run("error", f"autoresearch run exited {done.returncode}: {done.stderr.strip()[-300:]}")
    text = log.read_text(errors="replace") if log.exists() else ""
    run = Run(reply["status"], reply["reason"], reply.get("seconds"), reply.get("summary") or {},
              joules=joules, platform=platform_lines(text))
    if all(m in seen for m in MARKERS):
        run.compile_s = seen[MARKERS[1]] - seen[MARKERS[0]] + optimizer_compile_seconds(text)
    return run


def measure(path: str, timeout: float, meter: EnergyMeter | None, logs: Path) -> dict:
    with tempfile.TemporaryDirectory(prefix=f"autoresearch-bench-{path}-") as cache:
        cold = run_once(path, Path(cache), logs / f"{path}-cold.log", timeout, meter)
        where, name = USED[path]
        used = cold.platform.get(where, "")
        if cold.platform and f"{ATTENTION_ENV}={path}" not in cold.platform.get("attention", ""):
            why = (f"{ATTENTION_ENV} did not reach the trainer (does the runner pass it through?); "
                   f"it ran: {cold.platform.get('attention')}")
            return {"path": path, "available": False, "why": why, "cold": asdict(cold)}
        if cold.status == "ok" and not used.startswith(name):
            return {"path": path, "available": False, "why": cold.platform.get("attention", used), "cold": asdict(cold)}
        cached = run_once(path, Path(cache), logs / f"{path}-cached.log", timeout, meter) if cold.status == "ok" else None
    return {"path": path, "available": cold.status == "ok", "why": cold.reason, "cold": asdict(cold),
            "cached": asdict(cached) if cached else None}


def fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def print_table(results: list[dict], budget: float, device: str) -> None:
    print(f"{device}, TIME_BUDGET {budget:g} s; compile and overhead: cold / cached")
    header = f"{'path':<26}{'tokens/s':>12}{'MFU %':>8}{'peak MB':>10}{'compile s':>14}{'overhead s':>14}{'joules':>10}{'W':>7}"
    print(header)
    print("-" * len(header))
    for r in results:
        if not r["available"]:
            print(f"{r['path']:<26}unavailable: {r['why']}")
            continue
        cold, cached = r["cold"], r["cached"] or r["cold"]
        s = cached["summary"] if cached["status"] == "ok" else cold["summary"]
        overhead = [x["seconds"] - budget if x["seconds"] is not None else None for x in (cold, cached)]
        watts = cached["joules"] / cached["seconds"] if cached["joules"] is not None and cached["seconds"] else None
        label = f"{r['path']} ({cold['platform'].get('attention', '?').split(':')[0]})"
        print(f"{label:<26}{fmt(s.get('tokens_per_sec'), ',.0f'):>12}{fmt(s.get('mfu_percent'), '.1f'):>8}"
              f"{fmt(s.get('peak_vram_mb'), ',.0f'):>10}"
              f"{fmt(cold['compile_s'], '.1f') + ' / ' + fmt(cached['compile_s'], '.1f'):>14}"
              f"{fmt(overhead[0], '.1f') + ' / ' + fmt(overhead[1], '.1f'):>14}"
              f"{fmt(cached['joules'], ',.0f'):>10}{fmt(watts, '.0f'):>7}")
        if cached["status"] != "ok":
            print(f"{'':<26}cached run {cached['status']}: {cached['reason']}")
    u = UPSTREAM
    print(f"{'upstream H100 (FA3)':<26}{u['tokens_per_sec']:>12,.0f}{u['mfu_percent']:>8.1f}{u['peak_vram_mb']:>10,.0f}"
          f"{'-':>14}{'-  / ' + format(u['overhead_s'], '.1f'):>14}{'-':>10}{'-':>7}")
    print(TARGET)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--paths", default=",".join(ATTENTION_CHOICES), help="attention paths to measure, in order")
    parser.add_argument("--timeout", type=float, default=900, help="per run, seconds (autoresearch run --timeout)")
    parser.add_argument("--json", action="store_true", help="one JSON document on stdout")
    args = parser.parse_args()
    paths = [p.strip() for p in args.paths.split(",") if p.strip()]
    unknown = [p for p in paths if p not in ATTENTION_CHOICES]
    if unknown:
        parser.error(f"unknown path(s) {', '.join(unknown)}: use {', '.join(ATTENTION_CHOICES)}")

    try:
        import torch
        has_cuda = torch.cuda.is_available() and torch.version.hip is None
    except ImportError:
        has_cuda = False
    if not has_cuda:
        print(json.dumps({"device": None, "reason": "no CUDA device: nothing to measure", "paths": []})
              if args.json else "no CUDA device: nothing to measure")
        return 0

    from harness.config import default_config_path, load_config

    config = load_config(default_config_path(ROOT))
    if config.backend != "cuda":
        print(f"the setup uses backend {config.backend}: run `autoresearch setup --preset h100` first", file=sys.stderr)
        return 1
    if config.preset != "h100":
        print(f"note: the setup's preset is {config.preset}, not h100", file=sys.stderr)
    budget = config.evaluator.TIME_BUDGET
    meter, why = EnergyMeter.open(config.device)
    print(f"energy: {why}", file=sys.stderr)
    device = torch.cuda.get_device_name(torch.device(config.device))
    logs = Path(tempfile.mkdtemp(prefix="autoresearch-bench-logs-"))
    print(f"logs in {logs}", file=sys.stderr)
    results = []
    try:
        for path in paths:
            print(f"measuring {path} (2 runs of {budget:g} s + overhead)...", file=sys.stderr)
            results.append(measure(path, args.timeout, meter, logs))
    finally:
        if meter:
            meter.close()
    if args.json:
        print(json.dumps({"device": device, "preset": config.preset, "time_budget": budget, "paths": results,
                          "upstream": UPSTREAM}, indent=2))
    else:
        print_table(results, budget, device)
    return 0


if __name__ == "__main__":
    sys.exit(main())
