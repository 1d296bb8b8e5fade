"""Type stubs for the compiled extension tokenmill._core (Rust, PyO3)."""

import os
from typing import Iterable, Literal, Optional, Sequence, Union

import numpy
from typing_extensions import final

__version__: str
__all__ = [
    "__version__",
    "edit_counts",
    "error_rate",
    "align",
    "levenshtein",
    "write_token_file",
    "open_token_file",
    "token_dtype",
    "Loader",
    "Prefetcher",
    "_BatchBuffer",
    "CoreTokenizer",
    "resolve_pattern",
    "train_bpe",
    "train_bpe_files",
    "prepare_corpus",
    "prepared_stats",
    "prepared_verify",
    "prepared_merge",
    "file_checksum",
]

# Names passed as str are checked in Rust (ValueError naming the valid ones); the Python wrappers
# take them from users, so the stubs say str and list the valid names in a comment.
_Unit = str  # "word" | "char"
_Counts = tuple[int, int, int, int]

def edit_counts(references: Sequence[str], hypotheses: Sequence[str], unit_name: _Unit) -> _Counts:
    """Corpus-level (hits, substitutions, deletions, insertions); parallel, GIL released."""

def error_rate(counts: _Counts, unit_name: _Unit) -> float:
    """(S + D + I) / (H + S + D); ValueError when the reference side is empty and the hypothesis is not."""

def align(
    reference: str, hypothesis: str, unit_name: _Unit
) -> tuple[list[str], list[str], list[tuple[str, Optional[int], Optional[int]]]]:
    """Tokens of both sides and the alignment as (op, reference index, hypothesis index)."""

def levenshtein(a: Sequence[int], b: Sequence[int]) -> int:
    """Unit-cost edit distance between two id sequences."""

# -- token files and the loader (tokenmill.data) --

_DType = str  # "uint8" | "uint16" | "int32" | "int64"

def write_token_file(prefix: str, docs: Sequence[Sequence[int]], dtype_name: _DType) -> None:
    """Write documents to PREFIX.bin/.idx (Megatron MMIDIDX) atomically."""

def token_dtype(vocab_size: int) -> Literal["uint16", "int32"]:
    """Megatron's dtype for token ids of a vocabulary: uint16 below 65,500 ids, else int32."""

def open_token_file(prefix: str) -> tuple[str, numpy.ndarray, numpy.ndarray]:
    """Validate PREFIX.bin/.idx; (dtype name, int64 lengths, int64 token offsets) per document."""

@final
class Loader:
    """The loader core: mixture, per-epoch packing layouts, batch rendering (see tokenmill.data.loader)."""

    def __new__(
        cls,
        prefixes: Sequence[str],
        masks: Sequence[Optional[str]],
        weights: Sequence[float],
        seq_len: int,
        packing: str,  # "concat" | "best_fit" | "none"
        seed: int,
        document_mask: bool,
        epochs: Optional[int],
        pad_id: int,
        num_threads: int,
    ) -> Loader: ...
    def num_samples(self) -> Optional[int]:
        """Samples in the global stream; None when endless."""
    def samples_per_epoch(self) -> list[int]: ...
    def mixture_counts(self) -> list[int]:
        """Samples of each source per mixing block of 65,536."""
    def sources(self, start: int, n: int) -> numpy.ndarray:
        """Source index (int64) of global samples start..start+n."""
    def sample(self, g: int) -> tuple[int, int, list[tuple[int, int, int]]]:
        """(source, epoch, [(document, start, length), ...]) of global sample g."""
    def fill(
        self,
        start: int,
        input_ids: numpy.ndarray,
        labels: numpy.ndarray,
        position_ids: numpy.ndarray,
        cu_seqlens: numpy.ndarray,
    ) -> tuple[int, int]:
        """Render samples start..start+B into [B, T] int64 buffers; (cu_seqlens entries, max_seqlen)."""
    def prefetch(self, first: int, stride: int, rows: int, count: Optional[int], depth: int) -> Prefetcher:
        """Render batches first + j * stride (j < count; endless when None) on a Rust thread, depth ahead."""

@final
class Prefetcher:
    """A Rust thread rendering batches ahead into Rust-owned arrays."""

    def next(
        self,
    ) -> Optional[tuple[numpy.ndarray, numpy.ndarray, numpy.ndarray, numpy.ndarray, int]]:
        """(input_ids, labels, position_ids, cu_seqlens, max_seqlen) or None when done; waits without the GIL."""
    def close(self) -> None:
        """Stop the thread now."""

@final
class _BatchBuffer:
    """Owns one rendered batch while the numpy arrays of ``Prefetcher.next`` borrow it (no Python API)."""

# ----- tokenizer (rust/tokenmill-py/src/tokenizer.rs) -----

@final
class CoreTokenizer:
    """A byte-level BPE (tiktoken semantics) or SentencePiece-BPE tokenizer; immutable, thread-safe."""

    n_vocab: int
    pattern: str
    pattern_engine: Literal["dfa", "fancy-regex"]
    fingerprint: str
    is_sentencepiece: bool
    @staticmethod
    def from_ranks(
        tokens: Sequence[bytes], pattern: str, specials: Sequence[tuple[str, int]]
    ) -> CoreTokenizer: ...
    @staticmethod
    def from_tiktoken_file(path: str, pattern: str, specials: Sequence[tuple[str, int]]) -> CoreTokenizer: ...
    @staticmethod
    def from_huggingface(path: str) -> CoreTokenizer: ...
    @staticmethod
    def from_sentencepiece(path: str) -> CoreTokenizer: ...
    @staticmethod
    def load(path: str) -> CoreTokenizer: ...
    def save(self, path: str) -> None: ...
    def to_native(self) -> str: ...
    @staticmethod
    def from_native(text: str, source: str) -> CoreTokenizer: ...
    def save_tiktoken(self, path: str) -> None: ...
    def save_huggingface(self, path: str) -> None: ...
    def encode_ordinary(self, text: str) -> list[int]: ...
    def encode(
        self, text: str, allowed: Sequence[str], disallowed: Optional[Sequence[str]] = None
    ) -> list[int]:
        """disallowed None: every special token not in ``allowed`` raises ValueError when found."""
    def encode_to_numpy(
        self, text: str, allowed: Sequence[str], disallowed: Optional[Sequence[str]] = None
    ) -> numpy.ndarray: ...
    def encode_batch(
        self,
        texts: Sequence[str],
        allowed: Sequence[str],
        disallowed: Optional[Sequence[str]] = None,
        num_threads: Optional[int] = None,
    ) -> list[list[int]]: ...
    def encode_ordinary_batch(
        self, texts: Sequence[str], num_threads: Optional[int] = None
    ) -> list[list[int]]: ...
    def decode_bytes(self, ids: Sequence[int]) -> bytes: ...
    def pretokenize(self, text: str) -> list[str]: ...
    def special_tokens(self) -> list[tuple[str, int]]: ...
    def token_to_id(self, token: bytes) -> Optional[int]: ...
    def id_to_token_bytes(self, id: int) -> bytes: ...
    def mergeable_tokens(self) -> list[tuple[int, bytes]]: ...

def resolve_pattern(name: str) -> str:
    """The exact pattern string behind "gpt2", "cl100k", "o200k", "llama3"; other strings unchanged."""

# ----- BPE training (rust/tokenmill-py/src/train.rs) -----

def train_bpe(
    texts: Iterable[str],
    vocab_size: int,
    pattern: str,
    special_tokens: Sequence[str],
    min_frequency: int,
    show_progress: bool,
    strict: bool,
) -> tuple[list[bytes], int, int]:
    """Byte-level BPE training: (mergeable tokens in id order, bytes no piece covered, bytes counted).

    ``vocab_size`` counts the special tokens: ``len(tokens) == vocab_size - len(special_tokens)``
    unless no pair occurring ``min_frequency`` times is left. Texts are pulled in chunks and
    counted in parallel without the GIL; special tokens are cut out of the text, never learned.
    ``strict``: ValueError, before the merge loop, if the pattern left any byte uncovered.
    """

def train_bpe_files(
    paths: Sequence[Union[str, os.PathLike[str]]],
    vocab_size: int,
    pattern: str,
    special_tokens: Sequence[str],
    min_frequency: int,
    show_progress: bool,
    strict: bool,
) -> tuple[list[bytes], int, int]:
    """As ``train_bpe`` with each UTF-8 file one text, read and counted in Rust (streaming, parallel).

    FileNotFoundError names a missing file; ValueError names a file that is not UTF-8 and the byte offset.
    """

# ----- corpus preparation (tokenmill.data.prepare) -----

def prepare_corpus(
    inputs: Sequence[tuple[str, str, Optional[str]]],  # format: "text" | "jsonl" | "external"
    prefix: str,
    tokenizer: object,
    text_key: str,
    eos_id: Optional[int],
    on_error: str,  # "skip" | "fail"
    num_workers: Optional[int],
    num_shards: int,
    shard_index: int,
    progress: bool,
    chunk_bytes: int,
    external: Optional[object] = None,
) -> str:
    """Tokenize (path, format, delimiter) inputs into prefix.{bin,idx,json}; returns the manifest JSON.
    ``tokenizer`` is a ``Tokenizer._core``; ``external`` has ``open(path)`` and ``next_batch()``."""

def prepared_stats(prefix: str, top_k: int) -> str:
    """Documents, tokens, length histogram and top tokens of an MMIDIDX dataset, as JSON."""

def prepared_verify(prefix: str) -> list[str]:
    """Problems found re-checking a prepared dataset against its manifest (empty: intact)."""

def prepared_merge(shards: Sequence[str], prefix: str) -> str:
    """Merge all shards of one partition into prefix; returns the merged manifest JSON."""

def file_checksum(path: str) -> tuple[int, str]:
    """Size in bytes and xxh3-128 (32 hex digits) of a file, as manifests and checkpoints record them."""
