"""Evaluation metrics: word and character error rates (Rust core), perplexity and bits per byte.

Splitting follows jiwer's defaults, so numbers agree with ``jiwer.wer`` / ``jiwer.cer``:

* words: runs of two or more whitespace characters count as one space, the ends are stripped, and
  the text is split on spaces;
* characters: the stripped text, one per Unicode code point (spaces count).

Error rates are corpus-level: total edits over total reference units, so a list of pairs is not the
mean of per-pair rates. WER can exceed 1.0 (insertions).

Normalisation is off by default; each flag is applied to both sides before splitting:

* ``lowercase``: ``str.casefold()`` (full Unicode case folding: "Straße" == "STRASSE");
* ``remove_punctuation``: drop every character of Unicode category P* (as jiwer.RemovePunctuation);
* ``collapse_whitespace``: any whitespace run (tabs and newlines included) separates words.

>>> wer("the cat sat on the mat", "the cat sit on mat")
0.3333333333333333
>>> cer("kitten", "sitting")
0.5
"""

from __future__ import annotations

import sys
import unicodedata
from dataclasses import dataclass
from functools import lru_cache
from typing import Sequence, Union

from tokenmill import _core

Texts = Union[str, Sequence[str]]

__all__ = [
    "EditOps",
    "bits_per_byte",
    "cer",
    "char_edit_ops",
    "levenshtein",
    "perplexity",
    "wer",
    "word_edit_ops",
]


@dataclass(frozen=True)
class EditOps:
    """Counts and alignment of one comparison.

    ``alignment`` lists, per aligned position, ``(op, ref_index, hyp_index)`` with op one of
    "equal", "substitute", "delete", "insert" (indices into ``reference`` / ``hypothesis``; None where
    the op has no token on that side). For a list of pairs it is a list of such lists.
    """

    hits: int
    substitutions: int
    deletions: int
    insertions: int
    reference: list
    hypothesis: list
    alignment: list

    @property
    def errors(self) -> int:
        return self.substitutions + self.deletions + self.insertions


@lru_cache(maxsize=1)
def _punctuation_table() -> dict:
    return {cp: None for cp in range(sys.maxunicode + 1) if unicodedata.category(chr(cp)).startswith("P")}


def _normalize(text: str, lowercase: bool, remove_punctuation: bool, collapse_whitespace: bool) -> str:
    if not isinstance(text, str):
        raise TypeError(f"expected str, got {type(text).__name__}")
    if lowercase:
        text = text.casefold()
    if remove_punctuation:
        text = text.translate(_punctuation_table())
    if collapse_whitespace:
        text = " ".join(text.split())
    return text


def _as_lists(reference: Texts, hypothesis: Texts, flags: tuple) -> tuple[list, list]:
    refs = [reference] if isinstance(reference, str) else list(reference)
    hyps = [hypothesis] if isinstance(hypothesis, str) else list(hypothesis)
    if len(refs) != len(hyps):
        raise ValueError(
            f"reference and hypothesis must have the same number of sentences: {len(refs)} != {len(hyps)}"
        )
    if any(flags):
        refs = [_normalize(t, *flags) for t in refs]
        hyps = [_normalize(t, *flags) for t in hyps]
    else:
        for side, texts in (("reference", refs), ("hypothesis", hyps)):
            for i, t in enumerate(texts):
                if not isinstance(t, str):
                    raise TypeError(f"{side}[{i}] is {type(t).__name__}, expected str")
    return refs, hyps


def _rate(unit: str, reference: Texts, hypothesis: Texts, flags: tuple) -> float:
    refs, hyps = _as_lists(reference, hypothesis, flags)
    counts = _core.edit_counts(refs, hyps, unit)
    return _core.error_rate(counts, unit)


def wer(
    reference: Texts,
    hypothesis: Texts,
    *,
    lowercase: bool = False,
    remove_punctuation: bool = False,
    collapse_whitespace: bool = False,
) -> float:
    """Word error rate (S + D + I) / N over one pair or a corpus (lists of equal length).

    Raises ValueError when the lists differ in length, or when the whole reference side has no words
    but the hypothesis side has some (the rate is undefined; both empty gives 0.0).
    """
    return _rate("word", reference, hypothesis, (lowercase, remove_punctuation, collapse_whitespace))


def cer(
    reference: Texts,
    hypothesis: Texts,
    *,
    lowercase: bool = False,
    remove_punctuation: bool = False,
    collapse_whitespace: bool = False,
) -> float:
    """Character error rate over Unicode code points; same conventions as :func:`wer`."""
    return _rate("char", reference, hypothesis, (lowercase, remove_punctuation, collapse_whitespace))


def _edit_ops(unit: str, reference: Texts, hypothesis: Texts, flags: tuple) -> EditOps:
    single = isinstance(reference, str) and isinstance(hypothesis, str)
    refs, hyps = _as_lists(reference, hypothesis, flags)
    aligned = [_core.align(r, h, unit) for r, h in zip(refs, hyps)]
    counts = _core.edit_counts(refs, hyps, unit)
    ref_tokens: list
    hyp_tokens: list
    alignment: list
    if single:
        ref_tokens, hyp_tokens, alignment = aligned[0]
    else:
        ref_tokens = [a[0] for a in aligned]
        hyp_tokens = [a[1] for a in aligned]
        alignment = [a[2] for a in aligned]
    return EditOps(*counts, reference=ref_tokens, hypothesis=hyp_tokens, alignment=alignment)


def word_edit_ops(
    reference: Texts,
    hypothesis: Texts,
    *,
    lowercase: bool = False,
    remove_punctuation: bool = False,
    collapse_whitespace: bool = False,
) -> EditOps:
    """Hits, substitutions, deletions, insertions and the word alignment.

    >>> ops = word_edit_ops("a b c", "a x c d")
    >>> (ops.hits, ops.substitutions, ops.deletions, ops.insertions)
    (2, 1, 0, 1)
    >>> ops.alignment
    [('equal', 0, 0), ('substitute', 1, 1), ('equal', 2, 2), ('insert', None, 3)]
    """
    return _edit_ops("word", reference, hypothesis, (lowercase, remove_punctuation, collapse_whitespace))


def char_edit_ops(
    reference: Texts,
    hypothesis: Texts,
    *,
    lowercase: bool = False,
    remove_punctuation: bool = False,
    collapse_whitespace: bool = False,
) -> EditOps:
    """Like :func:`word_edit_ops` over characters."""
    return _edit_ops("char", reference, hypothesis, (lowercase, remove_punctuation, collapse_whitespace))


def levenshtein(a: Sequence[int], b: Sequence[int]) -> int:
    """Edit distance between two sequences of token ids (unit costs)."""
    return _core.levenshtein(list(a), list(b))


def perplexity(model, batches, max_batches: int | None = None) -> dict:
    """Token-level perplexity of a causal LM over batches of ``{"input_ids", "labels"[, "position_ids"]}``
    (what ``tm.data.DataLoader`` yields; labels of -100 are not scored).

    ``model(input_ids, labels, position_ids, reduction="sum")`` must return the summed cross-entropy in
    nats, as ``tm.model.Llama`` does. Returns ``{"loss": nats/token, "perplexity": exp(loss),
    "bits_per_token": loss / ln 2, "tokens": scored tokens}``; accumulated in float64.
    """
    import math

    import torch

    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    try:
        with torch.no_grad():
            for i, b in enumerate(batches):
                if max_batches is not None and i >= max_batches:
                    break
                labels = b["labels"].to(device)
                pos = b.get("position_ids")
                loss_sum = model(
                    b["input_ids"].to(device),
                    labels,
                    None if pos is None else pos.to(device),
                    reduction="sum",
                )
                total += float(loss_sum.double())
                count += int((labels != -100).sum())
    finally:
        model.train(was_training)
    if count == 0:
        raise ValueError("no scored tokens in the batches (every label is -100, or no batch)")
    loss = total / count
    return {"loss": loss, "perplexity": math.exp(loss), "bits_per_token": loss / math.log(2), "tokens": count}


def bits_per_byte(loss_nats_per_token: float, tokens: int, text_bytes: int) -> float:
    """Tokenizer-independent compression: total bits over the UTF-8 bytes of the text they encode."""
    import math

    if text_bytes <= 0 or tokens < 0:
        raise ValueError(f"need text_bytes > 0 and tokens >= 0, got {text_bytes} and {tokens}")
    return loss_nats_per_token * tokens / math.log(2) / text_bytes
