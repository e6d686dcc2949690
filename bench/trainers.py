"""Training-step throughput of the MLX trainer against the reference (torch) trainer, in one run.

Both trainers' own model, optimizer and step code are imported from their files (nothing is
reimplemented here) and trained on the same batch of the `cpu-tiny` configuration on the CPU:
depth 2, d_model 128, seq 256, vocab 4096, 16 rows per step (4,096 tokens), fp32.

    python bench/trainers.py [--steps 10] [--warmup 3]

torch is imported before the MLX trainer loads OpenBLAS: in the other order OpenBLAS's threads
compete with torch's OpenMP threads and the torch step gets ~3x slower (packages.md section 3).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import platform
import time
from pathlib import Path
from types import ModuleType
from typing import Callable

import numpy as np
import torch  # first: see the module docstring

from harness.hardware.platform import cpu_name

ROOT = Path(__file__).resolve().parents[1]
VOCAB, SEQ_LEN, BATCH = 4096, 256, 16
MODEL = dict(depth=2, aspect_ratio=64, head_dim=64, window_pattern="SL")


def load_trainer(backend: str) -> ModuleType:
    path = ROOT / "backends" / backend / "train.py"
    spec = importlib.util.spec_from_file_location(f"{backend}_train", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # defines everything; main() only runs as a script
    return module


def torch_step(tr: ModuleType, x: np.ndarray, y: np.ndarray) -> Callable[[int], float]:
    torch.manual_seed(0)
    model = tr.build_model(tr.build_model_config(VOCAB, SEQ_LEN, **MODEL), torch.device("cpu"), torch.float32)
    optimizer = tr.setup_optimizer(model, compiled=False, polar_dtype=torch.float32)
    xt, yt = torch.from_numpy(x).long(), torch.from_numpy(y).long()

    def step(i: int) -> float:
        loss = model(xt, yt)
        loss.backward()
        tr.apply_schedules(optimizer, i, 0.0)
        optimizer.step()
        model.zero_grad(set_to_none=True)
        return loss.item()
    return step


def mlx_step(ml: ModuleType, x: np.ndarray, y: np.ndarray, compiled: bool) -> Callable[[int], float]:
    mx = ml.mx
    mx.random.seed(0)
    model = ml.build_model(ml.build_model_config(VOCAB, SEQ_LEN, **MODEL), mx.float32)
    optimizer = ml.setup_optimizer(model)
    train_step = ml.build_train_step(model, optimizer, grad_accum_steps=1, compiled=compiled)
    xm, ym = mx.array(x), mx.array(y)

    def step(i: int) -> float:
        ml.apply_schedules(optimizer, i, 0.0)
        loss, grads = train_step(xm, ym, None, True)
        mx.eval(loss, grads, model.state, optimizer.state)  # MLX is lazy: the step runs here
        return loss.item()
    return step


def measure(steps: dict[str, Callable[[int], float]], warmup: int, timed: int) -> dict[str, tuple[float, float, float]]:
    """name -> (tokens/s, median ms/step, last loss) over `timed` steps after `warmup` untimed ones.
    The trainers take turns step by step, so a change in machine load hits them all alike."""
    for step in steps.values():
        for i in range(warmup):
            step(i)
    seconds = {name: [] for name in steps}
    losses = {}
    for i in range(warmup, warmup + timed):
        for name, step in steps.items():
            t0 = time.perf_counter()
            losses[name] = step(i)
            seconds[name].append(time.perf_counter() - t0)
    return {name: (BATCH * SEQ_LEN * timed / sum(s), 1000 * float(np.median(s)), losses[name])
            for name, s in seconds.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10, help="timed steps per trainer")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (compile, caches)")
    args = parser.parse_args()

    tr = load_trainer("cuda")
    ml = load_trainer("mlx")
    rng = np.random.default_rng(0)
    x = rng.integers(0, VOCAB, (BATCH, SEQ_LEN), dtype=np.int32)
    y = rng.integers(0, VOCAB, (BATCH, SEQ_LEN), dtype=np.int32)

    print(f"cpu-tiny step on {cpu_name()} ({os.cpu_count()} cores, {platform.system()}): "
          f"depth {MODEL['depth']}, seq {SEQ_LEN}, vocab {VOCAB}, {BATCH} rows = {BATCH * SEQ_LEN} tokens/step, fp32")
    print(f"torch {torch.__version__} ({torch.get_num_threads()} threads); mlx {ml.mx.__version__}: {ml.blas_report()}")
    results = measure({
        "torch eager (reference)": torch_step(tr, x, y),
        "mlx eager": mlx_step(ml, x, y, compiled=False),
        "mlx mx.compile": mlx_step(ml, x, y, compiled=True),
    }, args.warmup, args.steps)
    print(f"{'trainer step':26s} {'tokens/s':>10s} {'ms/step':>9s} {'loss':>8s}")
    for name, (tok_s, ms, loss) in results.items():
        print(f"{name:26s} {tok_s:10,.0f} {ms:9.1f} {loss:8.4f}")
    reference = results["torch eager (reference)"][0]
    for name in ("mlx eager", "mlx mx.compile"):
        print(f"ratio {name} / torch: {results[name][0] / reference:.2f}x")
    print(f"(median ms/step; tokens/s over {args.steps} timed steps each, taken in turns; load average "
          f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores)")


if __name__ == "__main__":
    main()
