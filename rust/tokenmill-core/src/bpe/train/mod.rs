//! Byte-level BPE training.
//!
//! 1. [`WordCounter`] pretokenizes the corpus (texts or files, streamed in blocks) and counts the
//!    distinct pieces in parallel; memory grows with the number of distinct pieces, not the corpus.
//! 2. [`train_words`] runs the merge loop over the distinct pieces (see `merge.rs`).
//!
//! Ids 0..=255 are the single bytes in byte order; each new token takes the next id. The vocabulary
//! size given by the user counts the special tokens, which get no merges and are never learned
//! from the text.

mod count;
mod merge;

pub use crate::progress::Progress;
pub use count::{WordCounter, BLOCK};
pub use merge::{train_words, Merge, Trained};

use crate::pretokenize::Pretokenizer;
use crate::{Error, Result};
use rustc_hash::FxHashMap;
use std::path::PathBuf;

/// Settings of one training run.
#[derive(Clone, Debug)]
pub struct TrainOptions {
    /// Total vocabulary: 256 bytes + learned tokens + special tokens.
    pub vocab_size: usize,
    pub special_tokens: Vec<String>,
    /// A pair must occur at least this often to be merged.
    pub min_frequency: u64,
    pub show_progress: bool,
}

impl TrainOptions {
    /// How many tokens to learn on top of the 256 bytes.
    pub fn num_merges(&self) -> Result<usize> {
        let mut sorted: Vec<&String> = self.special_tokens.iter().collect();
        sorted.sort();
        if let Some(w) = sorted.windows(2).find(|w| w[0] == w[1]) {
            return Err(Error::invalid(format!(
                "special token {:?} given twice",
                w[0]
            )));
        }
        let floor = 256 + self.special_tokens.len();
        if self.vocab_size < floor {
            return Err(Error::invalid(format!(
                "vocab_size {} is smaller than 256 byte tokens + {} special tokens",
                self.vocab_size,
                self.special_tokens.len()
            )));
        }
        if self.vocab_size > u32::MAX as usize {
            return Err(Error::invalid(format!(
                "vocab_size {} does not fit 32-bit ids",
                self.vocab_size
            )));
        }
        Ok(self.vocab_size - floor)
    }
}

/// Run the merge loop on counted words.
pub fn train_counts(counts: FxHashMap<Box<str>, u64>, opts: &TrainOptions) -> Result<Trained> {
    let n = opts.num_merges()?;
    let mut bar = Progress::new("merges", "", Some(n as u64), opts.show_progress);
    let trained = train_words(
        counts.into_iter().map(|(w, c)| (w.into_boxed_bytes(), c)),
        n,
        opts.min_frequency,
        &mut |done| bar.update(done as u64),
    );
    bar.finish((trained.tokens.len() - 256) as u64);
    Ok(trained)
}

/// How much of a corpus the pattern's pieces cover (special tokens count as covered).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Coverage {
    pub bytes: u64,
    /// Bytes that no piece matched: BPE never sees them.
    pub dropped: u64,
}

impl Coverage {
    pub fn dropped_fraction(&self) -> f64 {
        self.dropped as f64 / self.bytes.max(1) as f64
    }

    /// With `strict`, an error when the pattern dropped any byte (before the merge loop runs).
    pub fn check(&self, strict: bool) -> Result<()> {
        if strict && self.dropped > 0 {
            return Err(Error::invalid(format!(
                "the pattern leaves {:.4}% of the corpus uncovered ({} of {} bytes match no piece and \
                 would be dropped); fix the pattern or train without strict",
                100.0 * self.dropped_fraction(),
                self.dropped,
                self.bytes
            )));
        }
        Ok(())
    }
}

/// Count the words of files (each file one document; UTF-8 text), read in Rust.
pub fn count_files<'p>(
    paths: &[PathBuf],
    pretokenizer: &'p Pretokenizer,
    opts: &TrainOptions,
) -> Result<WordCounter<'p>> {
    opts.num_merges()?;
    let mut counter = WordCounter::new(pretokenizer, &opts.special_tokens)?;
    let total = paths
        .iter()
        .map(|p| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0))
        .sum();
    let mut bar = Progress::new("counting", "B", Some(total), opts.show_progress);
    counter.add_files(paths, &mut bar)?;
    bar.finish(counter.bytes());
    Ok(counter)
}

#[cfg(test)]
mod tests;
