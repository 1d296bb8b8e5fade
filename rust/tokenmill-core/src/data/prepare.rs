//! Corpus preparation: raw documents -> token ids -> Megatron `PREFIX.bin/.idx` + `PREFIX.json`.
//!
//! Pipeline: one thread reads the inputs into chunks of a few MiB of raw records (bounded queue, so
//! memory stays bounded whatever the input size); chunks are validated and tokenized record by record
//! on a rayon pool, one job per record; results are written in input order while the pool works
//! on the next chunks. Output bytes therefore do not depend on the thread count.
//!
//! Design notes (2 cores; benches/bench_prepare.py, RESULTS.md):
//! - One job per record with two chunks queued ahead keeps both cores on tokenization. Rejected:
//!   one rayon `par_iter` per chunk joined with writing the previous chunk: split by count it left
//!   one thread with most of a chunk's bytes, and the join idled a core at the end of every chunk
//!   (0.66-0.87x our 2-thread `encode_batch` once that stopped serialising its list building).
//!   With a trivial byte-level encoder the pipeline alone (read, split, JSON, write, checksum)
//!   does 60-80 MB/s, so it is not the bottleneck of a BPE at ~10 MB/s.
//! - JSON lines are parsed on the workers, not the reader (see `jsonl.rs`).
//! - Chunk size 256 KiB .. 4 MiB made no measurable difference; 4 MiB bounds memory to a few chunks.

use crate::data::inputs::{
    shard_range, Chunk, ChunkReader, ExternalSource, Input, Record, RecordKind,
};
use crate::data::jsonl::{self, KeyError};
use crate::data::manifest::{
    self, clear_outputs, file_info, Files, InputInfo, Manifest, ShardInfo, Skipped, TokenizerInfo,
};
use crate::data::mmidx::{bin_path, idx_path, DType, IndexWriter};
use crate::par::Slots;
use crate::progress::Progress;
use crate::{Error, Result};
use std::borrow::Cow;
use std::collections::VecDeque;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;
use std::sync::mpsc::RecvTimeoutError;
use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};
use xxhash_rust::xxh3::Xxh3;

/// What preparation needs from a tokenizer.
pub trait DocumentEncoder: Sync {
    /// Token ids of one document (ordinary text: special-token strings are not special).
    fn encode(&self, text: &str) -> Vec<u32>;
    /// Number of ids (largest id + 1); picks the dtype as Megatron does.
    fn vocab_size(&self) -> usize;
    /// A stable hash of vocabulary, pattern and special tokens.
    fn fingerprint(&self) -> String;
}

impl DocumentEncoder for crate::bpe::Tokenizer {
    fn encode(&self, text: &str) -> Vec<u32> {
        self.encode_ordinary(text)
    }
    fn vocab_size(&self) -> usize {
        self.n_vocab()
    }
    fn fingerprint(&self) -> String {
        crate::bpe::Tokenizer::fingerprint(self)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OnError {
    /// Count and skip bad records; the manifest and the summary list them.
    Skip,
    /// Stop at the first bad record (in input order) with its file and line.
    Fail,
}

#[derive(Clone, Debug)]
pub struct PrepareOptions {
    pub text_key: String,
    pub eos_id: Option<u32>,
    pub on_error: OnError,
    /// Worker threads; `None`: all cores.
    pub num_workers: Option<usize>,
    /// Raw bytes per chunk handed to the workers.
    pub chunk_bytes: usize,
    pub num_shards: usize,
    pub shard_index: usize,
    /// Draw a progress line on stderr.
    pub progress: bool,
    /// Polled between chunks on the calling thread; `true` stops the run (nothing is left behind).
    pub interrupted: Option<fn() -> bool>,
}

impl Default for PrepareOptions {
    fn default() -> Self {
        PrepareOptions {
            text_key: "text".into(),
            eos_id: None,
            on_error: OnError::Skip,
            num_workers: None,
            chunk_bytes: 4 << 20,
            num_shards: 1,
            shard_index: 0,
            progress: false,
            interrupted: None,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum SkipKind {
    InvalidUtf8,
    MalformedJson,
    MissingKey,
    Empty,
}

#[derive(Debug)]
struct Skip {
    kind: SkipKind,
    line: u64,
    message: String,
}

fn utf8_error(bytes: &[u8], e: std::str::Utf8Error, line: u64) -> Skip {
    let at = e.valid_up_to();
    let before = &bytes[..at];
    let lines = before.iter().filter(|&&b| b == b'\n').count() as u64;
    let col = at
        - before
            .iter()
            .rposition(|&b| b == b'\n')
            .map_or(0, |p| p + 1);
    Skip {
        kind: SkipKind::InvalidUtf8,
        line: line + lines,
        message: format!(
            "invalid UTF-8 (byte 0x{:02x} at column {})",
            bytes[at],
            col + 1
        ),
    }
}

type Outcome = std::result::Result<Vec<u32>, Skip>;

/// Chunks whose records may be tokenizing at once, besides the one being written.
const IN_FLIGHT: usize = 2;
/// How often a wait checks for Ctrl-C.
const POLL: Duration = Duration::from_millis(100);

fn process(
    chunk: &Chunk,
    r: &Record,
    key: &str,
    enc: &dyn DocumentEncoder,
    eos: Option<u32>,
) -> Outcome {
    let bytes = chunk.text(r);
    let skip = |kind, message: String| Skip {
        kind,
        line: r.line,
        message,
    };
    let text = match r.kind {
        RecordKind::Missing => {
            return Err(skip(SkipKind::MissingKey, "missing text (null)".into()))
        }
        RecordKind::Text => {
            Cow::Borrowed(std::str::from_utf8(bytes).map_err(|e| utf8_error(bytes, e, r.line))?)
        }
        RecordKind::Json => {
            let line = std::str::from_utf8(bytes).map_err(|e| utf8_error(bytes, e, r.line))?;
            // A byte-order mark opening the file (Windows tools write one) is no part of the record;
            // JSON parsers may ignore it (RFC 8259 section 8.1).
            let line = match r.line {
                1 => line.strip_prefix('\u{feff}').unwrap_or(line),
                _ => line,
            };
            jsonl::text_under_key(line, key).map_err(|e| match e {
                KeyError::Malformed(m) => skip(SkipKind::MalformedJson, m),
                KeyError::Missing(m) => skip(SkipKind::MissingKey, m),
            })?
        }
    };
    if text.is_empty() {
        return Err(skip(SkipKind::Empty, "empty document".into()));
    }
    let mut ids = enc.encode(&text);
    ids.extend(eos);
    Ok(ids)
}

/// What the progress line shows besides the bytes read (on disk).
#[derive(Default)]
struct Counts {
    disk: u64,
    text: u64,
    tokens: u64,
    docs: u64,
    files_done: usize,
    files: usize,
}

impl Counts {
    fn detail(&self, secs: f64) -> String {
        format!(
            " | files {}/{} | {:.1} MB | {:.1} MB/s | {:.2}M tok/s | {} docs, {} tokens",
            self.files_done,
            self.files,
            self.text as f64 / 1e6,
            self.text as f64 / 1e6 / secs,
            self.tokens as f64 / 1e6 / secs,
            self.docs,
            self.tokens,
        )
    }
}

struct Sink<'a> {
    index: IndexWriter,
    inputs: &'a [Input],
    per_input: Vec<InputInfo>,
    skipped: Skipped,
    errors: Vec<String>,
    on_error: OnError,
    counts: Counts,
    progress: Progress,
}

impl Sink<'_> {
    fn write(&mut self, chunk: &Chunk, results: Vec<Outcome>) -> Result<()> {
        for (r, res) in chunk.records.iter().zip(results) {
            let info = &mut self.per_input[r.input];
            match res {
                Ok(ids) => {
                    self.index.add_document(&ids)?;
                    info.documents += 1;
                    info.tokens += ids.len() as u64;
                    self.counts.docs += 1;
                    self.counts.tokens += ids.len() as u64;
                }
                Err(s) => {
                    let path = &self.inputs[r.input].path;
                    if self.on_error == OnError::Fail {
                        return Err(Error::Record {
                            path: path.clone(),
                            line: s.line,
                            message: s.message,
                        });
                    }
                    info.skipped += 1;
                    match s.kind {
                        SkipKind::InvalidUtf8 => self.skipped.invalid_utf8 += 1,
                        SkipKind::MalformedJson => self.skipped.malformed_json += 1,
                        SkipKind::MissingKey => self.skipped.missing_key += 1,
                        SkipKind::Empty => self.skipped.empty_document += 1,
                    }
                    if self.errors.len() < manifest::MAX_ERRORS_KEPT {
                        self.errors
                            .push(format!("{}:{}: {}", path.display(), s.line, s.message));
                    }
                }
            }
        }
        let c = &mut self.counts;
        c.disk += chunk.disk_bytes;
        c.text += chunk.data.len() as u64;
        c.files_done += chunk.inputs_done;
        self.progress.update_with(c.disk, |secs| c.detail(secs));
        Ok(())
    }
}

fn stat(input: &Input) -> Result<(u64, u64)> {
    let md = std::fs::metadata(&input.path).map_err(|e| Error::io(&input.path, e))?;
    if !md.is_file() {
        return Err(Error::invalid(format!(
            "{}: not a regular file",
            input.path.display()
        )));
    }
    let mtime = md
        .modified()
        .ok()
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_nanos() as u64);
    Ok((md.len(), mtime))
}

/// Tokenize `inputs` (shard `opts.shard_index` of `opts.num_shards`) into `prefix.{bin,idx,json}`.
pub fn prepare<'a>(
    inputs: &'a [Input],
    prefix: &Path,
    encoder: &dyn DocumentEncoder,
    external: Option<&'a mut dyn ExternalSource>,
    opts: &PrepareOptions,
) -> Result<Manifest> {
    let n_vocab = encoder.vocab_size();
    if let Some(eos) = opts.eos_id {
        if eos as usize >= n_vocab {
            return Err(Error::invalid(format!(
                "eos id {eos} is outside the vocabulary of {n_vocab}"
            )));
        }
    }
    if opts.num_workers == Some(0) {
        return Err(Error::invalid("num_workers must be at least 1"));
    }
    // Stat every input (not only this shard's): the partition and the digest depend on all of them.
    let stats = inputs.iter().map(stat).collect::<Result<Vec<_>>>()?;
    let mut digest = Xxh3::new();
    // Paths, formats and sizes (not mtimes: copies of the inputs on each node may differ in those).
    for (input, (size, _)) in inputs.iter().zip(&stats) {
        digest.update(input.path.to_string_lossy().as_bytes());
        digest.update(&[0]);
        digest.update(format!("{:?}", input.format).as_bytes());
        digest.update(&size.to_le_bytes());
    }
    let sizes: Vec<u64> = stats.iter().map(|s| s.0).collect();
    let range = shard_range(&sizes, opts.num_shards, opts.shard_index)?;
    let mine = &inputs[range.clone()];
    let per_input = mine
        .iter()
        .zip(&stats[range.clone()])
        .map(|(i, &(size, mtime_ns))| InputInfo {
            path: i.path.to_string_lossy().into_owned(),
            format: i.format.name().into(),
            size,
            mtime_ns,
            documents: 0,
            tokens: 0,
            skipped: 0,
        })
        .collect();

    if let Some(dir) = prefix.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    }
    clear_outputs(prefix)?;
    let dtype = DType::for_vocab(n_vocab);
    let mut sink = Sink {
        index: IndexWriter::create(prefix, dtype)?,
        inputs: mine,
        per_input,
        skipped: Skipped::default(),
        errors: vec![],
        on_error: opts.on_error,
        counts: Counts {
            files: mine.len(),
            ..Counts::default()
        },
        progress: Progress::new(
            "prepare",
            "B",
            Some(sizes[range].iter().sum()),
            opts.progress,
        ),
    };
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(opts.num_workers.unwrap_or(0))
        .build()
        .map_err(|e| Error::invalid(format!("cannot start worker threads: {e}")))?;
    let check = || match opts.interrupted {
        Some(f) if f() => Err(Error::Interrupted(
            "prepare interrupted; no output was left behind".into(),
        )),
        _ => Ok(()),
    };
    let key = opts.text_key.as_str();
    let eos = opts.eos_id;
    std::thread::scope(|s| -> Result<()> {
        // Two chunks in flight at most: one being tokenized, one read ahead.
        let (tx, rx) = std::sync::mpsc::sync_channel::<Result<Chunk>>(1);
        let chunk_bytes = opts.chunk_bytes;
        s.spawn(move || {
            let mut reader = ChunkReader::new(mine, external, chunk_bytes);
            loop {
                let next = reader.next().transpose();
                let stop = !matches!(next, Some(Ok(_)));
                if let Some(msg) = next {
                    if tx.send(msg).is_err() {
                        return; // the writer stopped (error): stop reading
                    }
                }
                if stop {
                    return;
                }
            }
        });
        // Every record is its own job on the pool (sizes vary by 1000x), and the records of up to
        // IN_FLIGHT chunks are queued at once, so a chunk's last large record leaves no thread
        // idle: the previous design joined the tokenization of each chunk with the writing of the
        // one before, and the join cost ~10% of prepare on the stdlib corpus. This thread writes
        // each chunk, in order, as soon as all its records are done.
        pool.in_place_scope(|s| -> Result<()> {
            let mut queued: VecDeque<(Arc<Chunk>, Arc<Slots<Outcome>>)> = VecDeque::new();
            loop {
                // Waits poll for Ctrl-C, so a slow input (a pipe) or a huge record cannot delay it.
                let msg = match rx.recv_timeout(POLL) {
                    Ok(msg) => msg,
                    Err(RecvTimeoutError::Timeout) => {
                        check()?;
                        continue;
                    }
                    Err(RecvTimeoutError::Disconnected) => break,
                };
                check()?;
                let chunk = Arc::new(msg?);
                let results = Arc::new(Slots::new(chunk.records.len()));
                for i in 0..chunk.records.len() {
                    let (chunk, results) = (chunk.clone(), results.clone());
                    s.spawn(move |_| {
                        let r = &chunk.records[i];
                        results.set(
                            i,
                            catch_unwind(AssertUnwindSafe(|| {
                                process(&chunk, r, key, encoder, eos)
                            })),
                        );
                    });
                }
                queued.push_back((chunk, results));
                if queued.len() > IN_FLIGHT {
                    let (chunk, results) = queued.pop_front().expect("queued");
                    sink.write(&chunk, results.wait_all(POLL, check)?)?;
                }
            }
            while let Some((chunk, results)) = queued.pop_front() {
                sink.write(&chunk, results.wait_all(POLL, check)?)?;
            }
            Ok(())
        })
    })?;
    // A Ctrl-C that arrived at any point before this one leaves nothing behind.
    check()?;

    let Sink {
        index,
        per_input,
        skipped,
        errors,
        counts,
        mut progress,
        ..
    } = sink;
    let documents = index.num_documents() as u64;
    let tokens = index.num_tokens();
    index.finish()?;
    progress.finish_with(counts.disk, |secs| counts.detail(secs));
    let m = Manifest {
        format: manifest::FORMAT.into(),
        version: manifest::VERSION,
        tokenmill_version: env!("CARGO_PKG_VERSION").into(),
        tokenizer: TokenizerInfo {
            fingerprint: encoder.fingerprint(),
            n_vocab: n_vocab as u64,
        },
        dtype: dtype.name().into(),
        eos_id: eos,
        text_key: opts.text_key.clone(),
        shard: ShardInfo {
            index: opts.shard_index,
            count: opts.num_shards,
            inputs_digest: manifest::hex128(&digest),
        },
        inputs: per_input,
        documents,
        tokens,
        skipped,
        errors,
        files: Files {
            bin: file_info(&bin_path(prefix))?,
            idx: file_info(&idx_path(prefix))?,
        },
    };
    m.write(prefix)?;
    Ok(m)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::inputs::InputFormat;
    use crate::data::manifest::{merge, stats, verify};
    use crate::data::mmidx::IndexedDataset;
    use std::path::PathBuf;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// Byte-level: one id per UTF-8 byte; id 256 is EOS.
    struct Bytes;
    impl DocumentEncoder for Bytes {
        fn encode(&self, text: &str) -> Vec<u32> {
            text.bytes().map(u32::from).collect()
        }
        fn vocab_size(&self) -> usize {
            257
        }
        fn fingerprint(&self) -> String {
            "bytes-v1".into()
        }
    }

    fn tmpdir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("tm-prepare-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    fn corpus(d: &Path) -> Vec<Input> {
        let mut jsonl = String::new();
        for i in 0..300 {
            jsonl.push_str(&format!(
                "{{\"id\": {i}, \"text\": \"doc {i} \\u00e9\\n{}\"}}\n",
                "x".repeat(i % 17)
            ));
        }
        std::fs::write(d.join("a.jsonl"), &jsonl).unwrap();
        let mut bad =
            b"{\"text\": \"ok\"}\n{\"text\": 3}\n{\"nope\": \"x\"}\n{broken\n{\"text\": \"\"}\n"
                .to_vec();
        bad.extend_from_slice(b"{\"text\": \"caf\xe9\"}\n[1, 2]\n{\"text\": \"last\"}\n");
        std::fs::write(d.join("b.jsonl"), &bad).unwrap();
        std::fs::write(d.join("c.txt"), b"one\n--\ntwo\nlines\n--\n\xff\n--\nthree").unwrap();
        for i in 0..20 {
            std::fs::write(d.join(format!("w{i:02}.txt")), format!("whole file {i}\n")).unwrap();
        }
        let mut inputs = vec![
            Input {
                path: d.join("a.jsonl"),
                format: InputFormat::JsonLines,
            },
            Input {
                path: d.join("b.jsonl"),
                format: InputFormat::JsonLines,
            },
            Input {
                path: d.join("c.txt"),
                format: InputFormat::Text {
                    delimiter: Some("--".into()),
                },
            },
        ];
        for i in 0..20 {
            inputs.push(Input {
                path: d.join(format!("w{i:02}.txt")),
                format: InputFormat::Text { delimiter: None },
            });
        }
        inputs
    }

    fn opts(workers: usize, chunk_bytes: usize) -> PrepareOptions {
        PrepareOptions {
            eos_id: Some(256),
            num_workers: Some(workers),
            chunk_bytes,
            ..PrepareOptions::default()
        }
    }

    fn read_all(prefix: &Path) -> Vec<Vec<u32>> {
        let ds = IndexedDataset::open(prefix).unwrap();
        (0..ds.num_sequences())
            .map(|i| ds.sequence(i).unwrap())
            .collect()
    }

    fn files(prefix: &Path) -> (Vec<u8>, Vec<u8>) {
        (
            std::fs::read(bin_path(prefix)).unwrap(),
            std::fs::read(idx_path(prefix)).unwrap(),
        )
    }

    #[test]
    fn tokens_skips_and_manifest() {
        let d = tmpdir("basic");
        let inputs = corpus(&d);
        let prefix = d.join("out/ds");
        let m = prepare(&inputs, &prefix, &Bytes, None, &opts(2, 1 << 20)).unwrap();
        let docs = read_all(&prefix);
        let mut want: Vec<String> = (0..300)
            .map(|i| format!("doc {i} \u{e9}\n{}", "x".repeat(i % 17)))
            .collect();
        want.extend(["ok", "last", "one", "two\nlines", "three"].map(String::from));
        want.extend((0..20).map(|i| format!("whole file {i}\n")));
        assert_eq!(docs.len(), want.len());
        for (got, w) in docs.iter().zip(&want) {
            let mut ids: Vec<u32> = w.bytes().map(u32::from).collect();
            ids.push(256);
            assert_eq!(got, &ids);
        }
        assert_eq!(m.documents, want.len() as u64);
        assert_eq!(m.dtype, "uint16");
        let sk = &m.skipped;
        assert_eq!(
            (
                sk.invalid_utf8,
                sk.malformed_json,
                sk.missing_key,
                sk.empty_document
            ),
            (2, 2, 2, 1)
        );
        let b = d.join("b.jsonl").display().to_string();
        let c = d.join("c.txt").display().to_string();
        assert_eq!(
            m.errors,
            vec![
                format!("{b}:2: key \"text\" holds a number, not a string"),
                format!("{b}:3: missing key \"text\""),
                format!("{b}:4: malformed JSON: key must be a string at line 1 column 2"),
                format!("{b}:5: empty document"),
                format!("{b}:6: invalid UTF-8 (byte 0xe9 at column 14)"),
                format!("{b}:7: malformed JSON: invalid type: sequence, expected a JSON object at line 1 column 0"),
                format!("{c}:6: invalid UTF-8 (byte 0xff at column 1)"),
            ]
        );
        assert_eq!(m.inputs[1].skipped, 6);
        assert_eq!(m.inputs[1].documents, 2);
        assert_eq!(Manifest::read(&prefix).unwrap(), m);
        assert!(verify(&prefix).unwrap().is_empty());

        // Fail mode stops at the first bad record, in input order, and leaves no output behind.
        let mut o = opts(2, 64);
        o.on_error = OnError::Fail;
        let e = prepare(&inputs, &prefix, &Bytes, None, &o).unwrap_err();
        assert_eq!(
            e.to_string(),
            format!("{b}:2: key \"text\" holds a number, not a string")
        );
        assert!(matches!(e, Error::Record { line: 2, .. }));
        let left: Vec<_> = std::fs::read_dir(d.join("out")).unwrap().collect();
        assert!(left.is_empty(), "{left:?}");
        std::fs::remove_dir_all(&d).unwrap();
    }

    static CHECKS: AtomicUsize = AtomicUsize::new(0);
    static STOP_AT: AtomicUsize = AtomicUsize::new(usize::MAX);

    fn interrupt_hook() -> bool {
        CHECKS.fetch_add(1, Ordering::SeqCst) + 1 >= STOP_AT.load(Ordering::SeqCst)
    }

    #[test]
    fn ctrl_c_at_any_check_leaves_nothing() {
        let d = tmpdir("ctrlc");
        let inputs = corpus(&d);
        let run = |stop_at: usize, name: &str| {
            CHECKS.store(0, Ordering::SeqCst);
            STOP_AT.store(stop_at, Ordering::SeqCst);
            let prefix = d.join(name).join("ds");
            let o = PrepareOptions {
                interrupted: Some(interrupt_hook),
                ..opts(2, 64)
            };
            let r = prepare(&inputs, &prefix, &Bytes, None, &o);
            (r, CHECKS.load(Ordering::SeqCst), prefix)
        };
        let (r, checks, _) = run(usize::MAX, "full");
        r.unwrap();
        assert!(checks > 3, "one check per chunk and a last one: {checks}");
        // The first check, one in the middle, and the last one (after every chunk is written, before
        // the files are renamed into place).
        for (i, stop_at) in [1, checks / 2, checks].into_iter().enumerate() {
            let (r, _, prefix) = run(stop_at, &format!("stop{i}"));
            let err = r.unwrap_err().to_string();
            assert!(err.contains("interrupted"), "{err}");
            let left: Vec<_> = std::fs::read_dir(prefix.parent().unwrap())
                .unwrap()
                .collect();
            assert!(left.is_empty(), "stopped at check {stop_at}: {left:?}");
        }
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn identical_bytes_whatever_the_threads_and_chunks() {
        let d = tmpdir("det");
        let inputs = corpus(&d);
        let base = d.join("base");
        prepare(&inputs, &base, &Bytes, None, &opts(1, 1 << 20)).unwrap();
        let want = files(&base);
        for (w, c) in [(2, 1), (3, 100), (4, 4096), (2, 1 << 16)] {
            let p = d.join(format!("p{w}-{c}"));
            prepare(&inputs, &p, &Bytes, None, &opts(w, c)).unwrap();
            assert!(files(&p) == want, "workers={w} chunk={c}");
        }
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn shards_merge_to_the_single_run() {
        let d = tmpdir("shards");
        let inputs = corpus(&d);
        let single = d.join("single");
        let m1 = prepare(&inputs, &single, &Bytes, None, &opts(2, 1000)).unwrap();
        for n in [1, 2, 5, 30] {
            let shards: Vec<PathBuf> = (0..n).map(|i| d.join(format!("s{n}-{i}"))).collect();
            for (i, s) in shards.iter().enumerate() {
                let mut o = opts(2, 1000);
                o.num_shards = n;
                o.shard_index = i;
                prepare(&inputs, s, &Bytes, None, &o).unwrap();
            }
            let out = d.join(format!("merged{n}"));
            let mut rev = shards.clone();
            rev.reverse(); // order of arguments does not matter
            let m = merge(&rev, &out).unwrap();
            assert!(files(&out) == files(&single), "n={n}");
            assert_eq!(m.documents, m1.documents);
            assert_eq!(m.skipped, m1.skipped);
            assert_eq!(m.inputs, m1.inputs);
            assert!(verify(&out).unwrap().is_empty());
            if n > 1 {
                let e = merge(&shards[1..], &out).unwrap_err().to_string();
                assert!(e.contains("shards must be exactly indices"), "{e}");
            }
        }
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn merge_refuses_other_tokenizers_and_corrupt_shards() {
        struct Other;
        impl DocumentEncoder for Other {
            fn encode(&self, text: &str) -> Vec<u32> {
                Bytes.encode(text)
            }
            fn vocab_size(&self) -> usize {
                257
            }
            fn fingerprint(&self) -> String {
                "other".into()
            }
        }
        let d = tmpdir("mergebad");
        let inputs = corpus(&d);
        let (a, b) = (d.join("a"), d.join("b"));
        let mut o = opts(2, 1000);
        o.num_shards = 2;
        prepare(&inputs, &a, &Bytes, None, &o).unwrap();
        o.shard_index = 1;
        prepare(&inputs, &b, &Other, None, &o).unwrap();
        let e = merge(&[a.clone(), b.clone()], &d.join("m"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("tokenizer fingerprint other differs"), "{e}");
        prepare(&inputs, &b, &Bytes, None, &o).unwrap();
        let mut bytes = std::fs::read(bin_path(&b)).unwrap();
        bytes[2] ^= 1; // a letter becomes another letter: only the checksum can tell
        std::fs::write(bin_path(&b), &bytes).unwrap();
        let e = merge(&[a, b.clone()], &d.join("m"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("checksum does not match"), "{e}");
        assert!(!d.join("m.bin").exists() && !d.join("m.json").exists());
        let problems = verify(&b).unwrap();
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert!(problems[0].contains("checksum"));
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn stats_by_hand() {
        let d = tmpdir("stats");
        std::fs::write(
            d.join("a.jsonl"),
            "{\"text\":\"aab\"}\n{\"text\":\"a\"}\n{\"text\":\"abcdefgh\"}\n",
        )
        .unwrap();
        let inputs = vec![Input {
            path: d.join("a.jsonl"),
            format: InputFormat::JsonLines,
        }];
        let p = d.join("ds");
        let mut o = opts(1, 10);
        o.eos_id = None;
        prepare(&inputs, &p, &Bytes, None, &o).unwrap();
        let s = stats(&IndexedDataset::open(&p).unwrap(), 2).unwrap();
        assert_eq!(
            (s.documents, s.tokens, s.min_length, s.max_length),
            (3, 12, 1, 8)
        );
        assert_eq!(s.length_histogram, vec![(1, 2, 1), (2, 4, 1), (8, 16, 1)]);
        assert_eq!(s.top_tokens, vec![(b'a' as u32, 4), (b'b' as u32, 2)]);
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn stale_temporaries_and_old_outputs_are_cleared() {
        let d = tmpdir("stale");
        let inputs = corpus(&d);
        let p = d.join("ds");
        prepare(&inputs, &p, &Bytes, None, &opts(2, 1 << 20)).unwrap();
        // A killed run's leftovers (pid 999999999 does not exist).
        std::fs::write(d.join(".ds.bin.tmp-999999999"), b"partial").unwrap();
        std::fs::remove_file(manifest::manifest_path(&p)).unwrap();
        assert!(verify(&p).is_err(), "no manifest: not complete");
        prepare(&inputs, &p, &Bytes, None, &opts(2, 1 << 20)).unwrap();
        assert!(!d.join(".ds.bin.tmp-999999999").exists());
        assert!(verify(&p).unwrap().is_empty());
        std::fs::remove_dir_all(&d).unwrap();
    }
}
