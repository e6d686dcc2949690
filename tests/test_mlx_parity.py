"""Parity of the MLX trainer with the reference (torch) trainer: the same initial weights loaded into
both models give the same logits and the same optimizer updates (Muon and AdamW), in fp32 on CPU.

Both trainers are imported from their files without running main(). torch is imported first: the
MLX trainer loads OpenBLAS into the process, which should come after torch's own threads are set up.

Tolerances, and why:
- logits: max |difference| <= 1e-4 (their scale here is ~1-10). Both compute in fp32; only the
  summation order differs (OpenBLAS vs torch's BLAS, MLX's vs torch's SDPA), ~1e-6 relative.
- loss: relative difference <= 1e-5, for the same reason.
- parameter updates after each of the first two steps, per parameter, as the relative Frobenius
  error ||du_mlx - du_torch|| / ||du_torch||:
  * AdamW (embeddings, value embeddings, head, scalars): <= 1e-2. Adam passes the gradients' ~1e-6
    rounding differences through unchanged (measured ~1e-6) except where a gradient is as small as
    its eps (1e-10): there the update lr * g / (|g| + eps) depends on the gradient's last bits
    (measured: one value-embedding element with g = 9e-11 moves by 0.69 vs 0.82, 9e-4 of the norm).
  * Muon (every transformer matrix): <= 2e-2. Polar Express multiplies the smallest singular
    directions by up to ~8 x 4 x 3.9 x 3.3 x 2.3 ~ 950 over its 5 steps; a gradient of batch 3 x 64
    is far from full rank, so the fp32 noise in its near-null directions grows to ~1e-3 of the
    orthogonalised update (measured: <= 2.1e-3 on the MLP input matrices, ~5e-6 elsewhere).
  A sign error, a wrong coefficient, learning rate or bias correction, or a missing NorMuon or
  weight-decay term moves an update by far more (O(1) relative).
"""

from __future__ import annotations


import numpy as np
import pytest
from trainer_helpers import load_trainer, parity_weights

torch = pytest.importorskip("torch")
mx = pytest.importorskip("mlx.core", reason="the MLX trainer needs mlx (pip install 'mlx[cpu]' on Linux)")

LOGITS_ATOL = 1e-4
LOSS_RTOL = 1e-5
ADAMW_UPDATE_RTOL = 1e-2
MUON_UPDATE_RTOL = 2e-2




ref = load_trainer("cuda")
ml = load_trainer("mlx")
mx.set_default_device(mx.cpu)

# GQA (4 query heads, 2 kv heads), value embeddings with gates on layers 0 and 2, a sliding window on
# layer 0 (32 of 64 positions: the masked path) and full windows elsewhere.
CONFIG = dict(sequence_len=64, vocab_size=512, n_layer=3, n_head=4, n_kv_head=2, n_embd=128, window_pattern="SL")


@pytest.fixture(scope="module")
def weights():
    return {name: w.numpy().copy() for name, w in parity_weights(ref, CONFIG).items()}


def torch_model(weights):
    model = ref.build_model(ref.GPTConfig(**CONFIG), torch.device("cpu"), torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.from_numpy(weights[name]))
    return model


def mlx_model(weights):
    model = ml.build_model(ml.GPTConfig(**CONFIG), mx.float32)
    model.update(ml.tree_map_with_path(lambda name, p: mx.array(weights[name]), model.parameters()))
    return model


def batch(seed):
    rng = np.random.default_rng(seed)
    return (rng.integers(0, CONFIG["vocab_size"], (3, CONFIG["sequence_len"]), dtype=np.int32) for _ in range(2))


def mlx_params(model):
    return {name: np.array(p) for name, p in ml.tree_flatten(model.parameters())}


def test_both_trainers_name_and_shape_parameters_the_same(weights):
    assert {n: p.shape for n, p in mlx_params(mlx_model(weights)).items()} == {n: w.shape for n, w in weights.items()}


def test_logits_and_loss_agree(weights):
    x, y = batch(0)
    tm, mm = torch_model(weights), mlx_model(weights)
    with torch.no_grad():
        t_logits = tm(torch.from_numpy(x).long()).numpy()
        t_loss = tm(torch.from_numpy(x).long(), torch.from_numpy(y).long()).item()
    m_logits = np.array(mm(mx.array(x)))
    assert np.abs(t_logits).max() > 1.0  # real logits, not the ~0 of an untrained head
    assert np.abs(m_logits - t_logits).max() <= LOGITS_ATOL
    assert mm(mx.array(x), mx.array(y)).item() == pytest.approx(t_loss, rel=LOSS_RTOL)


def test_polar_express_agrees():
    rng = np.random.default_rng(0)
    for shape in [(2, 256, 64), (2, 64, 256), (3, 48, 48)]:
        G = rng.standard_normal(shape).astype(np.float32)
        t = ref.polar_express(torch.from_numpy(G), 5, torch.float32).numpy()
        m = np.array(ml.polar_express(mx.array(G), 5, mx.float32))
        assert np.linalg.norm(m - t) / np.linalg.norm(t) < 1e-4, shape


def test_first_optimizer_steps_update_the_same_way(weights):
    tm, mm = torch_model(weights), mlx_model(weights)
    t_opt = ref.setup_optimizer(tm, compiled=False, polar_dtype=torch.float32)
    m_opt = ml.setup_optimizer(mm, polar_dtype=mx.float32)
    m_step = ml.build_train_step(mm, m_opt, grad_accum_steps=1)
    muon = {name for name, _ in tm.named_parameters() if name.startswith("transformer.h.")}
    before = dict(weights)
    for step, progress in enumerate([0.0, 0.7]):  # the second step inside the warmdown: lr and wd move
        x, y = batch(step + 1)
        t_loss = tm(torch.from_numpy(x).long(), torch.from_numpy(y).long())
        t_loss.backward()
        ref.apply_schedules(t_opt, step, progress)
        t_opt.step()
        tm.zero_grad(set_to_none=True)

        ml.apply_schedules(m_opt, step, progress)
        m_loss, _ = m_step(mx.array(x), mx.array(y), None, True)
        mx.eval(m_loss, mm.state, m_opt.state)
        assert m_loss.item() == pytest.approx(t_loss.item(), rel=LOSS_RTOL)

        after_t = {name: p.detach().numpy().copy() for name, p in tm.named_parameters()}
        after_m = mlx_params(mm)
        for name in weights:
            du_t, du_m = after_t[name] - before[name], after_m[name] - before[name]
            assert np.linalg.norm(du_t) > 0, f"{name} did not move in the reference"
            rtol = MUON_UPDATE_RTOL if name in muon else ADAMW_UPDATE_RTOL
            err = np.linalg.norm(du_m - du_t) / np.linalg.norm(du_t)
            assert err <= rtol, f"step {step}: {name} update differs by {err:.2e} (> {rtol:.0e})"
        before = after_t
        # continue both from the reference's weights, so step 2 compares one step, not accumulated drift
        mm.update(ml.tree_map_with_path(lambda name, p: mx.array(after_t[name]), mm.parameters()))
