//! Token data: Megatron-compatible indexed datasets, corpus preparation (inputs, manifest, merge)
//! (and, later, packing and sampling).

pub mod inputs;
pub mod manifest;
pub mod mmidx;
pub mod prepare;
