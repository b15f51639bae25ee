//! Kernel generators, one per fused op kind. Each documents its argument order; the lowering
//! passes buffers in that order.

pub mod attention;
pub mod linear;
pub mod misc;
pub mod rg_lru;
