//! Temporary pretokenizer for training until the shared `pretokenize` module lands.

use super::Splitter;
use crate::{Error, Result};

pub struct RegexSplitter(fancy_regex::Regex);

impl RegexSplitter {
    pub fn new(pattern: &str) -> Result<Self> {
        let pat = match pattern {
            "cl100k" => {
                r"'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"
            }
            "gpt2" => r"'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+",
            p => p,
        };
        fancy_regex::Regex::new(pat)
            .map(RegexSplitter)
            .map_err(|e| Error::invalid(format!("bad pattern {pattern:?}: {e}")))
    }
}

impl Splitter for RegexSplitter {
    fn split<'t>(&self, text: &'t str, f: &mut dyn FnMut(&'t str)) {
        for m in self.0.find_iter(text).flatten() {
            f(m.as_str());
        }
    }
}
