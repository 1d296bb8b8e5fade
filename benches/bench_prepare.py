"""Corpus preparation throughput: tokenmill prepare vs the ecosystem's usual pipeline, side by side.

    python benches/bench_prepare.py [--corpus sources|docstrings] [--mb 16] [--vocab 32000] [--repeat 3]

Corpus: Python stdlib sources (default) or docstrings (tokenmill.corpus), one JSON line per document. Vocabulary: a byte-level BPE
trained by Hugging Face `tokenizers` on part of that corpus; its vocabulary, mapped back from HF's
byte-to-unicode alphabet to bytes, is loaded into tokenmill with `Tokenizer.from_tiktoken` (ids =
ranks, GPT-2 pattern), so both sides encode with the same vocabulary; the bench checks that both
pipelines write identical files.

* baseline: read the JSON lines in Python, Hugging Face `tokenizers` `encode_batch` (1,000 documents
  per call, its own Rust thread pool), megatron-core `IndexedDatasetBuilder.add_document` per
  document, `finalize` (what Megatron-LM's preprocess_data.py does, with batched HF encoding);
* tokenmill: `tm.data.prepare(jsonl, prefix, tokenizer)` (Rust reader + rayon + MMIDIDX writer);
* raw: tokenmill `Tokenizer.encode_batch` on the texts already in memory (the ceiling of prepare).

Prints MB/s of input for each, the ratios, and whether both pipelines wrote identical token files.
Goals (2 cores): prepare >= 5x baseline, prepare >= 0.8x raw encode_batch.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import numpy as np  # noqa: E402
import tokenmill as tm  # noqa: E402
from common import best_of, machine, today  # noqa: E402

EOS = "<|endoftext|>"


def build_corpus(path: Path, max_mb: float, kind: str) -> list[str]:
    if kind == "sources":
        # Empty files are left out: prepare skips (and counts) empty documents, the baseline would not.
        texts = [text for _, text in tm.corpus.stdlib_sources(max_bytes=int(max_mb * 1e6)) if text]
    else:
        # All stdlib docstrings make only ~1.6 MB: cycle through them up to the requested size.
        docs = list(tm.corpus.stdlib_docstrings())
        texts, size = [], 0
        while size < max_mb * 1e6:
            doc = docs[len(texts) % len(docs)]
            texts.append(doc)
            size += len(doc.encode())
    with open(path, "w", encoding="utf-8") as f:
        for t in texts:
            f.write(json.dumps({"text": t}) + "\n")
    return texts


def train_vocab(texts: list[str], vocab: int, out: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    hf = Tokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab, special_tokens=[], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    hf.train_from_iterator(texts, trainer)
    hf.add_special_tokens([EOS])  # after the mergeable tokens, as tiktoken numbers specials
    hf.save(str(out))
    return hf


def hf_to_tokenmill(hf):
    """The same vocabulary as tiktoken ranks: HF ids in merge order are the ranks."""
    # GPT-2's byte <-> printable-unicode table, as HF's ByteLevel uses it.
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    unicode_to_byte = {chr(c): b for b, c in zip(bs, cs)}
    eos = hf.token_to_id(EOS)
    tokens = [bytes(unicode_to_byte[ch] for ch in hf.id_to_token(i)) for i in range(eos)]
    return tm.Tokenizer.from_tiktoken(tokens, pattern="gpt2", special_tokens={EOS: eos})


def baseline(hf, jsonl: Path, prefix: Path, eos: int) -> None:
    from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder

    dtype = DType.optimal_dtype(hf.get_vocab_size())
    builder = IndexedDatasetBuilder(f"{prefix}.bin", dtype=dtype)

    def flush(batch):
        for enc in hf.encode_batch(batch, add_special_tokens=False):
            ids = enc.ids + [eos]
            builder.add_document(np.array(ids, dtype=dtype), [len(ids)])

    batch = []
    with open(jsonl, encoding="utf-8") as f:
        for line in f:
            batch.append(json.loads(line)["text"])
            if len(batch) == 1000:
                flush(batch)
                batch = []
    if batch:
        flush(batch)
    builder.finalize(f"{prefix}.idx")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mb", type=float, default=16.0, help="corpus size (MB of stdlib sources)")
    ap.add_argument("--vocab", type=int, default=32_000)
    ap.add_argument("--corpus", choices=["sources", "docstrings"], default="sources")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        jsonl = d / "corpus.jsonl"
        texts = build_corpus(jsonl, args.mb, args.corpus)
        mb = sum(len(t.encode()) for t in texts) / 1e6
        hf = train_vocab(texts, args.vocab, d / "tokenizer.json")
        tok = hf_to_tokenmill(hf)
        eos = tok.special_tokens[EOS]
        assert hf.token_to_id(EOS) == eos
        print(
            f"# bench_prepare: stdlib {args.corpus}, {len(texts):,} documents, {mb:.1f} MB, vocab {tok.n_vocab:,}; {machine()}; {today()}"
        )

        t_base, _ = best_of(lambda: baseline(hf, jsonl, d / "base", eos), args.repeat)
        t_ours, _ = best_of(lambda: tm.data.prepare(jsonl, d / "ours", tok, progress=False), args.repeat)
        t_raw, _ = best_of(lambda: tok.encode_batch(texts), args.repeat)
        t_hf, _ = best_of(lambda: hf.encode_batch(texts, add_special_tokens=False), args.repeat)
        same = all(
            Path(f"{d}/base{s}").read_bytes() == Path(f"{d}/ours{s}").read_bytes() for s in (".bin", ".idx")
        )
        rows = [
            ("baseline: HF tokenizers encode_batch + megatron IndexedDatasetBuilder", t_base),
            ("tokenmill prepare", t_ours),
            ("tokenmill Tokenizer.encode_batch (in memory, no I/O)", t_raw),
            ("HF tokenizers encode_batch alone (in memory, no I/O)", t_hf),
        ]
        for name, t in rows:
            print(f"{name:72} {mb / t:8.2f} MB/s  ({t:.2f} s)")
        print(f"prepare vs baseline: {t_base / t_ours:.2f}x (goal >= 5x)")
        print(f"prepare vs raw encode_batch: {t_raw / t_ours:.2f}x (goal >= 0.8x)")
        print(f"identical .bin/.idx from both pipelines: {same}")


if __name__ == "__main__":
    main()
