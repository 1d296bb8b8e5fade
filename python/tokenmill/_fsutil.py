"""Atomic writes, the one home on the Python side (the Rust side's is tokenmill-core's ``fsutil.rs``).

A file or folder is written under a temporary name beside its target, synced, then renamed over it and
the rename synced, so a crash at any point leaves the old version or the new one, never a partial one.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import BinaryIO, Callable, Union

PathLike = Union[str, "os.PathLike[str]"]


def fsync_path(path: PathLike) -> None:
    """Flush a file's or a folder's contents (a folder: its entries) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sync_parent(path: Path) -> None:
    try:
        fsync_path(path.parent)
    except OSError:  # best effort: some filesystems cannot sync a folder
        pass


def write_atomic(path: PathLike, data: Union[bytes, str, Callable[[BinaryIO], None]]) -> None:
    """Write ``data`` (bytes, UTF-8 text, or a function writing to a binary file) to ``path`` atomically.

    >>> import tempfile, pathlib
    >>> p = pathlib.Path(tempfile.mkdtemp()) / "a.txt"
    >>> write_atomic(p, "one"); write_atomic(p, lambda f: f.write(b"two")); p.read_text()
    'two'
    >>> [q.name for q in p.parent.iterdir()]  # no temporary left behind
    ['a.txt']
    """
    target = Path(path)
    if not target.parent.is_dir():  # else mkstemp's error would name a temporary the user never chose
        raise FileNotFoundError(f"{target.parent}: no such directory (writing {target})")
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            if callable(data):
                data(f)
            else:
                f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        os.unlink(tmp)
        raise
    _sync_parent(target)


def replace_dir(tmp: PathLike, target: PathLike) -> None:
    """Sync the files of the finished folder ``tmp`` and the folder itself, then put it in place of
    ``target`` (a previous ``target`` is removed first)."""
    tmp, target = Path(tmp), Path(target)
    for p in tmp.iterdir():
        if p.is_file():
            fsync_path(p)
    fsync_path(tmp)
    shutil.rmtree(target, ignore_errors=True)
    os.replace(tmp, target)
    _sync_parent(target)
