"""The planner's memory estimate against real GPU memory (torch.cuda.max_memory_allocated).

    python benches/gpu_plan_check.py            # a few cases, ~1 minute on an H100; exit 1 if any is off

For each case: the planner's parameter count must equal the model's exactly, weights / gradients /
optimizer state bytes must match exactly, and the predicted peak must be within TOLERANCE of the
measured peak (the rest is cuBLAS / attention workspaces and allocator rounding, which the planner
covers with USABLE_FRACTION of the card). Pure-bf16 and fp32 training (torch AdamW keeps its state in
the parameter dtype); foreach and fused AdamW; with and without activation checkpointing.
"""

from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from plan_calibration import HEADER, format_row, measure, predicted  # noqa: E402
from tokenmill.model import LlamaConfig  # noqa: E402

TOLERANCE = 0.10

# A LLaMA-1B-like shape cut to 8 layers (GQA, 32k vocab): weights and activations both in the GBs.
SHAPE = LlamaConfig(vocab_size=32000, dim=2048, n_layers=8, n_heads=16, n_kv_heads=4, ffn_hidden=5632)
CASES = [
    dict(precision="bf16", seq_len=2048, micro_batch=4, optimizer="adamw-fused", checkpointing=False),
    dict(precision="bf16", seq_len=2048, micro_batch=4, optimizer="adamw", checkpointing=True),
    dict(precision="fp32", seq_len=1024, micro_batch=2, optimizer="adamw", checkpointing=False),
    dict(precision="fp32", seq_len=2048, micro_batch=4, optimizer="adamw-fused", checkpointing=True),
]


def check(cases=CASES, cfg: LlamaConfig = SHAPE, device: str = "cuda", name: str = "1B-8L") -> list[dict]:
    rows = []
    for case in cases:
        kw = {k: case[k] for k in ("seq_len", "micro_batch", "optimizer", "checkpointing")}
        try:
            meas = measure(cfg, precision=case["precision"], device=device, **kw)
        except torch.cuda.OutOfMemoryError as e:  # a smaller card: report, do not crash the run
            rows.append(dict(case=case, error=f"out of memory: {e}".splitlines()[0]))
            continue
        finally:
            torch.cuda.empty_cache()
        # On CUDA, SDPA's fused kernels run in 16-bit only: fp32 falls back to math attention, which
        # keeps the s x s probabilities (first GPU run: fp32 peaks 10% above a flash-attention estimate,
        # the gap being exactly B*H*s^2*4 bytes per layer). On CPU the fp32 flash kernel exists.
        pred = predicted(cfg, precision=case["precision"], flash_attention=case["precision"] != "fp32", **kw)
        r = dict(
            case=dict(case, model=name),
            precision=case["precision"],
            n_params_planner=cfg.num_params(),
            n_params_model=meas.n_params,
            weights=(pred.weights, meas.weights),
            grads=(pred.grads, meas.grads),
            optimizer=(pred.optimizer, meas.optimizer),
            activations=(pred.activations, meas.saved_activations),
            peak=(pred.peak, meas.peak),
        )
        r["ok"] = (
            r["n_params_planner"] == r["n_params_model"]
            and all(p == m for p, m in (r["weights"], r["grads"], r["optimizer"]))
            and abs(pred.peak / meas.peak - 1) <= TOLERANCE
        )
        rows.append(r)
    return rows


def main() -> int:
    if not torch.cuda.is_available():
        print("no CUDA device; nothing to check")
        return 0
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, tolerance {TOLERANCE:.0%}")
    print(HEADER + " ok |")
    rows = check()
    bad = 0
    for r in rows:
        if "error" in r:
            print(f"| {r['case']} | {r['error']} |")
            bad += 1
            continue
        print(format_row(r) + (" yes |" if r["ok"] else " **NO** |"))
        bad += not r["ok"]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
