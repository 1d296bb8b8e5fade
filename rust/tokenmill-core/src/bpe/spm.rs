//! SentencePiece BPE models (LLaMA-1/2 style), encoded exactly as sentencepiece's bpe_model.cc:
//! normalize (identity rule: optional removal of extra spaces, `▁` for spaces, dummy prefix), split
//! into characters (user-defined symbols whole and frozen), then repeatedly merge the adjacent pair
//! whose concatenation is a piece with the highest score, leftmost on ties (a heap, O(n log n)).
//! Symbols that are not pieces become their UTF-8 bytes as `<0xNN>` tokens (byte fallback) or the
//! unknown id (consecutive unknowns collapse into one, as sentencepiece does).
//!
//! The same pieces loaded from a Hugging Face `tokenizer.json` (see `formats::huggingface`) carry
//! [`HfRules`] instead: `tokenizers`' BPE model with byte fallback, which merges the pair of lowest
//! rank in the file's `merges` list (leftmost on ties) rather than the pair of highest score. On a
//! list converted from a `.model` the two can only differ where two different splits of one piece
//! are candidates at once and overlap, e.g. `[ab][a][ba]` for the piece `aba`: sentencepiece merges
//! the leftmost, `tokenizers` the split listed first (transformers lists (a, ba) first). No text
//! reaching such a state was found (see `formats::huggingface::sentencepiece::as_hf`); a file is
//! followed as `tokenizers` reads it.

use rustc_hash::FxHashMap;
use std::cmp::{Ordering, Reverse};
use std::collections::BinaryHeap;

pub const SPACE: &str = "\u{2581}";

/// sentencepiece's ModelProto.SentencePiece.Type values.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PieceType {
    Normal = 1,
    Unknown = 2,
    Control = 3,
    UserDefined = 4,
    Unused = 5,
    Byte = 6,
}

impl PieceType {
    pub fn from_i32(v: i32) -> Option<Self> {
        Some(match v {
            1 => PieceType::Normal,
            2 => PieceType::Unknown,
            3 => PieceType::Control,
            4 => PieceType::UserDefined,
            5 => PieceType::Unused,
            6 => PieceType::Byte,
            _ => return None,
        })
    }
}

#[derive(Clone, Debug)]
pub struct SpPiece {
    pub piece: String,
    pub score: f32,
    pub kind: PieceType,
}

/// Where `tokenizers` puts the `▁` before a text (or before each text between added tokens).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Prepend {
    /// No prefix.
    Never = 0,
    /// Normalizer `Prepend("▁")` (transformers' legacy LLaMA converter): before every non-empty text.
    Normalizer = 1,
    /// Metaspace `prepend_scheme: "always"`: before every text not starting with `▁` (after `" "` -> `▁`).
    Always = 2,
    /// Metaspace `prepend_scheme: "first"`: like `Always`, only for the text at the start of the input.
    First = 3,
}

impl Prepend {
    pub fn from_u8(v: u8) -> Option<Self> {
        Some(match v {
            0 => Prepend::Never,
            1 => Prepend::Normalizer,
            2 => Prepend::Always,
            3 => Prepend::First,
            _ => return None,
        })
    }
}

/// How `tokenizers` encodes and decodes a SentencePiece-style BPE `tokenizer.json`. Its pieces are
/// the model vocabulary (ids `0..n_model`) followed by added tokens outside it; added tokens are
/// CONTROL pieces if special, USER_DEFINED if not, and are the tokenizer's special tokens.
#[derive(Clone, Debug)]
pub struct HfRules {
    /// (left id, right id) in rank order.
    pub merges: Vec<(u32, u32)>,
    pub prepend: Prepend,
    pub ignore_merges: bool,
    pub fuse_unk: bool,
    pub unk: Option<u32>,
    /// Pieces with ids below this are the model vocabulary (looked up for single characters).
    pub n_model: u32,
    /// Decoder strips one leading space (`Strip(" ", 1, 0)` after `Fuse`, or Metaspace's prefix).
    pub strip_space: bool,
    /// Decoder has `ByteFallback`: `<0xNN>` decodes to the byte, else to its text.
    pub decode_bytes: bool,
    /// (left, right) -> (rank, merged id).
    ranks: FxHashMap<(u32, u32), (u32, u32)>,
}

impl HfRules {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        merges: Vec<(u32, u32)>,
        prepend: Prepend,
        ignore_merges: bool,
        fuse_unk: bool,
        unk: Option<u32>,
        n_model: u32,
        strip_space: bool,
        decode_bytes: bool,
    ) -> Self {
        HfRules {
            merges,
            prepend,
            ignore_merges,
            fuse_unk,
            unk,
            n_model,
            strip_space,
            decode_bytes,
            ranks: FxHashMap::default(),
        }
    }
}

#[derive(Clone, Debug)]
pub struct SpModel {
    pub pieces: Vec<SpPiece>,
    pub add_dummy_prefix: bool,
    pub remove_extra_whitespaces: bool,
    pub byte_fallback: bool,
    /// Normal, user-defined: the pieces merges may produce.
    mergeable: FxHashMap<String, u32>,
    /// Unknown, control, byte: looked up first, never produced by a merge.
    reserved: FxHashMap<String, u32>,
    /// User-defined symbols, longest first.
    user_defined: Vec<String>,
    byte_ids: [u32; 256],
    unk_id: u32,
    /// Set for models loaded from a Hugging Face `tokenizer.json`.
    hf: Option<HfRules>,
    /// No mergeable piece has a character other than "▁" followed by "▁": merges never cross the
    /// start of a word, so text can be merged word by word.
    split_words: bool,
}

/// The validation errors are plain messages; the caller adds the file name.
impl SpModel {
    pub fn new(
        pieces: Vec<SpPiece>,
        add_dummy_prefix: bool,
        remove_extra_whitespaces: bool,
        byte_fallback: bool,
    ) -> std::result::Result<Self, String> {
        let mut mergeable = FxHashMap::default();
        let mut reserved = FxHashMap::default();
        let mut user_defined = Vec::new();
        let mut byte_ids = [u32::MAX; 256];
        let mut unk_id = None;
        for (i, p) in pieces.iter().enumerate() {
            let id = i as u32;
            if p.piece.is_empty() {
                return Err(format!("piece {i} is empty"));
            }
            let map = match p.kind {
                PieceType::Normal | PieceType::UserDefined => &mut mergeable,
                PieceType::Unused => {
                    return Err(format!(
                        "piece {i} {:?} is of type UNUSED, which is not supported",
                        p.piece
                    ))
                }
                _ => &mut reserved,
            };
            if map.insert(p.piece.clone(), id).is_some() {
                return Err(format!("piece {:?} is defined twice", p.piece));
            }
            match p.kind {
                PieceType::UserDefined => user_defined.push(p.piece.clone()),
                PieceType::Unknown => unk_id = Some(id),
                PieceType::Byte => {
                    let b = parse_byte_piece(&p.piece)
                        .ok_or_else(|| format!("byte piece {i} {:?} is not <0xNN>", p.piece))?;
                    byte_ids[b as usize] = id;
                }
                _ => {}
            }
        }
        let unk_id = unk_id.ok_or("the model has no unknown piece")?;
        Self::build(
            pieces,
            (add_dummy_prefix, remove_extra_whitespaces, byte_fallback),
            (mergeable, reserved, user_defined),
            byte_ids,
            unk_id,
            None,
        )
    }

    /// A `tokenizer.json` model: pieces typed as [`HfRules`] says; merges are checked here.
    pub fn new_hf(
        pieces: Vec<SpPiece>,
        byte_fallback: bool,
        mut hf: HfRules,
    ) -> std::result::Result<Self, String> {
        let mut mergeable = FxHashMap::default();
        let mut reserved = FxHashMap::default();
        let mut byte_ids = [u32::MAX; 256];
        for (i, p) in pieces.iter().enumerate() {
            let id = i as u32;
            if p.piece.is_empty() {
                return Err(format!("token {i} is empty"));
            }
            let map = match p.kind {
                PieceType::Normal | PieceType::UserDefined => &mut mergeable,
                PieceType::Control | PieceType::Byte => &mut reserved,
                k => return Err(format!("token {i} {:?} has type {k:?}", p.piece)),
            };
            if map.insert(p.piece.clone(), id).is_some() {
                return Err(format!("token {:?} is defined twice", p.piece));
            }
            if p.kind == PieceType::Byte {
                // `tokenizers` looks byte tokens up as format!("<{b:#04X}>"): exactly `<0xNN>`, upper case.
                match parse_byte_piece(&p.piece) {
                    Some(b) if p.piece == format!("<0x{b:02X}>") => byte_ids[b as usize] = id,
                    _ => return Err(format!("byte token {i} {:?} is not <0xNN>", p.piece)),
                }
            }
        }
        if hf.n_model as usize > pieces.len() {
            return Err("the model vocabulary is larger than the tokens".into());
        }
        if let Some(u) = hf.unk {
            if u >= hf.n_model {
                return Err(format!("unk token id {u} is not in the model vocabulary"));
            }
        }
        let mut ranks = FxHashMap::default();
        for (i, &(a, b)) in hf.merges.iter().enumerate() {
            let text = |x: u32| {
                pieces
                    .get(x as usize)
                    .filter(|_| x < hf.n_model)
                    .map(|p| p.piece.as_str())
                    .ok_or(format!(
                        "merge {i} uses token id {x}, which is not in the vocab"
                    ))
            };
            let merged = format!("{}{}", text(a)?, text(b)?);
            let id = mergeable
                .get(&merged)
                .or_else(|| reserved.get(&merged))
                .copied()
                .filter(|&id| id < hf.n_model)
                .ok_or(format!(
                    "merge {i} gives {merged:?}, which is not in the vocab"
                ))?;
            // `tokenizers` keeps the first rank of a pair listed twice.
            ranks.entry((a, b)).or_insert((i as u32, id));
        }
        hf.ranks = ranks;
        let unk_id = hf.unk.unwrap_or(u32::MAX);
        Self::build(
            pieces,
            (false, false, byte_fallback),
            (mergeable, reserved, Vec::new()),
            byte_ids,
            unk_id,
            Some(hf),
        )
    }

    #[allow(clippy::type_complexity)]
    fn build(
        pieces: Vec<SpPiece>,
        (add_dummy_prefix, remove_extra_whitespaces, byte_fallback): (bool, bool, bool),
        (mergeable, reserved, mut user_defined): (
            FxHashMap<String, u32>,
            FxHashMap<String, u32>,
            Vec<String>,
        ),
        byte_ids: [u32; 256],
        unk_id: u32,
        hf: Option<HfRules>,
    ) -> std::result::Result<Self, String> {
        if byte_fallback && hf.is_none() {
            if let Some(b) = byte_ids.iter().position(|&i| i == u32::MAX) {
                return Err(format!(
                    "byte_fallback is set but the byte piece <0x{b:02X}> is missing"
                ));
            }
        }
        user_defined.sort_by_key(|s| std::cmp::Reverse(s.len()));
        let split_words = !mergeable.keys().any(|p| {
            p.chars()
                .zip(p.chars().skip(1))
                .any(|(a, b)| a != '\u{2581}' && b == '\u{2581}')
        });
        Ok(SpModel {
            split_words,
            pieces,
            add_dummy_prefix,
            remove_extra_whitespaces,
            byte_fallback,
            mergeable,
            reserved,
            user_defined,
            byte_ids,
            unk_id,
            hf,
        })
    }

    pub fn hf(&self) -> Option<&HfRules> {
        self.hf.as_ref()
    }

    /// The special tokens: control and unknown pieces (sentencepiece), or the added tokens
    /// (tokenizer.json: control and user-defined pieces).
    pub fn specials(&self) -> Vec<(String, u32)> {
        let special = |k: PieceType| match self.hf {
            None => matches!(k, PieceType::Control | PieceType::Unknown),
            Some(_) => matches!(k, PieceType::Control | PieceType::UserDefined),
        };
        self.pieces
            .iter()
            .enumerate()
            .filter(|(_, p)| special(p.kind))
            .map(|(i, p)| (p.piece.clone(), i as u32))
            .collect()
    }

    pub fn unk_id(&self) -> u32 {
        self.unk_id
    }

    pub fn piece_id(&self, piece: &str) -> Option<u32> {
        self.reserved
            .get(piece)
            .or_else(|| self.mergeable.get(piece))
            .copied()
    }

    /// What a token decodes to, as sentencepiece decodes it (control: nothing; unknown: " ⁇ "), or
    /// as `tokenizers` does with `skip_special_tokens=True` (special added tokens: nothing).
    pub fn decoded_bytes(&self, id: u32) -> Vec<u8> {
        let p = &self.pieces[id as usize];
        if let Some(hf) = &self.hf {
            return match p.kind {
                PieceType::Control => Vec::new(),
                PieceType::Byte if hf.decode_bytes => vec![parse_byte_piece(&p.piece).unwrap_or(0)],
                _ => p.piece.replace(SPACE, " ").into_bytes(),
            };
        }
        match p.kind {
            PieceType::Control => Vec::new(),
            PieceType::Unknown => " \u{2047} ".as_bytes().to_vec(),
            PieceType::Byte => vec![parse_byte_piece(&p.piece).unwrap_or(0)],
            _ => p.piece.replace(SPACE, " ").into_bytes(),
        }
    }

    pub fn fingerprint_bytes(&self) -> Vec<u8> {
        let mut v = vec![
            self.add_dummy_prefix as u8,
            self.remove_extra_whitespaces as u8,
            self.byte_fallback as u8,
        ];
        for p in &self.pieces {
            v.extend_from_slice(&p.score.to_le_bytes());
            v.push(p.kind as u8);
        }
        if let Some(h) = &self.hf {
            v.extend_from_slice(b"hf");
            v.extend_from_slice(&[
                h.prepend as u8,
                h.ignore_merges as u8,
                h.fuse_unk as u8,
                h.strip_space as u8,
                h.decode_bytes as u8,
            ]);
            v.extend_from_slice(&h.unk.unwrap_or(u32::MAX).to_le_bytes());
            v.extend_from_slice(&h.n_model.to_le_bytes());
            v.extend_from_slice(&(h.merges.len() as u64).to_le_bytes());
            for (a, b) in &h.merges {
                v.extend_from_slice(&a.to_le_bytes());
                v.extend_from_slice(&b.to_le_bytes());
            }
        }
        v
    }

    /// sentencepiece's normalizer with the identity rule.
    pub fn normalize(&self, text: &str) -> String {
        let mut out = String::with_capacity(text.len() + 8);
        let body = if self.remove_extra_whitespaces {
            text.trim_matches(' ')
        } else {
            text
        };
        if body.is_empty() {
            return out;
        }
        if self.add_dummy_prefix {
            out.push_str(SPACE);
        }
        let mut prev_space = false;
        for c in body.chars() {
            if c == ' ' {
                if !(self.remove_extra_whitespaces && prev_space) {
                    out.push_str(SPACE);
                }
                prev_space = true;
            } else {
                out.push(c);
                prev_space = false;
            }
        }
        out
    }

    /// Encode one text between special tokens; `at_start`: it begins the input (Metaspace "first").
    pub fn encode_into(&self, text: &str, at_start: bool, out: &mut Vec<u32>) {
        if let Some(hf) = &self.hf {
            return self.encode_hf(hf, text, at_start, out);
        }
        let norm = self.normalize(text);
        let mut prev_unk = false;
        if !self.split_words {
            return self.encode_segment(&norm, &mut prev_unk, out);
        }
        // No piece joins a character to a following "▁" (checked when the model was built), so no
        // merge crosses the start of a word: merge word by word. Same result as one pass over the
        // text, with small heaps instead of one the size of the document (2-3x faster).
        let mut seg = 0;
        let mut after_space = true;
        for (i, c) in norm.char_indices() {
            if c == '\u{2581}' && !after_space {
                self.encode_segment(&norm[seg..i], &mut prev_unk, out);
                seg = i;
            }
            after_space = c == '\u{2581}';
        }
        self.encode_segment(&norm[seg..], &mut prev_unk, out);
    }

    /// The merges and the output of one stretch of normalized text; `prev_unk` carries the fusing
    /// of consecutive unknown pieces from one stretch to the next.
    fn encode_segment(&self, norm: &str, prev_unk: &mut bool, out: &mut Vec<u32>) {
        if norm.is_empty() {
            return;
        }
        // Symbols: byte ranges of `norm` in a linked list; `frozen` ones never merge.
        let mut start: Vec<usize> = Vec::with_capacity(norm.len());
        let mut frozen: Vec<bool> = Vec::with_capacity(norm.len());
        let mut pos = 0;
        while pos < norm.len() {
            start.push(pos);
            let rest = &norm[pos..];
            match self
                .user_defined
                .iter()
                .find(|u| rest.starts_with(u.as_str()))
            {
                Some(u) => {
                    frozen.push(true);
                    pos += u.len();
                }
                None => {
                    frozen.push(false);
                    pos += rest.chars().next().map_or(1, char::len_utf8);
                }
            }
        }
        let n = start.len();
        let mut end: Vec<usize> = start[1..].to_vec();
        end.push(norm.len());
        let mut next: Vec<usize> = (1..=n).collect();
        let mut prev: Vec<usize> = (0..n).map(|i| i.wrapping_sub(1)).collect();
        next[n - 1] = usize::MAX;
        let mut heap = BinaryHeap::new();
        let push = |heap: &mut BinaryHeap<Pair>,
                    l: usize,
                    r: usize,
                    start: &[usize],
                    end: &[usize],
                    frozen: &[bool]| {
            if frozen[l] || frozen[r] {
                return;
            }
            if let Some(&id) = self.mergeable.get(&norm[start[l]..end[r]]) {
                heap.push(Pair {
                    score: self.pieces[id as usize].score,
                    left: l,
                    right: r,
                    size: end[r] - start[l],
                });
            }
        };
        for i in 1..n {
            push(&mut heap, i - 1, i, &start, &end, &frozen);
        }
        let mut alive = vec![true; n];
        while let Some(top) = heap.pop() {
            let (l, r) = (top.left, top.right);
            if !alive[l] || !alive[r] || end[r] - start[l] != top.size || next[l] != r {
                continue;
            }
            end[l] = end[r];
            alive[r] = false;
            next[l] = next[r];
            if next[r] != usize::MAX {
                prev[next[r]] = l;
            }
            if prev[l] != usize::MAX {
                push(&mut heap, prev[l], l, &start, &end, &frozen);
            }
            if next[l] != usize::MAX {
                push(&mut heap, l, next[l], &start, &end, &frozen);
            }
        }
        let mut i = 0;
        while i != usize::MAX {
            let s = &norm[start[i]..end[i]];
            match self.piece_id(s) {
                Some(id) if id != self.unk_id => {
                    out.push(id);
                    *prev_unk = false;
                }
                _ if self.byte_fallback => {
                    out.extend(s.bytes().map(|b| self.byte_ids[b as usize]));
                    *prev_unk = false;
                }
                _ => {
                    if !*prev_unk {
                        out.push(self.unk_id);
                    }
                    *prev_unk = true;
                }
            }
            i = next[i];
        }
    }

    /// `tokenizers`' normalization (legacy Prepend + Replace, or Metaspace without split).
    fn hf_normalize(&self, hf: &HfRules, text: &str, at_start: bool) -> String {
        let mut norm = String::with_capacity(text.len() + 8);
        let prefix = match hf.prepend {
            Prepend::Never => false,
            Prepend::Normalizer => true,
            Prepend::Always => !text.starts_with([' ', '\u{2581}']),
            Prepend::First => at_start && !text.starts_with([' ', '\u{2581}']),
        };
        if prefix {
            norm.push_str(SPACE);
        }
        for c in text.chars() {
            if c == ' ' {
                norm.push_str(SPACE);
            } else {
                norm.push(c);
            }
        }
        norm
    }

    /// `tokenizers`' BPE::merge_word with byte fallback, then Word::merge_all: repeatedly merge the
    /// adjacent pair of lowest rank, leftmost first (a heap with lazy invalidation, O(n log n)).
    fn encode_hf(&self, hf: &HfRules, text: &str, at_start: bool, out: &mut Vec<u32>) {
        if text.is_empty() {
            return;
        }
        let norm = self.hf_normalize(hf, text, at_start);
        let model_id = |s: &str| self.piece_id(s).filter(|&id| id < hf.n_model);
        if hf.ignore_merges {
            if let Some(id) = model_id(&norm) {
                out.push(id);
                return;
            }
        }
        let mut ids: Vec<u32> = Vec::with_capacity(norm.len());
        let mut unk: Option<u32> = None;
        let mut buf = [0u8; 4];
        for c in norm.chars() {
            if let Some(id) = model_id(c.encode_utf8(&mut buf)) {
                if unk.take().is_some() {
                    ids.push(hf.unk.unwrap_or(u32::MAX));
                }
                ids.push(id);
                continue;
            }
            let bytes = c.encode_utf8(&mut buf).as_bytes();
            if self.byte_fallback && bytes.iter().all(|&b| self.byte_ids[b as usize] != u32::MAX) {
                // As in `tokenizers`, a pending unknown is not flushed before byte tokens.
                ids.extend(bytes.iter().map(|&b| self.byte_ids[b as usize]));
                continue;
            }
            if let Some(u) = hf.unk {
                if unk.is_some() && !hf.fuse_unk {
                    ids.push(u);
                }
                unk = Some(u);
            }
        }
        if let Some(u) = unk {
            ids.push(u);
        }
        let n = ids.len();
        if n == 0 {
            return;
        }
        let mut next: Vec<u32> = (1..=n as u32).collect();
        next[n - 1] = u32::MAX;
        let mut prev: Vec<u32> = (0..n as u32).map(|i| i.wrapping_sub(1)).collect();
        let mut alive = vec![true; n];
        let mut heap: BinaryHeap<Reverse<(u32, u32, u32)>> = BinaryHeap::new();
        for i in 1..n {
            if let Some(&(rank, id)) = hf.ranks.get(&(ids[i - 1], ids[i])) {
                heap.push(Reverse((rank, i as u32 - 1, id)));
            }
        }
        while let Some(Reverse((_, l, merged))) = heap.pop() {
            let l = l as usize;
            let r = next[l];
            // Stale: the left symbol was absorbed or its pair is no longer this one.
            if !alive[l] || r == u32::MAX {
                continue;
            }
            let r = r as usize;
            if hf.ranks.get(&(ids[l], ids[r])).map(|x| x.1) != Some(merged) {
                continue;
            }
            ids[l] = merged;
            alive[r] = false;
            next[l] = next[r];
            if next[r] != u32::MAX {
                prev[next[r] as usize] = l as u32;
            }
            if prev[l] != u32::MAX {
                let p = prev[l] as usize;
                if let Some(&(rank, id)) = hf.ranks.get(&(ids[p], ids[l])) {
                    heap.push(Reverse((rank, p as u32, id)));
                }
            }
            if next[l] != u32::MAX {
                if let Some(&(rank, id)) = hf.ranks.get(&(ids[l], ids[next[l] as usize])) {
                    heap.push(Reverse((rank, l as u32, id)));
                }
            }
        }
        let mut i = 0u32;
        while i != u32::MAX {
            out.push(ids[i as usize]);
            i = next[i as usize];
        }
    }

    /// sentencepiece drops the dummy-prefix space of the first non-control token when decoding;
    /// `tokenizers` (Strip after Fuse) the first character of the text if it is a space.
    pub fn strip_dummy_prefix(
        &self,
        ids: &[u32],
        out: &mut Vec<u8>,
        _specials: &FxHashMap<String, u32>,
    ) {
        if let Some(hf) = &self.hf {
            if hf.strip_space && out.first() == Some(&b' ') {
                out.remove(0);
            }
            return;
        }
        if !self.add_dummy_prefix {
            return;
        }
        let first = ids.iter().find(|&&id| {
            self.pieces
                .get(id as usize)
                .is_none_or(|p| p.kind != PieceType::Control)
        });
        if let Some(&id) = first {
            if let Some(p) = self.pieces.get(id as usize) {
                if matches!(p.kind, PieceType::Normal | PieceType::UserDefined)
                    && p.piece.starts_with(SPACE)
                    && out.first() == Some(&b' ')
                {
                    out.remove(0);
                }
            }
        }
    }
}

pub fn parse_byte_piece(p: &str) -> Option<u8> {
    let hex = p.strip_prefix("<0x")?.strip_suffix('>')?;
    if hex.len() != 2 {
        return None;
    }
    u8::from_str_radix(hex, 16).ok()
}

/// A candidate merge: highest score first, then leftmost (sentencepiece's SymbolPairComparator).
struct Pair {
    score: f32,
    left: usize,
    right: usize,
    size: usize,
}

impl PartialEq for Pair {
    fn eq(&self, o: &Self) -> bool {
        self.cmp(o) == Ordering::Equal
    }
}
impl Eq for Pair {}
impl PartialOrd for Pair {
    fn partial_cmp(&self, o: &Self) -> Option<Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Pair {
    fn cmp(&self, o: &Self) -> Ordering {
        self.score
            .total_cmp(&o.score)
            .then_with(|| o.left.cmp(&self.left))
    }
}
