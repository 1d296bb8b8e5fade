"""Token data: corpus preparation (``prepare``), Megatron-compatible token files (``TokenDataset``),
instruction-tuning data (``prepare_sft``) and the PyTorch ``DataLoader``. Names load on first use."""

from __future__ import annotations

import importlib
from typing import Any

_ATTRS = {
    "prepare": "tokenmill.data.prepare",
    "inspect": "tokenmill.data.prepare",
    "merge": "tokenmill.data.prepare",
    "TokenDataset": "tokenmill.data.dataset",
    "DataLoader": "tokenmill.data.loader",
    "prepare_sft": "tokenmill.data.sft",
}

__all__ = sorted(_ATTRS)


def __getattr__(name: str) -> Any:
    if name in _ATTRS:
        return getattr(importlib.import_module(_ATTRS[name]), name)
    raise AttributeError(f"module 'tokenmill.data' has no attribute {name!r}")
