"""tokenmill.data.DataLoader vs a nanoGPT-style loader, side by side on the same token file.

    python benches/bench_loader.py [--batches 2000] [--repeat 3]

Token file: the Python standard library's sources, one document per file, byte-level ids plus an EOS
(uint16 MMIDIDX). B=8, T=2048. Prints:

1. tokens/s: nanoGPT's ``get_batch`` (np.memmap random windows, torch.from_numpy, torch.stack; inputs and
   labels only) vs tokenmill (concat packing, which also produces position ids restarting at document
   boundaries and cu_seqlens), with background prefetch and without;
2. host time per batch vs what one H100 training a LLaMA-1B needs (tokens/s required, margin);
3. resume at batch 1,000,000 vs at batch 10 (O(1)), vs fast-forwarding (replaying) to the same point.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from common import best_of, machine, today  # noqa: E402
from tokenmill import corpus  # noqa: E402
from tokenmill.data import DataLoader  # noqa: E402
from tokenmill.data.dataset import write_token_file  # noqa: E402
from tokenmill.model import LlamaConfig  # noqa: E402

B, T = 8, 2048
EOS = 256


def build_token_file(prefix: str) -> int:
    docs = [list(text.encode()) + [EOS] for _, text in corpus.stdlib_sources()]
    write_token_file(prefix, docs, dtype="uint16")
    return sum(map(len, docs))


def nanogpt_batches(bin_path: str, n: int, seed: int = 0) -> None:
    """nanoGPT train.py get_batch (CPU branch), verbatim apart from names."""
    torch.manual_seed(seed)
    for _ in range(n):
        # nanoGPT recreates the memmap every batch to avoid a memory leak.
        data = np.memmap(bin_path, dtype=np.uint16, mode="r")
        ix = torch.randint(len(data) - T, (B,))
        x = torch.stack([torch.from_numpy((data[i : i + T]).astype(np.int64)) for i in ix])
        y = torch.stack([torch.from_numpy((data[i + 1 : i + 1 + T]).astype(np.int64)) for i in ix])
        assert x.shape == y.shape == (B, T)


def tokenmill_batches(prefix: str, n: int, prefetch: int, packing: str = "concat") -> None:
    loader = DataLoader(
        prefix, seq_len=T, batch_size=B, packing=packing, seed=0, prefetch=prefetch, num_threads=2
    )
    got = 0
    for b in loader:
        assert b["input_ids"].shape == (B, T) and b["cu_seqlens"][-1] == B * T
        got += 1
        if got == n:
            break


def busy_consumer(prefix: str, n: int, prefetch: int, step_s: float) -> float:
    """Seconds per batch the training loop waits for data while a simulated GPU step of `step_s`
    (sleep: the GIL is free, as during CUDA work) runs between batches."""
    loader = DataLoader(prefix, seq_len=T, batch_size=B, seed=0, prefetch=prefetch, num_threads=2)
    it = iter(loader)
    next(it)
    waited = 0.0
    for _ in range(n):
        t = time.perf_counter()
        next(it)
        waited += time.perf_counter() - t
        time.sleep(step_s)
    return waited / n


def h100_tokens_per_s(mfu: float = 0.6, peak_tflops: float = 989.0) -> tuple[float, int]:
    """Tokens/s one H100 (dense BF16 peak 989 TFLOP/s) consumes training LLaMA-1B at `mfu`, with FLOPs
    per token counted as the planner and the trainer count them (`plan.flops_per_token`)."""
    from tokenmill import plan

    cfg = LlamaConfig.preset("llama-1b")
    return peak_tflops * 1e12 * mfu / plan.flops_per_token(cfg, T), cfg.num_params()


def resume_time(prefix: str, batch: int) -> float:
    """Build a loader, load a state at global batch `batch`, take one batch."""

    def run() -> None:
        loader = DataLoader(prefix, seq_len=T, batch_size=B, seed=0, prefetch=0)
        state = loader.state_dict()
        state["sample_index"] = batch * B
        loader.load_state_dict(state)
        next(iter(loader))

    return best_of(run, 5)[0]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", type=int, default=2000)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    n, rep = args.batches, args.repeat
    with tempfile.TemporaryDirectory() as d:
        prefix = f"{d}/stdlib"
        total = build_token_file(prefix)
        print(f"token file: {total:,} tokens, uint16; B={B} T={T}; {n} batches per run, best of {rep}")
        tok = n * B * T
        t_nano = best_of(lambda: nanogpt_batches(prefix + ".bin", n), rep)[0]
        t_pre = best_of(lambda: tokenmill_batches(prefix, n, prefetch=2), rep)[0]
        t_sync = best_of(lambda: tokenmill_batches(prefix, n, prefetch=0), rep)[0]
        t_bf = best_of(lambda: tokenmill_batches(prefix, n, prefetch=0, packing="best_fit"), rep)[0]
        rows = [
            ("nanoGPT get_batch (x, y only)", t_nano),
            ("tokenmill concat, prefetch=2", t_pre),
            ("tokenmill concat, prefetch=0", t_sync),
            ("tokenmill best_fit, prefetch=0", t_bf),
        ]
        for name, t in rows:
            print(
                f"{name:34s} {tok / t / 1e6:8.2f} M tokens/s  {t / n * 1e6:8.1f} us/batch  {t_nano / t:5.2f}x nanoGPT"
            )

        step = 0.002
        w_sync = min(busy_consumer(prefix, 300, 0, step) for _ in range(rep))
        w_pre = min(busy_consumer(prefix, 300, 2, step) for _ in range(rep))
        print(
            f"\nwith a {step * 1e3:.0f} ms training step between batches, the loop waits per batch: "
            f"{w_sync * 1e6:.0f} us rendering on demand, {w_pre * 1e6:.0f} us with prefetch=2"
        )

        need, params = h100_tokens_per_s()
        host = t_sync / n
        print(
            f"\nH100 training LLaMA-1B ({params / 1e9:.2f}B params, 60% MFU of 989 TFLOP/s) consumes "
            f"{need:,.0f} tokens/s = one {B}x{T} batch every {B * T / need * 1e3:.1f} ms"
        )
        print(
            f"tokenmill host time per batch (rendered on demand, 2 threads): {host * 1e3:.3f} ms "
            f"-> {B * T / host:,.0f} tokens/s, margin {B * T / host / need:.0f}x"
        )

        r10 = resume_time(prefix, 10)
        r1m = resume_time(prefix, 1_000_000)
        ff_n = 200
        t_ff = best_of(lambda: tokenmill_batches(prefix, ff_n, prefetch=0), rep)[0]
        ff_1m = t_ff / ff_n * 1_000_000
        print(
            f"\nresume (construct + load_state_dict + first batch): batch 10 {r10 * 1e3:.2f} ms, "
            f"batch 1,000,000 {r1m * 1e3:.2f} ms (ratio {r1m / r10:.2f})"
        )
        print(
            f"fast-forwarding to batch 1,000,000 (replay, measured over {ff_n} batches): {ff_1m:,.0f} s "
            f"-> direct resume is {ff_1m / r1m:,.0f}x faster"
        )
        print(f"\n{today()} | {machine()} | torch {torch.__version__}")


if __name__ == "__main__":
    main()
