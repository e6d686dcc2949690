"""The MLX trainer (backends/mlx/train.py) on MLX's CPU build: model, Muon/AdamW, the compiled
step, platform choices, and one short real training run of the cpu-tiny preset."""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import pytest
from trainer_helpers import training_setup, check_trained, load_trainer

mx = pytest.importorskip("mlx.core", reason="the MLX trainer needs mlx (pip install 'mlx[cpu]' on Linux)")

ROOT = Path(__file__).resolve().parents[1]
TRAINER = ROOT / "backends" / "mlx" / "train.py"


ml = load_trainer('mlx')
mx.set_default_device(mx.cpu)


def tiny_config(**overrides):
    values = dict(sequence_len=32, vocab_size=97, n_layer=3, n_head=4, n_kv_head=2, n_embd=64, window_pattern="SL")
    values.update(overrides)
    return ml.GPTConfig(**values)


def tiny_model(seed=0, dtype=mx.float32, **overrides):
    mx.random.seed(seed)
    return ml.build_model(tiny_config(**overrides), dtype)


def tokens(B, T, V, seed=0):
    return mx.array(np.random.default_rng(seed).integers(0, V, (B, T), dtype=np.int32))


def params_of(model):
    return dict(ml.tree_flatten(model.parameters()))


def randomize(model, std=0.3, seed=0):
    """Random weights everywhere: zero-init projections would hide leaks and dead paths."""
    mx.random.seed(seed)
    model.update(ml.tree_map(lambda p: std * mx.random.normal(p.shape), model.parameters()))


# -- model -------------------------------------------------------------------------------------

def test_forward_returns_softcapped_float32_logits_and_loss_near_uniform_at_init():
    model = tiny_model()
    x, y = tokens(2, 32, 97), tokens(2, 32, 97, seed=1)
    logits = model(x)
    assert logits.shape == (2, 32, 97) and logits.dtype == mx.float32
    assert mx.abs(logits).max().item() <= 15.0
    loss = model(x, y)
    assert loss.ndim == 0
    # lm_head ~ N(0, 0.001): the untrained model predicts nearly uniformly
    assert abs(loss.item() - math.log(97)) < 0.05
    assert model(x, y, reduction="none").shape == (2, 32)


def test_targets_of_minus_one_are_ignored():
    model = tiny_model()
    randomize(model)
    x, y = tokens(1, 32, 97), tokens(1, 32, 97, seed=1)
    masked = mx.concatenate([y[:, :16], mx.full((1, 16), -1, dtype=mx.int32)], axis=1)
    per_position = model(x, y, reduction="none")
    assert model(x, masked).item() == pytest.approx(per_position[:, :16].mean().item(), rel=1e-5)


def test_bf16_compute_keeps_the_stream_bf16_and_the_master_weights_fp32():
    """fp32 residual scalars times a bf16 stream would promote the network to fp32 (a bug of the
    MLX community port); weights stay fp32 and are cast at use."""
    model = tiny_model(dtype=mx.bfloat16)
    seen = []

    class Recorder(ml.Linear):
        def __call__(self, x):
            seen.append(x.dtype)
            return super().__call__(x)

    head = Recorder(64, 97, bias=False)
    head.weight = model.lm_head.weight
    model.lm_head = head
    logits = model(tokens(2, 32, 97))
    assert seen == [mx.bfloat16]
    assert logits.dtype == mx.float32 and mx.all(mx.isfinite(logits)).item()
    # training in bf16: fp32 gradients reach the fp32 master weights, and the loss falls
    opt = ml.setup_optimizer(model)
    step = ml.build_train_step(model, opt, grad_accum_steps=1)
    x, y = tokens(4, 32, 97), tokens(4, 32, 97, seed=1)
    losses = []
    for i in range(4):
        ml.apply_schedules(opt, i, progress=0.0)
        loss, _ = step(x, y, None, True)
        mx.eval(loss, model.state, opt.state)
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.3, losses
    assert {p.dtype for p in params_of(model).values()} == {mx.float32}


@pytest.mark.parametrize("pattern", ["L", "SL", "S"])
def test_model_is_causal(pattern):
    model = tiny_model(window_pattern=pattern, n_kv_head=4)
    randomize(model)
    x = np.array(tokens(1, 32, 97))
    t = 13
    x2 = x.copy()
    x2[0, t + 1:] = (x2[0, t + 1:] + 1) % 97
    a, b = np.array(model(mx.array(x))), np.array(model(mx.array(x2)))
    np.testing.assert_allclose(a[:, :t + 1], b[:, :t + 1], atol=1e-5, rtol=1e-5)
    assert not np.allclose(a[:, t + 1:], b[:, t + 1:])


def _reference_attention(q, k, v, window):
    """Plain softmax attention in numpy on (B, T, H, D) with keys [i - window, i] visible."""
    B, T, H, D = q.shape
    reps = H // k.shape[2]
    k, v = np.repeat(k, reps, axis=2), np.repeat(v, reps, axis=2)
    scores = np.einsum("bihd,bjhd->bhij", q, k) / math.sqrt(D)
    i = np.arange(T)
    visible = (i[:, None] >= i[None, :]) & (i[:, None] - i[None, :] <= window)
    scores = np.where(visible, scores, -np.inf)
    p = np.exp(scores - scores.max(-1, keepdims=True))
    return np.einsum("bhij,bjhd->bihd", p / p.sum(-1, keepdims=True), v)


@pytest.mark.parametrize("window,kv_heads", [(31, 4), (7, 4), (7, 2), (0, 1)])
def test_sdpa_attention_matches_reference_with_windows_and_gqa(window, kv_heads):
    rng = np.random.default_rng(0)
    q = rng.standard_normal((2, 32, 4, 16)).astype(np.float32)
    k, v = (rng.standard_normal((2, 32, kv_heads, 16)).astype(np.float32) for _ in range(2))
    expected = _reference_attention(q, k, v, window)
    out = ml.attention(mx.array(q), mx.array(k), mx.array(v), window)
    np.testing.assert_allclose(np.array(out), expected, atol=1e-5, rtol=1e-5)
    # the model's cached mask, built for a longer context and sliced to this one
    cached = ml.band_mask(64, window, mx.float32)
    out = ml.attention(mx.array(q), mx.array(k), mx.array(v), window, cached)
    np.testing.assert_allclose(np.array(out), expected, atol=1e-5, rtol=1e-5)


def test_sliding_window_sees_exactly_the_last_window_plus_one_keys():
    rng = np.random.default_rng(1)
    q, k, v = (rng.standard_normal((1, 32, 2, 16)).astype(np.float32) for _ in range(3))
    window, i = 8, 20
    mask = ml.band_mask(32, window, mx.float32)

    def attend(values):
        return np.array(ml.attention(mx.array(q), mx.array(k), mx.array(values), window, mask))[0, i]

    base = attend(v)
    for j, should_matter in [(i - window - 1, False), (i - window, True), (i, True), (i + 1, False)]:
        v2 = v.copy()
        v2[0, j] += 5.0
        assert (not np.allclose(attend(v2), base)) == should_matter, f"key {j} for query {i} with window {window}"


def test_window_pattern_tiles_with_half_context_and_full_last_layer():
    model_windows = lambda pattern, n: ml.GPT._compute_window_sizes(None, tiny_config(window_pattern=pattern, n_layer=n))
    assert model_windows("SSSL", 8) == [16, 16, 16, 32, 16, 16, 16, 32]
    assert model_windows("S", 3) == [16, 16, 32]
    with pytest.raises(ValueError, match="WINDOW_PATTERN"):
        model_windows("SXL", 3)


def test_init_matches_upstream():
    model = tiny_model(n_layer=4)
    s = 3**0.5 * 64**-0.5
    assert sorted(model.value_embeds.keys()) == ["1", "3"]  # alternating, last layer included
    for i, block in enumerate(model.transformer.h):
        assert not mx.any(block.attn.c_proj.weight).item() and not mx.any(block.mlp.c_proj.weight).item()
        c_q = np.array(block.attn.c_q.weight)
        assert np.abs(c_q).max() <= s and c_q.std() > 0.5 * s / 3**0.5
        assert (block.attn.ve_gate is not None) == (i % 2 == 1)
        if block.attn.ve_gate is not None:
            assert not mx.any(block.attn.ve_gate.weight).item()
    assert mx.all(model.resid_lambdas == 1.0).item() and np.allclose(np.array(model.x0_lambdas), 0.1)
    assert abs(np.array(model.transformer.wte.weight).std() - 1.0) < 0.05
    assert abs(np.array(model.lm_head.weight).std() - 0.001) < 1e-4
    assert "_cos" not in params_of(model) and "window_sizes" not in str(list(params_of(model)))


def test_default_config_flops_and_params_match_upstream_without_computing_weights():
    config = ml.build_model_config(8192, 2048, depth=8, aspect_ratio=64, head_dim=128, window_pattern="SSSL")
    assert (config.n_embd, config.n_head, config.n_kv_head) == (512, 4, 4)
    model = ml.GPT(config)  # lazy: shapes only, nothing evaluated
    assert model.estimate_flops() == 239_078_400
    counts = model.num_scaling_params()
    assert counts["total"] == 50_332_176
    assert (counts["wte"], counts["value_embeds"], counts["lm_head"], counts["scalars"]) == (
        4_194_304, 16_777_216, 4_194_304, 16)


# -- optimizer ---------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(128, 64), (64, 128), (3, 96, 48)])
def test_polar_express_gives_singular_values_near_one_in_fp32(shape):
    G = 3 * np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    X = ml.polar_express(mx.array(G), 5, mx.float32)
    assert X.dtype == mx.float32
    X = np.array(X)
    s = np.linalg.svd(X, compute_uv=False)
    assert s.min() > 0.8 and s.max() < 1.2
    U, _, Vh = np.linalg.svd(G, full_matrices=False)
    assert np.linalg.norm(X - U @ Vh) / np.linalg.norm(U @ Vh) < 0.15  # close to the exact polar factor


def test_polar_express_survives_badly_scaled_gradients():
    G = 1e4 * np.random.default_rng(1).standard_normal((64, 32)).astype(np.float32)
    s = np.linalg.svd(np.array(ml.polar_express(mx.array(G))), compute_uv=False)
    assert np.isfinite(s).all() and s.max() < 1.2


def test_optimizer_groups_follow_upstream():
    model = tiny_model()
    opt = ml.setup_optimizer(model)
    adamw = [g for g in opt.param_groups if g["kind"] == "adamw"]
    muon = [g for g in opt.param_groups if g["kind"] == "muon"]
    scale = (64 / 768) ** -0.5
    assert adamw[0]["params"] == ["lm_head.weight"] and adamw[0]["lr"] == pytest.approx(ml.UNEMBEDDING_LR * scale)
    assert adamw[1]["params"] == ["transformer.wte.weight"]
    assert adamw[2]["params"] == ["value_embeds.0.weight", "value_embeds.2.weight"] and adamw[2]["lr"] == pytest.approx(ml.EMBEDDING_LR * scale)
    assert adamw[3]["params"] == ["resid_lambdas"] and adamw[3]["lr"] == pytest.approx(ml.SCALAR_LR * 0.01)
    assert adamw[4]["params"] == ["x0_lambdas"] and adamw[4]["betas"] == (0.96, 0.95)
    assert all(g["eps"] == 1e-10 for g in adamw)
    params = params_of(model)
    muon_params = [name for g in muon for name in g["params"]]
    assert sorted(muon_params) == sorted(n for n in params if n.startswith("transformer.h."))
    assert all(len({params[n].shape for n in g["params"]}) == 1 for g in muon)
    # Muon state is stacked per shape group; NorMuon's second moment reduces the longer side
    c_fc = next(i for i, g in enumerate(opt.param_groups) if "transformer.h.0.mlp.c_fc.weight" in g["params"])
    buffers = opt.state["buffers"][str(c_fc)]
    assert buffers["momentum_buffer"].shape == (3, 256, 64) and buffers["second_momentum_buffer"].shape == (3, 256, 1)


def test_optimizer_steps_change_every_parameter_and_lower_the_loss():
    model = tiny_model()
    opt = ml.setup_optimizer(model)
    step = ml.build_train_step(model, opt, grad_accum_steps=1)
    before = params_of(model)
    x, y = tokens(4, 32, 97), tokens(4, 32, 97, seed=1)
    losses = []
    for i in range(8):
        ml.apply_schedules(opt, i, progress=0.0)
        loss, grads = step(x, y, None, True)
        mx.eval(loss, grads, model.state, opt.state)
        losses.append(loss.item())
    # (after the first step only the zero-init projections move: they gate every other gradient)
    after = params_of(model)
    unchanged = [n for n in before if mx.array_equal(before[n], after[n]).item()]
    assert unchanged == []
    assert losses[-1] < losses[0] - 0.5, losses


def _train(compiled, grad_accum_steps, batches, progresses, random_weights=False):
    model = tiny_model(n_layer=2)
    if random_weights:
        randomize(model, std=0.1)
    opt = ml.setup_optimizer(model)
    step = ml.build_train_step(model, opt, grad_accum_steps, compiled=compiled)
    losses = []
    for i, progress in enumerate(progresses):
        ml.apply_schedules(opt, i, progress)
        grads = None
        for k in range(grad_accum_steps):
            x, y = batches[k]
            loss, grads = step(x, y, grads, k == grad_accum_steps - 1)
            mx.eval(loss, grads, model.state, opt.state)
        losses.append(loss.item())
    return losses, params_of(model)


@pytest.mark.slow  # cold, MLX JIT-builds ~150 CPU kernels with g++ (~45 s once per machine; cached in $TMPDIR/mlx)
def test_compiled_step_matches_eager_while_the_schedules_change():
    """The compiled step reads lr / wd / momentum from optimizer.state, not from values baked in
    at trace time: with a warmdown (lr 1.0 -> 0.8 -> 0) it must follow eager step for step."""
    x, y = tokens(2, 32, 97), tokens(2, 32, 97, seed=1)
    progresses = [0.0, 0.6, 1.0]
    eager_losses, eager = _train(False, 1, [(x, y)], progresses)
    compiled_losses, compiled = _train(True, 1, [(x, y)], progresses)
    assert compiled_losses == pytest.approx(eager_losses, rel=1e-5)
    for name in eager:
        np.testing.assert_allclose(np.array(compiled[name]), np.array(eager[name]), atol=1e-5, rtol=1e-4, err_msg=name)


def test_gradient_accumulation_equals_one_big_batch():
    # Random weights: at upstream's init the scalar gradients are exactly 0 in exact arithmetic
    # (zero projections make every block the identity and norm() is scale-free), so Adam's first
    # step would turn rounding noise into +-lr and the comparison would test the noise.
    x, y = tokens(4, 32, 97), tokens(4, 32, 97, seed=1)
    _, whole = _train(False, 1, [(x, y)], [0.0], random_weights=True)
    _, halves = _train(True, 2, [(x[:2], y[:2]), (x[2:], y[2:])], [0.0], random_weights=True)
    for name in whole:
        np.testing.assert_allclose(np.array(halves[name]), np.array(whole[name]), atol=2e-4, rtol=1e-3, err_msg=name)


def test_schedules():
    assert ml.get_lr_multiplier(0.0) == 1.0 or ml.WARMUP_RATIO > 0
    assert ml.get_lr_multiplier(1.0) == pytest.approx(ml.FINAL_LR_FRAC)
    mid = 1.0 - ml.WARMDOWN_RATIO / 2
    assert ml.get_lr_multiplier(mid) == pytest.approx(0.5 + 0.5 * ml.FINAL_LR_FRAC)
    assert ml.get_muon_momentum(0) == pytest.approx(0.85) and ml.get_muon_momentum(300) == pytest.approx(0.95)
    assert ml.get_muon_momentum(150) == pytest.approx(0.90) and ml.get_muon_momentum(10_000) == pytest.approx(0.95)
    assert ml.get_weight_decay(0.0) == ml.WEIGHT_DECAY and ml.get_weight_decay(1.0) == 0.0


def test_schedules_reach_the_arrays_the_compiled_step_reads():
    model = tiny_model(n_layer=1)
    opt = ml.setup_optimizer(model)
    ml.apply_schedules(opt, 150, progress=1.0 - ml.WARMDOWN_RATIO / 2)
    muon = next(i for i, g in enumerate(opt.param_groups) if g["kind"] == "muon")
    hp = opt.state["hyperparameters"][str(muon)]
    assert hp["lr"].item() == pytest.approx(0.5 * ml.MATRIX_LR)
    assert hp["momentum"].item() == pytest.approx(0.90)
    assert hp["weight_decay"].item() == pytest.approx(ml.WEIGHT_DECAY * ml.WARMDOWN_RATIO / 2)


# -- platform choices --------------------------------------------------------------------------

def test_dtype_choice():
    assert ml.choose_dtype("gpu")[0] == mx.bfloat16
    dtype, why = ml.choose_dtype("cpu")
    assert dtype == mx.float32 and "bf16" in why
    assert ml.choose_dtype("gpu", "fp32") == (mx.float32, "AUTORESEARCH_DTYPE=fp32")
    with pytest.raises(ValueError, match="bf16 or fp32"):
        ml.choose_dtype("cpu", "fp16")


def _unreachable():
    raise AssertionError("the compile probe must not run here")


def test_compile_choice():
    assert ml.choose_compile("cpu", _unreachable, "0") == (False, "AUTORESEARCH_COMPILE=0")

    def no_compiler():
        raise RuntimeError("no g++ on PATH for MLX's CPU kernel JIT")

    on, why = ml.choose_compile("cpu", no_compiler)
    assert not on and "g++" in why
    on, why = ml.choose_compile("gpu", lambda: None)
    assert on and "probe passed" in why
    on, why = ml.choose_compile("cpu", lambda: None, "1")
    assert on and "AUTORESEARCH_COMPILE=1" in why
    with pytest.raises(ValueError, match="use 0 or 1"):
        ml.choose_compile("cpu", lambda: None, "yes")


def test_compile_probe_needs_gxx_on_cpu(monkeypatch):
    monkeypatch.setattr(ml.shutil, "which", lambda name: None)
    with pytest.raises(RuntimeError, match="g\\+\\+"):
        ml.probe_compile(mx.cpu)


def test_detect_platform_on_cpu_says_why(monkeypatch, capsys):
    monkeypatch.delenv("AUTORESEARCH_COMPILE", raising=False)
    monkeypatch.delenv("AUTORESEARCH_DTYPE", raising=False)
    plat = ml.detect_platform("cpu")
    out = capsys.readouterr().out
    assert plat.device == mx.cpu and plat.dtype == mx.float32 and plat.polar_dtype == mx.float32
    assert re.search(r"dtype:\s+fp32: CPU", out)
    assert re.search(r"compile:\s+(on|off \(eager\)): ", out) and plat.compile == (ml.shutil.which("g++") is not None)
    assert re.search(r"blas:\s+OpenBLAS (\(.+\) loaded|not found.*apt-get install libopenblas0-pthread)", out)
    assert plat.peak_memory_mb() > 0 and plat.device_name


def test_requesting_a_gpu_without_one_says_what_to_do():
    if ml.gpu_available():
        pytest.skip("MLX sees a GPU here")
    with pytest.raises(SystemExit, match="AUTORESEARCH_DEVICE=cpu"):
        ml.detect_platform("gpu")


def test_trainer_never_imports_torch():
    source = TRAINER.read_text()
    assert not re.search(r"^\s*(import|from)\s+torch\b", source, re.M)


# -- end to end --------------------------------------------------------------------------------

@pytest.mark.slow
def test_trains_cpu_tiny_preset_and_lowers_the_loss(tiny_setup_factory):
    setup = training_setup(tiny_setup_factory, "mlx")
    out = check_trained(setup.run_trainer(timeout=300, PYTHONUNBUFFERED="1"), "mlx")
    assert "attention: mx.fast.scaled_dot_product_attention" in out
