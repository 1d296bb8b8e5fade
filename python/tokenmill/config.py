"""LLaMA model configuration and presets, without torch, so that the planner and the CLI start fast
(``tokenmill.model`` re-exports both: ``tm.model.LlamaConfig.preset("llama-13b")``).

Presets follow the LLaMA-1 paper (Touvron et al., 2023, Table 2) and Meta's released configs.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Optional


@dataclass(frozen=True)
class LlamaConfig:
    vocab_size: int = 32000
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: Optional[int] = None  # grouped-query attention when < n_heads
    ffn_hidden: Optional[int] = None  # default: LLaMA's 2/3 * 4 * dim rounded up to multiple_of
    multiple_of: int = 256
    norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    max_seq_len: int = 2048
    tie_embeddings: bool = False

    def __post_init__(self) -> None:
        if min(self.vocab_size, self.dim, self.n_layers, self.n_heads, self.max_seq_len) <= 0:
            raise ValueError(f"LlamaConfig sizes must be positive: {self}")
        if self.dim % self.n_heads:
            raise ValueError(f"dim {self.dim} is not divisible by n_heads {self.n_heads}")
        if self.n_heads % self.kv_heads:
            raise ValueError(f"n_heads {self.n_heads} is not divisible by n_kv_heads {self.kv_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim {self.head_dim} must be even for rotary embeddings")

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def hidden_dim(self) -> int:
        if self.ffn_hidden is not None:
            return self.ffn_hidden
        h = int(2 * 4 * self.dim / 3)
        return self.multiple_of * ((h + self.multiple_of - 1) // self.multiple_of)

    def num_params(self, include_embeddings: bool = True) -> int:
        """Exact parameter count of `Llama(self)`."""
        d, kv = self.dim, self.kv_heads * self.head_dim
        attn = d * d * 2 + d * kv * 2  # wq, wo, wk, wv
        mlp = 3 * d * self.hidden_dim
        norms = 2 * d
        per_layer = attn + mlp + norms
        emb = self.vocab_size * d
        head = 0 if self.tie_embeddings else self.vocab_size * d
        total = self.n_layers * per_layer + d + head  # + final norm
        return total + (emb if include_embeddings else 0)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LlamaConfig:
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - fields)
        if unknown:
            raise ValueError(f"unknown LlamaConfig field(s) {unknown}; known: {sorted(fields)}")
        return cls(**d)

    def replace(self, **changes) -> LlamaConfig:
        return dataclasses.replace(self, **changes)

    @classmethod
    def preset(cls, name: str, **overrides) -> LlamaConfig:
        try:
            base = PRESETS[name]
        except KeyError:
            raise ValueError(f"unknown preset {name!r}; known: {', '.join(sorted(PRESETS))}") from None
        return dataclasses.replace(base, **overrides)


PRESETS: dict[str, LlamaConfig] = {
    # LLaMA-1 (vocab 32000, seq 2048); hidden sizes as in Meta's released checkpoints.
    "llama-7b": LlamaConfig(dim=4096, n_layers=32, n_heads=32, ffn_hidden=11008),
    "llama-13b": LlamaConfig(dim=5120, n_layers=40, n_heads=40, ffn_hidden=13824),
    "llama-30b": LlamaConfig(dim=6656, n_layers=60, n_heads=52, ffn_hidden=17920),
    "llama-65b": LlamaConfig(dim=8192, n_layers=80, n_heads=64, ffn_hidden=22016),
    # LLaMA-3-8B shapes (GQA, 128k vocab), used by kernel benchmarks.
    "llama3-8b": LlamaConfig(
        vocab_size=128256,
        dim=4096,
        n_layers=32,
        n_heads=32,
        n_kv_heads=8,
        ffn_hidden=14336,
        norm_eps=1e-5,
        rope_theta=500000.0,
        max_seq_len=8192,
    ),
    # Small shapes for tests, the CPU demo and GPU throughput checks.
    "tiny": LlamaConfig(vocab_size=512, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=128),
    "small": LlamaConfig(vocab_size=4096, dim=256, n_layers=4, n_heads=8, n_kv_heads=4, max_seq_len=256),
    "llama-1b": LlamaConfig(
        vocab_size=32000, dim=2048, n_layers=22, n_heads=32, n_kv_heads=4, ffn_hidden=5632, max_seq_len=2048
    ),
}
