"""The frozen metric: validation bits per byte from a trainer's forward function.

The trainer hands back `forward(x) -> logits` of shape (B, T, V). The harness, not the trainer,
feeds the validation inputs (never the targets), computes the float32 log-softmax cross-entropy
itself, and sums nats and target bytes over every target position of the evaluation rows:

    val_bpb = sum(nats) / (ln 2 * sum(target bytes))

Special tokens (0 bytes in the token byte table) are excluded from both sums, as upstream does.
Before scoring, `check_causality` verifies that the logits at position t do not depend on tokens
after t: a model that sees the future would score a meaningless number.

Framework adapters ("torch", "mlx", and "numpy" for tests and reference checks) are imported
only inside the adapter that needs them, so this module loads where only one framework exists.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Protocol, Sequence

import numpy as np

FRAMEWORKS = ("torch", "mlx", "numpy")

# Micro-batch memory. One micro-batch holds the model's logits (often bf16, then soft-capped in
# float32), our float32 copy and the log-softmax temporaries: measured on an H100 at about 3 float32
# tensors of shape (b, T, V) above the model, so we count WORKING_SET_FACTOR = 4 of them for margin.
# The budget bounds that whole working set, so eval never becomes the memory peak of a run
# (upstream's eval materialised 128 x 2048 x 8192 float32 logits at once).
WORKING_SET_FACTOR = 4
ACCELERATOR_BUDGET_BYTES = 2 * 1024**3
CPU_BUDGET_BYTES = 512 * 1024**2
# Metal refuses single buffers above ~75% of the recommended working set; stay far below.
MLX_MAX_BUFFER_BYTES = 1024**3

# Causality tolerance. A causal model computes the logits of positions <= t with exactly the same
# arithmetic whatever the tokens after t (masked keys get probability exactly 0), so the observed
# difference is 0 in practice. We still allow one bfloat16 ulp (2^-7 relative) at the scale of the
# logits (their largest magnitude in the row) in case a backend's kernels are not bit-reproducible;
# a model that attends to or reads the future moves its logits by a sizeable fraction of that scale.
CAUSALITY_RTOL = 2.0**-7
CAUSALITY_ATOL = 1e-6
CAUSALITY_SEED = 1234

CAUSALITY_MESSAGE = (
    "the model's logits at position t depend on tokens after t: attention is not causal "
    "(or the model reads the future) — val_bpb would be meaningless; fix the attention mask in train.py"
)


class EvaluationError(RuntimeError):
    """The forward function returned something the evaluator cannot score."""


class CausalityError(EvaluationError):
    """The model's logits at position t depend on tokens after t."""


@dataclass(frozen=True)
class EvalResult:
    val_bpb: float
    total_nats: float   # summed over target positions with bytes > 0
    total_bytes: int    # summed UTF-8 bytes of those targets
    num_tokens: int     # target positions evaluated (N * T, special tokens included)


# ------------------------------------------------------------------------------------------------
# Public API
# ------------------------------------------------------------------------------------------------
def evaluate_bpb(
    forward: Callable[[Any], Any],
    rows: np.ndarray,
    token_bytes: np.ndarray,
    *,
    framework: str,
    device: str,
    max_batch_size: int,
    memory_budget_bytes: int | None = None,
) -> EvalResult:
    """Score `forward` on `rows` (N, T+1): inputs rows[:, :-1], targets rows[:, 1:].

    The forward owns its precision (autocast, dtype) and must accept a batch of b <= max_batch_size
    rows: int64 LongTensor on `device` (torch), int32 mx.array (mlx) or int64 ndarray (numpy).
    Its logits may have a vocabulary padded beyond len(token_bytes); extra entries only take
    probability mass away from the real tokens. The result does not depend on the micro-batch size
    chosen (sums are kept per row in float64 and added in a fixed order). Every call gets exactly
    b rows (the last micro-batch is padded by repeating its last row, whose extra scores are
    dropped), so a model compiled for static shapes compiles once.
    """
    rows, token_bytes = _check_rows(rows, token_bytes)
    if max_batch_size < 1:
        raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
    num_rows, seq_len = rows.shape[0], rows.shape[1] - 1
    vocab = len(token_bytes)
    budget = memory_budget_bytes if memory_budget_bytes is not None else default_memory_budget(framework, device)
    batch = micro_batch_size(seq_len, vocab, max_batch_size, budget, framework=framework, num_rows=num_rows)

    targets = rows[:, 1:]
    target_bytes = token_bytes[targets]                      # (N, T), exact integers
    counted = target_bytes > 0
    total_bytes = int(target_bytes.sum(dtype=np.int64))
    if total_bytes == 0:
        raise ValueError("the evaluation targets contain no bytes (only special tokens): check the validation rows")

    adapter = _make_adapter(forward, framework, device)
    row_nats = np.zeros(num_rows, dtype=np.float64)
    try:
        for start in range(0, num_rows, batch):
            stop = min(start + batch, num_rows)
            take = np.minimum(np.arange(start, start + batch), num_rows - 1)  # pads the last batch
            x = np.ascontiguousarray(rows[take, :-1])
            y = np.ascontiguousarray(targets[take])
            nats = adapter.nats(x, y, vocab)[: stop - start]
            if not np.isfinite(nats).all():
                bad = int((~np.isfinite(nats)).sum())
                raise EvaluationError(
                    f"the model's logits are not finite (NaN or inf) at {bad} of {nats.size} positions "
                    f"of validation rows {start}..{stop - 1}: training diverged or the forward is broken"
                )
            row_nats[start:stop] = np.where(counted[start:stop], nats.astype(np.float64), 0.0).sum(axis=1)
    finally:
        adapter.release()

    total_nats = float(row_nats.sum())
    return EvalResult(
        val_bpb=total_nats / (math.log(2) * total_bytes),
        total_nats=total_nats,
        total_bytes=total_bytes,
        num_tokens=num_rows * seq_len,
    )


def check_causality(
    forward: Callable[[Any], Any],
    x: np.ndarray,
    *,
    framework: str,
    device: str,
    vocab_size: int,
    positions: Sequence[int] | None = None,
) -> None:
    """Raise CausalityError if the logits at positions <= t change when the tokens after t do.

    Takes the first row of `x` (T tokens, or (n, T)), and for each t in `positions` (default
    0, 1, T//2, T-2) replaces every token after t by a different random token (fixed seed). All
    variants go through the forward in one batch; the logits at positions <= t are compared in
    float32 against the original row with tolerance CAUSALITY_RTOL * max|logit| + CAUSALITY_ATOL.
    Also raises EvaluationError for logits of the wrong shape or non-finite logits.
    """
    base = np.asarray(x)
    if base.ndim == 2:
        base = base[0]
    if base.ndim != 1 or not np.issubdtype(base.dtype, np.integer):
        raise ValueError(f"the causality probe needs integer tokens of shape (T,) or (n, T), got {np.asarray(x).shape}")
    seq_len = base.shape[0]
    if seq_len < 2:
        raise ValueError(f"the causality probe needs sequences of at least 2 tokens, got {seq_len}")
    if vocab_size < 2:
        raise ValueError(f"vocab_size must be >= 2, got {vocab_size}")
    if positions is None:
        positions = (0, 1, seq_len // 2, seq_len - 2)
    ts = sorted({int(t) for t in positions if 0 <= int(t) <= seq_len - 2})
    if not ts:
        raise ValueError(f"no probe position in 0..{seq_len - 2} among {list(positions)}")

    rng = np.random.default_rng(CAUSALITY_SEED)
    batch = np.tile(base.astype(np.int64), (len(ts) + 1, 1))
    for i, t in enumerate(ts, start=1):
        tail = batch[i, t + 1:]
        # a nonzero shift modulo V guarantees every token after t really changes
        batch[i, t + 1:] = (tail + rng.integers(1, vocab_size, size=tail.shape)) % vocab_size

    adapter = _make_adapter(forward, framework, device)
    try:
        logits = adapter.logits(batch, vocab_size)
    finally:
        adapter.release()
    if not np.isfinite(logits).all():
        raise EvaluationError("the model's logits are not finite (NaN or inf) on a validation row: "
                              "training diverged or the forward is broken")

    reference = logits[0]
    tolerance = CAUSALITY_RTOL * float(np.abs(reference).max()) + CAUSALITY_ATOL
    for i, t in enumerate(ts, start=1):
        diff = float(np.abs(logits[i, : t + 1] - reference[: t + 1]).max())
        if diff > tolerance:
            raise CausalityError(
                f"{CAUSALITY_MESSAGE} (probe: changing the tokens after position {t} of {seq_len} moved "
                f"the logits at positions <= {t} by up to {diff:.4g}, tolerance {tolerance:.3g})"
            )


# Probing while scoring. A probed micro-batch is run twice: as it is, and with every row's tokens
# after a random position t replaced by other random tokens; the logits at positions <= t must not
# move. Positions come from a per-run seed, every probed row gets its own, and the probe batches have
# the scoring batches' shape and sit among them, so an exported graph (no Python state) cannot tell
# a probe from a scoring call.
PROBE_FRACTION = 1 / 8  # of the micro-batches of a stream
PROBE_MIN_BATCHES = 4


@dataclass(frozen=True)
class StreamScore:
    """One stream's sums: scored rows, and its canary rows on their own."""

    nats: float
    bytes: int
    tokens: int  # target positions of the scored rows (special tokens included)
    canary_nats: float = 0.0
    canary_bytes: int = 0
    canary_targets: int = 0
    probed_rows: int = 0

    @property
    def bpb(self) -> float:
        return self.nats / (math.log(2) * self.bytes)


def eval_batch(seq_len: int, vocab: int, max_batch_size: int, *, framework: str, device: str) -> int:
    """The fixed number of rows of every evaluator call: the trainer exports its forward for it."""
    return micro_batch_size(seq_len, vocab, max_batch_size, default_memory_budget(framework, device),
                            framework=framework)


def score_stream(
    forward: Callable[[Any], Any],
    rows: np.ndarray,
    token_bytes: np.ndarray,
    *,
    framework: str,
    device: str,
    batch: int,
    canary_rows: Sequence[int] = (),
    probe_seed: int | None = None,
) -> StreamScore:
    """Score `rows` (N, T+1) in calls of exactly `batch` rows, the canary rows apart, probing
    causality on randomly chosen micro-batches when `probe_seed` is given (CausalityError names
    the row and position of a leak). Sums per row are float64, added in a fixed order."""
    rows, token_bytes = _check_rows(rows, token_bytes)
    num_rows, seq_len = rows.shape[0], rows.shape[1] - 1
    vocab = len(token_bytes)
    targets = rows[:, 1:]
    target_bytes = token_bytes[targets]
    is_canary = np.zeros(num_rows, dtype=bool)
    is_canary[list(canary_rows)] = True
    counted = (target_bytes > 0) & ~is_canary[:, None]
    num_batches = -(-num_rows // batch)
    rng = np.random.default_rng(probe_seed)
    probed: set[int] = set()
    if probe_seed is not None:
        wanted = max(min(num_batches, PROBE_MIN_BATCHES), math.ceil(num_batches * PROBE_FRACTION))
        probed = set(rng.choice(num_batches, size=min(wanted, num_batches), replace=False).tolist())

    adapter = _make_adapter(forward, framework, device)
    row_nats = np.zeros(num_rows, dtype=np.float64)
    canary_nats = 0.0
    probed_rows = 0
    try:
        for index in range(num_batches):
            start = index * batch
            stop = min(start + batch, num_rows)
            take = np.minimum(np.arange(start, start + batch), num_rows - 1)  # pads the last batch
            x = np.ascontiguousarray(rows[take, :-1])
            y = np.ascontiguousarray(targets[take])
            if index in probed:
                ts = rng.integers(0, seq_len - 1, size=batch)
                x_alt = x.copy()
                after = np.arange(seq_len)[None, :] > ts[:, None]
                shift = rng.integers(1, vocab, size=x.shape)  # nonzero modulo V: every later token changes
                x_alt[after] = (x[after] + shift[after]) % vocab
                nats, diff, scale = adapter.nats_probed(x, y, vocab, x_alt, ts)
                _check_probe(diff[: stop - start], scale[: stop - start], ts[: stop - start], start, seq_len)
                probed_rows += stop - start
            else:
                nats = adapter.nats(x, y, vocab)
            nats = nats[: stop - start].astype(np.float64)
            if not np.isfinite(nats).all():
                bad = int((~np.isfinite(nats)).sum())
                raise EvaluationError(
                    f"the model's logits are not finite (NaN or inf) at {bad} of {nats.size} positions "
                    f"of rows {start}..{stop - 1}: training diverged or the forward is broken"
                )
            row_nats[start:stop] = np.where(counted[start:stop], nats, 0.0).sum(axis=1)
            canaries = is_canary[start:stop]
            if canaries.any():
                canary_nats += float(nats[canaries].sum())
    finally:
        adapter.release()
    return StreamScore(
        nats=float(row_nats.sum()), bytes=int(np.where(counted, target_bytes, 0).sum(dtype=np.int64)),
        tokens=int((~is_canary).sum()) * seq_len, canary_nats=canary_nats,
        canary_bytes=int(target_bytes[is_canary].sum(dtype=np.int64)),
        canary_targets=int(is_canary.sum()) * seq_len, probed_rows=probed_rows,
    )


def _check_probe(diff: np.ndarray, scale: np.ndarray, ts: np.ndarray, first_row: int, seq_len: int) -> None:
    tolerance = CAUSALITY_RTOL * scale + CAUSALITY_ATOL
    bad = np.flatnonzero(~(diff <= tolerance))  # NaN counts as a violation
    if len(bad):
        i = int(bad[0])
        raise CausalityError(
            f"{CAUSALITY_MESSAGE} (probe: changing the tokens after position {int(ts[i])} of {seq_len} in row "
            f"{first_row + i} moved the logits at positions <= {int(ts[i])} by up to {float(diff[i]):.4g}, "
            f"tolerance {float(tolerance[i]):.3g})"
        )


def unigram_bpb(train_tokens: Any, rows: np.ndarray, token_bytes: np.ndarray, vocab_size: int) -> float:
    """bpb of a unigram model fitted on the training tokens (add-one smoothing over the vocab),
    on the same targets and with the same exclusions as `evaluate_bpb`: the bar a trained model
    must clear. `train_tokens` is a harness.data.tokens.TokenFile or anything with a `.tokens` array."""
    rows, token_bytes = _check_rows(rows, token_bytes)
    if len(token_bytes) > vocab_size:
        raise ValueError(f"token byte table has {len(token_bytes)} entries but vocab_size is {vocab_size}")
    counts = _token_counts(np.asarray(train_tokens.tokens), vocab_size)
    log_p = np.log(counts + 1.0) - math.log(float(counts.sum()) + vocab_size)
    targets = rows[:, 1:]
    target_bytes = token_bytes[targets]
    counted = target_bytes > 0
    total_bytes = int(target_bytes.sum(dtype=np.int64))
    if total_bytes == 0:
        raise ValueError("the evaluation targets contain no bytes (only special tokens): check the validation rows")
    total_nats = float(-log_p[targets[counted]].sum())
    return total_nats / (math.log(2) * total_bytes)


def default_memory_budget(framework: str, device: str) -> int:
    """Bytes one eval micro-batch may use: small on CPU (host RAM is shared with everything),
    larger on an accelerator, where training has already claimed far more."""
    on_cpu = framework == "numpy" or str(device).lower().split(":")[0] == "cpu"
    return CPU_BUDGET_BYTES if on_cpu else ACCELERATOR_BUDGET_BYTES


def micro_batch_size(seq_len: int, vocab: int, max_batch_size: int, memory_budget_bytes: int,
                     *, framework: str = "torch", num_rows: int | None = None) -> int:
    """Largest b <= max_batch_size (and <= num_rows, when given) whose working set (WORKING_SET_FACTOR float32 (b, T, V)
    tensors) fits the budget; at least 1, since a row cannot be split."""
    row_bytes = seq_len * vocab * 4
    batch = min(max_batch_size, num_rows or max_batch_size, memory_budget_bytes // (WORKING_SET_FACTOR * row_bytes))
    if framework == "mlx":
        batch = min(batch, MLX_MAX_BUFFER_BYTES // row_bytes)
    return max(1, int(batch))


# ------------------------------------------------------------------------------------------------
# Helpers
# ------------------------------------------------------------------------------------------------
def _check_rows(rows: np.ndarray, token_bytes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    rows = np.asarray(rows)
    token_bytes = np.asarray(token_bytes)
    if rows.ndim != 2 or rows.shape[1] < 2 or rows.shape[0] < 1 or not np.issubdtype(rows.dtype, np.integer):
        raise ValueError(f"evaluation rows must be integer tokens of shape (N, T+1) with T >= 1, got {rows.dtype} {rows.shape}")
    if token_bytes.ndim != 1 or not np.issubdtype(token_bytes.dtype, np.integer):
        raise ValueError(f"token_bytes must be a 1-D integer table, got {token_bytes.dtype} {token_bytes.shape}")
    rows = rows.astype(np.int64, copy=False)
    low, high = int(rows.min()), int(rows.max())
    if low < 0 or high >= len(token_bytes):
        raise ValueError(
            f"evaluation rows hold token ids in [{low}, {high}] but the token byte table has {len(token_bytes)} "
            "entries: the tokens were made with another tokenizer; re-run `autoresearch setup`"
        )
    return rows, token_bytes.astype(np.int64, copy=False)


def _token_counts(tokens: np.ndarray, vocab_size: int, chunk: int = 1 << 24) -> np.ndarray:
    """np.bincount in chunks: bincount casts to intp, 4x the bytes of a uint16 memmap at once."""
    counts = np.zeros(vocab_size, dtype=np.int64)
    for start in range(0, len(tokens), chunk):
        part = np.asarray(tokens[start:start + chunk])
        if part.size and int(part.max()) >= vocab_size:
            raise ValueError(f"training tokens hold id {int(part.max())} >= vocab_size {vocab_size}")
        counts += np.bincount(part, minlength=vocab_size)
    return counts


def _check_logits_shape(shape: tuple[int, ...], batch: int, seq_len: int, vocab: int) -> None:
    shape = tuple(int(s) for s in shape)
    if len(shape) != 3 or shape[0] != batch or shape[1] != seq_len or shape[2] < vocab:
        raise EvaluationError(
            f"forward returned logits of shape {shape} for inputs of shape ({batch}, {seq_len}); expected "
            f"({batch}, {seq_len}, {vocab}) — one row of vocabulary logits per input position "
            "(return logits, not the loss, and do not flatten them)"
        )


class _Adapter(Protocol):
    def nats(self, x: np.ndarray, y: np.ndarray, vocab: int) -> np.ndarray:
        """Per-position cross-entropy in nats, float32 on the host, shape (b, T)."""

    def logits(self, x: np.ndarray, vocab: int) -> np.ndarray:
        """The logits as float32 on the host, shape (b, T, V)."""

    def nats_probed(self, x: np.ndarray, y: np.ndarray, vocab: int, x_alt: np.ndarray,
                    ts: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """`nats(x, y)`, plus per row: the largest change of any logit at positions <= ts[row]
        when x becomes x_alt, and the scale of the row's logits (their largest magnitude)."""

    def release(self) -> None:
        """Give back framework memory held after evaluation."""


def _make_adapter(forward: Callable[[Any], Any], framework: str, device: str) -> _Adapter:
    if framework == "torch":
        return _TorchAdapter(forward, device)
    if framework == "mlx":
        return _MlxAdapter(forward)
    if framework == "numpy":
        return _NumpyAdapter(forward)
    raise ValueError(f"unknown framework {framework!r}: expected one of {', '.join(FRAMEWORKS)}")


def _log_softmax_nats(logits: np.ndarray, y: np.ndarray) -> np.ndarray:
    logits = logits.astype(np.float32, copy=False)
    peak = logits.max(axis=-1, keepdims=True)
    with np.errstate(invalid="ignore", over="ignore"):  # non-finite logits are reported by the caller
        lse = np.log(np.exp(logits - peak).sum(axis=-1)) + peak[..., 0]
        picked = np.take_along_axis(logits, y[..., None], axis=-1)[..., 0]
        return (lse - picked).astype(np.float32)


class _NumpyAdapter:
    def __init__(self, forward: Callable[[np.ndarray], np.ndarray]) -> None:
        self.forward = forward

    def logits(self, x: np.ndarray, vocab: int) -> np.ndarray:
        out = np.asarray(self.forward(x.astype(np.int64)))
        _check_logits_shape(out.shape, *x.shape, vocab)
        return out.astype(np.float32, copy=False)

    def nats(self, x: np.ndarray, y: np.ndarray, vocab: int) -> np.ndarray:
        return _log_softmax_nats(self.logits(x, vocab), y)

    def nats_probed(self, x, y, vocab, x_alt, ts):
        logits, alt = self.logits(x, vocab), self.logits(x_alt, vocab)
        before = np.arange(x.shape[1])[None, :] <= ts[:, None]
        with np.errstate(invalid="ignore"):
            moved = np.where(before, np.abs(alt - logits).max(axis=-1), 0.0).max(axis=1)
        return _log_softmax_nats(logits, y), moved, np.abs(logits).max(axis=(1, 2))

    def release(self) -> None:
        pass


class _TorchAdapter:
    def __init__(self, forward: Callable[[Any], Any], device: str) -> None:
        import torch

        self.torch = torch
        self.forward = forward
        self.device = torch.device(device)

    def _forward(self, x: np.ndarray, vocab: int) -> Any:
        inputs = self.torch.from_numpy(x.astype(np.int64)).to(self.device)
        out = self.forward(inputs)
        if not isinstance(out, self.torch.Tensor):
            raise EvaluationError(f"forward returned {type(out).__name__}, expected a torch.Tensor of logits")
        _check_logits_shape(out.shape, *x.shape, vocab)
        return out

    def logits(self, x: np.ndarray, vocab: int) -> np.ndarray:
        with self.torch.no_grad():
            return self._forward(x, vocab).float().cpu().numpy()

    def nats(self, x: np.ndarray, y: np.ndarray, vocab: int) -> np.ndarray:
        with self.torch.no_grad():
            return self._nats(self._forward(x, vocab), y)

    def _nats(self, logits: Any, y: np.ndarray) -> np.ndarray:
        F = self.torch.nn.functional
        v = logits.shape[-1]
        targets = self.torch.from_numpy(y.astype(np.int64)).to(logits.device)
        nats = F.cross_entropy(logits.float().reshape(-1, v), targets.reshape(-1), reduction="none")
        return nats.view(y.shape).cpu().numpy()

    def nats_probed(self, x, y, vocab, x_alt, ts):
        torch = self.torch
        with torch.no_grad():
            logits = self._forward(x, vocab)
            alt = self._forward(x_alt, vocab)
            before = torch.arange(x.shape[1], device=logits.device)[None, :] <= torch.from_numpy(ts).to(logits.device)[:, None]
            moved = (alt.float() - logits.float()).abs().amax(dim=-1)
            moved = torch.where(before, moved, torch.zeros_like(moved)).amax(dim=1)
            scale = logits.float().abs().amax(dim=(1, 2))
            return self._nats(logits, y), moved.cpu().numpy(), scale.cpu().numpy()

    def release(self) -> None:
        pass  # tensors die with the micro-batch; the caching allocator reuses their blocks


class _MlxAdapter:
    def __init__(self, forward: Callable[[Any], Any]) -> None:
        import mlx.core as mx

        self.mx = mx
        self.forward = forward
        self._clear_cache()  # hand back buffers cached by training before eval allocates

    def _forward(self, x: np.ndarray, vocab: int) -> Any:
        out = self.forward(self.mx.array(x.astype(np.int32)))
        if not isinstance(out, self.mx.array):
            raise EvaluationError(f"forward returned {type(out).__name__}, expected an mx.array of logits")
        _check_logits_shape(out.shape, *x.shape, vocab)
        return out

    def logits(self, x: np.ndarray, vocab: int) -> np.ndarray:
        out = self._forward(x, vocab).astype(self.mx.float32)
        self.mx.eval(out)
        return np.array(out)

    def nats(self, x: np.ndarray, y: np.ndarray, vocab: int) -> np.ndarray:
        nats = self._nats(self._forward(x, vocab).astype(self.mx.float32), y)
        self.mx.eval(nats)
        return np.array(nats)

    def _nats(self, logits: Any, y: np.ndarray) -> Any:
        mx = self.mx
        targets = mx.array(y.astype(np.int32))
        picked = mx.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
        return mx.logsumexp(logits, axis=-1) - picked

    def nats_probed(self, x, y, vocab, x_alt, ts):
        mx = self.mx
        logits = self._forward(x, vocab).astype(mx.float32)
        alt = self._forward(x_alt, vocab).astype(mx.float32)
        before = mx.arange(x.shape[1])[None, :] <= mx.array(ts.astype(np.int32))[:, None]
        moved = mx.where(before, mx.abs(alt - logits).max(axis=-1), 0.0).max(axis=1)
        scale = mx.abs(logits).max(axis=(1, 2))
        nats = self._nats(logits, y)
        mx.eval(nats, moved, scale)
        return np.array(nats), np.array(moved), np.array(scale)

    def release(self) -> None:
        self._clear_cache()

    def _clear_cache(self) -> None:
        clear = getattr(self.mx, "clear_cache", None) or getattr(getattr(self.mx, "metal", None), "clear_cache", None)
        if clear is not None:
            clear()
