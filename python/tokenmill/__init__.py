"""tokenmill: Rust-accelerated training primitives for LLaMA-class models.

Tokenizer (BPE train/encode/decode), corpus preparation and a PyTorch dataloader in Rust; CUDA kernels
through CuPy; a thin LLaMA trainer; a compute/cost/memory planner; evaluation (perplexity, WER/CER).
Heavy dependencies (torch, cupy) are imported only by the submodules that need them.
"""

from tokenmill import _core
from tokenmill import eval as eval  # noqa: A004 - the public name is tokenmill.eval, as in DESIGN.md

__version__: str = _core.__version__

__all__ = ["__version__", "eval"]
