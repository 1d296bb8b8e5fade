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
        "nf4 dequant + Linear4bit",
    } <= names
    assert all(c["ok"] for c in data["checks"]) and len(data["checks"]) == 22
    ops = {(r["op"], r["impl"]) for r in data["rows"]}
    for op in (
        "rms_norm fwd+bwd",
        "rope fwd+bwd",
        "swiglu fwd+bwd",
        "linear_cross_entropy fwd+bwd",
        "AdamW step",
        "nf4 dequant",
        "Linear4bit fwd+bwd",
    ):
        assert (op, "tokenmill") in ops
    assert all(r["time_ms"] is not None for r in data["rows"])
    for r in data["rows"]:  # back-to-back timing runs on CPU too; device time (graph/profiler) needs CUDA
        timed_b2b = r["op"] in (
            "rms_norm fwd+bwd",
            "rope fwd+bwd",
            "swiglu fwd+bwd",
            "AdamW step",
            "nf4 dequant",
        )
        assert (r["b2b_ms"] is not None) == timed_b2b and r["dev_ms"] is None
    assert "device ms" in text and "evaluated on device time" in text
    assert "rms_norm fwd+bwd" in data["launch_overhead"] and "apply_rope fwd+bwd" in data["launch_overhead"]
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


def test_device_time_falls_back_and_names_each_failure(monkeypatch):
    gc = load()
    cfg = gc.make_config(gc.argparse.Namespace(dry_run=True, compile_on_cpu=False, budget=1.0, seed=0))

    def broken(cfg, fn, reps):
        raise RuntimeError("operation not permitted when stream is capturing")

    def kernel_sum(cfg, fn, reps):
        fn()
        return 2e-4, "profiler: 3 device ops per call"

    monkeypatch.setattr(gc, "DEVICE_TIMERS", {"graph": broken, "profiler": kernel_sum})
    t, method, note = gc.device_time(cfg, lambda: None, 5)
    assert (t, method) == (2e-4, "profiler")
    assert note.startswith("graph failed: RuntimeError: operation not permitted") and "3 device ops" in note
    monkeypatch.setattr(gc, "DEVICE_TIMERS", {"graph": broken, "profiler": broken})
    t, method, note = gc.device_time(cfg, lambda: None, 5)
    assert t is None and method == "-" and note.count("failed") == 2


def test_bandwidth_goal_uses_device_time():
    gc = load()
    # host-bound: 26% of copy bandwidth launch-inclusive, 80% on device time -> the BW goal is met
    r = gc.Row("rms_norm fwd+bwd", "tokenmill", time_ms=0.6, gbytes=0.67, gbps=1117, speedup=4.4)
    r.dev_ms, r.dev_gbps, r.dev_method, r.dev_speedup = 0.2, 3350, "graph", 3.0
    eager = gc.Row("rms_norm fwd+bwd", "eager", time_ms=2.6, gbytes=0.67, gbps=258, speedup=1.0)
    gc.bandwidth_goal({"tokenmill": r, "eager": eager}, 4200.0)
    assert round(r.pct_copy) == 27 and round(r.dev_pct_copy) == 80
    assert r.goal.startswith("MET") and "device time, graph" in r.goal and "device 3.00x" in r.goal
    # no device time: the launch-inclusive figure decides, and the goal says so
    r2 = gc.Row("rope fwd+bwd", "tokenmill", time_ms=0.6, gbytes=0.67, gbps=1117, speedup=4.4)
    gc.bandwidth_goal({"tokenmill": r2, "eager": eager}, 4200.0)
    assert r2.goal.startswith("MISSED") and "no device time" in r2.goal
    # fast on device but under 2x eager (launch-inclusive): missed
    r3 = gc.Row("swiglu fwd+bwd", "tokenmill", time_ms=1.0, gbytes=3.7, gbps=3700, speedup=1.6)
    r3.dev_ms, r3.dev_gbps, r3.dev_method = 0.95, 3900, "graph"
    gc.bandwidth_goal({"tokenmill": r3, "eager": eager}, 4200.0)
    assert r3.goal.startswith("MISSED") and ">=2x eager: no" in r3.goal


def load_train_check():
    spec = importlib.util.spec_from_file_location("gpu_train_check", ROOT / "benches" / "gpu_train_check.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_train_check_sections_and_packed_goals():
    tc = load_train_check()
    names = tc.selected("s2048-concat,13b")
    assert names == [
        "13b-adamw8bit-ckpt",
        "1b-s2048-concat-nomask",
        "1b-s2048-concat-varlen",
        "1b-s2048-concat-flex",
        "1b-s2048-concat-sdpa",
        "1b-s2048-concat-nomask-compile",
        "1b-s2048-concat-varlen-compile",
    ]
    assert tc.selected(None) == list(tc.SECTIONS)
    # A full name is that section alone (not its -compile sibling); parts of names still match.
    assert tc.selected("1b-s2048-concat-nomask,s8192-bestfit-f") == [
        "1b-s2048-concat-nomask",
        "1b-s8192-bestfit-flex",
    ]
    for name in tc.selected("1b-s"):
        sp = tc.SECTIONS[name]
        assert sp["batch"] * sp["seq"] == 16384 and name.startswith(f"1b-s{sp['seq']}-")
        assert sp["data"] in ("synthetic", "concat", "best_fit")
        assert (sp["attention"] == "auto") == (not sp["mask"] or sp["data"] == "synthetic")
    # Hand-made figures: 2048 varlen 0.96x at 51% MFU (met), flex 0.90x (not); 8192 varlen 1.2x (met).
    rows = {
        "1b-s2048-concat-nomask": {"tokens_per_s": 100.0, "mfu": 0.53},
        "1b-s2048-concat-varlen": {"tokens_per_s": 96.0, "mfu": 0.51},
        "1b-s2048-concat-flex": {"tokens_per_s": 90.0, "mfu": 0.48},
        "1b-s8192-concat-nomask": {"tokens_per_s": 50.0, "mfu": 0.40},
        "1b-s8192-concat-varlen": {"tokens_per_s": 60.0, "mfu": 0.48},
        "1b-s8192-bestfit-flex": {"tokens_per_s": 60.0, "mfu": 0.48},  # no unmasked run: no line
    }
    lines = tc.packed_summary(rows)
    assert len(lines) == 3
    assert "varlen: MFU 51.0%, 0.960x" in lines[0] and lines[0].endswith(": met)")
    assert "flex: MFU 48.0%, 0.900x" in lines[1] and lines[1].endswith("NOT met)")
    assert "seq 8192 concat" in lines[2] and "1.200x" in lines[2] and lines[2].endswith(": met)")
