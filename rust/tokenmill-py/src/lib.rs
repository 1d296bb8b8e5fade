//! tokenmill._core: thin PyO3 wrappers over tokenmill-core. Conversion only; every long call releases
//! the GIL through `utils::detach`, and every error goes through `error::to_py`.

mod error;
mod eval;
mod loader;
mod prepare;
mod tokenizer;
mod train;
mod utils;

use pyo3::prelude::*;

#[pymodule]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    eval::register(m)?;
    loader::register(m)?;
    tokenizer::register(m)?;
    train::register(m)?;
    prepare::register(m)?;
    Ok(())
}
