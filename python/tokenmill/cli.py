"""The ``tokenmill`` console script (also ``python -m tokenmill``).

Each subcommand is one ``_cmd_*`` function; argument parsing lives in ``build_parser``.
"""

from __future__ import annotations

import argparse
import sys
from typing import Callable, Optional, Sequence

import tokenmill

NOT_BUILT = 2  # exit status of subcommands that do not exist yet


def _not_built(name: str) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        print(f"tokenmill {name}: not built yet in tokenmill {tokenmill.__version__}", file=sys.stderr)
        return NOT_BUILT

    return run


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
        print(
            f"tokenmill eval: {args.reference} has {len(refs)} lines but {args.hypothesis} has {len(hyps)}",
            file=sys.stderr,
        )
        return 1
    ops = ev.word_edit_ops if args.metric == "wer" else ev.char_edit_ops
    counts = ops(refs, hyps, **flags)
    rate = (ev.wer if args.metric == "wer" else ev.cer)(refs, hyps, **flags)
    print(
        f"{args.metric.upper()} {rate:.6f}  (hits {counts.hits}, substitutions {counts.substitutions}, "
        f"deletions {counts.deletions}, insertions {counts.insertions}; {len(refs)} lines)"
    )
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
    )
    tok.save(args.out)
    print(
        f"trained {tok.n_vocab} tokens ({len(tok.special_tokens)} special) on {len(args.files)} file(s) "
        f"in {time.perf_counter() - start:.1f}s -> {args.out}"
    )
    return 0


def _load_tokenizer(path: str, pattern: str):
    """By extension: tokenizer.json (Hugging Face), .model (SentencePiece), .tiktoken (+ --pattern),
    anything else tokenmill's own format."""
    from tokenmill.tokenizer import Tokenizer

    if path.endswith(".json"):
        return Tokenizer.from_huggingface(path)
    if path.endswith(".model"):
        return Tokenizer.from_sentencepiece(path)
    if path.endswith(".tiktoken"):
        return Tokenizer.from_tiktoken(path, pattern=pattern)
    return Tokenizer.load(path)


def _cmd_tokenizer_encode(args: argparse.Namespace) -> int:
    import os
    import tempfile

    import numpy as np

    tok = _load_tokenizer(args.tokenizer, args.pattern)
    if args.text is not None:
        text = args.text
    elif args.input in (None, "-"):
        text = sys.stdin.read()
    else:
        with open(args.input, encoding="utf-8") as f:
            text = f.read()
    ids = tok.encode_to_numpy(text, allowed_special="all" if args.allow_special else ())
    if args.out:
        # Atomic: a temporary beside the target, then rename.
        out_dir = os.path.dirname(os.path.abspath(args.out))
        fd, tmp = tempfile.mkstemp(dir=out_dir, prefix=".tokenmill-", suffix=".npy")
        try:
            with os.fdopen(fd, "wb") as f:
                np.save(f, ids)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, args.out)
        except BaseException:
            os.unlink(tmp)
            raise
        print(f"{len(ids)} tokens -> {args.out}", file=sys.stderr)
    else:
        print(" ".join(map(str, ids.tolist())))
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from tokenmill import demo

    return demo.main(args)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tokenmill", description=tokenmill.__doc__.splitlines()[0])
    p.add_argument("--version", action="version", version=f"tokenmill {tokenmill.__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    tok = sub.add_parser("tokenizer", help="train a BPE tokenizer or encode text with one")
    tok_sub = tok.add_subparsers(dest="tokenizer_command", metavar="ACTION")
    t = tok_sub.add_parser("train", help="train a byte-level BPE vocabulary on UTF-8 text files")
    t.add_argument("files", nargs="+", metavar="FILES", help="UTF-8 text files, each one document")
    t.add_argument("--vocab-size", type=int, required=True, help="total ids: 256 bytes + merges + specials")
    t.add_argument("--out", required=True, help="where to save the tokenizer (Tokenizer.save format)")
    t.add_argument(
        "--pattern", default="llama3", help="gpt2, cl100k, o200k, llama3 or a regex (default llama3)"
    )
    t.add_argument(
        "--special-token", action="append", default=[], metavar="T", help="a special token (repeatable)"
    )
    t.add_argument(
        "--min-frequency", type=int, default=2, help="merge only pairs seen this often (default 2)"
    )
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    t.set_defaults(func=_cmd_tokenizer_train)
    enc = tok_sub.add_parser("encode", help="encode text to token ids (printed, or a uint32 .npy file)")
    enc.add_argument("input", nargs="?", help="UTF-8 text file ('-' or omitted: stdin)")
    enc.add_argument(
        "--tokenizer",
        required=True,
        help="tokenizer file: tokenmill format, tokenizer.json, .model or .tiktoken",
    )
    enc.add_argument("--pattern", default="cl100k", help="pattern for a .tiktoken file (default cl100k)")
    enc.add_argument("--text", help="encode this string instead of a file")
    enc.add_argument(
        "--allow-special",
        action="store_true",
        help="encode special-token text as special tokens (default: it is an error)",
    )
    enc.add_argument("--out", help="write the ids as a uint32 .npy file instead of printing them")
    enc.set_defaults(func=_cmd_tokenizer_encode)
    tok.set_defaults(func=lambda a: (tok.print_help(), NOT_BUILT)[1])

    for name, help_text in (
        ("prepare", "tokenize corpora into Megatron-compatible .bin/.idx token files"),
        ("inspect", "statistics and integrity check of prepared token files"),
        ("merge", "concatenate prepared shards into one dataset"),
        ("train", "pre-train or fine-tune a LLaMA model"),
        ("export-hf", "export a checkpoint as a Hugging Face model folder"),
        ("plan", "compute, time, cost and memory of a training run"),
    ):
        s = sub.add_parser(name, help=help_text)
        s.set_defaults(func=_not_built(name))

    ev = sub.add_parser("eval", help="word/character error rate between two line-aligned text files")
    ev.add_argument("metric", choices=["wer", "cer"])
    ev.add_argument("reference", help="reference transcript, one utterance per line")
    ev.add_argument("hypothesis", help="hypothesis transcript, one utterance per line")
    ev.add_argument("--lowercase", action="store_true", help="case-fold both sides first")
    ev.add_argument("--remove-punctuation", action="store_true", help="drop Unicode punctuation first")
    ev.add_argument("--collapse-whitespace", action="store_true", help="split words on any whitespace")
    ev.set_defaults(func=_cmd_eval)

    demo = sub.add_parser("demo", help="run the end-to-end demo on built-in data")
    demo.set_defaults(func=_cmd_demo)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return NOT_BUILT
    try:
        return int(args.func(args) or 0)
    except (ValueError, OSError) as e:
        print(f"tokenmill {args.command}: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
