//! The general rewrite of a backtracking pattern into look-around-free alternatives for the DFA.
//!
//! A pattern is split at its top-level `|`; each alternative becomes one DFA pattern (leftmost-first,
//! so the first alternative that matches at a position wins, as in a backtracking engine). Two
//! constructs that a DFA cannot run are rewritten, each only where the result is provably the same:
//!
//! 1. A possessive quantifier on a one-character atom, `X?+`, `X*+`, `X++`, `X{m,n}+`, at the top
//!    level of an alternative, followed by the rest `R` of the alternative. Greedy `X*` differs from
//!    `X*+` only by backtracking into fewer repetitions, leaving `R` to start at a character of `X`.
//!    So the two are equal when `R` always matches (it can match the empty string without
//!    assertions) or when no character of `X` can begin `R` or be the next character where `R`
//!    matches empty (`$` never can: a character follows). Both sets come from `R`'s HIR
//!    ([`starts`]). tiktoken's `[^\r\n\p{L}\p{N}]?+\p{L}+`, `\p{N}{1,3}+`, `\s++$` all qualify.
//! 2. A trailing one-character look-ahead after a run of one class, the whole alternative being
//!    `X{m,n}(?!N)` or `X{m,n}(?=N)` (greedy or possessive). The DFA matches `X{m,n}`: the longest
//!    run. A backtracking engine then gives back characters of the run until the look-ahead holds,
//!    but no more than `m` remain ([`LookAhead::resolve`]; possessive: no giving back). If none
//!    holds, the alternative fails and the alternatives after it are tried at the same position.
//!    `\s+(?!\S)` is the case the field uses: a run followed by a non-space loses its last character.
//!
//! Anything else a DFA cannot express (other look-arounds, backreferences, possessive groups,
//! bare flag groups like `(?i)` that would leak across alternatives) sends the whole pattern to
//! fancy-regex.

use regex_syntax::hir::{Class, ClassUnicode, ClassUnicodeRange, Hir, HirKind, Look};

/// One top-level alternative after the rewrite.
#[derive(Clone, Debug)]
pub(super) struct Alt {
    /// Look-around-free and possessive-free: what the DFA runs.
    pub dfa: String,
    /// With the look-ahead kept and possessives dropped where rule 1 allows: for backtracking
    /// engines without possessives (None: a possessive look-ahead run, which must stay).
    pub backtracking: Option<String>,
    pub look: Option<LookAhead>,
}

/// A trailing one-character look-ahead after a run of one class (see the module docs).
#[derive(Clone, Debug)]
pub(super) struct LookAhead {
    class: ClassUnicode,
    negative: bool,
    /// The least number of characters the run may be cut back to.
    min: u32,
    possessive: bool,
}

impl LookAhead {
    fn holds(&self, text: &str, at: usize) -> bool {
        match text[at..].chars().next() {
            None => self.negative,
            Some(c) => contains(&self.class, c) != self.negative,
        }
    }

    /// The end of the backtracking engine's match of this alternative, given the DFA's match
    /// `text[start..end]` (the longest run); None when the alternative fails at `start`.
    #[inline]
    pub fn resolve(&self, text: &str, start: usize, end: usize) -> Option<usize> {
        if self.holds(text, end) {
            return Some(end);
        }
        if self.possessive {
            return None;
        }
        let run = &text[start..end];
        let total = if self.min > 1 { run.chars().count() } else { 0 };
        for (given_back, (i, _)) in run.char_indices().rev().enumerate() {
            let kept = i > 0 || self.min == 0;
            if !kept || (self.min > 1 && total - given_back - 1 < self.min as usize) {
                return None;
            }
            if self.holds(text, start + i) {
                return Some(start + i);
            }
        }
        None
    }
}

fn contains(class: &ClassUnicode, c: char) -> bool {
    let r = class.ranges();
    let i = r.partition_point(|x| x.end() < c);
    i < r.len() && r[i].start() <= c
}

/// The alternatives of `pattern` rewritten for the DFA, or None when it needs backtracking.
pub(super) fn rewrite(pattern: &str) -> Option<Vec<Alt>> {
    split_alternation(pattern)
        .into_iter()
        .map(rewrite_alt)
        .collect()
}

/// `pattern` without possessive quantifiers where they provably change nothing (rule 1 above);
/// unchanged if any possessive cannot be dropped or the pattern cannot be analysed.
pub fn without_possessives(pattern: &str) -> String {
    match rewrite(pattern) {
        Some(alts) => alts
            .iter()
            .map(|a| a.backtracking.as_deref())
            .collect::<Option<Vec<_>>>()
            .map_or_else(|| pattern.to_string(), |alts| alts.join("|")),
        None => pattern.to_string(),
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Kind {
    /// A character, escape, class or `.`.
    Atom,
    /// `(...)`, `(?:...)`, `(?i:...)`: opaque, handed to the DFA as written.
    Group,
    /// `(?=...)` / `(?!...)`.
    LookAhead { negative: bool },
    /// Look-behind, a bare flag group `(?i)`, `^`/`$` and other assertions handled as atoms
    /// where they are safe; this kind marks the ones that are not.
    Unsupported,
}

#[derive(Debug)]
struct Item<'a> {
    atom: &'a str,
    kind: Kind,
    /// The quantifier without a possessive `+` ("" if none).
    quant: &'a str,
    possessive: bool,
    /// Least repetitions (1 without a quantifier).
    min: u32,
}

impl Item<'_> {
    fn greedy(&self) -> String {
        format!("{}{}", self.atom, self.quant)
    }
}

fn rewrite_alt(alt: &str) -> Option<Alt> {
    let mut items = parse_items(alt)?;
    if items.iter().any(|it| {
        it.kind == Kind::Unsupported || (it.kind == Kind::Group && has_possessive(it.atom))
    }) {
        return None;
    }
    if let Some(pos) = items
        .iter()
        .position(|it| matches!(it.kind, Kind::LookAhead { .. }))
    {
        // Rule 2: exactly `X{m,n}(?!N)`.
        let Kind::LookAhead { negative } = items[pos].kind else {
            unreachable!()
        };
        let inner = &items[pos].atom[3..items[pos].atom.len() - 1];
        if pos != 1 || items.len() != 2 || !items[pos].quant.is_empty() {
            return None;
        }
        let run = &items[0];
        if run.kind != Kind::Atom || run.quant.ends_with('?') && run.quant.len() > 1 {
            return None; // a lazy run would give back from the other end
        }
        one_char_class(run.atom)?;
        let look = LookAhead {
            class: one_char_class(inner)?,
            negative,
            min: run.min,
            possessive: run.possessive,
        };
        return Some(Alt {
            dfa: run.greedy(),
            backtracking: (!run.possessive).then(|| format!("{}{}", run.greedy(), items[pos].atom)),
            look: Some(look),
        });
    }
    // Rule 1, right to left so that each rest is already possessive-free.
    for i in (0..items.len()).rev() {
        if items[i].possessive {
            let x = one_char_class(items[i].atom)?;
            let rest: String = items[i + 1..].iter().map(Item::greedy).collect();
            if !possessive_is_greedy(&x, &rest)? {
                return None;
            }
            items[i].possessive = false;
        }
    }
    let dfa: String = items.iter().map(Item::greedy).collect();
    Some(Alt {
        backtracking: Some(dfa.clone()),
        dfa,
        look: None,
    })
}

/// Whether `X` possessive followed by `rest` equals `X` greedy followed by `rest` (rule 1).
fn possessive_is_greedy(x: &ClassUnicode, rest: &str) -> Option<bool> {
    let hir = parse(rest)?;
    let s = starts(&hir);
    if s.nullable {
        return Some(true);
    }
    let mut either = s.first;
    either.union(&s.empty_before);
    either.intersect(x);
    Some(either.ranges().is_empty())
}

fn parse(src: &str) -> Option<Hir> {
    regex_syntax::ParserBuilder::new().build().parse(src).ok()
}

/// The class of a one-character atom (`a`, `\s`, `\p{L}`, `[^\r\n]`, `.`), else None.
fn one_char_class(atom: &str) -> Option<ClassUnicode> {
    match parse(atom)?.kind() {
        HirKind::Class(Class::Unicode(c)) => Some(c.clone()),
        HirKind::Literal(lit) => {
            let s = std::str::from_utf8(&lit.0).ok()?;
            let mut it = s.chars();
            let c = it.next()?;
            it.next()
                .is_none()
                .then(|| ClassUnicode::new([ClassUnicodeRange::new(c, c)]))
        }
        _ => None,
    }
}

/// What can happen at the start of a match of an expression: the characters it can consume
/// first, the next characters before which it can match the empty string, and whether it
/// matches the empty string everywhere (no assertions). Over-approximations where unsure.
struct Starts {
    first: ClassUnicode,
    empty_before: ClassUnicode,
    nullable: bool,
}

fn all() -> ClassUnicode {
    ClassUnicode::new([ClassUnicodeRange::new('\0', char::MAX)])
}

fn starts(h: &Hir) -> Starts {
    let none = ClassUnicode::empty;
    match h.kind() {
        HirKind::Empty => Starts {
            first: none(),
            empty_before: all(),
            nullable: true,
        },
        HirKind::Literal(lit) => {
            let first = match std::str::from_utf8(&lit.0)
                .ok()
                .and_then(|s| s.chars().next())
            {
                Some(c) => ClassUnicode::new([ClassUnicodeRange::new(c, c)]),
                None => all(),
            };
            Starts {
                first,
                empty_before: none(),
                nullable: false,
            }
        }
        HirKind::Class(Class::Unicode(c)) => Starts {
            first: c.clone(),
            empty_before: none(),
            nullable: false,
        },
        HirKind::Class(Class::Bytes(_)) => Starts {
            first: all(),
            empty_before: none(),
            nullable: false,
        },
        HirKind::Look(look) => {
            let empty_before = match look {
                // A character follows, so the end of the text is not here.
                Look::End => none(),
                Look::EndLF => ClassUnicode::new([ClassUnicodeRange::new('\n', '\n')]),
                Look::EndCRLF => ClassUnicode::new([
                    ClassUnicodeRange::new('\n', '\n'),
                    ClassUnicodeRange::new('\r', '\r'),
                ]),
                _ => all(),
            };
            Starts {
                first: none(),
                empty_before,
                nullable: false,
            }
        }
        HirKind::Repetition(r) => {
            let sub = starts(&r.sub);
            Starts {
                first: if r.max == Some(0) { none() } else { sub.first },
                empty_before: if r.min == 0 { all() } else { sub.empty_before },
                nullable: r.min == 0 || sub.nullable,
            }
        }
        HirKind::Capture(c) => starts(&c.sub),
        HirKind::Concat(hs) => {
            let mut acc = Starts {
                first: none(),
                empty_before: all(),
                nullable: true,
            };
            for h in hs.iter().rev() {
                let s = starts(h);
                let mut later = acc.first;
                later.intersect(&s.empty_before);
                let mut first = s.first;
                first.union(&later);
                let mut empty_before = s.empty_before;
                empty_before.intersect(&acc.empty_before);
                acc = Starts {
                    first,
                    empty_before,
                    nullable: s.nullable && acc.nullable,
                };
            }
            acc
        }
        HirKind::Alternation(hs) => {
            let mut acc = Starts {
                first: none(),
                empty_before: none(),
                nullable: false,
            };
            for h in hs {
                let s = starts(h);
                acc.first.union(&s.first);
                acc.empty_before.union(&s.empty_before);
                acc.nullable |= s.nullable;
            }
            acc
        }
    }
}

/// Split an alternative into quantified items. None for syntax this reader does not know (the
/// pattern then goes to fancy-regex, which reports real errors).
fn parse_items(alt: &str) -> Option<Vec<Item<'_>>> {
    let b = alt.as_bytes();
    let mut items = Vec::new();
    let mut i = 0;
    while i < b.len() {
        let start = i;
        let kind = match b[i] {
            b'\\' => {
                i = escape_end(b, i)?;
                match b[start + 1] {
                    // Word boundaries, text anchors: fine for the DFA, but not one-character atoms
                    // (one_char_class refuses them).
                    b'1'..=b'9' | b'k' | b'G' | b'K' => Kind::Unsupported,
                    _ => Kind::Atom,
                }
            }
            b'[' => {
                i = class_end(b, i)?;
                Kind::Atom
            }
            b'(' => {
                i = group_end(b, i)?;
                let g = &alt[start..i];
                if g.starts_with("(?=") {
                    Kind::LookAhead { negative: false }
                } else if g.starts_with("(?!") {
                    Kind::LookAhead { negative: true }
                } else if g.starts_with("(?<=")
                    || g.starts_with("(?<!")
                    || g.starts_with("(?>")
                    || is_flag_group(g)
                {
                    Kind::Unsupported
                } else {
                    Kind::Group
                }
            }
            b')' | b'|' | b'*' | b'+' | b'?' => return None,
            _ => {
                i += alt[i..].chars().next()?.len_utf8();
                Kind::Atom
            }
        };
        let atom = &alt[start..i];
        let (qend, min) = quantifier(b, i);
        let mut quant = &alt[i..qend];
        i = qend;
        let mut possessive = false;
        if !quant.is_empty() {
            match b.get(i) {
                Some(b'+') => {
                    possessive = true;
                    i += 1;
                }
                Some(b'?') => {
                    i += 1;
                    quant = &alt[qend - quant.len()..i];
                }
                _ => {}
            }
        }
        items.push(Item {
            atom,
            kind,
            quant,
            possessive,
            min,
        });
    }
    Some(items)
}

/// `(?i)`, `(?x-s)`: flags that would apply to everything after them.
fn is_flag_group(g: &str) -> bool {
    g.len() > 3
        && g.starts_with("(?")
        && g[2..g.len() - 1]
            .bytes()
            .all(|c| c.is_ascii_alphabetic() || c == b'-')
}

/// The end of the quantifier at `i` (i itself if none) and its least repetition count.
fn quantifier(b: &[u8], i: usize) -> (usize, u32) {
    match b.get(i) {
        Some(b'?') | Some(b'*') => (i + 1, 0),
        Some(b'+') => (i + 1, 1),
        Some(b'{') => {
            let mut j = i + 1;
            while j < b.len() && b[j].is_ascii_digit() {
                j += 1;
            }
            let min = std::str::from_utf8(&b[i + 1..j])
                .ok()
                .and_then(|s| s.parse().ok());
            let Some(min) = min else { return (i, 1) };
            if b.get(j) == Some(&b',') {
                j += 1;
                while j < b.len() && b[j].is_ascii_digit() {
                    j += 1;
                }
            }
            if b.get(j) == Some(&b'}') {
                (j + 1, min)
            } else {
                (i, 1)
            }
        }
        _ => (i, 1),
    }
}

fn escape_end(b: &[u8], i: usize) -> Option<usize> {
    let c = *b.get(i + 1)?;
    let braced = |j: usize| -> Option<usize> {
        let close = b[j..].iter().position(|&x| x == b'}')?;
        Some(j + close + 1)
    };
    Some(match c {
        b'p' | b'P' | b'x' | b'u' | b'U' if b.get(i + 2) == Some(&b'{') => braced(i + 2)?,
        b'p' | b'P' => i + 3,
        b'x' => i + 4,
        b'u' => i + 6,
        b'U' => i + 10,
        // One escaped character, which may be multi-byte.
        _ => {
            i + 1
                + std::str::from_utf8(&b[i + 1..])
                    .ok()?
                    .chars()
                    .next()?
                    .len_utf8()
        }
    })
    .filter(|&e| e <= b.len())
}

/// The end of the character class opening at `i` (nested classes allowed).
fn class_end(b: &[u8], i: usize) -> Option<usize> {
    let mut j = i + 1;
    if b.get(j) == Some(&b'^') {
        j += 1;
    }
    if b.get(j) == Some(&b']') {
        j += 1; // a literal `]` first
    }
    while j < b.len() {
        match b[j] {
            b'\\' => j = escape_end(b, j)?,
            b'[' => j = class_end(b, j)?,
            b']' => return Some(j + 1),
            _ => j += 1,
        }
    }
    None
}

/// The end of the group opening at `i`.
fn group_end(b: &[u8], i: usize) -> Option<usize> {
    let mut j = i + 1;
    while j < b.len() {
        match b[j] {
            b'\\' => j = escape_end(b, j)?,
            b'[' => j = class_end(b, j)?,
            b'(' => j = group_end(b, j)?,
            b')' => return Some(j + 1),
            _ => j += 1,
        }
    }
    None
}

/// Whether a quantifier (`?`, `*`, `+`, `{m,n}`) outside character classes is made possessive by a
/// following `+`. `(?` opens a group and is not a quantifier.
pub(super) fn has_possessive(pattern: &str) -> bool {
    let b = pattern.as_bytes();
    let (mut class, mut i) = (0i32, 0usize);
    while i < b.len() {
        match b[i] {
            // `\p{L}`: the `}` of a class name is not the end of a `{m,n}` repetition.
            b'\\' if matches!(b.get(i + 1), Some(b'p' | b'P')) && b.get(i + 2) == Some(&b'{') => {
                while i < b.len() && b[i] != b'}' {
                    i += 1;
                }
            }
            b'\\' => i += 1,
            b'[' => class += 1,
            b']' if class > 0 => class -= 1,
            b'?' if class == 0 && i > 0 && b[i - 1] == b'(' => {}
            b'?' | b'*' | b'+' | b'}' if class == 0 && b.get(i + 1) == Some(&b'+') => return true,
            _ => {}
        }
        i += 1;
    }
    false
}

/// Split a regex at its top-level `|` (outside groups and character classes).
pub(super) fn split_alternation(pattern: &str) -> Vec<&str> {
    let b = pattern.as_bytes();
    let (mut depth, mut i, mut start) = (0i32, 0usize, 0usize);
    let mut out = Vec::new();
    while i < b.len() {
        match b[i] {
            b'\\' => i += 1,
            b'[' => {
                // Skip the whole class (nested classes, a leading literal `]`).
                match class_end(b, i) {
                    Some(e) => {
                        i = e;
                        continue;
                    }
                    None => return vec![pattern],
                }
            }
            b'(' => depth += 1,
            b')' => depth -= 1,
            b'|' if depth == 0 => {
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

    #[test]
    fn possessives_are_dropped_only_when_provably_equal() {
        assert_eq!(
            without_possessives(r"[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,3}+|\s++$|\s+(?!\S)|\s"),
            r"[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|\s+$|\s+(?!\S)|\s"
        );
        // `a*+a` can never match, `a*a` can: kept (and left to fancy-regex).
        assert!(rewrite(r"a*+a").is_none());
        assert!(rewrite(r"\s++\s").is_none());
        // A possessive inside a group is not analysed.
        assert!(rewrite(r"(?:a++)b").is_none());
        assert!(rewrite(r"x|[ab]++c").is_some());
        // `\s*+\n` can never match a newline preceded by spaces; `\s*\n` can.
        assert!(rewrite(r"\s*+\n").is_none());
        // Multiline `$` may match before a `\n`, which `\s` contains.
        assert!(rewrite(r"(?m:\s++$)").is_none());
    }

    #[test]
    fn look_aheads_take_the_supported_shape_only() {
        assert!(rewrite(r"\s+(?!\S)|\s").is_some());
        // A possessive run before a look-ahead runs on the DFA but is not dropped.
        assert!(rewrite(r"\s++(?!\S)").is_some());
        assert_eq!(without_possessives(r"\s++(?!\S)|a++"), r"\s++(?!\S)|a++");
        assert!(rewrite(r"\p{N}{1,3}(?=\s)").is_some());
        assert!(rewrite(r"a\s+(?!\S)").is_none()); // not a lone run
        assert!(rewrite(r"\s+(?!ab)").is_none()); // not one character
        assert!(rewrite(r"(?<=a)b").is_none());
        assert!(rewrite(r"(?i)a|b").is_none());
        assert!(rewrite(r"(a)\1").is_none());
    }

    #[test]
    fn resolve_gives_back_like_a_backtracker() {
        let alts = rewrite(r"\s{2,}(?!\S)").unwrap();
        let look = alts[0].look.as_ref().unwrap();
        // DFA run "   " (3 spaces) followed by "x": give back one, the next is a space.
        assert_eq!(look.resolve("   x", 0, 3), Some(2));
        assert_eq!(look.resolve("  x", 0, 2), None); // would leave 1 < 2
        assert_eq!(look.resolve("  ", 0, 2), Some(2));
    }

    #[test]
    fn split_alternation_respects_groups_and_classes() {
        assert_eq!(
            split_alternation(r"a(?:b|c)|[|\]]x|\||[]|]"),
            vec![r"a(?:b|c)", r"[|\]]x", r"\|", r"[]|]"]
        );
    }

    #[test]
    fn has_possessive_reads_quantifiers_only() {
        assert!(!has_possessive(r"(?i:a)|[?+]|\?+|a+?|\p{L}+|\P{N}+"));
        assert!(has_possessive(r"a{1,3}+") && has_possessive(r"\s++$") && has_possessive(r"a*+"));
    }
}
