"""Experiment trackers for ``tokenmill train``: TensorBoard and Weights & Biases get each record that
out_dir/log.jsonl gets (its numeric fields, at its step), as the run's ``[log] trackers`` say.

* ``"tensorboard"``: event files in out_dir/tensorboard (``tensorboard --logdir out_dir``). A resumed run
  purges what the interrupted one wrote after its checkpoint, as log.jsonl does.
* ``"wandb"``: a run in out_dir/wandb, offline by default (``log.wandb_mode``): it needs no network or
  account; ``wandb sync out_dir/wandb/offline-run-*`` uploads it later. Each invocation (a resume too) is
  one wandb run.

Both come with ``pip install 'tokenmill[track]'``; ``check`` refuses before any work when one is missing.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional, Sequence

from tokenmill.config import LogSection
from tokenmill.extras import require


def check(trackers: Sequence[str]) -> None:
    """Raise MissingExtraError (naming tokenmill[track]) unless every tracker's package imports."""
    if trackers:
        require("track", f"log.trackers = {list(trackers)}", modules=list(trackers))


def scalars(record: dict) -> dict[str, float]:
    """The numeric fields of a log record except its step (booleans, strings and None dropped)."""
    return {
        k: float(v)
        for k, v in record.items()
        if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)
    }


class Trackers:
    """The open trackers of one run (rank 0 only)."""

    def __init__(self, log: LogSection, out_dir: Path, config: dict[str, Any], start_step: int) -> None:
        global _open
        check(log.trackers)
        if _open is not None:  # a train() in this process that ended with an exception (atexit closes others)
            _open.close()
        _open = self
        self._tb: Any = None
        self._wandb: Any = None
        if "tensorboard" in log.trackers:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step: TensorBoard drops the events at or after it that an interrupted run left.
            self._tb = SummaryWriter(str(Path(out_dir) / "tensorboard"), purge_step=start_step + 1)
            self._tb.add_text("config", "```\n" + json.dumps(config, indent=2) + "\n```", start_step)
        if "wandb" in log.trackers:
            import wandb

            self._wandb = wandb.init(
                project=log.wandb_project,
                name=Path(out_dir).resolve().name,
                dir=str(out_dir),
                mode=log.wandb_mode,
                config=config,
                reinit="create_new",  # one run per train(); a run the caller opened is left alone
                settings=wandb.Settings(console="off", silent=True),  # the console stays tqdm's
            )

    def log(self, record: dict) -> None:
        step, values = record["step"], scalars(record)
        if self._tb is not None:
            for k, v in values.items():
                self._tb.add_scalar(k, v, step)
            self._tb.flush()  # a record every log_every steps: cheap, and nothing is lost on a crash
        if self._wandb is not None:
            self._wandb.log(values, step=step)

    def close(self) -> None:
        global _open
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()
        self._tb = self._wandb = None
        if _open is self:
            _open = None


_open: Optional[Trackers] = None
