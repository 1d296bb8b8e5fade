//! tokenmill-core: the algorithms behind tokenmill, in plain Rust (no PyO3).
//!
//! Every fallible function returns [`Result`]; the binding crate maps each [`Error`] kind to one
//! Python exception. Nothing here may panic on user input.

pub mod bpe;
pub mod data;
pub mod error;
pub mod eval;
pub mod formats;
pub mod fsutil;
pub mod par;
pub mod pretokenize;
pub mod progress;

pub use error::{Error, Result};
