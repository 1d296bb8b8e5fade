//! Reading raw corpora as a stream of document chunks: plain text (one document per file, or
//! documents separated by a delimiter line), JSON Lines (optionally gzip/zstd-compressed), and
//! "external" inputs whose records a caller supplies in batches (Parquet, read by pyarrow).
//!
//! A [`Chunk`] holds a few MiB of raw document bytes plus the position of every record; records are
//! validated and tokenized later, in parallel, so this reader only splits bytes.

use crate::{Error, Result};
use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum InputFormat {
    /// Plain text: the whole file is one document, or, with a delimiter, documents are separated by
    /// lines equal to it (a trailing `\r` is ignored when comparing).
    Text { delimiter: Option<String> },
    /// One JSON object per line; the text comes from the configured key. Blank lines are ignored.
    JsonLines,
    /// Records come from an [`ExternalSource`] (e.g. a Parquet text column read by pyarrow).
    External,
}

impl InputFormat {
    pub fn name(&self) -> &'static str {
        match self {
            InputFormat::Text { .. } => "text",
            InputFormat::JsonLines => "jsonl",
            InputFormat::External => "external",
        }
    }
}

#[derive(Clone, Debug)]
pub struct Input {
    pub path: PathBuf,
    pub format: InputFormat,
}

/// Supplies the records of [`InputFormat::External`] inputs, batch by batch, in order. `None` in a
/// batch marks a record whose text is missing (a null cell).
pub trait ExternalSource: Send {
    fn open(&mut self, path: &Path) -> Result<()>;
    fn next_batch(&mut self) -> Result<Option<Vec<Option<Vec<u8>>>>>;
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RecordKind {
    /// Raw document bytes (must be UTF-8).
    Text,
    /// One JSON line; the text is under the configured key.
    Json,
    /// A record whose text is absent (external null).
    Missing,
}

#[derive(Clone, Debug)]
pub struct Record {
    pub input: usize,
    /// 1-based line (text, JSON Lines) or row (external) where the record starts.
    pub line: u64,
    pub start: usize,
    pub end: usize,
    pub kind: RecordKind,
}

#[derive(Default)]
pub struct Chunk {
    pub data: Vec<u8>,
    pub records: Vec<Record>,
    /// Bytes of input files (as stored on disk, i.e. compressed) consumed since the previous chunk.
    pub disk_bytes: u64,
    /// Inputs that ended within this chunk (their index), for progress reporting.
    pub inputs_done: usize,
}

impl Chunk {
    pub fn text(&self, r: &Record) -> &[u8] {
        &self.data[r.start..r.end]
    }
}

/// Counts the bytes read from the underlying (possibly compressed) file.
struct Counting<R> {
    inner: R,
    count: Arc<AtomicU64>,
}

impl<R: Read> Read for Counting<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.count.fetch_add(n as u64, Ordering::Relaxed);
        Ok(n)
    }
}

fn has_suffix(path: &Path, suffix: &str) -> bool {
    path.to_string_lossy()
        .to_ascii_lowercase()
        .ends_with(suffix)
}

/// Open `path`, decompressing `.gz` and `.zst` transparently.
fn open_decoded(path: &Path, count: Arc<AtomicU64>) -> Result<Box<dyn BufRead + Send>> {
    let file = File::open(path).map_err(|e| Error::io(path, e))?;
    let raw = Counting { inner: file, count };
    const BUF: usize = 1 << 20;
    Ok(if has_suffix(path, ".gz") {
        Box::new(BufReader::with_capacity(
            BUF,
            flate2::read::MultiGzDecoder::new(BufReader::with_capacity(BUF, raw)),
        ))
    } else if has_suffix(path, ".zst") || has_suffix(path, ".zstd") {
        let dec = zstd::stream::read::Decoder::new(raw).map_err(|e| Error::io(path, e))?;
        Box::new(BufReader::with_capacity(BUF, dec))
    } else {
        Box::new(BufReader::with_capacity(BUF, raw))
    })
}

fn strip_newline(line: &[u8]) -> &[u8] {
    let line = line.strip_suffix(b"\n").unwrap_or(line);
    line.strip_suffix(b"\r").unwrap_or(line)
}

/// Reads the inputs in order and hands out chunks of at least `chunk_bytes` (unless the inputs end),
/// cut only between records.
pub struct ChunkReader<'a> {
    inputs: &'a [Input],
    external: Option<&'a mut dyn ExternalSource>,
    chunk_bytes: usize,
    next_input: usize,
    current: Option<Current>,
    chunk: Chunk,
    disk: Arc<AtomicU64>,
    disk_reported: u64,
}

enum Current {
    Lines {
        input: usize,
        reader: Box<dyn BufRead + Send>,
        line: u64,
        delimiter: Option<Vec<u8>>,
        json: bool,
    },
    External {
        input: usize,
        row: u64,
    },
}

impl<'a> ChunkReader<'a> {
    pub fn new(
        inputs: &'a [Input],
        external: Option<&'a mut dyn ExternalSource>,
        chunk_bytes: usize,
    ) -> Self {
        ChunkReader {
            inputs,
            external,
            chunk_bytes: chunk_bytes.max(1),
            next_input: 0,
            current: None,
            chunk: Chunk::default(),
            disk: Arc::new(AtomicU64::new(0)),
            disk_reported: 0,
        }
    }

    fn full(&self) -> bool {
        self.chunk.data.len() >= self.chunk_bytes
    }

    fn take_chunk(&mut self, carry_from: usize) -> Chunk {
        let mut next = Chunk {
            data: self.chunk.data.split_off(carry_from),
            ..Chunk::default()
        };
        next.data.reserve(self.chunk_bytes);
        let mut done = std::mem::replace(&mut self.chunk, next);
        let disk = self.disk.load(Ordering::Relaxed);
        done.disk_bytes = disk - self.disk_reported;
        self.disk_reported = disk;
        done
    }

    fn push(&mut self, input: usize, line: u64, start: usize, end: usize, kind: RecordKind) {
        self.chunk.records.push(Record {
            input,
            line,
            start,
            end,
            kind,
        });
    }

    /// The next chunk, or `None` when every input has been read.
    #[allow(clippy::should_implement_trait)]
    pub fn next(&mut self) -> Result<Option<Chunk>> {
        loop {
            if self.current.is_none() {
                if self.next_input == self.inputs.len() {
                    let c = self.take_chunk(self.chunk.data.len());
                    return Ok(if c.records.is_empty() && c.inputs_done == 0 {
                        None
                    } else {
                        Some(c)
                    });
                }
                let i = self.next_input;
                self.next_input += 1;
                let input = &self.inputs[i];
                match &input.format {
                    InputFormat::Text { delimiter: None } => {
                        let mut r = open_decoded(&input.path, self.disk.clone())?;
                        let start = self.chunk.data.len();
                        r.read_to_end(&mut self.chunk.data)
                            .map_err(|e| Error::io(&input.path, e))?;
                        let end = self.chunk.data.len();
                        self.push(i, 1, start, end, RecordKind::Text);
                        self.chunk.inputs_done += 1;
                        if self.full() {
                            return Ok(Some(self.take_chunk(self.chunk.data.len())));
                        }
                        continue;
                    }
                    InputFormat::Text { delimiter: Some(d) } => {
                        self.current = Some(Current::Lines {
                            input: i,
                            reader: open_decoded(&input.path, self.disk.clone())?,
                            line: 0,
                            delimiter: Some(d.as_bytes().to_vec()),
                            json: false,
                        })
                    }
                    InputFormat::JsonLines => {
                        self.current = Some(Current::Lines {
                            input: i,
                            reader: open_decoded(&input.path, self.disk.clone())?,
                            line: 0,
                            delimiter: None,
                            json: true,
                        })
                    }
                    InputFormat::External => {
                        let ext = self.external.as_mut().ok_or_else(|| {
                            Error::invalid(format!(
                                "{}: no reader for this input format",
                                input.path.display()
                            ))
                        })?;
                        ext.open(&input.path)?;
                        self.current = Some(Current::External { input: i, row: 0 });
                    }
                }
            }
            if let Some(chunk) = self.fill()? {
                return Ok(Some(chunk));
            }
        }
    }

    /// Read from the current input until a chunk is full (returned) or the input ends (`None`).
    fn fill(&mut self) -> Result<Option<Chunk>> {
        match self.current.take() {
            None => Ok(None),
            Some(Current::External { input, mut row }) => {
                let path = &self.inputs[input].path;
                let ext = self.external.as_mut().expect("checked on open");
                match ext.next_batch()? {
                    None => {
                        self.chunk.inputs_done += 1;
                        // Not counted by a reader: credit the whole file when it ends.
                        let size = std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
                        self.disk.fetch_add(size, Ordering::Relaxed);
                        Ok(None)
                    }
                    Some(batch) => {
                        for rec in batch {
                            row += 1;
                            let start = self.chunk.data.len();
                            match rec {
                                Some(bytes) => {
                                    self.chunk.data.extend_from_slice(&bytes);
                                    self.push(
                                        input,
                                        row,
                                        start,
                                        start + bytes.len(),
                                        RecordKind::Text,
                                    );
                                }
                                None => self.push(input, row, start, start, RecordKind::Missing),
                            }
                        }
                        self.current = Some(Current::External { input, row });
                        Ok(if self.full() {
                            Some(self.take_chunk(self.chunk.data.len()))
                        } else {
                            None
                        })
                    }
                }
            }
            Some(Current::Lines {
                input,
                mut reader,
                mut line,
                delimiter,
                json,
            }) => {
                let path = self.inputs[input].path.clone();
                // Delimited text: the open document starts at `doc_start` (line `doc_line`).
                let mut doc_start = self.chunk.data.len();
                let mut doc_line = line + 1;
                let mut doc_open = false;
                loop {
                    let at = self.chunk.data.len();
                    let n = reader
                        .read_until(b'\n', &mut self.chunk.data)
                        .map_err(|e| Error::io(&path, e))?;
                    if n == 0 {
                        if doc_open {
                            let end = at - trailing_newline(&self.chunk.data[doc_start..at]);
                            self.push(input, doc_line, doc_start, end, RecordKind::Text);
                        }
                        self.chunk.inputs_done += 1;
                        return Ok(None);
                    }
                    line += 1;
                    let text = strip_newline(&self.chunk.data[at..]);
                    if json {
                        if text.iter().all(u8::is_ascii_whitespace) {
                            self.chunk.data.truncate(at);
                            continue;
                        }
                        let end = at + text.len();
                        self.push(input, line, at, end, RecordKind::Json);
                        if self.full() {
                            self.current = Some(Current::Lines {
                                input,
                                reader,
                                line,
                                delimiter,
                                json,
                            });
                            return Ok(Some(self.take_chunk(self.chunk.data.len())));
                        }
                        continue;
                    }
                    let delim = delimiter.as_deref().expect("delimited text");
                    if text == delim {
                        self.chunk.data.truncate(at);
                        let end = at - trailing_newline(&self.chunk.data[doc_start..at]);
                        self.push(input, doc_line, doc_start, end, RecordKind::Text);
                        doc_open = false;
                        if self.full() {
                            self.current = Some(Current::Lines {
                                input,
                                reader,
                                line,
                                delimiter,
                                json,
                            });
                            return Ok(Some(self.take_chunk(self.chunk.data.len())));
                        }
                        doc_start = self.chunk.data.len();
                        doc_line = line + 1;
                    } else {
                        doc_open = true;
                    }
                }
            }
        }
    }
}

/// Length of the line terminator ending `doc` (the one before a delimiter line or end of file).
fn trailing_newline(doc: &[u8]) -> usize {
    if doc.ends_with(b"\r\n") {
        2
    } else if doc.ends_with(b"\n") {
        1
    } else {
        0
    }
}

/// Split `sizes` (bytes per input, in order) into `num_shards` contiguous ranges of similar total
/// size and return the range of shard `shard_index`. An input belongs to the shard in which its
/// midpoint falls, so the shards, concatenated in index order, are exactly the inputs in order.
pub fn shard_range(
    sizes: &[u64],
    num_shards: usize,
    shard_index: usize,
) -> Result<std::ops::Range<usize>> {
    if num_shards == 0 || shard_index >= num_shards {
        return Err(Error::invalid(format!(
            "shard_index must be in 0..num_shards (got shard_index={shard_index}, num_shards={num_shards})"
        )));
    }
    // Weights are 1 + size so that empty files are spread out too.
    let total: u128 = sizes.iter().map(|&s| s as u128 + 1).sum();
    let mut before: u128 = 0;
    let owner = |mid2: u128| -> usize {
        // shard = floor(mid / total * n), with mid2 = 2 * midpoint to stay in integers.
        ((mid2 * num_shards as u128) / (2 * total.max(1))).min(num_shards as u128 - 1) as usize
    };
    let (mut lo, mut hi) = (sizes.len(), sizes.len());
    let mut found = false;
    for (i, &s) in sizes.iter().enumerate() {
        let w = s as u128 + 1;
        let shard = owner(2 * before + w);
        before += w;
        if shard == shard_index && !found {
            lo = i;
            found = true;
        }
        if shard > shard_index {
            hi = i;
            break;
        }
    }
    if !found {
        // An empty shard: place it where it would have been, for a well-formed (empty) range.
        lo = hi.min(lo);
        return Ok(lo..lo);
    }
    Ok(lo..hi)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmpdir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("tm-inputs-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    fn collect(inputs: &[Input], chunk_bytes: usize) -> Vec<(usize, u64, Vec<u8>, RecordKind)> {
        let mut r = ChunkReader::new(inputs, None, chunk_bytes);
        let mut out = vec![];
        while let Some(c) = r.next().unwrap() {
            for rec in &c.records {
                out.push((rec.input, rec.line, c.text(rec).to_vec(), rec.kind));
            }
        }
        out
    }

    #[test]
    fn delimited_text_and_jsonl() {
        let d = tmpdir("delim");
        let t = d.join("a.txt");
        std::fs::write(&t, "a\nb\n---\n\n---\n---\r\nc\r\n").unwrap();
        let j = d.join("b.jsonl");
        std::fs::write(&j, "{\"text\": \"x\"}\n\n  \n{\"text\": \"y\"}").unwrap();
        let inputs = vec![
            Input {
                path: t,
                format: InputFormat::Text {
                    delimiter: Some("---".into()),
                },
            },
            Input {
                path: j,
                format: InputFormat::JsonLines,
            },
        ];
        for chunk_bytes in [1, 3, 1 << 20] {
            let got = collect(&inputs, chunk_bytes);
            let want: Vec<(usize, u64, Vec<u8>, RecordKind)> = vec![
                (0, 1, b"a\nb".to_vec(), RecordKind::Text),
                (0, 4, b"".to_vec(), RecordKind::Text),
                (0, 6, b"".to_vec(), RecordKind::Text),
                (0, 7, b"c".to_vec(), RecordKind::Text),
                (1, 1, b"{\"text\": \"x\"}".to_vec(), RecordKind::Json),
                (1, 4, b"{\"text\": \"y\"}".to_vec(), RecordKind::Json),
            ];
            assert_eq!(got, want, "chunk_bytes={chunk_bytes}");
        }
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn compressed_and_whole_files() {
        use std::io::Write;
        let d = tmpdir("comp");
        let body = "{\"text\": \"hello\"}\n{\"text\": \"world\"}\n";
        let gz = d.join("a.jsonl.gz");
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        e.write_all(body.as_bytes()).unwrap();
        std::fs::write(&gz, e.finish().unwrap()).unwrap();
        let zs = d.join("b.jsonl.zst");
        std::fs::write(&zs, zstd::encode_all(body.as_bytes(), 3).unwrap()).unwrap();
        let txt = d.join("c.txt");
        std::fs::write(&txt, "whole\nfile\n").unwrap();
        let inputs = vec![
            Input {
                path: gz,
                format: InputFormat::JsonLines,
            },
            Input {
                path: zs,
                format: InputFormat::JsonLines,
            },
            Input {
                path: txt,
                format: InputFormat::Text { delimiter: None },
            },
        ];
        let got = collect(&inputs, 8);
        assert_eq!(got.len(), 5);
        assert_eq!(got[0].2, b"{\"text\": \"hello\"}");
        assert_eq!(got[3].2, b"{\"text\": \"world\"}");
        assert_eq!(got[4], (2, 1, b"whole\nfile\n".to_vec(), RecordKind::Text));
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn chunks_stay_bounded() {
        let d = tmpdir("bounded");
        let p = d.join("big.jsonl");
        let line = format!("{{\"text\": \"{}\"}}\n", "x".repeat(90));
        std::fs::write(&p, line.repeat(20_000)).unwrap();
        let inputs = vec![Input {
            path: p,
            format: InputFormat::JsonLines,
        }];
        let mut r = ChunkReader::new(&inputs, None, 4096);
        let (mut n, mut chunks) = (0, 0);
        while let Some(c) = r.next().unwrap() {
            // A chunk ends at the first record that reaches the size: at most one line over.
            assert!(c.data.len() < 4096 + line.len(), "{}", c.data.len());
            assert!(c.data.capacity() <= 2 * 4096 + 2 * line.len());
            n += c.records.len();
            chunks += 1;
        }
        assert_eq!(n, 20_000);
        assert!(chunks > 400);
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn shards_partition_inputs_in_order() {
        let sizes = [10u64, 0, 500, 3, 3, 3, 1000, 0, 7];
        for n in 1..12 {
            let mut next = 0;
            for i in 0..n {
                let r = shard_range(&sizes, n, i).unwrap();
                assert_eq!(r.start, next, "n={n} i={i}");
                next = r.end;
            }
            assert_eq!(next, sizes.len());
        }
        assert!(shard_range(&sizes, 2, 2).is_err());
        assert_eq!(shard_range(&[], 3, 1).unwrap(), 0..0);
    }
}
