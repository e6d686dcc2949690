"""
MLX trainer: upstream autoresearch's GPT + MuonAdamW in pure MLX (no PyTorch), single device,
single file. Runs on Apple silicon (Metal) and, through the `mlx[cpu]` build, on Linux CPUs.
Usage: python backends/mlx/train.py   (or `autoresearch run`, which adds a hard timeout)

The harness owns the data, the clock and the score: this file trains while `ctx.budget` allows and
hands `ctx.finish` a forward function (inputs -> logits); it never computes or prints val_bpb.
"""

import ctypes
import ctypes.util
import sys

# MLX's Linux CPU wheel bundles the reference (netlib) BLAS, 20-40x slower than OpenBLAS at fp32
# matmul. MLX calls cblas_sgemm dynamically, so OpenBLAS loaded globally *before* mlx.core wins.
openblas = ctypes.util.find_library("openblas") if sys.platform.startswith("linux") else None
if openblas:
    try:
        ctypes.CDLL(openblas, mode=ctypes.RTLD_GLOBAL)
    except OSError:
        openblas = None

import gc  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import shutil  # noqa: E402
import time  # noqa: E402
from dataclasses import asdict, dataclass  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Callable  # noqa: E402

import mlx.core as mx  # noqa: E402
import mlx.nn as nn  # noqa: E402
from mlx.utils import tree_flatten, tree_map, tree_map_with_path  # noqa: E402

# The harness of *this* checkout, even when another checkout is pip-installed in editable mode.
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from harness.scoring.context import load_context  # noqa: E402
from harness.hardware.flops import peak_flops  # noqa: E402
from harness.hardware.platform import cpu_name  # noqa: E402 (torch-free: imports nothing heavy)

# ---------------------------------------------------------------------------
# Hyperparameters (edit these directly)
# ---------------------------------------------------------------------------
# MAX_SEQ_LEN, TIME_BUDGET and the vocab size come from the harness (frozen per session).

ASPECT_RATIO = 64  # model_dim = DEPTH * ASPECT_RATIO, rounded up to a multiple of HEAD_DIM
HEAD_DIM = 128  # target head dimension for attention
WINDOW_PATTERN = "SSSL"  # tiled over layers: L = full context, S = half context; last layer is always L
TOTAL_BATCH_SIZE = 2**16  # tokens per optimizer step (a Mac-sized default; setup writes the preset's)
EMBEDDING_LR = 0.6  # Adam, token and value embeddings
UNEMBEDDING_LR = 0.004  # Adam, lm_head
MATRIX_LR = 0.04  # Muon, all transformer matrices
SCALAR_LR = 0.5  # Adam, per-layer residual scalars
WEIGHT_DECAY = 0.2  # cautious weight decay for Muon, decayed linearly to 0
ADAM_BETAS = (0.8, 0.95)  # Adam beta1, beta2
WARMUP_RATIO = 0.0  # fraction of the time budget for LR warmup
WARMDOWN_RATIO = 0.5  # fraction of the time budget for LR warmdown
FINAL_LR_FRAC = 0.0  # final LR as a fraction of the initial LR
DEPTH = 4  # number of transformer layers
DEVICE_BATCH_SIZE = 16  # rows per micro-batch; reduce if out of memory (TOTAL_BATCH_SIZE is kept by accumulation)
SEED = 42  # mx.random seed (init); data order is fixed by the harness

# ---------------------------------------------------------------------------
# Platform
# ---------------------------------------------------------------------------
# Every automatic choice is made by a small function that takes the hardware facts as inputs (so it
# can be tested on any machine) and returns (choice, reason); detect_platform() prints each once.
# Overrides: AUTORESEARCH_COMPILE=0/1 forces mx.compile off/on, AUTORESEARCH_DTYPE=bf16/fp32 the dtype.


def choose_dtype(device_type: str, override: str | None = None) -> tuple[mx.Dtype, str]:
    """bf16 compute (fp32 master weights) on GPUs, fp32 on CPU."""
    if override:
        names = {"bf16": mx.bfloat16, "bfloat16": mx.bfloat16, "fp32": mx.float32, "float32": mx.float32}
        if override.lower() not in names:
            raise ValueError(f"AUTORESEARCH_DTYPE={override!r} is not understood: use bf16 or fp32")
        return names[override.lower()], f"AUTORESEARCH_DTYPE={override}"
    if device_type == "gpu":
        return mx.bfloat16, "the GPU computes bf16 natively (weights stay fp32, cast at use)"
    return mx.float32, "CPU: MLX's bf16 matmul bypasses BLAS; a bf16 step measured 4-6x slower than fp32"


def choose_compile(device_type: str, probe: Callable[[], None], override: str | None = None) -> tuple[bool, str]:
    """mx.compile (fused kernels) where a real compile-and-run probe passes; eager otherwise."""
    if override not in (None, "", "0", "1"):
        raise ValueError(f"AUTORESEARCH_COMPILE={override!r} is not understood: use 0 or 1")
    if override == "0":
        return False, "AUTORESEARCH_COMPILE=0"
    try:
        t0 = time.perf_counter()
        probe()
    except Exception as e:  # any failure of the toolchain means eager, never a crash mid-run
        return False, f"compile probe failed ({type(e).__name__}: {str(e).strip().splitlines()[0][:160] if str(e).strip() else ''})"
    forced = " (AUTORESEARCH_COMPILE=1)" if override == "1" else ""
    return True, f"compile probe passed in {time.perf_counter() - t0:.1f}s{forced}"


def probe_compile(device: mx.Device) -> None:
    """Compile and run a tiny function on `device`; raises if the toolchain does not work.
    On CPU, mx.compile JIT-builds its fused kernels with g++ and silently skips fusion without one."""
    if device == mx.cpu and not shutil.which("g++"):
        raise RuntimeError("no g++ on PATH for MLX's CPU kernel JIT (without it mx.compile fuses nothing)")
    fn = mx.compile(lambda x: mx.maximum(x, 0).square() * 2 + 1)
    x = mx.linspace(-1, 1, 64)
    if not mx.allclose(fn(x), mx.maximum(x, 0).square() * 2 + 1).item():
        raise RuntimeError("compiled probe gave a wrong result")


def blas_report() -> str:
    if sys.platform.startswith("linux"):
        if openblas:
            return f"OpenBLAS ({openblas}) loaded before mlx.core (measured: matmul ~15x, step ~5x faster)"
        return "OpenBLAS not found: MLX's bundled reference BLAS makes a step ~5x slower; apt-get install libopenblas0-pthread"
    return "Accelerate (macOS)" if sys.platform == "darwin" else "MLX's bundled BLAS"


def gpu_available() -> bool:
    return mx.metal.is_available() or (hasattr(mx, "cuda") and mx.cuda.is_available())


@dataclass(frozen=True)
class Platform:
    device: mx.Device
    dtype: mx.Dtype  # compute dtype: bf16 (weights cast at use) or fp32
    compile: bool
    device_name: str  # for MFU (harness.hardware.flops matches it against its peak table)

    @property
    def polar_dtype(self) -> mx.Dtype:
        # Polar Express always in fp32: the community MLX ports' bf16 Newton-Schulz went NaN
        return mx.float32

    def peak_memory_mb(self) -> float | None:
        get_peak = getattr(mx, "get_peak_memory", None) or mx.metal.get_peak_memory  # older MLX: under mx.metal
        return get_peak() / 1024 / 1024


def detect_platform(requested: str) -> Platform:
    device_type = "cpu" if requested == "cpu" else "gpu"
    if device_type == "gpu" and not gpu_available():
        raise SystemExit(f"device {requested!r} requested but MLX sees no GPU (Metal/CUDA): "
                         "on Linux install mlx[cuda], or set AUTORESEARCH_DEVICE=cpu")
    device = mx.cpu if device_type == "cpu" else mx.gpu
    mx.set_default_device(device)
    if device_type == "gpu":
        name = mx.device_info().get("device_name", "gpu")
    else:
        name = cpu_name()
    dtype, dtype_why = choose_dtype(device_type, os.environ.get("AUTORESEARCH_DTYPE"))
    compile_on, compile_why = choose_compile(device_type, lambda: probe_compile(device), os.environ.get("AUTORESEARCH_COMPILE"))
    print(f"Device: {device_type} ({name}, MLX {mx.__version__})")
    print(f"  dtype:     {'bf16' if dtype == mx.bfloat16 else 'fp32'}: {dtype_why}")
    print(f"  compile:   {'on' if compile_on else 'off (eager)'}: {compile_why}")
    print("  attention: mx.fast.scaled_dot_product_attention (additive mask for sliding windows)")
    if device_type == "cpu":
        print(f"  blas:      {blas_report()}")
    return Platform(device=device, dtype=dtype, compile=compile_on, device_name=name)

# ---------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------

@dataclass
class GPTConfig:
    sequence_len: int = 2048
    vocab_size: int = 8192
    n_layer: int = 8
    n_head: int = 4
    n_kv_head: int = 4
    n_embd: int = 512
    window_pattern: str = "SSSL"


def norm(x):
    return mx.fast.rms_norm(x, None, mx.finfo(x.dtype).eps)  # parameter-free RMSNorm, torch's default eps


def has_ve(layer_idx, n_layer):
    """Value embeddings on alternating layers, the last one always included."""
    return layer_idx % 2 == (n_layer - 1) % 2


def apply_rotary_emb(x, cos, sin):
    d = x.shape[3] // 2
    x1, x2 = x[..., :d], x[..., d:]
    y1 = x1 * cos + x2 * sin
    y2 = x1 * (-sin) + x2 * cos
    return mx.concatenate([y1, y2], axis=3)


def band_mask(T, window, dtype):
    """Additive (T, T) sliding-window causal mask: 0 where query i sees key j, -inf elsewhere."""
    i = mx.arange(T)
    d = i[:, None] - i[None, :]  # query minus key position
    allowed = (d >= 0) & (d <= window)  # FA3's window_size=(window, 0): keys [i - window, i]
    return mx.where(allowed, 0.0, -math.inf).astype(dtype)


def attention(q, k, v, window, mask=None):
    """Causal attention on (B, T, H, D) arrays where query i sees keys [i - window, i]. `mask` is a
    cached band_mask of this window for a longer context (sliced to T: it depends only on i - j)."""
    T = q.shape[1]
    q, k, v = q.transpose(0, 2, 1, 3), k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # GQA is native
    scale = q.shape[-1] ** -0.5
    if window >= T - 1:  # the window covers the whole context: plain causal attention
        y = mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask="causal")
    else:
        mask = band_mask(T, window, q.dtype) if mask is None else mask[:T, :T]
        y = mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask)
    return y.transpose(0, 2, 1, 3)


class Linear(nn.Linear):
    """nn.Linear whose fp32 master weight is cast to the activation dtype at use (MLX has no autocast)."""

    def __call__(self, x):
        return x @ self.weight.astype(x.dtype).T


class CausalSelfAttention(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.n_head = config.n_head
        self.n_kv_head = config.n_kv_head
        self.n_embd = config.n_embd
        self.head_dim = self.n_embd // self.n_head
        assert self.n_embd % self.n_head == 0
        assert self.n_kv_head <= self.n_head and self.n_head % self.n_kv_head == 0
        self.c_q = Linear(self.n_embd, self.n_head * self.head_dim, bias=False)
        self.c_k = Linear(self.n_embd, self.n_kv_head * self.head_dim, bias=False)
        self.c_v = Linear(self.n_embd, self.n_kv_head * self.head_dim, bias=False)
        self.c_proj = Linear(self.n_embd, self.n_embd, bias=False)
        self.ve_gate_channels = 32
        self.ve_gate = Linear(self.ve_gate_channels, self.n_kv_head, bias=False) if has_ve(layer_idx, config.n_layer) else None

    def __call__(self, x, ve, cos_sin, window, mask=None):
        B, T, C = x.shape
        q = self.c_q(x).reshape(B, T, self.n_head, self.head_dim)
        k = self.c_k(x).reshape(B, T, self.n_kv_head, self.head_dim)
        v = self.c_v(x).reshape(B, T, self.n_kv_head, self.head_dim)
        # Value residual (ResFormer): mix in the value embedding with an input-dependent gate per kv head
        if ve is not None:
            ve = ve.reshape(B, T, self.n_kv_head, self.head_dim)
            gate = 2 * mx.sigmoid(self.ve_gate(x[..., :self.ve_gate_channels]))
            v = v + gate[..., None] * ve
        cos, sin = cos_sin
        q, k = apply_rotary_emb(q, cos, sin), apply_rotary_emb(k, cos, sin)
        q, k = norm(q), norm(k)  # QK-norm
        y = attention(q, k, v, window, mask)
        return self.c_proj(y.reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = Linear(config.n_embd, 4 * config.n_embd, bias=False)
        self.c_proj = Linear(4 * config.n_embd, config.n_embd, bias=False)

    def __call__(self, x):
        return self.c_proj(mx.square(nn.relu(self.c_fc(x))))  # ReLU^2


class Block(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.attn = CausalSelfAttention(config, layer_idx)
        self.mlp = MLP(config)

    def __call__(self, x, ve, cos_sin, window, mask=None):
        x = x + self.attn(norm(x), ve, cos_sin, window, mask)
        x = x + self.mlp(norm(x))
        return x


class GPT(nn.Module):
    # Arrays under names starting with "_" are state, not parameters (MLX's buffer convention).
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.window_sizes = self._compute_window_sizes(config)
        self.transformer = nn.Module()
        self.transformer.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.transformer.h = [Block(config, i) for i in range(config.n_layer)]
        self.lm_head = Linear(config.n_embd, config.vocab_size, bias=False)  # untied
        self.resid_lambdas = mx.ones((config.n_layer,))
        self.x0_lambdas = mx.zeros((config.n_layer,))
        head_dim = config.n_embd // config.n_head
        kv_dim = config.n_kv_head * head_dim
        self.value_embeds = {
            str(i): nn.Embedding(config.vocab_size, kv_dim)
            for i in range(config.n_layer) if has_ve(i, config.n_layer)
        }
        # 10x headroom over the training context, as upstream; recomputed for real in init_weights
        self.rotary_seq_len = config.sequence_len * 10
        self.compute_dtype = mx.float32
        self._cos, self._sin = self._precompute_rotary_embeddings(self.rotary_seq_len, head_dim)
        self._masks = {}

    def init_weights(self, dtype=mx.bfloat16):
        """Upstream's init, all weights in fp32 (the master copy). `dtype` is the compute dtype:
        embeddings are cast to it at use, and the rotary tables and window masks are stored in it."""
        d = self.config.n_embd
        s = 3**0.5 * d**-0.5  # uniform with the std of N(0, 1/d)

        def uniform(w):
            return mx.random.uniform(-s, s, w.shape)

        self.transformer.wte.weight = mx.random.normal(self.transformer.wte.weight.shape)
        self.lm_head.weight = 0.001 * mx.random.normal(self.lm_head.weight.shape)
        for block in self.transformer.h:
            block.attn.c_q.weight = uniform(block.attn.c_q.weight)
            block.attn.c_k.weight = uniform(block.attn.c_k.weight)
            block.attn.c_v.weight = uniform(block.attn.c_v.weight)
            block.attn.c_proj.weight = mx.zeros_like(block.attn.c_proj.weight)  # every block starts as the identity
            block.mlp.c_fc.weight = uniform(block.mlp.c_fc.weight)
            block.mlp.c_proj.weight = mx.zeros_like(block.mlp.c_proj.weight)
            if block.attn.ve_gate is not None:
                block.attn.ve_gate.weight = mx.zeros_like(block.attn.ve_gate.weight)  # 2*sigmoid(0) = 1: neutral gate
        self.resid_lambdas = mx.ones((self.config.n_layer,))
        self.x0_lambdas = mx.full((self.config.n_layer,), 0.1)
        for ve in self.value_embeds.values():
            ve.weight = uniform(ve.weight)
        cos, sin = self._precompute_rotary_embeddings(self.rotary_seq_len, d // self.config.n_head)
        self._cos, self._sin = cos.astype(dtype), sin.astype(dtype)
        self.compute_dtype = dtype
        # Built once here: inside mx.compile a lazily filled cache would capture traced arrays.
        T = self.config.sequence_len
        self._masks = {str(w): band_mask(T, w, dtype) for w in set(self.window_sizes) if w < T - 1}

    def _precompute_rotary_embeddings(self, seq_len, head_dim, base=10000):
        channel_range = mx.arange(0, head_dim, 2, dtype=mx.float32)
        inv_freq = 1.0 / (base ** (channel_range / head_dim))
        t = mx.arange(seq_len, dtype=mx.float32)
        freqs = mx.outer(t, inv_freq)
        return mx.cos(freqs)[None, :, None, :], mx.sin(freqs)[None, :, None, :]

    def _compute_window_sizes(self, config):
        pattern = config.window_pattern.upper()
        if not pattern or any(c not in "SL" for c in pattern):
            raise ValueError(f"WINDOW_PATTERN={config.window_pattern!r}: use only S (half context) and L (full)")
        long_window, short_window = config.sequence_len, config.sequence_len // 2
        windows = [long_window if pattern[i % len(pattern)] == "L" else short_window for i in range(config.n_layer)]
        windows[-1] = long_window  # the last layer always sees the whole context
        return windows

    def estimate_flops(self):
        """Estimated FLOPs per token (forward + backward): 6 per matmul weight plus attention."""
        nparams = sum(p.size for _, p in tree_flatten(self.parameters()))
        value_embeds_numel = sum(ve.weight.size for ve in self.value_embeds.values())
        nparams_exclude = (self.transformer.wte.weight.size + value_embeds_numel +
                           self.resid_lambdas.size + self.x0_lambdas.size)
        h, q, t = self.config.n_head, self.config.n_embd // self.config.n_head, self.config.sequence_len
        attn_flops = sum(12 * h * q * min(window, t) for window in self.window_sizes)
        return 6 * (nparams - nparams_exclude) + attn_flops

    def num_scaling_params(self):
        def numel(tree):
            return sum(p.size for _, p in tree_flatten(tree))
        wte = numel(self.transformer.wte.parameters())
        value_embeds = sum(numel(ve.parameters()) for ve in self.value_embeds.values())
        lm_head = numel(self.lm_head.parameters())
        transformer_matrices = sum(numel(block.parameters()) for block in self.transformer.h)
        scalars = self.resid_lambdas.size + self.x0_lambdas.size
        total = wte + value_embeds + lm_head + transformer_matrices + scalars
        return {"wte": wte, "value_embeds": value_embeds, "lm_head": lm_head,
                "transformer_matrices": transformer_matrices, "scalars": scalars, "total": total}

    def __call__(self, idx, targets=None, reduction="mean"):
        B, T = idx.shape
        assert T <= self._cos.shape[1], f"sequence length {T} exceeds the rotary table ({self._cos.shape[1]})"
        cos_sin = self._cos[:, :T], self._sin[:, :T]
        x = norm(self.transformer.wte(idx).astype(self.compute_dtype))
        x0 = x
        for i, block in enumerate(self.transformer.h):
            # fp32 scalars times a bf16 stream would silently promote the whole network to fp32
            x = self.resid_lambdas[i].astype(x.dtype) * x + self.x0_lambdas[i].astype(x.dtype) * x0
            ve = self.value_embeds[str(i)](idx).astype(x.dtype) if str(i) in self.value_embeds else None
            window = self.window_sizes[i]
            x = block(x, ve, cos_sin, window, self._masks.get(str(window)))
        x = norm(x)
        softcap = 15
        logits = self.lm_head(x).astype(mx.float32)
        logits = softcap * mx.tanh(logits / softcap)  # in float32
        if targets is None:
            return logits
        valid = targets != -1  # ignore_index=-1, as upstream
        losses = nn.losses.cross_entropy(logits, mx.where(valid, targets, 0)) * valid
        if reduction == "none":
            return losses
        return losses.sum() / mx.maximum(valid.sum(), 1)


def build_model_config(vocab_size, sequence_len, depth=DEPTH, aspect_ratio=ASPECT_RATIO,
                       head_dim=HEAD_DIM, window_pattern=WINDOW_PATTERN):
    model_dim = ((depth * aspect_ratio + head_dim - 1) // head_dim) * head_dim
    n_head = model_dim // head_dim
    return GPTConfig(sequence_len=sequence_len, vocab_size=vocab_size, n_layer=depth,
                     n_head=n_head, n_kv_head=n_head, n_embd=model_dim, window_pattern=window_pattern)


def build_model(config, dtype=mx.bfloat16):
    """Built lazily (nothing is computed until mx.eval, MLX's meta device), then initialised."""
    model = GPT(config)
    model.init_weights(dtype)
    mx.eval(model.state)
    return model

# ---------------------------------------------------------------------------
# Optimizer
# ---------------------------------------------------------------------------
# MuonAdamW: Muon (Polar Express + NorMuon + cautious WD) for the transformer matrices, AdamW for
# embeddings, head and scalars. The step is traced once by mx.compile, so every value a schedule
# changes lives in `optimizer.state` as an mx.array (a Python float would be baked into the graph).
# Functional: each step function returns new arrays instead of updating in place.

polar_express_coeffs = [
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
]


def polar_express(G, ns_steps=5, dtype=mx.float32):
    """Orthogonalise G (batched over leading dims): singular values -> ~1, singular vectors kept."""
    X = G.astype(dtype)
    X = X / (mx.linalg.norm(X, axis=(-2, -1), keepdims=True) * 1.02 + 1e-6)
    if G.shape[-2] > G.shape[-1]:  # tall: iterate on the smaller Gram matrix X^T X
        for a, b, c in polar_express_coeffs[:ns_steps]:
            A = X.swapaxes(-2, -1) @ X
            B = b * A + c * (A @ A)
            X = a * X + X @ B
    else:
        for a, b, c in polar_express_coeffs[:ns_steps]:
            A = X @ X.swapaxes(-2, -1)
            B = b * A + c * (A @ A)
            X = a * X + B @ X
    return X


def lerp(a, b, weight):
    return a + weight * (b - a)


def adamw_step(p, grad, exp_avg, exp_avg_sq, step, lr, beta1, beta2, eps, wd):
    p = p * (1 - lr * wd)
    exp_avg = lerp(exp_avg, grad, 1 - beta1)
    exp_avg_sq = lerp(exp_avg_sq, mx.square(grad), 1 - beta2)
    bias1 = 1 - beta1 ** step
    bias2 = 1 - beta2 ** step
    denom = mx.sqrt(exp_avg_sq / bias2) + eps
    p = p - (lr / bias1) * (exp_avg / denom)
    return p, exp_avg, exp_avg_sq


def muon_step(stacked_grads, stacked_params, momentum_buffer, second_momentum_buffer,
              momentum, lr, wd, beta2, ns_steps, red_dim, polar_dtype):
    # Nesterov momentum
    momentum_buffer = lerp(momentum_buffer, stacked_grads, 1 - momentum)
    g = lerp(stacked_grads, momentum_buffer, momentum)
    # Polar Express orthogonalization
    g = polar_express(g, ns_steps, polar_dtype)
    # NorMuon variance reduction: per-row (or per-column) second moment, total norm preserved
    v_mean = mx.square(g.astype(mx.float32)).mean(axis=red_dim, keepdims=True)
    red_dim_size = g.shape[red_dim]
    v_norm = mx.sqrt(v_mean.sum(axis=(-2, -1), keepdims=True) * red_dim_size)
    second_momentum_buffer = lerp(second_momentum_buffer, v_mean.astype(second_momentum_buffer.dtype), 1 - beta2)
    step_size = mx.rsqrt(mx.maximum(second_momentum_buffer, 1e-10))
    scaled_sq_sum = (v_mean * red_dim_size) * mx.square(step_size.astype(mx.float32))
    v_norm_new = mx.sqrt(scaled_sq_sum.sum(axis=(-2, -1), keepdims=True))
    final_scale = step_size * (v_norm / mx.maximum(v_norm_new, 1e-10))
    g = g * final_scale.astype(g.dtype)
    # Cautious weight decay (only where the update and the weight agree in sign) + update
    mask = (g * stacked_params) >= 0
    stacked_params = stacked_params - (lr * g + lr * wd * stacked_params * mask)
    return stacked_params, momentum_buffer, second_momentum_buffer


class MuonAdamW:
    """Combined optimizer: Muon for the 2-D transformer matrices (grouped by shape), AdamW for the rest.
    Param groups name parameters by their path in the model (e.g. "transformer.h.0.attn.c_q.weight")."""

    def __init__(self, model, param_groups, polar_dtype=mx.float32):
        self.param_groups = param_groups
        self.polar_dtype = polar_dtype
        params = dict(tree_flatten(model.trainable_parameters()))
        # Every buffer exists before the first step: mx.compile needs a fixed state structure.
        self.state = {"step": mx.array(0.0), "hyperparameters": {}, "buffers": {}}
        for i, group in enumerate(param_groups):
            if group["kind"] == "adamw":
                for name in group["params"]:
                    self.state["buffers"][name] = {"exp_avg": mx.zeros_like(params[name]),
                                                   "exp_avg_sq": mx.zeros_like(params[name])}
            else:  # state for the whole shape group, stacked
                n, shape = len(group["params"]), params[group["params"][0]].shape
                state_shape = (n, shape[-2], 1) if shape[-2] >= shape[-1] else (n, 1, shape[-1])
                self.state["buffers"][str(i)] = {"momentum_buffer": mx.zeros((n, *shape)),
                                                 "second_momentum_buffer": mx.zeros(state_shape)}
        self.load_hyperparameters()

    def load_hyperparameters(self):
        """Copy the groups' current lr / weight_decay / momentum (Python floats the schedules set)
        into the mx.arrays the compiled step reads. Call before each step."""
        for i, group in enumerate(self.param_groups):
            keys = ("lr", "weight_decay") + (("momentum",) if group["kind"] == "muon" else ())
            self.state["hyperparameters"][str(i)] = {k: mx.array(group[k], dtype=mx.float32) for k in keys}

    def _step_adamw(self, group, hp, params, grads, updated):
        for name in group["params"]:
            buf = self.state["buffers"][name]
            updated[name], buf["exp_avg"], buf["exp_avg_sq"] = adamw_step(
                params[name], grads[name], buf["exp_avg"], buf["exp_avg_sq"], self.state["step"], hp["lr"],
                group["betas"][0], group["betas"][1], group["eps"], hp["weight_decay"])

    def _step_muon(self, i, group, hp, params, grads, updated):
        names = group["params"]
        buf = self.state["buffers"][str(i)]
        shape = params[names[0]].shape
        red_dim = -1 if shape[-2] >= shape[-1] else -2
        stacked_grads = mx.stack([grads[name] for name in names])
        stacked_params = mx.stack([params[name] for name in names])
        stacked_params, buf["momentum_buffer"], buf["second_momentum_buffer"] = muon_step(
            stacked_grads, stacked_params, buf["momentum_buffer"], buf["second_momentum_buffer"],
            hp["momentum"], hp["lr"] * max(1.0, shape[-2] / shape[-1]) ** 0.5, hp["weight_decay"],
            group["beta2"], group["ns_steps"], red_dim, self.polar_dtype)
        for j, name in enumerate(names):
            updated[name] = stacked_params[j]

    def update(self, model, grads):
        """One optimizer step: new parameters into `model`, new buffers into `self.state`."""
        params = dict(tree_flatten(model.trainable_parameters()))
        grads = dict(tree_flatten(grads))
        self.state["step"] = self.state["step"] + 1
        updated = {}
        for i, group in enumerate(self.param_groups):
            hp = self.state["hyperparameters"][str(i)]
            if group["kind"] == "adamw":
                self._step_adamw(group, hp, params, grads, updated)
            else:
                self._step_muon(i, group, hp, params, grads, updated)
        # by path, not tree_unflatten: that would turn value_embeds {"1": ...} into a list
        model.update(tree_map_with_path(lambda path, p: updated.get(path, p), model.trainable_parameters()))


def setup_optimizer(model, polar_dtype=mx.float32, unembedding_lr=UNEMBEDDING_LR,
                    embedding_lr=EMBEDDING_LR, matrix_lr=MATRIX_LR, weight_decay=WEIGHT_DECAY,
                    adam_betas=ADAM_BETAS, scalar_lr=SCALAR_LR):
    model_dim = model.config.n_embd
    params = dict(tree_flatten(model.trainable_parameters()))

    def under(prefix):
        return [name for name in params if name == prefix or name.startswith(prefix + ".")]

    matrix_params = under("transformer.h")
    value_embeds_params = under("value_embeds")
    embedding_params = under("transformer.wte")
    lm_head_params = under("lm_head")
    resid_params, x0_params = ["resid_lambdas"], ["x0_lambdas"]
    assert len(params) == (len(matrix_params) + len(embedding_params) + len(lm_head_params)
                           + len(value_embeds_params) + len(resid_params) + len(x0_params))
    # AdamW LRs scale as 1/sqrt(d_model): they were tuned at 768
    dmodel_lr_scale = (model_dim / 768) ** -0.5
    print(f"Scaling AdamW LRs by 1/sqrt({model_dim}/768) = {dmodel_lr_scale:.6f}")
    adamw = dict(kind="adamw", betas=adam_betas, eps=1e-10, weight_decay=0.0)
    param_groups = [
        dict(adamw, params=lm_head_params, lr=unembedding_lr * dmodel_lr_scale),
        dict(adamw, params=embedding_params, lr=embedding_lr * dmodel_lr_scale),
        dict(adamw, params=value_embeds_params, lr=embedding_lr * dmodel_lr_scale),
        dict(adamw, params=resid_params, lr=scalar_lr * 0.01),
        dict(adamw, params=x0_params, lr=scalar_lr, betas=(0.96, 0.95)),
    ]
    for shape in sorted({params[name].shape for name in matrix_params}):  # Muon stacks one group per shape
        param_groups.append(dict(kind="muon", params=[name for name in matrix_params if params[name].shape == shape],
                                 lr=matrix_lr, momentum=0.95, ns_steps=5, beta2=0.95, weight_decay=weight_decay))
    optimizer = MuonAdamW(model, param_groups, polar_dtype=polar_dtype)
    for group in optimizer.param_groups:
        group["initial_lr"] = group["lr"]
    return optimizer

# ---------------------------------------------------------------------------
# Schedules
# ---------------------------------------------------------------------------
# LR and weight decay follow the fraction of the time budget spent (ctx.budget.progress), so a run
# anneals fully whatever the hardware's speed; the Muon momentum warm-up counts steps.

def get_lr_multiplier(progress):
    if progress < WARMUP_RATIO:
        return progress / WARMUP_RATIO if WARMUP_RATIO > 0 else 1.0
    if progress < 1.0 - WARMDOWN_RATIO:
        return 1.0
    cooldown = (1.0 - progress) / WARMDOWN_RATIO
    return cooldown * 1.0 + (1 - cooldown) * FINAL_LR_FRAC


def get_muon_momentum(step):
    frac = min(step / 300, 1)
    return (1 - frac) * 0.85 + frac * 0.95


def get_weight_decay(progress):
    return WEIGHT_DECAY * (1 - progress)


def apply_schedules(optimizer, step, progress):
    lrm = get_lr_multiplier(progress)
    for group in optimizer.param_groups:
        group["lr"] = group["initial_lr"] * lrm
        if group["kind"] == "muon":
            group["momentum"] = get_muon_momentum(step)
            group["weight_decay"] = get_weight_decay(progress)
    optimizer.load_hyperparameters()
    return lrm

# ---------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------

def build_train_step(model, optimizer, grad_accum_steps, compiled=False):
    """step(x, y, grads, update) -> (loss, grads): one micro-batch's forward and backward, its
    gradients added to `grads`; on the last micro-batch (`update`) the optimizer step, grads None.
    Compiled with the model and optimizer state as inputs and outputs (mlx-lm's idiom)."""
    loss_and_grad = nn.value_and_grad(model, lambda x, y: model(x, y))

    def step(x, y, grads, update):
        loss, micro_grads = loss_and_grad(x, y)
        grads = micro_grads if grads is None else tree_map(mx.add, grads, micro_grads)
        if update:
            if grad_accum_steps > 1:
                grads = tree_map(lambda g: g / grad_accum_steps, grads)
            optimizer.update(model, grads)
            grads = None
        return loss, grads

    state = [model.state, optimizer.state]
    return mx.compile(step, inputs=state, outputs=state) if compiled else step


def main() -> None:
    ctx = load_context()
    plat = detect_platform(ctx.device)
    mx.random.seed(SEED)
    T = ctx.MAX_SEQ_LEN
    print(f"Vocab size: {ctx.vocab_size:,}")

    config = build_model_config(ctx.vocab_size, T)
    print(f"Model config: {asdict(config)}")
    model = build_model(config, plat.dtype)
    param_counts = model.num_scaling_params()
    print("Parameter counts:")
    for key, value in param_counts.items():
        print(f"  {key:24s}: {value:,}")
    num_flops_per_token = model.estimate_flops()
    print(f"Estimated FLOPs per token: {num_flops_per_token:e}")

    # A seam for an out-of-memory ladder: everything below depends on this one local.
    device_batch_size = DEVICE_BATCH_SIZE
    tokens_per_fwdbwd = device_batch_size * T
    if TOTAL_BATCH_SIZE % tokens_per_fwdbwd:
        raise SystemExit(f"TOTAL_BATCH_SIZE ({TOTAL_BATCH_SIZE}) must be a multiple of DEVICE_BATCH_SIZE * "
                         f"MAX_SEQ_LEN ({device_batch_size} * {T} = {tokens_per_fwdbwd}): change one of the two")
    grad_accum_steps = TOTAL_BATCH_SIZE // tokens_per_fwdbwd

    optimizer = setup_optimizer(model, polar_dtype=plat.polar_dtype)
    train_step = build_train_step(model, optimizer, grad_accum_steps, compiled=plat.compile)

    batches = ctx.train_batches(device_batch_size)

    def next_batch():
        x, y = next(batches)
        return mx.array(x), mx.array(y)

    x, y = next_batch()  # prefetch the first batch
    budget = ctx.budget
    budget.untimed_steps = 2 if plat.compile else 1  # mx.compile traces on the first call; nothing else to warm
    peak = peak_flops(plat.device_name)
    print(f"Time budget: {ctx.TIME_BUDGET}s")
    print(f"Gradient accumulation steps: {grad_accum_steps}")

    smooth_train_loss = 0.0
    step = 0
    while not budget.done:
        budget.start_step()
        progress = budget.progress
        lrm = apply_schedules(optimizer, step, progress)
        grads = None
        for micro_step in range(grad_accum_steps):
            loss, grads = train_step(x, y, grads, micro_step == grad_accum_steps - 1)
            # MLX is lazy: this eval runs the step (once per micro-batch, so only one micro-batch's
            # activations are ever alive) and must come before the clock stops.
            mx.eval(loss, grads, model.state, optimizer.state)
            x, y = next_batch()
        train_loss_f = loss.item()
        ctx.check_loss(train_loss_f)  # NaN or > 100: prints FAIL and exits at once
        dt = budget.end_step(TOTAL_BATCH_SIZE, loss=train_loss_f, lrm=lrm)

        ema_beta = 0.9
        smooth_train_loss = ema_beta * smooth_train_loss + (1 - ema_beta) * train_loss_f
        debiased_smooth_loss = smooth_train_loss / (1 - ema_beta ** (step + 1))
        tok_per_sec = int(TOTAL_BATCH_SIZE / dt) if dt > 0 else 0
        mfu = f" | mfu: {100 * num_flops_per_token * tok_per_sec / peak:.1f}%" if peak else ""
        print(f"\rstep {step:05d} ({100 * progress:.1f}%) | loss: {debiased_smooth_loss:.6f} | lrm: {lrm:.2f} | "
              f"dt: {dt * 1000:.0f}ms | tok/sec: {tok_per_sec:,}{mfu} | remaining: {budget.remaining_seconds:.0f}s    ",
              end="", flush=True)

        # Python's GC causes ~500 ms stalls: collect once, freeze what survived, then stay out of the way
        if step == 0:
            gc.collect()
            gc.freeze()
            gc.disable()
        elif (step + 1) % 5000 == 0:
            gc.collect()
        step += 1
    print()  # end the \r progress line

    # The harness exports this forward (mx.export_function, the evaluator's fixed batch shape) for its
    # evaluator, a separate process that feeds it int32 mx.arrays.
    def forward(inputs):
        return model(mx.array(inputs))

    ctx.finish(forward, framework="mlx", num_params=param_counts["total"], flops_per_token=num_flops_per_token,
               depth=DEPTH, device_name=plat.device_name, peak_memory_mb=plat.peak_memory_mb)


if __name__ == "__main__":
    main()
