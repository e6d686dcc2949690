"""How fast the machine is right now: a short, fixed matmul workload on the session's device.

A fixed wall-clock budget turns machine speed into score: when another job's load ends, an
unchanged trainer trains more steps and scores better. The ratchet reads this probe before and
after each run and voids a run whose machine speed drifted from the incumbent's reference
(`loop.decide`).

The workload is fixed per device kind: chunks of float32 square matmuls of one size (small on a
CPU, large on an accelerator, so that launch overhead does not dominate), each chunk synchronised.
The figure is the work done over the time it took, in GFLOP/s, over about `seconds` of chunks:
comparable between readings of the same framework, device and size on the same machine (never
across machines). It counts stalls, as a trainer suffers them: on a 2-core machine shared with
other jobs, the median chunk of a reading jumped between 1 and 170 GFLOP/s from one reading to the
next, while work over time stayed within 1-10 GFLOP/s (and the trainer ran a steady third of its
unloaded steps). Framework code is imported inside the function that needs it.

`python -m harness.scoring.speed --framework torch --device cuda --json` takes one reading in a
fresh process, so the caller never initialises a device context of its own.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass
from typing import Callable

FRAMEWORKS = ("torch", "mlx", "numpy")
DEFAULT_SECONDS = 0.4
MIN_CHUNKS = 3  # a few synchronisations, whatever `seconds` says
SLOWDOWN_ENV = "AUTORESEARCH_TEST_SLOWDOWN"  # tests: the subprocess probe reads a machine this many times slower


@dataclass(frozen=True)
class Workload:
    size: int  # n of the n x n float32 matmuls
    per_chunk: int  # matmuls between two synchronisations

    @property
    def chunk_flops(self) -> float:
        return 2.0 * self.size**3 * self.per_chunk


CPU_WORKLOAD = Workload(size=256, per_chunk=8)  # ~34 MFLOP a matmul: a few ms a chunk on 2 cores
ACCELERATOR_WORKLOAD = Workload(size=2048, per_chunk=8)  # ~17 GFLOP a matmul: ms a chunk on a big GPU


@dataclass(frozen=True)
class SpeedReading:
    framework: str
    device: str
    size: int
    gflops: float  # work over time, stalls included
    chunks: int
    seconds: float  # wall time of the timed chunks

    def comparable(self, other: "SpeedReading") -> bool:
        """Readings of different workloads are different units."""
        return (self.framework, self.device, self.size) == (other.framework, other.device, other.size)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "SpeedReading":
        return cls(**{name: data[name] for name in cls.__dataclass_fields__})


def workload_for(device: str) -> Workload:
    return CPU_WORKLOAD if device.split(":")[0] == "cpu" else ACCELERATOR_WORKLOAD


def measure_speed(framework: str, device: str, seconds: float = DEFAULT_SECONDS, slowdown: float = 1.0) -> SpeedReading:
    """One reading of the fixed workload on `device` ("cpu", "cuda", "cuda:1", "mps"; for mlx "cpu"
    or "gpu"). `slowdown` > 1 simulates a slower machine: after each chunk the probe sleeps
    (slowdown - 1) times the chunk's time, inside the timed region."""
    if framework not in FRAMEWORKS:
        raise ValueError(f"unknown framework {framework!r}: use one of {', '.join(FRAMEWORKS)}")
    if not seconds > 0:
        raise ValueError(f"seconds must be positive, not {seconds}")
    if not slowdown >= 1:
        raise ValueError(f"slowdown must be at least 1 (1 = the machine as it is), not {slowdown}")
    workload = workload_for(device)
    chunk = _CHUNK_BUILDERS[framework](device, workload)
    chunk()  # untimed: first-call allocation, kernel selection, thread-pool start
    chunks, spent = 0, 0.0
    while chunks < MIN_CHUNKS or spent < seconds:
        start = time.perf_counter()
        chunk()
        if slowdown > 1:
            time.sleep((time.perf_counter() - start) * (slowdown - 1))
        spent += time.perf_counter() - start
        chunks += 1
    return SpeedReading(framework, device, workload.size, workload.chunk_flops * chunks / spent / 1e9, chunks, spent)


def drift(reading: SpeedReading, reference: SpeedReading) -> float:
    """Relative change of speed from the reference: -0.2 is 20 % slower, +0.2 is 20 % faster."""
    if not reading.comparable(reference):
        raise ValueError(f"cannot compare a {_workload_text(reading)} reading with a {_workload_text(reference)} one: "
                         "take the reference with the same framework and device")
    return reading.gflops / reference.gflops - 1.0


def drifted(reading: SpeedReading, reference: SpeedReading, max_percent: float) -> bool:
    """Whether the machine's speed moved more than `max_percent` (either way) from the reference."""
    if not max_percent > 0:
        raise ValueError(f"the drift limit must be a positive percentage, not {max_percent}")
    return abs(drift(reading, reference)) * 100 > max_percent


def _workload_text(reading: SpeedReading) -> str:
    return f"{reading.framework} {reading.device} n={reading.size}"


# -- one chunk of the workload, per framework ---------------------------------------------------

Chunk = Callable[[], None]


def _torch_chunk(device: str, workload: Workload) -> Chunk:
    import torch

    dev = torch.device(device)
    generator = torch.Generator().manual_seed(0)
    # Scaled so the chained products stay near unit size: no overflow, no denormals.
    a = (torch.randn(workload.size, workload.size, generator=generator) / math.sqrt(workload.size)).to(dev)
    b = a.clone()
    out = torch.empty_like(a)

    if dev.type == "cuda":
        def sync() -> None:
            torch.cuda.synchronize(dev)
    elif dev.type == "mps":
        sync = torch.mps.synchronize
    else:
        def sync() -> None:
            pass

    def chunk() -> None:
        for _ in range(workload.per_chunk):
            torch.mm(a, b, out=out)
        sync()

    return chunk


def _mlx_chunk(device: str, workload: Workload) -> Chunk:
    import mlx.core as mx

    dev = mx.cpu if device == "cpu" else mx.gpu
    key = mx.random.key(0)
    a = mx.random.normal((workload.size, workload.size), dtype=mx.float32, key=key) / math.sqrt(workload.size)
    b = mx.array(a)
    mx.eval(a, b)

    def chunk() -> None:
        with mx.stream(dev):
            # Independent products, evaluated together: mlx is lazy, so each must be materialised.
            mx.eval(*[mx.matmul(a, b) for _ in range(workload.per_chunk)])

    return chunk


def _numpy_chunk(device: str, workload: Workload) -> Chunk:
    import numpy as np

    if device.split(":")[0] != "cpu":
        raise ValueError(f"the numpy probe runs on the CPU only, not on {device!r}")
    rng = np.random.default_rng(0)
    a = (rng.standard_normal((workload.size, workload.size)) / math.sqrt(workload.size)).astype(np.float32)
    b = a.copy()
    out = np.empty_like(a)

    def chunk() -> None:
        for _ in range(workload.per_chunk):
            np.matmul(a, b, out=out)

    return chunk


_CHUNK_BUILDERS: dict[str, Callable[[str, Workload], Chunk]] = {
    "torch": _torch_chunk, "mlx": _mlx_chunk, "numpy": _numpy_chunk,
}


# -- a reading in a fresh process ---------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m harness.scoring.speed", description=__doc__.split("\n")[0])
    parser.add_argument("--framework", choices=FRAMEWORKS, required=True)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seconds", type=float, default=DEFAULT_SECONDS)
    parser.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    args = parser.parse_args(argv)
    slowdown = float(os.environ.get(SLOWDOWN_ENV) or 1.0)
    try:
        reading = measure_speed(args.framework, args.device, args.seconds, slowdown=slowdown)
    except (ValueError, ImportError, RuntimeError) as error:
        print(f"Error: the speed probe failed on {args.framework} {args.device}: {error}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(reading.to_dict()))
    else:
        print(f"{reading.gflops:.2f} GFLOP/s ({reading.framework} on {reading.device}, {reading.chunks} chunks of "
              f"{workload_for(reading.device).per_chunk} {reading.size}x{reading.size} matmuls, {reading.seconds:.2f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
