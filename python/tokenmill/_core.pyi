"""Type stubs for the compiled extension tokenmill._core (Rust, PyO3)."""

import os
from typing import Iterable, Literal, Optional, Sequence, Union

__version__: str

_Unit = Literal["word", "char"]
_Counts = tuple[int, int, int, int]

def edit_counts(references: Sequence[str], hypotheses: Sequence[str], unit_name: _Unit) -> _Counts:
    """Corpus-level (hits, substitutions, deletions, insertions); parallel, GIL released."""

def error_rate(counts: _Counts, unit_name: _Unit) -> float:
    """(S + D + I) / (H + S + D); ValueError when the reference side is empty and the hypothesis is not."""

def align(
    reference: str, hypothesis: str, unit_name: _Unit
) -> tuple[list[str], list[str], list[tuple[str, Optional[int], Optional[int]]]]:
    """Tokens of both sides and the alignment as (op, reference index, hypothesis index)."""

def levenshtein(a: Sequence[int], b: Sequence[int]) -> int:
    """Unit-cost edit distance between two id sequences."""

def train_bpe(
    texts: Iterable[str],
    vocab_size: int,
    pattern: str,
    special_tokens: Sequence[str],
    min_frequency: int,
    show_progress: bool,
) -> list[bytes]:
    """Byte-level BPE training; the mergeable tokens in id order (ids 0..255 are the bytes).

    ``vocab_size`` counts the special tokens: ``len(result) == vocab_size - len(special_tokens)``
    unless no pair occurring ``min_frequency`` times is left. Texts are pulled in chunks and
    counted in parallel without the GIL; special tokens are cut out of the text, never learned.
    """

def train_bpe_files(
    paths: Sequence[Union[str, os.PathLike[str]]],
    vocab_size: int,
    pattern: str,
    special_tokens: Sequence[str],
    min_frequency: int,
    show_progress: bool,
) -> list[bytes]:
    """As ``train_bpe`` with each UTF-8 file one text, read and counted in Rust (streaming, parallel).

    FileNotFoundError names a missing file; ValueError names a file that is not UTF-8 and the byte offset.
    """
