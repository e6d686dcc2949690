"""Keeping the trainer out of the evaluator's data, where the OS allows it (Linux Landlock).

Landlock lets an unprivileged process give up rights for itself and every process it starts. It
only grants ("a process may read files beneath these paths"), it cannot deny a subfolder of a
granted one. So to hide the denied paths (the evaluation sets, the raw validation shard), the
trainer is granted: listing every folder, and reading beneath every entry of every folder on the
way down to a denied path, except that way itself. Everything else of the machine stays readable.

The catch, said plainly: a file that the trainer newly creates *directly* in one of those folders
on the way (the home folder, `~/.cache`, the cache's `autoresearch/` folders) cannot be read back
in the same run. Frameworks' compile caches are pointed elsewhere by the runner, so this touches
only a trainer that writes such a file and reads it again. `AUTORESEARCH_CONFINE=0` turns it off.

The runner starts the trainer through `launch()`, which applies the rules and then execs the
trainer, so the rules hold before the first line of `train.py` runs. Where Landlock is missing
(macOS, Windows, an old kernel, no `landlock` package), the canaries and the holdout are the
detectors, and the runner says so.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

CONFINE_ENV = "AUTORESEARCH_CONFINE"  # "0": run trainers unconfined


@dataclass(frozen=True)
class Confinement:
    """Whether trainers run confined here, and the line that says so."""

    active: bool
    message: str
    denied: tuple[str, ...] = ()

    def command(self, python: str, script: str) -> list[str]:
        """The command that starts `script` under these rules (or as is, when inactive)."""
        if not self.active:
            return [python, script]
        return [python, "-c", "from harness.scoring.confine import launch; launch()", json.dumps(list(self.denied)),
                script]


def plan(denied: list[Path]) -> Confinement:
    """Confinement for trainers that must not read `denied` (existing paths only)."""
    paths = tuple(str(Path(p).resolve()) for p in denied if Path(p).exists())
    if os.environ.get(CONFINE_ENV, "1") == "0":
        return Confinement(False, f"confinement: off ({CONFINE_ENV}=0); canaries and the holdout detect leaks")
    if not sys.platform.startswith("linux"):
        return Confinement(False, "confinement: not available on this OS; canaries and the holdout detect leaks")
    try:
        import landlock
    except ImportError:
        return Confinement(False, "confinement: the `landlock` package is not installed; canaries and the "
                                  "holdout detect leaks")
    try:
        abi = landlock.landlock_abi_version()
    except Exception as exc:  # noqa: BLE001 - ENOSYS, EOPNOTSUPP: the kernel has no Landlock
        return Confinement(False, f"confinement: Landlock is not available in this kernel ({exc}); canaries and "
                                  "the holdout detect leaks")
    return Confinement(True, f"confinement: Landlock (ABI {abi}): the trainer cannot read the evaluator's data",
                       paths)


def readable_paths(denied: list[Path]) -> tuple[list[Path], list[Path]]:
    """(folders on the way to a denied path: listable only; paths readable beneath)."""
    denied = [Path(p).resolve() for p in denied]
    on_the_way = {ancestor for path in denied for ancestor in path.parents}
    readable = []
    for folder in sorted(on_the_way):
        try:
            entries = list(folder.iterdir())
        except OSError:
            continue
        for entry in entries:
            if entry in on_the_way or entry in denied:
                continue
            try:
                target = entry.resolve()
            except OSError:
                continue
            if any(target == d or d in target.parents or target in d.parents for d in denied):
                continue  # a link into (or above) a denied path
            readable.append(entry)
    return sorted(on_the_way), readable


def apply(denied: list[Path]) -> None:
    """Restrict this process (and what it starts) as the module docstring says."""
    import landlock
    from landlock import FSAccess

    folders, readable = readable_paths(denied)
    ruleset = landlock.Ruleset(restrict_rules=FSAccess.READ_FILE | FSAccess.READ_DIR)
    for folder in folders:
        ruleset.allow(folder, rules=FSAccess.READ_DIR)
    for path in readable:
        try:
            rules = FSAccess.READ_FILE | FSAccess.READ_DIR if path.is_dir() else FSAccess.READ_FILE
            ruleset.allow(path, rules=rules)
        except OSError:
            continue  # vanished, or a socket or device that cannot be opened as a path
    ruleset.apply()


def launch() -> None:
    """`python -c ...launch() DENIED_JSON SCRIPT`: confine, then become the trainer."""
    denied, script = json.loads(sys.argv[1]), sys.argv[2]
    apply([Path(p) for p in denied])
    os.execv(sys.executable, [sys.executable, script])
