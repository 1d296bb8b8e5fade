"""tokenmill.train: config, schedules, overfitting, reference losses, exact resume, atomic checkpoints,
FSDP2 over 2 gloo processes vs 1 process, SFT masking, NaN skipping, bad-input errors, HF export."""

import dataclasses
import json
import math
import os
import signal
import socket
import statistics
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from tokenmill import train as T
from tokenmill.checkpoint import latest_checkpoint
from tokenmill.model import Llama, LlamaConfig

ASSETS = Path(__file__).parent / "assets"
REPO = Path(__file__).resolve().parents[1]
V, SEQ = 512, 32


class Batches:
    """An in-memory, checkpointable stand-in for tm.data.DataLoader: cycles through fixed batches."""

    def __init__(self, batches):
        self.batches, self.pos = batches, 0

    def __iter__(self):
        while True:
            b = self.batches[self.pos % len(self.batches)]
            self.pos += 1
            yield b

    def state_dict(self):
        return {"pos": self.pos}

    def load_state_dict(self, s):
        self.pos = s["pos"]


def make_batches(n, batch=4, seq=SEQ, seed=0, vocab=V):
    """Batches of a learnable, noisy "language": each token is the previous one plus 1..3 mod vocab."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        start = torch.randint(0, vocab, (batch, 1), generator=g)
        steps = torch.randint(1, 4, (batch, seq), generator=g)
        x = (start + torch.cat([torch.zeros(batch, 1, dtype=torch.long), steps.cumsum(1)], 1)) % vocab
        out.append({"input_ids": x[:, :-1].contiguous(), "labels": x[:, 1:].contiguous()})
    return out


def config(tmp_path, *overrides):
    base = [
        f"--run.out_dir={tmp_path / 'run'}",
        "--run.device=cpu",
        "--model.preset=tiny",
        f"--data.seq_len={SEQ}",
        "--data.batch_size=4",
        "--train.steps=8",
        "--train.log_every=1",
        "--train.eval_every=0",
        "--train.progress=false",
        "--optim.lr=3e-3",
        "--optim.warmup_steps=2",
    ]
    return T.load_config(None, [*base, *overrides])


def losses(history):
    return [h["loss"] for h in history]


# ---------------------------------------------------------------------------------------------- config


def test_example_config_loads_and_documents_every_key():
    path = REPO / "configs" / "example.toml"
    cfg = T.load_config(str(path))
    text = path.read_text()
    for section in (f.name for f in dataclasses.fields(cfg) if f.name != "model"):
        for key in dataclasses.asdict(getattr(cfg, section)):
            assert f"\n{key} = " in text, f"{section}.{key} missing from configs/example.toml"
    assert cfg.model_config(vocab_size=4096).num_params() > 0


def test_config_errors(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[optim]\nlearning_rate = 1e-3\n")
    with pytest.raises(ValueError, match=r"bad.toml: unknown key optim.learning_rate"):
        T.load_config(str(bad))
    bad.write_text("[optimizer]\nlr = 1e-3\n")
    with pytest.raises(ValueError, match=r"unknown section \[optimizer\]"):
        T.load_config(str(bad))
    with pytest.raises(ValueError, match="train.steps must be int"):
        T.load_config(None, ["--train.steps=ten"])
    with pytest.raises(ValueError, match="unknown key model.hidden"):
        T.load_config(None, ["--model.hidden=3"])
    with pytest.raises(ValueError, match="unknown model preset"):
        T.load_config(None, ["--model.preset=gpt5"])
    with pytest.raises(ValueError, match="divisible"):
        T.load_config(None, ["--model.preset=tiny", "--model.n_heads=3"])
    with pytest.raises(ValueError, match="schedule"):
        T.load_config(None, ["--optim.schedule=linear"])
    with pytest.raises(ValueError, match="adamw8bit with dist.cpu_offload would step on the CPU"):
        T.load_config(None, ["--optim.name=adamw8bit", "--dist.cpu_offload=true"])
    bad.write_text("[optim\n")
    with pytest.raises(ValueError, match="bad.toml"):
        T.load_config(str(bad))


def test_overrides(tmp_path):
    good = tmp_path / "run.toml"
    good.write_text('[optim]\nlr = 1e-3\n[model]\npreset = "tiny"\n[data]\ntrain = "a"\n')
    cfg = T.load_config(
        str(good), ["--optim.lr=2e-3", "--train.steps", "7", "--resume", "auto", "--model.dim=128"]
    )
    assert cfg.optim.lr == 2e-3 and cfg.train.steps == 7 and cfg.checkpoint.resume == "auto"
    assert cfg.data.train == ["a"] and cfg.model_config().dim == 128
    assert T.load_config(None, ["--optim.weight_decay=0"]).optim.weight_decay == 0.0  # int accepted as float


def test_schedules():
    o = T.OptimSection(lr=1.0, min_lr=0.1, warmup_steps=10, schedule="cosine")
    assert T.lr_at(0, o, 100) == pytest.approx(0.1) and T.lr_at(9, o, 100) == pytest.approx(1.0)
    assert T.lr_at(10, o, 100) == pytest.approx(1.0) and T.lr_at(100, o, 100) == pytest.approx(0.1)
    assert T.lr_at(55, o, 100) == pytest.approx(0.55)  # halfway down the cosine
    o.schedule, o.decay_steps = "wsd", 20
    assert [T.lr_at(s, o, 100) for s in (10, 50, 79)] == [1.0, 1.0, 1.0]
    assert T.lr_at(89, o, 100) == pytest.approx(0.55) and T.lr_at(99, o, 100) == pytest.approx(0.1)
    o.schedule = "constant"
    assert T.lr_at(99, o, 100) == 1.0


def test_peak_flops():
    assert T.peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert T.peak_flops("NVIDIA H100 PCIe") == 756e12
    assert T.peak_flops("cpu") is None


# ---------------------------------------------------------------------------------------------- training


def test_tiny_model_overfits_a_batch(tmp_path):
    cfg = config(tmp_path, "--train.steps=60", "--optim.lr=1e-2", "--optim.warmup_steps=5")
    batch = make_batches(1)
    h = T.train(cfg, Batches(batch))
    assert h[0]["loss"] == pytest.approx(math.log(V), abs=0.2)  # starts near uniform
    assert h[-1]["loss"] < 0.25 * h[0]["loss"]
    for key in ("step", "loss", "lr", "grad_norm", "tokens", "tokens_per_s", "tokens_per_s_per_gpu", "mfu"):
        assert key in h[-1]
    lines = [json.loads(ln) for ln in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == list(range(1, 61))
    assert set(lines[-1]) >= {"world_size", "n_params", "seq_len", "gpu"} and lines[-1]["gpu"] == "cpu"
    assert (
        lines[-1]["tokens"] == 60 * 4 * SEQ
        and lines[-1]["n_params"] == LlamaConfig.preset("tiny").num_params()
    )
    assert (tmp_path / "run" / "loss.png").stat().st_size > 1000


def test_mfu_is_the_planners_flop_count_and_the_log_carries_the_shape(tmp_path, monkeypatch):
    """MFU = tokens/s/GPU x (6N + 6 L s d) / peak, the planner's count (N = matmul parameters, written out
    here by hand for the tiny preset); `plan --from-log` reads the shape back instead of guessing it."""
    from tokenmill import plan

    monkeypatch.setattr(T, "peak_flops", lambda name: 1e12)
    T.train(config(tmp_path, "--train.steps=3"), Batches(make_batches(1)))
    recs = [json.loads(ln) for ln in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    rec = recs[-1]
    c = LlamaConfig.preset("tiny")
    d, f, kv = c.dim, c.hidden_dim, c.kv_heads * c.head_dim
    n = (
        c.n_layers * (2 * d * d + 2 * d * kv + 3 * d * f + 2 * d)
        + d
        + (0 if c.tie_embeddings else c.vocab_size * d)
    )
    want = 6 * n + 6 * c.n_layers * SEQ * d
    assert rec["mfu"] == pytest.approx(rec["tokens_per_s_per_gpu"] * want / 1e12, rel=1e-12)
    assert rec["model"] == {
        "dim": d,
        "n_layers": c.n_layers,
        "n_heads": c.n_heads,
        "kv_heads": c.kv_heads,
        "ffn_hidden": f,
        "vocab_size": c.vocab_size,
        "tie": c.tie_embeddings,
    }
    log = plan.read_train_log(tmp_path / "run" / "log.jsonl", warmup=0)
    assert log.shape is not None and plan.shape_of(log.shape) == rec["model"]
    # no conversion: the trainer already counts as the planner does
    assert log.mfu == pytest.approx(statistics.median(r["mfu"] for r in recs))


def test_loss_curve_matches_reference(tmp_path):
    """Fixed seed, fixed data: the losses match tests/assets/trainer_losses.json (regenerate with
    TOKENMILL_UPDATE_ASSETS=1 after a deliberate numerical change, e.g. new kernels)."""
    cfg = config(tmp_path, "--train.steps=10", "--train.grad_accum=2")
    got = losses(T.train(cfg, Batches(make_batches(6))))
    ref_path = ASSETS / "trainer_losses.json"
    if os.environ.get("TOKENMILL_UPDATE_ASSETS"):
        ref_path.write_text(json.dumps({"losses": got}, indent=1) + "\n")
    ref = json.loads(ref_path.read_text())["losses"]
    assert got == pytest.approx(ref, rel=1e-4, abs=1e-5)
    assert got[-1] < got[0] - 0.5


class Interrupt(Exception):
    pass


@pytest.mark.parametrize("optim", ["adamw", "adamw8bit"])
def test_kill_and_resume_equals_uninterrupted(tmp_path, optim):
    data = make_batches(5)
    opts = ["--train.steps=8", f"--optim.name={optim}"]  # tiny's matrices get AdamW8bit's quantised state
    full = losses(T.train(config(tmp_path / "a", *opts), Batches(data)))

    def stop_at_7(step, record):
        if step == 7:
            raise Interrupt

    cfg = config(tmp_path / "b", *opts, "--checkpoint.every=3")
    with pytest.raises(Interrupt):
        T.train(cfg, Batches(data), on_step=stop_at_7)
    ckpts = sorted(p.name for p in (tmp_path / "b" / "run" / "checkpoints").iterdir())
    assert ckpts == ["step_00000003", "step_00000006"]
    cfg.checkpoint.resume = "auto"
    resumed = T.train(cfg, Batches(data))  # a fresh loader: its position comes from the checkpoint
    assert losses(resumed) == full  # bit for bit on CPU
    logged = [
        json.loads(ln)["step"] for ln in (tmp_path / "b" / "run" / "log.jsonl").read_text().splitlines()
    ]
    assert logged == list(range(1, 9))


KILL_SCRIPT = """
import os, signal, sys, torch
sys.path.insert(0, {tests!r})
from test_trainer import Batches, make_batches, config
from tokenmill import train as T
from pathlib import Path
real = torch.save
def dying_save(obj, path, *a, **k):
    real(obj, path, *a, **k)
    if "step_00000004" in str(path) and str(path).endswith("optimizer.pt"):
        os.kill(os.getpid(), signal.SIGKILL)  # mid-save: weights and optimizer written, meta.json not
torch.save = dying_save
T.train(config(Path({tmp!r}), "--checkpoint.every=2"), Batches(make_batches(3)))
"""


def test_kill_during_save_leaves_previous_checkpoint(tmp_path):
    script = KILL_SCRIPT.format(tests=str(Path(__file__).parent), tmp=str(tmp_path))
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]
    root = tmp_path / "run" / "checkpoints"
    assert (root / "step_00000004.tmp").is_dir() and not (root / "step_00000004").exists()
    assert latest_checkpoint(str(tmp_path / "run")) == root / "step_00000002"
    cfg = config(tmp_path, "--checkpoint.every=2", "--resume=auto")
    resumed = T.train(cfg, Batches(make_batches(3)))
    full = T.train(config(tmp_path / "ref"), Batches(make_batches(3)))
    assert losses(resumed) == losses(full)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _fsdp_worker(rank, world, port, tmp, data, init, q, optim="adamw"):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    os.environ["LOCAL_RANK"] = str(rank)
    torch.set_num_threads(1)
    try:
        opts = [
            "--data.batch_size=2",
            f"--train.init_from={init}",
            "--checkpoint.every=3",
            f"--optim.name={optim}",
        ]
        h = T.train(config(Path(tmp), *opts), Batches(data[rank::world]))
        if rank == 0:
            q.put(losses(h))
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.parametrize("optim", ["adamw", pytest.param("adamw8bit", marks=pytest.mark.slow)])
def test_fsdp2_two_gloo_processes_match_one(tmp_path, optim):
    """FSDP2 over 2 processes (each with half of every batch) matches 1 process with whole batches.

    adamw8bit: every 8-bit matrix of the tiny model splits into shards of whole 256-element blocks, so the
    quantisation blocks are those of one process (with equal gradients the update is bit-exact: see
    test_optim.py); only the gradients' summation order differs, and a moment on the boundary between two
    codes can round to the other one. Hence rel 1e-3: by step 8 the losses differ by 2.9e-4, as much as one
    process differs from itself with the batch split into 2 accumulated micro-batches (2.9e-4; torch
    AdamW: 1.2e-7)."""
    init = tmp_path / "init"
    T.train(config(init, "--train.steps=1", "--optim.lr=0", "--optim.min_lr=0"), Batches(make_batches(1)))
    init_ckpt = init / "run" / "checkpoints" / "step_00000001"
    halves = []  # per step: rows 0-1 go to rank 0, rows 2-3 to rank 1
    whole = make_batches(4)
    for b in whole:
        halves += [{k: v[:2] for k, v in b.items()}, {k: v[2:] for k, v in b.items()}]
    cfg = config(tmp_path / "one", f"--train.init_from={init_ckpt}", f"--optim.name={optim}")
    one = losses(T.train(cfg, Batches(whole)))
    ctx = mp.get_context("spawn")
    q = ctx.SimpleQueue()
    mp.start_processes(
        _fsdp_worker,
        args=(2, _free_port(), str(tmp_path / "two"), halves, str(init_ckpt), q, optim),
        nprocs=2,
        start_method="spawn",
    )
    two = q.get()
    assert two == pytest.approx(one, rel=1e-5 if optim == "adamw" else 1e-3)
    # The sharded run's checkpoints are full (unsharded) and load into a single-process model.
    model = Llama.from_checkpoint(tmp_path / "two" / "run" / "checkpoints" / "step_00000008")
    assert model.config == LlamaConfig.preset("tiny")


def _fsdp_resume_worker(rank, world, port, tmp, data):
    """An uninterrupted run (a/) and a run interrupted after step 7 and resumed from its step-6 checkpoint
    (b/), both FSDP2 + AdamW8bit in the same process group."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    os.environ["LOCAL_RANK"] = str(rank)
    torch.set_num_threads(1)
    tmp = Path(tmp)

    def stop_at_7(step, record):
        if step == 7:
            raise Interrupt

    try:
        opts = ["--optim.name=adamw8bit", "--data.batch_size=2", "--optim.grad_clip=0.5"]
        full = T.train(config(tmp / "a", *opts), Batches(data[rank::world]))
        cfg = config(tmp / "b", *opts, "--checkpoint.every=3")
        with pytest.raises(Interrupt):
            T.train(cfg, Batches(data[rank::world]), on_step=stop_at_7)
        cfg.checkpoint.resume = "auto"
        resumed = T.train(cfg, Batches(data[rank::world]))
        if rank == 0:
            (tmp / "losses.json").write_text(json.dumps({"full": losses(full), "resumed": losses(resumed)}))
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_fsdp2_adamw8bit_resume_equals_uninterrupted(tmp_path):
    """FSDP2 + AdamW8bit on 2 gloo processes: the sharded 8-bit state goes through the checkpoint (gathered
    to rank 0, split again on resume) and the resumed run equals the uninterrupted one bit for bit: losses,
    final weights and final optimizer state. A different world size is refused."""
    mp.start_processes(
        _fsdp_resume_worker,
        args=(2, _free_port(), str(tmp_path), make_batches(5)),
        nprocs=2,
        start_method="spawn",
    )
    got = json.loads((tmp_path / "losses.json").read_text())
    assert got["resumed"] == got["full"] and len(got["full"]) == 8
    a, b = (tmp_path / d / "run" / "checkpoints" / "step_00000008" for d in ("a", "b"))
    from safetensors.torch import load_file

    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    oa, ob = (torch.load(d / "optimizer.pt", weights_only=True)["state"] for d in (a, b))
    st = oa[
        "layers.0.feed_forward.w1.weight"
    ]  # sharded 8-bit state, saved whole: codes [256, 64], absmax [2, 32]
    assert st["step"] == 8 and st["state1"].dtype == torch.uint8 and st["state1"].shape == (256, 64)
    assert st["absmax2"].shape == (2, 32) and st["absmax2"].min() > 0
    assert oa.keys() == ob.keys()
    for name in oa:
        for k, v in oa[name].items():
            assert torch.equal(v, ob[name][k]) if isinstance(v, torch.Tensor) else v == ob[name][k], (name, k)
    cfg = config(tmp_path / "b", "--optim.name=adamw8bit", "--resume=auto")
    with pytest.raises(
        ValueError, match="saved by 2 processes, resumed with 1 .*cannot be re-sharded exactly"
    ):
        T.train(cfg, Batches(make_batches(5)))


# ---------------------------------------------------------------------------------------------- SFT


def _sft_rows(other_prompt):
    """Row 0 packs [doc B: a prompt whose response was cut off][doc A: prompt + response]; row 1 is one
    prompt + response. Labels are -100 on prompts, as the loader's instruction data has them."""
    g = torch.Generator().manual_seed(3)
    a_prompt, a_resp = torch.randint(0, V, (10,), generator=g), torch.randint(0, V, (8,), generator=g)
    c_prompt, c_resp = torch.randint(0, V, (20,), generator=g), torch.randint(0, V, (12,), generator=g)
    row0 = torch.cat([other_prompt, a_prompt, a_resp])
    row1 = torch.cat([c_prompt, c_resp])
    ids = torch.stack([row0, row1])
    labels = torch.full_like(ids, -100)
    nb = len(other_prompt)
    labels[0, nb + 9 : nb + 17] = a_resp  # the last prompt token predicts the first response token
    labels[1, 19:31] = c_resp
    pos = torch.stack([torch.cat([torch.arange(nb), torch.arange(32 - nb)]), torch.arange(32)])
    return {"input_ids": ids, "labels": labels, "position_ids": pos}


def test_sft_loss_ignores_prompts(tmp_path):
    init = tmp_path / "init"
    T.train(config(init, "--train.steps=2"), Batches(make_batches(2)))
    ckpt = init / "run" / "checkpoints" / "step_00000002"
    g = torch.Generator().manual_seed(9)
    runs = []
    for i in range(2):
        batch = _sft_rows(torch.randint(0, V, (14,), generator=g))
        cfg = config(tmp_path / f"sft{i}", "--data.sft=true", f"--train.init_from={ckpt}", "--train.steps=3")
        runs.append(losses(T.train(cfg, Batches([batch]))))
    assert runs[0] == runs[1]  # doc B's prompt changed; nothing that is scored can see it
    # The first loss is the mean cross-entropy over response tokens only, from the full logits in float64.
    model = Llama.from_checkpoint(ckpt).double()
    b = _sft_rows(torch.randint(0, V, (14,), generator=g))
    with torch.no_grad():
        logits = model(b["input_ids"], position_ids=b["position_ids"])
    ref = torch.nn.functional.cross_entropy(logits.reshape(-1, V), b["labels"].reshape(-1), ignore_index=-100)
    assert runs[0][0] == pytest.approx(float(ref), rel=1e-5)


def test_sft_needs_init_from(tmp_path):
    with pytest.raises(ValueError, match="init_from"):
        T.train(config(tmp_path, "--data.sft=true"), Batches(make_batches(1)))


# ---------------------------------------------------------------------------------------------- bad input


def test_nan_steps_skipped_then_abort(tmp_path):
    poisoned = {"on": False}

    def hook(module, args, out):
        if isinstance(module, torch.nn.Embedding) and poisoned["on"]:
            return out * float("nan")
        return None

    class Poison(Batches):
        def __iter__(self):
            for i, b in enumerate(super().__iter__()):
                poisoned["on"] = i in self.bad
                yield b

    handle = torch.nn.modules.module.register_module_forward_hook(hook)
    try:
        data = Poison(make_batches(3))
        data.bad = {2}
        h = T.train(config(tmp_path / "a", "--train.steps=5"), data)
        assert math.isnan(h[2]["loss"]) and all(math.isfinite(x["loss"]) for i, x in enumerate(h) if i != 2)
        assert h[-1]["loss"] < h[0]["loss"]
        data = Poison(make_batches(3))
        data.bad = set(range(2, 100))
        with pytest.raises(T.BadLossError, match="3 steps with a non-finite loss"):
            T.train(config(tmp_path / "b", "--train.steps=20", "--train.max_bad_steps=2"), data)
    finally:
        handle.remove()


def test_token_id_beyond_vocab_fails_before_any_step(tmp_path):
    data = make_batches(1, vocab=600)
    called = []
    with pytest.raises(ValueError, match=r"token id \d+ >= model.vocab_size 512"):
        T.train(config(tmp_path), Batches(data), on_step=lambda s, r: called.append(s))
    data = make_batches(1)
    data[0]["input_ids"][1, 3] = -3  # what a signed Megatron file can hold: not an IndexError mid-step
    with pytest.raises(ValueError, match=r"token id -3 is negative"):
        T.train(config(tmp_path / "neg"), Batches(data), on_step=lambda s, r: called.append(s))
    assert not called


def test_checkpoint_from_another_shape(tmp_path):
    T.train(config(tmp_path, "--train.steps=1"), Batches(make_batches(1)))
    ckpt = tmp_path / "run" / "checkpoints" / "step_00000001"
    with pytest.raises(ValueError, match=r"another model shape.*'dim': \(64, 128\)"):
        T.train(config(tmp_path, "--model.dim=128", "--resume=auto"), Batches(make_batches(1)))
    with pytest.raises(
        ValueError, match=r"model\.n_layers = 3 conflicts with .*meta\.json \(n_layers = 2 there\)"
    ):
        T.train(
            config(tmp_path / "x", "--model.n_layers=3", f"--train.init_from={ckpt}"),
            Batches(make_batches(1)),
        )


def test_init_from_checkpoint_takes_its_shape(tmp_path):
    """train.init_from naming a tokenmill checkpoint: the model shape comes from its meta.json, as for a
    Hugging Face folder; [model] keys must agree or be absent, a preset agrees when it is that shape."""
    T.train(config(tmp_path / "a", "--model.n_layers=3", "--train.steps=1"), Batches(make_batches(1)))
    start = tmp_path / "a" / "run" / "checkpoints" / "step_00000001"
    shape = json.loads((start / "meta.json").read_text())["model"]
    assert shape["n_layers"] == 3

    def bare(tmp, *overrides):  # config() without its [model] keys
        cfg = config(tmp, f"--train.init_from={start}", *overrides)
        del cfg.model["preset"]
        return cfg

    # No [model] keys: the checkpoint's shape and weights; step 1's loss is the checkpoint model's (float64).
    data = make_batches(2, seed=5)
    history = T.train(bare(tmp_path / "b", "--train.steps=2", "--checkpoint.every=1"), Batches(data))
    with torch.no_grad():
        logits = Llama.from_checkpoint(start)(data[0]["input_ids"]).double()
    expect = torch.nn.functional.cross_entropy(logits.reshape(-1, V), data[0]["labels"].reshape(-1))
    assert abs(losses(history)[0] - expect.item()) <= 1e-4
    own = tmp_path / "b" / "run" / "checkpoints" / "step_00000002"
    assert json.loads((own / "meta.json").read_text())["model"] == shape

    # A full run resumes from its own checkpoint (same shape) without the folder it started from.
    start.rename(tmp_path / "gone")
    T.train(bare(tmp_path / "b", "--train.steps=3", "--resume=auto"), Batches(data))
    assert latest_checkpoint(str(tmp_path / "b" / "run")).name == "step_00000003"
    (tmp_path / "gone").rename(start)

    # Keys that agree, and a preset that (with them) is the shape: the old way of spelling it still works.
    T.train(
        config(tmp_path / "c", "--model.n_layers=3", f"--train.init_from={start}", "--train.steps=1"),
        Batches(data),
    )
    called = []
    for cfg, match in (
        (
            bare(tmp_path / "d", "--model.n_layers=2"),
            r"model\.n_layers = 2 conflicts with .*meta\.json \(n_layers = 3 there\)",
        ),
        (bare(tmp_path / "e", "--model.n_heads=8"), r"model\.n_heads = 8 conflicts"),
        (
            config(tmp_path / "f", f"--train.init_from={start}"),
            r"model\.preset = 'tiny' conflicts with .*meta\.json",
        ),
    ):
        with pytest.raises(ValueError, match=match):
            T.train(cfg, Batches(data), on_step=lambda s, r: called.append(s))
    assert not called
    assert not any((tmp_path / d / "run" / "checkpoints").exists() for d in "def")


# ---------------------------------------------------------------------------------------------- export


def test_export_hf_logits_match(tmp_path):
    transformers = pytest.importorskip("transformers")
    T.train(config(tmp_path, "--train.steps=2"), Batches(make_batches(2)))
    ckpt = tmp_path / "run" / "checkpoints" / "step_00000002"
    from tokenmill import cli

    assert cli.main(["export-hf", str(ckpt), str(tmp_path / "hf")]) == 0
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "hf", torch_dtype=torch.float32).eval()
    ours = Llama.from_checkpoint(ckpt).eval()
    ids = torch.randint(0, V, (2, 24))
    with torch.no_grad():
        a, b = ours(ids), hf(ids).logits
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert a.abs().max() > 0.1  # trained weights, not an all-zero model
    # packed documents: our position_ids/document masks against HF run on each document alone
    pos = torch.cat([torch.arange(10), torch.arange(14)])[None]
    with torch.no_grad():
        packed = ours(ids[:1], position_ids=pos)
        torch.testing.assert_close(packed[:, 10:], hf(ids[:1, 10:]).logits, rtol=1e-4, atol=1e-5)


def test_cli_train_errors(tmp_path):
    (tmp_path / "c.toml").write_text("[train]\nsteps = 2\nbogus = 1\n")
    r = subprocess.run(
        [sys.executable, "-m", "tokenmill", "train", str(tmp_path / "c.toml")], capture_output=True, text=True
    )
    assert r.returncode == 1 and "unknown key train.bogus" in r.stderr


def test_empty_data_is_an_error(tmp_path):
    text = textwrap.dedent(
        """
        [run]
        out_dir = "x"
        [data]
        train = []
        """
    )
    (tmp_path / "c.toml").write_text(text)
    with pytest.raises(ValueError, match="data.train is empty"):
        T.main(str(tmp_path / "c.toml"), ["--run.device=cpu"])


# ---------------------------------------------------------------------------------------------- with the real pipeline
# Tokenizer (tm.Tokenizer), token files (tm.data.prepare / write_token_file) and tm.data.DataLoader.


def _token_files(tmp_path, n_docs=40, vocab=V):
    from tokenmill.data.dataset import write_token_file

    g = torch.Generator().manual_seed(5)
    for split, n in (("train", n_docs), ("val", 8)):
        docs = []
        for _ in range(n):
            length = int(torch.randint(10, 90, (1,), generator=g))
            start = torch.randint(0, vocab, (1,), generator=g)
            docs.append(((start + torch.randint(1, 4, (length,), generator=g).cumsum(0)) % vocab).tolist())
        write_token_file(tmp_path / split, docs, vocab_size=vocab)
    return [f"--data.train=['{tmp_path / 'train'}']", f"--data.val=['{tmp_path / 'val'}']"]


def test_resume_with_the_data_loader(tmp_path):
    """Through tm.data.DataLoader (packed documents, document masks): exact resume, loader position included."""
    data = _token_files(tmp_path)
    opts = [*data, "--train.steps=6", "--train.eval_every=3", "--train.eval_batches=2"]
    full = T.train(config(tmp_path / "a", *opts))
    cfg = config(tmp_path / "b", *opts, "--checkpoint.every=2")

    def stop(step, record):
        if step == 5:
            raise Interrupt

    with pytest.raises(Interrupt):
        T.train(cfg, on_step=stop)
    cfg.checkpoint.resume = "auto"
    resumed = T.train(cfg)
    assert losses(resumed) == losses(full)
    assert [h.get("val_loss") for h in resumed] == [h.get("val_loss") for h in full]


def test_cli_train_and_export_with_tokenizer(tmp_path):
    """`tokenmill train` on prepared files with a trained tokenizer, then `tokenmill export-hf`: the folder
    loads in transformers with PreTrainedTokenizerFast, which encodes as our tokenizer does."""
    transformers = pytest.importorskip("transformers")
    import tokenmill as tm

    texts = [f"def f{i}(x):\n    return x * {i} + {i % 7}\n" for i in range(300)]
    tok = tm.Tokenizer.train(
        texts, vocab_size=300, pattern="gpt2", special_tokens=["<|endoftext|>"], show_progress=False
    )
    tok.save(str(tmp_path / "tok.json"))
    (tmp_path / "code.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    tm.data.prepare([str(tmp_path / "code.jsonl")], str(tmp_path / "code"), str(tmp_path / "tok.json"))
    toml = tmp_path / "run.toml"
    toml.write_text(
        f'[run]\nout_dir = "{tmp_path / "run"}"\ndevice = "cpu"\n[model]\npreset = "tiny"\n'
        f'[data]\ntrain = ["{tmp_path / "code"}"]\ntokenizer = "{tmp_path / "tok.json"}"\nseq_len = 32\n'
        "batch_size = 4\n[train]\nsteps = 3\nprogress = false\n[optim]\nwarmup_steps = 1\n"
    )
    r = subprocess.run(
        [sys.executable, "-m", "tokenmill", "train", str(toml)], capture_output=True, text=True
    )
    assert r.returncode == 0, r.stderr[-2000:]
    ckpt = latest_checkpoint(str(tmp_path / "run"))
    meta = json.loads((ckpt / "meta.json").read_text())
    assert (
        LlamaConfig.from_dict(meta["model"]).vocab_size == tok.n_vocab
    )  # the model takes the tokenizer's size
    r = subprocess.run(
        [sys.executable, "-m", "tokenmill", "export-hf", str(ckpt), str(tmp_path / "hf")],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    hf_tok = transformers.PreTrainedTokenizerFast.from_pretrained(tmp_path / "hf")
    sample = "def f12(x):\n    return x * 12 + 5\n"
    assert hf_tok.encode(sample, add_special_tokens=False) == tok.encode(sample)
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "hf", torch_dtype=torch.float32).eval()
    ids = torch.tensor([tok.encode(sample)])
    with torch.no_grad():
        torch.testing.assert_close(Llama.from_checkpoint(ckpt)(ids), hf(ids).logits, rtol=1e-4, atol=1e-5)


def test_tokenizer_and_vocab_mismatch_fail_before_any_step(tmp_path):
    import tokenmill as tm

    texts = [f"value_{i} = {i * 3} + {i % 11}\n" for i in range(400)]
    toks = {}
    for name, size in (("a", 300), ("b", 290)):
        toks[name] = tm.Tokenizer.train(
            texts, vocab_size=size, pattern="gpt2", special_tokens=["<|endoftext|>"], show_progress=False
        )
        toks[name].save(str(tmp_path / f"{name}.json"))
    n_a = toks["a"].n_vocab
    assert n_a > 256 and toks["b"].n_vocab < n_a
    (tmp_path / "t.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    tm.data.prepare([str(tmp_path / "t.jsonl")], str(tmp_path / "data"), str(tmp_path / "a.json"))
    called = []
    base = [f"--data.train=['{tmp_path / 'data'}']"]
    with pytest.raises(ValueError, match="tokenized with another tokenizer"):
        T.train(
            config(tmp_path, *base, f"--data.tokenizer={tmp_path / 'b.json'}", "--model.vocab_size=512"),
            on_step=lambda s, r: called.append(s),
        )
    with pytest.raises(ValueError, match=rf"{n_a}-token vocabulary but model.vocab_size is 256"):
        T.train(config(tmp_path, *base, "--model.vocab_size=256"), on_step=lambda s, r: called.append(s))
    with pytest.raises(ValueError, match=rf"has {n_a} tokens but model.vocab_size is 256"):
        T.train(config(tmp_path, *base, f"--data.tokenizer={tmp_path / 'a.json'}", "--model.vocab_size=256"))
    # the matching tokenizer trains
    T.train(config(tmp_path, *base, f"--data.tokenizer={tmp_path / 'a.json'}", "--train.steps=1"))
    assert not called


def test_sft_end_to_end_with_prepare_sft(tmp_path):
    """Pre-train on plain text, then instruction-tune from that checkpoint on tm.data.prepare_sft data: the
    batches carry -100 on every prompt token, and the response loss falls."""
    import tokenmill as tm

    qa = [(f"What is {i} plus {i}?", f"{2 * i}") for i in range(60)]
    texts = [f"Instruction: {q}\nResponse: {a}\n" for q, a in qa]
    tok = tm.Tokenizer.train(
        texts, vocab_size=320, pattern="gpt2", special_tokens=["<|endoftext|>"], show_progress=False
    )
    tok.save(str(tmp_path / "tok.json"))
    (tmp_path / "plain.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    tm.data.prepare([str(tmp_path / "plain.jsonl")], str(tmp_path / "plain"), str(tmp_path / "tok.json"))
    (tmp_path / "sft.jsonl").write_text(
        "".join(json.dumps({"instruction": q, "output": a}) + "\n" for q, a in qa)
    )
    tm.data.prepare_sft(str(tmp_path / "sft.jsonl"), str(tmp_path / "sft"), tok)
    tokf = f"--data.tokenizer={tmp_path / 'tok.json'}"
    T.train(config(tmp_path / "pre", f"--data.train=['{tmp_path / 'plain'}']", tokf, "--train.steps=4"))
    ckpt = latest_checkpoint(str(tmp_path / "pre" / "run"))
    loader = tm.data.DataLoader(str(tmp_path / "sft"), seq_len=128, batch_size=4, packing="best_fit", seed=1)
    batch = next(iter(loader))
    labelled = batch["labels"] != -100
    assert 0 < labelled.float().mean() < 0.2  # only the short responses (and their EOS) carry a loss
    sft_opts = [f"--data.train=['{tmp_path / 'sft'}']", tokf, "--data.sft=true", "--data.packing=best_fit"]
    sft_opts += ["--data.seq_len=128", "--data.batch_size=2"]  # one Alpaca record (~115 tokens) per row
    h = T.train(config(tmp_path / "sft", *sft_opts, f"--train.init_from={ckpt}", "--train.steps=12"))
    assert h[-1]["loss"] < h[0]["loss"]
    # The checkpoint records the template its data used (export-hf writes it as the chat_template).
    meta = json.loads((Path(latest_checkpoint(str(tmp_path / "sft" / "run"))) / "meta.json").read_text())
    assert meta["chat_template"] == "alpaca"
    assert json.loads((Path(ckpt) / "meta.json").read_text())["chat_template"] is None


def test_batch_without_labels_is_skipped_not_counted(tmp_path):
    data = make_batches(3)
    data[1] = {"input_ids": data[1]["input_ids"], "labels": torch.full_like(data[1]["labels"], -100)}
    h = T.train(config(tmp_path, "--train.steps=4", "--train.max_bad_steps=0"), Batches(data))
    assert math.isnan(h[1]["loss"]) and h[1]["grad_norm"] == 0.0
    assert all(math.isfinite(r["loss"]) for i, r in enumerate(h) if i != 1)
