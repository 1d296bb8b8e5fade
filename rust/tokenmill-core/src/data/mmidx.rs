//! Megatron-LM "MMIDIDX" indexed datasets: `PREFIX.bin` holds the tokens of every sequence back to
//! back; `PREFIX.idx` holds
//!
//! ```text
//! magic      9 bytes  b"MMIDIDX\x00\x00"
//! version    u64 LE   1
//! dtype      u8       1 u8, 2 i8, 3 i16, 4 i32, 5 i64, 6 f64, 7 f32, 8 u16
//! n_seq      u64 LE   number of sequences
//! n_doc      u64 LE   number of document indices (documents + 1)
//! lengths    i32[n_seq]   tokens per sequence
//! pointers   i64[n_seq]   byte offset of each sequence in .bin
//! doc_idx    i64[n_doc]   0, then the sequence count at the end of each document
//! ```
//!
//! as `megatron.core.datasets.indexed_dataset` writes and reads it. We write one sequence per
//! document, so `doc_idx` is `0..=n_docs`.

use crate::fsutil::AtomicFile;
use crate::{Error, Result};
use memmap2::Mmap;
use std::fs::File;
use std::path::{Path, PathBuf};

pub const MAGIC: &[u8; 9] = b"MMIDIDX\x00\x00";
const HEADER_LEN: usize = 9 + 8 + 1 + 8 + 8;

/// Token dtypes. Megatron picks uint16 when the vocabulary has fewer than 65,500 ids, else int32.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DType {
    U8,
    U16,
    I32,
    I64,
}

impl DType {
    pub fn code(self) -> u8 {
        match self {
            DType::U8 => 1,
            DType::I32 => 4,
            DType::I64 => 5,
            DType::U16 => 8,
        }
    }

    pub fn from_code(code: u8) -> Option<DType> {
        Some(match code {
            1 => DType::U8,
            4 => DType::I32,
            5 => DType::I64,
            8 => DType::U16,
            _ => return None,
        })
    }

    pub fn size(self) -> usize {
        match self {
            DType::U8 => 1,
            DType::U16 => 2,
            DType::I32 => 4,
            DType::I64 => 8,
        }
    }

    /// `megatron.core.datasets.indexed_dataset.DType.optimal_dtype`.
    pub fn for_vocab(vocab_size: usize) -> DType {
        if vocab_size < 65_500 {
            DType::U16
        } else {
            DType::I32
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            DType::U8 => "uint8",
            DType::U16 => "uint16",
            DType::I32 => "int32",
            DType::I64 => "int64",
        }
    }
}

pub fn bin_path(prefix: &Path) -> PathBuf {
    with_suffix(prefix, ".bin")
}

pub fn idx_path(prefix: &Path) -> PathBuf {
    with_suffix(prefix, ".idx")
}

fn with_suffix(prefix: &Path, suffix: &str) -> PathBuf {
    let mut s = prefix.as_os_str().to_owned();
    s.push(suffix);
    PathBuf::from(s)
}

/// Streams documents into `PREFIX.bin` and writes `PREFIX.idx` on [`finish`](Self::finish); both
/// land atomically, so a killed run leaves no file that looks complete.
pub struct IndexWriter {
    prefix: PathBuf,
    dtype: DType,
    max_id: u64,
    bin: AtomicFile,
    lengths: Vec<i32>,
    bytes: u64,
    scratch: Vec<u8>,
}

impl IndexWriter {
    pub fn create(prefix: impl AsRef<Path>, dtype: DType) -> Result<Self> {
        let prefix = prefix.as_ref().to_path_buf();
        let max_id = match dtype {
            DType::U8 => u8::MAX as u64,
            DType::U16 => u16::MAX as u64,
            DType::I32 => i32::MAX as u64,
            DType::I64 => i64::MAX as u64,
        };
        let bin = AtomicFile::create(bin_path(&prefix))?;
        Ok(IndexWriter {
            prefix,
            dtype,
            max_id,
            bin,
            lengths: Vec::new(),
            bytes: 0,
            scratch: Vec::new(),
        })
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn num_documents(&self) -> usize {
        self.lengths.len()
    }

    pub fn num_tokens(&self) -> u64 {
        self.bytes / self.dtype.size() as u64
    }

    /// Append one document (one sequence).
    pub fn add_document(&mut self, tokens: &[u32]) -> Result<()> {
        let len = i32::try_from(tokens.len()).map_err(|_| {
            Error::invalid(format!(
                "a document of {} tokens exceeds the format's i32 length",
                tokens.len()
            ))
        })?;
        self.scratch.clear();
        self.scratch.reserve(tokens.len() * self.dtype.size());
        for &t in tokens {
            if t as u64 > self.max_id {
                return Err(Error::invalid(format!(
                    "token id {t} does not fit the dataset dtype {}",
                    self.dtype.name()
                )));
            }
            match self.dtype {
                DType::U8 => self.scratch.push(t as u8),
                DType::U16 => self.scratch.extend_from_slice(&(t as u16).to_le_bytes()),
                DType::I32 => self.scratch.extend_from_slice(&(t as i32).to_le_bytes()),
                DType::I64 => self.scratch.extend_from_slice(&(t as i64).to_le_bytes()),
            }
        }
        let scratch = std::mem::take(&mut self.scratch);
        let r = self.bin.write_all(&scratch);
        self.scratch = scratch;
        r?;
        self.lengths.push(len);
        self.bytes += (tokens.len() * self.dtype.size()) as u64;
        Ok(())
    }

    /// Commit `.bin`, then write and commit `.idx` (the index appears last: its presence marks completion).
    pub fn finish(self) -> Result<()> {
        self.bin.commit()?;
        let mut idx = AtomicFile::create(idx_path(&self.prefix))?;
        idx.write_all(&encode_index(self.dtype, &self.lengths))?;
        idx.commit()
    }
}

/// The bytes of an `.idx` file for one-sequence-per-document data.
pub fn encode_index(dtype: DType, lengths: &[i32]) -> Vec<u8> {
    let n = lengths.len();
    let mut out = Vec::with_capacity(HEADER_LEN + n * 12 + (n + 1) * 8);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&1u64.to_le_bytes());
    out.push(dtype.code());
    out.extend_from_slice(&(n as u64).to_le_bytes());
    out.extend_from_slice(&(n as u64 + 1).to_le_bytes());
    for &l in lengths {
        out.extend_from_slice(&l.to_le_bytes());
    }
    let mut ptr = 0i64;
    for &l in lengths {
        out.extend_from_slice(&ptr.to_le_bytes());
        ptr += l as i64 * dtype.size() as i64;
    }
    for d in 0..=n as i64 {
        out.extend_from_slice(&d.to_le_bytes());
    }
    out
}

/// A memory-mapped, validated MMIDIDX dataset.
pub struct IndexedDataset {
    prefix: PathBuf,
    dtype: DType,
    idx: Mmap,
    bin: Mmap,
    n_seq: usize,
    n_doc: usize,
}

fn map(path: &Path) -> Result<Mmap> {
    let file = File::open(path).map_err(|e| Error::io(path, e))?;
    if file.metadata().map_err(|e| Error::io(path, e))?.len() == 0 {
        // mmap of an empty file fails; an empty anonymous map reads the same (no tokens).
        return memmap2::MmapOptions::new()
            .len(0)
            .map_anon()
            .and_then(|m| m.make_read_only())
            .map_err(|e| Error::io(path, e));
    }
    // SAFETY: the file is opened read-only; like every mmap reader we assume no one truncates it
    // while mapped (Megatron and numpy.memmap make the same assumption).
    unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path, e))
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
}

impl IndexedDataset {
    pub fn open(prefix: impl AsRef<Path>) -> Result<Self> {
        let prefix = prefix.as_ref().to_path_buf();
        let idx_p = idx_path(&prefix);
        let bin_p = bin_path(&prefix);
        let idx = map(&idx_p)?;
        let bin = map(&bin_p)?;
        let bad = |m: String| Error::format(&idx_p, m);
        if idx.len() < HEADER_LEN || &idx[..9] != MAGIC {
            return Err(bad(
                "not a Megatron MMIDIDX index (bad magic or truncated header)".into(),
            ));
        }
        let version = u64_at(&idx, 9);
        if version != 1 {
            return Err(bad(format!(
                "unsupported index version {version} (expected 1)"
            )));
        }
        let code = idx[17];
        let dtype = DType::from_code(code).ok_or_else(|| {
            // Megatron's DType codes; the others are legal Megatron files tokenmill does not read.
            let name = match code {
                2 => "int8",
                3 => "int16",
                6 => "float64",
                7 => "float32",
                _ => "unknown",
            };
            bad(format!(
                "token dtype {name} (code {code}) is not supported: tokenmill reads uint8, uint16, int32 and int64 token files"
            ))
        })?;
        let n_seq = u64_at(&idx, 18) as usize;
        let n_doc = u64_at(&idx, 26) as usize;
        let need = n_seq
            .checked_mul(12)
            .and_then(|x| n_doc.checked_mul(8).and_then(|y| x.checked_add(y)))
            .and_then(|x| x.checked_add(HEADER_LEN));
        match need {
            Some(need) if idx.len() >= need => {}
            _ => return Err(bad(format!("truncated: header declares {n_seq} sequences and {n_doc} document indices but the file has {} bytes", idx.len()))),
        }
        let ds = IndexedDataset {
            prefix,
            dtype,
            idx,
            bin,
            n_seq,
            n_doc,
        };
        ds.validate()?;
        Ok(ds)
    }

    fn validate(&self) -> Result<()> {
        let idx_p = idx_path(&self.prefix);
        let size = self.dtype.size() as i64;
        let mut expect = 0i64;
        for i in 0..self.n_seq {
            let (len, ptr) = (self.raw_length(i), self.raw_pointer(i));
            if len < 0 || ptr != expect {
                return Err(Error::format(&idx_p, format!("sequence {i}: length {len} / pointer {ptr} inconsistent (expected pointer {expect})")));
            }
            expect += len as i64 * size;
        }
        if expect as u64 != self.bin.len() as u64 {
            return Err(Error::format(
                bin_path(&self.prefix),
                format!("size {} bytes does not match the index, which describes {expect} bytes (truncated or foreign file?)", self.bin.len()),
            ));
        }
        let mut last = -1i64;
        for d in 0..self.n_doc {
            let v = self.doc_index(d);
            if v < last || v as u64 > self.n_seq as u64 || (d == 0 && v != 0) {
                return Err(Error::format(
                    &idx_p,
                    format!("document index {d} = {v} is out of order or range"),
                ));
            }
            last = v;
        }
        Ok(())
    }

    fn raw_length(&self, i: usize) -> i32 {
        let at = HEADER_LEN + 4 * i;
        i32::from_le_bytes(self.idx[at..at + 4].try_into().unwrap())
    }

    fn raw_pointer(&self, i: usize) -> i64 {
        let at = HEADER_LEN + 4 * self.n_seq + 8 * i;
        i64::from_le_bytes(self.idx[at..at + 8].try_into().unwrap())
    }

    pub fn doc_index(&self, d: usize) -> i64 {
        let at = HEADER_LEN + 12 * self.n_seq + 8 * d;
        i64::from_le_bytes(self.idx[at..at + 8].try_into().unwrap())
    }

    pub fn prefix(&self) -> &Path {
        &self.prefix
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn num_sequences(&self) -> usize {
        self.n_seq
    }

    /// Number of documents (document indices minus one).
    pub fn num_documents(&self) -> usize {
        self.n_doc.saturating_sub(1)
    }

    pub fn num_tokens(&self) -> u64 {
        self.bin.len() as u64 / self.dtype.size() as u64
    }

    pub fn sequence_len(&self, i: usize) -> usize {
        self.raw_length(i) as usize
    }

    /// Token offset (not byte offset) of sequence `i` in the token stream.
    pub fn sequence_offset(&self, i: usize) -> u64 {
        self.raw_pointer(i) as u64 / self.dtype.size() as u64
    }

    /// The raw little-endian bytes of all tokens.
    pub fn token_bytes(&self) -> &[u8] {
        &self.bin
    }

    /// Copy tokens `[start, start + out.len())` of the whole token stream into `out`, widening to u32.
    pub fn read_tokens(&self, start: u64, out: &mut [u32]) -> Result<()> {
        let end = start
            .checked_add(out.len() as u64)
            .filter(|&e| e <= self.num_tokens())
            .ok_or_else(|| {
                Error::invalid(format!(
                    "token range {start}..{} is outside the dataset's {} tokens",
                    start + out.len() as u64,
                    self.num_tokens()
                ))
            })?;
        let size = self.dtype.size();
        let bytes = &self.bin[start as usize * size..end as usize * size];
        match self.dtype {
            DType::U8 => out.iter_mut().zip(bytes).for_each(|(o, &b)| *o = b as u32),
            DType::U16 => out
                .iter_mut()
                .zip(bytes.chunks_exact(2))
                .for_each(|(o, b)| *o = u16::from_le_bytes([b[0], b[1]]) as u32),
            // Signed files (Megatron's, or written by hand) may hold values that are no token id:
            // refuse them rather than wrap (-3 would read as 4294967293).
            DType::I32 => {
                for (k, (o, b)) in out.iter_mut().zip(bytes.chunks_exact(4)).enumerate() {
                    let v = i32::from_le_bytes(b.try_into().unwrap());
                    *o =
                        u32::try_from(v).map_err(|_| self.bad_token(start + k as u64, v as i64))?;
                }
            }
            DType::I64 => {
                for (k, (o, b)) in out.iter_mut().zip(bytes.chunks_exact(8)).enumerate() {
                    let v = i64::from_le_bytes(b.try_into().unwrap());
                    *o = u32::try_from(v).map_err(|_| self.bad_token(start + k as u64, v))?;
                }
            }
        }
        Ok(())
    }

    fn bad_token(&self, position: u64, value: i64) -> Error {
        Error::format(
            bin_path(&self.prefix),
            format!("token {value} at position {position} is not a token id (negative or above 2^32 - 1)"),
        )
    }

    /// The tokens of sequence `i`.
    pub fn sequence(&self, i: usize) -> Result<Vec<u32>> {
        if i >= self.n_seq {
            return Err(Error::invalid(format!(
                "sequence {i} out of range ({} sequences)",
                self.n_seq
            )));
        }
        let mut out = vec![0u32; self.sequence_len(i)];
        self.read_tokens(self.sequence_offset(i), &mut out)?;
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_corruption() {
        let dir = std::env::temp_dir().join(format!("tm-mmidx-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let prefix = dir.join("ds");
        let docs: Vec<Vec<u32>> = vec![vec![1, 2, 3], vec![], vec![65_000, 7]];
        let mut w = IndexWriter::create(&prefix, DType::U16).unwrap();
        for d in &docs {
            w.add_document(d).unwrap();
        }
        assert!(w.add_document(&[70_000]).is_err());
        w.finish().unwrap();
        let ds = IndexedDataset::open(&prefix).unwrap();
        assert_eq!(ds.num_documents(), 3);
        assert_eq!(ds.num_tokens(), 5);
        for (i, d) in docs.iter().enumerate() {
            assert_eq!(&ds.sequence(i).unwrap(), d);
        }
        // Truncate .bin: must be refused, not read as garbage.
        let bin = bin_path(&prefix);
        let bytes = std::fs::read(&bin).unwrap();
        std::fs::write(&bin, &bytes[..bytes.len() - 1]).unwrap();
        assert!(matches!(
            IndexedDataset::open(&prefix),
            Err(Error::Format { .. })
        ));
        std::fs::write(idx_path(&prefix), b"garbage").unwrap();
        assert!(matches!(
            IndexedDataset::open(&prefix),
            Err(Error::Format { .. })
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
