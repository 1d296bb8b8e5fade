//! tiktoken's `.tiktoken` files: one `base64(token) rank` per line, ranks 0..n in any order.

use super::{b64_decode, b64_encode, read_text};
use crate::bpe::Tokenizer;
use crate::{fsutil, Error, Result};
use std::path::Path;

/// A tokenizer from a `.tiktoken` file, a split pattern and special tokens; what the file's ranks
/// get wrong (gaps, duplicates, specials on their ids) is an error naming the file.
pub fn load(
    path: impl AsRef<Path>,
    pattern: &str,
    specials: Vec<(String, u32)>,
) -> Result<Tokenizer> {
    let path = path.as_ref();
    Tokenizer::from_ranks(read(path)?, pattern, specials).map_err(|e| match e {
        Error::InvalidArgument(m) => Error::format(path, m),
        other => other,
    })
}

/// The mergeable tokens in rank order.
pub fn read(path: impl AsRef<Path>) -> Result<Vec<Vec<u8>>> {
    let path = path.as_ref();
    parse(&read_text(path)?, path)
}

pub fn parse(text: &str, path: &Path) -> Result<Vec<Vec<u8>>> {
    let mut ranked: Vec<(u64, Vec<u8>)> = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.is_empty() {
            continue;
        }
        let bad = |what: &str| Error::format(path, format!("line {}: {what}: {line:.60?}", i + 1));
        let (tok, rank) = line
            .split_once(' ')
            .ok_or_else(|| bad("expected `base64 rank`"))?;
        let tok = b64_decode(tok).ok_or_else(|| bad("invalid base64 token"))?;
        if tok.is_empty() {
            return Err(bad("empty token"));
        }
        let rank: u64 = rank
            .trim()
            .parse()
            .map_err(|_| bad("rank is not a non-negative integer"))?;
        ranked.push((rank, tok));
    }
    if ranked.is_empty() {
        return Err(Error::format(path, "no tokens (empty file)"));
    }
    ranked.sort_by_key(|(r, _)| *r);
    for (i, (r, tok)) in ranked.iter().enumerate() {
        if *r != i as u64 {
            return Err(Error::format(
                path,
                format!(
                    "ranks must be 0..{} without gaps or repeats; rank {r} (token {}) is out of place",
                    ranked.len(),
                    crate::bpe::show_bytes(tok)
                ),
            ));
        }
    }
    Ok(ranked.into_iter().map(|(_, t)| t).collect())
}

pub fn to_string(tok: &Tokenizer) -> Result<String> {
    if tok.spm().is_some() {
        return Err(Error::invalid(
            "a SentencePiece model cannot be saved as .tiktoken (it is not byte-level BPE)",
        ));
    }
    let mut out = String::new();
    if tok.options().merges.is_some() {
        return Err(Error::invalid(
            "this tokenizer has an explicit merge list (Hugging Face); .tiktoken files cannot hold it",
        ));
    }
    for (rank, t) in tok.mergeable_tokens() {
        out.push_str(&b64_encode(t));
        out.push(' ');
        out.push_str(&rank.to_string());
        out.push('\n');
    }
    Ok(out)
}

/// Write the mergeable ranks (special tokens and pattern are not part of the format).
pub fn save(tok: &Tokenizer, path: impl AsRef<Path>) -> Result<()> {
    fsutil::write_atomic(path, to_string(tok)?.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn malformed_lines_name_the_line() {
        let p = Path::new("x.tiktoken");
        for (text, want) in [
            ("IQ== 0\nIg==\n", "line 2"),
            ("IQ== 0\n!!!! 1\n", "invalid base64"),
            ("IQ== 0\nIg== -1\n", "rank"),
            ("IQ== 0\nIg== 2\n", "without gaps"),
            ("", "empty"),
        ] {
            let e = parse(text, p).unwrap_err().to_string();
            assert!(e.contains("x.tiktoken") && e.contains(want), "{e}");
        }
        assert_eq!(
            parse("Ig== 1\nIQ== 0\n", p).unwrap(),
            vec![b"!".to_vec(), b"\"".to_vec()]
        );
    }
}
