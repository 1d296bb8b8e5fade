"""tokenmill.Tokenizer against tiktoken (same ranks, each named pattern): identical ids on random and
real text, tiktoken's special-token rules, round trips, batch == single, worst-case inputs, files."""

from __future__ import annotations

import os
import random
import re

import numpy as np
import pytest
import tokenmill as tm
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenmill import corpus
from tokenmill.tokenizer import PATTERNS as NAMES
from tokenmill.tokenizer import pattern_string

tiktoken = pytest.importorskip("tiktoken")
rustbpe = pytest.importorskip("rustbpe")

EXAMPLES = int(os.environ.get("HYPOTHESIS_EXAMPLES", "300"))

SPECIALS = {"<|endoftext|>": None, "<|fim_prefix|>": None, "<|fim|>": None}

# Pieces that stress each class the patterns distinguish.
TRICKY = [
    " ",
    "  ",
    "   ",
    "\t",
    "\n",
    "\r\n",
    "\n\n",
    " \n ",
    "\u00a0",
    "\u3000",
    "\u2028",
    "\x0b",
    "\x00",
    "\x7f",
    "'s",
    "'S",
    "'ll",
    "'re",
    "\u017f",
    "don't",
    "I'M",
    "a",
    "Z",
    "\u00e9",
    "e\u0301",
    "\u0627\u0644",
    "\u4e2d\u6587",
    "\u65e5\u672c\u8a9e",
    "\U0001f600",
    "\U0001f468\u200d\U0001f469\u200d\U0001f467",
    "\u01c5",
    "\u02b0",
    "123",
    "1234567",
    "\u0663\u0664",
    "\u2163",
    "\u00bd",
    "!!",
    "...",
    "/",
    "<|",
    "|>",
    "<|endoftext|>",
    "def f(x):\n    return x\n",
    "http://a.b/c?d=e",
]


def text_strategy():
    part = st.one_of(
        st.sampled_from(TRICKY),
        st.text(max_size=8),
        st.text(alphabet=st.sampled_from(" \t\n\r\u00a0"), min_size=1, max_size=12),
        st.text(alphabet=st.sampled_from("0123456789"), min_size=1, max_size=40),
    )
    return st.lists(part, max_size=24).map("".join)


def training_texts() -> list[str]:
    texts = [t for _, t in corpus.stdlib_sources(max_bytes=1_500_000)]
    rng = random.Random(0)
    texts += ["".join(rng.choice(TRICKY) for _ in range(200)) for _ in range(200)]
    return texts


@pytest.fixture(scope="module")
def texts() -> list[str]:
    return training_texts()


_PAIRS: dict = {}


def pair(name: str, texts: list[str]):
    """(ours, tiktoken's) on the same rustbpe-trained ranks for the named pattern."""
    if name not in _PAIRS:
        pattern = pattern_string(name)
        trainer = rustbpe.Tokenizer()
        trainer.train_from_iterator(iter(texts), 1500, pattern=pattern)
        ranks = dict(trainer.get_mergeable_ranks())
        specials = {s: len(ranks) + i for i, s in enumerate(SPECIALS)}
        ours = tm.Tokenizer.from_tiktoken(ranks, pattern=name, special_tokens=specials)
        theirs = tiktoken.Encoding(name, pat_str=pattern, mergeable_ranks=ranks, special_tokens=specials)
        _PAIRS[name] = (ours, theirs)
    return _PAIRS[name]


def tiktoken_pattern(function: str) -> str:
    """The pat_str in tiktoken_ext/openai_public.py's `function`, read from the source (calling it
    would download the vocabulary)."""
    import ast
    import inspect

    from tiktoken_ext import openai_public

    module = ast.parse(inspect.getsource(openai_public))
    consts = {
        t.id: ast.literal_eval(n.value)
        for n in module.body
        if isinstance(n, ast.Assign)
        for t in n.targets
        if isinstance(t, ast.Name) and isinstance(n.value, ast.Constant)
    }
    fn = next(n for n in module.body if isinstance(n, ast.FunctionDef) and n.name == function)
    for node in ast.walk(fn):
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", "") == "pat_str":
            return "|".join(ast.literal_eval(node.value.args[0]))
        if isinstance(node, ast.Dict):
            for k, v in zip(node.keys, node.values):
                if isinstance(k, ast.Constant) and k.value == "pat_str" and not isinstance(v, ast.Name):
                    return ast.literal_eval(v)
                if isinstance(k, ast.Constant) and k.value == "pat_str" and v.id in consts:
                    return consts[v.id]
    raise LookupError(function)


@pytest.mark.parametrize("name", ["gpt2", "cl100k", "o200k"])
def test_pattern_strings_are_tiktokens(name):
    function = {"gpt2": "r50k_base", "cl100k": "cl100k_base", "o200k": "o200k_base"}[name]
    assert pattern_string(name) == tiktoken_pattern(function)


@pytest.mark.parametrize("name", NAMES)
def test_identical_ids_on_real_text(name, texts):
    ours, theirs = pair(name, texts)
    sample = "".join(t for _, t in corpus.stdlib_sources(max_bytes=3_000_000))[-300_000:]
    sample += "".join(corpus.stdlib_docstrings(max_docs=300))
    assert ours.encode_ordinary(sample) == theirs.encode_ordinary(sample)


@pytest.mark.parametrize("name", NAMES)
def test_identical_ids_on_random_text(name, texts):
    ours, theirs = pair(name, texts)

    @given(text_strategy())
    def check(text):
        ids = ours.encode_ordinary(text)
        assert ids == theirs.encode_ordinary(text)
        assert ours.encode(text, allowed_special="all") == theirs.encode(text, allowed_special="all")
        assert ours.decode(ids) == text
        assert ours.decode_bytes(ids) == text.encode()

    check()


# rustbpe / nanochat's pattern: a user pattern, not a name.
NANOCHAT = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|"""
    r"""\s+(?!\S)|\s+"""
)
_WORD_CHARS = "абвгдежзиклмнопрстуфхцчшщыьэюяЁДП中文字的是不了人我在有他这学习語言üöäßñéÉabcdeilmnorst😀🎉👍"


def multilingual_strategy():
    """Words in Chinese / Cyrillic / Latin with accents / emoji, some repeated (cache hits) and some CJK
    runs longer than the piece cache's 64-byte limit (merged without it)."""
    word = st.text(alphabet=st.sampled_from(_WORD_CHARS), min_size=1, max_size=12)
    long_cjk = st.text(
        alphabet=st.sampled_from("中文字的是不了人我在有他这学习語言"), min_size=22, max_size=60
    )
    sep = st.sampled_from([" ", "  ", ", ", ". ", "\n", "。", "！", " 123 "])
    return st.lists(
        st.tuples(st.one_of(word, word, long_cjk, st.sampled_from(TRICKY)), sep), max_size=30
    ).map(lambda parts: "".join(w + s for w, s in parts))


@pytest.mark.parametrize("name", ["cl100k", "nanochat"])
def test_piece_cache_gives_tiktoken_ids(name, texts):
    """The piece -> ids cache (pieces that are not tokens, 2-64 bytes) against tiktoken's plain merge:
    each text encoded twice (the second time from the cache), in batches on 2 threads (the cache is
    shared), and with pieces above the cache's length limit. The 1500-token vocabulary leaves most
    non-Latin words as several tokens, so most pieces go through the merge."""
    pattern = pattern_string("cl100k") if name == "cl100k" else NANOCHAT
    ours, theirs = pair("cl100k", texts)
    ranks = ours.mergeable_ranks()
    ours = tm.Tokenizer.from_tiktoken(ranks, pattern=pattern)
    theirs = tiktoken.Encoding(name, pat_str=pattern, mergeable_ranks=ranks, special_tokens={})
    assert ours.pattern_engine == "dfa"

    @settings(max_examples=EXAMPLES, deadline=None)
    @given(st.lists(multilingual_strategy(), min_size=1, max_size=6))
    def check(batch):
        want = [theirs.encode_ordinary(t) for t in batch]
        assert [ours.encode_ordinary(t) for t in batch] == want
        assert [ours.encode_ordinary(t) for t in batch] == want
        assert ours.encode_ordinary_batch(batch * 3, num_threads=2) == want * 3
        assert [ours.encode_to_numpy(t).tolist() for t in batch] == want

    check()


def test_special_token_rules(texts):
    ours, theirs = pair("cl100k", texts)
    text = "a<|endoftext|>b<|fim|>c"
    with pytest.raises(ValueError, match=r"<\|endoftext\|>"):
        ours.encode(text)
    with pytest.raises(ValueError):
        theirs.encode(text)
    with pytest.raises(ValueError, match=r"<\|fim\|>"):
        ours.encode(text, allowed_special={"<|endoftext|>"})
    for allowed, disallowed in [
        ("all", "all"),
        ({"<|endoftext|>"}, ()),
        (set(), ()),
        ({"<|fim|>", "<|endoftext|>"}, "all"),
    ]:
        want = theirs.encode(text, allowed_special=allowed, disallowed_special=disallowed)
        assert ours.encode(text, allowed_special=allowed, disallowed_special=disallowed) == want
    assert ours.encode_ordinary(text) == theirs.encode_ordinary(text)
    eot = ours.special_tokens["<|endoftext|>"]
    assert ours.eos_token_id == eot
    assert ours.token_to_id("<|endoftext|>") == eot
    assert ours.id_to_token_bytes(eot) == b"<|endoftext|>"
    assert ours.n_vocab == theirs.n_vocab
    assert ours.token_to_id(b"nope-not-a-token") is None


def test_decode_errors(texts):
    ours, _ = pair("cl100k", texts)
    with pytest.raises(ValueError, match="123456789"):
        ours.decode([1, 123456789])
    split = ours.encode("\u4e2d")[:1] if len(ours.encode("\u4e2d")) > 1 else [0xE4]
    with pytest.raises(UnicodeDecodeError):
        ours.decode(split + [ours.token_to_id(bytes([0xE4]))], errors="strict")
    assert "\ufffd" in ours.decode([ours.token_to_id(bytes([0xE4]))])
    with pytest.raises(ValueError, match="errors"):
        ours.decode([1], errors="ignore")


@given(st.lists(text_strategy(), max_size=12), st.sampled_from([None, 1, 2]))
def test_batch_equals_single(batch, threads):
    ours, _ = pair("llama3", training_texts_cached())
    want = [ours.encode(t, allowed_special="all") for t in batch]
    assert ours.encode_batch(batch, num_threads=threads, allowed_special="all") == want
    assert ours.encode_ordinary_batch(batch, num_threads=threads) == [ours.encode_ordinary(t) for t in batch]


_TEXTS: list = []


def training_texts_cached() -> list[str]:
    if not _TEXTS:
        _TEXTS.extend(training_texts())
    return _TEXTS


def test_batch_errors_name_the_token(texts):
    ours, _ = pair("o200k", texts)
    with pytest.raises(ValueError, match="fim_prefix"):
        ours.encode_batch(["fine", "x<|fim_prefix|>"], num_threads=2)


@pytest.mark.parametrize("threads", [1, 2, 3, 8])
def test_batch_of_uneven_documents(texts, threads):
    """Sizes that vary by 1000x finish out of order on several threads; results must come back in
    order, and an error must be the first offending document's, whatever the thread count."""
    ours, tt = pair("cl100k", texts)
    rng = random.Random(threads)
    docs = [rng.choice(texts)[: rng.choice([5, 50, 5000])] * rng.choice([1, 20]) for _ in range(300)]
    assert ours.encode_ordinary_batch(docs, num_threads=threads) == tt.encode_ordinary_batch(docs)
    bad = [d.replace("<|", "< |") for d in docs]  # TRICKY holds special tokens
    bad[120] += "<|fim|>"
    bad[250] += "<|endoftext|>"
    with pytest.raises(ValueError, match=r"<\|fim\|>"):
        ours.encode_batch(bad, num_threads=threads)


def test_encode_to_numpy(texts):
    ours, _ = pair("o200k", texts)
    text = "".join(texts[:3])
    arr = ours.encode_to_numpy(text)
    assert arr.dtype == np.uint32 and arr.ndim == 1
    # No copy: the array's memory is the Rust Vec, kept alive by its base (a Rust-side holder, not another
    # array), so numpy does not own it. A copy (numpy.array of the list, from_slice) would own its data.
    assert not arr.flags["OWNDATA"] and arr.base is not None and not isinstance(arr.base, np.ndarray)
    assert arr.tolist() == ours.encode(text)


def test_worst_cases_finish_and_round_trip(texts):
    ours, theirs = pair("cl100k", texts)
    rng = random.Random(1)
    letters = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(1 << 20))
    for text in ("a" * (1 << 20), letters, " " * (1 << 20), "1" * (1 << 20)):
        ids = ours.encode_ordinary(text)
        assert ours.decode(ids) == text
        # tiktoken is quadratic on one long piece: compare on a prefix it can finish.
        assert ours.encode_ordinary(text[:20_000]) == theirs.encode_ordinary(text[:20_000])


def test_surrogates_are_replaced_like_tiktoken(texts):
    ours, theirs = pair("cl100k", texts)
    assert ours.encode("a\ud800b") == theirs.encode("a\ud800b")


def test_save_load_round_trip(tmp_path, texts):
    ours, theirs = pair("gpt2", texts)
    path = tmp_path / "tok.tokenmill"
    ours.save(path)
    back = tm.Tokenizer.load(path)
    assert back.fingerprint == ours.fingerprint
    assert back.special_tokens == ours.special_tokens and back.pattern == ours.pattern
    sample = "".join(texts[:5])
    assert back.encode_ordinary(sample) == ours.encode_ordinary(sample)
    # An edited file is detected.
    lines = path.read_text().splitlines()
    lines[300] = lines[300][:-2] + ("AA" if not lines[300].endswith("AA") else "BB")
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match="tok.tokenmill"):
        tm.Tokenizer.load(path)
    with pytest.raises(FileNotFoundError):
        tm.Tokenizer.load(tmp_path / "missing")


def test_tiktoken_helpers_match(texts):
    """tiktoken's other public helpers give tiktoken's answers (drop-in use)."""
    ours, tt = pair("o200k", texts)
    sample = [texts[3][:300], "", "x<|fim|>y", "\u4e2d\u6587 \U0001f600"]
    ids = [tt.encode(t, allowed_special="all") for t in sample]
    assert ours.decode_batch(ids) == tt.decode_batch(ids)
    assert ours.decode_bytes_batch(ids) == tt.decode_bytes_batch(ids)
    assert ours.decode_tokens_bytes(ids[0]) == tt.decode_tokens_bytes(ids[0])
    assert ours.token_byte_values() == tt.token_byte_values()
    assert (ours.max_token_value, ours.eot_token) == (tt.max_token_value, tt.eot_token)
    assert ours.special_tokens_set == tt.special_tokens_set
    for token in [b"a", b" the", "<|fim|>", ours.decode_single_token_bytes(700)]:
        assert ours.encode_single_token(token) == tt.encode_single_token(token)
    for id in [0, 255, 700, tt.eot_token]:
        assert ours.decode_single_token_bytes(id) == tt.decode_single_token_bytes(id)
    with pytest.raises(KeyError):
        ours.encode_single_token(b"not one token, surely")
    with pytest.raises(KeyError):
        ours.decode_single_token_bytes(10**6)


def test_tiktoken_files(tmp_path, texts):
    from tiktoken.load import load_tiktoken_bpe

    ours, theirs = pair("o200k", texts)
    path = tmp_path / "v.tiktoken"
    ours.save_tiktoken(path)
    ranks = load_tiktoken_bpe(str(path))
    assert ranks == ours.mergeable_ranks() == theirs._mergeable_ranks
    back = tm.Tokenizer.from_tiktoken(path, pattern="o200k", special_tokens=ours.special_tokens)
    assert back.fingerprint == ours.fingerprint
    path.write_text("IQ== 0\nnot base64 1\n")
    with pytest.raises(ValueError, match=r"v\.tiktoken.*line 2"):
        tm.Tokenizer.from_tiktoken(path)


def test_constructor_errors():
    byte_tokens = [bytes([b]) for b in range(256)]
    with pytest.raises(ValueError, match="0xFF"):
        tm.Tokenizer.from_tiktoken(byte_tokens[:255])
    with pytest.raises(ValueError, match="twice|same bytes"):
        tm.Tokenizer.from_tiktoken(byte_tokens + [b"a"])
    with pytest.raises(ValueError, match="pattern"):
        tm.Tokenizer.from_tiktoken(byte_tokens, pattern="(")
    with pytest.raises(ValueError, match="already"):
        tm.Tokenizer.from_tiktoken(byte_tokens, special_tokens={"<s>": 5})
    with pytest.raises(ValueError, match="gaps"):
        tm.Tokenizer.from_tiktoken({b"a": 0, b"b": 5})


def test_user_pattern_with_lookbehind_uses_fallback():
    byte_tokens = [bytes([b]) for b in range(256)] + [b"ab"]
    tok = tm.Tokenizer.from_tiktoken(byte_tokens, pattern=r"(?<=a)b|\w+|\s+|[^\w\s]+")
    enc = tiktoken.Encoding(
        "x", pat_str=tok.pattern, mergeable_ranks={t: i for i, t in enumerate(byte_tokens)}, special_tokens={}
    )
    for text in ["ab ab", "cab", "b ab!"]:
        assert tok.encode(text) == enc.encode(text)


def test_cli_encode(tmp_path, texts):
    from tokenmill import cli

    ours, _ = pair("cl100k", texts)
    ours.save(tmp_path / "tok")
    (tmp_path / "in.txt").write_text("hello world<|endoftext|>", encoding="utf-8")
    out = tmp_path / "ids.npy"
    assert (
        cli.main(
            [
                "tokenizer",
                "encode",
                str(tmp_path / "in.txt"),
                "--tokenizer",
                str(tmp_path / "tok"),
                "--allow-special",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    arr = np.load(out)
    assert arr.dtype == np.uint32
    assert arr.tolist() == ours.encode("hello world<|endoftext|>", allowed_special="all")
    # Without --allow-special the special token is an error naming it (exit status 1).
    assert (
        cli.main(["tokenizer", "encode", str(tmp_path / "in.txt"), "--tokenizer", str(tmp_path / "tok")]) == 1
    )


def test_docstring_examples():
    import doctest

    import tokenmill.tokenizer as module
    from tokenmill import _core

    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    ran = 0
    for test in doctest.DocTestFinder().find(module):
        if ".train" in test.name and not hasattr(_core, "train_bpe"):
            continue  # training lives on the bpetrain branch
        ran += len(test.examples)
        runner.run(test)
    assert ran > 5 and runner.failures == 0


def test_cli_encode_takes_the_bytes_as_they_are(tmp_path, texts, monkeypatch, capsys):
    """A file or stdin is encoded byte for byte as tiktoken encodes its text (CRLF kept, not turned into
    LF); invalid UTF-8 is an error naming the file and line, never replaced by U+FFFD."""
    import io

    from tokenmill import cli

    ours, theirs = pair("cl100k", texts)
    ours.save(tmp_path / "tok")
    raw = "first line\r\nzweite Zeile: äöü\r\n日本語 😀\r\n".encode()
    (tmp_path / "in.txt").write_bytes(raw)
    want = " ".join(map(str, theirs.encode(raw.decode())))
    argv = ["tokenizer", "encode", "--tokenizer", str(tmp_path / "tok")]
    assert cli.main([*argv, str(tmp_path / "in.txt")]) == 0
    assert capsys.readouterr().out.strip() == want
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(raw)))
    assert cli.main([*argv, "-"]) == 0
    assert capsys.readouterr().out.strip() == want
    (tmp_path / "bad.txt").write_bytes(b"ok\nstill ok \xff\xfe\n")
    assert cli.main([*argv, str(tmp_path / "bad.txt")]) == 1
    assert f"{tmp_path / 'bad.txt'}:2: invalid UTF-8 (byte 0xff at offset 12)" in capsys.readouterr().err
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(b"a\xffb")))
    assert cli.main([*argv, "-"]) == 1
    assert "<stdin>:1: invalid UTF-8 (byte 0xff at offset 1)" in capsys.readouterr().err
    assert cli.main([*argv, str(tmp_path / "in.txt"), "--out", str(tmp_path / "nodir" / "ids.npy")]) == 1
    assert f"{tmp_path / 'nodir'}: no such directory" in capsys.readouterr().err


def test_save_into_a_missing_folder_names_the_folder(tmp_path):
    tok = tm.Tokenizer.from_tiktoken([bytes([b]) for b in range(256)], pattern="gpt2")
    for save in (tok.save, tok.save_huggingface, tok.save_tiktoken):
        with pytest.raises(FileNotFoundError, match=f"^{re.escape(str(tmp_path / 'no'))}: no such directory"):
            save(tmp_path / "no" / "tok")
    assert list(tmp_path.iterdir()) == []


@given(st.text(alphabet=st.sampled_from(list("ab é日😀\r\n\t\u2028\x85\ufeff")), max_size=40))
def test_cli_encode_of_a_file_equals_tiktoken_on_its_text(texts, text):
    """Whatever line breaks (CR, CRLF, U+2028, NEL) or BOM the file holds, the ids are tiktoken's for the
    file's exact text."""
    import contextlib
    import io
    import tempfile

    from tokenmill import cli

    ours, theirs = pair("cl100k", texts)
    with tempfile.TemporaryDirectory() as d:
        ours.save(f"{d}/tok")
        with open(f"{d}/in.txt", "wb") as f:
            f.write(text.encode())
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            assert cli.main(["tokenizer", "encode", f"{d}/in.txt", "--tokenizer", f"{d}/tok"]) == 0
    assert out.getvalue().split() == [str(i) for i in theirs.encode(text)]
