"""Byte-level BPE tokenizer with tiktoken's semantics, implemented in Rust (``tokenmill._core``).

>>> import tokenmill as tm
>>> tok = tm.Tokenizer.from_tiktoken({bytes([b]): b for b in range(256)}, pattern="cl100k",
...                                  special_tokens={"<|endoftext|>": 256})
>>> tok.encode("hi")
[104, 105]
>>> tok.decode(tok.encode("hi<|endoftext|>", allowed_special="all"))
'hi<|endoftext|>'
"""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Collection, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Literal, Optional, Union

from tokenmill import _core

if TYPE_CHECKING:
    import numpy as np

PathLike = Union[str, "os.PathLike[str]"]
Specials = Union[Literal["all"], Collection[str]]

#: Names accepted wherever a pattern is expected; each is the exact string tiktoken / LLaMA-3 use.
PATTERNS = ("gpt2", "cl100k", "o200k", "llama3")

#: Special tokens that end a text, in order of preference (the one list: ``eos_token_id``, the EOS that
#: ``prepare`` appends, SFT templates and the Hugging Face export all take the first one present).
EOS_TOKENS = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>", "<|eos|>", "<|eot_id|>")
#: Special tokens that begin a text, in order of preference.
BOS_TOKENS = ("<|begin_of_text|>", "<s>", "<|startoftext|>", "<bos>")

# tiktoken's published ranks files, recognised by file name: their pattern and special tokens (a
# ``.tiktoken`` file holds neither), as tiktoken_ext/openai_public.py defines them.
_TIKTOKEN_FILES = {
    "r50k_base": ("gpt2", {"<|endoftext|>": 50256}),
    "gpt2": ("gpt2", {"<|endoftext|>": 50256}),
    "p50k_base": ("gpt2", {"<|endoftext|>": 50256}),
    "cl100k_base": (
        "cl100k",
        {
            "<|endoftext|>": 100257,
            "<|fim_prefix|>": 100258,
            "<|fim_middle|>": 100259,
            "<|fim_suffix|>": 100260,
            "<|endofprompt|>": 100276,
        },
    ),
    "o200k_base": ("o200k", {"<|endoftext|>": 199999, "<|endofprompt|>": 200018}),
}
_TIKTOKEN_LINE = re.compile(rb"[A-Za-z0-9+/]+={0,2} [0-9]+\r?\n")


def pattern_string(name: str) -> str:
    """The exact regex behind a pattern name (tiktoken's / LLaMA-3's string); other strings unchanged.

    >>> pattern_string("llama3")[:24]
    "(?i:'s|'t|'re|'ve|'m|'ll"
    """
    return _core.resolve_pattern(name)


def _clean(text: str) -> str:
    """Lone surrogates cannot be UTF-8: replace them with U+FFFD, as tiktoken does."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")


def _specials_dict(
    special_tokens: Union[Mapping[str, int], Sequence[str], None], first_id: int
) -> dict[str, int]:
    if special_tokens is None:
        return {}
    if isinstance(special_tokens, Mapping):
        return {str(k): int(v) for k, v in special_tokens.items()}
    if isinstance(special_tokens, str):
        raise TypeError("special_tokens must be a list of strings or a dict {text: id}, not a str")
    return {s: first_id + i for i, s in enumerate(special_tokens)}


def _not_str(value: object, what: str) -> None:
    """A str is iterable, so it would pass for a sequence of one-character items: refuse it."""
    if isinstance(value, (str, bytes)):
        raise TypeError(f"{what}, not a {type(value).__name__}: wrap a single one in a list")


def _report_coverage(dropped: int, total: int) -> None:
    """Warn when the pattern matched no piece over part of the corpus (BPE never saw it)."""
    if dropped:
        warnings.warn(
            f"the pattern leaves {100 * dropped / total:.4f}% of the corpus uncovered ({dropped} of "
            f"{total} bytes match no piece and were dropped); pass strict=True to refuse",
            UserWarning,
            stacklevel=3,
        )


def _report_size(n_mergeable: int, n_tokens: int, vocab_size: int, min_frequency: int) -> None:
    """Warn when the corpus ran out of pairs to merge before ``vocab_size`` (an empty or tiny corpus)."""
    if n_tokens < vocab_size:
        warnings.warn(
            f"the corpus gave only {n_mergeable - 256} merges seen at least {max(min_frequency, 1)} times: "
            f"the vocabulary has {n_tokens} tokens, not the vocab_size {vocab_size} asked for",
            UserWarning,
            stacklevel=3,
        )


def _train_args(vocab_size: int, special_tokens: Sequence[str], min_frequency: int) -> list[str]:
    """Check the arguments of :meth:`Tokenizer.train`; returns the special tokens as a list."""
    if isinstance(special_tokens, str):
        raise TypeError("special_tokens must be a list of strings, not a str")
    specials = list(special_tokens)
    if len(set(specials)) != len(specials):
        raise ValueError(f"special_tokens has duplicates: {specials}")
    if vocab_size < 256 + len(specials):
        raise ValueError(
            f"vocab_size {vocab_size} is smaller than 256 byte tokens + {len(specials)} special tokens"
        )
    if min_frequency < 0:
        raise ValueError(f"min_frequency must be >= 0, got {min_frequency}")
    return specials


class Tokenizer:
    """A byte-level BPE tokenizer (or a SentencePiece BPE model loaded with :meth:`from_sentencepiece`).

    Build one with :meth:`train`, :meth:`from_tiktoken`, :meth:`from_huggingface`,
    :meth:`from_sentencepiece` or :meth:`load`; :meth:`from_file` loads any of those files. Instances are immutable and thread-safe.
    """

    __slots__ = ("_core", "_specials")

    def __init__(self, core: _core.CoreTokenizer):
        self._core = core
        self._specials: dict[str, int] = dict(core.special_tokens())

    # ----- construction -----

    @classmethod
    def train(
        cls,
        texts: Iterable[str],
        vocab_size: int,
        pattern: str = "llama3",
        special_tokens: Sequence[str] = (),
        min_frequency: int = 2,
        show_progress: bool = True,
        strict: bool = False,
    ) -> Tokenizer:
        """Train a byte-level BPE vocabulary on an iterable of strings (streamed, counted in parallel).

        ``vocab_size`` counts the 256 byte tokens, the merges and the special tokens, which get the
        last ids in the order given. Text that the pattern matches no piece over is dropped: a
        UserWarning gives the fraction of bytes dropped, or with ``strict=True`` a ValueError is
        raised before the merges are learned. A str for ``texts`` is a TypeError.

        >>> tok = Tokenizer.train(["hello hello hello world"] * 10, vocab_size=260, show_progress=False)
        >>> tok.n_vocab
        260
        """
        _not_str(texts, "texts must be an iterable of str")
        specials = _train_args(vocab_size, special_tokens, min_frequency)
        tokens, dropped, total = _core.train_bpe(
            iter(texts), vocab_size, pattern, specials, min_frequency, show_progress, strict
        )
        _report_coverage(dropped, total)
        _report_size(len(tokens), len(tokens) + len(specials), vocab_size, min_frequency)
        return cls.from_tiktoken(tokens, pattern=pattern, special_tokens=specials)

    @classmethod
    def train_files(
        cls,
        paths: Sequence[PathLike],
        vocab_size: int,
        pattern: str = "llama3",
        special_tokens: Sequence[str] = (),
        min_frequency: int = 2,
        show_progress: bool = True,
        strict: bool = False,
    ) -> Tokenizer:
        """Like :meth:`train`, reading text files (one document per file) in parallel in Rust.
        ``paths`` is a list of paths (a single str or path is a TypeError)."""
        _not_str(paths, "paths must be a list of paths")
        if isinstance(paths, os.PathLike):
            raise TypeError("paths must be a list of paths, not a single path: wrap it in a list")
        specials = _train_args(vocab_size, special_tokens, min_frequency)
        tokens, dropped, total = _core.train_bpe_files(
            [os.fspath(p) for p in paths], vocab_size, pattern, specials, min_frequency, show_progress, strict
        )
        _report_coverage(dropped, total)
        _report_size(len(tokens), len(tokens) + len(specials), vocab_size, min_frequency)
        return cls.from_tiktoken(tokens, pattern=pattern, special_tokens=specials)

    @classmethod
    def from_tiktoken(
        cls,
        ranks: Union[Mapping[bytes, int], Sequence[bytes], PathLike],
        pattern: str = "cl100k",
        special_tokens: Union[Mapping[str, int], Sequence[str], None] = None,
    ) -> Tokenizer:
        """From tiktoken mergeable ranks: a dict {token bytes: rank}, a list of token bytes in rank
        order, or a ``.tiktoken`` file. ``special_tokens`` is a dict {text: id} or a list of texts
        (ids follow the mergeable tokens).

        >>> tok = Tokenizer.from_tiktoken([bytes([b]) for b in range(256)] + [b"hi"], pattern="gpt2")
        >>> tok.encode("hi hi")
        [256, 32, 256]
        """
        if isinstance(ranks, (str, os.PathLike)):
            core = _core.CoreTokenizer.from_tiktoken_file(os.fspath(ranks), pattern, [])
            specials = _specials_dict(special_tokens, core.n_vocab)
            if specials:
                mergeable = [t for _, t in core.mergeable_tokens()]
                core = _core.CoreTokenizer.from_ranks(mergeable, pattern, list(specials.items()))
            return cls(core)
        if isinstance(ranks, Mapping):
            tokens: list[bytes] = [b""] * len(ranks)
            for tok, rank in ranks.items():
                if not 0 <= rank < len(ranks) or tokens[rank]:
                    raise ValueError(
                        f"ranks must be 0..{len(ranks) - 1} without gaps or repeats; got {rank} for {tok!r}"
                    )
                tokens[rank] = bytes(tok)
        else:
            tokens = [bytes(t) for t in ranks]
        specials = _specials_dict(special_tokens, len(tokens))
        return cls(_core.CoreTokenizer.from_ranks(tokens, pattern, list(specials.items())))

    @classmethod
    def from_huggingface(cls, path: PathLike) -> Tokenizer:
        """From a Hugging Face ``tokenizer.json`` with a byte-level BPE model (ByteLevel pre-tokenizer,
        or Split regex + ByteLevel as LLaMA-3 ships) or a SentencePiece-style BPE model with byte
        fallback (LLaMA-2, Mistral, TinyLlama: legacy Prepend/Replace normalizer or Metaspace), encoded
        and decoded as ``tokenizers`` does; added tokens become special tokens. ValueError naming the
        file and the part for other variants."""
        return cls(_core.CoreTokenizer.from_huggingface(os.fspath(path)))

    @classmethod
    def from_sentencepiece(cls, path: PathLike) -> Tokenizer:
        """From a SentencePiece ``.model`` of type BPE (LLaMA-1/2 style, byte fallback), identity
        normalization. Control and unknown pieces (``<s>``, ``</s>``, ``<unk>``) are special tokens."""
        return cls(_core.CoreTokenizer.from_sentencepiece(os.fspath(path)))

    @classmethod
    def from_file(cls, path: PathLike, pattern: Optional[str] = None) -> Tokenizer:
        """The one loader: any supported tokenizer file, recognised by its content (not its name):

        * tokenmill's own format (:meth:`save`; first line ``tokenmill-tokenizer``) -> :meth:`load`;
        * a Hugging Face ``tokenizer.json`` (a JSON object) -> :meth:`from_huggingface`;
        * tiktoken ranks (``base64 rank`` lines, e.g. ``cl100k_base.tiktoken`` or LLaMA-3's
          ``tokenizer.model``) -> :meth:`from_tiktoken`. The format holds no pattern and no special tokens:
          tiktoken's own files (``r50k_base``, ``p50k_base``, ``cl100k_base``, ``o200k_base`` by file name)
          get tiktoken's pattern and special tokens; any other needs ``pattern`` (a name from
          :data:`PATTERNS` or a regex; for LLaMA-3, ``"llama3"``) and has no special tokens (use
          :meth:`from_tiktoken` to add them);
        * a SentencePiece ``.model`` (protobuf) -> :meth:`from_sentencepiece`.

        ``pattern`` is only for tiktoken files (the other formats carry their own): ValueError elsewhere.
        """
        path = os.fspath(path)
        try:
            with open(path, "rb") as f:
                head = f.read(4096)
        except FileNotFoundError:
            raise FileNotFoundError(f"{path}: no such tokenizer file") from None
        except IsADirectoryError:
            raise IsADirectoryError(
                f"{path}: is a directory, not a tokenizer file (name the file in it, e.g. tokenizer.json)"
            ) from None
        if head.startswith(b"tokenmill-tokenizer"):
            kind = "tokenmill"
        elif head.lstrip()[:1] == b"{":
            kind = "huggingface"
        elif _TIKTOKEN_LINE.match(head):
            kind = "tiktoken"
        elif head[:1] == b"\x0a":  # protobuf field 1 (pieces), length-delimited: a SentencePiece model
            kind = "sentencepiece"
        else:
            raise ValueError(
                f"{path}: not a tokenizer file tokenmill reads (tokenmill format, Hugging Face "
                "tokenizer.json, tiktoken ranks or SentencePiece .model)"
            )
        if kind == "tiktoken":
            stem = os.path.basename(path).split(".")[0]
            known_pattern, specials = _TIKTOKEN_FILES.get(stem, (None, None))
            pattern = pattern or known_pattern
            if pattern is None:
                raise ValueError(
                    f"{path}: a tiktoken ranks file holds no pre-tokenization pattern: give one "
                    f"(pattern= / --pattern: {', '.join(PATTERNS)} or a regex; LLaMA-3 uses llama3)"
                )
            return cls.from_tiktoken(path, pattern=pattern, special_tokens=specials)
        if pattern is not None:
            raise ValueError(f"{path}: pattern applies to tiktoken files only; this {kind} file has its own")
        if kind == "tokenmill":
            return cls.load(path)
        if kind == "huggingface":
            return cls.from_huggingface(path)
        return cls.from_sentencepiece(path)

    @classmethod
    def load(cls, path: PathLike) -> Tokenizer:
        """Load a file written by :meth:`save` (:meth:`from_file` reads every format)."""
        return cls(_core.CoreTokenizer.load(os.fspath(path)))

    def save(self, path: PathLike) -> None:
        """Write tokenmill's own format (atomically); :meth:`load` reads it back."""
        self._core.save(os.fspath(path))

    def save_huggingface(self, path: PathLike) -> None:
        """Write a ``tokenizer.json`` that the ``tokenizers`` library loads and encodes identically (a
        SentencePiece ``.model`` becomes the legacy LLaMA form; ValueError if it cannot be expressed)."""
        self._core.save_huggingface(os.fspath(path))

    def save_tiktoken(self, path: PathLike) -> None:
        """Write the mergeable ranks as a ``.tiktoken`` file (pattern and special tokens are not part
        of that format)."""
        self._core.save_tiktoken(os.fspath(path))

    # ----- pickling (multiprocessing spawn workers, datasets.map(num_proc=...)) -----

    def __reduce__(self):
        # By value, as the text of tokenmill's own format (every kind round-trips through it); the
        # receiving process re-parses it, which also re-checks its fingerprint.
        return (_from_native, (self._core.to_native(),))

    # ----- properties -----

    @property
    def n_vocab(self) -> int:
        """Largest token id + 1."""
        return self._core.n_vocab

    @property
    def pattern(self) -> str:
        """The pretokenization regex ('' for SentencePiece models)."""
        return self._core.pattern

    @property
    def pattern_engine(self) -> Optional[Literal["dfa", "fancy-regex"]]:
        """The engine the pattern runs on: ``"dfa"`` (regex-automata; every named pattern and the
        tiktoken/LLaMA-3-style patterns people write, possessives and ``\\s+(?!\\S)`` included) or
        ``"fancy-regex"`` (backtracking, for look-arounds and backreferences the DFA cannot express
        exactly). None for SentencePiece models, which have no pattern.

        >>> Tokenizer.from_tiktoken([bytes([b]) for b in range(256)], pattern="o200k").pattern_engine
        'dfa'
        >>> Tokenizer.from_tiktoken([bytes([b]) for b in range(256)], pattern=r"(?<=a)b").pattern_engine
        'fancy-regex'
        """
        if self._core.is_sentencepiece:
            return None
        return self._core.pattern_engine

    @property
    def special_tokens(self) -> dict[str, int]:
        """{text: id} of the special tokens."""
        return dict(self._specials)

    @property
    def fingerprint(self) -> str:
        """A stable hash of vocabulary, pattern and special tokens (for manifests)."""
        return self._core.fingerprint

    @property
    def eos_token_id(self) -> Optional[int]:
        """Id of the first of :data:`EOS_TOKENS` (``<|endoftext|>``, ``<|end_of_text|>``, ``</s>``, ...)
        that is a special token, else None."""
        return self._first_special(EOS_TOKENS)

    @property
    def bos_token_id(self) -> Optional[int]:
        """Id of the first of :data:`BOS_TOKENS` (``<|begin_of_text|>``, ``<s>``, ...) present, else None."""
        return self._first_special(BOS_TOKENS)

    def _first_special(self, names: Sequence[str]) -> Optional[int]:
        for n in names:
            if n in self._specials:
                return self._specials[n]
        return None

    def token_to_id(self, token: Union[str, bytes]) -> Optional[int]:
        """Id of a special token's text or of a mergeable token's bytes; None if absent."""
        return self._core.token_to_id(token.encode("utf-8") if isinstance(token, str) else bytes(token))

    def id_to_token_bytes(self, id: int) -> bytes:
        """The bytes token ``id`` decodes to; ValueError for an unknown id."""
        return self._core.id_to_token_bytes(id)

    def mergeable_ranks(self) -> dict[bytes, int]:
        """{token bytes: rank} as tiktoken takes them."""
        return {t: i for i, t in self._core.mergeable_tokens()}

    # ----- encoding -----

    def _policy(
        self, allowed_special: Specials, disallowed_special: Specials
    ) -> tuple[list[str], Optional[list[str]]]:
        allowed = list(self._specials) if allowed_special == "all" else list(allowed_special)
        if disallowed_special == "all":
            return allowed, None  # Rust: every special not allowed is disallowed
        return allowed, list(disallowed_special)

    def encode(
        self, text: str, allowed_special: Specials = (), disallowed_special: Specials = "all"
    ) -> list[int]:
        """Encode ``text`` with tiktoken's special-token rules: specials in ``allowed_special`` become
        their ids; finding one in ``disallowed_special`` (default: all others) raises ValueError;
        others are ordinary text.

        >>> tok = Tokenizer.from_tiktoken([bytes([b]) for b in range(256)], special_tokens=["<|eot|>"])
        >>> tok.encode("a<|eot|>", allowed_special={"<|eot|>"})
        [97, 256]
        >>> tok.encode("a<|eot|>", disallowed_special=())
        [97, 60, 124, 101, 111, 116, 124, 62]
        """
        allowed, disallowed = self._policy(allowed_special, disallowed_special)
        try:
            return self._core.encode(text, allowed, disallowed)
        except UnicodeEncodeError:
            return self._core.encode(_clean(text), allowed, disallowed)

    def encode_ordinary(self, text: str) -> list[int]:
        """Encode ignoring special tokens (their text is ordinary text)."""
        try:
            return self._core.encode_ordinary(text)
        except UnicodeEncodeError:
            return self._core.encode_ordinary(_clean(text))

    def encode_batch(
        self,
        texts: Sequence[str],
        num_threads: Optional[int] = None,
        allowed_special: Specials = (),
        disallowed_special: Specials = "all",
    ) -> list[list[int]]:
        """Encode many texts in parallel in Rust (GIL released); ``num_threads=None`` uses all cores.
        Results equal ``[encode(t) for t in texts]``."""
        _not_str(texts, "texts must be a sequence of str")
        allowed, disallowed = self._policy(allowed_special, disallowed_special)
        try:
            return self._core.encode_batch(list(texts), allowed, disallowed, num_threads)
        except UnicodeEncodeError:
            return self._core.encode_batch([_clean(t) for t in texts], allowed, disallowed, num_threads)

    def encode_ordinary_batch(
        self, texts: Sequence[str], num_threads: Optional[int] = None
    ) -> list[list[int]]:
        """``encode_batch`` ignoring special tokens."""
        _not_str(texts, "texts must be a sequence of str")
        try:
            return self._core.encode_ordinary_batch(list(texts), num_threads)
        except UnicodeEncodeError:
            return self._core.encode_ordinary_batch([_clean(t) for t in texts], num_threads)

    def encode_to_numpy(
        self, text: str, allowed_special: Specials = (), disallowed_special: Specials = "all"
    ) -> np.ndarray:
        """Like :meth:`encode`, returning a uint32 numpy array that owns the Rust buffer (no copy)."""
        allowed, disallowed = self._policy(allowed_special, disallowed_special)
        try:
            return self._core.encode_to_numpy(text, allowed, disallowed)
        except UnicodeEncodeError:
            return self._core.encode_to_numpy(_clean(text), allowed, disallowed)

    def pretokenize(self, text: str) -> list[str]:
        """The pieces the pattern splits ``text`` into, in order (special tokens not treated apart);
        text the pattern does not match is left out, as in encoding.

        >>> Tokenizer.from_tiktoken([bytes([b]) for b in range(256)]).pretokenize("Hi  there 12345")
        ['Hi', ' ', ' there', ' ', '123', '45']
        """
        if self._core.is_sentencepiece:
            raise ValueError("a SentencePiece model has no pretokenization pattern")
        return self._core.pretokenize(_clean(text))

    # ----- decoding -----

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        """The bytes of the tokens; ValueError naming an unknown id."""
        return self._core.decode_bytes(list(ids))

    def decode(self, ids: Iterable[int], errors: Literal["replace", "strict"] = "replace") -> str:
        """Decode to text. Token boundaries may split UTF-8 sequences: ``errors="replace"`` puts
        U+FFFD there, ``"strict"`` raises UnicodeDecodeError.

        >>> tok = Tokenizer.from_tiktoken([bytes([b]) for b in range(256)])
        >>> tok.decode([104, 105, 0xE2])
        'hi\\ufffd'
        """
        if errors not in ("replace", "strict"):
            raise ValueError(f"errors must be 'replace' or 'strict', got {errors!r}")
        return self.decode_bytes(ids).decode("utf-8", errors=errors)

    def decode_batch(
        self, batch: Iterable[Iterable[int]], errors: Literal["replace", "strict"] = "replace"
    ) -> list[str]:
        """``[decode(ids) for ids in batch]`` (tiktoken's name)."""
        return [self.decode(ids, errors=errors) for ids in batch]

    def decode_bytes_batch(self, batch: Iterable[Iterable[int]]) -> list[bytes]:
        """``[decode_bytes(ids) for ids in batch]`` (tiktoken's name)."""
        return [self.decode_bytes(ids) for ids in batch]

    def decode_tokens_bytes(self, ids: Iterable[int]) -> list[bytes]:
        """The bytes of each token, one entry per id (tiktoken's name)."""
        return [self.id_to_token_bytes(i) for i in ids]

    # ----- tiktoken's single-token helpers -----

    def encode_single_token(self, token: Union[str, bytes]) -> int:
        """The id of exactly one token (mergeable bytes or special text); KeyError if it is not one, as
        in tiktoken."""
        id = self.token_to_id(token)
        if id is None:
            raise KeyError(token)
        return id

    def decode_single_token_bytes(self, id: int) -> bytes:
        """The bytes of one token; KeyError for an unknown id, as in tiktoken."""
        try:
            return self.id_to_token_bytes(id)
        except ValueError:
            raise KeyError(id) from None

    def token_byte_values(self) -> list[bytes]:
        """The bytes of every mergeable token, sorted bytewise (as tiktoken returns them)."""
        return sorted(t for _, t in self._core.mergeable_tokens())

    @property
    def special_tokens_set(self) -> set[str]:
        return set(self._specials)

    @property
    def eot_token(self) -> Optional[int]:
        """tiktoken's name for :attr:`eos_token_id`."""
        return self.eos_token_id

    @property
    def max_token_value(self) -> int:
        """The largest id in use (tiktoken's name)."""
        return self.n_vocab - 1

    def __len__(self) -> int:
        return self.n_vocab

    def __repr__(self) -> str:
        kind = "sentencepiece" if self._core.is_sentencepiece else repr(self.pattern[:40])
        return f"Tokenizer(n_vocab={self.n_vocab}, pattern={kind}, special_tokens={len(self._specials)})"


def _from_native(text: str) -> Tokenizer:
    """Unpickle a :class:`Tokenizer` (module level so that pickle can name it)."""
    return Tokenizer(_core.CoreTokenizer.from_native(text, "<pickled tokenizer>"))
