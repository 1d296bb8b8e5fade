"""tokenmill.model: parameter count, loss path vs full logits, document masking, GQA, sampling."""

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from tokenmill.model import PRESETS, Llama, LlamaConfig, document_mask, generate


def meta_model(cfg):
    with torch.device("meta"):
        return Llama(cfg)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_num_params_matches_presets(name):
    cfg = LlamaConfig.preset(name)
    model = meta_model(cfg)
    assert cfg.num_params() == sum(p.numel() for p in model.parameters())
    emb = model.tok_embeddings.weight.numel()
    assert cfg.num_params(include_embeddings=False) == cfg.num_params() - emb


def test_llama1_sizes():
    # The LLaMA paper's headline sizes (6.7B, 13.0B, 32.5B, 65.2B).
    for name, billions in (
        ("llama-7b", 6.74),
        ("llama-13b", 13.02),
        ("llama-30b", 32.53),
        ("llama-65b", 65.29),
    ):
        assert round(LlamaConfig.preset(name).num_params() / 1e9, 2) == billions


@given(
    heads=st.sampled_from([(4, 4), (4, 2), (4, 1), (6, 3)]),
    head_dim=st.sampled_from([4, 8]),
    layers=st.integers(1, 3),
    vocab=st.integers(5, 300),
    tie=st.booleans(),
    ffn=st.one_of(st.none(), st.integers(1, 50)),
)
def test_num_params_property(heads, head_dim, layers, vocab, tie, ffn):
    h, kv = heads
    cfg = LlamaConfig(
        vocab_size=vocab,
        dim=h * head_dim,
        n_layers=layers,
        n_heads=h,
        n_kv_heads=kv,
        ffn_hidden=ffn,
        tie_embeddings=tie,
    )
    assert cfg.num_params() == sum(p.numel() for p in meta_model(cfg).parameters())


def test_config_errors():
    with pytest.raises(ValueError, match="divisible"):
        LlamaConfig(dim=64, n_heads=3)
    with pytest.raises(ValueError, match="n_kv_heads"):
        LlamaConfig(dim=64, n_heads=4, n_kv_heads=3)
    with pytest.raises(ValueError, match="unknown preset"):
        LlamaConfig.preset("llama-9b")
    with pytest.raises(ValueError, match="unknown LlamaConfig field"):
        LlamaConfig.from_dict({"dimension": 3})
    assert LlamaConfig.from_dict(LlamaConfig.preset("tiny").to_dict()) == LlamaConfig.preset("tiny")


def tiny(**kw):
    torch.manual_seed(0)
    return Llama(LlamaConfig.preset("tiny", **kw)).double()


def test_loss_equals_cross_entropy_of_logits():
    model = tiny()
    ids = torch.randint(0, 512, (3, 20))
    labels = torch.randint(0, 512, (3, 20))
    labels[0, :5] = -100
    logits = model(ids)
    ref = F.cross_entropy(logits.reshape(-1, 512), labels.reshape(-1), ignore_index=-100)
    torch.testing.assert_close(model(ids, labels).double(), ref, rtol=1e-7, atol=1e-7)
    ref_sum = F.cross_entropy(logits.reshape(-1, 512), labels.reshape(-1), reduction="sum")
    torch.testing.assert_close(model(ids, labels, reduction="sum").double(), ref_sum, rtol=1e-7, atol=1e-7)


def test_attention_is_causal():
    model = tiny()
    ids = torch.randint(0, 512, (1, 16))
    changed = ids.clone()
    changed[0, 10:] = (changed[0, 10:] + 1) % 512
    torch.testing.assert_close(model(ids)[:, :10], model(changed)[:, :10])
    assert not torch.allclose(model(ids)[:, 10:], model(changed)[:, 10:])


@pytest.mark.parametrize("kv", [4, 2, 1])
def test_packed_documents_equal_separate_runs(kv):
    """A row packing three documents (positions restart at 0) gives each document the logits it gets alone."""
    model = tiny(n_kv_heads=kv)
    lens = [5, 7, 4]
    docs = [torch.randint(0, 512, (1, n)) for n in lens]
    packed = torch.cat(docs, 1)
    pos = torch.cat([torch.arange(n) for n in lens])[None]
    out = model(packed, position_ids=pos)
    start = 0
    for d, n in zip(docs, lens):
        torch.testing.assert_close(out[:, start : start + n], model(d), rtol=1e-9, atol=1e-9)
        start += n
    # Without the document boundaries the later documents see the earlier ones.
    assert not torch.allclose(model(packed)[:, 5:], out[:, 5:])


def test_document_mask_shape_and_fast_path():
    assert document_mask(torch.arange(8).expand(2, 8)) is None
    m = document_mask(torch.tensor([[0, 1, 0, 1], [5, 6, 7, 8]]))
    expect0 = torch.tensor([[1, 0, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 1, 1]], dtype=torch.bool)
    assert torch.equal(m[0, 0], expect0)
    assert torch.equal(m[1, 0], torch.ones(4, 4, dtype=torch.bool).tril())


def test_gqa_matches_explicit_head_repetition():
    """Grouped-query attention equals multi-head attention with each K/V head repeated for its group."""
    g = tiny(n_kv_heads=2)
    cfg = LlamaConfig.preset("tiny", n_kv_heads=4)
    m = Llama(cfg).double()
    sd = g.state_dict()
    hd = cfg.head_dim
    for k in list(sd):
        if k.endswith(("wk.weight", "wv.weight")):
            w = sd[k].view(2, hd, cfg.dim)
            sd[k] = w.repeat_interleave(2, dim=0).reshape(4 * hd, cfg.dim)
    m.load_state_dict(sd)
    ids = torch.randint(0, 512, (2, 12))
    torch.testing.assert_close(g(ids), m(ids), rtol=1e-10, atol=1e-10)


def test_activation_checkpointing_same_gradients():
    model = tiny()
    ids, labels = torch.randint(0, 512, (2, 16)), torch.randint(0, 512, (2, 16))
    model(ids, labels).backward()
    ref = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model.activation_checkpointing = True
    model(ids, labels).backward()
    for a, b in zip(ref, (p.grad for p in model.parameters())):
        torch.testing.assert_close(a, b)


def test_tied_embeddings_share_the_weight():
    model = tiny(tie_embeddings=True)
    assert model.output.weight is model.tok_embeddings.weight
    assert model.config.num_params() == sum(p.numel() for p in model.parameters())


def test_sequence_longer_than_max_seq_len():
    with pytest.raises(ValueError, match="max_seq_len"):
        tiny()(torch.zeros(1, 129, dtype=torch.long))


def test_generate_greedy_and_top_k():
    model = tiny()
    prompt = torch.tensor([1, 2, 3])
    out = generate(model, prompt, 6, temperature=0)
    assert out.shape == (9,) and torch.equal(out[:3], prompt)
    ids = prompt[None]
    for _ in range(6):  # greedy by hand
        ids = torch.cat([ids, model(ids)[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(out, ids[0])
    # top_k=1 sampling is greedy whatever the temperature
    g = torch.Generator().manual_seed(0)
    assert torch.equal(generate(model, prompt, 6, temperature=2.0, top_k=1, generator=g), out)
    # sampling only ever picks among the top k
    g = torch.Generator().manual_seed(1)
    s = generate(model, prompt, 1, temperature=1.0, top_k=3, generator=g)
    top3 = model(prompt[None])[0, -1].topk(3).indices
    assert s[-1] in top3
    # eos stops generation
    eos = int(out[3])
    assert torch.equal(generate(model, prompt, 6, temperature=0, eos_id=eos), out[:4])


def test_init_scale():
    model = Llama(LlamaConfig.preset("small"))
    w = model.layers[0].attention.wq.weight
    assert abs(w.std().item() - 0.02) < 0.002
    wo = model.layers[0].attention.wo.weight
    assert abs(wo.std().item() - 0.02 / math.sqrt(8)) < 0.001
