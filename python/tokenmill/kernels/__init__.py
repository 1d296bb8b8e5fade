"""Fused training kernels: CUDA C++ compiled at run time with NVRTC and launched through CuPy.

CUDA tensors run the kernels in this folder (``launch.py``); CPU tensors run the pure-torch references
(``reference.py``), which are also the ground truth in tests. Each op is a ``torch.autograd.Function`` with
a hand-written backward.

>>> import torch, tokenmill as tm
>>> x = torch.randn(2, 8, 4, 16)                       # [batch, seq, heads, head_dim]
>>> pos = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 0]] * 2) # position_ids restart at document starts
>>> tm.kernels.rope(x, pos, theta=10000.0).shape
torch.Size([2, 8, 4, 16])
"""

from tokenmill.kernels.ops import apply_rope, linear_cross_entropy, rms_norm, rope, rope_cos_sin, swiglu

__all__ = ["apply_rope", "linear_cross_entropy", "rms_norm", "rope", "rope_cos_sin", "swiglu"]
