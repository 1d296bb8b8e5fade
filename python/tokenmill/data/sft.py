"""``prepare_sft``: instruction-tuning JSONL -> token files plus a loss mask beside them.

Inputs, one JSON object per line, either form in any file:

* Alpaca: ``{"instruction": str, "input": str (optional), "output": str}``;
* chat: ``{"messages": [{"role": "system" | "user" | "assistant", "content": str}, ...]}``.

Outputs (all written atomically, the manifest last):

* ``PREFIX.bin/.idx``: one document per record (Megatron MMIDIDX);
* ``PREFIX.mask.bin/.idx``: a uint8 MMIDIDX dataset with the same document lengths, 1 where the token is
  part of a response the model must learn (assistant content and its end-of-turn token), 0 elsewhere
  (template text, system and user turns). ``DataLoader`` finds it beside the tokens and sets
  ``labels`` to -100 wherever the *predicted* token has mask 0;
* ``PREFIX.json``: template, tokenizer (fingerprint, n_vocab), counts and the four files (name, size,
  xxh3-128), each recorded as ``prepare`` records it.

Templates (``S`` = a special token of the tokenizer, encoded by id; ``[...]`` = learned):

* ``"alpaca"`` (Stanford Alpaca's prompt): ``S<bos>? "Below is an instruction ... ### Response:\\n"
  [output S<eos>]``; chat records render each user turn as an instruction, system text as the preamble;
* ``"chatml"``: ``"<|im_start|>" role "\\n" content "<|im_end|>" "\\n"`` per message, with the assistant's
  ``[content <|im_end|>]`` learned;
* ``"llama3"``: ``<|begin_of_text|>`` then ``<|start_header_id|> role <|end_header_id|> "\\n\\n" content
  <|eot_id|>`` per message, the assistant's ``[content <|eot_id|>]`` learned.

Each text piece is encoded on its own (``encode_ordinary``: special-token text inside user data stays
plain text), so the mask boundary always falls between tokens.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Optional, Union

from tokenmill import _core
from tokenmill._fsutil import write_atomic
from tokenmill.data.dataset import MASK_SUFFIX, PathLike, normalize_prefix
from tokenmill.data.dataset import output_prefix as _output_prefix

TEMPLATES = ("alpaca", "chatml", "llama3")
ROLES = ("system", "user", "assistant")

ALPACA_PREAMBLE = "Below is an instruction that describes a task. Write a response that appropriately completes the request."
ALPACA_PREAMBLE_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request."
)

# A rendered record: pieces of (text | special-token id, learned?).
Piece = tuple[Union[str, int], bool]


def _special(tokenizer: Any, name: str, template: str) -> int:
    specials = tokenizer.special_tokens
    if name not in specials:
        raise ValueError(f"template {template!r} needs the special token {name!r}, which the tokenizer lacks")
    return int(specials[name])


def _messages(record: Any, where: str) -> list[tuple[str, str]]:
    """The record as (role, content) turns."""
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}")
    if "messages" in record:
        msgs = record["messages"]
        if not isinstance(msgs, list) or not msgs:
            raise ValueError(f"{where}: 'messages' must be a non-empty list")
        out = []
        for i, m in enumerate(msgs):
            if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
                raise ValueError(
                    f"{where}: message {i} must be {{'role': one of {ROLES}, 'content': str}}, got {m!r:.200}"
                )
            out.append((m["role"], m["content"]))
        if not any(r == "assistant" for r, _ in out):
            raise ValueError(f"{where}: no assistant message, nothing to learn")
        return out
    if "instruction" in record and "output" in record:
        ins, inp, outp = record["instruction"], record.get("input") or "", record["output"]
        if not all(isinstance(x, str) for x in (ins, inp, outp)):
            raise ValueError(f"{where}: instruction, input and output must be strings")
        # Kept apart so the alpaca template can use its "### Input:" section.
        return (
            [("user", ins), ("input", inp), ("assistant", outp)]
            if inp
            else [("user", ins), ("assistant", outp)]
        )
    raise ValueError(f"{where}: neither an Alpaca record (instruction, output) nor a chat record (messages)")


def _render(turns: list[tuple[str, str]], template: str, tokenizer: Any, where: str) -> list[Piece]:
    if template == "alpaca":
        eos = tokenizer.eos_token_id
        if eos is None:
            raise ValueError(
                "template 'alpaca' needs an end-of-text special token, which the tokenizer lacks"
            )
        pieces: list[Piece] = []
        if tokenizer.bos_token_id is not None:
            pieces.append((int(tokenizer.bos_token_id), False))
        system = "\n\n".join(c for r, c in turns if r == "system")
        has_input = any(r == "input" for r, _ in turns)
        preamble = system or (ALPACA_PREAMBLE_INPUT if has_input else ALPACA_PREAMBLE)
        prompt = preamble + "\n\n"
        for role, content in turns:
            if role == "user":
                prompt += f"### Instruction:\n{content}\n\n"
            elif role == "input":
                prompt += f"### Input:\n{content}\n\n"
            elif role == "assistant":
                pieces += [(prompt + "### Response:\n", False), (content, True), (int(eos), True)]
                prompt = "\n\n"
        return pieces
    if len(turns) >= 2 and turns[1][0] == "input":
        # An Alpaca record's instruction and input form one user turn.
        turns = [("user", turns[0][1] + "\n\n" + turns[1][1]), *turns[2:]]
    if template == "chatml":
        start, end = (
            _special(tokenizer, "<|im_start|>", template),
            _special(tokenizer, "<|im_end|>", template),
        )
        pieces = []
        for role, content in turns:
            learn = role == "assistant"
            pieces += [(start, False), (role + "\n", False), (content, learn), (end, learn), ("\n", False)]
        return pieces
    if template == "llama3":
        names = ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")
        bot, sh, eh, eot = (_special(tokenizer, n, template) for n in names)
        pieces = [(bot, False)]
        for role, content in turns:
            learn = role == "assistant"
            pieces += [
                (sh, False),
                (role, False),
                (eh, False),
                ("\n\n", False),
                (content, learn),
                (eot, learn),
            ]
        return pieces
    raise ValueError(f"template must be one of {TEMPLATES}, got {template!r}")


def _lit(text: str) -> str:
    """A Jinja string literal."""
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n") + "'"


def chat_template(template: str, tokenizer: Any) -> tuple[str, int]:
    """The Jinja ``chat_template`` (Hugging Face ``tokenizer_config.json``) that renders a chat's
    ``messages`` as :func:`prepare_sft` does with ``template``, and the id of the token that ends an
    assistant turn (the eos a chat model's ``generate`` must stop at). ``add_generation_prompt`` appends
    the opening of an assistant turn. Ids equal ours wherever a text piece's edge is a pre-tokenization
    boundary (content starting with a letter, digit or space after ``"\\n"``: the usual case)."""
    names = {v: k for k, v in tokenizer.special_tokens.items()}
    if template == "chatml":
        start, end = (
            _special(tokenizer, "<|im_start|>", template),
            _special(tokenizer, "<|im_end|>", template),
        )
        turn = f"{_lit(names[start])} + m['role'] + {_lit(chr(10))} + m['content'] + {_lit(names[end] + chr(10))}"
        return (
            "{%- for m in messages -%}{{- " + turn + " -}}{%- endfor -%}"
            "{%- if add_generation_prompt -%}{{- " + _lit(names[start] + "assistant\n") + " -}}{%- endif -%}",
            end,
        )
    if template == "llama3":
        bot, sh, eh, eot = (
            _special(tokenizer, n, template)
            for n in ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")
        )
        head = f"{_lit(names[sh])} + m['role'] + {_lit(names[eh] + chr(10) * 2)}"
        return (
            "{{- " + _lit(names[bot]) + " -}}"
            "{%- for m in messages -%}{{- "
            + head
            + " + m['content'] + "
            + _lit(names[eot])
            + " -}}{%- endfor -%}"
            "{%- if add_generation_prompt -%}{{- "
            + _lit(names[sh] + "assistant" + names[eh] + "\n\n")
            + " -}}{%- endif -%}",
            eot,
        )
    if template == "alpaca":
        eos = tokenizer.eos_token_id
        if eos is None:
            raise ValueError(
                "template 'alpaca' needs an end-of-text special token, which the tokenizer lacks"
            )
        bos = tokenizer.bos_token_id
        nl2 = _lit("\n\n")
        # System turns form the preamble wherever they stand; "\n\n" separates an assistant turn from
        # whatever follows it (the Python renderer's pending ``prompt = "\n\n"``).
        return (
            "{%- set ns = namespace(system=[], sep=false) -%}"
            "{%- for m in messages if m['role'] == 'system' -%}{%- set ns.system = ns.system + [m['content']] -%}{%- endfor -%}"
            "{%- set system = ns.system | join("
            + nl2
            + ") -%}"
            + ("{{- " + _lit(names[bos]) + " -}}" if bos is not None else "")
            + "{{- (system if system else "
            + _lit(ALPACA_PREAMBLE)
            + ") + "
            + nl2
            + " -}}"
            "{%- for m in messages -%}"
            "{%- if m['role'] == 'user' -%}"
            "{{- ("
            + nl2
            + " if ns.sep else '') + "
            + _lit("### Instruction:\n")
            + " + m['content'] + "
            + nl2
            + " -}}"
            "{%- set ns.sep = false -%}"
            "{%- elif m['role'] == 'assistant' -%}"
            "{{- ("
            + nl2
            + " if ns.sep else '') + "
            + _lit("### Response:\n")
            + " + m['content'] + "
            + _lit(names[eos])
            + " -}}"
            "{%- set ns.sep = true -%}"
            "{%- endif -%}{%- endfor -%}"
            "{%- if add_generation_prompt -%}{{- ("
            + nl2
            + " if ns.sep else '') + "
            + _lit("### Response:\n")
            + " -}}{%- endif -%}",
            int(eos),
        )
    raise ValueError(f"template must be one of {TEMPLATES}, got {template!r}")


def template_of(prefixes: Iterable[PathLike]) -> Optional[str]:
    """The template that :func:`prepare_sft` recorded in the manifests of ``prefixes`` (None when they
    are not SFT data, or disagree)."""
    found = set()
    for p in prefixes:
        try:
            with open(normalize_prefix(p) + ".json") as f:
                m = json.load(f)
        except (OSError, ValueError):
            return None
        if m.get("format") != "tokenmill.sft":
            return None
        found.add(m.get("template"))
    return found.pop() if len(found) == 1 else None


def _records(paths: Sequence[PathLike]) -> Iterable[tuple[Any, str]]:
    for path in paths:
        with open(path, "rb") as f:  # bytes: a bad byte is reported at its line, as prepare does
            for lineno, raw in enumerate(f, 1):
                where = f"{os.fspath(path)}:{lineno}"
                if lineno == 1:
                    raw = raw.removeprefix(b"\xef\xbb\xbf")  # a byte-order mark opening the file
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise ValueError(
                        f"{where}: invalid UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1})"
                    ) from None
                if not line.strip():
                    continue
                try:
                    yield json.loads(line), where
                except ValueError as e:
                    raise ValueError(f"{where}: invalid JSON ({e})") from None


def _file_info(path: str) -> dict[str, Any]:
    """The manifest entry of one written file, computed by the Rust code that ``prepare`` uses."""
    size, xxh3_128 = _core.file_checksum(path)
    return {"name": os.path.basename(path), "size": size, "xxh3_128": xxh3_128}


def _encode_records(rendered: list[list[Piece]], tokenizer: Any) -> tuple[list[list[int]], list[list[int]]]:
    texts = [p for pieces in rendered for p, _ in pieces if isinstance(p, str)]
    batch = getattr(tokenizer, "encode_ordinary_batch", None)
    encoded = iter(batch(texts) if batch else [tokenizer.encode_ordinary(t) for t in texts])
    docs, masks = [], []
    for pieces in rendered:
        ids: list[int] = []
        mask: list[int] = []
        for p, learn in pieces:
            part = list(next(encoded)) if isinstance(p, str) else [p]
            ids += part
            mask += [int(learn)] * len(part)
        docs.append(ids)
        masks.append(mask)
    return docs, masks


def prepare_sft(
    jsonl_paths: Union[PathLike, Sequence[PathLike]],
    output_prefix: PathLike,
    tokenizer: Any,
    template: str = "alpaca",
    *,
    max_length: Optional[int] = None,
) -> dict[str, Any]:
    """Tokenize instruction/chat JSONL with ``template`` into ``output_prefix`` token files and their loss
    mask; return the manifest (also written to ``PREFIX.json``). Records longer than ``max_length`` tokens
    are dropped (counted in the manifest), never silently cut through a response.

    >>> tm.data.prepare_sft("alpaca.jsonl", "data/sft", tok, template="llama3")   # doctest: +SKIP
    >>> loader = tm.data.DataLoader("data/sft", seq_len=2048, batch_size=8, packing="best_fit")  # doctest: +SKIP
    """
    if template not in TEMPLATES:
        raise ValueError(f"template must be one of {TEMPLATES}, got {template!r}")
    prefix = _output_prefix(output_prefix)
    paths = [jsonl_paths] if isinstance(jsonl_paths, (str, os.PathLike)) else list(jsonl_paths)
    if not paths:
        raise ValueError("no input files")
    for p in paths:
        if Path(p).is_dir():
            raise IsADirectoryError(f"{os.fspath(p)}: is a directory; name the .jsonl files in it")
        if not Path(p).is_file():
            raise FileNotFoundError(f"{os.fspath(p)}: no such file")
    rendered = [_render(_messages(rec, where), template, tokenizer, where) for rec, where in _records(paths)]
    if not rendered:
        raise ValueError(f"no records in {[os.fspath(p) for p in paths]}")
    docs, masks = _encode_records(rendered, tokenizer)
    dropped = 0
    if max_length is not None:
        keep = [i for i, d in enumerate(docs) if len(d) <= max_length]
        dropped = len(docs) - len(keep)
        docs, masks = [docs[i] for i in keep], [masks[i] for i in keep]
        if not docs:
            raise ValueError(f"every record is longer than max_length={max_length} tokens")
    Path(prefix).parent.mkdir(parents=True, exist_ok=True)
    dtype = _core.token_dtype(tokenizer.n_vocab)
    _core.write_token_file(prefix, docs, dtype)
    _core.write_token_file(prefix + MASK_SUFFIX, masks, "uint8")
    manifest = {
        "format": "tokenmill.sft",
        "version": 2,
        "template": template,
        "inputs": [os.fspath(p) for p in paths],
        "tokenizer": {"fingerprint": tokenizer.fingerprint, "n_vocab": tokenizer.n_vocab},
        "dtype": dtype,
        "documents": len(docs),
        "tokens": sum(map(len, docs)),
        "learned_tokens": sum(map(sum, masks)),
        "dropped_too_long": dropped,
        "loss_mask": os.path.basename(prefix + MASK_SUFFIX),
        # Same entries as prepare's manifest ("files": name, size, xxh3_128), plus the mask's files.
        "files": {
            "bin": _file_info(prefix + ".bin"),
            "idx": _file_info(prefix + ".idx"),
            "mask_bin": _file_info(prefix + MASK_SUFFIX + ".bin"),
            "mask_idx": _file_info(prefix + MASK_SUFFIX + ".idx"),
        },
    }
    write_atomic(prefix + ".json", json.dumps(manifest, indent=2))
    return manifest
