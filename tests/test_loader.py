"""tokenmill.data.DataLoader against hand-built token files whose every token names its document and
position (token = 1 + BASE * doc + pos), so each batch can be checked independently of the loader."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
import tokenmill as tm
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenmill import _core
from tokenmill.data import DataLoader, TokenDataset
from tokenmill.data.dataset import write_token_file

BASE = 100_000
# Each example builds token files: a third of the profile's count (HYPOTHESIS_MAX_EXAMPLES, default 200).
EXAMPLES = max(10, settings().max_examples * 3 // 10)
PAD = 0


def make_docs(lengths, first_doc=0):
    return [[1 + BASE * (first_doc + d) + p for p in range(n)] for d, n in enumerate(lengths)]


def decode(tok):
    """(doc, pos) of a token, or None for padding."""
    tok = int(tok)
    return None if tok == PAD else divmod(tok - 1, BASE)


@pytest.fixture
def files(tmp_path):
    def make(name, lengths, manifest=None, first_doc=0):
        prefix = tmp_path / name
        write_token_file(prefix, make_docs(lengths, first_doc), dtype="int32")
        if manifest is not None:
            (tmp_path / f"{name}.json").write_text(json.dumps(manifest))
        return str(prefix)

    return make


def batches(loader, n=None):
    out = []
    for b in itertools.islice(loader, n):  # islice takes exactly n: a handed-over batch counts as consumed
        out.append({k: (v.clone() if torch.is_tensor(v) else v) for k, v in b.items()})
    return out


def check_batch(b, lengths, seq_len, document_mask, packing):
    """Labels, position ids and cu_seqlens agree with the documents' real boundaries."""
    inp, lab, pos, cu = (b[k].numpy() for k in ("input_ids", "labels", "position_ids", "cu_seqlens"))
    rows, t = inp.shape
    assert t == seq_len and lab.shape == pos.shape == inp.shape
    assert b["cu_seqlens"].dtype == torch.int32 and b["input_ids"].dtype == torch.int64
    assert cu[0] == 0 and cu[-1] == rows * t and np.all(np.diff(cu) > 0)
    assert b["max_seqlen"] == np.diff(cu).max()
    flat_inp, flat_pos, flat_lab = inp.ravel(), pos.ravel(), lab.ravel()
    if not document_mask:
        assert np.array_equal(cu, np.arange(rows + 1) * t)
    for a, e in zip(cu[:-1], cu[1:]):
        assert a // t == (e - 1) // t, "a segment never spans two rows"
        assert np.array_equal(flat_pos[a:e], np.arange(e - a))
        if document_mask:
            ids = [decode(x) for x in flat_inp[a:e]]
            if ids[0] is None:
                assert all(x is None for x in ids) and e % t == 0, "padding only at the end of a row"
            else:
                d0, p0 = ids[0]
                assert ids == [(d0, p0 + i) for i in range(e - a)], "a segment is one run of one document"
                # The next segment starts a new document (or a new row / padding).
                if e % t and decode(flat_inp[e]) is not None:
                    d1, p1 = decode(flat_inp[e])
                    assert p1 == 0 or d1 != d0
    for x, y in zip(flat_inp, flat_lab):
        here = decode(x)
        if here is None:
            assert y == -100
            continue
        d, p = here
        last = p + 1 == lengths[d]
        if y == -100:
            assert last, f"token {(d, p)} lost its label"
        elif packing == "concat" and not document_mask and last:
            assert decode(y)[1] == 0, "across documents the label is the next document's first token"
        else:
            assert decode(y) == (d, p + 1)


lengths_st = st.lists(st.integers(0, 40), min_size=1, max_size=25).filter(lambda v: sum(v) > 0)


@given(lengths=lengths_st, seq_len=st.integers(1, 16), seed=st.integers(0, 2**64 - 1), docmask=st.booleans())
@settings(max_examples=EXAMPLES)
def test_concat_every_token_once_per_epoch(tmp_path_factory, lengths, seq_len, seed, docmask):
    prefix = str(tmp_path_factory.mktemp("c") / "a")
    write_token_file(prefix, make_docs(lengths), dtype="int32")
    loader = DataLoader(
        prefix, seq_len=seq_len, batch_size=1, seed=seed, epochs=2, document_mask=docmask, prefetch=0
    )
    total = sum(lengths)
    per_epoch = -(-total // seq_len)
    assert loader.samples_per_epoch == [per_epoch] and len(loader) == 2 * per_epoch
    got = batches(loader)
    assert len(got) == 2 * per_epoch
    want = sorted(t for d in make_docs(lengths) for t in d)
    for epoch in (got[:per_epoch], got[per_epoch:]):
        toks = np.concatenate([b["input_ids"].numpy().ravel() for b in epoch])
        assert sorted(toks[toks != PAD].tolist()) == want
        assert (toks == PAD).sum() == per_epoch * seq_len - total, "only the last window is padded"
    for b in got:
        check_batch(b, lengths, seq_len, docmask, "concat")


def first_fit_decreasing(chunks, t):
    bins = []
    for c in sorted(chunks, reverse=True):
        for i, free in enumerate(bins):
            if free >= c:
                bins[i] -= c
                break
        else:
            bins.append(t - c)
    return len(bins)


@given(lengths=lengths_st, seq_len=st.integers(1, 24), seed=st.integers(0, 1000), docmask=st.booleans())
@settings(max_examples=EXAMPLES)
def test_best_fit_never_splits_a_chunk(tmp_path_factory, lengths, seq_len, seed, docmask):
    prefix = str(tmp_path_factory.mktemp("b") / "a")
    write_token_file(prefix, make_docs(lengths), dtype="int32")
    loader = DataLoader(
        prefix, seq_len=seq_len, batch_size=1, packing="best_fit", seed=seed, epochs=1, document_mask=docmask
    )
    chunks = [min(seq_len, n - s) for n in lengths for s in range(0, n, seq_len)]
    got = batches(loader)
    # Fewest sequences: never more than first-fit decreasing (an independent packer), never below the bound.
    assert -(-sum(lengths) // seq_len) <= len(got) <= first_fit_decreasing(chunks, seq_len)
    seen = []
    for b in got:
        check_batch(b, lengths, seq_len, docmask, "best_fit")
        row = b["input_ids"][0].numpy()
        ids = [decode(x) for x in row]
        n_pad = sum(x is None for x in ids)
        assert all(x is None for x in ids[len(ids) - n_pad :]), "padding only at the tail"
        i = 0
        while i < len(ids) - n_pad:
            d, p = ids[i]
            n = min(seq_len, lengths[d] - p)
            assert p % seq_len == 0 and ids[i : i + n] == [(d, p + k) for k in range(n)], "a chunk is whole"
            seen.append((d, p))
            i += n
    assert sorted(seen) == sorted((d, s) for d, n in enumerate(lengths) for s in range(0, n, seq_len))


def test_packing_none_windows_and_too_long_seq_len(files):
    lengths = [3, 30, 9, 12, 2]
    prefix = files("a", lengths)
    loader = DataLoader(prefix, seq_len=4, batch_size=1, packing=None, epochs=1, seed=3)
    got = batches(loader)
    assert len(got) == sum((n - 1) // 4 for n in lengths if n > 4)
    for b in got:
        check_batch(b, lengths, 4, True, "none")
        assert (b["labels"] != -100).all(), "a window reads one token past its inputs"
    with pytest.raises(ValueError, match="longest document has 30 tokens"):
        DataLoader(prefix, seq_len=30, batch_size=1, packing="none")


def test_megatron_written_file_reads_identically(tmp_path):
    mc = pytest.importorskip("megatron.core.datasets.indexed_dataset")
    prefix = str(tmp_path / "m")
    docs = make_docs([5, 17, 1, 9])
    builder = mc.IndexedDatasetBuilder(prefix + ".bin", dtype=np.int32)
    for d in docs:
        builder.add_document(torch.tensor(d, dtype=torch.int32), [len(d)])
    builder.finalize(prefix + ".idx")
    ds = TokenDataset(prefix)
    assert [ds[i].tolist() for i in range(len(ds))] == docs
    loader = DataLoader(prefix, seq_len=8, batch_size=2, epochs=1, drop_last=False)
    for b in batches(loader):
        check_batch(b, [5, 17, 1, 9], 8, True, "concat")


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.int64])
def test_megatron_files_of_every_readable_dtype(tmp_path, dtype):
    mc = pytest.importorskip("megatron.core.datasets.indexed_dataset")
    prefix = str(tmp_path / "m")
    docs = [[d % 250 for d in doc] for doc in make_docs([5, 17, 1, 9])]
    builder = mc.IndexedDatasetBuilder(prefix + ".bin", dtype=dtype)
    for d in docs:
        builder.add_document(torch.tensor(d), [len(d)])
    builder.finalize(prefix + ".idx")
    theirs = mc.IndexedDataset(prefix)
    ds = TokenDataset(prefix)
    assert ds.dtype == np.dtype(dtype)
    assert [ds[i].tolist() for i in range(len(ds))] == [theirs[i].tolist() for i in range(len(theirs))]
    assert tm.data.inspect(prefix)["tokens"] == sum(map(len, docs))


def test_megatron_files_we_do_not_read_are_refused_by_name(tmp_path):
    """int16 files are legal Megatron files we do not read: the refusal names the dtype. A signed file
    holding a negative value is refused by inspect (it used to count -3 as token 4294967293)."""
    mc = pytest.importorskip("megatron.core.datasets.indexed_dataset")
    prefix = str(tmp_path / "i16")
    builder = mc.IndexedDatasetBuilder(prefix + ".bin", dtype=np.int16)
    builder.add_document(torch.tensor([1, 2, 3]), [3])
    builder.finalize(
        prefix + ".idx"
    )  # (megatron-core 0.16's IndexedDataset segfaults on this one-document file)
    refusal = r"i16\.idx: token dtype int16 \(code 3\) is not supported"
    with pytest.raises(ValueError, match=refusal):
        TokenDataset(prefix)
    with pytest.raises(ValueError, match=refusal):
        DataLoader(prefix, seq_len=2, batch_size=1)
    prefix = str(tmp_path / "neg")
    builder = mc.IndexedDatasetBuilder(prefix + ".bin", dtype=np.int32)
    builder.add_document(torch.tensor([5, -3, 7]), [3])
    builder.finalize(prefix + ".idx")
    assert np.fromfile(prefix + ".bin", np.int32).tolist() == [5, -3, 7]
    with pytest.raises(ValueError, match=r"neg\.bin: token -3 at position 1 is not a token id"):
        tm.data.inspect(prefix)


def test_mixing_proportions(files):
    # Source s holds documents 1000 * s ..: a token names its source.
    weights = {
        files("a", [50] * 20): 0.6,
        files("b", [7] * 30, first_doc=1000): 0.3,
        files("c", [100] * 3, first_doc=2000): 0.1,
    }
    loader = DataLoader(weights, seq_len=16, batch_size=8, seed=11)
    core = loader._core()
    n = 50_000
    src = core.sources(123_457, n)
    for s, w in enumerate(weights.values()):
        p = (src == s).mean()
        sigma = (w * (1 - w) / n) ** 0.5
        assert abs(p - w) < 5 * sigma, (s, p, w)
    # Over a whole block the proportions are exact to 1/65536.
    full = core.sources(65_536 * 3, 65_536)
    assert np.bincount(full).tolist() == core.mixture_counts() == [39322, 19661, 6553]
    # The batches come from the sources the rule names.
    got = np.concatenate([b["input_ids"][:, 0].numpy() for b in batches(loader, 50)])
    assert [decode(x)[0] // 1000 for x in got] == core.sources(0, 400).tolist()
    # Zero weight: that source is never drawn.
    a, c = list(weights)[0], list(weights)[2]
    z = DataLoader({a: 1.0, c: 0.0}, seq_len=16, batch_size=8, seed=11)._core()
    assert (z.sources(0, 10_000) == 0).all()


def test_rank_streams_disjoint_and_complete(files):
    lengths = [13, 40, 7, 22, 5, 31, 18, 9] * 4
    prefix = files("a", lengths)
    kw = dict(seq_len=8, packing="best_fit", seed=5, epochs=1, prefetch=1)
    single = batches(DataLoader(prefix, batch_size=8, **kw))
    ranks = [batches(DataLoader(prefix, batch_size=2, rank=r, world_size=4, **kw)) for r in range(4)]
    assert all(len(r) == len(single) for r in ranks) and len(single) > 3
    for i, b in enumerate(single):
        for key in ("input_ids", "labels", "position_ids"):
            assert torch.equal(torch.cat([r[i][key] for r in ranks]), b[key])
        # cu_seqlens of the shards, shifted, tile the single-process boundaries.
        offs, parts = 0, [torch.zeros(1, dtype=torch.int32)]
        for r in ranks:
            parts.append(r[i]["cu_seqlens"][1:] + offs)
            offs += r[i]["input_ids"].numel()
        assert torch.equal(torch.cat(parts), b["cu_seqlens"])
    rows = [tuple(x.tolist()) for r in ranks for b in r for x in b["input_ids"]]
    assert len(rows) == len(set(rows)), "ranks never see the same sample"


def test_determinism_and_thread_count(files):
    prefix = {files("a", [13, 40, 7, 22, 5, 31] * 5): 2, files("b", [3, 9] * 10): 1}
    kw = dict(seq_len=16, batch_size=4, packing="concat", seed=9)
    a = batches(DataLoader(prefix, num_threads=1, **kw), 20)
    b = batches(DataLoader(prefix, num_threads=3, prefetch=0, **kw), 20)
    c = batches(DataLoader(prefix, **{**kw, "seed": 10}), 20)
    assert all(
        torch.equal(x["input_ids"], y["input_ids"]) and torch.equal(x["labels"], y["labels"])
        for x, y in zip(a, b)
    )
    assert not all(torch.equal(x["input_ids"], y["input_ids"]) for x, y in zip(a, c))


@given(
    k=st.integers(0, 40),
    m=st.integers(1, 6),
    packing=st.sampled_from(["concat", "best_fit"]),
    prefetch=st.integers(0, 3),
)
@settings(max_examples=EXAMPLES)
def test_resume_equals_uninterrupted(tmp_path_factory, k, m, packing, prefetch):
    d = tmp_path_factory.mktemp("r")
    sources = {}
    for name, lengths, w in (("a", [13, 40, 7, 22, 5, 31], 0.7), ("b", [3, 9, 17], 0.3)):
        write_token_file(d / name, make_docs(lengths), dtype="int32")
        sources[str(d / name)] = w
    kw = dict(seq_len=8, batch_size=3, packing=packing, seed=1, prefetch=prefetch)
    whole = batches(DataLoader(sources, **kw), k + m)
    first = DataLoader(sources, **kw)
    batches(first, k)  # consumes k batches (the prefetched extra ones do not count)
    state = first.state_dict()
    assert state["sample_index"] == 3 * k
    resumed = DataLoader(sources, **kw)
    resumed.load_state_dict(json.loads(json.dumps(state)))  # states are plain JSON
    for x, y in zip(batches(resumed, m), whole[k:], strict=True):
        assert all(
            torch.equal(x[key], y[key]) for key in ("input_ids", "labels", "position_ids", "cu_seqlens")
        )


@pytest.mark.parametrize(("n", "m"), [(2, 4), (4, 1), (1, 8)])
def test_elastic_resume(files, n, m):
    prefix = files("a", [13, 40, 7, 22, 5, 31, 18, 9] * 3)
    gbs, k = 8, 5
    kw = dict(seq_len=8, seed=2, packing="best_fit")
    single = batches(DataLoader(prefix, batch_size=gbs, **kw), k + 4)
    before = [DataLoader(prefix, batch_size=gbs // n, rank=r, world_size=n, **kw) for r in range(n)]
    for r in before:
        batches(r, k)
    states = [r.state_dict() for r in before]
    assert all(s == states[0] for s in states)
    after = []
    for r in range(m):
        x = DataLoader(prefix, batch_size=gbs // m, rank=r, world_size=m, **kw)
        x.load_state_dict(states[0])
        after.append(batches(x, 4))
    for i in range(4):
        assert torch.equal(torch.cat([a[i]["input_ids"] for a in after]), single[k + i]["input_ids"])
        assert torch.equal(torch.cat([a[i]["labels"] for a in after]), single[k + i]["labels"])


def test_resume_far_away_is_direct(files):
    """A position a trillion samples in resumes without replay (it would never finish otherwise) and
    renders what the layout of that epoch says."""
    lengths = [13, 40, 7, 22]
    prefix = files("a", lengths)
    loader = DataLoader(prefix, seq_len=8, batch_size=2, seed=4)
    state = loader.state_dict()
    state["sample_index"] = 10**12
    loader.load_state_dict(state)
    b = next(iter(loader))
    check_batch(b, lengths, 8, True, "concat")
    src, epoch, pieces = loader._core().sample(10**12)
    assert epoch == 10**12 // loader.samples_per_epoch[0]
    assert [decode(x) for x in b["input_ids"][0][: pieces[0][2]]] == [
        (pieces[0][0], pieces[0][1] + i) for i in range(pieces[0][2])
    ]
    assert loader.state_dict()["sample_index"] == 10**12 + 2


def test_state_mismatch_is_refused(files):
    prefix = files("a", [13, 40, 7])
    state = DataLoader(prefix, seq_len=8, batch_size=2, seed=4).state_dict()
    with pytest.raises(ValueError, match="seed"):
        DataLoader(prefix, seq_len=8, batch_size=2, seed=5).load_state_dict(state)
    with pytest.raises(ValueError, match="seq_len"):
        DataLoader(prefix, seq_len=4, batch_size=2, seed=4).load_state_dict(state)


def test_torch_dataloader_workers(files):
    prefix = files("a", [13, 40, 7, 22, 5, 31, 18, 9] * 3)
    loader = DataLoader(prefix, seq_len=8, batch_size=2, seed=3, epochs=1)
    plain = batches(loader)
    wrapped = torch.utils.data.DataLoader(
        DataLoader(prefix, seq_len=8, batch_size=2, seed=3, epochs=1), batch_size=None, num_workers=2
    )
    got = batches(wrapped)
    assert len(got) == len(plain) == len(loader)
    # The main process's copy does not advance; the caller says how many batches it consumed.
    assert loader.state_dict(batches=3)["sample_index"] == 3 * 2
    for x, y in zip(got, plain):
        assert torch.equal(x["input_ids"], y["input_ids"]) and torch.equal(x["cu_seqlens"], y["cu_seqlens"])


def test_pinned_path_and_python_prefetch_thread(files):
    prefix = files("a", [13, 40, 7, 22, 5])
    cuda = torch.cuda.is_available()
    if cuda:
        b = next(iter(DataLoader(prefix, seq_len=8, batch_size=2, pin_memory=True)))
        assert b["input_ids"].is_pinned() and b["cu_seqlens"].is_pinned()
    else:
        with pytest.warns(UserWarning, match="pin_memory"):
            DataLoader(prefix, seq_len=8, batch_size=2, pin_memory=True)
    # The thread that feeds pinned buffers gives the same stream as rendering on demand.
    loader = DataLoader(prefix, seq_len=8, batch_size=2, epochs=1, prefetch=0)
    plain = batches(loader)
    threaded = list(loader._prefetched(loader._core(), loader._batch_starts(*loader._schedule(0, 0, 1))))
    assert len(threaded) == len(plain)
    for x, y in zip(threaded, plain):
        assert all(torch.equal(x[k], y[k]) for k in ("input_ids", "labels", "position_ids", "cu_seqlens"))


def test_bad_input_at_construction(files, tmp_path):
    good = files("a", [13, 40, 7], manifest={"tokenizer_fingerprint": "tok-A"})
    other = files("b", [5, 5], manifest={"tokenizer_fingerprint": "tok-B"})
    with pytest.raises(FileNotFoundError, match="missing"):
        DataLoader(str(tmp_path / "missing"), seq_len=8, batch_size=2)
    with pytest.raises(ValueError, match="different tokenizers.*tok-A.*tok-B"):
        DataLoader([good, other], seq_len=8, batch_size=2)
    # prepare's manifest layout: {"tokenizer": {"fingerprint": ...}}
    nested = files("n", [5, 5], manifest={"tokenizer": {"fingerprint": "tok-C", "n_vocab": 300}})
    with pytest.raises(ValueError, match="different tokenizers.*tok-A.*tok-C"):
        DataLoader([good, nested], seq_len=8, batch_size=2)
    same = files("s", [5, 5], manifest={"tokenizer": {"fingerprint": "tok-A", "n_vocab": 300}})
    assert DataLoader([good, same], seq_len=8, batch_size=2).tokenizer_fingerprint == "tok-A"
    with pytest.raises(ValueError, match="sum to a positive"):
        DataLoader({good: 0.0}, seq_len=8, batch_size=2)
    with pytest.raises(ValueError, match="finite"):
        DataLoader({good: -1}, seq_len=8, batch_size=2)
    with pytest.raises(ValueError, match="packing"):
        DataLoader(good, seq_len=8, batch_size=2, packing="zigzag")
    with pytest.raises(ValueError, match="rank"):
        DataLoader(good, seq_len=8, batch_size=2, rank=2, world_size=2)
    # Truncated .bin and garbage .idx name the file.
    bad = files("c", [13, 40, 7])
    raw = (tmp_path / "c.bin").read_bytes()
    (tmp_path / "c.bin").write_bytes(raw[:-2])
    with pytest.raises(ValueError, match=r"c\.bin"):
        DataLoader(bad, seq_len=8, batch_size=2)
    (tmp_path / "c.idx").write_bytes(b"not an index")
    with pytest.raises(ValueError, match=r"c\.idx.*MMIDIDX"):
        DataLoader(bad, seq_len=8, batch_size=2)
    empty = files("e", [0, 0])
    with pytest.raises(ValueError, match="no tokens"):
        DataLoader(empty, seq_len=8, batch_size=2)
    # A loss mask that does not match its documents.
    write_token_file(tmp_path / "a.mask", [[1] * 13, [1] * 40], dtype="uint8")
    with pytest.raises(ValueError, match="loss mask"):
        DataLoader(good, seq_len=8, batch_size=2)


def test_rank_defaults_from_torch_distributed(files, monkeypatch):
    prefix = files("a", [13, 40, 7])
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_rank", lambda: 1)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda: 4)
    loader = DataLoader(prefix, seq_len=8, batch_size=2)
    assert (loader.rank, loader.world_size, loader.global_batch_size) == (1, 4, 8)
    assert DataLoader(prefix, seq_len=8, batch_size=2, rank=0, world_size=1).world_size == 1


def test_rank_defaults_from_torchrun_environment(files, monkeypatch):
    """Without a process group, RANK/WORLD_SIZE (as torchrun sets them) pick the shard; explicit arguments
    win; half-set, non-integer or out-of-range values are errors naming where they came from."""
    prefix = files("a", [13, 40, 7, 25, 9])
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: False)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    from_env = DataLoader(prefix, seq_len=8, batch_size=2, seed=3)
    assert (from_env.rank, from_env.world_size) == (1, 2)
    # The same shard as the explicit arguments give: every second batch of the single-process stream.
    explicit = batches(DataLoader(prefix, seq_len=8, batch_size=2, seed=3, rank=1, world_size=2), 4)
    whole = batches(DataLoader(prefix, seq_len=8, batch_size=2, seed=3, rank=0, world_size=1), 8)
    got = batches(from_env, 4)
    for b, e, w in zip(got, explicit, whole[1::2]):
        assert torch.equal(b["input_ids"], e["input_ids"]) and torch.equal(b["input_ids"], w["input_ids"])
    own = DataLoader(prefix, seq_len=8, batch_size=2, rank=0, world_size=4)  # arguments win
    assert (own.rank, own.world_size) == (0, 4)
    assert DataLoader(prefix, seq_len=8, batch_size=2, world_size=3).rank == 1  # half from each
    with pytest.raises(ValueError, match=r"rank=1 \(from the RANK/WORLD_SIZE .*world_size=1 \(from argument"):
        DataLoader(prefix, seq_len=8, batch_size=2, world_size=1)
    monkeypatch.setenv("RANK", "2")
    with pytest.raises(ValueError, match="rank=2 .*world_size=2 .*environment"):
        DataLoader(prefix, seq_len=8, batch_size=2)
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(ValueError, match="WORLD_SIZE='two' is not an integer"):
        DataLoader(prefix, seq_len=8, batch_size=2)
    monkeypatch.delenv("WORLD_SIZE")
    with pytest.raises(ValueError, match="RANK=2 is set but WORLD_SIZE is not"):
        DataLoader(prefix, seq_len=8, batch_size=2)
    monkeypatch.delenv("RANK")
    assert (
        DataLoader(prefix, seq_len=8, batch_size=2).rank,
        DataLoader(prefix, seq_len=8, batch_size=2).world_size,
    ) == (0, 1)


def test_endless_stream_has_no_len(files):
    loader = DataLoader(files("a", [3]), seq_len=8, batch_size=2)
    with pytest.raises(TypeError):
        len(loader)
    got = batches(loader, 5)  # a 3-token source repeats, reshuffled each pass
    assert len(got) == 5 and loader.num_samples is None
    assert isinstance(_core.Loader, type)


def test_prefetch_buffers_are_recycled_only_when_free(files):
    """Batches from the Rust prefetcher borrow pooled buffers: ones the caller still holds are never
    rewritten, and freed ones come back with the right contents."""
    prefix = files("a", [13, 40, 7, 22, 5, 31, 18, 9] * 5)
    kw = dict(seq_len=8, batch_size=3, seed=6)
    want = batches(DataLoader(prefix, prefetch=0, **kw), 60)
    loader = DataLoader(prefix, prefetch=3, **kw)
    held = []
    for i, b in enumerate(itertools.islice(loader, 60)):
        if i % 2:  # keep every other batch without copying; drop the rest at once
            held.append((i, b))
        else:
            assert torch.equal(b["input_ids"], want[i]["input_ids"])
            assert torch.equal(b["cu_seqlens"], want[i]["cu_seqlens"])
            del b
    for i, b in held:
        for key in ("input_ids", "labels", "position_ids", "cu_seqlens"):
            assert torch.equal(b[key], want[i][key]), (i, key)
