"""Peak host memory of a Hugging Face import: `tokenmill import-hf` and `Llama.from_hf` vs transformers'
`from_pretrained`, on a random ~1.1B LLaMA (llama-1b shape: hidden 2048, 22 layers, 32 heads, 4 KV heads,
FFN 5632, vocab 32000) saved by transformers in bf16, sharded.

    python benches/bench_import.py [--dir /tmp/tokenmill-bench-import] [--dtype bfloat16] [--shard 1GB]

Each measurement is a fresh subprocess that reports its own VmHWM (peak RSS of that process's memory
map, reset at exec, so a parent's size never leaks in). "Above base" subtracts the VmHWM of a process that
only imports the same modules (torch + tokenmill, or torch + transformers). The goal (issue 12): import
peak <= 1.2x the bytes of the weights in the target dtype. The model folder is built once (meta device,
then allocated in bf16: one copy) and kept in --dir for reruns.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from common import machine, today  # noqa: E402

SHAPE = dict(
    vocab_size=32000,
    hidden_size=2048,
    intermediate_size=5632,
    num_hidden_layers=22,
    num_attention_heads=32,
    num_key_value_heads=4,
    max_position_embeddings=2048,
    rms_norm_eps=1e-5,
)


def vm_hwm_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def child(what: str, hf_dir: str, out: str, dtype: str) -> None:
    """Runs in the subprocess: import what the task needs, do it, print the peak RSS as JSON."""
    import torch

    if what in ("base-ours", "import-hf", "from_hf", "safe_open"):
        import tokenmill.cli
        import tokenmill.hf
        import tokenmill.model
    else:
        import transformers
    model = None
    if what == "import-hf":
        assert tokenmill.cli.main(["import-hf", hf_dir, out, "--dtype", dtype]) == 0
    elif what == "from_hf":
        model = tokenmill.model.Llama.from_hf(hf_dir, dtype=getattr(torch, dtype))
    elif what == "from_pretrained":
        model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=getattr(torch, dtype))
    elif what == "safe_open":  # the rejected design: stream through safetensors' mmap, copy each tensor
        from safetensors import safe_open

        for shard in sorted(Path(hf_dir).glob("*.safetensors")):
            with safe_open(shard, "pt") as f:
                for k in f.keys():
                    t = f.get_tensor(k).to(
                        getattr(torch, dtype), copy=True
                    )  # reads the pages, as a copy does
                    del t
    if model is not None:
        # Touch every weight: transformers 5 leaves bf16 weights as views of the mmap'd files, resident only
        # once read; a model in use has read them all.
        with torch.no_grad():
            for p in model.parameters():
                p.sum(dtype=torch.float32)
    print(json.dumps({"peak_mib": vm_hwm_mib()}))


def build(hf_dir: Path, shard: str) -> None:
    """The random model folder, allocated once in bf16 (meta device first) and saved sharded."""
    import torch
    import transformers

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(**SHAPE, dtype="bfloat16")
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(cfg)
    torch.set_default_dtype(torch.float32)
    model.to_empty(device="cpu")
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.fill_(1.0) if name.endswith("norm.weight") else p.normal_(0.0, 0.02)
    model.save_pretrained(hf_dir, max_shard_size=shard)
    print(json.dumps({"peak_mib": vm_hwm_mib()}))


def run(*args: str) -> float:
    r = subprocess.run([sys.executable, __file__, *args], check=True, capture_output=True, text=True)
    return json.loads(r.stdout.strip().splitlines()[-1])["peak_mib"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", default="/tmp/tokenmill-bench-import")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32", "float16"])
    ap.add_argument("--shard", default="1GB", help="max_shard_size of the saved model")
    ap.add_argument("--child", nargs=4, metavar=("WHAT", "HF_DIR", "OUT", "DTYPE"), help=argparse.SUPPRESS)
    ap.add_argument("--build", nargs=2, metavar=("HF_DIR", "SHARD"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        return child(*a.child)
    if a.build:
        return build(Path(a.build[0]), a.build[1])

    root = Path(a.dir)
    hf_dir = root / "hf"
    if not (hf_dir / "config.json").exists():
        t = time.perf_counter()
        run("--build", str(hf_dir), a.shard)
        print(f"built {hf_dir} in {time.perf_counter() - t:.0f}s")
    cfg = json.loads((hf_dir / "config.json").read_text())
    shards = sorted(p.name for p in hf_dir.glob("*.safetensors"))
    import math

    n_params = 0
    for p in hf_dir.glob("*.safetensors"):
        with open(p, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(n))
        n_params += sum(math.prod(v["shape"]) for k, v in header.items() if k != "__metadata__")
    size = {"bfloat16": 2, "float16": 2, "float32": 4}[a.dtype]
    weights_mib = n_params * size / 2**20
    print(f"{machine()}; {n_params / 1e9:.3f}B parameters, {len(shards)} shards, stored {cfg.get('dtype')}")
    print(f"weights in {a.dtype}: {weights_mib:,.0f} MiB")

    out = root / "imported"
    rows = []
    base_ours = run("--child", "base-ours", str(hf_dir), "-", a.dtype)
    base_peer = run("--child", "base-peer", str(hf_dir), "-", a.dtype)
    runs = (
        ("import-hf", base_ours),
        ("safe_open", base_ours),
        ("from_hf", base_ours),
        ("from_pretrained", base_peer),
    )
    for what, base in runs:
        if out.exists():
            import shutil

            shutil.rmtree(out)
        t = time.perf_counter()
        peak = run("--child", what, str(hf_dir), str(out), a.dtype)
        rows.append((what, peak, peak - base, time.perf_counter() - t))
    print(f"base RSS: tokenmill {base_ours:,.0f} MiB, transformers {base_peer:,.0f} MiB")
    print(f"{'':<36}{'peak MiB':>10}{'above base':>12}{'x weights':>11}{'wall s':>8}")
    names = {
        "import-hf": "tokenmill import-hf (to disk)",
        "safe_open": "(rejected) safe_open + copy, streamed",
        "from_hf": "tokenmill Llama.from_hf",
        "from_pretrained": "transformers from_pretrained",
    }
    for what, peak, above, wall in rows:
        print(f"{names[what]:<36}{peak:>10,.0f}{above:>12,.0f}{above / weights_mib:>10.2f}x{wall:>8.1f}")
    ratio = rows[2][2] / rows[3][2]
    print(f"from_hf / from_pretrained memory above base: {ratio:.2f}x   ({today()})")
    if out.exists():
        import shutil

        shutil.rmtree(out)


if __name__ == "__main__":
    main()
