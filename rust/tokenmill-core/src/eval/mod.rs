//! Word and character error rates: Levenshtein alignment over token ids.
//!
//! Texts are turned into id sequences (words interned per pair, or Unicode scalar values), then
//! aligned. Counts come from a forward DP in linear memory that reproduces, cell by cell, the
//! backtrace rapidfuzz (and so jiwer) uses, so hits/substitutions/deletions/insertions agree with
//! jiwer even where several optimal alignments exist.

mod levenshtein;
mod text;

pub use levenshtein::{align, distance, edit_counts, EditCounts, EditOp};
pub use text::{chars_jiwer, words_jiwer};

use crate::{Error, Result};
use rayon::prelude::*;
use rustc_hash::FxHashMap;

/// What a "token" is for an error rate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Unit {
    /// Words, split as jiwer's default transform does (see [`words_jiwer`]).
    Word,
    /// Unicode characters (code points) of the stripped text, spaces included (jiwer's `cer_default`).
    Char,
}

/// Ids of one text pair. Words are interned in a table local to the pair: only equality matters.
pub fn pair_ids(reference: &str, hypothesis: &str, unit: Unit) -> (Vec<u32>, Vec<u32>) {
    match unit {
        Unit::Char => (chars_jiwer(reference), chars_jiwer(hypothesis)),
        Unit::Word => {
            let mut table: FxHashMap<&str, u32> = FxHashMap::default();
            let mut intern = |w| {
                let next = table.len() as u32;
                *table.entry(w).or_insert(next)
            };
            let r = words_jiwer(reference).map(&mut intern).collect();
            let h = words_jiwer(hypothesis).map(&mut intern).collect();
            (r, h)
        }
    }
}

/// Counts for one pair of texts.
pub fn pair_counts(reference: &str, hypothesis: &str, unit: Unit) -> EditCounts {
    let (r, h) = pair_ids(reference, hypothesis, unit);
    edit_counts(&r, &h)
}

/// Corpus-level counts: the sum over pairs, computed in parallel (deterministic: addition of integers).
pub fn corpus_counts<S: AsRef<str> + Sync>(
    references: &[S],
    hypotheses: &[S],
    unit: Unit,
) -> Result<EditCounts> {
    if references.len() != hypotheses.len() {
        return Err(Error::invalid(format!(
            "reference and hypothesis lists differ in length: {} references, {} hypotheses",
            references.len(),
            hypotheses.len()
        )));
    }
    Ok(references
        .par_iter()
        .zip(hypotheses.par_iter())
        .with_min_len(256)
        .map(|(r, h)| pair_counts(r.as_ref(), h.as_ref(), unit))
        .reduce(EditCounts::default, |a, b| a + b))
}

/// Error rate from counts: (S + D + I) / (H + S + D). An empty reference side has no defined rate
/// unless the hypothesis is empty too (then 0.0).
pub fn error_rate(counts: &EditCounts, unit: Unit) -> Result<f64> {
    let n = counts.reference_len();
    if n == 0 {
        if counts.insertions == 0 {
            return Ok(0.0);
        }
        let what = if unit == Unit::Word {
            "words"
        } else {
            "characters"
        };
        return Err(Error::invalid(format!(
            "the reference is empty (0 {what}) but the hypothesis has {} {what}: the error rate is undefined",
            counts.insertions
        )));
    }
    Ok(counts.errors() as f64 / n as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hand_checked_wer() {
        // ref: the cat sat on the mat ; hyp: the cat sit on mat
        let c = pair_counts("the cat sat on the mat", "the cat sit on mat", Unit::Word);
        assert_eq!(
            (c.hits, c.substitutions, c.deletions, c.insertions),
            (4, 1, 1, 0)
        );
        assert_eq!(error_rate(&c, Unit::Word).unwrap(), 2.0 / 6.0);
    }

    #[test]
    fn insertions_can_exceed_one() {
        let c = pair_counts("a", "b c d", Unit::Word);
        assert_eq!(c.errors(), 3);
        assert_eq!(error_rate(&c, Unit::Word).unwrap(), 3.0);
    }

    #[test]
    fn cer_counts_code_points_not_bytes() {
        let c = pair_counts("héllo wörld", "hello world", Unit::Char);
        assert_eq!(c.substitutions, 2);
        assert_eq!(c.reference_len(), 11);
    }

    #[test]
    fn empty_reference() {
        let c = corpus_counts(&[""], &["x"], Unit::Word).unwrap();
        assert!(error_rate(&c, Unit::Word).is_err());
        let c = corpus_counts(&[""], &[""], Unit::Word).unwrap();
        assert_eq!(error_rate(&c, Unit::Word).unwrap(), 0.0);
        assert!(corpus_counts(&["a"], &[], Unit::Word).is_err());
    }
}
