"""Corpus preparation: raw text -> Megatron-compatible token files (Rust core, all cores).

``prepare`` tokenizes documents into ``PREFIX.bin`` / ``PREFIX.idx`` (Megatron-LM MMIDIDX v1: uint16
when the vocabulary has fewer than 65,500 ids, else int32, one sequence per document) and writes
``PREFIX.json``, a manifest with the tokenizer fingerprint, the inputs (size, mtime), document/token
counts, skipped records and an xxh3-128 checksum of each output file. The manifest is written last:
a dataset without one is incomplete.

Inputs, by file name (``input_format`` overrides):

* ``.txt`` / ``.text`` / ``.md``: one document per file, or with ``delimiter="---"`` documents
  separated by lines equal to the delimiter (the line break before a delimiter line is not part of
  the document);
* ``.jsonl`` / ``.ndjson`` (and ``.json`` when named explicitly, not when found in a directory): one
  JSON object per line, text under ``text_key``; blank lines are ignored;
* any of the above with ``.gz`` or ``.zst`` appended, decompressed on the fly;
* ``.parquet``: the ``text_key`` column (string or binary), read by pyarrow in record batches that
  stream into the Rust pipeline. (A Rust Parquet reader would add the arrow-rs stack to the build;
  Parquet is columnar and pyarrow reads it at several hundred MB/s, far above tokenization speed.)

Directories are walked recursively and globs expanded, each in sorted order; inside directories
only files with the suffixes above are taken.

Bad records (invalid UTF-8, malformed JSON, a missing or non-string key, an empty document) are
counted per kind and reported as ``file:line: reason``; with ``on_error="skip"`` (default) they are
skipped and summarised, with ``on_error="fail"`` the first one (in input order) raises ValueError.

Scale-out: ``num_shards=N, shard_index=I`` prepares shard I of a deterministic partition of the
input files (contiguous runs of whole files of similar total size, so a single huge file is not
split); every shard must be given the same input list (paths and sizes; the manifest records a
digest of it). ``merge`` concatenates all N shards, checking tokenizer fingerprints, settings, the
input digest and checksums, into a dataset byte-identical to a single run.

A rerun at the same prefix restarts from scratch: it first removes the old manifest, index and data
(in that order) and any temporaries left by killed runs.
"""

from __future__ import annotations

import glob
import json
import os
import sys
import warnings
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence, Union

from tokenmill import _core
from tokenmill.data.dataset import normalize_prefix
from tokenmill.data.dataset import output_prefix as _output_prefix
from tokenmill.extras import require
from tokenmill.tokenizer import EOS_TOKENS

PathLike = Union[str, "os.PathLike[str]"]

__all__ = ["expand_inputs", "inspect", "merge", "prepare", "verify"]

_TEXT = (".txt", ".text", ".md")
_JSONL = (".jsonl", ".ndjson", ".json")
_PARQUET = (".parquet",)
_COMPRESSED = (".gz", ".zst", ".zstd")


def _format_of(path: str, in_directory: bool = False) -> Optional[str]:
    name = path.lower()
    if in_directory and name.endswith(".json"):
        return None  # plain .json in a directory is more often metadata (or our manifest) than JSON Lines
    for c in _COMPRESSED:
        if name.endswith(c):
            name = name[: -len(c)]
            break
    else:
        if name.endswith(_PARQUET):
            return "parquet"
    if name.endswith(_TEXT):
        return "text"
    if name.endswith(_JSONL):
        return "jsonl"
    return None


def expand_inputs(inputs: Union[PathLike, Iterable[PathLike]]) -> list[str]:
    """Files named by ``inputs`` (files, directories, globs), each argument expanded in sorted order.

    >>> expand_inputs([])
    []
    """
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    out: list[str] = []
    for item in inputs:
        s = os.fspath(item)
        if os.path.isdir(s):
            found = []
            for dirpath, dirnames, filenames in os.walk(s):
                dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
                found += [
                    os.path.join(dirpath, f)
                    for f in filenames
                    if not f.startswith(".") and _format_of(f, in_directory=True) is not None
                ]
            if not found:
                raise ValueError(
                    f"{s}: directory holds no input files ({', '.join(_TEXT + _JSONL[:-1] + _PARQUET)}, "
                    "optionally .gz/.zst); name other files one by one with input_format= (--format)"
                )
            out += sorted(found)
        elif glob.has_magic(s) and not os.path.exists(s):
            matched = sorted(p for p in glob.glob(s, recursive=True) if os.path.isfile(p))
            if not matched:
                raise FileNotFoundError(f"{s}: no file matches this pattern")
            out += matched
        else:
            if not os.path.exists(s):
                raise FileNotFoundError(f"{s}: no such file or directory")
            out.append(s)
    return out


class _ParquetSource:
    """Feeds one Parquet column to the Rust pipeline, one record batch at a time."""

    def __init__(self, column: str, batch_rows: int = 8192):
        self.column = column
        self.batch_rows = batch_rows
        self._batches: Optional[Any] = None

    def open(self, path: str) -> None:
        import pyarrow as pa  # prepare() checked it is installed
        import pyarrow.parquet as pq

        try:
            f = pq.ParquetFile(path)
        except (pa.ArrowException, OSError) as e:
            raise ValueError(f"{path}: not a readable Parquet file ({e})") from e
        schema = f.schema_arrow
        if self.column not in schema.names:
            raise ValueError(f"{path}: no column {self.column!r} (columns: {', '.join(schema.names)})")
        t = schema.field(self.column).type
        if not (pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_binary(t)):
            if not (pa.types.is_large_binary(t) or str(t) in ("string_view", "binary_view")):
                raise ValueError(f"{path}: column {self.column!r} has type {t}, not string or binary")
        self._batches = f.iter_batches(batch_size=self.batch_rows, columns=[self.column])

    def next_batch(self) -> Optional[list]:
        batch = next(self._batches, None) if self._batches is not None else None
        if batch is None:
            self._batches = None
            return None
        return batch.column(0).to_pylist()


def _load_tokenizer(tokenizer: Any) -> Any:
    from tokenmill.tokenizer import Tokenizer

    if isinstance(tokenizer, Tokenizer):
        return tokenizer
    if isinstance(tokenizer, (str, os.PathLike)):
        return Tokenizer.from_file(tokenizer)
    raise TypeError(
        f"tokenizer must be a tokenmill.Tokenizer or the path of one, not {type(tokenizer).__name__}"
    )


def _eos_id(tokenizer: Any, append_eos: bool, eos_token: Union[str, int, None]) -> Optional[int]:
    if not append_eos:
        return None
    specials = dict(tokenizer.special_tokens)
    if isinstance(eos_token, int):
        return eos_token
    if isinstance(eos_token, str):
        if eos_token not in specials:
            raise ValueError(f"eos_token {eos_token!r} is not a special token of this tokenizer")
        return specials[eos_token]
    if tokenizer.eos_token_id is not None:
        return int(tokenizer.eos_token_id)
    raise ValueError(
        "append_eos=True but the tokenizer has none of the usual end-of-document special tokens "
        f"({', '.join(EOS_TOKENS)}); pass eos_token= (--eos-token) or append_eos=False (--no-eos)"
    )


def prepare(
    inputs: Union[PathLike, Sequence[PathLike]],
    output_prefix: PathLike,
    tokenizer: Any,
    text_key: str = "text",
    append_eos: bool = True,
    num_workers: Optional[int] = None,
    on_error: str = "skip",
    num_shards: int = 1,
    shard_index: int = 0,
    *,
    delimiter: Optional[str] = None,
    input_format: Optional[str] = None,
    eos_token: Union[str, int, None] = None,
    progress: Optional[bool] = None,
    chunk_bytes: int = 4 << 20,
) -> dict:
    """Tokenize ``inputs`` into ``output_prefix.{bin,idx,json}``; returns the manifest (a dict).

    ``tokenizer`` is a :class:`tokenmill.Tokenizer` or the path ``Tokenizer.save`` wrote. Documents are
    encoded as ordinary text (special-token strings in the data are not special), then the EOS id is
    appended when ``append_eos`` (the tokenizer's ``<|endoftext|>`` / ``</s>`` / ... or ``eos_token``).
    ``num_workers=None`` uses every core; the output bytes are the same for any value. ``progress``
    (default: when stderr is a terminal) draws bytes/s and tokens/s on stderr.
    """
    if on_error not in ("skip", "fail"):
        raise ValueError(f"on_error must be 'skip' or 'fail', got {on_error!r}")
    if num_workers is not None and num_workers < 1:
        raise ValueError(f"num_workers must be at least 1, got {num_workers}")
    if not 0 <= shard_index < num_shards:
        raise ValueError(
            f"need 0 <= shard_index < num_shards, got shard_index={shard_index}, num_shards={num_shards}"
        )
    if input_format not in (None, "text", "jsonl", "parquet"):
        raise ValueError(f"input_format must be 'text', 'jsonl' or 'parquet', got {input_format!r}")
    if delimiter is not None and ("\n" in delimiter or "\r" in delimiter):
        raise ValueError("delimiter is one line: it cannot contain line breaks")
    out = _output_prefix(output_prefix)
    tok = _load_tokenizer(tokenizer)
    eos = _eos_id(tok, append_eos, eos_token)
    files = expand_inputs(inputs)
    if not files:
        raise ValueError("no input files")
    specs = []
    for f in files:
        fmt = input_format or _format_of(f)
        if fmt is None:
            raise ValueError(
                f"{f}: unknown input format (expected .txt, .jsonl or .parquet, optionally .gz/.zst); "
                "pass input_format= (--format)"
            )
        specs.append((f, "external" if fmt == "parquet" else fmt, delimiter if fmt == "text" else None))
    external = None
    if any(s[1] == "external" for s in specs):
        require("data", f"reading Parquet ({next(s[0] for s in specs if s[1] == 'external')})")
        external = _ParquetSource(text_key)
    if progress is None:
        progress = sys.stderr.isatty()
    manifest = json.loads(
        _core.prepare_corpus(
            specs,
            out,
            tok._core,
            text_key,
            eos,
            on_error,
            num_workers,
            num_shards,
            shard_index,
            bool(progress),
            chunk_bytes,
            external,
        )
    )
    skipped = manifest["skipped"]
    total = sum(skipped.values())
    if total:
        kinds = ", ".join(f"{v} {k.replace('_', ' ')}" for k, v in skipped.items() if v)
        first = "\n  ".join(manifest["errors"][:5])
        warnings.warn(f"prepare skipped {total} records ({kinds}); first:\n  {first}", stacklevel=2)
    return manifest


def merge(shards: Union[PathLike, Sequence[PathLike]], output_prefix: PathLike) -> dict:
    """Concatenate the shard prefixes (all of one ``num_shards`` partition, any order) into one dataset.

    Checks that the shards share tokenizer fingerprint, settings and input list, and their checksums;
    the result is byte-identical to preparing all inputs in one run. Returns the merged manifest.
    """
    if isinstance(shards, (str, os.PathLike)):
        shards = [shards]
    prefixes: list[str] = []
    for s in shards:
        s = os.fspath(s)
        if glob.has_magic(s) and not os.path.exists(s + ".json"):
            found = sorted(p[: -len(".json")] for p in glob.glob(s + ".json"))
            if not found:
                raise FileNotFoundError(f"{s}: no prepared shard matches this pattern")
            prefixes += found
        else:
            prefixes.append(normalize_prefix(s))
    return json.loads(_core.prepared_merge(prefixes, _output_prefix(output_prefix)))


def verify(prefix: PathLike) -> list[str]:
    """Problems found re-checking ``prefix`` against its manifest (checksums, structure, counts, ids)."""
    return _core.prepared_verify(normalize_prefix(prefix))


def inspect(prefix: PathLike, verify: bool = False, top_k: int = 10) -> dict:
    """Statistics of a prepared dataset: documents, tokens, length histogram, top tokens.

    With ``verify=True`` the files are first re-checked against the manifest (checksums, structure,
    counts); any mismatch raises ValueError listing the problems. Plain Megatron datasets (no
    manifest) can be inspected but not verified.
    """
    p = normalize_prefix(prefix)  # data/web.bin or .idx names data/web, as for the readers
    if verify:
        problems = _core.prepared_verify(p)
        if problems:
            raise ValueError(f"{p}: verification failed:\n  " + "\n  ".join(problems))
    stats = json.loads(_core.prepared_stats(p, top_k))
    mpath = Path(p + ".json")
    stats["manifest"] = json.loads(mpath.read_text()) if mpath.exists() else None
    stats["verified"] = bool(verify)
    return stats
