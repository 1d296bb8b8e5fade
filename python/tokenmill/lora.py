"""LoRA adapters (Hu et al., 2021) on the projections of ``tokenmill.model.Llama``, laid out as PEFT lays them
out, so that ``tokenmill export-hf --adapter`` renames tensors and never reshapes them.

    y = base(x) + lora_B(lora_A(dropout(x))) * alpha / rank

``lora_A`` [rank, in] starts kaiming-uniform (a = sqrt 5) and ``lora_B`` [out, rank] at zero, as PEFT's
default, so an adapted model starts equal to its base. The base is an ``nn.Linear`` (frozen) or, for QLoRA,
a ``tokenmill.quant.Linear4bit``. Parameter names: ``layers.0.attention.wq.lora_A.weight`` (adapters) and
``layers.0.attention.wq.base.weight`` (the frozen base weight).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Iterator, Optional, Sequence, TypeVar, Union

import torch
from torch import nn

from tokenmill.config import LORA_TARGETS, check_lora

if TYPE_CHECKING:
    from tokenmill.model import Llama  # imports this module
    from tokenmill.quant import Linear4bit

_M = TypeVar("_M", bound=nn.Module)
_L = TypeVar("_L", bound="Llama")

__all__ = [
    "LORA_TARGETS",
    "LoraLinear",
    "adapter_init",
    "adapter_state_dict",
    "apply_lora",
    "base_state_for",
    "is_adapter_key",
    "merge_lora",
    "quantize_base",
]

_OWNER = {
    "wq": "attention",
    "wk": "attention",
    "wv": "attention",
    "wo": "attention",
}  # w1 w2 w3: feed_forward


class LoraLinear(nn.Module):
    """A frozen base linear plus a trainable low-rank update (see the module docstring)."""

    base: Union[nn.Linear, Linear4bit]  # nn.Module's __getattr__ would type it Tensor | Module

    def __init__(
        self, base: Union[nn.Linear, Linear4bit], rank: int, alpha: float, dropout: float = 0.0
    ) -> None:
        super().__init__()
        self.base = base
        self.in_features, self.out_features = base.in_features, base.out_features
        self.rank, self.alpha, self.scaling = rank, alpha, alpha / rank
        ref = getattr(base, "weight", None)
        if ref is None or not ref.is_floating_point():  # a quantised base: adapters in its compute dtype
            any_tensor = next(iter([*base.parameters(), *base.buffers()]))
            dtype = getattr(base, "compute_dtype", None) or torch.get_default_dtype()
            ref = torch.empty(0, device=any_tensor.device, dtype=dtype)
        kw = {"device": ref.device, "dtype": ref.dtype}
        self.lora_A = nn.Linear(self.in_features, rank, bias=False, **kw)
        self.lora_B = nn.Linear(rank, self.out_features, bias=False, **kw)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        for p in self.base.parameters():
            p.requires_grad_(False)
        self.reset_parameters()

    def reset_parameters(self, generator: Optional[torch.Generator] = None) -> None:
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5), generator=generator)
        nn.init.zeros_(self.lora_B.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.lora_B(self.lora_A(self.dropout(x))) * self.scaling

    @torch.no_grad()
    def merged_weight(self) -> torch.Tensor:
        """The dense weight W + (alpha / rank) B A, [out, in], computed in float32, in the base's dtype."""
        w = self.base.weight if isinstance(self.base, nn.Linear) else self.base.dequantize()
        delta = self.lora_B.weight.float() @ self.lora_A.weight.float()
        return (w.float() + delta * self.scaling).to(w.dtype)

    def extra_repr(self) -> str:
        return f"rank={self.rank}, alpha={self.alpha}"


def _targets(model: Llama, targets: Sequence[str]) -> Iterator[tuple[int, str, nn.Module]]:
    """(block index, target name, owner module) for each target linear of each block."""
    for i, block in enumerate(model.layers):
        for t in targets:
            yield i, t, getattr(block, _OWNER.get(t, "feed_forward"))


def apply_lora(
    model: _L,
    rank: int = 16,
    alpha: float = 32.0,
    dropout: float = 0.0,
    targets: Sequence[str] = LORA_TARGETS,
    base_dtype: Optional[str] = None,
) -> _L:
    """Replace the ``targets`` projections of every block of ``model`` (a ``tm.model.Llama``) by
    ``LoraLinear`` and freeze every other parameter; returns ``model``. ``base_dtype="nf4"`` also
    quantises the base weights to 4-bit NormalFloat (QLoRA; see ``quantize_base``). Bad settings (a target
    that does not exist, rank <= 0, dropout outside [0, 1)) raise ValueError before anything changes.

    >>> from tokenmill.model import Llama, LlamaConfig
    >>> model = apply_lora(Llama(LlamaConfig.preset("tiny")), rank=8, targets=("wq", "wv"))
    >>> sorted({n.rsplit(".", 2)[-2] for n, p in model.named_parameters() if p.requires_grad})
    ['lora_A', 'lora_B']
    """
    check_lora(rank, alpha, dropout, list(targets), base_dtype)
    if base_dtype == "nf4":
        from tokenmill import quant  # noqa: F401  (fails here, before the model is touched, when it is missing)
    if any(isinstance(m, LoraLinear) for m in model.modules()):
        raise ValueError("the model already has LoRA adapters (merge_lora folds them in first)")
    for p in model.parameters():
        p.requires_grad_(False)
    for _, t, owner in _targets(model, targets):
        setattr(owner, t, LoraLinear(getattr(owner, t), rank, alpha, dropout))
    if base_dtype == "nf4":
        quantize_base(model)
    return model


def quantize_base(model: _M, compute_dtype: Optional[torch.dtype] = None) -> _M:
    """Store the dense base of each adapter as NF4 (``tokenmill.quant.Linear4bit``), dequantised on the fly
    in ``compute_dtype`` (default: the base weight's dtype). Done after the base weights are loaded."""
    from tokenmill.quant import Linear4bit  # the QLoRA base; imported only when asked for

    for m in model.modules():
        if isinstance(m, LoraLinear) and isinstance(m.base, nn.Linear):
            m.base = Linear4bit.from_linear(m.base, compute_dtype=compute_dtype)
    return model


@torch.no_grad()
def merge_lora(model: _M) -> _M:
    """Fold every adapter into a dense ``nn.Linear`` (W + alpha/rank B A; an NF4 base is dequantised):
    ``model`` becomes a plain ``Llama`` again, every parameter trainable. Returns ``model``."""
    for owner in list(model.modules()):
        for name, child in list(owner.named_children()):
            if isinstance(child, LoraLinear):
                w = child.merged_weight()
                dense = nn.Linear(
                    child.in_features, child.out_features, bias=False, device=w.device, dtype=w.dtype
                )
                dense.weight.copy_(w)
                setattr(owner, name, dense)
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def is_adapter_key(name: str) -> bool:
    return ".lora_A." in name or ".lora_B." in name


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter tensors alone (what an adapter checkpoint stores)."""
    return {k: v for k, v in model.state_dict().items() if is_adapter_key(k)}


def adapter_init(model: nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """Initial adapter tensors (full, on the CPU, float32) drawn from ``seed`` alone: the same values whether
    the model is whole, on the meta device or sharded by FSDP2 (whose own random init follows the sharding).
    """
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, LoraLinear):
            a = torch.empty(m.rank, m.in_features)
            nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=g)
            out[f"{name}.lora_A.weight"] = a
            out[f"{name}.lora_B.weight"] = torch.zeros(m.out_features, m.rank)
    return out


def base_state_for(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A plain model's state dict under the names of the adapted ``model`` (``wq.weight`` ->
    ``wq.base.weight``), for loading base weights into an already adapted (e.g. sharded) model."""
    wrapped = {n for n, m in model.named_modules() if isinstance(m, LoraLinear)}
    out = {}
    for k, v in state.items():
        owner = k.rsplit(".", 1)[0]
        out[f"{owner}.base.weight" if owner in wrapped else k] = v
    return out
