"""Type stubs for the compiled extension tokenmill._core (Rust, PyO3)."""

from typing import Literal, Optional, Sequence

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
