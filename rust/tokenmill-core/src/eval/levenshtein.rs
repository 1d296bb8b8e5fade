//! Levenshtein alignment with rapidfuzz's tie-breaking.
//!
//! rapidfuzz (which jiwer calls) strips the common prefix and suffix, fills a bit-parallel matrix
//! (Hyyrö 2003), and walks back from the end preferring, at each cell (c, r) with c reference and r
//! hypothesis items consumed:
//!   1. delete   if D[c][r] == D[c-1][r] + 1,
//!   2. insert   if r >= 2 and D[c][r-1] == D[c-1][r-1] - 1,
//!   3. diagonal (match or substitution) otherwise;
//!
//! then deletes along row 0 and inserts along column 0. The choice depends only on values around the
//! cell, so a forward DP can carry, per cell, the counts of the path the backtrace would take from
//! there: linear memory, identical counts. (rapidfuzz switches to Hirschberg above ~8 Mi cells; ties
//! there may break differently, the distance never does.)

use std::ops::Add;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EditCounts {
    pub hits: u64,
    pub substitutions: u64,
    pub deletions: u64,
    pub insertions: u64,
}

impl EditCounts {
    pub fn errors(&self) -> u64 {
        self.substitutions + self.deletions + self.insertions
    }
    pub fn reference_len(&self) -> u64 {
        self.hits + self.substitutions + self.deletions
    }
    pub fn hypothesis_len(&self) -> u64 {
        self.hits + self.substitutions + self.insertions
    }
}

impl Add for EditCounts {
    type Output = EditCounts;
    fn add(self, o: EditCounts) -> EditCounts {
        EditCounts {
            hits: self.hits + o.hits,
            substitutions: self.substitutions + o.substitutions,
            deletions: self.deletions + o.deletions,
            insertions: self.insertions + o.insertions,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EditOp {
    Equal,
    Substitute,
    Delete,
    Insert,
}

fn common_affixes(a: &[u32], b: &[u32]) -> (usize, usize) {
    let prefix = a.iter().zip(b).take_while(|(x, y)| x == y).count();
    let (a, b) = (&a[prefix..], &b[prefix..]);
    let suffix = a
        .iter()
        .rev()
        .zip(b.iter().rev())
        .take_while(|(x, y)| x == y)
        .count();
    (prefix, suffix)
}

/// Per-cell state of the forward DP: distance and the counts along the backtrace path.
#[derive(Clone, Copy, Default)]
struct Cell {
    dist: u32,
    subs: u32,
    dels: u32,
    ins: u32,
}

/// Hits, substitutions, deletions and insertions turning `reference` into `hypothesis`,
/// in O(min-side) memory and O(n*m) time.
pub fn edit_counts(reference: &[u32], hypothesis: &[u32]) -> EditCounts {
    let (prefix, suffix) = common_affixes(reference, hypothesis);
    let a = &reference[prefix..reference.len() - suffix];
    let b = &hypothesis[prefix..hypothesis.len() - suffix];
    let (n, m) = (a.len(), b.len());
    let affix_hits = (prefix + suffix) as u64;
    if n == 0 || m == 0 {
        return EditCounts {
            hits: affix_hits,
            substitutions: 0,
            deletions: n as u64,
            insertions: m as u64,
        };
    }
    // Rows are hypothesis positions r = 0..=m, columns reference positions c = 0..=n.
    let mut prev: Vec<Cell> = (0..=n)
        .map(|c| Cell {
            dist: c as u32,
            dels: c as u32,
            ..Cell::default()
        })
        .collect();
    let mut cur = vec![Cell::default(); n + 1];
    for r in 1..=m {
        cur[0] = Cell {
            dist: r as u32,
            ins: r as u32,
            ..Cell::default()
        };
        let hb = b[r - 1];
        for c in 1..=n {
            let diag = prev[c - 1];
            let up = prev[c]; // D[c][r-1]
            let left = cur[c - 1]; // D[c-1][r]
            let cost = u32::from(a[c - 1] != hb);
            let dist = (diag.dist + cost).min(up.dist + 1).min(left.dist + 1);
            cur[c] = if dist == left.dist + 1 {
                Cell {
                    dist,
                    dels: left.dels + 1,
                    ..left
                }
            } else if r >= 2 && up.dist + 1 == diag.dist {
                Cell {
                    dist,
                    ins: up.ins + 1,
                    ..up
                }
            } else {
                Cell {
                    dist,
                    subs: diag.subs + cost,
                    ..diag
                }
            };
        }
        std::mem::swap(&mut prev, &mut cur);
    }
    let end = prev[n];
    let (subs, dels) = (end.subs as u64, end.dels as u64);
    EditCounts {
        hits: affix_hits + n as u64 - subs - dels,
        substitutions: subs,
        deletions: dels,
        insertions: end.ins as u64,
    }
}

/// The Levenshtein distance (unit costs).
pub fn distance(reference: &[u32], hypothesis: &[u32]) -> u64 {
    edit_counts(reference, hypothesis).errors()
}

/// The full alignment, with the same tie-breaking as [`edit_counts`]: one entry per aligned position,
/// `(op, reference index, hypothesis index)`. Keeps one byte per DP cell of the non-common middle.
pub fn align(reference: &[u32], hypothesis: &[u32]) -> Vec<(EditOp, Option<usize>, Option<usize>)> {
    let (prefix, suffix) = common_affixes(reference, hypothesis);
    let a = &reference[prefix..reference.len() - suffix];
    let b = &hypothesis[prefix..hypothesis.len() - suffix];
    let (n, m) = (a.len(), b.len());
    const DEL: u8 = 0;
    const INS: u8 = 1;
    const DIAG: u8 = 2;
    let mut choice = vec![DIAG; (n + 1) * (m + 1)];
    let mut prev: Vec<u32> = (0..=n as u32).collect();
    let mut cur = vec![0u32; n + 1];
    for r in 1..=m {
        cur[0] = r as u32;
        for c in 1..=n {
            let cost = u32::from(a[c - 1] != b[r - 1]);
            let dist = (prev[c - 1] + cost).min(prev[c] + 1).min(cur[c - 1] + 1);
            choice[r * (n + 1) + c] = if dist == cur[c - 1] + 1 {
                DEL
            } else if r >= 2 && prev[c] + 1 == prev[c - 1] {
                INS
            } else {
                DIAG
            };
            cur[c] = dist;
        }
        std::mem::swap(&mut prev, &mut cur);
    }
    let mut ops = Vec::with_capacity(reference.len().max(hypothesis.len()));
    for i in (0..suffix).rev() {
        ops.push((
            EditOp::Equal,
            Some(reference.len() - suffix + i),
            Some(hypothesis.len() - suffix + i),
        ));
    }
    let (mut c, mut r) = (n, m);
    while c > 0 || r > 0 {
        let step = if r == 0 {
            DEL
        } else if c == 0 {
            INS
        } else {
            choice[r * (n + 1) + c]
        };
        match step {
            DEL => {
                c -= 1;
                ops.push((EditOp::Delete, Some(prefix + c), None));
            }
            INS => {
                r -= 1;
                ops.push((EditOp::Insert, None, Some(prefix + r)));
            }
            _ => {
                c -= 1;
                r -= 1;
                let op = if a[c] == b[r] {
                    EditOp::Equal
                } else {
                    EditOp::Substitute
                };
                ops.push((op, Some(prefix + c), Some(prefix + r)));
            }
        }
    }
    for i in (0..prefix).rev() {
        ops.push((EditOp::Equal, Some(i), Some(i)));
    }
    ops.reverse();
    ops
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Textbook O(n*m) DP, the independent reference for the distance.
    fn naive(a: &[u32], b: &[u32]) -> u64 {
        let mut d = vec![vec![0u64; b.len() + 1]; a.len() + 1];
        for (i, row) in d.iter_mut().enumerate() {
            row[0] = i as u64;
        }
        d[0] = (0..=b.len() as u64).collect();
        for i in 1..=a.len() {
            for j in 1..=b.len() {
                let cost = u64::from(a[i - 1] != b[j - 1]);
                d[i][j] = (d[i - 1][j - 1] + cost)
                    .min(d[i - 1][j] + 1)
                    .min(d[i][j - 1] + 1);
            }
        }
        d[a.len()][b.len()]
    }

    proptest! {
        #[test]
        fn counts_agree_with_naive_and_alignment(a in prop::collection::vec(0u32..4, 0..24),
                                                 b in prop::collection::vec(0u32..4, 0..24)) {
            let c = edit_counts(&a, &b);
            prop_assert_eq!(c.errors(), naive(&a, &b));
            prop_assert_eq!(c.reference_len(), a.len() as u64);
            prop_assert_eq!(c.hypothesis_len(), b.len() as u64);
            let ops = align(&a, &b);
            let count = |k| ops.iter().filter(|o| o.0 == k).count() as u64;
            prop_assert_eq!((count(EditOp::Equal), count(EditOp::Substitute), count(EditOp::Delete), count(EditOp::Insert)),
                            (c.hits, c.substitutions, c.deletions, c.insertions));
            // The alignment replays: reference indices then hypothesis indices appear in order, once each.
            let refs: Vec<usize> = ops.iter().filter_map(|o| o.1).collect();
            let hyps: Vec<usize> = ops.iter().filter_map(|o| o.2).collect();
            prop_assert_eq!(refs, (0..a.len()).collect::<Vec<_>>());
            prop_assert_eq!(hyps, (0..b.len()).collect::<Vec<_>>());
        }

        #[test]
        fn symmetric_distance(a in prop::collection::vec(0u32..5, 0..20), b in prop::collection::vec(0u32..5, 0..20)) {
            prop_assert_eq!(distance(&a, &b), distance(&b, &a));
        }
    }
}
