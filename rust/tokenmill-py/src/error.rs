//! The one place where core errors become Python exceptions, variant by variant.

use pyo3::exceptions::{
    PyFileNotFoundError, PyKeyboardInterrupt, PyOSError, PyPermissionError, PyValueError,
};
use pyo3::PyErr;
use tokenmill_core::Error;

pub fn to_py(err: Error) -> PyErr {
    let msg = err.to_string();
    match err {
        Error::InvalidArgument(_)
        | Error::Format { .. }
        | Error::Record { .. }
        | Error::Token(_) => PyValueError::new_err(msg),
        Error::Io { source, .. } => match source.kind() {
            std::io::ErrorKind::NotFound => PyFileNotFoundError::new_err(msg),
            std::io::ErrorKind::PermissionDenied => PyPermissionError::new_err(msg),
            _ => PyOSError::new_err(msg),
        },
        Error::Interrupted(_) => PyKeyboardInterrupt::new_err(msg),
        // A Python exception raised in a callback goes back as it was raised.
        Error::External { source, .. } => match source.downcast::<PyErr>() {
            Ok(e) => *e,
            Err(_) => PyValueError::new_err(msg),
        },
    }
}
