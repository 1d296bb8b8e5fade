"""``tokenmill export-hf``: a trainer checkpoint as a Hugging Face ``LlamaForCausalLM`` folder.

Our rotary embeddings use the Hugging Face "rotate half" pairing, so weights are renamed, never permuted.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Optional, Union

import torch

from tokenmill.model import LlamaConfig

# ours -> Hugging Face, per layer and global
_LAYER = {
    "attention.wq.weight": "self_attn.q_proj.weight",
    "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wv.weight": "self_attn.v_proj.weight",
    "attention.wo.weight": "self_attn.o_proj.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
    "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}
_GLOBAL = {
    "tok_embeddings.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}


def hf_name(name: str) -> str:
    if name in _GLOBAL:
        return _GLOBAL[name]
    _, i, rest = name.split(".", 2)  # layers.<i>.<rest>
    return f"model.layers.{i}.{_LAYER[rest]}"


def hf_config(c: LlamaConfig, dtype: str, bos_id: Optional[int], eos_id: Optional[int]) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": c.vocab_size,
        "hidden_size": c.dim,
        "intermediate_size": c.hidden_dim,
        "num_hidden_layers": c.n_layers,
        "num_attention_heads": c.n_heads,
        "num_key_value_heads": c.kv_heads,
        "head_dim": c.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": c.max_seq_len,
        "rms_norm_eps": c.norm_eps,
        "rope_theta": c.rope_theta,
        "rope_scaling": None,
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": c.tie_embeddings,
        "torch_dtype": dtype,
        "bos_token_id": bos_id,
        "eos_token_id": eos_id,
        "initializer_range": 0.02,
        "use_cache": True,
    }


def export(
    checkpoint: Union[str, Path],
    out: Union[str, Path],
    tokenizer: Optional[str] = None,
    dtype: str = "float32",
    chat_template: Optional[str] = None,
) -> Path:
    """Write ``out/`` with config.json, model.safetensors, generation_config.json and (when a tokenizer is
    given or recorded in the checkpoint) tokenizer.json + tokenizer_config.json. The folder appears whole:
    it is written under a temporary name and renamed.

    ``chat_template`` (default: the SFT template the checkpoint's run trained on, recorded in meta.json):
    ``"alpaca"``, ``"chatml"`` or ``"llama3"``, written as a Jinja ``chat_template`` that renders chats
    as that run's data did; its end-of-turn token becomes the eos (tokenizer_config, config.json and
    generation_config.json, which also stops at the end-of-text token), so ``generate`` ends with the turn.
    bos/eos/pad/unk are named in tokenizer_config.json (pad: a pad special token if any, else the
    end-of-text token)."""
    from safetensors.torch import load_file, save_file

    from tokenmill.checkpoint import read_meta

    ckpt, out = Path(checkpoint), Path(out)
    meta = read_meta(ckpt)
    cfg = LlamaConfig.from_dict(meta["model"])
    state = load_file(str(ckpt / "model.safetensors"))
    tdtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    tensors = {hf_name(k): v.to(tdtype).contiguous() for k, v in state.items()}
    if cfg.tie_embeddings:
        tensors.pop("lm_head.weight", None)

    tok_path = tokenizer or (str(ckpt / meta["tokenizer"]) if meta.get("tokenizer") else "")
    tok = None
    if tok_path:
        import tokenmill

        tok = tokenmill.Tokenizer.from_file(tok_path)
        if tok.n_vocab > cfg.vocab_size:
            raise ValueError(
                f"tokenizer {tok_path} has {tok.n_vocab} tokens, the model only {cfg.vocab_size}"
            )
    specials = dict(tok.special_tokens) if tok is not None else {}
    bos = tok.bos_token_id if tok is not None else None
    eos = tok.eos_token_id if tok is not None else None
    template = chat_template or meta.get("chat_template")
    jinja, stop = None, [] if eos is None else [eos]
    if template:
        if tok is None:
            raise ValueError(f"{ckpt}: a chat template needs the tokenizer (none given or recorded)")
        from tokenmill.data.sft import chat_template as render_template

        jinja, eot = render_template(template, tok)
        stop = [eot] + [i for i in stop if i != eot]
        eos = eot
    pad = next((specials[n] for n in ("<|pad|>", "<pad>", "[PAD]") if n in specials), None)
    pad = pad if pad is not None else (stop[-1] if stop else None)

    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    (tmp / "config.json").write_text(
        json.dumps({**hf_config(cfg, dtype, bos, eos), "pad_token_id": pad}, indent=2)
    )
    gen = {"bos_token_id": bos, "eos_token_id": stop if len(stop) > 1 else eos, "pad_token_id": pad}
    (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2))
    if tok is not None:
        tok.save_huggingface(str(tmp / "tokenizer.json"))
        tok_cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": cfg.max_seq_len}
        names = {v: k for k, v in specials.items()}
        unk = specials.get("<unk>")
        for key, i in (("bos_token", bos), ("eos_token", eos), ("pad_token", pad), ("unk_token", unk)):
            if i is not None:
                tok_cfg[key] = names[i]
        if jinja is not None:
            tok_cfg["chat_template"] = jinja
        (tmp / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2))
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return out
