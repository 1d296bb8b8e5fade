//! The merge loop of byte-level BPE training.
//!
//! Words are the distinct pretokenized pieces with their counts. Each step merges the most
//! frequent adjacent pair (counted over overlapping windows, weighted by word count) in every word
//! that holds it, greedily left to right. Ties go to the smallest pair `(left id, right id)`, the
//! rule rustbpe and Hugging Face's BpeTrainer use, so results never depend on hash or thread order.
//!
//! Incremental bookkeeping: `pairs` maps each live pair to its count and the words it may occur
//! in; a merge touches only those words and turns each rewrite into count deltas for the
//! neighbouring pairs. The heap holds `(count, pair)` entries lazily: counts of existing pairs only
//! fall (a stale entry is refreshed when popped), and a pair whose count rises gets a fresh entry.
//!
//! A merge whose byte string already is a token (possible: "ab"+"c" and "a"+"bc") reuses that id
//! and adds no token, as BpeTrainer does; tiktoken-style mergeable ranks cannot hold one byte
//! string twice; rustbpe would give it a second id. No corpus we tried produces such a merge
//! (60,000 random small corpora over two or three letters, where context effects of runs such as
//! "aaa" are most likely), but nothing we know proves it impossible, so it is handled.
//!
//! Performance notes (CPU seconds, one thread, 11.4 MB stdlib corpus, llama3 pattern, 32k vocab,
//! best of 5 on a shared 2-core EPYC; more in benches/RESULTS.md):
//! - Counting takes 0.21 s, of which pretokenizing is 0.12 s; the merge loop 0.14 s: 0.006 s to
//!   set up, 0.032 s for the first 1,000 merges (the first ones touch most of the 61k words), 0.034 s for the
//!   next 3,000 and 0.070 s for the last 28,500. Running the early merges in parallel could save
//!   at most ~0.02 s on 2 cores; not worth unsafe shared access to the word buffer.
//! - Word lists per pair are a `Vec<u32>`, deduplicated per word and step (rustbpe and BpeTrainer
//!   keep a `HashSet<usize>` per heap entry): a merge is idempotent on a word that no longer holds
//!   the pair, so stale entries cost a scan and nothing else. Peak RSS 0.74x rustbpe's.
//! - Rejected: word offset/length/count as one array of structs instead of three arrays, 0.17-0.19 s
//!   vs 0.14-0.16 s; draining the step's delta map in hash order instead of the first-touched key
//!   list, no difference (the list keeps the order independent of hashing).

use rustc_hash::FxHashMap;
use std::cmp::Reverse;
use std::collections::BinaryHeap;

/// One merge step: `left` + `right` became `id` when the pair occurred `count` times.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Merge {
    pub left: u32,
    pub right: u32,
    pub id: u32,
    pub count: u64,
}

/// The result of training: the mergeable tokens in id order (0..=255 are the single bytes) and
/// every merge step in order (a step whose `id` is not new reused an existing token).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Trained {
    pub tokens: Vec<Vec<u8>>,
    pub merges: Vec<Merge>,
}

#[inline]
fn key(a: u32, b: u32) -> u64 {
    (u64::from(a) << 32) | u64::from(b)
}

#[inline]
fn unkey(k: u64) -> (u32, u32) {
    ((k >> 32) as u32, k as u32)
}

#[derive(Default)]
struct PairStat {
    count: i64,
    /// Words that may hold the pair (some no longer do); each word at most once per step that added it.
    words: Vec<u32>,
}

/// Count change of one pair during one merge step, and the words where it newly appeared.
#[derive(Default)]
struct Delta {
    delta: i64,
    words: Vec<u32>,
}

/// The deltas of one merge step, and their keys in first-touched order (so the heap and the
/// word lists are updated in an order that does not depend on hashing).
#[derive(Default)]
struct Local {
    map: FxHashMap<u64, Delta>,
    order: Vec<u64>,
}

/// Distinct words as symbol runs in one flat buffer; merges shrink a word in place.
struct Words {
    syms: Vec<u32>,
    start: Vec<usize>,
    len: Vec<u32>,
    count: Vec<i64>,
}

/// Train on distinct words (byte strings with counts). Stops after `num_tokens` new tokens, when
/// no pair is left, or when the best pair occurs fewer than `min_frequency` times.
/// `progress(tokens_done)` is called after each new token.
pub fn train_words<B: AsRef<[u8]>>(
    words: impl IntoIterator<Item = (B, u64)>,
    num_tokens: usize,
    min_frequency: u64,
    progress: &mut dyn FnMut(usize),
) -> Trained {
    let mut w = Words {
        syms: Vec::new(),
        start: Vec::new(),
        len: Vec::new(),
        count: Vec::new(),
    };
    for (bytes, count) in words {
        let bytes = bytes.as_ref();
        // Single bytes hold no pair; counts beyond i64 cannot come from real corpora.
        if bytes.len() < 2 || count == 0 {
            continue;
        }
        w.start.push(w.syms.len());
        w.len.push(bytes.len() as u32);
        w.count.push(count.min(i64::MAX as u64) as i64);
        w.syms.extend(bytes.iter().map(|&b| u32::from(b)));
    }

    let mut pairs: FxHashMap<u64, PairStat> = FxHashMap::default();
    for i in 0..w.start.len() {
        let s = &w.syms[w.start[i]..w.start[i] + w.len[i] as usize];
        for p in s.windows(2) {
            let st = pairs.entry(key(p[0], p[1])).or_default();
            st.count += w.count[i];
            if st.words.last() != Some(&(i as u32)) {
                st.words.push(i as u32);
            }
        }
    }
    let mut heap: BinaryHeap<(u64, Reverse<u64>)> = pairs
        .iter()
        .map(|(&k, st)| (st.count as u64, Reverse(k)))
        .collect();

    let mut tokens: Vec<Vec<u8>> = (0..=255u8).map(|b| vec![b]).collect();
    let mut ids: FxHashMap<Vec<u8>, u32> = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.clone(), i as u32))
        .collect();
    let mut merges = Vec::new();
    let mut local = Local::default();
    let mut new_tokens = 0;

    while new_tokens < num_tokens {
        let Some((count, Reverse(k))) = heap.pop() else {
            break;
        };
        let current = pairs.get(&k).map_or(0, |st| st.count);
        if current <= 0 {
            continue;
        }
        if current as u64 != count {
            heap.push((current as u64, Reverse(k)));
            continue;
        }
        if count < min_frequency {
            break;
        }
        let (a, b) = unkey(k);
        let mut bytes = tokens[a as usize].clone();
        bytes.extend_from_slice(&tokens[b as usize]);
        let (id, is_new) = match ids.get(&bytes) {
            Some(&id) => (id, false),
            None => {
                let id = tokens.len() as u32;
                ids.insert(bytes.clone(), id);
                tokens.push(bytes);
                new_tokens += 1;
                (id, true)
            }
        };
        merges.push(Merge {
            left: a,
            right: b,
            id,
            count,
        });

        let stat = pairs.remove(&k).unwrap_or_default();
        for &wi in &stat.words {
            merge_word(&mut w, wi, a, b, id, &mut local);
        }
        for pk in local.order.drain(..) {
            let d = local.map.remove(&pk).unwrap_or_default();
            if pk == k {
                continue;
            }
            let st = pairs.entry(pk).or_default();
            st.count += d.delta;
            st.words.extend_from_slice(&d.words);
            debug_assert!(st.count >= 0, "pair count below zero");
            if st.count <= 0 {
                pairs.remove(&pk);
            } else if d.delta > 0 {
                heap.push((st.count as u64, Reverse(pk)));
            }
        }
        if is_new {
            progress(new_tokens);
        }
    }
    Trained { tokens, merges }
}

/// Rewrite every occurrence of (a, b) in word `wi` as `c`, greedily left to right, and record the
/// count changes of the neighbouring pairs in `local`.
#[inline]
fn merge_word(w: &mut Words, wi: u32, a: u32, b: u32, c: u32, local: &mut Local) {
    let i0 = wi as usize;
    let n = w.len[i0] as usize;
    let cnt = w.count[i0];
    let s = &mut w.syms[w.start[i0]..w.start[i0] + n];
    let mut add = |k: u64, d: i64| {
        let e = local.map.entry(k).or_insert_with(|| {
            local.order.push(k);
            Delta::default()
        });
        e.delta += d;
        if d > 0 && e.words.last() != Some(&wi) {
            e.words.push(wi);
        }
    };
    let (mut i, mut o) = (0, 0);
    while i < n {
        if i + 1 < n && s[i] == a && s[i + 1] == b {
            if o > 0 {
                let x = s[o - 1];
                add(key(x, a), -cnt);
                add(key(x, c), cnt);
            }
            if i + 2 < n {
                let y = s[i + 2];
                add(key(b, y), -cnt);
                add(key(c, y), cnt);
            }
            s[o] = c;
            o += 1;
            i += 2;
        } else {
            s[o] = s[i];
            o += 1;
            i += 1;
        }
    }
    w.len[i0] = o as u32;
}
