//! The loader core: sources (token files, optional loss masks), the mixture, per-epoch layouts, and
//! batch rendering into caller-owned buffers.
//!
//! Global sample `g` -> (source `s`, source-local index `k`) by the [`Mixture`]; `k` -> epoch
//! `k / samples_per_epoch(s)` and sample `k % samples_per_epoch(s)` of that epoch's [`Layout`]. Every
//! step is a pure function of the seed and `g`, so any position is reached in O(1) in `g` (an epoch's
//! layout costs O(documents) to build, whatever the epoch number).
//!
//! A row of a batch (`T` positions):
//! * `input_ids`: the pieces' tokens back to back, then `pad_id`;
//! * `labels[i]`: the token that follows `input_ids[i]` in its document (see [`Piece::next`]), or
//!   -100 when none follows, over padding, and where the loss mask of that token is 0 (SFT prompts);
//! * with document masking: `position_ids` restart at 0 at each piece (Megatron's
//!   `reset_position_ids`: a document cut by the row start also restarts), and each piece, plus the
//!   padding run, is one segment of `cu_seqlens` over the flattened `[B * T]` batch (flash-attention's
//!   varlen layout: `B * T` tokens in all). Without it: one causal segment of `T` per row.

use super::mmidx::{DType, IndexedDataset};
use super::packing::{Layout, Packing, Piece};
use super::sampler::{derive, Mixture};
use crate::{Error, Result};
use rayon::prelude::*;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{sync_channel, Receiver};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

pub const IGNORE_INDEX: i64 = -100;

pub struct SourceSpec {
    pub prefix: PathBuf,
    /// A uint8 MMIDIDX dataset with one 0/1 entry per token (1 = learn this token).
    pub mask: Option<PathBuf>,
    pub weight: f64,
}

#[derive(Clone, Debug)]
pub struct Config {
    pub seq_len: u32,
    pub packing: Packing,
    pub seed: u64,
    pub document_mask: bool,
    /// `None`: every source repeats forever; `Some(n)`: the stream ends where the first source
    /// would start its pass `n + 1`.
    pub epochs: Option<u64>,
    pub pad_id: i64,
    pub num_threads: usize,
}

struct Source {
    ds: IndexedDataset,
    mask: Option<IndexedDataset>,
    lengths: Vec<u32>,
    offsets: Vec<u64>,
    per_epoch: u64,
    seed: u64,
    cache: Mutex<Vec<Arc<Layout>>>,
}

impl Source {
    fn open(spec: &SourceSpec, index: usize, cfg: &Config) -> Result<Source> {
        let ds = IndexedDataset::open(&spec.prefix)?;
        let n = ds.num_sequences();
        let lengths: Vec<u32> = (0..n).map(|i| ds.sequence_len(i) as u32).collect();
        let offsets: Vec<u64> = (0..n).map(|i| ds.sequence_offset(i)).collect();
        let mask = match &spec.mask {
            None => None,
            Some(p) => {
                let m = IndexedDataset::open(p)?;
                if m.dtype() != DType::U8 {
                    return Err(Error::format(
                        p,
                        format!("a loss mask must be uint8, found {}", m.dtype().name()),
                    ));
                }
                let same = m.num_sequences() == n
                    && (0..n).all(|i| m.sequence_len(i) == lengths[i] as usize);
                if !same {
                    return Err(Error::format(
                        p,
                        format!(
                            "loss mask does not match the documents of {} (different count or lengths)",
                            spec.prefix.display()
                        ),
                    ));
                }
                Some(m)
            }
        };
        if ds.num_tokens() == 0 {
            return Err(Error::format(
                &spec.prefix,
                "the dataset holds no tokens".to_string(),
            ));
        }
        if cfg.packing == Packing::Windows {
            let longest = lengths.iter().copied().max().unwrap_or(0);
            if longest <= cfg.seq_len {
                return Err(Error::invalid(format!(
                    "{}: with packing off every sample is a window of seq_len + 1 = {} tokens inside one document, but the longest document has {longest} tokens",
                    spec.prefix.display(),
                    cfg.seq_len as u64 + 1
                )));
            }
        }
        // Layouts index documents and samples with u32.
        let windows = ds.num_tokens().div_ceil(cfg.seq_len as u64);
        if n >= u32::MAX as usize || windows >= u32::MAX as u64 {
            return Err(Error::invalid(format!(
                "{}: {n} documents / {windows} samples per epoch exceed the loader's 2^32 limit (split the dataset)",
                spec.prefix.display()
            )));
        }
        let seed = derive(&[cfg.seed, 0x50_u64, index as u64]);
        let first = Layout::build(&lengths, cfg.packing, cfg.seq_len, seed, 0);
        Ok(Source {
            per_epoch: first.num_samples(),
            ds,
            mask,
            lengths,
            offsets,
            seed,
            cache: Mutex::new(vec![Arc::new(first)]),
        })
    }

    fn layout(&self, epoch: u64, cfg: &Config) -> Arc<Layout> {
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(l) = cache.iter().find(|l| l.epoch == epoch) {
            return l.clone();
        }
        let l = Arc::new(Layout::build(
            &self.lengths,
            cfg.packing,
            cfg.seq_len,
            self.seed,
            epoch,
        ));
        if cache.len() >= 2 {
            cache.remove(0);
        }
        cache.push(l.clone());
        l
    }

    fn token(&self, doc: u32, pos: u32) -> i64 {
        let i = self.offsets[doc as usize] + pos as u64;
        read_one(self.ds.token_bytes(), self.ds.dtype(), i as usize)
    }

    fn learn(&self, doc: u32, pos: u32) -> bool {
        match &self.mask {
            None => true,
            Some(m) => m.token_bytes()[(self.offsets[doc as usize] + pos as u64) as usize] != 0,
        }
    }

    fn read(&self, doc: u32, start: u32, out: &mut [i64]) {
        let at = (self.offsets[doc as usize] + start as u64) as usize;
        let b = self.ds.token_bytes();
        match self.ds.dtype() {
            DType::U8 => {
                for (o, &x) in out.iter_mut().zip(&b[at..]) {
                    *o = x as i64;
                }
            }
            DType::U16 => {
                for (o, c) in out.iter_mut().zip(b[2 * at..].chunks_exact(2)) {
                    *o = u16::from_le_bytes([c[0], c[1]]) as i64;
                }
            }
            DType::I32 => {
                for (o, c) in out.iter_mut().zip(b[4 * at..].chunks_exact(4)) {
                    *o = i32::from_le_bytes([c[0], c[1], c[2], c[3]]) as i64;
                }
            }
            DType::I64 => {
                for (o, c) in out.iter_mut().zip(b[8 * at..].chunks_exact(8)) {
                    *o = i64::from_le_bytes(c.try_into().unwrap());
                }
            }
        }
    }
}

fn read_one(b: &[u8], dtype: DType, i: usize) -> i64 {
    match dtype {
        DType::U8 => b[i] as i64,
        DType::U16 => u16::from_le_bytes([b[2 * i], b[2 * i + 1]]) as i64,
        DType::I32 => i32::from_le_bytes(b[4 * i..4 * i + 4].try_into().unwrap()) as i64,
        DType::I64 => i64::from_le_bytes(b[8 * i..8 * i + 8].try_into().unwrap()),
    }
}

pub struct Loader {
    cfg: Config,
    sources: Vec<Source>,
    mixture: Mixture,
    len: Option<u64>,
    pool: rayon::ThreadPool,
}

/// One rendered batch's variable-size facts.
pub struct BatchInfo {
    pub cu_len: usize,
    pub max_seqlen: usize,
}

impl Loader {
    pub fn new(specs: &[SourceSpec], cfg: Config) -> Result<Loader> {
        if cfg.seq_len == 0 || cfg.seq_len > (1 << 30) {
            return Err(Error::invalid(format!(
                "seq_len must be between 1 and 2^30, got {}",
                cfg.seq_len
            )));
        }
        if cfg.epochs == Some(0) {
            return Err(Error::invalid("epochs must be at least 1 (or None)"));
        }
        let weights: Vec<f64> = specs.iter().map(|s| s.weight).collect();
        let mixture = Mixture::new(&weights, derive(&[cfg.seed, 0x313]))?;
        let sources = specs
            .iter()
            .enumerate()
            .map(|(i, s)| Source::open(s, i, &cfg))
            .collect::<Result<Vec<_>>>()?;
        let len = cfg.epochs.map(|e| {
            (0..sources.len())
                .filter(|&s| mixture.counts()[s] > 0)
                .map(|s| mixture.global_index(s, e * sources[s].per_epoch))
                .min()
                .unwrap()
        });
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(cfg.num_threads.max(1))
            .thread_name(|i| format!("tokenmill-loader-{i}"))
            .build()
            .map_err(|e| Error::invalid(format!("cannot start loader threads: {e}")))?;
        Ok(Loader {
            cfg,
            sources,
            mixture,
            len,
            pool,
        })
    }

    /// Samples in the global stream (`None`: endless).
    pub fn len(&self) -> Option<u64> {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == Some(0)
    }

    pub fn seq_len(&self) -> usize {
        self.cfg.seq_len as usize
    }

    pub fn samples_per_epoch(&self) -> Vec<u64> {
        self.sources.iter().map(|s| s.per_epoch).collect()
    }

    pub fn mixture_counts(&self) -> &[u64] {
        self.mixture.counts()
    }

    /// `(source, source-local index)` of global sample `g`.
    pub fn locate(&self, g: u64) -> (usize, u64) {
        self.mixture.locate(g)
    }

    /// `(source, epoch, pieces)` of global sample `g`.
    pub fn sample(&self, g: u64) -> Result<(usize, u64, Vec<Piece>)> {
        self.check_range(g, 1)?;
        let (s, k) = self.mixture.locate(g);
        let src = &self.sources[s];
        let epoch = k / src.per_epoch;
        let mut out = Vec::new();
        self.sources[s].layout(epoch, &self.cfg).pieces(
            k % src.per_epoch,
            self.cfg.seq_len,
            &src.lengths,
            self.cross_doc(),
            &mut out,
        );
        Ok((s, epoch, out))
    }

    fn cross_doc(&self) -> bool {
        self.cfg.packing == Packing::Concat && !self.cfg.document_mask
    }

    fn check_range(&self, start: u64, rows: usize) -> Result<()> {
        match (self.len, start.checked_add(rows as u64)) {
            (_, None) => Err(Error::invalid("sample index overflows")),
            (Some(n), Some(end)) if end > n => Err(Error::invalid(format!(
                "samples {start}..{end} are past the end of the stream ({n} samples)"
            ))),
            _ => Ok(()),
        }
    }

    /// Render global samples `start .. start + rows` into `[rows, T]` buffers; `cu_seqlens` needs
    /// room for `rows * T + 1` entries and receives `BatchInfo::cu_len` of them.
    pub fn fill(
        &self,
        start: u64,
        rows: usize,
        input_ids: &mut [i64],
        labels: &mut [i64],
        position_ids: &mut [i64],
        cu_seqlens: &mut [i32],
    ) -> Result<BatchInfo> {
        let t = self.cfg.seq_len as usize;
        let cells = rows
            .checked_mul(t)
            .filter(|&c| c < i32::MAX as usize)
            .ok_or_else(|| Error::invalid("batch_size * seq_len must stay below 2^31"))?;
        if input_ids.len() != cells
            || labels.len() != cells
            || position_ids.len() != cells
            || cu_seqlens.len() < cells + 1
        {
            return Err(Error::invalid(format!(
                "output buffers must hold {rows} x {t} values (and {} cu_seqlens)",
                cells + 1
            )));
        }
        self.check_range(start, rows)?;
        // Cheap, sequential: where each row comes from (layouts are cached and shared).
        let plan: Vec<(usize, Arc<Layout>, u64)> = (0..rows as u64)
            .map(|r| {
                let (s, k) = self.mixture.locate(start + r);
                let src = &self.sources[s];
                (
                    s,
                    src.layout(k / src.per_epoch, &self.cfg),
                    k % src.per_epoch,
                )
            })
            .collect();
        let cross = self.cross_doc();
        let docmask = self.cfg.document_mask;
        let pad = self.cfg.pad_id;
        let segments: Vec<Vec<u32>> = self.pool.install(|| {
            input_ids
                .par_chunks_mut(t)
                .zip(labels.par_chunks_mut(t))
                .zip(position_ids.par_chunks_mut(t))
                .zip(plan.par_iter())
                .map_init(Vec::new, |pieces, (((inp, lab), pos), (s, layout, j))| {
                    let src = &self.sources[*s];
                    layout.pieces(*j, t as u32, &src.lengths, cross, pieces);
                    render_row(src, pieces, inp, lab, pos, docmask, pad)
                })
                .collect()
        });
        let mut n = 0usize;
        let mut acc = 0i32;
        let mut max_seqlen = 0usize;
        cu_seqlens[0] = 0;
        for row in &segments {
            for &len in row {
                acc += len as i32;
                n += 1;
                cu_seqlens[n] = acc;
                max_seqlen = max_seqlen.max(len as usize);
            }
        }
        Ok(BatchInfo {
            cu_len: n + 1,
            max_seqlen,
        })
    }
}

/// A batch rendered into buffers the loader owns (handed to Python without copies).
pub struct Batch {
    pub rows: usize,
    pub input_ids: Vec<i64>,
    pub labels: Vec<i64>,
    pub position_ids: Vec<i64>,
    /// Room for `rows * T + 1` entries; the first `cu_len` are the batch's.
    pub cu_seqlens: Vec<i32>,
    pub cu_len: usize,
    pub max_seqlen: usize,
}

/// Buffers handed back once Python has freed the arrays that wrapped them. Reusing them skips
/// zeroing ~0.5 MB per batch (`vec![0; n]`), which cost the prefetch path ~40 us/batch; every
/// element is overwritten by `fill` before it is read.
#[derive(Default)]
pub struct BufferPool {
    wide: Mutex<Vec<Vec<i64>>>,
    narrow: Mutex<Vec<Vec<i32>>>,
}

/// Buffers kept for reuse: a few batches' worth (prefetch depth plus batches the consumer holds).
const POOL_KEEP: usize = 32;

fn take<T: Clone + Default>(pool: &Mutex<Vec<Vec<T>>>, n: usize) -> Vec<T> {
    let mut p = pool.lock().unwrap_or_else(|e| e.into_inner());
    match p.iter().position(|v| v.len() == n) {
        Some(i) => p.swap_remove(i),
        None => vec![T::default(); n],
    }
}

fn give<T>(pool: &Mutex<Vec<Vec<T>>>, v: Vec<T>) {
    let mut p = pool.lock().unwrap_or_else(|e| e.into_inner());
    if p.len() < POOL_KEEP {
        p.push(v);
    }
}

impl BufferPool {
    pub fn give_wide(&self, v: Vec<i64>) {
        give(&self.wide, v)
    }

    pub fn give_narrow(&self, v: Vec<i32>) {
        give(&self.narrow, v)
    }
}

impl Loader {
    pub fn render(&self, start: u64, rows: usize, pool: &BufferPool) -> Result<Batch> {
        let cells = rows * self.cfg.seq_len as usize;
        let mut b = Batch {
            rows,
            input_ids: take(&pool.wide, cells),
            labels: take(&pool.wide, cells),
            position_ids: take(&pool.wide, cells),
            cu_seqlens: take(&pool.narrow, cells + 1),
            cu_len: 0,
            max_seqlen: 0,
        };
        let info = self.fill(
            start,
            rows,
            &mut b.input_ids,
            &mut b.labels,
            &mut b.position_ids,
            &mut b.cu_seqlens,
        )?;
        b.cu_len = info.cu_len;
        b.max_seqlen = info.max_seqlen;
        Ok(b)
    }
}

/// Batch starts `first + j * stride` for `j < count` (endless when `None`), `rows` rows each (fewer
/// where the stream ends).
#[derive(Clone, Copy, Debug)]
pub struct Schedule {
    pub first: u64,
    pub stride: u64,
    pub rows: usize,
    pub count: Option<u64>,
}

/// Renders batches of a [`Schedule`] ahead of the consumer on a thread of its own, `depth` deep.
/// Dropping it stops the thread (the channel closes; a batch being rendered is discarded).
pub struct Prefetcher {
    pool: Arc<BufferPool>,
    stop: Arc<AtomicBool>,
    rx: Option<Receiver<Result<Batch>>>,
    handle: Option<JoinHandle<()>>,
}

impl Prefetcher {
    pub fn start(loader: Arc<Loader>, schedule: Schedule, depth: usize) -> Result<Prefetcher> {
        let (tx, rx) = sync_channel(depth.max(1));
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let pool = Arc::new(BufferPool::default());
        let buffers = pool.clone();
        let handle = std::thread::Builder::new()
            .name("tokenmill-prefetch".into())
            .spawn(move || {
                let mut j = 0u64;
                while schedule.count.unwrap_or(u64::MAX) > j && !flag.load(Ordering::Relaxed) {
                    let start = schedule.first + j * schedule.stride;
                    let rows = match loader.len() {
                        Some(n) => schedule.rows.min(n.saturating_sub(start) as usize),
                        None => schedule.rows,
                    };
                    let batch = loader.render(start, rows, &buffers);
                    let failed = batch.is_err();
                    if tx.send(batch).is_err() || failed {
                        return;
                    }
                    j += 1;
                }
            })
            .map_err(|e| Error::invalid(format!("cannot start the prefetch thread: {e}")))?;
        Ok(Prefetcher {
            pool,
            stop,
            rx: Some(rx),
            handle: Some(handle),
        })
    }

    /// Where the consumer returns buffers it is done with.
    pub fn pool(&self) -> Arc<BufferPool> {
        self.pool.clone()
    }

    /// The next batch, waiting for it; `None` once the schedule is done.
    pub fn recv(&mut self) -> Option<Result<Batch>> {
        self.rx.as_ref()?.recv().ok()
    }
}

impl Drop for Prefetcher {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        drop(self.rx.take());
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

/// Fill one row; returns its segment lengths (summing to `T`).
fn render_row(
    src: &Source,
    pieces: &[Piece],
    inp: &mut [i64],
    lab: &mut [i64],
    pos: &mut [i64],
    docmask: bool,
    pad: i64,
) -> Vec<u32> {
    let t = inp.len();
    let mut segs = Vec::with_capacity(pieces.len() + 1);
    let mut at = 0usize;
    for p in pieces {
        let len = p.len as usize;
        let (i, l) = (&mut inp[at..at + len], &mut lab[at..at + len]);
        src.read(p.doc, p.start, i);
        // labels[x] = input[x + 1] within the piece, then the piece's `next` token.
        l[..len - 1].copy_from_slice(&i[1..]);
        l[len - 1] = match p.next {
            Some((d, q)) if src.learn(d, q) => src.token(d, q),
            _ => IGNORE_INDEX,
        };
        if let Some(m) = &src.mask {
            // The mask of the tokens predicted at positions 0..len-1: tokens start+1 ..= start+len-1.
            let at = (src.offsets[p.doc as usize] + p.start as u64) as usize + 1;
            let learned = &m.token_bytes()[at..at + len - 1];
            for (y, &keep) in l.iter_mut().zip(learned) {
                if keep == 0 {
                    *y = IGNORE_INDEX;
                }
            }
        }
        if docmask {
            for (x, v) in pos[at..at + len].iter_mut().enumerate() {
                *v = x as i64;
            }
            segs.push(p.len);
        }
        at += len;
    }
    if at < t {
        inp[at..].fill(pad);
        lab[at..].fill(IGNORE_INDEX);
        if docmask {
            for (x, v) in pos[at..].iter_mut().enumerate() {
                *v = x as i64;
            }
            segs.push((t - at) as u32);
        }
    }
    if !docmask {
        for (x, v) in pos.iter_mut().enumerate() {
            *v = x as i64;
        }
        segs.push(t as u32);
    }
    segs
}

/// Write documents to `PREFIX.bin/.idx` (used by tests, SFT masks and tools).
pub fn write_documents(prefix: &Path, dtype: DType, docs: &[Vec<u32>]) -> Result<()> {
    let mut w = super::mmidx::IndexWriter::create(prefix, dtype)?;
    for d in docs {
        w.add_document(d)?;
    }
    w.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(packing: Packing, t: u32, docmask: bool, epochs: Option<u64>) -> Config {
        Config {
            seq_len: t,
            packing,
            seed: 5,
            document_mask: docmask,
            epochs,
            pad_id: 0,
            num_threads: 2,
        }
    }

    #[test]
    fn concat_epoch_labels_and_boundaries() {
        let dir = std::env::temp_dir().join(format!("tm-loader-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let prefix = dir.join("a");
        // Token = 1000 * (doc + 1) + position: every token names its document and place.
        let docs: Vec<Vec<u32>> = [3u32, 8, 1, 5]
            .iter()
            .enumerate()
            .map(|(d, &n)| (0..n).map(|p| 1000 * (d as u32 + 1) + p).collect())
            .collect();
        write_documents(&prefix, DType::I32, &docs).unwrap();
        let spec = [SourceSpec {
            prefix: prefix.clone(),
            mask: None,
            weight: 1.0,
        }];
        let t = 4usize;
        let l = Loader::new(&spec, cfg(Packing::Concat, t as u32, true, Some(1))).unwrap();
        let n = l.len().unwrap() as usize;
        assert_eq!(n, 17usize.div_ceil(t));
        let (mut a, mut b, mut c, mut cu) = (
            vec![0; n * t],
            vec![0; n * t],
            vec![0; n * t],
            vec![0; n * t + 1],
        );
        let info = l.fill(0, n, &mut a, &mut b, &mut c, &mut cu).unwrap();
        let mut got: Vec<i64> = a.iter().copied().filter(|&x| x != 0).collect();
        got.sort();
        let mut want: Vec<i64> = docs.iter().flatten().map(|&x| x as i64).collect();
        want.sort();
        assert_eq!(got, want);
        for i in 0..n * t {
            let (x, y) = (a[i], b[i]);
            if y != IGNORE_INDEX {
                assert_eq!(y, x + 1, "labels follow within a document");
            } else if x != 0 {
                let (d, p) = (x / 1000 - 1, x % 1000);
                assert_eq!(
                    p + 1,
                    docs[d as usize].len() as i64,
                    "only document ends are unlabelled"
                );
            }
        }
        assert_eq!(cu[info.cu_len - 1] as usize, n * t);
        assert!(l
            .fill(
                n as u64,
                1,
                &mut a[..t],
                &mut b[..t],
                &mut c[..t],
                &mut cu[..t + 1]
            )
            .is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
