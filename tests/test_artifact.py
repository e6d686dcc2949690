"""The exported model (harness/scoring/artifact.py): what the evaluator loads equals what the trainer
had, and a crafted artifact cannot run code in the evaluator.

Parity tolerance, and why: the artifact is the same graph of ATen operators the trainer's forward
runs, on the same device and dtype, so the logits are the same floats (measured: identical for all
four trainers, fp32 on CPU). We allow 1e-5 absolute (logits here are of scale 1-10) in case a
platform reorders a reduction when it re-runs a deserialized graph.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from trainer_helpers import load_trainer, parity_weights

from harness.scoring.artifact import (
    MLX_FUNCTION, TORCH_PROGRAM, TORCH_TENSORS, ArtifactError, check_torch_program, export_forward, load_forward,
)
from harness.scoring.evaluate import evaluate_bpb, score_stream

LOGITS_ATOL = 1e-5
CONFIG = dict(sequence_len=64, vocab_size=512, n_layer=3, n_head=4, n_kv_head=2, n_embd=128, window_pattern="SL")
BATCH = 4


@pytest.fixture(scope="module")
def weights():
    return parity_weights(load_trainer("cuda", "cuda_train_artifact"), CONFIG)


def torch_forward(backend: str, weights: dict):
    trainer = load_trainer(backend, f"{backend}_train_artifact")
    model = trainer.build_model(trainer.GPTConfig(**CONFIG), torch.device("cpu"), torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(weights[name])
    model.eval()

    @torch.no_grad()
    def forward(inputs):
        return model(torch.as_tensor(inputs).long())

    return forward


def export_torch(forward, directory: Path) -> Path:
    export_forward(forward, framework="torch", batch=BATCH, seq_len=CONFIG["sequence_len"],
                   vocab_size=CONFIG["vocab_size"], device="cpu", directory=directory)
    return directory


def tokens(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, CONFIG["vocab_size"], (BATCH, CONFIG["sequence_len"]))


@pytest.mark.parametrize("backend", ["cuda", "rocm", "mps"])
def test_a_torch_trainers_artifact_gives_its_logits(tmp_path, weights, backend):
    forward = torch_forward(backend, weights)
    loaded, meta = load_forward(export_torch(forward, tmp_path / "a"), "cpu", (BATCH, CONFIG["sequence_len"]))
    assert meta.framework == "torch" and (meta.batch, meta.seq_len) == (BATCH, CONFIG["sequence_len"])
    x = tokens()
    with torch.no_grad():
        expected, got = forward(torch.from_numpy(x)), loaded(torch.from_numpy(x))
    assert torch.allclose(got, expected, atol=LOGITS_ATOL, rtol=0), (got - expected).abs().max()


def test_the_mlx_trainers_artifact_gives_its_logits(tmp_path, weights):
    mx = pytest.importorskip("mlx.core")
    ml = load_trainer("mlx", "mlx_train_artifact")
    model = ml.build_model(ml.GPTConfig(**CONFIG), mx.float32)
    model.update(ml.tree_map_with_path(lambda name, p: mx.array(weights[name].numpy()), model.parameters()))

    def forward(inputs):
        return model(mx.array(inputs))

    export_forward(forward, framework="mlx", batch=BATCH, seq_len=CONFIG["sequence_len"],
                   vocab_size=CONFIG["vocab_size"], device="cpu", directory=tmp_path / "a")
    assert (tmp_path / "a" / MLX_FUNCTION).is_file()
    loaded, meta = load_forward(tmp_path / "a", "cpu", (BATCH, CONFIG["sequence_len"]))
    x = mx.array(tokens().astype(np.int32))
    assert meta.framework == "mlx"
    assert np.allclose(np.array(loaded(x)), np.array(forward(x)), atol=LOGITS_ATOL, rtol=0)


def test_the_evaluators_bpb_on_the_artifact_equals_the_in_process_evaluation(tmp_path, weights):
    """The new path (artifact, fixed batch, probes) scores the same weights as the old in-process
    `evaluate_bpb` did, to 1e-6."""
    forward = torch_forward("cuda", weights)
    loaded, _ = load_forward(export_torch(forward, tmp_path / "a"), "cpu", (BATCH, CONFIG["sequence_len"]))
    rows = np.random.default_rng(3).integers(0, CONFIG["vocab_size"], (10, CONFIG["sequence_len"] + 1))
    token_bytes = np.random.default_rng(4).integers(1, 5, CONFIG["vocab_size"])
    token_bytes[-4:] = 0  # special tokens
    old = evaluate_bpb(forward, rows, token_bytes, framework="torch", device="cpu", max_batch_size=BATCH)
    new = score_stream(loaded, rows, token_bytes, framework="torch", device="cpu", batch=BATCH, probe_seed=7)
    assert new.probed_rows > 0
    assert new.bpb == pytest.approx(old.val_bpb, abs=1e-6)


def test_an_artifact_of_another_shape_is_refused(tmp_path, weights):
    export_torch(torch_forward("cuda", weights), tmp_path / "a")
    with pytest.raises(ArtifactError, match=r"shape \(4, 64\); the evaluator feeds \(8, 64\)"):
        load_forward(tmp_path / "a", "cpu", (8, CONFIG["sequence_len"]))


def test_a_forward_that_leaves_torch_cannot_be_exported_and_says_why(tmp_path):
    def forward(inputs):  # through numpy: nothing torch.export can record
        return torch.from_numpy(np.eye(CONFIG["vocab_size"], dtype=np.float32)[inputs.numpy() % 7])

    with pytest.raises(ArtifactError, match="torch.export could not trace the forward"):
        export_torch(forward, tmp_path / "bad")
    assert not (tmp_path / "bad" / "meta.json").exists()  # no half artifact for the evaluator


# -- crafted artifacts: edit a real export, as an attacker with write access to the run folder would

@pytest.fixture()
def exported(tmp_path, weights) -> Path:
    return export_torch(torch_forward("cuda", weights), tmp_path / "a")


def edit_program(directory: Path, change) -> None:
    path = directory / TORCH_PROGRAM
    program = json.loads(path.read_text())
    change(program)
    path.write_text(json.dumps(program))


def first_node(program: dict) -> dict:
    return next(n for n in program["graph_module"]["graph"]["nodes"] if n["target"].startswith("torch.ops.aten."))


@pytest.mark.parametrize("target, words", [
    ("torch.serialization.os.system", "not an ATen operator"),
    ("builtins.eval", "not an ATen operator"),
    ("torch.ops.higher_order.wrap_with_autocast", "not an ATen operator"),
    ("torch.ops.aten.from_file.default", "reaches outside its tensors"),
])
def test_a_program_that_calls_anything_but_aten_compute_is_refused(exported, target, words):
    edit_program(exported, lambda p: first_node(p).update(target=target))
    with pytest.raises(ArtifactError, match=words):
        load_forward(exported, "cpu", (BATCH, CONFIG["sequence_len"]))


def test_shape_expressions_and_custom_objects_are_refused(exported):
    program = json.loads((exported / TORCH_PROGRAM).read_text())
    with_expr = json.loads(json.dumps(program))
    with_expr["range_constraints"] = {"s0": {"min_val": 1, "max_val": 8}}
    with pytest.raises(ArtifactError, match="symbolic shapes"):
        check_torch_program(with_expr)
    with_obj = json.loads(json.dumps(program))
    with_obj["graph_module"]["signature"]["input_specs"].append({"custom_obj": {"arg": {"name": "x"}}})
    with pytest.raises(ArtifactError, match="custom_obj"):
        check_torch_program(with_obj)


def test_guard_code_in_an_artifact_is_never_run(exported, tmp_path):
    marker = tmp_path / "pwned"
    edit_program(exported, lambda p: p.update(guards_code=[f"__import__('pathlib').Path({str(marker)!r}).touch()"]))
    loaded, _ = load_forward(exported, "cpu", (BATCH, CONFIG["sequence_len"]))
    loaded(torch.from_numpy(tokens()))
    assert not marker.exists()


class Payload:
    def __reduce__(self):
        return (Path.touch, (Path("/tmp/autoresearch-test-pickle-ran"),))


def test_tensors_that_are_not_plain_tensors_are_refused_without_unpickling(exported):
    Path("/tmp/autoresearch-test-pickle-ran").unlink(missing_ok=True)
    buffer = io.BytesIO()
    torch.save({"state_dict": {}, "constants": {"x": Payload()}}, buffer)
    (exported / TORCH_TENSORS).write_bytes(buffer.getvalue())
    with pytest.raises(ArtifactError, match="unreadable"):
        load_forward(exported, "cpu", (BATCH, CONFIG["sequence_len"]))
    assert not Path("/tmp/autoresearch-test-pickle-ran").exists()


def test_a_missing_or_broken_artifact_is_named(tmp_path, exported):
    with pytest.raises(ArtifactError, match="no exported model"):
        load_forward(tmp_path / "nothing", "cpu", (BATCH, CONFIG["sequence_len"]))
    (exported / TORCH_TENSORS).unlink()
    with pytest.raises(ArtifactError, match="incomplete"):
        load_forward(exported, "cpu", (BATCH, CONFIG["sequence_len"]))
