"""The agent driver (prompt, any CLI agent with its own timeout) and the built-in `mutate` proposer."""

from __future__ import annotations

import os
import random
import sys
import textwrap
import time
from pathlib import Path

import pytest

from harness.trainer_constants import format_value, read_constants, write_constants
from loop.agents import (FACTS_BEGIN, FACTS_END, KNOBS, PROMPT_FILE_ENV, PromptFacts, build_prompt, description_from,
                         facts_from_rows, fill_facts, mutate, run_agent)
from loop.results import ResultRow

PROJECT = Path(__file__).resolve().parent.parent
CPU_TINY = {"DEPTH": 2, "ASPECT_RATIO": 64, "HEAD_DIM": 64, "DEVICE_BATCH_SIZE": 16, "TOTAL_BATCH_SIZE": 4096,
            "WINDOW_PATTERN": "SL"}
SEQ_LEN = 256  # cpu-tiny's MAX_SEQ_LEN


@pytest.fixture
def trainer(tmp_path: Path) -> Path:
    """A copy of the real reference trainer with the cpu-tiny starting constants, as setup writes them."""
    path = tmp_path / "train.py"
    path.write_text((PROJECT / "backends" / "cuda" / "train.py").read_text())
    write_constants(path, CPU_TINY)
    return path


# -- mutate ---------------------------------------------------------------------------------------

def test_mutate_changes_exactly_one_constant_within_its_range(trainer: Path):
    seen = set()
    before = read_constants(trainer.read_text())
    for seed in range(40):
        description = mutate(trainer, random.Random(seed), max_seq_len=SEQ_LEN)
        after = read_constants(trainer.read_text())  # parses: still a Python file
        changed = [name for name in before if before[name] != after[name]]
        assert len(changed) == 1 and set(after) == set(before), description
        name = changed[0]
        knob = KNOBS[name]
        assert knob.low <= after[name] <= knob.high, description
        assert isinstance(after[name], type(before[name])) or isinstance(before[name], float), description
        assert description == f"{name} {format_value(before[name])} -> {format_value(after[name])}"
        # Never a batch geometry the trainer refuses (it must stay divisible).
        assert after["TOTAL_BATCH_SIZE"] % (after["DEVICE_BATCH_SIZE"] * SEQ_LEN) == 0, description
        seen.add(name)
        before = after
    assert {"HEAD_DIM", "WINDOW_PATTERN", "ADAM_BETAS"}.isdisjoint(seen)
    assert len(seen) >= 8, seen  # it explores, not one knob forever


def test_mutate_rounds_to_readable_values(trainer: Path):
    for seed in range(40):
        description = mutate(trainer, random.Random(seed))
        new = description.rsplit(" -> ", 1)[1]
        assert len(new) <= 12 and "000000" not in new, description


def test_mutate_is_deterministic_for_a_seed(tmp_path: Path, trainer: Path):
    twin = tmp_path / "twin.py"
    twin.write_text(trainer.read_text())
    rng_a, rng_b = random.Random(123), random.Random(123)
    assert [mutate(trainer, rng_a) for _ in range(6)] == [mutate(twin, rng_b) for _ in range(6)]
    assert trainer.read_text() == twin.read_text()
    fresh = tmp_path / "fresh.py"
    outcomes = set()
    for seed in range(10):
        fresh.write_text(twin.read_text())
        outcomes.add(mutate(fresh, random.Random(seed)))
    assert len(outcomes) > 3  # different seeds, different proposals


def test_mutate_batch_moves_respect_divisibility(tmp_path: Path):
    path = tmp_path / "train.py"
    path.write_text("TOTAL_BATCH_SIZE = 2**12  # tokens\nDEVICE_BATCH_SIZE = 16  # rows\n")
    results = set()
    for seed in range(30):
        path.write_text("TOTAL_BATCH_SIZE = 2**12  # tokens\nDEVICE_BATCH_SIZE = 16  # rows\n")
        results.add(mutate(path, random.Random(seed), max_seq_len=256))
    # 4096 = 16 * 256: only doubling the total or halving the micro-batch keeps it divisible.
    assert results == {"TOTAL_BATCH_SIZE 2**12 -> 2**13", "DEVICE_BATCH_SIZE 16 -> 8"}


def test_mutate_seed_draws_another_seed(tmp_path: Path):
    path = tmp_path / "train.py"
    path.write_text("SEED = 42  # init\n")
    description = mutate(path, random.Random(0))
    new = read_constants(path.read_text())["SEED"]
    assert isinstance(new, int) and new != 42 and description == f"SEED 42 -> {new}"
    assert path.read_text() == f"SEED = {new}  # init\n"


def test_mutate_moves_a_zero_ratio_up_not_below_zero(tmp_path: Path):
    for seed in range(10):
        path = tmp_path / "train.py"
        path.write_text("WARMUP_RATIO = 0.0  # fraction\n")
        mutate(path, random.Random(seed))
        assert 0.0 < read_constants(path.read_text())["WARMUP_RATIO"] <= 0.5


def test_mutate_without_known_constants_says_so(tmp_path: Path):
    path = tmp_path / "train.py"
    path.write_text('HEAD_DIM = 64\nWINDOW_PATTERN = "SL"\n')
    with pytest.raises(ValueError, match="none of the constants mutate can change"):
        mutate(path, random.Random(0))
    assert path.read_text() == 'HEAD_DIM = 64\nWINDOW_PATTERN = "SL"\n'


# -- the prompt -----------------------------------------------------------------------------------

def sample_facts(program: str) -> PromptFacts:
    rows = [
        ResultRow("base001", 1.8012, 1.1, "baseline", "baseline", noise_sigma=0.0013),
        ResultRow("base001", 1.8030, 1.1, "baseline", "baseline", noise_sigma=0.0013),
        ResultRow("abc1234", 1.7900, 1.2, "keep", "MATRIX_LR 0.04 -> 0.06", noise_sigma=0.0013),
        ResultRow("def5678", 0.0, 0.0, "crash", "DEPTH 2 -> 30", reason="out of memory"),
        ResultRow("0123abc", 1.7950, 1.2, "discard", "SEED 42 -> 137", noise_sigma=0.0013),
    ]
    return facts_from_rows(program, "cuda", "cpu-tiny", "backends/cuda/train.py", rows, recent=3,
                           noise_floor=0.0026, memory_ceiling_gb=15.5, device="cpu", time_budget=60)


def test_build_prompt_has_program_facts_results_and_the_file_to_edit():
    program = (PROJECT / "program.md").read_text()
    assert FACTS_BEGIN in program and FACTS_END in program  # the template has a facts block
    prompt = build_prompt(sample_facts(program))
    assert "## Simplicity" in program and "## Simplicity" in prompt  # the program text itself
    assert "(filled in by `autoresearch program`)" not in prompt  # the placeholder was replaced
    for fact in ("backend: cuda on cpu", "preset: cpu-tiny", "file to edit: backends/cuda/train.py",
                 "baseline val_bpb: 1.802100", "best val_bpb so far: 1.790000",
                 "lowers val_bpb by more than 0.002600", "memory ceiling (soft): 15.5 GB",
                 "experiments so far: 3, kept: 1", "training budget: 60 s"):
        assert fact in prompt, fact
    # What has been tried, including why a crash crashed; the last results as upstream's columns.
    assert "crash" in prompt and "DEPTH 2 -> 30 (out of memory)" in prompt
    assert "0123abc\t1.795000\t1.2\tdiscard\tSEED 42 -> 137" in prompt
    assert "Edit only `backends/cuda/train.py`" in prompt
    assert "Do not run anything" in prompt and "exactly one line" in prompt


def test_fill_facts_replaces_the_block_or_appends_one():
    filled = fill_facts(f"# P\n\n{FACTS_BEGIN}\nold\n{FACTS_END}\n\n## Rules\n", "backend: mlx")
    assert "old" not in filled and "backend: mlx" in filled and filled.endswith("## Rules\n")
    assert fill_facts(filled, "backend: cuda").count(FACTS_BEGIN) == 1  # re-fillable
    appended = fill_facts("# A program without markers\n", "backend: mlx")
    assert appended.startswith("# A program without markers") and "## Session facts" in appended
    assert "backend: mlx" in appended


def test_facts_before_any_result_say_not_measured():
    facts = facts_from_rows("# P\n", "mlx", "apple-16gb", "backends/mlx/train.py", [])
    prompt = build_prompt(facts)
    assert "baseline val_bpb: not measured yet" in prompt and "nothing yet" in prompt


@pytest.mark.parametrize("output, expected", [
    ("MATRIX_LR 0.04 -> 0.05\nI changed the learning rate.", "MATRIX_LR 0.04 -> 0.05"),
    ("\n\n  - **SwiGLU MLP**  \n", "SwiGLU MLP"),
    ("Description: `warmup 5%`\n", "warmup 5%"),
    ("", ""),
    ("x" * 300, "x" * 117 + "..."),
])
def test_description_from(output: str, expected: str):
    assert description_from(output) == expected


# -- running an agent -----------------------------------------------------------------------------

def write_agent(tmp_path: Path, body: str) -> str:
    script = tmp_path / "agent.py"
    script.write_text(textwrap.dedent(body))
    return f"{sys.executable} {script}"


def test_run_agent_passes_the_prompt_on_stdin_and_runs_in_the_root(tmp_path: Path):
    root = tmp_path / "repo"
    root.mkdir()
    (root / "train.py").write_text("DEPTH = 2\n")
    cmd = write_agent(tmp_path, """
        import sys
        prompt = sys.stdin.read()
        with open("train.py", "a") as f:  # relative: the agent runs in the repository
            f.write(f"# read {len(prompt)} chars\\n")
        print()
        print("DEPTH 2 -> 3")
        print("(and some chatter)", file=sys.stderr)
    """)
    prompt = "Edit train.py. ünïcode ok.\n" * 500  # larger than a pipe buffer
    outcome = run_agent(cmd, prompt, root, timeout=30)
    assert (outcome.returncode, outcome.timed_out) == (0, False)
    assert outcome.description == "DEPTH 2 -> 3"
    assert "chatter" in outcome.stderr and "chatter" not in outcome.output
    assert (root / "train.py").read_text() == f"DEPTH = 2\n# read {len(prompt)} chars\n"


def test_run_agent_with_a_prompt_file(tmp_path: Path):
    root = tmp_path / "repo"
    root.mkdir()
    cmd = write_agent(tmp_path, """
        import os, sys
        path = sys.argv[1]
        text = open(path, encoding="utf-8").read()
        same = os.environ["AUTORESEARCH_PROMPT_FILE"] == path
        stdin = sys.stdin.read()
        open("seen.txt", "w", encoding="utf-8").write(f"{path}\\n{same}\\n{len(stdin)}\\n{text}")
        print("used the file")
        sys.exit(4)
    """) + " {prompt_file}"
    outcome = run_agent(cmd, "the prompt\nline two", root, timeout=30)
    assert outcome.returncode == 4 and outcome.description == "used the file"
    path, same, stdin_chars, text = (root / "seen.txt").read_text().split("\n", 3)
    assert (same, stdin_chars, text) == ("True", "0", "the prompt\nline two")
    assert not Path(path).exists()  # the temporary prompt is cleaned up
    assert not Path(path).resolve().is_relative_to(root.resolve())  # and never in the working tree
    assert PROMPT_FILE_ENV not in os.environ


def _dead(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return True
    return "\nState:\tZ" in status


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="checks process state through /proc")
def test_a_hanging_agent_and_its_children_are_killed_at_the_timeout(tmp_path: Path):
    pid_file = tmp_path / "child.pid"
    cmd = write_agent(tmp_path, f"""
        import subprocess, sys, time
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
        open({str(pid_file)!r}, "w").write(str(child.pid))
        print("thinking...", flush=True)
        time.sleep(120)
    """)
    start = time.monotonic()
    outcome = run_agent(cmd, "prompt", tmp_path, timeout=2)
    elapsed = time.monotonic() - start
    assert outcome.timed_out and outcome.returncode is None
    assert elapsed < 15
    assert outcome.output.strip() == "thinking..."
    child = int(pid_file.read_text())
    deadline = time.monotonic() + 5
    while not _dead(child) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _dead(child), "the agent's child outlived the timeout"


def test_an_empty_agent_command_is_refused(tmp_path: Path):
    with pytest.raises(ValueError, match="agent command is empty"):
        run_agent("  ", "prompt", tmp_path, timeout=1)
