"""Corpus-level WER and CER on 100k sentence pairs: tokenmill vs jiwer, side by side, same inputs.

    python benches/bench_wer.py [--pairs 100000]

Prints throughput of each and the ratio; asserts both give the same numbers.
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import jiwer  # noqa: E402
import tokenmill as tm  # noqa: E402
from common import best_of, machine, today  # noqa: E402
from tokenmill import corpus  # noqa: E402
from tokenmill.demo import noisy_channel  # noqa: E402


def make_pairs(n: int) -> tuple[list[str], list[str]]:
    words = " ".join(corpus.stdlib_docstrings(max_docs=5000)).split()
    vocab = sorted(set(words[:50_000]))
    rng = random.Random(0)
    refs, hyps = [], []
    for _ in range(n):
        start = rng.randrange(len(words) - 40)
        ref = " ".join(words[start : start + rng.randint(5, 30)])
        refs.append(ref)
        hyps.append(noisy_channel(ref, rng, 0.15, vocab))
    return refs, hyps


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pairs", type=int, default=100_000)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    refs, hyps = make_pairs(args.pairs)
    print(
        f"# bench_wer: {args.pairs:,} pairs, {sum(len(r.split()) for r in refs):,} reference words; {machine()}; {today()}"
    )
    rows = []
    for metric, ours, theirs in (("WER", tm.eval.wer, jiwer.wer), ("CER", tm.eval.cer, jiwer.cer)):
        t_ours, v_ours = best_of(lambda f=ours: f(refs, hyps), args.repeat)
        t_jiwer, v_jiwer = best_of(lambda f=theirs: f(refs, hyps), args.repeat)
        assert abs(v_ours - v_jiwer) < 1e-12, (metric, v_ours, v_jiwer)
        rows.append((metric, v_ours, args.pairs / t_ours, args.pairs / t_jiwer, t_jiwer / t_ours))
    print(f"{'metric':6} {'value':>8} {'tokenmill pairs/s':>18} {'jiwer pairs/s':>14} {'ratio':>7}")
    for metric, v, ours, theirs, ratio in rows:
        print(f"{metric:6} {v:8.5f} {ours:18,.0f} {theirs:14,.0f} {ratio:6.1f}x")


if __name__ == "__main__":
    main()
