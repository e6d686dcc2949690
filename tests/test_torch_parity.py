"""Parity of the three torch trainers (reference cuda, mps, rocm): the same initial weights and the
same batch give the same logits, the same loss, and the same first optimizer updates, in fp32 on
CPU, so the three search the same problem. Each trainer is imported from its file without running
main().

Tolerances, and why. The three files share the model and the optimizer arithmetic; what differs is
hardware plumbing that must not change the numbers:
- MPS repeats kv heads with repeat_interleave instead of SDPA's enable_gqa (same sums, possibly in a
  different order) and runs AdamW through an fp32 view of the parameter (a no-op in fp32);
- ROCm is the reference minus the FA3 path.
So in fp32 on one CPU the forward passes agree to rounding: logits within 1e-5 absolute (their
scale here is ~1-10; measured: identical) and losses within 1e-6 relative (measured: identical).
The backward passes differ in the last bits where MPS repeats kv heads (repeat_interleave's backward
sums the repeated heads in another order than SDPA's enable_gqa): measured <= 1.6e-5 of a
parameter's gradient norm. Per parameter, as ||du - du_ref|| / ||du_ref|| after each of the first two steps:
- AdamW (embeddings, value embeddings, head, scalars): <= 1e-4 (measured <= 3e-7; ROCm: 0);
- Muon (every transformer matrix): <= 2e-3. Polar Express multiplies the smallest singular
  directions of a gradient by up to ~8 x 4 x 3.9 x 3.3 x 2.3 ~ 950 over its 5 steps, and a
  gradient of batch 3 x 64 is far from full rank, so rounding in its near-null directions can grow to
  ~1e-3 of the update (measured on MPS: 3.1e-4 on layer 0's MLP output matrix at the first step,
  <= 4e-6 elsewhere; ROCm: 0).
A wrong sign, coefficient, learning rate, bias correction, or a missing NorMuon or weight-decay
term moves an update by O(1) of its norm.
"""

from __future__ import annotations


import pytest
import torch
from trainer_helpers import load_trainer, parity_weights

LOGITS_ATOL = 1e-5
LOSS_RTOL = 1e-6
ADAMW_UPDATE_RTOL = 1e-4
MUON_UPDATE_RTOL = 2e-3

# GQA (4 query heads, 2 kv heads), value embeddings with gates on layers 0 and 2, a sliding window on
# layer 0 (32 of 64 positions: the masked path) and full windows elsewhere.
CONFIG = dict(sequence_len=64, vocab_size=512, n_layer=3, n_head=4, n_kv_head=2, n_embd=128, window_pattern="SL")




TRAINERS = {name: load_trainer(name, f"{name}_train_parity") for name in ("cuda", "mps", "rocm")}
ref = TRAINERS["cuda"]
OTHERS = ("mps", "rocm")


@pytest.fixture(scope="module")
def weights():
    return parity_weights(ref, CONFIG)


def model_of(backend, weights):
    tr = TRAINERS[backend]
    model = tr.build_model(tr.GPTConfig(**CONFIG), torch.device("cpu"), torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(weights[name])
    return model


def optimizer_of(backend, model):
    tr = TRAINERS[backend]
    if backend == "mps":  # always eager there: no `compiled` switch
        return tr.setup_optimizer(model, polar_dtype=torch.float32)
    return tr.setup_optimizer(model, compiled=False, polar_dtype=torch.float32)


def batch(seed):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randint(0, CONFIG["vocab_size"], (3, CONFIG["sequence_len"]), generator=g) for _ in range(2))


def test_the_trainers_name_and_shape_parameters_the_same(weights):
    for backend in OTHERS:
        model = model_of(backend, weights)
        assert {n: p.shape for n, p in model.named_parameters()} == {n: w.shape for n, w in weights.items()}
        assert model.window_sizes == model_of("cuda", weights).window_sizes == [32, 64, 64]


@pytest.mark.parametrize("backend", OTHERS)
def test_logits_and_loss_agree_with_the_reference(weights, backend):
    x, y = batch(0)
    with torch.no_grad():
        ref_model, model = model_of("cuda", weights), model_of(backend, weights)
        ref_logits, logits = ref_model(x), model(x)
        ref_loss, loss = ref_model(x, y).item(), model(x, y).item()
    assert ref_logits.abs().max() > 1.0  # real logits, not the ~0 of an untrained head
    assert (logits - ref_logits).abs().max().item() <= LOGITS_ATOL
    assert loss == pytest.approx(ref_loss, rel=LOSS_RTOL)


@pytest.mark.parametrize("backend", OTHERS)
def test_first_optimizer_steps_update_the_same_way(weights, backend):
    ref_model, model = model_of("cuda", weights), model_of(backend, weights)
    ref_opt, opt = optimizer_of("cuda", ref_model), optimizer_of(backend, model)
    tr = TRAINERS[backend]
    muon = {name for name, _ in ref_model.named_parameters() if name.startswith("transformer.h.")}
    before = {name: w.clone() for name, w in weights.items()}
    for step, progress in enumerate([0.0, 0.7]):  # the second step inside the warmdown: lr and wd move
        x, y = batch(step + 1)
        losses = []
        for m, o, module in ((ref_model, ref_opt, ref), (model, opt, tr)):
            loss = m(x, y)
            loss.backward()
            module.apply_schedules(o, step, progress)
            o.step()
            m.zero_grad(set_to_none=True)
            losses.append(loss.item())
        assert losses[1] == pytest.approx(losses[0], rel=LOSS_RTOL)
        ref_after = {name: p.detach().clone() for name, p in ref_model.named_parameters()}
        after = {name: p.detach().clone() for name, p in model.named_parameters()}
        for name in weights:
            du_ref, du = ref_after[name] - before[name], after[name] - before[name]
            assert du_ref.norm() > 0, f"{name} did not move in the reference"
            err = ((du - du_ref).norm() / du_ref.norm()).item()
            rtol = MUON_UPDATE_RTOL if name in muon else ADAMW_UPDATE_RTOL
            assert err <= rtol, f"step {step}: {name} update differs by {err:.2e} (> {rtol:.0e})"
        before = ref_after
        with torch.no_grad():  # go on from the reference's weights: step 2 compares one step, not drift
            for name, p in model.named_parameters():
                p.copy_(ref_after[name])
