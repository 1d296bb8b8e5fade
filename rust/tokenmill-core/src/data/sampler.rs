//! Seeded randomness and the deterministic mixing rule of the loader.
//!
//! Every random choice derives from `(seed, purpose, source, epoch | block)` through splitmix64, so a
//! decision never depends on what was computed before it, on thread count, or on where a run resumed.
//!
//! **Mixing rule.** The global sample stream is cut into blocks of [`BLOCK`] samples. Each block holds
//! exactly `c_s` samples of source `s`, where `c_s` apportions `BLOCK` to the normalised weights by
//! largest remainder (every positive weight gets at least one slot); the order of the labels inside
//! block `b` is a Fisher-Yates shuffle seeded by `(seed, b)`. So the source of global sample `g`
//! depends only on the seed and `g`, realised proportions are exact to `1/BLOCK` in every block, and
//! the index of `g` within its source, `b * c_s + (earlier labels s in block b)`, costs O(BLOCK) once
//! per block — not O(g): resuming at sample 10^12 costs what resuming at sample 10 does.
//!
//! Rejected: i.i.d. draws per sample (Megatron-style greedy error minimisation has the same problem):
//! the per-source index of sample `g` then needs a count over all earlier samples, O(g) to resume.

use crate::{Error, Result};
use std::sync::{Arc, Mutex};

/// Samples per mixing block: proportions are exact to 1/65536 within every block.
pub const BLOCK: u64 = 1 << 16;

pub fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// A seed for one purpose, derived from its parts (order matters).
pub fn derive(parts: &[u64]) -> u64 {
    parts
        .iter()
        .fold(0x5EED_0F70_4E4D_111Du64, |h, &p| splitmix64(h ^ p))
}

/// splitmix64 as a stream generator: fast, well mixed, and enough for shuffling.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        splitmix64(self.0)
    }

    /// Uniform in `0..n` (Lemire's multiply-shift with rejection; `n > 0`).
    pub fn below(&mut self, n: u64) -> u64 {
        let mut m = (self.next_u64() as u128) * (n as u128);
        if (m as u64) < n {
            let t = n.wrapping_neg() % n;
            while (m as u64) < t {
                m = (self.next_u64() as u128) * (n as u128);
            }
        }
        (m >> 64) as u64
    }

    pub fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            let j = self.below(i as u64 + 1) as usize;
            v.swap(i, j);
        }
    }
}

/// A seeded permutation of `0..n`.
pub fn permutation(n: usize, seed: u64) -> Vec<u32> {
    let mut p: Vec<u32> = (0..n as u32).collect();
    Rng::new(seed).shuffle(&mut p);
    p
}

struct Block {
    index: u64,
    /// Source of each sample in the block, and its index among that source's samples in the block.
    source: Vec<u16>,
    local: Vec<u32>,
}

/// Which source supplies global sample `g`, and its index in that source's own sample stream.
pub struct Mixture {
    counts: Vec<u64>,
    seed: u64,
    cache: Mutex<Vec<Arc<Block>>>,
}

impl Mixture {
    pub fn new(weights: &[f64], seed: u64) -> Result<Self> {
        if weights.is_empty() || weights.len() > u16::MAX as usize {
            return Err(Error::invalid(format!(
                "need between 1 and {} sources, got {}",
                u16::MAX,
                weights.len()
            )));
        }
        if let Some(w) = weights.iter().find(|w| !w.is_finite() || **w < 0.0) {
            return Err(Error::invalid(format!(
                "mixing weights must be finite and non-negative, got {w}"
            )));
        }
        let total: f64 = weights.iter().sum();
        if total <= 0.0 {
            return Err(Error::invalid(format!(
                "mixing weights must sum to a positive number, got {total}"
            )));
        }
        let quotas: Vec<f64> = weights.iter().map(|w| w / total * BLOCK as f64).collect();
        let mut counts: Vec<u64> = quotas.iter().map(|q| q.floor() as u64).collect();
        let mut left = BLOCK - counts.iter().sum::<u64>();
        let mut order: Vec<usize> = (0..weights.len()).collect();
        // Largest remainder first; ties go to the lower source index.
        order.sort_by(|&a, &b| {
            let (ra, rb) = (quotas[a] - quotas[a].floor(), quotas[b] - quotas[b].floor());
            rb.partial_cmp(&ra).unwrap().then(a.cmp(&b))
        });
        for &s in order.iter().cycle() {
            if left == 0 {
                break;
            }
            counts[s] += 1;
            left -= 1;
        }
        // A positive weight below 1/BLOCK still gets one slot, taken from the largest count.
        for s in 0..counts.len() {
            if weights[s] > 0.0 && counts[s] == 0 {
                let big = (0..counts.len()).max_by_key(|&i| counts[i]).unwrap();
                counts[big] -= 1;
                counts[s] += 1;
            }
        }
        Ok(Mixture {
            counts,
            seed,
            cache: Mutex::new(Vec::new()),
        })
    }

    /// Samples of each source per block of [`BLOCK`].
    pub fn counts(&self) -> &[u64] {
        &self.counts
    }

    fn single(&self) -> Option<usize> {
        (self.counts.iter().filter(|&&c| c > 0).count() == 1)
            .then(|| self.counts.iter().position(|&c| c > 0).unwrap())
    }

    fn block(&self, index: u64) -> Arc<Block> {
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(b) = cache.iter().find(|b| b.index == index) {
            return b.clone();
        }
        let mut source: Vec<u16> = Vec::with_capacity(BLOCK as usize);
        for (s, &c) in self.counts.iter().enumerate() {
            source.resize(source.len() + c as usize, s as u16);
        }
        Rng::new(derive(&[self.seed, 0xB10C, index])).shuffle(&mut source);
        let mut seen = vec![0u32; self.counts.len()];
        let local = source
            .iter()
            .map(|&s| {
                let k = seen[s as usize];
                seen[s as usize] += 1;
                k
            })
            .collect();
        let b = Arc::new(Block {
            index,
            source,
            local,
        });
        // Two blocks cover a batch that straddles a block boundary.
        if cache.len() >= 2 {
            cache.remove(0);
        }
        cache.push(b.clone());
        b
    }

    /// `(source, index within that source's stream)` of global sample `g`.
    pub fn locate(&self, g: u64) -> (usize, u64) {
        if let Some(s) = self.single() {
            return (s, g);
        }
        let (bi, off) = (g / BLOCK, (g % BLOCK) as usize);
        let b = self.block(bi);
        let s = b.source[off] as usize;
        (s, bi * self.counts[s] + b.local[off] as u64)
    }

    /// The global index of the `m`-th (0-based) sample of source `s` (`counts[s] > 0`).
    pub fn global_index(&self, s: usize, m: u64) -> u64 {
        if self.single().is_some() {
            return m;
        }
        let c = self.counts[s];
        let (bi, r) = (m / c, (m % c) as u32);
        let b = self.block(bi);
        let off = (0..BLOCK as usize)
            .find(|&i| b.source[i] as usize == s && b.local[i] == r)
            .expect("every block holds counts[s] samples of s");
        bi * BLOCK + off as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mixture_is_exact_per_block_and_invertible() {
        let m = Mixture::new(&[0.7, 0.2, 0.1, 0.0], 3).unwrap();
        assert_eq!(m.counts(), &[45875, 13107, 6554, 0]);
        let mut seen = [0u64; 4];
        for g in 0..2 * BLOCK + 17 {
            let (s, k) = m.locate(g);
            assert_eq!(k, seen[s], "source-local indices count up without gaps");
            seen[s] += 1;
            if g % 997 == 0 {
                assert_eq!(m.global_index(s, k), g);
            }
        }
        assert_eq!(seen[3], 0);
        assert!(Mixture::new(&[0.0, 0.0], 1).is_err());
        assert!(Mixture::new(&[1.0, f64::NAN], 1).is_err());
        let tiny = Mixture::new(&[1.0, 1e-9], 1).unwrap();
        assert_eq!(tiny.counts(), &[BLOCK - 1, 1]);
    }

    #[test]
    fn permutation_is_a_permutation() {
        let mut p = permutation(1000, 9);
        assert_ne!(p, (0..1000).collect::<Vec<u32>>());
        p.sort_unstable();
        assert_eq!(p, (0..1000).collect::<Vec<u32>>());
        assert_eq!(permutation(50, 1), permutation(50, 1));
    }
}
