"""Every subcommand, given bad values, exits non-zero with one `tokenmill ...: error: ...` line naming the
flag, key or file, and never a traceback: a table run through `tokenmill.cli.main` (what
`python -m tokenmill` runs), then one bad invocation per subcommand as a real `python -m tokenmill`."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import numpy as np
import pytest
import tokenmill as tm
from tokenmill import cli
from tokenmill.data.dataset import write_token_file


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    (d / "a.txt").write_text("hello world\n" * 50)
    (d / "ref.txt").write_text("a b c\nd e\n")
    (d / "hyp.txt").write_text("a b c\n")
    tok = tm.Tokenizer.from_tiktoken([bytes([b]) for b in range(256)], special_tokens=["<|endoftext|>"])
    tok.save(str(d / "tok.tokenmill"))
    tm.Tokenizer.from_tiktoken([bytes([b]) for b in range(256)]).save(str(d / "noeos.tokenmill"))
    (d / "pyfiles").mkdir()
    (d / "pyfiles" / "a.py").write_text("print('not a known input format')\n")
    write_token_file(d / "data", [list(range(1, 60)), list(range(5, 90))], dtype="uint16")
    write_token_file(d / "torn", [list(range(1, 60))], dtype="uint16")
    write_token_file(d / "wide", [list(range(250, 300))], dtype="int32")  # ids past the tiny model's 257
    write_token_file(d / "neg", [[5, 6, 7, 8]], dtype="int32")
    np.array([5, -3, 7, 8], np.int32).tofile(d / "neg.bin")  # a signed file holding a negative value
    (d / "big.json").write_text(json.dumps({"tokenizer": {"n_vocab": 600, "fingerprint": "x"}}))
    write_token_file(d / "big", [list(range(1, 60))], dtype="uint16")
    idx = (d / "torn.idx").read_bytes()
    (d / "torn.idx").write_bytes(idx[:-3])  # a truncated index
    # A checkpoint folder as Llama.from_checkpoint reads it: meta.json + model.safetensors.
    from safetensors.torch import save_file
    from tokenmill.model import Llama, LlamaConfig

    cfg = LlamaConfig.preset("tiny", vocab_size=257)
    (d / "ckpt").mkdir()
    save_file(Llama(cfg).state_dict(), str(d / "ckpt" / "model.safetensors"))
    (d / "ckpt" / "meta.json").write_text(json.dumps({"model": cfg.to_dict()}))
    (d / "empty.toml").write_text("")
    return d


def cases(d):
    """(argv, what the error line must name)."""
    plan = ["plan", "--model", "llama-7b", "--tokens", "1T", "--gpu", "H100"]
    pp = ["eval", "perplexity", str(d / "ckpt"), str(d / "data")]
    train = ["train", str(d / "empty.toml"), f"--run.out_dir={d / 'run'}", "--run.device=cpu"]
    train += ["--model.preset=tiny", f"--data.train=['{d / 'data'}']", "--data.seq_len=16"]
    out = str(d / "out")
    prep = ["prepare", "--tokenizer", str(d / "tok.tokenmill"), "-o", out]
    return [
        (["tokenizer", "train", str(d / "a.txt"), "--vocab-size", "10", "--out", out], "--vocab-size"),
        (
            [
                "tokenizer",
                "train",
                str(d / "a.txt"),
                "--vocab-size",
                "300",
                "--out",
                str(d / "nodir" / "t.json"),
            ],
            f"{d / 'nodir'}: no such directory (writing {d / 'nodir' / 't.json'})",
        ),
        (["tokenizer", "train", str(d / "a.txt"), "--vocab-size", "ten", "--out", out], "--vocab-size"),
        (
            [
                "tokenizer",
                "train",
                str(d / "a.txt"),
                "--vocab-size",
                "300",
                "--min-frequency",
                "-1",
                "--out",
                out,
            ],
            "--min-frequency",
        ),
        (
            [
                "tokenizer",
                "train",
                str(d / "a.txt"),
                "--vocab-size",
                "257",
                "--special-token",
                "<a>",
                "--special-token",
                "<b>",
                "--out",
                out,
            ],
            "vocab_size 257",
        ),
        (["tokenizer", "train", str(d / "nope.txt"), "--vocab-size", "300", "--out", out], "nope.txt"),
        (["tokenizer", "encode", "--tokenizer", str(d / "nope.tokenmill"), "--text", "hi"], "nope.tokenmill"),
        (
            [
                "prepare",
                str(d / "a.txt"),
                "--tokenizer",
                str(d / "tok.tokenmill"),
                "-o",
                out,
                "--workers",
                "0",
            ],
            "--workers",
        ),
        (
            [
                "prepare",
                str(d / "a.txt"),
                "--tokenizer",
                str(d / "tok.tokenmill"),
                "-o",
                out,
                "--num-shards",
                "0",
            ],
            "--num-shards",
        ),
        (
            [
                "prepare",
                str(d / "a.txt"),
                "--tokenizer",
                str(d / "tok.tokenmill"),
                "-o",
                out,
                "--num-shards",
                "2",
                "--shard-index",
                "2",
            ],
            "--shard-index",
        ),
        (
            [
                "prepare",
                str(d / "a.txt"),
                "--tokenizer",
                str(d / "tok.tokenmill"),
                "-o",
                out,
                "--shard-index",
                "-1",
            ],
            "--shard-index",
        ),
        (["prepare", str(d / "a.txt"), "-o", out], "--tokenizer"),
        (["prepare", str(d / "nope*.txt"), "--tokenizer", str(d / "tok.tokenmill"), "-o", out], "nope*.txt"),
        ([*prep, str(d / "pyfiles")], "pyfiles: directory holds no input files"),
        ([*prep, str(d / "pyfiles" / "a.py")], "--format"),
        (["prepare", str(d / "a.txt"), "--tokenizer", str(d / "noeos.tokenmill"), "-o", out], "--eos-token"),
        (
            ["prepare", str(d / "a.txt"), "--tokenizer", str(d / "pyfiles"), "-o", out],
            "pyfiles: is a directory",
        ),
        ([*prep, str(d / "a.txt"), "-o", str(d / "pyfiles") + "/"], "names a directory"),
        (["inspect", str(d / "data"), "--top", "-5"], "--top"),
        (["inspect", str(d / "nope")], "nope"),
        (["inspect", str(d / "torn")], "torn.idx: truncated"),
        (["merge", str(d / "nope*"), "-o", out], "nope*"),
        ([*plan, "--gpus", "0"], "--gpus"),
        ([*plan, "--mfu", "1.5"], "--mfu"),
        ([*plan, "--mfu", "0"], "--mfu"),
        ([*plan, "--mfu", "nan"], "--mfu"),
        ([*plan, "--tokens-per-gpu-s", "-3"], "--tokens-per-gpu-s"),
        ([*plan, "--usd-per-gpu-hour", "-1"], "--usd-per-gpu-hour"),
        ([*plan, "--seq-len", "0"], "--seq-len"),
        ([*plan, "--micro-batch", "0"], "--micro-batch"),
        ([*plan, "--finetune", "lora", "--lora-rank", "0"], "--lora-rank"),
        (["plan", "--model", "llama-7b", "--tokens=-1T", "--gpu", "H100"], "--tokens"),
        (["plan", "--model", "llama-7b", "--tokens", "0", "--gpu", "H100"], "--tokens"),
        (["plan", "--params", "lots", "--tokens", "1T", "--gpu", "H100"], "--params"),
        (["plan", "--model", "gpt5", "--tokens", "1T", "--gpu", "H100"], "gpt5"),
        (["plan", "--model", "llama-7b", "--tokens", "1T", "--gpu", "TPU9"], "TPU9"),
        (["plan", "--model", "llama-7b", "--tokens", "1T", "--compare", "H100:0"], "H100:0"),
        (["plan", "--model", "llama-7b", "--tokens", "1T"], "--gpu"),
        (["eval", "wer", str(d / "ref.txt"), str(d / "hyp.txt")], "hyp.txt"),
        (["eval", "cer", str(d / "ref.txt"), str(d / "nope.txt")], "nope.txt"),
        ([*pp, "--seq-len", "0"], "--seq-len"),
        ([*pp, "--batch-size", "0"], "--batch-size"),
        ([*pp, "--max-batches", "0"], "--max-batches"),
        ([*pp, "--device", "tpu"], "--device"),
        ([*pp, "--seq-len", "100000"], "--seq-len"),
        (["eval", "perplexity", str(d / "nope"), str(d / "data")], "nope"),
        (
            ["eval", "perplexity", str(d / "ckpt"), str(d / "big")],
            "big: tokenized with a 600-token vocabulary",
        ),
        (
            ["eval", "perplexity", str(d / "ckpt"), str(d / "wide")],
            "wide: batch 0: token id 299 >= model.vocab_size",
        ),
        (
            ["eval", "perplexity", str(d / "ckpt"), str(d / "neg"), "--seq-len", "2"],
            "token id -3 is negative",
        ),
        (["eval", "perplexity", str(d / "ckpt"), str(d / "nodata")], "nodata"),
        ([*train, "--checkpoint.keep=0"], "checkpoint.keep"),
        ([*train, "--optim.warmup_steps=-10"], "optim.warmup_steps"),
        ([*train, "--optim.min_lr=1"], "optim.min_lr"),
        ([*train, "--optim.beta2=1.0"], "optim.beta2"),
        ([*train, "--optim.eps=0"], "optim.eps"),
        ([*train, "--optim.grad_clip=-1"], "optim.grad_clip"),
        ([*train, "--train.log_every=0"], "train.log_every"),
        ([*train, "--train.eval_every=-1"], "train.eval_every"),
        ([*train, "--model.n_layers=0"], "n_layers"),
        ([*train, "--data.train=['nope']"], "data.train"),
        ([*train, "--data.val=['nope']"], "data.val"),
        ([*train, f"--resume={d / 'nope'}"], "nope"),
        (["train", str(d / "nope.toml")], "nope.toml"),
        (["export-hf", str(d / "nope"), out], "nope"),
        (["demo", "--steps", "0"], "--steps"),
    ]


ERROR_LINE = re.compile(r"^tokenmill( [a-z-]+)*: error: .+")


def check(rc, err: str, names: str) -> None:
    assert rc not in (0, None), err
    assert "Traceback" not in err
    errors = [ln for ln in err.splitlines() if "error:" in ln]
    assert len(errors) == 1 and ERROR_LINE.match(errors[0]), err
    assert errors[0] == err.strip().splitlines()[-1]  # the last thing said
    assert names in errors[0], err


def test_bad_values_in_process(paths, capsys):
    for argv, names in cases(paths):
        try:
            rc = cli.main(argv)
        except SystemExit as e:  # argparse: a usage error
            rc = e.code
        check(rc, capsys.readouterr().err, names)


def test_each_subcommand_as_python_m_tokenmill(paths):
    by_command = {}
    for argv, names in cases(paths):
        key = " ".join(argv[:2]) if argv[0] in ("tokenizer", "eval") else argv[0]
        by_command.setdefault(key, (argv, names))
    assert set(by_command) == {
        "tokenizer train",
        "tokenizer encode",
        "prepare",
        "inspect",
        "merge",
        "plan",
        "eval wer",
        "eval cer",
        "eval perplexity",
        "train",
        "export-hf",
        "demo",
    }
    procs = [
        (
            subprocess.Popen([sys.executable, "-m", "tokenmill", *argv], stderr=subprocess.PIPE, text=True),
            names,
        )
        for argv, names in by_command.values()
    ]
    for p, names in procs:
        _, err = p.communicate(timeout=600)
        check(p.returncode, err, names)


@pytest.mark.parametrize(
    "env,names", [({"WORLD_SIZE": "two"}, "WORLD_SIZE='two'"), ({"RANK": "2", "WORLD_SIZE": "2"}, "RANK=2")]
)
def test_bad_torchrun_environment(paths, monkeypatch, capsys, env, names):
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    train = [a for a, _ in cases(paths) if a[0] == "train"][0][:7]  # the valid base of the train cases
    check(cli.main(train), capsys.readouterr().err, names)


def test_inspect_verify_names_each_problem_once(paths, tmp_path, capsys):
    tm.data.prepare(paths / "a.txt", tmp_path / "ds", str(paths / "tok.tokenmill"))
    idx = (tmp_path / "ds.idx").read_bytes()
    (tmp_path / "ds.idx").write_bytes(idx[:-3])
    assert cli.main(["inspect", str(tmp_path / "ds"), "--verify"]) == 1
    err = capsys.readouterr().err.splitlines()
    assert err[0].endswith("verification FAILED") and any("truncated" in ln for ln in err)
    assert len(err) == len(set(err)), err
