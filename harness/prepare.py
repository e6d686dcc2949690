"""`autoresearch setup`: everything a run needs, built once and reused.

Detect -> preset -> data -> tokenizer -> token files -> unigram baseline -> the preset's starting
constants written into the trainer -> the run configuration. Every artefact is checked on reuse
and rebuilt when missing, partial or corrupt, so a second `setup` is cheap and a crashed one
recovers.
"""

from __future__ import annotations

import dataclasses
import hashlib
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from harness.config import EvaluatorConstants, RunConfig, default_config_path, save_config
from harness.paths import cache_dir, trainer_path
from harness.scoring.evalset import private_root, save_eval_pointer
from harness.data.evalset import eval_set_directory

Log = Callable[[str], None]


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


@dataclass(frozen=True)
class SetupRequest:
    root: Path
    backend: str | None = None
    preset: str | None = None
    data: str | None = None
    num_shards: int | None = None
    overrides: dict[str, str] = field(default_factory=dict)  # evaluator constants, from --set
    workers: int = 8


def apply_overrides(evaluator: EvaluatorConstants, overrides: dict[str, str], data: str | None) -> EvaluatorConstants:
    """Evaluator constants with `--set KEY=VALUE` and `--data` applied, each type-checked."""
    fields = {f.name: f for f in dataclasses.fields(EvaluatorConstants)}
    changes: dict[str, Any] = {}
    for key, raw in overrides.items():
        name = key.upper()
        if name not in fields:
            raise ValueError(f"unknown evaluator constant {key!r}; valid: {', '.join(fields)}")
        kind = type(getattr(evaluator, name))
        if kind is str:
            changes[name] = raw
            continue
        what = "an integer" if kind is int else "a number"
        try:
            value = float(raw)  # ints may be written as 2e6, but are never truncated
        except ValueError:
            raise ValueError(f"{name} must be {what}, got {raw!r}") from None
        if kind is int and not value.is_integer():
            raise ValueError(f"{name} must be {what}, got {raw!r}")
        changes[name] = int(value) if kind is int else value
    if data:
        changes["DATA_SOURCE"] = data
    return dataclasses.replace(evaluator, **changes)


def artefact_key(source: str, files: list[Path], vocab_size: int) -> str:
    """Names the tokenizer and token files built from exactly these shards at this vocab."""
    digest = hashlib.sha256()
    for path in files:
        digest.update(f"{path.name}:{path.stat().st_size}\n".encode())
    safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in source)[:40]
    return f"{safe}-v{vocab_size}-{digest.hexdigest()[:12]}"


def run_setup(request: SetupRequest, log: Log = _stderr) -> RunConfig:
    from harness.hardware import detect
    from harness.data.sources import prepare_data
    from harness.hardware.presets import get_preset, load_presets
    from harness.trainer_constants import write_constants

    report = detect.probe()
    presets = load_presets()
    choice = detect.choose(report, presets, backend=request.backend, preset=request.preset)
    for what, reason in choice.reasons.items():
        log(f"{what}: {reason}")
    preset = get_preset(choice.preset, presets)
    evaluator = apply_overrides(preset.evaluator, request.overrides, request.data)

    log(f"data: {evaluator.DATA_SOURCE}")
    split = prepare_data(evaluator.DATA_SOURCE, num_shards=request.num_shards or preset.num_shards,
                         workers=request.workers)
    key = artefact_key(evaluator.DATA_SOURCE, [*split.train_files, split.val_file], evaluator.VOCAB_SIZE)
    tokenizer_dir = cache_dir() / "tokenizers" / key
    tokens_dir = cache_dir() / "tokens" / key  # training tokens only: the trainer's configuration names it
    private = private_root() / key  # the evaluator's: validation tokens, evaluation sets
    tokenizer = ensure_tokenizer(split.train_files, evaluator.VOCAB_SIZE, tokenizer_dir, log)
    train_tokens = ensure_tokens(split.train_files, tokenizer, tokens_dir / "train", log)
    val_tokens = ensure_tokens([split.val_file], tokenizer, private / "val", log)
    eval_set = ensure_evaluation_set(val_tokens, train_tokens, tokenizer, tokenizer_dir, evaluator,
                                     eval_set_directory(private, evaluator), f"the validation data of {evaluator.DATA_SOURCE}", split, log)
    unigram = eval_set.unigram_bpb["val"]
    log(f"unigram baseline: {unigram:.4f} bpb on {evaluator.EVAL_TOKENS:,} validation tokens")

    trainer = trainer_path(request.root, choice.backend)
    write_constants(trainer, preset.trainer)
    log(f"wrote the {preset.name} preset's starting constants into {trainer.relative_to(request.root)}")

    config = RunConfig(
        backend=choice.backend, device=choice.device, preset=preset.name, evaluator=evaluator,
        data_dir=str(split.directory), tokenizer_dir=str(tokenizer_dir), tokens_dir=str(tokens_dir),
        unigram_bpb=unigram, reasons=dict(choice.reasons),
    )
    save_config(config, default_config_path(request.root))
    save_eval_pointer(request.root, eval_set.directory)
    return config


def ensure_tokenizer(train_files: list[Path], vocab_size: int, directory: Path, log: Log):
    from harness.data.documents import iter_documents
    from harness.data.tokenizer import load_tokenizer, train_tokenizer

    try:
        tokenizer = load_tokenizer(directory)
        log(f"tokenizer: reusing {directory}")
        return tokenizer
    except (FileNotFoundError, ValueError, OSError) as exc:
        if directory.exists():
            log(f"tokenizer: rebuilding ({exc})")
    log(f"tokenizer: training vocab {vocab_size} on {len(train_files)} shard(s)")
    return train_tokenizer(iter_documents(train_files), vocab_size, directory)


def ensure_tokens(files: list[Path], tokenizer, prefix: Path, log: Log):
    from harness.data.documents import iter_documents
    from harness.data.tokens import TokenFile, write_token_file

    try:
        tokens = TokenFile.open(prefix, verify=True)
        if tokens.meta.get("tokenizer") != tokenizer.fingerprint:
            raise ValueError("made with another tokenizer")
        log(f"tokens: reusing {prefix} ({tokens.num_tokens:,} tokens)")
        return tokens
    except (FileNotFoundError, ValueError, OSError) as exc:
        if prefix.with_suffix(".bin").exists():
            log(f"tokens: rebuilding {prefix.name} ({exc})")
    tokens = write_token_file(iter_documents(files), tokenizer, prefix)
    log(f"tokens: {prefix.name} has {tokens.num_tokens:,} tokens in {tokens.num_docs:,} documents")
    return tokens


def ensure_evaluation_set(val_tokens, train_tokens, tokenizer, tokenizer_dir: Path, evaluator: EvaluatorConstants,
                          directory: Path, val_name: str, split, log: Log):
    """The evaluator's validation and holdout rows with their canaries, and their unigram baselines."""
    from harness.data.evalset import ensure_eval_set, scored_rows, with_unigram
    from harness.data.tokenizer import load_token_bytes
    from harness.scoring.evaluate import unigram_bpb

    token_bytes = load_token_bytes(tokenizer_dir)
    strings = [tokenizer.encoding.decode_single_token_bytes(i) if token_bytes[i] else b""
               for i in range(len(token_bytes))]
    source = {"val_file": str(split.val_file), "tokenizer": tokenizer.fingerprint,
              "val_tokens": str(val_tokens.meta.get("bin_sha256", ""))}
    eval_set = ensure_eval_set(val_tokens, strings, token_bytes, evaluator, directory, val_name, source, log)
    if set(eval_set.unigram_bpb) != set(eval_set.streams):
        eval_set = with_unigram(eval_set, {
            name: unigram_bpb(train_tokens, scored_rows(eval_set, name), token_bytes, evaluator.VOCAB_SIZE)
            for name in eval_set.streams})
    return eval_set
