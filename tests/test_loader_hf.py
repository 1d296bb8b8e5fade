"""tm.data.DataLoader as the data of other people's trainers: ``format="hf"`` checked through transformers'
own Llama (loss = next-token cross-entropy, documents isolated, flash-attention keys equal to the ones
transformers derives itself), torch DataLoader workers and torchdata's StatefulDataLoader resume."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from conftest import hf_llama
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenmill.data import DataLoader
from tokenmill.data.dataset import write_token_file

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_torch_thread")

VOCAB = 64
EXAMPLES = max(10, settings().max_examples // 10)


def make_files(tmp_path, lengths, name="d", seed=0):
    rng = np.random.default_rng(seed)
    docs = [rng.integers(1, VOCAB, n).tolist() for n in lengths]
    write_token_file(tmp_path / name, docs, dtype="int32")
    return str(tmp_path / name), docs


def tiny_llama(attn="sdpa"):
    return hf_llama(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, attn_implementation=attn).eval()


def take(it, n):
    return [
        {k: v.clone() if torch.is_tensor(v) else v for k, v in b.items()} for b in itertools.islice(it, n)
    ]


def same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            assert torch.equal(x[k], y[k]) if torch.is_tensor(x[k]) else x[k] == y[k], k


@settings(max_examples=EXAMPLES)
@given(
    lengths=st.lists(st.integers(1, 40), min_size=1, max_size=12),
    seq_len=st.integers(2, 24),
    packing=st.sampled_from(["concat", "best_fit", "none"]),
    document_mask=st.booleans(),
)
def test_hf_format_is_the_tokenmill_batch_realigned(
    tmp_path_factory, lengths, seq_len, packing, document_mask
):
    """Per batch: the same inputs and positions; aligned labels = tokenmill labels moved one column right,
    and each kept label is the very input token the previous position predicts."""
    if packing == "none" and max(lengths) <= seq_len:
        lengths = [*lengths, seq_len + 1]  # "none" needs one document longer than a window
    prefix, _ = make_files(tmp_path_factory.mktemp("d"), lengths)
    kw = dict(
        seq_len=seq_len,
        batch_size=2,
        packing=packing,
        document_mask=document_mask,
        epochs=1,
        seed=3,
        drop_last=False,
    )
    ours = take(DataLoader(prefix, **kw), 50)
    hf = take(DataLoader(prefix, format="hf", **kw), 50)
    assert len(ours) == len(hf) > 0
    for b, h in zip(ours, hf):
        keys = {"input_ids", "labels", "position_ids"}
        if document_mask:
            keys |= {"cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k", "use_cache"}
            assert h["use_cache"] is False
            assert torch.equal(h["cu_seq_lens_q"], b["cu_seqlens"]) and h["max_length_q"] == b["max_seqlen"]
        assert set(h) == keys  # no attention_mask: it would switch transformers' packed-row detection off
        assert torch.equal(h["input_ids"], b["input_ids"]) and torch.equal(
            h["position_ids"], b["position_ids"]
        )
        lab = h["labels"]
        assert (lab[:, 0] == -100).all() and torch.equal(lab[:, 1:], b["labels"][:, :-1])
        kept = lab != -100
        assert torch.equal(lab[kept], h["input_ids"][kept])


def test_cu_seq_lens_equal_what_transformers_derives(tmp_path):
    """transformers' own position_ids -> cu_seqlens (used when a batch has no cu_seq_lens) gives ours."""
    from transformers.modeling_flash_attention_utils import prepare_fa_kwargs_from_position_ids

    prefix, _ = make_files(tmp_path, [5, 17, 3, 1, 30, 9, 2, 11])
    for packing in ("concat", "best_fit"):
        loader = DataLoader(
            prefix, seq_len=16, batch_size=3, packing=packing, epochs=1, drop_last=False, format="hf"
        )
        for b in loader:
            (cu_q, cu_k), (mq, _) = prepare_fa_kwargs_from_position_ids(b["position_ids"].reshape(1, -1))
            assert cu_q.tolist() == b["cu_seq_lens_q"].tolist() == cu_k.tolist()
            assert int(mq) == b["max_length_q"]


@pytest.mark.parametrize("packing", ["concat", "best_fit"])
def test_transformers_loss_is_next_token_cross_entropy(tmp_path, packing):
    """model(**batch).loss = the float64 mean cross-entropy of the model's logits against the tokenmill
    labels (the token after each input in its document), over the positions an aligned row can hold."""
    prefix, _ = make_files(tmp_path, [7, 20, 3, 12, 25, 4, 9])
    model = tiny_llama()
    kw = dict(seq_len=16, batch_size=2, packing=packing, epochs=1, seed=1)
    for b, h in zip(DataLoader(prefix, **kw), DataLoader(prefix, format="hf", **kw)):
        with torch.no_grad():
            out = model(**h)
        logits = out.logits.double()[:, :-1].reshape(-1, VOCAB)
        target = b["labels"][:, :-1].reshape(-1)
        keep = target != -100
        ref = torch.nn.functional.cross_entropy(logits[keep], target[keep])
        assert abs(out.loss.item() - ref.item()) < 1e-5
        # The tokenmill labels fed straight to transformers are shifted twice: another loss.
        with torch.no_grad():
            wrong = model(input_ids=b["input_ids"], position_ids=b["position_ids"], labels=b["labels"]).loss
        assert abs(wrong.item() - ref.item()) > 1e-3


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_documents_do_not_attend_to_each_other(tmp_path, attn):
    """The logits of every document inside a packed row equal those of the document run on its own."""
    prefix, docs = make_files(tmp_path, [6, 9, 4, 11, 5, 7, 3])
    model = tiny_llama(attn).train()  # as in training: config.use_cache must not turn isolation off
    loader = DataLoader(
        prefix, seq_len=16, batch_size=2, packing="best_fit", epochs=1, drop_last=False, format="hf"
    )
    checked = 0
    for h in loader:
        with torch.no_grad():
            packed = model(**h).logits
            plain = model(input_ids=h["input_ids"]).logits  # control: one causal sequence per row
        pos = h["position_ids"]
        for r in range(pos.shape[0]):
            starts = [i for i in range(pos.shape[1]) if pos[r, i] == 0] + [pos.shape[1]]
            for s, e in zip(starts, starts[1:]):
                seg = h["input_ids"][r, s:e]
                if seg.tolist() not in docs:
                    continue  # padding
                with torch.no_grad():
                    alone = model(input_ids=seg[None]).logits[0]
                torch.testing.assert_close(packed[r, s:e], alone, atol=1e-5, rtol=1e-5)
                if s > 0:
                    assert not torch.allclose(plain[r, s:e], alone, atol=1e-3)
                checked += 1
    assert checked >= 5


# ------------------------------------------------------------------------------- torch DataLoader workers


@pytest.mark.parametrize("fmt", ["tokenmill", "hf"])
@pytest.mark.parametrize("epochs", [1, None])
def test_torch_dataloader_workers_split_the_stream(tmp_path, fmt, epochs):
    prefix, _ = make_files(tmp_path, [5, 17, 3, 1, 30, 9, 2, 11, 40, 6, 8])
    kw = dict(seq_len=8, batch_size=2, packing="concat", epochs=epochs, drop_last=False, seed=5, format=fmt)
    ref = take(DataLoader(prefix, **kw), 30)
    loader = DataLoader(prefix, **kw)
    for workers in (1, 3):
        dl = torch.utils.data.DataLoader(loader, batch_size=None, num_workers=workers, pin_memory=False)
        same(take(dl, 30), ref)
    if epochs is not None:
        assert len(torch.utils.data.DataLoader(loader, batch_size=None)) == len(loader) == len(ref)


@pytest.mark.parametrize("workers", [0, 2])
def test_stateful_dataloader_resumes_exactly(tmp_path, workers):
    from torchdata.stateful_dataloader import StatefulDataLoader

    prefix, _ = make_files(tmp_path, [5, 17, 3, 1, 30, 9, 2, 11, 40, 6, 8, 13])
    kw = dict(seq_len=8, batch_size=2, packing="best_fit", seed=9, format="hf")

    def make():
        return StatefulDataLoader(DataLoader(prefix, **kw), batch_size=None, num_workers=workers)

    ref = take(make(), 12)
    for k in (0, 3, 5):
        dl = make()
        it = iter(dl)
        head = take(it, k)
        state = dl.state_dict()
        same(head, ref[:k])
        tail = take(it, 4)  # the first run continues; the resumed one must give the same batches
        again = make()
        again.load_state_dict(state)
        same(take(again, 4), tail)
        same(tail, ref[k : k + 4])


def test_worker_state_refuses_another_worker_count(tmp_path):
    from torchdata.stateful_dataloader import StatefulDataLoader

    prefix, _ = make_files(tmp_path, [5, 17, 3, 1, 30, 9])
    dl = StatefulDataLoader(DataLoader(prefix, seq_len=8, batch_size=2), batch_size=None, num_workers=2)
    it = iter(dl)
    take(it, 3)
    state = dl.state_dict()
    worker_state = next(iter(state["_snapshot"]["_worker_snapshots"].values()))["dataset_state"]
    loader = DataLoader(prefix, seq_len=8, batch_size=2)
    loader.load_state_dict(worker_state)
    with pytest.raises(ValueError, match="worker 0 of 2"):
        next(iter(loader))


def test_main_process_state_after_n_batches_resumes_any_worker_count(tmp_path):
    """state_dict(batches=n) in the main process (whose loader torch workers do not move)."""
    prefix, _ = make_files(tmp_path, [5, 17, 3, 1, 30, 9, 2, 11, 40])
    kw = dict(seq_len=8, batch_size=2, seed=2)
    ref = take(DataLoader(prefix, **kw), 10)
    loader = DataLoader(prefix, **kw)
    take(torch.utils.data.DataLoader(loader, batch_size=None, num_workers=2), 4)
    state = loader.state_dict(batches=4)
    again = DataLoader(prefix, **kw)
    again.load_state_dict(state)
    same(take(torch.utils.data.DataLoader(again, batch_size=None, num_workers=3), 6), ref[4:])


def test_bad_format_is_refused(tmp_path):
    prefix, _ = make_files(tmp_path, [5])
    with pytest.raises(ValueError, match="format must be one of"):
        DataLoader(prefix, seq_len=4, batch_size=1, format="huggingface")
