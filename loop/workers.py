"""What runs on a worker: one experiment, on a node that has shown it holds the session's evaluator.

A worker is a Ray actor (`ExperimentWorker`, made remote by `loop.parallel`) that owns one slot of
the pool: one accelerator (Ray's per-actor GPU assignment sets `CUDA_VISIBLE_DEVICES` for it and so
for its trainer and evaluator), or a share of the CPUs. It receives the session as a
`SessionPackage`: the session's configuration, its run configuration and its manifest of hashes.

Before its first experiment, and before and after every one, it verifies what it will run with
against the manifest (`verify_node`): the code in its tree (the harness, the loop, the CLI, the
presets, program.md), the session's configuration files, and the artefacts outside the tree (the
tokenizer, its token byte table, the evaluation set and the validation shard it was made from). A
node whose files do not match refuses, with the files named; nothing runs there.

Its tree is a git worktree of the session branch that the head made for it when the worker runs on
the head's machine; on another node it is materialised from an archive of the session's base commit
(`git archive`) with the candidate's trainer written in, and the artefacts are looked up in the
node's own cache (`AUTORESEARCH_CACHE`, filled by the same `setup`, or a shared filesystem path).

The worker never writes the ledger or moves git: it returns one result, and the head decides.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import os
import socket
import tarfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

STATE_FILES = ("session.json", "run.json", "manifest.json")  # in the session's folder; the head writes the rest


@dataclass(frozen=True)
class SessionPackage:
    """Everything a worker needs to know about the session, as plain data (it crosses to other nodes)."""

    tag: str
    backend: str
    device: str
    trainer: str  # the one mutable file, relative to the repository root
    session_config: str  # session.json as written at the start (its hash is in the manifest)
    run_config: str  # run.json: what every trainer runs under
    manifest: dict[str, str | None]
    config_key: str  # the manifest's names of session.json and run.json
    run_config_key: str
    eval_set: str  # the evaluation set's folder on the head
    cache: str  # the head's data cache: paths below it are looked up below the node's own
    session_dir: str  # the head's session folder (logs, runs, compile cache)
    head_host: str
    eval_batch_size: int
    framework: str  # what the evaluator imports: torch or mlx
    timeout: float
    warm_evaluator: bool = True


@dataclass
class WorkerState:
    """What a worker is doing, for the head's live view and `session status`."""

    slot: str
    node: str
    pid: int
    experiment: str = ""
    phase: str = "idle"  # idle | verifying | training | scoring
    line: str = ""  # the trainer's latest log line
    trainer_pid: int | None = None
    since: float = field(default_factory=time.time)


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _sha256_file(path: Path) -> str | None:
    if not path.is_file():
        return None
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def localise(path: str, head_cache: str, node_cache: Path) -> Path:
    """A path of the head's data cache, on this node (the same path when the caches coincide)."""
    head = Path(head_cache)
    candidate = Path(path)
    if candidate.is_relative_to(head) and head != node_cache:
        return node_cache / candidate.relative_to(head)
    return candidate


def verify_node(package: SessionPackage, tree: Path, node_cache: Path) -> list[str]:
    """Every manifest entry this node does not hold as the session started (`path (problem)`),
    sorted; empty when the node may run the session's experiments. `tree` is the worker's copy of
    the repository; absolute entries are the artefacts outside it, looked up in `node_cache`."""
    own = {package.config_key: sha256_bytes(package.session_config.encode("utf-8")),
           package.run_config_key: sha256_bytes(package.run_config.encode("utf-8"))}
    problems = []
    for name, expected in sorted(package.manifest.items()):
        if name in own:
            actual = own[name]
        elif os.path.isabs(name):
            actual = _sha256_file(localise(name, package.cache, node_cache))
        elif name.startswith(".git/") or name.startswith(".autoresearch/"):
            continue  # the head's own state files (the ledger chain and the head check those)
        else:
            actual = _sha256_file(tree / name)
        if actual != expected:
            problems.append(f"{name} ({'added' if expected is None else 'missing' if actual is None else 'changed'})")
    for path in _code_files(tree):  # a file under the frozen folders that the session never had
        name = path.relative_to(tree).as_posix()
        if name not in package.manifest:
            problems.append(f"{name} (added)")
    return problems


def _code_files(tree: Path) -> list[Path]:
    found = []
    for folder in ("harness", "presets", "loop", "autoresearch"):
        base = tree / folder
        if base.is_dir():
            found += [p for p in base.rglob("*") if p.is_file()
                      and not any(part == "__pycache__" or part.startswith(".") for part in p.relative_to(tree).parts)
                      and p.suffix != ".pyc"]
    return sorted(found)


def node_folder(cache: Path, tag: str, session_dir: str) -> Path:
    """Where the workers of one session keep, on a node, the trees the head ships them."""
    return cache / "workers" / f"{tag}-{sha256_bytes(session_dir.encode('utf-8'))[:8]}"


def materialise(archive: bytes, dest: Path) -> Path:
    """Unpack a `git archive` (tar) of the session's commit into `dest`, replacing what was there."""
    import shutil

    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(dest, filter="data")
    return dest


class ExperimentWorker:
    """One slot of the pool. Made a Ray actor by `loop.parallel` (with `max_concurrency=2`, so the
    head can ask for `state()` while `run()` trains)."""

    def __init__(self, slot: str, package: SessionPackage, tree: str | None, archive: bytes | None = None):
        self.package = package
        self.slot = slot
        self.state_ = WorkerState(slot=slot, node=socket.gethostname(), pid=os.getpid())
        self.lock = threading.Lock()
        self.local = tree is not None and Path(tree).is_dir() and socket.gethostname() == package.head_host
        from harness.paths import cache_dir

        self.node_cache = cache_dir()
        node_dir = self.node_dir = node_folder(self.node_cache, package.tag, package.session_dir) / slot
        if self.local:
            self.tree = Path(tree)
            self.session_dir = Path(package.session_dir)
        else:  # another node: its own copy of the session's tree and folder
            if archive is None:
                raise ValueError("a worker on another node needs the session's archive")
            self.tree = materialise(archive, node_dir / "tree")
            self.session_dir = node_dir
        self.config_path = self._write_run_config()
        self.evaluator = None
        self.energy = None  # this worker's GPU energy counter (harness.hardware.energy), where there is one
        # A run without a warm evaluator finds the evaluation set through the tree's pointer (an
        # ignored file: `.autoresearch/` in a worktree, whose `.git` is a file).
        from harness.scoring.evalset import save_eval_pointer

        save_eval_pointer(self.tree, self.eval_set)

    def _write_run_config(self) -> Path:
        """The session's run.json, with the head's cache paths moved to this node's cache."""
        if self.local:
            return Path(self.package.session_dir) / "run.json"
        import json

        data = json.loads(self.package.run_config)
        for key in ("data_dir", "tokenizer_dir", "tokens_dir"):
            data[key] = str(localise(data[key], self.package.cache, self.node_cache))
        path = self.session_dir / "run.json"
        path.write_text(json.dumps(data, indent=2, sort_keys=True), encoding="utf-8")
        return path

    @property
    def eval_set(self) -> Path:
        return localise(self.package.eval_set, self.package.cache, self.node_cache)

    # -- called by the head -----------------------------------------------------------------------
    def prepare(self) -> dict:
        """Verify this node against the manifest; keep an evaluator warm. Returns the node's facts
        and, when it refuses, why."""
        problems = verify_node(self.package, self.tree, self.node_cache)
        facts = {"slot": self.slot, "node": self.state_.node, "pid": os.getpid(),
                 "started": _start_time(os.getpid()), "ok": not problems,
                 "reason": "" if not problems else self._refusal(problems)}
        if problems:
            return facts
        from harness.hardware.energy import EnergyMeter
        from harness.scoring.context import DEVICE_ENV

        self.energy, _ = EnergyMeter.open(os.environ.get(DEVICE_ENV) or self.package.device)  # the GPU Ray gave it
        if not self.package.warm_evaluator:
            return facts
        try:
            self.evaluator = self._start_evaluator()
        except Exception as exc:  # noqa: BLE001 - every run then starts its own
            facts["warning"] = f"could not keep an evaluator warm on {self.state_.node} ({exc})"
        return facts

    def _refusal(self, problems: list[str]) -> str:
        shown = ", ".join(problems[:6]) + (f" and {len(problems) - 6} more" if len(problems) > 6 else "")
        return (f"node {self.state_.node} does not hold the session's evaluator: {shown}; run the same "
                f"`autoresearch setup` there (or share the cache {self.package.cache} at the same path)")

    def _start_evaluator(self):
        from harness.scoring.context import DEVICE_ENV
        from harness.scoring.evaluator_process import EvaluatorProcess

        return EvaluatorProcess.start(self.tree, self.eval_set, os.environ.get(DEVICE_ENV) or self.package.device,
                                      self.package.eval_batch_size, self.package.framework,
                                      self.session_dir / "logs" / f"evaluator-{self.slot}.log")

    def state(self) -> dict:
        with self.lock:
            return dataclasses.asdict(self.state_)

    def run(self, job: dict) -> dict:
        """One experiment: `job` names it (`id`, `marker`, `log_name`), the candidate's trainer
        (`source`, `trainer_sha`) and its commit. Returns the outcome as plain data; never raises
        for a failing trainer (that is an outcome)."""
        self._set(experiment=job["id"], phase="verifying", line="", trainer_pid=None, since=time.time())
        try:
            return self._run(job)
        finally:
            self._set(experiment="", phase="idle", line="", trainer_pid=None, since=time.time())

    def close(self) -> None:
        if self.energy is not None:
            self.energy.close()
            self.energy = None
        if self.evaluator is not None:
            self.evaluator.close()
            self.evaluator = None
        if not self.local:  # its copy of the tree and its run folders: the head has the logs
            import shutil

            shutil.rmtree(self.node_dir, ignore_errors=True)

    # -- inside ----------------------------------------------------------------------------------------
    def _set(self, **changes) -> None:
        with self.lock:
            for key, value in changes.items():
                setattr(self.state_, key, value)

    def _result(self, status: str, reason: str, **extra) -> dict:
        return {"status": status, "reason": reason, "summary": None, "seconds": 0.0, "log": "",
                "node": self.state_.node, "slot": self.slot, **extra}

    def _run(self, job: dict) -> dict:
        trainer = self.tree / self.package.trainer
        if not self.local:
            trainer.write_text(job["source"], encoding="utf-8")
        if _sha256_file(trainer) != job["trainer_sha"]:
            return self._result("crash", f"the worker's tree does not hold the candidate's trainer ({job['commit'][:7]})")
        problems = verify_node(self.package, self.tree, self.node_cache)
        if problems:
            return self._result("refused", self._refusal(problems))
        from loop.integrity import StateSnapshot

        state_files = [self.session_dir / name for name in STATE_FILES] if self.local else []
        snapshot = StateSnapshot.take(state_files)
        result = self._experiment(job)
        changed = snapshot.changed()
        if changed:  # the trainer rewrote the session's configuration: put it back, refuse the run
            snapshot.restore(changed)
            return {**result, "status": "tampered", "summary": None,
                    "reason": f"the run changed the session's state ({', '.join(p.name for p in changed)}); put back"}
        problems = verify_node(self.package, self.tree, self.node_cache)
        if problems:
            return {**result, "status": "tampered", "summary": None,
                    "reason": f"the run changed frozen files: {', '.join(problems[:6])}"}
        return result

    def _experiment(self, job: dict) -> dict:
        """Train and score once (`harness.scoring.runner.run_experiment`)."""
        from harness.scoring.runner import run_experiment

        if self.package.warm_evaluator and (self.evaluator is None or not self.evaluator.alive):
            try:  # it died (or never started): a fresh one, else this run starts its own
                self.evaluator = self._start_evaluator()
            except Exception:  # noqa: BLE001
                self.evaluator = None
        log_path = self.session_dir / "logs" / job["log_name"]
        self._set(phase="training")
        outcome = run_experiment(
            self.tree, self.package.backend, self.config_path, log_path, eval_set=self.eval_set,
            run_dir=self.session_dir / "runs" / log_path.stem, timeout=self.package.timeout,
            evaluator=self.evaluator, marker=job["marker"], compile_cache=self.session_dir / "compile-cache",
            energy=self.energy, on_start=lambda pid: self._set(trainer_pid=pid), on_progress=lambda line: self._set(line=line))
        log = "" if self.local else _tail(log_path)  # the head keeps the logs of other nodes' runs
        return self._result(outcome.status, outcome.reason, summary=outcome.summary, seconds=outcome.seconds,
                            log=log)


def _tail(path: Path, limit: int = 200_000) -> str:
    try:
        data = path.read_bytes()
    except OSError:
        return ""
    return data[-limit:].decode("utf-8", errors="replace")


def _start_time(pid: int) -> float | None:
    from harness.processes import process_start_time

    return process_start_time(pid)

