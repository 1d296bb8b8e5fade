"""LoRA (tokenmill.lora, [lora] in the trainer, export-hf --adapter/--merge) against peft and transformers:
a tiny random transformers LlamaForCausalLM is the base; adapters trained by the tokenmill trainer load in
peft.PeftModel with the same logits, the merged folder loads in transformers with the same logits, resume is
exact, FSDP2 over 2 gloo processes equals 1 process, and bad inputs fail before any work."""

import json
import math
import os
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from conftest import save_hf_llama
from tokenmill import cli, hf
from tokenmill import train as T
from tokenmill.lora import LoraLinear, adapter_state_dict
from tokenmill.model import Llama, LlamaConfig, apply_lora, merge_lora

sys.path.insert(0, str(Path(__file__).parent))
from test_trainer import (  # noqa: E402
    SEQ,
    Batches,
    Interrupt,
    V,
    _free_port,
    _sft_rows,
    config,
    losses,
    make_batches,
)

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

ALL = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")
TINY = LlamaConfig(vocab_size=V, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=96, max_seq_len=128)


def hf_to_checkpoint(hf_dir: Path, out: Path) -> Path:
    """A transformers save_pretrained folder as a tokenmill checkpoint, by export-hf's name map in reverse
    (a local stand-in for `tokenmill import-hf`)."""
    from safetensors.torch import load_file, save_file

    c = json.loads((hf_dir / "config.json").read_text())
    cfg = LlamaConfig(
        vocab_size=c["vocab_size"],
        dim=c["hidden_size"],
        n_layers=c["num_hidden_layers"],
        n_heads=c["num_attention_heads"],
        n_kv_heads=c["num_key_value_heads"],
        ffn_hidden=c["intermediate_size"],
        norm_eps=c["rms_norm_eps"],
        rope_theta=c.get("rope_theta", (c.get("rope_parameters") or {}).get("rope_theta", 10000.0)),
        max_seq_len=c["max_position_embeddings"],
        tie_embeddings=c["tie_word_embeddings"],
    )
    theirs = load_file(str(hf_dir / "model.safetensors"))
    ours = {k: theirs[hf.hf_name(k)] for k in Llama(cfg).state_dict()}
    out.mkdir(parents=True)
    save_file(ours, str(out / "model.safetensors"))
    (out / "meta.json").write_text(json.dumps({"step": 0, "model": cfg.to_dict()}))
    return out


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """(HF folder, tokenmill checkpoint) of one tiny random LlamaForCausalLM (GQA, untied)."""
    root = tmp_path_factory.mktemp("base")
    save_hf_llama(root / "hf", vocab_size=V, rms_norm_eps=1e-6, tie_word_embeddings=False)
    ckpt = hf_to_checkpoint(root / "hf", root / "ckpt")
    ids = torch.randint(0, V, (2, 20))
    hf_model = transformers.LlamaForCausalLM.from_pretrained(root / "hf", dtype=torch.float32).eval()
    with torch.no_grad():  # the stand-in import is right before anything is built on it
        torch.testing.assert_close(
            Llama.from_checkpoint(ckpt).eval()(ids), hf_model(ids).logits, rtol=0, atol=1e-4
        )
    return root / "hf", ckpt


def lora_config(tmp, ckpt, *extra):
    return config(
        tmp,
        "--model.ffn_hidden=96",
        f"--train.init_from={ckpt}",
        "--lora.rank=4",
        "--lora.alpha=8",
        "--optim.lr=1e-2",
        *extra,
    )


def hf_logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


# ---------------------------------------------------------------------------------------------- the module


def test_lora_linear_is_the_formula():
    torch.manual_seed(1)
    base = torch.nn.Linear(48, 24, bias=False)
    m = LoraLinear(base, rank=8, alpha=32, dropout=0.0)
    x = torch.randn(3, 5, 48)
    assert torch.equal(m(x), base(x))  # B starts at zero: the adapted layer starts as its base
    bound = 1 / math.sqrt(48)  # kaiming_uniform(a=sqrt 5) on [rank, in], PEFT's init of lora_A
    assert m.lora_A.weight.abs().max() <= bound and m.lora_A.weight.abs().max() > 0.8 * bound
    assert float(m.lora_A.weight.detach().std()) == pytest.approx(bound / math.sqrt(3), rel=0.15)
    with torch.no_grad():
        m.lora_B.weight.normal_()
    x64 = x.double()
    ref = x64 @ base.weight.double().T + (x64 @ m.lora_A.weight.double().T @ m.lora_B.weight.double().T) * 4.0
    torch.testing.assert_close(m(x).double(), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(
        m.merged_weight().double(),
        base.weight.double() + 4.0 * m.lora_B.weight.double() @ m.lora_A.weight.double(),
        rtol=1e-6,
        atol=1e-6,
    )
    m.train()
    drop = LoraLinear(torch.nn.Linear(48, 24, bias=False), rank=8, alpha=8, dropout=0.5)
    with torch.no_grad():
        drop.lora_B.weight.normal_()
    drop.train()
    assert not torch.equal(drop(x), drop(x))  # dropout on the adapter input in training
    drop.eval()
    assert torch.equal(drop(x), drop(x))


def test_apply_lora_freezes_all_but_adapters_and_trains_only_them():
    torch.manual_seed(2)
    model = Llama(TINY)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ids = torch.randint(0, V, (2, 16))
    with torch.no_grad():
        ref = model(ids)
    assert apply_lora(model, rank=4, alpha=8, targets=("wq", "wv", "w2")) is model
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    want = sorted(
        f"layers.{i}.{o}.{t}.lora_{ab}.weight"
        for i in range(2)
        for o, t in (("attention", "wq"), ("attention", "wv"), ("feed_forward", "w2"))
        for ab in "AB"
    )
    assert trainable == want
    assert model.layers[0].attention.wq.lora_A.weight.shape == (4, 64)
    assert model.layers[0].feed_forward.w2.lora_B.weight.shape == (64, 4)
    with torch.no_grad():
        torch.testing.assert_close(model(ids), ref, rtol=0, atol=0)  # B = 0: unchanged output
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        loss = model(ids, ids)
        loss.backward()
        assert all((p.grad is None) != p.requires_grad for p in model.parameters())
        opt.step()
        opt.zero_grad()
    after = model.state_dict()
    for k, v in before.items():  # the frozen base, under its adapted name where wrapped
        k2 = k if k in after else k.replace(".weight", ".base.weight")
        assert torch.equal(after[k2], v), k
    assert all(model.layers[i].attention.wq.lora_B.weight.abs().max() > 0 for i in range(2))


def test_merge_lora_gives_the_same_function():
    torch.manual_seed(3)
    model = apply_lora(Llama(TINY), rank=4, alpha=16)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    ids = torch.randint(0, V, (2, 16))
    with torch.no_grad():
        adapted = model(ids)
        wq = model.layers[1].attention.wq
        want = wq.base.weight.double() + 4.0 * wq.lora_B.weight.double() @ wq.lora_A.weight.double()
        merged = merge_lora(model)
        assert not any(isinstance(m, LoraLinear) for m in merged.modules())
        assert set(merged.state_dict()) == set(Llama(TINY).state_dict())
        torch.testing.assert_close(merged.layers[1].attention.wq.weight.double(), want, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(merged(ids), adapted, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "kw, match",
    [
        (
            {"targets": ("wq", "q_proj")},
            r"lora target 'q_proj' does not exist; valid targets: wq, wk, wv, wo, w1, w2, w3 "
            r"\(q_proj is the Hugging Face name of wq\)",
        ),
        ({"targets": ("gate_proj",)}, r"\(gate_proj is the Hugging Face name of w1\)"),
        ({"targets": ("down_proj",)}, r"\(down_proj is the Hugging Face name of w2\)"),
        (
            {"targets": ("wz",)},
            r"lora target 'wz' does not exist; valid targets: wq, wk, wv, wo, w1, w2, w3$",
        ),
        ({"targets": ()}, "non-empty"),
        ({"rank": 0}, "rank must be a positive integer, got 0"),
        ({"rank": -2}, "rank must be a positive integer, got -2"),
        ({"dropout": 1.0}, r"dropout must be in \[0, 1\), got 1.0"),
        ({"dropout": -0.1}, r"dropout must be in \[0, 1\)"),
        ({"base_dtype": "int8"}, "base_dtype"),
    ],
)
def test_apply_lora_bad_input_changes_nothing(kw, match):
    model = Llama(TINY)
    names = set(model.state_dict())
    with pytest.raises(ValueError, match=match):
        apply_lora(model, **kw)
    assert set(model.state_dict()) == names and all(p.requires_grad for p in model.parameters())


def test_apply_lora_twice_is_an_error():
    model = apply_lora(Llama(TINY), rank=2)
    with pytest.raises(ValueError, match="already has LoRA adapters"):
        apply_lora(model, rank=2)


# ---------------------------------------------------------------------------------------------- trainer + PEFT


def test_trained_adapter_exports_to_peft_and_merged_hf(tmp_path, base):
    hf_dir, base_ckpt = base
    h = T.train(lora_config(tmp_path, base_ckpt, "--train.steps=6"), Batches(make_batches(3)))
    assert h[-1]["loss"] < h[0]["loss"]
    ckpt = tmp_path / "run" / "checkpoints" / "step_00000006"
    meta = json.loads((ckpt / "meta.json").read_text())
    assert meta["lora"] == {"rank": 4, "alpha": 8.0, "dropout": 0.0, "targets": list(ALL), "base_dtype": ""}
    assert meta["base"] == str(base_ckpt.resolve())
    # Adapters alone: 2 layers x 7 projections x (A, B); the optimizer holds their state and nothing else.
    from safetensors.torch import load_file

    adapters = load_file(str(ckpt / "model.safetensors"))
    assert len(adapters) == 28 and all(".lora_" in k for k in adapters)
    assert (ckpt / "model.safetensors").stat().st_size * 10 < (base_ckpt / "model.safetensors").stat().st_size
    osd = torch.load(ckpt / "optimizer.pt", weights_only=True)
    assert (
        sorted(osd["state"]) == sorted(adapters)
        and osd["state"]["layers.0.attention.wq.lora_A.weight"]["step"] == 6
    )
    assert all(adapters[f"layers.{i}.feed_forward.w2.lora_B.weight"].abs().max() > 1e-3 for i in range(2))

    ids = torch.randint(0, V, (2, 24))
    adapted = Llama.from_checkpoint(ckpt, merge=False).eval()
    assert isinstance(adapted.layers[0].attention.wq, LoraLinear)
    merged = Llama.from_checkpoint(ckpt).eval()
    with torch.no_grad():
        ours, ours_merged = adapted(ids), merged(ids)
    hf_base = transformers.LlamaForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    base_logits = hf_logits(hf_base, ids)
    assert (ours - base_logits).abs().max() > 1e-2  # the adapters changed the model

    assert (
        cli.main(["export-hf", str(ckpt), str(tmp_path / "adapter"), "--adapter", f"--base-model={hf_dir}"])
        == 0
    )
    assert sorted(p.name for p in (tmp_path / "adapter").iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    acfg = peft.LoraConfig.from_pretrained(tmp_path / "adapter")
    assert (acfg.peft_type, acfg.task_type, acfg.r, acfg.lora_alpha) == (
        peft.PeftType.LORA,
        "CAUSAL_LM",
        4,
        8,
    )
    assert set(acfg.target_modules) == {
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    }
    assert acfg.base_model_name_or_path == str(hf_dir)
    keys = set(load_file(str(tmp_path / "adapter" / "adapter_model.safetensors")))
    assert "base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight" in keys and len(keys) == 28
    peft_model = peft.PeftModel.from_pretrained(hf_base, tmp_path / "adapter").eval()
    theirs = hf_logits(peft_model, ids)
    assert (ours - theirs).abs().max() <= 1e-4
    assert (ours_merged - theirs).abs().max() <= 1e-4

    assert cli.main(["export-hf", str(ckpt), str(tmp_path / "merged"), "--merge"]) == 0
    hf_merged = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    assert (hf_logits(hf_merged, ids) - theirs).abs().max() <= 1e-4


def test_export_refuses_ambiguous_or_mismatched_adapters(tmp_path, base):
    _, base_ckpt = base
    T.train(lora_config(tmp_path, base_ckpt, "--train.steps=1"), Batches(make_batches(1)))
    ckpt = tmp_path / "run" / "checkpoints" / "step_00000001"
    out = tmp_path / "out"
    with pytest.raises(ValueError, match="LoRA adapter checkpoint .*--adapter .*or --merge"):
        hf.export(ckpt, out)
    with pytest.raises(ValueError, match="exclude each other"):
        hf.export(ckpt, out, adapter=True, merge=True)
    with pytest.raises(ValueError, match="full checkpoint, not LoRA adapters"):
        hf.export(base_ckpt, out, adapter=True)
    # adapters of another base shape: the meta says dim 128, the tensors are dim 64
    bad = tmp_path / "bad"
    bad.mkdir()
    meta = json.loads((ckpt / "meta.json").read_text())
    meta["model"]["dim"] = 128
    (bad / "meta.json").write_text(json.dumps(meta))
    (bad / "model.safetensors").write_bytes((ckpt / "model.safetensors").read_bytes())
    for kw in ({"adapter": True}, {"merge": True}):
        with pytest.raises(
            ValueError, match=r"adapter tensor layers.0.attention.wq.lora_A.weight is \(4, 64\), .*\(4, 128\)"
        ):
            hf.export(bad, out, **kw)
    # adapters whose recorded base is of another shape: caught when the base is loaded, before writing
    other = tmp_path / "other"
    T.train(config(other, "--model.dim=128", "--train.steps=1"), Batches(make_batches(1)))
    meta = json.loads((ckpt / "meta.json").read_text())
    meta["base"] = str(other / "run" / "checkpoints" / "step_00000001")
    (bad / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="another model shape than its base"):
        hf.export(bad, out, merge=True)
    assert not out.exists() and not (tmp_path / "out.tmp").exists()
    r = os.system(f"{sys.executable} -m tokenmill export-hf {ckpt} {out} 2>{tmp_path / 'err'}")
    assert r != 0 and "--adapter" in (tmp_path / "err").read_text() and not out.exists()
    # OUT naming an existing folder (here the HF base itself, a slip of the command line) is refused before any
    # work: export-hf never replaces a folder
    hf_dir, _ = base
    before = {p.name: p.stat().st_mtime_ns for p in hf_dir.iterdir()}
    for kw in ({"adapter": True}, {"merge": True}):
        with pytest.raises(FileExistsError, match=f"{hf_dir}: already exists"):
            hf.export(ckpt, hf_dir, **kw)
    assert {p.name: p.stat().st_mtime_ns for p in hf_dir.iterdir()} == before


def test_lora_resume_equals_uninterrupted(tmp_path, base):
    _, base_ckpt = base
    data = make_batches(5)
    opts = [
        "--train.steps=8",
        "--lora.dropout=0.1",
        "--lora.targets=['wq','wv','w1']",
    ]  # dropout: RNG resumed too
    full = losses(T.train(lora_config(tmp_path / "a", base_ckpt, *opts), Batches(data)))
    cfg = lora_config(tmp_path / "b", base_ckpt, *opts, "--checkpoint.every=3")

    def stop_at_7(step, record):
        if step == 7:
            raise Interrupt

    with pytest.raises(Interrupt):
        T.train(cfg, Batches(data), on_step=stop_at_7)
    cfg.checkpoint.resume = "auto"
    assert losses(T.train(cfg, Batches(data))) == full
    from safetensors.torch import load_file

    a, b = (tmp_path / d / "run" / "checkpoints" / "step_00000008" for d in ("a", "b"))
    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert wa.keys() == wb.keys() and len(wa) == 12 and all(torch.equal(wa[k], wb[k]) for k in wa)
    oa, ob = (torch.load(d / "optimizer.pt", weights_only=True)["state"] for d in (a, b))
    assert all(torch.equal(oa[k]["exp_avg"], ob[k]["exp_avg"]) for k in oa)

    # resuming these adapters with other settings or another base is refused before any step
    cfg.train.steps = 10
    import shutil

    other_base = shutil.copytree(base_ckpt, tmp_path / "same_weights_elsewhere")
    for override, match in (
        ("--lora.rank=8", r"other \[lora\] settings.*'rank': \(4, 8\)"),
        ("--lora.rank=0", "a LoRA adapter checkpoint but lora.rank = 0"),
        (f"--train.init_from={other_base}", "adapters of base"),
    ):
        bad = lora_config(tmp_path / "b", base_ckpt, *opts, override, "--resume=auto")
        with pytest.raises(ValueError, match=match):
            T.train(bad, Batches(data), on_step=lambda s, r: pytest.fail("stepped"))


def test_lora_sft_masks_and_activation_checkpointing(tmp_path, base):
    """SFT rows (loss on responses only, packed documents): a prompt the scored tokens cannot see changes
    nothing; the first loss is the base model's masked cross-entropy (B = 0) in float64; activation
    checkpointing gives the same losses."""
    _, base_ckpt = base
    g = torch.Generator().manual_seed(9)
    prompts = [torch.randint(0, V, (14,), generator=g) for _ in range(2)]
    runs = []
    for i, (prompt, ac) in enumerate(((prompts[0], "false"), (prompts[1], "false"), (prompts[1], "true"))):
        opts = ["--data.sft=true", "--train.steps=3", f"--run.activation_checkpointing={ac}"]
        runs.append(
            losses(T.train(lora_config(tmp_path / f"sft{i}", base_ckpt, *opts), Batches([_sft_rows(prompt)])))
        )
    assert runs[0] == runs[1]
    assert runs[2] == pytest.approx(runs[1], rel=1e-6)
    assert runs[0][-1] < runs[0][0]
    model = Llama.from_checkpoint(base_ckpt).double()
    b = _sft_rows(torch.randint(0, V, (14,), generator=g))
    with torch.no_grad():
        logits = model(b["input_ids"], position_ids=b["position_ids"])
    ref = torch.nn.functional.cross_entropy(logits.reshape(-1, V), b["labels"].reshape(-1), ignore_index=-100)
    assert runs[0][0] == pytest.approx(float(ref), rel=1e-5)


def _fsdp_lora_worker(rank, world, port, tmp, data, init, q):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    os.environ["LOCAL_RANK"] = str(rank)
    torch.set_num_threads(1)
    try:
        cfg = lora_config(
            Path(tmp),
            init,
            "--data.batch_size=2",
            "--checkpoint.every=3",
            "--run.activation_checkpointing=true",
        )
        h = T.train(cfg, Batches(data[rank::world]))
        if rank == 0:
            q.put(losses(h))
    finally:
        torch.distributed.destroy_process_group()


def test_lora_fsdp2_two_gloo_processes_match_one(tmp_path, base):
    """LoRA applied before fully_shard; 2 processes with half of every batch each = 1 process with whole
    batches; the sharded run's checkpoint holds the adapters alone, equal to the single process's."""
    _, base_ckpt = base
    halves, whole = [], make_batches(4)
    for b in whole:
        halves += [{k: v[:2] for k, v in b.items()}, {k: v[2:] for k, v in b.items()}]
    one = losses(T.train(lora_config(tmp_path / "one", base_ckpt), Batches(whole)))
    q = mp.get_context("spawn").SimpleQueue()
    mp.start_processes(
        _fsdp_lora_worker,
        args=(2, _free_port(), str(tmp_path / "two"), halves, str(base_ckpt), q),
        nprocs=2,
        start_method="spawn",
    )
    two = q.get()
    assert two == pytest.approx(one, rel=1e-5)
    from safetensors.torch import load_file

    a, b = (
        load_file(str(tmp_path / d / "run" / "checkpoints" / "step_00000008" / "model.safetensors"))
        for d in ("one", "two")
    )
    assert a.keys() == b.keys() and len(a) == 28
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------------- bad config


def test_lora_config_errors(tmp_path, base):
    _, base_ckpt = base
    with pytest.raises(
        ValueError, match=r"lora target 'q_proj' does not exist; valid targets: wq, wk, wv, wo, w1, w2, w3"
    ):
        T.load_config(None, ["--lora.rank=4", "--lora.targets=['wq','q_proj']"])
    with pytest.raises(ValueError, match="lora.rank must be >= 0"):
        T.load_config(None, ["--lora.rank=-1"])
    with pytest.raises(ValueError, match=r"dropout must be in \[0, 1\)"):
        T.load_config(None, ["--lora.rank=4", "--lora.dropout=1"])
    with pytest.raises(ValueError, match="base_dtype"):
        T.load_config(None, ["--lora.rank=4", "--lora.base_dtype=int4"])
    assert T.load_config(None, ["--lora.targets=wq"]).lora.targets == ["wq"]  # a bare string is a list of one
    called = []
    with pytest.raises(
        ValueError, match="lora.rank > 0 trains adapters on a frozen base: set train.init_from"
    ):
        T.train(
            config(tmp_path / "a", "--lora.rank=4"),
            Batches(make_batches(1)),
            on_step=lambda s, r: called.append(s),
        )
    T.train(lora_config(tmp_path / "b", base_ckpt, "--train.steps=1"), Batches(make_batches(1)))
    adapter = tmp_path / "b" / "run" / "checkpoints" / "step_00000001"
    for cfg, match in (
        (lora_config(tmp_path / "c", adapter), "a LoRA adapter checkpoint; the base must be full weights"),
        (
            config(tmp_path / "d", "--model.ffn_hidden=96", f"--train.init_from={adapter}"),
            "a LoRA adapter checkpoint, not a full model",
        ),
        (
            lora_config(tmp_path / "e", base_ckpt, "--model.dim=128"),
            r"model\.dim = 128 conflicts with .*meta\.json",
        ),
    ):
        with pytest.raises(ValueError, match=match):
            T.train(cfg, Batches(make_batches(1)), on_step=lambda s, r: called.append(s))
    assert not called
    for refused in "acde":  # a run refused before its first step leaves no output folder behind
        assert not (tmp_path / refused / "run").exists()


# ---------------------------------------------------------------------------------------------- QLoRA base


def test_nf4_base(tmp_path, base):
    """base_dtype = "nf4" (tokenmill.quant.Linear4bit): a frozen 4-bit base, adapters trained by the trainer;
    the merged checkpoint (dequantised base + adapters) computes what the adapted one does."""
    quant = pytest.importorskip("tokenmill.quant")
    _, base_ckpt = base
    model = apply_lora(Llama.from_checkpoint(base_ckpt), rank=4, alpha=8, base_dtype="nf4")
    assert isinstance(model.layers[0].attention.wq.base, quant.Linear4bit)
    assert sorted(n for n, p in model.named_parameters() if p.requires_grad) == sorted(
        adapter_state_dict(model)
    )
    h = T.train(
        lora_config(tmp_path, base_ckpt, "--lora.base_dtype=nf4", "--train.steps=4"), Batches(make_batches(2))
    )
    assert h[-1]["loss"] < h[0]["loss"]
    ckpt = tmp_path / "run" / "checkpoints" / "step_00000004"
    adapted = Llama.from_checkpoint(ckpt, merge=False).eval()
    assert isinstance(adapted.layers[1].feed_forward.w2.base, quant.Linear4bit)
    ids = torch.randint(0, V, (2, SEQ))
    with torch.no_grad():
        torch.testing.assert_close(Llama.from_checkpoint(ckpt)(ids), adapted(ids), rtol=1e-4, atol=1e-4)
