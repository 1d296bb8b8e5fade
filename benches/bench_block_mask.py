"""The document BlockMask of one packed batch: tokenmill.model.document_block_mask (from each block's first
and last document, O((T / 128)^2) per row) vs torch's create_block_mask over the same mask_mod (which
evaluates all T x T pairs; compiled, as flex_attention's documentation advises on CUDA, eager on CPU).
Both are checked equal before timing. Runs once per forward, shared by every layer.

    python benches/bench_block_mask.py [--device cpu|cuda] [--batch 2] [--seqs 2048,8192] [--repeat 5]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import torch  # noqa: E402
from common import machine, today  # noqa: E402
from tokenmill.model import _document_ids, document_block_mask  # noqa: E402
from torch.nn.attention.flex_attention import create_block_mask  # noqa: E402


def packed_positions(batch: int, seq: int, seed: int = 0) -> torch.Tensor:
    """Rows of documents with lengths drawn like code files: log-uniform from 16 to 4096 tokens."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(batch):
        pos: list[int] = []
        while len(pos) < seq:
            n = int(2 ** (4 + 8 * torch.rand((), generator=g).item()))
            pos += range(n)
        rows.append(pos[:seq])
    return torch.tensor(rows)


def timed(fn, device: str, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        if device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return best


def compare(seq: int, batch: int, device: str, repeat: int, peer) -> tuple[float, float]:
    """(ours, peer) best seconds for one packed batch of ``seq``, after checking the two masks agree."""
    pos = packed_positions(batch, seq).to(device)
    doc = _document_ids(pos)

    def mask_mod(b, h, q, k):
        return (doc[b, q] == doc[b, k]) & (q >= k)

    def ref():
        return peer(mask_mod, batch, None, seq, seq, device=device)

    ours, theirs = document_block_mask(pos), ref()
    assert torch.equal(ours.kv_num_blocks, theirs.kv_num_blocks)
    assert torch.equal(ours.full_kv_num_blocks, theirs.full_kv_num_blocks)
    return timed(lambda: document_block_mask(pos), device, repeat), timed(ref, device, repeat)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seqs", default="2048,8192")
    p.add_argument("--repeat", type=int, default=5)
    a = p.parse_args()
    peer = torch.compile(create_block_mask) if a.device == "cuda" else create_block_mask
    print(f"{today()} | {machine()} | torch {torch.__version__} | device {a.device} | batch {a.batch}")
    print("| seq | document_block_mask ms | create_block_mask ms | ratio (peer / ours) |")
    print("|---|---|---|---|")
    for seq in (int(s) for s in a.seqs.split(",")):
        t_ours, t_ref = compare(seq, a.batch, a.device, a.repeat, peer)
        print(f"| {seq} | {t_ours * 1e3:.2f} | {t_ref * 1e3:.2f} | {t_ref / t_ours:.1f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
