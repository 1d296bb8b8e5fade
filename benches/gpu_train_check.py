"""GPU training check (issues 7 and 13): the real trainer loop (`tokenmill.train.train`) on one GPU.

1. llama-1b (1.1B, GQA) at seq 2048, bf16 autocast, fused torch AdamW: tokens/s and MFU with tokenmill's
   kernels, and with plain torch ops in their place (the peer: what a PyTorch user writes by hand --
   RMSNorm, RoPE and SwiGLU as eager torch, full logits + F.cross_entropy). Goal: MFU >= 45% with ours.
2. llama-13b full-parameter training: bf16 parameters, AdamW8bit, activation checkpointing, seq 2048:
   peak memory and tokens/s (73 GiB on an H200 at micro-batch 2: run on any card of >= 75 GiB, an H100 80GB
   included).
3. Issue 13, real packed data: token files made by `tokenmill prepare` from the built-in corpus (stdlib
   sources, one document per file), packed "concat" and "best_fit", document masks off (plain causal
   rows, flash) and on through each attention path (run.attention = varlen / flex / sdpa), beside the
   synthetic case, at seq 2048 (micro-batch 8) and seq 8192 (micro-batch 2): 16k tokens per step each.
   Prints MFU and the masked / unmasked tokens/s ratio. Goals: seq 2048 masked >= 50% MFU and within 5%
   of unmasked; seq 8192 masked faster than unmasked.

Each section runs in its own subprocess (an OOM in one cannot poison the next) under a time limit; the
parent prints one table. Only torch, cupy and the installed tokenmill are needed; no network.

    python benches/gpu_train_check.py                    # everything (~15 minutes on an H100: split it)
    python benches/gpu_train_check.py --only 1b-tokenmill,13b
    python benches/gpu_train_check.py --only s2048-concat,s8192-concat   # issue 13 first (~6 minutes)
    python benches/gpu_train_check.py --dry-run          # (or --smoke) the same code on CPU, tiny shapes
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time


def _section(preset: str, batch: int, steps: int, log_every: int, limit: int, **kw) -> dict:
    spec = dict(
        preset=preset,
        batch=batch,
        steps=steps,
        log_every=log_every,
        limit=limit,  # seconds for the subprocess
        ours=True,  # tokenmill kernels (False: the eager-torch peer)
        optim="adamw",
        param_dtype="float32",
        checkpointing=False,
        compile=False,
        seq=2048,
        data="synthetic",  # or "concat" / "best_fit": the prepared corpus, packed so
        mask=True,  # data.document_mask (packed data only)
        attention="auto",  # run.attention
    )
    spec.update(kw)
    return spec


SECTIONS = {
    "1b-tokenmill": _section("llama-1b", 4, 12, 6, 100),
    "1b-torch": _section("llama-1b", 4, 12, 6, 100, ours=False),
    "13b-adamw8bit-ckpt": _section(
        "llama-13b", 2, 6, 3, 150, optim="adamw8bit", param_dtype="bfloat16", checkpointing=True
    ),
    # The same 1B recipe at micro-batch 8 (16k tokens per step), ours and the peer, and ours with
    # per-layer torch.compile: how far MFU moves with the batch and with compiled glue.
    "1b-tokenmill-b8": _section("llama-1b", 8, 12, 6, 100),
    "1b-torch-b8": _section("llama-1b", 8, 12, 6, 100, ours=False),
    "1b-tokenmill-b8-compile": _section("llama-1b", 8, 12, 6, 150, compile=True),
}
# Issue 13: packed documents, 16k tokens per step at both lengths. Names: 1b-s<seq>-<data>-<attention>.
for _seq, _batch in ((2048, 8), (8192, 2)):
    if _seq != 2048:  # at 2048 the synthetic case is 1b-tokenmill-b8
        SECTIONS[f"1b-s{_seq}-synthetic"] = _section("llama-1b", _batch, 12, 6, 120, seq=_seq)
    for _data in ("concat", "best_fit"):
        _name = f"1b-s{_seq}-{_data.replace('_', '')}"
        SECTIONS[f"{_name}-nomask"] = _section(
            "llama-1b", _batch, 12, 6, 120, seq=_seq, data=_data, mask=False
        )
        for _attn in ("varlen", "flex", "sdpa"):
            if _attn == "sdpa" and _data == "best_fit":
                continue  # the dense reference once per length is enough
            SECTIONS[f"{_name}-{_attn}"] = _section(
                "llama-1b", _batch, 12, 6, 200, seq=_seq, data=_data, attention=_attn
            )
SECTIONS["1b-s2048-concat-nomask-compile"] = _section(
    "llama-1b", 8, 12, 6, 200, data="concat", mask=False, compile=True
)
SECTIONS["1b-s2048-concat-varlen-compile"] = _section(
    "llama-1b", 8, 12, 6, 200, data="concat", attention="varlen", compile=True
)


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


def prepare_corpus(out_dir: str, dry_run: bool) -> str:
    """Token files of the built-in corpus (stdlib sources, one document per file, as `tokenmill demo`),
    made by the `tokenmill prepare` command; returns the prefix. The tokenizer (8192 ids; 512 for the
    dry run's tiny model) is trained on the same texts: the documents' lengths are what matters here."""
    import tokenmill as tm
    from tokenmill import corpus

    os.makedirs(out_dir, exist_ok=True)
    prefix = os.path.join(out_dir, "stdlib")
    if os.path.exists(prefix + ".json"):
        return prefix
    jsonl = os.path.join(out_dir, "stdlib.jsonl")
    texts = [text for _, text in corpus.stdlib_sources(max_bytes=400_000 if dry_run else 8_000_000)]
    with open(jsonl, "w") as f:
        for text in texts:
            f.write(json.dumps({"text": text}) + "\n")
    tok = tm.Tokenizer.train(
        texts, vocab_size=512 if dry_run else 8192, pattern="gpt2", special_tokens=["<|endoftext|>"]
    )
    tok_path = os.path.join(out_dir, "tokenizer.json")
    tok.save_huggingface(tok_path)
    cmd = [sys.executable, "-m", "tokenmill", "prepare", jsonl, "--tokenizer", tok_path, "-o", prefix, "-q"]
    subprocess.run(cmd, check=True)
    return prefix


def run_section(name: str, dry_run: bool = False, data_prefix: str = "") -> dict:
    """One section in this process. ``dry_run``: the same code on CPU with the "tiny" preset (checks the
    script itself on a machine without a GPU; flex and varlen train on CUDA only, so the dry run takes
    the sdpa path for them)."""
    import tokenmill.model
    import torch
    from tokenmill import train as T

    sp = SECTIONS[name]
    preset, batch, steps, log_every, seq = sp["preset"], sp["batch"], sp["steps"], sp["log_every"], sp["seq"]
    attention = sp["attention"]
    if dry_run:
        preset, seq, steps, log_every = "tiny", min(seq // 32, 128), 4, 2
        batch = min(batch, 4)
        attention = "sdpa" if attention in ("flex", "varlen") else attention
    elif not torch.cuda.is_available():
        return {"skipped": "no CUDA device"}
    cfg_model = tokenmill.model.LlamaConfig.preset(preset)
    total_gb = 0 if dry_run else torch.cuda.get_device_properties(0).total_memory / 2**30
    if preset == "llama-13b" and total_gb < 75 and not dry_run:
        return {
            "skipped": f"needs ~74 GiB of GPU memory (an 80 GB card); this {torch.cuda.get_device_name()} has {total_gb:.0f} GiB"
        }
    if not sp["ours"]:
        tokenmill.model.K = TorchOps
    train_data = None
    overrides = []
    if sp["data"] == "synthetic":
        g = torch.Generator().manual_seed(0)
        batches = []
        for _ in range(4):
            x = torch.randint(0, cfg_model.vocab_size, (batch, seq + 1), generator=g)
            batches.append({"input_ids": x[:, :-1].contiguous(), "labels": x[:, 1:].contiguous()})

        class Cycle:
            def __iter__(self):
                while True:
                    yield from batches

        train_data = Cycle()
    else:
        overrides = [
            f"--data.train=['{data_prefix}']",
            f"--data.packing={sp['data']}",
            f"--data.document_mask={str(sp['mask']).lower()}",
        ]
    out = tempfile.mkdtemp(prefix=f"tm-gpu-{name}-")
    cfg = T.load_config(
        None,
        [
            f"--run.out_dir={out}",
            f"--run.device={'cpu' if dry_run else 'cuda'}",
            f"--run.param_dtype={sp['param_dtype']}",
            f"--run.activation_checkpointing={str(sp['checkpointing']).lower()}",
            f"--run.attention={attention}",
            f"--run.compile={str(sp['compile']).lower()}",
            f"--model.preset={preset}",
            f"--model.max_seq_len={max(seq, cfg_model.max_seq_len)}",
            f"--data.seq_len={seq}",
            f"--data.batch_size={batch}",
            f"--optim.name={sp['optim']}",
            "--optim.warmup_steps=2",
            f"--train.steps={steps}",
            f"--train.log_every={log_every}",
            "--train.eval_every=0",
            "--train.progress=false",
            f"--checkpoint.every={10**9}",
            *overrides,
        ],
    )
    # No checkpoint at the end: a 13B full state dict would take longer to write than the steps.
    T.ckpt.save = lambda *a, **k: None
    if not dry_run:
        torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    hist = T.train(cfg, train_data)
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
        "attention": attention,
    }


def selected(only: str | None) -> list[str]:
    """Section names matching any of the comma-separated patterns of ``only`` (all without it): a pattern
    that is a section's full name selects that section alone, any other one each name containing it."""
    pats = [p for p in (only or "").split(",") if p]
    return [n for n in SECTIONS if not pats or any(p == n or (p not in SECTIONS and p in n) for p in pats)]


def packed_summary(rows: dict) -> list[str]:
    """Issue 13's comparisons: each masked path against the unmasked run of the same data and length,
    and the goals."""
    lines = []
    for seq in (2048, 8192):
        for data in ("concat", "bestfit"):
            base = rows.get(f"1b-s{seq}-{data}-nomask", {})
            if "tokens_per_s" not in base:
                continue
            for attn in ("varlen", "flex", "sdpa"):
                r = rows.get(f"1b-s{seq}-{data}-{attn}", {})
                if "tokens_per_s" not in r:
                    continue
                ratio = r["tokens_per_s"] / base["tokens_per_s"]
                mfu = f"{r['mfu']:.1%}" if r.get("mfu") is not None else "n/a"
                if seq == 2048:
                    ok = r.get("mfu") is not None and r["mfu"] >= 0.50 and ratio >= 0.95
                    goal = "goal >= 50% MFU and >= 0.95x unmasked"
                else:
                    ok, goal = ratio > 1.0, "goal: faster than unmasked"
                lines.append(
                    f"seq {seq} {data} document mask via {attn}: MFU {mfu}, {ratio:.3f}x unmasked tokens/s "
                    f"({goal}: {'met' if ok else 'NOT met'})"
                )
    return lines


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--only", help="comma-separated section names or parts of names (see --list)")
    p.add_argument(
        "--dry-run", "--smoke", action="store_true", help="tiny shapes on CPU: check the script, not the GPU"
    )
    p.add_argument("--data-dir", help="where the prepared corpus goes (kept; default: a temporary folder)")
    p.add_argument("--list", action="store_true", help="print the section names and exit")
    p.add_argument("--section", help=argparse.SUPPRESS)  # internal: run one section, print JSON
    p.add_argument("--data", default="", help=argparse.SUPPRESS)  # internal: the token-file prefix
    a = p.parse_args()
    if a.list:
        print("\n".join(SECTIONS))
        return 0
    if a.section:
        try:
            res = run_section(a.section, a.dry_run, a.data)
        except Exception as e:  # report, do not crash the table
            res = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
        print("RESULT " + json.dumps(res), flush=True)
        return 0
    names = selected(a.only)
    prefix = ""
    if any(SECTIONS[n]["data"] != "synthetic" for n in names):
        t = time.perf_counter()
        prefix = prepare_corpus(a.data_dir or tempfile.mkdtemp(prefix="tm-gpu-corpus-"), a.dry_run)
        print(f"== corpus: {prefix} ({time.perf_counter() - t:.0f} s)", flush=True)
    rows = {}
    for name in names:
        limit = SECTIONS[name]["limit"]
        print(f"== {name}", flush=True)
        try:
            r = subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--section",
                    name,
                    "--data",
                    prefix,
                    *(["--dry-run"] if a.dry_run else []),
                ],
                capture_output=True,
                text=True,
                timeout=limit,
                env={**os.environ, "PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"},
            )
            lines = [ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")]
            rows[name] = json.loads(lines[-1][7:]) if lines else {"error": (r.stderr or r.stdout)[-500:]}
        except subprocess.TimeoutExpired:
            rows[name] = {"error": f"timed out after {limit} s"}
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
    for line in packed_summary(rows):
        print(line + (" [dry run: tiny model on CPU, not a measurement]" if a.dry_run else ""))
    failed = [n for n, r in rows.items() if "error" in r]
    if failed:
        print(f"sections with errors: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
