//! The device sampler's kernels (`griffin_backend_ptx::sample`) built with the host sampler's
//! likelihood constants, so both draw the same ids for a seed.

use griffin_backend_ptx::sample::{kernels, layout, ExpConstants, SampleKernel};
use griffin_runtime::sampling::{exp, DEVICE_CONFIG_BYTES, DEVICE_RNG_OFFSET};

// The host writes the configuration the kernels read (`Sampler::device_config`): the two
// crates' layouts agree where they meet.
const _: () = assert!(layout::CONFIG_BYTES as usize == DEVICE_CONFIG_BYTES);
const _: () = assert!(layout::RNG as u64 == DEVICE_RNG_OFFSET);

/// The host sampler's constants, for the device's copy of its likelihood.
pub fn exp_constants() -> ExpConstants {
    ExpConstants {
        cutoff: exp::CUTOFF,
        log2_e: exp::LOG2_E,
        ln2_hi: exp::LN2_HI,
        ln2_lo: exp::LN2_LO,
        round: exp::ROUND,
        poly: exp::POLY,
    }
}

/// The sampler's launches for a vocabulary of `vocab` tokens, kernel names starting `prefix`.
pub fn sampler_kernels(prefix: &str, vocab: u32) -> Vec<SampleKernel> {
    kernels(prefix, vocab, &exp_constants())
}
