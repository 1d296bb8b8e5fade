"""Training a 32k byte-level BPE vocabulary: tokenmill vs rustbpe vs tokenizers' BpeTrainer.

    python benches/bench_bpe_train.py [--vocab 32768] [--repeat 3] [--pattern llama3]

Corpus: every Python stdlib source file of this interpreter (tokenmill.corpus.stdlib_sources, about
11 MB on CPython 3.11), given to each trainer as the same list of str (one text per file), with the
same pre-tokenization regex (LLaMA-3's: it means the same in fancy-regex, Oniguruma and our DFA).
Each run is a fresh subprocess, so each trainer's peak RSS (VmHWM) is its own; "above base"
subtracts the RSS the process had with the corpus loaded, before training. Times are best-of-N wall
times of the training call alone; runs of the three trainers are interleaved to spread noise. CPU
seconds (user + system, all threads) are printed too: on a shared, loaded machine they move less
than wall times.

Asserted: tokenmill's tokens equal rustbpe's, in order. BpeTrainer breaks count ties with other ids
(see tests/test_bpe_train.py), so its merges are compared as a set (printed as the overlap).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from common import machine, today  # noqa: E402

TRAINERS = ("tokenmill", "rustbpe", "tokenizers")


def status_mib(field: str) -> float:
    """VmRSS (now) or VmHWM (peak) of this process. VmHWM rather than ru_maxrss, which a child
    started by fork inherits from its parent."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def worker(name: str, vocab: int, pattern_name: str) -> None:
    from tokenmill import corpus
    from tokenmill.tokenizer import pattern_string

    texts = [t for _, t in corpus.stdlib_sources()]
    pattern = pattern_string(pattern_name)
    base = status_mib("VmRSS")
    cpu0 = cpu_seconds()
    start = time.perf_counter()
    if name == "tokenmill":
        from tokenmill import _core

        tokens = _core.train_bpe(texts, vocab, pattern_name, [], 1, False, False)[0]
        merged = [t.hex() for t in tokens[256:]]
    elif name == "rustbpe":
        import rustbpe

        tok = rustbpe.Tokenizer()
        tok.train_from_iterator(texts, vocab, pattern=pattern)
        merged = [bytes(b).hex() for b, _ in sorted(tok.get_mergeable_ranks(), key=lambda x: x[1])[256:]]
    else:
        from tokenizers import Regex, Tokenizer, models, pre_tokenizers, trainers

        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
        trainer = trainers.BpeTrainer(
            vocab_size=vocab,
            min_frequency=1,
            show_progress=False,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        )
        tok.train_from_iterator(texts, trainer)
        seconds = time.perf_counter() - start
        cpu = cpu_seconds() - cpu0
        bs = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
        cs, n = bs[:], 0
        for b in range(256):
            if b not in bs:
                bs.append(b)
                cs.append(256 + n)
                n += 1
        char_byte = {chr(c): b for b, c in zip(bs, cs)}
        merges = json.loads(tok.to_str())["model"]["merges"]
        pairs = [m.split(" ") if isinstance(m, str) else m for m in merges]
        merged = [bytes(char_byte[c] for c in a + b).hex() for a, b in pairs]
    if name != "tokenizers":
        seconds = time.perf_counter() - start
        cpu = cpu_seconds() - cpu0
    peak = status_mib("VmHWM")
    mb = sum(len(t.encode()) for t in texts) / 1e6
    print(
        json.dumps(
            {
                "seconds": seconds,
                "cpu": cpu,
                "peak": peak,
                "base": base,
                "merged": merged,
                "mb": mb,
                "docs": len(texts),
            }
        )
    )


def run(name: str, args) -> dict:
    cmd = [sys.executable, __file__, "--worker", name, "--vocab", str(args.vocab), "--pattern", args.pattern]
    r = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(r.stdout)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--vocab", type=int, default=32768)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--pattern", default="llama3")
    ap.add_argument("--worker", choices=TRAINERS)
    args = ap.parse_args()
    if args.worker:
        worker(args.worker, args.vocab, args.pattern)
        return

    results: dict[str, list[dict]] = {name: [] for name in TRAINERS}
    for _ in range(args.repeat):
        for name in TRAINERS:
            results[name].append(run(name, args))
    first = results["tokenmill"][0]
    print(
        f"# bench_bpe_train: {args.vocab} vocab, pattern {args.pattern}, stdlib sources {first['mb']:.1f} MB "
        f"in {first['docs']} texts; best of {args.repeat}; {machine()}; {today()}"
    )
    ours = first["merged"]
    assert all(r["merged"] == ours for r in results["tokenmill"]), "tokenmill is not deterministic"
    assert results["rustbpe"][0]["merged"] == ours, "tokens differ from rustbpe's"
    hf = results["tokenizers"][0]["merged"]
    assert len(hf) == len(ours)
    overlap = len(set(hf) & set(ours)) / len(ours)

    best = {name: min(r["seconds"] for r in rs) for name, rs in results.items()}
    cpu = {name: min(r["cpu"] for r in rs) for name, rs in results.items()}
    peak = {name: min(r["peak"] for r in rs) for name, rs in results.items()}
    above = {name: min(r["peak"] - r["base"] for r in rs) for name, rs in results.items()}
    print(
        f"{'trainer':11} {'seconds':>8} {'speedup':>8} {'CPU s':>7} {'CPU ratio':>9} "
        f"{'peak RSS MiB':>13} {'above base':>11} {'mem ratio':>10}"
    )
    for name in TRAINERS:
        print(
            f"{name:11} {best[name]:8.2f} {best[name] / best['tokenmill']:7.2f}x {cpu[name]:7.2f} "
            f"{cpu[name] / cpu['tokenmill']:8.2f}x {peak[name]:13.0f} {above[name]:11.0f} "
            f"{peak['tokenmill'] / peak[name]:9.2f}x"
        )
    print(
        f"tokenmill vs rustbpe: {best['rustbpe'] / best['tokenmill']:.2f}x faster (goal >= 2x), identical tokens"
    )
    print(
        f"tokenmill vs tokenizers: {best['tokenizers'] / best['tokenmill']:.2f}x faster (goal >= 4x), "
        f"peak RSS {peak['tokenmill'] / peak['tokenizers']:.2f}x (goal <= 0.5x; above base "
        f"{above['tokenmill'] / above['tokenizers']:.2f}x), {overlap:.1%} of merges shared"
    )


if __name__ == "__main__":
    main()
