"""What the parallel loop's head costs per experiment at scale: dispatch, git, ledger, prompts.

THIS MEASURES THE HEAD, NOT TRAINING. The workers are stand-ins: a real Ray actor of the real
worker class, in a real git worktree, verifying its node against the real manifest, except that
its experiment sleeps for the session's TIME_BUDGET and its score is a cheap function of the
trainer's constants (no trainer process, no evaluator). Everything on the head is the real thing:
a real session (set up with `autoresearch setup`, baseline measured by the real trainer), the real
`loop.parallel.ParallelLoop` with the `mutate` proposer, candidate commits in worktrees,
cherry-picks onto a moved best, the chained ledger, the in-flight journal, and the agent prompt
built for every proposal (as an agent loop would, though `mutate` does not read it).

For W = 1, 2, 8, 32 workers on a local Ray cluster it runs ROUNDS x W experiments and prints
runs per hour against the ideal W x 3600 / budget, and the head's busy time per experiment
(time spent proposing, dispatching, judging and recording, split into its parts). Target: >= 90 %
of the ideal at W = 32.

    python bench/parallel.py [--budget 30] [--rounds 3] [--workers 1,2,8,32]
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

from project import PROJECT, copy_tree, set_up, sh

sys.path.insert(0, str(PROJECT))
TARGET = 0.90

from loop.workers import ExperimentWorker  # noqa: E402


class SleepingWorker(ExperimentWorker):
    """The real worker, except that an experiment sleeps for the budget and is scored from the
    trainer's constants: a smooth bowl around values a little off the preset's, so some changes
    are kept, most are not, and two workers often meet a moved best."""

    OPTIMUM = {"MATRIX_LR": 0.06, "EMBEDDING_LR": 0.4, "UNEMBEDDING_LR": 0.006, "WEIGHT_DECAY": 0.1,
               "WARMDOWN_RATIO": 0.6, "DEPTH": 5, "ASPECT_RATIO": 64}

    def _experiment(self, job: dict) -> dict:
        import json

        from harness.trainer_constants import read_constants

        budget = json.loads(self.package.run_config)["evaluator"]["TIME_BUDGET"]
        self._set(phase="training", line="sleeping for the budget")
        time.sleep(budget)
        constants = read_constants(job["source"])
        score = 1.6
        for name, best in self.OPTIMUM.items():
            value = constants.get(name)
            if isinstance(value, (int, float)) and value > 0:
                score += 0.02 * math.log(value / best) ** 2
        summary = {"val_bpb": score, "holdout_bpb": score + 0.004, "num_steps": 100, "tokens_per_sec": 1.0,
                   "peak_vram_mb": 512.0, "device": "cpu"}
        return self._result("ok", "", summary=summary, seconds=budget, ended=time.time())


def make_session(root: Path, budget: float, env: dict[str, str]) -> None:
    """A project copy, set up for cpu-tiny, with a session whose baseline the real trainer measured."""
    copy_tree(root)
    set_up(root, env, f"TIME_BUDGET={budget:g}")
    cli = [sys.executable, "-m", "autoresearch"]
    sh([*cli, "session", "start", "bench", "--repeats", "2"], root, env)


def measure(template: Path, scratch: Path, workers: int, rounds: int, budget: float) -> dict:
    """One loop of rounds x workers experiments on a copy of the session; the head instrumented."""
    import loop.parallel
    from loop.driver import LoopPlan
    from loop.lock import RepoLock
    from loop.parallel import ParallelLoop, ParallelOptions
    from loop.ratchet import Session

    root = scratch / f"w{workers}"
    shutil.copytree(template, root, symlinks=True)
    os.environ["AUTORESEARCH_ROOT"] = str(root)
    busy: dict[str, float] = defaultdict(float)
    ended: dict[str, float] = {}  # slot -> when its worker's last experiment ended
    runs = [0]  # runs dispatched: an experiment with a confirming run (or a re-run on a moved best) has two
    gaps: list[float] = []  # a worker's wait from the end of one experiment to the start of its next
    mutate = loop.parallel.mutate

    def timed_mutate(*args, **kwargs):  # the proposer itself, apart from what the head does around it
        start = time.monotonic()
        try:
            return mutate(*args, **kwargs)
        finally:
            busy["mutate"] += time.monotonic() - start
            busy["git + dispatch"] -= time.monotonic() - start

    loop.parallel.mutate = timed_mutate

    class TimedLoop(ParallelLoop):
        """The real head; each of its steps timed (time in them is time the head is busy)."""

        ready_at = 0.0

        def _start_pool(self, best):
            ray = super()._start_pool(best)
            TimedLoop.ready_at = time.monotonic()
            return ray

        def _propose_mutation(self, slot):
            start = time.monotonic()
            self.prompt()  # what an agent loop builds for every proposal
            busy["prompt"] += time.monotonic() - start
            start = time.monotonic()
            super()._propose_mutation(slot)
            busy["git + dispatch"] += time.monotonic() - start

        def _dispatch(self, slot, item, fresh=False):
            runs[0] += 1
            super()._dispatch(slot, item, fresh)
            if slot.name in ended:  # how long this worker waited for its next experiment
                gaps.append(time.time() - ended.pop(slot.name))

        def _finished(self, ray, ref, slot, ident):
            if ident:
                ended[slot.name] = ray.get(ref)["ended"]
            start = time.monotonic()
            super()._finished(ray, ref, slot, ident)
            if ident:
                busy["judge + ledger"] += time.monotonic() - start

        def _poll_states(self, ray):
            start = time.monotonic()
            super()._poll_states(ray)
            busy["watch workers"] += time.monotonic() - start

    rows: list = []
    last_result = [0.0]

    def emit(result) -> None:
        rows.append(result)
        last_result[0] = time.monotonic()
    with RepoLock(root, "bench"):
        session = Session.active(root)
        plan = LoopPlan(agent="mutate", max_iterations=rounds * workers, seed=workers)
        options = ParallelOptions(workers=workers, worker_class=SleepingWorker, num_cpus=workers, warm_evaluator=False)
        head = TimedLoop(session, plan, options, emit=emit)
        started = time.monotonic()
        head.run()
    experiments = [r for r in rows if r.row is not None]
    wall = last_result[0] - TimedLoop.ready_at  # to the last verdict (shutting the pool down is not throughput)
    statuses: dict[str, int] = defaultdict(int)
    for result in experiments:
        statuses[result.verdict] += 1
    reapplied = sum("re-applied" in r.reason for r in experiments)
    stale = sum(r.reason.startswith("stale") for r in experiments)
    loop.parallel.mutate = mutate
    shutil.rmtree(root, ignore_errors=True)
    return {"workers": workers, "experiments": len(experiments), "runs": runs[0], "wall": wall, "start": TimedLoop.ready_at - started,
            "busy": dict(busy), "statuses": dict(statuses), "reapplied": reapplied, "stale": stale, "gaps": gaps,
            "proposals": len(rows)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--budget", type=float, default=30.0, help="TIME_BUDGET of the session (the stand-in sleeps it)")
    parser.add_argument("--rounds", type=int, default=3, help="experiments per worker")
    parser.add_argument("--workers", default="1,2,8,32")
    args = parser.parse_args()
    counts = [int(w) for w in args.workers.split(",")]

    scratch = Path(tempfile.mkdtemp(prefix="bench-parallel-"))
    env = dict(os.environ, AUTORESEARCH_DEVICE="cpu", AUTORESEARCH_CACHE=str(scratch / "cache"))
    env.pop("AUTORESEARCH_LOCK_TOKEN", None)
    os.environ.update(AUTORESEARCH_DEVICE="cpu", AUTORESEARCH_CACHE=str(scratch / "cache"))
    try:
        template = scratch / "template"
        print(f"bench/parallel.py: the cost of the parallel loop's HEAD per experiment (not training).\n"
              f"Stand-in workers sleep for the budget ({args.budget:g} s) and score for free; the session, git, "
              f"ledger, journal\nand prompts are real. {os.cpu_count()} CPU core(s) here; local Ray cluster.\n",
              flush=True)
        setup_start = time.monotonic()
        make_session(template, args.budget, env)
        print(f"(session set up and its baseline measured by the real trainer in {time.monotonic() - setup_start:.0f} s)\n",
              flush=True)
        print(f"{'W':>3} {'exps':>5} {'runs':>5} {'wall s':>7} {'runs/h':>8} {'ideal':>8} {'of ideal':>8} "
              f"{'head ms/exp':>12} {'wait ms':>8}  verdicts; where the head's time went (ms/exp)")
        results = []
        for workers in counts:
            result = measure(template, scratch, workers, args.rounds, args.budget)
            results.append(result)
            n = result["experiments"]
            rate = result["runs"] / result["wall"] * 3600
            ideal = workers * 3600 / args.budget
            head = sum(result["busy"].values()) / n * 1000
            wait = statistics.fmean(result["gaps"]) * 1000 if result["gaps"] else float("nan")
            verdicts = ", ".join(f"{k} {v}" for k, v in sorted(result["statuses"].items()))
            parts = ", ".join(f"{k} {v / n * 1000:.0f}" for k, v in result["busy"].items())
            print(f"{workers:>3} {n:>5} {result['runs']:>5} {result['wall']:>7.1f} {rate:>8.0f} {ideal:>8.0f} {rate / ideal:>8.1%} "
                  f"{head:>12.0f} {wait:>8.0f}  {verdicts} (re-applied {result['reapplied']}, stale {result['stale']}); {parts}",
                  flush=True)
        last = results[-1]
        rate = last["runs"] / last["wall"] * 3600 / (last["workers"] * 3600 / args.budget)
        steady = args.budget / (args.budget + statistics.fmean(last["gaps"])) if last["gaps"] else float("nan")
        print(f"\nruns/h against the ideal W x 3600 / budget: a run is the unit a worker's time goes to (the noise "
              f"rule's confirming runs are the\nrule's cost, bench/false_keep.py, not the head's).\n"
              f"wall: from the moment every worker is up to the last verdict (Ray's and the workers' start-up, "
              f"once per loop, left out);\nit includes the first round's ramp (the head proposes one candidate at a "
              f"time) and the last round's drain.\nwait: a worker's mean wait from the end of one experiment to the "
              f"start of its next (judge, propose, commit, dispatch);\nin a long loop every worker is busy "
              f"budget / (budget + wait) of the time: {steady:.1%} at W = {last['workers']}.\n"
              f"target: >= {TARGET:.0%} of ideal at W = {last['workers']}: {'met' if rate >= TARGET else 'NOT met'} "
              f"over this loop ({rate:.1%}), {'met' if steady >= TARGET else 'NOT met'} in steady state ({steady:.1%}).")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
