//! Token data: Megatron-compatible indexed datasets, corpus preparation (inputs, manifest, merge),
//! and the loader core (sampling, packing, batch rendering).

pub mod inputs;
pub mod loader;
pub mod manifest;
pub mod mmidx;
pub mod packing;
pub mod prepare;
pub mod sampler;
