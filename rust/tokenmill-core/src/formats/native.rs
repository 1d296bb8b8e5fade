//! tokenmill's own tokenizer file: line-oriented UTF-8 text, bytes in base64, ending with the
//! fingerprint so that a corrupted or edited file is detected on load.
//!
//! ```text
//! tokenmill-tokenizer 1
//! kind bytelevel                     (or: kind sentencepiece <add_dummy_prefix> <remove_extra_whitespaces> <byte_fallback>)
//! pattern <base64 of the pattern>
//! tokens <n>
//! <base64 token>                     (n lines, id order; sentencepiece: `<base64 piece> <score> <type>`)
//! specials <m>
//! <id> <base64 text>                 (m lines; sentencepiece models derive theirs from the pieces)
//! fingerprint <fingerprint>
//! ```

use super::{b64_decode, b64_encode, read_text};
use crate::bpe::spm::{PieceType, SpModel, SpPiece};
use crate::bpe::Tokenizer;
use crate::{fsutil, Error, Result};
use std::path::Path;

const MAGIC: &str = "tokenmill-tokenizer 1";

pub fn to_string(tok: &Tokenizer) -> String {
    let mut out = String::new();
    out.push_str(MAGIC);
    out.push('\n');
    match tok.spm() {
        None => out.push_str("kind bytelevel\n"),
        Some(m) => out.push_str(&format!(
            "kind sentencepiece {} {} {}\n",
            m.add_dummy_prefix as u8, m.remove_extra_whitespaces as u8, m.byte_fallback as u8
        )),
    }
    out.push_str(&format!("pattern {}\n", b64_encode(tok.pattern().as_bytes())));
    match tok.spm() {
        None => {
            let toks = tok.mergeable_tokens();
            out.push_str(&format!("tokens {}\n", toks.len()));
            for t in toks {
                out.push_str(&b64_encode(t));
                out.push('\n');
            }
            out.push_str(&format!("specials {}\n", tok.special_tokens().len()));
            for (s, id) in tok.special_tokens() {
                out.push_str(&format!("{id} {}\n", b64_encode(s.as_bytes())));
            }
        }
        Some(m) => {
            out.push_str(&format!("tokens {}\n", m.pieces.len()));
            for p in &m.pieces {
                out.push_str(&format!(
                    "{} {} {}\n",
                    b64_encode(p.piece.as_bytes()),
                    p.score,
                    p.kind as i32
                ));
            }
            out.push_str("specials 0\n");
        }
    }
    out.push_str(&format!("fingerprint {}\n", tok.fingerprint()));
    out
}

pub fn save(tok: &Tokenizer, path: impl AsRef<Path>) -> Result<()> {
    fsutil::write_atomic(path, to_string(tok).as_bytes())
}

pub fn load(path: impl AsRef<Path>) -> Result<Tokenizer> {
    let path = path.as_ref();
    parse(&read_text(path)?, path)
}

pub fn parse(text: &str, path: &Path) -> Result<Tokenizer> {
    let mut lines = text.lines().enumerate();
    let mut next = |what: &str| -> Result<(usize, &str)> {
        lines
            .next()
            .map(|(i, l)| (i + 1, l))
            .ok_or_else(|| Error::format(path, format!("truncated: expected {what}")))
    };
    let bad = |line: usize, what: String| Error::format(path, format!("line {line}: {what}"));
    let (_, magic) = next("the header")?;
    if magic != MAGIC {
        return Err(Error::format(
            path,
            format!("not a tokenmill tokenizer file (header {magic:.40?}, expected {MAGIC:?})"),
        ));
    }
    let (ln, kind) = next("`kind`")?;
    let spm_flags: Option<[bool; 3]> = match kind.split(' ').collect::<Vec<_>>().as_slice() {
        ["kind", "bytelevel"] => None,
        ["kind", "sentencepiece", a, b, c] => {
            let flag = |s: &str| match s {
                "0" => Ok(false),
                "1" => Ok(true),
                _ => Err(bad(ln, format!("flag {s:?} is not 0 or 1"))),
            };
            Some([flag(a)?, flag(b)?, flag(c)?])
        }
        _ => return Err(bad(ln, format!("expected `kind bytelevel|sentencepiece ...`, got {kind:.60?}"))),
    };
    let (ln, pat) = next("`pattern`")?;
    let pattern = pat
        .strip_prefix("pattern ")
        .or_else(|| (pat == "pattern").then_some(""))
        .and_then(b64_decode)
        .and_then(|b| String::from_utf8(b).ok())
        .ok_or_else(|| bad(ln, "expected `pattern <base64 UTF-8>`".into()))?;
    let count = |ln: usize, line: &str, key: &str| -> Result<usize> {
        line.strip_prefix(key)
            .and_then(|s| s.strip_prefix(' '))
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| bad(ln, format!("expected `{key} <count>`, got {line:.60?}")))
    };
    let (ln, l) = next("`tokens`")?;
    let n = count(ln, l, "tokens")?;
    let mut tokens = Vec::with_capacity(n.min(1 << 22));
    let mut pieces = Vec::new();
    for _ in 0..n {
        let (ln, l) = next("a token line")?;
        let mut f = l.split(' ');
        let tok = f
            .next()
            .and_then(b64_decode)
            .ok_or_else(|| bad(ln, "invalid base64 token".into()))?;
        if spm_flags.is_some() {
            let score: f32 = f
                .next()
                .and_then(|s| s.parse().ok())
                .ok_or_else(|| bad(ln, "expected a score".into()))?;
            let kind = f
                .next()
                .and_then(|s| s.parse().ok())
                .and_then(PieceType::from_i32)
                .ok_or_else(|| bad(ln, "expected a piece type 1..6".into()))?;
            let piece = String::from_utf8(tok).map_err(|_| bad(ln, "piece is not UTF-8".into()))?;
            pieces.push(SpPiece { piece, score, kind });
        } else {
            tokens.push(tok);
        }
        if f.next().is_some() {
            return Err(bad(ln, "trailing fields".into()));
        }
    }
    let (ln, l) = next("`specials`")?;
    let m = count(ln, l, "specials")?;
    let mut specials = Vec::with_capacity(m.min(1 << 20));
    for _ in 0..m {
        let (ln, l) = next("a special token line")?;
        let (id, s) = l
            .split_once(' ')
            .and_then(|(id, s)| Some((id.parse::<u32>().ok()?, String::from_utf8(b64_decode(s)?).ok()?)))
            .ok_or_else(|| bad(ln, "expected `<id> <base64 UTF-8 text>`".into()))?;
        specials.push((s, id));
    }
    let (ln, l) = next("`fingerprint`")?;
    let fp = l
        .strip_prefix("fingerprint ")
        .ok_or_else(|| bad(ln, "expected `fingerprint <hash>`".into()))?;
    let tok = match spm_flags {
        None => Tokenizer::from_ranks(tokens, &pattern, specials),
        Some([a, b, c]) => SpModel::new(pieces, a, b, c)
            .map_err(Error::invalid)
            .and_then(Tokenizer::from_sentencepiece),
    }
    .map_err(|e| Error::format(path, e.to_string()))?;
    if tok.fingerprint() != fp {
        return Err(Error::format(
            path,
            format!("fingerprint mismatch (file says {fp}, contents give {}): the file was modified or corrupted", tok.fingerprint()),
        ));
    }
    Ok(tok)
}
