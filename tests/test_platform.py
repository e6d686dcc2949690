"""harness.hardware.platform: the fall-back decisions every torch trainer makes (compile, attention kernel,
dtype, out-of-memory ladder), each driven through the function that makes it with the hardware
facts as inputs, plus the probes that run for real on this CPU."""

from __future__ import annotations

import dataclasses
import importlib.util
import inspect
import json
import math
import os
import shutil
import socket
import subprocess
import sys
import tempfile

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


# -- attention: which kernel for which GPU (pure decisions) -------------------------------------

def gpu(name: str, capability: tuple[int, int]) -> PlatformFacts:
    return facts(LINUX_H100, device_name=name, capability=capability)


@pytest.mark.parametrize("name,capability,expected,text", [
    ("NVIDIA A100-SXM4-40GB", (8, 0), [hp.FA3_COMMUNITY], "FA4 has no backward before sm_90"),
    ("NVIDIA GeForce RTX 3090", (8, 6), [hp.FA3_COMMUNITY], "Ampere/Ada"),
    ("NVIDIA GeForce RTX 4090", (8, 9), [hp.FA3_COMMUNITY], "Ampere/Ada"),
    ("NVIDIA H100 80GB HBM3", (9, 0), [hp.FA3_HOPPER, hp.FA3_COMMUNITY, hp.FA4], "upstream's measured H100 path"),
    ("NVIDIA H200", (9, 0), [hp.FA3_HOPPER, hp.FA3_COMMUNITY, hp.FA4], "Hopper"),
    ("NVIDIA B200", (10, 0), [hp.FA4], "FA4 targets it"),
    ("NVIDIA GeForce RTX 5090", (12, 0), [hp.FA4], "FA3 has no kernel that runs there"),
])
def test_each_gpu_generation_gets_its_kernels_in_order_with_the_reason(name, capability, expected, text):
    sources, why = hp.flash_attention_candidates(gpu(name, capability), "bf16")
    assert list(sources) == expected
    assert text in why and "unmeasured" in why


def test_fa3_comes_pinned_from_the_hub_and_fa4_from_the_package_index():
    for source in (hp.FA3_HOPPER, hp.FA3_COMMUNITY):
        assert source.kernel == "FA3" and len(source.revision) == 40 and int(source.revision, 16) >= 0
    assert hp.FA3_HOPPER.label == "FA3 varunneal/flash-attention-3@de87b9b"
    assert hp.FA4.revision is None and hp.FA4.label == "FA4 flash-attn-4"


@pytest.mark.parametrize("case,dtype,text", [
    (CPU, "bf16", "device is cpu"),
    (M2_PRO, "fp32", "device is mps"),
    (MI300X, "bf16", "ROCm build"),
    (LINUX_H100, "fp32", "FlashAttention needs bf16"),
    (gpu("NVIDIA GeForce RTX 2080 Ti", (7, 5)), "bf16", "7.5 (pre-Ampere)"),
    (gpu("NVIDIA GPU", None), "bf16", "capability unknown"),
])
def test_no_kernel_is_loaded_where_none_can_work(case, dtype, text):
    assert hp.flash_attention_candidates(case, dtype)[0] == ()
    kernel, why = hp.choose_attention(case, dtype, load=unreachable)
    assert kernel is None and text in why


def test_the_attention_override_forces_a_path():
    h100, b200 = LINUX_H100, gpu("NVIDIA B200", (10, 0))
    assert hp.flash_attention_candidates(facts(h100, attention_override="fa4"), "bf16") == ((hp.FA4,), "AUTORESEARCH_ATTENTION=fa4 (order unmeasured here)")
    assert hp.flash_attention_candidates(facts(h100, attention_override="fa3"), "bf16")[0] == (hp.FA3_HOPPER, hp.FA3_COMMUNITY)
    assert hp.flash_attention_candidates(facts(b200, attention_override="fa3"), "bf16")[0] == (hp.FA3_COMMUNITY,)
    for path in ("flex", "sdpa"):
        kernel, why = hp.choose_attention(facts(h100, attention_override=path), "bf16", load=unreachable)
        assert kernel is None and why == f"AUTORESEARCH_ATTENTION={path}"
    # still gated by what the hardware can do: fp32 has no FlashAttention, forced or not
    assert hp.flash_attention_candidates(facts(h100, attention_override="fa4"), "fp32")[0] == ()
    with pytest.raises(ValueError, match="use one of fa3, fa4, flex, sdpa"):
        hp.flash_attention_candidates(facts(h100, attention_override="fa2"), "bf16")


# -- attention: the real `kernels` API -------------------------------------------------------------

needs_kernels = pytest.mark.skipif(importlib.util.find_spec("kernels") is None,
                                   reason="the `kernels` package is not installed (pip install -e '.[dev]')")


@needs_kernels
def test_the_installed_kernels_is_the_api_range_the_cuda_extra_declares():
    from importlib.metadata import version

    try:
        import tomllib
    except ImportError:  # Python 3.10
        import tomli as tomllib

    from packaging.requirements import Requirement

    pyproject = tomllib.loads((hp.Path(hp.__file__).resolve().parents[2] / "pyproject.toml").read_text())
    bound = next(Requirement(r) for r in pyproject["project"]["optional-dependencies"]["cuda"] if r.startswith("kernels"))
    assert bound.specifier.contains(version("kernels")), (
        f"kernels {version('kernels')} is installed, outside the tested range {bound}: test the new API and move the bound")


@needs_kernels
def test_our_call_fits_the_real_get_kernel_signature():
    import kernels

    params = inspect.signature(kernels.get_kernel).parameters
    for name in ("revision", "trust_remote_code"):
        assert params[name].kind is inspect.Parameter.KEYWORD_ONLY
    assert list(params)[0] == "repo_id"
    # the call the trainer made before: refused by kernels itself, before any network access
    with pytest.raises(ValueError, match="A kernel version or revision must be specified"):
        kernels.get_kernel(hp.FA3_HOPPER.origin)


_SDPA_KERNEL = '''
import torch
import torch.nn.functional as F


def flash_attn_func(q, k, v, causal=False, window_size=(-1, -1), softmax_scale=None):
    """FA3's call on (B, T, H, D) tensors, through SDPA: keys [i - left, i] when causal."""
    T = q.size(1)
    i = torch.arange(T, device=q.device)
    d = i[:, None] - i[None, :]
    left = {left}
    mask = (d >= 0) & ((d <= left) if left >= 0 else True)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask)
    return out.transpose(1, 2)
'''
KERNEL_BODIES = {
    "correct": _SDPA_KERNEL.replace("{left}", "window_size[0]"),
    "ignores the window": _SDPA_KERNEL.replace("{left}", "-1"),
    "one key short": _SDPA_KERNEL.replace("{left}", "window_size[0] - 1"),
    "no kernel image": "def flash_attn_func(*args, **kwargs):\n"
                       "    raise RuntimeError('CUDA error: no kernel image is available for execution on the device')\n",
}


def local_kernels(monkeypatch, root, **bodies_by_repo: str) -> None:
    """Real `kernels` build directories (metadata.json + module) that kernels.get_kernel loads through
    its LOCAL_KERNELS override instead of the Hub: the trainer's exact call, without a network."""
    entries = []
    for n, (repo, body) in enumerate(bodies_by_repo.items()):
        path = root / f"kernel{n}"
        path.mkdir()
        metadata = {"id": f"{root.name}_kernel{n}", "name": "flash-attn3", "version": 1, "license": "BSD-3-Clause",
                    "python-depends": [], "backend": {"type": "cpu"}}
        (path / "metadata.json").write_text(json.dumps(metadata))
        (path / "__init__.py").write_text("from . import flash_attn_interface\n")
        (path / "flash_attn_interface.py").write_text(KERNEL_BODIES[body])
        entries.append(f"{repo}={path}")
    monkeypatch.setenv("LOCAL_KERNELS", ":".join(entries))


@needs_kernels
def test_fa3_loads_through_the_real_kernels_call_and_is_verified(monkeypatch, tmp_path):
    local_kernels(monkeypatch, tmp_path, **{hp.FA3_HOPPER.origin: "correct"})
    kernel, why = hp.choose_attention(LINUX_H100, "bf16", device="cpu")
    assert kernel is not None and kernel.name == "FA3" and kernel.source == hp.FA3_HOPPER
    assert why.startswith("FA3 varunneal/flash-attention-3@de87b9b, verified by a test call")


@needs_kernels
def test_a_kernel_that_fails_its_first_call_falls_back_to_the_next_with_the_reason(monkeypatch, tmp_path):
    local_kernels(monkeypatch, tmp_path, **{hp.FA3_HOPPER.origin: "no kernel image", hp.FA3_COMMUNITY.origin: "correct"})
    kernel, why = hp.choose_attention(LINUX_H100, "bf16", device="cpu")
    assert kernel is not None and kernel.source == hp.FA3_COMMUNITY
    assert "unusable before it: FA3 varunneal/flash-attention-3@de87b9b: RuntimeError: CUDA error: no kernel image" in why


@needs_kernels
@pytest.mark.parametrize("body", ["ignores the window", "one key short"])
def test_a_kernel_with_other_window_semantics_is_refused(monkeypatch, tmp_path, body):
    local_kernels(monkeypatch, tmp_path, **{hp.FA3_COMMUNITY.origin: body})
    kernel, why = hp.choose_attention(gpu("NVIDIA A100-SXM4-80GB", (8, 0)), "bf16", device="cpu")
    assert kernel is None and "disagrees with SDPA" in why
    assert why.startswith("sm_80 (Ampere/Ada): FA3's community build; FA4 has no backward before sm_90 (order unmeasured here); "
                          "none usable here, so SDPA: FA3 kernels-community/flash-attn3@9542c46: RuntimeError: ")


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@needs_kernels
def test_an_unreachable_hub_is_a_fall_back_with_the_network_error(monkeypatch):
    from huggingface_hub import constants

    monkeypatch.delenv("LOCAL_KERNELS", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{closed_port()}")  # as HF_ENDPOINT would
    kernel, why = hp.choose_attention(LINUX_H100, "bf16", device="cpu")
    assert kernel is None and why.startswith("Hopper: FA3 first (upstream's measured H100 path), then FA4 "
                                             "(order unmeasured here); none usable here, so SDPA: ")
    for source in (hp.FA3_HOPPER, hp.FA3_COMMUNITY):
        assert f"{source.label}: ConnectionError: http://127.0.0.1:" in why
    assert "ConnectError" in why and "HF_HUB_OFFLINE=1" in why and "FA4 flash-attn-4: " in why


@needs_kernels
def test_offline_mode_skips_the_hub_and_kernels_says_what_is_missing(monkeypatch):
    from huggingface_hub import constants

    monkeypatch.delenv("LOCAL_KERNELS", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert hp.hub_unreachable(hp.FA3_HOPPER.origin) is None
    monkeypatch.setenv("HF_HUB_CACHE", str(hp.Path(tempfile.mkdtemp())))
    kernel, why = hp.choose_attention(facts(LINUX_H100, attention_override="fa3"), "bf16", device="cpu")
    assert kernel is None and why.startswith("AUTORESEARCH_ATTENTION=fa3 (order unmeasured here); none usable here")
    assert "FileNotFoundError: Cannot find a local snapshot for varunneal/flash-attention-3" in why


@pytest.mark.skipif(importlib.util.find_spec("flash_attn") is not None, reason="flash-attn-4 is installed here")
def test_fa4_not_installed_says_how_to_install_it():
    with pytest.raises(ImportError, match=r"pip install -e '\.\[cuda,fa4\]'"):
        hp.load_flash_attention(hp.FA4)


def test_sdpa_flash_probe_and_window_cost_run_for_real_on_this_cpu():
    usable, why = hp.probe_flash_sdpa("cpu", "fp32")
    assert usable and "flash kernel runs here" in why
    ratio = hp.measure_window_cost("cpu", "fp32", seq_len=128, window=64, n_head=2, head_dim=32, repeats=1)
    assert math.isfinite(ratio) and ratio > 0


# -- compile caches ----------------------------------------------------------------------------------

def test_compile_caches_point_under_the_session_folder(tmp_path):
    env = hp.compile_cache_env(tmp_path / "cache")
    for name in ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR", "CUDA_CACHE_PATH", "FLASH_ATTENTION_CUTE_DSL_CACHE_DIR"):
        assert hp.Path(env[name]).parent == tmp_path / "cache"
    assert len({env[name] for name in env if name.endswith(("_DIR", "_PATH"))}) == 4  # one folder each
    assert env["TORCHINDUCTOR_FX_GRAPH_CACHE"] == env["TORCHINDUCTOR_AUTOGRAD_CACHE"] == "1"
    assert hp.compile_cache_env(hp.Path("relative")) == hp.compile_cache_env(hp.Path.cwd() / "relative")


def test_torch_takes_its_caches_from_that_environment(tmp_path):
    """In a fresh process, as the runner starts a trainer: inductor's cache folder is ours and both of
    its caches are on. (A real compile takes 30 s cold and 15 s warm on a 2-core CPU: bench/gpu.py
    measures the first and the cached compile on the GPU instead.)"""
    code = ("import torch._functorch.config as aot, torch._inductor.config as inductor\n"
            "from torch._inductor.runtime.cache_dir_utils import cache_dir\n"
            "print(cache_dir(), inductor.fx_graph_cache, aot.enable_autograd_cache)")
    env = {**os.environ, **hp.compile_cache_env(tmp_path)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout.split()
    assert out == [str(tmp_path / "inductor"), "True", "True"]


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
    found = hp.torch_facts("cpu", environ={"AUTORESEARCH_COMPILE": "1", "AUTORESEARCH_DTYPE": "", "AUTORESEARCH_ATTENTION": "fa4"})
    caps = torch.cpu.get_capabilities()
    assert found.device_type == "cpu" and not found.is_hip and found.capability is None
    assert found.bf16_native == bool(caps.get("avx512_bf16") or caps.get("amx_bf16"))
    assert found.compile_override == "1" and found.dtype_override is None and found.attention_override == "fa4"
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


# -- sliding windows without FlashAttention -------------------------------------------------------------------

def _probe_ok() -> None:
    pass


def _probe_fails() -> None:
    raise RuntimeError("Triton could not compile the flex kernel")


def test_windows_use_flex_attention_only_on_a_gpu_with_compile_and_a_passing_probe():
    from harness.hardware.platform import PlatformFacts, choose_window_attention

    gpu = PlatformFacts(device_type="cuda", device_name="NVIDIA H100 80GB HBM3", capability=(9, 0), has_triton=True)
    assert choose_window_attention(gpu, compile_on=True, flash_on=False, probe=_probe_ok)[0] is True
    off, why = choose_window_attention(gpu, compile_on=True, flash_on=True, probe=_probe_ok)
    assert not off and "FlashAttention" in why
    off, why = choose_window_attention(gpu, compile_on=False, flash_on=False, probe=_probe_ok)
    assert not off and "compile" in why
    off, why = choose_window_attention(gpu, compile_on=True, flash_on=False, probe=_probe_fails)
    assert not off and "Triton could not compile" in why
    cpu = PlatformFacts(device_type="cpu")
    off, why = choose_window_attention(cpu, compile_on=True, flash_on=False, probe=_probe_ok)
    assert not off and "no backward" in why
    off, why = choose_window_attention(facts(gpu, attention_override="sdpa"), compile_on=True, flash_on=False, probe=unreachable)
    assert not off and why == "AUTORESEARCH_ATTENTION=sdpa: windows use an SDPA mask"
