"""The evaluator process (harness/scoring/evaluator.py, evaluator_process.py): it scores with the
repository's own harness whatever else is on the machine, keeps its data resident between requests,
and scores canaries apart.

The planted-bytecode check first proves that the planted file does take effect in an ordinary
import, so the test can fail."""

from __future__ import annotations

import math
import os
import py_compile
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from harness.scoring.artifact import export_forward
from harness.scoring.canaries import LEAK_MARGIN_BITS, canary_score, word_tokens
from harness.scoring.evalset import EvalSet, load_eval_pointer
from harness.scoring.evaluate import eval_batch
from harness.scoring.evaluator_process import EvaluatorProcess



@pytest.fixture(scope="module")
def project(tiny_setup_factory):
    return tiny_setup_factory("cuda")


@pytest.fixture(scope="module")
def artifact(project, tmp_path_factory) -> Path:
    """A uniform model (every logit 0) exported for the evaluator's batch shape."""
    eval_set = EvalSet.load(load_eval_pointer(project.root))
    batch = eval_batch(eval_set.seq_len, eval_set.vocab_size, 32, framework="torch", device="cpu")
    directory = tmp_path_factory.mktemp("artifact")
    export_forward(lambda x: torch.zeros(*x.shape, eval_set.vocab_size), framework="torch", batch=batch,
                   seq_len=eval_set.seq_len, vocab_size=eval_set.vocab_size, device="cpu", directory=directory)
    return directory


def start(project, tmp_path: Path, **env: str) -> EvaluatorProcess:
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        return EvaluatorProcess.start(project.root, load_eval_pointer(project.root), "cpu", 32, "torch",
                                      tmp_path / "evaluator.log")
    finally:
        for key, value in old.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def test_a_uniform_model_scores_log2_vocab_bits_per_token_and_the_evaluator_stays_warm(project, artifact, tmp_path):
    eval_set = EvalSet.load(load_eval_pointer(project.root))
    with start(project, tmp_path) as evaluator:
        first = evaluator.score(artifact, seed=1, timeout=300)
        second = evaluator.score(artifact, seed=2, timeout=300)
    assert first["ok"] and second["ok"], first
    assert first["val_bpb"] == pytest.approx(second["val_bpb"], abs=1e-9)  # the seed moves the probes only
    # A uniform model costs log2(V) bits per token; per byte, that over the rows' mean bytes per token.
    assert first["val_bpb"] > 0 and first["holdout_bpb"] > 0
    assert first["eval_tokens"] == eval_set.streams["val"].num_rows * eval_set.seq_len
    assert first["probe"]["rows"] > 0
    for name, canary in first["canaries"].items():
        # Uniform over the whole vocabulary is worse than uniform over the canary pool: no leak.
        assert not canary["leaked"] and canary["saved_bits"] < 0, (name, canary)


def test_the_evaluator_imports_the_repositorys_harness_not_one_on_pythonpath(project, artifact, tmp_path):
    fake = tmp_path / "fake" / "harness"
    (fake / "scoring").mkdir(parents=True)
    (fake / "__init__.py").write_text("")
    (fake / "scoring" / "__init__.py").write_text("")
    (fake / "scoring" / "evaluator.py").write_text("def main(argv):\n    print('{\"ready\": true}')\n")
    with start(project, tmp_path, PYTHONPATH=str(tmp_path / "fake"), PYTHONSTARTUP="/nonexistent") as evaluator:
        reply = evaluator.score(artifact, seed=1, timeout=300)
    assert reply["ok"] and reply["val_bpb"] > 1.0


def test_bytecode_planted_beside_the_harness_is_never_read(project, artifact, tmp_path):
    source = project.root / "harness" / "scoring" / "evaluate.py"
    text = source.read_text()
    planted = tmp_path / "evaluate_planted.py"
    assert "nats=float(row_nats.sum())" in text
    planted.write_text(text.replace("nats=float(row_nats.sum())", "nats=0.5 * float(row_nats.sum())") + "\nPLANTED = True\n")
    pyc = source.parent / "__pycache__" / f"evaluate.{sys.implementation.cache_tag}.pyc"
    pyc.parent.mkdir(exist_ok=True)
    py_compile.compile(str(planted), cfile=str(pyc), dfile=str(source),
                       invalidation_mode=py_compile.PycInvalidationMode.UNCHECKED_HASH, doraise=True)
    try:
        # An ordinary import does run the planted code...
        probe = subprocess.run([sys.executable, "-c", "import harness.scoring.evaluate as e; print(getattr(e, 'PLANTED', False))"],
                               cwd=project.root, env=dict(os.environ, PYTHONPATH=str(project.root)),
                               capture_output=True, text=True, timeout=60)
        assert probe.stdout.split()[0] == "True", probe.stdout + probe.stderr
        # ...the evaluator does not.
        with start(project, tmp_path) as evaluator:
            reply = evaluator.score(artifact, seed=1, timeout=300)
        with start(project, tmp_path) as evaluator:
            pyc.unlink()
            honest = evaluator.score(artifact, seed=1, timeout=300)
    finally:
        pyc.unlink(missing_ok=True)
    assert reply["val_bpb"] == pytest.approx(honest["val_bpb"], abs=1e-9)


def test_a_dead_evaluator_is_reported_not_waited_for(project, artifact, tmp_path):
    evaluator = start(project, tmp_path)
    evaluator.proc.kill()
    evaluator.proc.wait()
    from harness.scoring.evaluator_process import EvaluatorDied

    with pytest.raises(EvaluatorDied, match="exited"):
        evaluator.score(artifact, seed=1, timeout=60)
    evaluator.close()


# -- canaries ---------------------------------------------------------------------------------------

def test_the_canary_bound_is_chance_for_a_model_uniform_over_the_pool():
    pool, targets = 1000, 4 * 256
    uniform = canary_score(targets * math.log(pool), targets, pool, num_bytes=targets * 6)
    assert uniform.saved_bits == pytest.approx(0.0, abs=1e-6) and not uniform.leaked
    assert uniform.chance_bpb == pytest.approx(math.log2(pool) / 6)
    memorised = canary_score(0.9 * targets * math.log(pool), targets, pool, num_bytes=targets * 6)
    assert memorised.saved_bits > LEAK_MARGIN_BITS and memorised.leaked


def test_canaries_draw_from_word_like_tokens():
    words = [f" {chr(97 + i // 26)}{chr(97 + i % 26)}x".encode() for i in range(100)]  # " aax", " abx", ...
    strings = [b"", b"ab", b" Caps", b"\n", *words]
    assert word_tokens(strings).tolist() == list(range(4, 104))
    few = [b"", b" the", b"ab", b"\n"]  # too few word-like tokens: any regular token
    assert word_tokens(few).tolist() == [1, 2, 3]
