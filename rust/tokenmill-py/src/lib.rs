//! tokenmill._core: thin PyO3 wrappers over tokenmill-core. Conversion only; every long call releases
//! the GIL through `utils::detach`, and every error goes through `error::to_py`.

mod bpe_train;
mod error;
mod eval;
mod loader;
mod prepare;
mod tokenizer;
mod utils;

use pyo3::prelude::*;

#[pymodule]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    eval::register(m)?;
    loader::register(m)?;
    tokenizer::register(m)?;
    bpe_train::register(m)?;
    prepare::register(m)?;
    Ok(())
}
