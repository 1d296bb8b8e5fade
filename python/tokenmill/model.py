"""LLaMA in PyTorch: the model, checkpoint loading and sampling; its configuration and presets live in
``tokenmill.config`` (no torch) and are re-exported here. The model is
the Meta/torchtitan layout (pre-norm RMSNorm, rotary embeddings, SwiGLU MLP, grouped-query attention, no
biases) built on ``tokenmill.kernels``; rotary embeddings use the Hugging Face "rotate half" pairing, so
``tokenmill export-hf`` copies weights without permuting them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Union

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
    "check_state_dict",
    "document_mask",
    "generate",
    "merge_lora",
]


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return K.rms_norm(x, self.weight.to(x.dtype), self.eps)


class Attention(nn.Module):
    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = cfg.n_heads, cfg.kv_heads, cfg.head_dim
        self.wq = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=False)
        self.wk = nn.Linear(cfg.dim, cfg.kv_heads * cfg.head_dim, bias=False)
        self.wv = nn.Linear(cfg.dim, cfg.kv_heads * cfg.head_dim, bias=False)
        self.wo = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], mask: Optional[torch.Tensor]):
        b, t, _ = x.shape
        q = self.wq(x).view(b, t, self.n_heads, self.head_dim)
        k = self.wk(x).view(b, t, self.n_kv, self.head_dim)
        v = self.wv(x).view(b, t, self.n_kv, self.head_dim)
        cos, sin = (c.to(q.dtype) for c in rope)  # fp32 tables, in the compute dtype (as Hugging Face)
        q, k = K.apply_rope(q, k, cos, sin)
        q, k, v = (z.transpose(1, 2) for z in (q, k, v))  # [B, heads, T, head_dim]
        gqa = self.n_kv != self.n_heads
        if mask is None:  # flash attention takes GQA as is
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
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

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], mask: Optional[torch.Tensor]):
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


class Llama(nn.Module):
    """``Llama(config)(input_ids, labels)`` returns the mean cross-entropy over labels != -100 (computed by
    ``linear_cross_entropy`` without materialising the logits); without labels it returns the logits.
    ``position_ids`` restarting at 0 mark document boundaries: attention then stays within each document.
    """

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.config = config
        self.activation_checkpointing = False
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
    ) -> torch.Tensor:
        b, t = input_ids.shape
        if t > self.config.max_seq_len:
            raise ValueError(f"sequence length {t} exceeds the model's max_seq_len {self.config.max_seq_len}")
        if position_ids is None:
            position_ids = torch.arange(t, device=input_ids.device)  # [T] broadcasts over the batch
            mask = None
        else:
            position_ids = position_ids.contiguous()
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
