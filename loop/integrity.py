"""What keeps a session's own state honest between and during runs.

The chain. Every ledger row carries `chain`: the SHA-256 of the previous row's `chain` and this
row's cells. The first row's predecessor is the session's anchor, the hash of its configuration
and its manifest as written when the session started. So a manifest rebuilt after the start (with
another budget, say), an edited row, or a removed or reordered row breaks the chain at that row,
and `verified_rows` returns only the rows before it: the standing (best, sigma) comes from those.
Someone who recomputes the whole chain with the harness's own code is not caught; an eager agent
that edits a number is.

The snapshot. Before each trainer starts, the session's state files are read into memory
(`StateSnapshot`); after it exits, any that changed are written back as they were and the run is
rejected. The trainer cannot rewrite its own verdict, the manifest, or the loop's state.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

from harness.files import atomic_write
from loop.results import ResultRow

CHAIN_FIELD = "chain"


def anchor(config_file: Path, manifest_file: Path) -> str:
    """The hash the session's first row chains from."""
    digest = hashlib.sha256()
    for path in (config_file, manifest_file):
        digest.update(path.read_bytes() if path.is_file() else b"(missing)")
        digest.update(b"\0")
    return digest.hexdigest()


def link(previous: str, row: ResultRow) -> str:
    """The `chain` value of `row` after a row whose chain is `previous`."""
    cells = row.cells()
    cells.pop(CHAIN_FIELD, None)
    text = previous + "\n" + "\t".join(f"{k}={v}" for k, v in sorted(cells.items()))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class ChainCheck:
    """How much of a ledger verifies."""

    verified: int  # rows that verify, from the first
    total: int
    chained: bool  # False: a ledger written before rows were chained (nothing to verify)

    @property
    def broken_at(self) -> int | None:
        """The 1-based number of the first row that does not verify, or None."""
        return self.verified + 1 if self.chained and self.verified < self.total else None

    def describe(self) -> str:
        if not self.chained:
            return "rows are not chained (a ledger from before chaining): not verified"
        if self.broken_at is None:
            return f"all {self.total} rows verify"
        if self.broken_at == 1:
            return ("row 1 does not verify: the ledger's first row, the session's configuration or its "
                    "manifest was changed after the session started")
        return f"row {self.broken_at} of {self.total} does not verify: it was edited, removed or reordered"


def check_chain(rows: list[ResultRow], start: str, chained: bool = True) -> ChainCheck:
    """Verify `rows` from the anchor `start`. `chained` is False only for a session started before
    rows were chained: then nothing is verified (and nothing is refused)."""
    if not chained:
        return ChainCheck(len(rows), len(rows), chained=False)
    previous = start
    for index, row in enumerate(rows):
        expected = link(previous, row)
        if getattr(row, CHAIN_FIELD) != expected:
            return ChainCheck(index, len(rows), chained=True)
        previous = expected
    return ChainCheck(len(rows), len(rows), chained=True)


def chain_head(rows: list[ResultRow], start: str) -> str:
    """What the next row chains from: the last row's chain, or the anchor."""
    return getattr(rows[-1], CHAIN_FIELD) if rows and getattr(rows[-1], CHAIN_FIELD) else start


@dataclass
class StateSnapshot:
    """The bytes of a set of files (None: absent), to compare and put back after a run."""

    files: dict[Path, bytes | None] = field(default_factory=dict)

    @classmethod
    def take(cls, paths: list[Path]) -> "StateSnapshot":
        return cls({path: path.read_bytes() if path.is_file() else None for path in paths})

    def changed(self) -> list[Path]:
        return [path for path, data in self.files.items()
                if (path.read_bytes() if path.is_file() else None) != data]

    def restore(self, paths: list[Path]) -> None:
        for path in paths:
            data = self.files[path]
            if data is None:
                path.unlink(missing_ok=True)
            else:
                atomic_write(path, data)
