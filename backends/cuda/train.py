"""
Reference trainer: upstream autoresearch's GPT + MuonAdamW (cherry-picked from nanochat), single
device, single file. Runs on CUDA as upstream does and, for tests and laptops, on CPU.
Usage: python backends/cuda/train.py   (or `autoresearch run`, which adds a hard timeout)

The harness owns the data, the clock and the score: this file trains while `ctx.budget` allows and
hands `ctx.finish` a forward function (inputs -> logits); it never computes or prints val_bpb.
"""

import os
os.environ.setdefault("PYTORCH_ALLOC_CONF", "expandable_segments:True")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

import functools
import gc
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

# The harness of *this* checkout, even when another checkout is pip-installed in editable mode.
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from harness.scoring.context import load_context  # noqa: E402
from harness.hardware.flops import peak_flops  # noqa: E402
from harness.hardware.platform import (  # noqa: E402
    check_batch_sizes, choose_attention, choose_compile, choose_dtype, choose_window_attention, free_device_memory,
    probe_compile, probe_flex_windows, process_peak_rss_mb, run_with_oom_ladder, torch_facts,
)

# ---------------------------------------------------------------------------
# Hyperparameters (edit these directly)
# ---------------------------------------------------------------------------
# MAX_SEQ_LEN, TIME_BUDGET and the vocab size come from the harness (frozen per session).

ASPECT_RATIO = 64  # model_dim = DEPTH * ASPECT_RATIO, rounded up to a multiple of HEAD_DIM
HEAD_DIM = 128  # target head dimension for attention
WINDOW_PATTERN = "SSSL"  # tiled over layers: L = full context, S = half context; last layer is always L
TOTAL_BATCH_SIZE = 2**19  # tokens per optimizer step
EMBEDDING_LR = 0.6  # Adam, token and value embeddings
UNEMBEDDING_LR = 0.004  # Adam, lm_head
MATRIX_LR = 0.04  # Muon, all transformer matrices
SCALAR_LR = 0.5  # Adam, per-layer residual scalars
WEIGHT_DECAY = 0.2  # cautious weight decay for Muon, decayed linearly to 0
ADAM_BETAS = (0.8, 0.95)  # Adam beta1, beta2
WARMUP_RATIO = 0.0  # fraction of the time budget for LR warmup
WARMDOWN_RATIO = 0.5  # fraction of the time budget for LR warmdown
FINAL_LR_FRAC = 0.0  # final LR as a fraction of the initial LR
DEPTH = 8  # number of transformer layers
DEVICE_BATCH_SIZE = 128  # rows per micro-batch; reduce if out of memory (TOTAL_BATCH_SIZE is kept by accumulation)
SEED = 42  # torch RNG seed (init); data order is fixed by the harness

# ---------------------------------------------------------------------------
# Platform
# ---------------------------------------------------------------------------
# Every automatic choice is made by the frozen harness.hardware.platform from the hardware facts (so the
# fall-backs are tested on any machine) and comes with its reason; detect_platform() prints each once.
# Overrides: AUTORESEARCH_COMPILE=0/1 forces torch.compile off/on, AUTORESEARCH_DTYPE=bf16/fp32 the dtype.

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


@dataclass(frozen=True)
class Platform:
    device: torch.device
    dtype: torch.dtype  # compute dtype: bf16 under autocast, or fp32 with autocast off
    compile: bool
    flash_attn: Any  # a verified FlashKernel (FA3 or FA4, harness.hardware.platform), or None for SDPA
    flex_windows: bool  # sliding windows through compiled flex_attention instead of an SDPA mask
    device_name: str  # for MFU (harness.hardware.flops matches it against its peak table)

    @property
    def polar_dtype(self) -> torch.dtype:
        # Polar Express in bf16 on GPUs (tensor cores, as upstream); fp32 on CPU, where bf16 matmul is no win
        return torch.bfloat16 if self.device.type == "cuda" and self.dtype == torch.bfloat16 else torch.float32

    def autocast(self):
        return torch.amp.autocast(device_type=self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32)

    def synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def free_memory(self) -> None:
        free_device_memory(self.device.type)

    def peak_memory_mb(self) -> float | None:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated() / 1024 / 1024
        return process_peak_rss_mb()  # whole process on CPU; the nearest thing to "VRAM" there


def detect_platform(requested: str) -> Platform:
    device = torch.device(requested)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"device {requested!r} requested but torch.cuda.is_available() is False: "
                         "install a CUDA build of torch, or set AUTORESEARCH_DEVICE=cpu")
    if device.type not in ("cuda", "cpu"):
        raise SystemExit(f"device {requested!r} is not supported by this trainer: use backends/mps or backends/rocm")
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)  # so synchronize() and memory stats follow cuda:N
    facts = torch_facts(str(device))
    dtype_name, dtype_why = choose_dtype(facts)
    compile_on, compile_why = choose_compile(facts, lambda: probe_compile(str(device)))
    fa3, attn_why = choose_attention(facts, dtype_name, str(device))
    flex, flex_why = choose_window_attention(facts, compile_on, fa3 is not None,
                                             lambda: probe_flex_windows(str(device), dtype_name))
    print(f"Device: {device} ({facts.device_name}{', ROCm' if facts.is_hip else ''}; {facts.host})")
    print(f"  dtype:     {'bf16 autocast' if dtype_name == 'bf16' else 'fp32'}: {dtype_why}")
    print(f"  compile:   {'on' if compile_on else 'off (eager)'}: {compile_why}")
    print(f"  attention: {fa3.name if fa3 is not None else 'SDPA'}: {attn_why}")
    print(f"  windows:   {'flex_attention' if flex else fa3.name if fa3 is not None else 'SDPA mask'}: {flex_why}")
    return Platform(device=device, dtype=DTYPES[dtype_name], compile=compile_on, flash_attn=fa3,
                    flex_windows=flex, device_name=facts.device_name)

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
    return F.rms_norm(x, (x.size(-1),))  # parameter-free RMSNorm


def has_ve(layer_idx, n_layer):
    """Value embeddings on alternating layers, the last one always included."""
    return layer_idx % 2 == (n_layer - 1) % 2


def apply_rotary_emb(x, cos, sin):
    d = x.shape[3] // 2
    x1, x2 = x[..., :d], x[..., d:]
    y1 = x1 * cos + x2 * sin
    y2 = x1 * (-sin) + x2 * cos
    return torch.cat([y1, y2], 3)


def _band_mask(T, window, device):
    i = torch.arange(T, device=device)
    d = i[:, None] - i[None, :]  # query minus key position
    return (d >= 0) & (d <= window)  # FA3's window_size=(window, 0): keys [i - window, i]


_cached_band_mask = functools.lru_cache(maxsize=32)(_band_mask)


def band_mask(T, window, device):
    """Boolean (T, T) sliding-window causal mask, cached per (T, window, device) in eager mode;
    under torch.compile it is traced into the graph instead (no Python cache to guard on).
    (flex_attention would be cheaper but has no backward on CPU.)"""
    if torch.compiler.is_compiling():
        return _band_mask(T, window, device)
    return _cached_band_mask(T, window, device)


def sliding_window_block_mask(T, window, device):
    """flex_attention block mask for keys [i - window, i]: compiled kernels skip whole blocks outside it."""
    from torch.nn.attention.flex_attention import create_block_mask
    return create_block_mask(lambda b, h, q, k: (q >= k) & (q - k <= window), B=None, H=None,
                             Q_LEN=T, KV_LEN=T, device=device)


def attention(q, k, v, window, fa3=None, block_mask=None):
    """Causal attention on (B, T, H, D) tensors where query i sees keys [i - window, i]."""
    if fa3 is not None:  # a verified FlashKernel: FA3 or FA4, the same call
        y = fa3.flash_attn_func(q, k, v, causal=True, window_size=(window, 0))
        return y[0] if isinstance(y, tuple) else y  # FA4 also returns the log-sum-exp
    T = q.size(1)
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    gqa = k.size(1) < q.size(1)
    if window >= T - 1:  # the window covers the whole context: plain causal (flash-capable) SDPA
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    elif block_mask is not None and torch.compiler.is_compiling():  # eager flex is slow: eval uses the mask
        from torch.nn.attention.flex_attention import flex_attention
        y = flex_attention(q, k, v, block_mask=block_mask, enable_gqa=gqa)
    else:
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=band_mask(T, window, q.device), enable_gqa=gqa)
    return y.transpose(1, 2)


class CausalSelfAttention(nn.Module):
    def __init__(self, config, layer_idx, fa3=None):
        super().__init__()
        self.n_head = config.n_head
        self.n_kv_head = config.n_kv_head
        self.n_embd = config.n_embd
        self.head_dim = self.n_embd // self.n_head
        assert self.n_embd % self.n_head == 0
        assert self.n_kv_head <= self.n_head and self.n_head % self.n_kv_head == 0
        self.fa3 = fa3
        self.c_q = nn.Linear(self.n_embd, self.n_head * self.head_dim, bias=False)
        self.c_k = nn.Linear(self.n_embd, self.n_kv_head * self.head_dim, bias=False)
        self.c_v = nn.Linear(self.n_embd, self.n_kv_head * self.head_dim, bias=False)
        self.c_proj = nn.Linear(self.n_embd, self.n_embd, bias=False)
        self.ve_gate_channels = 32
        self.ve_gate = nn.Linear(self.ve_gate_channels, self.n_kv_head, bias=False) if has_ve(layer_idx, config.n_layer) else None

    def forward(self, x, ve, cos_sin, window, block_mask=None):
        B, T, C = x.size()
        q = self.c_q(x).view(B, T, self.n_head, self.head_dim)
        k = self.c_k(x).view(B, T, self.n_kv_head, self.head_dim)
        v = self.c_v(x).view(B, T, self.n_kv_head, self.head_dim)
        # Value residual (ResFormer): mix in the value embedding with an input-dependent gate per kv head
        if ve is not None:
            ve = ve.view(B, T, self.n_kv_head, self.head_dim)
            gate = 2 * torch.sigmoid(self.ve_gate(x[..., :self.ve_gate_channels]))
            v = v + gate.unsqueeze(-1) * ve
        cos, sin = cos_sin
        q, k = apply_rotary_emb(q, cos, sin), apply_rotary_emb(k, cos, sin)
        q, k = norm(q), norm(k)  # QK-norm
        y = attention(q, k, v, window, self.fa3, block_mask)
        return self.c_proj(y.contiguous().view(B, T, -1))


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=False)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=False)

    def forward(self, x):
        return self.c_proj(F.relu(self.c_fc(x)).square())  # ReLU^2


class Block(nn.Module):
    def __init__(self, config, layer_idx, fa3=None):
        super().__init__()
        self.attn = CausalSelfAttention(config, layer_idx, fa3)
        self.mlp = MLP(config)

    def forward(self, x, ve, cos_sin, window, block_mask=None):
        x = x + self.attn(norm(x), ve, cos_sin, window, block_mask)
        x = x + self.mlp(norm(x))
        return x


class GPT(nn.Module):
    def __init__(self, config, fa3=None):
        super().__init__()
        self.config = config
        self.window_sizes = self._compute_window_sizes(config)
        self.block_masks = {}  # window -> flex_attention block mask, filled when flex windows are used
        self.transformer = nn.ModuleDict({
            "wte": nn.Embedding(config.vocab_size, config.n_embd),
            "h": nn.ModuleList([Block(config, i, fa3) for i in range(config.n_layer)]),
        })
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)  # untied
        self.resid_lambdas = nn.Parameter(torch.ones(config.n_layer))
        self.x0_lambdas = nn.Parameter(torch.zeros(config.n_layer))
        head_dim = config.n_embd // config.n_head
        kv_dim = config.n_kv_head * head_dim
        self.value_embeds = nn.ModuleDict({
            str(i): nn.Embedding(config.vocab_size, kv_dim)
            for i in range(config.n_layer) if has_ve(i, config.n_layer)
        })
        # 10x headroom over the training context, as upstream; recomputed for real in init_weights
        self.rotary_seq_len = config.sequence_len * 10
        cos, sin = self._precompute_rotary_embeddings(self.rotary_seq_len, head_dim)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    @torch.no_grad()
    def init_weights(self, dtype=torch.bfloat16):
        """Upstream's init. `dtype` is the compute dtype: embeddings and rotary tables are stored in
        it (bf16 under autocast, as upstream; fp32 when training in fp32)."""
        torch.nn.init.normal_(self.transformer.wte.weight, mean=0.0, std=1.0)
        torch.nn.init.normal_(self.lm_head.weight, mean=0.0, std=0.001)
        s = 3**0.5 * self.config.n_embd**-0.5  # uniform with the std of N(0, 1/d)
        for block in self.transformer.h:
            torch.nn.init.uniform_(block.attn.c_q.weight, -s, s)
            torch.nn.init.uniform_(block.attn.c_k.weight, -s, s)
            torch.nn.init.uniform_(block.attn.c_v.weight, -s, s)
            torch.nn.init.zeros_(block.attn.c_proj.weight)  # every block starts as the identity
            torch.nn.init.uniform_(block.mlp.c_fc.weight, -s, s)
            torch.nn.init.zeros_(block.mlp.c_proj.weight)
            if block.attn.ve_gate is not None:
                torch.nn.init.zeros_(block.attn.ve_gate.weight)  # 2*sigmoid(0) = 1: neutral gate
        self.resid_lambdas.fill_(1.0)
        self.x0_lambdas.fill_(0.1)
        for ve in self.value_embeds.values():
            torch.nn.init.uniform_(ve.weight, -s, s)
        cos, sin = self._precompute_rotary_embeddings(self.rotary_seq_len, self.config.n_embd // self.config.n_head)
        self.cos, self.sin = cos.to(dtype), sin.to(dtype)
        self.transformer.wte.to(dtype=dtype)
        for ve in self.value_embeds.values():
            ve.to(dtype=dtype)

    def _precompute_rotary_embeddings(self, seq_len, head_dim, base=10000):
        device = self.transformer.wte.weight.device
        channel_range = torch.arange(0, head_dim, 2, dtype=torch.float32, device=device)
        inv_freq = 1.0 / (base ** (channel_range / head_dim))
        t = torch.arange(seq_len, dtype=torch.float32, device=device)
        freqs = torch.outer(t, inv_freq)
        return freqs.cos()[None, :, None, :], freqs.sin()[None, :, None, :]

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
        nparams = sum(p.numel() for p in self.parameters())
        value_embeds_numel = sum(ve.weight.numel() for ve in self.value_embeds.values())
        nparams_exclude = (self.transformer.wte.weight.numel() + value_embeds_numel +
                           self.resid_lambdas.numel() + self.x0_lambdas.numel())
        h, q, t = self.config.n_head, self.config.n_embd // self.config.n_head, self.config.sequence_len
        attn_flops = sum(12 * h * q * min(window, t) for window in self.window_sizes)
        return 6 * (nparams - nparams_exclude) + attn_flops

    def num_scaling_params(self):
        wte = sum(p.numel() for p in self.transformer.wte.parameters())
        value_embeds = sum(p.numel() for p in self.value_embeds.parameters())
        lm_head = sum(p.numel() for p in self.lm_head.parameters())
        transformer_matrices = sum(p.numel() for p in self.transformer.h.parameters())
        scalars = self.resid_lambdas.numel() + self.x0_lambdas.numel()
        total = wte + value_embeds + lm_head + transformer_matrices + scalars
        return {"wte": wte, "value_embeds": value_embeds, "lm_head": lm_head,
                "transformer_matrices": transformer_matrices, "scalars": scalars, "total": total}

    def forward(self, idx, targets=None, reduction="mean"):
        B, T = idx.size()
        assert T <= self.cos.size(1), f"sequence length {T} exceeds the rotary table ({self.cos.size(1)})"
        cos_sin = self.cos[:, :T], self.sin[:, :T]
        x = norm(self.transformer.wte(idx))
        x0 = x
        for i, block in enumerate(self.transformer.h):
            x = self.resid_lambdas[i] * x + self.x0_lambdas[i] * x0
            ve = self.value_embeds[str(i)](idx) if str(i) in self.value_embeds else None
            window = self.window_sizes[i]
            x = block(x, ve, cos_sin, window, self.block_masks.get(window))
        x = norm(x)
        softcap = 15
        logits = self.lm_head(x).float()
        logits = softcap * torch.tanh(logits / softcap)  # in float32
        if targets is None:
            return logits
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1, reduction=reduction)


def build_model_config(vocab_size, sequence_len, depth=DEPTH, aspect_ratio=ASPECT_RATIO,
                       head_dim=HEAD_DIM, window_pattern=WINDOW_PATTERN):
    model_dim = ((depth * aspect_ratio + head_dim - 1) // head_dim) * head_dim
    n_head = model_dim // head_dim
    return GPTConfig(sequence_len=sequence_len, vocab_size=vocab_size, n_layer=depth,
                     n_head=n_head, n_kv_head=n_head, n_embd=model_dim, window_pattern=window_pattern)


def build_model(config, device, dtype=torch.bfloat16, fa3=None):
    """Built on the meta device (no allocation, no wasted init), then materialised and initialised."""
    with torch.device("meta"):
        model = GPT(config, fa3)
    model.to_empty(device=device)
    model.init_weights(dtype)
    return model

# ---------------------------------------------------------------------------
# Optimizer
# ---------------------------------------------------------------------------
# MuonAdamW: Muon (Polar Express + NorMuon + cautious WD) for the transformer matrices, AdamW for
# embeddings, head and scalars. Both step functions are compiled when compile is on; hyperparameters
# are then 0-D CPU tensors (a new Python float would trigger a recompile). Eager steps get plain
# floats, which also avoids cross-device errors on backends that reject CPU scalar tensors.

polar_express_coeffs = [
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
]


def _as(x, dtype):
    """A hyperparameter in `dtype`: 0-D tensors are cast, Python floats pass through."""
    return x.to(dtype) if isinstance(x, torch.Tensor) else x


def polar_express(G, ns_steps=5, dtype=torch.bfloat16):
    """Orthogonalise G (batched over leading dims): singular values -> ~1, singular vectors kept."""
    X = G.to(dtype)
    X = X / (X.norm(dim=(-2, -1), keepdim=True) * 1.02 + 1e-6)
    if G.size(-2) > G.size(-1):  # tall: iterate on the smaller Gram matrix X^T X
        for a, b, c in polar_express_coeffs[:ns_steps]:
            A = X.mT @ X
            B = b * A + c * (A @ A)
            X = a * X + X @ B
    else:
        for a, b, c in polar_express_coeffs[:ns_steps]:
            A = X @ X.mT
            B = b * A + c * (A @ A)
            X = a * X + B @ X
    return X


def adamw_step(p, grad, exp_avg, exp_avg_sq, step, lr, beta1, beta2, eps, wd):
    p.mul_(1 - lr * wd)
    exp_avg.lerp_(grad, 1 - beta1)
    exp_avg_sq.lerp_(grad.square(), 1 - beta2)
    bias1 = 1 - beta1 ** step
    bias2 = 1 - beta2 ** step
    denom = (exp_avg_sq / bias2).sqrt() + eps
    p.sub_((lr / bias1) * (exp_avg / denom))


def muon_step(stacked_grads, stacked_params, momentum_buffer, second_momentum_buffer,
              momentum, lr, wd, beta2, ns_steps, red_dim, polar_dtype):
    # Nesterov momentum
    momentum = _as(momentum, stacked_grads.dtype)
    momentum_buffer.lerp_(stacked_grads, 1 - momentum)
    g = stacked_grads.lerp_(momentum_buffer, momentum)
    # Polar Express orthogonalization
    g = polar_express(g, ns_steps, polar_dtype)
    # NorMuon variance reduction: per-row (or per-column) second moment, total norm preserved
    beta2 = _as(beta2, g.dtype)
    v_mean = g.float().square().mean(dim=red_dim, keepdim=True)
    red_dim_size = g.size(red_dim)
    v_norm = (v_mean.sum(dim=(-2, -1), keepdim=True) * red_dim_size).sqrt()
    second_momentum_buffer.lerp_(v_mean.to(dtype=second_momentum_buffer.dtype), 1 - beta2)
    step_size = second_momentum_buffer.clamp_min(1e-10).rsqrt()
    scaled_sq_sum = (v_mean * red_dim_size) * step_size.float().square()
    v_norm_new = scaled_sq_sum.sum(dim=(-2, -1), keepdim=True).sqrt()
    final_scale = step_size * (v_norm / v_norm_new.clamp_min(1e-10))
    g = g * final_scale.to(g.dtype)
    # Cautious weight decay (only where the update and the weight agree in sign) + update
    lr, wd = _as(lr, g.dtype), _as(wd, g.dtype)
    mask = (g * stacked_params) >= 0
    stacked_params.sub_(lr * g + lr * wd * stacked_params * mask)


class MuonAdamW(torch.optim.Optimizer):
    """Combined optimizer: Muon for the 2-D transformer matrices (grouped by shape), AdamW for the rest."""

    def __init__(self, param_groups, compiled=False, polar_dtype=torch.bfloat16):
        super().__init__(param_groups, defaults={})
        self.compiled = compiled
        self.polar_dtype = polar_dtype
        compile_step = functools.partial(torch.compile, dynamic=False, fullgraph=True)
        self._adamw_step = compile_step(adamw_step) if compiled else adamw_step
        self._muon_step = compile_step(muon_step) if compiled else muon_step
        self._scalars = {}

    def _hp(self, name, value):
        """A hyperparameter as the step function wants it: a reused 0-D CPU tensor when compiled."""
        if not self.compiled:
            return float(value)
        t = self._scalars.get(name)
        if t is None:
            t = self._scalars[name] = torch.tensor(0.0, dtype=torch.float32, device="cpu")
        t.fill_(value)
        return t

    def _step_adamw(self, group):
        for p in group["params"]:
            if p.grad is None:
                continue
            state = self.state[p]
            if not state:
                state["step"] = 0
                state["exp_avg"] = torch.zeros_like(p)
                state["exp_avg_sq"] = torch.zeros_like(p)
            state["step"] += 1
            self._adamw_step(p, p.grad, state["exp_avg"], state["exp_avg_sq"],
                             self._hp("adamw_step", state["step"]), self._hp("adamw_lr", group["lr"]),
                             self._hp("adamw_beta1", group["betas"][0]), self._hp("adamw_beta2", group["betas"][1]),
                             self._hp("adamw_eps", group["eps"]), self._hp("adamw_wd", group["weight_decay"]))

    def _step_muon(self, group):
        params = [p for p in group["params"] if p.grad is not None]
        if not params:
            return
        p = params[0]
        state = self.state[p]  # state for the whole shape group lives on its first parameter
        shape = p.shape
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros(len(params), *shape, dtype=p.dtype, device=p.device)
            state_shape = (len(params), shape[-2], 1) if shape[-2] >= shape[-1] else (len(params), 1, shape[-1])
            state["second_momentum_buffer"] = torch.zeros(state_shape, dtype=p.dtype, device=p.device)
        red_dim = -1 if shape[-2] >= shape[-1] else -2
        stacked_grads = torch.stack([p.grad for p in params])
        stacked_params = torch.stack(params)
        self._muon_step(stacked_grads, stacked_params, state["momentum_buffer"], state["second_momentum_buffer"],
                        self._hp("muon_momentum", group["momentum"]),
                        self._hp("muon_lr", group["lr"] * max(1.0, shape[-2] / shape[-1]) ** 0.5),
                        self._hp("muon_wd", group["weight_decay"]), self._hp("muon_beta2", group["beta2"]),
                        group["ns_steps"], red_dim, self.polar_dtype)
        torch._foreach_copy_(params, list(stacked_params.unbind(0)))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            if group["kind"] == "adamw":
                self._step_adamw(group)
            else:
                self._step_muon(group)


def setup_optimizer(model, compiled=False, polar_dtype=torch.bfloat16, unembedding_lr=UNEMBEDDING_LR,
                    embedding_lr=EMBEDDING_LR, matrix_lr=MATRIX_LR, weight_decay=WEIGHT_DECAY,
                    adam_betas=ADAM_BETAS, scalar_lr=SCALAR_LR):
    model_dim = model.config.n_embd
    matrix_params = list(model.transformer.h.parameters())
    value_embeds_params = list(model.value_embeds.parameters())
    embedding_params = list(model.transformer.wte.parameters())
    lm_head_params = list(model.lm_head.parameters())
    resid_params, x0_params = [model.resid_lambdas], [model.x0_lambdas]
    assert len(list(model.parameters())) == (len(matrix_params) + len(embedding_params) + len(lm_head_params)
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
    for shape in sorted({p.shape for p in matrix_params}):  # Muon stacks one group per shape
        param_groups.append(dict(kind="muon", params=[p for p in matrix_params if p.shape == shape],
                                 lr=matrix_lr, momentum=0.95, ns_steps=5, beta2=0.95, weight_decay=weight_decay))
    optimizer = MuonAdamW(param_groups, compiled=compiled, polar_dtype=polar_dtype)
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
    return lrm

# ---------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------

def main() -> None:
    ctx = load_context()
    if ctx.device.startswith("cuda"):
        torch.set_float32_matmul_precision("high")  # TF32 for the few fp32 matmuls (before the compile probe)
    plat = detect_platform(ctx.device)
    torch.manual_seed(SEED)
    T = ctx.MAX_SEQ_LEN
    print(f"Vocab size: {ctx.vocab_size:,}")

    config = build_model_config(ctx.vocab_size, T)
    print(f"Model config: {asdict(config)}")
    model = build_model(config, plat.device, plat.dtype, plat.flash_attn)
    if plat.flex_windows:
        model.block_masks = {w: sliding_window_block_mask(T, w, plat.device) for w in set(model.window_sizes) if w < T - 1}
    elif plat.flash_attn is None and plat.device.type == "cuda" and any(w < T - 1 for w in model.window_sizes):
        print(f'WARNING: sliding windows through SDPA use an explicit mask, which costs more than FA3; '
              f'WINDOW_PATTERN = "L" is faster here (now {WINDOW_PATTERN!r})')
    param_counts = model.num_scaling_params()
    print("Parameter counts:")
    for key, value in param_counts.items():
        print(f"  {key:24s}: {value:,}")
    num_flops_per_token = model.estimate_flops()
    print(f"Estimated FLOPs per token: {num_flops_per_token:e}")

    try:
        check_batch_sizes(DEVICE_BATCH_SIZE, TOTAL_BATCH_SIZE, T)
    except ValueError as e:
        raise SystemExit(str(e))
    optimizer = setup_optimizer(model, compiled=plat.compile, polar_dtype=plat.polar_dtype)
    train_model = torch.compile(model, dynamic=False) if plat.compile else model

    cuda = plat.device.type == "cuda"

    def to_device(a):
        t = torch.from_numpy(a)
        if cuda:
            t = t.pin_memory().to(plat.device, non_blocking=True)
        return t.long()

    def next_batch(batches):
        x, y = next(batches)
        return to_device(x), to_device(y)

    def first_micro_step(device_batch_size):
        """One forward and backward at this micro-batch size (training's memory peak; the gradients
        are dropped again). Returns the batch stream at that size and its first batch, not yet used."""
        batches = ctx.train_batches(device_batch_size)
        try:
            x, y = next_batch(batches)
            with plat.autocast():
                train_model(x, y).backward()
        except BaseException:
            batches.close()  # stops its loader thread
            raise
        finally:
            model.zero_grad(set_to_none=True)
        return batches, x, y

    # Out of memory at start-up (a card smaller than the preset assumed): halve DEVICE_BATCH_SIZE,
    # keeping TOTAL_BATCH_SIZE through more accumulation, and say so, instead of crashing the run.
    device_batch_size, (batches, x, y) = run_with_oom_ladder(
        first_micro_step, DEVICE_BATCH_SIZE, TOTAL_BATCH_SIZE, T, free_memory=plat.free_memory)
    grad_accum_steps = TOTAL_BATCH_SIZE // (device_batch_size * T)
    budget = ctx.budget
    budget.untimed_steps = 10 if plat.compile else 1  # compilation is not charged; the runner's WARMUP_ALLOWANCE bounds it
    peak = peak_flops(plat.device_name)
    print(f"Time budget: {ctx.TIME_BUDGET}s")
    print(f"Gradient accumulation steps: {grad_accum_steps} (DEVICE_BATCH_SIZE={device_batch_size})")

    smooth_train_loss = 0.0
    while not budget.done:
        step = budget.step
        plat.synchronize()
        budget.start_step()
        for _ in range(grad_accum_steps):
            with plat.autocast():
                loss = train_model(x, y)
            train_loss = loss.detach()
            (loss / grad_accum_steps).backward()
            x, y = next_batch(batches)
        progress = budget.progress
        lrm = apply_schedules(optimizer, step, progress)
        optimizer.step()
        model.zero_grad(set_to_none=True)
        train_loss_f = train_loss.item()
        ctx.check_loss(train_loss_f)  # NaN or > 100: prints FAIL and exits at once
        plat.synchronize()
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
    print()  # end the \r progress line

    # The harness exports this forward for its evaluator, a separate process that imports only torch:
    # attention there goes through SDPA (no FA3 or flex_attention kernels), uncompiled.
    model.eval()
    model.block_masks = {}
    for block in model.transformer.h:
        block.attn.fa3 = None

    @torch.no_grad()
    def forward(inputs):
        idx = torch.as_tensor(inputs, device=plat.device).long()
        with plat.autocast():
            return model(idx)

    ctx.finish(forward, framework="torch", num_params=param_counts["total"], flops_per_token=num_flops_per_token,
               depth=DEPTH, device_name=plat.device_name, peak_memory_mb=plat.peak_memory_mb)


if __name__ == "__main__":
    main()
