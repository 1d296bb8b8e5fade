//! Byte-level BPE tokenizer with tiktoken's semantics, plus SentencePiece-BPE models (see `spm`).
//!
//! Encoding: special tokens are found first (Aho-Corasick, leftmost-longest); the text between them
//! is split by the [`Pretokenizer`]; each piece that is itself a token is emitted directly, others
//! are merged by [`merge::merge`]. Ids of mergeable tokens are their ranks.
//!
//! Performance notes (2-core shared box, 12 MB stdlib corpus, 32k cl100k vocab; best of 5 in
//! `cargo run --release --example tokbench`; the box was heavily loaded, so figures are rough):
//! - A whole-piece lookup before merging (tiktoken does the same) skips the merge for most pieces.
//! - Long pieces: one BinaryHeap of (rank, position) over all pairs took 0.80 s for a 1 MiB run of
//!   one letter (cache misses in a 1M-entry heap); buckets per rank drained left to right
//!   (merge.rs) took 0.12 s, then 0.09 s with a 256x256 byte-pair table and an array of current
//!   pair ranks for the stale check (no hashing there).
//! - Short pieces: per-piece Vec allocations in the scan replaced by stack arrays.
//! - The regex's own cache pool is taken once per `split` call, not once per piece.
//! - A piece -> ids cache (`cache.rs`) for pieces that are not tokens. On code they are mostly
//!   unique identifiers (the cache neither helps nor costs measurably); on prose the merge was half
//!   the time and words repeat (issue 14, tokbench CPU time, 3 MB multilingual prose, 32k vocab:
//!   encode ~50 -> ~110 MB/s with the cache; the bench prose repeats a few hundred sentences, so
//!   prose with fewer repeats lands between the two).
//! - Whole-piece lookups key the tokens of up to 15 bytes by one `u128` ([`pack`]): no slice hash
//!   loop and no `memcmp` call per piece (the lookup is now one hash-table cache miss).
//! - The pretokenizer steps a lazy DFA by hand per piece instead of calling the meta regex (see
//!   `pretokenize`): split 150 -> 250 MB/s on prose, 95 -> 130 MB/s on code.
//! - Tried and dropped: tombstones instead of shifting in the short-piece scan (`merge.rs`).

mod cache;
pub mod merge;
pub mod spm;
pub mod train;

use crate::pretokenize::Pretokenizer;
use crate::{Error, Result};
use aho_corasick::{AhoCorasick, AhoCorasickBuilder, MatchKind};
use merge::PairMap;
use rustc_hash::FxHashMap;
use xxhash_rust::xxh3::Xxh3;

/// How special tokens found in the text are treated.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Policy {
    Text = 0,
    Allowed = 1,
    Disallowed = 2,
}

/// Options of a byte-level BPE model beyond its vocabulary.
#[derive(Clone, Debug, Default)]
pub struct BpeOptions {
    /// Explicit merges (Hugging Face): priority = index. None: tiktoken's rule (any split of a
    /// token merges, priority = the token's id).
    pub merges: Option<Vec<(u32, u32)>>,
    /// Emit a piece that is itself a token without merging (tiktoken always; HF `ignore_merges`).
    pub ignore_merges: bool,
    /// Hugging Face ByteLevel `add_prefix_space`: a space before each text not starting with one.
    pub add_prefix_space: bool,
}

impl BpeOptions {
    pub fn tiktoken() -> Self {
        BpeOptions {
            merges: None,
            ignore_merges: true,
            add_prefix_space: false,
        }
    }
}

pub struct Tokenizer {
    pre: Pretokenizer,
    /// Mergeable token bytes -> id.
    encoder: FxHashMap<Vec<u8>, u32>,
    /// The tokens of `encoder` of up to 15 bytes, keyed by [`pack`]: the whole-piece lookup.
    short: FxHashMap<u128, u32>,
    ranks: merge::Ranks,
    /// id -> bytes it decodes to (mergeable and special); None for unused ids.
    decoder: Vec<Option<Vec<u8>>>,
    /// Mergeable token ids, ascending.
    mergeable_ids: Vec<u32>,
    options: BpeOptions,
    /// (text, id) in the order given.
    specials: Vec<(String, u32)>,
    special_ids: FxHashMap<String, u32>,
    special_ac: Option<AhoCorasick>,
    /// Set for SentencePiece-BPE models: encoding follows sentencepiece instead of tiktoken.
    spm: Option<spm::SpModel>,
    fingerprint: String,
    /// Merge results of recent pieces that are not tokens (see `cache`).
    cache: cache::PieceCache,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("n_vocab", &self.n_vocab())
            .field("pattern", &self.pattern())
            .field("n_special", &self.specials.len())
            .field("sentencepiece", &self.spm.is_some())
            .finish()
    }
}

impl Tokenizer {
    /// Build from mergeable tokens in id order (id = rank), a pattern (name or regex) and special
    /// tokens with their ids, with tiktoken's semantics. All 256 single bytes must be tokens.
    pub fn from_ranks(
        tokens: Vec<Vec<u8>>,
        pattern: &str,
        specials: Vec<(String, u32)>,
    ) -> Result<Self> {
        let tokens = tokens
            .into_iter()
            .enumerate()
            .map(|(i, t)| (i as u32, t))
            .collect();
        Self::from_vocab(tokens, pattern, specials, BpeOptions::tiktoken())
    }

    /// The general byte-level constructor: (id, bytes) of the mergeable tokens, in any order.
    pub fn from_vocab(
        tokens: Vec<(u32, Vec<u8>)>,
        pattern: &str,
        specials: Vec<(String, u32)>,
        options: BpeOptions,
    ) -> Result<Self> {
        let pre = Pretokenizer::new(pattern)?;
        Self::build(tokens, pre, specials, options, None)
    }

    /// A SentencePiece BPE model; its control and unknown pieces (tokenizer.json: its added tokens)
    /// become the special tokens.
    pub fn from_sentencepiece(model: spm::SpModel) -> Result<Self> {
        let tokens = model
            .pieces
            .iter()
            .enumerate()
            .map(|(i, p)| (i as u32, p.piece.as_bytes().to_vec()))
            .collect();
        let specials = model.specials();
        Self::build(
            tokens,
            Pretokenizer::new("")?,
            specials,
            BpeOptions::default(),
            Some(model),
        )
    }

    fn build(
        mut tokens: Vec<(u32, Vec<u8>)>,
        pre: Pretokenizer,
        specials: Vec<(String, u32)>,
        options: BpeOptions,
        spm: Option<spm::SpModel>,
    ) -> Result<Self> {
        tokens.sort_by_key(|(id, _)| *id);
        let max_id = tokens
            .iter()
            .map(|(id, _)| *id)
            .chain(specials.iter().map(|(_, id)| *id))
            .max();
        if max_id == Some(u32::MAX) {
            return Err(Error::invalid("token id 4294967295 is out of range"));
        }
        let n_vocab = max_id.map_or(0, |m| m as usize + 1);
        let mut decoder: Vec<Option<Vec<u8>>> = vec![None; n_vocab];
        let mut encoder: FxHashMap<Vec<u8>, u32> = FxHashMap::default();
        let mut byte_ids = [u32::MAX; 256];
        for (id, t) in &tokens {
            if decoder[*id as usize].is_some() {
                return Err(Error::invalid(format!("token id {id} is used twice")));
            }
            decoder[*id as usize] = Some(match &spm {
                Some(m) => m.decoded_bytes(*id),
                None => t.clone(),
            });
            if spm.is_some() {
                continue;
            }
            if t.is_empty() {
                return Err(Error::invalid(format!("token {id} is empty")));
            }
            if let Some(old) = encoder.insert(t.clone(), *id) {
                return Err(Error::invalid(format!(
                    "tokens {old} and {id} have the same bytes {}",
                    show_bytes(t)
                )));
            }
            if t.len() == 1 {
                byte_ids[t[0] as usize] = *id;
            }
        }
        if spm.is_none() {
            if let Some(b) = byte_ids.iter().position(|&i| i == u32::MAX) {
                return Err(Error::invalid(format!(
                    "the vocabulary lacks the single-byte token 0x{b:02X}; byte-level BPE needs all 256"
                )));
            }
        }
        let mut pairs = PairMap::default();
        if spm.is_none() {
            match &options.merges {
                None => {
                    for (id, t) in &tokens {
                        for k in 1..t.len() {
                            if let (Some(&a), Some(&b)) =
                                (encoder.get(&t[..k]), encoder.get(&t[k..]))
                            {
                                pairs.insert((a, b), (*id as u64) << 32 | *id as u64);
                            }
                        }
                    }
                }
                Some(merges) => {
                    for (i, &(a, b)) in merges.iter().enumerate() {
                        let part = |x: u32| {
                            decoder
                                .get(x as usize)
                                .and_then(|d| d.as_ref())
                                .ok_or_else(|| {
                                    Error::invalid(format!("merge {i} uses unknown token id {x}"))
                                })
                        };
                        let merged = [part(a)?.as_slice(), part(b)?.as_slice()].concat();
                        let id = *encoder.get(&merged).ok_or_else(|| {
                            Error::invalid(format!(
                                "merge {i} gives {}, which is not in the vocabulary",
                                show_bytes(&merged)
                            ))
                        })?;
                        pairs.insert((a, b), (i as u64) << 32 | id as u64);
                    }
                }
            }
        }
        let mut special_ids = FxHashMap::default();
        for (s, id) in &specials {
            if s.is_empty() {
                return Err(Error::invalid("a special token is the empty string"));
            }
            if special_ids.insert(s.clone(), *id).is_some() {
                return Err(Error::invalid(format!("special token {s:?} given twice")));
            }
            if spm.is_some() {
                continue; // sentencepiece specials are pieces already
            }
            if decoder[*id as usize].is_some() {
                return Err(Error::invalid(format!(
                    "special token {s:?} has id {id}, which another token already has"
                )));
            }
            decoder[*id as usize] = Some(s.as_bytes().to_vec());
        }
        let special_ac = if specials.is_empty() {
            None
        } else {
            Some(
                AhoCorasickBuilder::new()
                    .match_kind(MatchKind::LeftmostLongest)
                    .build(specials.iter().map(|(s, _)| s.as_bytes()))
                    .map_err(|e| Error::invalid(format!("special tokens: {e}")))?,
            )
        };
        let short = encoder
            .iter()
            .filter(|(t, _)| t.len() < 16)
            .map(|(t, &id)| (pack(t), id))
            .collect();
        let mut tok = Tokenizer {
            pre,
            encoder,
            short,
            ranks: merge::Ranks::new(byte_ids, pairs),
            decoder,
            mergeable_ids: tokens.iter().map(|(id, _)| *id).collect(),
            options,
            specials,
            special_ids,
            special_ac,
            spm,
            fingerprint: String::new(),
            cache: cache::PieceCache::default(),
        };
        tok.fingerprint = tok.compute_fingerprint(&tokens);
        Ok(tok)
    }

    fn compute_fingerprint(&self, tokens: &[(u32, Vec<u8>)]) -> String {
        let mut h = Xxh3::new();
        let mut put = |b: &[u8]| {
            h.update(&(b.len() as u64).to_le_bytes());
            h.update(b);
        };
        put(b"tokenmill-bpe-1");
        put(self.pattern().as_bytes());
        put(&(tokens.len() as u64).to_le_bytes());
        for (id, t) in tokens {
            put(&id.to_le_bytes());
            put(t);
        }
        let o = &self.options;
        put(&[o.ignore_merges as u8, o.add_prefix_space as u8]);
        if let Some(m) = &o.merges {
            put(&(m.len() as u64).to_le_bytes());
            for (a, b) in m {
                put(&[a.to_le_bytes(), b.to_le_bytes()].concat());
            }
        }
        let mut sp: Vec<&(String, u32)> = self.specials.iter().collect();
        sp.sort_by_key(|(_, id)| *id);
        for (s, id) in sp {
            put(&id.to_le_bytes());
            put(s.as_bytes());
        }
        if let Some(m) = &self.spm {
            put(&m.fingerprint_bytes());
        }
        format!("xxh3-128:{:032x}", h.digest128())
    }

    // ----- accessors -----

    pub fn pattern(&self) -> &str {
        if self.spm.is_some() {
            ""
        } else {
            self.pre.pattern()
        }
    }
    pub fn pretokenizer(&self) -> &Pretokenizer {
        &self.pre
    }
    /// Largest id + 1 (tiktoken's n_vocab).
    pub fn n_vocab(&self) -> usize {
        self.decoder.len()
    }
    pub fn n_mergeable(&self) -> usize {
        self.mergeable_ids.len()
    }
    pub fn options(&self) -> &BpeOptions {
        &self.options
    }
    /// Special tokens (text, id) in the order given at construction.
    pub fn special_tokens(&self) -> &[(String, u32)] {
        &self.specials
    }
    pub fn special_token_id(&self, text: &str) -> Option<u32> {
        self.special_ids.get(text).copied()
    }
    pub fn spm(&self) -> Option<&spm::SpModel> {
        self.spm.as_ref()
    }
    pub fn fingerprint(&self) -> String {
        self.fingerprint.clone()
    }
    /// Id of a token given by its bytes: a special token's text or a mergeable token's bytes
    /// (for SentencePiece models: the piece, with `▁` for spaces).
    pub fn token_to_id(&self, token: &[u8]) -> Option<u32> {
        if let Ok(s) = std::str::from_utf8(token) {
            if let Some(&id) = self.special_ids.get(s) {
                return Some(id);
            }
            if let Some(m) = &self.spm {
                return m.piece_id(s);
            }
        }
        self.encoder.get(token).copied()
    }
    /// The bytes a token decodes to.
    pub fn id_to_token_bytes(&self, id: u32) -> Result<&[u8]> {
        match self.decoder.get(id as usize) {
            Some(Some(b)) => Ok(b),
            _ => Err(Error::Token(format!(
                "unknown token id {id} (vocabulary size {})",
                self.n_vocab()
            ))),
        }
    }
    /// (id, bytes) of the mergeable tokens in id order (for SentencePiece models: the pieces).
    pub fn mergeable_tokens(&self) -> Vec<(u32, &[u8])> {
        match &self.spm {
            Some(m) => m
                .pieces
                .iter()
                .enumerate()
                .map(|(i, p)| (i as u32, p.piece.as_bytes()))
                .collect(),
            None => self
                .mergeable_ids
                .iter()
                .map(|&i| (i, self.decoder[i as usize].as_deref().unwrap_or(&[])))
                .collect(),
        }
    }

    // ----- encoding -----

    /// Encode ignoring special tokens (their text is encoded as ordinary text).
    pub fn encode_ordinary(&self, text: &str) -> Vec<u32> {
        let mut out = Vec::with_capacity(text.len() / 4 + 1);
        self.encode_ordinary_into(text, &mut out);
        out
    }

    pub fn encode_ordinary_into(&self, text: &str, out: &mut Vec<u32>) {
        self.encode_segment_into(text, true, out)
    }

    /// Encode the text between special tokens; `at_start`: it begins the input.
    fn encode_segment_into(&self, text: &str, at_start: bool, out: &mut Vec<u32>) {
        if let Some(m) = &self.spm {
            m.encode_into(text, at_start, out);
            return;
        }
        if self.options.add_prefix_space && !text.is_empty() && !text.starts_with(' ') {
            let spaced = format!(" {text}");
            return self.encode_pieces(&spaced, out);
        }
        self.encode_pieces(text, out)
    }

    #[inline]
    fn encode_pieces(&self, text: &str, out: &mut Vec<u32>) {
        let ignore_merges = self.options.ignore_merges;
        for piece in self.pre.split(text) {
            let piece = piece.as_bytes();
            if ignore_merges {
                let id = if piece.len() < 16 {
                    self.short.get(&pack(piece))
                } else {
                    self.encoder.get(piece)
                };
                if let Some(&id) = id {
                    out.push(id);
                    continue;
                }
            }
            self.merge_piece(piece, out);
        }
    }

    /// BPE-merge one piece, through the cache for pieces of 2 to `cache::MAX_PIECE` bytes.
    #[inline]
    fn merge_piece(&self, piece: &[u8], out: &mut Vec<u32>) {
        if piece.len() < 2 || piece.len() > cache::MAX_PIECE {
            return merge::merge(piece, &self.ranks, out);
        }
        if self.cache.get_into(piece, out) {
            return;
        }
        let start = out.len();
        merge::merge(piece, &self.ranks, out);
        self.cache.insert(piece, &out[start..]);
    }

    /// tiktoken's `encode(text, allowed_special=..., disallowed_special="all")`: the listed special
    /// tokens become their ids; any other special token in the text is an error naming it.
    pub fn encode(&self, text: &str, allowed_special: &[&str]) -> Result<Vec<u32>> {
        self.encode_with(text, allowed_special, None)
    }

    /// General form: `disallowed` None means "all special tokens not allowed"; specials in
    /// neither list are encoded as ordinary text. Unknown names are ignored, as tiktoken does.
    pub fn encode_with(
        &self,
        text: &str,
        allowed: &[&str],
        disallowed: Option<&[&str]>,
    ) -> Result<Vec<u32>> {
        let policy = self.policy(allowed, disallowed);
        let mut out = Vec::with_capacity(text.len() / 4 + 1);
        self.encode_policy_into(text, &policy, &mut out)?;
        Ok(out)
    }

    fn policy(&self, allowed: &[&str], disallowed: Option<&[&str]>) -> Vec<Policy> {
        let index: FxHashMap<&str, usize> = self
            .specials
            .iter()
            .enumerate()
            .map(|(i, (s, _))| (s.as_str(), i))
            .collect();
        let mut policy = vec![
            if disallowed.is_none() {
                Policy::Disallowed
            } else {
                Policy::Text
            };
            self.specials.len()
        ];
        for s in disallowed.unwrap_or(&[]) {
            if let Some(&i) = index.get(s) {
                policy[i] = Policy::Disallowed;
            }
        }
        for s in allowed {
            if let Some(&i) = index.get(s) {
                policy[i] = Policy::Allowed;
            }
        }
        policy
    }

    /// Leftmost-longest occurrence at or after `pos` of a special token whose policy is `want`.
    fn find_special(
        &self,
        text: &str,
        mut pos: usize,
        policy: &[Policy],
        want: Policy,
    ) -> Option<(usize, usize, usize)> {
        let ac = self.special_ac.as_ref()?;
        if !policy.contains(&want) {
            return None;
        }
        while pos < text.len() {
            let m = ac.find(aho_corasick::Input::new(text).span(pos..text.len()))?;
            if policy[m.pattern().as_usize()] == want {
                return Some((m.pattern().as_usize(), m.start(), m.end()));
            }
            // A longer unwanted special hid a wanted one at the same start: check them all there.
            let at = m.start();
            let best = self
                .specials
                .iter()
                .enumerate()
                .filter(|(i, (s, _))| policy[*i] == want && text[at..].starts_with(s.as_str()))
                .max_by_key(|(_, (s, _))| s.len());
            if let Some((i, (s, _))) = best {
                return Some((i, at, at + s.len()));
            }
            pos = at + 1;
            while !text.is_char_boundary(pos) {
                pos += 1;
            }
        }
        None
    }

    fn encode_policy_into(&self, text: &str, policy: &[Policy], out: &mut Vec<u32>) -> Result<()> {
        if let Some((i, _, _)) = self.find_special(text, 0, policy, Policy::Disallowed) {
            return Err(Error::Token(format!(
                "Encountered text corresponding to disallowed special token {:?}. Pass it in \
                 allowed_special to encode it as a special token, or in disallowed_special=() \
                 (or use encode_ordinary) to encode it as ordinary text.",
                self.specials[i].0
            )));
        }
        let mut pos = 0;
        while let Some((i, start, end)) = self.find_special(text, pos, policy, Policy::Allowed) {
            self.encode_segment_into(&text[pos..start], pos == 0, out);
            out.push(self.specials[i].1);
            pos = end;
        }
        self.encode_segment_into(&text[pos..], pos == 0, out);
        Ok(())
    }

    /// Encode many texts in parallel on `num_threads` threads (None: all cores).
    /// The result does not depend on the thread count.
    pub fn encode_batch<S: AsRef<str> + Sync>(
        &self,
        texts: &[S],
        allowed: &[&str],
        disallowed: Option<&[&str]>,
        num_threads: Option<usize>,
    ) -> Result<Vec<Vec<u32>>> {
        let mut all = Vec::with_capacity(texts.len());
        self.encode_batch_with(texts, allowed, disallowed, num_threads, |run| {
            all.extend(run);
            Ok(())
        })?;
        Ok(all)
    }

    /// `encode_batch` that hands the results, in order, to `consume` on the calling thread while
    /// the other threads go on encoding (see [`crate::par::ordered_map`]); the calling thread is
    /// one of the `num_threads`. The first error in text order is returned.
    pub fn encode_batch_with<S: AsRef<str> + Sync>(
        &self,
        texts: &[S],
        allowed: &[&str],
        disallowed: Option<&[&str]>,
        num_threads: Option<usize>,
        consume: impl FnMut(Vec<Vec<u32>>) -> Result<()>,
    ) -> Result<()> {
        let policy = self.policy(allowed, disallowed);
        let threads = crate::par::thread_count(num_threads);
        crate::par::ordered_map(
            texts.len(),
            threads,
            |i| {
                let t = texts[i].as_ref();
                let mut out = Vec::with_capacity(t.len() / 4 + 1);
                self.encode_policy_into(t, &policy, &mut out)?;
                Ok(out)
            },
            consume,
        )
    }

    /// `encode_batch` ignoring special tokens.
    pub fn encode_ordinary_batch<S: AsRef<str> + Sync>(
        &self,
        texts: &[S],
        num_threads: Option<usize>,
    ) -> Result<Vec<Vec<u32>>> {
        self.encode_batch(texts, &[], Some(&[]), num_threads)
    }

    // ----- decoding -----

    /// The bytes of the tokens, concatenated. An unknown id is an error naming it. For
    /// SentencePiece models the dummy-prefix space of the first token is removed, as sentencepiece does.
    pub fn decode_bytes(&self, ids: &[u32]) -> Result<Vec<u8>> {
        let mut out = Vec::with_capacity(ids.len() * 4);
        for &id in ids {
            out.extend_from_slice(self.id_to_token_bytes(id)?);
        }
        if let Some(m) = &self.spm {
            m.strip_dummy_prefix(ids, &mut out, &self.special_ids);
        }
        Ok(out)
    }
}

/// Up to 15 bytes and their length in one integer: a hash key that is hashed with two multiplies
/// and compared with one instruction. Slice keys cost a hash loop and a `memcmp` call per lookup,
/// 13% of encoding time on code, where nearly every piece is a token.
#[inline]
fn pack(b: &[u8]) -> u128 {
    debug_assert!(b.len() < 16);
    let mut buf = [0u8; 16];
    buf[..b.len()].copy_from_slice(b);
    buf[15] = b.len() as u8;
    u128::from_le_bytes(buf)
}

/// Bytes for an error message: the text if UTF-8, else hex.
pub fn show_bytes(b: &[u8]) -> String {
    match std::str::from_utf8(b) {
        Ok(s) => format!("{s:?}"),
        Err(_) => b.iter().map(|x| format!("{x:02x}")).collect::<String>(),
    }
}

#[cfg(test)]
mod tests;
