//! How one epoch of one source is cut into samples of `seq_len` input positions.
//!
//! * `Concat`: documents in a seeded order, concatenated into one stream of `N` tokens, cut into
//!   `ceil(N / T)` windows; window `w` feeds tokens `[wT, wT + T)` as inputs and reads one token
//!   further for the last label (the GPT/LLaMA "seq_len + 1" window). The last window is padded, so
//!   every token is an input exactly once per epoch.
//! * `BestFit`: documents in a seeded order are split into chunks of `T` tokens (the last one shorter),
//!   then packed by best-fit decreasing: each chunk, longest first, goes into the open sequence whose
//!   free space it fills most tightly, or opens a new one. No chunk is split; padding is only at the
//!   end of a sequence. (The bin count depends only on the multiset of chunk lengths, so it is the
//!   same every epoch.)
//! * `Windows` (packing off): each document of at least `T + 1` tokens gives `(len - 1) / T`
//!   non-overlapping windows of `T + 1` tokens; shorter documents and tails are skipped.
//!
//! Each layout also shuffles its samples with a seed of its own. A sample is rendered from
//! [`Piece`]s: spans of one document, with where the label of the span's last token comes from.

use super::sampler::{derive, permutation};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Packing {
    Concat,
    BestFit,
    Windows,
}

/// Tokens `[start, start + len)` of document `doc`; `next` is the (doc, position) of the token that
/// labels the span's last token, or `None` when nothing follows (loss is off there).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Piece {
    pub doc: u32,
    pub start: u32,
    pub len: u32,
    pub next: Option<(u32, u32)>,
}

enum Kind {
    /// Documents in stream order and the prefix sums of their lengths (`n + 1` entries).
    Concat { order: Vec<u32>, cum: Vec<u64> },
    /// Chunks `(doc, start, len)` grouped by sequence: sequence `i` is `chunks[bins[i]..bins[i + 1]]`.
    BestFit {
        bins: Vec<u32>,
        chunks: Vec<(u32, u32, u32)>,
    },
    /// Eligible documents in order and the prefix sums of their window counts.
    Windows { order: Vec<u32>, cum: Vec<u64> },
}

pub struct Layout {
    pub epoch: u64,
    kind: Kind,
    /// Sample order: sample `j` of the epoch renders unit `perm[j]` (window or sequence).
    perm: Vec<u32>,
}

pub const SHUFFLE_DOCS: u64 = 0xD0C5;
pub const SHUFFLE_SAMPLES: u64 = 0x5A3F;

impl Layout {
    /// The layout of `epoch` for a source with these document lengths. `seed` already names the
    /// source; `T = seq_len`.
    pub fn build(lengths: &[u32], packing: Packing, t: u32, seed: u64, epoch: u64) -> Layout {
        let docs = permutation(lengths.len(), derive(&[seed, SHUFFLE_DOCS, epoch]));
        let kind = match packing {
            Packing::Concat => {
                let mut cum = Vec::with_capacity(docs.len() + 1);
                let mut acc = 0u64;
                cum.push(0);
                for &d in &docs {
                    acc += lengths[d as usize] as u64;
                    cum.push(acc);
                }
                Kind::Concat { order: docs, cum }
            }
            Packing::Windows => {
                let order: Vec<u32> = docs
                    .into_iter()
                    .filter(|&d| lengths[d as usize] > t)
                    .collect();
                let mut cum = Vec::with_capacity(order.len() + 1);
                let mut acc = 0u64;
                cum.push(0);
                for &d in &order {
                    acc += ((lengths[d as usize] - 1) / t) as u64;
                    cum.push(acc);
                }
                Kind::Windows { order, cum }
            }
            Packing::BestFit => best_fit(lengths, &docs, t),
        };
        let units = match &kind {
            Kind::Concat { cum, .. } => cum.last().unwrap().div_ceil(t as u64),
            Kind::Windows { cum, .. } => *cum.last().unwrap(),
            Kind::BestFit { bins, .. } => bins.len() as u64 - 1,
        };
        let perm = permutation(units as usize, derive(&[seed, SHUFFLE_SAMPLES, epoch]));
        Layout { epoch, kind, perm }
    }

    pub fn num_samples(&self) -> u64 {
        self.perm.len() as u64
    }

    /// The pieces of sample `j` (`j < num_samples()`), in row order. `cross_doc` (concat without
    /// document masking) lets the last token of a document be labelled by the next document's first.
    pub fn pieces(&self, j: u64, t: u32, lengths: &[u32], cross_doc: bool, out: &mut Vec<Piece>) {
        out.clear();
        let unit = self.perm[j as usize];
        match &self.kind {
            Kind::Concat { order, cum } => {
                let n = *cum.last().unwrap();
                let begin = unit as u64 * t as u64;
                let end = (begin + t as u64).min(n);
                // The document holding stream position `begin`: last k with cum[k] <= begin.
                let mut k = cum.partition_point(|&c| c <= begin) - 1;
                let mut pos = begin;
                while pos < end {
                    let (d, dstart, dlen) = (order[k], cum[k], lengths[order[k] as usize] as u64);
                    let start = pos - dstart;
                    let len = (dlen - start).min(end - pos);
                    let next = if start + len < dlen {
                        Some((d, (start + len) as u32))
                    } else if cross_doc {
                        // First token of the next non-empty document, if the stream goes on.
                        let q = dstart + dlen;
                        (q < n).then(|| {
                            let kk = cum.partition_point(|&c| c <= q) - 1;
                            (order[kk], 0)
                        })
                    } else {
                        None
                    };
                    if len > 0 {
                        out.push(Piece {
                            doc: d,
                            start: start as u32,
                            len: len as u32,
                            next,
                        });
                    }
                    pos += len;
                    k += 1;
                }
            }
            Kind::Windows { order, cum } => {
                let k = cum.partition_point(|&c| c <= unit as u64) - 1;
                let w = (unit as u64 - cum[k]) as u32;
                out.push(Piece {
                    doc: order[k],
                    start: w * t,
                    len: t,
                    next: Some((order[k], w * t + t)),
                });
            }
            Kind::BestFit { bins, chunks } => {
                for &(d, start, len) in
                    &chunks[bins[unit as usize] as usize..bins[unit as usize + 1] as usize]
                {
                    let end = start + len;
                    out.push(Piece {
                        doc: d,
                        start,
                        len,
                        next: (end < lengths[d as usize]).then_some((d, end)),
                    });
                }
            }
        }
    }
}

/// Best-fit decreasing over the chunks of the documents in `docs` order.
fn best_fit(lengths: &[u32], docs: &[u32], t: u32) -> Kind {
    // Chunks bucketed by length (a stable counting sort: equal lengths keep the shuffled order).
    let mut by_len: Vec<Vec<(u32, u32)>> = vec![Vec::new(); t as usize + 1];
    for &d in docs {
        let n = lengths[d as usize];
        let mut s = 0;
        while s < n {
            let len = (n - s).min(t);
            by_len[len as usize].push((d, s));
            s += len;
        }
    }
    // Open sequences by free space: `open[c]` stacks the ids of sequences with c free slots;
    // `nonempty` is a bitset over c for the "smallest c >= len" search.
    let words = (t as usize + 1).div_ceil(64);
    let mut open: Vec<Vec<u32>> = vec![Vec::new(); t as usize + 1];
    let mut nonempty = vec![0u64; words];
    let mut placed: Vec<(u32, u32, u32, u32)> = Vec::new(); // (bin, doc, start, len)
    let mut n_bins = 0u32;
    for len in (1..=t).rev() {
        for &(d, s) in &by_len[len as usize] {
            let fit = next_set(&nonempty, len as usize);
            let (bin, free) = match fit {
                Some(c) => {
                    let b = open[c].pop().unwrap();
                    if open[c].is_empty() {
                        nonempty[c / 64] &= !(1u64 << (c % 64));
                    }
                    (b, c as u32)
                }
                None => {
                    n_bins += 1;
                    (n_bins - 1, t)
                }
            };
            placed.push((bin, d, s, len));
            let rest = (free - len) as usize;
            if rest > 0 {
                open[rest].push(bin);
                nonempty[rest / 64] |= 1u64 << (rest % 64);
            }
        }
    }
    // Group by sequence (counting sort by bin id keeps each bin's insertion order).
    let mut bins = vec![0u32; n_bins as usize + 1];
    for p in &placed {
        bins[p.0 as usize + 1] += 1;
    }
    for i in 0..n_bins as usize {
        bins[i + 1] += bins[i];
    }
    let mut fill = bins.clone();
    let mut chunks = vec![(0u32, 0u32, 0u32); placed.len()];
    for &(b, d, s, len) in &placed {
        chunks[fill[b as usize] as usize] = (d, s, len);
        fill[b as usize] += 1;
    }
    Kind::BestFit { bins, chunks }
}

/// The smallest set bit index `>= from`.
fn next_set(bits: &[u64], from: usize) -> Option<usize> {
    let mut w = from / 64;
    if w >= bits.len() {
        return None;
    }
    let mut word = bits[w] & (!0u64 << (from % 64));
    loop {
        if word != 0 {
            return Some(w * 64 + word.trailing_zeros() as usize);
        }
        w += 1;
        if w == bits.len() {
            return None;
        }
        word = bits[w];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all_pieces(l: &Layout, t: u32, lengths: &[u32], cross: bool) -> Vec<Vec<Piece>> {
        let mut out = Vec::new();
        (0..l.num_samples())
            .map(|j| {
                l.pieces(j, t, lengths, cross, &mut out);
                out.clone()
            })
            .collect()
    }

    #[test]
    fn concat_covers_every_token_once() {
        let lengths = [5u32, 0, 17, 3, 9, 1];
        let t = 4;
        let l = Layout::build(&lengths, Packing::Concat, t, 7, 0);
        assert_eq!(l.num_samples(), 35u64.div_ceil(4));
        let mut seen: Vec<Vec<u32>> = lengths.iter().map(|&n| vec![0; n as usize]).collect();
        for row in all_pieces(&l, t, &lengths, false) {
            assert!(row.iter().map(|p| p.len).sum::<u32>() <= t);
            for p in row {
                for i in p.start..p.start + p.len {
                    seen[p.doc as usize][i as usize] += 1;
                }
            }
        }
        assert!(seen.iter().flatten().all(|&c| c == 1));
    }

    #[test]
    fn best_fit_packs_whole_chunks_tightly() {
        let lengths = [10u32, 3, 7, 2, 8, 1, 4, 4, 25];
        let t = 8;
        let l = Layout::build(&lengths, Packing::BestFit, t, 1, 2);
        let rows = all_pieces(&l, t, &lengths, false);
        let total: u32 = lengths.iter().sum();
        assert!(rows.len() as u32 >= total.div_ceil(t));
        let mut chunks = Vec::new();
        for row in &rows {
            assert!(row.iter().map(|p| p.len).sum::<u32>() <= t);
            for p in row {
                assert_eq!(p.start % t, 0, "chunks start at multiples of seq_len");
                let expect = (lengths[p.doc as usize] - p.start).min(t);
                assert_eq!(p.len, expect, "a chunk is never split");
                chunks.push((p.doc, p.start));
            }
        }
        chunks.sort();
        let n_chunks: u32 = lengths.iter().map(|n| n.div_ceil(t)).sum();
        assert_eq!(chunks.len() as u32, n_chunks);
        chunks.dedup();
        assert_eq!(chunks.len() as u32, n_chunks);
        assert_eq!(
            rows.len(),
            8,
            "best-fit decreasing reaches the optimum here"
        );
    }
}
