"""The trainer: pre-training and instruction tuning (SFT) of ``tokenmill.model.Llama``.

Read it top to bottom: configuration (one TOML file per run, ``--section.key=value`` overrides), helpers
(schedule, MFU, checkpoints), then ``train()``: one loop with gradient accumulation, clipping, NaN
skipping, logging, evaluation and checkpointing. Single process, or one process per device under
``torchrun`` with FSDP2 (``fully_shard``); the same code runs on CPU with the gloo backend.

    tokenmill train configs/small.toml --optim.lr=1e-3 --resume auto
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import math
import os
import random
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence, cast

import numpy as np
import torch
import torch.distributed as dist

import tokenmill
from tokenmill import checkpoint as ckpt
from tokenmill import hf, tracking
from tokenmill import lora as L
from tokenmill._fsutil import write_atomic
from tokenmill.checkpoint import (
    CheckpointError,
    check_same_shape,
    latest_checkpoint,
    load_adapters,
    load_weights,
    read_meta,
)
from tokenmill.config import OptimSection, TrainConfig, check_config, load_config
from tokenmill.extras import install_hint, require
from tokenmill.model import Llama

__all__ = [
    "BadLossError",
    "TrainConfig",
    "OptimSection",
    "latest_checkpoint",
    "load_config",
    "lr_at",
    "main",
    "train",
]
# ----------------------------------------------------------------------------------------------------------
# Learning rate, FLOPs, devices.


def lr_at(step: int, o: OptimSection, total_steps: int) -> float:
    """Learning rate for optimizer step ``step`` (0-based): linear warmup, then cosine decay to min_lr, or
    warmup-stable-decay (constant, then a linear decay over the last decay_steps), or constant."""
    if step < o.warmup_steps:
        return o.lr * (step + 1) / o.warmup_steps
    if o.schedule == "constant":
        return o.lr
    if o.schedule == "wsd":
        decay = o.decay_steps or max(1, total_steps // 5)
        start = max(o.warmup_steps, total_steps - decay)
        if step < start:
            return o.lr
        frac = min(1.0, (step - start + 1) / max(1, total_steps - start))
        return o.lr + frac * (o.min_lr - o.lr)
    frac = min(1.0, (step - o.warmup_steps) / max(1, total_steps - o.warmup_steps))
    return o.min_lr + 0.5 * (1 + math.cos(math.pi * frac)) * (o.lr - o.min_lr)


def peak_flops(device_name: str) -> Optional[float]:
    """Dense bf16 peak FLOP/s of a CUDA device name, from the planner's GPU table (None when unknown)."""
    from tokenmill import plan

    try:
        return plan.get_gpu(device_name).peak_flops("bf16")
    except ValueError:
        return None


def _dtype(name: str) -> torch.dtype:
    try:
        return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}: use float32, bfloat16 or float16") from None


# ----------------------------------------------------------------------------------------------------------
# Distributed helpers (no-ops in a single process).


def _all_sum(x: torch.Tensor, world: int) -> torch.Tensor:
    if world > 1:
        dist.all_reduce(x)
    return x


def _init_distributed(device: str) -> tuple[int, int, torch.device]:
    env = {}
    for name, default in (("WORLD_SIZE", "1"), ("RANK", "0"), ("LOCAL_RANK", "0")):
        try:
            env[name] = int(os.environ.get(name, default))
        except ValueError:
            raise ValueError(f"environment variable {name}={os.environ[name]!r} is not an integer") from None
    world, rank, local = env["WORLD_SIZE"], env["RANK"], env["LOCAL_RANK"]
    if world < 1 or not 0 <= rank < world:
        raise ValueError(
            f"environment variables RANK={rank}, WORLD_SIZE={world}: need 0 <= RANK < WORLD_SIZE"
        )
    cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"run.device must be auto, cpu or cuda, got {device!r}")
    if cuda and not torch.cuda.is_available():
        raise ValueError("run.device is cuda but no CUDA device is available")
    dev = torch.device(f"cuda:{local}") if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo", device_id=dev if cuda else None)
    return rank, world, dev


# ----------------------------------------------------------------------------------------------------------
# Data: the trainer consumes any iterable of batch dicts (input_ids, labels [B, T] int64 with -100 = no
# loss, optional position_ids restarting at document boundaries). With ``state_dict``/``load_state_dict``
# the iterable's position is checkpointed. Without explicit iterables, tm.data.DataLoader reads cfg.data.


def _load_tokenizer(cfg: TrainConfig, model_vocab: Optional[int]):
    """The run's tokenizer (None without one), its vocabulary checked against model.vocab_size."""
    if not cfg.data.tokenizer:
        return None
    tok = tokenmill.Tokenizer.from_file(cfg.data.tokenizer)
    if model_vocab is not None and tok.n_vocab > model_vocab:
        raise ValueError(
            f"tokenizer {cfg.data.tokenizer} has {tok.n_vocab} tokens but model.vocab_size is {model_vocab}"
        )
    return tok


def _check_data(cfg: TrainConfig, tok, vocab_size: int) -> None:
    """Each token file's manifest (PREFIX.json, written by `tokenmill prepare`) against the tokenizer
    and the model: a different tokenizer or a larger vocabulary is an error before any step."""
    from tokenmill.data.dataset import read_manifest

    for prefix in [*cfg.data.train, *cfg.data.val]:
        manifest = read_manifest(prefix)
        if manifest is None:
            continue
        info = manifest.get("tokenizer") or {}
        n_vocab, fp = info.get("n_vocab"), info.get("fingerprint")
        if n_vocab is not None and n_vocab > vocab_size:
            raise ValueError(
                f"{prefix}: tokenized with a {n_vocab}-token vocabulary but model.vocab_size is {vocab_size}"
            )
        if tok is None:
            continue
        mine = getattr(tok, "fingerprint", None)
        mine = mine() if callable(mine) else mine
        if (n_vocab is not None and n_vocab != tok.n_vocab) or (fp and mine and fp != mine):
            raise ValueError(
                f"{prefix}: tokenized with another tokenizer (n_vocab {n_vocab}, fingerprint {fp}) than "
                f"data.tokenizer {cfg.data.tokenizer} (n_vocab {tok.n_vocab}, fingerprint {mine})"
            )


def _same_vocabulary(a, b) -> bool:
    """Whether two tokenizers give each id the same token. Fingerprints alone differ across formats (an
    HF round trip stores the merges explicitly), so equal token bytes and special tokens also count."""
    if a.fingerprint == b.fingerprint:
        return True
    return (
        a.n_vocab == b.n_vocab
        and a.special_tokens == b.special_tokens
        and a.mergeable_ranks() == b.mergeable_ranks()  # {token bytes: id}; ids without a token are absent
    )


def _check_base_tokenizer(cfg: TrainConfig, tok, start: Path, manifests: bool) -> None:
    """The run's tokenizer (data.tokenizer; else, with ``manifests``, the vocabulary size the token files'
    manifests record) against the one kept with the model the run starts from: the same ids must mean the
    same tokens to the model."""
    from tokenmill.data.dataset import read_manifest

    path = ckpt.recorded_tokenizer(start)
    if path is None:
        return
    theirs = tokenmill.Tokenizer.from_file(path)
    why = "its token ids would mean other tokens to the model of train.init_from"
    if tok is not None and not _same_vocabulary(tok, theirs):
        raise ValueError(
            f"data.tokenizer {cfg.data.tokenizer} is another tokenizer (n_vocab {tok.n_vocab}, fingerprint "
            f"{tok.fingerprint}) than the model's {path} (n_vocab {theirs.n_vocab}, fingerprint "
            f"{theirs.fingerprint}): {why}"
        )
    for prefix in [*cfg.data.train, *cfg.data.val] if tok is None and manifests else []:
        n_vocab = ((read_manifest(prefix) or {}).get("tokenizer") or {}).get("n_vocab")
        if n_vocab is not None and n_vocab != theirs.n_vocab:
            raise ValueError(
                f"{prefix}: tokenized with a {n_vocab}-token vocabulary, but the model's tokenizer {path} has "
                f"{theirs.n_vocab} tokens: {why}"
            )


def build_loaders(cfg: TrainConfig, rank: int, world: int) -> tuple[Iterable, Optional[Iterable]]:
    if not cfg.data.train:
        raise ValueError("data.train is empty: give token-file prefixes (see `tokenmill prepare`)")
    from tokenmill.data import DataLoader

    def make(key, sources, seed):
        try:
            return DataLoader(
                sources,
                seq_len=cfg.data.seq_len,
                batch_size=cfg.data.batch_size,
                packing=cfg.data.packing,
                seed=seed,
                rank=rank,
                world_size=world,
                document_mask=cfg.data.document_mask,
            )
        except (ValueError, OSError) as e:  # a missing or broken token file: say which key listed it
            raise type(e)(f"{key}: {e}") from None

    return make("data.train", cfg.data.train, cfg.run.seed), (
        make("data.val", cfg.data.val, cfg.run.seed + 1) if cfg.data.val else None
    )


def _resume_point(cfg: TrainConfig, rank: int, world: int) -> Optional[Path]:
    """The verified checkpoint to resume from (None: a fresh run). ``auto`` takes the newest valid one,
    with a notice for each damaged newer one; a named folder must be whole. Rank 0 reads and checks the
    files once; the other ranks take its answer (or its error)."""
    answer: list[Optional[str]] = [None, None]
    if rank == 0:
        try:
            if cfg.checkpoint.resume == "auto":
                found = ckpt.newest_valid(
                    cfg.run.out_dir,
                    notice=lambda m: print(f"tokenmill train: {m}", file=sys.stderr, flush=True),
                )
                answer[0] = str(found) if found else None
            elif cfg.checkpoint.resume:
                ckpt.verify(Path(cfg.checkpoint.resume))
                answer[0] = cfg.checkpoint.resume
        except (ValueError, OSError) as e:
            if world == 1:
                raise
            answer[1] = str(e)
    if world > 1:
        dist.broadcast_object_list(answer, src=0)
    if answer[1] is not None:
        raise CheckpointError(answer[1])
    return Path(answer[0]) if answer[0] else None


def _check_batch(batch: dict, vocab_size: int, where: str) -> None:
    ids = batch["input_ids"]
    if ids.dim() != 2 or batch["labels"].shape != ids.shape:
        raise ValueError(f"{where}: input_ids and labels must both be [batch, seq]; got {tuple(ids.shape)}")
    hi = int(ids.max())
    if hi >= vocab_size or int(batch["labels"].max()) >= vocab_size:
        raise ValueError(
            f"{where}: token id {max(hi, int(batch['labels'].max()))} >= model.vocab_size {vocab_size} "
            "(tokenizer/vocabulary mismatch between the data and the model?)"
        )
    lo = int(ids.min())
    if lo < 0:  # a signed Megatron file can hold one; the embedding would fail with an IndexError
        raise ValueError(f"{where}: token id {lo} is negative (a damaged or foreign token file?)")


# ----------------------------------------------------------------------------------------------------------
# Logging: console (tqdm), out_dir/log.jsonl (one line per logged step or evaluation; the planner reads it),
# the [log] trackers (tracking.py) with the same records, loss.png.


_told_no_matplotlib = False


def plot_losses(path: Path, history: list[dict]) -> None:
    """Write the loss curve; without matplotlib, no plot and one notice per process (not an error)."""
    global _told_no_matplotlib
    try:
        import matplotlib
    except ImportError:
        if not _told_no_matplotlib:
            from tqdm import tqdm

            tqdm.write(f"no loss plot: matplotlib is not installed ({install_hint('plot')})")
            _told_no_matplotlib = True
        return

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    train = [(h["step"], h["loss"]) for h in history if "loss" in h and math.isfinite(h["loss"])]
    val = [(h["step"], h["val_loss"]) for h in history if "val_loss" in h]
    if train:
        ax.plot(*zip(*train), label="train", lw=1)
    if val:
        ax.plot(*zip(*val), "o-", label="validation")
    ax.set(xlabel="step", ylabel="cross-entropy (nats/token)", title="tokenmill training loss")
    ax.grid(alpha=0.3)
    ax.legend()
    write_atomic(path, lambda f: fig.savefig(f, dpi=100, format="png"))
    plt.close(fig)


class BadLossError(RuntimeError):
    pass


# ----------------------------------------------------------------------------------------------------------
# The loop.


def train(
    cfg: TrainConfig,
    train_data: Optional[Iterable[dict]] = None,
    val_data: Optional[Iterable[dict]] = None,
    on_step: Optional[Callable[[int, dict], None]] = None,
) -> list[dict]:
    """Train as ``cfg`` says; returns the logged history (one dict per step, plus evaluations).

    ``train_data``/``val_data`` override the token files of ``cfg.data`` (each process passes its own shard).
    ``on_step(step, record)`` is called after every optimizer step (tests use it to interrupt a run).
    """
    check_config(cfg)  # again: the caller may have edited cfg after load_config
    require("train", "training")  # safetensors is first needed at the end, for the checkpoint
    tracking.check(cfg.log.trackers)
    rank, world, device = _init_distributed(cfg.run.device)
    out = Path(cfg.run.out_dir)  # created once every input is checked: a refused run leaves no folder
    cuda = device.type == "cuda"
    autocast = _dtype(cfg.run.autocast) if cuda else torch.float32
    param_dtype = _dtype(cfg.run.param_dtype)

    # -- everything that can be wrong with the inputs is checked before the first step
    if cuda:
        require("cuda", "training on a GPU (the CUDA kernels)")
    elif cfg.run.attention in ("flex", "varlen"):
        raise ValueError(
            f'run.attention = "{cfg.run.attention}" needs a CUDA device (flex_attention has no backward pass '
            'on the CPU; varlen is flash / cuDNN): use "auto" or "sdpa"'
        )
    resume = _resume_point(cfg, rank, world)
    # LoRA: the frozen base always comes from train.init_from, resumed or not; checkpoints hold adapters.
    lora = cfg.lora if cfg.lora.rank > 0 else None
    if cfg.train.init_from:
        # The model shape (and vocabulary) come from the model the run starts from: train.init_from's
        # config.json (a Hugging Face folder) or meta.json (a checkpoint); a full run that resumes takes the
        # same shape from its checkpoint and no longer needs train.init_from. [model] keys must agree.
        start = resume if resume is not None and lora is None else Path(cfg.train.init_from)
        model_cfg = cfg.init_model_config(*ckpt.recorded_model_config(start))
        tok = _load_tokenizer(cfg, model_cfg.vocab_size)
        _check_base_tokenizer(cfg, tok, start, manifests=train_data is None)
    else:
        tok = _load_tokenizer(cfg, cfg.model.get("vocab_size"))
        model_cfg = cfg.model_config(vocab_size=tok.n_vocab if tok is not None else None)
    if cfg.data.seq_len > model_cfg.max_seq_len:
        raise ValueError(f"data.seq_len {cfg.data.seq_len} exceeds model.max_seq_len {model_cfg.max_seq_len}")
    init_from = Path(cfg.train.init_from) if cfg.train.init_from and resume is None else None
    if cfg.data.sft and not cfg.train.init_from:
        raise ValueError("data.sft fine-tunes a trained model: set train.init_from to its checkpoint")
    base = Path(cfg.train.init_from).resolve() if lora else None
    if lora and not cfg.train.init_from:
        raise ValueError(
            "lora.rank > 0 trains adapters on a frozen base: set train.init_from to its checkpoint"
        )
    for ck in filter(None, (init_from, base)):  # a resume point was verified when it was chosen
        if not hf.is_hf_folder(ck):
            ckpt.verify(ck, ["model.safetensors"])
    for ck in filter(None, (resume, init_from, base)):
        if not hf.is_hf_folder(ck):  # an HF folder here is where the run starts: it gave model_cfg
            check_same_shape(ck, model_cfg)
    if base is not None and not hf.is_hf_folder(base) and read_meta(base).get("lora"):
        raise ValueError(f"train.init_from {base}: a LoRA adapter checkpoint; the base must be full weights")
    if resume is not None:
        theirs = read_meta(resume)
        if bool(theirs.get("lora")) != bool(lora):
            raise ValueError(
                f"{resume}: "
                + (
                    "a LoRA adapter checkpoint but lora.rank = 0"
                    if theirs.get("lora")
                    else f"a full checkpoint but lora.rank = {cfg.lora.rank}"
                )
            )
        if lora:
            mine = dataclasses.asdict(lora)
            diff = {k: (v, mine.get(k)) for k, v in theirs["lora"].items() if mine.get(k) != v}
            if diff:
                raise ValueError(
                    f"{resume}: adapters trained with other [lora] settings; (checkpoint, config): {diff}"
                )
            if theirs["base"] != str(base):
                raise ValueError(
                    f"{resume}: adapters of base {theirs['base']}, but train.init_from is {base}"
                )
    if lora and lora.base_dtype == "nf4":
        if world > 1:
            raise ValueError(
                "lora.base_dtype = nf4 runs in one process (FSDP2 does not shard the NF4 base yet)"
            )
        from tokenmill import quant  # noqa: F401  (the QLoRA base; a missing module fails before any work)
    if cfg.dist.cpu_offload and not cuda:
        raise ValueError("dist.cpu_offload moves GPU state to the host: it needs CUDA devices")
    if train_data is None:
        _check_data(cfg, tok, model_cfg.vocab_size)
        train_data, default_val = build_loaders(cfg, rank, world)
        val_data = default_val if val_data is None else val_data

    # -- model: seeded init (identical on every rank), FSDP2 sharding across processes
    torch.manual_seed(cfg.run.seed)
    random.seed(cfg.run.seed)
    np.random.seed(cfg.run.seed)
    fsdp = world > 1 and cfg.dist.fsdp
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(param_dtype)  # build in the final dtype: no fp32 copy of a 13B model
    try:
        with torch.device("meta" if fsdp else device):
            model = Llama(model_cfg)
    finally:
        torch.set_default_dtype(default_dtype)
    model.activation_checkpointing = cfg.run.activation_checkpointing
    model.attention = cfg.run.attention
    if lora:  # before fully_shard, so that FSDP2 groups the adapters with their block
        L.apply_lora(model, lora.rank, lora.alpha, lora.dropout, lora.targets)
    if cfg.run.compile:
        for layer in model.layers:
            layer.compile()
    if fsdp:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

        mesh = init_device_mesh(device.type, (world,))
        kw: dict[str, Any] = {"mesh": mesh}
        if cuda and autocast != torch.float32:
            kw["mp_policy"] = MixedPrecisionPolicy(param_dtype=autocast, reduce_dtype=torch.float32)
        if cfg.dist.cpu_offload:
            kw["offload_policy"] = CPUOffloadPolicy()
        for layer in model.layers:
            fully_shard(layer, **kw)
        fully_shard(model, **kw)
        model.to_empty(device="cpu" if cfg.dist.cpu_offload else device)
        torch.manual_seed(cfg.run.seed)
        model.reset_parameters()
    elif world > 1:
        raise ValueError("dist.fsdp = false with several processes is not supported (use FSDP2)")
    if base is not None:
        assert lora is not None, "train.init_from is the frozen base only of a LoRA run"
        load_weights(base, model, model_cfg, adapters=L.adapter_init(model, cfg.run.seed), verified=True)
        if lora.base_dtype == "nf4":
            L.quantize_base(model)
    elif init_from is not None:
        load_weights(init_from, model, model_cfg, verified=True)

    # -- optimizer: weight decay on matrices only (not norms); LoRA: the adapters alone
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.optim.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    o = cfg.optim
    optimizer: torch.optim.Optimizer
    if o.name == "adamw8bit":
        from tokenmill.optim import AdamW8bit

        optimizer = AdamW8bit(groups, lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps)
    else:
        fused = cuda and not cfg.dist.cpu_offload
        optimizer = torch.optim.AdamW(groups, lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps, fused=fused)

    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
    # -- resume: weights, optimizer, loader position, RNG states, counters
    log_path = out / "log.jsonl"
    step, bad_steps, tokens_seen = 0, 0, 0
    history: list[dict] = []
    if resume is not None:
        from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

        meta = ckpt.read_meta(resume)
        if meta["world_size"] != world:
            why = (
                " (adamw8bit quantises each rank's shard in its own blocks: its state cannot be re-sharded "
                "exactly)"
                if o.name == "adamw8bit"
                else ""
            )
            raise ValueError(f"{resume}: saved by {meta['world_size']} processes, resumed with {world}{why}")
        if lora:
            load_adapters(resume, model)
        else:
            load_weights(resume, model, model_cfg, verified=True)
        osd = ckpt.load_torch(resume / "optimizer.pt", map_location="cpu")
        set_optimizer_state_dict(model, optimizer, osd, options=ckpt.state_dict_options())
        rs = ckpt.load_torch(resume / f"rank_{rank}.pt")
        if rs.get("loader") is not None:
            cast(Any, train_data).load_state_dict(rs["loader"])  # a DataLoader: the state came from one
        ckpt.set_rng_state(rs["rng"])
        step, bad_steps, tokens_seen = meta["step"], meta["bad_steps"], meta["tokens"]
        history = [h for h in meta.get("history", []) if h["step"] <= step]
        if rank == 0 and log_path.exists():  # drop what the interrupted run logged after the checkpoint
            kept = [ln for ln in log_path.read_text().splitlines() if json.loads(ln)["step"] <= step]
            write_atomic(log_path, "".join(ln + "\n" for ln in kept))

    n_params = model_cfg.num_params()
    from tokenmill import plan

    flops_tok = plan.flops_per_token(model_cfg, cfg.data.seq_len)  # the convention: plan's docstring
    shape = plan.shape_of(model_cfg)
    gpu = torch.cuda.get_device_name(device) if cuda else "cpu"
    peak = peak_flops(gpu)  # None for "cpu" and GPUs missing from the planner's table
    vocab = model_cfg.vocab_size
    val_batches = (
        list(itertools.islice(iter(val_data), cfg.train.eval_batches)) if val_data is not None else []
    )
    if rank == 0 and resume is None and log_path.exists():
        log_path.unlink()  # a fresh run starts a fresh log; a resumed one appends
    if rank == 0:
        kind = f"resumed at step {step} from {resume}" if resume else "fresh"
        if lora:
            n_adapt = sum(p.numel() for p in params)
            kind += f"; LoRA rank {lora.rank}: {n_adapt / 1e6:.2f}M trainable on the frozen base {base}"
        print(
            f"tokenmill train: {n_params / 1e6:.2f}M parameters, {world} x {gpu}, "
            f"{cfg.train.steps} steps of {cfg.data.batch_size * cfg.train.grad_accum * world} x "
            f"{cfg.data.seq_len} tokens ({kind})",
            flush=True,
        )

    trackers = (
        tracking.Trackers(cfg.log, out, cfg.to_dict(), step) if rank == 0 and cfg.log.trackers else None
    )
    data_iter: Iterator[dict] = iter(train_data)

    def next_batch() -> dict:
        nonlocal data_iter
        try:
            return next(data_iter)
        except StopIteration:  # end of an epoch: the iterable starts over
            data_iter = iter(train_data)
            return next(data_iter)

    def to_dev(b: dict) -> dict:
        # Without document masks the loader's rows are plain causal (positions 0..T-1): flash, no mask.
        keys = ("input_ids", "labels") + (("position_ids", "cu_seqlens") if cfg.data.document_mask else ())
        d = {k: b[k].to(device, non_blocking=True) for k in keys if k in b}
        if "cu_seqlens" in d and "max_seqlen" in b:
            d["max_seqlen"] = int(b["max_seqlen"])  # a host int from the loader: no sync
        return d

    def forward(b: dict) -> torch.Tensor:
        return model(
            b["input_ids"],
            b["labels"],
            b.get("position_ids"),
            reduction="sum",
            cu_seqlens=b.get("cu_seqlens"),
            max_seqlen=b.get("max_seqlen"),
        )

    def amp():
        return (
            torch.autocast("cuda", dtype=autocast)
            if cuda and autocast != torch.float32
            else contextlib.nullcontext()
        )

    @torch.no_grad()
    def evaluate() -> float:
        model.eval()
        total = torch.zeros(2, dtype=torch.float64, device=device)
        for b in val_batches:
            b = to_dev(b)
            with amp():
                loss_sum = forward(b)
            total += torch.stack([loss_sum.double(), (b["labels"] != -100).sum().double()])
        model.train()
        total = _all_sum(total, world)
        return float(total[0] / total[1]) if total[1] > 0 else float("nan")

    def checkpoint() -> None:
        path = out / "checkpoints" / f"step_{step:08d}"
        loader_state = train_data.state_dict() if hasattr(train_data, "state_dict") else None
        from tokenmill.data.sft import template_of  # export-hf writes the chat template the data used

        meta = {
            "step": step,
            "tokens": tokens_seen,
            "bad_steps": bad_steps,
            "world_size": world,
            "model": model_cfg.to_dict(),
            "config": cfg.to_dict(),
            "tokenizer": str(Path(cfg.data.tokenizer).resolve()) if cfg.data.tokenizer else "",
            "tokenmill": tokenmill.__version__,
            "chat_template": template_of(cfg.data.train) if cfg.data.sft else None,
            "history": [h for h in history if "tokens" in h or "val_loss" in h],
        }
        if lora:
            meta.update(lora=dataclasses.asdict(lora), base=str(base))
        ckpt.save(
            path, model, optimizer, meta, {"loader": loader_state, "rng": ckpt.rng_state()}, rank, world
        )
        if rank == 0:
            # Only checkpoints up to this step count: newer ones are left from a run that resumed past
            # them (damaged ones skipped by --resume auto); this run overwrites them as it gets there,
            # and counting them could delete every good checkpoint while keeping the damaged ones.
            done = sorted(
                p
                for p in path.parent.glob("step_*")
                if ckpt.STEP_DIR.match(p.name) and int(p.name[5:]) <= step
            )
            for old in done[: max(0, len(done) - cfg.checkpoint.keep)]:
                shutil.rmtree(old, ignore_errors=True)

    from tqdm import tqdm

    bar = tqdm(total=cfg.train.steps, initial=step, disable=rank != 0 or not cfg.train.progress, unit="step")
    model.train()
    t_last, tokens_last = time.perf_counter(), tokens_seen
    while step < cfg.train.steps:
        lr = lr_at(step, cfg.optim, cfg.train.steps)
        for g in optimizer.param_groups:
            g["lr"] = lr
        # Fetch the step's micro-batches first: the loss is the mean over every labelled token of the
        # global batch, whatever the split across micro-steps and ranks (exact for masked SFT data).
        micro = [next_batch() for _ in range(cfg.train.grad_accum)]
        for b in micro:
            _check_batch(b, vocab, f"batch of step {step + 1}")
        n_labelled = sum(int((b["labels"] != -100).sum()) for b in micro)
        n_tok = float(_all_sum(torch.tensor(float(n_labelled), dtype=torch.float64, device=device), world))
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        for i, b in enumerate(micro):
            b = to_dev(b)
            if fsdp:
                cast(Any, model).set_requires_gradient_sync(i == len(micro) - 1)  # FSDP2's method
            with amp():
                ls = forward(b)
            # FSDP averages gradients over ranks; the factor `world` turns that average into a sum.
            (ls * (world / max(n_tok, 1.0))).backward()
            loss_sum += ls.detach().double()
        loss = float(_all_sum(loss_sum, world)) / n_tok if n_tok > 0 else float("nan")
        clip = cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else float("inf")
        norm = torch.nn.utils.clip_grad_norm_(params, clip)
        grad_norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
        step += 1
        batch_tokens = sum(b["input_ids"].numel() for b in micro) * world
        tokens_seen += batch_tokens
        if n_tok == 0:  # every label masked (e.g. SFT chunks of prompt only): nothing to learn, not an error
            if rank == 0:
                tqdm.write(f"step {step}: no labelled tokens in the batch; step skipped")
        elif math.isfinite(loss) and math.isfinite(grad_norm):
            optimizer.step()
        else:
            bad_steps += 1
            if rank == 0:
                tqdm.write(
                    f"step {step}: loss {loss}, grad norm {grad_norm}: step skipped ({bad_steps} so far)"
                )
            if bad_steps > cfg.train.max_bad_steps:
                raise BadLossError(
                    f"{bad_steps} steps with a non-finite loss or gradient (train.max_bad_steps = "
                    f"{cfg.train.max_bad_steps}); last loss {loss}, grad norm {grad_norm}"
                )
        optimizer.zero_grad(set_to_none=True)

        record: dict[str, Any] = {"step": step, "loss": loss, "lr": lr, "grad_norm": grad_norm}
        if step % cfg.train.log_every == 0 or step == cfg.train.steps:
            if cuda:
                torch.cuda.synchronize()
            now = time.perf_counter()
            tps = (tokens_seen - tokens_last) / max(now - t_last, 1e-9)
            t_last, tokens_last = now, tokens_seen
            mfu = tps / world * flops_tok / peak if peak else None
            record.update(
                tokens=tokens_seen,
                tokens_per_s=tps,
                tokens_per_s_per_gpu=tps / world,
                mfu=mfu,
                world_size=world,
                n_params=n_params,
                seq_len=cfg.data.seq_len,
                model=shape,  # so `tokenmill plan --from-log` need not guess the shape
                gpu=gpu,
            )
            bar.set_postfix(
                loss=f"{loss:.4f}",
                lr=f"{lr:.2e}",
                tok_s=f"{tps:,.0f}",
                **({"mfu": f"{mfu:.1%}"} if mfu else {}),
            )
        if (
            val_batches
            and cfg.train.eval_every
            and (step % cfg.train.eval_every == 0 or step == cfg.train.steps)
        ):
            record["val_loss"] = evaluate()
            if rank == 0:
                tqdm.write(f"step {step}: train loss {loss:.4f}, validation loss {record['val_loss']:.4f}")
        history.append(record)
        if rank == 0 and ("tokens" in record or "val_loss" in record):
            with open(log_path, "a") as f:
                f.write(json.dumps(record) + "\n")
            if trackers is not None:
                trackers.log(record)
        if rank == 0 and "val_loss" in record:
            plot_losses(out / "loss.png", history)
        bar.update(1)
        if (cfg.checkpoint.every and step % cfg.checkpoint.every == 0) or step == cfg.train.steps:
            checkpoint()
        if on_step is not None:
            on_step(step, record)
    bar.close()
    if trackers is not None:
        trackers.close()
    if rank == 0:
        plot_losses(out / "loss.png", history)
    return history


def main(config: Optional[str], overrides: Sequence[str]) -> int:
    cfg = load_config(config, overrides)
    try:
        train(cfg)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0
