"""QLoRA memory goals of issue 12 on one GPU: the peak of a real QLoRA training step against the planner.

    python benches/gpu_qlora_check.py                  # 7B, 13B (~2 minutes on an H100), 65B if it fits
    python benches/gpu_qlora_check.py --models llama-13b --cap-gb 24
    python benches/gpu_qlora_check.py --dry-run        # the same code on CPU, tiny shapes

Each model (random weights: memory does not depend on them) is built block by block on the GPU, each block's
seven projections quantised to NF4 at once with rank-16 adapters (plan_calibration.qlora_block), so a 65B
model never holds its dense weights. The step: seq 2048, micro-batch 1, activation checkpointing, bf16,
the fused linear-cross-entropy loss (Llama(..., labels)), fused torch AdamW over the adapters, two steps.
The card is capped with torch.cuda.set_per_process_memory_fraction (default: a 24 GB card; 48 GB for 65B),
so an over-budget step fails with OOM instead of quietly using an 80 GB card. Goals: 13B <= 12 GiB,
7B <= 7 GiB, 65B fits 48 GB; the planner's prediction is printed beside each (and must be within 10%).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from plan_calibration import _cpu_peak, _tensor_bytes, qlora_block  # noqa: E402
from tokenmill import plan  # noqa: E402
from tokenmill.model import Block, Llama, LlamaConfig  # noqa: E402

GOALS = {"llama-7b": 7 * 2**30, "llama-13b": 12 * 2**30, "llama-65b": 48e9}
CAP = {"llama-65b": 48e9}  # others: --cap-gb (a 24 GB card)
TOLERANCE = 0.10


def build(cfg: LlamaConfig, device: str, rank: int = 16) -> Llama:
    """A bf16 Llama with NF4 projections and adapters, one block at a time on ``device``."""
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("meta"):
            m = Llama(cfg)
        for name in ("tok_embeddings", "norm", "output"):
            getattr(m, name).to_empty(device=device)
        nn.init.normal_(m.tok_embeddings.weight, std=0.02)
        nn.init.normal_(m.output.weight, std=0.02)
        nn.init.ones_(m.norm.weight)
        for i in range(cfg.n_layers):
            with torch.device(device):
                block = Block(cfg)
            m.layers[i] = qlora_block(block, rank)
    finally:
        torch.set_default_dtype(default)
    for name, p in m.named_parameters():
        p.requires_grad_(".lora_" in name)
    return m


def step_peak(cfg: LlamaConfig, seq_len: int, device: str, cap: float | None) -> tuple[float, float, int]:
    """(peak bytes of two QLoRA steps, seconds per step, trainable parameters)."""
    on_gpu = device.startswith("cuda")
    if on_gpu:
        torch.cuda.empty_cache()
        if cap:
            torch.cuda.set_per_process_memory_fraction(
                min(1.0, cap / torch.cuda.get_device_properties(0).total_memory)
            )
        torch.cuda.reset_peak_memory_stats()
    m = build(cfg, device)
    m.activation_checkpointing = True
    trainable = [p for p in m.parameters() if p.requires_grad]
    ids = torch.randint(cfg.vocab_size, (1, seq_len + 1), device=device)
    opt = torch.optim.AdamW(trainable, lr=1e-4, fused=on_gpu, foreach=not on_gpu)

    def run() -> float:
        t = time.perf_counter()
        for _ in range(2):
            m(ids[:, :-1], labels=ids[:, 1:]).backward()
            opt.step()
            opt.zero_grad(set_to_none=False)
        if on_gpu:
            torch.cuda.synchronize()
        return (time.perf_counter() - t) / 2

    if on_gpu:
        torch.cuda.reset_peak_memory_stats()
        secs = run()
        peak = torch.cuda.max_memory_allocated()
    else:  # CPU: resident model + what the steps allocate (torch.profiler)
        import tempfile

        from torch.profiler import ProfilerActivity, profile

        resident = _tensor_bytes([*m.parameters(), *m.buffers()])
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            secs = run()
        with tempfile.TemporaryDirectory() as d:
            prof.export_chrome_trace(os.path.join(d, "t.json"))
            peak = resident + _cpu_peak(os.path.join(d, "t.json"))
    return float(peak), secs, sum(p.numel() for p in trainable)


def predicted(cfg: LlamaConfig, seq_len: int, on_gpu: bool) -> plan.Memory:
    return plan.memory(
        cfg,
        seq_len=seq_len,
        micro_batch=1,
        precision="bf16",
        optimizer="adamw-fused" if on_gpu else "adamw",
        checkpointing=True,
        finetune="qlora",
        lora_rank=16,
        fused_loss=True,
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="llama-7b,llama-13b,llama-65b")
    ap.add_argument("--cap-gb", type=float, default=24.0, help="memory cap for 7B/13B (GB, 1e9 bytes)")
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes")
    args = ap.parse_args(argv)
    if args.dry_run:
        device, seq = "cpu", 64
        models = {"tiny": LlamaConfig.preset("tiny")}
    else:
        if not torch.cuda.is_available():
            print("no CUDA device: run with --dry-run to check the host logic on CPU")
            return 0
        device, seq = "cuda", 2048
        models = {name: LlamaConfig.preset(name) for name in args.models.split(",")}
        print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}")
    print("| model | cap GB | peak GiB measured | planner GiB | planner error | goal | s/step | trainable |")
    print("|---|---:|---:|---:|---:|---|---:|---:|")
    bad = 0
    for name, cfg in models.items():
        cap = None if args.dry_run else CAP.get(name, args.cap_gb * 1e9)
        pred = predicted(cfg, seq, device != "cpu").peak
        try:
            peak, secs, n_train = step_peak(cfg, seq, device, cap)
        except torch.cuda.OutOfMemoryError as e:
            print(
                f"| {name} | {cap / 1e9:.0f} | OOM | {pred / 2**30:.2f} | - | MISSED (out of memory) | - | - |"
            )
            print(f"  {str(e).splitlines()[0]}")
            bad += 1
            continue
        finally:
            if device != "cpu":
                torch.cuda.empty_cache()
        goal = GOALS.get(name)
        met = goal is None or peak <= goal
        err = pred / peak - 1
        # dry run: the host logic only (on CPU the reference kernels' fp32 temporaries dominate tiny shapes)
        ok = args.dry_run or (met and abs(err) <= TOLERANCE)
        bad += not ok
        goal_text = "-" if goal is None else f"{'MET' if met else 'MISSED'} (<= {goal / 2**30:.1f} GiB)"
        print(
            f"| {name} | {'-' if cap is None else f'{cap / 1e9:.0f}'} | {peak / 2**30:.3f} | {pred / 2**30:.3f} | "
            f"{err:+.1%} | {goal_text} | {secs:.2f} | {n_train / 1e6:.2f}M |",
            flush=True,
        )
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
