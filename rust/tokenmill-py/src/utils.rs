//! "Release the GIL, run, map the error": the one wrapper every long call goes through.

use crate::error::to_py;
use pyo3::prelude::*;

pub fn detach<T: Send>(
    py: Python<'_>,
    f: impl FnOnce() -> tokenmill_core::Result<T> + Send,
) -> PyResult<T> {
    py.detach(f).map_err(to_py)
}
