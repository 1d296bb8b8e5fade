//! Byte-pair merging with tiktoken's semantics: start from single bytes and repeatedly merge the
//! adjacent pair whose concatenation has the lowest rank (= token id), leftmost first on ties.
//!
//! Short pieces use tiktoken's array scan with cached pair ranks (O(n^2) but tiny constants);
//! long ones use a binary heap of (rank, left position) with lazy invalidation over a linked list
//! of symbols: O(n log n), so a 1 MiB run of one letter (a single piece) stays fast.
//! Both produce the same result: the heap pops exactly the pair the scan would pick.

use rustc_hash::FxHashMap;
use std::cmp::Reverse;
use std::collections::BinaryHeap;

/// (left id, right id) -> `priority << 32 | merged id`. Without an explicit merge list (tiktoken)
/// every pair whose concatenation is a token is a merge and its priority is the merged id; with
/// one (Hugging Face) the priority is the merge's index. One u64 so that one lookup gives both.
pub type PairMap = FxHashMap<(u32, u32), u64>;

const NONE64: u64 = u64::MAX;

/// Everything the merge needs: the byte tokens, the pair table, and the pair entries of all
/// 256 x 256 byte pairs in a flat array (every piece starts as bytes: no hashing for the first
/// round of lookups).
pub struct Ranks {
    pub byte_ids: [u32; 256],
    pub pairs: PairMap,
    byte_pairs: Box<[u64]>,
    /// One more than the largest merge priority (the size of a dense priority-indexed array).
    n_prio: usize,
}

impl Ranks {
    pub fn new(byte_ids: [u32; 256], pairs: PairMap) -> Self {
        let mut byte_pairs = vec![NONE64; 1 << 16].into_boxed_slice();
        if byte_ids.iter().all(|&b| b != u32::MAX) {
            for a in 0..256 {
                for b in 0..256 {
                    byte_pairs[a << 8 | b] = rank(&pairs, byte_ids[a], byte_ids[b]);
                }
            }
        }
        let n_prio = pairs
            .values()
            .map(|&v| (v >> 32) as usize + 1)
            .max()
            .unwrap_or(0);
        Ranks {
            byte_ids,
            pairs,
            byte_pairs,
            n_prio,
        }
    }

    #[inline]
    fn bytes_rank(&self, a: u8, b: u8) -> u64 {
        self.byte_pairs[(a as usize) << 8 | b as usize]
    }
}

/// Above this many bytes a piece goes to the heap. Measured on the stdlib corpus (cl100k-like vocab):
/// the scan is faster below ~100 bytes, the heap above; almost all pieces are far shorter.
pub const SCAN_MAX: usize = 96;

const NONE: u32 = u32::MAX;

#[inline]
pub fn merge(piece: &[u8], ranks: &Ranks, out: &mut Vec<u32>) {
    if piece.len() <= SCAN_MAX {
        merge_scan(piece, ranks, out)
    } else {
        merge_heap(piece, ranks, out)
    }
}

#[inline]
fn rank(pairs: &PairMap, a: u32, b: u32) -> u64 {
    pairs.get(&(a, b)).copied().unwrap_or(NONE64)
}

/// Tried and dropped (issue 14, prose without the piece cache, tokbench CPU time, best of 8):
/// merged-away symbols left in place as tombstones with prev/next links instead of shifting the
/// arrays (no `memmove` per merge), on stack arrays sized 16 / 40 / 96 by piece length: prose
/// 51 -> 48 MB/s, code 86 -> 74 MB/s. The scan's time is in the pair-table probes, which miss
/// the cache, not in the shifting. Also dropped: the pair map as an open-addressing table with key
/// and entry in one 16-byte slot (one cache line per probe instead of SwissTable's control bytes
/// plus entry): 52 -> 57 and 54 -> 55 MB/s in two runs, within noise; the probes still miss. And a
/// 128 KiB bit filter of pair hashes in front of the map (answers most non-merges without a probe):
/// 55 -> 51 MB/s.
pub fn merge_scan(piece: &[u8], r: &Ranks, out: &mut Vec<u32>) {
    let n = piece.len();
    debug_assert!(n <= SCAN_MAX);
    if n < 2 {
        out.extend(piece.iter().map(|&b| r.byte_ids[b as usize]));
        return;
    }
    // Fixed arrays on the stack: no allocation per piece.
    let mut ids = [0u32; SCAN_MAX];
    let mut ranks = [NONE64; SCAN_MAX];
    for (i, &b) in piece.iter().enumerate() {
        ids[i] = r.byte_ids[b as usize];
    }
    for i in 0..n - 1 {
        ranks[i] = r.bytes_rank(piece[i], piece[i + 1]);
    }
    // ranks[i] = pair entry of (ids[i], ids[i+1]); len symbols, len - 1 pairs.
    let mut len = n;
    loop {
        let (mut best, mut at) = (NONE64, 0);
        for (i, &x) in ranks[..len - 1].iter().enumerate() {
            if x < best {
                best = x;
                at = i;
            }
        }
        if best == NONE64 {
            break;
        }
        ids[at] = best as u32;
        ids.copy_within(at + 2..len, at + 1);
        ranks.copy_within(at + 1..len - 1, at);
        len -= 1;
        if at + 1 < len {
            ranks[at] = rank(&r.pairs, ids[at], ids[at + 1]);
        }
        if at > 0 {
            ranks[at - 1] = rank(&r.pairs, ids[at - 1], ids[at]);
        }
        if len == 1 {
            break;
        }
    }
    out.extend_from_slice(&ids[..len]);
}

/// One priority's pending pairs, by left position: the initial ones arrive in position order (a
/// plain vector with a cursor, O(1) each). Pairs created by merges are mostly created left to right
/// too, so they are appended to that vector when not below its last entry; only the rest go to a
/// small heap. `pop` takes the smaller head of the two, so the pop order is the same either way.
struct Bucket {
    prio: u32,
    sorted: Vec<u32>,
    head: usize,
    late: BinaryHeap<Reverse<u32>>,
}

impl Bucket {
    fn new(prio: u32) -> Self {
        Bucket {
            prio,
            sorted: Vec::new(),
            head: 0,
            late: BinaryHeap::new(),
        }
    }

    #[inline]
    fn is_empty(&self) -> bool {
        self.head == self.sorted.len() && self.late.is_empty()
    }

    #[inline]
    fn push(&mut self, pos: u32) {
        if self.head == self.sorted.len() {
            self.sorted.clear();
            self.head = 0;
            self.sorted.push(pos);
        } else if pos >= self.sorted[self.sorted.len() - 1] {
            self.sorted.push(pos);
        } else {
            self.late.push(Reverse(pos));
        }
    }

    #[inline]
    fn pop(&mut self) -> Option<u32> {
        let a = self.sorted.get(self.head).copied();
        let b = self.late.peek().map(|r| r.0);
        match (a, b) {
            (Some(x), Some(y)) if y < x => self.late.pop().map(|r| r.0),
            (Some(x), _) => {
                self.head += 1;
                Some(x)
            }
            (None, _) => self.late.pop().map(|r| r.0),
        }
    }
}

/// Priority -> bucket index: a dense array when the piece is long enough to pay for clearing one
/// entry per priority, else a hash map (pieces just above `SCAN_MAX` with a 200k vocabulary).
enum BucketIndex {
    Dense(Vec<u32>),
    Sparse(FxHashMap<u32, u32>),
}

impl BucketIndex {
    fn dense_pays(n: usize, n_prio: usize) -> bool {
        n_prio <= n.saturating_mul(16)
    }

    #[inline]
    fn get(&mut self, prio: u32, buckets: &mut Vec<Bucket>) -> usize {
        let slot = match self {
            BucketIndex::Dense(v) => &mut v[prio as usize],
            BucketIndex::Sparse(m) => m.entry(prio).or_insert(NONE),
        };
        if *slot == NONE {
            *slot = buckets.len() as u32;
            buckets.push(Bucket::new(prio));
        }
        *slot as usize
    }
}

/// O(n log n) worst case: pending pairs grouped by priority (a bucket each, in position order)
/// and a heap over the priorities present. A merge never creates a pair of its own priority
/// (the new pair yields a longer token), so a bucket is drained left to right until a merge
/// creates a lower priority. On a 1 MiB run of one letter this is ~10x faster than one heap
/// of (priority, position) over all pairs, which spends its time in cache misses (RESULTS.md).
pub fn merge_heap(piece: &[u8], ranks: &Ranks, out: &mut Vec<u32>) {
    let dense = BucketIndex::dense_pays(piece.len(), ranks.n_prio);
    merge_heap_with(piece, ranks, out, dense)
}

/// `merge_heap` with the priority index's kind chosen by the caller (tests cover both).
pub(super) fn merge_heap_with(piece: &[u8], ranks: &Ranks, out: &mut Vec<u32>, dense: bool) {
    let pairs = &ranks.pairs;
    let n = piece.len();
    // One record per symbol (array of structs): draining a bucket visits positions spread over
    // the whole piece, so every merge costs cache misses; one record brings a symbol's id, links
    // and current pair in one line instead of four arrays' worth (1 MiB of random letters
    // 18 -> 22 MB/s in tokbench, 29 with the prefetch below). `cur` is the pair entry of the pair starting at the symbol
    // (a stale check without hashing), NONE64 when there is none or the symbol was absorbed.
    let mut syms: Vec<Sym> = (0..n)
        .map(|i| Sym {
            cur: if i + 1 < n {
                ranks.bytes_rank(piece[i], piece[i + 1])
            } else {
                NONE64
            },
            id: ranks.byte_ids[piece[i] as usize],
            next: if i + 1 < n { i as u32 + 1 } else { NONE },
            prev: (i as u32).wrapping_sub(1),
        })
        .collect();
    let mut index = if dense {
        BucketIndex::Dense(vec![NONE; ranks.n_prio])
    } else {
        BucketIndex::Sparse(FxHashMap::default())
    };
    let mut buckets: Vec<Bucket> = Vec::new();
    for (i, s) in syms.iter().enumerate() {
        if s.cur != NONE64 {
            let b = index.get((s.cur >> 32) as u32, &mut buckets);
            buckets[b].sorted.push(i as u32);
        }
    }
    let mut active: BinaryHeap<Reverse<(u32, u32)>> = buckets
        .iter()
        .enumerate()
        .map(|(b, k)| Reverse((k.prio, b as u32)))
        .collect();
    while let Some(&Reverse((prio, b))) = active.peek() {
        let bucket = &mut buckets[b as usize];
        let Some(left) = bucket.pop() else {
            active.pop();
            continue;
        };
        // A bucket's positions are sorted but sparse (hundreds of symbols apart with random
        // text): fetch a later one's record now, the hardware prefetcher cannot guess it.
        if let Some(&ahead) = bucket.sorted.get(bucket.head + PREFETCH) {
            prefetch(&syms[ahead as usize]);
        }
        let left = left as usize;
        // Stale entry: the left symbol was absorbed, or its pair changed since it was queued. A
        // live pair's entry is never NONE64 and no priority is u32::MAX, so one compare does.
        let r = syms[left].cur;
        if (r >> 32) as u32 != prio {
            continue;
        }
        let right = syms[left].next as usize;
        debug_assert!(syms[left].id != NONE && right != NONE as usize);
        let merged = r as u32;
        let after = syms[right].next;
        syms[right].cur = NONE64;
        syms[right].id = NONE;
        syms[left].id = merged;
        syms[left].next = after;
        syms[left].cur = NONE64;
        let mut queue = |pos: usize, r: u64, active: &mut BinaryHeap<Reverse<(u32, u32)>>| {
            let p = (r >> 32) as u32;
            let nb = index.get(p, &mut buckets);
            if buckets[nb].is_empty() {
                active.push(Reverse((p, nb as u32)));
            }
            buckets[nb].push(pos as u32);
        };
        if after != NONE {
            let a = &mut syms[after as usize];
            a.prev = left as u32;
            let r2 = rank(pairs, merged, a.id);
            syms[left].cur = r2;
            if r2 != NONE64 {
                queue(left, r2, &mut active);
            }
        }
        let before = syms[left].prev;
        if before != NONE {
            let bs = &mut syms[before as usize];
            let r2 = rank(pairs, bs.id, merged);
            bs.cur = r2;
            if r2 != NONE64 {
                queue(before as usize, r2, &mut active);
            }
        }
    }
    let mut i = 0u32;
    while i != NONE {
        out.push(syms[i as usize].id);
        i = syms[i as usize].next;
    }
}

const PREFETCH: usize = 8;

#[inline(always)]
fn prefetch<T>(x: &T) {
    // SAFETY: a prefetch is a hint that never faults, and SSE is part of the x86_64 baseline.
    #[cfg(target_arch = "x86_64")]
    unsafe {
        std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(
            x as *const T as *const i8,
        )
    };
    #[cfg(not(target_arch = "x86_64"))]
    let _ = x;
}

struct Sym {
    cur: u64,
    id: u32,
    next: u32,
    prev: u32,
}
