"""export-hf of a chat model, through transformers: AutoTokenizer.apply_chat_template gives the ids our
SFT data (tm.data.prepare_sft) holds, bos/eos/pad are named, and generate stops at the turn's end."""

from __future__ import annotations

import json

import pytest
import tokenmill as tm
from conftest import CHAT_SPECIALS
from safetensors.torch import save_file
from tokenmill.data import TokenDataset
from tokenmill.hf import export
from tokenmill.model import Llama, LlamaConfig

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_torch_thread")

END_OF_TURN = {"chatml": "<|im_end|>", "llama3": "<|eot_id|>", "alpaca": "<|endoftext|>"}
CHATS = [
    [{"role": "user", "content": "What is two plus two?"}, {"role": "assistant", "content": "Four."}],
    [
        {"role": "system", "content": "You answer briefly."},
        {"role": "user", "content": "Name a colour"},
        {"role": "assistant", "content": "Blue"},
        {"role": "user", "content": "And another one, please?"},
        {"role": "assistant", "content": "Green, or perhaps red."},
    ],
    [
        {"role": "user", "content": "Say 'hi' (quoted) then a newline\nand stop"},
        {"role": "assistant", "content": " 'hi'\nDone"},
    ],
]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    words = " ".join(m["content"] for c in CHATS for m in c) + " Below is an instruction Response"
    t = tm.Tokenizer.train(
        [words] * 20, vocab_size=400, pattern="gpt2", special_tokens=CHAT_SPECIALS, show_progress=False
    )
    path = tmp_path_factory.mktemp("tok") / "tok.json"
    t.save_huggingface(path)
    return tm.Tokenizer.from_file(path), path


def checkpoint(path, tok_path, n_vocab, template, eot=None):
    """A checkpoint whose model answers every prompt with ``eot``: the residual stream is a constant
    (every embedding row the same, attention and MLP outputs zero), and only ``eot``'s output row is set."""
    cfg = LlamaConfig(
        dim=32, n_layers=1, n_heads=4, n_kv_heads=2, vocab_size=n_vocab, max_seq_len=256, tie_embeddings=False
    )
    state = {k: v.clone() for k, v in Llama(cfg).state_dict().items()}
    if eot is not None:
        state["tok_embeddings.weight"][:] = 1.0
        for k in state:
            if k.endswith(("attention.wo.weight", "feed_forward.w2.weight")):
                state[k].zero_()
        state["output.weight"].zero_()
        state["output.weight"][eot] = 1.0
    path.mkdir()
    save_file(state, str(path / "model.safetensors"))
    (path / "tokenizer.json").write_bytes(tok_path.read_bytes())
    meta = {"model": cfg.to_dict(), "tokenizer": "tokenizer.json", "chat_template": template}
    (path / "meta.json").write_text(json.dumps(meta))
    return path


@pytest.mark.parametrize("template", ["chatml", "llama3", "alpaca"])
def test_apply_chat_template_gives_our_sft_ids(tok, tmp_path, template):
    t, tok_path = tok
    (tmp_path / "chats.jsonl").write_text("".join(json.dumps({"messages": c}) + "\n" for c in CHATS))
    tm.data.prepare_sft(tmp_path / "chats.jsonl", tmp_path / "sft", t, template=template)
    docs, masks = TokenDataset(tmp_path / "sft"), TokenDataset(tmp_path / "sft.mask")
    out = export(checkpoint(tmp_path / "ckpt", tok_path, t.n_vocab, template), tmp_path / "hf")
    hf = transformers.AutoTokenizer.from_pretrained(str(out))
    eot = t.special_tokens[END_OF_TURN[template]]
    assert hf.eos_token == END_OF_TURN[template] and hf.eos_token_id == eot
    assert hf.pad_token is not None and hf.pad_token_id is not None
    assert hf.bos_token == "<|begin_of_text|>"
    for i, chat in enumerate(CHATS):
        ours = [int(x) for x in docs[i]]
        assert hf.apply_chat_template(chat, tokenize=True, return_dict=False) == ours
        # The prompt for the last answer: everything before its first learned token.
        mask = [int(x) for x in masks[i]]
        last = max(j for j in range(len(mask)) if mask[j] and (j == 0 or not mask[j - 1]))
        prompt = hf.apply_chat_template(
            chat[:-1], tokenize=True, add_generation_prompt=True, return_dict=False
        )
        assert prompt == ours[:last]


@pytest.mark.parametrize("template", ["chatml", "llama3"])
def test_generate_stops_at_the_end_of_the_turn(tok, tmp_path, template):
    t, tok_path = tok
    eot = t.special_tokens[END_OF_TURN[template]]
    export(checkpoint(tmp_path / "ckpt", tok_path, t.n_vocab, template, eot=eot), tmp_path / "hf")
    gen = json.loads((tmp_path / "hf" / "generation_config.json").read_text())
    assert gen["eos_token_id"] == [eot, t.special_tokens["<|endoftext|>"]]
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    model = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"))
    ids = hf.apply_chat_template(
        CHATS[0][:1], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    out = model.generate(**ids, max_new_tokens=6, do_sample=False)
    assert out[0, ids["input_ids"].shape[1] :].tolist() == [eot]  # one token: the turn's end, then stop
    # Control: stopping only at <|endoftext|> (the pre-chat export) runs on to max_new_tokens.
    on = model.generate(
        **ids, max_new_tokens=6, do_sample=False, eos_token_id=t.special_tokens["<|endoftext|>"]
    )
    assert on.shape[1] == ids["input_ids"].shape[1] + 6


def test_cli_chat_template_flag_and_errors(tok, tmp_path):
    from tokenmill import cli

    t, tok_path = tok
    ckpt = checkpoint(tmp_path / "ckpt", tok_path, t.n_vocab, None)
    assert cli.main(["export-hf", str(ckpt), str(tmp_path / "plain")]) == 0
    cfg = json.loads((tmp_path / "plain" / "tokenizer_config.json").read_text())
    assert "chat_template" not in cfg and cfg["eos_token"] == "<|endoftext|>"
    assert cli.main(["export-hf", str(ckpt), str(tmp_path / "chat"), "--chat-template", "chatml"]) == 0
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "chat"))
    assert hf.eos_token == "<|im_end|>"
    small = tm.Tokenizer.train(
        ["abc abc"] * 5, vocab_size=260, special_tokens=["<|endoftext|>"], show_progress=False
    )
    small.save_huggingface(tmp_path / "small.json")
    with pytest.raises(ValueError, match="needs the special token '<\\|im_start\\|>'"):
        export(ckpt, tmp_path / "x", tokenizer=str(tmp_path / "small.json"), chat_template="chatml")
