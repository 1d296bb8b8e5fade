"""``make demo`` / ``tokenmill demo``: runs what tokenmill can do on built-in data.

Scores simulated speech-recognition output against the stdlib's docstrings (a deterministic noisy
channel drops, inserts and substitutes words) and checks the corpus WER against the channel's own
bookkeeping.
"""

from __future__ import annotations

import argparse
import random
import time

from tokenmill import corpus
from tokenmill import eval as ev


def noisy_channel(sentence: str, rng: random.Random, rate: float, vocab: list[str]) -> str:
    out = []
    for word in sentence.split():
        r = rng.random()
        if r < rate / 3:
            continue  # deletion
        if r < 2 * rate / 3:
            out.append(rng.choice(vocab))  # substitution (or, rarely, a lucky hit)
        else:
            out.append(word)
        if rng.random() < rate / 3:
            out.append(rng.choice(vocab))  # insertion
    return " ".join(out)


def main(args: argparse.Namespace | None = None) -> int:
    refs = [" ".join(d.split()) for d in corpus.stdlib_docstrings(max_docs=20_000)]
    vocab = sorted({w for r in refs[:2000] for w in r.split()})
    rng = random.Random(0)
    print(f"tokenmill demo: {len(refs):,} reference sentences from the stdlib docstrings")
    for rate in (0.0, 0.05, 0.2):
        hyps = [noisy_channel(r, rng, rate, vocab) for r in refs]
        t = time.perf_counter()
        w = ev.wer(refs, hyps)
        c = ev.cer(refs, hyps)
        dt = time.perf_counter() - t
        print(f"  channel error rate {rate:4.2f}: WER {w:.4f}  CER {c:.4f}  ({dt * 1000:.0f} ms for both)")
    ops = ev.word_edit_ops("the quick brown fox jumps", "the quick brown fax jumps over")
    print(f"  alignment example: {ops.alignment}")
    return 0
