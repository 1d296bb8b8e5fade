"""benches/gpu_check.py's host logic on CPU (--dry-run): inputs, reference comparisons, NaN handling, the
table and the goal evaluation; the GPU run itself happens on a lent machine."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def load():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "benches" / "gpu_check.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


def test_dry_run_prints_one_table_and_passes(tmp_path, capsys):
    gc = load()
    out = tmp_path / "r.json"
    assert gc.main(["--dry-run", "--seed", "3", "--json", str(out), "--trainer", "off"]) == 0
    text = capsys.readouterr().out
    assert text.count("| op | impl |") == 1
    data = json.loads(out.read_text())
    names = {c["name"] for c in data["checks"]}
    assert {
        "rms_norm fwd+bwd",
        "apply_rope fwd+bwd",
        "rope(positions) fwd+bwd",
        "swiglu fwd+bwd",
        "linear_cross_entropy",
        "adamw8bit step x5",
    } <= names
    assert all(c["ok"] for c in data["checks"]) and len(data["checks"]) == 18
    ops = {(r["op"], r["impl"]) for r in data["rows"]}
    for op in (
        "rms_norm fwd+bwd",
        "rope fwd+bwd",
        "swiglu fwd+bwd",
        "linear_cross_entropy fwd+bwd",
        "AdamW step",
    ):
        assert (op, "tokenmill") in ops
    assert all(r["time_ms"] is not None for r in data["rows"])
    adam = next(r for r in data["rows"] if r["op"] == "AdamW step" and r["impl"] == "tokenmill")
    assert "2.0" in adam["goal"]  # bytes of state per parameter are reported


def test_nan_never_passes():
    gc = load()
    ref = torch.ones(4)
    assert gc.rel_err(torch.ones(4), ref) == 0
    assert math.isinf(gc.rel_err(torch.tensor([1.0, float("nan"), 1.0, 1.0]), ref))
    assert math.isinf(gc.rel_err(torch.tensor([1.0, float("inf"), 1.0, 1.0]), ref))
    assert math.isinf(gc.rel_err(torch.ones(3), ref))


def test_trainer_hook_modes(tmp_path, monkeypatch):
    gc = load()
    monkeypatch.setattr(gc, "HERE", tmp_path)
    assert gc.run_trainer_hook("auto") == ("trainer section: gpu_train_check.py not present", True)
    assert gc.run_trainer_hook("on")[1] is False
    (tmp_path / "gpu_train_check.py").write_text("import sys; sys.exit(3)\n")
    assert gc.run_trainer_hook("auto") == ("trainer section: exit status 3", False)
    assert gc.run_trainer_hook("off")[1] is True


def test_packed_positions_restart():
    gc = load()
    pos = gc.packed_positions(2, 50, 8, "cpu")
    assert pos.shape == (2, 50) and (pos[:, 0] == 0).all()
    steps = pos[:, 1:] - pos[:, :-1]
    assert ((steps == 1) | (pos[:, 1:] == 0)).all() and (pos[:, 1:] == 0).any()
    assert pos.max() < 8
