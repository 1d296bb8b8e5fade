"""The package as a user meets it: import, version, console script, wheel tags."""

import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import tokenmill
from tokenmill import cli


def test_version():
    assert re.fullmatch(r"\d+\.\d+\.\d+.*", tokenmill.__version__)
    assert tokenmill._core.__version__ == tokenmill.__version__


def test_typed_package():
    root = Path(tokenmill.__file__).parent
    assert (root / "py.typed").exists()
    assert (root / "_core.pyi").exists()
    stub = (root / "_core.pyi").read_text()
    for name in dir(tokenmill._core):
        if not name.startswith("_"):
            assert f"def {name}(" in stub or f"class {name}" in stub, (
                f"_core.{name} is missing from _core.pyi"
            )


def run_cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "tokenmill", *args], capture_output=True, text=True, timeout=120
    )


def test_cli_help_and_version():
    r = run_cli("--help")
    assert r.returncode == 0
    for sub in ("tokenizer", "prepare", "inspect", "train", "export-hf", "plan", "eval", "demo"):
        assert sub in r.stdout
    r = run_cli("--version")
    assert r.returncode == 0 and tokenmill.__version__ in r.stdout


def _leaf_commands(parser, path=()):
    """(path, parser) of every subcommand that runs something, nested ones included."""
    subs = parser._subparsers
    if subs is None:
        yield path, parser
        return
    for name, sub in subs._group_actions[0].choices.items():
        yield from _leaf_commands(sub, (*path, name))


def test_every_subcommand_is_built():
    leaves = list(_leaf_commands(cli.build_parser()))
    assert {p[0] for p, _ in leaves} >= {"tokenizer", "prepare", "train", "plan", "eval", "demo"}
    assert {("eval", "perplexity"), ("tokenizer", "train")} <= {p for p, _ in leaves}
    for path, sub in leaves:
        assert sub.get_default("func") is not None, path
        r = run_cli(*path, "--help")
        assert r.returncode == 0 and "usage: tokenmill" in r.stdout, (path, r.stderr)
    assert cli.main([]) == 2  # no subcommand: usage error


def test_cli_eval(tmp_path):
    (tmp_path / "ref.txt").write_text("the cat sat on the mat\nhello world\n")
    (tmp_path / "hyp.txt").write_text("the cat sit on mat\nhello world\n")
    r = run_cli("eval", "wer", str(tmp_path / "ref.txt"), str(tmp_path / "hyp.txt"))
    assert r.returncode == 0, r.stderr
    assert "WER 0.250000" in r.stdout
    (tmp_path / "short.txt").write_text("one line\n")
    r = run_cli("eval", "wer", str(tmp_path / "ref.txt"), str(tmp_path / "short.txt"))
    assert r.returncode == 1 and "has 2 lines" in r.stderr
    r = run_cli("eval", "cer", str(tmp_path / "missing.txt"), str(tmp_path / "hyp.txt"))
    assert r.returncode == 1 and "missing.txt" in r.stderr


@pytest.mark.slow
def test_wheel_is_abi3(tmp_path):
    """`maturin build` yields one abi3 wheel for CPython >= 3.9."""
    repo = Path(__file__).resolve().parents[1]
    maturin = Path(sys.executable).with_name("maturin")
    r = subprocess.run(
        [str(maturin), "build", "--release", "--out", str(tmp_path), "--quiet"],
        cwd=repo,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    (wheel,) = tmp_path.glob("*.whl")
    assert "-cp39-abi3-" in wheel.name
    names = zipfile.ZipFile(wheel).namelist()
    assert "tokenmill/py.typed" in names and "tokenmill/_core.pyi" in names
