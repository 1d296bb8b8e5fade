//! Bindings for `tokenmill_core::data` (token files and the loader). Conversion only: policy lives in
//! python/tokenmill/data/{dataset,loader}.py.

use crate::error::to_py;
use crate::utils::detach;
use numpy::{PyArray1, PyReadwriteArray1, PyReadwriteArray2};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use std::path::PathBuf;
use tokenmill_core::data::loader::{self, Config, SourceSpec};
use tokenmill_core::data::mmidx::{DType, IndexedDataset};
use tokenmill_core::data::packing::Packing;

fn dtype(name: &str) -> PyResult<DType> {
    match name {
        "uint8" => Ok(DType::U8),
        "uint16" => Ok(DType::U16),
        "int32" => Ok(DType::I32),
        "int64" => Ok(DType::I64),
        other => Err(PyValueError::new_err(format!(
            "dtype must be uint8, uint16, int32 or int64, got {other:?}"
        ))),
    }
}

/// Write documents (sequences of token ids) to PREFIX.bin/.idx atomically.
#[pyfunction]
pub fn write_token_file(
    py: Python<'_>,
    prefix: PathBuf,
    docs: Vec<Vec<u32>>,
    dtype_name: &str,
) -> PyResult<()> {
    let dt = dtype(dtype_name)?;
    detach(py, move || loader::write_documents(&prefix, dt, &docs))
}

/// Validate an MMIDIDX dataset and return (dtype name, lengths, token offsets).
#[pyfunction]
#[allow(clippy::type_complexity)]
pub fn open_token_file<'py>(
    py: Python<'py>,
    prefix: PathBuf,
) -> PyResult<(
    &'static str,
    Bound<'py, PyArray1<i64>>,
    Bound<'py, PyArray1<i64>>,
)> {
    let (name, lengths, offsets) = detach(py, move || {
        let ds = IndexedDataset::open(&prefix)?;
        let n = ds.num_sequences();
        let lengths: Vec<i64> = (0..n).map(|i| ds.sequence_len(i) as i64).collect();
        let offsets: Vec<i64> = (0..n).map(|i| ds.sequence_offset(i) as i64).collect();
        Ok((ds.dtype().name(), lengths, offsets))
    })?;
    Ok((
        name,
        PyArray1::from_vec(py, lengths),
        PyArray1::from_vec(py, offsets),
    ))
}

#[pyclass(module = "tokenmill._core", name = "Loader", frozen)]
pub struct PyLoader {
    inner: loader::Loader,
}

#[pymethods]
impl PyLoader {
    #[new]
    #[allow(clippy::too_many_arguments)]
    #[pyo3(signature = (prefixes, masks, weights, seq_len, packing, seed, document_mask, epochs, pad_id, num_threads))]
    fn new(
        py: Python<'_>,
        prefixes: Vec<PathBuf>,
        masks: Vec<Option<PathBuf>>,
        weights: Vec<f64>,
        seq_len: u32,
        packing: &str,
        seed: u64,
        document_mask: bool,
        epochs: Option<u64>,
        pad_id: i64,
        num_threads: usize,
    ) -> PyResult<Self> {
        let packing = match packing {
            "concat" => Packing::Concat,
            "best_fit" => Packing::BestFit,
            "none" => Packing::Windows,
            other => {
                return Err(PyValueError::new_err(format!(
                    "packing must be 'concat', 'best_fit' or 'none', got {other:?}"
                )))
            }
        };
        if prefixes.len() != masks.len() || prefixes.len() != weights.len() {
            return Err(PyValueError::new_err(
                "prefixes, masks and weights differ in length",
            ));
        }
        let specs: Vec<SourceSpec> = prefixes
            .into_iter()
            .zip(masks)
            .zip(weights)
            .map(|((prefix, mask), weight)| SourceSpec {
                prefix,
                mask,
                weight,
            })
            .collect();
        let cfg = Config {
            seq_len,
            packing,
            seed,
            document_mask,
            epochs,
            pad_id,
            num_threads,
        };
        let inner = detach(py, move || loader::Loader::new(&specs, cfg))?;
        Ok(PyLoader { inner })
    }

    /// Samples in the global stream, or None when it is endless.
    fn num_samples(&self) -> Option<u64> {
        self.inner.len()
    }

    fn samples_per_epoch(&self) -> Vec<u64> {
        self.inner.samples_per_epoch()
    }

    fn mixture_counts(&self) -> Vec<u64> {
        self.inner.mixture_counts().to_vec()
    }

    /// Source index of global samples start..start+n.
    fn sources<'py>(&self, py: Python<'py>, start: u64, n: u64) -> PyResult<Bound<'py, PyArray1<i64>>> {
        let v = detach(py, || {
            Ok((start..start + n)
                .map(|g| self.inner.locate(g).0 as i64)
                .collect::<Vec<_>>())
        })?;
        Ok(PyArray1::from_vec(py, v))
    }

    /// (source, epoch, [(doc, start, len), ...]) of global sample g.
    #[allow(clippy::type_complexity)]
    fn sample(&self, g: u64) -> PyResult<(usize, u64, Vec<(u32, u32, u32)>)> {
        let (s, e, pieces) = self.inner.sample(g).map_err(to_py)?;
        Ok((
            s,
            e,
            pieces.iter().map(|p| (p.doc, p.start, p.len)).collect(),
        ))
    }

    /// Render global samples start..start+B into the [B, T] int64 buffers (GIL released).
    /// Returns (number of cu_seqlens entries written, max_seqlen).
    fn fill(
        &self,
        py: Python<'_>,
        start: u64,
        mut input_ids: PyReadwriteArray2<'_, i64>,
        mut labels: PyReadwriteArray2<'_, i64>,
        mut position_ids: PyReadwriteArray2<'_, i64>,
        mut cu_seqlens: PyReadwriteArray1<'_, i32>,
    ) -> PyResult<(usize, usize)> {
        let rows = input_ids.as_array().nrows();
        let contiguous = || PyValueError::new_err("batch buffers must be C-contiguous");
        let a = input_ids.as_slice_mut().map_err(|_| contiguous())?;
        let b = labels.as_slice_mut().map_err(|_| contiguous())?;
        let c = position_ids.as_slice_mut().map_err(|_| contiguous())?;
        let d = cu_seqlens.as_slice_mut().map_err(|_| contiguous())?;
        let info = detach(py, move || self.inner.fill(start, rows, a, b, c, d))?;
        Ok((info.cu_len, info.max_seqlen))
    }
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(write_token_file, m)?)?;
    m.add_function(wrap_pyfunction!(open_token_file, m)?)?;
    m.add_class::<PyLoader>()?;
    Ok(())
}
