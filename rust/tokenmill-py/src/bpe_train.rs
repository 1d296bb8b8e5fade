//! Bindings for `tokenmill_core::train` (conversion only; policy lives in python/tokenmill/tokenizer.py).

use crate::error::to_py;
use crate::utils::detach;
use pyo3::exceptions::PyTypeError;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyString};
use std::path::PathBuf;
use tokenmill_core::bpe::train::{self, Coverage, Progress, TrainOptions, Trained, WordCounter};
use tokenmill_core::pretokenize::Pretokenizer;

/// Texts pulled from the Python iterator per batch (the GIL is held only while pulling).
const CHUNK_BYTES: usize = 8 << 20;
const CHUNK_TEXTS: usize = 8192;

fn options(
    vocab_size: usize,
    special_tokens: Vec<String>,
    min_frequency: u64,
    show_progress: bool,
) -> PyResult<TrainOptions> {
    let opts = TrainOptions {
        vocab_size,
        special_tokens,
        min_frequency,
        show_progress,
    };
    opts.num_merges().map_err(to_py)?;
    Ok(opts)
}

/// (mergeable tokens in id order, bytes the pattern dropped, bytes counted).
type TrainResult<'py> = (Vec<Bound<'py, PyBytes>>, u64, u64);

fn result(py: Python<'_>, trained: Trained, coverage: Coverage) -> TrainResult<'_> {
    let tokens = trained.tokens.iter().map(|t| PyBytes::new(py, t)).collect();
    (tokens, coverage.dropped, coverage.bytes)
}

/// Train byte-level BPE on an iterable of str. `strict`: refuse, before the merge loop, a pattern
/// that leaves bytes of the corpus uncovered.
#[pyfunction]
#[pyo3(signature = (texts, vocab_size, pattern, special_tokens, min_frequency, show_progress, strict))]
#[allow(clippy::too_many_arguments)]
pub fn train_bpe<'py>(
    py: Python<'py>,
    texts: &Bound<'py, PyAny>,
    vocab_size: usize,
    pattern: &str,
    special_tokens: Vec<String>,
    min_frequency: u64,
    show_progress: bool,
    strict: bool,
) -> PyResult<TrainResult<'py>> {
    if texts.is_instance_of::<PyString>() {
        return Err(PyTypeError::new_err(
            "texts must be an iterable of str, not a str",
        ));
    }
    let opts = options(vocab_size, special_tokens, min_frequency, show_progress)?;
    let pre = Pretokenizer::new(pattern).map_err(to_py)?;
    let mut counter = WordCounter::new(&pre, &opts.special_tokens).map_err(to_py)?;
    let mut bar = Progress::new("counting", "B", None, show_progress);
    let mut iter = texts.try_iter()?;
    let mut index = 0usize;
    loop {
        let (mut chunk, mut size) = (Vec::new(), 0);
        while size < CHUNK_BYTES && chunk.len() < CHUNK_TEXTS {
            let Some(item) = iter.next() else { break };
            let item = item?;
            let s = item.cast::<PyString>().map_err(|_| {
                let ty = item
                    .get_type()
                    .name()
                    .map(|n| n.to_string())
                    .unwrap_or_default();
                PyTypeError::new_err(format!("texts must be str, item {index} is {ty}"))
            })?;
            let s = s.to_cow()?.into_owned();
            size += s.len();
            index += 1;
            chunk.push(s);
        }
        if chunk.is_empty() {
            break;
        }
        detach(py, || {
            counter.add_texts(&chunk);
            Ok(())
        })?;
        bar.update(counter.bytes());
    }
    bar.finish(counter.bytes());
    let coverage = counter.coverage();
    coverage.check(strict).map_err(to_py)?;
    let trained = detach(py, move || {
        train::train_counts(counter.into_counts(), &opts)
    })?;
    Ok(result(py, trained, coverage))
}

/// Train byte-level BPE on UTF-8 files (each one document), read and counted in Rust.
#[pyfunction]
#[pyo3(signature = (paths, vocab_size, pattern, special_tokens, min_frequency, show_progress, strict))]
#[allow(clippy::too_many_arguments)]
pub fn train_bpe_files<'py>(
    py: Python<'py>,
    paths: Vec<PathBuf>,
    vocab_size: usize,
    pattern: &str,
    special_tokens: Vec<String>,
    min_frequency: u64,
    show_progress: bool,
    strict: bool,
) -> PyResult<TrainResult<'py>> {
    let opts = options(vocab_size, special_tokens, min_frequency, show_progress)?;
    let pre = Pretokenizer::new(pattern).map_err(to_py)?;
    let (trained, coverage) = detach(py, move || {
        let counter = train::count_files(&paths, &pre, &opts)?;
        let coverage = counter.coverage();
        coverage.check(strict)?;
        Ok((train::train_counts(counter.into_counts(), &opts)?, coverage))
    })?;
    Ok(result(py, trained, coverage))
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(train_bpe, m)?)?;
    m.add_function(wrap_pyfunction!(train_bpe_files, m)?)?;
    Ok(())
}
