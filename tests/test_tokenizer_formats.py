"""Hugging Face tokenizer.json and SentencePiece .model: identical ids to `tokenizers` and
`sentencepiece` on models they trained themselves; our tokenizer.json loads in `tokenizers` and
encodes identically; malformed files (fuzzed) raise ValueError naming the file, never panic."""

from __future__ import annotations

import json
import random

import pytest
import tokenmill as tm
from hypothesis import given, settings
from hypothesis import strategies as st
from test_tokenizer import TRICKY, pair, text_strategy, training_texts_cached

tokenizers = pytest.importorskip("tokenizers")
spm = pytest.importorskip("sentencepiece")


def corpus_texts() -> list[str]:
    return training_texts_cached()


@pytest.fixture(scope="module", params=[False, True], ids=["no-prefix", "prefix-space"])
def hf_trained(request, tmp_path_factory):
    """A tokenizer.json that `tokenizers` trained (BpeTrainer + ByteLevel) and our load of it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    hf = Tokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=request.param)
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=1500,
        special_tokens=["<|endoftext|>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    hf.train_from_iterator(corpus_texts(), trainer=trainer)
    path = tmp_path_factory.mktemp("hf") / "tokenizer.json"
    hf.save(str(path))
    return hf, tm.Tokenizer.from_huggingface(path), path


def test_huggingface_trained_model_matches(hf_trained):
    hf, ours, _ = hf_trained
    assert ours.special_tokens == {"<|endoftext|>": 0, "<pad>": 1}
    sample = "".join(corpus_texts()[:40])
    assert ours.encode(sample, allowed_special="all") == hf.encode(sample, add_special_tokens=False).ids

    @given(text_strategy())
    def check(text):
        want = hf.encode(text, add_special_tokens=False).ids
        assert ours.encode(text, allowed_special="all") == want

    check()


def test_our_tokenizer_json_loads_in_tokenizers(hf_trained, tmp_path):
    hf, ours, _ = hf_trained
    path = tmp_path / "ours.json"
    ours.save_huggingface(path)
    back = tokenizers.Tokenizer.from_file(str(path))
    again = tm.Tokenizer.from_huggingface(path)
    assert again.fingerprint == ours.fingerprint

    @given(text_strategy())
    def check(text):
        assert (
            back.encode(text, add_special_tokens=False).ids == hf.encode(text, add_special_tokens=False).ids
        )

    check()


@pytest.mark.parametrize("name", ["cl100k", "llama3", "gpt2"])
def test_tiktoken_vocab_exported_to_tokenizers(name, tmp_path):
    ours, _ = pair(name, corpus_texts())
    path = tmp_path / "tokenizer.json"
    ours.save_huggingface(path)
    hf = tokenizers.Tokenizer.from_file(str(path))
    back = tm.Tokenizer.from_huggingface(path)  # Split(regex) + ByteLevel, explicit merges
    assert back.special_tokens == ours.special_tokens
    sample = "".join(corpus_texts()[:30])
    assert hf.encode(sample, add_special_tokens=False).ids == ours.encode(sample, allowed_special="all")
    assert back.encode(sample, allowed_special="all") == ours.encode(sample, allowed_special="all")

    @given(text_strategy())
    def check(text):
        want = ours.encode(text, allowed_special="all")
        assert hf.encode(text, add_special_tokens=False).ids == want
        assert back.encode(text, allowed_special="all") == want

    check()


# ----- SentencePiece -----


@pytest.fixture(scope="module", params=[(True, False), (False, True)], ids=["llama-style", "defaults-ws"])
def sp_trained(request, tmp_path_factory):
    """A BPE model with byte fallback that sentencepiece trained itself, identity normalization."""
    add_dummy_prefix, remove_extra = request.param
    d = tmp_path_factory.mktemp("spm")
    rng = random.Random(0)
    lines = [line for t in corpus_texts()[:150] for line in t.splitlines() if line.strip()][:20000]
    lines += ["".join(rng.choice(TRICKY[:40]) for _ in range(20)).replace("\n", " ") for _ in range(300)]
    (d / "corpus.txt").write_text("\n".join(lines), encoding="utf-8")
    spm.SentencePieceTrainer.train(
        input=str(d / "corpus.txt"),
        model_prefix=str(d / "m"),
        model_type="bpe",
        vocab_size=1200,
        byte_fallback=True,
        normalization_rule_name="identity",
        add_dummy_prefix=add_dummy_prefix,
        remove_extra_whitespaces=remove_extra,
        character_coverage=0.9995,
        num_threads=2,
        minloglevel=2,
    )
    path = d / "m.model"
    return spm.SentencePieceProcessor(model_file=str(path)), tm.Tokenizer.from_sentencepiece(path), path


def test_sentencepiece_trained_model_matches(sp_trained):
    sp, ours, _ = sp_trained
    assert ours.n_vocab == sp.get_piece_size()
    assert ours.bos_token_id == sp.bos_id() and ours.eos_token_id == sp.eos_id()
    sample = "\n".join(corpus_texts()[150:160])
    assert ours.encode_ordinary(sample) == sp.encode(sample)

    @given(text_strategy())
    def check(text):
        ids = ours.encode_ordinary(text)
        assert ids == sp.encode(text)
        assert ours.decode(ids) == sp.decode(ids)

    check()


def test_sentencepiece_native_round_trip(sp_trained, tmp_path):
    _, ours, _ = sp_trained
    ours.save(tmp_path / "t")
    back = tm.Tokenizer.load(tmp_path / "t")
    assert back.fingerprint == ours.fingerprint
    text = "Hello  world \u4e2d\U0001f600"
    assert back.encode_ordinary(text) == ours.encode_ordinary(text)
    with pytest.raises(ValueError, match="SentencePiece"):
        ours.save_tiktoken(tmp_path / "x.tiktoken")


def test_unsupported_sentencepiece_models_are_refused(tmp_path):
    (tmp_path / "c.txt").write_text("\n".join(corpus_texts()[0].splitlines()[:2000]))
    spm.SentencePieceTrainer.train(
        input=str(tmp_path / "c.txt"), model_prefix=str(tmp_path / "u"), vocab_size=300, minloglevel=2
    )
    with pytest.raises(ValueError, match=r"u\.model.*UNIGRAM"):
        tm.Tokenizer.from_sentencepiece(tmp_path / "u.model")
    spm.SentencePieceTrainer.train(
        input=str(tmp_path / "c.txt"),
        model_prefix=str(tmp_path / "n"),
        vocab_size=300,
        model_type="bpe",
        minloglevel=2,
    )
    with pytest.raises(ValueError, match=r"n\.model.*normalizer"):
        tm.Tokenizer.from_sentencepiece(tmp_path / "n.model")


# ----- fuzzing: mutated and truncated files never panic -----


def _loaders():
    return {
        "native": tm.Tokenizer.load,
        "tiktoken": tm.Tokenizer.from_tiktoken,
        "hf": tm.Tokenizer.from_huggingface,
        "spm": tm.Tokenizer.from_sentencepiece,
    }


class _Files(dict):
    def __repr__(self) -> str:  # keep hypothesis' failure reports short
        return f"<files {sorted(self)}>"


@pytest.fixture(scope="module")
def originals(tmp_path_factory, sp_trained):
    d = tmp_path_factory.mktemp("orig")
    small = tm.Tokenizer.from_tiktoken(
        [bytes([b]) for b in range(256)] + [b"ab", b"abc", b" a"], pattern="llama3", special_tokens=["<s>"]
    )
    small.save(d / "t.tokenmill")
    small.save_tiktoken(d / "t.tiktoken")
    small.save_huggingface(d / "t.json")
    return _Files(
        {
            "native": (d / "t.tokenmill").read_bytes(),
            "tiktoken": (d / "t.tiktoken").read_bytes(),
            "hf": (d / "t.json").read_bytes(),
            "spm": sp_trained[2].read_bytes(),
        }
    )


@settings(max_examples=60)
@given(
    kind=st.sampled_from(["native", "tiktoken", "hf", "spm"]),
    cut=st.floats(0, 1),
    edits=st.lists(st.tuples(st.floats(0, 1), st.integers(0, 255)), max_size=6),
)
def test_fuzzed_files_raise_valueerror_naming_the_file(originals, tmp_path_factory, kind, cut, edits):
    data = bytearray(originals[kind])
    for where, byte in edits:
        data[int(where * (len(data) - 1))] = byte
    data = data[: max(1, int(cut * len(data)))] if cut < 0.95 else data
    path = tmp_path_factory.mktemp("fuzz") / f"fuzzed-{kind}"
    path.write_bytes(bytes(data))
    try:
        _loaders()[kind](path)
    except ValueError as e:
        assert "fuzzed-" in str(e)


def test_malformed_huggingface_files_name_the_problem(tmp_path, originals):
    good = json.loads(originals["hf"])
    cases = {
        "notjson": (None, "invalid JSON"),
        "unigram": ({**good, "model": {**good["model"], "type": "Unigram"}}, "Unigram"),
        "normalizer": ({**good, "normalizer": {"type": "NFC"}}, "normalizer"),
        "badmerge": ({**good, "model": {**good["model"], "merges": [["zz", "q"]]}}, "merge 0"),
        "pretok": ({**good, "pre_tokenizer": {"type": "Whitespace"}}, "Whitespace"),
    }
    for name, (doc, message) in cases.items():
        path = tmp_path / f"{name}.json"
        path.write_text("{nope" if doc is None else json.dumps(doc))
        with pytest.raises(ValueError, match=message) as info:
            tm.Tokenizer.from_huggingface(path)
        assert f"{name}.json" in str(info.value)
