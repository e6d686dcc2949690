"""Hardware tiers as data: `presets/*.toml`, validated on load, and the rule that picks one.

A preset holds the evaluator constants a session is scored under, the trainer's starting
constants, the data shard count for setup, and match rules (vendor, memory range, name
patterns) that place a device in the tier.

Memory rule. A device's memory is compared in GiB (2**30 bytes, the unit behind NVML's and
rocm-smi's MiB figures) rounded to 0.1 GiB. Drivers reserve a few MiB, so a "24 GB" RTX 4090
reports 24564 MiB = 23.99 GiB; rounded, that is 24.0 and lands in the 24 GB tier, while a device
with 23.9 GiB lands in the tier below. Tiers are half-open ranges `min_memory_gb <= m <
max_memory_gb` (no maximum when it is left out); within a vendor the tier with the largest
minimum that fits wins. Thresholds sit at what real cards report, not at marketing sizes, e.g.
the h100 tier starts at 64 GiB because an H100 80GB reports 79.6 GiB.
"""

from __future__ import annotations

import dataclasses
import sys
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from harness.config import EvaluatorConstants
from harness.data.sources import SOURCES  # the one list of data sources (stdlib-only imports)
from harness.paths import BACKENDS, PROJECT_ROOT

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

if TYPE_CHECKING:
    from harness.hardware.detect import Accelerator, HardwareReport

PRESETS_DIR = PROJECT_ROOT / "presets"
DEFAULT_PRESET = "h100"  # upstream karpathy/autoresearch's settings: the reference tier
VENDORS = ("nvidia", "amd", "apple", "cpu")
VENDOR_ORDER = {vendor: i for i, vendor in enumerate(VENDORS)}


class PresetError(ValueError):
    """A preset file is malformed; the message names the file and the key."""


def memory_gb(memory_bytes: int) -> float:
    """Memory in GiB rounded to 0.1, the unit every match rule is written in (see module doc)."""
    return round(memory_bytes / 2**30, 1)


# The trainer's starting constants a preset sets; `setup` writes them by name into train.py.
TRAINER_SCHEMA: dict[str, type] = {
    "DEPTH": int,
    "ASPECT_RATIO": int,
    "HEAD_DIM": int,
    "DEVICE_BATCH_SIZE": int,
    "TOTAL_BATCH_SIZE": int,
    "WINDOW_PATTERN": str,
}


@dataclass(frozen=True)
class MatchRule:
    vendors: tuple[str, ...]
    min_memory_gb: float
    max_memory_gb: float | None = None
    names: tuple[str, ...] = ()

    def fits(self, gb: float) -> bool:
        return gb >= self.min_memory_gb and (self.max_memory_gb is None or gb < self.max_memory_gb)

    def names_match(self, name: str) -> bool:
        lowered = name.lower()
        return any(pattern.lower() in lowered for pattern in self.names)

    def summary(self) -> str:
        vendors = "/".join(self.vendors)
        if not self.min_memory_gb and self.max_memory_gb is None:
            return f"{vendors}, any memory"
        memory = f">= {self.min_memory_gb:g} GB"
        if self.max_memory_gb is not None:
            memory += f", < {self.max_memory_gb:g} GB"
        return f"{vendors} {memory}"


@dataclass(frozen=True)
class Preset:
    name: str
    description: str
    backend: str
    num_shards: int
    match: MatchRule
    evaluator: EvaluatorConstants
    trainer: dict[str, int | str]  # TRAINER_SCHEMA's keys, in that order
    path: Path

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "description": self.description,
            "backend": self.backend,
            "num_shards": self.num_shards,
            "match": {
                "vendor": list(self.match.vendors),
                "min_memory_gb": self.match.min_memory_gb,
                "max_memory_gb": self.match.max_memory_gb,
                "names": list(self.match.names),
            },
            "evaluator": dataclasses.asdict(self.evaluator),
            "trainer": dict(self.trainer),
            "path": str(self.path),
        }


# ---------------------------------------------------------------------------------------------
# Loading and validation
# ---------------------------------------------------------------------------------------------

_TOP_KEYS = {"name": str, "description": str, "backend": str, "num_shards": int,
             "match": dict, "evaluator": dict, "trainer": dict}
_MATCH_KEYS = {"vendor": (str, list), "min_memory_gb": float, "max_memory_gb": float, "names": list}
_MATCH_OPTIONAL = {"max_memory_gb", "names"}
_TYPE_WORDS = {int: "an integer", float: "a number", str: "a string", dict: "a table", list: "an array"}


def _schema(cls: type) -> dict[str, type]:
    """Field name -> type of a dataclass, so the TOML tables track the dataclasses exactly."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _check_type(value: Any, expected: Any, where: str) -> Any:
    """Return the value (ints widened to float where a number is expected) or raise."""
    kinds = expected if isinstance(expected, tuple) else (expected,)
    for kind in kinds:
        if kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if kind is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if kind not in (int, float) and isinstance(value, kind):
            return value
    wanted = " or ".join(_TYPE_WORDS.get(k, k.__name__) for k in kinds)
    raise PresetError(f"{where} must be {wanted}, got {type(value).__name__} {value!r}")


def _check_table(table: dict, schema: dict[str, Any], optional: set[str], section: str,
                 path: Path) -> dict[str, Any]:
    prefix = f"{section}." if section else ""
    unknown = sorted(set(table) - set(schema))
    if unknown:
        raise PresetError(
            f"{path}: unknown key '{prefix}{unknown[0]}' (allowed in "
            f"{'[' + section + ']' if section else 'the top level'}: {', '.join(schema)})"
        )
    checked = {}
    for key, expected in schema.items():
        if key not in table:
            if key in optional:
                continue
            raise PresetError(f"{path}: missing key '{prefix}{key}'")
        try:
            checked[key] = _check_type(table[key], expected, f"'{prefix}{key}'")
        except PresetError as exc:
            raise PresetError(f"{path}: {exc}") from None
    return checked


def _require(condition: bool, path: Path, key: str, problem: str) -> None:
    if not condition:
        raise PresetError(f"{path}: '{key}' {problem}")


def parse_preset(data: dict[str, Any], path: Path) -> Preset:
    """Validate one decoded TOML document; every error names the file and the key."""
    top = _check_table(data, _TOP_KEYS, set(), "", path)
    match = _check_table(top["match"], _MATCH_KEYS, _MATCH_OPTIONAL, "match", path)
    ev = _check_table(top["evaluator"], _schema(EvaluatorConstants), set(), "evaluator", path)
    tr = _check_table(top["trainer"], TRAINER_SCHEMA, set(), "trainer", path)

    _require(top["name"] == path.stem, path, "name",
             f"is {top['name']!r} but must equal the file name {path.stem!r}")
    _require(top["backend"] in BACKENDS, path, "backend",
             f"is {top['backend']!r}; choose one of {', '.join(BACKENDS)}")
    _require(top["num_shards"] >= 1 or top["num_shards"] == -1, path, "num_shards", "must be >= 1 (or -1 for all)")

    vendors = match["vendor"] if isinstance(match["vendor"], list) else [match["vendor"]]
    for vendor in vendors:
        _require(vendor in VENDORS, path, "match.vendor",
                 f"has {vendor!r}; choose from {', '.join(VENDORS)}")
    _require(bool(vendors), path, "match.vendor", "must name at least one vendor")
    names = match.get("names", [])
    _require(all(isinstance(n, str) and n for n in names), path, "match.names",
             "must be an array of non-empty strings")
    _require(match["min_memory_gb"] >= 0, path, "match.min_memory_gb", "must be >= 0")
    if "max_memory_gb" in match:
        _require(match["max_memory_gb"] > match["min_memory_gb"], path, "match.max_memory_gb",
                 "must be greater than match.min_memory_gb")

    for key in ("MAX_SEQ_LEN", "EVAL_TOKENS", "VOCAB_SIZE", "EVAL_BATCH_SIZE"):
        _require(ev[key] > 0, path, f"evaluator.{key}", "must be > 0")
    _require(ev["TIME_BUDGET"] > 0, path, "evaluator.TIME_BUDGET", "must be > 0 seconds")
    _require(ev["BASELINE_REPEATS"] >= 2, path, "evaluator.BASELINE_REPEATS",
             "must be >= 2 (the noise floor needs at least two baseline runs)")
    source = ev["DATA_SOURCE"]
    named = [name for name in SOURCES if not name.startswith("local:")]
    _require(source in named or (source.startswith("local:") and len(source) > 6), path,
             "evaluator.DATA_SOURCE", f"is {source!r}; use one of {', '.join(named)} or local:PATH")
    _require(ev["EVAL_TOKENS"] % ev["MAX_SEQ_LEN"] == 0, path, "evaluator.EVAL_TOKENS",
             f"({ev['EVAL_TOKENS']}) must be a multiple of MAX_SEQ_LEN ({ev['MAX_SEQ_LEN']})")

    for key in ("DEPTH", "ASPECT_RATIO", "HEAD_DIM", "DEVICE_BATCH_SIZE", "TOTAL_BATCH_SIZE"):
        _require(tr[key] > 0, path, f"trainer.{key}", "must be > 0")
    _require(tr["HEAD_DIM"] % 2 == 0, path, "trainer.HEAD_DIM", "must be even (rotary embeddings)")
    pattern = tr["WINDOW_PATTERN"]
    _require(bool(pattern) and set(pattern) <= {"S", "L"}, path, "trainer.WINDOW_PATTERN",
             f"is {pattern!r}; use letters S (short window) and L (full context), e.g. 'SSSL'")
    micro = tr["DEVICE_BATCH_SIZE"] * ev["MAX_SEQ_LEN"]
    _require(tr["TOTAL_BATCH_SIZE"] % micro == 0, path, "trainer.TOTAL_BATCH_SIZE",
             f"({tr['TOTAL_BATCH_SIZE']}) must be divisible by DEVICE_BATCH_SIZE * MAX_SEQ_LEN "
             f"({tr['DEVICE_BATCH_SIZE']} * {ev['MAX_SEQ_LEN']} = {micro})")

    try:
        evaluator = EvaluatorConstants(**ev)
    except ValueError as exc:  # a range the constants themselves enforce (harness.config.CONSTANT_RANGES)
        raise PresetError(f"{path}: '[evaluator]' {exc}") from None
    return Preset(
        name=top["name"],
        description=top["description"],
        backend=top["backend"],
        num_shards=top["num_shards"],
        match=MatchRule(
            vendors=tuple(vendors),
            min_memory_gb=match["min_memory_gb"],
            max_memory_gb=match.get("max_memory_gb"),
            names=tuple(names),
        ),
        evaluator=evaluator,
        trainer=tr,
        path=path,
    )


def load_preset_file(path: Path) -> Preset:
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise PresetError(f"{path}: not valid TOML: {exc}") from None
    return parse_preset(data, path)


def load_presets(directory: Path | None = None) -> dict[str, Preset]:
    """Every `*.toml` in the directory (default: the project's `presets/`), validated, ordered
    by vendor and then from the largest tier down."""
    directory = Path(directory) if directory is not None else PRESETS_DIR
    files = sorted(directory.glob("*.toml"))
    if not files:
        raise PresetError(f"{directory}: no preset files (*.toml) found")
    presets = [load_preset_file(path) for path in files]
    seen: dict[tuple[str, float], Preset] = {}
    for preset in presets:
        for vendor in preset.match.vendors:
            other = seen.setdefault((vendor, preset.match.min_memory_gb), preset)
            if other is not preset:
                raise PresetError(
                    f"{preset.path}: 'match.min_memory_gb' = {preset.match.min_memory_gb:g} for "
                    f"{vendor} is also the minimum of {other.path.name}; tiers of a vendor need "
                    "distinct minimums"
                )
    presets.sort(key=lambda p: (min(VENDOR_ORDER[v] for v in p.match.vendors), -p.match.min_memory_gb))
    return {preset.name: preset for preset in presets}


def get_preset(name: str, presets: dict[str, Preset] | None = None) -> Preset:
    presets = presets if presets is not None else load_presets()
    if name not in presets:
        raise ValueError(f"unknown preset {name!r}; known presets: {', '.join(presets)}")
    return presets[name]


# ---------------------------------------------------------------------------------------------
# Choosing
# ---------------------------------------------------------------------------------------------

def primary_accelerator(report: "HardwareReport", vendor: str | None = None) -> "Accelerator | None":
    """The device a trainer would use: of the given vendor (else NVIDIA, then AMD, then Apple),
    the one with the most memory."""
    for candidate in ((vendor,) if vendor else ("nvidia", "amd", "apple")):
        devices = [a for a in report.accelerators if a.vendor == candidate]
        if devices:
            return max(devices, key=lambda a: a.memory_bytes or 0)
    return None


def choose_cpu_preset(report: "HardwareReport", presets: dict[str, Preset], why: str) -> tuple[Preset, str]:
    """The CPU tier (vendor "cpu") that fits the machine's RAM; `why` starts the reason."""
    tiers = [p for p in presets.values() if "cpu" in p.match.vendors]
    if not tiers:
        raise PresetError(f"no preset matches vendor 'cpu' among {', '.join(presets)}")
    ram = report.cpu.ram_bytes
    gb = memory_gb(ram) if ram else 0.0
    fitting = [p for p in tiers if p.match.fits(gb)] or [min(tiers, key=lambda p: p.match.min_memory_gb)]
    best = max(fitting, key=lambda p: p.match.min_memory_gb)
    return best, f"{why} -> preset {best.name} ({best.match.summary()})"


def choose_preset(report: "HardwareReport", presets: dict[str, Preset] | None = None,
                  vendor: str | None = None) -> tuple[Preset, str]:
    """Pick the tier for the report's primary accelerator (optionally of one vendor).

    Pure: the same report and presets always give the same answer. An unknown device (no tier
    of its vendor names it) gets the nearest smaller tier of its vendor, with a warning.
    """
    presets = presets if presets is not None else load_presets()
    device = primary_accelerator(report, vendor)
    if device is None:
        return choose_cpu_preset(report, presets, "no GPU or Apple silicon found")
    tiers = [p for p in presets.values() if device.vendor in p.match.vendors]
    if not tiers:
        return choose_cpu_preset(report, presets, f"warning: no preset for {device.vendor} devices ({device.name})")
    smallest = min(tiers, key=lambda p: p.match.min_memory_gb)
    if device.memory_bytes is None:
        return smallest, (
            f"warning: {device.name}: memory unknown ({device.source} did not report it); using "
            f"the smallest {device.vendor} tier {smallest.name} ({smallest.match.summary()})"
        )
    gb = memory_gb(device.memory_bytes)
    fitting = [p for p in tiers if p.match.fits(gb)]
    if not fitting:
        below = [p for p in tiers if p.match.min_memory_gb <= gb]
        if not below:
            return smallest, (
                f"warning: {device.name} ({gb:g} GB) is below the smallest {device.vendor} tier "
                f"{smallest.name} ({smallest.match.summary()}); expect out-of-memory errors and "
                "lower DEVICE_BATCH_SIZE if they come"
            )
        fitting = below
    best = max(fitting, key=lambda p: p.match.min_memory_gb)
    if best.match.names_match(device.name):
        return best, f"{device.name} ({gb:g} GB) -> preset {best.name} ({best.match.summary()})"
    return best, (
        f"warning: unknown {'chip' if device.vendor == 'apple' else 'GPU'} {device.name!r} "
        f"({gb:g} GB): no preset names it; using "
        f"{best.name}, the nearest smaller {device.vendor} tier ({best.match.summary()}); "
        "watch peak memory and speed, or pick another with --preset"
    )
