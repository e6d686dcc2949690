"""The frozen metric: the bpb formula, special-token exclusion, micro-batch invariance, the
framework adapters (numpy, torch, mlx) agreeing, the causality probe, and the unigram bar."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest

from harness.scoring.evaluate import (
    WORKING_SET_FACTOR,
    CausalityError,
    EvaluationError,
    check_causality,
    evaluate_bpb,
    micro_batch_size,
    unigram_bpb,
)

# Tiny vocabulary for hand computations: token 0 is special (0 bytes), the rest 1..3 bytes.
TOKEN_BYTES = np.array([0, 1, 2, 3], dtype=np.int32)
PROBS = [0.1, 0.2, 0.3, 0.4]


def constant_forward(probs):
    """A numpy 'model' predicting the same distribution at every position."""
    logits = np.log(np.asarray(probs, dtype=np.float64)).astype(np.float32)
    return lambda x: np.broadcast_to(logits, (*x.shape, len(probs))).copy()


def bigram_table(vocab: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(0, 2, size=(vocab, vocab)).astype(np.float32)


def random_rows(n: int, t: int, vocab: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab, size=(n, t + 1))


def random_token_bytes(vocab: int, seed: int = 2) -> np.ndarray:
    tb = np.random.default_rng(seed).integers(1, 8, size=vocab).astype(np.int32)
    tb[0] = 0  # BOS-like special token
    return tb


# ------------------------------------------------------------------------------------------------
# The formula
# ------------------------------------------------------------------------------------------------
def test_bpb_matches_hand_computation():
    rows = np.array([[1, 0, 2, 3],
                     [0, 3, 3, 1]])
    # targets: row 0 -> 0 (special, excluded), 2, 3; row 1 -> 3, 3, 1
    result = evaluate_bpb(constant_forward(PROBS), rows, TOKEN_BYTES, framework="numpy", device="cpu",
                          max_batch_size=8)
    nats = -(math.log(0.3) + math.log(0.4) + math.log(0.4) + math.log(0.4) + math.log(0.2))
    nbytes = 2 + 3 + 3 + 3 + 1
    assert result.total_bytes == nbytes
    assert result.num_tokens == 6
    assert result.total_nats == pytest.approx(nats, rel=1e-6)
    assert result.val_bpb == pytest.approx(nats / (math.log(2) * nbytes), rel=1e-6)


def test_special_token_targets_are_excluded_from_nats_and_bytes():
    # Every row has the special token as its first target (position 0).
    rows = np.array([[2, 0, 1, 3, 2],
                     [3, 0, 2, 2, 1],
                     [1, 0, 3, 1, 1]])
    good = np.log(np.array(PROBS, dtype=np.float32))
    awful = np.log(np.array([1e-9, 0.6, 0.2, 0.2], dtype=np.float32))  # p(special) ~ 0

    def forward_awful_at_0(x):
        out = np.broadcast_to(good, (*x.shape, 4)).copy()
        out[:, 0] = awful
        return out

    a = evaluate_bpb(constant_forward(PROBS), rows, TOKEN_BYTES, framework="numpy", device="cpu", max_batch_size=4)
    b = evaluate_bpb(forward_awful_at_0, rows, TOKEN_BYTES, framework="numpy", device="cpu", max_batch_size=4)
    assert a == b  # what the model says where the target is special does not count
    assert a.total_bytes == int(TOKEN_BYTES[rows[:, 2:]].sum())
    # ... and it would have counted if the special token carried bytes
    with_bytes = TOKEN_BYTES.copy()
    with_bytes[0] = 1
    c = evaluate_bpb(forward_awful_at_0, rows, with_bytes, framework="numpy", device="cpu", max_batch_size=4)
    assert c.val_bpb > a.val_bpb + 1.0


def test_result_does_not_depend_on_micro_batch_size():
    vocab, seq_len, n = 11, 5, 7
    table = bigram_table(vocab)
    rows, tb = random_rows(n, seq_len, vocab), random_token_bytes(vocab)
    seen: list[int] = []

    def forward(x):
        seen.append(x.shape[0])
        return table[x]

    row_cost = WORKING_SET_FACTOR * seq_len * vocab * 4  # the working set of one row
    results = {}
    for budget, expected_b in [(row_cost, 1), (2 * row_cost, 2), (3 * row_cost + 5, 3), (10**9, 7)]:
        assert micro_batch_size(seq_len, vocab, 8, budget, num_rows=n) == expected_b
        seen.clear()
        results[expected_b] = evaluate_bpb(forward, rows, tb, framework="numpy", device="cpu",
                                           max_batch_size=8, memory_budget_bytes=budget)
        # one static shape for every call (the ragged last batch is padded), never above b
        assert seen == [expected_b] * math.ceil(n / expected_b)
    first = results[1]
    assert all(r == first for r in results.values())  # bit-identical, not merely close


def test_micro_batch_respects_budget_and_mlx_buffer_limit():
    # upstream shapes: one float32 row of logits is 2048 * 8192 * 4 = 64 MiB, its working set 4x that
    assert micro_batch_size(2048, 8192, 128, 2 * 1024**3) == 8
    assert micro_batch_size(2048, 8192, 128, 2 * 1024**3, num_rows=3) == 3  # never more rows than exist
    assert micro_batch_size(2048, 8192, 4, 2 * 1024**3) == 4
    assert micro_batch_size(2048, 8192, 128, 1024) == 1  # a row cannot be split: still evaluates
    assert micro_batch_size(2048, 8192, 128, 64 * 1024**3, framework="mlx") == 16  # 1 GiB per buffer
    # cpu-tiny: 256 x 4096 -> the preset's eval batch of 32 fits the CPU default
    assert micro_batch_size(256, 4096, 32, 512 * 1024**2) == 32


def test_padded_vocabulary_scores_like_the_exact_one():
    rows = np.array([[1, 2, 3, 0, 1], [3, 3, 2, 1, 0]])
    exact = constant_forward(PROBS)

    def padded(x):  # three unused vocabulary slots with negligible probability
        return np.concatenate([exact(x), np.full((*x.shape, 3), -1e4, dtype=np.float32)], axis=-1)

    a = evaluate_bpb(exact, rows, TOKEN_BYTES, framework="numpy", device="cpu", max_batch_size=2)
    b = evaluate_bpb(padded, rows, TOKEN_BYTES, framework="numpy", device="cpu", max_batch_size=2)
    assert b.val_bpb == pytest.approx(a.val_bpb, rel=1e-6)


# ------------------------------------------------------------------------------------------------
# Framework adapters agree on the same logits
# ------------------------------------------------------------------------------------------------
def test_torch_and_mlx_adapters_match_numpy():
    torch = pytest.importorskip("torch")
    mx = pytest.importorskip("mlx.core")
    vocab, seq_len = 13, 6
    table = bigram_table(vocab, seed=3)
    rows, tb = random_rows(9, seq_len, vocab, seed=4), random_token_bytes(vocab, seed=5)
    t_table, m_table = torch.from_numpy(table), mx.array(table)

    def torch_forward(x):
        assert x.dtype == torch.int64
        return t_table[x]

    def mlx_forward(x):
        assert x.dtype == mx.int32
        return m_table[x]

    kw = dict(device="cpu", max_batch_size=4)
    ref = evaluate_bpb(lambda x: table[x], rows, tb, framework="numpy", **kw)
    via_torch = evaluate_bpb(torch_forward, rows, tb, framework="torch", **kw)
    via_mlx = evaluate_bpb(mlx_forward, rows, tb, framework="mlx", **kw)
    for other in (via_torch, via_mlx):
        assert other.total_bytes == ref.total_bytes and other.num_tokens == ref.num_tokens
        assert other.val_bpb == pytest.approx(ref.val_bpb, rel=1e-6)


def test_low_precision_logits_are_scored_in_float32():
    torch = pytest.importorskip("torch")
    vocab, seq_len = 13, 6
    table = bigram_table(vocab, seed=6)
    rows, tb = random_rows(5, seq_len, vocab, seed=7), random_token_bytes(vocab, seed=8)
    bf16_table = torch.from_numpy(table).to(torch.bfloat16)
    rounded = bf16_table.float().numpy()  # what the bf16 logits are, exactly, in float32

    got = evaluate_bpb(lambda x: bf16_table[x], rows, tb, framework="torch", device="cpu", max_batch_size=2)
    ref = evaluate_bpb(lambda x: rounded[x], rows, tb, framework="numpy", device="cpu", max_batch_size=2)
    assert got.val_bpb == pytest.approx(ref.val_bpb, rel=1e-6)


# ------------------------------------------------------------------------------------------------
# What the evaluator refuses
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", [
    lambda x: np.zeros(x.shape, dtype=np.float32),                              # the loss, not logits
    lambda x: np.zeros((x.size, 4), dtype=np.float32),                           # flattened
    lambda x: np.zeros((*x.shape, 3), dtype=np.float32),                         # vocabulary too small
    lambda x: np.zeros((x.shape[0], x.shape[1] - 1, 4), dtype=np.float32),       # dropped a position
])
def test_wrong_logits_shape_is_rejected(bad):
    rows = np.array([[1, 2, 3, 1], [2, 3, 1, 2]])
    with pytest.raises(EvaluationError, match=r"expected \(2, 3, 4\)"):
        evaluate_bpb(bad, rows, TOKEN_BYTES, framework="numpy", device="cpu", max_batch_size=2)
    with pytest.raises(EvaluationError, match="shape"):
        check_causality(bad, rows[:, :-1], framework="numpy", device="cpu", vocab_size=4)


def test_torch_forward_returning_a_loss_is_rejected():
    torch = pytest.importorskip("torch")
    rows = np.array([[1, 2, 3, 1]])
    with pytest.raises(EvaluationError, match="shape"):
        evaluate_bpb(lambda x: torch.zeros(()), rows, TOKEN_BYTES, framework="torch", device="cpu", max_batch_size=1)
    with pytest.raises(EvaluationError, match="torch.Tensor"):
        evaluate_bpb(lambda x: x.numpy(), rows, TOKEN_BYTES, framework="torch", device="cpu", max_batch_size=1)


def test_non_finite_logits_are_rejected():
    rows = np.array([[1, 2, 3, 1], [2, 3, 1, 2]])

    def nan_in_second_row(x):
        out = constant_forward(PROBS)(x)
        out[-1, 1, 2] = np.nan
        return out

    with pytest.raises(EvaluationError, match="not finite"):
        evaluate_bpb(nan_in_second_row, rows, TOKEN_BYTES, framework="numpy", device="cpu", max_batch_size=2)
    with pytest.raises(EvaluationError, match="not finite"):
        check_causality(lambda x: np.full((*x.shape, 4), np.inf, dtype=np.float32), rows[:, :-1],
                        framework="numpy", device="cpu", vocab_size=4)


def test_bad_inputs_are_rejected_with_a_reason():
    rows = np.array([[1, 2, 9, 1]])
    with pytest.raises(ValueError, match="token byte table has 4"):
        evaluate_bpb(constant_forward(PROBS), rows, TOKEN_BYTES, framework="numpy", device="cpu", max_batch_size=1)
    with pytest.raises(ValueError, match="unknown framework 'jax'"):
        evaluate_bpb(constant_forward(PROBS), rows % 4, TOKEN_BYTES, framework="jax", device="cpu", max_batch_size=1)
    with pytest.raises(ValueError, match="only special tokens"):
        evaluate_bpb(constant_forward(PROBS), np.zeros((2, 4), dtype=int), TOKEN_BYTES, framework="numpy",
                     device="cpu", max_batch_size=1)


# ------------------------------------------------------------------------------------------------
# The causality probe
# ------------------------------------------------------------------------------------------------
def _torch_models():
    import torch
    import torch.nn.functional as F

    class TinyAttention(torch.nn.Module):
        """Embedding -> one attention layer -> head; `causal=False` is the classic mask bug."""

        def __init__(self, vocab: int, dim: int = 16, causal: bool = True) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.causal = causal
            self.wte = torch.nn.Embedding(vocab, dim)
            self.qkv = torch.nn.Linear(dim, 3 * dim, bias=False)
            self.head = torch.nn.Linear(dim, vocab, bias=False)

        def forward(self, x):
            h = self.wte(x)
            q, k, v = self.qkv(h).unsqueeze(1).chunk(3, dim=-1)  # one head: (B, 1, T, d)
            h = h + F.scaled_dot_product_attention(q, k, v, is_causal=self.causal).squeeze(1)
            return self.head(h)

    class PeekNext(TinyAttention):
        """Causal attention, plus a 'bigram on the answer': the logits at t read x[t+1]."""

        def forward(self, x):
            logits = super().forward(x)
            future = torch.nn.functional.pad(x[:, 1:], (0, 1))
            return logits + 0.5 * self.wte(future) @ self.head.weight.T

    return TinyAttention, PeekNext


VOCAB, SEQ = 32, 24


def probe_input():
    return np.random.default_rng(9).integers(0, VOCAB, size=(2, SEQ))


def test_causal_torch_model_passes_the_probe_in_float32_and_bfloat16():
    torch = pytest.importorskip("torch")
    TinyAttention, _ = _torch_models()
    model = TinyAttention(VOCAB).eval()
    check_causality(model, probe_input(), framework="torch", device="cpu", vocab_size=VOCAB)
    check_causality(model.to(torch.bfloat16), probe_input(), framework="torch", device="cpu", vocab_size=VOCAB)


def test_non_causal_attention_is_caught():
    pytest.importorskip("torch")
    TinyAttention, _ = _torch_models()
    with pytest.raises(CausalityError, match="attention is not causal .*fix the attention mask in train.py"):
        check_causality(TinyAttention(VOCAB, causal=False).eval(), probe_input(), framework="torch",
                        device="cpu", vocab_size=VOCAB)


@pytest.mark.parametrize("t", [1, SEQ // 2, SEQ - 2])
def test_a_model_peeking_at_the_next_token_is_caught_at_any_position(t):
    pytest.importorskip("torch")
    _, PeekNext = _torch_models()
    with pytest.raises(CausalityError, match=f"after position {t} "):
        check_causality(PeekNext(VOCAB).eval(), probe_input(), framework="torch", device="cpu",
                        vocab_size=VOCAB, positions=[t])


def test_the_probe_tolerance_is_relative_to_the_logit_scale():
    """A causal numpy model with huge logits passes; a future leak of 1% of the scale fails."""
    table = 1000.0 * bigram_table(VOCAB, seed=10)

    def causal(x):
        return table[x]

    def leaks_one_percent(x):
        out = table[x].copy()
        out[:, :-1] += 0.01 * np.abs(table).max() * (x[:, 1:, None] % 2)
        return out

    check_causality(causal, probe_input(), framework="numpy", device="cpu", vocab_size=VOCAB)
    with pytest.raises(CausalityError):
        check_causality(leaks_one_percent, probe_input(), framework="numpy", device="cpu", vocab_size=VOCAB)


def _mlx_model(causal: bool):
    import mlx.core as mx

    rng = np.random.default_rng(11)
    wte, wqkv, head = (mx.array(rng.normal(0, 0.5, size=s).astype(np.float32))
                       for s in [(VOCAB, 8), (8, 24), (8, VOCAB)])

    def forward(x):
        h = wte[x]                                                     # (B, T, 8)
        q, k, v = mx.split((h @ wqkv)[:, None], 3, axis=-1)            # (B, 1, T, 8)
        attn = mx.fast.scaled_dot_product_attention(q, k, v, scale=8**-0.5, mask="causal" if causal else None)
        return (h + attn[:, 0]) @ head

    return forward


def test_the_probe_works_on_mlx_models():
    pytest.importorskip("mlx.core")
    check_causality(_mlx_model(causal=True), probe_input(), framework="mlx", device="cpu", vocab_size=VOCAB)
    with pytest.raises(CausalityError, match="not causal"):
        check_causality(_mlx_model(causal=False), probe_input(), framework="mlx", device="cpu", vocab_size=VOCAB)


def test_mlx_model_evaluates_like_its_numpy_twin():
    pytest.importorskip("mlx.core")
    forward = _mlx_model(causal=True)
    rows, tb = random_rows(5, SEQ, VOCAB, seed=12), random_token_bytes(VOCAB, seed=13)
    reference_logits = {}

    def numpy_twin(x):  # the same model's logits, computed once by mlx, replayed from numpy
        import mlx.core as mx
        key = x.tobytes()
        if key not in reference_logits:
            reference_logits[key] = np.array(forward(mx.array(x.astype(np.int32))))
        return reference_logits[key]

    a = evaluate_bpb(forward, rows, tb, framework="mlx", device="cpu", max_batch_size=2)
    b = evaluate_bpb(numpy_twin, rows, tb, framework="numpy", device="cpu", max_batch_size=2)
    assert math.isfinite(a.val_bpb) and a.val_bpb == pytest.approx(b.val_bpb, rel=1e-6)


# ------------------------------------------------------------------------------------------------
# The unigram bar
# ------------------------------------------------------------------------------------------------
def test_unigram_bpb_matches_hand_computation():
    train = SimpleNamespace(tokens=np.array([1, 1, 2, 0, 3, 1], dtype=np.uint16))
    # counts [1, 3, 1, 1] of 6 tokens; add-one over 4 tokens -> p = [2, 4, 2, 2] / 10
    rows = np.array([[0, 1, 2, 0],
                     [0, 3, 1, 1]])
    # counted targets: 1, 2 (row 0; the final 0 is special), 3, 1, 1 (row 1)
    nats = -(math.log(0.4) + math.log(0.2) + math.log(0.2) + math.log(0.4) + math.log(0.4))
    nbytes = 1 + 2 + 3 + 1 + 1
    assert unigram_bpb(train, rows, TOKEN_BYTES, 4) == pytest.approx(nats / (math.log(2) * nbytes), rel=1e-12)


def test_unigram_bpb_equals_evaluate_bpb_of_the_unigram_model(tmp_path):
    vocab = 50
    rng = np.random.default_rng(14)
    path = tmp_path / "train.bin"
    tokens = np.minimum(rng.zipf(1.5, size=20_000) - 1, vocab - 1).astype(np.uint16)
    tokens.tofile(path)
    train = SimpleNamespace(tokens=np.memmap(path, dtype=np.uint16, mode="r"))
    rows, tb = random_rows(6, 16, vocab, seed=15), random_token_bytes(vocab, seed=16)

    counts = np.bincount(tokens, minlength=vocab)
    probs = (counts + 1) / (counts.sum() + vocab)
    via_model = evaluate_bpb(constant_forward(probs), rows, tb, framework="numpy", device="cpu", max_batch_size=4)
    assert unigram_bpb(train, rows, tb, vocab) == pytest.approx(via_model.val_bpb, rel=1e-6)


def test_unigram_rejects_tokens_outside_the_vocabulary():
    train = SimpleNamespace(tokens=np.array([1, 7], dtype=np.uint16))
    with pytest.raises(ValueError, match="id 7 >= vocab_size 4"):
        unigram_bpb(train, np.array([[1, 2, 3]]), TOKEN_BYTES, 4)


# ------------------------------------------------------------------------------------------------
# On a real accelerator: bf16 kernels must not trip the probe, and eval must stay in its budget
# ------------------------------------------------------------------------------------------------
def _gpu_transformer(vocab: int, dim: int, depth: int, window: int | None, causal: bool = True):
    import torch
    import torch.nn.functional as F

    class Gpt(torch.nn.Module):
        """Upstream-like: RMSNorm, multi-head SDPA (flash on CUDA), ReLU^2 MLP, soft-capped logits."""

        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.wte = torch.nn.Embedding(vocab, dim)
            self.attn = torch.nn.ModuleList(torch.nn.Linear(dim, 3 * dim, bias=False) for _ in range(depth))
            self.mlp = torch.nn.ModuleList(torch.nn.Sequential(torch.nn.Linear(dim, 4 * dim, bias=False),
                                                                torch.nn.ReLU(),
                                                                torch.nn.Linear(4 * dim, dim, bias=False))
                                           for _ in range(depth))
            self.head = torch.nn.Linear(dim, vocab, bias=False)

        def forward(self, x):
            b, t = x.shape
            mask = None
            if window is not None:  # sliding window through an explicit boolean mask
                i = torch.arange(t, device=x.device)
                mask = (i[None, :] <= i[:, None]) & (i[:, None] - i[None, :] < window)
            with torch.autocast("cuda", dtype=torch.bfloat16):
                h = F.rms_norm(self.wte(x), (dim,))
                for attn, mlp in zip(self.attn, self.mlp):
                    q, k, v = attn(F.rms_norm(h, (dim,))).view(b, t, 3, dim // 64, 64).permute(2, 0, 3, 1, 4)
                    y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                                       is_causal=causal and mask is None)
                    h = h + y.transpose(1, 2).reshape(b, t, dim)
                    h = h + mlp(F.rms_norm(h, (dim,)))
                logits = self.head(F.rms_norm(h, (dim,))).float()
            return 15 * torch.tanh(logits / 15)

    return Gpt().cuda().eval()


@pytest.mark.gpu
def test_bf16_cuda_model_passes_the_probe_and_eval_stays_within_budget():
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA/ROCm device")
    vocab, seq_len, n = 8192, 1024, 24
    rows = np.random.default_rng(17).integers(0, vocab, size=(n, seq_len + 1))
    tb = random_token_bytes(vocab, seed=18)
    for window in (None, seq_len // 2):
        model = _gpu_transformer(vocab, 256, 2, window)
        check_causality(model, rows[:1, :-1], framework="torch", device="cuda", vocab_size=vocab)
    with pytest.raises(CausalityError):
        check_causality(_gpu_transformer(vocab, 256, 2, None, causal=False), rows[:1, :-1], framework="torch",
                        device="cuda", vocab_size=vocab)

    model = _gpu_transformer(vocab, 256, 2, None)
    budget = 512 * 1024**2  # the working set of one row is 4 float32 logits rows, 128 MiB -> b = 4
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    small = evaluate_bpb(model, rows, tb, framework="torch", device="cuda", max_batch_size=n,
                         memory_budget_bytes=budget)
    peak_extra = torch.cuda.max_memory_allocated() - before
    print(f"\neval peak above the model: {peak_extra / 2**20:.0f} MiB for a budget of {budget / 2**20:.0f} MiB")
    assert peak_extra <= budget
    whole = evaluate_bpb(model, rows, tb, framework="torch", device="cuda", max_batch_size=n,
                         memory_budget_bytes=64 * 1024**3)
    assert whole.val_bpb == pytest.approx(small.val_bpb, rel=1e-4)  # GEMM tiling may differ with b
