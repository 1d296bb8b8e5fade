//! Token data: Megatron-compatible indexed datasets, corpus preparation (inputs, manifest, merge),
//! packing, sampling and the loader core.

pub mod inputs;
pub mod jsonl;
pub mod loader;
pub mod manifest;
pub mod mmidx;
pub mod packing;
pub mod prepare;
pub mod sampler;
