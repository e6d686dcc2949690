"""Ray for the parallel loop: join a cluster or start one on this machine, size the workers, and
leave nothing behind.

Ray is an optional extra (`pip install 'autoresearch[ray]'`); nothing here imports it before it is
needed. A local cluster started by the head shares the head's fate: Ray stops its own servers and
workers when the head exits, even by `kill -9`, except two agent processes that outlive it; the
head records every process of the cluster it started (pid and start time) in the session's
in-flight file, so `session resume` can stop those too (`kill_recorded`).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

from loop.errors import SessionError

# The user's own switches a worker's trainer and evaluator may see (as `harness.scoring.runner` lets through).
PASSED_SWITCHES = ("AUTORESEARCH_CACHE", "AUTORESEARCH_DEVICE", "AUTORESEARCH_COMPILE", "AUTORESEARCH_DTYPE",
                   "AUTORESEARCH_ATTENTION", "AUTORESEARCH_CONFINE")
LOCAL_OBJECT_STORE_BYTES = 256 * 1024 * 1024  # results are small; the default takes 30 % of the RAM


def require_ray():
    try:
        import ray
    except ImportError:
        raise SessionError("--workers above 1 and --ray need Ray, which is not installed",
                           "install the extra: `pip install 'autoresearch[ray]'` (or run with --workers 1)") from None
    return ray


@dataclass(frozen=True)
class WorkerResources:
    """What one worker asks Ray for, and why."""

    num_cpus: float
    num_gpus: float
    threads: int  # OMP_NUM_THREADS for a worker that trains on CPU cores
    reason: str


def worker_resources(device: str, workers: int, cpus: int, gpus: int) -> WorkerResources:
    """One accelerator per worker; more workers than accelerators share them; on a CPU, each
    worker gets an equal share of the cores (at least one)."""
    if device.startswith("cuda") and gpus > 0:
        if workers <= gpus:
            return WorkerResources(1, 1, 0, f"one of {gpus} GPU(s) per worker")
        return WorkerResources(1, gpus / workers, 0,
                               f"{workers} workers share {gpus} GPU(s): {gpus / workers:.2f} of one each")
    share = max(1, cpus // workers)
    why = f"{share} of {cpus} CPU core(s) per worker" if device == "cpu" else \
        f"no accelerator Ray can hand out for device {device!r}: the workers share it, {share} core(s) each"
    return WorkerResources(share, 0, share, why)


@dataclass
class Cluster:
    """The Ray cluster the head works with: one it started on this machine, or one it joined."""

    address: str | None  # None: a cluster started here
    processes: list[tuple[int, float]] = field(default_factory=list)  # a local cluster's processes

    @property
    def local(self) -> bool:
        return self.address is None

    def resources(self) -> tuple[int, int]:
        import ray

        total = ray.cluster_resources()
        return int(total.get("CPU", 0)), int(total.get("GPU", 0))

    def note_processes(self) -> None:
        """Record the processes of a local cluster (they are this process's descendants)."""
        if self.local:
            self.processes = sorted(set(self.processes) | set(_descendants()))

    def shutdown(self) -> None:
        import ray

        self.note_processes()
        if ray.is_initialized():
            ray.shutdown()
        kill_recorded(self.processes)


def start_cluster(address: str | None, env: dict[str, str], num_cpus: int | None = None,
                  num_gpus: int | None = None) -> Cluster:
    """Join the cluster at `address` ("auto", "ray://host:10001", host:port), or start one here
    with `num_cpus`/`num_gpus` (None: what Ray detects). `env` reaches every worker process."""
    ray = require_ray()
    options = dict(include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING,
                   runtime_env={"env_vars": env}, configure_logging=True)
    try:
        if address:
            ray.init(address=address, **options)
        else:
            os.environ.pop("RAY_ADDRESS", None)  # a local cluster, whatever the environment names
            ray.init(num_cpus=num_cpus, num_gpus=num_gpus, object_store_memory=LOCAL_OBJECT_STORE_BYTES, **options)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        where = f"the Ray cluster at {address}" if address else "a local Ray cluster"
        raise SessionError(f"could not start or join {where}: {exc}",
                           "check the address (`ray status` on the head node), or leave --ray out to use this machine")
    cluster = Cluster(address=address)
    cluster.note_processes()
    return cluster


def worker_env(root: str | None, threads: int) -> dict[str, str]:
    """The environment every worker process gets: the user's switches, the session repository
    first on the path (a local cluster: workers import its frozen code), the thread share."""
    env = {k: os.environ[k] for k in PASSED_SWITCHES if k in os.environ}
    if root:
        env["PYTHONPATH"] = os.pathsep.join([root, *[p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]])
    if threads:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
    return env


def _descendants() -> list[tuple[int, float]]:
    """This process's descendants that are Ray's (its servers, agents and workers; not git's
    helpers, agents or trainers: those are stopped by their own owners)."""
    import psutil

    found = []
    try:
        children = psutil.Process().children(recursive=True)
    except psutil.Error:
        return found
    for child in children:
        try:
            command = " ".join(child.cmdline())
            if command.startswith("ray::") or f"{os.sep}ray{os.sep}" in command:
                found.append((child.pid, child.create_time()))
        except psutil.Error:
            continue
    return found


def kill_recorded(processes: list[tuple[int, float]] | list[list]) -> int:
    """Kill the recorded processes that still run, and their children (never by process group: a
    cluster's processes share the group of the shell that started the head). A later process that
    reused a pid is left alone. Returns how many were killed."""
    import psutil

    from harness.processes import same_process, wait_gone

    victims = []
    for pid, started in processes:
        if not same_process(int(pid), float(started), tolerance=0.01):
            continue
        try:
            proc = psutil.Process(int(pid))
            victims += [proc, *proc.children(recursive=True)]
        except psutil.Error:
            continue
    for victim in victims:
        try:
            victim.kill()
        except psutil.Error:
            pass
    wait_gone(victims)
    return len(victims)
