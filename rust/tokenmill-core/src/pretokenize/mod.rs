//! Regex pretokenization: split text into the pieces that BPE encodes independently.
//!
//! Patterns run on the DFA engine (`regex-automata`, leftmost-first, one pattern id per top-level
//! alternative) whenever the general rewrite in [`rewrite`] shows that the look-around-free form
//! splits exactly as the backtracking engine would: possessive quantifiers that cannot change a
//! match become greedy, and a trailing one-character look-ahead after a run (`\s+(?!\S)`) is
//! applied after the DFA match, retrying the later alternatives where it fails. Every named
//! pattern and the patterns the field writes by hand (tiktoken / GPT-2 / LLaMA-3 / nanochat
//! style) take that path; anything else (other look-arounds, backreferences) runs on fancy-regex.
//! The equivalence is tested below and in tests/test_pretokenize.py against backtracking engines
//! running the original strings.

mod rewrite;

pub use rewrite::without_possessives;

use crate::{Error, Result};
use regex_automata::hybrid::dfa::{Cache as LazyCache, DFA as LazyDfa};
use regex_automata::meta::{Cache, Regex as MetaRegex};
use regex_automata::util::pool::{Pool, PoolGuard};
use regex_automata::util::start;
use regex_automata::{Anchored, Input};
use rewrite::LookAhead;

type CacheFn =
    Box<dyn Fn() -> Caches + Send + Sync + std::panic::UnwindSafe + std::panic::RefUnwindSafe>;

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

/// The names accepted for the patterns above (first of each row: the documented name).
pub const PATTERN_NAMES: &[(&str, &str)] = &[
    ("gpt2", GPT2),
    ("r50k", GPT2),
    ("r50k_base", GPT2),
    ("cl100k", CL100K),
    ("cl100k_base", CL100K),
    ("o200k", O200K),
    ("o200k_base", O200K),
    ("llama3", LLAMA3),
];

/// Resolve a pattern name ("gpt2", "cl100k", "o200k", "llama3") to its pattern string; any other
/// string is taken as a regex.
pub fn resolve_pattern(pattern_or_name: &str) -> &str {
    PATTERN_NAMES
        .iter()
        .find(|(n, _)| *n == pattern_or_name)
        .map_or(pattern_or_name, |(_, p)| p)
}

/// Error for a string that looks like a name (letters, digits, `-`, `_`, `.` only) but is not one:
/// as a regex it would match only itself and silently drop all other text.
fn check_name(pattern_or_name: &str) -> Result<()> {
    let name_like = !pattern_or_name.is_empty()
        && pattern_or_name
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.'));
    if name_like && resolve_pattern(pattern_or_name) == pattern_or_name {
        let names: Vec<&str> = PATTERN_NAMES.iter().map(|(n, _)| *n).collect();
        return Err(Error::invalid(format!(
            "unknown pattern name {pattern_or_name:?}: the names are {}; any other pattern must be a regex",
            names.join(", ")
        )));
    }
    Ok(())
}

/// One search cache for the whole pattern and one per retry tail (see [`Dfa::tails`]).
struct Caches {
    main: Cache,
    lazy: Option<LazyCache>,
    tails: Vec<Option<Cache>>,
}

struct Dfa {
    re: MetaRegex,
    /// The same alternatives as a lazy DFA, stepped by hand for the anchored search at each piece
    /// (see [`Dfa::first_match`]); None if it cannot be built (then `re` does all searches).
    lazy: Option<LazyDfa>,
    /// Per alternative: its trailing look-ahead, if any.
    looks: Vec<Option<LookAhead>>,
    /// `tails[i]`: alternatives `i..` alone, for each `i` right after a look-ahead alternative:
    /// where the look-ahead fails, the backtracking engine goes on with them at the same place.
    tails: Vec<Option<MetaRegex>>,
    /// Search caches, taken once per `split` call rather than once per piece (the regex's own pool
    /// is a mutex on threads other than its creator's: 1.1x on 2 threads).
    caches: Pool<Caches, CacheFn>,
}

impl Dfa {
    fn new(alts: &[rewrite::Alt]) -> Option<Dfa> {
        let build = |from: usize| {
            let pats: Vec<&str> = alts[from..].iter().map(|a| a.dfa.as_str()).collect();
            MetaRegex::new_many(&pats).ok()
        };
        let re = build(0)?;
        let mut tails = vec![None; alts.len() + 1];
        for (i, a) in alts.iter().enumerate() {
            if a.look.is_some() && i + 1 < alts.len() {
                tails[i + 1] = Some(build(i + 1)?);
            }
        }
        let pats: Vec<&str> = alts.iter().map(|a| a.dfa.as_str()).collect();
        let lazy = LazyDfa::builder()
            .configure(LazyDfa::config().unicode_word_boundary(true))
            .build_many(&pats)
            .ok();
        let (main, lazy_re, tail_res) = (re.clone(), lazy.clone(), tails.clone());
        let factory: CacheFn = Box::new(move || Caches {
            main: main.create_cache(),
            lazy: lazy_re.as_ref().map(LazyDfa::create_cache),
            tails: tail_res
                .iter()
                .map(|t| t.as_ref().map(MetaRegex::create_cache))
                .collect(),
        });
        Some(Dfa {
            re,
            lazy,
            looks: alts.iter().map(|a| a.look.clone()).collect(),
            tails,
            caches: Pool::new(factory),
        })
    }

    /// (end, alternative) of the leftmost-first match anchored at `pos`: the lazy DFA stepped
    /// here, or the meta regex where the lazy DFA is missing or gives up (a `\b` before non-ASCII).
    /// Calling the meta regex for every piece spent more time in its per-search set-up (start
    /// state, strategy dispatch, Input checks) than in the DFA walk itself: pieces average 3-7 bytes.
    #[inline]
    fn first_match(&self, caches: &mut Caches, text: &str, pos: usize) -> Option<(usize, usize)> {
        if let (Some(dfa), Some(cache)) = (&self.lazy, caches.lazy.as_mut()) {
            if let Ok(m) = lazy_anchored(dfa, cache, text.as_bytes(), pos) {
                return m;
            }
        }
        let input = Input::new(text).range(pos..).anchored(Anchored::Yes);
        let m = self.re.search_with(&mut caches.main, &input)?;
        Some((m.end(), m.pattern().as_usize()))
    }

    /// The end of the backtracking engine's match anchored at `pos`, if any.
    #[inline]
    fn match_at(&self, caches: &mut Caches, text: &str, pos: usize) -> Option<usize> {
        let (end, alt) = self.first_match(caches, text, pos)?;
        if self.looks[alt].is_none() {
            return Some(end);
        }
        let input = Input::new(text).range(pos..).anchored(Anchored::Yes);
        let mut m = regex_automata::Match::must(alt, pos..end);
        let mut first = 0;
        loop {
            let alt = first + m.pattern().as_usize();
            let Some(look) = &self.looks[alt] else {
                return Some(m.end());
            };
            if let Some(end) = look.resolve(text, m.start(), m.end()) {
                return Some(end);
            }
            first = alt + 1;
            let tail = self.tails[first].as_ref()?;
            let cache = caches.tails[first].as_mut().expect("a cache per tail");
            m = tail.search_with(cache, &input)?;
        }
    }
}

/// Leftmost-first anchored search on the lazy DFA: (end, pattern) of the match at `pos`, if any.
/// Matches are delayed by one byte: a match state entered on the byte at `at` ends a match at `at`.
#[inline]
fn lazy_anchored(
    dfa: &LazyDfa,
    cache: &mut LazyCache,
    text: &[u8],
    pos: usize,
) -> std::result::Result<Option<(usize, usize)>, ()> {
    let look_behind = pos.checked_sub(1).map(|i| text[i]);
    let config = start::Config::new()
        .anchored(Anchored::Yes)
        .look_behind(look_behind);
    let mut sid = dfa.start_state(cache, &config).map_err(|_| ())?;
    let mut found = None;
    for (at, &b) in text.iter().enumerate().skip(pos) {
        sid = dfa.next_state(cache, sid, b).map_err(|_| ())?;
        if sid.is_tagged() {
            if sid.is_match() {
                found = Some((at, dfa.match_pattern(cache, sid, 0).as_usize()));
            } else if sid.is_dead() {
                return Ok(found);
            } else if sid.is_quit() {
                return Err(());
            }
        }
    }
    sid = dfa.next_eoi_state(cache, sid).map_err(|_| ())?;
    if sid.is_match() {
        found = Some((text.len(), dfa.match_pattern(cache, sid, 0).as_usize()));
    }
    Ok(found)
}

enum Engine {
    Dfa(Box<Dfa>),
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
            .field("engine", &self.engine_name())
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
    /// Compile a named pattern ("gpt2", "cl100k", "o200k", "llama3") or a regex. A string that
    /// looks like a name but is not one is an error listing the names.
    pub fn new(pattern_or_name: &str) -> Result<Self> {
        check_name(pattern_or_name)?;
        let pattern = resolve_pattern(pattern_or_name).to_string();
        let engine = match rewrite::rewrite(&pattern).and_then(|alts| Dfa::new(&alts)) {
            Some(dfa) => Engine::Dfa(Box::new(dfa)),
            None => Engine::Fancy(
                fancy_regex::RegexBuilder::new(&pattern)
                    .backtrack_limit(usize::MAX)
                    .build()
                    .map_err(|e| {
                        Error::invalid(format!("invalid pretokenizer pattern {pattern:?}: {e}"))
                    })?,
            ),
        };
        Ok(Pretokenizer { pattern, engine })
    }

    /// The pattern string (for a name: the exact string tiktoken / LLaMA-3 use).
    pub fn pattern(&self) -> &str {
        &self.pattern
    }

    /// Whether the pattern runs on the DFA engine (false: fancy-regex backtracking).
    pub fn is_dfa(&self) -> bool {
        matches!(self.engine, Engine::Dfa(_))
    }

    /// "dfa" or "fancy-regex".
    pub fn engine_name(&self) -> &'static str {
        if self.is_dfa() {
            "dfa"
        } else {
            "fancy-regex"
        }
    }

    /// The pieces of `text`, in order. Text the pattern does not match is skipped (as tiktoken
    /// does); empty matches are skipped. The named patterns match every character.
    pub fn split<'a>(&'a self, text: &'a str) -> Pieces<'a> {
        Pieces {
            pre: self,
            text,
            pos: 0,
            cache: match &self.engine {
                Engine::Dfa(d) => Some(d.caches.get()),
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
    cache: Option<PoolGuard<'a, Caches, CacheFn>>,
}

impl<'a> Iterator for Pieces<'a> {
    type Item = &'a str;

    #[inline]
    fn next(&mut self) -> Option<&'a str> {
        let text = self.text;
        while self.pos < text.len() {
            let (start, end) = match &self.pre.engine {
                Engine::Dfa(dfa) => {
                    let caches = self.cache.as_mut().expect("DFA pieces hold a cache");
                    // The named patterns cover every character, so an anchored search at the
                    // current position almost always succeeds and skips the reverse scan.
                    match dfa.match_at(caches, text, self.pos) {
                        Some(end) => (self.pos, end),
                        None => {
                            // No match here: go to the next place where the look-around-free
                            // form matches (the original cannot match earlier) and try there.
                            let step = text[self.pos..].chars().next().map_or(1, char::len_utf8);
                            let input = Input::new(text).range(self.pos + step..);
                            match dfa.re.search_with(&mut caches.main, &input) {
                                Some(m) => {
                                    self.pos = m.start();
                                    continue;
                                }
                                None => {
                                    self.pos = text.len();
                                    return None;
                                }
                            }
                        }
                    }
                }
                Engine::Fancy(re) => match re.find_from_pos(text, self.pos) {
                    Ok(Some(m)) => (m.start(), m.end()),
                    // A backtrack-limit error is impossible with the unlimited limit set above;
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
            self.pos = end;
            return Some(&text[start..end]);
        }
        None
    }
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
    /// User patterns that must run on the DFA: HF ByteLevel, GPT-4 without possessives, nanochat
    /// (rustbpe's default, with possessives), look-aheads in other places and shapes.
    const USER: [&str; 9] = [
        r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+",
        r"'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
        NANOCHAT,
        r"\p{L}+|\p{N}|[^\s\p{L}\p{N}]+|\s+(?!\S)|\s",
        r"\w+|[^\w\s]+",
        r"\s+(?!\S)|\p{N}{2,3}(?=\s)|\p{L}++|.",
        r"\s{2,}(?!\S)|\S+|\s",
        r"[a-z]*+(?!\p{Lu})|\p{L}+|\s++$|\s|\P{L}",
        r"[ab]*+c|\s+(?=\p{N})|\s++(?!\S)|\S",
    ];
    const NANOCHAT: &str = r"'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+";

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
    fn backtracking_patterns_stay_on_fancy_regex() {
        for p in [
            r"a\w+(?=x)",
            r"(?<=a)b",
            r"(a)\1",
            r"a*+a|b",
            r"(?i)a|b",
            r"\s+(?!\S\S)|\s",
        ] {
            let ours = Pretokenizer::new(p).unwrap();
            assert_eq!(ours.engine_name(), "fancy-regex", "{p}");
            let re = fancy_regex::Regex::new(p).unwrap();
            for text in ["aab  x", "ba ab\n  xx"] {
                assert_eq!(
                    self::ours(&ours, text),
                    reference(&re, text),
                    "{p} {text:?}"
                );
            }
        }
    }

    #[test]
    fn names_are_checked() {
        let e = Pretokenizer::new("llama-3").unwrap_err().to_string();
        assert!(e.contains("llama-3") && e.contains("gpt2, r50k"), "{e}");
        assert!(Pretokenizer::new("cl100k_base").is_ok());
        assert!(Pretokenizer::new("").is_ok());
    }

    #[test]
    fn named_patterns_run_on_the_dfa() {
        for name in NAMES {
            let p = Pretokenizer::new(name).unwrap();
            assert!(p.is_dfa(), "{name}");
            assert_eq!(p.pattern(), resolve_pattern(name));
        }
        for p in USER {
            assert!(Pretokenizer::new(p).unwrap().is_dfa(), "{p}");
        }
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
    fn word_boundary_before_non_ascii_falls_back_to_the_meta_regex() {
        // A Unicode `\b` makes the lazy DFA quit on non-ASCII bytes; the meta regex takes over.
        let p = Pretokenizer::new(r"\b\w+\b|\W").unwrap();
        assert!(p.is_dfa());
        let re = fancy_regex::Regex::new(p.pattern()).unwrap();
        for text in ["привет, мир! abc", "中文 x\u{e9}y 12", "a b"] {
            assert_eq!(ours(&p, text), reference(&re, text), "{text:?}");
        }
        assert_eq!(ours(&p, "привет, мир"), ["привет", ",", " ", "мир"]);
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
                prop_assert!(p.is_dfa());
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
                let plain = fancy_regex::Regex::new(&without_possessives(p.pattern())).unwrap();
                prop_assert_eq!(reference(&plain, &text), reference(re, &text), "{}", p.pattern());
            }
        }
    }
}
