"""``DataLoader``: packed, mixed, sharded, resumable batches of token files, rendered in Rust.

The stream
----------
Global sample ``g`` (``g = 0, 1, 2, ...``) is fully determined by the seed and ``g``:

1. **Mixing.** Samples are grouped in blocks of 65,536. Block ``b`` holds exactly ``c_s`` samples of
   source ``s`` (the weights apportioned by largest remainder, so proportions are exact to 1/65,536 in
   every block) in an order shuffled with ``(seed, b)``. ``g``'s source and its index ``k`` in that
   source follow in O(1) in ``g``.
2. **Epochs.** ``k`` falls in pass ``k // n_s`` over source ``s`` (``n_s`` samples per pass); each pass
   reshuffles documents and samples with ``(seed, source, pass)``. ``epochs=None`` repeats every source
   forever; ``epochs=n`` ends the stream where the first source would start pass ``n + 1``.
3. **Packing.** ``"concat"``: documents concatenated and cut into windows of ``seq_len`` inputs (each
   reading one token further for its last label); the last window of a pass is padded, so every token
   is an input exactly once per pass. ``"best_fit"``: documents split into ``seq_len`` chunks, chunks
   packed best-fit decreasing (never split), padding only at the end of a row. ``"none"``: windows of
   ``seq_len + 1`` tokens inside single documents (shorter documents and tails skipped).

Global batch ``i`` is samples ``[i * G, (i + 1) * G)`` with ``G = batch_size * world_size``; rank ``r``
takes the contiguous slice ``[i * G + r * batch_size, ...)``. So ranks are disjoint, together they are the
single-process stream, and a position is just a global sample index: ``state_dict()`` stores it, and a
state saved at world size N loads at world size M (same ``G``) with the stream continuing exactly.

Batches
-------
A dict of torch tensors: ``input_ids``, ``labels``, ``position_ids`` ``[B, T]`` int64; ``cu_seqlens``
int32 (flash-attention varlen layout over the flattened ``B * T`` tokens; padding is its own segment) and
``max_seqlen`` (int). ``labels[i]`` is the token that follows ``input_ids[i]`` *in the same document*, or
-100 at a document's last token, over padding and where the loss mask is 0 (SFT prompts). Position ids
restart at 0 at every document boundary and at the start of each row (Megatron's ``reset_position_ids``).
With ``document_mask=False``: plain causal rows (positions ``0..T-1``, one segment per row; in
``concat`` the labels then run across documents, as GPT-2 training does).

``format="hf"`` yields what Hugging Face causal LMs (``LlamaForCausalLM`` and kin) take as ``model(**batch)``:
``input_ids``, ``position_ids``, and ``labels`` *aligned with* ``input_ids`` (the model shifts them:
``labels[:, i]`` is ``input_ids[:, i]`` where position ``i - 1`` predicts it, -100 elsewhere, always at
column 0), plus, with ``document_mask``, the flash-attention varlen keys transformers reads
(``cu_seq_lens_q``/``cu_seq_lens_k`` int32 over the flattened ``B * T`` tokens, ``max_length_q``/
``max_length_k`` ints) and ``use_cache=False``. No ``attention_mask``: without one and without a KV cache
(which ``config.use_cache`` would otherwise create, in training too), transformers' SDPA/eager attention
keeps each document to itself from the restarting ``position_ids``; flash attention uses ``cu_seq_lens_*``. The
one label an aligned row cannot hold is dropped: the last column's target (in ``concat``, the token just
past the window), i.e. at most one labelled token per row.

torch DataLoader workers
------------------------
``torch.utils.data.DataLoader(loader, batch_size=None, num_workers=N)``: worker ``w`` renders this rank's
batches ``w, w + N, ...``, which torch hands over in order, so the stream is the single-process one. Each
worker's ``state_dict()`` (what torchdata's ``StatefulDataLoader`` saves per worker) is that worker's own
place, and restores only into the same worker of the same ``N``; the main process's copy does not move
(use ``state_dict(batches=n)`` there, or ``StatefulDataLoader``).
"""

from __future__ import annotations

import itertools
import os
import queue
import threading
import warnings
from collections.abc import Iterator, Mapping
from typing import Any, Optional, Union

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from tokenmill import _core
from tokenmill.data.dataset import (
    PathLike,
    manifest_fingerprint,
    mask_prefix,
    normalize_prefix,
    read_manifest,
)

STATE_VERSION = 1
IGNORE_INDEX = -100
FORMATS = ("tokenmill", "hf")

Sources = Union[PathLike, "list[PathLike]", "Mapping[PathLike, float]"]


def _normalize_sources(sources: Sources) -> tuple[list[str], list[float]]:
    if isinstance(sources, (str, os.PathLike)):
        items = [(sources, 1.0)]
    elif isinstance(sources, Mapping):
        items = list(sources.items())
    else:
        items = [(s, 1.0) for s in sources]
    if not items:
        raise ValueError("sources is empty: give a token-file prefix, a list of them, or {prefix: weight}")
    prefixes, weights = [], []
    for p, w in items:
        try:
            w = float(w)
        except (TypeError, ValueError):
            raise ValueError(f"weight of source {p!r} is not a number: {w!r}") from None
        if not np.isfinite(w) or w < 0:
            raise ValueError(f"weight of source {p!r} must be finite and >= 0, got {w}")
        prefixes.append(normalize_prefix(p))
        weights.append(w)
    if sum(weights) <= 0:
        raise ValueError(f"mixing weights must sum to a positive number, got {weights}")
    if len(set(prefixes)) != len(prefixes):
        raise ValueError(f"a source is listed twice: {prefixes}")
    return prefixes, weights


def _check_fingerprints(prefixes: list[str]) -> Optional[str]:
    seen: dict[str, str] = {}
    for p in prefixes:
        fp = manifest_fingerprint(read_manifest(p))
        if fp is not None:
            seen[p] = fp
    if len(set(seen.values())) > 1:
        listing = ", ".join(f"{p}: {fp}" for p, fp in seen.items())
        raise ValueError(f"sources were tokenized with different tokenizers ({listing})")
    return next(iter(seen.values()), None)


def _default_rank() -> tuple[int, int, str]:
    """(rank, world size, where they came from): the process group when one is initialised, else the
    RANK and WORLD_SIZE variables torchrun sets (a loader built before init_process_group, or in a
    torch DataLoader worker, still gets its shard), else a single process."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size(), "torch.distributed"
    env = {k: os.environ.get(k) for k in ("RANK", "WORLD_SIZE")}
    if env["RANK"] is None and env["WORLD_SIZE"] is None:
        return 0, 1, "default"
    if None in env.values():
        have, missing = ("RANK", "WORLD_SIZE") if env["WORLD_SIZE"] is None else ("WORLD_SIZE", "RANK")
        raise ValueError(
            f"environment variable {have}={env[have]} is set but {missing} is not: set both (torchrun "
            "does) or pass rank= and world_size="
        )
    values = []
    for k in env:
        v = os.environ[k]
        try:
            values.append(int(v))
        except ValueError:
            raise ValueError(f"environment variable {k}={v!r} is not an integer") from None
    return values[0], values[1], "the RANK/WORLD_SIZE environment variables"


class DataLoader(IterableDataset):
    """Batches of packed token sequences from one or more token files, for any PyTorch loop.

    >>> loader = DataLoader({"data/web": 0.8, "data/code": 0.2}, seq_len=2048, batch_size=8, seed=1)  # doctest: +SKIP
    >>> for batch in loader:                                                  # doctest: +SKIP
    ...     loss = model(batch["input_ids"].cuda(), labels=batch["labels"].cuda())

    Arguments:
        sources: a token-file prefix, a list of prefixes (equal weights) or ``{prefix: weight}``.
        seq_len, batch_size: ``T`` and the per-rank ``B`` of each ``[B, T]`` batch.
        packing: ``"concat"``, ``"best_fit"`` or ``"none"`` (see the module docstring).
        seed: every shuffle and the mixing order derive from it.
        rank, world_size: this process's shard (default: torch.distributed when initialised, else the
            RANK and WORLD_SIZE environment variables torchrun sets, else 0, 1).
        document_mask: restart positions and split ``cu_seqlens`` at document boundaries.
        epochs: ``None`` repeats every source forever; ``n`` ends after the first source's n-th pass.
        drop_last: with a finite stream, drop the last incomplete global batch (default; keeps ranks in step).
        pad_id: input id at padded positions (their labels are -100).
        prefetch: batches rendered ahead in a background thread (0: render on demand). Unpinned, a Rust
            thread renders into Rust-owned arrays that torch.from_numpy wraps without a copy.
        pin_memory: render straight into page-locked torch tensors (for ``.cuda(non_blocking=True)``); the
            prefetch thread is then a Python thread that calls Rust (GIL released while rendering).
        num_threads: Rust threads rendering the rows of a batch.
        format: ``"tokenmill"`` (the keys above, for tokenmill's own model and trainer) or ``"hf"``
            (``model(**batch)`` for a transformers causal LM; see the module docstring).
    """

    def __init__(
        self,
        sources: Sources,
        *,
        seq_len: int,
        batch_size: int,
        packing: Optional[str] = "concat",
        seed: int = 0,
        rank: Optional[int] = None,
        world_size: Optional[int] = None,
        document_mask: bool = True,
        epochs: Optional[int] = None,
        drop_last: bool = True,
        pad_id: int = 0,
        prefetch: int = 2,
        pin_memory: bool = False,
        num_threads: Optional[int] = None,
        format: str = "tokenmill",
    ):
        super().__init__()
        if format not in FORMATS:
            raise ValueError(f"format must be one of {FORMATS}, got {format!r}")
        self.prefixes, self.weights = _normalize_sources(sources)
        if packing in (None, False, "none"):
            packing = "none"
        if packing not in ("concat", "best_fit", "none"):
            raise ValueError(f"packing must be 'concat', 'best_fit' or 'none', got {packing!r}")
        for name, v in (("seq_len", seq_len), ("batch_size", batch_size)):
            if not isinstance(v, (int, np.integer)) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        if epochs is not None and (not isinstance(epochs, (int, np.integer)) or epochs < 1):
            raise ValueError(f"epochs must be None or a positive integer, got {epochs!r}")
        if not 0 <= seed < 2**64:
            raise ValueError(f"seed must be in [0, 2**64), got {seed}")
        sources = ["argument", "argument"]
        if rank is None or world_size is None:  # explicit arguments win over the defaults
            drank, dworld, source = _default_rank()
            if rank is None:
                rank, sources[0] = drank, source
            if world_size is None:
                world_size, sources[1] = dworld, source
        for name, v in (("rank", rank), ("world_size", world_size)):
            if not isinstance(v, (int, np.integer)) or isinstance(v, bool):
                raise ValueError(f"{name} must be an integer, got {v!r}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(
                f"need 0 <= rank < world_size, got rank={rank} (from {sources[0]}), "
                f"world_size={world_size} (from {sources[1]})"
            )
        if pin_memory and not torch.cuda.is_available():
            warnings.warn(
                "pin_memory=True but no CUDA device is available: batches are not pinned", stacklevel=2
            )
            pin_memory = False
        if prefetch < 0:
            raise ValueError(f"prefetch must be >= 0, got {prefetch}")
        self.seq_len, self.batch_size = int(seq_len), int(batch_size)
        self.packing, self.seed = packing, int(seed)
        self.rank, self.world_size = int(rank), int(world_size)
        self.document_mask, self.epochs, self.drop_last = bool(document_mask), epochs, drop_last
        self.pad_id, self.prefetch, self.pin_memory = int(pad_id), int(prefetch), bool(pin_memory)
        self.num_threads = int(num_threads or min(4, os.cpu_count() or 1))
        self.format = format
        self.masks = [mask_prefix(p) for p in self.prefixes]
        self.tokenizer_fingerprint = _check_fingerprints(self.prefixes)
        self._rust: Optional[Any] = None
        self._pid = os.getpid()
        self._core()  # open and validate every file now, not mid-run
        self.position = 0  # global index of the next sample this loader's stream starts from
        self._origin = 0
        self._worker: tuple[int, int] = (0, 1)  # (id, count) of the torch worker a loaded state came from

    # -- construction and pickling (torch DataLoader workers get a copy; the Rust side reopens) --

    def _core(self) -> Any:
        # A forked torch worker inherits the Rust object but not its threads: reopen per process.
        if self._rust is None or self._pid != os.getpid():
            self._pid = os.getpid()
            self._rust = _core.Loader(
                self.prefixes,
                self.masks,
                self.weights,
                self.seq_len,
                self.packing,
                self.seed,
                self.document_mask,
                self.epochs,
                self.pad_id,
                self.num_threads,
            )
        return self._rust

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_rust"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)

    # -- the stream --

    @property
    def global_batch_size(self) -> int:
        return self.batch_size * self.world_size

    @property
    def num_samples(self) -> Optional[int]:
        """Samples in the global stream (None: endless)."""
        return self._core().num_samples()

    @property
    def samples_per_epoch(self) -> list[int]:
        """Samples in one pass over each source."""
        return self._core().samples_per_epoch()

    def __len__(self) -> int:
        """Batches this rank yields from position 0 (finite streams only)."""
        n = self.num_samples
        if n is None:
            raise TypeError("an endless stream (epochs=None) has no length")
        g = self.global_batch_size
        if self.drop_last:
            return n // g
        return max(0, -(-(n - self.rank * self.batch_size) // g))

    def _schedule(self, base: int, first: int, step: int) -> tuple[int, int, Optional[int]]:
        """This rank's batches are global batches first, first + step, ... counted from global sample
        ``base``: their (first sample, sample stride, count or None when endless)."""
        n, g, b = self.num_samples, self.global_batch_size, self.batch_size
        count = None
        if n is not None:
            last = (n - base) // g - 1 if self.drop_last else -(-(n - base - self.rank * b) // g) - 1
            count = 0 if last < first else (last - first) // step + 1
        return base + first * g + self.rank * b, step * g, count

    def _batch_starts(self, first: int, stride: int, count: Optional[int]) -> Iterator[tuple[int, int]]:
        n = self.num_samples
        for j in itertools.count() if count is None else range(count):
            start = first + j * stride
            yield start, self.batch_size if n is None else min(self.batch_size, n - start)

    def _render(self, core: Any, start: int, rows: int) -> dict[str, Any]:
        t, pin = self.seq_len, self.pin_memory
        inp = torch.empty((rows, t), dtype=torch.int64, pin_memory=pin)
        lab = torch.empty((rows, t), dtype=torch.int64, pin_memory=pin)
        pos = torch.empty((rows, t), dtype=torch.int64, pin_memory=pin)
        cu = torch.empty(rows * t + 1, dtype=torch.int32, pin_memory=pin)
        # Rust writes straight into the tensors' memory (numpy views share it), GIL released.
        n, max_seqlen = core.fill(start, inp.numpy(), lab.numpy(), pos.numpy(), cu.numpy())
        return {
            "input_ids": inp,
            "labels": lab,
            "position_ids": pos,
            "cu_seqlens": cu[:n],
            "max_seqlen": max_seqlen,
        }

    def __iter__(self) -> Iterator[dict[str, Any]]:
        worker = get_worker_info()
        first, step = (worker.id, worker.num_workers) if worker is not None else (0, 1)
        if self._worker[1] > 1 and self._worker != (first, step):
            raise ValueError(
                f"this loader state was saved by torch DataLoader worker {self._worker[0]} of "
                f"{self._worker[1]}; it resumes only there (torchdata's StatefulDataLoader with "
                f"num_workers={self._worker[1]}), here it is worker {first} of {step}. To change the "
                "worker count, resume from the main process's loader.state_dict(batches=n)"
            )
        self._worker = (first, step)
        core = self._core()
        schedule = self._schedule(self.position, first, step)
        if self.prefetch and not self.pin_memory:
            batches = self._prefetched_rust(core, schedule)
        elif self.prefetch:
            batches = self._prefetched(core, self._batch_starts(*schedule))
        else:
            batches = (self._render(core, s, r) for s, r in self._batch_starts(*schedule))
        for batch in batches:
            # Position advances when a batch is handed over (prefetched ones do not count). In worker w of
            # N it is that worker's place: its next batch is N global batches on.
            self.position += self.global_batch_size * step
            yield to_hf(batch, self.document_mask) if self.format == "hf" else batch

    def _prefetched_rust(
        self, core: Any, schedule: tuple[int, int, Optional[int]]
    ) -> Iterator[dict[str, Any]]:
        """A Rust thread renders ahead into Rust-owned arrays; torch.from_numpy wraps them (no copy)."""
        first, stride, count = schedule
        pre = core.prefetch(first, stride, self.batch_size, count, self.prefetch)
        try:
            while (item := pre.next()) is not None:
                inp, lab, pos, cu, max_seqlen = item
                yield {
                    "input_ids": torch.from_numpy(inp),
                    "labels": torch.from_numpy(lab),
                    "position_ids": torch.from_numpy(pos),
                    "cu_seqlens": torch.from_numpy(cu),
                    "max_seqlen": max_seqlen,
                }
        finally:
            pre.close()

    def _prefetched(self, core: Any, starts: Iterator[tuple[int, int]]) -> Iterator[dict[str, Any]]:
        """A Python thread renders ahead into torch-allocated (pinned) tensors."""
        q: queue.Queue = queue.Queue(maxsize=self.prefetch)
        stop = threading.Event()
        done = object()

        def offer(item: Any) -> bool:
            while not stop.is_set():
                try:
                    q.put(item, timeout=0.1)
                    return True
                except queue.Full:
                    pass
            return False

        def produce() -> None:
            try:
                for s, r in starts:
                    if not offer(self._render(core, s, r)):
                        return
                offer(done)
            except BaseException as e:  # handed to the consumer, raised there
                offer(e)

        thread = threading.Thread(target=produce, name="tokenmill-prefetch", daemon=True)
        thread.start()
        try:
            while True:
                item = q.get()
                if item is done:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            stop.set()
            thread.join()

    # -- resume --

    def state_dict(self, batches: Optional[int] = None) -> dict[str, Any]:
        """The stream position, O(1) to restore. ``batches``: the state after that many global batches
        from where this loader started (use it when batches come through torch DataLoader workers,
        whose copies the main process does not see)."""
        position = self.position if batches is None else self._origin + int(batches) * self.global_batch_size
        return {
            "version": STATE_VERSION,
            "sample_index": position,
            "worker": list(self._worker) if batches is None else [0, 1],
            "global_batch_size": self.global_batch_size,
            "seed": self.seed,
            "seq_len": self.seq_len,
            "packing": self.packing,
            "document_mask": self.document_mask,
            "epochs": self.epochs,
            "weights": list(self.weights),
            "samples_per_epoch": self.samples_per_epoch,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue the global stream at the saved position (any world size with the same global batch
        continues exactly; a different global batch continues from the same sample)."""
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"unsupported loader state version {state.get('version')!r}")
        mine = self.state_dict()
        for key in ("seed", "seq_len", "packing", "document_mask", "epochs", "weights", "samples_per_epoch"):
            theirs = list(state[key]) if isinstance(state[key], (list, tuple)) else state[key]
            if theirs != mine[key]:
                raise ValueError(
                    f"loader state is for a different stream: {key} was {state[key]!r}, this loader has {mine[key]!r}"
                )
        position = int(state["sample_index"])
        if position < 0:
            raise ValueError(f"sample_index must be >= 0, got {position}")
        worker = tuple(int(x) for x in state.get("worker", (0, 1)))
        if len(worker) != 2 or not 0 <= worker[0] < worker[1]:
            raise ValueError(f"loader state 'worker' must be [id, count] with 0 <= id < count, got {worker}")
        self.position = self._origin = position
        self._worker = worker

    def __repr__(self) -> str:
        return (
            f"DataLoader(sources={dict(zip(self.prefixes, self.weights))}, seq_len={self.seq_len}, "
            f"batch_size={self.batch_size}, packing={self.packing!r}, rank={self.rank}/{self.world_size}, "
            f"position={self.position})"
        )


def to_hf(batch: dict[str, Any], document_mask: bool = True) -> dict[str, Any]:
    """A tokenmill batch as transformers' causal LMs take it (``format="hf"``; see the module docstring)."""
    lab = batch["labels"]
    # Our label i is the token after input i, or -100; transformers wants it at column i + 1 (and when it
    # is not -100 it *is* input_ids[:, i + 1], so the shifted row is exactly the aligned labels).
    aligned = torch.empty_like(lab)
    aligned[:, 0] = IGNORE_INDEX
    aligned[:, 1:] = lab[:, :-1]
    out = {"input_ids": batch["input_ids"], "labels": aligned, "position_ids": batch["position_ids"]}
    if document_mask:
        cu, m = batch["cu_seqlens"], int(batch["max_seqlen"])
        # A cache switches transformers' packed-row detection off (masking_utils), silently.
        out.update(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=m, max_length_k=m, use_cache=False)
    return out
