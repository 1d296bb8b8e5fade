"""``tokenmill export-hf``: a trainer checkpoint as a Hugging Face ``LlamaForCausalLM`` folder, and a LoRA
adapter checkpoint as a PEFT adapter folder (``--adapter``) or as merged full weights (``--merge``).

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


# LoRA targets -> PEFT's target_modules (the Hugging Face module names)
HF_MODULE = {
    k.split(".")[1]: v.split(".")[1] for k, v in _LAYER.items() if k.startswith(("attention.w", "feed_"))
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
    adapter: bool = False,
    merge: bool = False,
    base_model: Optional[str] = None,
) -> Path:
    """Write ``out/`` with config.json, model.safetensors, generation_config.json and (when a tokenizer is
    given or recorded in the checkpoint) tokenizer.json + tokenizer_config.json. The folder appears whole:
    it is written under a temporary name and renamed.

    A LoRA adapter checkpoint needs ``adapter=True`` (a PEFT adapter folder: adapter_config.json +
    adapter_model.safetensors, for ``peft.PeftModel.from_pretrained``; ``base_model`` fills its
    base_model_name_or_path, by default the base checkpoint's path) or ``merge=True`` (the adapters folded
    into the base: a normal Hugging Face folder)."""
    from safetensors.torch import load_file

    from tokenmill.checkpoint import read_meta

    ckpt, out = Path(checkpoint), Path(out)
    meta = read_meta(ckpt)
    cfg = LlamaConfig.from_dict(meta["model"])
    tdtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    if adapter and merge:
        raise ValueError("--adapter and --merge exclude each other: a PEFT adapter folder or merged weights")
    if meta.get("lora"):
        if not (adapter or merge):
            raise ValueError(
                f"{ckpt} is a LoRA adapter checkpoint (adapters only, base {meta['base']}): export it with "
                "--adapter (a PEFT adapter folder) or --merge (the merged full weights)"
            )
    elif adapter or merge:
        raise ValueError(
            f"{ckpt} is a full checkpoint, not LoRA adapters: export it without --adapter/--merge"
        )

    if adapter:
        state = _checked_adapters(ckpt, meta)
        lo = meta["lora"]
        tensors = {_peft_name(k): v.to(tdtype).contiguous() for k, v in state.items()}
        config = {
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "base_model_name_or_path": base_model or meta["base"],
            "r": lo["rank"],
            "lora_alpha": lo["alpha"],
            "lora_dropout": lo["dropout"],
            "target_modules": sorted(HF_MODULE[t] for t in lo["targets"]),
            "bias": "none",
            "fan_in_fan_out": False,
            "init_lora_weights": True,
            "inference_mode": True,
            "use_rslora": False,
            "use_dora": False,
            "modules_to_save": None,
            "layers_to_transform": None,
            "layers_pattern": None,
            "rank_pattern": {},
            "alpha_pattern": {},
            "revision": None,
        }
        return _write(out, {"adapter_model.safetensors": tensors}, {"adapter_config.json": config})

    if merge:
        from tokenmill.model import Llama

        _checked_adapters(ckpt, meta)  # before loading the (large) base
        state = Llama.from_checkpoint(ckpt, merge=True).state_dict()
    else:
        state = load_file(str(ckpt / "model.safetensors"))
    tensors = {hf_name(k): v.to(tdtype).contiguous() for k, v in state.items()}
    if cfg.tie_embeddings:
        tensors.pop("lm_head.weight", None)

    tok_path = tokenizer or (str(ckpt / meta["tokenizer"]) if meta.get("tokenizer") else "")
    if not tok_path and merge:  # adapters trained without a tokenizer: the base's, if it has one
        base_meta = read_meta(Path(meta["base"]))
        tok_path = str(Path(meta["base"]) / base_meta["tokenizer"]) if base_meta.get("tokenizer") else ""
    tok = None
    if tok_path:
        import tokenmill

        tok = tokenmill.Tokenizer.load(tok_path)
        if tok.n_vocab > cfg.vocab_size:
            raise ValueError(
                f"tokenizer {tok_path} has {tok.n_vocab} tokens, the model only {cfg.vocab_size}"
            )
    specials = dict(tok.special_tokens) if tok is not None else {}
    bos = tok.bos_token_id if tok is not None else None
    eos = tok.eos_token_id if tok is not None else None
    files: dict = {
        "config.json": hf_config(cfg, dtype, bos, eos),
        "generation_config.json": {"bos_token_id": bos, "eos_token_id": eos},
    }
    if tok is not None:
        tok_cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": cfg.max_seq_len}
        names = {v: k for k, v in specials.items()}
        if bos is not None:
            tok_cfg["bos_token"] = names[bos]
        if eos is not None:
            tok_cfg["eos_token"] = names[eos]
        files["tokenizer_config.json"] = tok_cfg
    return _write(out, {"model.safetensors": tensors}, files, tok)


def _peft_name(name: str) -> str:
    """``layers.3.attention.wq.lora_A.weight`` -> ``base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight``
    (PEFT's saved names: the adapter name ``default`` is dropped in the file)."""
    module, _, ab = name.rpartition(".lora_")
    return f"base_model.model.{hf_name(module + '.weight')[: -len('.weight')]}.lora_{ab}"


def _checked_adapters(ckpt: Path, meta: dict) -> dict[str, torch.Tensor]:
    """The adapter tensors of ``ckpt``, checked (names and shapes) against the model shape it records."""
    from safetensors.torch import load_file

    from tokenmill.lora import apply_lora
    from tokenmill.model import Llama

    lo = meta["lora"]
    with torch.device("meta"):
        probe = apply_lora(
            Llama(LlamaConfig.from_dict(meta["model"])), lo["rank"], lo["alpha"], lo["dropout"], lo["targets"]
        )
    own = {k: tuple(p.shape) for k, p in probe.named_parameters() if p.requires_grad}
    state = load_file(str(ckpt / "model.safetensors"))
    for k, shape in own.items():
        if k not in state or tuple(state[k].shape) != shape:
            got = tuple(state[k].shape) if k in state else "missing"
            raise ValueError(f"{ckpt}: adapter tensor {k} is {got}, the recorded model expects {shape}")
    if set(state) - set(own):
        raise ValueError(f"{ckpt}: unexpected tensors {sorted(set(state) - set(own))[:5]}")
    return state


def _write(out: Path, tensors: dict, json_files: dict, tok=None) -> Path:
    """Write the folder under a temporary name, fsync every file, rename it into place."""
    from safetensors.torch import save_file

    from tokenmill.checkpoint import _fsync

    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for name, t in tensors.items():
        save_file(t, str(tmp / name), metadata={"format": "pt"})
    for name, obj in json_files.items():
        (tmp / name).write_text(json.dumps(obj, indent=2))
    if tok is not None:
        tok.save_huggingface(str(tmp / "tokenizer.json"))
    for f in tmp.iterdir():
        _fsync(f)
    _fsync(tmp)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    _fsync(out.parent)
    return out
