"""Calibration of tokenmill.plan's memory model against a real LLaMA training step.

`measure(...)` builds the model, trains a few steps and reports what the planner predicts, measured:
parameter count, bytes of weights / gradients / optimizer state, bytes of the activations autograd saves
(summed through torch.autograd.graph.saved_tensors_hooks, each storage once, parameters excluded) and
the peak of allocated memory (CUDA: torch.cuda.max_memory_allocated; CPU: the running "Total
Allocated" of torch.profiler's memory events). Used by tests/test_plan.py (CPU) and
benches/gpu_plan_check.py (GPU); `python benches/plan_calibration.py` prints the CPU table.

The model is tokenmill.model.Llama (with tokenmill.kernels) when present, else `ReferenceLlama` below:
the same architecture and the same saved tensors (RMSNorm saving x and rstd, RoPE, GQA through SDPA,
SwiGLU saving gate and up, untied head), parameter names as Meta's checkpoints. Set
TOKENMILL_CALIBRATION_MODEL=reference to measure ReferenceLlama even when Llama exists.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import tempfile
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

if importlib.util.find_spec("tokenmill") is None:  # a source checkout without the package installed
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python"))

from tokenmill import plan  # noqa: E402
from tokenmill.model import LlamaConfig  # noqa: E402


class _RMSNormFn(torch.autograd.Function):
    """RMSNorm that saves only x and the fp32 rstd, as a fused kernel does (F.rms_norm's CPU
    decomposition also keeps x * rstd)."""

    @staticmethod
    def forward(ctx, x, weight, eps):
        rstd = torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps)
        ctx.save_for_backward(x, weight, rstd)
        return (x.float() * rstd).to(x.dtype) * weight

    @staticmethod
    def backward(ctx, gy):
        x, weight, rstd = ctx.saved_tensors
        n = x.float() * rstd
        gw = (gy.float() * n).reshape(-1, n.shape[-1]).sum(0)
        gn = gy.float() * weight.float()
        gx = rstd * (gn - n * (gn * n).mean(-1, keepdim=True))
        return gx.to(x.dtype), gw.to(weight.dtype), None


class _SwiGLUFn(torch.autograd.Function):
    """silu(gate) * up saving only gate and up, as tokenmill.kernels.swiglu does."""

    @staticmethod
    def forward(ctx, gate, up):
        ctx.save_for_backward(gate, up)
        return F.silu(gate) * up

    @staticmethod
    def backward(ctx, gy):
        gate, up = ctx.saved_tensors
        sig = torch.sigmoid(gate)
        silu = gate * sig
        return gy * up * sig * (1 + gate * (1 - sig)), gy * silu


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return _RMSNormFn.apply(x, self.weight, self.eps)


def _rope(x, cos, sin):
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class Attention(nn.Module):
    def __init__(self, c: LlamaConfig):
        super().__init__()
        self.c = c
        kv = c.kv_heads * c.head_dim
        self.wq = nn.Linear(c.dim, c.dim, bias=False)
        self.wk = nn.Linear(c.dim, kv, bias=False)
        self.wv = nn.Linear(c.dim, kv, bias=False)
        self.wo = nn.Linear(c.dim, c.dim, bias=False)

    def forward(self, x, cos, sin):
        b, s, _ = x.shape
        c = self.c
        q = self.wq(x).view(b, s, c.n_heads, c.head_dim).transpose(1, 2)
        k = self.wk(x).view(b, s, c.kv_heads, c.head_dim).transpose(1, 2)
        v = self.wv(x).view(b, s, c.kv_heads, c.head_dim).transpose(1, 2)
        q, k = _rope(q, cos, sin), _rope(k, cos, sin)
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=c.kv_heads != c.n_heads)
        return self.wo(o.transpose(1, 2).reshape(b, s, c.dim))


class FeedForward(nn.Module):
    def __init__(self, c: LlamaConfig):
        super().__init__()
        self.w1 = nn.Linear(c.dim, c.hidden_dim, bias=False)
        self.w2 = nn.Linear(c.hidden_dim, c.dim, bias=False)
        self.w3 = nn.Linear(c.dim, c.hidden_dim, bias=False)

    def forward(self, x):
        return self.w2(_SwiGLUFn.apply(self.w1(x), self.w3(x)))


class Block(nn.Module):
    def __init__(self, c: LlamaConfig):
        super().__init__()
        self.attention_norm = RMSNorm(c.dim, c.norm_eps)
        self.attention = Attention(c)
        self.ffn_norm = RMSNorm(c.dim, c.norm_eps)
        self.feed_forward = FeedForward(c)

    def forward(self, x, cos, sin):
        h = x + self.attention(self.attention_norm(x), cos, sin)
        return h + self.feed_forward(self.ffn_norm(h))


class ReferenceLlama(nn.Module):
    def __init__(self, c: LlamaConfig, checkpointing: bool = False):
        super().__init__()
        self.c, self.checkpointing = c, checkpointing
        self.tok_embeddings = nn.Embedding(c.vocab_size, c.dim)
        self.layers = nn.ModuleList(Block(c) for _ in range(c.n_layers))
        self.norm = RMSNorm(c.dim, c.norm_eps)
        self.output = nn.Linear(c.dim, c.vocab_size, bias=False)
        if c.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight

    def forward(self, tokens):
        s = tokens.shape[1]
        hd = self.c.head_dim
        inv = 1.0 / (self.c.rope_theta ** (torch.arange(0, hd, 2, device=tokens.device).float() / hd))
        ang = torch.outer(torch.arange(s, device=tokens.device).float(), inv)
        ang = torch.cat((ang, ang), dim=-1)
        dtype = self.tok_embeddings.weight.dtype
        cos, sin = ang.cos().to(dtype), ang.sin().to(dtype)
        h = self.tok_embeddings(tokens)
        for layer in self.layers:
            if self.checkpointing:
                h = torch.utils.checkpoint.checkpoint(layer, h, cos, sin, use_reentrant=False)
            else:
                h = layer(h, cos, sin)
        return self.output(self.norm(h))


def build_model(cfg: LlamaConfig, checkpointing: bool = False, device="cpu") -> nn.Module:
    """The project's Llama when present (trainer branch), else ReferenceLlama."""
    from tokenmill import model as tm_model

    Llama = getattr(tm_model, "Llama", None)
    if Llama is None or os.environ.get("TOKENMILL_CALIBRATION_MODEL") == "reference":
        return ReferenceLlama(cfg, checkpointing).to(device)
    m = Llama(cfg).to(device)
    if checkpointing:
        for attr in ("activation_checkpointing", "checkpointing", "gradient_checkpointing"):
            if hasattr(m, attr):
                setattr(m, attr, True)
                break
        else:
            raise RuntimeError("tokenmill.model.Llama has no checkpointing switch the calibration knows")
    return m


@dataclass
class Measured:
    n_params: int
    weights: int
    grads: int
    optimizer: int
    saved_activations: Optional[int]  # None with checkpointing (the checkpoint's own hooks take over)
    peak: int


def _tensor_bytes(ts) -> int:
    seen, total = set(), 0
    for t in ts:
        if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in seen:
            seen.add(t.untyped_storage().data_ptr())
            total += t.untyped_storage().nbytes()
    return total


def _cpu_peak(trace_path: str) -> int:
    """Peak of CPU memory allocated during the profiled region. The profiler's running total is kept
    across profiling sessions of one process, so it is taken relative to its value at the start."""
    with open(trace_path) as f:
        events = json.load(f)["traceEvents"]
    mem = sorted(
        (e for e in events if e.get("name") == "[memory]" and e["args"].get("Device Type") == 0),
        key=lambda e: e["ts"],
    )
    if not mem:
        raise RuntimeError("torch.profiler recorded no CPU memory events")
    base = mem[0]["args"]["Total Allocated"] - mem[0]["args"]["Bytes"]
    return max(e["args"]["Total Allocated"] for e in mem) - base


def measure(
    cfg: LlamaConfig,
    *,
    seq_len: int,
    micro_batch: int,
    precision: str = "fp32",
    optimizer: str = "adamw",
    checkpointing: bool = False,
    device: str = "cpu",
    steps: int = 2,
) -> Measured:
    """Train `steps` steps (gradients kept between steps, as under gradient accumulation) and measure."""
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[precision]
    torch.manual_seed(0)
    tokens = torch.randint(cfg.vocab_size, (micro_batch, seq_len + 1)).to(device)
    inp, tgt = tokens[:, :-1], tokens[:, 1:]

    def run():
        m = build_model(cfg, checkpointing, device).to(dtype)
        opt_kw = {"adamw": dict(foreach=True), "adamw-fused": dict(fused=True)}[optimizer]
        opt = torch.optim.AdamW(m.parameters(), lr=1e-4, **opt_kw)
        for _ in range(steps):
            loss = F.cross_entropy(m(inp).float().flatten(0, 1), tgt.flatten())
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=False)
        return m, opt

    if device == "cpu":
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            m, opt = run()
        with tempfile.TemporaryDirectory() as d:
            path = os.path.join(d, "trace.json")
            prof.export_chrome_trace(path)
            peak = _cpu_peak(path)
    else:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        m, opt = run()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base

    params = list(m.parameters())
    state = [t for s in opt.state.values() for t in s.values() if isinstance(t, torch.Tensor) and t.dim() > 0]
    saved = None
    if not checkpointing:
        param_ptrs = {p.untyped_storage().data_ptr() for p in params}
        seen: dict[int, int] = {}

        def pack(t):
            ptr = t.untyped_storage().data_ptr()
            if ptr not in param_ptrs:
                seen[ptr] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = F.cross_entropy(m(inp).float().flatten(0, 1), tgt.flatten())
        del loss
        saved = sum(seen.values())
    return Measured(
        n_params=sum(p.numel() for p in params),
        weights=_tensor_bytes(params),
        grads=_tensor_bytes(p.grad for p in params),
        optimizer=_tensor_bytes(state),
        saved_activations=saved,
        peak=peak,
    )


# ---------------------------------------------------------------------------------------------- QLoRA


class _QLoraLinear(nn.Module):
    """LoRA on an NF4 base, y = base(x) + B(A(x)) * 2: the stand-in for tokenmill.lora when that module is
    absent, with the same tensors (A [rank, in] and B [out, rank] as bias-free Linears)."""

    def __init__(self, base: nn.Linear, rank: int):
        super().__init__()
        from tokenmill.quant import Linear4bit

        self.base = Linear4bit.from_linear(base)
        kw = dict(bias=False, dtype=base.weight.dtype, device=base.weight.device)
        self.lora_A = nn.Linear(base.in_features, rank, **kw)
        self.lora_B = nn.Linear(rank, base.out_features, **kw)

    def forward(self, x):
        return self.base(x) + self.lora_B(self.lora_A(x)) * 2.0


def apply_qlora(model: nn.Module, rank: int) -> nn.Module:
    """Rank-``rank`` adapters on all seven projections of every block over an NF4 base, everything else
    frozen: tokenmill.lora.apply_lora(..., base_dtype="nf4") when present, else _QLoraLinear."""
    if importlib.util.find_spec("tokenmill.lora") is not None:
        from tokenmill import lora

        return lora.apply_lora(model, rank=rank, alpha=2.0 * rank, base_dtype="nf4")
    for p in model.parameters():
        p.requires_grad_(False)
    for block in model.layers:
        qlora_block(block, rank)
    return model


def qlora_block(block: nn.Module, rank: int) -> nn.Module:
    """_QLoraLinear on the seven projections of one block, quantised there and then (so a 65B model never
    needs its dense weights all at once)."""
    for owner, names in (
        (block.attention, ("wq", "wk", "wv", "wo")),
        (block.feed_forward, ("w1", "w2", "w3")),
    ):
        for name in names:
            setattr(owner, name, _QLoraLinear(getattr(owner, name).requires_grad_(False), rank))
    return block


def measure_qlora(
    cfg: LlamaConfig,
    *,
    seq_len: int,
    micro_batch: int,
    precision: str = "fp32",
    optimizer: str = "adamw",
    checkpointing: bool = True,
    rank: int = 16,
    steps: int = 2,
) -> Measured:
    """A QLoRA step on CPU: the model is built dense and quantised first (outside the measurement, as an
    import would stream it); the peak is the resident weights (counted tensor by tensor) plus the peak of
    what the training steps allocate on top (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[precision]
    torch.manual_seed(0)
    tokens = torch.randint(cfg.vocab_size, (micro_batch, seq_len + 1))
    inp, tgt = tokens[:, :-1], tokens[:, 1:]
    m = build_model(cfg, checkpointing).to(dtype)
    n_params = sum(p.numel() for p in m.parameters())  # the dense base, as the planner counts it
    m = apply_qlora(m, rank)
    resident = _tensor_bytes([*m.parameters(), *m.buffers()])
    trainable = [p for p in m.parameters() if p.requires_grad]
    opt_kw = {"adamw": dict(foreach=True), "adamw-fused": dict(fused=True)}[optimizer]

    def run():
        opt = torch.optim.AdamW(trainable, lr=1e-4, **opt_kw)
        for _ in range(steps):
            loss = F.cross_entropy(m(inp).float().flatten(0, 1), tgt.flatten())
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=False)
        return opt

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        opt = run()
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "trace.json")
        prof.export_chrome_trace(path)
        peak = resident + _cpu_peak(path)
    state = [t for s in opt.state.values() for t in s.values() if isinstance(t, torch.Tensor) and t.dim() > 0]
    return Measured(
        n_params=n_params,
        weights=resident,
        grads=_tensor_bytes(p.grad for p in trainable),
        optimizer=_tensor_bytes(state),
        saved_activations=None,
        peak=peak,
    )


# Scaled-down LLaMA-13B QLoRA steps (rank 16 on all seven projections, activation checkpointing, micro-batch
# 1 and without): the planner's structure -- 4-bit base, adapters with gradients and AdamW state,
# checkpointed activations, the recomputed block and the dequantised projection -- against a measured step.
QLORA_SHAPE = LlamaConfig(vocab_size=4096, dim=512, n_layers=4, n_heads=4, ffn_hidden=1376, max_seq_len=512)
QLORA_CASES = [
    dict(seq_len=512, micro_batch=1, precision="fp32", checkpointing=True),
    dict(seq_len=512, micro_batch=2, precision="fp32", checkpointing=False),
    dict(seq_len=512, micro_batch=1, precision="bf16", checkpointing=True),
]


def run_qlora_case(case: dict, cfg: LlamaConfig = QLORA_SHAPE) -> dict:
    kw = dict(seq_len=case["seq_len"], micro_batch=case["micro_batch"], checkpointing=case["checkpointing"])
    meas = measure_qlora(cfg, precision=case["precision"], **kw)
    pred = plan.memory(cfg, gpus=1, precision=case["precision"], finetune="qlora", lora_rank=16, **kw)
    return dict(
        case=dict(case, model="13B-shaped", optimizer="adamw"),
        precision=case["precision"],
        n_params_planner=cfg.num_params(),
        n_params_model=meas.n_params,
        weights=(pred.weights + pred.master_weights, meas.weights),
        grads=(pred.grads, meas.grads),
        optimizer=(pred.optimizer, meas.optimizer),
        activations=(pred.activations, None),
        peak=(pred.peak, meas.peak),
    )


def predicted(
    cfg: LlamaConfig,
    *,
    seq_len,
    micro_batch,
    precision="fp32",
    optimizer="adamw",
    checkpointing=False,
    flash_attention=True,
):
    return plan.memory(
        cfg,
        gpus=1,
        seq_len=seq_len,
        micro_batch=micro_batch,
        precision=precision,
        optimizer=optimizer,
        checkpointing=checkpointing,
        flash_attention=flash_attention,
    )


# The CPU calibration cases (also run by tests/test_plan.py): shapes where states, activations and the
# loss each hold a visible share of the peak.
CPU_CASES = [
    dict(model="small", seq_len=256, micro_batch=8, optimizer="adamw", checkpointing=False),
    dict(model="small", seq_len=256, micro_batch=8, optimizer="adamw-fused", checkpointing=True),
    dict(model="wide", seq_len=128, micro_batch=4, optimizer="adamw-fused", checkpointing=False),
    dict(model="wide", seq_len=128, micro_batch=4, optimizer="adamw", checkpointing=True),
    dict(
        model="small",
        seq_len=128,
        micro_batch=4,
        optimizer="adamw-fused",
        checkpointing=False,
        precision="bf16",
    ),
    dict(model="small", seq_len=128, micro_batch=4, optimizer="adamw", checkpointing=True, precision="bf16"),
    # dim 64: per-token temporaries of the backward kernels weigh most here
    dict(model="tiny", seq_len=128, micro_batch=4, optimizer="adamw", checkpointing=False),
    dict(model="tiny", seq_len=128, micro_batch=4, optimizer="adamw-fused", checkpointing=True),
]
EXTRA_SHAPES = {
    # MHA (no GQA), larger dim than vocab share: the weights dominate
    "wide": LlamaConfig(vocab_size=2048, dim=512, n_layers=3, n_heads=8, max_seq_len=128),
}


def config(name: str) -> LlamaConfig:
    return EXTRA_SHAPES[name] if name in EXTRA_SHAPES else LlamaConfig.preset(name)


def run_case(case: dict, device: str = "cpu", precision: str = "fp32") -> dict:
    cfg = config(case["model"])
    precision = case.get("precision", precision)
    kw = {k: case[k] for k in ("seq_len", "micro_batch", "optimizer", "checkpointing")}
    meas = measure(cfg, precision=precision, device=device, **kw)
    pred = predicted(cfg, precision=precision, **kw)
    return dict(
        case=case,
        precision=precision,
        n_params_planner=cfg.num_params(),
        n_params_model=meas.n_params,
        weights=(pred.weights, meas.weights),
        grads=(pred.grads, meas.grads),
        optimizer=(pred.optimizer, meas.optimizer),
        activations=(pred.activations, meas.saved_activations),
        peak=(pred.peak, meas.peak),
    )


def format_row(r: dict) -> str:
    c = r["case"]
    pa, ma = r["activations"]
    pp, mp = r["peak"]
    act = "n/a (ckpt)" if ma is None else f"{pa / 2**20:.1f} / {ma / 2**20:.1f} ({pa / ma - 1:+.1%})"
    return (
        f"| {c['model']} | {r['precision']} | {c['micro_batch']}x{c['seq_len']} | {c['optimizer']} | "
        f"{'yes' if c['checkpointing'] else 'no'} | {r['n_params_planner']:,} = {r['n_params_model']:,} | "
        f"{act} | {pp / 2**20:.1f} / {mp / 2**20:.1f} | {pp / mp - 1:+.2%} |"
    )


HEADER = (
    "| model | precision | batch x seq | optimizer | ckpt | params planner = model | "
    "saved activations MiB plan / measured | peak MiB plan / measured | peak error |\n"
    "|---|---|---|---|---|---|---|---|---|"
)

if __name__ == "__main__":
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    print(HEADER)
    for case in CPU_CASES:
        print(format_row(run_case(case)))
    print(f"\nQLoRA, rank 16, {QLORA_SHAPE}:\n\n{HEADER}")
    for case in QLORA_CASES:
        print(format_row(run_qlora_case(case)))
    print(f"(torch {torch.__version__}; weights, grads and optimizer bytes match exactly: asserted in tests)")
