"""Optional dependencies: which pip extra brings each one, and the check that names it.

``pip install tokenmill`` brings numpy only (tokenizer, ``prepare`` of text/JSONL, ``plan``, ``eval wer``).
What each extra installs is listed once, in pyproject.toml's ``[project.optional-dependencies]``; this
table maps each extra to the modules it provides (tests/test_extras.py checks the two agree). A command
that needs a missing one refuses before any work, naming the extra; the loss plot alone is skipped
with a notice (``tokenmill.train.plot_losses``).
"""

from __future__ import annotations

import importlib
from typing import Optional, Sequence

# extra -> the import names of what it installs (cupy-cuda13x imports as cupy)
EXTRAS: dict[str, tuple[str, ...]] = {
    "train": ("torch", "safetensors", "tqdm"),
    "data": ("pyarrow",),
    "cuda": ("cupy",),
    "plot": ("matplotlib",),
    "track": ("tensorboard", "wandb"),
    "hf": ("transformers", "peft"),
}


class MissingExtraError(ModuleNotFoundError):
    """An optional dependency is not installed; the message says which ``tokenmill[extra]`` brings it."""


def extra_of(module: Optional[str]) -> Optional[str]:
    """The extra that installs ``module`` (a dotted name counts by its top-level package), or None."""
    top = (module or "").partition(".")[0]
    return next((extra for extra, mods in EXTRAS.items() if top in mods), None)


def install_hint(extra: str) -> str:
    return f"pip install 'tokenmill[{extra}]'"


def require(extra: str, what: str, modules: Optional[Sequence[str]] = None) -> None:
    """Raise MissingExtraError unless every module of ``extra`` (or only ``modules`` of it) imports.

    ``what`` names the feature in the message, e.g. "training" or "reading Parquet"."""
    missing = []
    for name in modules if modules is not None else EXTRAS[extra]:
        assert extra_of(name) == extra, f"{name} is not in the {extra} extra"
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise MissingExtraError(
            f"{what} needs {' and '.join(missing)}, not installed: {install_hint(extra)}", name=missing[0]
        )
