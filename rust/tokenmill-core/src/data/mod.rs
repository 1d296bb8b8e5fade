//! Token data: Megatron-compatible indexed datasets (and, later, packing and sampling).

pub mod mmidx;
