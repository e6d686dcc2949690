"""The energy a GPU used, from the driver's own cumulative counter: NVML's total energy (NVIDIA,
Volta and newer, in millijoules) or amdsmi's energy accumulator (AMD). The runner reads it before
and after an experiment; the difference is the experiment's joules. The counter is the whole GPU's:
other work on the same GPU during the run counts too.

    meter, why = EnergyMeter.open("cuda:0")   # None, with the reason, where no counter exists
    before = meter.read_joules(); ...; joules = meter.read_joules() - before

The GPU is the one the trainer's device names, through the visibility variables the trainer sees:
with CUDA_VISIBLE_DEVICES=2,3, "cuda:1" is GPU 3 (or the GPU whose UUID starts with the entry).
NVML numbers GPUs in PCI bus order, as CUDA does under CUDA_DEVICE_ORDER=PCI_BUS_ID; CUDA's default
order (fastest first) is the same on machines whose GPUs are all alike. On AMD, HIP_VISIBLE_DEVICES
(or CUDA_VISIBLE_DEVICES) picks among the GPUs that ROCR_VISIBLE_DEVICES leaves, in amdsmi's order.

NVML and amdsmi are imported only when a meter is opened; tests pass stand-ins with the real
function names and signatures (`nvml=`, `amdsmi=`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable, Mapping

AMD_VISIBILITY = ("HIP_VISIBLE_DEVICES", "ROCR_VISIBLE_DEVICES")


class NotVisible(ValueError):
    """The device index is not among those the visibility variables leave."""


@dataclass
class EnergyMeter:
    """One GPU's cumulative energy counter, open until `close()`."""

    description: str  # which counter of which GPU, e.g. "NVML total energy of GPU 3 (NVIDIA H100 80GB HBM3)"
    _read_joules: Callable[[], float]
    _close: Callable[[], None]

    @classmethod
    def open(cls, device: str, environ: Mapping[str, str] | None = None, *, nvml: Any = None,
             amdsmi: Any = None) -> tuple[EnergyMeter | None, str]:
        """(a meter for the GPU `device` names, or None; why). NVML is tried first, then amdsmi."""
        import os

        env = os.environ if environ is None else environ
        index = _device_index(device)
        if index is None:
            return None, f"device {device}: energy is read from NVIDIA/AMD GPUs only"
        nvidia = _open_nvml(index, env, nvml)
        if isinstance(nvidia, EnergyMeter):
            return nvidia, nvidia.description
        amd = _open_amdsmi(index, env, amdsmi)
        if isinstance(amd, EnergyMeter):
            return amd, amd.description
        return None, f"no GPU energy counter for {device}: {nvidia}; {amd}"

    def read_joules(self) -> float:
        """The counter now, in joules (since the driver loaded: only differences mean anything)."""
        return self._read_joules()

    def close(self) -> None:
        self._close()

    def __enter__(self) -> EnergyMeter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _device_index(device: str) -> int | None:
    """The torch device index of a "cuda" / "cuda:N" device (HIP devices are "cuda" too); None
    for any other device."""
    match = re.fullmatch(r"cuda(?::(\d+))?", device.strip())
    return int(match.group(1) or 0) if match else None


def visible_entry(index: int, entries: list[str | None]) -> str:
    """The device that the process's `index` means, through each visibility list from the process's
    side outwards (None: that variable is unset). The result is a physical index, or a UUID (prefix)
    as written. Raises NotVisible when the index is not visible."""
    entry = str(index)
    for value in entries:
        if value is None:
            continue
        visible = [part.strip() for part in value.split(",") if part.strip()]
        position = int(entry) if entry.isdigit() else -1
        if not 0 <= position < len(visible):
            raise NotVisible(f"device {entry} is not among the visible devices ({value!r})")
        entry = visible[position]
    return entry


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value  # older pynvml returns bytes


def _open_nvml(index: int, env: Mapping[str, str], nvml: Any) -> EnergyMeter | str:
    if nvml is None:
        try:
            import pynvml as nvml
        except ImportError:
            return "NVML: nvidia-ml-py is not installed (pip install nvidia-ml-py)"
    try:
        nvml.nvmlInit()
    except nvml.NVMLError as exc:
        return f"NVML unavailable ({exc}): no NVIDIA driver here"
    try:
        entry = visible_entry(index, [env.get("CUDA_VISIBLE_DEVICES")])
        if entry.startswith("MIG-"):
            raise LookupError(f"{entry} is a MIG instance; NVML counts energy per physical GPU only")
        handle = _nvml_handle(nvml, entry)
        name = _text(nvml.nvmlDeviceGetName(handle))
        nvml.nvmlDeviceGetTotalEnergyConsumption(handle)  # refused before Volta: NVMLError_NotSupported
    except NotVisible as exc:
        nvml.nvmlShutdown()
        return f"NVML: {exc} (CUDA_VISIBLE_DEVICES)"
    except (nvml.NVMLError, LookupError) as exc:
        nvml.nvmlShutdown()
        return f"NVML: GPU {entry} has no energy counter here ({exc})"
    return EnergyMeter(f"NVML total energy of GPU {entry} ({name})",
                       lambda: nvml.nvmlDeviceGetTotalEnergyConsumption(handle) / 1000.0,  # millijoules
                       nvml.nvmlShutdown)


def _nvml_handle(nvml: Any, entry: str) -> Any:
    if entry.isdigit():
        return nvml.nvmlDeviceGetHandleByIndex(int(entry))
    # CUDA_VISIBLE_DEVICES may name a GPU by its UUID or any unique prefix of it ("GPU-8932f937")
    for i in range(nvml.nvmlDeviceGetCount()):
        handle = nvml.nvmlDeviceGetHandleByIndex(i)
        if _text(nvml.nvmlDeviceGetUUID(handle)).startswith(entry):
            return handle
    raise LookupError(f"no GPU's UUID starts with {entry!r}")


def _open_amdsmi(index: int, env: Mapping[str, str], amdsmi: Any) -> EnergyMeter | str:
    if amdsmi is None:
        try:
            import amdsmi
        except (ImportError, OSError) as exc:  # OSError: the package is there, ROCm's libamd_smi.so is not
            return f"amdsmi unavailable ({type(exc).__name__}: {exc})"
    try:
        amdsmi.amdsmi_init()
    except Exception as exc:  # AmdSmiLibraryException: no amdgpu driver
        return f"amdsmi unavailable ({exc})"
    hip = env.get("HIP_VISIBLE_DEVICES", env.get("CUDA_VISIBLE_DEVICES"))
    try:
        entry = visible_entry(index, [hip, env.get("ROCR_VISIBLE_DEVICES")])
        if not entry.isdigit():
            raise LookupError("named by UUID, which is not matched to amdsmi's GPUs: use indices")
        handles = amdsmi.amdsmi_get_processor_handles()
        if int(entry) >= len(handles):
            raise LookupError(f"amdsmi lists {len(handles)} GPU(s)")
        handle = handles[int(entry)]

        def read() -> float:
            return _amd_joules(amdsmi.amdsmi_get_energy_count(handle))

        read()
    except NotVisible as exc:
        amdsmi.amdsmi_shut_down()
        return f"amdsmi: {exc} ({', '.join(AMD_VISIBILITY)})"
    except Exception as exc:
        amdsmi.amdsmi_shut_down()
        return f"amdsmi: GPU {entry} has no energy counter here ({exc})"
    return EnergyMeter(f"amdsmi energy accumulator of GPU {entry}", read, amdsmi.amdsmi_shut_down)


def _amd_joules(count: Mapping[str, float]) -> float:
    # amdsmi_get_energy_count: an accumulator in units of `counter_resolution` microjoules; amdsmi
    # before 6.3 called the accumulator "power" (6.3 has both keys, 6.4 only the new one).
    ticks = count["energy_accumulator"] if "energy_accumulator" in count else count["power"]
    return ticks * count["counter_resolution"] / 1e6
