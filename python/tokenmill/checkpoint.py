"""The checkpoint format, its one home: writing, finding, reading and loading trainer checkpoints.

A checkpoint is a folder ``out_dir/checkpoints/step_00000100/`` holding ``meta.json`` (written last: step,
counters, model shape, run config, history), ``model.safetensors`` (full, unsharded weights),
``optimizer.pt`` and one ``rank_<r>.pt`` per process (loader state, RNG states), plus the run's tokenizer
when it had one. The folder is written under a temporary name and renamed when complete, so a kill during
a save leaves the previous one as the newest.
"""

from __future__ import annotations

import json
import random
import re
import shutil
from pathlib import Path
from typing import Any, Optional, cast

import numpy as np
import torch
import torch.distributed as dist

from tokenmill._fsutil import fsync_path, replace_dir
from tokenmill.model import Llama, LlamaConfig, check_state_dict

STEP_DIR = re.compile(r"^step_(\d{8})$")


def latest_checkpoint(out_dir: str) -> Optional[Path]:
    root = Path(out_dir) / "checkpoints"
    found = [p for p in root.glob("step_*") if STEP_DIR.match(p.name) and (p / "meta.json").exists()]
    return max(found, key=lambda p: p.name) if found else None  # 8 digits: name order is step order


def rng_state() -> dict[str, Any]:
    np_state = cast(tuple, np.random.get_state(legacy=True))  # (name, keys, pos, has_gauss, gauss)
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python": random.getstate(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
    }


def set_rng_state(s: dict[str, Any]) -> None:
    torch.set_rng_state(s["torch"])
    if s["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])
    random.setstate(s["python"])
    n = s["numpy"]
    np.random.set_state((n[0], n[1].numpy().astype(np.uint32), *n[2:]))


def state_dict_options(**kw):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **kw)


def save(ckpt_dir: Path, model, optimizer, meta: dict, rank_state: dict, rank: int, world: int):
    """Write one checkpoint atomically (every rank calls this)."""
    from safetensors.torch import save_file
    from torch.distributed.checkpoint.state_dict import get_state_dict

    tmp = ckpt_dir.with_name(ckpt_dir.name + ".tmp")
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier(world)
    # Full (unsharded) state dicts, gathered to rank 0 on the CPU; a no-op gather without FSDP.
    msd, osd = get_state_dict(model, optimizer, options=state_dict_options(cpu_offload=True))
    torch.save(rank_state, tmp / f"rank_{rank}.pt")
    fsync_path(tmp / f"rank_{rank}.pt")
    if rank == 0:
        # Tied weights share storage, which safetensors refuses: store each tensor on its own.
        tensors = cast(dict[str, torch.Tensor], msd)
        save_file(
            {k: v.detach().clone().contiguous() for k, v in tensors.items()}, str(tmp / "model.safetensors")
        )
        torch.save(osd, tmp / "optimizer.pt")
        if meta.get("tokenizer"):  # the checkpoint carries its tokenizer (export-hf, generation)
            name = "tokenmill-tokenizer" + Path(meta["tokenizer"]).suffix
            shutil.copyfile(meta["tokenizer"], tmp / name)
            meta = {**meta, "tokenizer": name}
    barrier(world)
    if rank == 0:
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        replace_dir(tmp, ckpt_dir)  # syncs every file (meta.json, written last, included) first
    barrier(world)


def read_meta(ckpt_dir: Path) -> dict:
    try:
        return json.loads((Path(ckpt_dir) / "meta.json").read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{ckpt_dir}: not a tokenmill checkpoint (no meta.json)") from None


def check_same_shape(ckpt_dir: Path, model_cfg: LlamaConfig) -> None:
    theirs = LlamaConfig.from_dict(read_meta(ckpt_dir)["model"])
    if theirs != model_cfg:
        diff = {
            k: (v, getattr(model_cfg, k)) for k, v in theirs.to_dict().items() if getattr(model_cfg, k) != v
        }
        raise ValueError(f"{ckpt_dir}: checkpoint is from another model shape; (checkpoint, config): {diff}")


def load_weights(ckpt_dir: Path, model, model_cfg: LlamaConfig) -> None:
    """Load a checkpoint's weights into ``model`` (sharded or not) after checking the shapes match."""
    from safetensors.torch import load_file
    from torch.distributed.checkpoint.state_dict import set_model_state_dict

    check_same_shape(ckpt_dir, model_cfg)
    state = load_file(str(Path(ckpt_dir) / "model.safetensors"))
    check_state_dict(_shape_probe(model_cfg), state, str(ckpt_dir))
    set_model_state_dict(model, cast(dict[str, Any], state), options=state_dict_options())


def _shape_probe(cfg: LlamaConfig) -> torch.nn.Module:
    with torch.device("meta"):
        return Llama(cfg)


def barrier(world: int) -> None:
    if world > 1:
        dist.barrier()
