"""prepare_sft + DataLoader: the loss mask covers exactly the responses, checked against templates
written out by hand. The tokenizer is byte-level (id = byte) plus special tokens, so the expected ids of
a hand-written string are its UTF-8 bytes."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tokenmill as tm
from conftest import CHAT_SPECIALS
from tokenmill.data import DataLoader, TokenDataset, prepare_sft


@pytest.fixture(scope="module")
def tok():
    return tm.Tokenizer.from_tiktoken(
        {bytes([i]): i for i in range(256)}, pattern="llama3", special_tokens=CHAT_SPECIALS
    )


def ids(tok, *parts):
    """Hand-expected ids: str parts are their bytes, <|...|> names are special ids."""
    out = []
    for p in parts:
        out += [tok.special_tokens[p]] if p in tok.special_tokens else list(p.encode())
    return out


ALPACA = {"instruction": "Add 2+2", "input": "", "output": "4"}
ALPACA_INPUT = {"instruction": "Translate", "input": "chat", "output": "cat"}
CHAT = {
    "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
        {"role": "user", "content": "<|im_end|> 2?"},  # special-token text in user data stays text
        {"role": "assistant", "content": "Two"},
    ]
}


def expected(tok, template):
    """(prompt parts, learned parts) interleaved, per record, written from the template definitions."""
    if template == "alpaca":
        pre = "Below is an instruction that describes a task. Write a response that appropriately completes the request."
        pre_in = (
            "Below is an instruction that describes a task, paired with an input that provides further context. "
            "Write a response that appropriately completes the request."
        )
        return [
            [
                ("<|begin_of_text|>", 0),
                (f"{pre}\n\n### Instruction:\nAdd 2+2\n\n### Response:\n", 0),
                ("4", 1),
                ("<|endoftext|>", 1),
            ],
            [
                ("<|begin_of_text|>", 0),
                (f"{pre_in}\n\n### Instruction:\nTranslate\n\n### Input:\nchat\n\n### Response:\n", 0),
                ("cat", 1),
                ("<|endoftext|>", 1),
            ],
            [
                ("<|begin_of_text|>", 0),
                ("Be brief.\n\n### Instruction:\nHi\n\n### Response:\n", 0),
                ("Hello", 1),
                ("<|endoftext|>", 1),
                ("\n\n### Instruction:\n<|im_end|> 2?\n\n### Response:\n".replace("<|im_end|>", "\x00"), 0),
                ("Two", 1),
                ("<|endoftext|>", 1),
            ],
        ]
    if template == "chatml":

        def turn(role, content):
            learn = int(role == "assistant")
            return [("<|im_start|>", 0), (f"{role}\n", 0), (content, learn), ("<|im_end|>", learn), ("\n", 0)]

        return [
            turn("user", "Add 2+2") + turn("assistant", "4"),
            turn("user", "Translate\n\nchat") + turn("assistant", "cat"),
            turn("system", "Be brief.")
            + turn("user", "Hi")
            + turn("assistant", "Hello")
            + turn("user", "\x00 2?")
            + turn("assistant", "Two"),
        ]

    def turn(role, content):
        learn = int(role == "assistant")
        return [
            ("<|start_header_id|>", 0),
            (role, 0),
            ("<|end_header_id|>", 0),
            ("\n\n", 0),
            (content, learn),
            ("<|eot_id|>", learn),
        ]

    bot = [("<|begin_of_text|>", 0)]
    return [
        bot + turn("user", "Add 2+2") + turn("assistant", "4"),
        bot + turn("user", "Translate\n\nchat") + turn("assistant", "cat"),
        bot
        + turn("system", "Be brief.")
        + turn("user", "Hi")
        + turn("assistant", "Hello")
        + turn("user", "\x00 2?")
        + turn("assistant", "Two"),
    ]


def flatten(tok, record):
    toks, mask = [], []
    for part, learn in record:
        if "\x00" in part:  # the literal text "<|im_end|>" inside user content: bytes, not the special
            a, b = part.split("\x00")
            got = list(a.encode()) + list(b"<|im_end|>") + list(b.encode())
        else:
            got = ids(tok, part)
        toks += got
        mask += [learn] * len(got)
    return toks, mask


@pytest.mark.parametrize("template", ["alpaca", "chatml", "llama3"])
def test_templates_and_mask_by_hand(tmp_path, tok, template):
    src = tmp_path / "data.jsonl"
    src.write_text("\n".join(json.dumps(r) for r in (ALPACA, ALPACA_INPUT, CHAT)) + "\n\n")
    manifest = prepare_sft(src, tmp_path / "sft", tok, template=template)
    ds = TokenDataset(tmp_path / "sft")
    assert ds.mask is not None and len(ds) == 3 == manifest["documents"]
    assert manifest["tokenizer"]["fingerprint"] == tok.fingerprint == ds.tokenizer_fingerprint
    for i, record in enumerate(expected(tok, template)):
        toks, mask = flatten(tok, record)
        assert ds[i].tolist() == toks
        assert ds.loss_mask(i).tolist() == mask
    assert manifest["learned_tokens"] == sum(int(ds.loss_mask(i).sum()) for i in range(3))

    # The loader: labels are the next token where that token is learned, -100 over every prompt token.
    loader = DataLoader(
        tmp_path / "sft", seq_len=512, batch_size=3, packing="best_fit", epochs=1, drop_last=False
    )
    seen = 0
    for b in loader:
        inp, lab, cu = b["input_ids"].numpy().ravel(), b["labels"].numpy().ravel(), b["cu_seqlens"].numpy()
        for a, e in zip(cu[:-1], cu[1:]):
            seg = inp[a:e].tolist()
            matches = [i for i in range(3) if flatten(tok, expected(tok, template)[i])[0] == seg]
            if not matches:
                assert (lab[a:e] == -100).all()  # padding
                continue
            toks, mask = flatten(tok, expected(tok, template)[matches[0]])
            want = [toks[j + 1] if j + 1 < len(toks) and mask[j + 1] else -100 for j in range(len(toks))]
            assert lab[a:e].tolist() == want
            # The first learned label sits on the prompt's last token.
            first = want.index(next(x for x in want if x != -100))
            assert mask[first] == 0 and mask[first + 1] == 1
            seen += 1
    assert seen == 3


def test_concat_mode_masks_across_documents(tmp_path, tok):
    src = tmp_path / "data.jsonl"
    src.write_text("\n".join(json.dumps(r) for r in (ALPACA, ALPACA_INPUT, CHAT) * 4))
    prepare_sft(src, tmp_path / "sft", tok, template="llama3")
    ds = TokenDataset(tmp_path / "sft")
    learned = {int(t) for i in range(len(ds)) for t, m in zip(ds[i], ds.loss_mask(i)) if m}
    for docmask in (True, False):
        loader = DataLoader(
            tmp_path / "sft", seq_len=32, batch_size=4, epochs=1, document_mask=docmask, drop_last=False
        )
        n_labels = 0
        for b in loader:
            lab = b["labels"].numpy()
            assert set(lab[lab != -100].tolist()) <= learned
            n_labels += int((lab != -100).sum())
        # Every learned token is predicted exactly once per epoch (none starts a document).
        assert n_labels == sum(int(ds.loss_mask(i).sum()) for i in range(len(ds)))


def test_bad_records_name_file_and_line(tmp_path, tok):
    src = tmp_path / "bad.jsonl"
    src.write_text(json.dumps(ALPACA) + "\n" + '{"messages": [{"role": "robot", "content": "x"}]}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: message 0"):
        prepare_sft(src, tmp_path / "o", tok)
    src.write_text(json.dumps(ALPACA) + "\n{oops\n")
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: invalid JSON"):
        prepare_sft(src, tmp_path / "o", tok)
    src.write_text(json.dumps({"messages": [{"role": "user", "content": "x"}]}) + "\n")
    with pytest.raises(ValueError, match=r"bad\.jsonl:1: no assistant"):
        prepare_sft(src, tmp_path / "o", tok)
    src.write_text(json.dumps({"text": "x"}) + "\n")
    with pytest.raises(ValueError, match=r"bad\.jsonl:1: neither"):
        prepare_sft(src, tmp_path / "o", tok)
    with pytest.raises(FileNotFoundError):
        prepare_sft(tmp_path / "missing.jsonl", tmp_path / "o", tok)
    src.write_bytes(json.dumps(ALPACA).encode() + b'\n{"text": "caf\xe9"}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: invalid UTF-8 \(byte 0xe9 at column 14\)"):
        prepare_sft(src, tmp_path / "o", tok)
    with pytest.raises(IsADirectoryError, match="is a directory; name the .jsonl files"):
        prepare_sft(tmp_path, tmp_path / "o", tok)
    with pytest.raises(ValueError, match="template"):
        prepare_sft(src, tmp_path / "o", tok, template="vicuna")
    assert not (tmp_path / "o.idx").exists()


def test_missing_special_tokens(tmp_path, tok):
    plain = tm.Tokenizer.from_tiktoken(
        {bytes([i]): i for i in range(256)}, pattern="llama3", special_tokens=["<|endoftext|>"]
    )
    src = tmp_path / "a.jsonl"
    src.write_text(json.dumps(ALPACA) + "\n")
    with pytest.raises(ValueError, match=r"'<\|im_start\|>'"):
        prepare_sft(src, tmp_path / "o", plain, template="chatml")
    with pytest.raises(ValueError, match=r"'<\|begin_of_text\|>'"):
        prepare_sft(src, tmp_path / "o", plain, template="llama3")
    # The SFT data of one tokenizer cannot be mixed with token files of another.
    prepare_sft(src, tmp_path / "one", plain, template="alpaca")
    prepare_sft(src, tmp_path / "two", tok, template="alpaca")
    with pytest.raises(ValueError, match="different tokenizers"):
        DataLoader([tmp_path / "one", tmp_path / "two"], seq_len=16, batch_size=1)


def test_max_length_drops_whole_records(tmp_path, tok):
    src = tmp_path / "a.jsonl"
    src.write_text("\n".join(json.dumps(r) for r in (ALPACA, CHAT)) + "\n")
    full = prepare_sft(src, tmp_path / "full", tok, template="chatml")
    lengths = TokenDataset(tmp_path / "full").lengths
    m = prepare_sft(src, tmp_path / "short", tok, template="chatml", max_length=int(lengths.min()))
    assert m["documents"] == 1 and m["dropped_too_long"] == 1 and full["documents"] == 2
    assert np.array_equal(
        TokenDataset(tmp_path / "short")[0], TokenDataset(tmp_path / "full")[int(lengths.argmin())]
    )


def test_bom_and_crlf_read_like_plain_lines(tmp_path, tok):
    lines = [json.dumps(r) for r in (ALPACA, ALPACA_INPUT, CHAT)]
    (tmp_path / "plain.jsonl").write_text("\n".join(lines) + "\n")
    (tmp_path / "win.jsonl").write_bytes(b"\xef\xbb\xbf" + "\r\n".join(lines).encode())
    prepare_sft(tmp_path / "plain.jsonl", tmp_path / "a", tok)
    prepare_sft(tmp_path / "win.jsonl", tmp_path / "b", tok)
    for suffix in (".bin", ".idx", ".mask.bin", ".mask.idx"):
        assert (tmp_path / f"a{suffix}").read_bytes() == (tmp_path / f"b{suffix}").read_bytes()
