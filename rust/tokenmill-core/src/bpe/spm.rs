//! SentencePiece BPE models (LLaMA-1/2 style), encoded exactly as sentencepiece's bpe_model.cc:
//! normalize (identity rule: optional removal of extra spaces, `▁` for spaces, dummy prefix), split
//! into characters (user-defined symbols whole and frozen), then repeatedly merge the adjacent pair
//! whose concatenation is a piece with the highest score, leftmost on ties (a heap, O(n log n)).
//! Symbols that are not pieces become their UTF-8 bytes as `<0xNN>` tokens (byte fallback) or the
//! unknown id (consecutive unknowns collapse into one, as sentencepiece does).

use rustc_hash::FxHashMap;
use std::cmp::Ordering;
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
        if byte_fallback {
            if let Some(b) = byte_ids.iter().position(|&i| i == u32::MAX) {
                return Err(format!(
                    "byte_fallback is set but the byte piece <0x{b:02X}> is missing"
                ));
            }
        }
        user_defined.sort_by_key(|s| std::cmp::Reverse(s.len()));
        Ok(SpModel {
            pieces,
            add_dummy_prefix,
            remove_extra_whitespaces,
            byte_fallback,
            mergeable,
            reserved,
            user_defined,
            byte_ids,
            unk_id,
        })
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

    /// What a token decodes to, as sentencepiece decodes it (control: nothing; unknown: " ⁇ ").
    pub fn decoded_bytes(&self, id: u32) -> Vec<u8> {
        let p = &self.pieces[id as usize];
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

    pub fn encode_into(&self, text: &str, out: &mut Vec<u32>) {
        let norm = self.normalize(text);
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
        let mut prev_unk = false;
        while i != usize::MAX {
            let s = &norm[start[i]..end[i]];
            match self.piece_id(s) {
                Some(id) if id != self.unk_id => {
                    out.push(id);
                    prev_unk = false;
                }
                _ if self.byte_fallback => {
                    out.extend(s.bytes().map(|b| self.byte_ids[b as usize]));
                    prev_unk = false;
                }
                _ => {
                    if !prev_unk {
                        out.push(self.unk_id);
                    }
                    prev_unk = true;
                }
            }
            i = next[i];
        }
    }

    /// sentencepiece drops the dummy-prefix space of the first non-control token when decoding.
    pub fn strip_dummy_prefix(
        &self,
        ids: &[u32],
        out: &mut Vec<u8>,
        _specials: &FxHashMap<String, u32>,
    ) {
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
