//! Regex pretokenization: split text into the pieces that BPE encodes independently.
//!
//! The named patterns are the exact strings tiktoken and LLaMA-3 use. They contain look-ahead
//! (`\s+(?!\S)`) and possessive quantifiers, which a DFA cannot run, so each is compiled as an
//! equivalent list of look-around-free alternatives for `regex-automata` (leftmost-first, one
//! pattern id per alternative) plus one post-processing rule:
//!
//! `\s+(?!\S)|\s+` (or `|\s`) is rewritten to `\s+`. `\s+` greedily takes the whole whitespace run;
//! the look-ahead version gives back its last character when the run is followed by a non-space
//! (so that " word" stays together), and a one-character run falls through to the plain `\s+`.
//! So: when the `\s+` alternative matched, the match is >= 2 characters and does not end the text,
//! drop its last character. Earlier alternatives are untouched, so leftmost-first order decides
//! exactly as the backtracking engine would.
//!
//! Possessive quantifiers in tiktoken's strings never change a match there (each is followed by a
//! disjoint class or by nothing), so they become greedy ones. `\s++$` stays as `\s+$`.
//! User patterns get the same `\s+(?!\S)` rewrite when it is their last-but-one alternative followed
//! by `\s+` or `\s`; any other look-around or backreference falls back to fancy-regex.
//! The equivalence is tested below against fancy-regex running the original strings.

use crate::{Error, Result};
use regex_automata::meta::{Cache, Regex as MetaRegex};
use regex_automata::util::pool::{Pool, PoolGuard};
use regex_automata::{Anchored, Input, PatternID};

type CacheFn =
    Box<dyn Fn() -> Cache + Send + Sync + std::panic::UnwindSafe + std::panic::RefUnwindSafe>;

/// tiktoken 0.14 `r50k_base` / `gpt2` pattern.
pub const GPT2: &str =
    r"'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s";
/// tiktoken 0.14 `cl100k_base` pattern.
pub const CL100K: &str = r"'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+|\s++$|\s*[\r\n]|\s+(?!\S)|\s";
/// tiktoken 0.14 `o200k_base` pattern.
pub const O200K: &str = concat!(
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
    r"|\p{N}{1,3}",
    r"| ?[^\s\p{L}\p{N}]+[\r\n/]*",
    r"|\s*[\r\n]+",
    r"|\s+(?!\S)",
    r"|\s+",
);
/// Meta's LLaMA-3 pattern (tokenizer.py / tokenizer.json).
pub const LLAMA3: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// The look-around-free alternatives for a named tiktoken pattern with possessive quantifiers.
const GPT2_DFA: &[&str] = &[
    r"'(?:[sdmt]|ll|ve|re)",
    r" ?\p{L}+",
    r" ?\p{N}+",
    r" ?[^\s\p{L}\p{N}]+",
    r"\s+$",
    r"\s+",
];
const CL100K_DFA: &[&str] = &[
    r"'(?i:[sdmt]|ll|ve|re)",
    r"[^\r\n\p{L}\p{N}]?\p{L}+",
    r"\p{N}{1,3}",
    r" ?[^\s\p{L}\p{N}]+[\r\n]*",
    r"\s+$",
    r"\s*[\r\n]",
    r"\s+",
];

/// The same pattern without possessive quantifiers, for backtracking engines that read `{1,3}+`
/// differently (Oniguruma's Ruby syntax, used by Hugging Face `tokenizers`, takes it as `({1,3})+`).
/// The possessive forms in tiktoken's strings never change a match (see the module docs).
pub fn without_possessives(pattern: &str) -> String {
    match pattern {
        GPT2 => r"'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+$|\s+(?!\S)|\s".into(),
        CL100K => r"'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s+$|\s*[\r\n]|\s+(?!\S)|\s".into(),
        other => other.into(),
    }
}

/// Resolve a pattern name ("gpt2", "cl100k", "o200k", "llama3") to its pattern string; any other
/// string is taken as a regex.
pub fn resolve_pattern(pattern_or_name: &str) -> &str {
    match pattern_or_name {
        "gpt2" | "r50k" | "r50k_base" => GPT2,
        "cl100k" | "cl100k_base" => CL100K,
        "o200k" | "o200k_base" => O200K,
        "llama3" => LLAMA3,
        other => other,
    }
}

enum Engine {
    Dfa {
        re: MetaRegex,
        /// The pattern id of the rewritten `\s+(?!\S)|\s+` alternative, if any.
        ws_alt: Option<PatternID>,
        /// Search caches, taken once per `split` call rather than once per piece (the regex's
        /// own pool is a mutex on threads other than its creator's: 1.1x on 2 threads).
        caches: Pool<Cache, CacheFn>,
    },
    Fancy(fancy_regex::Regex),
}

pub struct Pretokenizer {
    pattern: String,
    engine: Engine,
}

impl std::fmt::Debug for Pretokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pretokenizer")
            .field("pattern", &self.pattern)
            .field("dfa", &self.is_dfa())
            .finish()
    }
}

impl Clone for Pretokenizer {
    fn clone(&self) -> Self {
        // Compiling is deterministic and cannot fail for a pattern that compiled once.
        Pretokenizer::new(&self.pattern).expect("pattern compiled before")
    }
}

impl Pretokenizer {
    /// Compile a named pattern ("gpt2", "cl100k", "o200k", "llama3") or a regex.
    pub fn new(pattern_or_name: &str) -> Result<Self> {
        let pattern = resolve_pattern(pattern_or_name).to_string();
        let engine = match pattern.as_str() {
            GPT2 => dfa(GPT2_DFA, Some(GPT2_DFA.len() - 1))?,
            CL100K => dfa(CL100K_DFA, Some(CL100K_DFA.len() - 1))?,
            p => compile_user(p)?,
        };
        Ok(Pretokenizer { pattern, engine })
    }

    /// The pattern string (for a name: the exact string tiktoken / LLaMA-3 use).
    pub fn pattern(&self) -> &str {
        &self.pattern
    }

    /// Whether the pattern runs on the DFA engine (false: fancy-regex backtracking).
    pub fn is_dfa(&self) -> bool {
        matches!(self.engine, Engine::Dfa { .. })
    }

    /// The pieces of `text`, in order. Text the pattern does not match is skipped (as tiktoken
    /// does); empty matches are skipped. The named patterns match every character.
    pub fn split<'a>(&'a self, text: &'a str) -> Pieces<'a> {
        Pieces {
            pre: self,
            text,
            pos: 0,
            cache: match &self.engine {
                Engine::Dfa { caches, .. } => Some(caches.get()),
                Engine::Fancy(_) => None,
            },
        }
    }

    /// Byte ranges of the pieces, for callers that want offsets.
    pub fn split_ranges<'a>(
        &'a self,
        text: &'a str,
    ) -> impl Iterator<Item = std::ops::Range<usize>> + 'a {
        let base = text.as_ptr() as usize;
        self.split(text).map(move |p| {
            let s = p.as_ptr() as usize - base;
            s..s + p.len()
        })
    }
}

pub struct Pieces<'a> {
    pre: &'a Pretokenizer,
    text: &'a str,
    pos: usize,
    cache: Option<PoolGuard<'a, Cache, CacheFn>>,
}

impl<'a> Iterator for Pieces<'a> {
    type Item = &'a str;

    #[inline]
    fn next(&mut self) -> Option<&'a str> {
        let text = self.text;
        while self.pos < text.len() {
            let (start, mut end, pid) = match &self.pre.engine {
                Engine::Dfa { re, .. } => {
                    let cache = self.cache.as_mut().expect("DFA pieces hold a cache");
                    // The named patterns cover every character, so an anchored search at the
                    // current position almost always succeeds and skips the reverse scan.
                    let input = Input::new(text).range(self.pos..).anchored(Anchored::Yes);
                    let m = match re.search_with(cache, &input) {
                        Some(m) if !m.is_empty() => m,
                        _ => match re.search_with(cache, &input.anchored(Anchored::No)) {
                            Some(m) => m,
                            None => {
                                self.pos = text.len();
                                return None;
                            }
                        },
                    };
                    (m.start(), m.end(), Some(m.pattern()))
                }
                Engine::Fancy(re) => match re.find_from_pos(text, self.pos) {
                    Ok(Some(m)) => (m.start(), m.end(), None),
                    // A backtrack-limit error is impossible with the unlimited limit set below;
                    // treat anything else as "no more matches".
                    _ => {
                        self.pos = text.len();
                        return None;
                    }
                },
            };
            if start == end {
                // Skip an empty match: step one character past it.
                let step = text[start..].chars().next().map_or(1, char::len_utf8);
                self.pos = start + step;
                continue;
            }
            if let Engine::Dfa {
                ws_alt: Some(ws), ..
            } = &self.pre.engine
            {
                if pid == Some(*ws) && end < text.len() {
                    // `\s+(?!\S)`: give the last whitespace character to the next piece.
                    let last = text[start..end]
                        .char_indices()
                        .next_back()
                        .map_or(0, |(i, _)| i);
                    if last > 0 {
                        end = start + last;
                    }
                }
            }
            self.pos = end;
            return Some(&text[start..end]);
        }
        None
    }
}

fn dfa(alts: &[&str], ws_alt: Option<usize>) -> Result<Engine> {
    let re = MetaRegex::new_many(alts)
        .map_err(|e| Error::invalid(format!("cannot compile pretokenizer pattern: {e}")))?;
    let factory = re.clone();
    Ok(Engine::Dfa {
        re,
        ws_alt: ws_alt.map(PatternID::must),
        caches: Pool::new(Box::new(move || factory.create_cache())),
    })
}

fn compile_user(pattern: &str) -> Result<Engine> {
    // 1. The pattern as it is, if the DFA engine accepts it.
    if MetaRegex::new(pattern).is_ok() {
        return dfa(&[pattern], None);
    }
    // 2. `...|\s+(?!\S)|\s+` (or `|\s`) at the end: rewrite as described in the module docs.
    let alts = split_alternation(pattern);
    let n = alts.len();
    if n >= 2 && alts[n - 2] == r"\s+(?!\S)" && (alts[n - 1] == r"\s+" || alts[n - 1] == r"\s") {
        let mut dfa_alts: Vec<&str> = alts[..n - 2].to_vec();
        dfa_alts.push(r"\s+");
        if dfa_alts[..n - 2].iter().all(|a| MetaRegex::new(a).is_ok()) {
            return dfa(&dfa_alts, Some(n - 2));
        }
    }
    // 3. Backtracking fallback.
    let re = fancy_regex::RegexBuilder::new(pattern)
        .backtrack_limit(usize::MAX)
        .build()
        .map_err(|e| Error::invalid(format!("invalid pretokenizer pattern {pattern:?}: {e}")))?;
    Ok(Engine::Fancy(re))
}

/// Split a regex at its top-level `|` (outside groups and character classes).
fn split_alternation(pattern: &str) -> Vec<&str> {
    let b = pattern.as_bytes();
    let (mut depth, mut class, mut i, mut start) = (0i32, 0i32, 0usize, 0usize);
    let mut out = Vec::new();
    while i < b.len() {
        match b[i] {
            b'\\' => i += 1,
            b'[' => {
                class += 1;
                // A `]` right after `[` or `[^` is a literal.
                if b.get(i + 1) == Some(&b'^') {
                    i += 1;
                }
                if b.get(i + 1) == Some(&b']') {
                    i += 1;
                }
            }
            b']' if class > 0 => class -= 1,
            b'(' if class == 0 => depth += 1,
            b')' if class == 0 => depth -= 1,
            b'|' if class == 0 && depth == 0 => {
                out.push(&pattern[start..i]);
                start = i + 1;
            }
            _ => {}
        }
        i += 1;
    }
    out.push(&pattern[start.min(pattern.len())..]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn reference(re: &fancy_regex::Regex, text: &str) -> Vec<String> {
        re.find_iter(text)
            .map(|m| m.unwrap().as_str().to_string())
            .filter(|s| !s.is_empty())
            .collect()
    }

    fn ours(p: &Pretokenizer, text: &str) -> Vec<String> {
        p.split(text).map(str::to_string).collect()
    }

    const NAMES: [&str; 4] = ["gpt2", "cl100k", "o200k", "llama3"];
    const USER: [&str; 4] = [
        r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+",
        r"'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
        r"\p{L}+|\p{N}|[^\s\p{L}\p{N}]+|\s+(?!\S)|\s",
        r"\w+|[^\w\s]+",
    ];

    /// (ours, reference) compiled once: compiling Unicode classes dominates a proptest case.
    fn compiled(patterns: &[&str]) -> Vec<(Pretokenizer, fancy_regex::Regex)> {
        patterns
            .iter()
            .map(|p| {
                let ours = Pretokenizer::new(p).unwrap();
                let reference = fancy_regex::Regex::new(ours.pattern()).unwrap();
                (ours, reference)
            })
            .collect()
    }
    static NAMED: std::sync::LazyLock<Vec<(Pretokenizer, fancy_regex::Regex)>> =
        std::sync::LazyLock::new(|| compiled(&NAMES));
    static NO_POSSESSIVES: std::sync::LazyLock<Vec<fancy_regex::Regex>> =
        std::sync::LazyLock::new(|| {
            NAMES
                .iter()
                .map(|n| fancy_regex::Regex::new(&without_possessives(resolve_pattern(n))).unwrap())
                .collect()
        });
    static USERS: std::sync::LazyLock<Vec<(Pretokenizer, fancy_regex::Regex)>> =
        std::sync::LazyLock::new(|| compiled(&USER));

    #[test]
    fn named_patterns_run_on_the_dfa() {
        for name in NAMES {
            let p = Pretokenizer::new(name).unwrap();
            assert!(p.is_dfa(), "{name}");
            assert_eq!(p.pattern(), resolve_pattern(name));
        }
        // tiktoken's older (non-possessive) GPT-2 string and HF's ByteLevel regex too.
        let hf = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+";
        assert!(Pretokenizer::new(hf).unwrap().is_dfa());
        assert!(!Pretokenizer::new(r"\w+(?=x)").unwrap().is_dfa());
    }

    #[test]
    fn hand_checked_examples() {
        let p = Pretokenizer::new("cl100k").unwrap();
        assert_eq!(
            ours(&p, "Hello  world's 12345\n\n  x  "),
            ["Hello", " ", " world", "'s", " ", "123", "45", "\n\n", " ", " x", "  "]
        );
        let p = Pretokenizer::new("gpt2").unwrap();
        assert_eq!(ours(&p, "a   b\t"), ["a", "  ", " b", "\t"]);
    }

    #[test]
    fn invalid_pattern_is_an_error() {
        assert!(Pretokenizer::new("(").is_err());
    }

    #[test]
    fn empty_matches_do_not_hang() {
        let p = Pretokenizer::new(r"a*").unwrap();
        assert_eq!(ours(&p, "baab"), ["aa"]);
    }

    #[test]
    fn split_alternation_respects_groups_and_classes() {
        assert_eq!(
            split_alternation(r"a(?:b|c)|[|\]]x|\|"),
            vec![r"a(?:b|c)", r"[|\]]x", r"\|"]
        );
    }

    /// Characters that stress each class the patterns distinguish.
    fn tricky_char() -> impl Strategy<Value = char> {
        prop_oneof![
            3 => prop::sample::select(vec![
                ' ', ' ', '\t', '\n', '\r', '\u{0b}', '\u{0c}', '\u{a0}', '\u{2028}', '\u{3000}',
                '\u{85}', '\'', '"', '/', '.', ',', '!', '-', 'a', 'b', 's', 't', 'l', 'v', 'e',
                'r', 'd', 'm', 'S', 'T', 'L', 'D', 'A', 'Z', '\u{17f}', '\u{212a}', '0', '7',
                '\u{663}', '\u{2163}', '\u{bd}', '\u{301}', '\u{308}', '\u{1c5}', '\u{2b0}',
                '\u{4e2d}', '\u{6587}', '\u{3042}', '\u{1f600}', '\u{1f468}', '\u{200d}',
                '\u{0}', '\u{1}', '\u{7f}', '\u{e9}', '\u{c9}', '\u{3a3}', '\u{3c3}',
            ]),
            1 => any::<char>(),
        ]
    }

    fn tricky_text() -> impl Strategy<Value = String> {
        prop::collection::vec(tricky_char(), 0..64).prop_map(|v| v.into_iter().collect())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]
        #[test]
        fn named_patterns_split_like_fancy_regex(text in tricky_text()) {
            for ((p, re), plain) in NAMED.iter().zip(NO_POSSESSIVES.iter()) {
                prop_assert_eq!(ours(p, &text), reference(re, &text), "{}", p.pattern());
                prop_assert_eq!(reference(plain, &text), reference(re, &text), "{}", p.pattern());
                prop_assert_eq!(p.split(&text).collect::<String>(), text.clone());
            }
        }

        #[test]
        fn rewritten_user_patterns_split_like_fancy_regex(text in tricky_text()) {
            for (p, re) in USERS.iter() {
                prop_assert!(p.is_dfa());
                prop_assert_eq!(ours(p, &text), reference(re, &text), "{}", p.pattern());
            }
        }
    }
}
