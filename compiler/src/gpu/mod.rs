//! The GPU path from the compiler's side: lower the optimised decode and prefill graphs to PTX
//! kernels and launch lists (a `GpuProgram`), with its weights packed by the same recipes and
//! code as the CPU path. `EmuEngine` runs a program on the PTX interpreter (`--backend
//! ptx-emu`), so the whole GPU program is checked against the golden cases on machines without
//! a GPU; `CudaEngine` runs it through `griffin_runtime::cuda` (`--backend cuda`).
//!
//! Every buffer is allocated once: weights, carried state (conv windows as rings of K rows,
//! recurrence states, KV rings), activations (pooled by liveness into one arena:
//! `GpuPlan::pool_activations`), the token ids, the chunk's count and the position (kept in
//! device memory so a captured step or chunk can replay).
//!
//! `lowering` walks both graphs into one plan (`lowering/prefill.rs`: the chunk's kernels),
//! `work` counts each launch's bytes and FLOPs for `--profile`, `engines` runs a program on
//! the interpreter or the GPU.

use std::collections::BTreeMap;

use griffin_runtime::gpu_plan::GpuPlan;
use griffin_runtime::pack::pack;

use crate::error::RunError;
use crate::session::Model;

mod engines;
mod lowering;
pub mod sampling;
mod work;

pub use engines::{CudaEngine, EmuEngine, LaunchLatency};
pub use griffin_backend_ptx::tc::{TcConfig, TcInputs, TcMma};
pub use lowering::lower;

/// A compiled decode step: the PTX module and the plan that launches it.
pub struct GpuProgram {
    /// The PTX module holding every kernel.
    pub ptx: String,
    /// Each kernel's PTX, by name (for `--emit-ptx` and inspection).
    pub kernels: BTreeMap<String, String>,
    pub plan: GpuPlan,
}

fn unsupported(m: impl Into<String>) -> RunError {
    RunError::Backend(format!("GPU backend: {}", m.into()))
}

/// Tokens per prefill chunk on the GPU by default (buffers are sized for it). Every chunk
/// streams every weight once: a 2048-token prompt in chunks of 64 would read the 2B model's
/// 5.4 GB 32 times (at least 40 ms at 4.25 TB/s); in chunks of 512, 4 times; in one chunk,
/// once. How the tensor-core projections' blocks fill the GPU's waves at this size is
/// `tc::tc_k_split`'s business. For the 2B shape at 512: a 31.5 MB arena of activations
/// (pooled) and 524 MB for every row's logits; at 2048 a 183.3 MB arena in all (activations,
/// state, KV rings) and 2.10 GB of logits, allocated only where every row is asked for
/// (`griffinc eval`, `--logits-out`).
pub const PREFILL_CHUNK: u32 = 2048;

/// Choices of the GPU lowering.
#[derive(Clone, Copy, Debug)]
pub struct GpuOptions {
    /// Tokens per prefill chunk; `None` runs prompts as decode steps.
    pub prefill_chunk: Option<u32>,
    /// How projection and embedding matrices are stored (other weights are f32).
    pub weights: griffin_backend_cpu::WeightsDtype,
    /// Prefill projections with bf16 weights on tensor cores (`mma.sync`) where they fit.
    pub tensor_cores: bool,
    /// How those projections give their inputs to the tensor cores.
    pub tc_inputs: TcInputs,
    /// Which tensor-core instruction the projections run on (`wgmma` needs sm_90a).
    pub tc_mma: TcMma,
    /// Parts of the inputs a plain tensor-core projection is split into (partial sums, then a
    /// reduction launch): `None` as `tc_k_split`'s cost model chooses, `Some(n)` n parts
    /// wherever they fit (1: never split).
    pub k_parts: Option<u32>,
}

impl Default for GpuOptions {
    fn default() -> GpuOptions {
        GpuOptions {
            prefill_chunk: Some(PREFILL_CHUNK),
            weights: griffin_backend_cpu::WeightsDtype::AsStored,
            tensor_cores: true,
            tc_inputs: TcInputs::Split,
            tc_mma: TcMma::Sync,
            k_parts: None,
        }
    }
}

/// Lowers the decode graph of `model` (after the default pipeline) to a GPU program, and its
/// prefill graph for chunks of up to `PREFILL_CHUNK` tokens.
pub fn lower_decode(model: &Model) -> Result<GpuProgram, RunError> {
    lower(model, &GpuOptions::default())
}

/// Packs the program's weights from the checkpoint; returns the bytes and writes each weight's
/// offset into `program.weights`.
pub fn pack_weights(program: &mut GpuProgram, model: &Model) -> Result<Vec<u8>, RunError> {
    pack(&mut program.plan.weights, &model.checkpoint).map_err(RunError::Backend)
}
