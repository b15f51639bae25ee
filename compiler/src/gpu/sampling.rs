//! The device sampler's kernels (`griffin_backend_ptx::sample`) built with the host sampler's
//! likelihood constants, so both draw the same ids for a seed.

use griffin_backend_ptx::sample::{kernels, ExpConstants, SampleKernel};
use griffin_runtime::sampling::exp;

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
