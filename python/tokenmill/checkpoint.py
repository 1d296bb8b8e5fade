"""The checkpoint format, its one home: writing, finding, reading and loading trainer checkpoints.

A checkpoint is a folder ``out_dir/checkpoints/step_00000100/`` holding ``meta.json`` (written last: step,
counters, model shape, run config, history), ``model.safetensors`` (full, unsharded weights),
``optimizer.pt`` and one ``rank_<r>.pt`` per process (loader state, RNG states), plus the run's tokenizer
when it had one. A LoRA run's checkpoint holds the adapters alone (``model.safetensors`` and the optimizer
state of the adapter tensors: megabytes); ``meta.json`` records the adapter settings (``meta["lora"]``) and
the base checkpoint they adapt (``meta["base"]``). The folder is written under a temporary name and renamed when complete, so a kill during
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
from tokenmill.lora import base_state_for, is_adapter_key
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
    # Full (unsharded) state dicts, gathered to rank 0 on the CPU; a no-op gather without FSDP. LoRA: the
    # frozen base is neither gathered nor stored, only the adapters.
    lora = bool(meta.get("lora"))
    msd, osd = get_state_dict(
        model, optimizer, options=state_dict_options(cpu_offload=True, ignore_frozen_params=lora)
    )
    if lora:
        msd = {k: v for k, v in msd.items() if is_adapter_key(k)}
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
    if theirs.canonical() != model_cfg.canonical():
        mine = model_cfg.canonical().to_dict()
        diff = {k: (v, mine[k]) for k, v in theirs.canonical().to_dict().items() if mine[k] != v}
        raise ValueError(f"{ckpt_dir}: checkpoint is from another model shape; (checkpoint, config): {diff}")


def load_weights(ckpt_dir: Path, model, model_cfg: LlamaConfig, adapters: Optional[dict] = None) -> None:
    """Load a checkpoint's weights into ``model`` (sharded or not) after checking the shapes match;
    ``ckpt_dir`` may also be a Hugging Face folder (``tokenmill.hf.is_hf_folder``). A LoRA model takes them
    as its frozen base, and ``adapters`` (its initial adapter tensors) with them."""
    from safetensors.torch import load_file
    from torch.distributed.checkpoint.state_dict import set_model_state_dict

    from tokenmill import hf

    if hf.is_hf_folder(ckpt_dir):
        if hf.read_config(ckpt_dir).canonical() != model_cfg.canonical():
            raise ValueError(f"{ckpt_dir}: config.json describes another model shape than the run's")
        state = hf.read_state_dict(ckpt_dir)
    else:
        check_same_shape(ckpt_dir, model_cfg)
        if read_meta(ckpt_dir).get("lora"):
            raise ValueError(
                f"{ckpt_dir}: a LoRA adapter checkpoint, not a full model: resume it (--resume), or merge it "
                "(`tokenmill export-hf CKPT OUT --merge`) and start from the merged weights"
            )
        state = load_file(str(Path(ckpt_dir) / "model.safetensors"))
    check_state_dict(_shape_probe(model_cfg), state, str(ckpt_dir))
    if adapters is not None:
        state = {**base_state_for(model, state), **adapters}
    set_model_state_dict(model, cast(dict[str, Any], state), options=state_dict_options())


def load_adapters(ckpt_dir: Path, model) -> None:
    """Load an adapter checkpoint's tensors into the adapters of ``model`` (sharded or not), after checking
    that the names and shapes are those of ``model``'s adapters (an adapter of another base is refused)."""
    from safetensors.torch import load_file
    from torch.distributed.checkpoint.state_dict import set_model_state_dict

    state = load_file(str(Path(ckpt_dir) / "model.safetensors"))
    own = {k: tuple(p.shape) for k, p in model.named_parameters() if is_adapter_key(k)}
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if missing or unexpected:
        raise ValueError(
            f"{ckpt_dir}: adapters do not match the model's: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    for k, shape in own.items():
        if tuple(state[k].shape) != shape:
            raise ValueError(
                f"{ckpt_dir}: adapter tensor {k} has shape {tuple(state[k].shape)} but the model expects "
                f"{shape} (an adapter of another base or rank?)"
            )
    set_model_state_dict(model, state, options=state_dict_options(strict=False))


def _shape_probe(cfg: LlamaConfig) -> torch.nn.Module:
    with torch.device("meta"):
        return Llama(cfg)


def barrier(world: int) -> None:
    if world > 1:
        dist.barrier()
