//! A bounded piece -> ids cache for pieces that are not tokens themselves, shared by every thread
//! that encodes with one tokenizer. Prose repeats its words (a German compound or a Russian
//! inflection is one piece but several tokens), so most merges are of pieces merged before.
//!
//! One `RwLock` around one hash map, taken per piece and never waited for: `try_read` /
//! `try_write`, and a piece whose lock is busy is merged without the cache (Hugging Face
//! tokenizers does the same). The result is the same either way, so the cache can never change
//! ids, only time.
//!
//! When full the map is frozen (no more inserts), as in Hugging Face tokenizers. Emptying it when
//! full instead was measured and dropped: on text whose words rarely repeat (the bench's "rare
//! words" rows, ~52k distinct words in 3 MB) every miss then paid an insert (two allocations) and
//! every 32k misses a clear, and encode fell to 1.7-2.0x tiktoken against 2.1-2.3x with no cache
//! at all. Frozen, a miss costs a read lock and a probe, and with Zipfian words the frequent ones
//! arrive early and are the ones kept: 3.1-3.3x on the same rows.

use rustc_hash::FxHashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::RwLock;

/// At most this many pieces. With pieces of at most [`MAX_PIECE`] bytes a full map holds at most
/// ~13 MB (every piece 64 bytes that stay 64 single-byte tokens), ~3 MB when full of 11-byte pieces
/// of 3 tokens (the average non-token piece of the prose bench).
pub const CAPACITY: usize = 1 << 15;
/// Longer pieces are not cached: they are rare, and would make the bound loose.
pub const MAX_PIECE: usize = 64;

type Map = FxHashMap<Box<[u8]>, Box<[u32]>>;

#[derive(Default)]
pub struct PieceCache {
    map: RwLock<Map>,
    /// Set once the map holds `CAPACITY` pieces: later misses skip the write lock.
    full: AtomicBool,
}

impl PieceCache {
    /// Append the cached ids of `piece` to `out`; false when it is not cached (or the lock is busy).
    #[inline]
    pub fn get_into(&self, piece: &[u8], out: &mut Vec<u32>) -> bool {
        let Ok(map) = self.map.try_read() else {
            return false;
        };
        match map.get(piece) {
            Some(ids) => {
                out.extend_from_slice(ids);
                true
            }
            None => false,
        }
    }

    #[inline]
    pub fn insert(&self, piece: &[u8], ids: &[u32]) {
        if piece.len() > MAX_PIECE {
            return;
        }
        if self.full.load(Ordering::Relaxed) {
            return;
        }
        let Ok(mut map) = self.map.try_write() else {
            return;
        };
        if map.len() >= CAPACITY {
            self.full.store(true, Ordering::Relaxed);
            return;
        }
        map.insert(piece.into(), ids.into());
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.map.read().map_or(0, |m| m.len())
    }
}
