"""What probes the hardware and decides from it: detection, presets, platform choices, FLOPs."""
