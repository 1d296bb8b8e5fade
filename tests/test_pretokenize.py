"""Pretokenization on the DFA path splits exactly as a backtracking engine runs the original pattern
(Python's `regex` module for the pieces, tiktoken / fancy-regex for the ids), and the bad inputs that
used to pass silently are refused. Example count: HYPOTHESIS_EXAMPLES (default 300)."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings

import pytest
import tokenmill as tm
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenmill.tokenizer import pattern_string

regex = pytest.importorskip("regex")
tiktoken = pytest.importorskip("tiktoken")

EXAMPLES = int(os.environ.get("HYPOTHESIS_EXAMPLES", "300"))

NANOCHAT = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|"""
    r"""\s+(?!\S)|\s+"""
)
PATTERNS = {name: pattern_string(name) for name in ("gpt2", "cl100k", "o200k", "llama3")}
PATTERNS["nanochat"] = NANOCHAT

BYTES = [bytes([b]) for b in range(256)]

# Whitespace runs, digits, CJK, Cyrillic, apostrophes (contractions), newlines, marks, case pairs.
CHARS = list(" \t\n\r\x0b\x0c\u00a0\u3000'\"/.,!-_") + list("0123456789") + list("\u0663\u00bd")
CHARS += list("aAbsStTlLvVeErRdDmM") + list("中文字学习語言") + list("ДомПривет ёЁ") + list("éÉñÑßü")
CHARS += ["\u0301", "\u017f", "\u212a", "\U0001f600"]
text_st = st.lists(
    st.one_of(
        st.sampled_from(CHARS),
        st.sampled_from([" " * 3, "\n\n", " \n ", "'s", "'LL", "123456", "Привет", "学习中文", "x  y"]),
        # Assigned code points only: the `regex` module, Python's unicodedata and Rust's regex tables follow
        # different Unicode versions, and a code point assigned after the oldest of them is a letter to one
        # and unassigned to another (U+3D000 split differently; no disagreement of the tokenizers).
        st.characters(codec="utf-8", exclude_categories=["Cn"]),
    ),
    max_size=40,
).map("".join)


@pytest.fixture(scope="module")
def tokenizers():
    return {n: tm.Tokenizer.from_tiktoken(BYTES, pattern=p) for n, p in PATTERNS.items()}


@pytest.fixture(scope="module")
def compiled():
    return {n: regex.compile(p) for n, p in PATTERNS.items()}


def test_every_field_pattern_runs_on_the_dfa(tokenizers):
    assert {n: t.pattern_engine for n, t in tokenizers.items()} == dict.fromkeys(PATTERNS, "dfa")
    # Truly backtracking patterns keep working on fancy-regex, and split like `regex` does.
    for p in (r"(?<=a)b|\w+", r"(\w)\1|\w", r"\w+(?=\s\s)|\w+|\s+"):
        tok = tm.Tokenizer.from_tiktoken(BYTES, pattern=p)
        assert tok.pattern_engine == "fancy-regex"
        text = "aab  xx yy  z bb"
        assert tok.pretokenize(text) == [m.group() for m in regex.finditer(p, text)]


def test_hand_checked_splits(tokenizers):
    assert tokenizers["nanochat"].pretokenize("Hi  there,  123 4\n\n  x") == [
        "Hi",
        " ",
        " there",
        ",",
        " ",
        " ",
        "123",
        " ",
        "4",
        "\n\n",
        " ",
        " x",
    ]
    assert tokenizers["cl100k"].pretokenize("a   \n") == ["a", "   \n"]


@settings(max_examples=EXAMPLES, deadline=None)
@given(text=text_st)
def test_splits_match_the_regex_module(tokenizers, compiled, text):
    for name, tok in tokenizers.items():
        want = [m.group() for m in compiled[name].finditer(text) if m.group()]
        assert tok.pretokenize(text) == want, name


@pytest.fixture(scope="module")
def trained():
    """A small vocabulary per pattern (trained by tokenmill on multilingual text) and tiktoken on the
    same ranks and pattern."""
    corpus = ["Привет, мир! Hello world's 1234 學習中文 der Bär, el niño\n\n  tabs\there"] * 3
    out = {}
    for name, p in PATTERNS.items():
        ours = tm.Tokenizer.train(corpus, vocab_size=400, pattern=p, min_frequency=1, show_progress=False)
        ranks = ours.mergeable_ranks()
        out[name] = (ours, tiktoken.Encoding(name, pat_str=p, mergeable_ranks=ranks, special_tokens={}))
    return out


@settings(max_examples=EXAMPLES, deadline=None)
@given(text=text_st)
def test_ids_match_tiktoken(trained, text):
    for name, (ours, tt) in trained.items():
        want = tt.encode_ordinary(text)
        assert ours.encode_ordinary(text) == want, name
        assert ours.encode(text) == want, name
        assert ours.encode_to_numpy(text).tolist() == want, name


def test_a_str_where_texts_are_expected_is_a_type_error(tmp_path):
    with pytest.raises(TypeError, match="iterable of str"):
        tm.Tokenizer.train("a string", vocab_size=300, show_progress=False)
    path = tmp_path / "a.txt"
    path.write_text("hello world", encoding="utf-8")
    for paths in (str(path), path):
        with pytest.raises(TypeError, match="list of paths"):
            tm.Tokenizer.train_files(paths, vocab_size=300, show_progress=False)
    tok = tm.Tokenizer.from_tiktoken(BYTES)
    with pytest.raises(TypeError, match="sequence of str"):
        tok.encode_batch("ab")
    with pytest.raises(TypeError, match="sequence of str"):
        tok.encode_ordinary_batch("ab")


def test_a_name_typo_is_refused_with_the_names():
    for bad in ("llama-3", "cl100k-base", "gpt4"):
        with pytest.raises(ValueError, match=r"unknown pattern name.*gpt2, .*cl100k.*o200k.*llama3"):
            tm.Tokenizer.from_tiktoken(BYTES, pattern=bad)
        with pytest.raises(ValueError, match="unknown pattern name"):
            tm.Tokenizer.train(["abc"], vocab_size=300, pattern=bad, show_progress=False)


def test_cli_refuses_a_name_typo(tmp_path):
    doc = tmp_path / "d.txt"
    doc.write_text("hello world " * 20, encoding="utf-8")
    cmd = [sys.executable, "-m", "tokenmill", "tokenizer", "train", str(doc), "--vocab-size", "300"]
    r = subprocess.run(
        cmd + ["--out", str(tmp_path / "t"), "--pattern", "llama-3", "--quiet"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode != 0 and "unknown pattern name" in r.stderr and "llama3" in r.stderr


def test_uncovered_text_warns_or_is_refused(tmp_path):
    texts = ["abc def 12"] * 4  # \p{L}+ leaves " ", " 12": 4 of 10 bytes per text
    with pytest.warns(UserWarning, match=r"40\.0000% of the corpus uncovered \(16 of 40 bytes"):
        tm.Tokenizer.train(texts, vocab_size=260, pattern=r"\p{L}+", show_progress=False)
    with pytest.raises(ValueError, match=r"40\.0000% of the corpus uncovered"):
        tm.Tokenizer.train(texts, vocab_size=260, pattern=r"\p{L}+", show_progress=False, strict=True)
    # Special tokens are cut out on purpose: not counted as dropped. A covering pattern is silent.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tm.Tokenizer.train(
            ["ab<s>cd"] * 4, vocab_size=259, pattern=r"\p{L}+", special_tokens=["<s>"], show_progress=False
        )
        tm.Tokenizer.train(texts, vocab_size=260, pattern="cl100k", show_progress=False, strict=True)
    doc = tmp_path / "d.txt"
    doc.write_text("abc def 12" * 50, encoding="utf-8")
    with pytest.raises(ValueError, match="uncovered"):
        tm.Tokenizer.train_files([doc], vocab_size=260, pattern=r"\p{L}+", show_progress=False, strict=True)
    cmd = [sys.executable, "-m", "tokenmill", "tokenizer", "train", str(doc), "--vocab-size", "300"]
    cmd += ["--out", str(tmp_path / "t"), "--pattern", r"\p{L}+", "--quiet"]
    r = subprocess.run(cmd + ["--strict"], capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "uncovered" in r.stderr
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "uncovered" in r.stderr
