"""Attention on packed documents: the flex BlockMask path (and, on a GPU, varlen) against the dense-mask
SDPA reference and float64 per-document math. flex_attention has no backward on the CPU; the gradient
tests lift torch's device check so that its eager math backward (the same mask_mod and BlockMask) runs.
The CUDA tests skip without a GPU and are the GPU machine's check of the compiled kernels."""

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from tokenmill import model as model_module
from tokenmill.config import load_config
from tokenmill.model import (
    ATTENTION,
    Llama,
    LlamaConfig,
    document_block_mask,
    document_mask,
    resolve_attention,
)
from torch.nn.attention import flex_attention as fa
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes

pytestmark = pytest.mark.usefixtures("one_torch_thread")
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def rows_from_lengths(rows: list[list[int]], offset: int = 0) -> torch.Tensor:
    """position_ids [B, T] from each row's document lengths (the first may continue at ``offset``)."""
    out = []
    for r, lengths in enumerate(rows):
        pos = [p + (offset if r == 0 and i == 0 else 0) for i, n in enumerate(lengths) for p in range(n)]
        out.append(pos)
    return torch.tensor(out)


def reference_attention(q, k, v, rows: list[list[int]]) -> torch.Tensor:
    """float64 per-document causal attention from the document lengths alone: [B, H, T, D]."""
    b, h, t, d = q.shape
    group = h // k.shape[1]
    allowed = torch.zeros(b, t, t, dtype=torch.bool)
    for r, lengths in enumerate(rows):
        start = 0
        for n in lengths:
            allowed[r, start : start + n, start : start + n] = torch.ones(n, n, dtype=torch.bool).tril()
            start += n
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    s = torch.einsum("bhqd,bhkd->bhqk", q.double(), k.double()) / math.sqrt(d)
    s = s.masked_fill(~allowed[:, None], float("-inf"))
    return torch.einsum("bhqk,bhkd->bhqd", s.softmax(-1), v.double())


# A row's document lengths: T up to 150, so block sizes 8-32 give partial last blocks and many blocks.
lengths = st.lists(st.integers(1, 30), min_size=1, max_size=5)


def equal_length_rows(rows: list[list[int]]) -> list[list[int]]:
    """Pad each row with one more document so that all rows share the longest row's length."""
    t = max(sum(r) for r in rows)
    return [r + ([t - sum(r)] if sum(r) < t else []) for r in rows]


def sparse_lists(bm) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """A BlockMask's block lists with the unused tail of each index row zeroed (its content is free)."""
    out = []
    for num, idx in (
        (bm.kv_num_blocks, bm.kv_indices),
        (bm.full_kv_num_blocks, bm.full_kv_indices),
        (bm.q_num_blocks, bm.q_indices),
        (bm.full_q_num_blocks, bm.full_q_indices),
    ):
        used = torch.arange(idx.shape[-1]) < num[..., None]
        out.append((num, torch.where(used, idx, 0)))
    return out


@given(st.lists(lengths, min_size=1, max_size=3), st.sampled_from([8, 16, 32]), st.integers(0, 3))
def test_block_mask_equals_create_block_mask(rows, block, offset):
    rows = equal_length_rows(rows)
    pos = rows_from_lengths(rows, offset)
    b, t = pos.shape
    got = document_block_mask(pos, block)
    dense = document_mask(pos)  # the reference's own mask, evaluated element-wise by torch
    if dense is None:
        dense = torch.ones(t, t, dtype=torch.bool).tril().expand(b, 1, t, t)

    def mask_mod(bi, hi, qi, ki):
        return dense[bi, 0, qi, ki]

    ref = fa.create_block_mask(mask_mod, b, None, t, t, device="cpu", BLOCK_SIZE=block)
    for (n1, i1), (n2, i2) in zip(sparse_lists(got), sparse_lists(ref)):
        assert torch.equal(n1, n2) and torch.equal(i1, i2)
    assert torch.equal(got.to_dense(), ref.to_dense())
    # And the element-wise mask_mod of ours is the dense mask (padding excluded).
    qi, ki = torch.meshgrid(torch.arange(t), torch.arange(t), indexing="ij")
    for r in range(b):
        assert torch.equal(got.mask_mod(torch.tensor(r), torch.tensor(0), qi, ki), dense[r, 0])


@given(st.lists(lengths, min_size=1, max_size=2), st.sampled_from([(4, 4), (4, 2), (6, 1)]))
def test_flex_matches_float64_reference_and_sdpa(rows, heads):
    rows = equal_length_rows(rows)
    pos = rows_from_lengths(rows)
    b, t = pos.shape
    h, kv = heads
    g = torch.Generator().manual_seed(t)
    q = torch.randn(b, h, t, 8, generator=g, dtype=torch.float64)
    k, v = (torch.randn(b, kv, t, 8, generator=g, dtype=torch.float64) for _ in range(2))
    want = reference_attention(q, k, v, rows)
    got = fa.flex_attention(q, k, v, block_mask=document_block_mask(pos, 16), enable_gqa=kv != h)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_compiled_flex_takes_the_block_mask_without_recompiling():
    """What runs on CUDA is compiled flex_attention; compiled on this CPU (forward only) it reads our
    BlockMask and its mask_mod the same way: float64-reference outputs, and a batch with other document
    boundaries reuses the compiled kernel (the boundaries are data, not guards)."""
    import torch._dynamo

    flex = torch.compile(fa.flex_attention, dynamic=False)
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 8, 200, 16, generator=g)  # T = 200: a partial second 128-block
    k, v = (torch.randn(2, 2, 200, 16, generator=g) for _ in range(2))
    for i, rows in enumerate(([[70, 13, 90, 27], [200]], [[100, 100], [1, 199]])):
        with torch._dynamo.config.patch(error_on_recompile=i > 0):
            got = flex(q, k, v, block_mask=document_block_mask(rows_from_lengths(rows)), enable_gqa=True)
        torch.testing.assert_close(got.double(), reference_attention(q, k, v, rows), rtol=0, atol=2e-6)


@pytest.fixture
def flex_cpu_backward(monkeypatch):
    """flex_attention refuses requires_grad on the CPU; its eager backward is plain torch math, which this
    lets run so that our BlockMask's gradients can be checked here (the GPU tests run the kernel)."""
    monkeypatch.setattr(fa, "_validate_device", lambda *a: None)


@pytest.mark.usefixtures("flex_cpu_backward")
@given(st.lists(lengths, min_size=1, max_size=2), st.sampled_from([(4, 4), (4, 2)]))
def test_flex_gradients_match_float64_reference(rows, heads):
    rows = equal_length_rows(rows)
    pos = rows_from_lengths(rows)
    b, t = pos.shape
    h, kv = heads
    g = torch.Generator().manual_seed(t + 1)
    q = torch.randn(b, h, t, 8, generator=g, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(b, kv, t, 8, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(2))
    dy = torch.randn(b, h, t, 8, generator=g, dtype=torch.float64)
    got = fa.flex_attention(q, k, v, block_mask=document_block_mask(pos, 16), enable_gqa=kv != h)
    grads = torch.autograd.grad(got, (q, k, v), dy)
    want = torch.autograd.grad(reference_attention(q, k, v, rows), (q, k, v), dy)
    for a, w in zip(grads, want):
        torch.testing.assert_close(a, w, rtol=1e-9, atol=1e-9)


def tiny_model(kv: int = 2, seq: int = 80) -> Llama:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=97, dim=32, n_layers=2, n_heads=4, n_kv_heads=kv, max_seq_len=seq)
    return Llama(cfg).double()


@pytest.mark.usefixtures("flex_cpu_backward")
@pytest.mark.parametrize("kv", [4, 2])
def test_model_flex_equals_sdpa_loss_and_gradients(kv):
    rows = [[30, 13, 27, 3], [1, 50, 22]]  # T = 73: not a multiple of the 128 block
    pos = rows_from_lengths(rows)
    ids = torch.randint(0, 97, pos.shape, generator=torch.Generator().manual_seed(3))
    labels = ids.roll(-1, 1)
    results = {}
    for path in ("sdpa", "flex"):
        model = tiny_model(kv)
        model.attention = path
        loss = model(ids, labels, pos)
        loss.backward()
        results[path] = (loss.detach(), {n: p.grad for n, p in model.named_parameters()})
    torch.testing.assert_close(results["flex"][0], results["sdpa"][0], rtol=1e-12, atol=0)
    for name, g in results["sdpa"][1].items():
        torch.testing.assert_close(results["flex"][1][name], g, rtol=1e-9, atol=1e-12, msg=name)


def test_model_flex_packed_equals_separate_documents():
    """The independent check: a packed row's logits are each document's own run (no mask involved)."""
    model = tiny_model()
    model.attention = "flex"
    docs = [torch.randint(0, 97, (n,), generator=torch.Generator().manual_seed(n)) for n in (17, 40, 9)]
    pos = rows_from_lengths([[17, 40, 9]])
    with torch.no_grad():
        packed = model(torch.cat(docs)[None], position_ids=pos)[0]
        alone = torch.cat([model(d[None])[0] for d in docs])
    torch.testing.assert_close(packed, alone, rtol=1e-10, atol=1e-10)


class SyncOps(TorchDispatchMode):
    """Records every aten op that makes the host wait for the device's result."""

    SYNCING = {"_local_scalar_dense", "nonzero", "masked_select", "unique", "_unique2", "equal", "is_nonzero"}

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in self.SYNCING:
            self.seen.append(name)
        return func(*args, **(kwargs or {}))


def test_flex_forward_has_no_host_sync(monkeypatch):
    """Everything around the kernel (BlockMask, rotary tables, layers) is watched; the flex kernel
    itself (one Triton kernel on CUDA; eager CPU flex runs through torch.compile, which refuses a dispatch
    mode) runs outside the mode, and the GPU test below watches it with torch.cuda.set_sync_debug_mode."""
    kernel, calls = model_module._flex, []

    def unwatched(*args):
        calls.append(type(args[3]).__name__)
        with _disable_current_modes():
            return kernel(*args)

    monkeypatch.setattr(model_module, "_flex", unwatched)
    model = tiny_model()
    pos = rows_from_lengths([[30, 13, 37], [80]])
    ids = torch.randint(0, 97, pos.shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        model.attention = "sdpa"  # the detector sees the reference's bool(starts.any())
        with SyncOps() as ops:
            model(ids, position_ids=pos)  # logits: linear_cross_entropy checks its targets (one sync)
        assert "_local_scalar_dense" in ops.seen
        model.attention = "flex"
        with SyncOps() as ops:
            model(ids, position_ids=pos)
        assert ops.seen == [] and calls == ["BlockMask"] * 2  # one kernel per layer


def test_resolve_attention():
    cpu, gpu = torch.device("cpu"), torch.device("cuda", 0)
    assert resolve_attention("auto", cpu, True) == "sdpa"
    assert resolve_attention("auto", gpu, True) == "varlen"
    assert resolve_attention("auto", gpu, False) == "flex"
    assert resolve_attention("flex", cpu, False) == "flex"
    with pytest.raises(ValueError, match="CUDA only"):
        resolve_attention("varlen", cpu, True)
    with pytest.raises(ValueError, match="cu_seqlens"):
        resolve_attention("varlen", gpu, False)
    with pytest.raises(ValueError, match="one of auto, sdpa, flex, varlen"):
        resolve_attention("flash", cpu, True)


def test_run_attention_config_key(tmp_path):
    assert load_config().run.attention == "auto"
    assert load_config(None, ["--run.attention=flex"]).run.attention == "flex"
    with pytest.raises(ValueError, match="run.attention must be one of"):
        load_config(None, ["--run.attention=dense"])
    assert set(ATTENTION) == {"auto", "sdpa", "flex", "varlen"}


# -- CUDA: the compiled flex kernel and varlen against the reference, and no host sync ----------------------


def gpu_batch(rows: list[list[int]]):
    pos = rows_from_lengths(rows).cuda()
    lens = torch.tensor([n for r in rows for n in r], dtype=torch.int32)
    cu = F.pad(lens.cumsum(0, dtype=torch.int32), (1, 0)).cuda()
    ids = torch.randint(0, 97, pos.shape, generator=torch.Generator().manual_seed(0)).cuda()
    return ids, pos, cu, max(n for r in rows for n in r)


def gpu_model() -> Llama:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=97, dim=256, n_layers=2, n_heads=8, n_kv_heads=2, max_seq_len=512)
    return Llama(cfg).cuda()


@cuda
@pytest.mark.parametrize("path", ["flex", "varlen"])
def test_gpu_path_matches_float32_reference(path):
    rows = [[300, 13, 127, 60], [1, 250, 249]]  # T = 500
    ids, pos, cu, max_len = gpu_batch(rows)
    model = gpu_model()
    model.attention = "sdpa"
    ref_loss = model(ids, ids, pos)  # float32 dense-mask reference
    ref_loss.backward()
    ref = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model.attention = path
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = model(ids, ids, pos, cu_seqlens=cu, max_seqlen=max_len)
    loss.backward()
    with torch.autocast("cuda", dtype=torch.bfloat16):  # the bf16 reference: the error to match
        model.attention = "sdpa"
        bf_loss = model(ids, ids, pos)
    assert abs(loss.item() - ref_loss.item()) <= 2 * abs(bf_loss.item() - ref_loss.item()) + 1e-3
    for n, p in model.named_parameters():
        rel = (p.grad.float() - ref[n]).norm() / ref[n].norm()
        assert rel < 2e-2, (n, float(rel))


@cuda
@pytest.mark.parametrize("path", ["flex", "varlen"])
def test_gpu_path_has_no_host_sync(path):
    ids, pos, cu, max_len = gpu_batch([[300, 13, 127, 60], [1, 250, 249]])
    model = gpu_model()
    model.attention = path
    for _ in range(2):  # compile and warm up first (compilation may synchronise)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            model(ids, ids, pos, cu_seqlens=cu, max_seqlen=max_len).backward()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:  # logits, not the loss: linear_cross_entropy checks its targets' range on the host
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = model(ids, position_ids=pos, cu_seqlens=cu, max_seqlen=max_len)
        logits.float().square().mean().backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")


# -- the trainer: what reaches the model, and GPU-only choices refused on the CPU ---------------------------


def packed_batches(n: int = 3):
    pos = rows_from_lengths([[20, 12], [32]])
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        x = torch.randint(0, 512, (2, 33), generator=g)
        cu = torch.tensor([0, 20, 32, 64], dtype=torch.int32)
        out.append(
            {
                "input_ids": x[:, :-1].contiguous(),
                "labels": x[:, 1:].contiguous(),
                "position_ids": pos,
                "cu_seqlens": cu,
                "max_seqlen": 32,
            }
        )
    return out


def trainer_config(tmp_path, *overrides):
    from tokenmill import train as T

    base = [
        f"--run.out_dir={tmp_path / 'run'}",
        "--run.device=cpu",
        "--model.preset=tiny",
        "--data.seq_len=32",
        "--data.batch_size=2",
        "--train.steps=2",
        "--train.eval_every=0",
        "--train.progress=false",
    ]
    return T.load_config(None, [*base, *overrides])


@pytest.mark.parametrize("document_mask", [True, False])
def test_trainer_hands_documents_to_the_model(tmp_path, monkeypatch, document_mask):
    from tokenmill import train as T

    seen = []

    def spy(name, device, varlen_ready):
        seen.append((name, varlen_ready))
        return resolve_attention(name, device, varlen_ready)

    monkeypatch.setattr(model_module, "resolve_attention", spy)
    cfg = trainer_config(tmp_path, f"--data.document_mask={str(document_mask).lower()}")
    T.train(cfg, packed_batches())
    # With document masks: position_ids, cu_seqlens and max_seqlen reach the model each step; without,
    # the rows are plain causal and no attention path is chosen at all.
    assert seen == ([("auto", True)] * 2 if document_mask else [])


@pytest.mark.parametrize("path", ["flex", "varlen"])
def test_trainer_refuses_gpu_attention_on_cpu(tmp_path, path):
    from tokenmill import train as T

    with pytest.raises(ValueError, match=f'run.attention = "{path}" needs a CUDA device'):
        T.train(trainer_config(tmp_path, f"--run.attention={path}"), packed_batches())
    assert not (tmp_path / "run" / "log.jsonl").exists()
