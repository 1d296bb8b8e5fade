"""LLaMA in PyTorch: the model, checkpoint loading and sampling; its configuration and presets live in
``tokenmill.config`` (no torch) and are re-exported here. The model is
the Meta/torchtitan layout (pre-norm RMSNorm, rotary embeddings, SwiGLU MLP, grouped-query attention, no
biases) built on ``tokenmill.kernels``; rotary embeddings use the Hugging Face "rotate half" pairing, so
``tokenmill export-hf`` copies weights without permuting them.
"""

from __future__ import annotations

import functools
import inspect
from pathlib import Path
from typing import Any, Optional, Union, cast

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from tokenmill import kernels as K
from tokenmill.config import PRESETS, LlamaConfig
from tokenmill.lora import apply_lora, merge_lora

__all__ = [
    "PRESETS",
    "LlamaConfig",
    "Llama",
    "apply_lora",
    "ATTENTION",
    "check_state_dict",
    "document_block_mask",
    "document_mask",
    "generate",
    "merge_lora",
    "resolve_attention",
]


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return K.rms_norm(x, self.weight.to(x.dtype), self.eps)


ATTENTION = ("auto", "sdpa", "flex", "varlen")  # `Llama.attention`, the trainer's run.attention

# How packed documents attend (run.attention); none of them changes the result beyond rounding:
# - "sdpa": a dense [B, 1, T, T] boolean mask into scaled_dot_product_attention (memory-efficient kernel,
#   K/V repeated for GQA, one host sync per forward to skip the mask when no row has a boundary). The
#   reference, and the only one with a backward pass on the CPU.
# - "flex": flex_attention (compiled on CUDA) with a BlockMask built on the device from position_ids:
#   blocks wholly outside a document are skipped, GQA taken as is, no host sync.
# - "varlen": varlen_attn (flash / cuDNN, CUDA only) over the loader's cu_seqlens and max_seqlen, the
#   batch flattened to B * T tokens: no mask at all, GQA as is, no host sync.
# - "auto": sdpa on the CPU; on CUDA varlen when cu_seqlens are given (and varlen_attn takes GQA), else flex.
# Rows without position_ids are plain causal attention (flash, GQA as is) whatever the choice.

_flex_compiled: Any = None


def _flex(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_mask: Any) -> torch.Tensor:
    global _flex_compiled
    from torch.nn.attention.flex_attention import flex_attention

    if q.device.type != "cuda":  # eager: unfused reference math (forward only on the CPU)
        return flex_attention(q, k, v, block_mask=block_mask, enable_gqa=k.shape[1] != q.shape[1])
    if _flex_compiled is None:  # uncompiled flex_attention materialises the scores; the kernel is Triton
        _flex_compiled = torch.compile(flex_attention, dynamic=False)
    return _flex_compiled(q, k, v, block_mask=block_mask, enable_gqa=k.shape[1] != q.shape[1])


class Attention(nn.Module):
    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = cfg.n_heads, cfg.kv_heads, cfg.head_dim
        self.wq = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=False)
        self.wk = nn.Linear(cfg.dim, cfg.kv_heads * cfg.head_dim, bias=False)
        self.wv = nn.Linear(cfg.dim, cfg.kv_heads * cfg.head_dim, bias=False)
        self.wo = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], mask: Any):
        """``mask``: None (causal), a dense bool mask (sdpa), a flex BlockMask, or ("varlen", cu, max)."""
        b, t, _ = x.shape
        q = self.wq(x).view(b, t, self.n_heads, self.head_dim)
        k = self.wk(x).view(b, t, self.n_kv, self.head_dim)
        v = self.wv(x).view(b, t, self.n_kv, self.head_dim)
        cos, sin = (c.to(q.dtype) for c in rope)  # fp32 tables, in the compute dtype (as Hugging Face)
        q, k = K.apply_rope(q, k, cos, sin)
        gqa = self.n_kv != self.n_heads
        if isinstance(mask, tuple):  # varlen: [B * T, heads, head_dim] as they are, no transposes
            from torch.nn.attention.varlen import varlen_attn

            _, cu, max_len = mask
            y = varlen_attn(  # one tensor (no return_aux)
                q.reshape(b * t, self.n_heads, self.head_dim),
                k.reshape(b * t, self.n_kv, self.head_dim),
                v.reshape(b * t, self.n_kv, self.head_dim),
                cu,
                cu,
                max_len,
                max_len,
                window_size=(-1, 0),  # causal
                enable_gqa=gqa,
            )
            return self.wo(cast(torch.Tensor, y).reshape(b, t, -1))
        q, k, v = (z.transpose(1, 2) for z in (q, k, v))  # [B, heads, T, head_dim]
        if mask is None:  # flash attention takes GQA as is
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        elif not isinstance(mask, torch.Tensor):  # a flex BlockMask
            y = _flex(q, k, v, mask)
        else:
            # Document masks go to the memory-efficient kernel, which has no GQA: repeating K/V (small)
            # avoids the math fallback that would materialise [B, heads, T, T] scores.
            if gqa:
                k = k.repeat_interleave(self.n_heads // self.n_kv, dim=1)
                v = v.repeat_interleave(self.n_heads // self.n_kv, dim=1)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.wo(y.transpose(1, 2).reshape(b, t, -1))


class FeedForward(nn.Module):
    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.w1 = nn.Linear(cfg.dim, cfg.hidden_dim, bias=False)  # gate
        self.w3 = nn.Linear(cfg.dim, cfg.hidden_dim, bias=False)  # up
        self.w2 = nn.Linear(cfg.hidden_dim, cfg.dim, bias=False)  # down

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(K.swiglu(self.w1(x), self.w3(x)))


class Block(nn.Module):
    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attention = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.feed_forward = FeedForward(cfg)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], mask: Any):
        x = x + self.attention(self.attention_norm(x), rope, mask)
        return x + self.feed_forward(self.ffn_norm(x))


def document_mask(position_ids: torch.Tensor) -> Optional[torch.Tensor]:
    """Block-diagonal causal mask [B, 1, T, T] (True = attend) for rows that pack several documents, whose
    positions restart at 0 at each boundary; None when no row has a boundary (plain causal attention)."""
    starts = position_ids == 0
    starts[:, 0] = False
    if not bool(starts.any()):
        return None
    doc = starts.cumsum(1)
    t = position_ids.shape[1]
    causal = torch.ones(t, t, dtype=torch.bool, device=position_ids.device).tril()
    return ((doc[:, :, None] == doc[:, None, :]) & causal)[:, None]


def _document_ids(position_ids: torch.Tensor) -> torch.Tensor:
    """[B, T] int32 document index of each token (0, 1, ... per row): a new document where positions restart
    at 0, the first token of a row excepted, exactly as ``document_mask`` splits rows."""
    starts = (position_ids == 0) & (torch.arange(position_ids.shape[1], device=position_ids.device) > 0)
    return starts.cumsum(1, dtype=torch.int32)


def document_block_mask(position_ids: torch.Tensor, block_size: int = 128) -> Any:
    """The flex_attention BlockMask of ``document_mask(position_ids)`` (block-diagonal causal), built on
    ``position_ids``' device from the documents' first and last block alone: O(B * (T / block_size)^2)
    work, no [T, T] mask and no host sync. Equal to ``create_block_mask`` over the same mask_mod (tested).

    Documents are contiguous and their indices rise along a row, so a key block K before a query block Q
    (K < Q) holds some pair of one document iff K's last document is Q's first, and every pair iff K's first
    document is Q's last (and neither block runs past T); a diagonal block is always partial (causal)."""
    from torch.nn.attention.flex_attention import BlockMask

    b, t = position_ids.shape
    dev = position_ids.device
    doc = _document_ids(position_ids)
    nb = -(-t // block_size)
    # mask_mod reads padded indices in the last partial block: padding is document -1, which matches none.
    padded = F.pad(doc, (0, nb * block_size - t), value=-1)

    def mask_mod(bi: Any, hi: Any, qi: Any, ki: Any) -> Any:
        dq, dk = padded[bi, qi], padded[bi, ki]
        return (dq == dk) & (qi >= ki) & (dk >= 0)

    blocks = torch.arange(nb, device=dev)
    first = doc[:, blocks * block_size]  # [B, nb] document of each block's first token
    last = doc[:, torch.clamp((blocks + 1) * block_size, max=t) - 1]  # ... and of its last real token
    qb, kb = blocks[:, None], blocks[None, :]
    before = kb < qb
    some = (kb == qb) | (before & (last[:, None, :] == first[:, :, None]))  # [B, q block, k block]
    whole = blocks < t // block_size  # blocks without padding
    full = before & (first[:, None, :] == last[:, :, None]) & whole[:, None] & whole[None, :]
    partial = some & ~full

    def ordered(m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # per row: count, indices set first
        m = m[:, None].to(torch.int32)  # [B, 1 (all heads), rows, columns]
        order = torch.argsort(m, dim=-1, descending=True, stable=True)
        return m.sum(-1, dtype=torch.int32), order.to(torch.int32)

    # The backward's per-key-block lists come from the transposes here; BlockMask.from_kv_blocks would
    # rebuild the dense block masks from the lists first (an index_put: 27 of 29 ms at T=8192 on the CPU).
    return BlockMask(
        (t, t),
        *ordered(partial),
        *ordered(full),
        *ordered(partial.transpose(1, 2)),
        *ordered(full.transpose(1, 2)),
        BLOCK_SIZE=(block_size, block_size),
        mask_mod=mask_mod,
    )


@functools.cache
def _has_varlen() -> bool:
    """torch's varlen_attn with grouped-query support (older torch lacks one or both)."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return False
    return "enable_gqa" in inspect.signature(varlen_attn).parameters


def resolve_attention(name: str, device: torch.device, varlen_ready: bool) -> str:
    """The attention path ``name`` (one of ATTENTION) takes on ``device``; ``varlen_ready``: cu_seqlens and
    max_seqlen are at hand. Raises ValueError for a choice the device or the inputs cannot run."""
    if name not in ATTENTION:
        raise ValueError(f"attention must be one of {', '.join(ATTENTION)}, got {name!r}")
    if name == "auto":
        if device.type != "cuda":
            return "sdpa"
        return "varlen" if varlen_ready and _has_varlen() else "flex"
    if name == "varlen":
        if device.type != "cuda":
            raise ValueError('attention = "varlen" runs on CUDA only (flash / cuDNN); use "sdpa" or "flex"')
        if not _has_varlen():
            raise ValueError(
                f'attention = "varlen" needs torch.nn.attention.varlen.varlen_attn with enable_gqa (torch '
                f'{torch.__version__} has none): use "flex"'
            )
        if not varlen_ready:
            raise ValueError(
                'attention = "varlen" needs cu_seqlens and max_seqlen with position_ids (the loader\'s batch)'
            )
    return name


class Llama(nn.Module):
    """``Llama(config)(input_ids, labels)`` returns the mean cross-entropy over labels != -100 (computed by
    ``linear_cross_entropy`` without materialising the logits); without labels it returns the logits.
    ``position_ids`` restarting at 0 mark document boundaries: attention then stays within each document,
    through the path ``self.attention`` names (see ``ATTENTION``; ``cu_seqlens`` and ``max_seqlen``, the
    loader's, serve "varlen").
    """

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.config = config
        self.activation_checkpointing = False
        self.attention = "auto"  # how packed documents attend: one of ATTENTION
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.dim)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.n_layers))
        self.norm = RMSNorm(config.dim, config.norm_eps)
        self.output = nn.Linear(config.dim, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # GPT-2 / torchtitan style: N(0, 0.02), residual output projections scaled by 1/sqrt(2 * n_layers).
        std = 0.02
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                nn.init.ones_(p)
            elif name.endswith(("wo.weight", "w2.weight")):
                nn.init.normal_(p, 0.0, std / (2 * self.config.n_layers) ** 0.5)
            else:
                nn.init.normal_(p, 0.0, std)

    def forward(
        self,
        input_ids: torch.Tensor,
        labels: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.Tensor] = None,
        reduction: str = "mean",
        cu_seqlens: Optional[torch.Tensor] = None,
        max_seqlen: Optional[int] = None,
    ) -> torch.Tensor:
        b, t = input_ids.shape
        if t > self.config.max_seq_len:
            raise ValueError(f"sequence length {t} exceeds the model's max_seq_len {self.config.max_seq_len}")
        mask: Any = None
        if position_ids is None:
            position_ids = torch.arange(t, device=input_ids.device)  # [T] broadcasts over the batch
        else:
            position_ids = position_ids.contiguous()
            path = resolve_attention(
                self.attention, input_ids.device, cu_seqlens is not None and max_seqlen is not None
            )
            if path == "varlen":
                mask = ("varlen", cu_seqlens, max_seqlen)
            elif path == "flex":
                mask = document_block_mask(position_ids)
            else:
                mask = document_mask(position_ids)
        # Rotary tables once per forward, shared by every layer: [T, head_dim] or [B, T, head_dim].
        c = self.config
        rope = K.rope_cos_sin(position_ids, c.head_dim, c.rope_theta, scaling=c.rope_scaling)
        h = self.tok_embeddings(input_ids)
        for layer in self.layers:
            if self.activation_checkpointing and self.training:
                h = checkpoint(layer, h, rope, mask, use_reentrant=False)
            else:
                h = layer(h, rope, mask)
        h = self.norm(h)
        if labels is None:
            return self.output(h)
        w = self.output.weight
        if torch.is_autocast_enabled(
            h.device.type
        ):  # our kernel is not autocast-aware: cast as a matmul would
            dt = torch.get_autocast_dtype(h.device.type)
            h, w = h.to(dt), w.to(dt)
        elif w.dtype != h.dtype:
            w = w.to(h.dtype)
        return K.linear_cross_entropy(h.reshape(b * t, -1), w, labels.reshape(b * t), reduction=reduction)

    @classmethod
    def from_checkpoint(
        cls, path: Union[str, Path], device: Union[str, torch.device] = "cpu", merge: bool = True
    ) -> Llama:
        """The model of a trainer checkpoint folder (``meta.json`` + ``model.safetensors``).

        A LoRA adapter checkpoint (``[lora] rank > 0``) holds the adapters alone: its base checkpoint
        (``meta["base"]``) is loaded, adapted as it was trained (an NF4 base is quantised again) and, with
        ``merge=True`` (the default), the adapters are folded in: a plain ``Llama`` with dense weights.
        ``merge=False`` keeps the ``LoraLinear`` modules (``tm.model.merge_lora`` folds them later)."""
        from tokenmill.checkpoint import load_adapters, load_model_state, read_meta  # imports this module

        path = Path(path)
        meta = read_meta(path)
        if meta.get("lora"):
            if (
                not (Path(meta["base"]) / "meta.json").exists()
                and not (Path(meta["base"]) / "config.json").exists()
            ):
                raise FileNotFoundError(
                    f"{path}: the base checkpoint of these adapters, {meta['base']}, is gone"
                )
            from tokenmill import hf

            if hf.is_hf_folder(meta["base"]):  # train.init_from named a Hugging Face folder
                model = cls.from_hf(meta["base"])
            else:
                model = cls.from_checkpoint(meta["base"], device="cpu")
            if LlamaConfig.from_dict(meta["model"]).canonical() != model.config.canonical():
                raise ValueError(
                    f"{path}: adapter checkpoint of another model shape than its base {meta['base']}"
                )
            lo = meta["lora"]
            apply_lora(model, lo["rank"], lo["alpha"], lo["dropout"], lo["targets"])
            load_adapters(path, model)
            if lo.get("base_dtype") == "nf4":
                from tokenmill.lora import quantize_base

                quantize_base(model)
            return (merge_lora(model) if merge else model).to(device)
        model = cls(LlamaConfig.from_dict(meta["model"]))
        state = load_model_state(path, device=str(device))
        check_state_dict(model, state, str(path))
        model.load_state_dict(state)
        return model.to(device)

    @classmethod
    def from_hf(
        cls,
        hf_dir: Union[str, Path],
        dtype: Union[str, torch.dtype] = torch.float32,
        device: Union[str, torch.device] = "cpu",
    ) -> Llama:
        """The model of a Hugging Face ``save_pretrained`` folder (``LlamaForCausalLM``, or
        ``MistralForCausalLM`` without a sliding window; safetensors, one file or sharded), built in
        ``dtype`` on ``device`` and filled one tensor at a time. Unsupported folders raise before any weight
        is read (see ``tokenmill.hf``); ``tokenmill import-hf`` writes the same as a checkpoint folder."""
        from tokenmill import hf

        return hf.load_model(hf_dir, dtype, device)


def check_state_dict(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Raise ValueError naming the first missing, unexpected or wrongly shaped tensor of ``state``."""
    own = model.state_dict()
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if missing or unexpected:
        raise ValueError(
            f"{source}: checkpoint does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    for k, v in own.items():
        if tuple(state[k].shape) != tuple(v.shape):
            raise ValueError(
                f"{source}: checkpoint tensor {k} has shape {tuple(state[k].shape)} but the model "
                f"expects {tuple(v.shape)} (checkpoint from another model shape?)"
            )


@torch.no_grad()
def generate(
    model: Llama,
    prompt: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: Optional[int] = None,
    eos_id: Optional[int] = None,
    generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """Sample up to ``max_new_tokens`` after ``prompt`` ([T] or [B, T] token ids); returns prompt + samples.

    ``temperature`` 0 is greedy; ``top_k`` keeps the k most likely tokens. No KV cache: each step reruns
    the (cropped) context, which is what a small model needs and keeps the model code single-path.
    """
    was_training = model.training
    model.eval()
    ids = prompt[None] if prompt.dim() == 1 else prompt
    done = torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
    for _ in range(max_new_tokens):
        logits = model(ids[:, -model.config.max_seq_len :])[:, -1, :].float()
        if temperature <= 0:
            nxt = logits.argmax(-1, keepdim=True)
        else:
            logits = logits / temperature
            if top_k is not None and top_k < logits.shape[-1]:
                kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            nxt = torch.multinomial(F.softmax(logits, dim=-1), 1, generator=generator)
        if eos_id is not None:
            nxt = nxt.masked_fill(done[:, None], eos_id)
            done |= nxt[:, 0] == eos_id
        ids = torch.cat([ids, nxt], dim=1)
        if eos_id is not None and bool(done.all()):
            break
    model.train(was_training)
    return ids[0] if prompt.dim() == 1 else ids
