"""What hardware is here, and which backend, device and preset to use on it.

`probe()` runs every probe and returns a `HardwareReport` (JSON-able with `to_dict()`).
Each probe is split in two: a parser that takes the raw input (text, a dict of values, a sysfs
root) so tests feed it fixtures, and a thin reader that fetches that input from the library,
command or file. A probe that is missing or fails lands in `report.absent` with the reason,
never as a traceback.

Accelerators come from, in order: NVML (NVIDIA), amdsmi, then `rocm-smi`, then
`/sys/class/drm` (AMD; the first that finds a GPU wins), `sysctl` (Apple silicon), and last
torch itself for any GPU torch sees that no probe named. torch and mlx are imported only inside
their probes: importing torch takes seconds, so `probe(frameworks="files")` reads their builds
from the installed files instead (torch/version.py, package metadata) and predicts what they will
see from the hardware found; `probe(frameworks="none")` skips them.

`choose()` turns a report into a `Choice` of backend, device and preset, each with its reason.
"""

from __future__ import annotations

import ast
import contextlib
import dataclasses
import importlib.metadata
import importlib.util
import json
import os
import platform
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal

from harness.paths import BACKENDS
from harness.hardware.presets import Preset, choose_cpu_preset, choose_preset, get_preset, memory_gb, primary_accelerator

DRM_ROOT = Path("/sys/class/drm")
PCI_VENDORS = {"0x10de": "nvidia", "0x1002": "amd"}
ROCM_SMI_COMMAND = ["rocm-smi", "--showproductname", "--showmeminfo", "vram", "--showdriverversion", "--json"]
COMMAND_TIMEOUT = 15.0  # seconds; a hung driver tool must not hang `detect`

# The wheel index of each torch build (pyproject.toml's [tool.uv.index] names the same ones for
# uv). PyPI's Linux torch is a CUDA build: a pip user on AMD or CPU gets the right one only here.
TORCH_INDEXES = {
    "cuda": "https://download.pytorch.org/whl/cu128",
    "rocm": "https://download.pytorch.org/whl/rocm6.4",
    "cpu": "https://download.pytorch.org/whl/cpu",
}


def torch_install_command(build: str, replace: bool = False) -> str:
    """The pip command for torch's `build` ("cuda", "rocm" or "cpu") from its index; `replace`
    uninstalls the build that is there first (pip would otherwise call any torch satisfied)."""
    install = f"pip install torch --index-url {TORCH_INDEXES[build]}"
    return f"pip uninstall -y torch && {install}" if replace else install


# How to install each backend's framework (named in errors and reasons).
INSTALL_HINTS = {
    "cuda": f"install with `uv sync --extra cuda` (or `{torch_install_command('cuda')} && pip install -e '.[cuda]'`)",
    "rocm": f"install with `uv sync --extra rocm` (or `{torch_install_command('rocm')} && pip install -e '.[rocm]'`)",
    "mps": "install with `uv sync --extra mps` (or `pip install -e '.[mps]'`)",
    "cpu": f"install with `uv sync --extra cpu` (or `{torch_install_command('cpu')} && pip install -e '.[cpu]'`)",
    "mlx": "install with `uv sync --extra mlx` (or `pip install 'mlx[cpu]'` on Linux, `pip install mlx` on macOS)",
}


class ProbeMissing(Exception):
    """A probe that found nothing or could not run; the message is the reason shown to users."""


@dataclass
class Accelerator:
    vendor: str                       # "nvidia", "amd" or "apple"
    name: str
    memory_bytes: int | None          # VRAM, or unified memory on Apple silicon
    source: str                       # the probe that found it
    compute_capability: str | None = None  # NVIDIA, e.g. "9.0"
    gfx_arch: str | None = None            # AMD, e.g. "gfx942"
    driver_version: str | None = None

    @property
    def memory_gb(self) -> float | None:
        return memory_gb(self.memory_bytes) if self.memory_bytes is not None else None

    def describe(self) -> str:
        parts = [self.name]
        if self.memory_gb is not None:
            parts.append(f"{self.memory_gb:g} GB")
        if self.compute_capability:
            parts.append(f"capability {self.compute_capability}")
        if self.gfx_arch:
            parts.append(self.gfx_arch)
        return ", ".join(parts)


@dataclass
class TorchInfo:
    version: str
    cuda: str | None          # torch.version.cuda: the CUDA the wheel was built for
    hip: str | None           # torch.version.hip: set on ROCm builds
    cuda_available: bool      # torch.cuda.is_available() (also true for HIP devices)
    cuda_device_count: int
    mps_available: bool
    source: str = "import"    # "import": asked torch; "files": its build read from disk, the rest predicted


@dataclass
class MlxInfo:
    version: str
    default_device: str       # "gpu" (Metal, or CUDA builds) or "cpu"
    source: str = "import"    # as TorchInfo.source


@dataclass
class Frameworks:
    torch: TorchInfo | None = None
    mlx: MlxInfo | None = None


@dataclass
class CpuInfo:
    model: str | None = None
    cores: int | None = None
    ram_bytes: int | None = None


@dataclass
class HardwareReport:
    os: str = ""
    os_release: str = ""
    arch: str = ""
    wsl: int | None = None                # 1 or 2 under WSL, else None
    python: str = ""
    frameworks: Frameworks = field(default_factory=Frameworks)
    accelerators: list[Accelerator] = field(default_factory=list)
    cpu: CpuInfo = field(default_factory=CpuInfo)
    absent: dict[str, str] = field(default_factory=dict)  # probe -> why it found nothing

    @property
    def is_apple_silicon(self) -> bool:
        return self.os == "Darwin" and self.arch in ("arm64", "aarch64")

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        for entry, accelerator in zip(data["accelerators"], self.accelerators):
            entry["memory_gb"] = accelerator.memory_gb
        return data


# ---------------------------------------------------------------------------------------------
# Parsers: raw input -> facts. Pure, so tests feed them recorded outputs.
# ---------------------------------------------------------------------------------------------

def parse_wsl(proc_version: str) -> int | None:
    """WSL version from /proc/version: WSL2 kernels say "microsoft-standard-WSL2" (early ones
    only "microsoft-standard"); WSL1 reports a Windows build with "Microsoft"."""
    if "WSL2" in proc_version or "microsoft-standard" in proc_version:
        return 2
    if "Microsoft" in proc_version:
        return 1
    return None


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def parse_nvml(values: dict[str, Any]) -> list[Accelerator]:
    """Values read from NVML (see `read_nvml`): driver version, the driver's CUDA version as
    NVML's integer (12040 = 12.4) and per device name, total memory in bytes, capability."""
    driver = values.get("driver_version")
    cuda = values.get("cuda_driver_version")
    if driver is not None and cuda:
        driver = f"{_text(driver)} (CUDA {cuda // 1000}.{cuda % 1000 // 10})"
    devices = []
    for device in values.get("devices", []):
        capability = device.get("cuda_compute_capability")
        devices.append(Accelerator(
            vendor="nvidia",
            name=_text(device["name"]),
            memory_bytes=int(device["memory_total"]),
            compute_capability=f"{capability[0]}.{capability[1]}" if capability else None,
            driver_version=_text(driver) if driver is not None else None,
            source="nvml",
        ))
    return devices


def _known(value: Any) -> str | None:
    text = _text(value).strip() if value is not None else ""
    return text if text and text.upper() != "N/A" else None


def parse_amdsmi(devices: list[dict[str, Any]]) -> list[Accelerator]:
    """Per device, the dicts amdsmi returns: `asic` (amdsmi_get_gpu_asic_info: market_name,
    target_graphics_version), `vram` (amdsmi_get_gpu_vram_info: vram_size in MiB) and
    `driver` (amdsmi_get_gpu_driver_info: driver_version)."""
    found = []
    for device in devices:
        asic, vram, driver = device.get("asic", {}), device.get("vram", {}), device.get("driver", {})
        size = vram.get("vram_size")
        arch = _known(asic.get("target_graphics_version"))
        found.append(Accelerator(
            vendor="amd",
            name=_known(asic.get("market_name")) or "AMD GPU",
            memory_bytes=int(size) * 2**20 if isinstance(size, int) and size > 0 else None,
            gfx_arch=arch if arch and arch.startswith("gfx") else None,
            driver_version=_known(driver.get("driver_version")),
            source="amdsmi",
        ))
    return found


_ROCM_NAME_KEYS = ("Card Series", "Card series", "Device Name", "Card Model", "Card model")


def parse_rocm_smi(text: str) -> list[Accelerator]:
    """`rocm-smi --showproductname --showmeminfo vram [--showdriverversion] --json`: one object
    per "cardN" with "Card Series"/"Device Name", "GFX Version", "VRAM Total Memory (B)", and
    a "system" object with "Driver version"."""
    start = text.find("{")  # rocm-smi may print warnings before the JSON
    if start < 0:
        raise ValueError("rocm-smi printed no JSON")
    data = json.loads(text[start:])
    driver = _known(data.get("system", {}).get("Driver version"))
    found = []
    for key in sorted(k for k in data if re.fullmatch(r"card\d+", k)):
        card = data[key]
        name = next((_known(card.get(k)) for k in _ROCM_NAME_KEYS if _known(card.get(k))), "AMD GPU")
        memory = _known(card.get("VRAM Total Memory (B)"))
        arch = _known(card.get("GFX Version"))
        found.append(Accelerator(
            vendor="amd",
            name=name,
            memory_bytes=int(memory) if memory and memory.isdigit() else None,
            gfx_arch=arch if arch and arch.startswith("gfx") else None,
            driver_version=driver,
            source="rocm-smi",
        ))
    return found


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def parse_sysfs_drm(root: Path) -> list[Accelerator]:
    """GPUs under a /sys/class/drm tree: `cardN/device/vendor` (0x1002 AMD, 0x10de NVIDIA),
    `device/device`, and for amdgpu `mem_info_vram_total` (bytes) and `product_name`."""
    found = []
    if not root.is_dir():
        return found
    cards = sorted((p for p in root.iterdir() if re.fullmatch(r"card\d+", p.name)),
                   key=lambda p: int(p.name[4:]))
    for card in cards:
        device = card / "device"
        vendor = PCI_VENDORS.get((_read(device / "vendor") or "").lower())
        if vendor is None:
            continue
        memory = _read(device / "mem_info_vram_total")
        pci_id = _read(device / "device") or "?"
        label = "AMD" if vendor == "amd" else "NVIDIA"
        name = _read(device / "product_name") or f"{label} GPU (PCI device {pci_id})"
        found.append(Accelerator(
            vendor=vendor,
            name=name,
            memory_bytes=int(memory) if memory and memory.isdigit() else None,
            source="sysfs",
        ))
    return found


def parse_sysctl(text: str) -> tuple[str, int]:
    """`sysctl -n machdep.cpu.brand_string hw.memsize`: the chip name, then memory in bytes."""
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    if len(lines) != 2 or not lines[1].isdigit():
        raise ValueError(f"unexpected sysctl output: {text.strip()!r}")
    return lines[0], int(lines[1])


def apple_silicon(brand: str, memsize: int) -> Accelerator | None:
    """The GPU of an Apple chip shares its unified memory; Intel Macs have no Apple GPU."""
    if not brand.startswith("Apple"):
        return None
    return Accelerator(vendor="apple", name=brand, memory_bytes=memsize, source="sysctl")


def parse_cpuinfo(text: str) -> str | None:
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("model name", "Model", "Hardware") and value.strip():
            return value.strip()
    return None


def parse_meminfo(text: str) -> int | None:
    match = re.search(r"^MemTotal:\s+(\d+)\s*kB", text, re.MULTILINE)
    return int(match.group(1)) * 1024 if match else None


def torch_accelerators(info: TorchInfo, devices: list[dict[str, Any]]) -> list[Accelerator]:
    """Devices as torch.cuda.get_device_properties describes them (name, total_memory,
    major/minor, gcnArchName on ROCm like "gfx942:sramecc+:xnack-")."""
    found = []
    for device in devices:
        arch = device.get("gcnArchName")
        found.append(Accelerator(
            vendor="amd" if info.hip else "nvidia",
            name=device["name"],
            memory_bytes=int(device["total_memory"]),
            compute_capability=None if info.hip else f"{device['major']}.{device['minor']}",
            gfx_arch=arch.split(":")[0] if info.hip and arch else None,
            source="torch",
        ))
    return found


def parse_torch_version_file(text: str) -> tuple[str, str | None, str | None]:
    """(`__version__`, `cuda`, `hip`) from the text of torch/version.py, which every torch wheel
    writes at build time, read without importing torch."""
    values: dict[str, Any] = {}
    for node in ast.parse(text).body:
        target = node.targets[0] if isinstance(node, ast.Assign) and len(node.targets) == 1 else (
            node.target if isinstance(node, ast.AnnAssign) else None)
        if isinstance(target, ast.Name) and node.value is not None:
            with contextlib.suppress(ValueError):
                values[target.id] = ast.literal_eval(node.value)
    version = values.get("__version__")
    if not isinstance(version, str):
        raise ValueError("torch/version.py names no __version__")
    cuda, hip = values.get("cuda"), values.get("hip")
    return version, cuda if isinstance(cuda, str) else None, hip if isinstance(hip, str) else None


def driver_cuda(accelerator: Accelerator) -> tuple[int, int] | None:
    """The CUDA version an NVIDIA driver supports, from `parse_nvml`'s "550.54 (CUDA 12.4)"."""
    match = re.search(r"CUDA (\d+)\.(\d+)", accelerator.driver_version or "")
    return (int(match.group(1)), int(match.group(2))) if match else None


def predict_torch(version: str, cuda: str | None, hip: str | None, report: "HardwareReport",
                  accelerators: list[Accelerator]) -> tuple[TorchInfo, str | None]:
    """What a torch build would see here, from the hardware the other probes found: a CUDA build
    uses the NVIDIA GPUs whose driver supports its CUDA major version, a ROCm build the AMD GPUs
    (Linux), every macOS arm64 build has MPS. Returns (info, why CUDA/HIP is unusable or None)."""
    why = None
    if hip:
        devices = [a for a in accelerators if a.vendor == "amd"] if report.os == "Linux" else []
        if not devices:
            why = f"no AMD GPU found for torch's ROCm/HIP {hip} build"
    elif cuda:
        nvidia = [a for a in accelerators if a.vendor == "nvidia"]
        major = int(cuda.split(".")[0])
        devices = [a for a in nvidia if (driver_cuda(a) or (major,))[0] >= major]
        if not nvidia:
            why = f"no NVIDIA GPU found for torch's CUDA {cuda} build"
        elif not devices:
            supported = ".".join(map(str, driver_cuda(nvidia[0]) or ()))
            why = (f"the NVIDIA driver supports CUDA {supported}, older than torch's CUDA {cuda} build: "
                   "update the driver")
    else:
        devices = []
    info = TorchInfo(version=version, cuda=cuda, hip=hip, cuda_available=bool(devices),
                     cuda_device_count=len(devices), mps_available=report.is_apple_silicon, source="files")
    return info, why


# ---------------------------------------------------------------------------------------------
# Readers: fetch the raw input from a library, a command or a file.
# ---------------------------------------------------------------------------------------------

def read_nvml(nvml: Any) -> dict[str, Any]:
    """Query NVML through a pynvml-like module; NVML errors propagate (as nvml.NVMLError)."""
    nvml.nvmlInit()
    try:
        values: dict[str, Any] = {"driver_version": nvml.nvmlSystemGetDriverVersion(), "devices": []}
        with contextlib.suppress(nvml.NVMLError):
            values["cuda_driver_version"] = nvml.nvmlSystemGetCudaDriverVersion()
        for index in range(nvml.nvmlDeviceGetCount()):
            handle = nvml.nvmlDeviceGetHandleByIndex(index)
            values["devices"].append({
                "name": nvml.nvmlDeviceGetName(handle),
                "memory_total": nvml.nvmlDeviceGetMemoryInfo(handle).total,
                "cuda_compute_capability": nvml.nvmlDeviceGetCudaComputeCapability(handle),
            })
        return values
    finally:
        nvml.nvmlShutdown()


def probe_nvml(nvml: Any = None) -> list[Accelerator]:
    if nvml is None:
        try:
            import pynvml as nvml
        except ImportError:
            raise ProbeMissing(f"nvidia-ml-py is not installed; {INSTALL_HINTS['cuda']}") from None
    try:
        values = read_nvml(nvml)
    except nvml.NVMLError as exc:
        raise ProbeMissing(f"NVML unavailable: {exc} (no NVIDIA driver?)") from None
    return parse_nvml(values)


def read_amdsmi(amdsmi: Any) -> list[dict[str, Any]]:
    amdsmi.amdsmi_init()
    try:
        devices = []
        for handle in amdsmi.amdsmi_get_processor_handles():
            entry: dict[str, Any] = {"asic": amdsmi.amdsmi_get_gpu_asic_info(handle)}
            for key, call in (("vram", "amdsmi_get_gpu_vram_info"), ("driver", "amdsmi_get_gpu_driver_info")):
                try:
                    entry[key] = getattr(amdsmi, call)(handle)
                except Exception:  # one missing field must not hide the device
                    entry[key] = {}
            devices.append(entry)
        return devices
    finally:
        with contextlib.suppress(Exception):
            amdsmi.amdsmi_shut_down()


def probe_amdsmi(amdsmi: Any = None) -> list[Accelerator]:
    if amdsmi is None:
        try:
            import amdsmi
        except Exception as exc:  # the package raises KeyError etc. when ROCm is not installed
            if isinstance(exc, ImportError):
                raise ProbeMissing("amdsmi is not installed") from None
            raise ProbeMissing(f"amdsmi failed to import: {type(exc).__name__}: {exc}") from None
    try:
        return parse_amdsmi(read_amdsmi(amdsmi))
    except Exception as exc:
        raise ProbeMissing(f"amdsmi failed: {type(exc).__name__}: {exc}") from None


def run_command(command: list[str]) -> str:
    """stdout of a diagnostic command; ProbeMissing when it is absent, fails or hangs."""
    if shutil.which(command[0]) is None:
        raise ProbeMissing(f"{command[0]} is not on PATH")
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=COMMAND_TIMEOUT)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ProbeMissing(f"{command[0]} failed: {exc}") from None
    if result.returncode != 0:
        tail = (result.stderr or result.stdout).strip().splitlines()[-1:] or [""]
        raise ProbeMissing(f"{command[0]} exited with code {result.returncode}: {tail[0]}")
    return result.stdout


def probe_rocm_smi() -> list[Accelerator]:
    return parse_rocm_smi(run_command(ROCM_SMI_COMMAND))


def probe_sysfs(root: Path = DRM_ROOT) -> list[Accelerator]:
    if not root.is_dir():
        raise ProbeMissing(f"{root} does not exist")
    return parse_sysfs_drm(root)


def probe_apple() -> list[Accelerator]:
    if platform.system() != "Darwin":
        raise ProbeMissing("not macOS")
    brand, memsize = parse_sysctl(run_command(["sysctl", "-n", "machdep.cpu.brand_string", "hw.memsize"]))
    accelerator = apple_silicon(brand, memsize)
    if accelerator is None:
        raise ProbeMissing(f"{brand} is not Apple silicon")
    return [accelerator]


def probe_torch() -> tuple[TorchInfo, list[dict[str, Any]], str | None]:
    """(info, visible CUDA/HIP devices, why CUDA is unavailable on a CUDA/HIP build or None)."""
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        import torch

        available = torch.cuda.is_available()
    mps = getattr(torch.backends, "mps", None)
    info = TorchInfo(
        version=torch.__version__,
        cuda=torch.version.cuda,
        hip=getattr(torch.version, "hip", None),
        cuda_available=available,
        cuda_device_count=torch.cuda.device_count() if available else 0,
        mps_available=bool(mps is not None and mps.is_available()),
    )
    devices = []
    for index in range(info.cuda_device_count):
        props = torch.cuda.get_device_properties(index)
        devices.append({"name": props.name, "total_memory": props.total_memory, "major": props.major,
                        "minor": props.minor, "gcnArchName": getattr(props, "gcnArchName", None)})
    why = None
    if (info.cuda or info.hip) and not available:
        messages = [str(w.message).strip().splitlines()[0] for w in caught if "cuda" in str(w.message).lower()]
        why = messages[0] if messages else f"torch {info.version} sees no {'HIP' if info.hip else 'CUDA'} device"
    return info, devices, why


def probe_mlx() -> MlxInfo:
    import mlx.core as mx

    device = mx.default_device()
    kind = getattr(device.type, "name", str(device.type)).split(".")[-1]
    return MlxInfo(version=mx.__version__, default_device=kind)


def torch_build_from_files() -> tuple[str, str | None, str | None]:
    """The installed torch's (version, cuda, hip), read from torch/version.py without importing
    torch; ProbeMissing when torch is not installed."""
    spec = importlib.util.find_spec("torch")
    if spec is None or not spec.submodule_search_locations:
        raise ProbeMissing(f"not installed; {INSTALL_HINTS['cpu']}")
    version_file = Path(next(iter(spec.submodule_search_locations))) / "version.py"
    try:
        return parse_torch_version_file(version_file.read_text(encoding="utf-8"))
    except (OSError, SyntaxError, ValueError) as exc:
        raise ProbeMissing(f"installed, but {version_file} is unreadable ({exc})") from None


MLX_CUDA_DISTRIBUTIONS = ("mlx-cuda-13", "mlx-cuda-12", "mlx-cuda")


def _distribution_installed(name: str) -> bool:
    try:
        importlib.metadata.distribution(name)
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


def mlx_from_files(report: "HardwareReport", accelerators: list[Accelerator]) -> MlxInfo:
    """mlx's version from its metadata and its default device predicted from the build installed
    beside it: Metal on Apple silicon, CUDA (mlx-cuda-*) with an NVIDIA GPU, else the CPU."""
    if importlib.util.find_spec("mlx") is None:
        raise ProbeMissing(f"not installed; {INSTALL_HINTS['mlx']}")
    try:
        version = importlib.metadata.version("mlx")
    except importlib.metadata.PackageNotFoundError:
        raise ProbeMissing("an mlx package is importable but has no installed metadata") from None
    gpu = report.is_apple_silicon or (
        any(a.vendor == "nvidia" for a in accelerators)
        and any(_distribution_installed(name) for name in MLX_CUDA_DISTRIBUTIONS))
    return MlxInfo(version=version, default_device="gpu" if gpu else "cpu", source="files")


def probe_cpu(system: str) -> CpuInfo:
    info = CpuInfo(cores=os.cpu_count())
    if system == "Linux":
        info.model = parse_cpuinfo(_read(Path("/proc/cpuinfo")) or "")
        info.ram_bytes = parse_meminfo(_read(Path("/proc/meminfo")) or "")
    elif system == "Darwin":
        with contextlib.suppress(ProbeMissing, ValueError):
            info.model, info.ram_bytes = parse_sysctl(
                run_command(["sysctl", "-n", "machdep.cpu.brand_string", "hw.memsize"]))
    elif system == "Windows":
        info.ram_bytes = _windows_ram()
    info.model = info.model or platform.processor() or None
    return info


def _windows_ram() -> int | None:
    import ctypes

    class MemoryStatus(ctypes.Structure):
        _fields_ = [("dwLength", ctypes.c_ulong), ("dwMemoryLoad", ctypes.c_ulong),
                    ("ullTotalPhys", ctypes.c_ulonglong), ("ullAvailPhys", ctypes.c_ulonglong),
                    ("ullTotalPageFile", ctypes.c_ulonglong), ("ullAvailPageFile", ctypes.c_ulonglong),
                    ("ullTotalVirtual", ctypes.c_ulonglong), ("ullAvailVirtual", ctypes.c_ulonglong),
                    ("ullAvailExtendedVirtual", ctypes.c_ulonglong)]

    status = MemoryStatus()
    status.dwLength = ctypes.sizeof(MemoryStatus)
    if not ctypes.windll.kernel32.GlobalMemoryStatusEx(ctypes.byref(status)):  # type: ignore[attr-defined]
        return None
    return int(status.ullTotalPhys)


def _run_probe(name: str, probe: Callable[[], list[Accelerator]], absent: dict[str, str]) -> list[Accelerator]:
    """Run one accelerator probe; anything it raises becomes a reason in `absent`."""
    try:
        with contextlib.redirect_stdout(sys.stderr):  # stdout is reserved for `--json`
            found = probe()
    except ProbeMissing as exc:
        absent[name] = str(exc)
        return []
    except Exception as exc:
        absent[name] = f"failed: {type(exc).__name__}: {exc}"
        return []
    if not found:
        absent[name] = "found no GPU"
    return found


FrameworkProbe = Literal["import", "files", "none"]


def probe(frameworks: FrameworkProbe | bool = "import", drm_root: Path = DRM_ROOT) -> HardwareReport:
    """Probe this machine. `frameworks`: "import" (or True) asks torch and mlx themselves
    (seconds); "files" reads their builds from the installed files and predicts what they will
    see (fast, what `autoresearch detect` does); "none" (or False) skips them (then `choose()`
    cannot know what they support)."""
    if isinstance(frameworks, bool):
        frameworks = "import" if frameworks else "none"
    system = platform.system()
    report = HardwareReport(
        os=system,
        os_release=platform.release(),
        arch=platform.machine().lower(),
        python=platform.python_version(),
        cpu=probe_cpu(system),
    )
    absent = report.absent
    if system == "Linux":
        report.wsl = parse_wsl(_read(Path("/proc/version")) or "")

    accelerators = _run_probe("nvml", probe_nvml, absent)
    amd = _run_probe("amdsmi", probe_amdsmi, absent)
    if not amd:
        amd = _run_probe("rocm-smi", probe_rocm_smi, absent)
    sysfs = _run_probe("sysfs", lambda: probe_sysfs(drm_root), absent) if system == "Linux" else []
    if not amd:
        amd = [a for a in sysfs if a.vendor == "amd"]
    if not accelerators:  # sysfs names an NVIDIA card even when NVML cannot load
        accelerators = [a for a in sysfs if a.vendor == "nvidia"]
    accelerators += amd
    accelerators += _run_probe("apple", probe_apple, absent)

    if frameworks == "import":
        _probe_frameworks(report, accelerators)
    elif frameworks == "files":
        _frameworks_from_files(report, accelerators)
    else:
        for name, module in (("torch", "torch"), ("mlx", "mlx")):
            installed = _installed(module)
            absent[name] = "installed, not probed (probe(frameworks='none'))" if installed else "not installed"
    report.accelerators = accelerators
    return report


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def _frameworks_from_files(report: HardwareReport, accelerators: list[Accelerator]) -> None:
    absent = report.absent
    try:
        info, why = predict_torch(*torch_build_from_files(), report, accelerators)
        report.frameworks.torch = info
        if why:
            absent["torch.cuda"] = why
    except ProbeMissing as exc:
        absent["torch"] = str(exc)
    try:
        report.frameworks.mlx = mlx_from_files(report, accelerators)
    except ProbeMissing as exc:
        absent["mlx"] = str(exc)


def _probe_frameworks(report: HardwareReport, accelerators: list[Accelerator]) -> None:
    absent = report.absent
    if not _installed("torch"):
        absent["torch"] = f"not installed; {INSTALL_HINTS['cpu']}"
    else:
        try:
            with contextlib.redirect_stdout(sys.stderr):
                info, devices, why = probe_torch()
            report.frameworks.torch = info
            if why:
                absent["torch.cuda"] = why
            # GPUs torch can use but no vendor probe named (e.g. no NVML library on the path).
            seen = {a.vendor for a in accelerators if a.memory_bytes is not None}
            extra = [a for a in torch_accelerators(info, devices) if a.vendor not in seen]
            if extra:
                accelerators[:] = [a for a in accelerators if a.vendor != extra[0].vendor] + extra
        except Exception as exc:
            absent["torch"] = f"import failed: {type(exc).__name__}: {exc}"
    if not _installed("mlx.core"):
        absent["mlx"] = f"not installed; {INSTALL_HINTS['mlx']}"
    else:
        try:
            with contextlib.redirect_stdout(sys.stderr):
                report.frameworks.mlx = probe_mlx()
        except Exception as exc:
            absent["mlx"] = f"import failed: {type(exc).__name__}: {exc}"


# ---------------------------------------------------------------------------------------------
# Choosing backend, device and preset
# ---------------------------------------------------------------------------------------------

@dataclass
class Choice:
    backend: str
    device: str
    preset: str
    reasons: dict[str, str]  # "backend", "device", "preset" -> why

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def summary(self) -> str:
        return f"backend {self.backend} on device {self.device}, preset {self.preset}"


def attention_note(accelerator: Accelerator) -> str:
    """What attention kernels the cuda trainer will try on this NVIDIA capability, best first (the
    trainer proves each with a test call and falls back to SDPA)."""
    from harness.hardware.platform import PlatformFacts, flash_attention_candidates

    try:
        major, minor = (int(part) for part in (accelerator.compute_capability or "").split(".")[:2])
    except ValueError:
        return "compute capability unknown: SDPA attention"
    order, _ = flash_attention_candidates(PlatformFacts("cuda", capability=(major, minor)), "bf16")
    if not order:
        return f"no FlashAttention kernel for capability {major}.{minor}: SDPA attention"
    return "tries " + ", then ".join(dict.fromkeys(source.kernel for source in order)) + ", else SDPA"


def _torch_label(info: TorchInfo) -> str:
    if info.hip:
        return f"torch {info.version} (ROCm/HIP {info.hip})"
    if info.cuda:
        return f"torch {info.version} (CUDA {info.cuda})"
    return f"torch {info.version}"


def _wsl_note(report: HardwareReport) -> str:
    if report.wsl == 1:
        return "; WSL1 has no GPU access: convert the distro with `wsl --set-version <distro> 2`"
    return ""


@dataclass
class TorchBuildAdvice:
    """The installed torch build does not fit the hardware: what is wrong and the command that
    installs the build that does."""

    installed: str   # "cuda", "rocm" or "cpu"
    wanted: str
    problem: str
    command: str     # pip, from the wanted build's index
    uv_command: str  # the same through uv's per-extra index

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def fix(self) -> str:
        return f"`{self.command}` (with uv: `{self.uv_command}`)"


BUILD_LABELS = {"cuda": "a CUDA build", "rocm": "a ROCm build", "cpu": "a CPU build"}


def _torch_build(info: TorchInfo) -> str:
    return "rocm" if info.hip else "cuda" if info.cuda else "cpu"


def torch_build_advice(report: HardwareReport) -> TorchBuildAdvice | None:
    """A CUDA build on an AMD or GPU-less machine, a CPU or ROCm build next to an NVIDIA GPU, a
    CPU or CUDA build next to an AMD GPU on Linux: the build that fits, and how to get it. None
    when the build fits, torch is absent, or on macOS (one build there, with MPS)."""
    torch = report.frameworks.torch
    if torch is None or report.os == "Darwin":
        return None
    installed = _torch_build(torch)
    gpu = primary_accelerator(report, "nvidia") or primary_accelerator(report, "amd")
    if gpu is None:
        wanted = "cpu"
    elif gpu.vendor == "nvidia":
        wanted = "cuda"
    elif report.os == "Linux":
        wanted = "rocm"
    else:  # no ROCm wheels for this OS: a CUDA build is dead weight, a CPU build is the best there is
        wanted = "cpu"
    if installed == wanted:
        return None
    label = BUILD_LABELS[installed]
    if gpu is None:
        problem = (f"torch {torch.version} is {label}, but there is no NVIDIA or AMD GPU here: it runs on "
                   f"the CPU, as the CPU build does, which is gigabytes smaller")
    elif wanted == "cpu":
        problem = (f"torch {torch.version} is {label}, but the GPU here is {gpu.describe()}, which it "
                   f"cannot use and for which this OS has no ROCm build: the CPU build is gigabytes smaller")
    else:
        problem = (f"torch {torch.version} is {label}, which cannot use the {gpu.describe()} here; "
                   f"{BUILD_LABELS[wanted].replace('a ', 'the ', 1)} can")
    return TorchBuildAdvice(installed=installed, wanted=wanted, problem=problem,
                            command=torch_install_command(wanted, replace=True),
                            uv_command=f"uv sync --extra {wanted}")


def _unusable_note(report: HardwareReport, torch: TorchInfo | None) -> str:
    """Why the accelerators found (if any) cannot be used, with the fix."""
    device = primary_accelerator(report)
    if device is None:
        return "no NVIDIA/AMD GPU or Apple silicon found" + _wsl_note(report)
    if device.vendor == "apple":
        fix = INSTALL_HINTS["mps"] + "; or " + INSTALL_HINTS["mlx"]
        return f"{device.describe()} found, but neither torch with MPS nor mlx on the GPU is installed: {fix}"
    backend = "cuda" if device.vendor == "nvidia" else "rocm"
    if torch is None:
        return f"{device.describe()} found, but torch is not installed: {INSTALL_HINTS[backend]}"
    advice = torch_build_advice(report)
    if advice is not None:
        return (f"{device.describe()} found, but {_torch_label(torch)} is {BUILD_LABELS[advice.installed]}: "
                f"install {BUILD_LABELS[advice.wanted].replace('a ', 'the ', 1)} with {advice.fix()}"
                + _wsl_note(report))
    why = report.absent.get("torch.cuda") or f"{_torch_label(torch)} cannot use it"
    return f"{device.describe()} found, but {why}: {INSTALL_HINTS[backend]}" + _wsl_note(report)


def _auto_backend(report: HardwareReport) -> tuple[str, str, str | None, str]:
    """(backend, device, vendor whose tier applies or None for CPU, reason)."""
    torch, mlx = report.frameworks.torch, report.frameworks.mlx
    if torch is not None and torch.cuda_available:
        vendor = "amd" if torch.hip else "nvidia"
        device = primary_accelerator(report, vendor)
        label = device.describe() if device else f"{torch.cuda_device_count} {vendor} device(s)"
        if torch.hip:
            return "rocm", "cuda", vendor, (
                f"{label}, {_torch_label(torch)} -> backend rocm (HIP devices are torch's 'cuda')")
        note = attention_note(device) if device else "FlashAttention if the capability allows"
        return "cuda", "cuda", vendor, f"{label}, {_torch_label(torch)} -> backend cuda, {note}"
    if report.is_apple_silicon:
        chip = primary_accelerator(report, "apple")
        label = chip.describe() if chip else "Apple silicon"
        if torch is not None and torch.mps_available:
            return "mps", "mps", "apple", f"{label}, {_torch_label(torch)} with MPS -> backend mps"
        if mlx is not None and mlx.default_device == "gpu":
            return "mlx", "gpu", "apple", f"{label}, mlx {mlx.version} on Metal (torch MPS unavailable) -> backend mlx"
    if mlx is not None and mlx.default_device == "gpu" and torch is None:
        device = primary_accelerator(report)
        return "mlx", "gpu", device.vendor if device else None, (
            f"mlx {mlx.version} sees a GPU and torch is not installed -> backend mlx")
    note = _unusable_note(report, torch)
    if torch is not None:
        return "cuda", "cpu", None, f"{note}; {_torch_label(torch)} -> the cuda trainer (PyTorch) on the CPU"
    if mlx is not None:
        return "mlx", mlx.default_device, None, (
            f"{note}; only mlx {mlx.version} is installed -> the mlx trainer on its {mlx.default_device}")
    return "cuda", "cpu", None, f"{note}; no framework installed: {INSTALL_HINTS['cpu']} -> the cuda trainer on the CPU"


def _build_fix(torch: TorchInfo, build: str) -> str:
    """How to get torch's `build` when another build is installed (an install hint otherwise)."""
    if _torch_build(torch) == build:
        return INSTALL_HINTS[build]
    return (f"install {BUILD_LABELS[build].replace('a ', 'the ', 1)} with "
            f"`{torch_install_command(build, replace=True)}` (with uv: `uv sync --extra {build}`)")


def _forced_backend(report: HardwareReport, backend: str) -> tuple[str, str | None, str]:
    """(device, vendor whose tier applies or None, reason) for `--backend`; ValueError when the
    backend's framework is missing."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    torch, mlx = report.frameworks.torch, report.frameworks.mlx
    if backend == "mlx":
        if mlx is None:
            raise ValueError(f"--backend mlx needs mlx, which is not installed here: {INSTALL_HINTS['mlx']}")
        vendor = "apple" if report.is_apple_silicon else None
        return mlx.default_device, vendor if mlx.default_device == "gpu" else None, (
            f"requested with --backend; mlx {mlx.version} runs on its default device {mlx.default_device}")
    if torch is None:
        raise ValueError(f"--backend {backend} needs torch, which is not installed here: {INSTALL_HINTS[backend]}")
    label = _torch_label(torch)
    if backend == "cuda":
        if torch.cuda_available and not torch.hip:
            device = primary_accelerator(report, "nvidia")
            note = f", {attention_note(device)}" if device else ""
            return "cuda", "nvidia", f"requested with --backend; {label} sees a CUDA device{note}"
        why = "it is a ROCm build: use --backend rocm for the AMD GPU" if torch.hip else (
            report.absent.get("torch.cuda") or f"it has no CUDA device here; {_build_fix(torch, 'cuda')}")
        return "cpu", None, f"requested with --backend, but {label}: {why} -> device cpu"
    if backend == "rocm":
        if torch.cuda_available and torch.hip:
            return "cuda", "amd", f"requested with --backend; {label} sees a HIP device (torch's 'cuda')"
        why = report.absent.get("torch.cuda") if torch.hip else f"it is not a ROCm build; {_build_fix(torch, 'rocm')}"
        return "cpu", None, f"requested with --backend, but {label}: {why or 'no HIP device'} -> device cpu"
    if torch.mps_available:  # backend == "mps"
        return "mps", "apple", f"requested with --backend; {label} has MPS"
    return "cpu", None, (
        f"requested with --backend, but {label} has no MPS device (Apple silicon + macOS only) -> device cpu")


def choose(report: HardwareReport, presets: dict[str, Preset], backend: str | None = None,
           preset: str | None = None) -> Choice:
    """Backend, device and preset for this report, each with its reason. `backend` and `preset`
    override the automatic choice and are validated against what is present (ValueError)."""
    if backend is None:
        backend, device, vendor, backend_reason = _auto_backend(report)
    else:
        device, vendor, backend_reason = _forced_backend(report, backend)

    if device == "cpu":
        device_reason = "no accelerator usable by this backend: runs on the CPU"
    elif device == "gpu":
        device_reason = "mlx's default device is the GPU"
    else:
        accelerator = primary_accelerator(report, vendor) if vendor else None
        where = f"torch device '{device}'"
        device_reason = f"{accelerator.describe()} via {where}" if accelerator else where

    if preset is not None:
        chosen = get_preset(preset, presets)
        preset_reason = f"requested with --preset ({chosen.match.summary()})"
        accelerator = primary_accelerator(report, vendor) if vendor else None
        if device == "cpu" and "cpu" not in chosen.match.vendors:
            preset_reason += "; it is sized for a GPU, so expect it to be very slow on the CPU"
        elif accelerator and accelerator.memory_gb is not None and accelerator.memory_gb < chosen.match.min_memory_gb:
            preset_reason += (f"; warning: {accelerator.name} has {accelerator.memory_gb:g} GB, less than "
                              "the tier's minimum: expect out-of-memory errors")
    elif vendor is None:
        why = "device cpu" if device == "cpu" else f"no tier for mlx's {device} device"
        chosen, preset_reason = choose_cpu_preset(report, presets, why)
    else:
        chosen, preset_reason = choose_preset(report, presets, vendor=vendor)

    return Choice(backend=backend, device=device, preset=chosen.name,
                  reasons={"backend": backend_reason, "device": device_reason, "preset": preset_reason})
