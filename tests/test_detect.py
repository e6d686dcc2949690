"""Hardware detection: each probe's parser on recorded outputs, the readers on real files, real
subprocesses and real imports, the probe on this machine, and the backend/device/preset choice."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from harness.hardware import detect
from harness.hardware.detect import (
    Accelerator,
    CpuInfo,
    Frameworks,
    HardwareReport,
    MlxInfo,
    ProbeMissing,
    TorchInfo,
    choose,
)
from harness.hardware.presets import load_presets

FIXTURES = Path(__file__).parent / "fixtures" / "detect"
PROJECT = Path(__file__).resolve().parent.parent
MiB, GiB = 2**20, 2**30


def fixture(name: str) -> str:
    return (FIXTURES / name).read_text()


@pytest.fixture(scope="module")
def presets():
    return load_presets()


# --- NVML ------------------------------------------------------------------------------------

class FakeNVML:
    """Stands in for the pynvml module: the NVML library cannot load on a machine without an
    NVIDIA driver. Same call surface as nvidia-ml-py; records calls so shutdown is checked."""

    class NVMLError(Exception):
        pass

    def __init__(self, values: dict, init_error: str | None = None, names_as_bytes: bool = False):
        self.values, self.init_error, self.names_as_bytes = values, init_error, names_as_bytes
        self.calls: list[str] = []

    def nvmlInit(self):
        self.calls.append("init")
        if self.init_error:
            raise self.NVMLError(self.init_error)

    def nvmlShutdown(self):
        self.calls.append("shutdown")

    def nvmlSystemGetDriverVersion(self):
        version = self.values["driver_version"]
        return version.encode() if self.names_as_bytes else version

    def nvmlSystemGetCudaDriverVersion(self):
        return self.values["cuda_driver_version"]

    def nvmlDeviceGetCount(self):
        return len(self.values["devices"])

    def nvmlDeviceGetHandleByIndex(self, index):
        return self.values["devices"][index]

    def nvmlDeviceGetName(self, handle):
        return handle["name"].encode() if self.names_as_bytes else handle["name"]

    def nvmlDeviceGetMemoryInfo(self, handle):
        return SimpleNamespace(total=handle["memory_total"], free=handle["memory_total"], used=0)

    def nvmlDeviceGetCudaComputeCapability(self, handle):
        return tuple(handle["cuda_compute_capability"])


def test_nvml_values_of_an_h100():
    [gpu] = detect.parse_nvml(json.loads(fixture("nvml_h100.json")))
    assert gpu.vendor == "nvidia"
    assert gpu.name == "NVIDIA H100 80GB HBM3"
    assert gpu.memory_bytes == 81559 * MiB
    assert gpu.memory_gb == 79.6
    assert gpu.compute_capability == "9.0"
    assert gpu.driver_version == "550.54.15 (CUDA 12.4)"
    assert gpu.source == "nvml"


def test_read_nvml_through_a_pynvml_like_module_and_shut_down():
    values = json.loads(fixture("nvml_2x_rtx3060.json"))
    nvml = FakeNVML(values, names_as_bytes=True)  # older nvidia-ml-py returned bytes
    gpus = detect.probe_nvml(nvml)
    assert [g.name for g in gpus] == ["NVIDIA GeForce RTX 3060"] * 2
    assert [g.compute_capability for g in gpus] == ["8.6", "8.6"]
    assert gpus[0].driver_version == "535.183.01 (CUDA 12.2)"
    assert nvml.calls == ["init", "shutdown"]


def test_nvml_error_is_a_reason_not_a_traceback():
    nvml = FakeNVML({}, init_error="Driver Not Loaded")
    with pytest.raises(ProbeMissing, match="Driver Not Loaded"):
        detect.probe_nvml(nvml)
    absent: dict[str, str] = {}
    assert detect._run_probe("nvml", lambda: detect.probe_nvml(nvml), absent) == []
    assert "Driver Not Loaded" in absent["nvml"]


def test_real_nvml_library_on_this_machine():
    # nvidia-ml-py is installed here but no driver: the real library must fail politely.
    try:
        gpus = detect.probe_nvml()
    except ProbeMissing as exc:
        assert "NVML" in str(exc) or "not installed" in str(exc)
    else:
        assert gpus and all(g.vendor == "nvidia" and g.memory_bytes for g in gpus)


# --- AMD: amdsmi, rocm-smi, sysfs -----------------------------------------------------------

class FakeAmdSmi:
    """Stands in for the amdsmi module (needs the ROCm driver): returns the recorded dicts."""

    class AmdSmiException(Exception):
        pass

    def __init__(self, devices: list[dict], broken_vram: bool = False):
        self.devices, self.broken_vram, self.calls = devices, broken_vram, []

    def amdsmi_init(self):
        self.calls.append("init")

    def amdsmi_shut_down(self):
        self.calls.append("shutdown")

    def amdsmi_get_processor_handles(self):
        return list(range(len(self.devices)))

    def amdsmi_get_gpu_asic_info(self, handle):
        return self.devices[handle]["asic"]

    def amdsmi_get_gpu_vram_info(self, handle):
        if self.broken_vram:
            raise self.AmdSmiException("AMDSMI_STATUS_NOT_SUPPORTED")
        return self.devices[handle]["vram"]

    def amdsmi_get_gpu_driver_info(self, handle):
        return self.devices[handle]["driver"]


def test_amdsmi_values_of_an_mi300x():
    [gpu] = detect.parse_amdsmi(json.loads(fixture("amdsmi_mi300x.json")))
    assert (gpu.vendor, gpu.name, gpu.gfx_arch, gpu.driver_version) == ("amd", "AMD Instinct MI300X", "gfx942", "6.8.5")
    assert gpu.memory_bytes == 196592 * MiB and gpu.memory_gb == 192.0


def test_amdsmi_through_a_module_keeps_a_device_whose_memory_query_fails():
    devices = json.loads(fixture("amdsmi_mi300x.json"))
    amdsmi = FakeAmdSmi(devices, broken_vram=True)
    [gpu] = detect.probe_amdsmi(amdsmi)
    assert gpu.name == "AMD Instinct MI300X" and gpu.memory_bytes is None
    assert amdsmi.calls == ["init", "shutdown"]


def test_amdsmi_import_raising_keyerror_is_reported(tmp_path, monkeypatch):
    # The real amdsmi package raises KeyError at import when ROCm's library path is missing.
    (tmp_path / "amdsmi.py").write_text("import os\nos.environ['ROCM_PATH_THAT_IS_NOT_SET']\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "amdsmi", raising=False)
    with pytest.raises(ProbeMissing, match="amdsmi failed to import: KeyError"):
        detect.probe_amdsmi()


def test_rocm_smi_json_of_an_mi300x():
    [gpu] = detect.parse_rocm_smi(fixture("rocm_smi_mi300x.json"))
    assert (gpu.name, gpu.gfx_arch, gpu.driver_version, gpu.source) == ("AMD Instinct MI300X", "gfx942", "6.8.5", "rocm-smi")
    assert gpu.memory_bytes == 205822885888 and gpu.memory_gb == 191.7


def test_rocm_smi_json_with_discrete_card_and_apu():
    gpus = detect.parse_rocm_smi(fixture("rocm_smi_navi21_apu.json"))
    assert [(g.name, g.gfx_arch, g.memory_bytes) for g in gpus] == [
        ("Navi 21 [Radeon RX 6800/6800 XT / 6900 XT]", "gfx1030", 17163091968),
        ("Raphael", "gfx1036", 67108864),
    ]
    assert {g.driver_version for g in gpus} == {"6.10.5"}


def test_rocm_smi_tolerates_a_warning_before_the_json_and_rejects_garbage():
    text = "WARNING: AMD GPU device(s) is/are in a low-power state.\n" + fixture("rocm_smi_7900xt.json")
    [gpu] = detect.parse_rocm_smi(text)
    assert (gpu.name, gpu.gfx_arch, gpu.driver_version) == ("Radeon RX 7900 XT", "gfx1100", None)
    with pytest.raises(ValueError):
        detect.parse_rocm_smi("ERROR: GPU[0] : Unable to get product name")


def _fake_command(bin_dir: Path, name: str, body: str) -> None:
    bin_dir.mkdir(exist_ok=True)
    script = bin_dir / name
    script.write_text("#!/bin/sh\n" + body + "\n")
    script.chmod(0o755)


@pytest.mark.skipif(os.name != "posix", reason="shell scripts stand in for rocm-smi")
def test_rocm_smi_run_as_a_real_command(tmp_path, monkeypatch):
    bin_dir = tmp_path / "bin"
    _fake_command(bin_dir, "rocm-smi", f"cat '{FIXTURES / 'rocm_smi_mi300x.json'}'")
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    [gpu] = detect.probe_rocm_smi()
    assert gpu.name == "AMD Instinct MI300X"


@pytest.mark.skipif(os.name != "posix", reason="shell scripts stand in for rocm-smi")
def test_rocm_smi_missing_failing_or_hanging_gives_reasons(tmp_path, monkeypatch):
    bin_dir, system_path = tmp_path / "bin", os.environ["PATH"]
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(ProbeMissing, match="not on PATH"):
        detect.probe_rocm_smi()

    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{system_path}")
    _fake_command(bin_dir, "rocm-smi", "echo 'ERROR: Driver not initialized (amdgpu not found in modules)' >&2; exit 2")
    with pytest.raises(ProbeMissing, match="exited with code 2: ERROR: Driver not initialized"):
        detect.probe_rocm_smi()

    _fake_command(bin_dir, "rocm-smi", "exec sleep 30")
    monkeypatch.setattr(detect, "COMMAND_TIMEOUT", 0.5)
    with pytest.raises(ProbeMissing, match="timed out"):
        detect.probe_rocm_smi()


def make_card(root: Path, card: str, vendor: str, device: str, vram: int | None = None,
              product: str | None = None) -> None:
    """One /sys/class/drm/cardN entry as amdgpu / nvidia / i915 expose it."""
    path = root / card / "device"
    path.mkdir(parents=True)
    (path / "vendor").write_text(f"{vendor}\n")
    (path / "device").write_text(f"{device}\n")
    if vram is not None:
        (path / "mem_info_vram_total").write_text(f"{vram}\n")
    if product is not None:
        (path / "product_name").write_text(f"{product}\n")


def test_sysfs_tree_with_amd_nvidia_and_intel_cards(tmp_path):
    root = tmp_path / "drm"
    make_card(root, "card0", "0x8086", "0x46a6")                         # Intel iGPU: ignored
    make_card(root, "card1", "0x1002", "0x744c", vram=25753026560)      # RX 7900 XTX
    make_card(root, "card10", "0x1002", "0x74a1", vram=205822885888, product="AMD Instinct MI300X")
    make_card(root, "card2", "0x10de", "0x2684")                        # NVIDIA: no VRAM file
    (root / "card1-DP-1").mkdir()                                       # a connector
    (root / "renderD128").mkdir()
    gpus = detect.parse_sysfs_drm(root)
    assert [(g.vendor, g.name, g.memory_bytes) for g in gpus] == [
        ("amd", "AMD GPU (PCI device 0x744c)", 25753026560),
        ("nvidia", "NVIDIA GPU (PCI device 0x2684)", None),
        ("amd", "AMD Instinct MI300X", 205822885888),
    ]
    assert {g.source for g in gpus} == {"sysfs"}


def test_sysfs_absent_or_empty_is_a_reason(tmp_path):
    absent: dict[str, str] = {}
    assert detect._run_probe("sysfs", lambda: detect.probe_sysfs(tmp_path / "nope"), absent) == []
    assert "does not exist" in absent["sysfs"]
    (tmp_path / "drm").mkdir()
    assert detect._run_probe("sysfs", lambda: detect.probe_sysfs(tmp_path / "drm"), absent) == []
    assert absent["sysfs"] == "found no GPU"


# --- Apple, WSL, CPU -------------------------------------------------------------------------

def test_sysctl_of_apple_silicon_and_of_an_intel_mac():
    brand, memsize = detect.parse_sysctl(fixture("sysctl_m2max.txt"))
    assert (brand, memsize) == ("Apple M2 Max", 64 * GiB)
    chip = detect.apple_silicon(brand, memsize)
    assert (chip.vendor, chip.name, chip.memory_gb, chip.source) == ("apple", "Apple M2 Max", 64.0, "sysctl")
    assert detect.apple_silicon(*detect.parse_sysctl(fixture("sysctl_intel.txt"))) is None
    with pytest.raises(ValueError):
        detect.parse_sysctl("sysctl: unknown oid 'machdep.cpu.brand_string'\n")


@pytest.mark.parametrize("name, version", [
    ("proc_version_wsl1.txt", 1),
    ("proc_version_wsl2.txt", 2),
    ("proc_version_wsl2_2020.txt", 2),
    ("proc_version_linux.txt", None),
])
def test_wsl_version_from_proc_version(name, version):
    assert detect.parse_wsl(fixture(name)) == version


@pytest.mark.skipif(not Path("/proc/meminfo").exists(), reason="Linux /proc only")
def test_cpu_model_and_ram_from_this_machines_proc_files():
    assert detect.parse_cpuinfo(Path("/proc/cpuinfo").read_text())
    ram = detect.parse_meminfo(Path("/proc/meminfo").read_text())
    assert ram and ram > 256 * MiB
    assert detect.parse_cpuinfo("processor\t: 0\nBogoMIPS\t: 48.00\nModel\t\t: Raspberry Pi 5 Model B Rev 1.0\n") \
        == "Raspberry Pi 5 Model B Rev 1.0"


def test_torch_device_properties_become_accelerators():
    cuda = TorchInfo("2.8.0+cu128", "12.8", None, True, 1, False)
    [gpu] = detect.torch_accelerators(cuda, [{"name": "NVIDIA GeForce RTX 4090", "total_memory": 25757220864,
                                             "major": 8, "minor": 9, "gcnArchName": None}])
    assert (gpu.vendor, gpu.compute_capability, gpu.gfx_arch, gpu.source) == ("nvidia", "8.9", None, "torch")
    hip = TorchInfo("2.8.0+rocm6.4", None, "6.4.43482", True, 1, False)
    [gpu] = detect.torch_accelerators(hip, [{"name": "AMD Instinct MI300X", "total_memory": 205822885888,
                                            "major": 9, "minor": 4, "gcnArchName": "gfx942:sramecc+:xnack-"}])
    assert (gpu.vendor, gpu.compute_capability, gpu.gfx_arch) == ("amd", None, "gfx942")


# --- The real probe ----------------------------------------------------------------------------

def test_probe_this_machine():
    report = detect.probe()
    data = json.loads(json.dumps(report.to_dict()))
    assert data["os"] == platform.system() and data["python"] == platform.python_version()
    assert report.cpu.cores == os.cpu_count()
    torch = pytest.importorskip("torch")
    assert report.frameworks.torch.version == torch.__version__
    assert report.frameworks.torch.cuda_available == torch.cuda.is_available()
    choice = choose(report, load_presets())
    if torch.cuda.is_available():
        assert choice.device == "cuda" and report.accelerators
    elif not report.is_apple_silicon:
        # This CI machine: no GPU, the CPU build of torch.
        assert (choice.backend, choice.device, choice.preset) == ("cuda", "cpu", "cpu-tiny")
        assert "nvml" in report.absent
        assert set(choice.reasons) == {"backend", "device", "preset"}


def test_probe_without_frameworks_does_not_import_torch():
    code = ("import sys; from harness.hardware.detect import probe; r = probe(frameworks='none'); "
            "print('torch' in sys.modules, 'mlx.core' in sys.modules, r.frameworks.torch)")
    out = subprocess.run([sys.executable, "-c", code], cwd=PROJECT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False", "False", "None"]


def test_probe_from_files_imports_nothing_and_agrees_with_the_imports():
    code = ("import json, sys; from harness.hardware.detect import probe; r = probe(frameworks='files'); "
            "print(json.dumps([sorted(m for m in ('torch', 'mlx.core') if m in sys.modules), r.to_dict()]))")
    out = subprocess.run([sys.executable, "-c", code], cwd=PROJECT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    imported, fast = json.loads(out.stdout)
    assert imported == []
    full = detect.probe(frameworks="import").to_dict()
    for name in ("torch", "mlx"):
        if full["frameworks"][name] is None:
            assert fast["frameworks"][name] is None and name in fast["absent"]
            continue
        assert fast["frameworks"][name]["source"] == "files"
        assert {**fast["frameworks"][name], "source": "import"} == full["frameworks"][name], name
    presets = load_presets()
    assert choose(detect.probe(frameworks="files"), presets) == choose(detect.probe(), presets)


# --- torch and mlx builds read from their files ---------------------------------------------------

@pytest.mark.parametrize("name, build", [
    ("torch_version_cu128.py.txt", ("2.8.0+cu128", "12.8", None)),
    ("torch_version_rocm64.py.txt", ("2.8.0+rocm6.4", None, "6.4.43482-0f2d60242")),
    ("torch_version_cpu.py.txt", ("2.13.0+cpu", None, None)),
    ("torch_version_cu118_2_1.py.txt", ("2.1.2+cu118", "11.8", None)),
])
def test_torch_build_from_its_version_file(name, build):
    assert detect.parse_torch_version_file(fixture(name)) == build


def test_torch_version_file_without_a_version_is_rejected():
    with pytest.raises(ValueError, match="__version__"):
        detect.parse_torch_version_file("cuda = '12.8'\n")


def test_installed_torch_is_read_from_its_files():
    torch = pytest.importorskip("torch")
    assert detect.torch_build_from_files() == (torch.__version__, torch.version.cuda, torch.version.hip)


def nvml_accelerators(name: str, **changes) -> list[Accelerator]:
    return detect.parse_nvml({**json.loads(fixture(name)), **changes})


def test_a_cuda_build_is_predicted_to_see_the_nvidia_gpus_its_driver_supports():
    linux = report_of()
    version, cuda, hip = detect.parse_torch_version_file(fixture("torch_version_cu128.py.txt"))
    info, why = detect.predict_torch(version, cuda, hip, linux, nvml_accelerators("nvml_2x_rtx3060.json"))
    assert (info.cuda_available, info.cuda_device_count, info.source, why) == (True, 2, "files", None)
    old_driver = nvml_accelerators("nvml_h100.json", cuda_driver_version=11080)
    info, why = detect.predict_torch(version, cuda, hip, linux, old_driver)
    assert not info.cuda_available and "supports CUDA 11.8, older than torch's CUDA 12.8" in why
    info, why = detect.predict_torch(version, cuda, hip, linux, [])
    assert not info.cuda_available and "no NVIDIA GPU found" in why


def test_a_rocm_build_sees_amd_gpus_on_linux_and_mps_comes_with_apple_silicon():
    version, cuda, hip = detect.parse_torch_version_file(fixture("torch_version_rocm64.py.txt"))
    amd = detect.parse_rocm_smi(fixture("rocm_smi_mi300x.json"))
    info, why = detect.predict_torch(version, cuda, hip, report_of(), amd)
    assert (info.cuda_available, info.cuda_device_count, why) == (True, len(amd), None)
    info, why = detect.predict_torch(version, cuda, hip, report_of(), nvml_accelerators("nvml_h100.json"))
    assert not info.cuda_available and "no AMD GPU found" in why
    mac = report_of(os_name="Darwin", arch="arm64")
    info, _ = detect.predict_torch("2.8.0", None, None, mac, [])
    assert info.mps_available and not info.cuda_available
    assert not detect.predict_torch("2.8.0", None, None, report_of(), [])[0].mps_available


def test_installed_mlx_is_read_from_its_metadata():
    mlx = pytest.importorskip("mlx.core")
    info = detect.mlx_from_files(report_of(), [])
    assert info.version == detect.probe_mlx().version and info.source == "files"
    assert info.default_device == detect.probe_mlx().default_device
    assert detect.mlx_from_files(report_of(os_name="Darwin", arch="arm64"), []).default_device == "gpu"


# --- the torch build against the hardware ---------------------------------------------------------

def amd_accelerators() -> list[Accelerator]:
    return detect.parse_amdsmi(json.loads(fixture("amdsmi_mi300x.json")))


@pytest.mark.parametrize("torch_file, hardware, wanted", [
    ("torch_version_cpu.py.txt", "nvidia", "cuda"),   # a CPU build next to an NVIDIA GPU
    ("torch_version_rocm64.py.txt", "nvidia", "cuda"),
    ("torch_version_cu128.py.txt", "amd", "rocm"),    # a CUDA build on an AMD machine
    ("torch_version_cpu.py.txt", "amd", "rocm"),
    ("torch_version_cu128.py.txt", "none", "cpu"),    # a CUDA build on a CPU-only machine
    ("torch_version_rocm64.py.txt", "none", "cpu"),
    ("torch_version_cu128.py.txt", "nvidia", None),   # builds that fit
    ("torch_version_rocm64.py.txt", "amd", None),
    ("torch_version_cpu.py.txt", "none", None),
])
def test_a_torch_build_that_does_not_fit_the_hardware_is_named_with_its_fix(torch_file, hardware, wanted):
    accelerators = {"nvidia": nvml_accelerators("nvml_h100.json"), "amd": amd_accelerators(), "none": []}[hardware]
    report = report_of(*accelerators)
    report.frameworks.torch, _ = detect.predict_torch(*detect.parse_torch_version_file(fixture(torch_file)),
                                                      report, accelerators)
    advice = detect.torch_build_advice(report)
    if wanted is None:
        assert advice is None
        return
    assert advice.wanted == wanted and advice.installed != wanted
    assert advice.command == f"pip uninstall -y torch && pip install torch --index-url {detect.TORCH_INDEXES[wanted]}"
    assert advice.uv_command == f"uv sync --extra {wanted}"
    assert report.frameworks.torch.version in advice.problem
    if hardware != "none":
        assert accelerators[0].name in advice.problem
        # The choice says the same: the GPU cannot be used, and the command that fixes it.
        choice = choose(report, load_presets())
        assert choice.device == "cpu" and advice.command in choice.reasons["backend"]


def test_no_build_advice_on_macos_or_where_no_better_build_exists():
    mac = report_of(M2MAX, torch=MPS_TORCH, os_name="Darwin", arch="arm64")
    assert detect.torch_build_advice(mac) is None
    windows_amd = report_of(MI300X, torch=CPU_TORCH, os_name="Windows")
    assert detect.torch_build_advice(windows_amd) is None
    dead_weight = detect.torch_build_advice(report_of(MI300X, torch=CUDA_TORCH, os_name="Windows"))
    assert dead_weight.wanted == "cpu" and "no ROCm build" in dead_weight.problem
    assert detect.torch_build_advice(report_of(H100)) is None  # no torch at all: nothing to replace


def test_torch_indexes_are_the_ones_uv_uses():
    try:
        import tomllib
    except ModuleNotFoundError:
        import tomli as tomllib
    pyproject = tomllib.loads((PROJECT / "pyproject.toml").read_text())
    uv_indexes = {entry["url"] for entry in pyproject["tool"]["uv"]["index"]}
    assert set(detect.TORCH_INDEXES.values()) == uv_indexes


def test_the_readme_installs_each_platforms_torch_from_its_index():
    readme = (PROJECT / "README.md").read_text()
    for build, extra in (("cuda", "cuda"), ("rocm", "rocm"), ("cpu", "cpu")):
        assert f'{detect.torch_install_command(build)} && pip install -e ".[{extra}]"' in readme, build


@pytest.mark.skipif(platform.system() != "Linux", reason="rocm-smi and sysfs are Linux probes")
def test_probe_with_rocm_smi_and_sysfs_then_cpu_torch_explains_the_fix(tmp_path, monkeypatch):
    bin_dir = tmp_path / "bin"
    _fake_command(bin_dir, "rocm-smi", f"cat '{FIXTURES / 'rocm_smi_7900xt.json'}'")
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    drm = tmp_path / "drm"
    make_card(drm, "card0", "0x1002", "0x744c", vram=21458059264)
    report = detect.probe(drm_root=drm)
    amd = [a for a in report.accelerators if a.vendor == "amd"]
    assert [(a.name, a.source) for a in amd] == [("Radeon RX 7900 XT", "rocm-smi")]  # sysfs not duplicated
    torch = pytest.importorskip("torch")
    if torch.version.hip is None and not torch.cuda.is_available():
        choice = choose(report, load_presets())
        assert (choice.backend, choice.device, choice.preset) == ("cuda", "cpu", "cpu-tiny")
        assert "Radeon RX 7900 XT" in choice.reasons["backend"]
        assert "uv sync --extra rocm" in choice.reasons["backend"]


# --- Choosing backend, device and preset --------------------------------------------------------

CUDA_TORCH = TorchInfo("2.8.0+cu128", "12.8", None, True, 1, False)
HIP_TORCH = TorchInfo("2.8.0+rocm6.4", None, "6.4.43482", True, 1, False)
CPU_TORCH = TorchInfo("2.8.0+cpu", None, None, False, 0, False)
MPS_TORCH = TorchInfo("2.8.0", None, None, False, 0, True)
H100 = Accelerator("nvidia", "NVIDIA H100 80GB HBM3", 81559 * MiB, "nvml", compute_capability="9.0")
RTX3060 = Accelerator("nvidia", "NVIDIA GeForce RTX 3060", 12288 * MiB, "nvml", compute_capability="8.6")
MI300X = Accelerator("amd", "AMD Instinct MI300X", 205822885888, "rocm-smi", gfx_arch="gfx942")
M2MAX = Accelerator("apple", "Apple M2 Max", 64 * GiB, "sysctl")


def report_of(*accelerators, torch=None, mlx=None, os_name="Linux", arch="x86_64", wsl=None, absent=None):
    return HardwareReport(os=os_name, arch=arch, wsl=wsl, python="3.11.7",
                          frameworks=Frameworks(torch=torch, mlx=mlx), accelerators=list(accelerators),
                          cpu=CpuInfo("test cpu", 8, 32 * GiB), absent=dict(absent or {}))


def picked(choice):
    return choice.backend, choice.device, choice.preset


def test_h100_with_cuda_torch(presets):
    choice = choose(report_of(H100, torch=CUDA_TORCH), presets)
    assert picked(choice) == ("cuda", "cuda", "h100")
    assert "capability 9.0" in choice.reasons["backend"] and "tries FA3, then FA4, else SDPA" in choice.reasons["backend"]
    assert "preset h100" in choice.reasons["preset"]


def test_amd_with_rocm_torch_uses_the_cuda_device_name(presets):
    choice = choose(report_of(MI300X, torch=HIP_TORCH), presets)
    assert picked(choice) == ("rocm", "cuda", "amd-mi300")
    assert "HIP" in choice.reasons["backend"]


def test_apple_silicon_with_mps_or_with_only_mlx(presets):
    mac = dict(os_name="Darwin", arch="arm64")
    assert picked(choose(report_of(M2MAX, torch=MPS_TORCH, mlx=MlxInfo("0.29", "gpu"), **mac), presets)) \
        == ("mps", "mps", "apple-64gb+")
    choice = choose(report_of(M2MAX, mlx=MlxInfo("0.29", "gpu"), **mac), presets)
    assert picked(choice) == ("mlx", "gpu", "apple-64gb+")
    assert "mlx" in choice.reasons["backend"]


def test_no_accelerator_runs_the_cuda_trainer_on_cpu_or_mlx_when_only_mlx(presets):
    assert picked(choose(report_of(torch=CPU_TORCH, mlx=MlxInfo("0.29", "cpu")), presets)) == ("cuda", "cpu", "cpu-tiny")
    choice = choose(report_of(mlx=MlxInfo("0.29", "cpu")), presets)
    assert picked(choice) == ("mlx", "cpu", "cpu-tiny")
    assert "only mlx" in choice.reasons["backend"]


def test_gpu_with_cpu_only_torch_falls_back_and_names_the_fix(presets):
    choice = choose(report_of(RTX3060, torch=CPU_TORCH), presets)
    assert picked(choice) == ("cuda", "cpu", "cpu-tiny")
    assert "NVIDIA GeForce RTX 3060" in choice.reasons["backend"]
    assert "uv sync --extra cuda" in choice.reasons["backend"]


def test_wsl1_says_how_to_get_gpu_access(presets):
    choice = choose(report_of(torch=CPU_TORCH, wsl=1), presets)
    assert "wsl --set-version" in choice.reasons["backend"]


def test_backend_override_needs_its_framework(presets):
    with pytest.raises(ValueError) as info:
        choose(report_of(torch=CPU_TORCH), presets, backend="mlx")
    assert "pip install 'mlx[cpu]'" in str(info.value) and "uv sync --extra mlx" in str(info.value)
    with pytest.raises(ValueError, match="uv sync --extra rocm"):
        choose(report_of(mlx=MlxInfo("0.29", "cpu")), presets, backend="rocm")
    with pytest.raises(ValueError, match="cuda, rocm, mps, mlx"):
        choose(report_of(torch=CPU_TORCH), presets, backend="tpu")


def test_backend_override_without_its_device_falls_back_to_cpu(presets):
    for backend, torch in (("rocm", CUDA_TORCH), ("mps", CUDA_TORCH), ("cuda", HIP_TORCH), ("cuda", CPU_TORCH)):
        choice = choose(report_of(H100, MI300X, torch=torch), presets, backend=backend)
        assert picked(choice) == (backend, "cpu", "cpu-tiny"), backend
        assert "-> device cpu" in choice.reasons["backend"]
    choice = choose(report_of(MI300X, torch=HIP_TORCH), presets, backend="cuda")
    assert "--backend rocm" in choice.reasons["backend"]


def test_backend_override_that_fits_keeps_the_device(presets):
    choice = choose(report_of(H100, torch=CUDA_TORCH, mlx=MlxInfo("0.29", "cpu")), presets, backend="mlx")
    assert picked(choice) == ("mlx", "cpu", "cpu-tiny")
    assert picked(choose(report_of(MI300X, torch=HIP_TORCH), presets, backend="rocm")) == ("rocm", "cuda", "amd-mi300")


def test_preset_override_is_validated(presets):
    with pytest.raises(ValueError) as info:
        choose(report_of(H100, torch=CUDA_TORCH), presets, preset="h1000")
    assert "h100" in str(info.value) and "cpu-tiny" in str(info.value)
    choice = choose(report_of(RTX3060, torch=CUDA_TORCH), presets, preset="h100")
    assert picked(choice) == ("cuda", "cuda", "h100")
    assert "out-of-memory" in choice.reasons["preset"]
    choice = choose(report_of(torch=CPU_TORCH), presets, preset="rtx4090")
    assert choice.preset == "rtx4090" and "slow" in choice.reasons["preset"]


def test_choice_is_json_able(presets):
    choice = choose(report_of(H100, torch=CUDA_TORCH), presets)
    assert json.loads(json.dumps(choice.to_dict()))["preset"] == "h100"
