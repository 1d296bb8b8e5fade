//! Bindings for `tokenmill_core::eval` (conversion only; policy lives in python/tokenmill/eval.py).

use crate::utils::detach;
use pyo3::prelude::*;
use tokenmill_core::eval::{self, EditCounts, EditOp, Unit};

fn unit(name: &str) -> PyResult<Unit> {
    match name {
        "word" => Ok(Unit::Word),
        "char" => Ok(Unit::Char),
        other => Err(pyo3::exceptions::PyValueError::new_err(format!(
            "unit must be 'word' or 'char', got {other:?}"
        ))),
    }
}

fn tuple(c: EditCounts) -> (u64, u64, u64, u64) {
    (c.hits, c.substitutions, c.deletions, c.insertions)
}

/// Corpus-level (hits, substitutions, deletions, insertions), computed in parallel without the GIL.
#[pyfunction]
pub fn edit_counts(
    py: Python<'_>,
    references: Vec<String>,
    hypotheses: Vec<String>,
    unit_name: &str,
) -> PyResult<(u64, u64, u64, u64)> {
    let u = unit(unit_name)?;
    detach(py, move || eval::corpus_counts(&references, &hypotheses, u)).map(tuple)
}

/// The error rate for corpus-level counts; raises ValueError when undefined.
#[pyfunction]
pub fn error_rate(counts: (u64, u64, u64, u64), unit_name: &str) -> PyResult<f64> {
    let (hits, substitutions, deletions, insertions) = counts;
    let c = EditCounts {
        hits,
        substitutions,
        deletions,
        insertions,
    };
    eval::error_rate(&c, unit(unit_name)?).map_err(crate::error::to_py)
}

/// One pair's alignment: (tokens_ref, tokens_hyp, [(op, ref_index | None, hyp_index | None), ...]).
#[pyfunction]
#[allow(clippy::type_complexity)]
pub fn align(
    reference: &str,
    hypothesis: &str,
    unit_name: &str,
) -> PyResult<(
    Vec<String>,
    Vec<String>,
    Vec<(&'static str, Option<usize>, Option<usize>)>,
)> {
    let u = unit(unit_name)?;
    let (r, h) = eval::pair_ids(reference, hypothesis, u);
    let ops = eval::align(&r, &h)
        .into_iter()
        .map(|(op, i, j)| {
            let name = match op {
                EditOp::Equal => "equal",
                EditOp::Substitute => "substitute",
                EditOp::Delete => "delete",
                EditOp::Insert => "insert",
            };
            (name, i, j)
        })
        .collect();
    let split = |s: &str| -> Vec<String> {
        match u {
            Unit::Word => eval::words_jiwer(s).map(str::to_owned).collect(),
            Unit::Char => eval::chars_jiwer(s)
                .into_iter()
                .filter_map(char::from_u32)
                .map(String::from)
                .collect(),
        }
    };
    Ok((split(reference), split(hypothesis), ops))
}

/// Levenshtein distance between two integer sequences (token ids).
#[pyfunction]
pub fn levenshtein(py: Python<'_>, a: Vec<u32>, b: Vec<u32>) -> PyResult<u64> {
    detach(py, move || Ok(eval::distance(&a, &b)))
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(edit_counts, m)?)?;
    m.add_function(wrap_pyfunction!(error_rate, m)?)?;
    m.add_function(wrap_pyfunction!(align, m)?)?;
    m.add_function(wrap_pyfunction!(levenshtein, m)?)?;
    Ok(())
}
