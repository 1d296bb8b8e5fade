"""``TokenDataset``: a Megatron MMIDIDX token file (``PREFIX.bin`` + ``PREFIX.idx``), validated by the Rust
reader and memory-mapped with numpy, plus what lies beside it: the ``PREFIX.json`` manifest (tokenizer
fingerprint) and, for instruction-tuning data, the loss mask ``PREFIX.mask.bin/.idx`` (uint8, one 0/1
entry per token, same document lengths; 1 = the model learns to predict this token)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np

from tokenmill import _core

PathLike = Union[str, "os.PathLike[str]"]

MASK_SUFFIX = ".mask"


def normalize_prefix(prefix: PathLike) -> str:
    """``data/web`` for ``data/web``, ``data/web.bin`` or ``data/web.idx``."""
    p = os.fspath(prefix)
    for ext in (".bin", ".idx"):
        if p.endswith(ext):
            return p[: -len(ext)]
    return p


def output_prefix(prefix: PathLike) -> str:
    """The prefix an output is written at (``normalize_prefix``), refused when it names no file: a
    prefix ending in a separator would write the hidden files ``dir/.bin``, ``dir/.idx``."""
    p = normalize_prefix(prefix)
    if os.path.basename(p) in ("", ".", ".."):
        raise ValueError(
            f"output prefix {p!r} names a directory, not a file prefix: give e.g. "
            f"{os.path.join(p, 'data')!r} (writes data.bin, data.idx, data.json there)"
        )
    return p


def read_manifest(prefix: PathLike) -> Optional[dict[str, Any]]:
    path = Path(normalize_prefix(prefix) + ".json")
    if not path.exists():
        return None
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: unreadable manifest ({e})") from e
    if not isinstance(manifest, dict):
        raise ValueError(f"{path}: a manifest must be a JSON object")
    return manifest


def manifest_fingerprint(manifest: Optional[dict[str, Any]]) -> Optional[str]:
    """The tokenizer fingerprint a manifest records: ``{"tokenizer": {"fingerprint": ...}}`` (what
    ``prepare`` and ``prepare_sft`` write) or a top-level ``"tokenizer_fingerprint"``."""
    if not manifest:
        return None
    tok = manifest.get("tokenizer")
    if isinstance(tok, dict) and tok.get("fingerprint") is not None:
        return str(tok["fingerprint"])
    fp = manifest.get("tokenizer_fingerprint")
    return None if fp is None else str(fp)


def mask_prefix(prefix: PathLike) -> Optional[str]:
    """The loss-mask dataset beside ``prefix``, if there is one."""
    p = normalize_prefix(prefix) + MASK_SUFFIX
    return p if os.path.exists(p + ".idx") else None


class TokenDataset:
    """Documents of token ids from ``PREFIX.bin/.idx``.

    >>> ds = TokenDataset("data/web")            # doctest: +SKIP
    >>> len(ds), ds.num_tokens, ds[0][:5]        # doctest: +SKIP
    """

    def __init__(self, prefix: PathLike):
        self.prefix = normalize_prefix(prefix)
        dtype, lengths, offsets = _core.open_token_file(self.prefix)  # validates header and sizes
        self.dtype = np.dtype(dtype)
        self.lengths: np.ndarray = lengths
        self.offsets: np.ndarray = offsets
        size = os.path.getsize(self.prefix + ".bin")
        self.tokens: np.ndarray = (
            np.memmap(self.prefix + ".bin", dtype=self.dtype, mode="r") if size else np.empty(0, self.dtype)
        )
        self.manifest = read_manifest(self.prefix)
        mp = mask_prefix(self.prefix)
        self.mask: Optional[TokenDataset] = TokenDataset(mp) if mp else None
        if self.mask is not None and not np.array_equal(self.mask.lengths, self.lengths):
            raise ValueError(f"{mp}: loss mask does not match the documents of {self.prefix}")

    @property
    def tokenizer_fingerprint(self) -> Optional[str]:
        return manifest_fingerprint(self.manifest)

    @property
    def num_documents(self) -> int:
        return len(self.lengths)

    @property
    def num_tokens(self) -> int:
        return int(self.tokens.shape[0])

    def __len__(self) -> int:
        return self.num_documents

    def __getitem__(self, i: int) -> np.ndarray:
        """The tokens of document ``i`` (a read-only view into the memory map)."""
        n = self.num_documents
        if not -n <= i < n:
            raise IndexError(f"document {i} out of range ({n} documents in {self.prefix})")
        i %= n
        start = int(self.offsets[i])
        return self.tokens[start : start + int(self.lengths[i])]

    def loss_mask(self, i: int) -> np.ndarray:
        """0/1 per token of document ``i`` (all ones when the dataset has no mask)."""
        if self.mask is None:
            return np.ones(int(self.lengths[i]), np.uint8)
        return self.mask[i]

    def __repr__(self) -> str:
        return (
            f"TokenDataset({self.prefix!r}, documents={self.num_documents}, tokens={self.num_tokens}, "
            f"dtype={self.dtype.name}{', loss_mask' if self.mask is not None else ''})"
        )


def write_token_file(
    prefix: PathLike, docs, vocab_size: Optional[int] = None, dtype: Optional[str] = None
) -> None:
    """Write ``docs`` (sequences of ids) to ``PREFIX.bin/.idx`` atomically. The dtype follows Megatron
    (``_core.token_dtype``: uint16 below 65,500 ids, else int32) unless given."""
    docs = [np.asarray(d, dtype=np.int64).tolist() for d in docs]
    if dtype is None:
        if vocab_size is None:
            vocab_size = 1 + max((max(d) for d in docs if d), default=0)
        dtype = _core.token_dtype(vocab_size)
    _core.write_token_file(normalize_prefix(prefix), docs, dtype)
