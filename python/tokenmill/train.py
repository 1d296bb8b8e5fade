"""The trainer: pre-training and instruction tuning (SFT) of ``tokenmill.model.Llama``.

Read it top to bottom: configuration (one TOML file per run, ``--section.key=value`` overrides), helpers
(schedule, MFU, checkpoints), then ``train()``: one loop with gradient accumulation, clipping, NaN
skipping, logging, evaluation and checkpointing. Single process, or one process per device under
``torchrun`` with FSDP2 (``fully_shard``); the same code runs on CPU with the gloo backend.

    tokenmill train configs/small.toml --optim.lr=1e-3 --resume auto
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import os
import random
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist

import tokenmill
from tokenmill import checkpoint as ckpt
from tokenmill.checkpoint import check_same_shape, latest_checkpoint, load_weights, read_meta
from tokenmill.config import OptimSection, TrainConfig, load_config
from tokenmill.model import Llama, LlamaConfig

__all__ = ["BadLossError", "TrainConfig", "OptimSection", "load_config", "lr_at", "main", "train"]
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


def flops_per_token(c: LlamaConfig, seq_len: int) -> float:
    """Model FLOPs per trained token as PaLM's MFU counts them (Chowdhery et al. 2022, App. B):
    6 x matmul parameters + 12 x layers x dim x seq_len (attention without the causal discount, as
    nanoGPT and torchtitan report it; ``tokenmill.plan`` converts from this). Recomputation is not counted."""
    matmul_params = c.num_params(include_embeddings=False) + (c.vocab_size * c.dim if c.tie_embeddings else 0)
    return 6 * matmul_params + 12 * c.n_layers * c.dim * seq_len


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
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
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
    for prefix in [*cfg.data.train, *cfg.data.val]:
        path = Path(str(prefix) + ".json")
        if not path.exists():
            continue
        info = json.loads(path.read_text()).get("tokenizer") or {}
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


def build_loaders(cfg: TrainConfig, rank: int, world: int) -> tuple[Iterable, Iterable]:
    if not cfg.data.train:
        raise ValueError("data.train is empty: give token-file prefixes (see `tokenmill prepare`)")
    from tokenmill.data import DataLoader

    def make(sources, seed):
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

    return make(cfg.data.train, cfg.run.seed), (
        make(cfg.data.val, cfg.run.seed + 1) if cfg.data.val else None
    )


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


# ----------------------------------------------------------------------------------------------------------
# Logging: console (tqdm), out_dir/log.jsonl (one line per logged step; the planner reads it), loss.png.


def plot_losses(path: Path, history: list[dict]) -> None:
    import matplotlib

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
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)


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
    rank, world, device = _init_distributed(cfg.run.device)
    out = Path(cfg.run.out_dir)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
    cuda = device.type == "cuda"
    autocast = _dtype(cfg.run.autocast) if cuda else torch.float32
    param_dtype = _dtype(cfg.run.param_dtype)

    # -- everything that can be wrong with the inputs is checked before the first step
    tok = _load_tokenizer(cfg, cfg.model.get("vocab_size"))
    model_cfg = cfg.model_config(vocab_size=tok.n_vocab if tok is not None else None)
    if cfg.data.seq_len > model_cfg.max_seq_len:
        raise ValueError(f"data.seq_len {cfg.data.seq_len} exceeds model.max_seq_len {model_cfg.max_seq_len}")
    resume = None
    if cfg.checkpoint.resume == "auto":
        resume = latest_checkpoint(cfg.run.out_dir)
    elif cfg.checkpoint.resume:
        resume = Path(cfg.checkpoint.resume)
    init_from = Path(cfg.train.init_from) if cfg.train.init_from and resume is None else None
    if cfg.data.sft and not cfg.train.init_from:
        raise ValueError("data.sft fine-tunes a trained model: set train.init_from to its checkpoint")
    for ck in filter(None, (resume, init_from)):
        check_same_shape(ck, model_cfg)
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
    if init_from is not None:
        load_weights(init_from, model, model_cfg)

    # -- optimizer: weight decay on matrices only (not norms)
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.optim.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    o = cfg.optim
    if o.name == "adamw8bit":
        from tokenmill.optim import AdamW8bit

        optimizer = AdamW8bit(groups, lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps)
    else:
        fused = cuda and not cfg.dist.cpu_offload
        optimizer = torch.optim.AdamW(groups, lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps, fused=fused)

    # -- resume: weights, optimizer, loader position, RNG states, counters
    log_path = out / "log.jsonl"
    step, bad_steps, tokens_seen = 0, 0, 0
    history: list[dict] = []
    if resume is not None:
        from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

        meta = read_meta(resume)
        if meta["world_size"] != world:
            why = (
                " (adamw8bit quantises each rank's shard in its own blocks: its state cannot be re-sharded "
                "exactly)"
                if o.name == "adamw8bit"
                else ""
            )
            raise ValueError(f"{resume}: saved by {meta['world_size']} processes, resumed with {world}{why}")
        load_weights(resume, model, model_cfg)
        osd = torch.load(resume / "optimizer.pt", weights_only=True, map_location="cpu")
        set_optimizer_state_dict(model, optimizer, osd, options=ckpt.state_dict_options())
        rs = torch.load(resume / f"rank_{rank}.pt", weights_only=True)
        if rs.get("loader") is not None:
            train_data.load_state_dict(rs["loader"])
        ckpt.set_rng_state(rs["rng"])
        step, bad_steps, tokens_seen = meta["step"], meta["bad_steps"], meta["tokens"]
        history = [h for h in meta.get("history", []) if h["step"] <= step]
        if rank == 0 and log_path.exists():  # drop what the interrupted run logged after the checkpoint
            kept = [ln for ln in log_path.read_text().splitlines() if json.loads(ln)["step"] <= step]
            log_path.write_text("".join(ln + "\n" for ln in kept))

    n_params = model_cfg.num_params()
    flops_tok = flops_per_token(model_cfg, cfg.data.seq_len)
    gpu = torch.cuda.get_device_name(device) if cuda else "cpu"
    peak = peak_flops(gpu) if cuda else None
    vocab = model_cfg.vocab_size
    val_batches = (
        list(itertools.islice(iter(val_data), cfg.train.eval_batches)) if val_data is not None else []
    )
    if rank == 0 and resume is None and log_path.exists():
        log_path.unlink()  # a fresh run starts a fresh log; a resumed one appends
    if rank == 0:
        kind = f"resumed at step {step} from {resume}" if resume else "fresh"
        print(
            f"tokenmill train: {n_params / 1e6:.2f}M parameters, {world} x {gpu}, "
            f"{cfg.train.steps} steps of {cfg.data.batch_size * cfg.train.grad_accum * world} x "
            f"{cfg.data.seq_len} tokens ({kind})",
            flush=True,
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
        return {
            k: b[k].to(device, non_blocking=True) for k in ("input_ids", "labels", "position_ids") if k in b
        }

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
                loss_sum = model(b["input_ids"], b["labels"], b.get("position_ids"), reduction="sum")
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
        ckpt.save(
            path, model, optimizer, meta, {"loader": loader_state, "rng": ckpt.rng_state()}, rank, world
        )
        if rank == 0:
            done = sorted(p for p in path.parent.glob("step_*") if ckpt.STEP_DIR.match(p.name))
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
                model.set_requires_gradient_sync(i == len(micro) - 1)
            with amp():
                ls = model(b["input_ids"], b["labels"], b.get("position_ids"), reduction="sum")
            # FSDP averages gradients over ranks; the factor `world` turns that average into a sum.
            (ls * (world / max(n_tok, 1.0))).backward()
            loss_sum += ls.detach().double()
        loss = float(_all_sum(loss_sum, world)) / n_tok if n_tok > 0 else float("nan")
        clip = cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(params, clip)
        grad_norm = float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm)
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
        if rank == 0 and "tokens" in record:
            with open(log_path, "a") as f:
                f.write(json.dumps(record) + "\n")
        if rank == 0 and "val_loss" in record:
            plot_losses(out / "loss.png", history)
        bar.update(1)
        if (cfg.checkpoint.every and step % cfg.checkpoint.every == 0) or step == cfg.train.steps:
            checkpoint()
        if on_step is not None:
            on_step(step, record)
    bar.close()
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
