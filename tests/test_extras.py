"""Optional dependencies and experiment trackers: pyproject's extras are the one list and match what the
code imports; a missing optional package skips the plot with one notice or refuses before any work,
naming the extra; TensorBoard (read back with its own event reader) and offline W&B get log.jsonl."""

import ast
import json
import re
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from test_trainer import Batches, Interrupt, config, make_batches
from tokenmill import extras
from tokenmill import train as T
from tokenmill.config import TRACKERS

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

REPO = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
# distribution name -> import name, where they differ
IMPORT_NAME = {"cupy-cuda13x": "cupy"}


def _name(requirement: str) -> str:
    return re.match(r"[A-Za-z0-9_.-]+", requirement).group(0).lower()


def test_extras_table_is_pyproject():
    """tokenmill.extras maps exactly pyproject's extras to the modules their packages provide, and
    `all` is every other extra."""
    declared = PYPROJECT["optional-dependencies"]
    assert set(declared) == set(extras.EXTRAS) | {"all"}
    for extra, reqs in declared.items():
        if extra != "all":
            assert tuple(IMPORT_NAME.get(_name(r), _name(r)) for r in reqs) == extras.EXTRAS[extra], extra
    (everything,) = declared["all"]
    assert everything == f"tokenmill[{','.join(extras.EXTRAS)}]"
    assert set(TRACKERS) == set(extras.EXTRAS["track"])
    make_extras = re.search(r"^EXTRAS \?= (\S+)$", (REPO / "Makefile").read_text(), re.M).group(1)
    assert make_extras.split(",") == list(extras.EXTRAS)  # `make develop` installs every extra


def _third_party_imports() -> dict[str, set[str]]:
    """Top-level modules imported anywhere in python/tokenmill that are neither stdlib nor tokenmill
    (imports under ``if TYPE_CHECKING:`` are for the type checker only and do not count)."""
    stdlib = set(getattr(sys, "stdlib_module_names", ())) or pytest.skip("needs Python 3.10+")
    found: dict[str, set[str]] = {}
    for path in (REPO / "python" / "tokenmill").rglob("*.py"):
        tree = ast.parse(path.read_text(), str(path))
        typing_only = {
            id(n)
            for block in ast.walk(tree)
            if isinstance(block, ast.If)
            and ast.unparse(block.test) in ("TYPE_CHECKING", "typing.TYPE_CHECKING")
            for stmt in block.body
            for n in ast.walk(stmt)
        }
        for node in ast.walk(tree):
            if id(node) in typing_only:
                continue
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            for n in names:
                top = n.partition(".")[0]
                if top not in stdlib and top != "tokenmill":
                    found.setdefault(top, set()).add(path.name)
    return found


def test_every_import_is_declared():
    """What the package imports is a core dependency or in an extra; each extra's modules are used;
    requirements-dev.txt repeats none of it (one source)."""
    core = {_name(r) for r in PYPROJECT["dependencies"]}
    imported = _third_party_imports()
    assert "numpy" in imported and "torch" in imported  # the scan sees imports at all
    for module, files in imported.items():
        assert module in core or extras.extra_of(module), f"{module} (imported by {files}) is not declared"
    for extra, modules in extras.EXTRAS.items():
        for m in modules:  # tensorboard is reached through torch.utils.tensorboard
            assert m in imported or m == "tensorboard", f"the {extra} extra installs {m}, never imported"
    dev = {_name(ln) for ln in (REPO / "requirements-dev.txt").read_text().splitlines() if ln[:1].isalnum()}
    runtime = core | {_name(r) for reqs in PYPROJECT["optional-dependencies"].values() for r in reqs}
    assert not dev & runtime, f"requirements-dev.txt repeats {dev & runtime}: they belong in pyproject.toml"
    assert not (REPO / "requirements.txt").exists()


def test_require_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb now raises ImportError
    extras.require("track", "x", modules=["tensorboard"])
    with pytest.raises(
        extras.MissingExtraError, match=r"log needs wandb, not installed: pip install 'tokenmill\[track\]'"
    ):
        extras.require("track", "log")
    assert extras.extra_of("cupy.cuda.nvrtc") == "cuda" and extras.extra_of("numpy") is None


# ------------------------------------------------------------------------------------- hidden packages

OPTIONAL = ("matplotlib", "tensorboard", "wandb", "pyarrow", "cupy")
HIDE = """
import importlib.abc, sys
HIDDEN = set(sys.argv.pop(1).split(","))
class Hide(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in HIDDEN:
            raise ModuleNotFoundError(f"No module named {name!r} (hidden by the test)", name=name)
sys.meta_path.insert(0, Hide())
for m in HIDDEN:
    try:
        __import__(m)
        raise SystemExit(f"{m} is not hidden")
    except ImportError:
        pass
"""


def run_hidden(code: str, tmp_path: Path, *args: str, hidden=OPTIONAL) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter where importing any of ``hidden`` fails as if not installed."""
    script = tmp_path / "hidden.py"
    tests = str(Path(__file__).parent)
    script.write_text(f"import sys; sys.path.insert(0, {tests!r})\n" + HIDE + textwrap.dedent(code))
    return subprocess.run(
        [sys.executable, str(script), ",".join(hidden), *args], capture_output=True, text=True, timeout=600
    )


def test_trainer_runs_with_optional_packages_hidden(tmp_path):
    """matplotlib, tensorboard, wandb, pyarrow and cupy missing: training runs to its end and saves its
    checkpoint; the plot is skipped with one notice; a run with a tracker refuses before any work."""
    r = run_hidden(
        f"""
        import json, os
        from pathlib import Path
        from tokenmill import extras, train as T
        from test_trainer import Batches, make_batches, config
        tmp = Path({str(tmp_path)!r})
        cfg = config(tmp, "--train.steps=6", "--train.eval_every=2", "--train.eval_batches=1")
        h = T.train(cfg, Batches(make_batches(3)), Batches(make_batches(1, seed=1)))
        assert sum("val_loss" in x for x in h) == 3
        for trackers in (["tensorboard"], ["wandb"]):
            cfg = config(tmp / trackers[0], f"--log.trackers={{trackers}}")
            try:
                T.train(cfg, Batches(make_batches(3)))
                raise SystemExit("a missing tracker did not stop the run")
            except extras.MissingExtraError as e:
                print("REFUSED", e)
            assert not (tmp / trackers[0]).exists(), "work was done before the refusal"
        """,
        tmp_path,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    out = r.stdout + r.stderr
    assert out.count("no loss plot: matplotlib is not installed (pip install 'tokenmill[plot]')") == 1, out
    run = tmp_path / "run"
    assert not (run / "loss.png").exists()
    assert [json.loads(ln)["step"] for ln in (run / "log.jsonl").read_text().splitlines()] == list(
        range(1, 7)
    )
    assert T.latest_checkpoint(str(run)).name == "step_00000006"
    refusals = [ln for ln in r.stdout.splitlines() if ln.startswith("REFUSED")]
    assert len(refusals) == 2 and all("pip install 'tokenmill[track]'" in ln for ln in refusals)
    assert "tensorboard" in refusals[0] and "wandb" in refusals[1]


def test_hf_trainer_without_transformers_names_the_extra(tmp_path):
    """`tm.data.hf` (transformers' Trainer) without transformers: MissingExtraError naming tokenmill[hf] at
    import, not a bare ModuleNotFoundError; the rest of tm.data still imports."""
    r = run_hidden(
        """
        import tokenmill as tm
        from tokenmill import extras
        tm.data.DataLoader  # the loader needs no transformers
        try:
            tm.data.hf
            raise SystemExit("tm.data.hf imported without transformers")
        except extras.MissingExtraError as e:
            print("REFUSED", e)
        """,
        tmp_path,
        hidden=("transformers",),
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert "REFUSED" in r.stdout and "pip install 'tokenmill[hf]'" in r.stdout, r.stdout


def test_cli_refuses_naming_the_extra(tmp_path):
    """Through the console script: exit status 1 and one line naming the extra, no traceback, no output."""
    from tokenmill import Tokenizer

    tok = Tokenizer.train(
        ["hello world"] * 20, vocab_size=300, pattern="gpt2", special_tokens=["<|endoftext|>"]
    )
    tok.save(str(tmp_path / "tok.json"))
    (tmp_path / "a.parquet").write_bytes(b"PAR1")
    (tmp_path / "b.jsonl").write_text('{"text": "hello"}\n')
    cli = "import sys; from tokenmill.cli import main; sys.exit(main(sys.argv[1:]))"
    r = run_hidden(cli, tmp_path, "prepare", str(tmp_path / "b.jsonl"), str(tmp_path / "a.parquet"),
                   "--tokenizer", str(tmp_path / "tok.json"), "-o", str(tmp_path / "out"))  # fmt: skip
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert "reading Parquet" in r.stderr and "pip install 'tokenmill[data]'" in r.stderr
    assert not list(tmp_path.glob("out*"))
    (tmp_path / "run.toml").write_text(
        f'[run]\nout_dir = "{tmp_path / "run"}"\n[log]\ntrackers = ["wandb"]\n'
    )
    r = run_hidden(cli, tmp_path, "train", str(tmp_path / "run.toml"), "--data.train=x")
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert "wandb" in r.stderr and "pip install 'tokenmill[track]'" in r.stderr
    assert not (tmp_path / "run").exists()


def test_core_commands_need_numpy_alone(tmp_path):
    """With torch and every extra hidden, what README lists under no extra works; train and demo
    refuse, naming tokenmill[train]."""
    (tmp_path / "a.txt").write_text("the quick brown fox jumps over the lazy dog\n" * 50)
    (tmp_path / "a.jsonl").write_text('{"text": "the quick brown fox"}\n' * 5)
    (tmp_path / "hyp.txt").write_text("the quick brown fox jumps over a lazy dog\n" * 50)
    r = run_hidden(
        """
        from tokenmill.cli import main
        for argv in sys.argv[1:]:
            print("RC", argv.split()[0], main(argv.split()), flush=True)
        """,
        tmp_path,
        f"tokenizer train {tmp_path}/a.txt --vocab-size 300 --special-token <|endoftext|> --out {tmp_path}/t.json --quiet",
        f"prepare {tmp_path}/a.jsonl --tokenizer {tmp_path}/t.json -o {tmp_path}/d -q",
        f"inspect {tmp_path}/d --verify",
        "plan --model llama-13b --tokens chinchilla --gpu H100 --gpus 64",
        f"eval wer {tmp_path}/a.txt {tmp_path}/hyp.txt",
        f"train {REPO}/configs/example.toml",
        f"demo --out {tmp_path}/demo",
        hidden=(*OPTIONAL, "torch", "safetensors", "tqdm"),
    )
    assert "Traceback" not in r.stderr, r.stderr
    rcs = dict(ln.split()[1:] for ln in r.stdout.splitlines() if ln.startswith("RC "))
    assert rcs == {k: "0" for k in ("tokenizer", "prepare", "inspect", "plan", "eval")} | {
        "train": "1",
        "demo": "1",
    }
    assert "WER 0.111111" in r.stdout and "fits" in r.stdout
    assert r.stderr.count("pip install 'tokenmill[train]'") == 2, r.stderr
    assert not (tmp_path / "demo").exists()


# ------------------------------------------------------------------------------------------- trackers


def read_tensorboard(logdir: Path) -> dict[str, dict[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}


def read_wandb(run_file: Path) -> dict[int, dict]:
    """History rows of an offline W&B run file: a LevelDB-style log (32 KiB blocks, 7-byte record
    headers) of wandb_internal.proto Records, after a 7-byte ':W&B' file header."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = run_file.read_bytes()
    assert data[:4] == b":W&B"
    rows, pos, block, part = {}, 7, 32768, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, n, kind = struct.unpack("<IHB", data[pos : pos + 7])
        part += data[pos + 7 : pos + 7 + n]
        pos += 7 + n
        if kind in (1, 4):  # a full record, or the last piece of one
            rec = pb.Record()
            rec.ParseFromString(part)
            part = b""
            if rec.WhichOneof("record_type") == "history":
                row = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in rec.history.item}
                rows.setdefault(rec.history.step.num, {}).update(row)
    return rows


def test_trackers_get_what_log_jsonl_gets(tmp_path, monkeypatch):
    """TensorBoard and offline W&B (no network) receive each log.jsonl record's numbers at its step; a
    resumed run leaves TensorBoard with each step once (the interrupted run's extra steps purged)."""
    pytest.importorskip("tensorboard")
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    data, val = make_batches(4), make_batches(1, seed=1)
    opts = ["--log.trackers=['tensorboard', 'wandb']", "--train.steps=6", "--train.eval_every=4",
            "--train.eval_batches=1", "--train.log_every=2", "--checkpoint.every=3"]  # fmt: skip

    def stop_at_5(step, record):
        if step == 5:
            raise Interrupt

    cfg = config(tmp_path, *opts)
    with pytest.raises(Interrupt):
        T.train(cfg, Batches(data), Batches(val), on_step=stop_at_5)
    cfg.checkpoint.resume = "auto"
    T.train(cfg, Batches(data), Batches(val))

    run = tmp_path / "run"
    log = [json.loads(ln) for ln in (run / "log.jsonl").read_text().splitlines()]
    # log_every 2 and eval_every 4 (and the last step): steps 2, 4 (+ val), 6 (+ val)
    assert [r["step"] for r in log] == [2, 4, 6] and "val_loss" in log[1] and "val_loss" in log[2]
    expected: dict[str, dict[int, float]] = {}
    for r in log:
        for k, v in r.items():
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool):
                expected.setdefault(k, {})[r["step"]] = v
    assert {"loss", "lr", "grad_norm", "tokens", "tokens_per_s", "val_loss"} <= set(expected)

    tb = read_tensorboard(run / "tensorboard")
    assert set(tb) == set(expected)
    for k, by_step in expected.items():
        assert tb[k] == pytest.approx(by_step, rel=1e-6), k  # float32 in the event files

    runs = sorted((run / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 2  # the interrupted run and the resumed one
    rows = {**read_wandb(runs[0]), **read_wandb(runs[1])}  # the resumed run's step 6 wins
    rows = {s: row for s, row in rows.items() if s in (2, 4, 6)}
    for k, by_step in expected.items():
        assert {s: row[k] for s, row in rows.items() if k in row} == pytest.approx(by_step, rel=1e-12), k
