"""Shared by the trainer tests: load a trainer file as a module (its main() only runs as a
script), check an end-to-end training run, and make weights for the parity tests."""

from __future__ import annotations

import importlib.util
import math
import re
import subprocess
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[1]
# The end-to-end trainer tests: every step is charged on CPU (nothing compiles there), so they train
# the cpu-tiny model at a quarter of its batch for 10 s: about 50 steps on 2 idle cores.
TRAINING_BUDGET = "10"
SMALL_BATCH = {"DEVICE_BATCH_SIZE": 4, "TOTAL_BATCH_SIZE": 1024}


def training_setup(tiny_setup_factory, backend: str):
    """A fresh project copy set up for `backend` with the end-to-end tests' budget and batch."""
    from harness.trainer_constants import write_constants

    setup = tiny_setup_factory(backend, TIME_BUDGET=TRAINING_BUDGET)
    write_constants(setup.root / "backends" / backend / "train.py", SMALL_BATCH)
    return setup


def load_trainer(backend: str, name: str | None = None) -> ModuleType:
    """Import backends/<backend>/train.py without running its experiment."""
    spec = importlib.util.spec_from_file_location(name or f"{backend}_train", ROOT / "backends" / backend / "train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def check_trained(proc: subprocess.CompletedProcess, backend: str) -> str:
    """A run that exited 0, printed a finite val_bpb below the unigram baseline under the right
    backend, and whose training loss fell by more than 0.5 nats. Returns its stdout."""
    out = proc.stdout
    assert proc.returncode == 0, out[-3000:] + proc.stderr[-3000:]
    val = float(re.search(r"^val_bpb:\s+(\d+\.\d+)", out, re.M).group(1))
    unigram = float(re.search(r"^unigram_bpb:\s+(\d+\.\d+)", out, re.M).group(1))
    assert math.isfinite(val) and val < unigram, (val, unigram)
    assert re.search(rf"^backend:\s+{backend}$", out, re.M)
    losses = [float(v) for v in re.findall(r"^step \d+ .*?\| loss: ([\d.]+)", out, re.M)]  # text mode turns \r into \n
    assert len(losses) > 10, out[-3000:]
    assert losses[-1] < losses[0] - 0.5, (losses[0], losses[-1])
    return out


def parity_weights(reference: ModuleType, config: dict) -> dict:
    """The reference's own init, with every zero-initialised weight made random (zero projections
    and gates would hide whole paths from the comparison) and a head large enough for real logits."""
    import torch

    torch.manual_seed(0)
    model = reference.build_model(reference.GPTConfig(**config), torch.device("cpu"), torch.float32)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "c_proj" in name or "ve_gate" in name:
                p.uniform_(-0.05, 0.05, generator=g)
        model.lm_head.weight.normal_(0.0, 0.05, generator=g)
        model.resid_lambdas.copy_(1.0 + 0.1 * torch.randn(config["n_layer"], generator=g))
        model.x0_lambdas.copy_(0.1 + 0.05 * torch.randn(config["n_layer"], generator=g))
    return {name: p.detach().clone() for name, p in model.named_parameters()}
