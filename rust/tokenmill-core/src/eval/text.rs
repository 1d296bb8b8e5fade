//! Splitting text the way jiwer's default transforms do, so that counts agree with it.

/// Python's `str.isspace()`: Unicode White_Space plus the four ASCII information separators
/// U+001C..U+001F, which Python (bidirectional class B/S) also counts as whitespace.
#[inline]
pub fn is_py_space(c: char) -> bool {
    c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c)
}

fn strip(text: &str) -> &str {
    text.trim_matches(is_py_space)
}

/// Words as jiwer's `wer_default` makes them: runs of two or more whitespace characters become one
/// space (`RemoveMultipleSpaces`), the ends are stripped, and the text is split on " " only. A lone
/// tab between two words therefore stays inside one "word", exactly as in jiwer.
pub fn words_jiwer(text: &str) -> impl Iterator<Item = &str> {
    let text = strip(text);
    let mut rest = text;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        // Find the next separator: a single ' ' or a whitespace run of length >= 2.
        let mut chars = rest.char_indices().peekable();
        while let Some((i, c)) = chars.next() {
            if !is_py_space(c) {
                continue;
            }
            let next_is_space = chars.peek().is_some_and(|&(_, n)| is_py_space(n));
            if c == ' ' || next_is_space {
                let word = &rest[..i];
                let mut end = i + c.len_utf8();
                while let Some(&(j, n)) = chars.peek() {
                    if !is_py_space(n) {
                        break;
                    }
                    end = j + n.len_utf8();
                    chars.next();
                }
                rest = &rest[end..];
                return Some(word);
            }
        }
        let word = rest;
        rest = "";
        Some(word)
    })
    .filter(|w| !w.is_empty())
}

/// Characters as jiwer's `cer_default` makes them: the stripped text, one id per code point.
pub fn chars_jiwer(text: &str) -> Vec<u32> {
    strip(text).chars().map(u32::from).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn words(s: &str) -> Vec<&str> {
        words_jiwer(s).collect()
    }

    #[test]
    fn splits_like_jiwer() {
        assert_eq!(words("  a  b c\u{3000}"), ["a", "b", "c"]);
        assert_eq!(words("a\tb"), ["a\tb"]);
        assert_eq!(words("a \tb"), ["a", "b"]);
        assert_eq!(words("a\t\tb"), ["a", "b"]);
        assert_eq!(words("\u{1f}x\u{1c}"), ["x"]);
        assert!(words(" \t ").is_empty());
    }
}
