//! Bindings for `tokenmill_core::data` (token files and the loader). Conversion only: policy lives in
//! python/tokenmill/data/{dataset,loader}.py.

use crate::error::to_py;
use crate::utils::detach;
use numpy::ndarray::{ArrayView1, ArrayView2};
use numpy::{PyArray1, PyArray2, PyReadwriteArray1, PyReadwriteArray2};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use tokenmill_core::data::loader::{
    self, Batch, BufferPool, Config, Prefetcher, Schedule, SourceSpec,
};
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

/// The dtype of token ids for a vocabulary of `vocab_size` ids (Megatron's rule, the one in
/// `DType::for_vocab`).
#[pyfunction]
pub fn token_dtype(vocab_size: usize) -> &'static str {
    DType::for_vocab(vocab_size).name()
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
    inner: Arc<loader::Loader>,
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
        Ok(PyLoader {
            inner: Arc::new(inner),
        })
    }

    /// Start rendering batches first + j * stride (j < count; endless when None) on a Rust thread,
    /// `depth` batches ahead.
    #[pyo3(signature = (first, stride, rows, count, depth))]
    fn prefetch(
        &self,
        first: u64,
        stride: u64,
        rows: usize,
        count: Option<u64>,
        depth: usize,
    ) -> PyResult<PyPrefetcher> {
        let schedule = Schedule {
            first,
            stride,
            rows,
            count,
        };
        let p = Prefetcher::start(self.inner.clone(), schedule, depth).map_err(to_py)?;
        Ok(PyPrefetcher {
            pool: p.pool(),
            inner: Mutex::new(Some(p)),
            seq_len: self.inner.seq_len(),
        })
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
    fn sources<'py>(
        &self,
        py: Python<'py>,
        start: u64,
        n: u64,
    ) -> PyResult<Bound<'py, PyArray1<i64>>> {
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

type BatchArrays<'py> = (
    Bound<'py, PyArray2<i64>>,
    Bound<'py, PyArray2<i64>>,
    Bound<'py, PyArray2<i64>>,
    Bound<'py, PyArray1<i32>>,
    usize,
);

#[pyclass(module = "tokenmill._core", name = "Prefetcher", frozen)]
pub struct PyPrefetcher {
    inner: Mutex<Option<Prefetcher>>,
    pool: Arc<BufferPool>,
    seq_len: usize,
}

/// Owns one rendered buffer while numpy arrays borrow it; on release (the last array/tensor gone)
/// the buffer goes back to the prefetcher's pool for the next batch.
#[pyclass(module = "tokenmill._core", name = "_BatchBuffer", frozen)]
struct BatchBuffer {
    wide: Option<Vec<i64>>,
    narrow: Option<Vec<i32>>,
    pool: Arc<BufferPool>,
}

impl Drop for BatchBuffer {
    fn drop(&mut self) {
        if let Some(v) = self.wide.take() {
            self.pool.give_wide(v);
        }
        if let Some(v) = self.narrow.take() {
            self.pool.give_narrow(v);
        }
    }
}

fn matrix<'py>(
    py: Python<'py>,
    v: Vec<i64>,
    rows: usize,
    cols: usize,
    pool: &Arc<BufferPool>,
) -> PyResult<Bound<'py, PyArray2<i64>>> {
    let owner = Bound::new(
        py,
        BatchBuffer {
            wide: Some(v),
            narrow: None,
            pool: pool.clone(),
        },
    )?;
    let data = owner.get().wide.as_deref().unwrap_or_default();
    let view = ArrayView2::from_shape((rows, cols), data)
        .map_err(|e| PyValueError::new_err(format!("batch shape: {e}")))?;
    // SAFETY: `owner` keeps the Vec alive and unmoved for as long as the array exists (it is the
    // array's base object), and nothing writes to it until the owner is dropped.
    Ok(unsafe { PyArray2::borrow_from_array(&view, owner.clone().into_any()) })
}

fn vector<'py>(
    py: Python<'py>,
    v: Vec<i32>,
    len: usize,
    pool: &Arc<BufferPool>,
) -> PyResult<Bound<'py, PyArray1<i32>>> {
    let owner = Bound::new(
        py,
        BatchBuffer {
            wide: None,
            narrow: Some(v),
            pool: pool.clone(),
        },
    )?;
    let data = owner.get().narrow.as_deref().unwrap_or_default();
    let view = ArrayView1::from(&data[..len]);
    // SAFETY: as in `matrix`.
    Ok(unsafe { PyArray1::borrow_from_array(&view, owner.clone().into_any()) })
}

#[pymethods]
impl PyPrefetcher {
    /// The next batch as numpy arrays owned by Rust memory (input_ids, labels, position_ids,
    /// cu_seqlens, max_seqlen), or None when the schedule is done. Waits with the GIL released.
    fn next<'py>(&self, py: Python<'py>) -> PyResult<Option<BatchArrays<'py>>> {
        let got: Option<Batch> = detach(py, || {
            let mut guard = self.inner.lock().unwrap_or_else(|e| e.into_inner());
            match guard.as_mut().and_then(|p| p.recv()) {
                None => Ok(None),
                Some(r) => r.map(Some),
            }
        })?;
        let Some(b) = got else { return Ok(None) };
        let (t, pool) = (self.seq_len, &self.pool);
        Ok(Some((
            matrix(py, b.input_ids, b.rows, t, pool)?,
            matrix(py, b.labels, b.rows, t, pool)?,
            matrix(py, b.position_ids, b.rows, t, pool)?,
            vector(py, b.cu_seqlens, b.cu_len, pool)?,
            b.max_seqlen,
        )))
    }

    /// Stop the thread now (also happens when the object is dropped).
    fn close(&self, py: Python<'_>) {
        py.detach(|| drop(self.inner.lock().unwrap_or_else(|e| e.into_inner()).take()));
    }
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(write_token_file, m)?)?;
    m.add_function(wrap_pyfunction!(open_token_file, m)?)?;
    m.add_function(wrap_pyfunction!(token_dtype, m)?)?;
    m.add_class::<PyLoader>()?;
    m.add_class::<PyPrefetcher>()?;
    m.add_class::<BatchBuffer>()?;
    Ok(())
}
