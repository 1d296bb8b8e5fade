//! Hugging Face `tokenizer.json`, two kinds of BPE model, one file each.
//!
//! Byte-level BPE (`byte_level.rs`): GPT-2 and LLaMA-3 style.
//!
//! SentencePiece-style BPE (`sentencepiece.rs`): `byte_fallback: true`, as LLaMA-1/2, Mistral-7B and
//! TinyLlama ship it.
//!
//! In both, added tokens become special tokens (HF matches every added token in the text, which is
//! `encode(text, allowed_special="all")` here). The post-processor is not applied (BOS is the
//! caller's: `bos_token_id`). `save` writes these forms back; a SentencePiece `.model` is written
//! as the legacy form (see `sentencepiece::as_hf`).

mod byte_level;
mod sentencepiece;

pub use byte_level::{byte_to_char, BYTELEVEL_REGEX};

use super::read_text;
use crate::bpe::Tokenizer;
use crate::{fsutil, Error, Result};
use serde_json::Value;
use std::path::Path;

pub fn load(path: impl AsRef<Path>) -> Result<Tokenizer> {
    let path = path.as_ref();
    let v: Value = serde_json::from_str(&read_text(path)?)
        .map_err(|e| Error::format(path, format!("invalid JSON: {e}")))?;
    from_json(&v).map_err(|m| Error::format(path, m))
}

pub fn from_json(v: &Value) -> std::result::Result<Tokenizer, String> {
    let model = v.get("model").ok_or("no \"model\" object")?;
    if !matches!(
        model.get("type").and_then(Value::as_str),
        Some("BPE") | None
    ) {
        return Err(format!(
            "model type {:?} is not supported; only BPE is",
            type_of(model)
        ));
    }
    if get_bool(model, "byte_fallback", false)? {
        sentencepiece::from_json(v, model)
    } else {
        byte_level::from_json(v, model)
    }
}

pub fn to_json(tok: &Tokenizer) -> Result<Value> {
    match tok.spm() {
        Some(m) => sentencepiece::to_json(m),
        None => byte_level::to_json(tok),
    }
}

pub fn save(tok: &Tokenizer, path: impl AsRef<Path>) -> Result<()> {
    let v = to_json(tok)?;
    let text =
        serde_json::to_string_pretty(&v).map_err(|e| Error::invalid(format!("JSON: {e}")))?;
    fsutil::write_atomic(path, text.as_bytes())
}

pub(super) fn get_bool(o: &Value, key: &str, default: bool) -> std::result::Result<bool, String> {
    match o.get(key) {
        None | Some(Value::Null) => Ok(default),
        Some(Value::Bool(b)) => Ok(*b),
        Some(x) => Err(format!("{key} must be a boolean, got {x:.40}")),
    }
}

pub(super) fn added_tokens(v: &Value) -> impl Iterator<Item = (usize, &Value)> {
    v.get("added_tokens")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .enumerate()
}

/// (content, id) of the `i`-th added token; the matching options we do not implement are refused.
pub(super) fn added_token(a: &Value, i: usize) -> std::result::Result<(&str, u32), String> {
    let content = a
        .get("content")
        .and_then(Value::as_str)
        .ok_or(format!("added token {i} has no content"))?;
    let id = a
        .get("id")
        .and_then(Value::as_u64)
        .and_then(|x| u32::try_from(x).ok())
        .ok_or(format!("added token {content:?} has no valid id"))?;
    for key in ["lstrip", "rstrip", "single_word"] {
        if get_bool(a, key, false)? {
            return Err(format!(
                "added token {content:?}: {key}=true is not supported"
            ));
        }
    }
    Ok((content, id))
}

pub(super) fn type_of(o: &Value) -> &str {
    o.get("type").and_then(Value::as_str).unwrap_or("")
}

pub(super) fn parse_merges(
    model: &Value,
    id: impl Fn(&str) -> Option<u32>,
) -> std::result::Result<Vec<(u32, u32)>, String> {
    let mut merges = Vec::new();
    for (i, m) in model
        .get("merges")
        .and_then(Value::as_array)
        .ok_or("model has no merges list")?
        .iter()
        .enumerate()
    {
        let (a, b) = match m {
            Value::String(s) => s
                .split_once(' ')
                .ok_or(format!("merge {i} {s:?} is not `left right`"))?,
            Value::Array(p) if p.len() == 2 => (
                p[0].as_str()
                    .ok_or(format!("merge {i} is not two strings"))?,
                p[1].as_str()
                    .ok_or(format!("merge {i} is not two strings"))?,
            ),
            _ => return Err(format!("merge {i} is neither \"a b\" nor [a, b]")),
        };
        let id = |t: &str| id(t).ok_or(format!("merge {i} uses {t:?}, which is not in the vocab"));
        merges.push((id(a)?, id(b)?));
    }
    Ok(merges)
}
