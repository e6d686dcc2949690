"""Presets: the shipped tiers, the choice for every tier and at the boundaries, unknown GPUs,
and preset files that are wrong in every way a hand edit can make them wrong."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest

from harness.config import EvaluatorConstants
from harness.hardware.detect import Accelerator, CpuInfo, HardwareReport
from harness.hardware.presets import (
    PRESETS_DIR,
    TRAINER_SCHEMA,
    PresetError,
    choose_preset,
    get_preset,
    load_presets,
    memory_gb,
)

MiB, GiB = 2**20, 2**30
TIERS = {"h100", "a100-40gb", "rtx4090", "rtx3060", "gpu-6gb", "apple-16gb", "apple-32gb",
         "apple-64gb+", "amd-mi300", "amd-24gb", "cpu-tiny"}


@pytest.fixture(scope="module")
def presets():
    return load_presets()


def report_with(*accelerators: Accelerator) -> HardwareReport:
    return HardwareReport(os="Linux", arch="x86_64", accelerators=list(accelerators),
                          cpu=CpuInfo("test cpu", 8, 32 * GiB))


def gpu(vendor: str, name: str, memory_bytes: int | None) -> Accelerator:
    return Accelerator(vendor=vendor, name=name, memory_bytes=memory_bytes, source="test")


# --- The shipped presets ------------------------------------------------------------------------

def test_every_tier_ships_and_validates(presets):
    assert set(presets) == TIERS
    for preset in presets.values():
        assert isinstance(preset.evaluator, EvaluatorConstants)
        assert list(preset.trainer) == list(TRAINER_SCHEMA)
        micro = preset.trainer["DEVICE_BATCH_SIZE"] * preset.evaluator.MAX_SEQ_LEN
        assert preset.trainer["TOTAL_BATCH_SIZE"] % micro == 0, preset.name
        json.dumps(preset.to_dict())


def test_h100_is_upstream(presets):
    h100 = presets["h100"]
    assert dataclasses.asdict(h100.evaluator) == {
        "MAX_SEQ_LEN": 2048, "EVAL_TOKENS": 20_971_520, "TIME_BUDGET": 300.0, "VOCAB_SIZE": 8192,
        "DATA_SOURCE": "climbmix", "EVAL_BATCH_SIZE": 32, "BASELINE_REPEATS": 5,
        "HOLDOUT_TOKENS": 5_242_880, "WARMUP_ALLOWANCE": 120}
    assert h100.trainer == {"DEPTH": 8, "ASPECT_RATIO": 64, "HEAD_DIM": 128, "DEVICE_BATCH_SIZE": 128,
                            "TOTAL_BATCH_SIZE": 2**19, "WINDOW_PATTERN": "SSSL"}
    assert h100.backend == "cuda" and h100.num_shards == 10


def test_cpu_tiny_is_the_ci_tier(presets):
    tiny = presets["cpu-tiny"]
    assert dataclasses.asdict(tiny.evaluator) == {
        "MAX_SEQ_LEN": 256, "EVAL_TOKENS": 32768, "TIME_BUDGET": 60.0, "VOCAB_SIZE": 4096,
        "DATA_SOURCE": "builtin", "EVAL_BATCH_SIZE": 32, "BASELINE_REPEATS": 5,
        "HOLDOUT_TOKENS": 16384, "WARMUP_ALLOWANCE": 30}
    assert tiny.trainer == {"DEPTH": 2, "ASPECT_RATIO": 64, "HEAD_DIM": 64, "DEVICE_BATCH_SIZE": 16,
                            "TOTAL_BATCH_SIZE": 4096, "WINDOW_PATTERN": "SL"}


def test_apple_tiers_use_full_attention_and_small_eval_batches(presets):
    for name in ("apple-16gb", "apple-32gb", "apple-64gb+"):
        assert presets[name].trainer["WINDOW_PATTERN"] == "L"
        assert presets[name].evaluator.EVAL_BATCH_SIZE <= 16


def test_get_preset_names_the_known_ones(presets):
    assert get_preset("rtx3060", presets).name == "rtx3060"
    with pytest.raises(ValueError) as info:
        get_preset("rtx3080", presets)
    assert "unknown preset 'rtx3080'" in str(info.value) and "rtx3060" in str(info.value)


# --- Choosing a tier -----------------------------------------------------------------------------

@pytest.mark.parametrize("vendor, name, memory_bytes, expected", [
    ("nvidia", "NVIDIA H100 80GB HBM3", 81559 * MiB, "h100"),
    ("nvidia", "NVIDIA A100-SXM4-80GB", 81920 * MiB, "h100"),
    ("nvidia", "NVIDIA A100-SXM4-40GB", 40536 * MiB, "a100-40gb"),
    ("nvidia", "NVIDIA GeForce RTX 5090", 32607 * MiB, "a100-40gb"),
    ("nvidia", "NVIDIA GeForce RTX 4090", 24564 * MiB, "rtx4090"),
    ("nvidia", "NVIDIA GeForce RTX 3090", 24576 * MiB, "rtx4090"),
    ("nvidia", "NVIDIA GeForce RTX 3060", 12288 * MiB, "rtx3060"),
    ("nvidia", "Tesla T4", 15360 * MiB, "rtx3060"),
    ("nvidia", "NVIDIA GeForce GTX 1660 Ti", 6144 * MiB, "gpu-6gb"),
    ("nvidia", "NVIDIA GeForce RTX 3060 Laptop GPU", 6144 * MiB, "gpu-6gb"),
    ("apple", "Apple M2", 16 * GiB, "apple-16gb"),
    ("apple", "Apple M4 Pro", 24 * GiB, "apple-16gb"),
    ("apple", "Apple M3 Pro", 36 * GiB, "apple-32gb"),
    ("apple", "Apple M4 Max", 128 * GiB, "apple-64gb+"),
    ("amd", "AMD Instinct MI300X", 205822885888, "amd-mi300"),
    ("amd", "AMD Instinct MI250X", 68702699520, "amd-mi300"),
    ("amd", "Radeon RX 7900 XTX", 25753026560, "amd-24gb"),
    ("amd", "Radeon RX 7900 XT", 21458059264, "amd-24gb"),
])
def test_each_known_device_gets_its_tier_without_warning(presets, vendor, name, memory_bytes, expected):
    preset, reason = choose_preset(report_with(gpu(vendor, name, memory_bytes)), presets)
    assert preset.name == expected, reason
    assert "warning" not in reason and name in reason and f"preset {expected}" in reason


def test_no_accelerator_gets_cpu_tiny(presets):
    preset, reason = choose_preset(report_with(), presets)
    assert preset.name == "cpu-tiny" and "no GPU" in reason


@pytest.mark.parametrize("memory_bytes, expected", [
    (24 * GiB, "rtx4090"),                 # exactly 24 GB
    (24564 * MiB, "rtx4090"),              # what NVML reports for a "24 GB" RTX 4090
    (int(23.9 * GiB), "rtx3060"),          # 23.9 GB is the next tier down
    (64 * GiB, "h100"),
    (int(63.9 * GiB), "a100-40gb"),
    (12 * GiB, "rtx3060"),
    (int(11.9 * GiB), "gpu-6gb"),
])
def test_memory_boundaries(presets, memory_bytes, expected):
    preset, _ = choose_preset(report_with(gpu("nvidia", "NVIDIA GeForce RTX 3090", memory_bytes)), presets)
    assert preset.name == expected


def test_memory_is_rounded_to_a_tenth_of_a_gib():
    assert memory_gb(24564 * MiB) == 24.0
    assert memory_gb(int(23.9 * GiB)) == 23.9
    assert memory_gb(81559 * MiB) == 79.6


def test_unknown_gpu_gets_the_nearest_smaller_tier_of_its_vendor_with_a_warning(presets):
    preset, reason = choose_preset(report_with(gpu("nvidia", "NVIDIA Future GPU 9000", 28 * GiB)), presets)
    assert preset.name == "rtx4090"
    assert reason.startswith("warning: unknown GPU 'NVIDIA Future GPU 9000'") and "nearest smaller nvidia tier" in reason
    # 16 GB AMD card: below amd-24gb, so the shared 6 GB tier (vendor list includes amd).
    preset, reason = choose_preset(report_with(gpu("amd", "Navi 21 [Radeon RX 6800/6800 XT / 6900 XT]", 17163091968)), presets)
    assert preset.name == "gpu-6gb" and "warning" in reason


def test_device_below_every_tier_or_of_unknown_memory_gets_the_smallest_with_a_warning(presets):
    preset, reason = choose_preset(report_with(gpu("nvidia", "NVIDIA GeForce GTX 1050 Ti", 4096 * MiB)), presets)
    assert preset.name == "gpu-6gb" and "below the smallest nvidia tier" in reason
    preset, reason = choose_preset(report_with(gpu("apple", "Apple M1", 8 * GiB)), presets)
    assert preset.name == "apple-16gb" and "warning" in reason
    preset, reason = choose_preset(report_with(gpu("nvidia", "NVIDIA GPU (PCI device 0x2684)", None)), presets)
    assert preset.name == "gpu-6gb" and "memory unknown" in reason


def test_the_primary_device_is_the_largest_of_the_preferred_vendor(presets):
    small, big = gpu("amd", "Raphael", 64 * MiB), gpu("amd", "AMD Instinct MI300X", 205822885888)
    assert choose_preset(report_with(small, big), presets)[0].name == "amd-mi300"
    h100 = gpu("nvidia", "NVIDIA H100 80GB HBM3", 81559 * MiB)
    tiny = gpu("nvidia", "NVIDIA GeForce RTX 3060", 12288 * MiB)
    assert choose_preset(report_with(big, tiny, h100), presets)[0].name == "h100"
    assert choose_preset(report_with(big, h100), presets, vendor="amd")[0].name == "amd-mi300"


# --- Invalid preset files ----------------------------------------------------------------------

def write_broken(tmp_path: Path, old: str, new: str) -> Path:
    """A copy of the shipped rtx3060 preset with one edit, alone in a presets folder."""
    text = (PRESETS_DIR / "rtx3060.toml").read_text()
    assert old in text, old
    path = tmp_path / "rtx3060.toml"
    path.write_text(text.replace(old, new, 1))
    return path


@pytest.mark.parametrize("old, new, key, words", [
    ("DEPTH = 4", "DEPTH = 4\nDEPHT = 4", "trainer.DEPHT", "unknown key"),
    ('name = "rtx3060"', 'name = "rtx3060"\ncolour = "green"', "colour", "unknown key"),
    ("[match]\n", "[match]\nmin_vram = 3\n", "match.min_vram", "unknown key"),
    ("MAX_SEQ_LEN = 512", 'MAX_SEQ_LEN = "512"', "evaluator.MAX_SEQ_LEN", "must be an integer"),
    ("DEPTH = 4", "DEPTH = true", "trainer.DEPTH", "must be an integer"),
    ("DEPTH = 4", "DEPTH = 4.0", "trainer.DEPTH", "must be an integer"),
    ("min_memory_gb = 12", 'min_memory_gb = "12"', "match.min_memory_gb", "must be a number"),
    ("WINDOW_PATTERN = \"L\"", "WINDOW_PATTERN = 1", "trainer.WINDOW_PATTERN", "must be a string"),
    ("EVAL_TOKENS = 2097152", "", "evaluator.EVAL_TOKENS", "missing key"),
    ('backend = "cuda"\n', "", "backend", "missing key"),
    ("HEAD_DIM = 128\n", "", "trainer.HEAD_DIM", "missing key"),
    ("TOTAL_BATCH_SIZE = 65536", "TOTAL_BATCH_SIZE = 50000", "trainer.TOTAL_BATCH_SIZE", "divisible"),
    ("EVAL_TOKENS = 2097152", "EVAL_TOKENS = 2097153", "evaluator.EVAL_TOKENS", "multiple of MAX_SEQ_LEN"),
    ("WINDOW_PATTERN = \"L\"", "WINDOW_PATTERN = \"LX\"", "trainer.WINDOW_PATTERN", "letters S"),
    ('vendor = "nvidia"', 'vendor = "intel"', "match.vendor", "choose from"),
    ('backend = "cuda"', 'backend = "tpu"', "backend", "choose one of"),
    ('name = "rtx3060"', 'name = "rtx-3060"', "name", "must equal the file name"),
    ('DATA_SOURCE = "tinystories"', 'DATA_SOURCE = "tinystory"', "evaluator.DATA_SOURCE", "local:PATH"),
    ("BASELINE_REPEATS = 5", "BASELINE_REPEATS = 1", "evaluator.BASELINE_REPEATS", ">= 2"),
    ("WARMUP_ALLOWANCE = 120", "WARMUP_ALLOWANCE = -1", "[evaluator]", "WARMUP_ALLOWANCE must be between 0 and 3600 seconds"),
])
def test_invalid_file_names_the_file_and_the_key(tmp_path, old, new, key, words):
    path = write_broken(tmp_path, old, new)
    with pytest.raises(PresetError) as info:
        load_presets(tmp_path)
    message = str(info.value)
    assert str(path) in message and f"'{key}'" in message and words in message, message


def test_toml_syntax_error_names_the_file(tmp_path):
    path = write_broken(tmp_path, "DEPTH = 4", "DEPTH = = 4")
    with pytest.raises(PresetError, match="not valid TOML") as info:
        load_presets(tmp_path)
    assert str(path) in str(info.value)


def test_two_tiers_with_the_same_minimum_are_ambiguous(tmp_path):
    shutil.copy(PRESETS_DIR / "rtx3060.toml", tmp_path / "rtx3060.toml")
    text = (PRESETS_DIR / "rtx3060.toml").read_text().replace('name = "rtx3060"', 'name = "rtx4070"')
    (tmp_path / "rtx4070.toml").write_text(text)
    with pytest.raises(PresetError, match="distinct minimums") as info:
        load_presets(tmp_path)
    assert "rtx3060.toml" in str(info.value) and "rtx4070.toml" in str(info.value)


def test_empty_directory_is_an_error(tmp_path):
    with pytest.raises(PresetError, match="no preset files"):
        load_presets(tmp_path)


def test_max_memory_bounds_a_tier(tmp_path):
    shutil.copy(PRESETS_DIR / "cpu-tiny.toml", tmp_path / "cpu-tiny.toml")
    for name, extra in (("mid", "max_memory_gb = 16"), ("big", "")):
        text = (PRESETS_DIR / "rtx3060.toml").read_text().replace('name = "rtx3060"', f'name = "{name}"')
        if name == "big":
            text = text.replace("min_memory_gb = 12", "min_memory_gb = 8")
        else:
            text = text.replace("[match]\n", f"[match]\n{extra}\n")
        (tmp_path / f"{name}.toml").write_text(text)
    presets = load_presets(tmp_path)
    assert presets["mid"].match.summary() == "nvidia >= 12 GB, < 16 GB"
    pick = lambda gb: choose_preset(report_with(gpu("nvidia", "NVIDIA GeForce RTX 3060", gb * GiB)), presets)[0].name
    assert (pick(12), pick(15), pick(16), pick(80), pick(10)) == ("mid", "mid", "big", "big", "big")
    broken = (tmp_path / "mid.toml").read_text().replace("max_memory_gb = 16", "max_memory_gb = 10")
    (tmp_path / "mid.toml").write_text(broken)
    with pytest.raises(PresetError, match="match.max_memory_gb"):
        load_presets(tmp_path)
