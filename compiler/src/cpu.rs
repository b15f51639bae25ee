//! The CPU backend from the compiler's side: lower the optimised prefill graph, pack every
//! weight the kernels read (by the plan's recipes: params converted to their storage dtype,
//! weight expressions computed once), compile, and run through the runtime.

use griffin_backend_cpu::{lower, Jit, Lowered, Options, TargetCpu, WeightsDtype};
use griffin_runtime::pack::pack_with_progress;
use griffin_runtime::plan::Plan;
use griffin_runtime::weights::Weights;
use griffin_runtime::Executor;

use crate::error::RunError;
use crate::progress;
use crate::session::{Engine, Model};

#[derive(Clone, Debug)]
pub struct CpuOptions {
    pub threads: usize,
    pub prefill_chunk: usize,
    pub target_cpu: TargetCpu,
    pub weights: WeightsDtype,
}

impl Default for CpuOptions {
    fn default() -> CpuOptions {
        CpuOptions {
            threads: std::thread::available_parallelism().map_or(1, |n| n.get()),
            prefill_chunk: 64,
            target_cpu: TargetCpu::Host,
            weights: WeightsDtype::AsStored,
        }
    }
}

/// A compiled model: the plan, the kernels' LLVM module and the packed weights.
pub struct Artifact {
    pub plan: Plan,
    pub lowered: Lowered,
    pub weights: Vec<u8>,
}

/// Lowers and packs `model` (its graphs already optimised by the default pipeline).
pub fn build(model: &Model, opts: &CpuOptions) -> Result<Artifact, RunError> {
    let config = &model.checkpoint.config;
    let backend = |e: griffin_backend_cpu::BackendError| RunError::Backend(e.to_string());
    let stage = progress::spinner("lowering", "the prefill graph to CPU kernels");
    let lowered = lower(
        &model.prefill,
        &Options {
            max_tokens: opts.prefill_chunk.max(1) as u64,
            vocab_size: config.vocab_size as u64,
            bos_token_id: config.bos_token_id,
            eos_token_id: config.eos_token_id,
            pad_token_id: config.pad_token_id,
            weights: opts.weights,
            tile: opts.target_cpu.tile(),
        },
    )
    .map_err(backend)?;
    tracing::info!(
        kernels = lowered.plan.launches.len(),
        buffers = lowered.plan.buffers.len(),
        "lowered"
    );
    drop(stage);
    // The same packing code an executable runs for `--pack-weights-from`.
    let mut plan = lowered.plan.clone();
    let stage = progress::counted("packing", "weights", 0, "tensors");
    let weights = pack_with_progress(&mut plan, &model.checkpoint, &mut |done, total| {
        stage.set_total(total as u64);
        stage.set(done as u64);
    })
    .map_err(RunError::Backend)?;
    tracing::info!(bytes = weights.len(), "packed weights");
    drop(stage);
    Ok(Artifact {
        plan,
        lowered,
        weights,
    })
}

/// The compiled model loaded in this process.
pub struct CpuEngine {
    _jit: Jit,
    executor: Executor,
    chunk: usize,
}

impl CpuEngine {
    pub fn new(model: &Model, opts: &CpuOptions) -> Result<CpuEngine, RunError> {
        let artifact = build(model, opts)?;
        let stage = progress::spinner("compiling", "kernels with LLVM");
        let jit = Jit::new(&artifact.lowered.module, &opts.target_cpu)
            .map_err(|e| RunError::Backend(e.to_string()))?;
        drop(stage);
        let weights = Weights::from_bytes(&artifact.weights);
        let executor = Executor::new(artifact.plan, &|s| jit.kernel(s), weights, opts.threads)
            .map_err(|e| RunError::Backend(e.to_string()))?;
        Ok(CpuEngine {
            _jit: jit,
            executor,
            chunk: opts.prefill_chunk.max(1),
        })
    }

    pub fn executor(&mut self) -> &mut Executor {
        &mut self.executor
    }
}

fn runtime(e: griffin_runtime::RuntimeError) -> RunError {
    RunError::Backend(e.to_string())
}

impl Engine for CpuEngine {
    fn reset(&mut self) {
        self.executor.reset();
    }

    fn prefill(&mut self, ids: &[u32], on_logits: &mut dyn FnMut(&[f32])) -> Result<(), RunError> {
        self.executor.check_ids(ids).map_err(runtime)?;
        for chunk in ids.chunks(self.chunk) {
            on_logits(self.executor.call(chunk).map_err(runtime)?);
        }
        Ok(())
    }

    fn prefill_last(&mut self, ids: &[u32]) -> Result<Vec<f32>, RunError> {
        self.executor.check_ids(ids).map_err(runtime)?;
        let mut last = &[][..];
        for chunk in ids.chunks(self.chunk) {
            last = self.executor.call_last(chunk).map_err(runtime)?;
        }
        Ok(last.to_vec())
    }

    fn step(&mut self, id: u32, on_logits: &mut dyn FnMut(&[f32])) -> Result<(), RunError> {
        on_logits(self.executor.call(&[id]).map_err(runtime)?);
        Ok(())
    }
}
