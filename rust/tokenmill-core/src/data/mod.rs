//! Token data: Megatron-compatible indexed datasets, packing, sampling and the loader core.

pub mod loader;
pub mod mmidx;
pub mod packing;
pub mod sampler;
