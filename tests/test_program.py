"""program.md (the template) and `autoresearch program` (the template with the session's facts)."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from autoresearch.cli import app
from harness.config import EvaluatorConstants, RunConfig, default_config_path, save_config
from harness.hardware.detect import probe
from harness.hardware.presets import memory_gb
from loop.agents import FACTS_BEGIN, FACTS_END
from loop.results import ResultRow, append_row

PROJECT = Path(__file__).resolve().parent.parent
runner = CliRunner()


def test_the_template_states_the_protocol():
    text = (PROJECT / "program.md").read_text()
    assert text.count(FACTS_BEGIN) == 1 and text.count(FACTS_END) == 1
    assert text.index(FACTS_BEGIN) < text.index(FACTS_END)
    for must in ("lowest `val_bpb`", "autoresearch try -m", "harness/", "presets/", "pyproject.toml",
                 "install packages", "## Simplicity", "## Never stop", "soft constraint", "noise"):
        assert must in text, must


@pytest.fixture
def repo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A repository with the shipped program.md, nothing set up yet."""
    root = tmp_path / "repo"
    (root / "harness").mkdir(parents=True)
    (root / "backends").mkdir()
    shutil.copy(PROJECT / "program.md", root / "program.md")
    monkeypatch.setenv("AUTORESEARCH_ROOT", str(root))
    monkeypatch.delenv("AUTORESEARCH_CONFIG", raising=False)
    return root


def set_up(root: Path) -> None:
    evaluator = EvaluatorConstants(MAX_SEQ_LEN=256, EVAL_TOKENS=8192, TIME_BUDGET=4, VOCAB_SIZE=4096,
                                   DATA_SOURCE="builtin", EVAL_BATCH_SIZE=32, BASELINE_REPEATS=2)
    save_config(RunConfig(backend="cuda", device="cpu", preset="cpu-tiny", evaluator=evaluator, data_dir="d",
                          tokenizer_dir="t", tokens_dir="k", unigram_bpb=3.1), default_config_path(root))


def facts_block(text: str) -> str:
    match = re.search(re.escape(FACTS_BEGIN) + r"(.*?)" + re.escape(FACTS_END), text, re.DOTALL)
    assert match, "no facts block"
    return match.group(1)


def test_program_fills_the_facts_from_setup_and_results(repo: Path):
    set_up(repo)
    results = repo / "results.tsv"
    for row in (ResultRow("b", 2.010, 0.3, "baseline", "baseline", noise_sigma=0.004),
                ResultRow("b", 2.002, 0.3, "baseline", "baseline", noise_sigma=0.004),
                ResultRow("k1", 1.950, 0.3, "keep", "MATRIX_LR 0.04 -> 0.06", noise_sigma=0.004),
                ResultRow("c1", 0, 0, "crash", "DEPTH 2 -> 3", reason="NameError: x")):
        append_row(results, row)
    result = runner.invoke(app, ["program"])
    assert result.exit_code == 0, result.output
    text = result.stdout
    block = facts_block(text)
    ram = memory_gb(probe(frameworks=False).cpu.ram_bytes)
    for fact in ("backend: cuda on cpu", "preset: cpu-tiny", "file to edit: backends/cuda/train.py",
                 "training budget: 4 s", "baseline val_bpb: 2.006000", "best val_bpb so far: 1.950000",
                 "run-to-run sigma 0.004000", f"memory ceiling (soft): {ram:.1f} GB",
                 "experiments so far: 2, kept: 1", "MATRIX_LR 0.04 -> 0.06", "DEPTH 2 -> 3 (NameError: x)"):
        assert fact in block, fact
    # The rest of the template is untouched around the block.
    template = (repo / "program.md").read_text()
    assert text.split(FACTS_BEGIN)[0] == template.split(FACTS_BEGIN)[0]
    assert text.split(FACTS_END)[1] == template.split(FACTS_END)[1]


def test_program_before_setup_still_prints_with_unknown_facts(repo: Path):
    result = runner.invoke(app, ["program"])
    assert result.exit_code == 0, result.output
    block = facts_block(result.stdout)
    assert "backend: not set up" in block and "baseline val_bpb: not measured yet" in block
    assert "nothing yet" in block
    assert "autoresearch setup" in " ".join(result.stderr.split())


def test_program_output_writes_a_file_but_never_over_the_template(repo: Path, tmp_path: Path):
    set_up(repo)
    out = tmp_path / "filled" / "program.md"
    result = runner.invoke(app, ["program", "--output", str(out), "--results", str(tmp_path / "none.tsv")])
    assert result.exit_code == 0, result.output
    assert result.stdout == "" and "preset: cpu-tiny" in out.read_text()

    template = (repo / "program.md").read_text()
    refused = runner.invoke(app, ["program", "--output", str(repo / "program.md")])
    assert refused.exit_code == 1 and "refusing to overwrite program.md" in " ".join(refused.stderr.split())
    assert (repo / "program.md").read_text() == template


def test_program_without_a_template_says_how_to_restore_it(repo: Path):
    (repo / "program.md").unlink()
    result = runner.invoke(app, ["program"])
    assert result.exit_code == 1 and "no program.md" in " ".join(result.stderr.split())


def test_program_on_a_session_branch_uses_the_session(repo: Path):
    """On `autoresearch/TAG`, the facts come from that session: its run config, rule, noise floor
    (z * sigma from its ledger) and its ledger of results."""
    import subprocess

    from loop.session import SessionConfig, SessionPaths, save_session_config

    subprocess.run(["git", "init", "-q", "-b", "autoresearch/night1"], cwd=repo, check=True)
    set_up(repo)  # a later `setup` for another preset must not leak into the session's facts
    evaluator = EvaluatorConstants(MAX_SEQ_LEN=256, EVAL_TOKENS=8192, TIME_BUDGET=7, VOCAB_SIZE=4096,
                                   DATA_SOURCE="builtin", EVAL_BATCH_SIZE=32, BASELINE_REPEATS=2)
    run = RunConfig(backend="mlx", device="cpu", preset="apple-16gb", evaluator=evaluator, data_dir="d",
                    tokenizer_dir="t", tokens_dir="k", unigram_bpb=3.1)
    paths = SessionPaths.of(repo, "night1")
    save_session_config(SessionConfig(tag="night1", branch="autoresearch/night1", backend="mlx", preset="apple-16gb",
                                      rule="noise", z=2.0, min_floor=3e-4, repeats=2, timeout=60,
                                      trainer="backends/mlx/train.py", base_commit="0" * 40, run=run), paths)
    for row in (ResultRow("b", 2.010, 0.3, "baseline", "baseline", noise_sigma=0.004),
                ResultRow("b", 2.002, 0.3, "baseline", "baseline", noise_sigma=0.004),
                ResultRow("k1", 1.950, 0.3, "keep", "WARMDOWN_RATIO 0.5 -> 0.7", noise_sigma=0.004)):
        append_row(paths.ledger, row)

    result = runner.invoke(app, ["program"])
    assert result.exit_code == 0, result.output
    block = facts_block(result.stdout)
    for fact in ("backend: mlx on cpu", "preset: apple-16gb", "file to edit: backends/mlx/train.py",
                 "training budget: 7 s", "lowers val_bpb by more than 0.008000 (run-to-run sigma 0.004000)",
                 "keep rule: noise", "best val_bpb so far: 1.950000", "WARMDOWN_RATIO 0.5 -> 0.7"):
        assert fact in block, fact
    assert "cpu-tiny" not in block
