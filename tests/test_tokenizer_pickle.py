"""tm.Tokenizer pickles by its serialized form, so it crosses into multiprocessing spawn workers (and
datasets.map(num_proc=...)): every kind of tokenizer, encoded in spawn workers, gives the ids of the
library it mirrors (tiktoken, tokenizers, sentencepiece)."""

from __future__ import annotations

import functools
import multiprocessing
import pickle

import pytest
import tokenmill as tm
from test_tokenizer import TRICKY, training_texts_cached

tiktoken = pytest.importorskip("tiktoken")
tokenizers = pytest.importorskip("tokenizers")
spm = pytest.importorskip("sentencepiece")

SAMPLES = [
    "def f(x):\n    return x + 1\n",
    "Hello, world! 123456 numbers and   spaces\t\ttabs",
    "unicode: héllo wörld 日本語 🙂 \u00a0\u3000",
    "".join(TRICKY[:40]),
    "",
]


def _texts() -> list[str]:
    return [t[:2000] for t in training_texts_cached()[:60]]


@pytest.fixture(scope="module")
def kinds(tmp_path_factory):
    """{kind: (our tokenizer, reference encode function)} for every way a Tokenizer is built."""
    d = tmp_path_factory.mktemp("kinds")
    texts = _texts()
    out = {}

    trained = tm.Tokenizer.train(
        texts, vocab_size=600, pattern="llama3", special_tokens=["<|endoftext|>"], show_progress=False
    )
    enc = tiktoken.Encoding(
        "trained",
        pat_str=trained.pattern,
        mergeable_ranks=trained.mergeable_ranks(),
        special_tokens=trained.special_tokens,
    )
    out["trained"] = (trained, functools.partial(enc.encode, allowed_special="all"))

    ranks = trained.mergeable_ranks()
    specials = {"<|eot|>": len(ranks), "<|pad|>": len(ranks) + 1}
    from_tt = tm.Tokenizer.from_tiktoken(ranks, pattern="cl100k", special_tokens=specials)
    enc = tiktoken.Encoding(
        "tt", pat_str=tm.tokenizer.pattern_string("cl100k"), mergeable_ranks=ranks, special_tokens=specials
    )
    out["tiktoken"] = (from_tt, functools.partial(enc.encode, allowed_special="all"))

    from tokenizers import decoders, models, pre_tokenizers, trainers

    hf = tokenizers.Tokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=800,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    hf.train_from_iterator(texts, trainer=trainer)
    hf.save(str(d / "tokenizer.json"))
    out["huggingface"] = (
        tm.Tokenizer.from_huggingface(d / "tokenizer.json"),
        lambda t, hf=hf: hf.encode(t, add_special_tokens=False).ids,
    )

    (d / "corpus.txt").write_text("\n".join(ln for t in texts for ln in t.splitlines() if ln.strip()))
    spm.SentencePieceTrainer.train(
        input=str(d / "corpus.txt"),
        model_prefix=str(d / "m"),
        model_type="bpe",
        vocab_size=700,
        byte_fallback=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,  # as LLaMA's: expressible as a tokenizer.json below
        character_coverage=0.9995,
        num_threads=1,
        minloglevel=2,
    )
    sp = spm.SentencePieceProcessor(model_file=str(d / "m.model"))
    ours_sp = tm.Tokenizer.from_sentencepiece(d / "m.model")
    out["sentencepiece"] = (ours_sp, lambda t, sp=sp: sp.encode(t))
    # The same model as a LLaMA-2 style tokenizer.json (the "sentencepiece-hf" kind).
    ours_sp.save_huggingface(d / "sp-tokenizer.json")
    sp_hf = tokenizers.Tokenizer.from_file(str(d / "sp-tokenizer.json"))
    out["sentencepiece-hf"] = (
        tm.Tokenizer.from_huggingface(d / "sp-tokenizer.json"),
        lambda t, hf=sp_hf: hf.encode(t, add_special_tokens=False).ids,
    )
    return out


@pytest.fixture(scope="module")
def pool():
    with multiprocessing.get_context("spawn").Pool(2) as p:
        yield p


KINDS = ["trained", "tiktoken", "huggingface", "sentencepiece", "sentencepiece-hf"]


@pytest.mark.parametrize("kind", KINDS)
def test_pickle_round_trip(kinds, kind):
    tok, _ = kinds[kind]
    back = pickle.loads(pickle.dumps(tok))
    assert type(back) is tm.Tokenizer
    assert (back.fingerprint, back.n_vocab, back.special_tokens, back.pattern, repr(back)) == (
        tok.fingerprint,
        tok.n_vocab,
        tok.special_tokens,
        tok.pattern,
        repr(tok),
    )
    texts = [*SAMPLES, *_texts()[:10]]
    assert [back.encode(t, allowed_special="all") for t in texts] == [
        tok.encode(t, allowed_special="all") for t in texts
    ]
    ids = tok.encode(SAMPLES[2])
    assert back.decode(ids) == tok.decode(ids)


@pytest.mark.parametrize("kind", KINDS)
def test_spawn_workers_encode_as_the_reference(kinds, pool, kind):
    tok, reference = kinds[kind]
    texts = [*SAMPLES, *_texts()]
    want = [reference(t) for t in texts]
    # The tokenizer travels with the work (a partial of its bound method), as datasets.map sends it.
    got = pool.map(functools.partial(tok.encode, allowed_special="all"), texts)
    assert got == want
    assert pool.apply(tok.encode_ordinary_batch, (texts,)) == tok.encode_ordinary_batch(texts)
    assert pool.apply(pickle.loads, (pickle.dumps(tok),)).fingerprint == tok.fingerprint


def test_damaged_pickle_is_a_clear_error(kinds):
    tok, _ = kinds["trained"]
    data = pickle.dumps(tok).replace(b"tokenmill-tokenizer 1", b"tokenmill-tokenizer 9")
    with pytest.raises(ValueError, match="<pickled tokenizer>: not a tokenmill tokenizer"):
        pickle.loads(data)
