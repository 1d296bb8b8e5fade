"""Hugging Face import (tokenmill.hf, Llama.from_hf, `tokenmill import-hf`, train.init_from an HF folder):
logits against transformers on tiny random models, llama3 rope frequencies against transformers', the
export round trip of an imported and fine-tuned model, and every refusal (file and key named, nothing
written)."""

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import save_hf_llama
from hypothesis import given
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file
from tokenmill import cli, hf
from tokenmill import train as T
from tokenmill.config import RopeScaling
from tokenmill.kernels import reference
from tokenmill.model import Llama, LlamaConfig
from tokenmill.tokenizer import Tokenizer

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_torch_thread")

V = 320
LLAMA3 = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 16,
}
TEXTS = ["the quick brown fox jumps over the lazy dog", "hello world, hello tokenmill", "a b c d e f g"] * 4


# Over conftest's TINY_HF: MHA, a short context, norm_eps and rope_theta off their defaults (so that a
# reader that drops them is seen).
SHAPE = dict(
    vocab_size=V, num_key_value_heads=4, max_position_embeddings=64, rms_norm_eps=1e-5, rope_theta=1000.0
)


def make_hf(path: Path, tokenizer=True, **kw) -> Path:
    """conftest's save_hf_llama (spread weights) with SHAPE under ``kw``, and a tokenizer.json."""
    save_hf_llama(path, spread=True, **{**SHAPE, **kw})
    if tokenizer:
        Tokenizer.train(TEXTS, vocab_size=300, special_tokens=["<s>", "</s>"]).save_huggingface(
            path / "tokenizer.json"
        )
    return path


def hf_logits(path: Path, ids: torch.Tensor) -> torch.Tensor:
    m = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        return m(ids).logits


def ids(seq=40, batch=2, seed=1):
    return torch.randint(0, V, (batch, seq), generator=torch.Generator().manual_seed(seed))


def max_diff(a, b):
    return (a.float() - b.float()).abs().max().item()


CASES = {
    "plain": dict(),
    "gqa": dict(num_key_value_heads=2),
    "tied": dict(tie_word_embeddings=True),
    "llama3_rope": dict(rope_theta=10000.0, rope_scaling=LLAMA3),
    "sharded": dict(max_shard_size="60KB", num_key_value_heads=2),
    "mistral": dict(kind="mistral", num_key_value_heads=2),
    "mistral_window_covers_context": dict(kind="mistral", sliding_window=64),
}


@pytest.mark.parametrize("case", CASES)
def test_from_hf_logits_equal_transformers(tmp_path, case):
    path = make_hf(tmp_path / "hf", **CASES[case])
    if case == "sharded":
        assert len(list(path.glob("model-*.safetensors"))) > 2
        assert (path / "model.safetensors.index.json").is_file()
    x = ids()
    model = Llama.from_hf(path).eval()
    with torch.no_grad():
        ours = model(x)
    assert max_diff(ours, hf_logits(path, x)) <= 1e-4
    if case == "tied":
        assert model.output.weight is model.tok_embeddings.weight
    if case == "llama3_rope":
        assert model.config.rope_scaling == RopeScaling(8.0, 1.0, 4.0, 16)


def test_transformers4_config_layout(tmp_path):
    """LLaMA-3.1 as published (transformers 4): rope_theta and rope_scaling at the top level."""
    path = make_hf(tmp_path / "hf", rope_theta=10000.0, rope_scaling=LLAMA3)
    c = json.loads((path / "config.json").read_text())
    rope = c.pop("rope_parameters")
    c["rope_theta"] = rope.pop("rope_theta")
    c["rope_scaling"] = rope
    (path / "config.json").write_text(json.dumps(c))
    assert hf.read_config(path).rope_scaling == RopeScaling(8.0, 1.0, 4.0, 16)
    assert hf.read_config(path).rope_theta == 10000.0
    with torch.no_grad():
        assert max_diff(Llama.from_hf(path)(ids()), hf_logits(path, ids())) <= 1e-4


def test_llama3_scaling_changes_logits(tmp_path):
    """The llama3 case above is only a test if scaling matters at these positions."""
    path = make_hf(tmp_path / "hf", rope_theta=10000.0, rope_scaling=LLAMA3)
    model = Llama.from_hf(path).eval()
    plain = Llama(model.config.replace(rope_scaling=None)).eval()
    plain.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert max_diff(model(ids()), plain(ids())) > 1e-2


@given(
    head_dim=st.sampled_from([8, 16, 64, 128]),
    theta=st.sampled_from([10000.0, 500000.0, 1e6]),
    factor=st.floats(1.0, 64.0),
    low=st.floats(0.25, 4.0),
    gap=st.floats(0.5, 8.0),
    original=st.integers(4, 16384),
)
def test_llama3_inv_freq_equals_transformers(head_dim, theta, factor, low, gap, original):
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    scaling = RopeScaling(factor, low, low + gap, original)
    cfg = transformers.LlamaConfig(
        hidden_size=head_dim * 2,
        num_attention_heads=2,
        rope_parameters={"rope_theta": theta, **LLAMA3, **{k: v for k, v in vars(scaling).items()}},
    )
    theirs, attention_factor = ROPE_INIT_FUNCTIONS["llama3"](cfg, "cpu")
    assert attention_factor == 1.0
    assert torch.equal(reference.rope_inv_freq(head_dim, theta, scaling=scaling), theirs)


def test_rope_scaling_round_trips_config():
    c = LlamaConfig(dim=64, n_heads=4, rope_scaling=dict(LLAMA3))
    assert isinstance(c.rope_scaling, RopeScaling)
    assert LlamaConfig.from_dict(json.loads(json.dumps(c.to_dict()))) == c
    assert hash(c) == hash(LlamaConfig.from_dict(c.to_dict()))
    with pytest.raises(ValueError, match="rope_type 'yarn'"):
        LlamaConfig(dim=64, n_heads=4, rope_scaling={**LLAMA3, "rope_type": "yarn"})


# ------------------------------------------------------------------------------------ import-hf, checkpoint


def test_import_hf_cli_then_from_checkpoint(tmp_path, capsys):
    path = make_hf(tmp_path / "hf", num_key_value_heads=2, rope_theta=10000.0, rope_scaling=LLAMA3)
    out = tmp_path / "ckpt"
    assert cli.main(["import-hf", str(path), str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == [
        "meta.json",
        "model.safetensors",
        "tokenmill-tokenizer.tokenmill",
    ]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp folder left
    meta = json.loads((out / "meta.json").read_text())
    assert meta["model"]["rope_scaling"] == LLAMA3 and meta["tokenizer"] == "tokenmill-tokenizer.tokenmill"
    x = ids()
    with torch.no_grad():
        ours = Llama.from_checkpoint(out).eval()(x)
    assert max_diff(ours, hf_logits(path, x)) <= 1e-4
    tok = Tokenizer.load(out / meta["tokenizer"])
    assert tok.encode(TEXTS[0]) == Tokenizer.from_huggingface(path / "tokenizer.json").encode(TEXTS[0])
    with pytest.raises(FileExistsError, match="already exists"):
        hf.import_hf(path, out)


def test_import_hf_bfloat16_is_the_weights_rounded(tmp_path):
    path = make_hf(tmp_path / "hf", max_shard_size="60KB", tie_word_embeddings=True)
    out = hf.import_hf(path, tmp_path / "ckpt", dtype="bfloat16")
    theirs = {}
    for f in path.glob("*.safetensors"):
        theirs.update(load_file(f))
    ours = load_file(out / "model.safetensors")
    assert set(ours) == set(Llama(hf.read_config(path)).state_dict())
    for name, t in ours.items():
        assert t.dtype == torch.bfloat16
        assert torch.equal(
            t, theirs[hf.hf_name(name if name != "output.weight" else "tok_embeddings.weight")].bfloat16()
        )


def test_from_hf_dtype_and_sentencepiece_tokenizer_absent_is_fine(tmp_path, capsys):
    path = make_hf(tmp_path / "hf", tokenizer=False)
    m = Llama.from_hf(path, dtype=torch.bfloat16)
    assert {p.dtype for p in m.parameters()} == {torch.bfloat16}
    out = hf.import_hf(path, tmp_path / "ckpt")
    assert "tokenizer" not in json.loads((out / "meta.json").read_text())
    # the CLI says so in one line (the weights alone are a valid import)
    capsys.readouterr()  # transformers' save progress
    assert cli.main(["import-hf", str(path), str(tmp_path / "cli")]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        f"tokenmill import-hf: note: {path} has no tokenizer.json or tokenizer.model, so {tmp_path / 'cli'} "
        "has no tokenizer: give data.tokenizer to train and --tokenizer to export-hf"
    ]


def test_import_tokenizer_model_when_no_tokenizer_json(tmp_path):
    """A LLaMA-2 style folder: tokenizer.model (SentencePiece BPE, byte fallback) beside the weights."""
    spm = pytest.importorskip("sentencepiece")
    path = make_hf(tmp_path / "hf", tokenizer=False)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(TEXTS * 20))
    spm.SentencePieceTrainer.train(
        input=str(corpus),
        model_prefix=str(tmp_path / "sp"),
        model_type="bpe",
        vocab_size=300,
        byte_fallback=True,
        normalization_rule_name="identity",
        num_threads=1,
        minloglevel=2,
    )
    (tmp_path / "sp.model").rename(path / "tokenizer.model")
    out = hf.import_hf(path, tmp_path / "ckpt")
    tok = Tokenizer.load(out / json.loads((out / "meta.json").read_text())["tokenizer"])
    sp = spm.SentencePieceProcessor(model_file=str(path / "tokenizer.model"))
    text = "the lazy fox, hello world"
    assert tok.encode_ordinary(text) == sp.encode(text)
    # This model removes extra whitespace, which tokenizer.json cannot express: export-hf refuses, and leaves
    # neither the folder nor its temporary twin (the tokenizer is written before the weights).
    with pytest.raises(ValueError, match="cannot be saved as tokenizer.json: remove_extra_whitespaces"):
        hf.export(out, tmp_path / "exported")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "corpus.txt", "hf", "sp.vocab"]


# ------------------------------------------------------------------------------------------------ trainer


class Batches:
    def __init__(self, batches):
        self.batches, self.pos = batches, 0

    def __iter__(self):
        while True:
            yield self.batches[self.pos % len(self.batches)]
            self.pos += 1

    def state_dict(self):
        return {"pos": self.pos}

    def load_state_dict(self, s):
        self.pos = s["pos"]


def batches(n=3, batch=2, seq=24):
    g = torch.Generator().manual_seed(3)
    out = []
    for _ in range(n):
        x = torch.randint(0, V, (batch, seq + 1), generator=g)
        out.append({"input_ids": x[:, :-1].contiguous(), "labels": x[:, 1:].contiguous()})
    return out


def run_config(tmp_path, init_from, *extra):
    return T.load_config(
        None,
        [
            f"--run.out_dir={tmp_path / 'run'}",
            "--run.device=cpu",
            f"--train.init_from={init_from}",
            "--data.seq_len=24",
            "--data.batch_size=2",
            "--train.steps=2",
            "--train.log_every=1",
            "--train.eval_every=0",
            "--train.progress=false",
            "--optim.lr=1e-3",
            "--optim.warmup_steps=1",
            *extra,
        ],
    )


def test_init_from_hf_folder_trains_from_its_weights(tmp_path):
    path = make_hf(tmp_path / "hf", num_key_value_heads=2, rope_theta=10000.0, rope_scaling=LLAMA3)
    data = batches()
    history = T.train(run_config(tmp_path, path), Batches(data))
    steps = [h for h in history if "loss" in h and "step" in h]
    assert len(steps) == 2
    b = data[0]
    expect = torch.nn.functional.cross_entropy(
        hf_logits(path, b["input_ids"]).reshape(-1, V), b["labels"].reshape(-1)
    )
    assert abs(steps[0]["loss"] - expect.item()) <= 1e-4  # step 1's loss is the HF model's on batch 1
    assert steps[1]["loss"] != steps[0]["loss"]


def test_init_from_hf_folder_conflicting_model_key(tmp_path):
    path = make_hf(tmp_path / "hf")
    with pytest.raises(ValueError, match=r"model\.dim = 128 conflicts with .*config\.json"):
        T.train(run_config(tmp_path, path, "--model.dim=128"), Batches(batches()))
    with pytest.raises(ValueError, match=r"model\.preset = 'tiny' conflicts"):
        T.train(run_config(tmp_path, path, "--model.preset=tiny"), Batches(batches()))
    assert not (tmp_path / "run" / "checkpoints").exists()
    # agreeing keys are fine
    T.train(run_config(tmp_path, path, "--model.dim=64", "--train.steps=1"), Batches(batches()))


def test_init_from_refuses_data_of_another_tokenizer(tmp_path):
    """Token files (or data.tokenizer) of another tokenizer than the one kept with train.init_from's model (an
    HF folder's tokenizer.json, an imported checkpoint's tokenmill-tokenizer.tokenmill) stop the run before any
    step: their ids would mean other tokens to the model. The model's own tokenizer trains."""
    import tokenmill as tm

    path = make_hf(tmp_path / "hf")
    imported = hf.import_hf(path, tmp_path / "imported")
    mine = Tokenizer.from_huggingface(path / "tokenizer.json")
    other = Tokenizer.train(TEXTS[::-1] + ["zebra"], vocab_size=290, special_tokens=["<s>", "</s>"])
    other.save(tmp_path / "other.tokenmill")
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS * 4))
    tm.data.prepare(str(tmp_path / "docs.jsonl"), str(tmp_path / "theirs"), mine)
    tm.data.prepare(str(tmp_path / "docs.jsonl"), str(tmp_path / "others"), other)
    data = ["--data.seq_len=8", "--data.batch_size=2", "--data.document_mask=false"]
    for start in (path, imported):
        with pytest.raises(
            ValueError,
            match=r"others: tokenized with a 290-token .*tokenizer\.(json|tokenmill) has 300 tokens",
        ):
            T.train(run_config(tmp_path, start, f"--data.train=['{tmp_path / 'others'}']", *data))
        with pytest.raises(ValueError, match=r"data.tokenizer .*other.tokenmill is another tokenizer"):
            T.train(
                run_config(
                    tmp_path,
                    start,
                    f"--data.train=['{tmp_path / 'theirs'}']",
                    f"--data.tokenizer={tmp_path / 'other.tokenmill'}",
                    *data,
                )
            )
        assert not (tmp_path / "run" / "checkpoints").exists()
    # the model's own tokenizer in another format (native file vs the HF tokenizer.json: other fingerprints,
    # the same tokens) trains
    native = Tokenizer.train(
        TEXTS, vocab_size=300, special_tokens=["<s>", "</s>"]
    )  # make_hf's, before its save
    native.save(tmp_path / "mine.tokenmill")
    assert native.fingerprint != mine.fingerprint
    tm.data.prepare(str(tmp_path / "docs.jsonl"), str(tmp_path / "native"), native)
    h = T.train(
        run_config(
            tmp_path,
            imported,
            f"--data.train=['{tmp_path / 'native'}']",
            f"--data.tokenizer={tmp_path / 'mine.tokenmill'}",
            "--train.steps=1",
            *data,
        )
    )
    assert [x["step"] for x in h if "loss" in x and "step" in x] == [1]
    # ids without a token (a pad token far above the vocabulary, as padded HF vocabularies have) compare too
    spec = json.loads((path / "tokenizer.json").read_text())
    spec["added_tokens"].append({"id": 310, "content": "<|pad|>", "special": True, "normalized": False})
    (tmp_path / "gap.json").write_text(json.dumps(spec))
    gap = Tokenizer.from_file(tmp_path / "gap.json")
    as_tiktoken = Tokenizer.from_tiktoken(
        gap.mergeable_ranks(), pattern=gap.pattern, special_tokens=gap.special_tokens
    )
    assert as_tiktoken.fingerprint != gap.fingerprint and T._same_vocabulary(gap, as_tiktoken)
    assert not T._same_vocabulary(gap, mine) and not T._same_vocabulary(mine, other)


def test_lora_on_hf_folder_merge_takes_its_tokenizer(tmp_path):
    """A LoRA run whose base is an HF folder, trained without data.tokenizer: `export-hf --merge` writes the
    base folder's tokenizer (it used to look for a meta.json in the HF folder and fail), and transformers
    computes the merged model's logits."""
    path = make_hf(tmp_path / "hf")
    T.train(run_config(tmp_path, path, "--lora.rank=4", "--optim.lr=1e-2"), Batches(batches()))
    ckpt = tmp_path / "run" / "checkpoints" / "step_00000002"
    out = hf.export(ckpt, tmp_path / "merged", merge=True, chat_template="alpaca")
    exported = Tokenizer.from_file(out / "tokenizer.json")
    assert exported.fingerprint == Tokenizer.from_file(path / "tokenizer.json").fingerprint
    ids = torch.tensor([exported.encode(TEXTS[0])])
    with torch.no_grad():
        ours = Llama.from_checkpoint(ckpt).eval()(ids)
    torch.testing.assert_close(hf_logits(out, ids), ours, rtol=0, atol=1e-4)
    # --adapter carries the same tokenizer and chat template (--chat-template was silently dropped before):
    # AutoTokenizer on the adapter folder renders a chat as on the merged one
    adapter = hf.export(ckpt, tmp_path / "adapter", adapter=True, chat_template="alpaca")
    chat = [{"role": "user", "content": TEXTS[1]}, {"role": "assistant", "content": TEXTS[2]}]
    tok_a, tok_m = (transformers.AutoTokenizer.from_pretrained(d) for d in (adapter, out))
    rendered = tok_m.apply_chat_template(chat, tokenize=True, return_dict=False)
    assert tok_a.apply_chat_template(chat, tokenize=True, return_dict=False) == rendered
    assert tok_a.eos_token == tok_m.eos_token == "</s>" and len(rendered) > 20


def test_export_of_imported_fine_tuned_model_loads_in_transformers(tmp_path):
    path = make_hf(tmp_path / "hf", num_key_value_heads=2, rope_theta=10000.0, rope_scaling=LLAMA3)
    imported = hf.import_hf(path, tmp_path / "imported")
    shape = json.loads((imported / "meta.json").read_text())["model"]
    rope = "{" + ", ".join(f"{k} = {json.dumps(v)}" for k, v in shape["rope_scaling"].items()) + "}"
    keys = ["vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "ffn_hidden", "norm_eps", "rope_theta"]
    model_args = [f"--model.{k}={shape[k]}" for k in keys] + [
        f"--model.max_seq_len={shape['max_seq_len']}",
        f"--model.rope_scaling={rope}",
    ]
    T.train(run_config(tmp_path, imported, *model_args), Batches(batches()))
    ckpt = sorted((tmp_path / "run" / "checkpoints").glob("step_*"))[-1]
    assert cli.main(["export-hf", str(ckpt), str(tmp_path / "exported")]) == 0
    exported = json.loads((tmp_path / "exported" / "config.json").read_text())
    assert exported["rope_scaling"] == LLAMA3
    x = ids()
    with torch.no_grad():
        ours = Llama.from_checkpoint(ckpt).eval()(x)
    theirs = hf_logits(tmp_path / "exported", x)
    assert max_diff(ours, theirs) <= 1e-4
    assert max_diff(theirs, hf_logits(path, x)) > 1e-3  # fine-tuning changed the model


def test_exported_then_imported_run_continues_with_the_same_preset(tmp_path):
    """The fine-tuning path: a run on a preset -> export-hf -> import-hf -> a run with the same preset
    starting from the imported folder (its config spells out sizes the preset derives)."""
    base = ["--model.preset=tiny", "--model.vocab_size=320"]
    T.train(run_config(tmp_path / "a", "", *base), Batches(batches()))
    ckpt = sorted((tmp_path / "a" / "run" / "checkpoints").glob("step_*"))[-1]
    hf.export(ckpt, tmp_path / "hf")
    imported = hf.import_hf(tmp_path / "hf", tmp_path / "imported")
    assert json.loads((imported / "meta.json").read_text())["model"]["ffn_hidden"] is not None
    history = T.train(run_config(tmp_path / "b", imported, *base, "--train.steps=1"), Batches(batches()))
    first = next(h for h in history if "loss" in h)
    expect = torch.nn.functional.cross_entropy(
        hf_logits(tmp_path / "hf", batches()[0]["input_ids"]).reshape(-1, V),
        batches()[0]["labels"].reshape(-1),
    )
    assert abs(first["loss"] - expect.item()) <= 1e-4
    with pytest.raises(ValueError, match=r"model\.vocab_size = 384 conflicts with .*meta\.json"):
        T.train(run_config(tmp_path / "c", imported, "--model.preset=tiny", "--model.vocab_size=384"))


# ------------------------------------------------------------------------------------------------ refusals


def edit_config(path: Path, **changes):
    c = json.loads((path / "config.json").read_text())
    c.update(changes)
    (path / "config.json").write_text(json.dumps(c))


def edit_tensors(file: Path, fn):
    state = load_file(file)
    fn(state)
    save_file(state, file, metadata={"format": "pt"})


def _add(name, shape=(64,)):
    return lambda s: s.update({name: torch.zeros(shape)})


def _first_shard_missing(path: Path):
    index = json.loads((path / "model.safetensors.index.json").read_text())
    shard = sorted(set(index["weight_map"].values()))[1]
    (path / shard).unlink()
    return shard


def _listed_but_absent(path: Path):
    index_file = path / "model.safetensors.index.json"
    index = json.loads(index_file.read_text())
    shard = sorted(set(index["weight_map"].values()))[0]
    index["weight_map"]["model.layers.0.mlp.extra.weight"] = shard
    index_file.write_text(json.dumps(index))
    return shard


REFUSALS = {
    # name: (make_hf kwargs, edit(path) -> None, file named, key named)
    "architecture": (
        {},
        lambda p: edit_config(p, architectures=["Qwen2ForCausalLM"], model_type="qwen2"),
        "config.json",
        "architectures",
    ),
    "model_type": ({}, lambda p: edit_config(p, model_type="gemma"), "config.json", "model_type"),
    "rope_type": (
        {},
        lambda p: edit_config(p, rope_parameters={"rope_theta": 1e4, "rope_type": "yarn", "factor": 4.0}),
        "config.json",
        "rope_parameters.rope_type",
    ),
    "rope_type_v4": (
        {},
        lambda p: edit_config(
            p, rope_parameters=None, rope_theta=1e4, rope_scaling={"type": "dynamic", "factor": 2.0}
        ),
        "config.json",
        "rope_scaling.rope_type",
    ),
    "llama3_key_missing": (
        {},
        lambda p: edit_config(p, rope_parameters={"rope_theta": 1e4, "rope_type": "llama3", "factor": 8.0}),
        "config.json",
        "rope_parameters.low_freq_factor",
    ),
    "attention_bias": ({}, lambda p: edit_config(p, attention_bias=True), "config.json", "attention_bias"),
    "mlp_bias": ({}, lambda p: edit_config(p, mlp_bias=True), "config.json", "mlp_bias"),
    "head_dim": ({}, lambda p: edit_config(p, head_dim=32), "config.json", "head_dim"),
    "sliding_window": (
        {"kind": "mistral", "sliding_window": 16},
        lambda p: None,
        "config.json",
        "sliding_window",
    ),
    "bias_tensor": (
        {},
        lambda p: edit_tensors(p / "model.safetensors", _add("model.layers.0.self_attn.q_proj.bias")),
        "model.safetensors",
        "model.layers.0.self_attn.q_proj.bias",
    ),
    "unexpected_tensor": (
        {},
        lambda p: edit_tensors(p / "model.safetensors", _add("model.layers.0.mlp.extra.weight")),
        "model.safetensors",
        "model.layers.0.mlp.extra.weight",
    ),
    "layer_beyond_config": (
        {},
        lambda p: edit_tensors(p / "model.safetensors", _add("model.layers.2.input_layernorm.weight")),
        "model.safetensors",
        "model.layers.2.input_layernorm.weight",
    ),
    "missing_tensor": (
        {},
        lambda p: edit_tensors(p / "model.safetensors", lambda s: s.pop("model.norm.weight")),
        "model.safetensors",
        "model.norm.weight",
    ),
    "wrong_shape": (
        {},
        lambda p: edit_tensors(p / "model.safetensors", _add("model.norm.weight", (65,))),
        "model.safetensors",
        "model.norm.weight",
    ),
    "int_tensor": (
        {},
        lambda p: edit_tensors(
            p / "model.safetensors",
            lambda s: s.update({"model.norm.weight": torch.ones(64, dtype=torch.int32)}),
        ),
        "model.safetensors",
        "model.norm.weight",
    ),
    "shard_missing": ({"max_shard_size": "60KB"}, _first_shard_missing, "model.safetensors.index.json", None),
    "listed_but_absent": (
        {"max_shard_size": "60KB"},
        _listed_but_absent,
        None,
        "model.layers.0.mlp.extra.weight",
    ),
    "no_weights": ({}, lambda p: (p / "model.safetensors").unlink(), "model.safetensors", None),
    "tokenizer_too_big": ({"vocab_size": 280}, lambda p: None, "tokenizer.json", "vocab_size"),
}


@pytest.mark.parametrize("case", REFUSALS)
def test_refusals_name_file_and_key_and_write_nothing(tmp_path, case):
    kw, edit, file, key = REFUSALS[case]
    path = make_hf(tmp_path / "hf", **kw)
    named = edit(path)
    file = file or named  # the shard, when the edit chose it
    out = tmp_path / "out" / "ckpt"
    with pytest.raises((ValueError, FileNotFoundError)) as e:
        hf.import_hf(path, out)
    msg = str(e.value)
    assert file in msg, msg
    if key is not None:
        assert key in msg, msg
    if case == "shard_missing":
        assert named in msg, msg
    assert not (tmp_path / "out").exists()  # checks come before any write, even of the parent


def test_refusals_of_from_hf_cli_and_dtype(tmp_path, capsys):
    path = make_hf(tmp_path / "hf")
    with pytest.raises(ValueError, match="dtype 'int8' is not supported"):
        hf.import_hf(path, tmp_path / "out", dtype="int8")
    with pytest.raises(ValueError, match="dtype torch.float64 is not supported"):
        Llama.from_hf(path, dtype=torch.float64)
    assert not (tmp_path / "out").exists()
    edit_config(path, attention_bias=True)
    with pytest.raises(ValueError, match="config.json: attention_bias"):
        Llama.from_hf(path)
    assert cli.main(["import-hf", str(path), str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert "import-hf: error:" in err and "config.json: attention_bias" in err
    assert not (tmp_path / "out").exists()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        hf.import_hf(tmp_path, tmp_path / "out")


def test_rope_scaling_math_is_the_llama31_rule():
    """Hand check of the three bands (original context 32, factor 8, low 1, high 4; theta 10, head_dim 8):
    wavelengths 2*pi*10^(i/4) = 6.3 (< 8: kept), 11.2 and 19.9 (interpolated), 35.3 (> 32: divided by 8)."""
    s = RopeScaling(8.0, 1.0, 4.0, 32)
    base = reference.rope_inv_freq(8, 10.0)
    got = reference.rope_inv_freq(8, 10.0, scaling=s)
    wavelen = (2 * math.pi / base).tolist()
    assert [w < 8 for w in wavelen] == [True, False, False, False] and wavelen[3] > 32
    smooth = [(32 / w - 1) / 3 for w in wavelen]
    expect = [base[0], *((1 - m) * b / 8 + m * b for m, b in zip(smooth[1:3], base[1:3])), base[3] / 8]
    assert got.tolist() == pytest.approx([float(e) for e in expect], rel=1e-6)
