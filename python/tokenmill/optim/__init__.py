"""Optimizers: ``AdamW8bit`` (8-bit block-wise quantised moments, fused CUDA update, CPU reference)."""

from tokenmill.optim.adamw8bit import AdamW8bit

__all__ = ["AdamW8bit"]
