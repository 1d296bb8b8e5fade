"""`tokenmill demo --finetune`: HF folder -> import-hf -> SFT with LoRA -> PEFT adapter + merged model, whole."""

import re
import subprocess
import sys

import pytest

pytest.importorskip("transformers")
pytest.importorskip("peft")


def test_demo_finetune_end_to_end(tmp_path):
    out = tmp_path / "ft"
    r = subprocess.run(
        [sys.executable, "-m", "tokenmill", "demo", "--finetune", "--steps", "12", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    # import: our logits equal transformers' on the exported base
    diff = float(re.search(r"logits vs transformers: max abs diff (\S+)", r.stdout).group(1))
    assert diff <= 1e-4
    # PEFT's base + adapter and the merged folder agree
    diff = float(re.search(r"peft base \+ adapter vs merged logits: max abs diff (\S+)", r.stdout).group(1))
    assert diff <= 1e-4
    assert (out / "adapter" / "adapter_config.json").exists()
    assert (out / "merged" / "config.json").exists()
    # the run's checkpoint holds the adapters alone: far smaller than the merged weights
    adapter = (out / "adapter" / "adapter_model.safetensors").stat().st_size
    merged = (out / "merged" / "model.safetensors").stat().st_size
    assert adapter * 5 < merged
