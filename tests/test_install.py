"""The wheel as a pip user meets it: built by maturin, installed into a fresh venv with only what it
declares (``tokenmill[train,data]``: no matplotlib, no trackers, no test tools), then the console script
runs ``demo``, ``prepare`` on .jsonl.zst and .parquet, and ``plan``, from a folder outside the repository.

pip takes torch from its cache (warm after ``make test`` set up .venv) or PIP_FIND_LINKS, else downloads it.
"""

import json
import os
import re
import subprocess
import sys
import zipfile
from email.parser import Parser
from pathlib import Path

import numpy as np
import pytest
import tokenmill as tm
from packaging.requirements import Requirement
from tokenmill import cli

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
EXTRAS = "train,data"


def _env() -> dict:
    """The environment without this checkout's venv or sources on the path."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    return env


def run(cmd, cwd, timeout=1200) -> subprocess.CompletedProcess:
    r = subprocess.run(
        [str(c) for c in cmd], cwd=cwd, env=_env(), capture_output=True, text=True, timeout=timeout
    )
    assert r.returncode == 0, f"{cmd}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    maturin = Path(sys.executable).with_name("maturin")
    run([maturin, "build", "--release", "--quiet", "--out", out], cwd=REPO, timeout=2400)
    (whl,) = out.glob("tokenmill-*.whl")
    return whl


@pytest.fixture(scope="module")
def venv(wheel, tmp_path_factory) -> Path:
    """bin/ of a fresh venv holding the wheel with its train and data extras."""
    root = tmp_path_factory.mktemp("venv")
    run([sys.executable, "-m", "venv", root / "venv"], cwd=root)
    pip = root / "venv" / "bin" / "pip"
    run([pip, "install", "--quiet", f"{wheel}[{EXTRAS}]"], cwd=root, timeout=2400)
    return root / "venv" / "bin"


@pytest.fixture(scope="module")
def demo(venv, tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    cwd = tmp_path_factory.mktemp("demo")
    return cwd / "out", run([venv / "tokenmill", "demo", "--steps", "6", "--out", cwd / "out"], cwd=cwd)


def _key(requirement: str, extra=None) -> tuple:
    """(extra, name, version specifier, extras, environment marker) of a requirement line."""
    r = Requirement(requirement)
    marker = str(r.marker or "").replace("python_full_version", "python_version")  # maturin's spelling
    found = re.search(r'extra == "([\w-]+)"', marker)
    marker = re.sub(r'\(?([^()]*)\)? and extra == "[\w-]+"|^extra == "[\w-]+"$', r"\1", marker)
    return (found.group(1) if found else extra, r.name, str(r.specifier), tuple(sorted(r.extras)), marker)


def test_wheel_metadata_is_pyproject(wheel):
    """Requires-Dist is pyproject's dependencies and extras; the license file and URLs ship."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    names = zipfile.ZipFile(wheel).namelist()
    (meta_name,) = [n for n in names if n.endswith(".dist-info/METADATA")]
    meta = Parser().parsestr(zipfile.ZipFile(wheel).read(meta_name).decode())
    expected = {_key(r) for r in project["dependencies"]}
    expected |= {_key(r, e) for e, reqs in project["optional-dependencies"].items() for r in reqs}
    assert {_key(r) for r in meta.get_all("Requires-Dist")} == expected
    assert set(meta.get_all("Provides-Extra")) == set(project["optional-dependencies"])
    assert meta["License-Expression"] == "Apache-2.0"
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
    assert len(meta.get_all("Project-URL")) == len(project["urls"])
    assert "Typing :: Typed" in meta.get_all("Classifier")


def test_fresh_venv_has_only_the_declared_extras(venv):
    r = run([venv / "python", "-m", "pip", "list", "--format=json"], cwd=venv)
    have = {p["name"].lower() for p in json.loads(r.stdout)}
    assert {"tokenmill", "numpy", "torch", "safetensors", "tqdm", "pyarrow"} <= have
    assert not have & {"matplotlib", "tensorboard", "wandb", "cupy-cuda13x", "pytest", "zstandard"}


def test_demo(demo):
    """`tokenmill demo` runs end to end; without the plot extra the loss plot is skipped, said once."""
    out, r = demo
    assert "[5/5]" in r.stdout and "done in" in r.stdout, r.stdout
    text = r.stdout + r.stderr
    assert text.count("no loss plot: matplotlib is not installed (pip install 'tokenmill[plot]')") == 1, text
    assert "Traceback" not in text
    assert not (out / "run" / "loss.png").exists()
    log = [json.loads(ln) for ln in (out / "run" / "log.jsonl").read_text().splitlines()]
    assert log[-1]["step"] == 6 and any("val_loss" in r for r in log)
    assert (out / "run" / "checkpoints" / "step_00000006" / "meta.json").exists()


def test_prepare_jsonl_zst_and_parquet(venv, demo, tmp_path):
    """The installed console script tokenizes compressed JSONL and Parquet; each document's ids are this
    checkout's tokenizer's encoding of it plus the end-of-text token."""
    zstandard = pytest.importorskip("zstandard")
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    out, _ = demo
    tok_path = out / "tokenizer.json"
    texts = ["def f(x):\n    return x + 1\n", "héllo wörld ✓", "import os\nprint(os.sep)\n" * 50]
    body = "".join(json.dumps({"text": t}) + "\n" for t in texts)
    (tmp_path / "docs.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(body.encode()))
    pq.write_table(pa.table({"content": texts}), tmp_path / "docs.parquet")
    tok = tm.Tokenizer.from_file(tok_path)
    eot = tok.special_tokens["<|endoftext|>"]
    want = [tok.encode(t) + [eot] for t in texts]
    for name, extra in (("docs.jsonl.zst", []), ("docs.parquet", ["--text-key", "content"])):
        prefix = tmp_path / name.split(".")[1]
        run([venv / "tokenmill", "prepare", tmp_path / name, "--tokenizer", tok_path, "-o", prefix, "-q", *extra],
            cwd=tmp_path)  # fmt: skip
        ds = tm.data.TokenDataset(str(prefix))
        assert [np.asarray(ds[i]).tolist() for i in range(len(ds))] == want, name


def test_plan_and_a_missing_extra(venv, tmp_path, capsys):
    """`tokenmill plan` prints what this checkout's prints; `train` with a tracker not installed refuses,
    naming tokenmill[track], before any work."""
    args = [
        "plan",
        "--model",
        "llama-13b",
        "--tokens",
        "chinchilla",
        "--compare",
        "H100:64,A100:128",
        "--json",
    ]
    r = run([venv / "tokenmill", *args], cwd=tmp_path)
    assert cli.main(args) == 0
    assert json.loads(r.stdout) == json.loads(capsys.readouterr().out)
    assert len(json.loads(r.stdout)) == 2
    (tmp_path / "run.toml").write_text('[log]\ntrackers = ["tensorboard"]\n[run]\nout_dir = "out"\n')
    r = subprocess.run(
        [str(venv / "tokenmill"), "train", "run.toml"],
        cwd=tmp_path,
        env=_env(),
        capture_output=True,
        text=True,
    )
    assert r.returncode == 1 and "pip install 'tokenmill[track]'" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "out").exists()
