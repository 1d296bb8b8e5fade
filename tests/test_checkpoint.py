"""Checkpoint integrity: meta.json records the size and xxh3-128 of every file; `--resume auto` falls back
past a damaged checkpoint with a one-line notice, an explicit `--resume PATH` that is damaged is an error
naming the file (no traceback from the CLI), checkpoints from before checksums still load, and retention
never keeps a damaged checkpoint in place of good ones."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import tokenmill as tm
import xxhash
from test_trainer import SEQ, Interrupt, V, _token_files, losses
from tokenmill import checkpoint as ckpt
from tokenmill import hf
from tokenmill import train as T
from tokenmill.checkpoint import CheckpointError

STEP2, STEP4 = "step_00000002", "step_00000004"


def args(root: Path, *extra: str) -> list[str]:
    """Overrides for a tiny 4-step CPU run on token files, checkpointing every 2 steps."""
    return [
        f"--run.out_dir={root / 'run'}",
        "--run.device=cpu",
        "--model.preset=tiny",
        f"--data.seq_len={SEQ}",
        "--data.batch_size=4",
        f"--data.tokenizer={root / 'tok.tokenmill'}",
        "--train.steps=4",
        "--train.log_every=1",
        "--train.eval_every=0",
        "--train.progress=false",
        "--optim.lr=3e-3",
        "--optim.warmup_steps=1",
        "--checkpoint.every=2",
        "--checkpoint.keep=5",
        *extra,
    ]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A finished run (checkpoints at steps 2 and 4, each with the run's tokenizer) and its losses."""
    root = tmp_path_factory.mktemp("base")
    data = _token_files(root)
    specials = [f"<s{i}>" for i in range(V - 256)]  # 512 ids, as the token files' vocabulary
    tm.Tokenizer.from_tiktoken([bytes([b]) for b in range(256)], special_tokens=specials).save(
        str(root / "tok.tokenmill")
    )
    history = T.train(T.load_config(None, args(root, *data)))
    return root, data, losses(history)


@pytest.fixture
def run(base, tmp_path):
    """A private copy of the base run (its paths rewritten) to damage."""
    root, data, full = base
    shutil.copytree(root, tmp_path, dirs_exist_ok=True)
    data = [d.replace(str(root), str(tmp_path)) for d in data]
    return tmp_path, data, full


def truncate(p: Path) -> None:
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])


def garbage(p: Path) -> None:  # same size: only the checksum can tell
    p.write_bytes(bytes((i * 7919) % 251 for i in range(p.stat().st_size)))


def empty(p: Path) -> None:
    p.write_bytes(b"")


def bad_json(p: Path) -> None:
    p.write_text('{"step": 4, "model": ')


def no_counters(p: Path) -> None:
    meta = json.loads(p.read_text())
    del meta["step"]
    p.write_text(json.dumps(meta))


def flip_byte(p: Path) -> None:
    b = bytearray(p.read_bytes())
    b[len(b) // 2] ^= 1
    p.write_bytes(bytes(b))


DAMAGE = [
    ("model.safetensors", truncate, "bytes, meta.json records"),
    ("optimizer.pt", garbage, "checksum .* does not match"),
    ("rank_0.pt", empty, "0 bytes, meta.json records"),
    ("meta.json", bad_json, "not valid JSON"),
    ("meta.json", no_counters, "'step' missing"),
    ("rank_0.pt", os.unlink, "missing"),
    ("model.safetensors", os.unlink, "missing"),
    ("tokenmill-tokenizer.tokenmill", flip_byte, "checksum .* does not match"),
]
IDS = [f"{name}-{how.__name__}" for name, how, _ in DAMAGE]


def test_meta_records_every_file(base):
    root, _, _ = base
    d = root / "run" / "checkpoints" / STEP4
    files = json.loads((d / "meta.json").read_text())["files"]
    on_disk = sorted(p.name for p in d.iterdir() if p.name != "meta.json")
    assert (
        sorted(files)
        == on_disk
        == [
            "model.safetensors",
            "optimizer.pt",
            "rank_0.pt",
            "tokenmill-tokenizer.tokenmill",
        ]
    )
    for name, rec in files.items():  # against the reference xxh3-128 of the bytes
        data = (d / name).read_bytes()
        assert rec == {"size": len(data), "xxh3_128": xxhash.xxh3_128_hexdigest(data)}
    assert ckpt.verify(d)["step"] == 4


@pytest.mark.parametrize("name,damage,problem", DAMAGE, ids=IDS)
def test_auto_falls_back_and_explicit_fails(run, name, damage, problem):
    root, data, full = run
    ckdir = root / "run" / "checkpoints"
    damage(ckdir / STEP4 / name)
    with pytest.raises(CheckpointError, match=f"{ckdir / STEP4}.*{problem}"):
        ckpt.verify(ckdir / STEP4)
    notices = []
    assert ckpt.newest_valid(str(root / "run"), notice=notices.append) == ckdir / STEP2
    assert len(notices) == 1 and "\n" not in notices[0] and STEP4 in notices[0]
    if name != "meta.json" or damage is not bad_json:
        assert name in notices[0]
    # The explicit folder is refused before any work, naming it.
    cfg = T.load_config(None, args(root, *data, f"--resume={ckdir / STEP4}"))
    with pytest.raises(CheckpointError, match=STEP4):
        T.train(cfg)
    # auto resumes from step 2 and reproduces the uninterrupted run bit for bit.
    resumed = T.train(T.load_config(None, args(root, *data, "--resume=auto")))
    assert losses(resumed) == full
    assert ckpt.verify(ckdir / STEP4)["step"] == 4  # rewritten whole


def cli(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "tokenmill", *argv], capture_output=True, text=True, timeout=600
    )


@pytest.mark.parametrize("name,damage,problem", DAMAGE[:6], ids=IDS[:6])
def test_cli_explicit_resume_of_a_damaged_checkpoint(run, name, damage, problem):
    root, data, _ = run
    target = root / "run" / "checkpoints" / STEP4
    damage(target / name)
    (root / "c.toml").write_text("")
    r = cli("train", str(root / "c.toml"), *args(root, *data), "--resume", str(target))
    assert r.returncode == 1
    assert "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tokenmill train: error: "), r.stderr
    assert str(target / name) in lines[0]


def test_cli_auto_resume_prints_one_notice(run):
    root, data, _ = run
    garbage(root / "run" / "checkpoints" / STEP4 / "optimizer.pt")
    (root / "c.toml").write_text("")
    r = cli("train", str(root / "c.toml"), *args(root, *data), "--resume", "auto")
    assert r.returncode == 0, r.stderr[-2000:]
    notices = [ln for ln in r.stderr.splitlines() if "damaged" in ln]
    assert len(notices) == 1 and "optimizer.pt" in notices[0] and "Traceback" not in r.stderr
    assert f"resumed at step 2 from {root / 'run' / 'checkpoints' / STEP2}" in r.stdout


def test_every_checkpoint_damaged_is_an_error(run):
    root, data, _ = run
    for step in (STEP2, STEP4):
        empty(root / "run" / "checkpoints" / step / "rank_0.pt")
    with pytest.raises(CheckpointError, match="no usable checkpoint.*step_00000002.*rank_0.pt"):
        T.train(T.load_config(None, args(root, *data, "--resume=auto")))


def strip_checksums(d: Path) -> None:
    meta = json.loads((d / "meta.json").read_text())
    del meta["files"]
    (d / "meta.json").write_text(json.dumps(meta))


def test_checkpoint_without_checksums_still_resumes(run):
    root, data, full = run
    for step in (STEP2, STEP4):
        strip_checksums(root / "run" / "checkpoints" / step)
    ckpt.verify(root / "run" / "checkpoints" / STEP4)
    cfg = T.load_config(None, args(root, *data, "--train.steps=6", "--resume=auto"))
    resumed = T.train(cfg)
    assert losses(resumed)[:4] == full and [h["step"] for h in resumed] == [1, 2, 3, 4, 5, 6]


@pytest.mark.parametrize(
    "name,damage,problem",
    [
        ("model.safetensors", truncate, "unreadable"),
        ("optimizer.pt", truncate, "unreadable"),
        ("rank_0.pt", empty, "empty file"),
        ("rank_0.pt", os.unlink, "missing"),
    ],
    ids=["truncated-model", "truncated-optimizer", "empty-rank", "missing-rank"],
)
def test_checkpoint_without_checksums_gets_a_structural_check(run, name, damage, problem):
    root, data, full = run
    ckdir = root / "run" / "checkpoints"
    for step in (STEP2, STEP4):
        strip_checksums(ckdir / step)
    damage(ckdir / STEP4 / name)
    with pytest.raises(CheckpointError, match=f"{ckdir / STEP4 / name}: {problem}"):
        ckpt.verify(ckdir / STEP4)
    assert ckpt.newest_valid(str(root / "run"), notice=lambda m: None) == ckdir / STEP2
    assert losses(T.train(T.load_config(None, args(root, *data, "--resume=auto")))) == full


def test_retention_never_keeps_only_the_damaged_one(run):
    """keep = 1 after falling back from a damaged step 4 to step 2: the damaged folder (ahead of the
    resumed run) does not count, so an interruption at step 3 leaves step 3, not just the damaged step 4."""
    root, data, _ = run
    ckdir = root / "run" / "checkpoints"
    truncate(ckdir / STEP4 / "model.safetensors")
    cfg = T.load_config(
        None, args(root, *data, "--resume=auto", "--checkpoint.every=1", "--checkpoint.keep=1")
    )

    def stop(step, record):
        if step == 3:
            raise Interrupt

    with pytest.raises(Interrupt):
        T.train(cfg, on_step=stop)
    assert sorted(p.name for p in ckdir.iterdir()) == ["step_00000003", STEP4]
    assert ckpt.newest_valid(str(root / "run"), notice=lambda m: None) == ckdir / "step_00000003"


def test_damaged_weights_named_by_every_reader(run):
    root, _, _ = run
    d = root / "run" / "checkpoints" / STEP4
    truncate(d / "model.safetensors")
    for read in (
        lambda: tm.model.Llama.from_checkpoint(d),
        lambda: hf.export(d, root / "hf"),
    ):
        with pytest.raises(CheckpointError, match=f"{d / 'model.safetensors'}: .* bytes, meta.json records"):
            read()
    cfg = T.load_config(None, args(root, f"--data.train={root / 'train'}", f"--train.init_from={d}"))
    with pytest.raises(CheckpointError, match="model.safetensors"):
        T.train(cfg)
