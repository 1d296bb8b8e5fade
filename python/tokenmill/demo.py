"""``make demo`` / ``tokenmill demo``: tokenmill end to end on built-in data, in a few minutes on a laptop CPU.

1. trains a byte-level BPE tokenizer on Python's own stdlib (sources + docstrings: no download);
2. prepares Megatron-compatible token files (train / validation split by source file);
3. trains a small LLaMA with ``tokenmill.train`` until the validation loss has clearly fallen;
4. samples from the trained model, writes the loss-curve PNG;
5. prints what the same recipe would cost for LLaMA-13B (``tokenmill.plan``).

With a CUDA GPU it trains a larger model there (and the CuPy kernels run); on CPU it stays small.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import tempfile
import time
from pathlib import Path

from tokenmill import corpus
from tokenmill import eval as ev


def _corpus_files(root: Path, max_bytes: int) -> tuple[list[Path], list[Path]]:
    """Write the stdlib corpus as JSONL files (one document per source file or docstring group);
    every 20th source goes to validation."""
    train, val = root / "train.jsonl", root / "val.jsonl"
    n = 0
    with open(train, "w") as ft, open(val, "w") as fv:
        for i, (_, text) in enumerate(corpus.stdlib_sources(max_bytes=max_bytes)):
            (fv if i % 20 == 19 else ft).write(json.dumps({"text": text}) + "\n")
            n += len(text)
    return [train], [val]


def _texts(path: Path):
    with open(path) as f:
        for line in f:
            yield json.loads(line)["text"]


def main(args: argparse.Namespace | None = None) -> int:
    import torch

    import tokenmill as tm
    from tokenmill import train as T
    from tokenmill.model import Llama, generate

    steps = getattr(args, "steps", None)
    out = Path(getattr(args, "out", None) or "demo-out")
    gpu = torch.cuda.is_available()
    t0 = time.perf_counter()
    # A one-line sanity check of the Rust WER (the first demo of this package).
    assert ev.wer("the cat sat on the mat", "the cat sat on mat") == 1 / 6

    # 1. tokenizer ------------------------------------------------------------------------------------------
    work = Path(tempfile.mkdtemp(prefix="tokenmill-demo-"))
    out.mkdir(parents=True, exist_ok=True)
    max_bytes = 24_000_000 if gpu else 6_000_000
    train_files, val_files = _corpus_files(work, max_bytes)
    vocab = 8192 if gpu else 2048
    t = time.perf_counter()
    tok = tm.Tokenizer.train(
        _texts(train_files[0]), vocab_size=vocab, pattern="gpt2", special_tokens=["<|endoftext|>"]
    )
    tok_path = out / "tokenizer.json"
    tok.save_huggingface(str(tok_path))
    sample = "def mean(values):\n    return sum(values) / len(values)\n"
    n_ids = len(tok.encode(sample))
    print(
        f"[1/5] tokenizer: {tok.n_vocab} tokens trained on {sum(f.stat().st_size for f in train_files) / 1e6:.1f} MB "
        f"of stdlib sources in {time.perf_counter() - t:.1f}s; {len(sample)} chars -> {n_ids} tokens",
        flush=True,
    )

    # 2. token files ----------------------------------------------------------------------------------------
    t = time.perf_counter()
    prefixes = {}
    for split, files in (("train", train_files), ("val", val_files)):
        m = tm.data.prepare(files, str(work / split), str(tok_path))
        prefixes[split] = str(work / split)
        n_tok = m.get("tokens", m.get("num_tokens", "?"))
        print(
            f"[2/5] prepared {split}: {m.get('documents', m.get('num_documents', '?'))} documents, {n_tok} tokens",
            flush=True,
        )
    print(f"      ({time.perf_counter() - t:.1f}s)", flush=True)

    # 3. training -------------------------------------------------------------------------------------------
    if gpu:
        shape = ["--model.dim=512", "--model.n_layers=8", "--model.n_heads=8", "--model.n_kv_heads=4"]
        seq, batch, n_steps, lr = 512, 32, steps or 600, 2e-3
    else:
        shape = ["--model.dim=128", "--model.n_layers=4", "--model.n_heads=4", "--model.n_kv_heads=2"]
        seq, batch, n_steps, lr = 128, 16, steps or 150, 3e-3
    overrides = [
        f"--run.out_dir={out / 'run'}",
        "--model.preset=small",
        *shape,
        f"--model.max_seq_len={seq}",
        f"--data.train=['{prefixes['train']}']",
        f"--data.val=['{prefixes['val']}']",
        f"--data.tokenizer={tok_path}",
        f"--data.seq_len={seq}",
        f"--data.batch_size={batch}",
        f"--optim.lr={lr}",
        f"--optim.min_lr={lr / 10}",
        "--optim.warmup_steps=20",
        "--optim.weight_decay=0.1",
        f"--train.steps={n_steps}",
        f"--train.log_every={10}",
        f"--train.eval_every={max(1, n_steps // 5)}",
        "--train.eval_batches=4",
    ]
    cfg = T.load_config(None, overrides)
    mc = cfg.model_config(vocab_size=tok.n_vocab)
    print(
        f"[3/5] training a {mc.num_params() / 1e6:.2f}M-parameter LLaMA ({mc.n_layers} layers, dim {mc.dim}, "
        f"GQA {mc.n_heads}/{mc.kv_heads}) for {n_steps} steps of {batch} x {seq} tokens on "
        f"{'GPU' if gpu else 'CPU'}",
        flush=True,
    )
    history = T.train(cfg)
    vals = [h["val_loss"] for h in history if "val_loss" in h]
    logged = [h for h in history if "tokens_per_s" in h]
    tps = sorted(h["tokens_per_s"] for h in logged[1:] or logged)[len(logged[1:] or logged) // 2]
    print(
        f"      validation loss {vals[0]:.3f} -> {vals[-1]:.3f} nats/token (uniform would be "
        f"{math.log(tok.n_vocab):.2f}); median {tps:,.0f} tokens/s",
        flush=True,
    )
    if not vals[-1] < vals[0] - 0.3:
        print("      WARNING: the validation loss did not fall clearly", flush=True)

    # 4. samples --------------------------------------------------------------------------------------------
    from tokenmill.checkpoint import latest_checkpoint

    ckpt = latest_checkpoint(str(out / "run"))
    if ckpt is None:
        raise RuntimeError(f"{out / 'run'}: training wrote no checkpoint")
    model = Llama.from_checkpoint(ckpt)
    g = torch.Generator().manual_seed(0)
    print(f"[4/5] samples from {ckpt} (temperature 0.8, top-k 40):", flush=True)
    for prompt in ("def ", "import os\n", '"""Return the'):
        ids = torch.tensor(tok.encode(prompt))
        outp = generate(model, ids, 48, temperature=0.8, top_k=40, generator=g)
        text = tok.decode(outp.tolist())
        print("      | " + text.replace("\n", "\n      | "), flush=True)
    png = out / "run" / "loss.png"
    curve = f"loss curve: {png}" if png.exists() else "no loss curve (matplotlib is not installed)"
    print(f"      {curve}; log: {out / 'run' / 'log.jsonl'}", flush=True)

    # 5. the same recipe at 13B -----------------------------------------------------------------------------
    try:
        from tokenmill import plan

        e = plan.estimate(
            "llama-13b",
            tokens="chinchilla",
            gpu="h100",
            gpus=64,
            seq_len=2048,
            checkpointing=True,
            fused_loss=True,
        )
        print(
            f"[5/5] the same recipe for LLaMA-13B ({e.n_params / 1e9:.1f}B params) on {e.tokens / 1e9:.0f}B tokens "
            f"(Chinchilla), 64 x {e.gpu} at {e.mfu:.0%} MFU: {e.gpu_hours:,.0f} GPU-hours, {e.days:.1f} days, "
            f"${e.usd:,.0f} at ${e.usd_per_gpu_hour:.2f}/GPU-hour; fits in memory: {e.fits}",
            flush=True,
        )
    except ImportError:
        print("[5/5] (planner not available)")
    print(f"done in {time.perf_counter() - t0:.0f}s", flush=True)
    if os.environ.get("TOKENMILL_DEMO_KEEP") is None:
        import shutil

        shutil.rmtree(work, ignore_errors=True)
    return 0
