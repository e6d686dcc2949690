"""harness.hardware.energy: the GPU energy counter the runner reads around each experiment.

NVML is faked only at its boundary: `FakeNVML` has the real pynvml functions' names and signatures
(checked against the installed nvidia-ml-py) and raises pynvml's own errors. The "no NVML here"
path is this machine's real one."""

from __future__ import annotations

import ast
import importlib.util
import inspect
from pathlib import Path

import pytest

from harness.hardware.energy import EnergyMeter, visible_entry

pynvml = pytest.importorskip("pynvml", reason="nvidia-ml-py is not installed (pip install -e '.[dev]')")


class FakeNVML:
    """Three GPUs behind the real pynvml calls; GPU 2 predates Volta (no energy counter)."""

    NVMLError = pynvml.NVMLError

    def __init__(self):
        self.uuids = ["GPU-11111111-aaaa", "GPU-22222222-bbbb", "GPU-33333333-cccc"]
        self.millijoules = [1_000_000, 5_000_000, 0]
        self.initialised = 0

    def nvmlInit(self):
        self.initialised += 1

    def nvmlShutdown(self):
        self.initialised -= 1

    def nvmlDeviceGetCount(self):
        return len(self.uuids)

    def nvmlDeviceGetHandleByIndex(self, index):
        if not 0 <= index < len(self.uuids):
            raise pynvml.NVMLError(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        return index

    def nvmlDeviceGetUUID(self, handle):
        return self.uuids[handle]

    def nvmlDeviceGetName(self, handle):
        return ["NVIDIA H100 80GB HBM3", "NVIDIA H200", "Tesla P100-PCIE-16GB"][handle]

    def nvmlDeviceGetTotalEnergyConsumption(self, handle):
        if handle == 2:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_SUPPORTED)
        return self.millijoules[handle]


def test_the_fake_has_the_real_pynvml_signatures():
    for name, fake in inspect.getmembers(FakeNVML(), inspect.ismethod):
        if name.startswith("nvml"):
            assert inspect.signature(fake) == inspect.signature(getattr(pynvml, name)), name


def test_joules_come_from_the_counter_of_the_gpu_the_device_names():
    nvml = FakeNVML()
    meter, why = EnergyMeter.open("cuda", {}, nvml=nvml)
    assert meter is not None and why == "NVML total energy of GPU 0 (NVIDIA H100 80GB HBM3)"
    before = meter.read_joules()
    nvml.millijoules[0] += 123_456  # the GPU works
    assert meter.read_joules() - before == pytest.approx(123.456)
    meter.close()
    assert nvml.initialised == 0


@pytest.mark.parametrize("device,visible,gpu", [
    ("cuda:1", None, 1),
    ("cuda:0", "1,0", 1),
    ("cuda:1", " 2 , 1 ", 1),
    ("cuda:0", "GPU-22222222", 1),  # a UUID prefix, as CUDA accepts
    ("cuda:0", "GPU-11111111-aaaa", 0),
])
def test_cuda_visible_devices_decides_which_gpu_is_read(device, visible, gpu):
    nvml = FakeNVML()
    env = {} if visible is None else {"CUDA_VISIBLE_DEVICES": visible}
    with EnergyMeter.open(device, env, nvml=nvml)[0] as meter:
        assert meter.read_joules() == nvml.millijoules[gpu] / 1000
        assert meter.description.endswith(f"({nvml.nvmlDeviceGetName(gpu)})")
    assert nvml.initialised == 0


@pytest.mark.parametrize("device,visible,text", [
    ("cuda:2", "0,1", "device 2 is not among the visible devices ('0,1')"),
    ("cuda", "", "device 0 is not among the visible devices ('')"),
    ("cuda", "MIG-5a4b3c2d", "MIG instance"),
    ("cuda", "2", "GPU 2 has no energy counter here (Not Supported)"),
    ("cuda", "GPU-9999", "no GPU's UUID starts with 'GPU-9999'"),
])
def test_a_gpu_without_a_readable_counter_is_none_with_the_reason(device, visible, text):
    nvml = FakeNVML()
    meter, why = EnergyMeter.open(device, {"CUDA_VISIBLE_DEVICES": visible}, nvml=nvml, amdsmi=NoAMD())
    assert meter is None and text in why and "amdsmi unavailable" in why
    assert nvml.initialised == 0


@pytest.mark.parametrize("device", ["cpu", "mps", "gpu", "cuda:x"])
def test_devices_without_a_gpu_counter(device):
    meter, why = EnergyMeter.open(device, {}, nvml=FakeNVML())
    assert meter is None and why == f"device {device}: energy is read from NVIDIA/AMD GPUs only"


def test_the_real_no_nvml_path_on_this_machine():
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        pass
    else:
        pynvml.nvmlShutdown()
        pytest.skip("this machine has an NVIDIA driver")
    meter, why = EnergyMeter.open("cuda:0", {})
    assert meter is None
    assert why.startswith("no GPU energy counter for cuda:0: NVML unavailable (NVML Shared Library Not Found)")
    assert "amdsmi unavailable" in why


# -- AMD ----------------------------------------------------------------------------------------------

class NoAMD:
    """amdsmi where the package is installed but the amdgpu driver is not."""

    def amdsmi_init(self, flag=None):
        raise RuntimeError("Error code:\n\t8 | AMDSMI_STATUS_INIT_ERROR")


class FakeAMDSMI:
    """amdsmi 7's calls (amdsmi_interface.py): two GPUs, accumulators in 15.3 uJ ticks."""

    def __init__(self, key="energy_accumulator"):
        self.key, self.ticks, self.initialised = key, [1_000_000, 2_000_000], 0

    def amdsmi_init(self, flag=None):
        self.initialised += 1

    def amdsmi_shut_down(self):
        self.initialised -= 1

    def amdsmi_get_processor_handles(self):
        return [0, 1]

    def amdsmi_get_energy_count(self, processor_handle):
        return {self.key: self.ticks[processor_handle], "counter_resolution": 15.3, "timestamp": 0}


@pytest.mark.parametrize("key", ["energy_accumulator", "power"])  # "power" before amdsmi 6.3
def test_amd_energy_through_amdsmi_after_hip_visibility(key):
    amd = FakeAMDSMI(key)
    meter, why = EnergyMeter.open("cuda:0", {"HIP_VISIBLE_DEVICES": "1"}, nvml=NoNVML(), amdsmi=amd)
    assert why == "amdsmi energy accumulator of GPU 1"
    assert meter.read_joules() == pytest.approx(2_000_000 * 15.3 / 1e6)
    meter.close()
    assert amd.initialised == 0


def test_hip_visibility_picks_among_the_gpus_rocr_visibility_leaves():
    assert visible_entry(0, ["1", "1,0"]) == "0"  # ROCR leaves GPUs 1 and 0; HIP's 1 is the second of those
    amd = FakeAMDSMI()
    meter, why = EnergyMeter.open("cuda", {"HIP_VISIBLE_DEVICES": "1", "ROCR_VISIBLE_DEVICES": "1,0"},
                                  nvml=NoNVML(), amdsmi=amd)
    assert why == "amdsmi energy accumulator of GPU 0"
    meter.close()
    assert visible_entry(3, [None, None]) == "3"
    with pytest.raises(ValueError, match="not among the visible devices"):
        visible_entry(1, ["0", None])


class NoNVML:
    NVMLError = pynvml.NVMLError

    def nvmlInit(self):
        raise pynvml.NVMLError(pynvml.NVML_ERROR_LIBRARY_NOT_FOUND)


@pytest.mark.skipif(importlib.util.find_spec("amdsmi") is None, reason="amdsmi is not installed")
def test_the_amd_fake_has_the_installed_amdsmi_signatures():
    # amdsmi cannot be imported without ROCm's libamd_smi.so, so its source is read instead
    source = Path(importlib.util.find_spec("amdsmi").submodule_search_locations[0]) / "amdsmi_interface.py"
    real = {node.name: [a.arg for a in node.args.args] for node in ast.parse(source.read_text()).body
            if isinstance(node, ast.FunctionDef)}
    for name, fake in inspect.getmembers(FakeAMDSMI(), inspect.ismethod):
        if name.startswith("amdsmi_"):
            assert list(inspect.signature(fake).parameters) == real[name], name
