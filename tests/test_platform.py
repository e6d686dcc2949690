"""harness.hardware.platform: the fall-back decisions every torch trainer makes (compile, attention kernel,
dtype, out-of-memory ladder), each driven through the function that makes it with the hardware
facts as inputs, plus the probes that run for real on this CPU."""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import shutil

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from harness.hardware import platform as hp
from harness.hardware.platform import PlatformFacts

LINUX_H100 = PlatformFacts(device_type="cuda", device_name="NVIDIA H100 80GB HBM3", capability=(9, 0),
                           bf16_native=True, has_triton=True, has_cxx=True)
MI300X = PlatformFacts(device_type="cuda", is_hip=True, device_name="AMD Instinct MI300X", gfx_arch="gfx942",
                       bf16_native=True, has_triton=True, has_cxx=True)
M2_PRO = PlatformFacts(device_type="mps", os="darwin", device_name="Apple M2 Pro", chip="Apple M2 Pro", bf16_native=True)
CPU = PlatformFacts(device_type="cpu", device_name="AMD EPYC", bf16_native=True, has_cxx=True)


def facts(base: PlatformFacts, **changes) -> PlatformFacts:
    return dataclasses.replace(base, **changes)


def unreachable(*args, **kwargs):
    raise AssertionError("this probe or kernel loader must not run for these facts")


def passes():
    return None


# -- compile -----------------------------------------------------------------------------------

def test_compile_is_off_on_cpu_by_default_and_the_probe_never_runs():
    on, why = hp.choose_compile(CPU, unreachable)
    assert not on and "AUTORESEARCH_COMPILE=1" in why


def test_compile_override():
    assert hp.choose_compile(facts(LINUX_H100, compile_override="0"), unreachable) == (False, "AUTORESEARCH_COMPILE=0")
    on, why = hp.choose_compile(facts(CPU, compile_override="1"), passes)
    assert on and "AUTORESEARCH_COMPILE=1" in why
    with pytest.raises(ValueError, match="use 0 or 1"):
        hp.choose_compile(facts(CPU, compile_override="yes"), passes)


def test_forcing_compile_on_a_cpu_without_a_compiler_says_which_compiler():
    on, why = hp.choose_compile(facts(CPU, compile_override="1", has_cxx=False), unreachable)
    assert not on and "g++" in why
    on, why = hp.choose_compile(facts(CPU, os="windows", compile_override="1", has_cxx=False), unreachable)
    assert not on and "MSVC" in why


def test_native_windows_without_triton_runs_eager_and_says_why():
    windows = facts(LINUX_H100, os="windows", device_name="NVIDIA GeForce RTX 4090", capability=(8, 9), has_triton=False)
    on, why = hp.choose_compile(windows, unreachable)
    assert not on and "native Windows has no Triton" in why
    assert windows.host == "Windows (native)"
    # with triton-windows installed the probe decides, as anywhere else
    assert hp.choose_compile(facts(windows, has_triton=True), passes)[0]


def test_linux_without_triton_names_the_missing_package():
    on, why = hp.choose_compile(facts(LINUX_H100, has_triton=False), unreachable)
    assert not on and "(triton)" in why
    on, why = hp.choose_compile(facts(MI300X, has_triton=False), unreachable)
    assert not on and "pytorch-triton-rocm" in why


def test_wsl_is_linux_with_its_gpu():
    wsl = facts(LINUX_H100, wsl=2, device_name="NVIDIA GeForce RTX 3090", capability=(8, 6))
    assert wsl.host.startswith("WSL2")
    on, why = hp.choose_compile(wsl, passes)  # Triton works under WSL2: the probe decides, as on Linux
    assert on and "probe passed" in why


def test_cuda_compile_follows_the_probe():
    on, why = hp.choose_compile(LINUX_H100, passes)
    assert on and "compile probe passed" in why

    def broken_toolchain():
        raise RuntimeError("InductorError: no kernel image is available for execution on the device")

    on, why = hp.choose_compile(LINUX_H100, broken_toolchain)
    assert not on and "compile probe failed" in why and "no kernel image" in why


@pytest.mark.parametrize("name,arch", [("AMD Instinct MI300X", "gfx942"), ("AMD Radeon AI PRO R9700", "gfx1201"),
                                       ("AMD Instinct MI250X/MI250", "gfx90a")])
def test_rocm_compile_is_decided_by_the_probe_never_by_the_device_name(name, arch):
    gpu = facts(MI300X, device_name=name, gfx_arch=arch)
    on, why = hp.choose_compile(gpu, passes)
    assert on and why.startswith("ROCm compile probe passed")

    def lerp_dtype_check():  # what compiled optimizer steps hit on PyTorch <= 2.8 with ROCm
        raise RuntimeError("expected dtype float for `weight` but got dtype c10::BFloat16")

    on, why = hp.choose_compile(gpu, lerp_dtype_check)
    assert not on and "compile probe failed on ROCm" in why and "weight" in why


def test_mps_compile_only_when_the_probe_shows_it_works():
    assert hp.choose_compile(M2_PRO, passes)[0]

    def metal_codegen_fails():
        raise NotImplementedError("The operator 'aten::_scaled_dot_product_attention_math_for_mps' is not implemented")

    on, why = hp.choose_compile(M2_PRO, metal_codegen_fails)
    assert not on and "compile probe failed on MPS" in why and "NotImplementedError" in why


def test_the_real_compile_probe_refuses_a_cpu_without_a_compiler(monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(RuntimeError, match="no C.. compiler"):
        hp.probe_compile("cpu")


# -- attention ---------------------------------------------------------------------------------

@pytest.mark.parametrize("case,dtype,text", [
    (CPU, "bf16", "device is cpu"),
    (M2_PRO, "fp32", "device is mps"),
    (MI300X, "bf16", "ROCm build"),
    (LINUX_H100, "fp32", "FA3 needs bf16"),
    (facts(LINUX_H100, device_name="NVIDIA GeForce RTX 2080 Ti", capability=(7, 5)), "bf16", "pre-Ampere"),
])
def test_fa3_is_never_tried_where_it_cannot_work(case, dtype, text):
    fa3, why = hp.choose_attention(case, dtype, get_kernel=unreachable)
    assert fa3 is None and text in why


class _Kernel:
    """What `kernels.get_kernel` returns: an object with a `flash_attn_interface`."""

    def __init__(self, flash_attn_func):
        self.flash_attn_interface = type("Interface", (), {"flash_attn_func": staticmethod(flash_attn_func)})


def _sdpa_window(q, k, v, window):
    """A correct FA3 stand-in on CPU: SDPA on (B, T, H, D) with keys [i - window, i] visible."""
    T = q.size(1)
    i = torch.arange(T)
    d = i[:, None] - i[None, :]
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                         attn_mask=(d >= 0) & (d <= window))
    return out.transpose(1, 2)


def test_fa3_falls_back_to_sdpa_when_the_hub_is_unreachable():
    requested = []

    def hub_unreachable(repo):
        requested.append(repo)
        raise ConnectionError("Name or service not known")

    fa3, why = hp.choose_attention(LINUX_H100, "bf16", get_kernel=hub_unreachable)
    assert fa3 is None and "ConnectionError" in why and requested == ["varunneal/flash-attention-3"]
    hp.choose_attention(facts(LINUX_H100, capability=(8, 6)), "bf16", get_kernel=hub_unreachable)
    assert requested[-1] == "kernels-community/flash-attn3"  # Ampere: only the community kernel exists


def test_fa3_that_loads_then_fails_its_first_call_falls_back_with_the_reason():
    blackwell = facts(LINUX_H100, device_name="NVIDIA GeForce RTX 5090", capability=(12, 0))

    def no_kernel_image(*args, **kwargs):  # consumer Blackwell: the import works, the first call does not
        raise RuntimeError("CUDA error: no kernel image is available for execution on the device")

    fa3, why = hp.choose_attention(blackwell, "bf16", device="cpu", get_kernel=lambda repo: _Kernel(no_kernel_image))
    assert fa3 is None and "kernels-community/flash-attn3 unusable here" in why and "no kernel image" in why


def test_fa3_is_accepted_only_after_a_call_that_agrees_with_sdpa():
    correct = _Kernel(lambda q, k, v, causal, window_size: _sdpa_window(q, k, v, window_size[0]))
    fa3, why = hp.choose_attention(LINUX_H100, "bf16", device="cpu", get_kernel=lambda repo: correct)
    assert fa3 is correct.flash_attn_interface and "verified by a test call" in why
    # a kernel that ignores the window (or gets it off by one) is refused
    for wrong_window in (lambda w: 64, lambda w: w - 1):
        wrong = _Kernel(lambda q, k, v, causal, window_size, f=wrong_window: _sdpa_window(q, k, v, f(window_size[0])))
        fa3, why = hp.choose_attention(LINUX_H100, "bf16", device="cpu", get_kernel=lambda repo: wrong)
        assert fa3 is None and "disagrees with SDPA" in why


@pytest.mark.skipif(importlib.util.find_spec("kernels") is not None, reason="`kernels` is installed here (it would try the Hub)")
def test_fa3_without_the_kernels_package_says_how_to_install_it():
    fa3, why = hp.choose_attention(LINUX_H100, "bf16")
    assert fa3 is None and "pip install kernels" in why


def test_sdpa_flash_probe_and_window_cost_run_for_real_on_this_cpu():
    usable, why = hp.probe_flash_sdpa("cpu", "fp32")
    assert usable and "flash kernel runs here" in why
    ratio = hp.measure_window_cost("cpu", "fp32", seq_len=128, window=64, n_head=2, head_dim=32, repeats=1)
    assert math.isfinite(ratio) and ratio > 0


# -- dtype -------------------------------------------------------------------------------------

def test_dtype_on_gpus_and_cpus():
    assert hp.choose_dtype(LINUX_H100) == ("bf16", "the GPU computes bf16 natively")
    dtype, why = hp.choose_dtype(facts(LINUX_H100, capability=(7, 5), bf16_native=False))
    assert dtype == "fp32" and "pre-Ampere" in why
    assert hp.choose_dtype(MI300X) == ("bf16", "the AMD GPU computes bf16 natively")
    assert hp.choose_dtype(facts(MI300X, bf16_native=False))[0] == "fp32"
    assert hp.choose_dtype(CPU)[0] == "bf16"
    dtype, why = hp.choose_dtype(facts(CPU, bf16_native=False))
    assert dtype == "fp32" and "avx512_bf16" in why


@pytest.mark.parametrize("chip", ["Apple M1", "Apple M2 Pro", "Apple M3 Max", "Apple M4"])
def test_mps_trains_in_fp32_on_every_m_series_chip_and_says_why(chip):
    dtype, why = hp.choose_dtype(facts(M2_PRO, chip=chip, device_name=chip))
    assert dtype == "fp32"
    assert chip in why and "17% slower" in why and "AUTORESEARCH_DTYPE=bf16" in why


def test_mps_dtype_on_an_unknown_chip_and_an_old_macos():
    dtype, why = hp.choose_dtype(facts(M2_PRO, chip=None, device_name="Apple GPU"))
    assert dtype == "fp32" and "no bf16 measurement for this chip" in why
    dtype, why = hp.choose_dtype(facts(M2_PRO, bf16_native=False))
    assert dtype == "fp32" and "macOS 14" in why


def test_dtype_override():
    assert hp.choose_dtype(facts(M2_PRO, dtype_override="bf16")) == ("bf16", "AUTORESEARCH_DTYPE=bf16")
    dtype, why = hp.choose_dtype(facts(M2_PRO, bf16_native=False, dtype_override="bf16"))
    assert dtype == "fp32" and "macOS 14" in why  # asked for, but this macOS cannot
    assert hp.choose_dtype(facts(LINUX_H100, dtype_override="fp32")) == ("fp32", "AUTORESEARCH_DTYPE=fp32")
    with pytest.raises(ValueError, match="bf16 or fp32"):
        hp.choose_dtype(facts(CPU, dtype_override="fp16"))


# -- facts from this machine -------------------------------------------------------------------

def test_torch_facts_on_this_cpu():
    found = hp.torch_facts("cpu", environ={"AUTORESEARCH_COMPILE": "1", "AUTORESEARCH_DTYPE": ""})
    caps = torch.cpu.get_capabilities()
    assert found.device_type == "cpu" and not found.is_hip and found.capability is None
    assert found.bf16_native == bool(caps.get("avx512_bf16") or caps.get("amx_bf16"))
    assert found.compile_override == "1" and found.dtype_override is None
    assert found.os == "linux" and found.has_cxx == bool(shutil.which("g++") or shutil.which("c++") or shutil.which("clang++"))


# -- the out-of-memory ladder ------------------------------------------------------------------

def test_ladder_halves_and_every_rung_keeps_total_batch_size():
    assert list(hp.oom_ladder(128, 2**19, 2048)) == [128, 64, 32, 16, 8, 4, 2, 1]
    assert list(hp.oom_ladder(128, 2**19, 2048, floor=16)) == [128, 64, 32, 16]
    assert list(hp.oom_ladder(12, 12 * 7 * 256, 256)) == [12, 6, 3, 1]  # odd rungs take the next divisor
    assert list(hp.oom_ladder(9, 9 * 256, 256)) == [9, 3, 1]
    for b, total, t in [(128, 2**19, 2048), (16, 2**16, 2048), (12, 12 * 5 * 256, 256), (48, 48 * 1024, 1024)]:
        for size in hp.oom_ladder(b, total, t):
            assert total % (size * t) == 0


def test_ladder_refuses_batch_sizes_that_do_not_divide():
    with pytest.raises(ValueError, match=r"TOTAL_BATCH_SIZE \(1000\) must be a multiple of DEVICE_BATCH_SIZE \* MAX_SEQ_LEN"):
        list(hp.oom_ladder(3, 1000, 256))
    with pytest.raises(ValueError, match="floor"):
        list(hp.oom_ladder(4, 4 * 256, 256, floor=0))


def test_oom_errors_are_recognised_and_others_are_not():
    assert hp.is_oom_error(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB"))
    assert hp.is_oom_error(RuntimeError("HIP out of memory. Tried to allocate 2.00 GiB (GPU 0; 191.98 GiB total)"))
    assert hp.is_oom_error(RuntimeError("MPS backend out of memory (MPS allocated: 17.2 GB, other allocations: "
                                        "1.1 GB, max allowed: 18.13 GB). Tried to allocate 512.00 MB on private pool."))
    with pytest.raises(RuntimeError) as real:
        torch.empty(2**60, dtype=torch.uint8)  # 1 EiB, beyond any address space: the CPU allocator really refuses
    assert hp.is_oom_error(real.value)
    try:  # compile errors carry the original as their cause
        try:
            raise torch.OutOfMemoryError("CUDA out of memory")
        except torch.OutOfMemoryError as inner:
            raise RuntimeError("BackendCompilerFailed: backend='inductor' raised an error") from inner
    except RuntimeError as wrapped:
        assert hp.is_oom_error(wrapped)
    assert not hp.is_oom_error(RuntimeError("mat1 and mat2 shapes cannot be multiplied (4x3 and 4x3)"))
    assert not hp.is_oom_error(ValueError("out of patience"))


def test_run_with_oom_ladder_halves_says_so_and_frees_memory_between_tries():
    tried, freed, said = [], [], []

    def step(b):
        tried.append(b)
        if b > 32:
            raise torch.OutOfMemoryError(f"CUDA out of memory. Tried to allocate {b} GiB")
        return f"ran at {b}"

    size, result = hp.run_with_oom_ladder(step, 128, 2**19, 2048, free_memory=lambda: freed.append(1), log=said.append)
    assert (size, result) == (32, "ran at 32") and tried == [128, 64, 32] and len(freed) == 2
    assert said == ["out of memory at DEVICE_BATCH_SIZE=128; retrying at 64 with 4 accumulation steps",
                    "out of memory at DEVICE_BATCH_SIZE=64; retrying at 32 with 8 accumulation steps"]


def test_run_with_oom_ladder_reraises_at_the_floor_and_passes_other_errors_through():
    said = []

    def always_oom(b):
        raise torch.OutOfMemoryError("CUDA out of memory")

    with pytest.raises(torch.OutOfMemoryError):
        hp.run_with_oom_ladder(always_oom, 16, 16 * 512, 512, floor=4, log=said.append)
    assert said[-1].startswith("out of memory at DEVICE_BATCH_SIZE=4, the floor (4)")
    assert len(said) == 3  # 16 -> 8 -> 4, then the floor

    tried = []

    def broken(b):
        tried.append(b)
        raise RuntimeError("mat1 and mat2 shapes cannot be multiplied")

    with pytest.raises(RuntimeError, match="shapes"):
        hp.run_with_oom_ladder(broken, 16, 16 * 512, 512, log=said.append)
    assert tried == [16]  # a bug is not retried at smaller sizes


class _TinyLM(nn.Module):
    """A real model whose forward needs memory in proportion to the batch: above `fits` rows the
    CPU allocator refuses a scratch buffer (a genuine allocation failure) or, in `synthetic`
    mode, the step raises what CUDA raises."""

    def __init__(self, fits: int, synthetic: bool):
        super().__init__()
        self.fits, self.synthetic = fits, synthetic
        self.emb = nn.Embedding(64, 32)
        self.head = nn.Linear(32, 64)

    def forward(self, x, y):
        if x.size(0) > self.fits:
            if self.synthetic:
                raise torch.OutOfMemoryError(f"CUDA out of memory. Tried to allocate {x.size(0)} GiB")
            torch.empty(x.size(0) * 2**55, dtype=torch.uint8)  # beyond any address space: refused by the allocator
        return F.cross_entropy(self.head(self.emb(x)).flatten(0, 1), y.flatten())


@pytest.mark.parametrize("synthetic", [True, False])
def test_a_real_training_step_that_runs_out_of_memory_is_retried_smaller_with_the_same_gradient(synthetic):
    T, total_rows, first = 16, 32, 32
    g = torch.Generator().manual_seed(0)
    x, y = torch.randint(0, 64, (total_rows, T), generator=g), torch.randint(0, 64, (total_rows, T), generator=g)
    torch.manual_seed(0)
    model = _TinyLM(fits=8, synthetic=synthetic)
    said = []

    def accumulate(b):  # one optimizer step's gradient: TOTAL_BATCH_SIZE rows in micro-batches of b
        model.zero_grad(set_to_none=True)
        steps = total_rows // b
        for i in range(steps):
            (model(x[i * b:(i + 1) * b], y[i * b:(i + 1) * b]) / steps).backward()
        return [p.grad.clone() for p in model.parameters()]

    size, grads = hp.run_with_oom_ladder(accumulate, first, total_rows * T, T,
                                         free_memory=lambda: hp.free_device_memory("cpu"), log=said.append)
    assert size == 8
    assert said == ["out of memory at DEVICE_BATCH_SIZE=32; retrying at 16 with 2 accumulation steps",
                    "out of memory at DEVICE_BATCH_SIZE=16; retrying at 8 with 4 accumulation steps"]
    # the smaller micro-batches train the same problem: the gradient of the whole batch in one go
    model.fits = total_rows
    full = accumulate(total_rows)
    for a, b in zip(grads, full):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_the_frozen_helper_imports_without_torch():
    import subprocess
    import sys

    code = "import sys, harness.hardware.platform as p; p.host_os(); p.cpu_name(); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=str(hp.Path(hp.__file__).resolve().parents[1]))
    assert out.stdout.strip() == "False"


# -- sliding windows without FA3 -------------------------------------------------------------------

def _probe_ok() -> None:
    pass


def _probe_fails() -> None:
    raise RuntimeError("Triton could not compile the flex kernel")


def test_windows_use_flex_attention_only_on_a_gpu_with_compile_and_a_passing_probe():
    from harness.hardware.platform import PlatformFacts, choose_window_attention

    gpu = PlatformFacts(device_type="cuda", device_name="NVIDIA H100 80GB HBM3", capability=(9, 0), has_triton=True)
    assert choose_window_attention(gpu, compile_on=True, fa3_on=False, probe=_probe_ok)[0] is True
    off, why = choose_window_attention(gpu, compile_on=True, fa3_on=True, probe=_probe_ok)
    assert not off and "FA3" in why
    off, why = choose_window_attention(gpu, compile_on=False, fa3_on=False, probe=_probe_ok)
    assert not off and "compile" in why
    off, why = choose_window_attention(gpu, compile_on=True, fa3_on=False, probe=_probe_fails)
    assert not off and "Triton could not compile" in why
    cpu = PlatformFacts(device_type="cpu")
    off, why = choose_window_attention(cpu, compile_on=True, fa3_on=False, probe=_probe_ok)
    assert not off and "no backward" in why
