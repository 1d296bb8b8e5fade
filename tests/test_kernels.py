"""tokenmill.kernels: references and hand-written backward passes against float64 autograd and Hugging Face
transformers; every .cu source compiled with NVRTC for sm_80/sm_90; CUDA kernels against the references when
a GPU is present."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from tokenmill import kernels as K
from tokenmill.kernels import launch, reference

F64 = torch.float64


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randn(*shape, seed=0, dtype=F64, requires_grad=False):
    t = torch.randn(*shape, generator=gen(seed), dtype=F64).to(dtype)
    return t.requires_grad_(requires_grad)


def packed_positions(batch: int, seq: int, seed: int) -> torch.Tensor:
    """position_ids of packed sequences: restart at 0 at random document starts."""
    g = gen(seed)
    rows = []
    for _ in range(batch):
        starts = (torch.rand(seq, generator=g) < 0.2).tolist()
        pos, p = [], 0
        for i in range(seq):
            p = 0 if (i == 0 or starts[i]) else p + 1
            pos.append(p)
        rows.append(pos)
    return torch.tensor(rows, dtype=torch.int64)


# ---------------------------------------------------------------------------------------------- RMSNorm


def test_rms_norm_gradcheck():
    x = randn(3, 5, 16, requires_grad=True)
    w = randn(16, seed=1, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: K.rms_norm(a, b, 1e-5), (x, w))


def test_rms_norm_matches_transformers():
    llama = pytest.importorskip("transformers.models.llama.modeling_llama")
    norm = llama.LlamaRMSNorm(64, eps=1e-5)  # computes in fp32 whatever the input dtype
    with torch.no_grad():
        norm.weight.copy_(randn(64, seed=2))
    x = randn(4, 7, 64, seed=3, dtype=torch.float32, requires_grad=True)
    ours = K.rms_norm(x, norm.weight, 1e-5)
    theirs = norm(x)
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6)
    g = randn(4, 7, 64, seed=4, dtype=torch.float32)
    ours_g = torch.autograd.grad(ours, (x, norm.weight), g)
    theirs_g = torch.autograd.grad(theirs, (x, norm.weight), g)
    for a, b in zip(ours_g, theirs_g):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_rms_norm_hand_example():
    # rows (3, 4): rms = sqrt(12.5); (1, 1): rms = 1
    y = K.rms_norm(
        torch.tensor([[3.0, 4.0], [1.0, -1.0]], dtype=F64), torch.tensor([1.0, 2.0], dtype=F64), eps=0.0
    )
    r = 12.5**0.5
    torch.testing.assert_close(y, torch.tensor([[3 / r, 8 / r], [1.0, -2.0]], dtype=F64))


@given(
    rows=st.integers(0, 6),
    d=st.integers(1, 40),
    seed=st.integers(0, 2**16),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
)
def test_rms_norm_low_precision_close_to_float64(rows, d, seed, dtype):
    x = randn(rows, d, seed=seed)
    w = randn(d, seed=seed + 1)
    dy = randn(rows, d, seed=seed + 2)
    xl, wl = x.to(dtype).requires_grad_(), w.to(dtype).requires_grad_()
    y = K.rms_norm(xl, wl, 1e-6)
    assert y.dtype == dtype and y.shape == x.shape
    dx, dw = torch.autograd.grad(y, (xl, wl), dy.to(dtype))
    xr, wr = xl.detach().double().requires_grad_(), wl.detach().double().requires_grad_()
    yr = reference.rms_norm(xr, wr, 1e-6)
    dxr, dwr = torch.autograd.grad(yr, (xr, wr), dy.to(dtype).double())
    tol = dict(rtol=2e-2, atol=2e-2) if dtype == torch.bfloat16 else dict(rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(y.double(), yr, **tol)
    torch.testing.assert_close(dx.double(), dxr, **tol)
    torch.testing.assert_close(dw.double(), dwr, **{k: v * max(1, rows) for k, v in tol.items()})


# ---------------------------------------------------------------------------------------------- RoPE


def hf_rope(q, k, positions, theta):
    """transformers' LlamaRotaryEmbedding + apply_rotary_pos_emb, in its [batch, heads, seq, dim] layout."""
    llama = pytest.importorskip("transformers.models.llama.modeling_llama")
    from transformers import LlamaConfig

    d = q.shape[-1]
    cfg = LlamaConfig(hidden_size=d * q.shape[2], num_attention_heads=q.shape[2], rope_theta=theta)
    if getattr(cfg, "rope_parameters", None) is not None:
        cfg.rope_parameters["rope_theta"] = theta
    rot = llama.LlamaRotaryEmbedding(config=cfg)
    cos, sin = rot(q, positions)
    qh, kh = llama.apply_rotary_pos_emb(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
    return qh.transpose(1, 2), kh.transpose(1, 2), cos, sin


def test_apply_rope_matches_transformers_with_document_restarts():
    q = randn(2, 12, 4, 16, seed=5)
    k = randn(2, 12, 2, 16, seed=6)
    pos = packed_positions(2, 12, seed=7)
    hq, hk, hcos, hsin = hf_rope(q, k, pos, 500000.0)
    cos, sin = K.rope_cos_sin(pos, 16, 500000.0, F64)
    torch.testing.assert_close(cos, hcos.double(), rtol=0, atol=1e-6)  # HF's tables are fp32
    oq, ok = K.apply_rope(q, k, hcos.double(), hsin.double())
    torch.testing.assert_close(oq, hq, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ok, hk, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(K.rope(q, pos, 500000.0), hq, rtol=1e-6, atol=1e-6)


def test_rope_document_restart_equals_separate_documents():
    x = randn(1, 10, 3, 8, seed=8)
    pos = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 0, 1, 2]])
    packed = K.rope(x, pos)
    for a, b in ((0, 4), (4, 7), (7, 10)):
        alone = K.rope(x[:, a:b].contiguous(), torch.arange(b - a)[None])
        torch.testing.assert_close(packed[:, a:b], alone, rtol=0, atol=0)


def test_rope_written_out_by_hand():
    # one pair (x0, x1) at position 3, head_dim 2: a plain 2-D rotation by 3 * theta^0 = 3 rad
    x = torch.tensor([[[[1.0, 2.0]]]], dtype=F64)
    y = K.rope(x, torch.tensor([3]))
    c, s = torch.cos(torch.tensor(3.0)).double(), torch.sin(torch.tensor(3.0)).double()
    torch.testing.assert_close(y[0, 0, 0], torch.stack([1 * c - 2 * s, 2 * c + 1 * s]))


def test_rope_gradcheck():
    q = randn(2, 5, 3, 8, seed=9, requires_grad=True)
    k = randn(2, 5, 1, 8, seed=10, requires_grad=True)
    pos = packed_positions(2, 5, seed=11)
    cos, sin = K.rope_cos_sin(pos, 8, 100.0, F64)
    assert torch.autograd.gradcheck(lambda a, b: K.apply_rope(a, b, cos, sin), (q, k))
    cos1 = randn(5, 8, seed=12)  # a shared, arbitrary table: the backward is the exact transpose
    sin1 = randn(5, 8, seed=13)
    assert torch.autograd.gradcheck(lambda a, b: K.apply_rope(a, b, cos1, sin1), (q, k))
    assert torch.autograd.gradcheck(lambda a: K.rope(a, pos, 100.0), (q,))
    assert torch.autograd.gradcheck(lambda a: K.rope(a, torch.arange(5), 100.0), (q,))


# ---------------------------------------------------------------------------------------------- SwiGLU


def test_swiglu_gradcheck_and_formula():
    g = randn(3, 2, 9, seed=14, requires_grad=True)
    u = randn(3, 2, 9, seed=15, requires_grad=True)
    assert torch.autograd.gradcheck(K.swiglu, (g, u))
    torch.testing.assert_close(K.swiglu(g, u), g / (1 + torch.exp(-g)) * u)


@given(n=st.integers(0, 50), seed=st.integers(0, 2**16), scale=st.sampled_from([1.0, 30.0]))
def test_swiglu_backward_matches_autograd(n, seed, scale):
    g = (randn(n, seed=seed) * scale).requires_grad_()
    u = randn(n, seed=seed + 1, requires_grad=True)
    dy = randn(n, seed=seed + 2)
    ours = torch.autograd.grad(K.swiglu(g, u), (g, u), dy)
    theirs = torch.autograd.grad(F.silu(g) * u, (g, u), dy)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------------------------------------- linear CE


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("chunk_rows", [1, 3, 12, 100])
def test_linear_cross_entropy_matches_unfused(reduction, chunk_rows):
    h = randn(3, 4, 6, seed=16, requires_grad=True)
    w = randn(13, 6, seed=17, requires_grad=True)
    t = torch.randint(0, 13, (3, 4), generator=gen(18))
    t[0, 1] = t[2, 3] = -100
    loss = K.linear_cross_entropy(h, w, t, reduction=reduction, chunk_rows=chunk_rows)
    ref = F.cross_entropy((h @ w.t()).view(-1, 13), t.view(-1), ignore_index=-100, reduction=reduction)
    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=1e-12)
    ours = torch.autograd.grad(loss * 1.7, (h, w))
    theirs = torch.autograd.grad(ref * 1.7, (h, w))
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@given(
    tokens=st.integers(1, 20),
    vocab=st.integers(1, 30),
    hidden=st.integers(1, 8),
    chunk=st.integers(1, 25),
    ignore=st.sampled_from([-100, 0, 7]),
    reduction=st.sampled_from(["mean", "sum"]),
    seed=st.integers(0, 2**16),
)
def test_linear_cross_entropy_property(tokens, vocab, hidden, chunk, ignore, reduction, seed):
    h = randn(tokens, hidden, seed=seed, requires_grad=True)
    w = randn(vocab, hidden, seed=seed + 1, requires_grad=True)
    t = torch.randint(0, vocab, (tokens,), generator=gen(seed + 2))
    t[torch.rand(tokens, generator=gen(seed + 3)) < 0.3] = ignore
    loss = K.linear_cross_entropy(h, w, t, ignore_index=ignore, reduction=reduction, chunk_rows=chunk)
    ref = F.cross_entropy(h @ w.t(), t, ignore_index=ignore, reduction=reduction)
    if torch.isnan(ref):  # every token ignored with "mean": 0/0 in both
        assert torch.isnan(loss)
        return
    torch.testing.assert_close(loss, ref, rtol=1e-10, atol=1e-12)
    for a, b in zip(torch.autograd.grad(loss, (h, w)), torch.autograd.grad(ref, (h, w))):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_linear_cross_entropy_bf16_close_to_fp32_logits():
    h = randn(64, 32, seed=19).to(torch.bfloat16).requires_grad_()
    w = (randn(300, 32, seed=20) * 0.3).to(torch.bfloat16).requires_grad_()
    t = torch.randint(0, 300, (64,), generator=gen(21))
    loss = K.linear_cross_entropy(h, w, t, chunk_rows=16)
    assert loss.dtype == torch.float32
    hf, wf = h.detach().float().requires_grad_(), w.detach().float().requires_grad_()
    ref = F.cross_entropy(hf @ wf.t(), t)
    torch.testing.assert_close(loss, ref, rtol=1e-2, atol=1e-2)
    for a, b in zip(torch.autograd.grad(loss, (h, w)), torch.autograd.grad(ref, (hf, wf))):
        assert (a.float() - b).norm() / b.norm() < 2e-2


def test_linear_cross_entropy_only_hidden_grad_and_second_backward_refused():
    h = randn(5, 4, seed=22, requires_grad=True)
    w = randn(7, 4, seed=23)  # frozen head
    t = torch.randint(0, 7, (5,), generator=gen(24))
    loss = K.linear_cross_entropy(h, w, t)
    (gh,) = torch.autograd.grad(loss, (h,), retain_graph=True)
    (ref,) = torch.autograd.grad(F.cross_entropy(h @ w.t(), t), (h,))
    torch.testing.assert_close(gh, ref)
    with pytest.raises(RuntimeError, match="backward called twice"):
        torch.autograd.grad(loss, (h,))


def test_linear_cross_entropy_no_grad_skips_gradients(monkeypatch):
    seen = []
    real = reference.linear_cross_entropy_fwd

    def spy(*args):
        seen.append(args[-2:])  # (grad_hidden, grad_weight)
        return real(*args)

    monkeypatch.setattr(reference, "linear_cross_entropy_fwd", spy)
    h, w = randn(4, 3, requires_grad=True), randn(5, 3, seed=1, requires_grad=True)
    t = torch.tensor([0, 1, 2, 3])
    with torch.no_grad():
        a = K.linear_cross_entropy(h, w, t)
    b = K.linear_cross_entropy(h, w, t)
    assert seen == [(False, False), (True, True)]
    assert a.item() == b.item() and not a.requires_grad and b.requires_grad


def test_default_chunk_rows_bounds_the_logits_buffer():
    assert reference.default_chunk_rows(16384, 128256) == 2048
    assert reference.default_chunk_rows(10, 128256) == 10
    for vocab in (1, 1000, 32000, 128256, 1 << 22):
        rows = reference.default_chunk_rows(1 << 20, vocab)
        assert rows >= 1 and (rows * vocab <= (1 << 28) or rows == 128)


# ---------------------------------------------------------------------------------------------- bad input


def test_bad_input_names_the_argument():
    x, w = torch.randn(4, 8), torch.randn(8)
    cases = [
        (lambda: K.rms_norm(x.long(), w), r"x must have dtype"),
        (lambda: K.rms_norm(x, w.double()), r"weight has dtype torch.float64, expected torch.float32"),
        (lambda: K.rms_norm(x.t(), torch.randn(4)), r"x must be contiguous"),
        (lambda: K.rms_norm(x, torch.randn(7)), r"weight must have shape \(8,\)"),
        (lambda: K.rms_norm(x, torch.empty(8, device="meta")), r"weight is on meta"),
        (lambda: K.rms_norm(x, w, eps=-1.0), r"eps must be"),
        (lambda: K.swiglu(x, torch.randn(4, 9)), r"up must have the shape of gate"),
        (lambda: K.swiglu(x, [1.0]), r"up must be a torch.Tensor"),
        (
            lambda: K.apply_rope(torch.randn(3, 8), torch.randn(3, 8), torch.randn(3, 8), torch.randn(3, 8)),
            r"q must have shape \[\.\.\., seq, heads, head_dim\]",
        ),
        (
            lambda: K.apply_rope(
                torch.randn(1, 3, 2, 8), torch.randn(1, 3, 2, 6), torch.randn(3, 8), torch.randn(3, 8)
            ),
            r"k must have shape",
        ),
        (
            lambda: K.apply_rope(
                torch.randn(1, 3, 2, 8), torch.randn(1, 3, 2, 8), torch.randn(4, 8), torch.randn(4, 8)
            ),
            r"cos must have shape \(3, 8\) or \(1, 3, 8\)",
        ),
        (
            lambda: K.apply_rope(
                torch.randn(1, 3, 2, 7), torch.randn(1, 3, 2, 7), torch.randn(3, 7), torch.randn(3, 7)
            ),
            r"q head_dim must be even",
        ),
        (
            lambda: K.rope(torch.randn(1, 3, 2, 8), torch.arange(3).int()),
            r"positions must have dtype torch.int64",
        ),
        (
            lambda: K.rope(torch.randn(1, 3, 2, 8), torch.arange(4)),
            r"positions must have shape \(3,\) or \(1, 3\)",
        ),
        (
            lambda: K.linear_cross_entropy(x, torch.randn(5, 8), torch.tensor([0, 1, 5, 2])),
            r"targets\[2\] \(flattened\) = 5 is outside \[0, 5\)",
        ),
        (
            lambda: K.linear_cross_entropy(x, torch.randn(5, 8), torch.tensor([0, 1, 2])),
            r"targets must have shape \(4,\)",
        ),
        (
            lambda: K.linear_cross_entropy(x, torch.randn(5, 7), torch.zeros(4, dtype=torch.long)),
            r"weight must have shape \[vocab, 8\]",
        ),
        (
            lambda: K.linear_cross_entropy(
                x, torch.randn(5, 8), torch.zeros(4, dtype=torch.long), reduction="none"
            ),
            r"reduction must be 'mean' or 'sum'",
        ),
        (
            lambda: K.linear_cross_entropy(x, torch.randn(5, 8), torch.zeros(4)),
            r"targets must have dtype torch.int64",
        ),
    ]
    for fn, pattern in cases:
        with pytest.raises(ValueError, match=pattern):
            fn()


# ---------------------------------------------------------------------------------------------- NVRTC


def _nvrtc_or_skip():
    try:
        from cupy.cuda import nvrtc

        nvrtc.getVersion()
    except Exception as e:  # no CuPy or no libnvrtc at all on this machine
        pytest.skip(f"NVRTC cannot be loaded: {e}")


VARIANTS = ("bf16_v8", "bf16_v1", "f32_v4", "f32_v1")
EXPECTED_KERNELS = {
    "rms_norm": [f"rms_norm_{p}_{v}" for p in ("fwd", "bwd") for v in VARIANTS]
    + ["rms_norm_dw_reduce_bf16", "rms_norm_dw_reduce_f32"],
    "rope": [f"rope_{p}_{v}" for p in ("table", "positions") for v in VARIANTS],
    "swiglu": [f"swiglu_{p}_{v}" for p in ("fwd", "bwd") for v in VARIANTS],
    "linear_ce": [f"ce_rows_{v}" for v in VARIANTS],
    "adamw8bit": ["adamw8bit_bf16", "adamw8bit_f32"],
    "nf4": [f"nf4_dequant_{v}" for v in ("bf16_v8", "bf16_v1", "f32_v8", "f32_v1")],
}


@pytest.mark.parametrize("name", launch.SOURCES)
@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
@pytest.mark.parametrize("own_bf16", [False, True], ids=["cuda_bf16.h", "own-bf16"])
def test_sources_compile_with_nvrtc(name, arch, own_bf16):
    _nvrtc_or_skip()
    if not own_bf16 and not launch.cuda_include_dirs():
        pytest.skip("no cuda_bf16.h found (install nvidia-cuda-runtime / cuda-toolkit wheels)")
    cubin = launch.nvrtc_compile(name, arch, own_bf16=own_bf16)
    assert cubin[:4] == b"\x7fELF"
    for fn in EXPECTED_KERNELS[name]:
        assert fn.encode() in cubin, f"{fn} missing from the {arch} cubin"


def test_compile_error_is_reported_with_log(monkeypatch):
    _nvrtc_or_skip()
    monkeypatch.setattr(
        launch, "source", lambda name: 'extern "C" __global__ void f() { undefined_thing(); }'
    )
    with pytest.raises(RuntimeError, match="undefined_thing"):
        launch.nvrtc_compile("rms_norm", "sm_90")


def test_ops_launch_only_kernels_that_exist():
    import inspect

    from tokenmill.kernels import ops
    from tokenmill.optim import adamw8bit

    text = inspect.getsource(ops) + inspect.getsource(adamw8bit)
    launched = re.findall(r'launch\.launch\(\s*"(\w+)",\s*(?:f"(\w+?)_\{|fn\w*,)', text)
    prefixes = set(re.findall(r'f"(\w+?)_\{_TYPE_NAME', text)) | {"adamw8bit"}
    assert len(launched) >= 8
    for p in prefixes:
        assert any(k.startswith(p + "_") for names in EXPECTED_KERNELS.values() for k in names), p
    # rope's kernel name is f"rope_{kind}_..." with the kind passed to ops._rope_launch
    kinds = set(re.findall(r'_rope_launch\(\s*"(\w+)"', text))
    assert kinds == {"table", "positions"}
    for kind in kinds:
        assert f"rope_{kind}_bf16_v8" in EXPECTED_KERNELS["rope"]


# ---------------------------------------------------------------------------------------------- GPU

gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("d", [4096, 1000])
def test_gpu_rms_norm(dtype, d):
    launch.DEBUG_FILL_NAN = True
    try:
        x = torch.randn(300, d, device="cuda", dtype=dtype, requires_grad=True)
        w = torch.randn(d, device="cuda", dtype=dtype, requires_grad=True)
        dy = torch.randn(300, d, device="cuda", dtype=dtype)
        y = K.rms_norm(x, w, 1e-5)
        dx, dw = torch.autograd.grad(y, (x, w), dy)
        y2, rstd = reference.rms_norm_fwd(x.detach().double(), w.detach().double(), 1e-5)
        dx2, dw2 = reference.rms_norm_bwd(dy.double(), x.detach().double(), w.detach().double(), rstd)
    finally:
        launch.DEBUG_FILL_NAN = False
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-4
    for a, b in ((y, y2), (dx, dx2), (dw, dw2)):
        assert torch.isfinite(a).all()
        assert ((a.double() - b).norm() / b.norm()).item() < tol


@gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_rope_swiglu_ce(dtype):
    launch.DEBUG_FILL_NAN = True
    try:
        q = torch.randn(2, 64, 8, 128, device="cuda", dtype=dtype, requires_grad=True)
        k = torch.randn(2, 64, 2, 128, device="cuda", dtype=dtype, requires_grad=True)
        pos = packed_positions(2, 64, seed=1).cuda()
        cos, sin = K.rope_cos_sin(pos, 128, 500000.0, dtype)
        oq, ok = K.apply_rope(q, k, cos, sin)
        rq, rk = reference.apply_rope(q.detach().double(), k.detach().double(), cos.double(), sin.double())
        tol = 2e-2 if dtype == torch.bfloat16 else 1e-4
        for a, b in ((oq, rq), (ok, rk)):
            assert torch.isfinite(a).all() and ((a.double() - b).norm() / b.norm()).item() < tol
        r = K.rope(q, pos, 500000.0)
        assert (
            (r.double() - reference.rope(q.detach().double(), pos.cpu(), 500000.0).cuda()).norm()
            / r.double().norm()
        ) < tol
        g = torch.randn(1000, 37, device="cuda", dtype=dtype, requires_grad=True)
        u = torch.randn(1000, 37, device="cuda", dtype=dtype, requires_grad=True)
        y = K.swiglu(g, u)
        assert (
            (y.double() - reference.swiglu(g.detach().double(), u.detach().double())).norm()
            / y.double().norm()
        ) < tol
        h = torch.randn(300, 64, device="cuda", dtype=dtype, requires_grad=True)
        w = torch.randn(1001, 64, device="cuda", dtype=dtype, requires_grad=True)
        t = torch.randint(0, 1001, (300,), device="cuda")
        t[::7] = -100
        loss = K.linear_cross_entropy(h, w, t, chunk_rows=128)
        gh, gw = torch.autograd.grad(loss, (h, w))
        hd, wd = h.detach().double().requires_grad_(), w.detach().double().requires_grad_()
        ref = F.cross_entropy(hd @ wd.t(), t)
        rh, rw = torch.autograd.grad(ref, (hd, wd))
        assert abs(loss.item() - ref.item()) < tol * abs(ref.item())
        for a, b in ((gh, rh), (gw, rw)):
            assert torch.isfinite(a).all() and ((a.double() - b).norm() / b.norm()).item() < 2 * tol
    finally:
        launch.DEBUG_FILL_NAN = False


# ---------------------------------------------------------------------------------------------- launch path


class _FakeKernel:
    max_dynamic_shared_size_bytes = 48 * 1024

    def __init__(self):
        self.calls = []

    def __call__(self, grid, block, args, shared_mem=0, stream=None):
        self.calls.append((grid, block, args, shared_mem, stream))


def test_launch_fast_path_passes_pointers_and_stream(monkeypatch):
    import numpy as np

    fake, stream = _FakeKernel(), object()
    monkeypatch.setattr(launch, "_functions", {("swiglu", "f", 0): fake})
    monkeypatch.setattr(launch, "_raw_stream", lambda device: 1234)
    monkeypatch.setattr(launch, "_streams", {(0, 1234): stream})
    monkeypatch.setattr(launch, "_current_device", lambda: 0)
    monkeypatch.setattr(launch, "ARGS_VIA_POINTERS", True)
    t = torch.arange(6, dtype=torch.bfloat16)
    launch.launch("swiglu", "f", 0, 5, 256, (t, None, np.int64(3), np.float32(0.5)), shared_mem=64 * 1024)
    ((grid, block, args, smem, s),) = fake.calls
    assert grid == (5,) and block == (256,) and smem == 64 * 1024 and s is stream
    assert [type(a) for a in args] == [np.uint64, np.uint64, np.int64, np.float32]
    assert int(args[0]) == t.data_ptr() and int(args[1]) == 0 and int(args[2]) == 3
    assert fake.max_dynamic_shared_size_bytes == 64 * 1024  # raised for more than 48 KiB
    with pytest.raises(ValueError, match="numpy scalar"):
        launch.launch("swiglu", "f", 0, 1, 32, (t, 3))  # a Python int has no fixed C size


def test_launch_switches_device_only_when_needed(monkeypatch):
    cupy = pytest.importorskip("cupy")
    entered = []

    class _Device:
        def __init__(self, d):
            self.d = d

        def __enter__(self):
            entered.append(self.d)

        def __exit__(self, *exc):
            return False

    fake = _FakeKernel()
    monkeypatch.setattr(cupy.cuda, "Device", _Device)
    monkeypatch.setattr(launch, "_functions", {("swiglu", "f", 0): fake, ("swiglu", "f", 1): fake})
    monkeypatch.setattr(launch, "_raw_stream", lambda device: 0)
    monkeypatch.setattr(launch, "_streams", {(0, 0): "s0", (1, 0): "s1"})
    monkeypatch.setattr(launch, "_current_device", lambda: 0)
    launch.launch("swiglu", "f", 0, 1, 32, ())
    launch.launch("swiglu", "f", 1, 1, 32, ())
    assert entered == [1] and [c[4] for c in fake.calls] == ["s0", "s1"]


def test_prepare_args_pointer_mode():
    t = torch.zeros(3)
    p = torch.nn.Parameter(torch.zeros(2))
    s32, s64, f32 = np.int32(-7), np.int64(2**40), np.float32(0.5)
    out = launch.prepare_args((t, p, None, s32, s64, f32, np.uint64(5)))
    assert [type(x) for x in out[:3]] == [np.uint64] * 3
    assert [int(x) for x in out[:3]] == [t.data_ptr(), p.data_ptr(), 0]
    assert out[3] is s32 and out[4] is s64 and out[5] is f32 and out[6] == 5
    for bad in (3, 0.5, "x", [t]):
        with pytest.raises(ValueError, match="numpy scalar"):
            launch.prepare_args((bad,))
