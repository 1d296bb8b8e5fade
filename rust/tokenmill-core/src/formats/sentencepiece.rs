//! SentencePiece `.model` files (a ModelProto protobuf), parsed by hand: pieces (1), trainer_spec (2:
//! model_type 3, treat_whitespace_as_suffix 24, byte_fallback 35), normalizer_spec (3: name 1,
//! precompiled_charsmap 2, add_dummy_prefix 3, remove_extra_whitespaces 4, escape_whitespaces 5).
//! Only BPE models with the identity normalizer are accepted (LLaMA-1/2); anything else is an
//! `Error::Format` saying what is unsupported.

use super::read_file;
use crate::bpe::spm::{PieceType, SpModel, SpPiece};
use crate::bpe::Tokenizer;
use crate::{Error, Result};
use std::path::Path;

pub fn load(path: impl AsRef<Path>) -> Result<Tokenizer> {
    let path = path.as_ref();
    let model = parse(&read_file(path)?).map_err(|m| Error::format(path, m))?;
    Tokenizer::from_sentencepiece(model).map_err(|e| Error::format(path, e.to_string()))
}

enum Value<'a> {
    Varint(u64),
    Fixed32(u32),
    Fixed64,
    Bytes(&'a [u8]),
}

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn varint(&mut self) -> std::result::Result<u64, String> {
        let mut v = 0u64;
        for shift in (0..70).step_by(7) {
            let b = *self
                .buf
                .get(self.pos)
                .ok_or_else(|| format!("truncated varint at byte {}", self.pos))?;
            self.pos += 1;
            if shift == 63 && b > 1 {
                return Err(format!("varint overflow at byte {}", self.pos));
            }
            v |= ((b & 0x7f) as u64) << shift;
            if b < 0x80 {
                return Ok(v);
            }
        }
        Err(format!("varint too long at byte {}", self.pos))
    }

    fn take(&mut self, n: usize) -> std::result::Result<&'a [u8], String> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.buf.len())
            .ok_or_else(|| {
                format!(
                    "truncated: field of {n} bytes at byte {} runs past the end",
                    self.pos
                )
            })?;
        let s = &self.buf[self.pos..end];
        self.pos = end;
        Ok(s)
    }

    /// The next (field number, value), or None at the end.
    fn field(&mut self) -> std::result::Result<Option<(u64, Value<'a>)>, String> {
        if self.pos >= self.buf.len() {
            return Ok(None);
        }
        let key = self.varint()?;
        let (num, wire) = (key >> 3, key & 7);
        if num == 0 {
            return Err(format!("invalid field number 0 at byte {}", self.pos));
        }
        let v = match wire {
            0 => Value::Varint(self.varint()?),
            1 => {
                self.take(8)?;
                Value::Fixed64
            }
            2 => {
                let n = self.varint()?;
                Value::Bytes(self.take(usize::try_from(n).map_err(|_| "length overflow")?)?)
            }
            5 => {
                let b = self.take(4)?;
                Value::Fixed32(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            }
            w => {
                return Err(format!(
                    "unsupported protobuf wire type {w} (field {num}) at byte {}",
                    self.pos
                ))
            }
        };
        Ok(Some((num, v)))
    }
}

fn fields(buf: &[u8]) -> Reader<'_> {
    Reader { buf, pos: 0 }
}

pub fn parse(buf: &[u8]) -> std::result::Result<SpModel, String> {
    let mut pieces = Vec::new();
    let mut model_type = 1u64; // UNIGRAM is protobuf's default
    let (mut byte_fallback, mut ws_suffix) = (false, false);
    let (mut norm_name, mut charsmap_len) = (String::new(), 0usize);
    let (mut dummy, mut extra, mut escape) = (true, true, true);
    let mut r = fields(buf);
    while let Some((num, v)) = r.field()? {
        match (num, v) {
            (1, Value::Bytes(b)) => {
                let (mut piece, mut score, mut kind) = (None, 0f32, PieceType::Normal);
                let mut p = fields(b);
                while let Some((n, v)) = p.field()? {
                    match (n, v) {
                        (1, Value::Bytes(s)) => {
                            piece = Some(
                                String::from_utf8(s.to_vec())
                                    .map_err(|_| format!("piece {} is not UTF-8", pieces.len()))?,
                            )
                        }
                        (2, Value::Fixed32(f)) => score = f32::from_bits(f),
                        (3, Value::Varint(t)) => {
                            kind = i32::try_from(t)
                                .ok()
                                .and_then(PieceType::from_i32)
                                .ok_or_else(|| {
                                    format!("piece {} has unknown type {t}", pieces.len())
                                })?
                        }
                        (1..=3, _) => {
                            return Err(format!(
                                "piece {} has a field of the wrong wire type",
                                pieces.len()
                            ))
                        }
                        _ => {}
                    }
                }
                let piece = piece.ok_or_else(|| format!("piece {} has no text", pieces.len()))?;
                pieces.push(SpPiece { piece, score, kind });
            }
            (2, Value::Bytes(b)) => {
                let mut t = fields(b);
                while let Some((n, v)) = t.field()? {
                    match (n, v) {
                        (3, Value::Varint(x)) => model_type = x,
                        (24, Value::Varint(x)) => ws_suffix = x != 0,
                        (35, Value::Varint(x)) => byte_fallback = x != 0,
                        _ => {}
                    }
                }
            }
            (3, Value::Bytes(b)) => {
                let mut t = fields(b);
                while let Some((n, v)) = t.field()? {
                    match (n, v) {
                        (1, Value::Bytes(s)) => norm_name = String::from_utf8_lossy(s).into_owned(),
                        (2, Value::Bytes(s)) => charsmap_len = s.len(),
                        (3, Value::Varint(x)) => dummy = x != 0,
                        (4, Value::Varint(x)) => extra = x != 0,
                        (5, Value::Varint(x)) => escape = x != 0,
                        _ => {}
                    }
                }
            }
            (1..=3, _) => {
                return Err(format!(
                    "top-level field {num} has the wrong wire type; not a SentencePiece model"
                ))
            }
            _ => {}
        }
    }
    if pieces.is_empty() {
        return Err("no pieces; not a SentencePiece model".into());
    }
    if model_type != 2 {
        let name = match model_type {
            1 => "UNIGRAM",
            3 => "WORD",
            4 => "CHAR",
            _ => "unknown",
        };
        return Err(format!(
            "model type {name} ({model_type}) is not supported; only BPE models are"
        ));
    }
    if charsmap_len > 0 || !(norm_name.is_empty() || norm_name == "identity") {
        return Err(format!(
            "normalizer {norm_name:?} is not supported; only the identity normalizer (LLaMA-1/2) is \
             (train with normalization_rule_name=identity)"
        ));
    }
    if ws_suffix {
        return Err("treat_whitespace_as_suffix is not supported".into());
    }
    if !escape {
        return Err("escape_whitespaces=false is not supported".into());
    }
    SpModel::new(pieces, dummy, extra, byte_fallback)
}
