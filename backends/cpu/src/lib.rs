//! The LLVM CPU backend: lowers a fused Griffin graph to one LLVM function per kernel and an
//! execution plan for `griffin-runtime`, then optimises the module for the target CPU and
//! emits object code.

pub mod compile;
pub mod kernels;
pub mod ll;
pub mod lower;

pub use compile::{compile_object, compile_object_bytes, optimised_ir, Jit, TargetCpu};
pub use kernels::linear::Tile;
pub use lower::{lower, Lowered, Options, WeightSlot, WeightsDtype};

use thiserror::Error;

#[derive(Debug, Error)]
pub enum BackendError {
    #[error("CPU backend: {0}")]
    Unsupported(String),
    #[error("CPU backend: graph: {0}")]
    Graph(String),
    #[error("LLVM: {0}")]
    Llvm(String),
}
