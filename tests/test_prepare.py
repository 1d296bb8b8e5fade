"""Corpus preparation: Megatron reads our files and gets exactly Tokenizer.encode's tokens (+EOS);
bad records are counted or fatal with file:line; output bytes do not depend on threads, chunking or
sharding; a killed run leaves nothing that looks complete."""

from __future__ import annotations

import collections
import gzip
import importlib
import json
import os
import re
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import tokenmill as tm
from hypothesis import given, settings
from hypothesis import strategies as st

dp = importlib.import_module("tokenmill.data.prepare")

EOS = "<|endoftext|>"


def _ranks(extra_ids: int = 0) -> dict:
    """Byte-level ranks plus a few merges: a tiny but real BPE vocabulary."""
    ranks = {bytes([i]): i for i in range(256)}
    for m in [b"th", b"he", b"the", b" t", b" the", b"in", b"er", b"an", b"re", b"on", b" a", b"es"]:
        ranks[m] = len(ranks)
    for i in range(extra_ids):  # pad the vocabulary (ids beyond uint16 force int32 files)
        ranks[b"\x00\x00" + i.to_bytes(3, "big")] = len(ranks)
    return ranks


@pytest.fixture(scope="module")
def tok():
    ranks = _ranks()
    return tm.Tokenizer.from_tiktoken(ranks, pattern="gpt2", special_tokens={EOS: len(ranks)})


@pytest.fixture(scope="module")
def tok_path(tok, tmp_path_factory):
    p = tmp_path_factory.mktemp("tok") / "tok.json"
    tok.save(p)
    return p


def docs_corpus(n=300):
    docs = list(tm.corpus.stdlib_docstrings(max_docs=n))
    docs += ["ünïcödé ✓ 🚀 日本語", "<|endoftext|> is ordinary text here", " leading and trailing  "]
    return docs


def write_jsonl(path: Path, docs, key="text", ascii=True):
    with open(path, "w", encoding="utf-8") as f:
        for i, d in enumerate(docs):
            f.write(json.dumps({"id": i, key: d}, ensure_ascii=ascii) + "\n")
    return path


def megatron_read(prefix):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    ds = IndexedDataset(str(prefix), multimodal=False, mmap=True)
    return ds, [np.asarray(ds[i]).tolist() for i in range(len(ds))]


def expected(tok, docs, eos=True):
    e = [tok.special_tokens[EOS]] if eos else []
    return [list(tok.encode_ordinary(d)) + e for d in docs]


def files(prefix):
    return Path(f"{prefix}.bin").read_bytes(), Path(f"{prefix}.idx").read_bytes()


def test_megatron_reads_exactly_our_tokens(tok, tok_path, tmp_path):
    docs = docs_corpus()
    src = write_jsonl(tmp_path / "docs.jsonl", docs)
    m = dp.prepare(src, tmp_path / "out" / "ds", tok_path, num_workers=2)
    ds, got = megatron_read(tmp_path / "out" / "ds")
    assert ds.index.dtype == np.uint16
    assert got == expected(tok, docs)
    assert m["documents"] == len(docs) and m["tokens"] == sum(map(len, got))
    assert m["dtype"] == "uint16" and m["eos_id"] == tok.special_tokens[EOS]
    assert m["tokenizer"]["n_vocab"] == tok.n_vocab
    assert m["inputs"][0]["size"] == src.stat().st_size
    assert m["inputs"][0]["mtime_ns"] == src.stat().st_mtime_ns
    assert dp.verify(tmp_path / "out" / "ds") == []
    # The manifest's checksums are those of the files (independent hash of the bytes).
    xxhash = pytest.importorskip("xxhash")
    assert m["files"]["bin"]["xxh3_128"] == xxhash.xxh3_128_hexdigest(files(tmp_path / "out" / "ds")[0])


def test_public_names(tok, tmp_path):
    """tm.data.prepare / inspect / merge are callables, however the module was imported first."""
    src = write_jsonl(tmp_path / "a.jsonl", ["hello"])
    m = tm.data.prepare(src, tmp_path / "ds", tok)
    assert m["documents"] == 1 and tm.data.inspect(tmp_path / "ds")["tokens"] == m["tokens"]
    assert callable(tm.data.merge)


def test_int32_when_the_vocabulary_does_not_fit_uint16(tmp_path):
    ranks = _ranks(extra_ids=65_500)
    big = tm.Tokenizer.from_tiktoken(ranks, pattern="gpt2", special_tokens={EOS: len(ranks)})
    docs = ["the answer", "another document"]
    dp.prepare(write_jsonl(tmp_path / "a.jsonl", docs), tmp_path / "ds", big)
    ds, got = megatron_read(tmp_path / "ds")
    assert ds.index.dtype == np.int32
    assert got == expected(big, docs)
    assert got[0][-1] == len(ranks) > 65_535


@settings(max_examples=min(int(os.environ.get("HYPOTHESIS_MAX_EXAMPLES", "200")), 40))
@given(docs=st.lists(st.text(min_size=1, max_size=60), min_size=1, max_size=8), ascii=st.booleans())
def test_round_trip_decode(tok, tmp_path_factory, docs, ascii):
    """Documents -> JSON Lines (escaped or raw UTF-8) -> tokens -> decode gives the documents back."""
    d = tmp_path_factory.mktemp("rt")
    dp.prepare(write_jsonl(d / "a.jsonl", docs, ascii=ascii), d / "ds", tok, chunk_bytes=64)
    _, got = megatron_read(d / "ds")
    eos = tok.special_tokens[EOS]
    assert [g[-1] for g in got] == [eos] * len(docs)
    assert [tok.decode(g[:-1]) for g in got] == docs


def test_same_bytes_whatever_the_workers_and_chunks(tok, tmp_path):
    docs = docs_corpus(600)
    src = write_jsonl(tmp_path / "a.jsonl", docs)
    runs = {}
    for workers, chunk in [(1, 4 << 20), (2, 4 << 20), (3, 1000), (2, 1)]:
        p = tmp_path / f"w{workers}-{chunk}"
        dp.prepare(src, p, tok, num_workers=workers, chunk_bytes=chunk)
        runs[(workers, chunk)] = files(p)
    assert len(set(runs.values())) == 1


def test_inputs_formats_globs_and_directories(tok, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard

    docs = docs_corpus(40)
    d = tmp_path / "in"
    (d / "sub").mkdir(parents=True)
    body = "".join(json.dumps({"text": x}) + "\n" for x in docs[:10])
    (d / "b.jsonl.gz").write_bytes(gzip.compress(body.encode()))
    (d / "sub" / "c.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(body.encode()))
    (d / "a.txt").write_text(docs[10])
    (d / "d.txt").write_text("---\n".join(x + "\n" for x in docs[11:15]), encoding="utf-8")
    pq.write_table(pa.table({"text": docs[15:20] + [None], "n": list(range(6))}), d / "e.parquet")
    (d / "notes.csv").write_text("ignored: unknown suffix inside a directory")
    (d / "meta.json").write_text('{"ignored": "plain .json inside a directory"}')
    with pytest.warns(UserWarning, match=r"skipped 1 records \(1 missing key\)"):
        m = dp.prepare(d, tmp_path / "ds", tok, delimiter="---")
    names = [Path(i["path"]).relative_to(d).as_posix() for i in m["inputs"]]
    assert names == ["a.txt", "b.jsonl.gz", "d.txt", "e.parquet", "sub/c.jsonl.zst"]
    want = [docs[10]] + docs[:10] + docs[11:15] + docs[15:20] + docs[:10]
    assert megatron_read(tmp_path / "ds")[1] == expected(tok, want)
    assert m["skipped"]["missing_key"] == 1 and m["errors"] == [f"{d / 'e.parquet'}:6: missing text (null)"]
    # A glob expands sorted; the same files named one by one give the same bytes.
    m2 = dp.prepare(str(d / "*.txt"), tmp_path / "g", tok, delimiter="---")
    assert [Path(i["path"]).name for i in m2["inputs"]] == ["a.txt", "d.txt"]
    dp.prepare([d / "a.txt", d / "d.txt"], tmp_path / "h", tok, delimiter="---")
    assert files(tmp_path / "g") == files(tmp_path / "h")
    with pytest.raises(ValueError, match="no column 'body'"):
        dp.prepare(d / "e.parquet", tmp_path / "x", tok, text_key="body")
    with pytest.raises(FileNotFoundError, match="no file matches"):
        dp.prepare(str(d / "*.nothing"), tmp_path / "x", tok)


BAD = [
    # (line content, kind, message)
    (b'{"text": "caf\xe9"}', "invalid_utf8", "invalid UTF-8 (byte 0xe9 at column 14)"),
    (
        b'{"text": "unterminated}',
        "malformed_json",
        "malformed JSON: EOF while parsing a string at line 1 column 23",
    ),
    (b'{"title": "no text"}', "missing_key", 'missing key "text"'),
    (b'{"text": null}', "missing_key", 'key "text" holds null, not a string'),
    (b'{"text": ""}', "empty_document", "empty document"),
]


@pytest.mark.parametrize("line,kind,message", BAD, ids=[b[1] + str(i) for i, b in enumerate(BAD)])
def test_bad_records(tok, tmp_path, line, kind, message):
    src = tmp_path / "bad.jsonl"
    src.write_bytes(b'{"text": "good one"}\n' + line + b'\n{"text": "good two"}\n')
    with pytest.warns(UserWarning, match=f"skipped 1 records \\(1 {kind.replace('_', ' ')}\\)"):
        m = dp.prepare(src, tmp_path / "ds", tok)
    assert m["skipped"][kind] == 1 and sum(m["skipped"].values()) == 1
    assert m["errors"] == [f"{src}:2: {message}"]
    assert megatron_read(tmp_path / "ds")[1] == expected(tok, ["good one", "good two"])
    with pytest.raises(ValueError, match=f"^{re.escape(f'{src}:2: {message}')}$"):
        dp.prepare(src, tmp_path / "fail", tok, on_error="fail")
    assert list(tmp_path.glob("fail*")) == [] and list(tmp_path.glob(".fail*")) == []


def test_bad_text_files_report_the_line(tok, tmp_path):
    src = tmp_path / "t.txt"
    src.write_bytes(b"one\n==\ntwo\nthree \xff\n==\n\n==\nfour")
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        m = dp.prepare(src, tmp_path / "ds", tok, delimiter="==")
    assert m["errors"] == [f"{src}:4: invalid UTF-8 (byte 0xff at column 7)", f"{src}:6: empty document"]
    assert megatron_read(tmp_path / "ds")[1] == expected(tok, ["one", "four"])


def test_truncated_or_foreign_files_raise(tok, tmp_path):
    dp.prepare(write_jsonl(tmp_path / "a.jsonl", docs_corpus(50)), tmp_path / "ds", tok)
    bin_ = tmp_path / "ds.bin"
    data = bin_.read_bytes()
    bin_.write_bytes(data[:-2])
    with pytest.raises(ValueError, match="does not match the index"):
        dp.inspect(tmp_path / "ds")
    problems = dp.verify(tmp_path / "ds")
    assert any("size" in p for p in problems) and any("checksum" in p for p in problems)
    bin_.write_bytes(data)
    idx = tmp_path / "ds.idx"
    idx.write_bytes(b"PK\x03\x04 not an index at all, a zip file header" + b"\0" * 64)
    with pytest.raises(ValueError, match="not a Megatron MMIDIDX index"):
        dp.inspect(tmp_path / "ds")
    with pytest.raises(ValueError, match="verification failed"):
        dp.inspect(tmp_path / "ds", verify=True)


def test_inspect_stats_match_an_independent_count(tok, tmp_path):
    docs = docs_corpus(200)
    dp.prepare(write_jsonl(tmp_path / "a.jsonl", docs), tmp_path / "ds", tok)
    s = dp.inspect(tmp_path / "ds", verify=True, top_k=5)
    _, got = megatron_read(tmp_path / "ds")
    lengths = [len(g) for g in got]
    counts = collections.Counter(t for g in got for t in g)
    top = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:5]
    assert s["documents"] == len(docs) and s["tokens"] == sum(lengths)
    assert (s["min_length"], s["max_length"]) == (min(lengths), max(lengths))
    assert [tuple(t) for t in s["top_tokens"]] == top
    hist = collections.Counter(1 << (n.bit_length() - 1) for n in lengths)
    assert [(lo, c) for lo, _, c in s["length_histogram"]] == sorted(hist.items())
    assert s["manifest"]["documents"] == len(docs)


def test_shards_merge_to_the_single_run(tok, tmp_path):
    docs = docs_corpus(400)
    (tmp_path / "in").mkdir()
    for i in range(7):
        write_jsonl(tmp_path / "in" / f"part{i}.jsonl", docs[i * 50 : (i + 1) * 50])
    single = dp.prepare(tmp_path / "in", tmp_path / "single", tok)
    n = 3
    for i in range(n):
        m = dp.prepare(tmp_path / "in", tmp_path / f"shard{i}", tok, num_shards=n, shard_index=i)
        assert m["shard"]["index"] == i and m["shard"]["count"] == n
    merged = dp.merge([tmp_path / f"shard{i}" for i in (2, 0, 1)], tmp_path / "merged")
    assert files(tmp_path / "merged") == files(tmp_path / "single")
    assert merged["inputs"] == single["inputs"] and merged["tokens"] == single["tokens"]
    assert dp.verify(tmp_path / "merged") == []
    with pytest.raises(ValueError, match="all are needed"):
        dp.merge([tmp_path / "shard0", tmp_path / "shard1"], tmp_path / "m2")
    # Shards of another tokenizer do not merge.
    other = tm.Tokenizer.from_tiktoken(_ranks(), pattern="gpt2", special_tokens={"</s>": 300})
    dp.prepare(tmp_path / "in", tmp_path / "shard1", other, num_shards=n, shard_index=1)
    with pytest.raises(ValueError, match="tokenizer fingerprint"):
        dp.merge(str(tmp_path / "shard*"), tmp_path / "m3")


def run_cli(*args, **kw):
    return subprocess.run(
        [sys.executable, "-m", "tokenmill", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=300,
        **kw,
    )


def test_cli_prepare_inspect_merge(tok, tok_path, tmp_path):
    docs = docs_corpus(100)
    src = write_jsonl(tmp_path / "a.jsonl", docs, key="body")
    with open(src, "a") as f:
        f.write("{not json}\n")
    r = run_cli(
        "prepare", src, "--tokenizer", tok_path, "--output", tmp_path / "ds", "--text-key", "body", "-q"
    )
    assert r.returncode == 0, r.stderr
    assert f"{len(docs):,} documents" in r.stdout and f"{src}:{len(docs) + 1}: malformed JSON" in r.stdout
    r = run_cli(
        "prepare",
        src,
        "--tokenizer",
        tok_path,
        "-o",
        tmp_path / "f",
        "--text-key",
        "body",
        "--on-error",
        "fail",
    )
    assert r.returncode == 1 and f"{src}:{len(docs) + 1}: malformed JSON" in r.stderr
    r = run_cli("inspect", tmp_path / "ds", "--verify", "--tokenizer", tok_path)
    assert r.returncode == 0, r.stderr
    assert "verified" in r.stdout and "top tokens" in r.stdout
    for i in range(2):
        r = run_cli("prepare", src, "--tokenizer", tok_path, "-o", tmp_path / f"s{i}", "--text-key", "body",
                    "--num-shards", 2, "--shard-index", i, "-q")  # fmt: skip
        assert r.returncode == 0, r.stderr
    r = run_cli("merge", tmp_path / "s1", tmp_path / "s0", "--output", tmp_path / "m")
    assert r.returncode == 0, r.stderr
    assert files(tmp_path / "m") == files(tmp_path / "ds")
    r = run_cli("prepare", "--merge", tmp_path / "s*", "--output", tmp_path / "m2")
    assert r.returncode == 0, r.stderr
    assert files(tmp_path / "m2") == files(tmp_path / "ds")
    data = bytearray((tmp_path / "ds.bin").read_bytes())
    data[10] ^= 0x01
    (tmp_path / "ds.bin").write_bytes(bytes(data))
    r = run_cli("inspect", tmp_path / "ds", "--verify")
    assert r.returncode == 1 and "checksum" in r.stderr


def test_killed_run_leaves_nothing_complete_and_rerun_is_clean(tok_path, tmp_path):
    # Enough input that the run takes a few seconds on one worker.
    doc = json.dumps({"text": "".join(tm.corpus.stdlib_docstrings(max_docs=400))}) + "\n"
    src = tmp_path / "big.jsonl"
    src.write_text(doc * 200)
    out = tmp_path / "out"
    out.mkdir()
    cmd = [sys.executable, "-m", "tokenmill", "prepare", str(src), "--tokenizer", str(tok_path), "-o",
           str(out / "ds"), "--workers", "1", "-q"]  # fmt: skip
    # A complete earlier run at the same prefix must not survive as "complete" either.
    assert subprocess.run(cmd, capture_output=True).returncode == 0
    reference = files(out / "ds")
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while not list(out.glob(".ds.bin.tmp-*")) and time.time() < deadline:
        time.sleep(0.01)
    time.sleep(0.05)
    os.kill(p.pid, signal.SIGKILL)
    assert p.wait() == -signal.SIGKILL, "the run ended before it could be killed"
    assert not (out / "ds.json").exists() and not (out / "ds.idx").exists()
    with pytest.raises(FileNotFoundError):
        dp.verify(out / "ds")
    assert subprocess.run(cmd, capture_output=True).returncode == 0
    assert files(out / "ds") == reference
    assert dp.verify(out / "ds") == []
    assert sorted(f.name for f in out.iterdir()) == ["ds.bin", "ds.idx", "ds.json"]


def test_ctrl_c_stops_cleanly(tok_path, tmp_path):
    doc = json.dumps({"text": "".join(tm.corpus.stdlib_docstrings(max_docs=400))}) + "\n"
    src = tmp_path / "big.jsonl"
    src.write_text(doc * 200)
    cmd = [sys.executable, "-m", "tokenmill", "prepare", str(src), "--tokenizer", str(tok_path), "-o",
           str(tmp_path / "out" / "ds"), "--workers", "1", "-q", "--chunk-bytes", "65536"]  # fmt: skip
    p = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        # A test run started as a background job of a non-interactive shell ignores SIGINT, and the
        # child would inherit that (Python then installs no KeyboardInterrupt handler).
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    deadline = time.time() + 60
    while not list(tmp_path.glob("out/.ds.bin.tmp-*")) and time.time() < deadline:
        time.sleep(0.01)
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 130, err
    assert "interrupted" in err
    assert list((tmp_path / "out").iterdir()) == []


def test_argument_errors(tok, tmp_path):
    src = write_jsonl(tmp_path / "a.jsonl", ["x"])
    with pytest.raises(ValueError, match="on_error"):
        dp.prepare(src, tmp_path / "ds", tok, on_error="ignore")
    with pytest.raises(ValueError, match="shard_index"):
        dp.prepare(src, tmp_path / "ds", tok, num_shards=2, shard_index=2)
    with pytest.raises(ValueError, match="eos_token"):
        dp.prepare(src, tmp_path / "ds", tok, eos_token="</s>")
    with pytest.raises(ValueError, match="input_format must be"):
        dp.prepare(src, tmp_path / "ds", tok, input_format="csv")
    (tmp_path / "a.csv").write_text("x")
    with pytest.raises(ValueError, match="a.csv: unknown input format"):
        dp.prepare(tmp_path / "a.csv", tmp_path / "ds", tok)
    no_eos = tm.Tokenizer.from_tiktoken(_ranks(), pattern="gpt2")
    with pytest.raises(ValueError, match="append_eos=False"):
        dp.prepare(src, tmp_path / "ds", no_eos)
    dp.prepare(src, tmp_path / "ds", no_eos, append_eos=False)
    assert megatron_read(tmp_path / "ds")[1] == [list(no_eos.encode_ordinary("x"))]


class _Boom(Exception):
    pass


def test_parquet_source_errors_keep_their_type(tok, tmp_path, monkeypatch):
    """An exception raised inside the Parquet source comes back from prepare as raised (type and message),
    not as a ValueError, and nothing is left behind."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["a", "b"]}), tmp_path / "in.parquet")

    def next_batch(self):
        raise _Boom("reader broke at batch 0")

    monkeypatch.setattr(dp._ParquetSource, "next_batch", next_batch)
    with pytest.raises(_Boom, match="reader broke at batch 0"):
        dp.prepare(tmp_path / "in.parquet", tmp_path / "out" / "ds", tok)
    assert not list((tmp_path / "out").iterdir())


def test_output_prefix_must_name_a_file(tok, tmp_path):
    """A prefix ending in a separator would write hidden dir/.bin, dir/.idx: refused before any work by
    prepare, merge and prepare_sft; a prefix given with .bin/.idx is the dataset the readers open."""
    src = write_jsonl(tmp_path / "a.jsonl", ["some text"])
    (tmp_path / "out").mkdir()
    for call in (
        lambda p: dp.prepare(src, p, tok),
        lambda p: dp.merge(tmp_path / "nope", p),
        lambda p: tm.data.prepare_sft(src, p, tok),
    ):
        for p in (f"{tmp_path / 'out'}{os.sep}", f"{tmp_path / 'out'}{os.sep}."):
            with pytest.raises(ValueError, match="names a directory, not a file prefix"):
                call(p)
    assert list((tmp_path / "out").iterdir()) == []
    dp.prepare(src, tmp_path / "out" / "ds.bin", tok)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["ds.bin", "ds.idx", "ds.json"]
    assert megatron_read(tmp_path / "out" / "ds")[1] == expected(tok, ["some text"])
    assert list(tm.data.TokenDataset(tmp_path / "out" / "ds.bin")[0]) == expected(tok, ["some text"])[0]


def test_jsonl_written_by_windows_tools(tok, tmp_path):
    """A byte-order mark opening the file, CRLF line ends and no final newline: every record is read, as
    Python's json module reads the file decoded with utf-8-sig (the BOM used to make line 1 malformed)."""
    raw = "\ufeff" + "\r\n".join(json.dumps({"text": t}) for t in ["first", "zweite ä", "last"])
    src = tmp_path / "win.jsonl"
    src.write_bytes(raw.encode())
    want = [json.loads(line)["text"] for line in src.read_bytes().decode("utf-8-sig").splitlines()]
    m = dp.prepare(src, tmp_path / "ds", tok, on_error="fail")
    assert m["errors"] == [] and megatron_read(tmp_path / "ds")[1] == expected(tok, want)
    # Only the file's first bytes: a BOM inside a later line is still malformed JSON.
    src.write_bytes(b'{"text": "a"}\n\xef\xbb\xbf{"text": "b"}\n')
    with pytest.raises(ValueError, match=r"win\.jsonl:2: malformed JSON"):
        dp.prepare(src, tmp_path / "ds2", tok, on_error="fail")


def test_inspect_verify_merge_take_a_bin_or_idx_path(tok, tmp_path):
    """As TokenDataset and DataLoader do, `data/ds.bin` / `data/ds.idx` name the dataset `data/ds`
    (inspect used to look for data/ds.bin.json and data/ds.idx.idx)."""
    dp.prepare(write_jsonl(tmp_path / "a.jsonl", ["one doc", "two docs"]), tmp_path / "ds", tok)
    for name in ("ds.bin", "ds.idx"):
        assert dp.verify(tmp_path / name) == []
        assert dp.inspect(tmp_path / name, verify=True)["documents"] == 2
    dp.merge(tmp_path / "ds.bin", tmp_path / "m")
    assert files(tmp_path / "m") == files(tmp_path / "ds")
