"""Platform safety for every torch trainer: compile, attention kernel, dtype, and the start-up
out-of-memory ladder, decided from hardware facts.

Each decision is a pure function of a `PlatformFacts` (plus, where the answer can only come from
running something, a probe passed in as a callable) and returns `(choice, reason)`, so the
fall-backs are testable on any machine and every trainer prints the same reasons. `torch_facts()`
gathers the facts from the running torch; torch is imported only inside the functions that need
it (this module is part of the frozen harness and must import without torch).

What the community ports got wrong, and what is done here instead (see reference/forks.md):
- compile gated by platform name goes stale (ROCm compile broke on PyTorch <= 2.8, works on 2.9+):
  compile is decided by a real compile-and-run probe on this machine, never by the device name;
- Flash Attention 3 "loads" on consumer Blackwell (sm_120) and fails at its first call: the kernel
  is accepted only after one real call agrees with SDPA;
- native Windows has no Triton: compile off with that reason, not a crash;
- the first experiment of the night died of out-of-memory on small cards: `run_with_oom_ladder`
  halves the device batch (keeping TOTAL_BATCH_SIZE through more accumulation) and says so.

Overrides: AUTORESEARCH_COMPILE=0/1 forces compile off/on (on still needs the probe to pass),
AUTORESEARCH_DTYPE=bf16/fp32 the compute dtype, AUTORESEARCH_ATTENTION=fa3/fa4/flex/sdpa the
attention path (a FlashAttention kernel still has to pass its test call).
"""

from __future__ import annotations

import gc
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, TypeVar

COMPILE_ENV = "AUTORESEARCH_COMPILE"
DTYPE_ENV = "AUTORESEARCH_DTYPE"
DTYPE_NAMES = {"bf16": "bf16", "bfloat16": "bf16", "fp32": "fp32", "float32": "fp32"}
ATTENTION_ENV = "AUTORESEARCH_ATTENTION"
ATTENTION_CHOICES = ("fa3", "fa4", "flex", "sdpa")

T = TypeVar("T")


@dataclass(frozen=True)
class PlatformFacts:
    """What the decisions depend on. Everything is a plain value, so tests state the hardware."""

    device_type: str                          # torch device type: "cuda" (NVIDIA or AMD/HIP), "mps" or "cpu"
    os: str = "linux"                         # "linux", "windows" (native) or "darwin"; WSL is "linux"
    wsl: int | None = None                    # 1 or 2 under WSL
    is_hip: bool = False                      # torch.version.hip is set: a ROCm build ("cuda" is HIP)
    device_name: str = ""
    capability: tuple[int, int] | None = None  # NVIDIA compute capability
    gfx_arch: str | None = None               # AMD, e.g. "gfx942"
    chip: str | None = None                   # Apple, e.g. "Apple M2 Pro"
    bf16_native: bool = False                 # the device computes bf16 natively (MPS: bf16 tensors work)
    has_triton: bool = False                  # a working Triton (GPU inductor backend)
    has_cxx: bool = False                     # a C++ compiler (CPU inductor backend)
    compile_override: str | None = None       # AUTORESEARCH_COMPILE
    dtype_override: str | None = None         # AUTORESEARCH_DTYPE
    attention_override: str | None = None     # AUTORESEARCH_ATTENTION

    @property
    def host(self) -> str:
        if self.os == "windows":
            return "Windows (native)"
        if self.wsl:
            return f"WSL{self.wsl} (Linux with the Windows host's GPU)"
        return {"darwin": "macOS", "linux": "Linux"}.get(self.os, self.os)


def why(exc: BaseException) -> str:
    """An exception as a one-line reason."""
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0][:160]}" if lines else type(exc).__name__


# ---------------------------------------------------------------------------------------------
# Decisions
# ---------------------------------------------------------------------------------------------

def choose_dtype(facts: PlatformFacts) -> tuple[str, str]:
    """("bf16" | "fp32", reason): bf16 autocast where it is native and pays, fp32 elsewhere."""
    override = facts.dtype_override
    if override:
        name = DTYPE_NAMES.get(override.lower())
        if name is None:
            raise ValueError(f"{DTYPE_ENV}={override!r} is not understood: use bf16 or fp32")
        if name == "bf16" and facts.device_type == "mps" and not facts.bf16_native:
            return "fp32", f"{DTYPE_ENV}={override}, but this macOS/torch has no bf16 on MPS (macOS 14+ needed): fp32"
        return name, f"{DTYPE_ENV}={override}"
    if facts.device_type == "cuda":
        if facts.is_hip:
            if facts.bf16_native:
                return "bf16", "the AMD GPU computes bf16 natively"
            return "fp32", "this AMD GPU has no native bf16 (before MI200/RDNA3); training in fp32"
        if facts.bf16_native:
            return "bf16", "the GPU computes bf16 natively"
        # fp16 autocast without a GradScaler (what win-rtx does on Turing) underflows; fp32 is safe
        return "fp32", "this GPU has no native bf16 (pre-Ampere); training in fp32"
    if facts.device_type == "mps":
        return "fp32", _mps_dtype_reason(facts)
    if facts.bf16_native:  # measured on a 2-core EPYC with avx512_bf16: cpu-tiny steps ~1.3x faster than fp32
        return "bf16", "this CPU computes bf16 natively (avx512_bf16/amx_bf16): faster than fp32"
    return "fp32", "this CPU has no native bf16 (no avx512_bf16/amx_bf16); emulated bf16 is slower than fp32"


def _mps_dtype_reason(facts: PlatformFacts) -> str:
    chip = facts.chip or facts.device_name or "this Apple GPU"
    if not facts.bf16_native:
        return f"{chip}: this macOS/torch has no bf16 on MPS (macOS 14+ needed)"
    generation = re.search(r"\bM(\d+)\b", chip)
    if generation is None:
        return (f"{chip}: no bf16 measurement for this chip; on M-series GPUs eager bf16 was slower than fp32 "
                f"({DTYPE_ENV}=bf16 to try it)")
    # The published measurements (M-series Macs in nanochat's issues, an M4 Max) all favour fp32; the reason
    # names the chip, so a measurement that shows otherwise for one generation can change just that branch.
    return (f"{chip} (M{generation.group(1)}): eager bf16 on MPS saves ~25% memory but is ~17% slower per step "
            f"(nanochat #685/#793; 2.6x slower on an M4 Max, ncdrone); {DTYPE_ENV}=bf16 trades speed for memory")


def choose_compile(facts: PlatformFacts, probe: Callable[[], None]) -> tuple[bool, str]:
    """(torch.compile on?, reason). On wherever a real compile-and-run probe passes, except on CPU
    where it is off by default: inductor there takes 30-60 s cold before the first step, more than a
    short run gains. The probe runs only when its answer is needed."""
    override = facts.compile_override
    if override not in (None, "", "0", "1"):
        raise ValueError(f"{COMPILE_ENV}={override!r} is not understood: use 0 or 1")
    if override == "0":
        return False, f"{COMPILE_ENV}=0"
    forced = override == "1"
    if facts.device_type == "cpu":
        if not forced:
            return False, f"CPU: inductor's 30-60 s cold compile outweighs its gain on short runs ({COMPILE_ENV}=1 for long ones)"
        if not facts.has_cxx:
            compiler = "MSVC (cl.exe)" if facts.os == "windows" else "a C++ compiler (g++/clang++)"
            return False, f"{COMPILE_ENV}=1, but inductor's CPU backend needs {compiler} and none is on PATH"
    elif facts.device_type == "cuda" and not facts.has_triton:
        if facts.os == "windows":
            return False, "native Windows has no Triton, which torch.compile needs on GPUs (pip install triton-windows to try)"
        package = "pytorch-triton-rocm" if facts.is_hip else "triton"
        return False, f"no working Triton installation ({package}), which torch.compile needs on GPUs"
    elif facts.device_type not in ("cuda", "mps"):
        return False, f"torch.compile is not supported on {facts.device_type}"
    t0 = time.perf_counter()
    try:
        probe()
    except Exception as exc:  # any failure of the toolchain means eager, never a crash mid-run
        where = " on ROCm" if facts.is_hip else " on MPS" if facts.device_type == "mps" else ""
        return False, f"compile probe failed{where} ({why(exc)})"
    where = "ROCm " if facts.is_hip else "MPS " if facts.device_type == "mps" else ""
    return True, f"{where}compile probe passed in {time.perf_counter() - t0:.1f}s" + (f" ({COMPILE_ENV}=1)" if forced else "")


# -- attention kernels ---------------------------------------------------------------------------

@dataclass(frozen=True)
class FlashSource:
    """Where one FlashAttention kernel comes from: a `kernels` Hub repository at a pinned commit
    (FA3), or a package from the index (FA4, which compiles its kernels itself: no Hub)."""

    kernel: str                 # "FA3" or "FA4"
    origin: str                 # the Hub repository, or the PyPI package
    revision: str | None = None  # the Hub commit every run loads (Hub kernels only)

    @property
    def label(self) -> str:
        return f"{self.kernel} {self.origin}" + (f"@{self.revision[:7]}" if self.revision else "")


# Pinned so that every run loads the same binary. `kernels` >= 0.15 refuses a call with neither a
# version nor a revision. Both commits are the ones other autoresearch/nanochat runs pin; they were
# not fetched from here (no Hub access), so the first GPU run is what confirms them.
# varunneal's is upstream's Hopper build (upstream's H100 figures came from it); it is not from a
# publisher `kernels` trusts, hence trust_remote_code naming it (see load_flash_attention).
FA3_HOPPER = FlashSource("FA3", "varunneal/flash-attention-3", "de87b9b5af06dd9984df595bef90b2eba44b181a")
FA3_COMMUNITY = FlashSource("FA3", "kernels-community/flash-attn3", "9542c462013476380ce4b395b9ddc0e8118161ee")
FA4 = FlashSource("FA4", "flash-attn-4")  # flash_attn.cute.flash_attn_func, read from 4.0.0b36


@dataclass(frozen=True)
class FlashKernel:
    """A loaded FlashAttention kernel behind FA3's call, which FA4 shares:
    `flash_attn_func(q, k, v, causal=True, window_size=(window, 0))` on (B, T, H, D) tensors, keys
    [i - window, i] visible to query i. It may also return the log-sum-exp (a tuple)."""

    source: FlashSource
    flash_attn_func: Callable[..., Any]

    @property
    def name(self) -> str:
        return self.source.kernel


def flash_attention_candidates(facts: PlatformFacts, dtype: str) -> tuple[tuple[FlashSource, ...], str]:
    """(the FlashAttention kernels worth trying here, best first; why). Empty, with the reason, where
    none can work: the trainer then uses SDPA, with windows through compiled flex_attention or a mask
    (`choose_window_attention`). Pure: nothing is loaded or run."""
    override = facts.attention_override or None
    if override is not None and override not in ATTENTION_CHOICES:
        raise ValueError(f"{ATTENTION_ENV}={override!r} is not understood: use one of {', '.join(ATTENTION_CHOICES)}")
    if override in ("flex", "sdpa"):
        return (), f"{ATTENTION_ENV}={override}"
    if facts.device_type != "cuda":
        return (), f"device is {facts.device_type}; FlashAttention kernels are CUDA-only"
    if facts.is_hip:
        return (), "ROCm build (torch.version.hip): FA3/FA4 are CUDA-only; SDPA uses AOTriton/CK flash kernels"
    if dtype != "bf16":
        return (), "training in fp32; FlashAttention needs bf16"
    if facts.capability is None:
        return (), "compute capability unknown: no FlashAttention kernel can be chosen"
    major, minor = facts.capability
    if major < 8:
        return (), f"compute capability {major}.{minor} (pre-Ampere): no FlashAttention kernel exists for it"
    # Preference by generation, from what is known; none of it is measured on this project's machines
    # (bench/gpu.py measures each path, and one measurement may reorder a generation):
    # - Hopper: upstream measured FA3 (varunneal's build) on an H100 at 1.65 M tokens/s, 39.8 % MFU.
    #   FA4 has Hopper kernels too, but its published gains are on Blackwell: third, after FA3's
    #   community build.
    # - Blackwell: FA4 is written for it (sm_100/sm_110 and sm_120 kernels); no FA3 build targets
    #   sm_100, and on sm_120 FA3 loads and then fails its first call (nanochat #820).
    # - Ampere/Ada: FA3's community build (sm_80, also what upstream picks off Hopper); FA4 runs its
    #   forward there but its backward asserts sm_90 or newer, so it cannot train.
    if major == 8:
        order, why_order = (FA3_COMMUNITY,), f"sm_{major}{minor} (Ampere/Ada): FA3's community build; FA4 has no backward before sm_90"
    elif major == 9:
        order, why_order = (FA3_HOPPER, FA3_COMMUNITY, FA4), "Hopper: FA3 first (upstream's measured H100 path), then FA4"
    else:
        order, why_order = (FA4,), f"sm_{major}{minor} (Blackwell or newer): FA4 targets it; FA3 has no kernel that runs there"
    if override == "fa3":
        order = tuple(s for s in order if s.kernel == "FA3") or (FA3_COMMUNITY,)
        why_order = f"{ATTENTION_ENV}=fa3"
    elif override == "fa4":
        order, why_order = (FA4,), f"{ATTENTION_ENV}=fa4"
    return order, why_order + " (order unmeasured here)"


def hub_unreachable(repo: str) -> str | None:
    """Why the Hugging Face Hub cannot serve `repo` now, or None. A repository named in
    LOCAL_KERNELS, or HF_HUB_OFFLINE=1 (the local cache only), needs no Hub. One request without
    retries: huggingface_hub's own retries take ~25 s to give up when the Hub is unreachable,
    start-up time every experiment would pay."""
    from huggingface_hub import constants
    from huggingface_hub.utils import get_session

    local = os.environ.get("LOCAL_KERNELS", "")
    if constants.HF_HUB_OFFLINE or any(entry.split("=", 1)[0] == repo for entry in local.split(":")):
        return None
    try:
        get_session().head(constants.ENDPOINT, timeout=5)
    except Exception as exc:  # any transport failure: DNS, refused, timeout, proxy
        return f"{constants.ENDPOINT} unreachable ({why(exc)}); HF_HUB_OFFLINE=1 uses the local cache"
    return None


def load_flash_attention(source: FlashSource) -> FlashKernel:
    """Load one kernel; raises, with the cause, where it cannot be had."""
    if source.kernel == "FA4":
        try:
            from flash_attn.cute import flash_attn_func
        except ImportError as exc:
            raise ImportError(f"flash-attn-4 not importable ({why(exc)}): pip install -e '.[cuda,fa4]'") from exc
        import torch

        # CuTeDSL compiles FA4's kernels itself; torch.compile must not trace into them, so each call
        # is a graph break (its cost is unmeasured; a custom op would avoid it).
        return FlashKernel(source, torch.compiler.disable(flash_attn_func))
    try:
        from kernels import get_kernel
    except ImportError as exc:
        raise ImportError("the `kernels` package is not installed: pip install -e '.[cuda]'") from exc
    unreachable = hub_unreachable(source.origin)
    if unreachable:
        raise ConnectionError(unreachable)
    # The signature of kernels 0.17: a revision (or version) is required, and trust_remote_code
    # names the repositories to load from publishers kernels does not trust.
    module = get_kernel(source.origin, revision=source.revision, trust_remote_code=[source.origin])
    return FlashKernel(source, module.flash_attn_interface.flash_attn_func)


def choose_attention(facts: PlatformFacts, dtype: str, device: str = "cuda",
                     load: Callable[[FlashSource], FlashKernel] = load_flash_attention) -> tuple[FlashKernel | None, str]:
    """(the first candidate kernel that loads and then agrees with SDPA, forward and backward, on one
    real call; or None for SDPA; reason). Every kernel that failed is named in the reason with its
    cause, so a fall-back is never silent."""
    sources, order = flash_attention_candidates(facts, dtype)
    failures: list[str] = []
    for source in sources:
        try:
            kernel = load(source)
            verify_flash_attention(kernel, device)
        except Exception as exc:  # no Hub, not installed, no build for this GPU, or a failing first call
            failures.append(f"{source.label}: {why(exc)}")
            continue
        passed = f"{source.label}, verified by a test call on this GPU; {order}"
        return kernel, passed + (f"; unusable before it: {'; '.join(failures)}" if failures else "")
    if not sources:
        return None, order
    return None, f"{order}; none usable here, so SDPA: {'; '.join(failures)}"


def choose_window_attention(facts: PlatformFacts, compile_on: bool, flash_on: bool,
                            probe: Callable[[], None]) -> tuple[bool, str]:
    """(sliding windows through compiled flex_attention?, reason). Without FlashAttention, SDPA can
    only do a window with a dense mask, which also rules out its flash kernel; flex_attention's block
    mask skips the blocks outside the window, but it needs a GPU for its backward and is fast only
    compiled. One real compiled call, checked against the dense mask, decides."""
    if flash_on:
        return False, "FlashAttention does sliding windows natively"
    if facts.attention_override == "sdpa":
        return False, f"{ATTENTION_ENV}=sdpa: windows use an SDPA mask"
    if facts.device_type != "cuda":
        return False, f"device {facts.device_type}: flex_attention has no backward here; windows use an SDPA mask"
    if not compile_on:
        return False, "flex_attention is only fast compiled and torch.compile is off; windows use an SDPA mask"
    try:
        probe()
    except Exception as exc:
        return False, f"flex_attention failed its test call ({why(exc)}); windows use an SDPA mask"
    return True, "sliding windows through compiled flex_attention (block-sparse), verified by a test call"


def probe_flex_windows(device: str, dtype: str = "bf16") -> None:
    """Compile flex_attention with a sliding-window block mask, run it forward and backward, and
    compare with SDPA and the equivalent dense mask. Raises if anything fails or disagrees."""
    import torch
    import torch.nn.functional as F
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    dev = torch.device(device)
    T, window = 512, 128
    torch_dtype = torch.bfloat16 if dtype == "bf16" else torch.float32
    g = torch.Generator(device="cpu").manual_seed(0)
    base = [torch.randn(2, 4, T, 64, generator=g).to(dev, torch_dtype) for _ in range(3)]
    block_mask = create_block_mask(lambda b, h, q, k: (q >= k) & (q - k <= window), B=None, H=None,
                                   Q_LEN=T, KV_LEN=T, device=dev)
    i = torch.arange(T, device=dev)
    dense = (i[:, None] >= i[None, :]) & (i[:, None] - i[None, :] <= window)
    outputs = []
    for attend in (torch.compile(lambda q, k, v: flex_attention(q, k, v, block_mask=block_mask), dynamic=False),
                   lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=dense)):
        q, k, v = (t.clone().requires_grad_(True) for t in base)
        y = attend(q, k, v)
        y.float().square().sum().backward()
        outputs.append((y.detach().float(), q.grad.float()))
    (y_flex, g_flex), (y_ref, g_ref) = outputs
    tol = 2e-2 if torch_dtype == torch.bfloat16 else 1e-4  # relative error of the whole tensor
    for name, got, ref in (("output", y_flex, y_ref), ("gradient", g_flex, g_ref)):
        error = ((got - ref).norm() / ref.norm().clamp_min(1e-12)).item()
        if not error <= tol:
            raise RuntimeError(f"flex_attention {name} disagrees with the dense-mask reference (relative error {error:.2e})")


def verify_flash_attention(kernel: FlashKernel, device: str = "cuda") -> None:
    """One real call, forward and backward, at the model's head size, checked against SDPA with the
    same sliding window (computed in fp32). Consumer Blackwell (sm_120) loads FA3 and then fails at
    its first call, FA4's backward refuses GPUs before sm_90; this catches those (and a kernel with
    other window semantics) before training. Raises on any failure or disagreement."""
    import torch
    import torch.nn.functional as F

    T, window = 128, 16  # a small window: a key too many or too few changes each output by ~1/17
    g = torch.Generator(device="cpu").manual_seed(0)
    base = [torch.randn(2, T, 2, 128, generator=g).to(device, torch.bfloat16) for _ in range(3)]
    i = torch.arange(T, device=base[0].device)
    d = i[:, None] - i[None, :]
    mask = (d >= 0) & (d <= window)  # keys [i - window, i]: FlashAttention's window_size=(window, 0)

    def run(attend, dtype):
        q, k, v = (t.detach().to(dtype).requires_grad_(True) for t in base)  # fresh leaves each run
        out = attend(q, k, v)
        out = out[0] if isinstance(out, tuple) else out  # FA4 (and some FA3 builds) add the log-sum-exp
        out.float().square().sum().backward()
        return [out.detach().float()] + [t.grad.float() for t in (q, k, v)]

    got = run(lambda q, k, v: kernel.flash_attn_func(q, k, v, causal=True, window_size=(window, 0)), torch.bfloat16)
    ref = run(lambda q, k, v: F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                             attn_mask=mask).transpose(1, 2), torch.float32)
    if got[0].shape != ref[0].shape:
        raise RuntimeError(f"flash_attn_func returned shape {tuple(got[0].shape)}, expected {tuple(ref[0].shape)}")
    if not torch.allclose(got[0], ref[0], atol=3e-2, rtol=3e-2):
        raise RuntimeError("flash_attn_func disagrees with SDPA on a sliding-window test (forward)")
    for name, a, b in zip(("dq", "dk", "dv"), got[1:], ref[1:]):
        error = ((a - b).norm() / b.norm().clamp_min(1e-12)).item()
        if not error <= 3e-2:
            raise RuntimeError(f"flash_attn_func's backward disagrees with SDPA ({name} relative error {error:.1e})")


# ---------------------------------------------------------------------------------------------
# Compile caches
# ---------------------------------------------------------------------------------------------

def compile_cache_env(cache_root: Path) -> dict[str, str]:
    """The environment that keeps every compiler cache of a run in one folder under `cache_root` (a
    session's cache folder), so that the next experiment with an unchanged model shape loads its
    kernels instead of compiling them again: TorchInductor's FX-graph and AOT-autograd caches (both
    live in its cache folder; forced on, as their defaults differ between torch versions), Triton's
    kernels, the CUDA driver's PTX JIT cache, and FlashAttention-4's CuTeDSL kernels."""
    root = Path(cache_root).expanduser().absolute()
    return {
        "TORCHINDUCTOR_CACHE_DIR": str(root / "inductor"),
        "TORCHINDUCTOR_FX_GRAPH_CACHE": "1",
        "TORCHINDUCTOR_AUTOGRAD_CACHE": "1",
        "TRITON_CACHE_DIR": str(root / "triton"),
        "CUDA_CACHE_PATH": str(root / "cuda-jit"),
        "FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED": "1",
        "FLASH_ATTENTION_CUTE_DSL_CACHE_DIR": str(root / "flash-attn-cute"),
    }


# ---------------------------------------------------------------------------------------------
# The out-of-memory ladder
# ---------------------------------------------------------------------------------------------

_OOM_MESSAGES = ("out of memory", "can't allocate memory", "cannot allocate memory")


def is_oom_error(exc: BaseException) -> bool:
    """An allocation failure: torch.OutOfMemoryError (CUDA and HIP), the "out of memory"
    RuntimeErrors of CUDA/HIP/MPS, the CPU allocator's, or MemoryError; also when wrapped (compile
    errors carry the original as their cause)."""
    seen = 0
    while exc is not None and seen < 8:
        if isinstance(exc, MemoryError) or any(c.__name__ == "OutOfMemoryError" for c in type(exc).__mro__):
            return True
        if isinstance(exc, RuntimeError) and any(m in str(exc).lower() for m in _OOM_MESSAGES):
            return True
        exc = exc.__cause__ or exc.__context__
        seen += 1
    return False


def next_smaller_batch(device_batch_size: int) -> int:
    """The largest divisor of the batch that is at most half of it (a divisor keeps
    TOTAL_BATCH_SIZE divisible): 128 -> 64, 12 -> 6, 9 -> 3, 7 -> 1, 1 -> 0 (none)."""
    for candidate in range(device_batch_size // 2, 0, -1):
        if device_batch_size % candidate == 0:
            return candidate
    return 0


def check_batch_sizes(device_batch_size: int, total_batch_size: int, seq_len: int) -> int:
    """Gradient accumulation steps; ValueError saying what to change when they do not divide."""
    if device_batch_size < 1 or seq_len < 1 or total_batch_size < 1:
        raise ValueError(f"batch sizes must be positive: DEVICE_BATCH_SIZE={device_batch_size}, "
                         f"TOTAL_BATCH_SIZE={total_batch_size}, MAX_SEQ_LEN={seq_len}")
    tokens_per_fwdbwd = device_batch_size * seq_len
    if total_batch_size % tokens_per_fwdbwd:
        raise ValueError(f"TOTAL_BATCH_SIZE ({total_batch_size}) must be a multiple of DEVICE_BATCH_SIZE * "
                         f"MAX_SEQ_LEN ({device_batch_size} * {seq_len} = {tokens_per_fwdbwd}): change one of the two")
    return total_batch_size // tokens_per_fwdbwd


def oom_ladder(device_batch_size: int, total_batch_size: int, seq_len: int, floor: int = 1) -> Iterator[int]:
    """DEVICE_BATCH_SIZE, then ever smaller divisors of it (halving where it can) down to `floor`:
    every size keeps TOTAL_BATCH_SIZE a whole number of micro-batches (more accumulation)."""
    check_batch_sizes(device_batch_size, total_batch_size, seq_len)
    if floor < 1:
        raise ValueError(f"the ladder's floor must be at least 1, got {floor}")
    size = device_batch_size
    yield size
    while (size := next_smaller_batch(size)) >= floor:
        yield size


def run_with_oom_ladder(try_step: Callable[[int], T], device_batch_size: int, total_batch_size: int,
                        seq_len: int, *, floor: int = 1, free_memory: Callable[[], None] | None = None,
                        log: Callable[[str], None] = print) -> tuple[int, T]:
    """Run `try_step(b)` (a trainer's first forward and backward) at DEVICE_BATCH_SIZE; on an
    out-of-memory error free memory, halve the batch and say so, down to `floor`, where the error is
    re-raised. Other errors pass through at once. Returns (the batch size that fit, its result)."""
    sizes = list(oom_ladder(device_batch_size, total_batch_size, seq_len, floor))
    for i, size in enumerate(sizes):
        try:
            return size, try_step(size)
        except Exception as exc:
            if not is_oom_error(exc):
                raise
            if i + 1 == len(sizes):
                log(f"out of memory at DEVICE_BATCH_SIZE={size}, the floor ({floor}): lower DEPTH or MAX_SEQ_LEN "
                    "(or use a smaller preset)")
                raise
        # Outside the except block: the exception, and the frames holding the failed step's
        # activations, are gone before the allocator is asked to hand memory back.
        if free_memory is not None:
            free_memory()
        smaller = sizes[i + 1]
        steps = total_batch_size // (smaller * seq_len)
        log(f"out of memory at DEVICE_BATCH_SIZE={size}; retrying at {smaller} with {steps} accumulation steps")
    raise AssertionError("unreachable: the ladder always yields DEVICE_BATCH_SIZE")


def free_device_memory(device_type: str) -> None:
    """Give cached blocks back after an out-of-memory error and restart the peak statistics (so the
    reported peak is the run's, not the failed attempt's)."""
    gc.collect()
    import torch

    if device_type == "cuda" and torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    elif device_type == "mps" and torch.backends.mps.is_available():
        torch.mps.empty_cache()


# ---------------------------------------------------------------------------------------------
# Facts from this machine
# ---------------------------------------------------------------------------------------------

def host_os() -> tuple[str, int | None]:
    """("linux" | "windows" | "darwin", WSL version or None). WSL is Linux with the host's GPU."""
    if sys.platform == "win32":
        return "windows", None
    if sys.platform == "darwin":
        return "darwin", None
    from harness.hardware.detect import parse_wsl

    try:
        wsl = parse_wsl(Path("/proc/version").read_text())
    except OSError:
        wsl = None
    return "linux", wsl


def has_cxx(os_name: str) -> bool:
    compilers = ("cl",) if os_name == "windows" else ("g++", "c++", "clang++")
    return any(shutil.which(cxx) for cxx in compilers)


def has_triton() -> bool:
    try:
        from torch.utils._triton import has_triton as torch_has_triton  # imports triton and checks a backend
    except ImportError:
        import importlib.util
        return importlib.util.find_spec("triton") is not None
    return bool(torch_has_triton())


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform as host

    return host.processor() or host.machine() or "cpu"


def apple_chip() -> str | None:
    """The Apple chip's name ("Apple M2 Pro") from sysctl; None off macOS or on Intel Macs."""
    if sys.platform != "darwin":
        return None
    try:
        out = subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    name = out.stdout.strip()
    return name if name.startswith("Apple") else None


def process_peak_rss_mb() -> float | None:
    """This process's peak resident memory: the nearest thing to "VRAM" on the CPU."""
    try:
        import resource  # not on Windows
    except ImportError:
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 1024 / 1024 if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB on Linux


def torch_facts(device: str, environ: Mapping[str, str] | None = None) -> PlatformFacts:
    """The facts for a torch device ("cuda", "cuda:1", "mps", "cpu") on this machine. The caller
    has already checked that the device exists."""
    import torch

    env = os.environ if environ is None else environ
    dev = torch.device(device)
    os_name, wsl = host_os()
    is_hip = torch.version.hip is not None
    capability = gfx_arch = chip = None
    if dev.type == "cuda":
        name = torch.cuda.get_device_name(dev)
        if is_hip:
            arch = getattr(torch.cuda.get_device_properties(dev), "gcnArchName", "") or ""
            gfx_arch = arch.split(":")[0] or None
        else:
            capability = tuple(torch.cuda.get_device_capability(dev))
        try:
            bf16 = torch.cuda.is_bf16_supported(including_emulation=False)
        except TypeError:  # older torch has no including_emulation
            bf16 = torch.cuda.is_bf16_supported()
    elif dev.type == "mps":
        chip = apple_chip()
        name = chip or "Apple GPU"
        try:
            torch.ones(1, device=dev, dtype=torch.bfloat16)
            bf16 = True
        except (RuntimeError, TypeError):  # macOS < 14: "MPS BFloat16 is only supported on MacOS 14 or newer"
            bf16 = False
    else:
        name = cpu_name()
        caps = getattr(torch.cpu, "get_capabilities", lambda: {})()
        bf16 = bool(caps.get("avx512_bf16") or caps.get("amx_bf16"))
    return PlatformFacts(
        device_type=dev.type, os=os_name, wsl=wsl, is_hip=is_hip, device_name=name, capability=capability,
        gfx_arch=gfx_arch, chip=chip, bf16_native=bool(bf16),
        has_triton=has_triton() if dev.type == "cuda" else False, has_cxx=has_cxx(os_name),
        compile_override=env.get(COMPILE_ENV) or None, dtype_override=env.get(DTYPE_ENV) or None,
        attention_override=env.get(ATTENTION_ENV) or None,
    )


def probe_compile(device: str, optimizer: bool = True) -> None:
    """Compile and run, forward and backward, the kinds of operation the trainers compile (a matmul,
    RMSNorm, causal SDPA, ReLU^2) and, with `optimizer`, an in-place lerp_ whose weight derives from
    a 0-D CPU tensor, as the compiled optimizer steps do (PyTorch <= 2.8 on ROCm failed a dtype
    check there). Raises if the toolchain fails or the compiled result disagrees with eager."""
    import torch
    import torch.nn.functional as F

    dev = torch.device(device)
    if dev.type == "cpu" and not has_cxx(host_os()[0]):
        raise RuntimeError("no C++ compiler on PATH for inductor's CPU backend")

    def block(x, w):
        h = F.rms_norm(x @ w, (w.size(-1),))
        q = h.view(2, 16, 2, 16).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, q, q, is_causal=True)
        return F.relu(y).square().mean()

    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(2, 16, 32, generator=g).to(dev)
    w0 = (torch.randn(32, 32, generator=g) / 32**0.5).to(dev)
    results = []
    for fn in (block, torch.compile(block, dynamic=False, fullgraph=True)):
        w = w0.clone().requires_grad_(True)
        loss = fn(x, w)
        loss.backward()
        results.append((loss.detach(), w.grad))
    (eager_loss, eager_grad), (compiled_loss, compiled_grad) = results
    if not (torch.allclose(eager_loss, compiled_loss, rtol=1e-2, atol=1e-5)
            and torch.allclose(eager_grad, compiled_grad, rtol=1e-2, atol=1e-5)):
        raise RuntimeError("the compiled probe disagrees with eager")
    if optimizer:
        def lerp_step(buf, grad, beta):
            buf.lerp_(grad, 1 - beta.to(grad.dtype))
            return buf

        beta = torch.tensor(0.9, dtype=torch.float32, device="cpu")
        grad = torch.randn(64, generator=g).to(dev)
        expected = lerp_step(torch.zeros(64, device=dev), grad, beta)
        got = torch.compile(lerp_step, dynamic=False, fullgraph=True)(torch.zeros(64, device=dev), grad, beta)
        if not torch.allclose(got, expected, rtol=1e-5, atol=1e-6):
            raise RuntimeError("the compiled optimizer probe (lerp_ with a 0-D CPU weight) disagrees with eager")


def measure_window_cost(device: str, dtype: str, seq_len: int, window: int, n_head: int, head_dim: int,
                        repeats: int = 3) -> float:
    """Time of one forward+backward of SDPA with a sliding-window band mask, divided by the time of
    plain causal SDPA (which can use a flash kernel), at one row of the model's shapes. Above ~1
    a windowed layer costs more than a full one here, although it does less work."""
    import torch
    import torch.nn.functional as F

    dev = torch.device(device)
    torch_dtype = torch.bfloat16 if dtype == "bf16" else torch.float32
    i = torch.arange(seq_len, device=dev)
    d = i[:, None] - i[None, :]
    mask = (d >= 0) & (d <= window)

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        elif dev.type == "mps":
            torch.mps.synchronize()

    def timed(**kwargs) -> float:
        best = float("inf")
        for _ in range(repeats + 1):  # the first call warms up kernels and allocator
            q, k, v = (torch.randn(1, n_head, seq_len, head_dim, device=dev, dtype=torch_dtype, requires_grad=True)
                       for _ in range(3))
            sync()
            t0 = time.perf_counter()
            F.scaled_dot_product_attention(q, k, v, **kwargs).sum().backward()
            sync()
            best = min(best, time.perf_counter() - t0)
        return best

    return timed(attn_mask=mask) / max(timed(is_causal=True), 1e-9)


def probe_flash_sdpa(device: str, dtype: str) -> tuple[bool, str]:
    """(SDPA's flash kernel runs here?, reason), from one causal call restricted to that kernel.
    On ROCm it is AOTriton/CK on supported gfx archs; elsewhere SDPA quietly falls back to the
    memory-efficient or math kernel, which is slower and keeps the (B, H, T, T) scores."""
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    dev = torch.device(device)
    torch_dtype = torch.bfloat16 if dtype == "bf16" else torch.float32
    q = torch.randn(1, 2, 64, 64, device=dev, dtype=torch_dtype)
    try:
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            F.scaled_dot_product_attention(q, q, q, is_causal=True)
    except RuntimeError as exc:
        return False, f"SDPA's flash kernel is unavailable here ({why(exc)}); full layers use the efficient/math kernel"
    return True, "SDPA's flash kernel runs here for full-context (causal) layers"
