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

/// Above this many bytes a piece goes to the heap. Measured on the stdlib corpus (cl100k-like vocab):
/// the scan is faster below ~100 bytes, the heap above; almost all pieces are far shorter.
pub const SCAN_MAX: usize = 96;

const NONE: u32 = u32::MAX;

#[inline]
pub fn merge(piece: &[u8], byte_ids: &[u32; 256], pairs: &PairMap, out: &mut Vec<u32>) {
    if piece.len() <= SCAN_MAX {
        merge_scan(piece, byte_ids, pairs, out)
    } else {
        merge_heap(piece, byte_ids, pairs, out)
    }
}

#[inline]
fn rank(pairs: &PairMap, a: u32, b: u32) -> u64 {
    pairs.get(&(a, b)).copied().unwrap_or(NONE64)
}

pub fn merge_scan(piece: &[u8], byte_ids: &[u32; 256], pairs: &PairMap, out: &mut Vec<u32>) {
    let mut ids: Vec<u32> = piece.iter().map(|&b| byte_ids[b as usize]).collect();
    if ids.len() < 2 {
        out.extend_from_slice(&ids);
        return;
    }
    // ranks[i] = merged id of (ids[i], ids[i+1]).
    let mut ranks: Vec<u64> = ids.windows(2).map(|w| rank(pairs, w[0], w[1])).collect();
    loop {
        let (mut best, mut at) = (NONE64, 0);
        for (i, &r) in ranks.iter().enumerate() {
            if r < best {
                best = r;
                at = i;
            }
        }
        if best == NONE64 {
            break;
        }
        ids[at] = best as u32;
        ids.remove(at + 1);
        ranks.remove(at);
        if at + 1 < ids.len() {
            ranks[at] = rank(pairs, ids[at], ids[at + 1]);
        }
        if at > 0 {
            ranks[at - 1] = rank(pairs, ids[at - 1], ids[at]);
        }
    }
    out.extend_from_slice(&ids);
}

pub fn merge_heap(piece: &[u8], byte_ids: &[u32; 256], pairs: &PairMap, out: &mut Vec<u32>) {
    let n = piece.len();
    let mut ids: Vec<u32> = piece.iter().map(|&b| byte_ids[b as usize]).collect();
    let mut next: Vec<u32> = (1..=n as u32).collect();
    let mut prev: Vec<u32> = (0..n as u32).map(|i| i.wrapping_sub(1)).collect();
    next[n - 1] = NONE;
    // Key (priority, left index): lowest priority first, leftmost on ties; the value carries the
    // full pair entry so that a stale entry is recognised.
    let mut heap: BinaryHeap<Reverse<(u32, u32, u64)>> = BinaryHeap::with_capacity(n);
    let entry = |r: u64, left: usize| Reverse(((r >> 32) as u32, left as u32, r));
    for i in 0..n - 1 {
        let r = rank(pairs, ids[i], ids[i + 1]);
        if r != NONE64 {
            heap.push(entry(r, i));
        }
    }
    while let Some(Reverse((_, left, r))) = heap.pop() {
        let left = left as usize;
        let right = next[left];
        // Stale entry: the left symbol was absorbed, or its pair changed since the push.
        if ids[left] == NONE || right == NONE || rank(pairs, ids[left], ids[right as usize]) != r {
            continue;
        }
        let right = right as usize;
        let merged = r as u32;
        ids[left] = merged;
        ids[right] = NONE;
        let after = next[right];
        next[left] = after;
        if after != NONE {
            prev[after as usize] = left as u32;
            let r2 = rank(pairs, merged, ids[after as usize]);
            if r2 != NONE64 {
                heap.push(entry(r2, left));
            }
        }
        let before = prev[left];
        if before != NONE {
            let r2 = rank(pairs, ids[before as usize], merged);
            if r2 != NONE64 {
                heap.push(entry(r2, before as usize));
            }
        }
    }
    let mut i = 0u32;
    while i != NONE {
        out.push(ids[i as usize]);
        i = next[i as usize];
    }
}
