"""Built-in corpora made from what every CPython ships: stdlib sources and their docstrings.

No download is ever needed; the same Python version gives the same corpus.
"""

from __future__ import annotations

import ast
import os
import sysconfig
from pathlib import Path
from typing import Iterator


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_sources(max_bytes: int | None = None) -> Iterator[tuple[str, str]]:
    """(relative path, text) for every stdlib ``.py`` file, in sorted order, skipping tests."""
    root = stdlib_dir()
    total = 0
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(
            d for d in dirnames if d not in ("site-packages", "test", "tests", "__pycache__", "idlelib")
        )
        for name in sorted(filenames):
            if not name.endswith(".py"):
                continue
            path = Path(dirpath) / name
            try:
                text = path.read_text(encoding="utf-8")
            except (UnicodeDecodeError, OSError):
                continue
            yield str(path.relative_to(root)), text
            total += len(text.encode())
            if max_bytes is not None and total >= max_bytes:
                return


def stdlib_docstrings(max_docs: int | None = None) -> Iterator[str]:
    """Module, class and function docstrings of the stdlib: English prose, deterministic order."""
    count = 0
    for _, source in stdlib_sources():
        try:
            tree = ast.parse(source)
        except (SyntaxError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) > 40:
                    yield doc
                    count += 1
                    if max_docs is not None and count >= max_docs:
                        return
