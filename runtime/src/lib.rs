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
    #[error(
        "the model needs {} of device memory (weights {}, buffers {}); the GPU has {} free of {}",
        size(weights + buffers), size(*weights), size(*buffers), size(*free), size(*total)
    )]
    DeviceTooSmall {
        weights: u64,
        buffers: u64,
        free: u64,
        total: u64,
    },
}

/// A byte count for messages: `5.40 GB`, `183.3 MB`, `12.0 kB`, `512 bytes` (powers of 10).
pub fn size(bytes: u64) -> String {
    match bytes {
        0..1_000 => format!("{bytes} bytes"),
        1_000..1_000_000 => format!("{:.1} kB", bytes as f64 / 1e3),
        1_000_000..1_000_000_000 => format!("{:.1} MB", bytes as f64 / 1e6),
        _ => format!("{:.2} GB", bytes as f64 / 1e9),
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_read_in_the_unit_of_their_magnitude() {
        assert_eq!(size(512), "512 bytes");
        assert_eq!(size(12_000), "12.0 kB");
        assert_eq!(size(183_300_000), "183.3 MB");
        assert_eq!(size(5_400_000_000), "5.40 GB");
        let e = RuntimeError::DeviceTooSmall {
            weights: 17_170_000_000,
            buffers: 255_800_000,
            free: 15_900_000_000,
            total: 16_000_000_000,
        };
        assert_eq!(
            e.to_string(),
            "the model needs 17.43 GB of device memory (weights 17.17 GB, buffers 255.8 MB); the GPU has 15.90 GB free of 16.00 GB"
        );
    }
}
