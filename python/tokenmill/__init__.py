"""tokenmill: Rust-accelerated training primitives for LLaMA-class models.

Tokenizer (BPE train/encode/decode), corpus preparation and a PyTorch dataloader in Rust; CUDA kernels
through CuPy; a thin LLaMA trainer; a compute/cost/memory planner; evaluation (perplexity, WER/CER).
Submodules load on first use, so ``import tokenmill`` stays cheap and torch is imported only by the parts
that need it.
"""

from __future__ import annotations

import importlib
from typing import Any

from tokenmill import _core

__version__: str = _core.__version__

_SUBMODULES = ("corpus", "data", "eval", "kernels", "lora", "model", "optim", "plan", "quant", "train")
_ATTRS = {"Tokenizer": "tokenmill.tokenizer"}

__all__ = ["Tokenizer", "__version__", *_SUBMODULES]


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        return importlib.import_module(f"tokenmill.{name}")
    if name in _ATTRS:
        return getattr(importlib.import_module(_ATTRS[name]), name)
    raise AttributeError(f"module 'tokenmill' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
