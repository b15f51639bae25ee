//! A PTX interpreter for the subset of PTX this backend writes, so every kernel's numbers are
//! checked on machines without a GPU (CI included) before a GPU ever runs it.
//!
//! Each thread runs on its own until it reaches a `shfl.sync`, a `bar.sync` or its end; a
//! shuffle executes once every lane of the warp waits at the same one (a lane that has left or
//! waits elsewhere is an error: on hardware a full-mask shuffle would be undefined), a barrier
//! releases once every live thread of the block waits at it. Approximate instructions
//! (`ex2.approx`, `rsqrt.approx`, …) are computed exactly in f32, so tests compare against a
//! tolerance that covers the hardware's documented error.
//!
//! `parse` reads a module, `exec` runs a launch (`memory` holds global and shared memory and
//! finds races, `collective` the warp- and warpgroup-wide instructions, `timing` an optional
//! latency model, `requests` optional counts of transactions: bank conflicts, coalescing).

mod collective;
mod exec;
mod memory;
mod parse;
mod requests;
mod sync;
#[cfg(test)]
mod tests;
mod timing;

pub use exec::{run, Launch};
pub use memory::{BlockOrder, Memory};
pub use parse::{Function, Module};
pub use requests::{AccessStats, Cost, CostTable};
pub use timing::Latencies;

/// A failure to parse or run a kernel.
#[derive(Debug, Clone, PartialEq)]
pub struct EmuError(pub String);

impl std::fmt::Display for EmuError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for EmuError {}

pub(super) fn err<T>(m: impl Into<String>) -> Result<T, EmuError> {
    Err(EmuError(m.into()))
}
