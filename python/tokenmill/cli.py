"""The ``tokenmill`` console script (also ``python -m tokenmill``).

Each subcommand is one ``_cmd_*`` function; argument parsing lives in ``build_parser``.
"""

from __future__ import annotations

import argparse
import importlib
import math
import sys
import warnings
from typing import Optional, Sequence

import tokenmill
from tokenmill import extras

USAGE_ERROR = 2  # as argparse exits on a usage error


# Argument types that check ranges while parsing, so a bad value is a usage error naming the flag
# ("argument --top: must be >= 0, got -5") before any file is read.
def _int_at_least(lo: int):
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if v < lo:
            raise argparse.ArgumentTypeError(f"must be >= {lo}, got {v}")
        return v

    return parse


def _float_in(lo: float, hi: float = math.inf, lo_open: bool = False, what: str = ""):
    def parse(text: str) -> float:
        try:
            v = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not math.isfinite(v) or v < lo or (lo_open and v == lo) or v > hi:
            raise argparse.ArgumentTypeError(f"must be {what}, got {text}")
        return v

    return parse


def _count(text: str) -> str:
    """A positive count as `tokenmill plan` writes them (13e9, 13B, 1.4T) or 'chinchilla', kept as text."""
    from tokenmill.plan import parse_count

    if text == "chinchilla":
        return text
    try:
        v = parse_count(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    if not 0 < v < math.inf:
        raise argparse.ArgumentTypeError(f"must be positive, got {text}")
    return text


def _read_lines(path: str) -> list[str]:
    with open(path, encoding="utf-8") as f:
        return f.read().splitlines()


def _cmd_eval(args: argparse.Namespace) -> int:
    from tokenmill import eval as ev

    refs, hyps = _read_lines(args.reference), _read_lines(args.hypothesis)
    flags = dict(
        lowercase=args.lowercase,
        remove_punctuation=args.remove_punctuation,
        collapse_whitespace=args.collapse_whitespace,
    )
    if len(refs) != len(hyps):
        raise ValueError(f"{args.reference} has {len(refs)} lines but {args.hypothesis} has {len(hyps)}")
    ops = ev.word_edit_ops if args.metric == "wer" else ev.char_edit_ops
    counts = ops(refs, hyps, **flags)
    rate = (ev.wer if args.metric == "wer" else ev.cer)(refs, hyps, **flags)
    print(
        f"{args.metric.upper()} {rate:.6f}  (hits {counts.hits}, substitutions {counts.substitutions}, "
        f"deletions {counts.deletions}, insertions {counts.insertions}; {len(refs)} lines)"
    )
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from tokenmill import train

    return train.main(args.config, args.overrides)


def _cmd_perplexity(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    import numpy as np
    import torch

    from tokenmill import eval as ev
    from tokenmill.checkpoint import newest_valid, read_meta
    from tokenmill.data import DataLoader
    from tokenmill.data.dataset import read_manifest
    from tokenmill.model import Llama
    from tokenmill.train import _check_batch as check_batch

    try:
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError:
        raise ValueError(f"--device {args.device!r} is not a device (cpu, cuda, cuda:1, ...)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {args.device}: no CUDA device is available")
    ckpt = Path(args.checkpoint)
    if not (ckpt / "meta.json").exists():
        found = newest_valid(
            str(ckpt),
            notice=lambda m: print(f"tokenmill eval: {m}", file=sys.stderr),
            names=["model.safetensors"],
        )
        if found is None:
            raise ValueError(
                f"{ckpt}: not a checkpoint folder (no meta.json) and no checkpoints/step_* inside"
            )
        ckpt = found
    model = Llama.from_checkpoint(ckpt, device)
    seq_len = args.seq_len or model.config.max_seq_len
    if seq_len > model.config.max_seq_len:
        raise ValueError(f"--seq-len {seq_len} exceeds the model's max_seq_len {model.config.max_seq_len}")
    loader = DataLoader(
        args.data, seq_len=seq_len, batch_size=args.batch_size, epochs=1, drop_last=False, prefetch=1
    )
    vocab = model.config.vocab_size
    for prefix in args.data:
        n_vocab = ((read_manifest(prefix) or {}).get("tokenizer") or {}).get("n_vocab")
        if n_vocab is not None and n_vocab > vocab:
            raise ValueError(
                f"{prefix}: tokenized with a {n_vocab}-token vocabulary but the model has {vocab}"
            )
    tok_path = args.tokenizer
    if tok_path is None and read_meta(ckpt).get("tokenizer"):
        tok_path = str(ckpt / read_meta(ckpt)["tokenizer"])
    byte_len, text_bytes = None, 0
    if tok_path:
        from tokenmill import Tokenizer

        tok = Tokenizer.from_file(tok_path)
        specials = set(tok.special_tokens.values())
        # Bytes each scored token stands for; special tokens stand for no text.
        byte_len = np.array(
            [0 if i in specials else len(tok.id_to_token_bytes(i)) for i in range(tok.n_vocab)],
            dtype=np.int64,
        )

    def batches():
        nonlocal text_bytes
        for i, b in enumerate(loader):
            check_batch(b, vocab, f"{' '.join(args.data)}: batch {i}")  # files without manifest
            if byte_len is not None:
                labels = b["labels"].numpy()
                scored = labels[labels != -100]
                if scored.size and scored.max() >= len(byte_len):
                    raise ValueError(
                        f"token id {scored.max()} is outside the tokenizer {tok_path} ({len(byte_len)} ids)"
                    )
                text_bytes += int(byte_len[scored].sum())
            yield b

    r = ev.perplexity(model, batches(), max_batches=args.max_batches)
    r["checkpoint"] = str(ckpt)
    if byte_len is not None and text_bytes:
        r["bits_per_byte"] = ev.bits_per_byte(r["loss"], r["tokens"], text_bytes)
        r["text_bytes"] = text_bytes
    if args.json:
        print(json.dumps(r))
    else:
        line = f"perplexity {r['perplexity']:.4f}  loss {r['loss']:.4f} nats/token  {r['tokens']:,} tokens"
        if "bits_per_byte" in r:
            line += f"  {r['bits_per_byte']:.4f} bits/byte"
        print(f"{line}  ({ckpt})")
    return 0


def _cmd_export_hf(args: argparse.Namespace) -> int:
    from tokenmill import hf

    hf.export(
        args.checkpoint,
        args.out,
        tokenizer=args.tokenizer,
        dtype=args.dtype,
        chat_template=args.chat_template,
        adapter=args.adapter,
        merge=args.merge,
        base_model=args.base_model,
    )
    how = (
        "peft.PeftModel.from_pretrained(base, OUT)"
        if args.adapter
        else "transformers.LlamaForCausalLM.from_pretrained"
    )
    print(f"wrote {args.out} (load with {how})")
    return 0


def _cmd_import_hf(args: argparse.Namespace) -> int:
    from tokenmill import hf

    out = hf.import_hf(args.hf_dir, args.out, dtype=args.dtype)
    print(f"wrote {out} (train.init_from = {str(out)!r}, or tm.model.Llama.from_checkpoint)")
    if hf.tokenizer_file(args.hf_dir) is None:  # allowed (the weights alone), but a user should know
        print(
            f"tokenmill import-hf: note: {args.hf_dir} has no tokenizer.json or tokenizer.model, so {out} has "
            "no tokenizer: give data.tokenizer to train and --tokenizer to export-hf",
            file=sys.stderr,
        )
    return 0


def _cmd_plan(args: argparse.Namespace) -> int:
    import json

    from tokenmill import plan

    for path in args.gpu_table or ():
        plan.load_gpu_table(path)
    model = args.model if args.model is not None else plan.parse_count(args.params)
    setups = [(args.gpu, args.gpus)] if args.gpu else []
    for item in (args.compare or "").split(","):
        if item.strip():
            setups.append(plan.parse_setup(item, default_gpus=args.gpus))
    if not setups:
        raise ValueError("give --gpu TYPE or --compare GPU[:K],...")
    kw = dict(
        mfu=args.mfu,
        tokens_per_gpu_s=args.tokens_per_gpu_s,
        from_log=args.from_log,
        usd_per_gpu_hour=args.usd_per_gpu_hour,
        seq_len=args.seq_len,
        micro_batch=args.micro_batch,
        precision=args.precision,
        fp8=args.fp8,
        optimizer=args.optimizer,
        checkpointing=args.checkpointing,
        offload=args.offload,
        sharding=args.sharding,
        finetune=args.finetune,
        lora_rank=args.lora_rank,
        flash_attention=not args.no_flash_attention,
        fused_loss=args.fused_loss,
    )
    tokens = args.tokens if args.tokens == "chinchilla" else plan.parse_count(args.tokens)
    estimates = plan.compare(model, tokens, setups, **kw)
    if args.json:
        out = [e.to_dict() for e in estimates]
        print(json.dumps(out[0] if len(out) == 1 and not args.compare else out, indent=2))
    elif len(estimates) == 1:
        print(plan.format_estimate(estimates[0]))
    else:
        e = estimates[0]
        print(
            f"{e.model}: {e.n_params / 1e9:.2f}B parameters, {e.tokens:.4g} tokens, {e.flops:.3e} FLOPs "
            f"(6N + 6*L*s*d), seq_len {e.seq_len}"
        )
        print(plan.format_table(estimates))
    return 0


def _print_manifest_summary(m: dict, output: str) -> None:
    skipped = m["skipped"]
    total = sum(skipped.values())
    print(
        f"{output}: {m['documents']:,} documents, {m['tokens']:,} tokens ({m['dtype']}) "
        f"from {len(m['inputs'])} files; skipped {total:,} records"
    )
    if total:
        print("  " + ", ".join(f"{k.replace('_', ' ')}: {v:,}" for k, v in skipped.items() if v))
        for e in m["errors"][:10]:
            print(f"  {e}")
        if total > 10:
            print(f"  ... (first {len(m['errors'])} listed in {output}.json)")


def _cmd_prepare(args: argparse.Namespace) -> int:
    dp = importlib.import_module("tokenmill.data.prepare")

    if args.merge:
        m = dp.merge(args.inputs, args.output)
        _print_manifest_summary(m, args.output)
        return 0
    if not args.tokenizer:
        print("tokenmill prepare: error: --tokenizer PATH is required", file=sys.stderr)
        return 2
    if args.shard_index >= args.num_shards:
        raise ValueError(f"--shard-index {args.shard_index} must be below --num-shards {args.num_shards}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the summary below reports skipped records
        m = dp.prepare(
            args.inputs,
            args.output,
            args.tokenizer,
            text_key=args.text_key,
            append_eos=not args.no_eos,
            num_workers=args.workers,
            on_error=args.on_error,
            num_shards=args.num_shards,
            shard_index=args.shard_index,
            delimiter=args.delimiter,
            input_format=args.format,
            eos_token=args.eos_token,
            progress=not args.quiet,
            chunk_bytes=args.chunk_bytes,
        )
    _print_manifest_summary(m, args.output)
    return 0


def _cmd_merge(args: argparse.Namespace) -> int:
    dp = importlib.import_module("tokenmill.data.prepare")

    m = dp.merge(args.shards, args.output)
    _print_manifest_summary(m, args.output)
    return 0


def _cmd_inspect(args: argparse.Namespace) -> int:
    dp = importlib.import_module("tokenmill.data.prepare")

    problems = dp.verify(args.prefix) if args.verify else []
    try:
        s = dp.inspect(args.prefix, top_k=args.top)
    except ValueError as e:
        if not args.verify:  # nothing else reports it: one error line (main prints it)
            raise
        s = None
        # verify() has usually named the same structural fault already
        problems += [line for line in str(e).splitlines() if line not in problems]
    if s is not None:
        m = s["manifest"]
        print(f"{args.prefix}: {s['documents']:,} documents, {s['tokens']:,} tokens, dtype {s['dtype']}")
        if m:
            print(
                f"  tokenizer {m['tokenizer']['fingerprint']} (n_vocab {m['tokenizer']['n_vocab']:,}), "
                f"eos {m['eos_id']}, {len(m['inputs'])} input files, "
                f"skipped {sum(m['skipped'].values()):,} records"
            )
        else:
            print("  no manifest (not made by tokenmill, or incomplete)")
        print(
            f"  document length: min {s['min_length']:,}, mean {s['mean_length']:.1f}, max {s['max_length']:,}"
        )
        peak = max((c for _, _, c in s["length_histogram"]), default=1)
        for lo, hi, c in s["length_histogram"]:
            bar = "#" * max(1, round(40 * c / peak))
            print(f"  {lo:>9,} - {hi - 1:<9,} {c:>10,} {bar}")
        decode = None
        if args.tokenizer:
            import tokenmill as tm

            tok = tm.Tokenizer.from_file(args.tokenizer)
            decode = lambda t: repr(tok.decode([t]))  # noqa: E731
        print("  top tokens:")
        for t, c in s["top_tokens"]:
            share = c / max(s["tokens"], 1)
            print(f"  {t:>9} {c:>12,} {share:7.2%}" + (f"  {decode(t)}" if decode else ""))
    if args.verify:
        if problems:
            print(f"{args.prefix}: verification FAILED", file=sys.stderr)
            for p in problems:
                print(f"  {p}", file=sys.stderr)
            return 1
        print(f"{args.prefix}: verified (checksums, index structure, counts, token ids)")
    return 1 if problems else 0


def _cmd_tokenizer_encode(args: argparse.Namespace) -> int:
    import numpy as np

    from tokenmill.tokenizer import Tokenizer

    tok = Tokenizer.from_file(args.tokenizer, pattern=args.pattern)
    if args.text is not None:
        text = args.text
    else:
        # bytes, decoded strictly: a text-mode read would replace bad bytes with U+FFFD silently (stdin)
        # or fail naming no file
        name = "<stdin>" if args.input in (None, "-") else args.input
        if name == "<stdin>":
            data = sys.stdin.buffer.read()
        else:
            with open(name, "rb") as f:
                data = f.read()
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as e:
            line = data.count(b"\n", 0, e.start) + 1
            raise ValueError(
                f"{name}:{line}: invalid UTF-8 (byte 0x{data[e.start]:02x} at offset {e.start})"
            ) from None
    ids = tok.encode_to_numpy(text, allowed_special="all" if args.allow_special else ())
    if args.out:
        from tokenmill._fsutil import write_atomic

        write_atomic(args.out, lambda f: np.save(f, ids))
        print(f"{len(ids)} tokens -> {args.out}", file=sys.stderr)
    else:
        print(" ".join(map(str, ids.tolist())))
    return 0


def _cmd_tokenizer_train(args: argparse.Namespace) -> int:
    import time

    from tokenmill.tokenizer import Tokenizer

    start = time.perf_counter()
    tok = Tokenizer.train_files(
        args.files,
        vocab_size=args.vocab_size,
        pattern=args.pattern,
        special_tokens=args.special_token,
        min_frequency=args.min_frequency,
        show_progress=not args.quiet,
        strict=args.strict,
    )
    if args.out.endswith(".json"):
        tok.save_huggingface(args.out)  # a tokenizer.json that transformers and `tokenizers` load
    else:
        tok.save(args.out)
    print(
        f"trained {tok.n_vocab} tokens ({len(tok.special_tokens)} special) on {len(args.files)} file(s) "
        f"in {time.perf_counter() - start:.1f}s -> {args.out}"
    )
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    if args.finetune or args.qlora:
        from tokenmill import demo_finetune

        return demo_finetune.main(args)
    from tokenmill import demo

    return demo.main(args)


def _add_plan_parser(sub) -> None:
    pl = sub.add_parser(
        "plan",
        help="compute, time, cost and memory of a training run",
        description="Training FLOPs, GPU-hours, days, dollars and per-GPU memory (with a fits / does not "
        "fit verdict and the smallest change that makes it fit). Formulas: tokenmill.plan's docstring.",
    )
    what = pl.add_mutually_exclusive_group(required=True)
    what.add_argument(
        "--model", help="preset: llama-7b, llama-13b, llama-30b, llama-65b, llama3-8b, llama-1b, ..."
    )
    what.add_argument("--params", type=_count, help="parameter count (13e9, 13B); a LLaMA shape is inferred")
    pl.add_argument(
        "--tokens",
        type=_count,
        required=True,
        help="training tokens (1e12, 1T, 1.4T) or 'chinchilla' (20/param)",
    )
    pl.add_argument("--gpu", help="GPU type (A100-80GB, H100, H200, L40S, RTX-4090, ...)")
    pl.add_argument("--gpus", type=_int_at_least(1), default=1, help="number of GPUs (default 1)")
    rate = pl.add_mutually_exclusive_group()
    rate.add_argument(
        "--mfu",
        type=_float_in(0, 1, lo_open=True, what="in (0, 1]"),
        help="assumed model FLOPs utilisation (default 0.40)",
    )
    rate.add_argument(
        "--tokens-per-gpu-s",
        type=_float_in(0, lo_open=True, what="> 0"),
        help="measured throughput, tokens/s per GPU",
    )
    rate.add_argument("--from-log", metavar="TRAIN.jsonl", help="a tokenmill train log: measured throughput")
    pl.add_argument(
        "--usd-per-gpu-hour",
        type=_float_in(0, what=">= 0"),
        help="price (default: the GPU table's indicative price)",
    )
    pl.add_argument(
        "--seq-len", type=_int_at_least(1), help="sequence length (default: the model's max_seq_len)"
    )
    pl.add_argument(
        "--micro-batch", type=_int_at_least(1), default=1, help="sequences per GPU per micro-step (default 1)"
    )
    pl.add_argument(
        "--compare", metavar="GPU[:K],...", help="several setups side by side, e.g. A100:64,H100:32"
    )
    pl.add_argument("--optimizer", choices=["adamw", "adamw-fused", "adamw8bit"], default="adamw")
    pl.add_argument("--precision", choices=["bf16-mixed", "bf16", "fp32"], default="bf16-mixed")
    pl.add_argument("--fp8", action="store_true", help="time against the GPU's fp8 peak")
    pl.add_argument("--checkpointing", action="store_true", help="full activation checkpointing per block")
    pl.add_argument("--offload", action="store_true", help="CPU offload of weights, grads, optimizer state")
    pl.add_argument("--sharding", choices=["fsdp", "ddp"], default="fsdp")
    pl.add_argument(
        "--finetune",
        choices=["full", "lora", "qlora"],
        help="fine-tuning instead of pre-training (qlora: LoRA on a 4-bit NF4 base)",
    )
    pl.add_argument("--lora-rank", type=_int_at_least(1), default=16)
    pl.add_argument("--fused-loss", action="store_true", help="fused linear-cross-entropy (no logits kept)")
    pl.add_argument("--no-flash-attention", action="store_true", help="math attention (saves s^2 probs)")
    pl.add_argument("--gpu-table", action="append", metavar="FILE", help="extra GPUs from a JSON/TOML file")
    pl.add_argument("--json", action="store_true", help="machine-readable output")
    pl.set_defaults(func=_cmd_plan)


def build_parser() -> argparse.ArgumentParser:
    from tokenmill.data.sft import TEMPLATES  # numpy and the core only

    p = argparse.ArgumentParser(prog="tokenmill", description=tokenmill.__doc__.splitlines()[0])
    p.add_argument("--version", action="version", version=f"tokenmill {tokenmill.__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    tok = sub.add_parser("tokenizer", help="train a BPE tokenizer or encode text with one")
    tok_sub = tok.add_subparsers(dest="tokenizer_command", metavar="ACTION")
    t = tok_sub.add_parser("train", help="train a byte-level BPE vocabulary on UTF-8 text files")
    t.add_argument("files", nargs="+", metavar="FILES", help="UTF-8 text files, each one document")
    t.add_argument(
        "--vocab-size",
        type=_int_at_least(256),
        required=True,
        help="total ids: 256 bytes + merges + specials",
    )
    t.add_argument(
        "--out",
        required=True,
        help="where to save: NAME.json writes a Hugging Face tokenizer.json (transformers loads it); any "
        "other name, tokenmill's own format (use .tokenmill)",
    )
    t.add_argument(
        "--pattern", default="llama3", help="gpt2, cl100k, o200k, llama3 or a regex (default llama3)"
    )
    t.add_argument(
        "--special-token", action="append", default=[], metavar="T", help="a special token (repeatable)"
    )
    t.add_argument(
        "--min-frequency",
        type=_int_at_least(0),
        default=2,
        help="merge only pairs seen this often (default 2)",
    )
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    t.add_argument(
        "--strict",
        action="store_true",
        help="refuse a pattern that leaves part of the corpus uncovered (default: warn)",
    )
    t.set_defaults(func=_cmd_tokenizer_train)
    enc = tok_sub.add_parser("encode", help="encode text to token ids (printed, or a uint32 .npy file)")
    enc.add_argument("input", nargs="?", help="UTF-8 text file ('-' or omitted: stdin)")
    enc.add_argument(
        "--tokenizer",
        required=True,
        help="tokenizer file in any format (Tokenizer.from_file): tokenmill, tokenizer.json, "
        "SentencePiece .model or tiktoken ranks",
    )
    enc.add_argument(
        "--pattern",
        help="pre-tokenization pattern of a tiktoken ranks file (gpt2, cl100k, o200k, llama3 or a regex; "
        "tiktoken's own r50k/p50k/cl100k/o200k_base files are recognised by name)",
    )
    enc.add_argument("--text", help="encode this string instead of a file")
    enc.add_argument(
        "--allow-special",
        action="store_true",
        help="encode special-token text as special tokens (default: it is an error)",
    )
    enc.add_argument("--out", help="write the ids as a uint32 .npy file instead of printing them")
    enc.set_defaults(func=_cmd_tokenizer_encode)

    def tokenizer_usage(_args: argparse.Namespace) -> int:
        tok.print_help()
        return USAGE_ERROR

    tok.set_defaults(func=tokenizer_usage)

    pr = sub.add_parser("prepare", help="tokenize corpora into Megatron-compatible .bin/.idx token files")
    pr.add_argument(
        "inputs", nargs="+", metavar="INPUT", help=".txt/.jsonl(.gz/.zst)/.parquet files, directories, globs"
    )
    pr.add_argument(
        "--tokenizer", metavar="PATH", help="a tokenizer file in any format (Tokenizer.from_file)"
    )
    pr.add_argument("--output", "-o", required=True, metavar="PREFIX", help="writes PREFIX.bin, .idx, .json")
    pr.add_argument(
        "--text-key", default="text", metavar="K", help="JSON key / Parquet column (default: text)"
    )
    pr.add_argument(
        "--on-error", choices=["skip", "fail"], default="skip", help="bad records (default: skip)"
    )
    pr.add_argument(
        "--workers", type=_int_at_least(1), metavar="N", help="tokenizer threads (default: all cores)"
    )
    pr.add_argument(
        "--num-shards",
        type=_int_at_least(1),
        default=1,
        metavar="N",
        help="partition the inputs into N shards",
    )
    pr.add_argument(
        "--shard-index", type=_int_at_least(0), default=0, metavar="I", help="prepare shard I (0-based)"
    )
    pr.add_argument("--delimiter", metavar="LINE", help="text files: documents separated by this line")
    pr.add_argument("--format", choices=["text", "jsonl", "parquet"], help="input format (default: by name)")
    pr.add_argument("--eos-token", metavar="TOKEN", help="special token appended to each document")
    pr.add_argument("--no-eos", action="store_true", help="do not append an end-of-document token")
    pr.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    pr.add_argument(
        "--chunk-bytes", type=_int_at_least(1), default=4 << 20, metavar="B", help=argparse.SUPPRESS
    )
    pr.add_argument(
        "--merge", action="store_true", help="INPUTs are shard prefixes: merge them into --output"
    )
    pr.set_defaults(func=_cmd_prepare)

    ins = sub.add_parser("inspect", help="statistics and integrity check of prepared token files")
    ins.add_argument("prefix", metavar="PREFIX")
    ins.add_argument(
        "--verify", action="store_true", help="re-check checksums and structure (exit 1 on mismatch)"
    )
    ins.add_argument(
        "--top", type=_int_at_least(0), default=10, metavar="K", help="most frequent tokens to list"
    )
    ins.add_argument("--tokenizer", metavar="PATH", help="decode the top tokens with this tokenizer")
    ins.set_defaults(func=_cmd_inspect)

    me = sub.add_parser("merge", help="concatenate prepared shards into one dataset")
    me.add_argument("shards", nargs="+", metavar="SHARD", help="shard prefixes (or globs), any order")
    me.add_argument("--output", "-o", required=True, metavar="PREFIX")
    me.set_defaults(func=_cmd_merge)

    _add_plan_parser(sub)

    ev = sub.add_parser(
        "eval", help="error rates between transcripts (wer, cer) or a checkpoint's perplexity on token files"
    )
    ev_sub = ev.add_subparsers(dest="metric", required=True, metavar="{wer,cer,perplexity}")
    for metric, unit in (("wer", "word"), ("cer", "character")):
        m = ev_sub.add_parser(metric, help=f"{unit} error rate between two line-aligned text files")
        m.add_argument("reference", help="reference transcript, one utterance per line")
        m.add_argument("hypothesis", help="hypothesis transcript, one utterance per line")
        m.add_argument("--lowercase", action="store_true", help="case-fold both sides first")
        m.add_argument("--remove-punctuation", action="store_true", help="drop Unicode punctuation first")
        m.add_argument("--collapse-whitespace", action="store_true", help="split words on any whitespace")
        m.set_defaults(func=_cmd_eval)
    pp = ev_sub.add_parser("perplexity", help="a checkpoint's perplexity (and bits per byte) on token files")
    pp.add_argument(
        "checkpoint", help="checkpoint folder (out_dir/checkpoints/step_N), or a run's out_dir (latest)"
    )
    pp.add_argument("data", nargs="+", help="token-file prefixes (from `tokenmill prepare`), each read once")
    pp.add_argument(
        "--seq-len", type=_int_at_least(1), help="tokens per row (default: the model's max_seq_len)"
    )
    pp.add_argument("--batch-size", type=_int_at_least(1), default=8)
    pp.add_argument(
        "--max-batches", type=_int_at_least(1), help="stop after this many batches (default: all the data)"
    )
    pp.add_argument("--device", help="cpu, cuda, cuda:1 (default: cuda when available)")
    pp.add_argument(
        "--tokenizer",
        help="tokenizer for bits per byte (default: the one recorded in the checkpoint, if any)",
    )
    pp.add_argument("--json", action="store_true", help="print one JSON object")
    pp.set_defaults(func=_cmd_perplexity)

    tr = sub.add_parser("train", help="pre-train or fine-tune a LLaMA model")
    tr.add_argument("config", help="the run's TOML file (see configs/example.toml)")
    tr.add_argument(
        "overrides",
        nargs=argparse.REMAINDER,
        help="--section.key=value overrides, e.g. --optim.lr=1e-3 --resume auto",
    )
    tr.set_defaults(func=_cmd_train)

    im = sub.add_parser("import-hf", help="convert a Hugging Face LLaMA/Mistral folder into a checkpoint")
    im.add_argument(
        "hf_dir", help="save_pretrained folder: config.json, *.safetensors, tokenizer.json/.model"
    )
    im.add_argument("out", help="new checkpoint folder (meta.json, model.safetensors, tokenizer)")
    im.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    im.set_defaults(func=_cmd_import_hf)

    ex = sub.add_parser("export-hf", help="export a checkpoint as a Hugging Face model folder")
    ex.add_argument("checkpoint", help="checkpoint folder (out_dir/checkpoints/step_N)")
    ex.add_argument("out", help="output folder (config.json, model.safetensors, tokenizer.json)")
    ex.add_argument("--tokenizer", help="tokenizer file (default: the one recorded in the checkpoint)")
    ex.add_argument(
        "--chat-template",
        choices=TEMPLATES,
        help="chat template for tokenizer_config.json (default: the SFT template the run trained on)",
    )
    ex.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    kind = ex.add_mutually_exclusive_group()
    kind.add_argument(
        "--adapter",
        action="store_true",
        help="LoRA checkpoint: write a PEFT adapter folder (adapter_config.json)",
    )
    kind.add_argument("--merge", action="store_true", help="LoRA checkpoint: write the merged full weights")
    ex.add_argument(
        "--base-model", help="--adapter: base_model_name_or_path (default: the base checkpoint's path)"
    )
    ex.set_defaults(func=_cmd_export_hf)

    demo = sub.add_parser("demo", help="run the end-to-end demo on built-in data")
    demo.add_argument(
        "--steps", type=_int_at_least(1), help="training steps (default: 150 on CPU, 600 on GPU)"
    )
    demo.add_argument(
        "--finetune",
        action="store_true",
        help="the fine-tuning demo: HF folder -> import-hf -> SFT with LoRA -> PEFT adapter + merged model",
    )
    demo.add_argument("--qlora", action="store_true", help="--finetune with the frozen base in NF4 (QLoRA)")
    demo.add_argument(
        "--out", default=None, help="output folder (default demo-out, or demo-finetune-out with --finetune)"
    )
    demo.set_defaults(func=_cmd_demo)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return USAGE_ERROR
    # "tokenmill eval perplexity", as argparse names the command in its usage errors.
    name = " ".join(
        ["tokenmill", args.command, *filter(None, [getattr(args, "tokenizer_command", None)])]
        + ([args.metric] if args.command == "eval" else [])
    )

    def one_line(message, category, filename, lineno, file=None, line=None):
        print(f"{name}: warning: {message}", file=sys.stderr)  # not Python's file:line and source line

    try:
        with warnings.catch_warnings():
            warnings.showwarning = one_line
            return int(args.func(args) or 0)
    except (ValueError, OSError) as e:
        print(f"{name}: error: {e}", file=sys.stderr)
        return 1
    except ModuleNotFoundError as e:  # an optional dependency: name the extra that brings it
        extra = extras.extra_of(e.name)
        if extra is None:
            raise
        hint = "" if isinstance(e, extras.MissingExtraError) else f": {extras.install_hint(extra)}"
        print(f"{name}: error: {e}{hint}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as e:
        print(f"{name}: {e or 'interrupted'}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
