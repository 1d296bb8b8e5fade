"""``tokenmill demo --finetune``: fine-tune a model you already have, end to end on a CPU, built-in data.

The path a user takes with LLaMA-2/3 or Mistral, on a small model the demo makes itself:

1. a "published" base model: a small LLaMA pre-trained on Python's stdlib, written as a Hugging Face
   ``save_pretrained`` folder (what users download from a hub);
2. ``tokenmill import-hf``: that folder into a tokenmill checkpoint (logits checked against transformers);
3. instruction data made from the stdlib (``def`` signatures -> the first line of their docstrings), in
   the ChatML template, through ``tm.data.prepare_sft`` (loss on the responses only);
4. LoRA fine-tuning (rank 8 on all seven projections; ``--qlora`` puts the frozen base in NF4): only the
   adapters train; the validation loss on held-out functions falls;
5. ``tokenmill export-hf --adapter`` (a PEFT adapter folder) and ``--merge`` (full weights), then
   transformers (and peft, when installed) load them and generate.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import random
import shutil
import tempfile
import time
from pathlib import Path

from tokenmill import corpus

CHATML = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def instruction_records(max_records: int = 4000) -> list[dict]:
    """Alpaca-style records from the stdlib: a function signature in, its docstring summary out."""
    records = []
    for rel, source in corpus.stdlib_sources():
        try:
            tree = ast.parse(source)
        except (SyntaxError, ValueError):
            continue
        module = rel[:-3].replace(os.sep, ".")
        for node in ast.walk(tree):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) or node.name.startswith("_"):
                continue
            doc = ast.get_docstring(node)
            summary = doc.strip().split("\n")[0].strip() if doc else ""
            if not 20 <= len(summary) <= 120:
                continue
            args = ", ".join(a.arg for a in node.args.args)
            records.append(
                {
                    "instruction": f"Summarise what `{module}.{node.name}({args})` does in one line.",
                    "output": summary,
                }
            )
            if len(records) >= max_records:
                return records
    return records


def main(args: argparse.Namespace | None = None) -> int:
    import torch

    import tokenmill as tm
    from tokenmill import hf
    from tokenmill import train as T
    from tokenmill.checkpoint import latest_checkpoint
    from tokenmill.model import Llama

    out = Path(getattr(args, "out", None) or "demo-finetune-out")
    steps = getattr(args, "steps", None)
    qlora = bool(getattr(args, "qlora", False))
    t0 = time.perf_counter()
    torch.manual_seed(0)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    work = Path(tempfile.mkdtemp(prefix="tokenmill-ft-"))

    # 1. the base model a user would download -------------------------------------------------------------
    t = time.perf_counter()
    texts = [text for _, text in corpus.stdlib_sources(max_bytes=3_000_000)]
    tok = tm.Tokenizer.train(texts, vocab_size=2048, pattern="gpt2", special_tokens=CHATML)
    tok_path = out / "tokenizer.tokenmill"
    tok.save(str(tok_path))
    with open(work / "pre.jsonl", "w") as f:
        for text in texts:
            f.write(json.dumps({"text": text}) + "\n")
    tm.data.prepare([str(work / "pre.jsonl")], str(work / "pre"), str(tok_path))
    seq = 128
    shape = [
        "--model.preset=small",
        "--model.dim=128",
        "--model.n_layers=4",
        "--model.n_heads=4",
        "--model.n_kv_heads=2",
        f"--model.max_seq_len={seq}",
    ]
    base_overrides = [
        f"--run.out_dir={work / 'pretrain'}",
        *shape,
        f"--data.train=['{work / 'pre'}']",
        f"--data.tokenizer={tok_path}",
        f"--data.seq_len={seq}",
        "--data.batch_size=16",
        "--optim.lr=3e-3",
        "--optim.min_lr=3e-4",
        "--optim.warmup_steps=20",
        f"--train.steps={max(10, (steps or 150))}",
        "--train.log_every=50",
        "--train.eval_every=0",
        "--train.progress=false",
    ]
    T.train(T.load_config(None, base_overrides))
    base_hf = out / "base-hf"
    pretrained = latest_checkpoint(str(work / "pretrain"))
    assert pretrained is not None, "the pre-training run wrote no checkpoint"
    hf.export(pretrained, base_hf)
    print(
        f"[1/5] base model: a 4-layer LLaMA pre-trained on the stdlib, saved as a Hugging Face folder "
        f"{base_hf} ({time.perf_counter() - t:.0f}s)",
        flush=True,
    )

    # 2. import ---------------------------------------------------------------------------------------------
    imported = out / "base-tokenmill"
    hf.import_hf(base_hf, imported)
    ids = torch.tensor([tok.encode("def mean(values):\n    return")])
    with torch.no_grad():
        ours = Llama.from_checkpoint(imported)(ids)
    check = ""
    try:
        from transformers import AutoModelForCausalLM

        with torch.no_grad():
            theirs = AutoModelForCausalLM.from_pretrained(base_hf, dtype=torch.float32)(ids).logits
        check = f"; logits vs transformers: max abs diff {float((ours - theirs).abs().max()):.1e}"
    except ImportError:
        pass
    print(f"[2/5] tokenmill import-hf {base_hf} {imported}{check}", flush=True)

    # 3. instruction data -----------------------------------------------------------------------------------
    records = instruction_records()
    random.Random(0).shuffle(records)
    n_val = max(50, len(records) // 20)
    for name, part in (("val", records[:n_val]), ("train", records[n_val:])):
        with open(work / f"sft-{name}.jsonl", "w") as f:
            for r in part:
                f.write(json.dumps(r) + "\n")
        tm.data.prepare_sft(work / f"sft-{name}.jsonl", work / f"sft-{name}", tok, template="chatml")
    print(
        f"[3/5] instruction data: {len(records) - n_val} train / {n_val} held-out records "
        f"(signature -> docstring summary, ChatML, loss on responses only)",
        flush=True,
    )

    # 4. LoRA fine-tuning -----------------------------------------------------------------------------------
    t = time.perf_counter()
    n_steps = steps or 120
    run = out / "lora-run"
    sft_overrides = [
        f"--run.out_dir={run}",
        f"--train.init_from={imported}",  # the model shape comes from its meta.json: no [model] keys
        f"--data.train=['{work / 'sft-train'}']",
        f"--data.val=['{work / 'sft-val'}']",
        f"--data.tokenizer={tok_path}",
        "--data.sft=true",
        f"--data.seq_len={seq}",
        "--data.batch_size=16",
        "--data.packing=best_fit",
        "--lora.rank=8",
        "--lora.alpha=16",
        *(["--lora.base_dtype=nf4"] if qlora else []),
        "--optim.lr=3e-3",
        "--optim.min_lr=3e-4",
        "--optim.warmup_steps=10",
        "--optim.weight_decay=0.0",
        f"--train.steps={n_steps}",
        "--train.log_every=20",
        f"--train.eval_every={max(1, n_steps // 4)}",
        "--train.eval_batches=4",
        "--train.progress=false",
    ]
    history = T.train(T.load_config(None, sft_overrides))
    vals = [h["val_loss"] for h in history if "val_loss" in h]
    ckpt = latest_checkpoint(str(run))
    assert ckpt is not None, f"{run}: the LoRA run wrote no checkpoint"
    adapter_bytes = sum(f.stat().st_size for f in ckpt.glob("model.safetensors"))
    print(
        f"[4/5] {'QLoRA (NF4 base)' if qlora else 'LoRA'} rank 8 on wq wk wv wo w1 w2 w3, {n_steps} steps "
        f"({time.perf_counter() - t:.0f}s): held-out loss {vals[0]:.3f} -> {vals[-1]:.3f}; the checkpoint's "
        f"weights are the adapters alone ({adapter_bytes / 1e6:.2f} MB)",
        flush=True,
    )
    if not vals[-1] < vals[0]:
        print("      WARNING: the held-out loss did not fall", flush=True)

    # 5. export and generate --------------------------------------------------------------------------------
    adapter, merged = out / "adapter", out / "merged"
    hf.export(ckpt, adapter, adapter=True, base_model=str(base_hf))
    hf.export(ckpt, merged, merge=True)
    print(f"[5/5] export-hf --adapter -> {adapter} (PEFT); --merge -> {merged} (full weights)", flush=True)
    prompt_record = records[0]
    prompt = f"<|im_start|>user\n{prompt_record['instruction']}<|im_end|>\n<|im_start|>assistant\n"
    prompt_ids = tok.encode(prompt, allowed_special="all")
    end = tok.encode_single_token(b"<|im_end|>")
    try:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32)
        gen = model.generate(
            torch.tensor([prompt_ids]), max_new_tokens=40, do_sample=False, eos_token_id=end, pad_token_id=end
        )
        answer = tok.decode(gen[0, len(prompt_ids) :].tolist()).replace("<|im_end|>", "")
        print(
            f"      transformers, merged model, held-out prompt: {prompt_record['instruction']}", flush=True
        )
        print(f"      | {answer.strip()}", flush=True)
        print(f"      (reference: {prompt_record['output']})", flush=True)
        try:
            from peft import PeftModel

            base = AutoModelForCausalLM.from_pretrained(base_hf, dtype=torch.float32)
            with torch.no_grad():
                peft_logits = PeftModel.from_pretrained(base, adapter)(torch.tensor([prompt_ids])).logits
                merged_logits = model(torch.tensor([prompt_ids])).logits
            diff = float((peft_logits - merged_logits).abs().max())
            print(f"      peft base + adapter vs merged logits: max abs diff {diff:.1e}", flush=True)
        except ImportError:
            print("      (peft is not installed: the adapter folder was not loaded)", flush=True)
    except ImportError:
        print(
            "      (transformers is not installed: pip install transformers to load the exports)", flush=True
        )
    print(f"done in {time.perf_counter() - t0:.0f}s; outputs in {out}", flush=True)
    if os.environ.get("TOKENMILL_DEMO_KEEP") is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0
