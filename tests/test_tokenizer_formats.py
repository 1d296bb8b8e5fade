"""Hugging Face tokenizer.json and SentencePiece .model: identical ids to `tokenizers` and
`sentencepiece` on models they trained themselves; our tokenizer.json loads in `tokenizers` and
encodes identically; malformed files (fuzzed) raise ValueError naming the file, never panic."""

from __future__ import annotations

import json
import random
import re

import pytest
import tokenmill as tm
from hypothesis import example, given, settings
from hypothesis import strategies as st
from test_tokenizer import TRICKY, pair, text_strategy, training_texts_cached
from tokenmill.tokenizer import pattern_string

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


_SPM: dict = {}


def train_spm(tmp_path_factory, add_dummy_prefix: bool, remove_extra: bool, split_by_whitespace: bool = True):
    """(processor, ours, path) of a BPE model with byte fallback that sentencepiece trained itself,
    identity normalization; trained once per session and setting."""
    key = (add_dummy_prefix, remove_extra, split_by_whitespace)
    if key not in _SPM:
        _SPM[key] = _train_spm(tmp_path_factory, *key)
    return _SPM[key]


# "cross-words": pieces may span words ("s▁the"), so our word-by-word merge must not be used.
@pytest.fixture(
    scope="module",
    params=[(True, False, True), (False, True, True), (True, False, False)],
    ids=["llama-style", "defaults-ws", "cross-words"],
)
def sp_trained(request, tmp_path_factory):
    """A BPE model with byte fallback that sentencepiece trained itself, identity normalization."""
    return train_spm(tmp_path_factory, *request.param)


def _train_spm(tmp_path_factory, add_dummy_prefix: bool, remove_extra: bool, split_by_whitespace: bool):
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
        split_by_whitespace=split_by_whitespace,
        character_coverage=0.9995,
        num_threads=2,
        minloglevel=2,
    )
    path = d / "m.model"
    return spm.SentencePieceProcessor(model_file=str(path)), tm.Tokenizer.from_sentencepiece(path), path


def test_sentencepiece_trained_model_matches(sp_trained):
    sp, ours, _ = sp_trained
    pieces = [sp.id_to_piece(i) for i in range(sp.get_piece_size())]
    crossing = [p for p in pieces if re.search("[^\u2581]\u2581", p)]
    assert bool(crossing) == (not sp_trained_splits(sp)), crossing[:5]
    # Text made of the word-crossing pieces, so that their merges happen.
    across = "".join(p.replace("\u2581", " ") for p in crossing)
    assert ours.encode_ordinary(across) == sp.encode(across)
    assert not crossing or any(re.search("[^\u2581]\u2581", sp.id_to_piece(i)) for i in sp.encode(across))
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


def sp_trained_splits(sp) -> bool:
    from sentencepiece import sentencepiece_model_pb2

    m = sentencepiece_model_pb2.ModelProto()
    m.ParseFromString(sp.serialized_model_proto())
    return m.trainer_spec.split_by_whitespace


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


# ----- SentencePiece-style BPE tokenizer.json (LLaMA-1/2, Mistral, TinyLlama) -----

SPM_EXTRA = [
    "<s>",
    "</s>",
    "<unk>",
    " ",
    "  ",
    "\u2581",
    "\U0001f600\U0001f642",
    "\u0301",
    "\u4e2d\u6587",
    "\x00\x01",
]


def spm_text_strategy():
    """text_strategy() plus special tokens, `▁`, spaces and characters outside the vocab (byte fallback)."""
    return st.lists(st.one_of(text_strategy(), st.sampled_from(SPM_EXTRA)), max_size=4).map("".join)


SPM_EXAMPLES = [
    "",
    " ",
    "  hello ",
    "\u2581x",
    "<s>",
    "<s> a",
    "a<s>b",
    "x </s>  y<unk>",
    "\U0001f600\u0301",
    "\x00",
]

LEGACY_NORMALIZER = {
    "type": "Sequence",
    "normalizers": [
        {"type": "Prepend", "prepend": "\u2581"},
        {"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"},
    ],
}
LLAMA2_POST_PROCESSOR = {
    "type": "TemplateProcessing",
    "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
    "pair": [
        {"SpecialToken": {"id": "<s>", "type_id": 0}},
        {"Sequence": {"id": "A", "type_id": 0}},
        {"SpecialToken": {"id": "<s>", "type_id": 1}},
        {"Sequence": {"id": "B", "type_id": 1}},
    ],
    "special_tokens": {"<s>": {"id": "<s>", "ids": [1], "tokens": ["<s>"]}},
}


@pytest.fixture(scope="module", params=["legacy-normalizer", "metaspace-always", "metaspace-first"])
def hf_spm(request, tmp_path_factory):
    """(tokenizers', ours from tokenizer.json, sentencepiece's, ours from .model, path, form) for the
    llama-style model converted by transformers: `LlamaTokenizer.from_pretrained` of a folder holding
    tokenizer.model writes Metaspace(prepend_scheme "always") for legacy=True and "first" for
    legacy=False (transformers 5.x). transformers 4.x's LlamaConverter (LLaMA-2's file on the Hub)
    wrote normalizer Sequence[Prepend("▁"), Replace(" ", "▁")], no pre-tokenizer, and a post-processor
    adding <s>; 5.x's converter class for that is broken (SentencePieceExtractor.extract changed
    signature), so that form is the 5.x file with exactly those parts set as the 4.x converter sets them."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("google.protobuf")  # transformers reads the .model with protobuf
    sp, ours_sp, model = train_spm(tmp_path_factory, True, False)
    d = tmp_path_factory.mktemp("hfspm")
    (d / "tokenizer.model").write_bytes(model.read_bytes())
    legacy = request.param != "metaspace-first"
    transformers.LlamaTokenizer.from_pretrained(str(d), legacy=legacy).save_pretrained(str(d / "out"))
    path = d / "out" / "tokenizer.json"
    doc = json.loads(path.read_text(encoding="utf-8"))
    want_scheme = {"legacy-normalizer": "always", "metaspace-always": "always", "metaspace-first": "first"}
    assert doc["pre_tokenizer"]["prepend_scheme"] == want_scheme[request.param]
    assert doc["normalizer"] is None and doc["model"]["byte_fallback"] is True
    if request.param == "legacy-normalizer":
        doc.update(normalizer=LEGACY_NORMALIZER, pre_tokenizer=None, post_processor=LLAMA2_POST_PROCESSOR)
        doc["model"]["unk_token"] = "<unk>"
        path.write_text(json.dumps(doc, ensure_ascii=False), encoding="utf-8")
    hf = tokenizers.Tokenizer.from_file(str(path))
    return hf, tm.Tokenizer.from_huggingface(path), sp, ours_sp, path, request.param


def test_hf_sentencepiece_json_matches_tokenizers(hf_spm):
    hf, ours, sp, ours_sp, _, form = hf_spm
    assert ours.special_tokens == {"<unk>": 0, "<s>": 1, "</s>": 2}
    assert (ours.bos_token_id, ours.eos_token_id) == (hf.token_to_id("<s>"), hf.token_to_id("</s>")) == (1, 2)
    assert ours.n_vocab == hf.get_vocab_size() == sp.get_piece_size()
    sample = "\n".join(corpus_texts()[150:160])
    assert ours.encode(sample, allowed_special="all") == hf.encode(sample, add_special_tokens=False).ids
    # No character of this text is in the vocabulary: every one becomes <0xNN> byte tokens.
    foreign = "\u0d9e\U0001d11e\u16a0"
    assert all(hf.token_to_id(c) is None for c in foreign)
    ids = ours.encode(foreign)
    assert ids == hf.encode(foreign, add_special_tokens=False).ids
    assert [hf.id_to_token(i) for i in ids[1:]] == [f"<0x{b:02X}>" for b in foreign.encode()]

    @given(spm_text_strategy())
    @example("")
    def check(text):
        want = hf.encode(text, add_special_tokens=False).ids
        ids = ours.encode(text, allowed_special="all")
        assert ids == want
        assert ours.decode(ids) == hf.decode(want)
        if form == "legacy-normalizer":
            assert ours.encode(text, allowed_special="all") == hf.encode(text).ids[1:]  # minus <s>
            assert hf.encode(text).ids[0] == ours.bos_token_id

    for text in SPM_EXAMPLES:
        check.hypothesis.inner_test(text)
    check()


def test_hf_sentencepiece_json_agrees_with_sentencepiece(hf_spm):
    """The legacy form encodes as sentencepiece does. Metaspace adds no `▁` before a text that starts
    with " " or "▁" (sentencepiece always adds one), so there the ids are sentencepiece's for the text
    without its first character; everywhere else they agree."""
    _, ours, sp, ours_sp, _, form = hf_spm

    @given(text_strategy())
    def check(text):
        ids = ours.encode_ordinary(text)
        if form != "legacy-normalizer" and text[:1] in (" ", "\u2581"):
            want = sp.encode(text[1:]) if text[1:] else [sp.piece_to_id("\u2581")]
        else:
            want = sp.encode(text)
            assert ours_sp.encode_ordinary(text) == want
        assert ids == want

    for text in SPM_EXAMPLES:
        if "<" not in text:
            check.hypothesis.inner_test(text)
    check()


def test_hf_sentencepiece_json_saves(hf_spm, tmp_path):
    hf, ours, _, ours_sp, path, _ = hf_spm
    ours.save(tmp_path / "t")
    back = tm.Tokenizer.load(tmp_path / "t")
    assert back.fingerprint == ours.fingerprint
    ours.save_huggingface(tmp_path / "tokenizer.json")
    again = tm.Tokenizer.from_huggingface(tmp_path / "tokenizer.json")
    assert again.fingerprint == ours.fingerprint
    theirs = tokenizers.Tokenizer.from_file(str(tmp_path / "tokenizer.json"))

    @given(spm_text_strategy())
    def check(text):
        want = hf.encode(text, add_special_tokens=False).ids
        assert theirs.encode(text, add_special_tokens=False).ids == want
        assert back.encode(text, allowed_special="all") == want
        assert theirs.decode(want) == hf.decode(want)

    check()


def test_sentencepiece_model_saved_as_tokenizer_json(sp_trained, tmp_path):
    """A .model written as the legacy LLaMA tokenizer.json: tokenizers encodes it as sentencepiece does."""
    sp, ours, _ = sp_trained
    path = tmp_path / "tokenizer.json"
    if sp_trained[1].encode_ordinary("a  b") == sp.encode("a b"):  # the defaults-ws model collapses spaces
        with pytest.raises(ValueError, match="remove_extra_whitespaces"):
            ours.save_huggingface(path)
        return
    ours.save_huggingface(path)
    hf = tokenizers.Tokenizer.from_file(str(path))
    back = tm.Tokenizer.from_huggingface(path)
    assert back.special_tokens == ours.special_tokens == {"<unk>": 0, "<s>": 1, "</s>": 2}
    sample = "\n".join(corpus_texts()[150:160])
    assert hf.encode(sample, add_special_tokens=False).ids == sp.encode(sample)

    @given(spm_text_strategy())
    def check(text):
        want = sp.encode(text)
        assert hf.encode(text.replace("<", "\u2039"), add_special_tokens=False).ids == sp.encode(
            text.replace("<", "\u2039")
        )
        assert back.encode_ordinary(text) == ours.encode_ordinary(text) == want
        assert back.encode(text, allowed_special="all") == hf.encode(text, add_special_tokens=False).ids
        assert hf.decode(want) == ours.decode(want) == sp.decode(want)

    for text in SPM_EXAMPLES:
        check.hypothesis.inner_test(text)
    check()


def _handmade_spm_json(merges: list, n_bytes: int = 256) -> dict:
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    vocab.update({f"<0x{b:02X}>": 3 + b for b in range(n_bytes)})
    for t in ["\u2581", "a", "b", "c", "ab", "bc", "\u2581a", "abc"]:
        vocab[t] = len(vocab)
    added = [
        {
            "id": i,
            "content": t,
            "single_word": False,
            "lstrip": False,
            "rstrip": False,
            "normalized": False,
            "special": True,
        }
        for i, t in enumerate(["<unk>", "<s>", "</s>"])
    ]
    decoder = [
        {"type": "Replace", "pattern": {"String": "\u2581"}, "content": " "},
        {"type": "ByteFallback"},
        {"type": "Fuse"},
        {"type": "Strip", "content": " ", "start": 1, "stop": 0},
    ]
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": LEGACY_NORMALIZER,
        "pre_tokenizer": None,
        "post_processor": None,
        "decoder": {"type": "Sequence", "decoders": decoder},
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": "<unk>",
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": True,
            "byte_fallback": True,
            "ignore_merges": False,
            "vocab": vocab,
            "merges": merges,
        },
    }


@pytest.mark.parametrize("order", ["ab-first", "bc-first", "abc-via-bc"])
def test_hf_sentencepiece_json_merges_by_rank(order, tmp_path):
    """Merges apply by their rank in the list, not by the merged piece's id (sentencepiece's score):
    "abc" is [ab][c] -> abc when (a, b) ranks first, [a][bc] when (b, c) does; checked against tokenizers."""
    merges = {
        "ab-first": [["a", "b"], ["b", "c"], ["ab", "c"], ["\u2581", "a"]],
        "bc-first": [["b", "c"], ["a", "b"], ["\u2581", "a"]],
        "abc-via-bc": [["b", "c"], ["a", "b"], ["a", "bc"], ["\u2581", "a"]],
    }[order]
    path = tmp_path / "tokenizer.json"
    path.write_text(json.dumps(_handmade_spm_json(merges)))
    hf = tokenizers.Tokenizer.from_file(str(path))
    ours = tm.Tokenizer.from_huggingface(path)
    want = {"ab-first": ["\u2581", "abc"], "bc-first": ["\u2581a", "bc"], "abc-via-bc": ["\u2581", "abc"]}[
        order
    ]
    for text in ["abc", "abc abcab", "cab\U0001f600", "\u00e9", ""]:
        assert ours.encode(text) == hf.encode(text, add_special_tokens=False).ids, text
    assert [hf.id_to_token(i) for i in ours.encode("abc")] == want


_METASPACE = {"type": "Metaspace", "replacement": "\u2581", "split": False}
_HF_VARIANTS = {
    "legacy": {},
    "replace-only": {"normalizer": {"type": "Sequence", "normalizers": LEGACY_NORMALIZER["normalizers"][1:]}},
    "metaspace-first": {"normalizer": None, "pre_tokenizer": {**_METASPACE, "prepend_scheme": "first"}},
    "metaspace-always": {"normalizer": None, "pre_tokenizer": {**_METASPACE, "prepend_scheme": "always"}},
    "metaspace-never": {"normalizer": None, "pre_tokenizer": {**_METASPACE, "prepend_scheme": "never"}},
    "metaspace-old": {"normalizer": None, "pre_tokenizer": {**_METASPACE, "add_prefix_space": True}},
    "no-strip": {
        "decoder": {"type": "Sequence", "decoders": _handmade_spm_json([])["decoder"]["decoders"][:3]}
    },
    "metaspace-decoder": {"decoder": {**_METASPACE, "prepend_scheme": "always"}},
    "ignore-merges": {"model": {"ignore_merges": True}},
    "no-fuse-unk": {"model": {"fuse_unk": False}},
}


@pytest.mark.parametrize("variant", sorted(_HF_VARIANTS))
def test_hf_sentencepiece_json_variants(variant, tmp_path):
    """Each supported variant, and added tokens outside the vocab (special or not), against tokenizers."""
    # Without byte tokens for 0x80-0xFF, non-ASCII characters are <unk> (fused or not).
    n_bytes = 128 if variant == "no-fuse-unk" else 256
    doc = _handmade_spm_json([["a", "b"], ["b", "c"], ["ab", "c"], ["\u2581", "a"]], n_bytes)
    change = dict(_HF_VARIANTS[variant])
    doc["model"].update(change.pop("model", {}))
    doc.update(change)
    n = len(doc["model"]["vocab"])
    for i, (content, special) in enumerate([("<pad>", True), ("<extra>", False)]):
        doc["added_tokens"].append(
            {
                "id": n + i,
                "content": content,
                "single_word": False,
                "lstrip": False,
                "rstrip": False,
                "normalized": False,
                "special": special,
            }
        )
    path = tmp_path / "tokenizer.json"
    path.write_text(json.dumps(doc))
    hf = tokenizers.Tokenizer.from_file(str(path))
    ours = tm.Tokenizer.from_huggingface(path)
    assert ours.special_tokens == {"<unk>": 0, "<s>": 1, "</s>": 2, "<pad>": n, "<extra>": n + 1}
    ours.save_huggingface(tmp_path / "saved.json")  # written back: tokenizers reads it the same way
    saved = tokenizers.Tokenizer.from_file(str(tmp_path / "saved.json"))
    words = st.sampled_from(["abc", "ab", "bc", "a", " ", "\u2581", "<pad>", "<extra>", "<s>", "\u00e9"])
    texts = st.one_of(spm_text_strategy(), st.lists(words, max_size=8).map("".join))

    @given(texts)
    @example("abc")
    @example(" abc <extra>abc")
    def check(text):
        want = hf.encode(text, add_special_tokens=False).ids
        assert ours.encode(text, allowed_special="all") == want
        assert ours.decode(want) == hf.decode(want)
        assert saved.encode(text, add_special_tokens=False).ids == want
        assert saved.decode(want) == hf.decode(want)

    check()


def test_unsupported_hf_sentencepiece_json_is_refused(tmp_path):
    good = _handmade_spm_json([["a", "b"]])
    (tmp_path / "good.json").write_text(json.dumps(good))
    assert tm.Tokenizer.from_huggingface(tmp_path / "good.json").encode("ab") == [259, 263]
    metaspace = {"type": "Metaspace", "replacement": "\u2581", "prepend_scheme": "first", "split": False}
    model = good["model"]
    cases = {
        "nfc": ({**good, "normalizer": {"type": "NFC"}}, 'normalizer "NFC" is not supported'),
        "nfkc_seq": (
            {
                **good,
                "normalizer": {"type": "Sequence", "normalizers": [{"type": "NFKC"}, LEGACY_NORMALIZER]},
            },
            r"normalizer Sequence\[NFKC, Sequence\] is not supported",
        ),
        "split": (
            {**good, "normalizer": None, "pre_tokenizer": {**metaspace, "split": True}},
            "Metaspace pre-tokenizer with split=true",
        ),
        "both": ({**good, "pre_tokenizer": metaspace}, "together with pre-tokenizer"),
        "whitespace": ({**good, "normalizer": None, "pre_tokenizer": {"type": "Whitespace"}}, "Whitespace"),
        "dropout": ({**good, "model": {**model, "dropout": 0.1}}, "dropout"),
        "decoder": ({**good, "decoder": None}, "decoder null"),
        "unk": ({**good, "model": {**model, "unk_token": "<nope>"}}, "unk_token"),
        "merge": ({**good, "model": {**model, "merges": [["zz", "q"]]}}, "merge 0"),
        "lstrip": ({**good, "added_tokens": [{**good["added_tokens"][1], "lstrip": True}]}, "lstrip"),
    }
    for name, (doc, message) in cases.items():
        p = tmp_path / f"{name}.json"
        p.write_text(json.dumps(doc))
        with pytest.raises(ValueError, match=message) as info:
            tm.Tokenizer.from_huggingface(p)
        assert f"{name}.json" in str(info.value)


# ----- fuzzing: mutated and truncated files never panic -----


def _loaders():
    return {
        "native": tm.Tokenizer.load,
        "tiktoken": tm.Tokenizer.from_tiktoken,
        "hf": tm.Tokenizer.from_huggingface,
        "spm": tm.Tokenizer.from_sentencepiece,
        "hfspm": tm.Tokenizer.from_huggingface,
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
            "hfspm": json.dumps(_handmade_spm_json([["a", "b"], ["b", "c"], ["ab", "c"]])).encode(),
        }
    )


@settings(max_examples=75)
@given(
    kind=st.sampled_from(["native", "tiktoken", "hf", "spm", "hfspm"]),
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
    try:  # the one loader sniffs the (mutated) content: an error still names the file
        tm.Tokenizer.from_file(path, pattern="llama3" if kind == "tiktoken" else None)
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


# ----- Tokenizer.from_file: one loader for every format, by content -----


def test_from_file_reads_every_format_by_content(sp_trained, tmp_path):
    """Each format under a name that says nothing about it loads to the tokenizer its own loader gives."""
    small = tm.Tokenizer.from_tiktoken(
        [bytes([b]) for b in range(256)] + [b"ab", b"abc", b" a"], pattern="llama3", special_tokens=["<s>"]
    )
    text = "abc ab a <s> \u00e9\U0001f600 abcab"
    small.save(tmp_path / "native")
    small.save_huggingface(tmp_path / "hf")
    small.save_tiktoken(tmp_path / "ranks")
    _, spm_ours, spm_path = sp_trained
    cases = {
        "native": (tmp_path / "native", None, small),
        "hf": (tmp_path / "hf", None, tm.Tokenizer.from_huggingface(tmp_path / "hf")),
        "tiktoken": (tmp_path / "ranks", "llama3", tm.Tokenizer.from_tiktoken(tmp_path / "ranks", "llama3")),
        "spm": (spm_path, None, spm_ours),
    }
    for kind, (path, pattern, want) in cases.items():
        got = tm.Tokenizer.from_file(path, pattern=pattern)
        assert got.fingerprint == want.fingerprint, kind
        assert got.encode(text, allowed_special="all") == want.encode(text, allowed_special="all"), kind
    assert tm.Tokenizer.from_file(tmp_path / "native").special_tokens == {"<s>": 259}


def test_from_file_tiktoken_pattern_rules(tmp_path):
    ranks = [bytes([b]) for b in range(256)] + [b"ab"]
    tm.Tokenizer.from_tiktoken(ranks).save_tiktoken(tmp_path / "mine.tiktoken")
    with pytest.raises(
        ValueError, match="mine.tiktoken: a tiktoken ranks file holds no pre-tokenization pattern"
    ):
        tm.Tokenizer.from_file(tmp_path / "mine.tiktoken")
    assert tm.Tokenizer.from_file(tmp_path / "mine.tiktoken", pattern="gpt2").pattern == pattern_string(
        "gpt2"
    )
    # tiktoken's own files are known by name: tiktoken's pattern and special tokens.
    (tmp_path / "cl100k_base.tiktoken").write_bytes((tmp_path / "mine.tiktoken").read_bytes())
    tok = tm.Tokenizer.from_file(tmp_path / "cl100k_base.tiktoken")
    assert tok.pattern == pattern_string("cl100k") and tok.special_tokens["<|endoftext|>"] == 100257
    tm.Tokenizer.from_tiktoken(ranks).save(tmp_path / "native")
    with pytest.raises(ValueError, match="pattern applies to tiktoken files only"):
        tm.Tokenizer.from_file(tmp_path / "native", pattern="gpt2")
    (tmp_path / "notes.txt").write_text("hello\n")
    with pytest.raises(ValueError, match="notes.txt: not a tokenizer file"):
        tm.Tokenizer.from_file(tmp_path / "notes.txt")
    with pytest.raises(FileNotFoundError, match="absent.json"):
        tm.Tokenizer.from_file(tmp_path / "absent.json")
