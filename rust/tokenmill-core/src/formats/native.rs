//! tokenmill's own tokenizer file: line-oriented UTF-8 text, bytes in base64, ending with the
//! fingerprint so that a corrupted or edited file is detected on load.
//!
//! ```text
//! tokenmill-tokenizer 1
//! kind bytelevel <ignore_merges 0|1> <add_prefix_space 0|1>
//!   (or: kind sentencepiece <add_dummy_prefix> <remove_extra_whitespaces> <byte_fallback>,
//!    or from a tokenizer.json: kind sentencepiece-hf <prepend 0-3> <ignore_merges> <fuse_unk>
//!    <strip_space> <decode_bytes> <byte_fallback> <unk id|-> <n_model>)
//! pattern <base64 of the pattern>
//! tokens <n>
//! <id> <base64 token>            (n lines; sentencepiece: `<id> <base64 piece> <score> <type>`)
//! merges <k>|none                (explicit merge list, `<left id> <right id>` per line; also
//!                                 sentencepiece-hf)
//! specials <m>
//! <id> <base64 text>             (m lines; sentencepiece models derive theirs from the pieces)
//! fingerprint <fingerprint>
//! ```

use super::{b64_decode, b64_encode, read_text};
use crate::bpe::spm::{HfRules, PieceType, Prepend, SpModel, SpPiece};
use crate::bpe::{BpeOptions, Tokenizer};
use crate::{fsutil, Error, Result};
use std::fmt::Write;
use std::path::Path;

const MAGIC: &str = "tokenmill-tokenizer 1";

pub fn to_string(tok: &Tokenizer) -> String {
    let mut out = String::new();
    let o = tok.options();
    let _ = writeln!(out, "{MAGIC}");
    match tok.spm() {
        None => {
            let _ = writeln!(
                out,
                "kind bytelevel {} {}",
                o.ignore_merges as u8, o.add_prefix_space as u8
            );
        }
        Some(m) => match m.hf() {
            None => {
                let _ = writeln!(
                    out,
                    "kind sentencepiece {} {} {}",
                    m.add_dummy_prefix as u8,
                    m.remove_extra_whitespaces as u8,
                    m.byte_fallback as u8
                );
            }
            Some(h) => {
                let _ = writeln!(
                    out,
                    "kind sentencepiece-hf {} {} {} {} {} {} {} {}",
                    h.prepend as u8,
                    h.ignore_merges as u8,
                    h.fuse_unk as u8,
                    h.strip_space as u8,
                    h.decode_bytes as u8,
                    m.byte_fallback as u8,
                    h.unk.map_or("-".to_string(), |u| u.to_string()),
                    h.n_model
                );
            }
        },
    }
    let _ = writeln!(out, "pattern {}", b64_encode(tok.pattern().as_bytes()));
    match tok.spm() {
        None => {
            let toks = tok.mergeable_tokens();
            let _ = writeln!(out, "tokens {}", toks.len());
            for (id, t) in toks {
                let _ = writeln!(out, "{id} {}", b64_encode(t));
            }
            match &o.merges {
                None => out.push_str("merges none\n"),
                Some(m) => {
                    let _ = writeln!(out, "merges {}", m.len());
                    for (a, b) in m {
                        let _ = writeln!(out, "{a} {b}");
                    }
                }
            }
            let _ = writeln!(out, "specials {}", tok.special_tokens().len());
            for (s, id) in tok.special_tokens() {
                let _ = writeln!(out, "{id} {}", b64_encode(s.as_bytes()));
            }
        }
        Some(m) => {
            let _ = writeln!(out, "tokens {}", m.pieces.len());
            for (id, p) in m.pieces.iter().enumerate() {
                let _ = writeln!(
                    out,
                    "{id} {} {} {}",
                    b64_encode(p.piece.as_bytes()),
                    p.score,
                    p.kind as i32
                );
            }
            match m.hf() {
                None => out.push_str("merges none\n"),
                Some(h) => {
                    let _ = writeln!(out, "merges {}", h.merges.len());
                    for (a, b) in &h.merges {
                        let _ = writeln!(out, "{a} {b}");
                    }
                }
            }
            out.push_str("specials 0\n");
        }
    }
    let _ = writeln!(out, "fingerprint {}", tok.fingerprint());
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
    let flag = |ln: usize, s: &str| match s {
        "0" => Ok(false),
        "1" => Ok(true),
        _ => Err(bad(ln, format!("flag {s:.20?} is not 0 or 1"))),
    };
    let (ln, kind) = next("`kind`")?;
    let mut hf = None;
    let (sp, flags) = match kind.split(' ').collect::<Vec<_>>().as_slice() {
        ["kind", "bytelevel", a, b] => (false, [flag(ln, a)?, flag(ln, b)?, false]),
        ["kind", "sentencepiece", a, b, c] => (true, [flag(ln, a)?, flag(ln, b)?, flag(ln, c)?]),
        ["kind", "sentencepiece-hf", pre, im, fu, st, db, bf, unk, n] => {
            let prepend = pre
                .parse()
                .ok()
                .and_then(Prepend::from_u8)
                .ok_or_else(|| bad(ln, format!("prepend {pre:.20?} is not 0..3")))?;
            let unk = match *unk {
                "-" => None,
                u => Some(u.parse().map_err(|_| bad(ln, format!("unk id {u:.20?}")))?),
            };
            let n_model = n
                .parse()
                .map_err(|_| bad(ln, format!("vocab size {n:.20?}")))?;
            let f = |s: &str| flag(ln, s);
            hf = Some(HfRules::new(
                Vec::new(),
                prepend,
                f(im)?,
                f(fu)?,
                unk,
                n_model,
                f(st)?,
                f(db)?,
            ));
            (true, [false, false, f(bf)?])
        }
        _ => {
            return Err(bad(
                ln,
                format!("expected `kind bytelevel|sentencepiece <flags>`, got {kind:.60?}"),
            ))
        }
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
        let id: u32 = f
            .next()
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| bad(ln, "expected a token id".into()))?;
        let tok = f
            .next()
            .and_then(b64_decode)
            .ok_or_else(|| bad(ln, "invalid base64 token".into()))?;
        if sp {
            if id as usize != pieces.len() {
                return Err(bad(ln, format!("piece id {id} out of order")));
            }
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
            tokens.push((id, tok));
        }
        if f.next().is_some() {
            return Err(bad(ln, "trailing fields".into()));
        }
    }
    let (ln, l) = next("`merges`")?;
    let merges = if l == "merges none" {
        None
    } else {
        let k = count(ln, l, "merges")?;
        let mut m = Vec::with_capacity(k.min(1 << 22));
        for _ in 0..k {
            let (ln, l) = next("a merge line")?;
            let pair = l
                .split_once(' ')
                .and_then(|(a, b)| Some((a.parse::<u32>().ok()?, b.parse::<u32>().ok()?)))
                .ok_or_else(|| bad(ln, "expected `<left id> <right id>`".into()))?;
            m.push(pair);
        }
        Some(m)
    };
    let (ln, l) = next("`specials`")?;
    let m = count(ln, l, "specials")?;
    let mut specials = Vec::with_capacity(m.min(1 << 20));
    for _ in 0..m {
        let (ln, l) = next("a special token line")?;
        let (id, s) = l
            .split_once(' ')
            .and_then(|(id, s)| {
                Some((
                    id.parse::<u32>().ok()?,
                    String::from_utf8(b64_decode(s)?).ok()?,
                ))
            })
            .ok_or_else(|| bad(ln, "expected `<id> <base64 UTF-8 text>`".into()))?;
        specials.push((s, id));
    }
    let (ln, l) = next("`fingerprint`")?;
    let fp = l
        .strip_prefix("fingerprint ")
        .ok_or_else(|| bad(ln, "expected `fingerprint <hash>`".into()))?;
    if let Some((ln, _)) = lines.next() {
        return Err(bad(
            ln + 1,
            "unexpected content after the fingerprint".into(),
        ));
    }
    let tok = if sp {
        match hf {
            None => SpModel::new(pieces, flags[0], flags[1], flags[2]),
            Some(mut h) => {
                h.merges = merges.unwrap_or_default();
                SpModel::new_hf(pieces, flags[2], h)
            }
        }
        .map_err(Error::invalid)
        .and_then(Tokenizer::from_sentencepiece)
    } else {
        let options = BpeOptions {
            merges,
            ignore_merges: flags[0],
            add_prefix_space: flags[1],
        };
        Tokenizer::from_vocab(tokens, &pattern, specials, options)
    }
    .map_err(|e| Error::format(path, e.to_string()))?;
    if tok.fingerprint() != fp {
        return Err(Error::format(
            path,
            format!(
                "fingerprint mismatch (file says {fp:.60}, contents give {}): the file was modified or corrupted",
                tok.fingerprint()
            ),
        ));
    }
    Ok(tok)
}
