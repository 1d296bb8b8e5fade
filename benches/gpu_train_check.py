"""GPU training check (issue 7): the real trainer loop (`tokenmill.train.train`) on one GPU.

1. llama-1b (1.1B, GQA) at seq 2048, bf16 autocast, fused torch AdamW: tokens/s and MFU with tokenmill's
   kernels, and with plain torch ops in their place (the peer: what a PyTorch user writes by hand --
   RMSNorm, RoPE and SwiGLU as eager torch, full logits + F.cross_entropy). Goal: MFU >= 45% with ours.
2. llama-13b full-parameter training: bf16 parameters, AdamW8bit, activation checkpointing, seq 2048:
   peak memory and tokens/s (needs ~100 GB: an H200; skipped with a message on smaller cards).

Each section runs in its own subprocess (an OOM in one cannot poison the next) under a time limit; the
parent prints one table. Only torch, cupy and the installed tokenmill are needed; no network.

    python benches/gpu_train_check.py            # everything (~3-4 minutes on an H100/H200)
    python benches/gpu_train_check.py --only 1b
    python benches/gpu_train_check.py --dry-run  # the same code on CPU with tiny shapes
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

SECTIONS = {
    # name: (preset, batch, steps, log_every, kernels, optimizer, param_dtype, checkpointing, time limit s)
    "1b-tokenmill": ("llama-1b", 4, 12, 6, True, "adamw", "float32", False, 100),
    "1b-torch": ("llama-1b", 4, 12, 6, False, "adamw", "float32", False, 100),
    "13b-adamw8bit-ckpt": ("llama-13b", 2, 6, 3, True, "adamw8bit", "bfloat16", True, 150),
    # The same 1B recipe at micro-batch 8 (16k tokens per step), ours and the peer, and ours with
    # per-layer torch.compile: how far MFU moves with the batch and with compiled glue.
    "1b-tokenmill-b8": ("llama-1b", 8, 12, 6, True, "adamw", "float32", False, 100),
    "1b-torch-b8": ("llama-1b", 8, 12, 6, False, "adamw", "float32", False, 100),
    "1b-tokenmill-b8-compile": ("llama-1b", 8, 12, 6, True, "adamw", "float32", False, 150),
}
SEQ = 2048


class TorchOps:
    """The peer: eager PyTorch ops in place of tokenmill.kernels (same math, no fused kernels)."""

    @staticmethod
    def rms_norm(x, weight, eps):
        import torch

        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * weight

    @staticmethod
    def rope_cos_sin(positions, head_dim, theta=10000.0, dtype=None, scaling=None):
        import torch

        assert scaling is None, "the presets benchmarked here have no rope scaling"

        inv = 1.0 / (
            theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim)
        )
        ang = positions.float()[..., None] * inv
        emb = torch.cat([ang, ang], -1)
        return emb.cos(), emb.sin()

    @staticmethod
    def apply_rope(q, k, cos, sin):
        import torch

        def rot(x):
            x1, x2 = x.chunk(2, dim=-1)
            return (x * cos[..., None, :] + torch.cat([-x2, x1], -1) * sin[..., None, :]).to(x.dtype)

        return rot(q), rot(k)

    @staticmethod
    def swiglu(gate, up):
        import torch.nn.functional as F

        return F.silu(gate) * up

    @staticmethod
    def linear_cross_entropy(hidden, weight, targets, ignore_index=-100, reduction="mean"):
        import torch.nn.functional as F

        logits = F.linear(hidden, weight).float()
        return F.cross_entropy(logits, targets, ignore_index=ignore_index, reduction=reduction)


def run_section(name: str, dry_run: bool = False) -> dict:
    """One section in this process. ``dry_run``: the same code on CPU with the "tiny" preset (checks the
    script itself on a machine without a GPU)."""
    import tokenmill.model
    import torch
    from tokenmill import train as T

    preset, batch, steps, log_every, ours, optim, pdtype, ckpt, _ = SECTIONS[name]
    seq = SEQ
    if dry_run:
        preset, seq, steps, log_every = "tiny", 64, 4, 2
    elif not torch.cuda.is_available():
        return {"skipped": "no CUDA device"}
    cfg_model = tokenmill.model.LlamaConfig.preset(preset)
    total_gb = 0 if dry_run else torch.cuda.get_device_properties(0).total_memory / 2**30
    if preset == "llama-13b" and total_gb < 120 and not dry_run:
        return {
            "skipped": f"needs ~100 GB of GPU memory (an H200); this {torch.cuda.get_device_name()} has {total_gb:.0f} GiB"
        }
    if not ours:
        tokenmill.model.K = TorchOps
    g = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(4):
        x = torch.randint(0, cfg_model.vocab_size, (batch, seq + 1), generator=g)
        batches.append({"input_ids": x[:, :-1].contiguous(), "labels": x[:, 1:].contiguous()})

    class Cycle:
        def __iter__(self):
            while True:
                yield from batches

    out = tempfile.mkdtemp(prefix=f"tm-gpu-{name}-")
    cfg = T.load_config(
        None,
        [
            f"--run.out_dir={out}",
            f"--run.device={'cpu' if dry_run else 'cuda'}",
            f"--run.param_dtype={pdtype}",
            f"--run.activation_checkpointing={str(ckpt).lower()}",
            f"--model.preset={preset}",
            f"--data.seq_len={seq}",
            f"--data.batch_size={batch}",
            f"--optim.name={optim}",
            "--optim.warmup_steps=2",
            f"--train.steps={steps}",
            f"--train.log_every={log_every}",
            "--train.eval_every=0",
            "--train.progress=false",
            f"--checkpoint.every={10**9}",
            *(["--run.compile=true"] if name.endswith("-compile") else []),
        ],
    )
    # No checkpoint at the end: a 13B full state dict would take longer to write than the steps.
    T.ckpt.save = lambda *a, **k: None
    if not dry_run:
        torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    hist = T.train(cfg, Cycle())
    last = hist[-1]  # tokens/s and MFU over the last log_every steps (after warm-up and kernel compilation)
    return {
        "tokens_per_s": last["tokens_per_s"],
        "mfu": last["mfu"],
        "loss_first": hist[0]["loss"],
        "loss_last": last["loss"],
        "peak_mem_gib": 0.0 if dry_run else torch.cuda.max_memory_allocated() / 2**30,
        "gpu": last["gpu"],
        "wall_s": time.perf_counter() - t,
        "n_params": last["n_params"],
    }


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--only", help="run the sections whose name contains this")
    p.add_argument("--dry-run", action="store_true", help="tiny shapes on CPU: check the script, not the GPU")
    p.add_argument("--section", help=argparse.SUPPRESS)  # internal: run one section, print JSON
    a = p.parse_args()
    if a.section:
        try:
            res = run_section(a.section, a.dry_run)
        except Exception as e:  # report, do not crash the table
            res = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
        print("RESULT " + json.dumps(res), flush=True)
        return 0
    rows = {}
    for name, spec in SECTIONS.items():
        if a.only and a.only not in name:
            continue
        print(f"== {name}", flush=True)
        try:
            r = subprocess.run(
                [sys.executable, __file__, "--section", name, *(["--dry-run"] if a.dry_run else [])],
                capture_output=True,
                text=True,
                timeout=spec[-1],
                env={**os.environ, "PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"},
            )
            lines = [ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")]
            rows[name] = json.loads(lines[-1][7:]) if lines else {"error": (r.stderr or r.stdout)[-500:]}
        except subprocess.TimeoutExpired:
            rows[name] = {"error": f"timed out after {spec[-1]} s"}
        print(f"   {rows[name]}", flush=True)
    print(
        "\n| section | GPU | params | tokens/s | MFU (plan.flops_per_token) | peak mem GiB | loss first -> last |"
    )
    print("|---|---|---|---|---|---|---|")
    for name, r in rows.items():
        if "tokens_per_s" in r:
            mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "n/a"
            print(
                f"| {name} | {r['gpu']} | {r['n_params'] / 1e9:.2f}B | {r['tokens_per_s']:,.0f} | {mfu} | "
                f"{r['peak_mem_gib']:.1f} | {r['loss_first']:.3f} -> {r['loss_last']:.3f} |"
            )
        else:
            print(f"| {name} | {r.get('skipped') or r.get('error')} | | | | | |")
    for suffix in ("", "-b8"):
        a_, b_ = rows.get(f"1b-tokenmill{suffix}", {}), rows.get(f"1b-torch{suffix}", {})
        if "tokens_per_s" in a_ and "tokens_per_s" in b_:
            ratio = a_["tokens_per_s"] / b_["tokens_per_s"]
            print(f"llama-1b{suffix}: tokenmill kernels / plain torch = {ratio:.2f}x tokens/s")
    mfus = {n: r["mfu"] for n, r in rows.items() if n.startswith("1b-tokenmill") and r.get("mfu") is not None}
    if mfus:
        best = max(mfus, key=mfus.get)
        print(
            f"MFU goal >= 45%: {'met' if mfus[best] >= 0.45 else 'NOT met'} (best {mfus[best]:.1%}, {best})"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
