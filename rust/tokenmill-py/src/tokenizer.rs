//! Bindings for `tokenmill_core::bpe::Tokenizer` (conversion only; policy lives in
//! python/tokenmill/tokenizer.py). Every call that may touch a lot of text releases the GIL.

use crate::utils::detach;
use numpy::PyArray1;
use pyo3::prelude::*;
use pyo3::pybacked::{PyBackedBytes, PyBackedStr};
use pyo3::types::{PyBytes, PyList};
use std::sync::{Arc, OnceLock};
use tokenmill_core::bpe::Tokenizer;
use tokenmill_core::formats;

#[pyclass(module = "tokenmill._core", name = "CoreTokenizer", frozen)]
pub struct PyTokenizer {
    pub inner: Arc<Tokenizer>,
    /// One Python int per id, made on first use: result lists share them instead of allocating
    /// an int per token (the list conversion was ~40% of a from-Python encode).
    ints: OnceLock<Vec<Py<PyAny>>>,
}

fn refs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

impl PyTokenizer {
    fn wrap(t: Tokenizer) -> Self {
        PyTokenizer {
            inner: Arc::new(t),
            ints: OnceLock::new(),
        }
    }

    /// `ids` as a Python list of the cached int objects. Every id comes from the encoder, so it is
    /// below n_vocab; the bound is checked anyway.
    fn list<'py>(&self, py: Python<'py>, ids: &[u32]) -> PyResult<Bound<'py, PyList>> {
        let ints = self.ints.get_or_init(|| {
            (0..self.inner.n_vocab() as u64)
                .map(|i| i.into_pyobject(py).expect("int").into_any().unbind())
                .collect()
        });
        let n = ids.len() as pyo3::ffi::Py_ssize_t;
        // SAFETY: the GIL is held; PyList_New gives a new list of `n` empty slots, each filled
        // exactly once with a new reference (PyList_SetItem steals it).
        unsafe {
            let list = pyo3::ffi::PyList_New(n);
            if list.is_null() {
                return Err(PyErr::fetch(py));
            }
            let list = Bound::from_owned_ptr(py, list);
            for (i, &id) in ids.iter().enumerate() {
                let obj = ints
                    .get(id as usize)
                    .ok_or_else(|| {
                        pyo3::exceptions::PyValueError::new_err(format!(
                            "token id {id} out of range"
                        ))
                    })?
                    .as_ptr();
                pyo3::ffi::Py_IncRef(obj);
                pyo3::ffi::PyList_SetItem(list.as_ptr(), i as pyo3::ffi::Py_ssize_t, obj);
            }
            Ok(list.cast_into_unchecked())
        }
    }

    /// Batch encode with the GIL released; the calling thread turns finished results into lists
    /// (taking the GIL per run of ready results) while the other threads go on encoding.
    fn batch(
        &self,
        py: Python<'_>,
        texts: &[PyBackedStr],
        allowed: &[String],
        disallowed: Option<&[String]>,
        num_threads: Option<usize>,
    ) -> PyResult<Vec<Py<PyList>>> {
        let mut lists = Vec::with_capacity(texts.len());
        let mut py_err = None;
        let r = py.detach(|| {
            self.inner.encode_batch_with(
                texts,
                &refs(allowed),
                disallowed.map(refs).as_deref(),
                num_threads,
                |run| {
                    Python::attach(|py| {
                        for ids in run {
                            lists.push(self.list(py, &ids)?.unbind());
                        }
                        Ok(())
                    })
                    .map_err(|e: PyErr| {
                        py_err = Some(e);
                        tokenmill_core::Error::invalid("converting a result to a list failed")
                    })
                },
            )
        });
        match (r, py_err) {
            (_, Some(e)) => Err(e),
            (Err(e), None) => Err(crate::error::to_py(e)),
            (Ok(()), None) => Ok(lists),
        }
    }
}

#[pymethods]
impl PyTokenizer {
    /// Mergeable tokens in id order, a pattern (name or regex), special tokens (text, id).
    #[staticmethod]
    fn from_ranks(
        py: Python<'_>,
        tokens: Vec<PyBackedBytes>,
        pattern: String,
        specials: Vec<(String, u32)>,
    ) -> PyResult<Self> {
        let tokens: Vec<Vec<u8>> = tokens.iter().map(|t| t.to_vec()).collect();
        detach(py, move || {
            Tokenizer::from_ranks(tokens, &pattern, specials)
        })
        .map(Self::wrap)
    }

    /// Our own format (see tokenmill_core::formats::native).
    #[staticmethod]
    fn load(py: Python<'_>, path: String) -> PyResult<Self> {
        detach(py, move || formats::native::load(&path)).map(Self::wrap)
    }

    fn save(&self, py: Python<'_>, path: String) -> PyResult<()> {
        let t = self.inner.clone();
        detach(py, move || formats::native::save(&t, &path))
    }

    /// The native format as a string (what `save` writes): pickling sends this to other processes.
    fn to_native(&self, py: Python<'_>) -> String {
        let t = self.inner.clone();
        py.detach(move || formats::native::to_string(&t))
    }

    /// Parse the native format from a string; `source` names it in errors.
    #[staticmethod]
    fn from_native(py: Python<'_>, text: PyBackedStr, source: String) -> PyResult<Self> {
        detach(py, move || {
            formats::native::parse(&text, std::path::Path::new(&source))
        })
        .map(Self::wrap)
    }

    #[staticmethod]
    fn from_tiktoken_file(
        py: Python<'_>,
        path: String,
        pattern: String,
        specials: Vec<(String, u32)>,
    ) -> PyResult<Self> {
        detach(py, move || {
            formats::tiktoken::load(&path, &pattern, specials)
        })
        .map(Self::wrap)
    }

    fn save_tiktoken(&self, py: Python<'_>, path: String) -> PyResult<()> {
        let t = self.inner.clone();
        detach(py, move || formats::tiktoken::save(&t, &path))
    }

    #[staticmethod]
    fn from_huggingface(py: Python<'_>, path: String) -> PyResult<Self> {
        detach(py, move || formats::huggingface::load(&path)).map(Self::wrap)
    }

    fn save_huggingface(&self, py: Python<'_>, path: String) -> PyResult<()> {
        let t = self.inner.clone();
        detach(py, move || formats::huggingface::save(&t, &path))
    }

    #[staticmethod]
    fn from_sentencepiece(py: Python<'_>, path: String) -> PyResult<Self> {
        detach(py, move || formats::sentencepiece::load(&path)).map(Self::wrap)
    }

    fn encode_ordinary<'py>(
        &self,
        py: Python<'py>,
        text: PyBackedStr,
    ) -> PyResult<Bound<'py, PyList>> {
        let t = self.inner.clone();
        let ids = detach(py, move || Ok(t.encode_ordinary(&text)))?;
        self.list(py, &ids)
    }

    /// `disallowed` None: every special token not in `allowed` is an error when found.
    #[pyo3(signature = (text, allowed, disallowed=None))]
    fn encode<'py>(
        &self,
        py: Python<'py>,
        text: PyBackedStr,
        allowed: Vec<String>,
        disallowed: Option<Vec<String>>,
    ) -> PyResult<Bound<'py, PyList>> {
        let t = self.inner.clone();
        let ids = detach(py, move || {
            t.encode_with(
                &text,
                &refs(&allowed),
                disallowed.as_deref().map(refs).as_deref(),
            )
        })?;
        self.list(py, &ids)
    }

    #[pyo3(signature = (text, allowed, disallowed=None))]
    fn encode_to_numpy<'py>(
        &self,
        py: Python<'py>,
        text: PyBackedStr,
        allowed: Vec<String>,
        disallowed: Option<Vec<String>>,
    ) -> PyResult<Bound<'py, PyArray1<u32>>> {
        let t = self.inner.clone();
        let ids = detach(py, move || {
            t.encode_with(
                &text,
                &refs(&allowed),
                disallowed.as_deref().map(refs).as_deref(),
            )
        })?;
        Ok(PyArray1::from_vec(py, ids))
    }

    #[pyo3(signature = (texts, allowed, disallowed=None, num_threads=None))]
    fn encode_batch(
        &self,
        py: Python<'_>,
        texts: Vec<PyBackedStr>,
        allowed: Vec<String>,
        disallowed: Option<Vec<String>>,
        num_threads: Option<usize>,
    ) -> PyResult<Vec<Py<PyList>>> {
        self.batch(py, &texts, &allowed, disallowed.as_deref(), num_threads)
    }

    #[pyo3(signature = (texts, num_threads=None))]
    fn encode_ordinary_batch(
        &self,
        py: Python<'_>,
        texts: Vec<PyBackedStr>,
        num_threads: Option<usize>,
    ) -> PyResult<Vec<Py<PyList>>> {
        self.batch(py, &texts, &[], Some(&[]), num_threads)
    }

    /// The pieces the pattern splits `text` into (what BPE encodes one by one).
    fn pretokenize(&self, py: Python<'_>, text: PyBackedStr) -> PyResult<Vec<String>> {
        let t = self.inner.clone();
        detach(py, move || {
            Ok(t.pretokenizer().split(&text).map(str::to_string).collect())
        })
    }

    fn decode_bytes<'py>(&self, py: Python<'py>, ids: Vec<u32>) -> PyResult<Bound<'py, PyBytes>> {
        let t = self.inner.clone();
        let bytes = detach(py, move || t.decode_bytes(&ids))?;
        Ok(PyBytes::new(py, &bytes))
    }

    #[getter]
    fn n_vocab(&self) -> usize {
        self.inner.n_vocab()
    }

    #[getter]
    fn pattern(&self) -> String {
        self.inner.pattern().to_string()
    }

    /// "dfa" or "fancy-regex": the engine the pretokenization pattern runs on.
    #[getter]
    fn pattern_engine(&self) -> &'static str {
        self.inner.pretokenizer().engine_name()
    }

    #[getter]
    fn fingerprint(&self) -> String {
        self.inner.fingerprint()
    }

    #[getter]
    fn is_sentencepiece(&self) -> bool {
        self.inner.spm().is_some()
    }

    /// (text, id) pairs in construction order.
    fn special_tokens(&self) -> Vec<(String, u32)> {
        self.inner.special_tokens().to_vec()
    }

    fn token_to_id(&self, token: &[u8]) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    fn id_to_token_bytes<'py>(&self, py: Python<'py>, id: u32) -> PyResult<Bound<'py, PyBytes>> {
        let b = self
            .inner
            .id_to_token_bytes(id)
            .map_err(crate::error::to_py)?;
        Ok(PyBytes::new(py, b))
    }

    /// (id, bytes) of the mergeable tokens in id order (tiktoken's ranks).
    fn mergeable_tokens<'py>(&self, py: Python<'py>) -> Vec<(u32, Bound<'py, PyBytes>)> {
        self.inner
            .mergeable_tokens()
            .into_iter()
            .map(|(i, b)| (i, PyBytes::new(py, b)))
            .collect()
    }

    fn __repr__(&self) -> String {
        format!("{:?}", self.inner)
    }
}

/// The pattern string behind a name ("gpt2", "cl100k", "o200k", "llama3"); other strings unchanged.
#[pyfunction]
fn resolve_pattern(name: &str) -> String {
    tokenmill_core::pretokenize::resolve_pattern(name).to_string()
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PyTokenizer>()?;
    m.add_function(wrap_pyfunction!(resolve_pattern, m)?)
}
