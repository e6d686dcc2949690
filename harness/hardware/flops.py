"""Peak dense bf16 throughput by device name, for MFU. Unknown devices give None (MFU is then
reported as unknown), never an H100 guess."""

from __future__ import annotations

# (substring of the device name, lower case) -> peak dense bf16 FLOP/s. Most specific first.
PEAK_BF16_FLOPS: tuple[tuple[str, float], ...] = (
    ("gh200", 989.5e12),
    ("h200", 989.5e12),
    ("h100 pcie", 756.0e12),
    ("h100", 989.5e12),
    ("h800", 989.5e12),
    ("b200", 2250.0e12),
    ("a100", 312.0e12),
    ("a800", 312.0e12),
    ("l40s", 362.05e12),
    ("a10g", 70.0e12),
    ("rtx pro 6000", 503.8e12),
    ("rtx 5090", 209.5e12),
    ("rtx 5080", 112.6e12),
    ("rtx 5070 ti", 87.9e12),
    ("rtx 4090", 165.2e12),
    ("rtx 4080", 97.5e12),
    ("rtx 3090", 71.0e12),
    ("rtx 3080", 59.5e12),
    ("rtx 3060", 25.4e12),
    ("rtx a6000", 154.8e12),
    # AMD: matrix-core dense bf16 (CDNA) or WMMA dense fp16/bf16 (RDNA3/4), never the sparsity figure.
    # ROCm reports names like "AMD Instinct MI300X" or "AMD Radeon RX 7900 XTX"; some releases say only
    # "AMD Radeon Graphics", which matches nothing (MFU unknown rather than a guess).
    ("mi355x", 2500.0e12),
    ("mi350x", 2300.0e12),
    ("mi325x", 1307.4e12),
    ("mi300x", 1307.4e12),
    ("mi308x", 1307.4e12),
    ("mi300a", 980.6e12),
    ("mi250x", 191.5e12),  # per GCD: torch sees each of the package's two dies (383 TF together) as a device
    ("mi250", 181.0e12),  # per GCD (362.1 TF per package); ROCm may name either "AMD Instinct MI250X/MI250"
    ("mi210", 181.0e12),
    ("mi100", 92.3e12),  # CDNA1: bf16 at half its fp16 rate
    ("radeon ai pro r9700", 191.0e12),  # RDNA4
    ("rx 9070 xt", 194.7e12),
    ("rx 9070", 144.5e12),
    ("rx 7900 xtx", 122.8e12),  # RDNA3
    ("rx 7900 xt", 103.0e12),
    ("rx 7900 gre", 92.0e12),
    ("rx 7800 xt", 74.6e12),
    ("w7900", 122.6e12),  # Radeon PRO (RDNA3)
    ("w7800", 90.5e12),
)


def peak_flops(device_name: str | None) -> float | None:
    """Peak dense bf16 FLOP/s for a device name, or None when the device is not in the table."""
    if not device_name:
        return None
    name = device_name.lower()
    for pattern, flops in PEAK_BF16_FLOPS:
        if pattern in name:
            return flops
    return None


def mfu_percent(flops_per_token: float, tokens_per_sec: float, device_name: str | None) -> float | None:
    peak = peak_flops(device_name)
    if peak is None or tokens_per_sec <= 0:
        return None
    return 100.0 * flops_per_token * tokens_per_sec / peak
