"""``tm.data.hf.Trainer``: ``transformers.Trainer`` fed by a ``tm.data.DataLoader``.

>>> loader = tm.data.DataLoader("data/train", seq_len=2048, batch_size=8, format="hf")   # doctest: +SKIP
>>> args = transformers.TrainingArguments("out", per_device_train_batch_size=8, max_steps=1000,
...                                       save_steps=100)                               # doctest: +SKIP
>>> tm.data.hf.Trainer(model=model, args=args, train_dataset=loader).train()           # doctest: +SKIP
>>> tm.data.hf.Trainer(model=model, args=args, train_dataset=loader).train(resume_from_checkpoint=True)  # doctest: +SKIP

What changes against a plain ``Trainer``:

* Batching, shuffling, mixing and rank sharding are the loader's: its batches go to the model as they are
  (no sampler, no collator, no accelerate re-sharding). Under ``torchrun`` the loader takes its rank from
  torch.distributed; the Trainer checks that it agrees with ``TrainingArguments``.
* ``dataloader_num_workers=N`` runs the loader in N torch workers (``batch_size=None``; workers split the
  stream, see ``tokenmill.data.loader``); ``dataloader_pin_memory`` pins the batches.
* Each checkpoint folder gets ``tokenmill_loader_rank<r>.json``: the loader's ``state_dict()`` after the
  checkpoint's step (``global_step * gradient_accumulation_steps`` batches). ``train(resume_from_checkpoint=...)``
  restores it, so the run continues with exactly the batches an uninterrupted run would have seen; the
  Trainer's own batch skipping (``get_resumed_dataloader``) is not needed and returns the loader as is.
* The stream's length is the loader's: an endless loader (``epochs=None``) needs ``max_steps``; a finite
  one is one Trainer epoch (set passes with the loader's ``epochs``, not ``num_train_epochs``).
* ``eval_dataset`` may be a finite loader too; each evaluation reads it from its start.
"""

from __future__ import annotations

import copy
import json
import os
from typing import Any, Optional, Union

import torch

from tokenmill.extras import require

# A missing transformers names `tokenmill[hf]` here, at import, before any work.
require("hf", "tm.data.hf (transformers' Trainer)", ["transformers"])

import transformers  # noqa: E402
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, TrainOutput, get_last_checkpoint  # noqa: E402

from tokenmill.data.loader import DataLoader  # noqa: E402

STATE_FILE = "tokenmill_loader_rank{rank}.json"


def _check_loader(loader: Any, what: str) -> DataLoader:
    if not isinstance(loader, DataLoader):
        raise TypeError(f"{what} must be a tokenmill.data.DataLoader, got {type(loader).__name__}")
    if loader.format != "hf":
        raise ValueError(
            f"{what} yields tokenmill's own batches (labels already shifted, which transformers shifts "
            "again): build it with tm.data.DataLoader(..., format='hf')"
        )
    return loader


class Trainer(transformers.Trainer):
    """``transformers.Trainer`` whose training data is a ``tm.data.DataLoader(..., format="hf")``: the
    loader's own batching, rank sharding and exact resume through Trainer checkpoints (module docstring)."""

    train_dataset: DataLoader  # checked in __init__ (the base class types it as any dataset)

    def __init__(self, *args: Any, train_dataset: Any = None, **kwargs: Any):
        loader = _check_loader(train_dataset, "train_dataset")
        kwargs["train_dataset"] = loader  # through kwargs: mypy cannot tell that *args stops before it
        super().__init__(*args, **kwargs)
        a = self.args
        if a.per_device_train_batch_size != loader.batch_size:
            raise ValueError(
                f"TrainingArguments.per_device_train_batch_size is {a.per_device_train_batch_size} but the "
                f"loader's batch_size is {loader.batch_size}: make them equal (the loader does the batching)"
            )
        if (loader.rank, loader.world_size) != (a.process_index, a.world_size):
            raise ValueError(
                f"the loader is rank {loader.rank} of {loader.world_size}, the Trainer process "
                f"{a.process_index} of {a.world_size}: build the loader after torch.distributed is "
                "initialised (TrainingArguments does it) or pass rank= and world_size="
            )
        if loader.num_samples is not None and a.max_steps <= 0 and a.num_train_epochs != 1:
            raise ValueError(
                "a finite loader is one Trainer epoch: set the passes with tm.data.DataLoader(epochs=n) "
                f"and num_train_epochs=1 (got {a.num_train_epochs}), or use max_steps"
            )
        self._loader_start_step = 0  # the global step the loader's origin stands for
        if not hasattr(transformers.Trainer, "get_resumed_dataloader"):
            # Older transformers skip the resumed epoch's batches by replaying them; the restored loader
            # is already past them.
            a.ignore_data_skip = True

    def _wrap(self, loader: DataLoader) -> Any:
        if self.args.dataloader_num_workers == 0:
            return loader
        return torch.utils.data.DataLoader(
            loader,
            batch_size=None,
            num_workers=self.args.dataloader_num_workers,
            pin_memory=self.args.dataloader_pin_memory and torch.cuda.is_available(),
            prefetch_factor=self.args.dataloader_prefetch_factor,
            persistent_workers=self.args.dataloader_persistent_workers,
        )

    def get_train_dataloader(self) -> Any:
        return self._wrap(self.train_dataset)

    def get_eval_dataloader(self, eval_dataset: Any = None) -> Any:
        ds = self.eval_dataset if eval_dataset is None else eval_dataset
        if not isinstance(ds, DataLoader):
            return super().get_eval_dataloader(eval_dataset)
        loader = _check_loader(ds, "eval_dataset")
        if loader.num_samples is None:
            raise ValueError("eval_dataset is an endless loader: build it with epochs=1")
        fresh = copy.copy(loader)  # each evaluation from the loader's start (the copy reopens its files)
        fresh.position = fresh._origin
        return self._wrap(fresh)

    def get_resumed_dataloader(self, dataloader: Any, num_batches: int) -> Any:
        return dataloader  # already positioned by the restored loader state

    def _save_checkpoint(self, model: Any, trial: Any) -> None:
        folder = os.path.join(
            self._get_output_dir(trial), f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        )
        os.makedirs(folder, exist_ok=True)
        batches = (self.state.global_step - self._loader_start_step) * self.args.gradient_accumulation_steps
        state = {
            "global_step": self.state.global_step,
            "loader": self.train_dataset.state_dict(batches=batches),
        }
        path = os.path.join(folder, STATE_FILE.format(rank=self.args.process_index))
        tmp = f"{path}.tmp-{os.getpid()}"
        with open(tmp, "w") as f:
            json.dump(state, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        super()._save_checkpoint(model, trial)

    def train(
        self,
        resume_from_checkpoint: Union[str, bool, None] = None,
        trial: Any = None,
        ignore_keys_for_eval: Optional[list[str]] = None,
        **kwargs: Any,
    ) -> TrainOutput:
        checkpoint: Optional[str] = None
        if resume_from_checkpoint is True:
            checkpoint = get_last_checkpoint(self.args.output_dir)
            if checkpoint is None:
                raise ValueError(f"no valid checkpoint found in output directory ({self.args.output_dir})")
        elif resume_from_checkpoint:
            checkpoint = os.fspath(resume_from_checkpoint)  # a path-like works too
        if checkpoint is not None:
            self._restore_loader(checkpoint)
        return super().train(checkpoint, trial, ignore_keys_for_eval, **kwargs)

    def _restore_loader(self, checkpoint: str) -> None:
        path = os.path.join(checkpoint, STATE_FILE.format(rank=self.args.process_index))
        try:
            with open(path) as f:
                saved = json.load(f)
        except FileNotFoundError:
            raise FileNotFoundError(
                f"{path}: no loader state in this checkpoint (not written by tokenmill.data.hf.Trainer, or "
                "by another number of processes): the data stream cannot be resumed exactly"
            ) from None
        self.train_dataset.load_state_dict(saved["loader"])
        self._loader_start_step = int(saved["global_step"])
