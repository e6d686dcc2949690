"""Who proposes the next change: an external CLI agent, or the built-in offline proposer.

`autoresearch loop --agent CMD` builds a prompt (`program.md` with the session's facts filled in,
the last results, the file to edit, how to finish), runs CMD in the repository with its own
timeout, then hands the edited trainer to `try` with the description the agent gave. CMD is any
shell command line. The prompt reaches it on stdin, or, when CMD contains `{prompt_file}`, as the
path of a temporary file holding it (outside the working tree, so it never dirties the change);
`$AUTORESEARCH_PROMPT_FILE` names that file in both cases. The agent must only edit the trainer:
the harness runs, scores, commits or reverts. Its reply's first non-empty line (stdout) becomes the
description (`description_from`).

Driving the common agents (check `--help` of your version; flags move):

- Claude Code, prompt on stdin, print mode, no permission prompts:
    autoresearch loop --agent "claude -p --dangerously-skip-permissions"
  (`--permission-mode acceptEdits` instead of skipping all permissions lets it edit files but not
  run commands, which is all it needs here.)
- Codex, non-interactive, allowed to write the workspace; `-` reads the prompt from stdin and only
  the final message goes to stdout:
    autoresearch loop --agent "codex exec --sandbox workspace-write -"
  or with the prompt file: `--agent 'codex exec --sandbox workspace-write "$(cat {prompt_file})"'`
  (older releases spell the sandbox flag `--full-auto`).
- aider, one message from a file, the trainer as the only file in the chat, no commits of its own
  (the harness commits):
    autoresearch loop --agent "aider --yes-always --no-auto-commits --message-file {prompt_file} backends/cuda/train.py"
- `--agent mutate`: no model at all; `mutate` below perturbs one numeric constant. A baseline any
  agent should beat, and what the tests drive.
"""

from __future__ import annotations

import math
import os
import random
import re
import shlex
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from harness.processes import kill_process_tree, new_process_group
from harness.trainer_constants import format_value, read_constants, write_constants
from loop.results import ResultRow, ResultsReport, sanitize

FACTS_BEGIN = "<!-- facts -->"
FACTS_END = "<!-- /facts -->"
PROMPT_FILE_ENV = "AUTORESEARCH_PROMPT_FILE"
DESCRIPTION_LIMIT = 120
_FACTS_BLOCK = re.compile(re.escape(FACTS_BEGIN) + r".*?" + re.escape(FACTS_END), re.DOTALL)


# -- the prompt -----------------------------------------------------------------------------------

@dataclass
class PromptFacts:
    """What an agent needs to know about the session besides `program.md` itself."""

    program: str  # the text of program.md
    backend: str
    preset: str
    trainer: str  # the one file to edit, relative to the repository root
    best_bpb: float | None = None
    baseline_bpb: float | None = None
    noise_floor: float | None = None  # the gain a change must beat to be kept
    noise_sigma: float | None = None
    memory_ceiling_gb: float | None = None
    recent: list[ResultRow] = field(default_factory=list)  # the last rows, oldest first
    tried: list[str] = field(default_factory=list)  # one line per experiment so far
    device: str = ""
    time_budget: float | None = None
    rule: str = ""  # the keep rule, "noise" or "strict", optionally with how it decides
    experiments: int = 0
    kept: int = 0


def tried_lines(rows: list[ResultRow], limit: int = 60) -> list[str]:
    """One line per experiment (baseline repeats left out): verdict, val_bpb, what changed."""
    lines = []
    for row in rows:
        if row.status == "baseline":
            continue
        score = f"{row.val_bpb:.6f}" if row.scored else "-"
        why = f" ({row.reason})" if row.reason and not row.scored else ""
        lines.append(f"{row.status:<8} {score:>9}  {row.description or '(no description)'}{why}")
    if len(lines) > limit:
        lines = [f"... {len(lines) - limit} earlier experiments not shown"] + lines[-limit:]
    return lines


def facts_from_rows(program: str, backend: str, preset: str, trainer: str, rows: list[ResultRow],
                    recent: int = 10, **extra) -> PromptFacts:
    """PromptFacts from the results so far; `extra` sets the fields the rows cannot tell
    (noise_floor, memory_ceiling_gb, device, time_budget, rule)."""
    summary = ResultsReport.from_rows(rows)
    return PromptFacts(
        program=program, backend=backend, preset=preset, trainer=trainer,
        best_bpb=summary.best_bpb, baseline_bpb=summary.baseline_bpb,
        noise_sigma=extra.pop("noise_sigma", None) or summary.noise_sigma,
        recent=rows[-recent:] if recent else [], tried=tried_lines(rows),
        experiments=summary.experiments, kept=summary.kept, **extra,
    )


def memory_ceiling_gb(device: str) -> float | None:
    """The memory of the device experiments run on: the accelerator's, or the RAM for `cpu`;
    None when it cannot be told (a fact the prompt can go without)."""
    if not device:
        return None
    try:
        from harness.hardware.detect import probe
        from harness.hardware.presets import memory_gb, primary_accelerator

        report = probe(frameworks=False)
        if device == "cpu":
            return memory_gb(report.cpu.ram_bytes) if report.cpu.ram_bytes else None
        accelerator = primary_accelerator(report)
        return accelerator.memory_gb if accelerator else None
    except Exception:  # a fact we can go without; never a reason to fail
        return None


def _bpb(value: float | None) -> str:
    return "not measured yet" if value is None else f"{value:.6f}"


def render_facts(facts: PromptFacts) -> str:
    """The session facts as plain `key: value` lines (what fills program.md's facts block)."""
    lines = [
        f"backend: {facts.backend}" + (f" on {facts.device}" if facts.device else ""),
        f"preset: {facts.preset}",
        f"file to edit: {facts.trainer}",
    ]
    if facts.time_budget:
        lines.append(f"training budget: {facts.time_budget:g} s of wall clock per experiment")
    lines.append(f"baseline val_bpb: {_bpb(facts.baseline_bpb)}")
    lines.append(f"best val_bpb so far: {_bpb(facts.best_bpb)}")
    if facts.rule.startswith("strict"):
        noise = "not used: the strict rule keeps any single run below the best"
        if facts.noise_sigma is not None:
            noise += f" (run-to-run sigma {facts.noise_sigma:.6f})"
    elif facts.noise_floor is not None:
        noise = f"a change is kept only if it lowers val_bpb by more than {facts.noise_floor:.6f}"
        if facts.noise_sigma is not None:
            noise += f" (run-to-run sigma {facts.noise_sigma:.6f})"
    elif facts.noise_sigma is not None:
        noise = f"run-to-run sigma {facts.noise_sigma:.6f}; gains smaller than about 2 sigma are noise"
    else:
        noise = "not measured yet"
    lines.append(f"noise floor: {noise}")
    if facts.rule:
        lines.append(f"keep rule: {facts.rule}")
    ceiling = f"{facts.memory_ceiling_gb:.1f} GB" if facts.memory_ceiling_gb else "not known"
    lines.append(f"memory ceiling (soft): {ceiling}")
    lines.append(f"experiments so far: {facts.experiments}, kept: {facts.kept}")
    lines.append("what has been tried:")
    lines.extend(f"  {line}" for line in facts.tried or ["nothing yet"])
    return "\n".join(lines)


def fill_facts(program: str, facts_text: str) -> str:
    """program.md with its `<!-- facts -->` block replaced (appended when the markers are missing)."""
    block = f"{FACTS_BEGIN}\n```text\n{facts_text.rstrip()}\n```\n{FACTS_END}"
    if _FACTS_BLOCK.search(program):
        return _FACTS_BLOCK.sub(lambda _: block, program, count=1)
    return program.rstrip() + "\n\n## Session facts\n\n" + block + "\n"


def build_prompt(facts: PromptFacts) -> str:
    """The whole prompt for one iteration: program.md with the facts, the last results, the task."""
    parts = [fill_facts(facts.program, render_facts(facts)).rstrip()]
    if facts.recent:
        table = ["commit\tval_bpb\tmemory_gb\tstatus\tdescription"]
        table += ["\t".join(row.cells()[c] for c in ("commit", "val_bpb", "memory_gb", "status", "description"))
                  for row in facts.recent]
        parts.append(f"## The last {len(facts.recent)} results (results.tsv, oldest first)\n\n"
                     "```tsv\n" + "\n".join(table) + "\n```")
    best = f" (best so far: val_bpb {facts.best_bpb:.6f})" if facts.best_bpb is not None else ""
    parts.append(
        "## Your task now\n\n"
        f"Make ONE experimental change to `{facts.trainer}` that you expect to lower val_bpb{best}. "
        "Look at what has been tried above and do not repeat it.\n\n"
        f"- Edit only `{facts.trainer}`. Every other file is frozen; a change to one is rejected.\n"
        "- Do not run anything: no training, no `autoresearch try`, no git, no package installs. "
        "The harness trains, scores, commits and keeps or reverts your change after you finish.\n"
        "- When the edit is saved, reply with exactly one line: a short description of the change "
        "(it becomes the commit message and the results.tsv description), e.g. "
        "`MATRIX_LR 0.04 -> 0.05` or `SwiGLU MLP instead of ReLU^2`."
    )
    return "\n\n".join(parts) + "\n"


# -- running an external agent --------------------------------------------------------------------

@dataclass
class AgentOutcome:
    description: str  # first non-empty line of stdout, sanitized ("" if none)
    output: str  # stdout
    returncode: int | None  # None when it was killed at its timeout
    timed_out: bool
    stderr: str = ""


def description_from(output: str, limit: int = DESCRIPTION_LIMIT) -> str:
    """The first non-empty line of an agent's reply, without Markdown dressing, as one short line."""
    for line in output.splitlines():
        text = line.strip()
        text = re.sub(r"^(?:[-*>#]+\s*|\d+[.)]\s+)", "", text)  # bullet, quote, heading, numbering
        text = re.sub(r"^(?:description|commit message)\s*:\s*", "", text, flags=re.IGNORECASE)
        text = text.strip().strip("`*_\"'").strip()
        if text:
            return sanitize(text, limit)
    return ""


def run_agent(cmd: str, prompt: str, root: Path, timeout: float) -> AgentOutcome:
    """Run the agent command line `cmd` in `root` with the prompt on stdin (or in `{prompt_file}`),
    killing it and everything it started once `timeout` seconds have passed."""
    if not cmd.strip():
        raise ValueError("the agent command is empty: pass e.g. --agent 'claude -p' or --agent mutate")
    workdir = Path(tempfile.mkdtemp(prefix="autoresearch-prompt-"))
    try:
        prompt_file = workdir / "prompt.md"
        prompt_file.write_text(prompt, encoding="utf-8")
        uses_file = "{prompt_file}" in cmd
        command = cmd.replace("{prompt_file}", _quote(str(prompt_file))) if uses_file else cmd
        env = dict(os.environ, **{PROMPT_FILE_ENV: str(prompt_file)})
        proc = subprocess.Popen(
            command, shell=True, cwd=root, env=env, text=True, encoding="utf-8", errors="replace",
            stdin=subprocess.DEVNULL if uses_file else subprocess.PIPE,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **new_process_group(),
        )
        timed_out = False
        try:
            stdout, stderr = proc.communicate(None if uses_file else prompt, timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            kill_process_tree(proc)
            stdout, stderr = _drain(proc)
        except BaseException:
            kill_process_tree(proc)  # Ctrl-C in the loop must not leave an agent editing files
            raise
        returncode = None if timed_out else proc.returncode
        return AgentOutcome(description_from(stdout), stdout, returncode, timed_out, stderr)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _quote(path: str) -> str:
    return subprocess.list2cmdline([path]) if os.name == "nt" else shlex.quote(path)


def _drain(proc: subprocess.Popen) -> tuple[str, str]:
    # What it printed before the kill; a grandchild that escaped the group may hold the pipes, so
    # do not wait on them forever.
    try:
        return proc.communicate(timeout=5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        return "", ""


# -- the built-in offline proposer ----------------------------------------------------------------

@dataclass(frozen=True)
class Knob:
    """How one constant may move: `scale` multiplies, `shift` adds, `seed` draws a new seed."""

    kind: str
    moves: tuple[float, ...]
    low: float
    high: float


_SCALES = (0.5, 0.67, 0.8, 1.25, 1.5, 2.0)
KNOBS: dict[str, Knob] = {
    "MATRIX_LR": Knob("scale", _SCALES, 1e-4, 1.0),
    "EMBEDDING_LR": Knob("scale", _SCALES, 1e-3, 10.0),
    "UNEMBEDDING_LR": Knob("scale", _SCALES, 1e-5, 1.0),
    "SCALAR_LR": Knob("scale", _SCALES, 1e-3, 10.0),
    "WEIGHT_DECAY": Knob("shift", (-0.1, -0.05, 0.05, 0.1), 0.0, 1.0),
    "WARMDOWN_RATIO": Knob("shift", (-0.2, -0.1, -0.05, 0.05, 0.1, 0.2), 0.0, 1.0),
    "WARMUP_RATIO": Knob("shift", (-0.05, -0.02, 0.02, 0.05), 0.0, 0.5),
    "FINAL_LR_FRAC": Knob("shift", (-0.1, -0.05, 0.05, 0.1), 0.0, 1.0),
    "DEPTH": Knob("shift", (-1, 1), 1, 32),
    "ASPECT_RATIO": Knob("shift", (-16, -8, 8, 16), 8, 256),
    "SEED": Knob("seed", (), 0, 10**6),  # any other seed; small numbers read better
    # Batch sizes move only in ways that keep TOTAL_BATCH_SIZE divisible by
    # DEVICE_BATCH_SIZE * MAX_SEQ_LEN (see _batch_moves).
    "TOTAL_BATCH_SIZE": Knob("batch", (0.5, 2.0), 1, 2**24),
    "DEVICE_BATCH_SIZE": Knob("batch", (0.5, 2.0), 1, 1024),
}


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _candidates(name: str, value: float, knob: Knob, constants: dict, max_seq_len: int | None) -> list:
    if knob.kind == "seed":
        return []  # drawn separately: any other int
    if knob.kind == "batch":
        return _batch_moves(name, int(value), constants, max_seq_len)
    out = set()
    for move in knob.moves:
        new = value * move if knob.kind == "scale" else value + move
        if isinstance(value, int) and knob.kind == "shift" and float(move).is_integer():
            new = int(new)
        elif knob.kind == "scale":
            new = float(f"{new:.3g}")  # 0.04 * 1.5 -> 0.06, not 0.06000000000000001
        else:
            new = round(new, 4)
        new = min(max(new, knob.low), knob.high)
        if new != value:
            out.add(new)
    return sorted(out)


def _batch_moves(name: str, value: int, constants: dict, max_seq_len: int | None) -> list[int]:
    total, device = constants.get("TOTAL_BATCH_SIZE"), constants.get("DEVICE_BATCH_SIZE")
    moves = []
    if name == "TOTAL_BATCH_SIZE":
        moves.append(value * 2)  # a multiple of a multiple stays a multiple
        if max_seq_len and _is_number(device) and value % (2 * int(device) * max_seq_len) == 0:
            moves.append(value // 2)
    elif name == "DEVICE_BATCH_SIZE":
        if value % 2 == 0:
            moves.append(value // 2)  # halving the micro-batch keeps the total divisible
        if max_seq_len and _is_number(total) and int(total) % (2 * value * max_seq_len) == 0:
            moves.append(value * 2)
    knob = KNOBS[name]
    return sorted(m for m in moves if knob.low <= m <= knob.high and m != value)


def mutate(trainer_path: Path, rng: random.Random, max_seq_len: int | None = None) -> str:
    """Perturb ONE numeric constant of the trainer within its sane range (see KNOBS) and return
    a description such as `MATRIX_LR 0.04 -> 0.06`. Deterministic for a given rng state.
    `max_seq_len` (the session's) also allows batch-size moves that need it to stay divisible.
    Raises ValueError when the trainer defines none of the known constants."""
    trainer_path = Path(trainer_path)
    constants = read_constants(trainer_path.read_text())
    names = sorted(n for n in KNOBS if n in constants and _is_number(constants[n]))
    rng.shuffle(names)
    for name in names:
        old, knob = constants[name], KNOBS[name]
        if knob.kind == "seed":
            new = old
            while new == old:
                new = rng.randrange(int(knob.low), int(knob.high))
        else:
            choices = _candidates(name, old, knob, constants, max_seq_len)
            if not choices:
                continue
            new = rng.choice(choices)
        try:
            write_constants(trainer_path, {name: new})
        except KeyError:
            continue  # assigned in a form the line rewriter does not touch; try another
        return f"{name} {format_value(old)} -> {format_value(new)}"
    known = ", ".join(sorted(KNOBS))
    raise ValueError(f"{trainer_path} defines none of the constants mutate can change ({known}) "
                     "as a simple `NAME = number` line")
