"""tokenmill.optim.AdamW8bit: the dynamic code and block-wise quantisation against brute force, the CPU
reference tracking torch.optim.AdamW, exact fp32 path for small tensors, state_dict round trip, and the
fused CUDA step against the reference when a GPU is present."""

from __future__ import annotations

import copy
import re

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from tokenmill.optim import AdamW8bit
from tokenmill.optim import adamw8bit as A

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_dynamic_code_matches_bitsandbytes_layout():
    signed, unsigned = A.dynamic_code(True), A.dynamic_code(False)
    for code in (signed, unsigned):
        assert code.shape == (256,) and code.dtype == torch.float32
        assert torch.all(code[1:] >= code[:-1])
        assert code[-1] == 1.0 and (code == 0).sum() == 1
    # smallest decade 1e-6: signed has one fraction (0.55e-6), unsigned two ((0.1+0.55)/2, (0.55+1)/2)
    assert torch.isclose(signed[signed > 0][0], torch.tensor(0.55e-6))
    assert torch.isclose(unsigned[unsigned > 0][0], torch.tensor(0.325e-6))
    assert (signed < 0).sum() == 127 and (unsigned < 0).sum() == 0
    assert torch.isclose(signed[0], -(torch.tensor(0.9859375) + 1) / 2)


@given(
    n=st.integers(1, 1000),
    seed=st.integers(0, 2**16),
    signed=st.booleans(),
    scale=st.sampled_from([1e-8, 1.0, 1e4]),
)
def test_quantize_picks_the_nearest_code(n, seed, signed, scale):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g) * scale
    if not signed:
        x = x.abs()
    code = A.dynamic_code(signed)
    q, absmax = A.quantize(x, code)
    assert q.dtype == torch.uint8 and absmax.shape == ((n + 255) // 256,)
    blocks = torch.nn.functional.pad(x, (0, (-n) % 256)).view(-1, 256)
    torch.testing.assert_close(absmax, blocks.abs().amax(1), rtol=0, atol=0)
    xn = x / absmax.repeat_interleave(256)[:n]
    dist = (code[None, :] - xn[:, None]).abs()
    best = dist.min(1).values
    assert torch.all(dist.gather(1, q.long()[:, None])[:, 0] <= best + 1e-7)  # nearest (ties either way)
    back = A.dequantize(q, absmax, code)
    assert torch.all((back - x).abs() <= (best + 1e-7) * absmax.repeat_interleave(256)[:n])


def regression(opt_factory, steps=300, seed=0):
    torch.manual_seed(seed)
    x = torch.randn(512, 64)
    y = x @ torch.randn(64, 96) + 0.01 * torch.randn(512, 96)
    model = torch.nn.Linear(64, 96)
    opt = opt_factory(model.parameters())
    losses = []
    for _ in range(steps):
        loss = ((model(x) - y) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return model, losses, opt


def test_reference_tracks_torch_adamw():
    """Tolerance: after 300 steps at lr 1e-2 (loss 65 -> 0.7), weights within 3% (relative L2) of
    torch.optim.AdamW's and the final loss within 5%; the 8-bit moments are the only difference."""
    kw = dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
    ref, ref_losses, _ = regression(lambda p: torch.optim.AdamW(p, **kw))
    ours, losses, opt = regression(lambda p: AdamW8bit(p, **kw, min_8bit_size=0))
    assert "state1" in opt.state[ours.weight] and "state1" in opt.state[ours.bias]
    assert losses[-1] < 0.02 * losses[0]
    assert abs(losses[-1] - ref_losses[-1]) < 0.05 * ref_losses[-1]
    rel = ((ours.weight - ref.weight).norm() / ref.weight.norm()).item()
    assert rel < 0.03, rel


def test_small_tensors_follow_torch_adamw_exactly():
    kw = dict(lr=3e-3, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.1)
    torch.manual_seed(3)
    target, scales, init = torch.randn(96), torch.rand(96) * 10, torch.randn(96)
    params = [torch.nn.Parameter(init.clone()) for _ in range(2)]
    opts = [torch.optim.AdamW([params[0]], **kw), AdamW8bit([params[1]], **kw)]  # 96 < min_8bit_size
    for _ in range(50):
        for p, o in zip(params, opts):
            o.zero_grad()
            (((p - target) ** 2) * scales).sum().backward()
            o.step()
    assert "exp_avg" in opts[1].state[params[1]]
    torch.testing.assert_close(params[1], params[0], rtol=1e-6, atol=1e-6)


def test_state_is_about_two_bytes_per_parameter():
    p = torch.nn.Parameter(torch.randn(1000, 1000))
    opt = AdamW8bit([p])
    p.grad = torch.randn_like(p)
    opt.step()
    per_param = opt.state_bytes() / p.numel()
    assert 2.0 < per_param <= 2.1, per_param  # 2 + 8/256 = 2.03


def test_state_dict_round_trip_continues_identically():
    kw = dict(lr=1e-2, weight_decay=0.01, min_8bit_size=0)
    model, _, opt = regression(lambda p: AdamW8bit(p, **kw), steps=5)
    twin = copy.deepcopy(model)
    opt2 = AdamW8bit(twin.parameters(), **kw)
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))
    st1, st2 = opt.state[model.weight], opt2.state[twin.weight]
    assert st2["state1"].dtype == torch.uint8 and st2["absmax1"].dtype == torch.float32
    assert st2["step"] == 5
    torch.manual_seed(9)
    x, y = torch.randn(32, 64), torch.randn(32, 96)
    for m, o in ((model, opt), (twin, opt2)):
        for _ in range(3):
            o.zero_grad()
            ((m(x) - y) ** 2).mean().backward()
            o.step()
    assert torch.equal(model.weight, twin.weight) and torch.equal(model.bias, twin.bias)
    assert torch.equal(st1["state2"], st2["state2"]) and torch.equal(st1["absmax2"], st2["absmax2"])


def test_bf16_params_update():
    p = torch.nn.Parameter(torch.randn(5000, dtype=torch.bfloat16))
    before = p.detach().clone()
    opt = AdamW8bit([p], lr=1e-2)
    p.grad = torch.ones_like(p)
    opt.step()
    # first Adam step moves every element by lr * sign(grad) (m_hat / sqrt(v_hat) = 1), plus decay
    expected = before.float() * (1 - 1e-2 * 1e-2) - 1e-2
    torch.testing.assert_close(p.float(), expected, rtol=1e-2, atol=1e-2)


def test_bad_arguments():
    p = torch.nn.Parameter(torch.randn(10))
    for kw, pattern in (
        (dict(lr=-1.0), "lr must be"),
        (dict(betas=(0.9, 1.0)), "betas must be"),
        (dict(eps=-1.0), "eps must be"),
        (dict(weight_decay=-0.1), "weight_decay must be"),
    ):
        with pytest.raises(ValueError, match=pattern):
            AdamW8bit([p], **kw)
    h = torch.nn.Parameter(torch.randn(10, dtype=torch.float16))
    h.grad = torch.randn_like(h)
    with pytest.raises(ValueError, match="dtype torch.float16"):
        AdamW8bit([h]).step()
    p.grad = torch.randn(10).to_sparse()
    with pytest.raises(ValueError, match="sparse"):
        AdamW8bit([p]).step()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_fused_step_matches_reference(dtype):
    torch.manual_seed(0)
    n = 100_003  # a partial last block
    p_gpu = torch.nn.Parameter(torch.randn(n, device="cuda", dtype=dtype))
    p_cpu = torch.nn.Parameter(p_gpu.detach().cpu().clone())
    o_gpu, o_cpu = AdamW8bit([p_gpu], lr=1e-3), AdamW8bit([p_cpu], lr=1e-3)
    for _ in range(5):
        g = torch.randn(n, dtype=dtype)
        p_gpu.grad, p_cpu.grad = g.cuda(), g.clone()
        o_gpu.step()
        o_cpu.step()
    a, b = p_gpu.detach().cpu().double(), p_cpu.detach().double()
    diff = ((a - b).abs() / (b.abs() + 1)).max().item()  # FMA / nearest-code ties: see benches/gpu_check.py
    assert diff < (1e-2 if dtype == torch.bfloat16 else 1e-4), diff
    s_gpu, s_cpu = o_gpu.state[p_gpu], o_cpu.state[p_cpu]
    torch.testing.assert_close(s_gpu["absmax2"].cpu(), s_cpu["absmax2"], rtol=1e-4, atol=0)
    assert (s_gpu["state1"].cpu() != s_cpu["state1"]).float().mean() < 1e-3  # rare nearest-code ties


def _edge_floats(signed: bool) -> np.ndarray:
    """Floats where a nearest-code lookup can go wrong: every threshold, code and fp32 midpoint of two
    codes with +-64 neighbouring patterns, every bucket boundary of the kernel's table (both signs), the
    clamping limits, zeros, infinities, NaNs, denormals and a strided sweep over all 2^32 bit patterns."""
    code = A.dynamic_code(signed).numpy()
    thr = A.quant_tables(signed)[0][:255]
    mid = ((code[1:].astype(np.float64) + code[:-1]) / 2).astype(np.float32)
    centres = np.concatenate([thr, code, mid, -thr, -code, -mid]).view(np.uint32).astype(np.int64)
    shift = A.Q_SHIFT[signed]
    bounds = np.arange(A.Q_LO, A.Q_HI + 1, 1 << shift, dtype=np.int64)
    bounds = np.concatenate([bounds, bounds | 0x80000000])
    near = (np.concatenate([centres, bounds])[:, None] + np.arange(-64, 65)[None, :]).ravel()
    special = np.array(
        [
            0,
            0x80000000,
            1,
            0x80000001,
            0x007FFFFF,
            0x7F800000,
            0xFF800000,
            0x7FC00000,
            0xFFC00000,
            0x7F800001,
            0x7F7FFFFF,
            0xFF7FFFFF,
            0x3F800000,
            0xBF800000,
            A.Q_LO,
            A.Q_LO | 0x80000000,
        ],
        dtype=np.int64,
    )
    sweep = np.arange(0, 2**32, 4093, dtype=np.int64)
    bits = np.concatenate([near & 0xFFFFFFFF, special, sweep]).astype(np.uint32)
    return bits.view(np.float32)


def _torch_rule(xn: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """quantize()'s nearest-code rule on normalised values, in torch (as in A.quantize)."""
    lo = (torch.searchsorted(code, xn, right=True) - 1).clamp_(0, 255)
    hi = (lo + 1).clamp_(max=255)
    up = (lo < 255) & ((code[hi] - xn) < (xn - code[lo]))
    return lo + up.long()


@pytest.mark.parametrize("signed", [True, False])
def test_kernel_lookup_table_equals_the_reference_rule(signed):
    """The kernel's bucket table + one comparison (A.quantize_lookup, the numpy model of tm_quantize) gives
    the reference's index for every kind of float; test_kernels_emulated checks the CUDA source itself."""
    x = _edge_floats(signed)
    want = _torch_rule(torch.from_numpy(x), A.dynamic_code(signed)).numpy()
    assert np.array_equal(A._nearest_code(A.dynamic_code(signed).numpy(), x), want)
    got = A.quantize_lookup(x, signed)
    bad = np.flatnonzero(got != want)
    assert bad.size == 0, f"{bad.size} mismatches, first x={x[bad[0]]!r}: {got[bad[0]]} vs {want[bad[0]]}"
    # the thresholds are where the index steps: T_j quantises to j, its predecessor to j - 1
    thr = A.quant_tables(signed)[0][:255]
    below = np.nextafter(thr, np.float32(-np.inf))
    assert np.array_equal(A._nearest_code(A.dynamic_code(signed).numpy(), thr), np.arange(1, 256))
    assert np.array_equal(A._nearest_code(A.dynamic_code(signed).numpy(), below), np.arange(0, 255))


def test_kernel_tables_match_the_cuda_constants():
    from tokenmill.kernels import launch

    src = launch.source("adamw8bit")
    consts = dict(re.findall(r"#define (TM_Q\w+) (0x[0-9a-f]+u|\d+)", src))
    assert (
        int(consts["TM_Q_LO"].rstrip("u"), 16) == A.Q_LO and int(consts["TM_Q_HI"].rstrip("u"), 16) == A.Q_HI
    )
    assert int(consts["TM_Q1_SHIFT"]) == A.Q_SHIFT[True] and int(consts["TM_Q2_SHIFT"]) == A.Q_SHIFT[False]
    words = A.quant_table_words()
    nb = [((A.Q_HI - A.Q_LO) >> A.Q_SHIFT[s]) + 1 for s in (True, False)]
    assert words.size == 1024 + (2 * nb[0] + 3) // 4 + (2 * nb[1] + 3) // 4
    assert np.array_equal(words[:256].view(np.float32), A.dynamic_code(True).numpy())
