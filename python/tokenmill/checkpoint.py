"""The checkpoint format, its one home: writing, finding, reading and loading trainer checkpoints.

A checkpoint is a folder ``out_dir/checkpoints/step_00000100/`` holding ``meta.json`` (written last: step,
counters, model shape, run config, history), ``model.safetensors`` (full, unsharded weights),
``optimizer.pt`` and one ``rank_<r>.pt`` per process (loader state, RNG states), plus the run's tokenizer
when it had one. A LoRA run's checkpoint holds the adapters alone (``model.safetensors`` and the optimizer
state of the adapter tensors: megabytes); ``meta.json`` records the adapter settings (``meta["lora"]``) and
the base checkpoint they adapt (``meta["base"]``). The folder is written under a temporary name and renamed when complete, so a kill during
a save leaves the previous one as the newest.

``meta.json["files"]`` records the size and xxh3-128 of every other file of the folder (the checksum of
`tokenmill prepare`'s manifests, computed in Rust with the GIL released). :func:`verify` re-checks them,
so a file damaged after the save (a full disk, a bad copy, a truncated sync) is found before any of it is
loaded, and ``--resume auto`` (:func:`newest_valid`) falls back to the newest checkpoint that is whole.
Checkpoints from before checksums get a structural check instead (files present, safetensors header,
zip directory).
"""

from __future__ import annotations

import json
import random
import re
import shutil
import zipfile
from pathlib import Path
from typing import Any, Callable, Optional, cast

import numpy as np
import torch
import torch.distributed as dist

from tokenmill import _core
from tokenmill._fsutil import fsync_path, replace_dir
from tokenmill.lora import base_state_for, is_adapter_key
from tokenmill.model import Llama, LlamaConfig, check_state_dict

STEP_DIR = re.compile(r"^step_(\d{8})$")
# What meta.json must hold, and the type of each, for a checkpoint to resume a run (reading weights
# needs only "model").
RESUME_KEYS = {"step": int, "world_size": int, "tokens": int, "bad_steps": int}


class CheckpointError(ValueError):
    """A checkpoint folder that is damaged or incomplete; the message names the file and the problem."""


def latest_checkpoint(out_dir: str) -> Optional[Path]:
    root = Path(out_dir) / "checkpoints"
    found = [
        (int(m.group(1)), p)
        for p in root.glob("step_*")
        if (m := STEP_DIR.match(p.name)) and (p / "meta.json").exists()
    ]
    return max(found, key=lambda sp: sp[0])[1] if found else None


def newest_valid(
    out_dir: str, notice: Callable[[str], None] = print, names: Optional[list[str]] = None
) -> Optional[Path]:
    """The newest checkpoint under ``out_dir/checkpoints`` that :func:`verify` accepts (whole, or its files
    ``names``); each newer one that it rejects gets a one-line ``notice`` saying what is wrong. None when
    there is no checkpoint at all; CheckpointError when there are some and none is whole (starting afresh
    would silently drop them)."""
    root = Path(out_dir) / "checkpoints"
    found = sorted((p for p in root.glob("step_*") if STEP_DIR.match(p.name)), reverse=True)
    problems = []
    for path in found:
        try:
            verify(path, names)
            return path
        except CheckpointError as e:
            problems.append(str(e))
            notice(f"skipping damaged checkpoint {e}")
    if problems:
        raise CheckpointError(
            f"{root}: no usable checkpoint ({'; '.join(problems)}); remove or repair the damaged folders"
        )
    return None


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
        # Every rank's file is in the shared folder now: record what each must hold.
        files = {}
        for f in sorted(tmp.iterdir()):
            size, digest = _core.file_checksum(str(f))
            files[f.name] = {"size": size, "xxh3_128": digest}
        meta = {**meta, "files": files}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        replace_dir(tmp, ckpt_dir)  # syncs every file (meta.json, written last, included) first
    barrier(world)


def read_meta(ckpt_dir: Path) -> dict:
    """meta.json, checked for what every reader relies on (CheckpointError naming the file)."""
    path = Path(ckpt_dir) / "meta.json"
    if not Path(ckpt_dir).is_dir():
        raise FileNotFoundError(f"{ckpt_dir}: no such checkpoint folder")
    try:
        meta = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{ckpt_dir}: not a tokenmill checkpoint (no meta.json)") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(meta).__name__}")
    if not isinstance(meta.get("model"), dict):
        raise CheckpointError(f"{path}: key 'model' missing or not an object")
    files = meta.get("files", {})
    if not isinstance(files, dict) or not all(
        isinstance(v, dict) and isinstance(v.get("size"), int) and isinstance(v.get("xxh3_128"), str)
        for v in files.values()
    ):
        raise CheckpointError(f"{path}: 'files' must map names to {{size, xxh3_128}}")
    return meta


def verify(ckpt_dir: Path, names: Optional[list[str]] = None) -> dict:
    """Check a checkpoint before loading any of it: the whole of it, as resuming needs (every file and
    meta.json's counters), or only the files ``names``. Returns its meta.

    Files recorded in ``meta.json["files"]`` must be present with their recorded size and xxh3-128.
    Older checkpoints (no ``files``) get a structural check: model.safetensors, optimizer.pt and one
    rank_<r>.pt per process present, the safetensors header consistent with the file's length, each
    ``.pt`` a readable zip archive (torch's format). Raises CheckpointError naming the file.
    """
    ckpt_dir = Path(ckpt_dir)
    meta = read_meta(ckpt_dir)
    for key, kind in RESUME_KEYS.items() if names is None else ():
        v = meta.get(key)
        if not isinstance(v, kind) or isinstance(v, bool) or v < (key == "world_size"):
            raise CheckpointError(f"{ckpt_dir / 'meta.json'}: {key!r} missing or not a count: {v!r}")
    recorded = meta.get("files")
    if names is None:
        old = ["model.safetensors", "optimizer.pt", *(f"rank_{r}.pt" for r in range(meta["world_size"]))]
        names = list(recorded) if recorded is not None else old
    for name in names:
        path = ckpt_dir / name
        if not path.is_file():
            raise CheckpointError(f"{path}: missing")
        if recorded is None:
            _check_structure(path)
            continue
        if name not in recorded:
            raise CheckpointError(f"{path}: not recorded in meta.json's file list")
        size, digest = _core.file_checksum(str(path))
        want = recorded[name]
        if size != want["size"]:
            raise CheckpointError(
                f"{path}: {size} bytes, meta.json records {want['size']} (truncated or damaged)"
            )
        if digest != want["xxh3_128"]:
            raise CheckpointError(
                f"{path}: xxh3-128 checksum {digest} does not match meta.json's {want['xxh3_128']} (damaged)"
            )
    return meta


def _check_structure(path: Path) -> None:
    """Cheap checks for a file without a recorded checksum (header and directory, not every byte)."""
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path}: empty file")
    try:
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), "pt"):  # parses the header, checks it against the file length
                pass
        elif path.suffix == ".pt":
            with zipfile.ZipFile(path):  # torch.save writes a zip archive; truncation loses its directory
                pass
    except Exception as e:  # safetensors raises its own error types; any failure means unreadable
        raise CheckpointError(f"{path}: unreadable ({type(e).__name__}: {e})") from None


def load_model_state(ckpt_dir: Path, device: str = "cpu", verified: bool = False) -> dict[str, torch.Tensor]:
    """The tensors of ``model.safetensors``, verified first unless the caller just did (CheckpointError
    naming the file)."""
    from safetensors.torch import load_file

    if not verified:
        verify(ckpt_dir, ["model.safetensors"])
    path = Path(ckpt_dir) / "model.safetensors"
    try:
        return load_file(str(path), device=str(device))
    except Exception as e:  # a file that passed its checksum but is not valid safetensors
        raise CheckpointError(f"{path}: unreadable ({type(e).__name__}: {e})") from None


def load_torch(path: Path, **kw) -> Any:
    """``torch.load(path, weights_only=True)`` with a damaged file reported as CheckpointError naming it."""
    try:
        return torch.load(path, weights_only=True, **kw)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing") from None
    except Exception as e:  # UnpicklingError, EOFError, RuntimeError from the zip reader, ...
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise CheckpointError(f"{path}: unreadable ({type(e).__name__}: {first})") from None


def recorded_model_config(path: Path) -> tuple[LlamaConfig, str]:
    """The model shape a folder records and the file that records it: a Hugging Face folder's config.json
    (``tokenmill.hf.read_config``) or a checkpoint's meta.json."""
    from tokenmill import hf

    if hf.is_hf_folder(path):
        return hf.read_config(path), str(Path(path) / "config.json")
    return LlamaConfig.from_dict(read_meta(path)["model"]), str(Path(path) / "meta.json")


def recorded_tokenizer(path: Path) -> Optional[Path]:
    """The tokenizer file kept with a model folder (a Hugging Face folder's tokenizer.json / tokenizer.model, a
    checkpoint's meta.json ``tokenizer``); None when it has none."""
    from tokenmill import hf

    if hf.is_hf_folder(path):
        return hf.tokenizer_file(path)
    name = read_meta(path).get("tokenizer")
    return Path(path) / name if name and (Path(path) / name).is_file() else None


def check_same_shape(ckpt_dir: Path, model_cfg: LlamaConfig) -> None:
    theirs = LlamaConfig.from_dict(read_meta(ckpt_dir)["model"])
    if theirs.canonical() != model_cfg.canonical():
        mine = model_cfg.canonical().to_dict()
        diff = {k: (v, mine[k]) for k, v in theirs.canonical().to_dict().items() if mine[k] != v}
        raise ValueError(f"{ckpt_dir}: checkpoint is from another model shape; (checkpoint, config): {diff}")


def load_weights(
    ckpt_dir: Path, model, model_cfg: LlamaConfig, adapters: Optional[dict] = None, verified: bool = False
) -> None:
    """Load a checkpoint's weights into ``model`` (sharded or not) after checking the shapes match;
    ``ckpt_dir`` may also be a Hugging Face folder (``tokenmill.hf.is_hf_folder``). A LoRA model takes them
    as its frozen base, and ``adapters`` (its initial adapter tensors) with them."""
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
        state = load_model_state(ckpt_dir, verified=verified)
    check_state_dict(_shape_probe(model_cfg), state, str(ckpt_dir))
    if adapters is not None:
        state = {**base_state_for(model, state), **adapters}
    # cast: torch annotates a dict[str, ValueType] (invariant) where any mapping of tensors will do
    set_model_state_dict(model, cast(dict[str, Any], state), options=state_dict_options())


def load_adapters(ckpt_dir: Path, model) -> None:
    """Load an adapter checkpoint's tensors into the adapters of ``model`` (sharded or not), after checking
    that the names and shapes are those of ``model``'s adapters (an adapter of another base is refused)."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict

    state = load_model_state(ckpt_dir)
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
    set_model_state_dict(model, cast(dict[str, Any], state), options=state_dict_options(strict=False))


def _shape_probe(cfg: LlamaConfig) -> torch.nn.Module:
    with torch.device("meta"):
        return Llama(cfg)


def barrier(world: int) -> None:
    if world > 1:
        dist.barrier()
