"""WER/CER against jiwer (the peer), metric properties, and hand-checked examples."""

import jiwer
import pytest
import tokenmill as tm
from hypothesis import assume, given
from hypothesis import strategies as st
from tokenmill import _core

# Words from a small alphabet so that hits, substitutions and ties all occur; separators include the
# whitespace jiwer treats specially (a lone tab stays inside a word, runs collapse).
WORDS = st.sampled_from(["a", "b", "c", "ab", "é", "日本", "🙂", "x\u0301", "Zz", "1234567"])
SEPS = st.sampled_from([" ", " ", "  ", "\t", " \t", "\n", "\u3000", "\u00a0 ", "\x1f"])


@st.composite
def sentences(draw, max_words=12):
    words = draw(st.lists(WORDS, max_size=max_words))
    out = draw(st.sampled_from(["", " ", "\t"]))
    for w in words:
        out += w + draw(SEPS)
    return out


def jiwer_counts(refs, hyps, chars=False):
    out = jiwer.process_characters(refs, hyps) if chars else jiwer.process_words(refs, hyps)
    return out.hits, out.substitutions, out.deletions, out.insertions


@given(st.lists(st.tuples(sentences(), sentences()), min_size=1, max_size=6))
def test_word_counts_and_wer_match_jiwer(pairs):
    refs, hyps = [p[0] for p in pairs], [p[1] for p in pairs]
    ours = tm.eval.word_edit_ops(refs, hyps)
    assert (ours.hits, ours.substitutions, ours.deletions, ours.insertions) == jiwer_counts(refs, hyps)
    assume(ours.hits + ours.substitutions + ours.deletions > 0)
    assert tm.eval.wer(refs, hyps) == pytest.approx(jiwer.wer(refs, hyps), abs=1e-12)


@given(st.lists(st.tuples(sentences(6), sentences(6)), min_size=1, max_size=4))
def test_char_counts_and_cer_match_jiwer(pairs):
    refs, hyps = [p[0] for p in pairs], [p[1] for p in pairs]
    ours = tm.eval.char_edit_ops(refs, hyps)
    assert (ours.hits, ours.substitutions, ours.deletions, ours.insertions) == jiwer_counts(
        refs, hyps, chars=True
    )
    assume(ours.hits + ours.substitutions + ours.deletions > 0)
    assert tm.eval.cer(refs, hyps) == pytest.approx(jiwer.cer(refs, hyps), abs=1e-12)


@given(st.text(max_size=40), st.text(max_size=40))
def test_arbitrary_unicode_matches_jiwer(ref, hyp):
    # Any text at all, control characters and lone whitespace included.
    assume(ref.strip())
    ours = tm.eval.char_edit_ops(ref, hyp)
    assert (ours.hits, ours.substitutions, ours.deletions, ours.insertions) == jiwer_counts(
        [ref], [hyp], chars=True
    )
    assume(jiwer.process_words(ref, hyp).references[0])
    ours = tm.eval.word_edit_ops(ref, hyp)
    assert (ours.hits, ours.substitutions, ours.deletions, ours.insertions) == jiwer_counts([ref], [hyp])


ID_SEQ = st.lists(st.integers(0, 5), max_size=25)


@given(ID_SEQ, ID_SEQ, ID_SEQ)
def test_levenshtein_is_a_metric(a, b, c):
    d = tm.eval.levenshtein
    assert d(a, a) == 0
    assert d(a, b) == d(b, a)
    assert d(a, c) <= d(a, b) + d(b, c)
    assert (d(a, b) == 0) == (a == b)
    assert abs(len(a) - len(b)) <= d(a, b) <= max(len(a), len(b))


@given(sentences())
def test_identity_gives_zero(s):
    assume(s.strip())
    assert tm.eval.wer(s, s) == 0.0
    assert tm.eval.cer(s, s) == 0.0


@given(sentences(), sentences())
def test_alignment_replays_to_hypothesis(ref, hyp):
    ops = tm.eval.word_edit_ops(ref, hyp)
    rebuilt = [ops.hypothesis[j] for op, _, j in ops.alignment if op != "delete"]
    assert rebuilt == ops.hypothesis
    for op, i, j in ops.alignment:
        if op == "equal":
            assert ops.reference[i] == ops.hypothesis[j]
        if op == "substitute":
            assert ops.reference[i] != ops.hypothesis[j]


def test_hand_checked_examples():
    assert tm.eval.wer("the cat sat on the mat", "the cat sit on mat") == pytest.approx(2 / 6)
    assert tm.eval.cer("kitten", "sitting") == pytest.approx(3 / 6)
    # Insertions push WER above 1.
    assert tm.eval.wer("hello", "oh hello there friend") == 3.0
    # Corpus level: total edits over total reference words, not a mean of rates.
    assert tm.eval.wer(["a b c d", "e"], ["a b c d", "f"]) == pytest.approx(1 / 5)
    # Code points, not bytes: one substitution in five characters.
    assert tm.eval.cer("naïve", "naive") == pytest.approx(1 / 5)
    ops = tm.eval.word_edit_ops("a b c", "a x c d")
    assert ops.alignment == [("equal", 0, 0), ("substitute", 1, 1), ("equal", 2, 2), ("insert", None, 3)]


def test_normalisation_is_opt_in():
    assert tm.eval.wer("Hello, World!", "hello world") == 1.0
    assert tm.eval.wer("Hello, World!", "hello world", lowercase=True, remove_punctuation=True) == 0.0
    assert tm.eval.wer("a\tb", "a b") == 2.0  # jiwer keeps "a\tb" as one word ...
    assert tm.eval.wer("a\tb", "a b", collapse_whitespace=True) == 0.0  # ... unless asked not to
    assert tm.eval.cer("STRASSE", "straße", lowercase=True) == 0.0


def test_errors_are_clear():
    with pytest.raises(ValueError, match="reference is empty"):
        tm.eval.wer("", "something")
    with pytest.raises(ValueError, match="reference is empty"):
        tm.eval.cer(["  ", ""], ["x", ""])
    assert tm.eval.wer("", "") == 0.0
    with pytest.raises(ValueError, match="same number"):
        tm.eval.wer(["a", "b"], ["a"])
    with pytest.raises(TypeError, match=r"hypothesis\[1\]"):
        tm.eval.wer(["a", "b"], ["a", 3])


def test_binding_never_panics():
    """Inputs a careless binding would panic on all surface as ordinary Python exceptions."""
    with pytest.raises(ValueError, match="unit must be"):
        _core.edit_counts(["a"], ["a"], "syllable")
    with pytest.raises(ValueError, match="lists differ"):
        _core.edit_counts(["a"], [], "word")
    with pytest.raises(ValueError, match="undefined"):
        _core.error_rate((0, 0, 0, 7), "char")
    with pytest.raises(OverflowError):
        _core.levenshtein([-1], [2**40])
    with pytest.raises(UnicodeEncodeError):
        _core.edit_counts(["\ud800"], ["x"], "char")  # a lone surrogate is not valid UTF-8
    with pytest.raises(TypeError):
        _core.align(None, "x", "word")
    # Big inputs are fine and linear in memory for counts.
    long = "a " * 20_000
    assert tm.eval.wer(long, long + "b") == pytest.approx(1 / 20_000)


def test_perplexity_matches_float64_cross_entropy():
    import math

    import torch
    import torch.nn.functional as F
    from tokenmill.model import Llama, LlamaConfig

    torch.manual_seed(0)
    model = Llama(LlamaConfig.preset("tiny"))
    g = torch.Generator().manual_seed(1)
    batches = []
    for _ in range(3):
        x = torch.randint(0, 512, (2, 17), generator=g)
        labels = x[:, 1:].clone()
        labels[0, :5] = -100  # a prompt that is not scored
        batches.append({"input_ids": x[:, :-1], "labels": labels})
    got = tm.eval.perplexity(model, batches)
    with torch.no_grad():
        logits = torch.cat([model(b["input_ids"]).double().reshape(-1, 512) for b in batches])
        targets = torch.cat([b["labels"].reshape(-1) for b in batches])
        want = F.cross_entropy(logits, targets, ignore_index=-100).item()
    assert got["tokens"] == int((targets != -100).sum()) == 3 * 2 * 16 - 3 * 5
    assert got["loss"] == pytest.approx(want, rel=1e-5)
    assert got["perplexity"] == pytest.approx(math.exp(want), rel=1e-5)
    assert tm.eval.perplexity(model, batches, max_batches=1)["tokens"] == 2 * 16 - 5
    assert tm.eval.bits_per_byte(got["loss"], got["tokens"], 4 * got["tokens"]) == pytest.approx(
        want / math.log(2) / 4, rel=1e-5
    )
    with pytest.raises(ValueError, match="no scored tokens"):
        tm.eval.perplexity(
            model, [{"input_ids": batches[0]["input_ids"], "labels": torch.full((2, 16), -100)}]
        )


def test_perplexity_cli_on_token_files(tmp_path, capsys):
    """`tokenmill eval perplexity CHECKPOINT DATA` against a float64 cross-entropy over the same batches,
    and bits per byte against the bytes the scored tokens decode to."""
    import json
    import math

    import torch
    import torch.nn.functional as F
    from safetensors.torch import save_file
    from tokenmill import cli
    from tokenmill.data import DataLoader
    from tokenmill.data.dataset import write_token_file
    from tokenmill.model import Llama, LlamaConfig

    texts = ["The quick brown fox jumps over the lazy dog. " * (i % 5 + 1) + str(i) for i in range(40)]
    tok = tm.Tokenizer.train(texts, vocab_size=300, special_tokens=["<|endoftext|>"], show_progress=False)
    eos = tok.special_tokens["<|endoftext|>"]
    prefix = str(tmp_path / "val")
    write_token_file(prefix, [tok.encode_ordinary(t) + [eos] for t in texts], dtype="uint16")

    torch.manual_seed(0)
    cfg = LlamaConfig.preset("tiny")
    model = Llama(cfg)
    ckpt = tmp_path / "run" / "checkpoints" / "step_00000007"
    ckpt.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(ckpt / "model.safetensors"))
    tok.save(str(ckpt / "tok.tokenmill"))
    (ckpt / "meta.json").write_text(json.dumps({"model": cfg.to_dict(), "tokenizer": "tok.tokenmill"}))

    # The run folder resolves to its latest checkpoint; the tokenizer comes from meta.json.
    argv = ["eval", "perplexity", str(tmp_path / "run"), prefix, "--seq-len", "32", "--batch-size", "3"]
    assert cli.main([*argv, "--json", "--device", "cpu"]) == 0
    got = json.loads(capsys.readouterr().out)

    total, count, nbytes = 0.0, 0, 0
    loader = DataLoader(prefix, seq_len=32, batch_size=3, epochs=1, drop_last=False, prefetch=0)
    with torch.no_grad():
        for b in loader:
            logits = model(b["input_ids"], position_ids=b["position_ids"]).double()
            labels = b["labels"].reshape(-1)
            total += F.cross_entropy(logits.reshape(-1, cfg.vocab_size), labels, reduction="sum").item()
            scored = labels[labels != -100].tolist()
            count += len(scored)
            nbytes += sum(len(tok.decode_bytes([i])) for i in scored if i != eos)
    # Every token is scored once, except each document's last (its label would be the next document's).
    assert got["tokens"] == count == sum(len(tok.encode_ordinary(t)) for t in texts)
    assert got["loss"] == pytest.approx(total / count, rel=1e-5)
    assert got["perplexity"] == pytest.approx(math.exp(total / count), rel=1e-5)
    assert got["text_bytes"] == nbytes
    assert got["bits_per_byte"] == pytest.approx(total / math.log(2) / nbytes, rel=1e-5)
    assert got["checkpoint"] == str(ckpt)

    assert cli.main([*argv, "--max-batches", "1"]) == 0
    assert capsys.readouterr().out.startswith("perplexity ")
    assert cli.main(["eval", "perplexity", str(tmp_path), prefix]) == 1
    assert "no checkpoints/step_* inside" in capsys.readouterr().err
