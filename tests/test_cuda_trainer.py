"""The reference trainer (backends/cuda/train.py): model, optimizer and platform choices on CPU,
and one short real training run of the cpu-tiny preset."""

from __future__ import annotations

import math
import re

import pytest
import torch
from trainer_helpers import training_setup, check_trained, load_trainer



tr = load_trainer('cuda')
CPU = torch.device("cpu")


def tiny_config(**overrides):
    values = dict(sequence_len=32, vocab_size=97, n_layer=3, n_head=4, n_kv_head=2, n_embd=64, window_pattern="SL")
    values.update(overrides)
    return tr.GPTConfig(**values)


def tiny_model(seed=0, dtype=torch.float32, **overrides):
    torch.manual_seed(seed)
    return tr.build_model(tiny_config(**overrides), CPU, dtype)


def tokens(B, T, V, seed=0):
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))


# -- model -------------------------------------------------------------------------------------

def test_forward_returns_softcapped_float32_logits_and_loss_near_uniform_at_init():
    model = tiny_model()
    x, y = tokens(2, 32, 97), tokens(2, 32, 97, seed=1)
    logits = model(x)
    assert logits.shape == (2, 32, 97) and logits.dtype == torch.float32
    assert logits.abs().max() <= 15.0
    loss = model(x, y)
    assert loss.ndim == 0
    # lm_head ~ N(0, 0.001): the untrained model predicts nearly uniformly
    assert abs(loss.item() - math.log(97)) < 0.05
    assert model(x, y, reduction="none").shape == (64,)


def test_logits_are_soft_capped_at_15():
    model = tiny_model()
    with torch.no_grad():
        model.lm_head.weight.normal_(0, 10.0)  # raw logits in the hundreds
        logits = model(tokens(2, 32, 97))
    assert 14.0 < logits.abs().max() <= 15.0


def test_bf16_autocast_forward_matches_fp32_shapes():
    model = tiny_model(dtype=torch.bfloat16)
    assert model.transformer.wte.weight.dtype == torch.bfloat16
    assert model.value_embeds["2"].weight.dtype == torch.bfloat16
    with torch.amp.autocast("cpu", dtype=torch.bfloat16):
        logits = model(tokens(2, 32, 97))
    assert logits.shape == (2, 32, 97) and logits.dtype == torch.float32 and torch.isfinite(logits).all()


@pytest.mark.parametrize("pattern", ["L", "SL", "S"])
def test_model_is_causal(pattern):
    model = tiny_model(window_pattern=pattern, n_kv_head=4)
    # random weights everywhere (zero-init projections would hide leaks)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
    x = tokens(1, 32, 97)
    t = 13
    x2 = x.clone()
    x2[0, t + 1:] = (x2[0, t + 1:] + 1) % 97
    with torch.no_grad():
        a, b = model(x), model(x2)
    torch.testing.assert_close(a[:, :t + 1], b[:, :t + 1], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(a[:, t + 1:], b[:, t + 1:])


def _reference_attention(q, k, v, window):
    """Plain softmax attention on (B, T, H, D) with keys [i - window, i] visible."""
    B, T, H, D = q.shape
    reps = H // k.size(2)
    k, v = k.repeat_interleave(reps, dim=2), v.repeat_interleave(reps, dim=2)
    scores = torch.einsum("bihd,bjhd->bhij", q, k) / math.sqrt(D)
    i = torch.arange(T)
    visible = (i[:, None] >= i[None, :]) & (i[:, None] - i[None, :] <= window)
    scores = scores.masked_fill(~visible, float("-inf"))
    return torch.einsum("bhij,bjhd->bihd", scores.softmax(-1), v)


@pytest.mark.parametrize("window,kv_heads", [(31, 4), (16, 4), (7, 4), (7, 2), (0, 1)])
def test_sdpa_attention_matches_reference_with_windows_and_gqa(window, kv_heads):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 32, 4, 16, generator=g)
    k, v = (torch.randn(2, 32, kv_heads, 16, generator=g) for _ in range(2))
    out = tr.attention(q, k, v, window)
    torch.testing.assert_close(out, _reference_attention(q, k, v, window), atol=1e-5, rtol=1e-5)


def test_sliding_window_sees_exactly_the_last_window_plus_one_keys():
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 32, 2, 16, generator=g) for _ in range(3))
    window, i = 8, 20
    base = tr.attention(q, k, v, window)[0, i]
    for j, should_matter in [(i - window - 1, False), (i - window, True), (i, True), (i + 1, False)]:
        v2 = v.clone()
        v2[0, j] += 5.0
        changed = not torch.allclose(tr.attention(q, k, v2, window)[0, i], base)
        assert changed == should_matter, f"key {j} for query {i} with window {window}"


def test_qk_norm_makes_attention_blind_to_the_scale_of_queries_and_keys():
    model = tiny_model()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
    x = tokens(2, 32, 97)
    with torch.no_grad():
        before = model(x)
        for block in model.transformer.h:
            block.attn.c_q.weight.mul_(7.0)
            block.attn.c_k.weight.mul_(0.2)
        after = model(x)
    torch.testing.assert_close(before, after, atol=1e-4, rtol=1e-4)


def test_window_pattern_tiles_with_half_context_and_full_last_layer():
    model_windows = lambda pattern, n: tr.GPT._compute_window_sizes(None, tiny_config(window_pattern=pattern, n_layer=n))
    assert model_windows("SSSL", 8) == [16, 16, 16, 32, 16, 16, 16, 32]
    assert model_windows("S", 3) == [16, 16, 32]
    with pytest.raises(ValueError, match="WINDOW_PATTERN"):
        model_windows("SXL", 3)


def test_init_matches_upstream():
    model = tiny_model(n_layer=4)
    s = 3**0.5 * 64**-0.5
    assert sorted(model.value_embeds.keys()) == ["1", "3"]  # alternating, last layer included
    for i, block in enumerate(model.transformer.h):
        assert torch.count_nonzero(block.attn.c_proj.weight) == 0
        assert torch.count_nonzero(block.mlp.c_proj.weight) == 0
        assert block.attn.c_q.weight.abs().max() <= s and block.attn.c_q.weight.std() > 0.5 * s / 3**0.5
        assert (block.attn.ve_gate is not None) == (i % 2 == 1)
        if block.attn.ve_gate is not None:
            assert torch.count_nonzero(block.attn.ve_gate.weight) == 0
    assert torch.all(model.resid_lambdas == 1.0) and torch.allclose(model.x0_lambdas, torch.full((4,), 0.1))
    assert abs(model.transformer.wte.weight.std().item() - 1.0) < 0.05
    assert abs(model.lm_head.weight.std().item() - 0.001) < 1e-4
    assert model.lm_head.weight.data_ptr() != model.transformer.wte.weight.data_ptr()  # untied


def test_default_config_flops_and_params_match_upstream_on_meta():
    config = tr.build_model_config(8192, 2048, depth=8, aspect_ratio=64, head_dim=128, window_pattern="SSSL")
    assert (config.n_embd, config.n_head, config.n_kv_head) == (512, 4, 4)
    with torch.device("meta"):
        model = tr.GPT(config)
    assert model.transformer.wte.weight.is_meta  # nothing allocated
    assert model.estimate_flops() == 239_078_400
    counts = model.num_scaling_params()
    assert counts["total"] == 50_332_176
    assert (counts["wte"], counts["value_embeds"], counts["lm_head"], counts["scalars"]) == (
        4_194_304, 16_777_216, 4_194_304, 16)


# -- optimizer ---------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(128, 64), (64, 128), (3, 96, 48)])
def test_polar_express_gives_singular_values_near_one(shape):
    G = torch.randn(*shape, generator=torch.Generator().manual_seed(0)) * 3
    X = tr.polar_express(G, 5, torch.float32)
    s = torch.linalg.svdvals(X)
    assert s.min() > 0.8 and s.max() < 1.2
    U, _, Vh = torch.linalg.svd(G, full_matrices=False)
    assert (X - U @ Vh).norm() / (U @ Vh).norm() < 0.15  # close to the exact polar factor


def _muon_once(p, g, momentum=0.95, lr=0.02, wd=0.0):
    """One muon_step on a single (rows, cols) matrix with fresh buffers; returns (new p, buffers)."""
    params, grads = p.clone()[None], g.clone()[None]
    buf = torch.zeros_like(params)
    second = torch.zeros(1, *((p.size(0), 1) if p.size(0) >= p.size(1) else (1, p.size(1))))
    red_dim = -1 if p.size(0) >= p.size(1) else -2
    tr.muon_step(grads, params, buf, second, momentum, lr, wd, 0.95, 5, red_dim, torch.float32)
    return params[0], buf[0], second[0]


def test_muon_momentum_buffer_is_an_ema_of_gradients():
    g = torch.randn(32, 16, generator=torch.Generator().manual_seed(0))
    _, buf, _ = _muon_once(torch.randn(32, 16), g, momentum=0.95)
    torch.testing.assert_close(buf, 0.05 * g)


def test_muon_weight_decay_is_cautious():
    gen = torch.Generator().manual_seed(0)
    p, g = torch.randn(32, 16, generator=gen), torch.randn(32, 16, generator=gen)
    lr, wd = 0.02, 0.5
    plain, _, _ = _muon_once(p, g, momentum=0.0, lr=lr)
    decayed, _, _ = _muon_once(p, g, momentum=0.0, lr=lr, wd=wd)
    update = (p - plain) / lr  # the orthogonalised, NorMuon-scaled step
    agree = (update * p) >= 0
    assert 0.2 < agree.float().mean() < 0.8
    # decay only where the update already pushes the weight towards zero
    torch.testing.assert_close(plain - decayed, lr * wd * p * agree, atol=1e-6, rtol=1e-4)


def test_optimizer_groups_follow_upstream():
    model = tiny_model()
    opt = tr.setup_optimizer(model, polar_dtype=torch.float32)
    adamw = [g for g in opt.param_groups if g["kind"] == "adamw"]
    muon = [g for g in opt.param_groups if g["kind"] == "muon"]
    scale = (64 / 768) ** -0.5
    assert adamw[0]["params"][0] is model.lm_head.weight and adamw[0]["lr"] == pytest.approx(tr.UNEMBEDDING_LR * scale)
    assert adamw[1]["params"][0] is model.transformer.wte.weight
    assert adamw[3]["params"][0] is model.resid_lambdas and adamw[3]["lr"] == pytest.approx(tr.SCALAR_LR * 0.01)
    assert adamw[4]["params"][0] is model.x0_lambdas and adamw[4]["betas"] == (0.96, 0.95)
    assert all(g["eps"] == 1e-10 for g in adamw)
    muon_params = {id(p) for g in muon for p in g["params"]}
    assert muon_params == {id(p) for p in model.transformer.h.parameters()}
    assert all(len({p.shape for p in g["params"]}) == 1 for g in muon)


def test_muon_lr_grows_with_sqrt_of_the_aspect_ratio_of_tall_matrices():
    model = tiny_model(n_layer=1, window_pattern="L")
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)  # no zero-init projection blocking the gradients
    opt = tr.setup_optimizer(model, polar_dtype=torch.float32, weight_decay=0.0)
    attn, mlp = model.transformer.h[0].attn, model.transformer.h[0].mlp
    before = {"c_v": attn.c_v.weight.detach().clone(), "c_fc": mlp.c_fc.weight.detach().clone()}
    model(tokens(4, 32, 97), tokens(4, 32, 97, seed=1)).backward()
    opt.step()
    # orthogonalised updates have unit-scale singular values: the step norm ratio is the lr ratio
    # (c_fc is 256x64: lr * sqrt(4) = 2x; c_v is 32x64, wide: 1x) times sqrt(64 / 32) of their ranks
    ratio = (mlp.c_fc.weight - before["c_fc"]).norm() / (attn.c_v.weight - before["c_v"]).norm()
    assert 2 * 2**0.5 * 0.8 < ratio < 2 * 2**0.5 * 1.25


def test_optimizer_steps_change_every_parameter_and_lower_the_loss():
    model = tiny_model()
    opt = tr.setup_optimizer(model, polar_dtype=torch.float32)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    x, y = tokens(4, 32, 97), tokens(4, 32, 97, seed=1)
    losses = []
    for step in range(8):
        loss = model(x, y)
        loss.backward()
        tr.apply_schedules(opt, step, progress=0.0)
        opt.step()
        model.zero_grad(set_to_none=True)
        losses.append(loss.item())
    # (after the first step only the zero-init projections move: they gate every other gradient)
    unchanged = [n for n, p in model.named_parameters() if torch.equal(p, before[n])]
    assert unchanged == []
    assert losses[-1] < losses[0] - 0.5, losses


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # raised inside inductor, not here
def test_compiled_optimizer_steps_match_eager():
    """Compiled steps take 0-D CPU tensors, eager steps Python floats: same arithmetic either way."""
    models = [tiny_model(n_layer=1, window_pattern="L") for _ in range(2)]
    for m in models:  # leave the zero init, where Adam's sign-like steps on ~0 gradients amplify rounding
        torch.manual_seed(1)
        with torch.no_grad():
            for p in m.parameters():
                p.add_(torch.randn_like(p) * 0.05)
    opts = [tr.setup_optimizer(m, compiled=c, polar_dtype=torch.float32) for m, c in zip(models, (False, True))]
    x, y = tokens(2, 32, 97), tokens(2, 32, 97, seed=1)
    start = [p.detach().clone() for p in models[0].parameters()]
    for step in range(2):
        for m, o in zip(models, opts):
            m(x, y).backward()
            tr.apply_schedules(o, step, progress=0.6)  # inside the warmdown: lr and wd both changing
            o.step()
            m.zero_grad(set_to_none=True)
    for (name, a), b, a0 in zip(models[0].named_parameters(), models[1].parameters(), start):
        # relative to the update itself; a rare cautious-WD mask flip on a ~0 product is allowed
        assert (a - b).norm() <= 1e-2 * (a - a0).norm() + 1e-7, name


def test_schedules():
    assert tr.get_lr_multiplier(0.0) == 1.0 or tr.WARMUP_RATIO > 0
    assert tr.get_lr_multiplier(1.0) == pytest.approx(tr.FINAL_LR_FRAC)
    mid = 1.0 - tr.WARMDOWN_RATIO / 2
    assert tr.get_lr_multiplier(mid) == pytest.approx(0.5 + 0.5 * tr.FINAL_LR_FRAC)
    assert tr.get_muon_momentum(0) == pytest.approx(0.85) and tr.get_muon_momentum(300) == pytest.approx(0.95)
    assert tr.get_muon_momentum(150) == pytest.approx(0.90) and tr.get_muon_momentum(10_000) == pytest.approx(0.95)
    assert tr.get_weight_decay(0.0) == tr.WEIGHT_DECAY and tr.get_weight_decay(1.0) == 0.0


# -- platform choices --------------------------------------------------------------------------

# (the choices themselves, FA3, compile, dtype and the OOM ladder, are tested in test_platform.py
# through harness.hardware.platform, which makes them for every torch trainer)

def test_detect_platform_on_cpu_picks_sdpa_and_says_why(monkeypatch, capsys):
    monkeypatch.delenv("AUTORESEARCH_COMPILE", raising=False)
    monkeypatch.delenv("AUTORESEARCH_DTYPE", raising=False)
    plat = tr.detect_platform("cpu")
    out = capsys.readouterr().out
    assert plat.flash_attn is None and not plat.compile and plat.device.type == "cpu"
    assert re.search(r"attention: SDPA: device is cpu; FlashAttention kernels are CUDA-only", out)
    assert re.search(r"compile:\s+off \(eager\): CPU", out)
    assert plat.polar_dtype == torch.float32
    assert plat.peak_memory_mb() > 0 and plat.device_name


def test_requesting_cuda_without_cuda_says_what_to_do():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(SystemExit, match="AUTORESEARCH_DEVICE=cpu"):
        tr.detect_platform("cuda")


# -- end to end --------------------------------------------------------------------------------

@pytest.mark.slow
def test_trains_cpu_tiny_preset_and_lowers_the_loss(tiny_setup_factory):
    tiny_setup = training_setup(tiny_setup_factory, "cuda")
    # the cpu-tiny constants `setup` wrote, at a quarter of the batch (trainer_helpers.SMALL_BATCH)
    proc = tiny_setup.run_trainer(PYTHONUNBUFFERED="1", AUTORESEARCH_COMPILE="", AUTORESEARCH_DTYPE="")
    out = check_trained(proc, "cuda")
    assert "attention: SDPA" in out and "compile:   off (eager)" in out
