//! SentencePiece-style BPE `tokenizer.json` (`byte_fallback: true`: LLaMA-1/2, Mistral-7B, TinyLlama and their
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
//! A SentencePiece `.model` is written back as the legacy LLaMA form ([`as_hf`]).

use super::{added_token, added_tokens, get_bool, parse_merges, type_of};
use crate::bpe::spm::{parse_byte_piece, HfRules, PieceType, Prepend, SpModel, SpPiece, SPACE};
use crate::bpe::Tokenizer;
use crate::{Error, Result};
use rustc_hash::FxHashMap;
use serde_json::{json, Map, Value};

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
pub(super) fn from_json(v: &Value, model: &Value) -> std::result::Result<Tokenizer, String> {
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

/// The SentencePiece-style tokenizer.json of a model loaded from one, as transformers writes it.
fn to_json_hf(m: &SpModel, h: &HfRules) -> Value {
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
fn as_hf(m: &SpModel) -> std::result::Result<SpModel, String> {
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

/// A SentencePiece model's tokenizer.json: as loaded from one, or a `.model` in the legacy form.
pub(super) fn to_json(m: &SpModel) -> Result<Value> {
    if let Some(h) = m.hf() {
        return Ok(to_json_hf(m, h));
    }
    let hf = as_hf(m).map_err(|e| {
        Error::invalid(format!(
            "this SentencePiece model cannot be saved as tokenizer.json: {e}"
        ))
    })?;
    let rules = hf
        .hf()
        .ok_or_else(|| Error::invalid("no tokenizers rules"))?;
    Ok(to_json_hf(&hf, rules))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::formats::huggingface::{from_json, to_json};
    use std::path::Path;

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
