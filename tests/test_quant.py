"""tokenmill.quant (NF4, QLoRA's 4-bit base weights) against the QLoRA paper's table, a naive float64
re-implementation of the quantiser written here, the NF4 error bound, float64 matmuls and exact byte counts."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from tokenmill import quant
from tokenmill.optim.adamw8bit import dynamic_code
from tokenmill.quant import Linear4bit, dequantize_nf4, quantize_nf4

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# Dettmers et al. 2023 (QLoRA), Appendix E, and bitsandbytes' functional.get_4bit_type("nf4").
PAPER_NF4 = [
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
]
LEVELS64 = torch.tensor(PAPER_NF4, dtype=torch.float64)
CODE = dynamic_code(True).double()


def unpack(packed: torch.Tensor) -> torch.Tensor:
    """Level indices in element order: bitsandbytes puts element 2i in the high nibble."""
    return torch.stack((packed.long() // 16, packed.long() % 16), dim=-1).view(-1)


def nearest(values: torch.Tensor, table: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(index of the nearest table entry, margin to the second nearest) in float64, by brute force."""
    dist = (values.double()[:, None] - table[None, :]).abs()
    two = dist.topk(2, dim=1, largest=False)
    return two.indices[:, 0], two.values[:, 1] - two.values[:, 0]


def naive(w: torch.Tensor, block_size: int):
    """The QLoRA quantiser written out in float64: per block absmax, nearest NF4 level; absmax minus its
    mean, per 256 absmax values the largest magnitude, nearest 8-bit dynamic code."""
    flat = w.double().reshape(-1)
    n_blocks = math.ceil(flat.numel() / block_size)
    blocks = torch.zeros(n_blocks * block_size, dtype=torch.float64)
    blocks[: flat.numel()] = flat
    blocks = blocks.view(n_blocks, block_size)
    a = blocks.abs().amax(1)
    idx, margin = nearest((blocks / a.clamp_min(1e-300)[:, None]).reshape(-1), LEVELS64)
    offset = a.mean()
    c = a - offset
    groups = math.ceil(n_blocks / 256)
    cg = torch.zeros(groups * 256, dtype=torch.float64)
    cg[:n_blocks] = c
    s = cg.view(groups, 256).abs().amax(1)
    qa, qmargin = nearest(c / s.repeat_interleave(256)[:n_blocks].clamp_min(1e-300), CODE)
    return dict(a=a, idx=idx, margin=margin, offset=offset, scale=s, qa=qa, qmargin=qmargin)


# ---------------------------------------------------------------------------------------------- levels


def test_levels_are_the_papers_table():
    assert list(quant.NF4_LEVELS) == PAPER_NF4
    # and they are what the paper constructs: quantiles of N(0, 1) at 8 evenly spaced probabilities from
    # 0.5 to offset 0.9677 for the positive half, 7 for the negative half (an exact zero, 16 values in all),
    # normalised to [-1, 1] (bitsandbytes' create_normal_map; its linspace is fp32)
    offset = 0.9677083
    pos = torch.special.ndtri(torch.linspace(offset, 0.5, 9, dtype=torch.float32)[:-1].double())
    neg = -torch.special.ndtri(torch.linspace(offset, 0.5, 8, dtype=torch.float32)[:-1].double())
    values = torch.cat((pos, torch.zeros(1, dtype=torch.float64), neg)).sort().values
    values = values / values.abs().max()
    assert torch.allclose(values, LEVELS64, atol=1e-7, rtol=0)


# ---------------------------------------------------------------------------------------------- quantiser

SHAPES = st.tuples(st.integers(1, 24), st.integers(1, 150))


@given(
    shape=SHAPES,
    block_size=st.sampled_from([64, 64, 32, 6]),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    scale=st.sampled_from([0.02, 1.0, 300.0]),
    outliers=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_quantise_matches_naive_and_stays_within_the_nf4_bound(
    shape, block_size, dtype, scale, outliers, seed
):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g) * scale
    if outliers:  # a few large values: blocks with very different absmax
        w.view(-1)[:: max(1, w.numel() // 5)] *= 40
    w = w.to(dtype)
    q = quantize_nf4(w, block_size)
    ref = naive(w, block_size)
    n = w.numel()

    # codes: equal to the brute-force nearest level wherever the choice is not a near-tie in fp32
    clear = ref["margin"] > 1e-5
    assert torch.equal(unpack(q.packed)[clear], ref["idx"][clear])
    assert torch.allclose(q.absmax_offset.double(), ref["offset"].reshape(1), rtol=1e-6, atol=0)
    # absmax - mean cancels in fp32: errors scale with the offset, not with the (maybe much smaller) spread
    fp32_slack = 1e-6 * ref["offset"].abs().item()
    assert torch.allclose(q.absmax_scale.double(), ref["scale"], rtol=1e-6, atol=fp32_slack + 1e-30)
    s_of_block = ref["scale"].repeat_interleave(256)[: len(ref["a"])]
    clear = ref["qmargin"] > 1e-5 + 2 * fp32_slack / s_of_block.clamp_min(1e-300)
    assert torch.equal(q.absmax.long()[clear], ref["qa"][clear])

    # dequantised value = level * (code * scale + offset), from the stored codes
    absmax_dq = CODE[q.absmax.long()] * q.absmax_scale.double().repeat_interleave(256)[: q.absmax.numel()]
    absmax_dq = absmax_dq + q.absmax_offset.double()
    want = (LEVELS64[unpack(q.packed)].view(-1, block_size) * absmax_dq[:, None]).view(-1)[:n]
    got = dequantize_nf4(q, torch.float32).double().view(-1)
    assert torch.allclose(got, want, rtol=1e-6, atol=1e-30 + 1e-7 * want.abs().max().item())

    # the NF4 bound per value: half the largest level gap times the block absmax, plus the absmax error
    # of the double quantisation (at most the 8-bit code's largest half gap times its 256-block scale)
    gap = (LEVELS64[1:] - LEVELS64[:-1]).max().item()
    half_code = max((CODE[1:] - CODE[:-1]).max().item() / 2, 1 + CODE[0].item(), 1 - CODE[-1].item())
    a = ref["a"].repeat_interleave(block_size)[:n]
    s = ref["scale"].repeat_interleave(256 * block_size)[:n]
    bound = a * gap / 2 + half_code * s + 1e-6 * (a + s + ref["offset"].abs())
    err = (got - w.double().view(-1)).abs()
    assert bool((err <= bound).all()), float((err - bound).max())
    # the absmax error itself (+ fp32 rounding of the stored scale and offset)
    s_block = ref["scale"].repeat_interleave(256)[: len(ref["a"])]
    slack = 1e-6 * (s_block + ref["offset"].abs())
    assert bool(((absmax_dq - ref["a"]).abs() <= half_code * s_block + slack).all())


def test_nf4_error_on_normal_weights_is_small():
    """On N(0, 1) weights the relative RMS error is ~10% (4 bits), far below the worst-case bound."""
    w = torch.randn(256, 512, generator=torch.Generator().manual_seed(0))
    err = dequantize_nf4(quantize_nf4(w)) - w
    assert 0.05 < (err.norm() / w.norm()).item() < 0.12


def test_zero_blocks_exact_and_padding():
    w = torch.zeros(3, 7)  # 21 values: one block padded to 64
    w[1, 2] = 0.5
    q = quantize_nf4(w)
    assert q.packed.numel() == 32 and q.absmax.numel() == 1
    d = dequantize_nf4(q)
    assert d[1, 2].item() == pytest.approx(0.5, rel=1e-2) and torch.count_nonzero(d) == 1
    z = torch.zeros(2, 64)
    z[1] = torch.linspace(-1, 1, 64)
    dz = dequantize_nf4(quantize_nf4(z))
    assert torch.equal(dz[0], torch.zeros(64))  # an all-zero block among others stays zero


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_dequantize_dtypes_round_once(dtype):
    q = quantize_nf4(torch.randn(16, 40))
    assert torch.equal(dequantize_nf4(q, dtype), dequantize_nf4(q, torch.float32).to(dtype))


def test_state_bytes_exact():
    """0.5 byte per value + one byte of absmax code per 64 + fp32 scale per 256 blocks + the offset."""
    out_f, in_f = 256, 320  # 81,920 values = 1,280 blocks = 5 groups
    layer = Linear4bit.from_linear(torch.nn.Linear(in_f, out_f, bias=False))
    sizes = {name: b.numel() * b.element_size() for name, b in layer.named_buffers()}
    assert sizes == {"packed": 40960, "absmax": 1280, "absmax_scale": 20, "absmax_offset": 4}
    assert sum(sizes.values()) == quant.state_bytes((out_f, in_f)) == layer.quantized().nbytes == 42264
    assert list(layer.parameters()) == []
    per_param = quant.state_bytes((13824, 5120)) / (13824 * 5120)
    assert per_param == pytest.approx(0.5 + 1 / 64 + 4 / (64 * 256), rel=1e-6)  # 4.127 bits, as the paper
    odd = quantize_nf4(torch.randn(5, 13))  # 65 values: two blocks, the second padded
    assert odd.nbytes == quant.state_bytes((5, 13)) == 64 + 2 + 4 + 4


# ---------------------------------------------------------------------------------------------- Linear4bit


def make_layer(in_f=96, out_f=80, seed=0, **kw):
    torch.manual_seed(seed)
    return Linear4bit.from_linear(torch.nn.Linear(in_f, out_f, bias=False), **kw)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.bfloat16, 2e-2), (torch.float64, 1e-12)])
def test_forward_backward_against_float64(dtype, tol):
    layer = make_layer()
    w = layer.dequantize(torch.float64)
    x = torch.randn(2, 5, 96, dtype=dtype, requires_grad=True)
    y = layer(x)
    assert y.dtype == dtype and y.shape == (2, 5, 80)
    dy = torch.randn_like(y)
    (gx,) = torch.autograd.grad(y, x, dy)
    xd, dyd = x.detach().double(), dy.double()
    ref_y, ref_gx = xd @ w.T, dyd @ w

    def rel(a, b):
        return ((a.double() - b).norm() / b.norm()).item()

    assert rel(y, ref_y) < tol and rel(gx, ref_gx) < tol


def test_gradcheck_float64():
    layer = make_layer(24, 16)
    x = torch.randn(3, 24, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(layer, (x,))


def test_no_weight_gradient_and_nothing_dense_saved(monkeypatch):
    layer = make_layer(128, 64)
    saved: list[tuple[int, ...]] = []
    calls: list[torch.dtype] = []
    real = Linear4bit.dequantize

    def spy(self, dtype=None):
        calls.append(dtype)
        return real(self, dtype)

    monkeypatch.setattr(Linear4bit, "dequantize", spy)
    x = torch.randn(4, 128, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(tuple(t.shape)) or t, lambda t: t):
        y = layer(x)
    assert calls == [torch.float32] and saved == []  # the forward keeps no tensor for backward
    y.sum().backward()
    assert calls == [torch.float32, torch.float32]  # the backward dequantised again
    assert x.grad is not None and all(not b.requires_grad and b.grad is None for b in layer.buffers())


def test_compute_dtype_autocast_and_checkpointing():
    layer = make_layer(compute_dtype=torch.bfloat16)
    x = torch.randn(3, 96)
    y = layer(x)
    assert y.dtype == torch.float32  # computed in bf16, returned in the input's dtype like nn.Linear
    assert torch.equal(y, (x.bfloat16() @ layer.dequantize(torch.bfloat16).T).float())
    plain = make_layer()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert plain(x).dtype == torch.bfloat16
    xr = x.clone().requires_grad_()
    out = torch.utils.checkpoint.checkpoint(plain, xr, use_reentrant=False)
    (g1,) = torch.autograd.grad(out.sum(), xr)
    (g2,) = torch.autograd.grad(plain(xr).sum(), xr)
    assert torch.equal(g1, g2)


def test_state_dict_and_dtype_cast_keep_the_state_exact():
    layer = make_layer()
    dense = layer.dequantize()
    fresh = Linear4bit(96, 80)
    fresh.load_state_dict(layer.state_dict())
    assert torch.equal(fresh.dequantize(), dense)
    layer.to(torch.bfloat16)  # casts float buffers: the fp32 scales are stored as int32 bits, untouched
    assert torch.equal(layer.dequantize(), dense)
    with pytest.raises(RuntimeError, match="size mismatch"):
        Linear4bit(96, 81).load_state_dict(layer.state_dict())


def test_bad_inputs_are_named():
    cases = [
        (lambda: quantize_nf4(torch.randn(64)), "2-D"),
        (lambda: quantize_nf4(torch.randn(2, 2, 64)), "2-D"),
        (lambda: quantize_nf4(torch.ones(4, 64, dtype=torch.int32)), "float32, bfloat16"),
        (lambda: quantize_nf4([[1.0]]), "torch.Tensor"),
        (lambda: quantize_nf4(torch.tensor([[1.0, float("nan")]])), "NaN"),
        (lambda: quantize_nf4(torch.randn(4, 64), block_size=63), "block_size"),
        (lambda: quantize_nf4(torch.randn(0, 64)), "empty"),
        (lambda: Linear4bit.from_linear(torch.nn.Linear(8, 4)), "bias"),
        (lambda: Linear4bit.from_linear(torch.nn.Conv1d(8, 4, 1)), "nn.Linear"),
        (lambda: make_layer()(torch.randn(3, 95)), r"\[\.\.\., 96\]"),
        (lambda: make_layer()(torch.ones(3, 96, dtype=torch.long)), "float tensor"),
        (lambda: Linear4bit(8, 4, compute_dtype=torch.int8), "compute_dtype"),
        (lambda: make_layer().load_quantized(quantize_nf4(torch.randn(80, 95))), "does not fit"),
        (lambda: dequantize_nf4(quantize_nf4(torch.randn(2, 64)), torch.int32), "dtype"),
    ]
    for fn, pattern in cases:
        with pytest.raises(ValueError, match=pattern):
            fn()
