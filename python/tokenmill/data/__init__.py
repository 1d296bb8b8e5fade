"""Token data: corpus preparation (``prepare``), Megatron-compatible token files (``TokenDataset``),
instruction-tuning data (``prepare_sft``), the PyTorch ``DataLoader`` and ``hf.Trainer`` (transformers'
Trainer fed by it). Names load on first use."""

from __future__ import annotations

import importlib
from typing import Any

# Imported eagerly (light: no torch) so that `tm.data.prepare` is the function, not the module of the
# same name; the module itself is `importlib.import_module("tokenmill.data.prepare")`.
from tokenmill.data.prepare import inspect, merge, prepare

_ATTRS = {
    "TokenDataset": "tokenmill.data.dataset",
    "DataLoader": "tokenmill.data.loader",
    "prepare_sft": "tokenmill.data.sft",
}

__all__ = ["DataLoader", "TokenDataset", "inspect", "merge", "prepare", "prepare_sft"]


def __getattr__(name: str) -> Any:
    if name == "hf":  # tm.data.hf.Trainer; imports transformers, so only when asked for
        return importlib.import_module("tokenmill.data.hf")
    if name in _ATTRS:
        return getattr(importlib.import_module(_ATTRS[name]), name)
    raise AttributeError(f"module 'tokenmill.data' has no attribute {name!r}")
