//! Hugging Face `tokenizer.json`, two kinds of BPE model.
//!
//! Byte-level BPE: pre-tokenizer ByteLevel (GPT-2 regex) or Sequence[Split(regex, Isolated),
//! ByteLevel(use_regex=false)] (LLaMA-3), no normalizer.
//!
//! SentencePiece-style BPE (`byte_fallback: true`: LLaMA-1/2, Mistral-7B, TinyLlama and their
//! fine-tunes): `▁` for spaces, `<0xNN>` byte tokens, optional unk token (fuse_unk), and either the
//! legacy converter's normalizer Sequence[Prepend("▁"), Replace(" ", "▁")] (or just the Replace)
//! with no pre-tokenizer, or no normalizer and pre-tokenizer Metaspace("▁", prepend_scheme
//! always|first|never, split=false); decoder Sequence[Replace("▁", " "), ByteFallback, Fuse,
//! Strip(" ", 1, 0)?] or Metaspace. Loaded into the SentencePiece machinery ([`SpModel`]) with
//! `tokenizers`' rules ([`HfRules`]): merges by rank in the file, Metaspace's prefix rules, byte
//! fallback per character. Differences from sentencepiece on the same model, followed as
//! `tokenizers` has them: Metaspace puts no `▁` before a text that starts with " " or "▁" ("first":
//! nor before the text after a special token); decoding drops special tokens (including `<unk>`).
//! Anything else (other normalizers, split=true, dropout, ...) is an error naming the part.
//!
//! In both, added tokens become special tokens (HF matches every added token in the text, which is
//! `encode(text, allowed_special="all")` here). The post-processor is not applied (BOS is the
//! caller's: `bos_token_id`). `save` writes these forms back; a SentencePiece `.model` is written
//! as the legacy form (see [`sentencepiece_as_hf`]).

use super::read_text;
use crate::bpe::spm::{parse_byte_piece, HfRules, PieceType, Prepend, SpModel, SpPiece, SPACE};
use crate::bpe::{BpeOptions, Tokenizer};

use crate::{fsutil, Error, Result};
use rustc_hash::FxHashMap;
use serde_json::{json, Map, Value};
use std::path::Path;

/// The regex of HF's ByteLevel pre-tokenizer with `use_regex: true`.
pub const BYTELEVEL_REGEX: &str =
    r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+";

/// GPT-2's bytes_to_unicode: printable bytes map to themselves, the others to U+0100...
pub fn byte_to_char() -> [char; 256] {
    let mut map = ['\0'; 256];
    let mut n = 0u32;
    for b in 0..256u32 {
        let printable = (b'!' as u32..=b'~' as u32).contains(&b)
            || (0xA1..=0xAC).contains(&b)
            || (0xAE..=0xFF).contains(&b);
        map[b as usize] = if printable {
            char::from_u32(b).unwrap_or('\0')
        } else {
            n += 1;
            char::from_u32(255 + n).unwrap_or('\0')
        };
    }
    map
}

fn encode_bytes(map: &[char; 256], b: &[u8]) -> String {
    b.iter().map(|&x| map[x as usize]).collect()
}

pub fn load(path: impl AsRef<Path>) -> Result<Tokenizer> {
    let path = path.as_ref();
    let v: Value = serde_json::from_str(&read_text(path)?)
        .map_err(|e| Error::format(path, format!("invalid JSON: {e}")))?;
    from_json(&v).map_err(|m| Error::format(path, m))
}

fn get_bool(o: &Value, key: &str, default: bool) -> std::result::Result<bool, String> {
    match o.get(key) {
        None | Some(Value::Null) => Ok(default),
        Some(Value::Bool(b)) => Ok(*b),
        Some(x) => Err(format!("{key} must be a boolean, got {x:.40}")),
    }
}

fn added_tokens(v: &Value) -> impl Iterator<Item = (usize, &Value)> {
    v.get("added_tokens")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .enumerate()
}

/// (content, id) of the `i`-th added token; the matching options we do not implement are refused.
fn added_token(a: &Value, i: usize) -> std::result::Result<(&str, u32), String> {
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

fn type_of(o: &Value) -> &str {
    o.get("type").and_then(Value::as_str).unwrap_or("")
}

/// (pattern, add_prefix_space) from the pre_tokenizer.
fn pre_tokenizer(p: &Value) -> std::result::Result<(String, bool), String> {
    let bytelevel = |b: &Value, want_regex: bool| -> std::result::Result<bool, String> {
        if get_bool(b, "use_regex", true)? != want_regex {
            return Err(format!(
                "ByteLevel pre-tokenizer with use_regex={} here is not supported",
                !want_regex
            ));
        }
        get_bool(b, "add_prefix_space", true)
    };
    match type_of(p) {
        "ByteLevel" => Ok((BYTELEVEL_REGEX.to_string(), bytelevel(p, true)?)),
        "Sequence" => {
            let items = p
                .get("pretokenizers")
                .and_then(Value::as_array)
                .ok_or("Sequence pre-tokenizer without a pretokenizers list")?;
            match items.as_slice() {
                [b] if type_of(b) == "ByteLevel" => Ok((BYTELEVEL_REGEX.to_string(), bytelevel(b, true)?)),
                [s, b] if type_of(s) == "Split" && type_of(b) == "ByteLevel" => {
                    let pat = s
                        .get("pattern")
                        .and_then(|p| p.get("Regex"))
                        .and_then(Value::as_str)
                        .ok_or("Split pre-tokenizer without a Regex pattern (String patterns are not supported)")?;
                    if s.get("behavior").and_then(Value::as_str) != Some("Isolated") || get_bool(s, "invert", false)? {
                        return Err("only Split with behavior Isolated and invert false is supported".into());
                    }
                    if bytelevel(b, false)? {
                        return Err("Split followed by ByteLevel with add_prefix_space=true is not supported".into());
                    }
                    Ok((pat.to_string(), false))
                }
                _ => Err("unsupported pre-tokenizer Sequence; expected [Split(Regex), ByteLevel] or [ByteLevel]".into()),
            }
        }
        t => Err(format!(
            "unsupported pre-tokenizer {t:?}; byte-level BPE needs ByteLevel"
        )),
    }
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
        return sentencepiece_from_json(v, model);
    }
    for key in ["continuing_subword_prefix", "end_of_word_suffix", "dropout"] {
        if !matches!(model.get(key), None | Some(Value::Null)) {
            return Err(format!("BPE option {key} is not supported"));
        }
    }
    if !matches!(v.get("normalizer"), None | Some(Value::Null)) {
        return Err(format!(
            "normalizer {:?} is not supported",
            type_of(&v["normalizer"])
        ));
    }
    let (pattern, add_prefix_space) =
        pre_tokenizer(v.get("pre_tokenizer").ok_or("no pre_tokenizer")?)?;
    let ignore_merges = get_bool(model, "ignore_merges", false)?;

    let mut specials: Vec<(String, u32)> = Vec::new();
    for (i, a) in added_tokens(v) {
        let (content, id) = added_token(a, i)?;
        specials.push((content.to_string(), id));
    }
    let special_ids: FxHashMap<u32, ()> = specials.iter().map(|(_, id)| (*id, ())).collect();

    let inverse: FxHashMap<char, u8> = byte_to_char()
        .iter()
        .enumerate()
        .map(|(b, &c)| (c, b as u8))
        .collect();
    let vocab = model
        .get("vocab")
        .and_then(Value::as_object)
        .ok_or("model has no vocab object")?;
    let mut tokens = Vec::with_capacity(vocab.len());
    let mut by_text: FxHashMap<&str, u32> = FxHashMap::default();
    for (text, id) in vocab {
        let id = id
            .as_u64()
            .and_then(|x| u32::try_from(x).ok())
            .filter(|&x| x < u32::MAX)
            .ok_or(format!("vocab entry {text:?} has no valid id"))?;
        by_text.insert(text, id);
        if special_ids.contains_key(&id) {
            continue; // the added token is the special; HF keeps a copy in the vocab
        }
        let bytes = text
            .chars()
            .map(|c| inverse.get(&c).copied())
            .collect::<Option<Vec<u8>>>()
            .ok_or(format!(
                "vocab entry {text:?} is not byte-level encoded (not a ByteLevel BPE model)"
            ))?;
        tokens.push((id, bytes));
    }
    let merges = parse_merges(model, |t| by_text.get(t).copied())?;
    let options = BpeOptions {
        merges: Some(merges),
        ignore_merges,
        add_prefix_space,
    };
    Tokenizer::from_vocab(tokens, &pattern, specials, options).map_err(|e| e.to_string())
}

fn replace_spec(o: &Value) -> Option<(&str, &str)> {
    let pat = o.get("pattern")?.get("String")?.as_str()?;
    Some((pat, o.get("content")?.as_str()?))
}

fn is_null(o: Option<&Value>) -> bool {
    matches!(o, None | Some(Value::Null))
}

/// A Sequence's items (`key` names the list), or the object itself if it is not a Sequence.
fn flatten<'a>(o: &'a Value, key: &str) -> Vec<&'a Value> {
    match o.get(key).and_then(Value::as_array) {
        Some(items) if type_of(o) == "Sequence" => items.iter().collect(),
        _ => vec![o],
    }
}

/// The `▁` placement of a SentencePiece-style file: the legacy normalizer or a Metaspace pre-tokenizer.
fn spm_prepend(v: &Value) -> std::result::Result<Prepend, String> {
    let norm = v.get("normalizer").filter(|n| !n.is_null());
    let pre = v.get("pre_tokenizer").filter(|n| !n.is_null());
    match (norm, pre) {
        (Some(n), None) => {
            let mut prepend = Prepend::Never;
            match flatten(n, "normalizers").as_slice() {
                [p, r] if type_of(p) == "Prepend" && type_of(r) == "Replace" => {
                    if p.get("prepend").and_then(Value::as_str) != Some(SPACE) {
                        return Err("normalizer Prepend must prepend \"▁\"".into());
                    }
                    prepend = Prepend::Normalizer;
                    check_space_replace(r, "normalizer")?;
                }
                [r] if type_of(r) == "Replace" => check_space_replace(r, "normalizer")?,
                _ => {
                    return Err(format!(
                        "normalizer {} is not supported; SentencePiece-style BPE needs Sequence[Prepend(\"▁\"), \
                         Replace(\" \", \"▁\")] (or a Metaspace pre-tokenizer and no normalizer)",
                        describe(n)
                    ))
                }
            }
            Ok(prepend)
        }
        (None, Some(p)) => match flatten(p, "pretokenizers").as_slice() {
            [m] if type_of(m) == "Metaspace" => {
                if m.get("replacement").and_then(Value::as_str) != Some(SPACE) {
                    return Err("Metaspace pre-tokenizer with a replacement other than \"▁\" is not supported".into());
                }
                if get_bool(m, "split", true)? {
                    return Err("Metaspace pre-tokenizer with split=true is not supported".into());
                }
                metaspace_scheme(m, "pre-tokenizer")
            }
            _ => Err(format!(
                "pre-tokenizer {} is not supported; SentencePiece-style BPE needs Metaspace(split=false) or none",
                describe(p)
            )),
        },
        (Some(n), Some(p)) => Err(format!(
            "normalizer {} together with pre-tokenizer {} is not supported",
            describe(n),
            describe(p)
        )),
        (None, None) => Err("no normalizer and no pre-tokenizer: where spaces become \"▁\" is unknown".into()),
    }
}

fn check_space_replace(r: &Value, what: &str) -> std::result::Result<(), String> {
    if replace_spec(r) != Some((" ", SPACE)) {
        return Err(format!(
            "{what} Replace must replace the string \" \" by \"▁\""
        ));
    }
    Ok(())
}

fn metaspace_scheme(m: &Value, what: &str) -> std::result::Result<Prepend, String> {
    match m.get("prepend_scheme").and_then(Value::as_str) {
        Some("always") => Ok(Prepend::Always),
        Some("first") => Ok(Prepend::First),
        Some("never") => Ok(Prepend::Never),
        None => Ok(if get_bool(m, "add_prefix_space", true)? {
            Prepend::Always
        } else {
            Prepend::Never
        }),
        Some(x) => Err(format!(
            "Metaspace {what} prepend_scheme {x:?} is not supported"
        )),
    }
}

/// A component for error messages: its type, or the types inside a Sequence.
fn describe(o: &Value) -> String {
    let items = flatten(o, "normalizers");
    let items = if items.len() == 1 {
        flatten(o, "pretokenizers")
    } else {
        items
    };
    let items = if items.len() == 1 {
        flatten(o, "decoders")
    } else {
        items
    };
    if type_of(o) == "Sequence" {
        let inner: Vec<&str> = items.iter().map(|i| type_of(i)).collect();
        format!("Sequence[{}]", inner.join(", "))
    } else {
        format!("{:?}", type_of(o))
    }
}

/// (strip one leading space, decode `<0xNN>` as bytes) from the decoder.
fn spm_decoder(d: Option<&Value>) -> std::result::Result<(bool, bool), String> {
    let d = d.filter(|d| !d.is_null()).ok_or(
        "decoder null is not supported; SentencePiece-style BPE needs Sequence[Replace(\"▁\", \" \"), ByteFallback, Fuse, Strip] or Metaspace",
    )?;
    if type_of(d) == "Metaspace" {
        if d.get("replacement").and_then(Value::as_str) != Some(SPACE) {
            return Err(
                "Metaspace decoder with a replacement other than \"▁\" is not supported".into(),
            );
        }
        return Ok((metaspace_scheme(d, "decoder")? != Prepend::Never, false));
    }
    let items = flatten(d, "decoders");
    let (head, strip) = match items.as_slice() {
        [head @ .., s] if type_of(s) == "Strip" => {
            let ok = s.get("content").and_then(Value::as_str) == Some(" ")
                && s.get("start").and_then(Value::as_u64) == Some(1)
                && s.get("stop").and_then(Value::as_u64) == Some(0);
            if !ok {
                return Err("only the decoder Strip(\" \", 1, 0) is supported".into());
            }
            (head, true)
        }
        all => (all, false),
    };
    match head {
        [r, b, f] if type_of(r) == "Replace" && type_of(b) == "ByteFallback" && type_of(f) == "Fuse" => {
            if replace_spec(r) != Some((SPACE, " ")) {
                return Err("decoder Replace must replace \"▁\" by \" \"".into());
            }
            Ok((strip, true))
        }
        _ => Err(format!(
            "decoder {} is not supported; SentencePiece-style BPE needs Sequence[Replace(\"▁\", \" \"), ByteFallback, Fuse, Strip] or Metaspace",
            describe(d)
        )),
    }
}

/// A SentencePiece-style BPE model (byte_fallback, `▁` for spaces) as transformers' LLaMA converters
/// write it; encoded with `tokenizers`' rules ([`HfRules`]).
fn sentencepiece_from_json(v: &Value, model: &Value) -> std::result::Result<Tokenizer, String> {
    if !is_null(model.get("dropout")) {
        return Err("BPE option dropout is not supported".into());
    }
    for key in ["continuing_subword_prefix", "end_of_word_suffix"] {
        if !matches!(model.get(key), None | Some(Value::Null)) && model[key] != "" {
            return Err(format!("BPE option {key} is not supported"));
        }
    }
    let prepend = spm_prepend(v)?;
    let (strip_space, decode_bytes) = spm_decoder(v.get("decoder"))?;
    let vocab = model
        .get("vocab")
        .and_then(Value::as_object)
        .ok_or("model has no vocab object")?;
    let mut texts: Vec<Option<&str>> = vec![None; vocab.len()];
    for (text, id) in vocab {
        let id = id
            .as_u64()
            .and_then(|x| usize::try_from(x).ok())
            .ok_or(format!("vocab entry {text:?} has no valid id"))?;
        match texts.get_mut(id) {
            Some(slot @ None) => *slot = Some(text),
            Some(Some(other)) => {
                return Err(format!(
                    "vocab entries {other:?} and {text:?} have the same id {id}"
                ))
            }
            None => {
                return Err(format!(
                    "vocab ids are not 0..{}: {text:?} has id {id}",
                    vocab.len()
                ))
            }
        }
    }
    let is_byte = |t: &str| parse_byte_piece(t).is_some_and(|b| t == format!("<0x{b:02X}>"));
    let mut pieces: Vec<SpPiece> = texts
        .iter()
        .map(|t| {
            let piece = t.unwrap_or_default().to_string();
            let kind = if is_byte(&piece) {
                PieceType::Byte
            } else {
                PieceType::Normal
            };
            SpPiece {
                piece,
                score: 0.0,
                kind,
            }
        })
        .collect();
    let n_model = pieces.len() as u32;
    let normalizer = v.get("normalizer").is_some_and(|n| !n.is_null());
    for (i, a) in added_tokens(v) {
        let (content, id) = added_token(a, i)?;
        let id = id as usize;
        // A normalized added token is matched after the normalizer ran, a different split of the text.
        if get_bool(a, "normalized", false)? && (normalizer || content.contains([' ', '\u{2581}']))
        {
            return Err(format!(
                "added token {content:?}: normalized=true is not supported with this normalizer"
            ));
        }
        let kind = if get_bool(a, "special", false)? {
            PieceType::Control
        } else {
            PieceType::UserDefined
        };
        if id < pieces.len() {
            if pieces[id].piece != content {
                return Err(format!(
                    "added token {content:?} has id {id}, which the vocab gives to {:?}",
                    pieces[id].piece
                ));
            }
            if id < n_model as usize && pieces[id].kind == PieceType::Byte {
                return Err(format!("added token {content:?} is a byte token"));
            }
            pieces[id].kind = kind;
        } else if id == pieces.len() {
            pieces.push(SpPiece {
                piece: content.to_string(),
                score: 0.0,
                kind,
            });
        } else {
            return Err(format!(
                "added token {content:?} has id {id}; ids must follow the vocab without gaps ({} next)",
                pieces.len()
            ));
        }
    }
    let index: FxHashMap<&str, u32> = texts
        .iter()
        .enumerate()
        .filter_map(|(i, t)| Some(((*t)?, i as u32)))
        .collect();
    let unk = match model.get("unk_token") {
        None | Some(Value::Null) => None,
        Some(Value::String(u)) => Some(
            *index
                .get(u.as_str())
                .ok_or(format!("unk_token {u:?} is not in the vocab"))?,
        ),
        Some(x) => return Err(format!("unk_token must be a string, got {x:.40}")),
    };
    let merges = parse_merges(model, |t| index.get(t).copied())?;
    let hf = HfRules::new(
        merges,
        prepend,
        get_bool(model, "ignore_merges", false)?,
        get_bool(model, "fuse_unk", false)?,
        unk,
        n_model,
        strip_space,
        decode_bytes,
    );
    let m = SpModel::new_hf(pieces, true, hf)?;
    Tokenizer::from_sentencepiece(m).map_err(|e| e.to_string())
}

fn parse_merges(
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

/// Rust regex `$` (end of text) is Oniguruma's `\z`; Oniguruma's `$` is end of line.
fn onig_pattern(p: &str) -> String {
    let (mut out, mut class, mut esc) = (String::with_capacity(p.len()), 0, false);
    for c in p.chars() {
        if esc {
            esc = false;
            out.push(c);
            continue;
        }
        match c {
            '\\' => esc = true,
            '[' => class += 1,
            ']' if class > 0 => class -= 1,
            '$' if class == 0 => {
                out.push_str(r"\z");
                continue;
            }
            _ => {}
        }
        out.push(c);
    }
    out
}

/// The SentencePiece-style tokenizer.json of a model loaded from one, as transformers writes it.
fn sentencepiece_to_json(m: &SpModel, h: &HfRules) -> Value {
    let text = |id: u32| m.pieces[id as usize].piece.as_str();
    let mut vocab = Map::new();
    for id in 0..h.n_model {
        vocab.insert(text(id).to_string(), json!(id));
    }
    let merges: Vec<Value> = h
        .merges
        .iter()
        .map(|&(a, b)| json!([text(a), text(b)]))
        .collect();
    let added: Vec<Value> = m
        .pieces
        .iter()
        .enumerate()
        .filter(|(_, p)| matches!(p.kind, PieceType::Control | PieceType::UserDefined))
        .map(|(id, p)| {
            json!({"id": id, "content": p.piece, "single_word": false, "lstrip": false, "rstrip": false,
                   "normalized": false, "special": p.kind == PieceType::Control})
        })
        .collect();
    let replace = |from: &str, to: &str| json!({"type": "Replace", "pattern": {"String": from}, "content": to});
    let metaspace = |scheme: &str| json!({"type": "Metaspace", "replacement": SPACE, "prepend_scheme": scheme, "split": false});
    let (normalizer, pre) = match h.prepend {
        Prepend::Normalizer => (
            json!({"type": "Sequence", "normalizers": [
                {"type": "Prepend", "prepend": SPACE}, replace(" ", SPACE)]}),
            Value::Null,
        ),
        Prepend::Never => (Value::Null, metaspace("never")),
        Prepend::Always => (Value::Null, metaspace("always")),
        Prepend::First => (Value::Null, metaspace("first")),
    };
    let decoder = if h.decode_bytes {
        let mut d = vec![
            replace(SPACE, " "),
            json!({"type": "ByteFallback"}),
            json!({"type": "Fuse"}),
        ];
        if h.strip_space {
            d.push(json!({"type": "Strip", "content": " ", "start": 1, "stop": 0}));
        }
        json!({"type": "Sequence", "decoders": d})
    } else {
        metaspace(if h.strip_space { "always" } else { "never" })
    };
    json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": normalizer,
        "pre_tokenizer": pre,
        "post_processor": null,
        "decoder": decoder,
        "model": {
            "type": "BPE", "dropout": null, "unk_token": h.unk.map(text),
            "continuing_subword_prefix": null, "end_of_word_suffix": null, "fuse_unk": h.fuse_unk,
            "byte_fallback": m.byte_fallback, "ignore_merges": h.ignore_merges, "vocab": vocab,
            "merges": merges
        }
    })
}

/// A `.model` as the legacy LLaMA tokenizer.json: merges are every split of a piece into two pieces,
/// by score (highest first), a piece's splits by the length of their left part (as transformers
/// orders them). `tokenizers` then encodes as sentencepiece does where sentencepiece never has two
/// splits of one piece as overlapping candidates at once (e.g. `[ab][a][ba]` for `aba`). No text
/// reaching that was found: all texts of up to 9 letters over {a, b} on 3000 random BPE-grown
/// vocabularies, up to 7 over {a, b, c} on 3000 random ones (a Python model of both rules), and all
/// 2M texts of up to 8 characters over "eradt " on a trained 1200-piece model (the real libraries). Refused:
/// what the legacy form cannot express (removal of extra spaces, user-defined pieces, no byte
/// fallback, equal scores, which sentencepiece breaks by position and `tokenizers` by rank).
fn sentencepiece_as_hf(m: &SpModel) -> std::result::Result<SpModel, String> {
    if !m.byte_fallback {
        return Err("it has no byte fallback".into());
    }
    if m.remove_extra_whitespaces {
        return Err("remove_extra_whitespaces=true has no tokenizers equivalent here".into());
    }
    let mut pieces = m.pieces.clone();
    let mut normal: FxHashMap<&str, u32> = FxHashMap::default();
    for (i, p) in m.pieces.iter().enumerate() {
        match p.kind {
            PieceType::Normal => {
                normal.insert(&p.piece, i as u32);
            }
            PieceType::Control | PieceType::Unknown => pieces[i].kind = PieceType::Control,
            PieceType::Byte => {}
            k => return Err(format!("piece {:?} has type {k:?}", p.piece)),
        }
    }
    let mut seen: FxHashMap<u32, &str> = FxHashMap::default();
    let mut merges: Vec<(f32, u32, usize, u32, u32)> = Vec::new();
    for (&piece, &id) in &normal {
        let score = m.pieces[id as usize].score;
        if let Some(c) = piece
            .chars()
            .find(|c| !normal.contains_key(c.encode_utf8(&mut [0; 4]) as &str))
        {
            return Err(format!(
                "piece {piece:?} has the character {c:?}, which is not a piece"
            ));
        }
        if piece.chars().nth(1).is_none() {
            continue;
        }
        if let Some(other) = seen.insert(score.to_bits(), piece) {
            return Err(format!(
                "pieces {other:?} and {piece:?} have the same score {score}"
            ));
        }
        for (k, _) in piece.char_indices().skip(1) {
            if let (Some(&a), Some(&b)) = (normal.get(&piece[..k]), normal.get(&piece[k..])) {
                merges.push((score, id, k, a, b));
            }
        }
    }
    merges.sort_by(|x, y| y.0.total_cmp(&x.0).then((x.1, x.2).cmp(&(y.1, y.2))));
    let unk = Some(m.unk_id());
    let rules = HfRules::new(
        merges.iter().map(|x| (x.3, x.4)).collect(),
        if m.add_dummy_prefix {
            Prepend::Normalizer
        } else {
            Prepend::Never
        },
        false,
        true,
        unk,
        pieces.len() as u32,
        m.add_dummy_prefix,
        true,
    );
    SpModel::new_hf(pieces, true, rules)
}

pub fn to_json(tok: &Tokenizer) -> Result<Value> {
    if let Some(m) = tok.spm() {
        return match m.hf() {
            Some(h) => Ok(sentencepiece_to_json(m, h)),
            None => {
                let hf = sentencepiece_as_hf(m).map_err(|e| {
                    Error::invalid(format!(
                        "this SentencePiece model cannot be saved as tokenizer.json: {e}"
                    ))
                })?;
                let rules = hf
                    .hf()
                    .ok_or_else(|| Error::invalid("no tokenizers rules"))?;
                Ok(sentencepiece_to_json(&hf, rules))
            }
        };
    }
    let map = byte_to_char();
    let toks = tok.mergeable_tokens();
    let text_of: FxHashMap<u32, String> = toks
        .iter()
        .map(|(id, b)| (*id, encode_bytes(&map, b)))
        .collect();
    let mut vocab = Map::new();
    for (id, _) in &toks {
        vocab.insert(text_of[id].clone(), json!(id));
    }
    // `tokenizers` gives an added token the id its content has in the model vocab (else a new one),
    // so the specials must be there too, unencoded, as its trainer writes them.
    for (s, id) in tok.special_tokens() {
        vocab.entry(s.clone()).or_insert(json!(id));
    }
    let o = tok.options();
    let merges: Vec<Value> = match &o.merges {
        Some(m) => m
            .iter()
            .map(|(a, b)| json!([text_of[a], text_of[b]]))
            .collect(),
        None => {
            // tiktoken semantics: every split of a token whose halves are tokens is a merge, in
            // token-id order (ties: the halves' ids), as transformers' TikTokenConverter writes them.
            let ids: FxHashMap<&[u8], u32> = toks.iter().map(|(id, b)| (*b, *id)).collect();
            let mut out = Vec::new();
            for (_, t) in &toks {
                let mut local: Vec<(u32, u32)> = (1..t.len())
                    .filter_map(|k| Some((*ids.get(&t[..k])?, *ids.get(&t[k..])?)))
                    .collect();
                local.sort();
                out.extend(
                    local
                        .into_iter()
                        .map(|(a, b)| json!([text_of[&a], text_of[&b]])),
                );
            }
            out
        }
    };
    let added: Vec<Value> = tok
        .special_tokens()
        .iter()
        .map(|(s, id)| {
            json!({"id": id, "content": s, "single_word": false, "lstrip": false, "rstrip": false,
                   "normalized": false, "special": true})
        })
        .collect();
    let pattern = match tok.pattern() {
        p if p == BYTELEVEL_REGEX => None,
        p => Some(onig_pattern(&crate::pretokenize::without_possessives(p))),
    };
    let pre = match pattern {
        None => {
            json!({"type": "ByteLevel", "add_prefix_space": o.add_prefix_space, "trim_offsets": true, "use_regex": true})
        }
        Some(p) if !o.add_prefix_space => json!({"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": p}, "behavior": "Isolated", "invert": false},
            {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": false}]}),
        Some(_) => {
            return Err(Error::invalid(
                "add_prefix_space with a custom pattern cannot be expressed in tokenizer.json",
            ))
        }
    };
    Ok(json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": pre,
        "post_processor": null,
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {
            "type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
            "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
            "ignore_merges": o.ignore_merges, "vocab": vocab, "merges": merges
        }
    }))
}

pub fn save(tok: &Tokenizer, path: impl AsRef<Path>) -> Result<()> {
    let v = to_json(tok)?;
    let text =
        serde_json::to_string_pretty(&v).map_err(|e| Error::invalid(format!("JSON: {e}")))?;
    fsutil::write_atomic(path, text.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A SentencePiece-style file: specials 0-2, then the byte tokens of `bytes`, then `pieces`.
    fn spm_json(bytes: std::ops::Range<u32>, pieces: &[&str], merges: &[(&str, &str)]) -> Value {
        let mut vocab = Map::new();
        for (i, s) in ["<unk>", "<s>", "</s>"].iter().enumerate() {
            vocab.insert(s.to_string(), json!(i));
        }
        for b in bytes {
            vocab.insert(format!("<0x{b:02X}>"), json!(vocab.len()));
        }
        for p in pieces {
            vocab.insert(p.to_string(), json!(vocab.len()));
        }
        let added: Vec<Value> = ["<unk>", "<s>", "</s>"]
            .iter()
            .enumerate()
            .map(|(i, s)| json!({"id": i, "content": s, "normalized": false, "special": true}))
            .collect();
        json!({
            "added_tokens": added,
            "normalizer": {"type": "Sequence", "normalizers": [
                {"type": "Prepend", "prepend": SPACE},
                {"type": "Replace", "pattern": {"String": " "}, "content": SPACE}]},
            "pre_tokenizer": null,
            "decoder": {"type": "Sequence", "decoders": [
                {"type": "Replace", "pattern": {"String": SPACE}, "content": " "},
                {"type": "ByteFallback"}, {"type": "Fuse"},
                {"type": "Strip", "content": " ", "start": 1, "stop": 0}]},
            "model": {"type": "BPE", "unk_token": "<unk>", "fuse_unk": true, "byte_fallback": true,
                      "vocab": vocab, "merges": merges.iter().map(|(a, b)| json!([a, b])).collect::<Vec<_>>()}
        })
    }

    fn pieces(t: &Tokenizer, ids: &[u32]) -> Vec<String> {
        let m = t.spm().unwrap();
        ids.iter()
            .map(|&i| m.pieces[i as usize].piece.clone())
            .collect()
    }

    #[test]
    fn merges_apply_by_rank_not_by_piece_id() {
        let p = ["\u{2581}", "a", "b", "c", "ab", "bc", "\u{2581}a"];
        // (b, c) ranks first although "ab" has the lower id (sentencepiece would pick "ab").
        let t = from_json(&spm_json(
            0..256,
            &p,
            &[("b", "c"), ("a", "b"), ("\u{2581}", "a")],
        ))
        .unwrap();
        assert_eq!(pieces(&t, &t.encode_ordinary("abc")), ["\u{2581}a", "bc"]);
        let t = from_json(&spm_json(
            0..256,
            &p,
            &[("a", "b"), ("b", "c"), ("\u{2581}", "a")],
        ))
        .unwrap();
        assert_eq!(
            pieces(&t, &t.encode_ordinary("abc")),
            ["\u{2581}", "ab", "c"]
        );
        // Byte fallback for characters outside the vocab; decoding strips the prefix space.
        let ids = t.encode_ordinary("a\u{e9}");
        assert_eq!(pieces(&t, &ids), ["\u{2581}a", "<0xC3>", "<0xA9>"]);
        assert_eq!(t.decode_bytes(&ids).unwrap(), "a\u{e9}".as_bytes());
    }

    #[test]
    fn prepend_schemes_and_specials() {
        let p = ["\u{2581}", "a", "\u{2581}a"];
        let mut v = spm_json(0..256, &p, &[("\u{2581}", "a")]);
        let specials = |t: &Tokenizer, s: &str| pieces(t, &t.encode(s, &["<s>"]).unwrap());
        let legacy = from_json(&v).unwrap();
        assert_eq!(
            specials(&legacy, "a<s>a"),
            ["\u{2581}a", "<s>", "\u{2581}a"]
        );
        assert_eq!(specials(&legacy, " a"), ["\u{2581}", "\u{2581}a"]);
        v["normalizer"] = Value::Null;
        for (scheme, after_special, spaced) in [
            ("first", vec!["a"], vec!["\u{2581}a"]),
            ("always", vec!["\u{2581}a"], vec!["\u{2581}a"]),
            ("never", vec!["a"], vec!["\u{2581}a"]),
        ] {
            v["pre_tokenizer"] = json!({"type": "Metaspace", "replacement": SPACE,
                                        "prepend_scheme": scheme, "split": false});
            let t = from_json(&v).unwrap();
            assert_eq!(specials(&t, "<s>a")[1..], after_special, "{scheme}");
            assert_eq!(specials(&t, " a"), spaced, "{scheme}");
        }
        v["pre_tokenizer"]["split"] = json!(true);
        assert!(from_json(&v).unwrap_err().contains("split=true"));
    }

    #[test]
    fn unknowns_fuse_and_follow_byte_tokens_as_in_tokenizers() {
        // Only bytes 0x00-0x7F exist: "é" (C3 A9) has no byte tokens, so it is <unk>; a pending unk
        // is written after the byte tokens of a following character, as `tokenizers` does.
        let t = from_json(&spm_json(0..128, &["\u{2581}", "a"], &[])).unwrap();
        let ids = t.encode_ordinary("\u{e9}\u{e9}\u{1}a");
        assert_eq!(pieces(&t, &ids), ["\u{2581}", "<0x01>", "<unk>", "a"]);
    }

    #[test]
    fn native_and_json_round_trip() {
        let p = ["\u{2581}", "a", "b", "ab", "\u{2581}ab"];
        let t = from_json(&spm_json(0..256, &p, &[("a", "b"), ("\u{2581}", "ab")])).unwrap();
        let back =
            crate::formats::native::parse(&crate::formats::native::to_string(&t), Path::new("x"))
                .unwrap();
        assert_eq!(back.fingerprint(), t.fingerprint());
        let again = from_json(&to_json(&t).unwrap()).unwrap();
        assert_eq!(again.fingerprint(), t.fingerprint());
        assert_eq!(
            again.encode_ordinary("ab ba\u{1F600}"),
            t.encode_ordinary("ab ba\u{1F600}")
        );
    }
}
