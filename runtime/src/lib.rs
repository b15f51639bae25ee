//! The minimal runtime of a compiled Griffin model. It takes a prepared, immutable artifact (an
//! execution [`plan::Plan`], kernels resolved by symbol, and a packed weights file), allocates
//! every buffer once (recurrent state included), and runs calls of up to `max_tokens` tokens.
//! Memory does not grow with the length of the text. No LLVM, no compiler.

pub mod cuda;
pub mod exec;
pub mod gpu_plan;
pub mod output;
pub mod pack;
pub mod plan;
pub mod pool;
pub mod safetensors_dir;
pub mod sampling;
pub mod stats;
pub mod text;
pub mod weights;

pub use exec::{Executor, KernelFn};
pub use plan::Plan;

use thiserror::Error;

#[derive(Debug, Error)]
pub enum RuntimeError {
    #[error("{0}")]
    Weights(String),
    #[error("plan: {0}")]
    Plan(String),
    #[error("cannot allocate {0} bytes")]
    OutOfMemory(usize),
    #[error("no token ids given")]
    EmptyIds,
    #[error("token id {id} is out of range: the vocabulary has {vocab} entries (ids 0..{vocab})")]
    TokenOutOfRange { id: u32, vocab: u64 },
    #[error("{0}")]
    Output(String),
    #[error("{0}")]
    Device(String),
    #[error("{tokens} tokens in one call, at most {max}")]
    ChunkTooLong { tokens: usize, max: u64 },
}

/// Token ids a call may take: at least one, each below the vocabulary size.
pub fn check_ids(ids: &[u32], vocab: u64) -> Result<(), RuntimeError> {
    if ids.is_empty() {
        return Err(RuntimeError::EmptyIds);
    }
    match ids.iter().find(|&&id| id as u64 >= vocab) {
        Some(&id) => Err(RuntimeError::TokenOutOfRange { id, vocab }),
        None => Ok(()),
    }
}
