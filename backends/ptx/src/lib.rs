//! The PTX backend (first part): a small typed PTX writer and the decode projection kernel.
//! Kernels target sm_90 with PTX ISA 8.0 and are checked by a real `ptxas` in the tests.
//! Not yet: the recurrent, attention, gather and prefill kernels, the CUDA runtime
//! (cudarc) and executables for `--target cuda`.

pub mod attention;
pub mod builder;
pub mod emu;
pub mod gemv;
pub mod math;
pub mod misc;
pub mod rg_lru;

/// A module of kernels: the header, then each kernel.
pub fn module(kernels: &[String]) -> String {
    let mut out = String::from(builder::HEADER);
    for k in kernels {
        out.push('\n');
        out.push_str(k);
    }
    out
}
