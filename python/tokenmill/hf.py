"""Hugging Face model folders in and out: ``tokenmill import-hf`` / ``Llama.from_hf`` read a
``save_pretrained`` folder of a ``LlamaForCausalLM`` or ``MistralForCausalLM`` (no sliding window);
``tokenmill export-hf`` writes a trainer checkpoint as a ``LlamaForCausalLM`` folder, and a LoRA adapter
checkpoint as a PEFT adapter folder (``--adapter``) or as merged full weights (``--merge``).

Our rotary embeddings use the Hugging Face "rotate half" pairing, so weights are renamed, never permuted;
one name map (below) serves both directions.

Import checks everything it can from config.json and the safetensors headers (architecture, rope scaling,
biases, shards, tensor names, shapes and dtypes) before it reads a weight or writes a byte, then streams the
tensors one at a time into the output, so that ``import-hf`` holds about one tensor and ``Llama.from_hf``
about one copy of the weights in the target dtype.

Tensors are read with plain reads at their header offsets, not through safetensors' ``safe_open``: pages
of its mmap, once read, count in the process's resident memory until the file is closed, i.e. up to a
whole shard on top. Measured on a 1.1B bf16 model in 3 shards (benches/bench_import.py, 2-core CPU), peak
RSS above the interpreter, in bf16: import-hf 0.07x the weights with plain reads vs 0.47x streaming through
safe_open; from_hf 1.15x with plain reads vs 1.35x (transformers' from_pretrained: 1.21x).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import struct
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator, Optional, Union

import torch

from tokenmill._fsutil import replace_dir
from tokenmill.config import LORA_TARGET_HF, LlamaConfig, RopeScaling

PathLike = Union[str, Path]

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
_LAYER_IN = {v: k for k, v in _LAYER.items()}
_GLOBAL_IN = {v: k for k, v in _GLOBAL.items()}

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# safetensors dtype names we read (weights are converted) and write
_ST_FLOAT = {"F64": torch.float64, "F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}
_ST_NAME = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}
_ARCHITECTURES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral"}


def hf_name(name: str) -> str:
    """Our parameter name -> the Hugging Face one (``layers.3.attention.wq.weight`` ->
    ``model.layers.3.self_attn.q_proj.weight``)."""
    if name in _GLOBAL:
        return _GLOBAL[name]
    _, i, rest = name.split(".", 2)  # layers.<i>.<rest>
    return f"model.layers.{i}.{_LAYER[rest]}"


def our_name(name: str) -> Optional[str]:
    """The Hugging Face parameter name -> ours; None for a name outside the map."""
    if name in _GLOBAL_IN:
        return _GLOBAL_IN[name]
    parts = name.split(".", 3)  # model.layers.<i>.<rest>
    if len(parts) == 4 and parts[:2] == ["model", "layers"] and parts[2].isdigit() and parts[3] in _LAYER_IN:
        return f"layers.{parts[2]}.{_LAYER_IN[parts[3]]}"
    return None


def dtype_of(name: Union[str, torch.dtype]) -> torch.dtype:
    """``"bfloat16"`` (or the torch dtype itself) -> torch.bfloat16; ValueError for what we cannot store."""
    if isinstance(name, torch.dtype) and name in _ST_NAME:
        return name
    if isinstance(name, str) and name in DTYPES:
        return DTYPES[name]
    raise ValueError(f"dtype {name!r} is not supported; choose one of {', '.join(DTYPES)}")


# ------------------------------------------------------------------------------------------------ import


def is_hf_folder(path: PathLike) -> bool:
    """A Hugging Face model folder (config.json) rather than a tokenmill checkpoint (meta.json)."""
    p = Path(path)
    return (p / "config.json").is_file() and not (p / "meta.json").exists()


def tokenizer_file(hf_dir: PathLike) -> Optional[Path]:
    """The tokenizer of a Hugging Face folder: ``tokenizer.json``, else ``tokenizer.model``; None without one."""
    return next(
        (Path(hf_dir) / n for n in ("tokenizer.json", "tokenizer.model") if (Path(hf_dir) / n).is_file()),
        None,
    )


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON: {e}") from None


def read_config(hf_dir: PathLike) -> LlamaConfig:
    """The LlamaConfig of a Hugging Face folder's config.json; ValueError naming the file and the key for
    anything our model cannot express exactly."""
    path = Path(hf_dir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{hf_dir}: not a Hugging Face model folder (no config.json)")
    c = _read_json(path)
    if not isinstance(c, dict):
        raise ValueError(f"{path}: expected a JSON object")

    def bad(key: str, why: str):
        raise ValueError(f"{path}: {key}: {why}")

    arch = c.get("architectures")
    if arch is not None and (not isinstance(arch, list) or len(arch) != 1 or arch[0] not in _ARCHITECTURES):
        bad("architectures", f"{arch} is not supported (supported: {', '.join(_ARCHITECTURES)})")
    model_type = c.get("model_type")
    if model_type not in _ARCHITECTURES.values():
        bad("model_type", f"{model_type!r} is not supported (supported: llama, mistral)")
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size"):
        if not isinstance(c.get(key), int):
            bad(key, f"missing or not an integer ({c.get(key)!r})")
    if c.get("hidden_act", "silu") != "silu":
        bad("hidden_act", f"{c['hidden_act']!r} is not supported (LLaMA's SwiGLU uses silu)")
    for key in ("attention_bias", "mlp_bias"):
        if c.get(key):
            bad(key, "biases are not supported (tokenmill's LLaMA has no bias terms)")
    if c.get("quantization_config"):
        bad("quantization_config", "quantized checkpoints are not supported; import the full-precision model")
    max_pos = c.get("max_position_embeddings", 2048)
    window = c.get("sliding_window")
    if window is not None and window < max_pos:
        bad(
            "sliding_window",
            f"{window} < max_position_embeddings {max_pos}: sliding-window attention "
            "is not supported (set it to null if the model does not need it)",
        )
    dim, heads = c["hidden_size"], c["num_attention_heads"]
    if c.get("head_dim") is not None and heads and c["head_dim"] != dim // heads:
        bad(
            "head_dim",
            f"{c['head_dim']} differs from hidden_size / num_attention_heads = {dim // heads}, "
            "which tokenmill's model cannot express",
        )

    # transformers 5 writes rope_parameters (theta inside); earlier versions rope_theta + rope_scaling
    theta = c.get("rope_theta", 10000.0)
    if isinstance(c.get("rope_parameters"), dict):
        rope_key, rope = "rope_parameters", c["rope_parameters"]
        theta = rope.get("rope_theta", theta)
    else:
        rope_key, rope = "rope_scaling", c.get("rope_scaling")
    scaling = None
    if rope is not None:
        if not isinstance(rope, dict):
            bad(rope_key, f"expected an object, got {rope!r}")
        kind = rope.get("rope_type", rope.get("type"))
        if rope.get("partial_rotary_factor", 1.0) != 1.0:
            bad(f"{rope_key}.partial_rotary_factor", "partial rotary embeddings are not supported")
        if kind == "llama3":
            keys = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
            for k in keys:
                if k not in rope:
                    bad(f"{rope_key}.{k}", "missing (needed by llama3 rope scaling)")
            try:
                scaling = RopeScaling(**{k: rope[k] for k in keys})
            except ValueError as e:
                bad(rope_key, str(e))
        elif kind not in (None, "default"):
            bad(f"{rope_key}.rope_type", f"{kind!r} is not supported (supported: default, llama3)")
    kv = c.get("num_key_value_heads")
    try:
        return LlamaConfig(
            vocab_size=c["vocab_size"],
            dim=dim,
            n_layers=c["num_hidden_layers"],
            n_heads=heads,
            n_kv_heads=None if kv in (None, heads) else kv,
            ffn_hidden=c["intermediate_size"],
            norm_eps=float(c.get("rms_norm_eps", 1e-6)),
            rope_theta=float(theta),
            max_seq_len=max_pos,
            tie_embeddings=bool(c.get("tie_word_embeddings", False)),
            rope_scaling=scaling,
        )
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None


@dataclass
class _Source:
    """A checked Hugging Face folder: the config and, for each of our tensors, its file and HF name."""

    config: LlamaConfig
    tensors: dict[str, tuple[Path, str]]  # our name -> (safetensors file, Hugging Face name)
    shapes: dict[str, tuple[int, ...]]  # our name -> shape
    tokenizer: Optional[Path]


def _header(path: Path) -> dict[str, dict]:
    """The tensor entries of a safetensors file's JSON header (no tensor data is read)."""
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            n = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
            if n < 2 or n > 100_000_000 or n > os.fstat(f.fileno()).st_size - 8:
                raise ValueError(f"{path}: not a safetensors file (header length {n})")
            header = json.loads(f.read(n))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not a safetensors file ({e})") from None
    if not isinstance(header, dict):
        raise ValueError(f"{path}: not a safetensors file (header is not a JSON object)")
    header.pop("__metadata__", None)
    return header


def _inspect(hf_dir: PathLike) -> _Source:
    """Check a Hugging Face folder without reading any weight: config, shard files, tensor names, shapes."""
    from tokenmill.model import Llama

    root = Path(hf_dir)
    cfg = read_config(root)
    index, single = root / "model.safetensors.index.json", root / "model.safetensors"
    if index.is_file():
        weight_map = _read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ValueError(f"{index}: weight_map: missing or empty")
        listed = {name: root / file for name, file in weight_map.items()}
        where = index
    elif single.is_file():
        listed = {name: single for name in _header(single)}
        where = single
    else:
        raise FileNotFoundError(
            f"{root}: no model.safetensors or model.safetensors.index.json (pytorch_model.bin folders are "
            "not supported: re-save with transformers' save_pretrained, which writes safetensors)"
        )
    headers: dict[Path, dict[str, dict]] = {}
    for name, file in listed.items():
        if file not in headers:
            if not file.is_file():
                raise FileNotFoundError(f"{where}: weight_map: shard {file.name} (for {name}) is missing")
            headers[file] = _header(file)
        if name not in headers[file]:
            raise ValueError(f"{file}: tensor {name} (listed in {where.name}) is absent")

    with torch.device("meta"):
        want = {k: tuple(v.shape) for k, v in Llama(cfg).state_dict().items()}
    tensors: dict[str, tuple[Path, str]] = {}
    for name, file in sorted(listed.items()):
        if name.endswith("rotary_emb.inv_freq"):  # older checkpoints store the derived frequencies
            continue
        if name.endswith(".bias"):
            raise ValueError(f"{file}: tensor {name}: biases are not supported (tokenmill's LLaMA has none)")
        ours = our_name(name)
        if cfg.tie_embeddings and ours == "output.weight":  # some tied checkpoints store the copy too
            continue
        if ours not in want:
            raise ValueError(f"{file}: unexpected tensor {name} for this config.json (a LLaMA of this shape)")
        entry = headers[file][name]
        if entry.get("dtype") not in _ST_FLOAT:
            raise ValueError(f"{file}: tensor {name}: dtype {entry.get('dtype')} is not a float dtype")
        if tuple(entry.get("shape", ())) != want[ours]:
            raise ValueError(
                f"{file}: tensor {name} has shape {tuple(entry.get('shape', ()))}, config.json implies {want[ours]}"
            )
        offsets = entry.get("data_offsets")
        nbytes = math.prod(want[ours]) * _ST_FLOAT[entry["dtype"]].itemsize
        if not (isinstance(offsets, list) and len(offsets) == 2 and offsets[1] - offsets[0] == nbytes):
            raise ValueError(f"{file}: tensor {name}: data_offsets {offsets} do not span its {nbytes} bytes")
        tensors[ours] = (file, name)
    if cfg.tie_embeddings and "tok_embeddings.weight" in tensors:
        tensors["output.weight"] = tensors["tok_embeddings.weight"]
    missing = [hf_name(k) for k in want if k not in tensors]
    if missing:
        raise ValueError(f"{where}: tensor(s) missing: {', '.join(missing[:5])}")

    return _Source(cfg, tensors, want, tokenizer_file(root))


def _read_tensors(src: _Source, names: list[str]) -> Iterator[tuple[str, torch.Tensor]]:
    """(our name, tensor) for each name, one tensor in memory at a time, read file by file in offset order."""
    by_file: dict[Path, list[str]] = {}
    for n in names:
        by_file.setdefault(src.tensors[n][0], []).append(n)
    for file, ours in sorted(by_file.items()):
        header = _header(file)
        with open(file, "rb") as f:
            base = 8 + struct.unpack("<Q", f.read(8))[0]
            for n in sorted(ours, key=lambda n: header[src.tensors[n][1]]["data_offsets"][0]):
                e = header[src.tensors[n][1]]
                start, end = e["data_offsets"]
                t = torch.empty(end - start, dtype=torch.uint8)
                f.seek(base + start)
                if f.readinto(t.numpy().data) != end - start:
                    raise ValueError(f"{file}: tensor {src.tensors[n][1]} is truncated")
                yield n, t.view(_ST_FLOAT[e["dtype"]]).view(src.shapes[n])


def _load_tokenizer(src: _Source):
    if src.tokenizer is None:
        return None
    from tokenmill.tokenizer import Tokenizer

    tok = Tokenizer.from_file(src.tokenizer)  # tokenizer.json or tokenizer.model
    if tok.n_vocab > src.config.vocab_size:
        raise ValueError(
            f"{src.tokenizer}: {tok.n_vocab} tokens but config.json vocab_size is {src.config.vocab_size}"
        )
    return tok


def read_state_dict(hf_dir: PathLike) -> dict[str, torch.Tensor]:
    """All weights of a Hugging Face folder under our names, in their stored dtype (what ``train.init_from``
    loads when it names such a folder); tied embeddings appear under both names, as in our state dict."""
    src = _inspect(hf_dir)
    state = dict(
        _read_tensors(src, [n for n in src.tensors if n != "output.weight" or not src.config.tie_embeddings])
    )
    if src.config.tie_embeddings:
        state["output.weight"] = state["tok_embeddings.weight"]
    return state


def load_model(hf_dir: PathLike, dtype: Union[str, torch.dtype] = torch.float32, device="cpu"):
    """``Llama.from_hf``: the model built in ``dtype`` on ``device``, each weight copied in as it is read."""
    from tokenmill.model import Llama

    dt = dtype_of(dtype)
    src = _inspect(hf_dir)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dt)  # allocate once, in the final dtype
    try:
        with torch.device("meta"):
            model = Llama(src.config)
    finally:
        torch.set_default_dtype(default)
    model.to_empty(device=device)
    if src.config.tie_embeddings:  # to_empty gives each module its own tensor: tie again
        model.output.weight = model.tok_embeddings.weight
    names = [n for n in src.tensors if not (src.config.tie_embeddings and n == "output.weight")]
    with torch.no_grad():
        for name, t in _read_tensors(src, names):
            model.get_parameter(name).copy_(t)
    return model


def _write_safetensors(path: Path, shapes: dict[str, tuple[int, ...]], dtype: torch.dtype, tensors) -> None:
    """A safetensors file written tensor by tensor: the header (known from the shapes) first, then each
    tensor at its offset as it arrives, so no more than one is ever held."""
    size = torch.empty((), dtype=dtype).element_size()
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name in sorted(shapes):
        n = math.prod(shapes[name]) * size
        header[name] = {
            "dtype": _ST_NAME[dtype],
            "shape": list(shapes[name]),
            "data_offsets": [offset, offset + n],
        }
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    written = set()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        base = f.tell()
        for name, t in tensors:
            t = t.to(dtype).contiguous()
            f.seek(base + header[name]["data_offsets"][0])
            f.write(t.reshape(-1).view(torch.uint8).numpy().data)
            written.add(name)
        f.truncate(base + offset)
        f.flush()
        os.fsync(f.fileno())
    if written != set(shapes):  # a hole would read back as zeros
        raise RuntimeError(f"{path}: tensors never written: {sorted(set(shapes) - written)[:5]}")


def import_hf(hf_dir: PathLike, out_dir: PathLike, dtype: Union[str, torch.dtype] = "float32") -> Path:
    """Convert a Hugging Face ``save_pretrained`` folder into a tokenmill checkpoint folder ``out_dir``
    (``meta.json``, ``model.safetensors`` in ``dtype``, the folder's tokenizer as
    ``tokenmill-tokenizer.tokenmill``) that ``train.init_from`` and ``Llama.from_checkpoint`` accept.

    Everything is checked before any weight is read; ``out_dir`` must not exist and appears whole (written
    under a temporary name, then renamed). Peak memory is about one tensor beyond the output being written.

    >>> import_hf("TinyLlama-1.1B", "tinyllama-tm", dtype="bfloat16")  # doctest: +SKIP
    """
    dt = dtype_of(dtype)
    src = _inspect(hf_dir)
    tok = _load_tokenizer(src)
    out = Path(out_dir)
    if out.exists():
        raise FileExistsError(f"{out}: already exists; import-hf writes a new folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        _write_safetensors(tmp / "model.safetensors", src.shapes, dt, _read_tensors(src, sorted(src.shapes)))
        meta: dict[str, Any] = {
            "model": src.config.to_dict(),
            "dtype": next(k for k, v in DTYPES.items() if v == dt),
            "imported_from": str(Path(hf_dir).resolve()),
        }
        if tok is not None:
            meta["tokenizer"] = "tokenmill-tokenizer.tokenmill"
            tok.save(tmp / meta["tokenizer"])
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


# ------------------------------------------------------------------------------------------------ export


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
        "rope_scaling": asdict(c.rope_scaling) if c.rope_scaling is not None else None,
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
    chat_template: Optional[str] = None,
) -> Path:
    """Write ``out/`` with config.json, model.safetensors, generation_config.json and (when a tokenizer is
    given or recorded in the checkpoint) tokenizer.json + tokenizer_config.json. ``out`` must not exist; the
    folder appears whole: it is written under a temporary name and renamed.

    ``chat_template`` (default: the SFT template the checkpoint's run trained on, recorded in meta.json):
    ``"alpaca"``, ``"chatml"`` or ``"llama3"``, written as a Jinja ``chat_template`` that renders chats
    as that run's data did; its end-of-turn token becomes the eos (tokenizer_config, config.json and
    generation_config.json, which also stops at the end-of-text token), so ``generate`` ends with the turn.
    bos/eos/pad/unk are named in tokenizer_config.json (pad: a pad special token if any, else the
    end-of-text token).

    A LoRA adapter checkpoint needs ``adapter=True`` (a PEFT adapter folder: adapter_config.json +
    adapter_model.safetensors, for ``peft.PeftModel.from_pretrained``; ``base_model`` fills its
    base_model_name_or_path, by default the base checkpoint's path) or ``merge=True`` (the adapters folded
    into the base: a normal Hugging Face folder)."""

    from tokenmill.checkpoint import load_model_state, read_meta, recorded_tokenizer

    ckpt, out = Path(checkpoint), Path(out)
    if out.exists():  # never replace a folder: OUT may be the user's base model or another export
        raise FileExistsError(f"{out}: already exists; export-hf writes a new folder (remove it first)")
    meta = read_meta(ckpt)
    cfg = LlamaConfig.from_dict(meta["model"])
    tdtype = dtype_of(dtype)
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

    tok_path = tokenizer or (str(ckpt / meta["tokenizer"]) if meta.get("tokenizer") else "")
    if not tok_path and meta.get("lora"):  # adapters trained without a tokenizer: the base's (checkpoint/HF)
        found = recorded_tokenizer(Path(meta["base"]))
        tok_path = str(found) if found else ""
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
    # an adapter folder carries the tokenizer and chat template when known (what `AutoTokenizer` reads there)
    template = chat_template or (meta.get("chat_template") if tok is not None or not adapter else None)
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

    tok_cfg: Optional[dict] = None
    if tok is not None:
        tok_cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": cfg.max_seq_len}
        names = {v: k for k, v in specials.items()}
        unk = specials.get("<unk>")
        for key, i in (("bos_token", bos), ("eos_token", eos), ("pad_token", pad), ("unk_token", unk)):
            if i is not None:
                tok_cfg[key] = names[i]
        if jinja is not None:
            tok_cfg["chat_template"] = jinja

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
            "target_modules": sorted(LORA_TARGET_HF[t] for t in lo["targets"]),
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
        extra = {} if tok_cfg is None else {"tokenizer_config.json": tok_cfg}
        return _write(
            out, {"adapter_model.safetensors": tensors}, {"adapter_config.json": config, **extra}, tok
        )

    if merge:
        from tokenmill.model import Llama

        _checked_adapters(ckpt, meta)  # before loading the (large) base
        state = Llama.from_checkpoint(ckpt, merge=True).state_dict()
    else:
        state = load_model_state(ckpt)
    tensors = {hf_name(k): v.to(tdtype).contiguous() for k, v in state.items()}
    if cfg.tie_embeddings:
        tensors.pop("lm_head.weight", None)

    files: dict = {
        "config.json": {**hf_config(cfg, dtype, bos, eos), "pad_token_id": pad},
        "generation_config.json": {
            "bos_token_id": bos,
            "eos_token_id": stop if len(stop) > 1 else eos,
            "pad_token_id": pad,
        },
    }
    if tok_cfg is not None:
        files["tokenizer_config.json"] = tok_cfg
    return _write(out, {"model.safetensors": tensors}, files, tok)


def _peft_name(name: str) -> str:
    """``layers.3.attention.wq.lora_A.weight`` -> ``base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight``
    (PEFT's saved names: the adapter name ``default`` is dropped in the file)."""
    module, _, ab = name.rpartition(".lora_")
    return f"base_model.model.{hf_name(module + '.weight')[: -len('.weight')]}.lora_{ab}"


def _checked_adapters(ckpt: Path, meta: dict) -> dict[str, torch.Tensor]:
    """The adapter tensors of ``ckpt``, checked (names and shapes) against the model shape it records."""
    from tokenmill.checkpoint import load_model_state
    from tokenmill.lora import apply_lora
    from tokenmill.model import Llama

    lo = meta["lora"]
    with torch.device("meta"):
        probe = apply_lora(
            Llama(LlamaConfig.from_dict(meta["model"])), lo["rank"], lo["alpha"], lo["dropout"], lo["targets"]
        )
    own = {k: tuple(p.shape) for k, p in probe.named_parameters() if p.requires_grad}
    state = load_model_state(ckpt)
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

    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        if tok is not None:  # first: a tokenizer that tokenizer.json cannot express fails before the weights
            tok.save_huggingface(str(tmp / "tokenizer.json"))
        for name, t in tensors.items():
            save_file(t, str(tmp / name), metadata={"format": "pt"})
        for name, obj in json_files.items():
            (tmp / name).write_text(json.dumps(obj, indent=2))
        replace_dir(tmp, out)
    except BaseException:  # nothing half-written is left beside OUT
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
