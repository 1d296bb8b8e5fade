//! The one error type of the core. Each variant becomes exactly one Python exception in
//! `tokenmill-py/src/error.rs`; messages name the file, line or token at fault.

use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A caller passed an argument outside its domain (Python: ValueError).
    #[error("{0}")]
    InvalidArgument(String),

    /// An operating-system error on a named file (Python: FileNotFoundError / PermissionError / OSError).
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// A file whose contents are malformed, truncated or of a foreign format (Python: ValueError).
    #[error("{path}: {message}")]
    Format { path: PathBuf, message: String },

    /// A bad record in an input file, with its 1-based line number (Python: ValueError).
    #[error("{path}:{line}: {message}")]
    Record {
        path: PathBuf,
        line: u64,
        message: String,
    },

    /// A token or text that the tokenizer refuses, e.g. a disallowed special token (Python: ValueError).
    #[error("{0}")]
    Token(String),

    /// The caller asked the run to stop (Ctrl-C); nothing was left behind (Python: KeyboardInterrupt).
    #[error("{0}")]
    Interrupted(String),

    /// An error raised by a caller-supplied source (a Python Parquet reader), passed back unchanged:
    /// the binding returns the original exception, with its own type.
    #[error("{path}: {source}")]
    External {
        path: PathBuf,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub fn io(path: impl AsRef<Path>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.as_ref().to_path_buf(),
            source,
        }
    }

    pub fn format(path: impl AsRef<Path>, message: impl Into<String>) -> Self {
        Error::Format {
            path: path.as_ref().to_path_buf(),
            message: message.into(),
        }
    }

    pub fn invalid(message: impl Into<String>) -> Self {
        Error::InvalidArgument(message.into())
    }
}
