"""Configuration, without torch, so that the planner and the CLI start fast: the LLaMA model shape and its
presets (``tokenmill.model`` re-exports both: ``tm.model.LlamaConfig.preset("llama-13b")``), and the
trainer's run configuration (one TOML file per run, ``--section.key=value`` overrides; every key is
documented in configs/example.toml).

Presets follow the LLaMA-1 paper (Touvron et al., 2023, Table 2) and Meta's released configs.
"""

from __future__ import annotations

import dataclasses
import math
import sys
from dataclasses import dataclass, field
from typing import Any, Literal, Optional, Sequence, cast

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.9/3.10 only
    import tomli as tomllib


@dataclass(frozen=True)
class RopeScaling:
    """LLaMA-3.1's rotary frequency scaling (Hugging Face ``rope_scaling`` with ``rope_type = "llama3"``):
    long wavelengths are divided by ``factor``, short ones kept, the band between interpolated. The fields
    and their names are Hugging Face's, so ``to_dict()`` is the ``rope_scaling`` of a config.json."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int
    rope_type: str = "llama3"

    def __post_init__(self) -> None:
        if self.rope_type != "llama3":
            raise ValueError(f"rope_scaling: unsupported rope_type {self.rope_type!r} (supported: llama3)")
        if not (self.factor > 0 and self.high_freq_factor > self.low_freq_factor > 0):
            raise ValueError(
                f"rope_scaling: need factor > 0 and high_freq_factor > low_freq_factor > 0: {self}"
            )
        if self.original_max_position_embeddings <= 0:
            raise ValueError(f"rope_scaling: original_max_position_embeddings must be positive: {self}")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RopeScaling:
        names = {f.name for f in dataclasses.fields(cls)}
        missing = sorted(n for n in names - set(d) if n != "rope_type")
        unknown = sorted(set(d) - names)
        if missing or unknown:
            raise ValueError(f"rope_scaling: missing keys {missing}, unknown keys {unknown} (llama3 scaling)")
        return cls(**d)


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
    rope_scaling: Optional[RopeScaling] = None  # a dict (TOML table, meta.json) becomes a RopeScaling

    def __post_init__(self) -> None:
        if isinstance(self.rope_scaling, dict):
            object.__setattr__(self, "rope_scaling", RopeScaling.from_dict(self.rope_scaling))
        elif self.rope_scaling is not None and not isinstance(self.rope_scaling, RopeScaling):
            raise ValueError(
                f"rope_scaling must be a table of llama3 scaling keys, got {self.rope_scaling!r}"
            )
        for name in ("vocab_size", "dim", "n_layers", "n_heads", "max_seq_len", "multiple_of"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        for name in ("n_kv_heads", "ffn_hidden"):
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive (or unset), got {getattr(self, name)}")
        for name in ("norm_eps", "rope_theta"):
            if not 0 < getattr(self, name) < math.inf:
                raise ValueError(f"{name} must be positive and finite, got {getattr(self, name)}")
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

    def canonical(self) -> LlamaConfig:
        """The same model with derived sizes spelled out (n_kv_heads, ffn_hidden): two configs describe the
        same weights exactly when their canonical forms are equal (a preset vs an imported config.json)."""
        return dataclasses.replace(
            self, n_kv_heads=self.kv_heads, ffn_hidden=self.hidden_dim, multiple_of=256
        )

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


# ----------------------------------------------------------------------------------------------------------
# Configuration: sections of a TOML file. Every key is documented in configs/example.toml.


@dataclass
class RunSection:
    out_dir: str = "out"
    seed: int = 1337
    device: str = "auto"  # "auto" (cuda when available), "cpu", "cuda"
    autocast: str = "bfloat16"  # compute dtype on GPU ("bfloat16", "float16" or "float32"); CPU runs fp32
    param_dtype: str = "float32"  # parameter (and gradient) dtype; "bfloat16" halves memory (13B on one GPU)
    compile: bool = False
    activation_checkpointing: bool = False
    attention: str = "auto"  # packed documents: "auto", "sdpa", "flex", "varlen" (see model.ATTENTION)


@dataclass
class DataSection:
    train: list = field(default_factory=list)  # token-file prefixes (.bin/.idx), see `tokenmill prepare`
    val: list = field(default_factory=list)
    tokenizer: str = ""  # tokenizer file; its vocabulary size is checked against the model and the data
    seq_len: int = 256
    batch_size: int = 8  # sequences per device per micro-step
    packing: str = "concat"  # "concat" or "best_fit"
    document_mask: bool = True  # attention stays within documents (positions restart at boundaries)
    sft: bool = False  # instruction data (loss only on responses); see tm.data.prepare_sft


@dataclass
class OptimSection:
    name: str = "adamw"  # "adamw" (torch, fused on CUDA) or "adamw8bit" (tokenmill.optim.AdamW8bit, FSDP2 ok)
    lr: float = 3e-4
    min_lr: float = 3e-5
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # 0 disables clipping (the norm is still logged)
    schedule: str = "cosine"  # "cosine", "wsd" (warmup-stable-decay) or "constant"
    warmup_steps: int = 100
    decay_steps: int = 0  # wsd: length of the final linear decay to min_lr (0: 20% of steps)


@dataclass
class TrainSection:
    steps: int = 1000
    grad_accum: int = 1
    init_from: str = ""  # checkpoint or Hugging Face folder whose weights start the run (SFT, etc.)
    log_every: int = 10
    eval_every: int = 100  # 0: no evaluation
    eval_batches: int = 20
    max_bad_steps: int = 10  # abort after this many steps with a NaN/inf loss or gradient
    progress: bool = True


@dataclass
class CheckpointSection:
    every: int = 0  # steps between checkpoints; 0: only at the end
    keep: int = 2  # newest checkpoints kept
    resume: str = ""  # "" (fresh run), "auto" (newest in out_dir/checkpoints, if any) or a folder


@dataclass
class DistSection:
    fsdp: bool = True  # shard with FSDP2 when launched with more than one process
    cpu_offload: bool = (
        False  # FSDP2 CPUOffloadPolicy: parameters, gradients, optimizer state on the host (adamw)
    )


LORA_TARGETS = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")  # attention q k v o; SwiGLU gate, down, up
# their Hugging Face module names (PEFT's target_modules), for export-hf --adapter and for error messages
LORA_TARGET_HF = {
    "wq": "q_proj",
    "wk": "k_proj",
    "wv": "v_proj",
    "wo": "o_proj",
    "w1": "gate_proj",
    "w2": "down_proj",
    "w3": "up_proj",
}


def check_lora(
    rank: int, alpha: float, dropout: float, targets: Sequence[str], base_dtype: Optional[str]
) -> None:
    """Raise ValueError naming the first bad LoRA setting (shared by [lora] and tm.model.apply_lora)."""
    if isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0:
        raise ValueError(f"lora rank must be a positive integer, got {rank!r}")
    if not alpha > 0:
        raise ValueError(f"lora alpha must be positive, got {alpha!r}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"lora dropout must be in [0, 1), got {dropout!r}")
    if isinstance(targets, str) or not targets:
        raise ValueError(
            f"lora targets must be a non-empty list of {', '.join(LORA_TARGETS)}; got {targets!r}"
        )
    for t in targets:
        if t not in LORA_TARGETS:
            ours = {v: k for k, v in LORA_TARGET_HF.items()}.get(t)
            hint = f" ({t} is the Hugging Face name of {ours})" if ours else ""
            raise ValueError(
                f"lora target {t!r} does not exist; valid targets: {', '.join(LORA_TARGETS)}{hint}"
            )
    if len(set(targets)) != len(targets):
        raise ValueError(f"lora targets list a module twice: {list(targets)}")
    if base_dtype not in (None, "", "nf4"):
        raise ValueError(f'lora base_dtype must be "" (run.param_dtype) or "nf4", got {base_dtype!r}')


@dataclass
class LoraSection:
    rank: int = 0  # 0: train every weight; > 0: train rank-r adapters on a frozen base (train.init_from)
    alpha: float = 32.0  # adapter output scaled by alpha / rank
    dropout: float = 0.0  # on the adapter's input
    targets: list = field(default_factory=lambda: list(LORA_TARGETS))
    base_dtype: str = ""  # "": the base in run.param_dtype; "nf4": 4-bit NormalFloat base (QLoRA)


@dataclass
class LogSection:
    # What log.jsonl gets also goes to: "tensorboard" (out_dir/tensorboard), "wandb" (a run in out_dir/wandb).
    trackers: list = field(default_factory=list)
    wandb_project: str = "tokenmill"
    # "offline" (no network; `wandb sync` uploads later) or "online"; check_config refuses other strings
    wandb_mode: Literal["offline", "online"] = "offline"


TRACKERS = ("tensorboard", "wandb")


@dataclass
class TrainConfig:
    run: RunSection = field(default_factory=RunSection)
    model: dict = field(default_factory=lambda: {"preset": "small"})  # preset + any LlamaConfig field
    data: DataSection = field(default_factory=DataSection)
    optim: OptimSection = field(default_factory=OptimSection)
    train: TrainSection = field(default_factory=TrainSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    dist: DistSection = field(default_factory=DistSection)
    lora: LoraSection = field(default_factory=LoraSection)
    log: LogSection = field(default_factory=LogSection)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def model_config(self, vocab_size: Optional[int] = None) -> LlamaConfig:
        m = dict(self.model)
        preset = m.pop("preset", None)
        if vocab_size is not None and "vocab_size" not in m:
            m["vocab_size"] = vocab_size
        return LlamaConfig.preset(preset, **m) if preset else LlamaConfig.from_dict(m)

    def init_model_config(self, theirs: LlamaConfig, source: str) -> LlamaConfig:
        """The model shape of a run that starts from a model (``train.init_from``): ``theirs``, as ``source``
        records it (a Hugging Face folder's config.json, a checkpoint's meta.json). Each ``[model]`` key must
        agree with it or be absent; ``model.preset`` agrees when it, with the other keys over it, is that shape
        (vocab_size, which a run otherwise takes from its tokenizer, aside); the default preset is ignored.
        ValueError naming the key and ``source`` otherwise."""
        default = TrainConfig().model["preset"]
        keys = {k: v for k, v in self.model.items() if k != "preset"}
        rule = "with train.init_from set, the model shape comes from the model the run starts from"
        for key, value in keys.items():
            try:
                mine = theirs.replace(**{key: value})
            except (TypeError, ValueError) as e:
                raise ValueError(f"model.{key} = {value!r}: {e}") from None
            if mine.canonical() != theirs.canonical():
                raise ValueError(
                    f"model.{key} = {value!r} conflicts with {source} ({key} = {getattr(theirs, key)!r} "
                    f"there); {rule}"
                )
        preset = self.model.get("preset", default)
        if preset != default:
            try:
                mine = LlamaConfig.preset(preset, **{"vocab_size": theirs.vocab_size, **keys})
                same = mine.canonical() == theirs.canonical()
            except (TypeError, ValueError):
                same = False  # a preset the other keys do not fit is another shape
            if not same:
                raise ValueError(
                    f"model.preset = {preset!r} conflicts with {source} (the preset, with the other [model] "
                    f"keys, is another shape); {rule}: remove model.preset"
                )
        return theirs


_MODEL_KEYS = {"preset"} | {f.name for f in dataclasses.fields(LlamaConfig)}
# LlamaConfig's annotations are strings here (postponed evaluation); Optional[int] fields take an int,
# rope_scaling a TOML table.
_MODEL_TYPES = {
    f.name: {"int": int, "Optional[int]": int, "float": float, "bool": bool, "Optional[RopeScaling]": dict}[
        str(f.type)
    ]
    for f in dataclasses.fields(LlamaConfig)
}


def _set(cfg: TrainConfig, section: str, key: str, value: Any, where: str) -> None:
    if section == "model":
        if key not in _MODEL_KEYS:
            raise ValueError(f"{where}: unknown key model.{key}; known: {', '.join(sorted(_MODEL_KEYS))}")
        if key == "preset" and value not in PRESETS:
            raise ValueError(f"{where}: unknown model preset {value!r}; known: {', '.join(sorted(PRESETS))}")
        kind = _MODEL_TYPES.get(key, str)
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise ValueError(f"{where}: model.{key} must be {kind.__name__}, got {value!r}")
        cfg.model[key] = value
        return
    sec = getattr(cfg, section, None)
    if not dataclasses.is_dataclass(sec) or section.startswith("_"):
        known = ", ".join(f.name for f in dataclasses.fields(TrainConfig))
        raise ValueError(f"{where}: unknown section [{section}]; known: {known}")
    fields = {f.name: f for f in dataclasses.fields(sec)}
    if key not in fields:
        raise ValueError(f"{where}: unknown key {section}.{key}; known: {', '.join(fields)}")
    default = getattr(cast(Any, type(sec))(), key)
    if isinstance(default, bool):
        ok = isinstance(value, bool)
    elif isinstance(default, float):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif isinstance(default, int):
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif isinstance(default, list):
        value = [value] if isinstance(value, str) else value
        ok = isinstance(value, list)
    else:
        ok = isinstance(value, type(default))
    if not ok:
        raise ValueError(f"{where}: {section}.{key} must be {type(default).__name__}, got {value!r}")
    setattr(sec, key, value)


def _parse_value(text: str) -> Any:
    """A command-line value as TOML (numbers, booleans, lists, quoted strings); otherwise a bare string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def load_config(path: Optional[str] = None, overrides: Sequence[str] = ()) -> TrainConfig:
    """Read a run's TOML file and apply ``--section.key=value`` overrides (``--resume X`` is short for
    ``--checkpoint.resume=X``). Unknown sections or keys and wrongly typed values raise ValueError."""
    cfg = TrainConfig()
    if path is not None:
        with open(path, "rb") as f:
            try:
                doc = tomllib.load(f)
            except tomllib.TOMLDecodeError as e:
                raise ValueError(f"{path}: {e}") from None
        for section, table in doc.items():
            if not isinstance(table, dict):
                raise ValueError(f"{path}: top-level key {section!r} must be a [section]")
            for key, value in table.items():
                _set(cfg, section, key, value, path)
    args = list(overrides)
    while args:
        arg = args.pop(0)
        if not arg.startswith("--"):
            raise ValueError(f"override {arg!r}: expected --section.key=value")
        name, eq, text = arg[2:].partition("=")
        if not eq:
            if not args:
                raise ValueError(f"override {arg!r} has no value")
            text = args.pop(0)
        name = {"resume": "checkpoint.resume"}.get(name, name)
        section, dot, key = name.partition(".")
        if not dot:
            raise ValueError(f"override {arg!r}: expected --section.key=value (e.g. --optim.lr=1e-3)")
        _set(cfg, section, key, _parse_value(text), f"override {arg}")
    check_config(cfg)
    return cfg


# Allowed values of every key that has limits: (key, test, requirement). Checked after the overrides,
# before any work, so that a typo fails in a second instead of after a model is built (or never: a
# negative warmup or keep = 0 ran silently).
_CHOICES = {
    "run.device": ("auto", "cpu", "cuda"),
    "run.autocast": ("bfloat16", "float16", "float32"),
    "run.param_dtype": ("float32", "bfloat16", "float16"),
    "run.attention": ("auto", "sdpa", "flex", "varlen"),  # tokenmill.model.ATTENTION (no torch here)
    "data.packing": ("concat", "best_fit", "none"),
    "optim.name": ("adamw", "adamw8bit"),
    "optim.schedule": ("cosine", "wsd", "constant"),
}
_RANGES: list[tuple[str, Any, str]] = [
    ("run.seed", lambda v: 0 <= v < 2**63, "in [0, 2**63)"),
    ("data.seq_len", lambda v: v >= 1, ">= 1"),
    ("data.batch_size", lambda v: v >= 1, ">= 1"),
    (
        "optim.lr",
        lambda v: v >= 0,
        ">= 0 (0 keeps the weights: a run that only writes its initial checkpoint)",
    ),
    ("optim.min_lr", lambda v: v >= 0, ">= 0"),
    ("optim.weight_decay", lambda v: v >= 0, ">= 0"),
    ("optim.beta1", lambda v: 0 <= v < 1, "in [0, 1)"),
    ("optim.beta2", lambda v: 0 <= v < 1, "in [0, 1)"),
    ("optim.eps", lambda v: v > 0, "> 0"),
    ("optim.grad_clip", lambda v: v >= 0, ">= 0 (0 disables clipping)"),
    ("optim.warmup_steps", lambda v: v >= 0, ">= 0"),
    ("optim.decay_steps", lambda v: v >= 0, ">= 0 (0: 20% of the steps)"),
    ("train.steps", lambda v: v >= 1, ">= 1"),
    ("train.grad_accum", lambda v: v >= 1, ">= 1"),
    ("train.log_every", lambda v: v >= 1, ">= 1"),
    ("train.eval_every", lambda v: v >= 0, ">= 0 (0: no evaluation)"),
    ("train.eval_batches", lambda v: v >= 1, ">= 1"),
    ("train.max_bad_steps", lambda v: v >= 0, ">= 0"),
    ("checkpoint.every", lambda v: v >= 0, ">= 0 (0: only at the end)"),
    ("checkpoint.keep", lambda v: v >= 1, ">= 1 (the newest checkpoints kept, the final one included)"),
]


def check_config(cfg: TrainConfig) -> None:
    """Every value of ``cfg`` within its limits; ValueError naming the first key that is not."""

    def get(key: str) -> Any:
        section, _, name = key.partition(".")
        return getattr(getattr(cfg, section), name)

    for section in ("run", "data", "optim", "train", "checkpoint"):
        for f in dataclasses.fields(getattr(cfg, section)):
            v = getattr(getattr(cfg, section), f.name)
            if isinstance(v, float) and not math.isfinite(v):
                raise ValueError(f"{section}.{f.name} must be a finite number, got {v}")
    for key, allowed in _CHOICES.items():
        if get(key) not in allowed:
            raise ValueError(f"{key} must be one of {', '.join(allowed)}; got {get(key)!r}")
    for key, ok, requirement in _RANGES:
        if not ok(get(key)):
            raise ValueError(f"{key} must be {requirement}, got {get(key)!r}")
    o = cfg.optim
    if o.min_lr > o.lr:
        raise ValueError(f"optim.min_lr ({o.min_lr}) must be <= optim.lr ({o.lr})")
    if not cfg.run.out_dir:
        raise ValueError("run.out_dir must not be empty")
    for key in ("data.train", "data.val"):
        if not all(isinstance(p, str) and p for p in get(key)):
            raise ValueError(
                f"{key} must be a list of token-file prefixes (non-empty strings), got {get(key)!r}"
            )
    if o.name == "adamw8bit" and cfg.dist.cpu_offload:
        # Offloaded, the step runs on the host, where AdamW8bit has only its torch reference: 216 ns per
        # parameter against torch AdamW's 8 (foreach; 8M fp32 parameters, best of 3, 2 threads on the 2-core
        # CI box), i.e. minutes per step for a 13B model's shard.
        raise ValueError(
            "optim.name = adamw8bit with dist.cpu_offload would step on the CPU (the 8-bit kernel is CUDA "
            "only; its CPU reference is ~27x slower than torch's AdamW): use adamw with cpu_offload, or "
            "adamw8bit with the state on the GPUs (FSDP2 shards it)"
        )
    unknown = [name for name in cfg.log.trackers if name not in TRACKERS]
    if unknown:
        raise ValueError(f"log.trackers: unknown tracker(s) {unknown}; known: {', '.join(TRACKERS)}")
    if cfg.log.wandb_mode not in ("offline", "online"):
        raise ValueError(f"log.wandb_mode must be offline or online, got {cfg.log.wandb_mode!r}")
    lo = cfg.lora
    if lo.rank < 0:
        raise ValueError(f"lora.rank must be >= 0 (0: no LoRA), got {lo.rank}")
    # The other keys are checked even with LoRA off, so a typo shows before the run that turns it on.
    check_lora(lo.rank or 1, lo.alpha, lo.dropout, lo.targets, lo.base_dtype)
    try:
        cfg.model_config(vocab_size=cfg.model.get("vocab_size", 32000))  # shape errors surface now
    except (TypeError, ValueError) as e:
        raise ValueError(f"[model] {e}") from None
