//! Byte-level BPE `tokenizer.json`: pre-tokenizer ByteLevel (GPT-2 regex) or
//! Sequence[Split(regex, Isolated), ByteLevel(use_regex=false)] (LLaMA-3), no normalizer.

use super::{added_token, added_tokens, get_bool, parse_merges, type_of};
use crate::bpe::{BpeOptions, Tokenizer};
use crate::{Error, Result};
use rustc_hash::FxHashMap;
use serde_json::{json, Map, Value};

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

/// A byte-level BPE model (GPT-2, LLaMA-3 style).
pub(super) fn from_json(v: &Value, model: &Value) -> std::result::Result<Tokenizer, String> {
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

pub(super) fn to_json(tok: &Tokenizer) -> Result<Value> {
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
