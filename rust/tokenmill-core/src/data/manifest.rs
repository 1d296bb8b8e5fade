//! `PREFIX.json`: what produced a prepared dataset (tokenizer fingerprint, inputs with sizes and
//! mtimes), what it holds (documents, tokens, skipped records) and a checksum of each output file.
//! It is written last, atomically: its presence marks a complete run. Also here: verification,
//! statistics, and the merge of shards.

use crate::data::mmidx::{bin_path, idx_path, DType, IndexedDataset};
use crate::fsutil::{write_atomic, AtomicFile};
use crate::{Error, Result};
use rayon::prelude::*;
use rustc_hash::FxHashMap;
use serde::{Deserialize, Serialize};
use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};
use xxhash_rust::xxh3::Xxh3;

pub const FORMAT: &str = "tokenmill.prepared";
pub const VERSION: u32 = 1;

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct TokenizerInfo {
    pub fingerprint: String,
    pub n_vocab: u64,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct ShardInfo {
    pub index: usize,
    pub count: usize,
    /// xxh3-128 of the whole input list (paths, formats, sizes) before sharding, so that a merge
    /// can check that its shards partition the same inputs.
    pub inputs_digest: String,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct InputInfo {
    pub path: String,
    pub format: String,
    pub size: u64,
    pub mtime_ns: u64,
    pub documents: u64,
    pub tokens: u64,
    pub skipped: u64,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
pub struct Skipped {
    pub invalid_utf8: u64,
    pub malformed_json: u64,
    pub missing_key: u64,
    pub empty_document: u64,
}

impl Skipped {
    pub fn total(&self) -> u64 {
        self.invalid_utf8 + self.malformed_json + self.missing_key + self.empty_document
    }

    pub fn add(&mut self, o: &Skipped) {
        self.invalid_utf8 += o.invalid_utf8;
        self.malformed_json += o.malformed_json;
        self.missing_key += o.missing_key;
        self.empty_document += o.empty_document;
    }
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct FileInfo {
    pub name: String,
    pub size: u64,
    pub xxh3_128: String,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct Files {
    pub bin: FileInfo,
    pub idx: FileInfo,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct Manifest {
    pub format: String,
    pub version: u32,
    pub tokenmill_version: String,
    pub tokenizer: TokenizerInfo,
    pub dtype: String,
    pub eos_id: Option<u32>,
    pub text_key: String,
    pub shard: ShardInfo,
    pub inputs: Vec<InputInfo>,
    pub documents: u64,
    pub tokens: u64,
    pub skipped: Skipped,
    /// The first skipped records, as `path:line: reason`.
    pub errors: Vec<String>,
    pub files: Files,
}

pub const MAX_ERRORS_KEPT: usize = 100;

fn dtype_from_name(name: &str) -> Option<DType> {
    [DType::U8, DType::U16, DType::I32, DType::I64]
        .into_iter()
        .find(|d| d.name() == name)
}

pub fn manifest_path(prefix: &Path) -> PathBuf {
    let mut s = prefix.as_os_str().to_owned();
    s.push(".json");
    PathBuf::from(s)
}

fn file_name(p: &Path) -> String {
    p.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

pub fn hex128(h: &Xxh3) -> String {
    format!("{:032x}", h.digest128())
}

/// Size and xxh3-128 of a file, read in 1 MiB blocks.
pub fn file_checksum(path: &Path) -> Result<(u64, String)> {
    let mut f = File::open(path).map_err(|e| Error::io(path, e))?;
    let mut h = Xxh3::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut size = 0u64;
    loop {
        let n = f.read(&mut buf).map_err(|e| Error::io(path, e))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
        size += n as u64;
    }
    Ok((size, hex128(&h)))
}

pub fn file_info(path: &Path) -> Result<FileInfo> {
    let (size, xxh3_128) = file_checksum(path)?;
    Ok(FileInfo {
        name: file_name(path),
        size,
        xxh3_128,
    })
}

impl Manifest {
    pub fn read(prefix: &Path) -> Result<Manifest> {
        let path = manifest_path(prefix);
        let text = std::fs::read(&path).map_err(|e| Error::io(&path, e))?;
        let m: Manifest = serde_json::from_slice(&text)
            .map_err(|e| Error::format(&path, format!("not a tokenmill manifest ({e})")))?;
        if m.format != FORMAT || m.version != VERSION {
            return Err(Error::format(
                &path,
                format!(
                    "not a tokenmill manifest (format {:?} version {}; expected {FORMAT:?} version {VERSION})",
                    m.format, m.version
                ),
            ));
        }
        Ok(m)
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).expect("a manifest always serializes")
    }

    /// Written atomically, after the data files: its presence marks completion.
    pub fn write(&self, prefix: &Path) -> Result<()> {
        let mut text = self.to_json();
        text.push('\n');
        write_atomic(manifest_path(prefix), text.as_bytes())
    }
}

/// Remove any previous output at `prefix` (manifest first, so no mix of old and new files ever looks
/// complete) and the temporaries of killed runs.
pub fn clear_outputs(prefix: &Path) -> Result<()> {
    for p in [manifest_path(prefix), idx_path(prefix), bin_path(prefix)] {
        match std::fs::remove_file(&p) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(Error::io(&p, e)),
        }
    }
    let dir = match prefix.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let base = file_name(prefix);
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return Ok(());
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        for ext in ["bin", "idx", "json"] {
            // AtomicFile temporaries: ".{name}.tmp-{pid}"
            if let Some(pid) = name.strip_prefix(&format!(".{base}.{ext}.tmp-")) {
                let alive =
                    Path::new("/proc").join(pid).exists() && pid != std::process::id().to_string();
                if !alive {
                    let _ = std::fs::remove_file(entry.path());
                }
            }
        }
    }
    Ok(())
}

/// Re-check a prepared dataset against its manifest: file sizes and checksums, index structure,
/// counts, and that every token id is inside the vocabulary. Returns the problems found (empty: ok).
pub fn verify(prefix: &Path) -> Result<Vec<String>> {
    let m = Manifest::read(prefix)?;
    let mut problems = vec![];
    for (path, want) in [
        (bin_path(prefix), &m.files.bin),
        (idx_path(prefix), &m.files.idx),
    ] {
        match file_checksum(&path) {
            Err(e) => problems.push(e.to_string()),
            Ok((size, sum)) => {
                if size != want.size {
                    problems.push(format!(
                        "{}: size {size} bytes, manifest says {}",
                        path.display(),
                        want.size
                    ));
                }
                if sum != want.xxh3_128 {
                    problems.push(format!(
                        "{}: xxh3-128 checksum {sum} does not match the manifest's {}",
                        path.display(),
                        want.xxh3_128
                    ));
                }
            }
        }
    }
    let ds = match IndexedDataset::open(prefix) {
        Ok(ds) => ds,
        Err(e) => {
            problems.push(e.to_string());
            return Ok(problems);
        }
    };
    if ds.dtype().name() != m.dtype {
        problems.push(format!(
            "index dtype {} but manifest says {}",
            ds.dtype().name(),
            m.dtype
        ));
    }
    if ds.num_documents() as u64 != m.documents || ds.num_sequences() as u64 != m.documents {
        problems.push(format!(
            "index holds {} documents, manifest says {}",
            ds.num_documents(),
            m.documents
        ));
    }
    if ds.num_tokens() != m.tokens {
        problems.push(format!(
            "data holds {} tokens, manifest says {}",
            ds.num_tokens(),
            m.tokens
        ));
    }
    let (docs, toks) = m
        .inputs
        .iter()
        .fold((0, 0), |(d, t), i| (d + i.documents, t + i.tokens));
    if docs != m.documents || toks != m.tokens {
        problems.push(format!(
            "manifest inputs add up to {docs} documents / {toks} tokens, totals say {} / {}",
            m.documents, m.tokens
        ));
    }
    let max = max_token(&ds)?;
    if let Some(max) = max {
        if max as u64 >= m.tokenizer.n_vocab {
            problems.push(format!(
                "token id {max} is outside the tokenizer's vocabulary of {}",
                m.tokenizer.n_vocab
            ));
        }
    }
    Ok(problems)
}

const SCAN: usize = 1 << 20;

fn scan_blocks(ds: &IndexedDataset) -> Vec<(u64, usize)> {
    let n = ds.num_tokens();
    (0..n.div_ceil(SCAN as u64))
        .map(|b| {
            let start = b * SCAN as u64;
            (start, (n - start).min(SCAN as u64) as usize)
        })
        .collect()
}

fn max_token(ds: &IndexedDataset) -> Result<Option<u32>> {
    scan_blocks(ds)
        .into_par_iter()
        .map(|(start, len)| {
            let mut buf = vec![0u32; len];
            ds.read_tokens(start, &mut buf)?;
            Ok(buf.into_iter().max())
        })
        .try_reduce(|| None, |a, b| Ok(a.max(b)))
}

#[derive(Clone, Debug, Serialize)]
pub struct Stats {
    pub documents: u64,
    pub tokens: u64,
    pub dtype: String,
    pub min_length: u64,
    pub max_length: u64,
    pub mean_length: f64,
    /// Document lengths in powers of two: (low inclusive, high exclusive, count), non-empty buckets.
    pub length_histogram: Vec<(u64, u64, u64)>,
    /// The most frequent token ids with their counts, most frequent first (ties: lower id first).
    pub top_tokens: Vec<(u32, u64)>,
}

impl Stats {
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("stats always serialize")
    }
}

pub fn stats(ds: &IndexedDataset, top_k: usize) -> Result<Stats> {
    let n = ds.num_sequences();
    let mut buckets = [0u64; 33];
    let (mut min, mut max) = (u64::MAX, 0u64);
    for i in 0..n {
        let l = ds.sequence_len(i) as u64;
        min = min.min(l);
        max = max.max(l);
        let b = if l == 0 {
            0
        } else {
            64 - l.leading_zeros() as usize
        };
        buckets[b.min(32)] += 1;
    }
    let length_histogram = buckets
        .iter()
        .enumerate()
        .filter(|(_, &c)| c > 0)
        .map(|(b, &c)| {
            if b == 0 {
                (0, 1, c)
            } else {
                (1u64 << (b - 1), 1u64 << b, c)
            }
        })
        .collect();
    let counts: FxHashMap<u32, u64> = scan_blocks(ds)
        .into_par_iter()
        .map(|(start, len)| {
            let mut buf = vec![0u32; len];
            ds.read_tokens(start, &mut buf)?;
            let mut c: FxHashMap<u32, u64> = FxHashMap::default();
            if ds.dtype() == DType::U16 || ds.dtype() == DType::U8 {
                let mut dense = vec![0u64; 1 << 16];
                for t in buf {
                    dense[t as usize] += 1;
                }
                c.extend(
                    dense
                        .into_iter()
                        .enumerate()
                        .filter(|(_, n)| *n > 0)
                        .map(|(t, n)| (t as u32, n)),
                );
            } else {
                for t in buf {
                    *c.entry(t).or_default() += 1;
                }
            }
            Ok(c)
        })
        .try_reduce(FxHashMap::default, |mut a, b| {
            for (t, n) in b {
                *a.entry(t).or_default() += n;
            }
            Ok::<_, Error>(a)
        })?;
    let mut top: Vec<(u32, u64)> = counts.into_iter().collect();
    top.sort_unstable_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    top.truncate(top_k);
    let tokens = ds.num_tokens();
    Ok(Stats {
        documents: n as u64,
        tokens,
        dtype: ds.dtype().name().to_string(),
        min_length: if n == 0 { 0 } else { min },
        max_length: max,
        mean_length: if n == 0 {
            0.0
        } else {
            tokens as f64 / n as f64
        },
        length_histogram,
        top_tokens: top,
    })
}

/// Concatenate prepared shards (`tokenmill prepare --num-shards N --shard-index I`, I = 0..N) into
/// one dataset at `out`. The shards must all be present, complete, intact (checksums are re-checked
/// while copying) and made with the same tokenizer and settings from the same input list; the result
/// is byte-identical to a single-run prepare of all inputs.
pub fn merge(shards: &[PathBuf], out: &Path) -> Result<Manifest> {
    if shards.is_empty() {
        return Err(Error::invalid("merge needs at least one shard"));
    }
    let mut ms: Vec<(Manifest, PathBuf)> = shards
        .iter()
        .map(|p| Ok((Manifest::read(p)?, p.clone())))
        .collect::<Result<_>>()?;
    ms.sort_by_key(|(m, _)| m.shard.index);
    let first = ms[0].0.clone();
    let count = first.shard.count;
    for (i, (m, p)) in ms.iter().enumerate() {
        let path = manifest_path(p);
        let differ = |what: &str, a: &str, b: &str| {
            Error::format(
                &path,
                format!("{what} {a} differs from shard {}'s {b}", first.shard.index),
            )
        };
        if m.tokenizer != first.tokenizer {
            return Err(differ(
                "tokenizer fingerprint",
                &m.tokenizer.fingerprint,
                &first.tokenizer.fingerprint,
            ));
        }
        if m.shard.inputs_digest != first.shard.inputs_digest {
            return Err(differ(
                "input list digest",
                &m.shard.inputs_digest,
                &first.shard.inputs_digest,
            ));
        }
        if m.dtype != first.dtype || m.eos_id != first.eos_id || m.text_key != first.text_key {
            return Err(differ(
                "settings (dtype, eos, text key)",
                &format!("{}/{:?}/{}", m.dtype, m.eos_id, m.text_key),
                &format!("{}/{:?}/{}", first.dtype, first.eos_id, first.text_key),
            ));
        }
        if m.shard.count != count || m.shard.index != i {
            return Err(Error::invalid(format!(
                "shards must be exactly indices 0 to {} of one partition of {count}, once each; got indices {:?} of counts {:?}",
                count.saturating_sub(1),
                ms.iter().map(|(m, _)| m.shard.index).collect::<Vec<_>>(),
                ms.iter().map(|(m, _)| m.shard.count).collect::<Vec<_>>()
            )));
        }
    }
    if ms.len() != count {
        return Err(Error::invalid(format!(
            "got {} shards of a {count}-way partition; all are needed",
            ms.len()
        )));
    }
    let dtype = dtype_from_name(&first.dtype).ok_or_else(|| {
        Error::format(
            manifest_path(&ms[0].1),
            format!("unknown dtype {}", first.dtype),
        )
    })?;
    for (_, p) in &ms {
        if p == out {
            return Err(Error::invalid(format!(
                "the merge output {} is one of its shards",
                out.display()
            )));
        }
    }
    clear_outputs(out)?;
    let mut lengths: Vec<i32> = vec![];
    let mut bin = AtomicFile::create(bin_path(out))?;
    let mut out_hash = Xxh3::new();
    let mut buf = vec![0u8; 1 << 20];
    for (m, p) in &ms {
        let ds = IndexedDataset::open(p)?;
        if ds.dtype() != dtype {
            return Err(Error::format(
                idx_path(p),
                format!("dtype {} but manifest says {}", ds.dtype().name(), m.dtype),
            ));
        }
        lengths.extend((0..ds.num_sequences()).map(|i| ds.sequence_len(i) as i32));
        let bp = bin_path(p);
        let mut f = File::open(&bp).map_err(|e| Error::io(&bp, e))?;
        let mut h = Xxh3::new();
        loop {
            let n = f.read(&mut buf).map_err(|e| Error::io(&bp, e))?;
            if n == 0 {
                break;
            }
            h.update(&buf[..n]);
            out_hash.update(&buf[..n]);
            bin.write_all(&buf[..n])?;
        }
        if hex128(&h) != m.files.bin.xxh3_128 {
            return Err(Error::format(
                &bp,
                "checksum does not match its manifest (corrupt or modified shard)",
            ));
        }
    }
    bin.commit()?;
    let idx = crate::data::mmidx::encode_index(dtype, &lengths);
    write_atomic(idx_path(out), &idx)?;
    let mut idx_hash = Xxh3::new();
    idx_hash.update(&idx);
    let mut merged = first.clone();
    merged.shard.index = 0;
    merged.shard.count = 1;
    merged.inputs = ms.iter().flat_map(|(m, _)| m.inputs.clone()).collect();
    merged.documents = ms.iter().map(|(m, _)| m.documents).sum();
    merged.tokens = ms.iter().map(|(m, _)| m.tokens).sum();
    merged.skipped = Skipped::default();
    merged.errors.clear();
    for (m, _) in &ms {
        merged.skipped.add(&m.skipped);
        merged.errors.extend(m.errors.iter().cloned());
    }
    merged.errors.truncate(MAX_ERRORS_KEPT);
    let bin_size = std::fs::metadata(bin_path(out))
        .map_err(|e| Error::io(bin_path(out), e))?
        .len();
    merged.files = Files {
        bin: FileInfo {
            name: file_name(&bin_path(out)),
            size: bin_size,
            xxh3_128: hex128(&out_hash),
        },
        idx: FileInfo {
            name: file_name(&idx_path(out)),
            size: idx.len() as u64,
            xxh3_128: hex128(&idx_hash),
        },
    };
    merged.write(out)?;
    Ok(merged)
}
