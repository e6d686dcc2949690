"""The Apple silicon trainer (backends/mps/train.py) on this CPU-only machine: the hardware
plumbing that must be skipped off MPS, the fp32 optimizer arithmetic MPS needs, the Apple presets'
eval memory, and one real training run of the cpu-tiny preset on device cpu."""

from __future__ import annotations

import re

import pytest
import torch

from harness.scoring.evaluate import ACCELERATOR_BUDGET_BYTES, micro_batch_size
from harness.hardware.presets import load_presets
from trainer_helpers import training_setup, check_trained, load_trainer



tr = load_trainer('mps')
CONFIG = dict(sequence_len=32, vocab_size=97, n_layer=3, n_head=4, n_kv_head=2, n_embd=64, window_pattern="SL")


def tokens(B, T, V, seed=0):
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))


def test_on_cpu_every_mps_only_call_is_skipped(monkeypatch, capsys):
    monkeypatch.delenv("AUTORESEARCH_COMPILE", raising=False)
    monkeypatch.delenv("AUTORESEARCH_DTYPE", raising=False)
    plat = tr.detect_platform("cpu")
    out = capsys.readouterr().out
    assert "attention: SDPA" in out and re.search(r"compile:\s+off \(eager\): CPU", out)
    assert plat.polar_dtype == torch.float32
    # on this CPU build each of these would raise if it reached torch.mps
    plat.synchronize()
    plat.sample_memory()
    plat.release_cache()
    plat.free_memory()
    assert plat.peak_bytes == 0 and plat.peak_memory_mb() > 0  # the process's peak RSS on CPU


def test_requesting_mps_without_mps_says_what_to_do():
    if torch.backends.mps.is_available():
        pytest.skip("this machine has MPS")
    with pytest.raises(SystemExit, match="AUTORESEARCH_DEVICE=cpu"):
        tr.detect_platform("mps")
    with pytest.raises(SystemExit, match="backends/cuda or backends/rocm"):
        tr.detect_platform("cuda")


def test_gqa_by_repeated_kv_heads_matches_plain_attention_per_group():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 32, 4, 16, generator=g)
    k, v = (torch.randn(2, 32, 2, 16, generator=g) for _ in range(2))
    for window in (31, 7):
        out = tr.attention(q, k, v, window)
        expanded = tr.attention(q, k.repeat_interleave(2, dim=2), v.repeat_interleave(2, dim=2), window)
        torch.testing.assert_close(out, expanded)
        # query heads 0 and 1 share kv head 0: they see the same keys
        alone = tr.attention(q[:, :, :2], k[:, :, :1].expand(-1, -1, 2, -1), v[:, :, :1].expand(-1, -1, 2, -1), window)
        torch.testing.assert_close(out[:, :, :2], alone)


def test_optimizer_arithmetic_is_fp32_even_for_bf16_embeddings():
    torch.manual_seed(0)
    model = tr.build_model(tr.GPTConfig(**CONFIG), torch.device("cpu"), torch.bfloat16)
    assert model.transformer.wte.weight.dtype == torch.bfloat16  # stored in the compute dtype, as upstream
    opt = tr.setup_optimizer(model)
    wte_before = model.transformer.wte.weight.detach().clone()
    x, y = tokens(4, 32, 97), tokens(4, 32, 97, seed=1)
    with torch.amp.autocast("cpu", dtype=torch.bfloat16):
        loss = model(x, y)
    loss.backward()
    assert model.transformer.wte.weight.grad.dtype == torch.bfloat16
    tr.apply_schedules(opt, 0, 0.0)
    opt.step()  # mixed dtypes would raise here on MPS (and in lerp_ on CPU)
    state = opt.state[model.transformer.wte.weight]
    assert state["exp_avg"].dtype == state["exp_avg_sq"].dtype == torch.float32
    assert model.transformer.wte.weight.dtype == torch.bfloat16
    assert not torch.equal(model.transformer.wte.weight, wte_before)
    # hyperparameters reach the steps as Python floats, never 0-D CPU tensors
    assert all(isinstance(opt._hp("lr", group["lr"]), float) for group in opt.param_groups)


def test_an_fp32_adamw_step_on_a_bf16_parameter_matches_the_same_step_in_fp32():
    g = torch.Generator().manual_seed(0)
    p32 = torch.randn(64, 32, generator=g)
    grad = torch.randn(64, 32, generator=g) * 1e-3
    p16 = p32.to(torch.bfloat16)
    states = [(torch.zeros(64, 32), torch.zeros(64, 32)) for _ in range(2)]
    ref = p16.float()  # the same start, stepped entirely in fp32
    for step in (1, 2):
        tr.adamw_step(p16, grad.to(torch.bfloat16), *states[0], step, 0.01, 0.8, 0.95, 1e-10, 0.0)
        tr.adamw_step(ref, grad.to(torch.bfloat16).float(), *states[1], step, 0.01, 0.8, 0.95, 1e-10, 0.0)
        # a bf16 parameter only adds the final rounding of each step (2^-8 relative)
        torch.testing.assert_close(p16.float(), ref.to(torch.bfloat16).float(), atol=0, rtol=0)
        ref = p16.float()
    torch.testing.assert_close(states[0][0], states[1][0])


def test_apple_presets_keep_the_final_eval_far_below_metals_buffer_limits():
    """A 24 GB Mac lands in apple-16gb; the community MLX port died there materialising 16 GiB of
    eval logits at once (Metal's single-buffer limit was 14.3 GB on that Mac, about half its memory;
    4 GB on an 8 GB A18 Pro). The harness evaluates in micro-batches: its largest float32 logits
    tensor must stay at 1 GiB or below, and a training step's logits at 1/8 of the tier's smallest
    memory (a 4x margin on that limit)."""
    apple = {name: p for name, p in load_presets().items() if name.startswith("apple-")}
    assert apple
    for name, preset in apple.items():
        T, V = preset.evaluator.MAX_SEQ_LEN, preset.evaluator.VOCAB_SIZE
        b = micro_batch_size(T, V, preset.evaluator.EVAL_BATCH_SIZE, ACCELERATOR_BUDGET_BYTES)
        assert b * T * V * 4 <= 2**30, (name, b)
        assert preset.trainer["DEVICE_BATCH_SIZE"] * T * V * 4 <= preset.match.min_memory_gb * 2**30 / 8, name
        assert preset.backend == "mps" and preset.trainer["WINDOW_PATTERN"] == "L"


# -- end to end --------------------------------------------------------------------------------

@pytest.mark.slow
def test_trains_cpu_tiny_preset_on_cpu_and_beats_the_unigram_baseline(tiny_setup_factory):
    setup = training_setup(tiny_setup_factory, "mps")
    proc = setup.run_trainer(timeout=300, PYTHONUNBUFFERED="1", AUTORESEARCH_COMPILE="", AUTORESEARCH_DTYPE="")
    out = check_trained(proc, "mps")
    assert "attention: SDPA" in out and "Sliding windows: a band-masked SDPA layer measured" in out
