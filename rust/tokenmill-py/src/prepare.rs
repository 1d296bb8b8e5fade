//! Bindings for corpus preparation (`tokenmill_core::data::prepare` / `manifest`). Conversion only;
//! policy (input expansion, formats, EOS choice, summaries) lives in python/tokenmill/data/prepare.py.

use crate::tokenizer::PyTokenizer;
use crate::utils::detach;
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyString};
use std::path::{Path, PathBuf};
use tokenmill_core::data::inputs::{ExternalSource, Input, InputFormat};
use tokenmill_core::data::manifest;
use tokenmill_core::data::mmidx::IndexedDataset;
use tokenmill_core::data::prepare::{self, OnError, PrepareOptions};
use tokenmill_core::Error;

/// Records of external inputs (Parquet) from a Python object with `open(path)` and
/// `next_batch() -> list[str | bytes | None] | None`, called with the GIL re-acquired.
struct PyExternal {
    obj: Py<PyAny>,
    path: PathBuf,
}

impl PyExternal {
    /// The exception goes back to Python as raised (see `error::to_py`).
    fn err(&self, e: PyErr) -> Error {
        Error::External {
            path: self.path.clone(),
            source: Box::new(e),
        }
    }
}

impl ExternalSource for PyExternal {
    fn open(&mut self, path: &Path) -> tokenmill_core::Result<()> {
        self.path = path.to_path_buf();
        Python::attach(|py| {
            self.obj
                .call_method1(py, "open", (path.to_string_lossy().into_owned(),))
                .map(|_| ())
                .map_err(|e| self.err(e))
        })
    }

    fn next_batch(&mut self) -> tokenmill_core::Result<Option<Vec<Option<Vec<u8>>>>> {
        Python::attach(|py| {
            let batch = self
                .obj
                .call_method0(py, "next_batch")
                .map_err(|e| self.err(e))?;
            let batch = batch.bind(py);
            if batch.is_none() {
                return Ok(None);
            }
            let mut out = Vec::with_capacity(batch.len().unwrap_or(0));
            for item in batch.try_iter().map_err(|e| self.err(e))? {
                let item = item.map_err(|e| self.err(e))?;
                out.push(if item.is_none() {
                    None
                } else if let Ok(s) = item.cast::<PyString>() {
                    // Lone surrogates cannot be UTF-8: pass the lossy bytes' failure on as invalid UTF-8.
                    Some(match s.to_cow() {
                        Ok(s) => s.as_bytes().to_vec(),
                        Err(_) => vec![0xff],
                    })
                } else if let Ok(b) = item.cast::<PyBytes>() {
                    Some(b.as_bytes().to_vec())
                } else {
                    return Err(Error::format(
                        &self.path,
                        format!(
                            "expected str, bytes or None records, got {}",
                            item.get_type()
                                .name()
                                .map(|n| n.to_string())
                                .unwrap_or_default()
                        ),
                    ));
                });
            }
            Ok(Some(out))
        })
    }
}

/// Runs Python's signal handlers (on the main thread); a pending KeyboardInterrupt stops the run
/// with `Error::Interrupted`.
fn interrupted() -> bool {
    Python::attach(|py| py.check_signals().is_err())
}

/// Tokenize inputs `[(path, "text"|"jsonl"|"external", delimiter)]` into `prefix`; returns the
/// manifest as JSON.
#[pyfunction]
#[pyo3(signature = (inputs, prefix, tokenizer, text_key, eos_id, on_error, num_workers, num_shards, shard_index, progress, chunk_bytes, external=None))]
#[allow(clippy::too_many_arguments)]
pub fn prepare_corpus(
    py: Python<'_>,
    inputs: Vec<(PathBuf, String, Option<String>)>,
    prefix: PathBuf,
    tokenizer: PyRef<'_, PyTokenizer>,
    text_key: String,
    eos_id: Option<u32>,
    on_error: &str,
    num_workers: Option<usize>,
    num_shards: usize,
    shard_index: usize,
    progress: bool,
    chunk_bytes: usize,
    external: Option<Py<PyAny>>,
) -> PyResult<String> {
    let inputs = inputs
        .into_iter()
        .map(|(path, format, delimiter)| {
            let format = match format.as_str() {
                "text" => InputFormat::Text { delimiter },
                "jsonl" => InputFormat::JsonLines,
                "external" => InputFormat::External,
                other => {
                    return Err(PyValueError::new_err(format!(
                        "unknown input format {other:?}"
                    )))
                }
            };
            Ok(Input { path, format })
        })
        .collect::<PyResult<Vec<_>>>()?;
    let on_error = match on_error {
        "skip" => OnError::Skip,
        "fail" => OnError::Fail,
        other => {
            return Err(PyValueError::new_err(format!(
                "on_error must be 'skip' or 'fail', got {other:?}"
            )))
        }
    };
    let opts = PrepareOptions {
        text_key,
        eos_id,
        on_error,
        num_workers,
        chunk_bytes,
        num_shards,
        shard_index,
        progress,
        interrupted: Some(interrupted),
    };
    let tok = tokenizer.inner.clone();
    drop(tokenizer);
    let mut ext = external.map(|obj| PyExternal {
        obj,
        path: PathBuf::new(),
    });
    detach(py, move || {
        let ext = ext.as_mut().map(|e| e as &mut dyn ExternalSource);
        prepare::prepare(&inputs, &prefix, &*tok, ext, &opts).map(|m| m.to_json())
    })
}

/// Statistics of a prepared (or any MMIDIDX) dataset, as JSON.
#[pyfunction]
pub fn prepared_stats(py: Python<'_>, prefix: PathBuf, top_k: usize) -> PyResult<String> {
    detach(py, move || {
        let ds = IndexedDataset::open(&prefix)?;
        let s = manifest::stats(&ds, top_k)?;
        Ok(s.to_json())
    })
}

/// Problems found re-checking a prepared dataset against its manifest (empty: intact).
#[pyfunction]
pub fn prepared_verify(py: Python<'_>, prefix: PathBuf) -> PyResult<Vec<String>> {
    detach(py, move || manifest::verify(&prefix))
}

/// Size and xxh3-128 (hex) of a file's bytes, as manifests record them; checkpoints use it too.
#[pyfunction]
pub fn file_checksum(py: Python<'_>, path: PathBuf) -> PyResult<(u64, String)> {
    detach(py, move || manifest::file_checksum(&path))
}

/// Merge prepared shards into one dataset; returns the merged manifest as JSON.
#[pyfunction]
pub fn prepared_merge(py: Python<'_>, shards: Vec<PathBuf>, prefix: PathBuf) -> PyResult<String> {
    detach(py, move || {
        manifest::merge(&shards, &prefix).map(|m| m.to_json())
    })
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(prepare_corpus, m)?)?;
    m.add_function(wrap_pyfunction!(prepared_stats, m)?)?;
    m.add_function(wrap_pyfunction!(prepared_verify, m)?)?;
    m.add_function(wrap_pyfunction!(prepared_merge, m)?)?;
    m.add_function(wrap_pyfunction!(file_checksum, m)?)?;
    Ok(())
}
