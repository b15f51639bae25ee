//! The CPU backend from the compiler's side: lower the optimised prefill graph, pack every
//! weight the kernels read (params converted to their storage dtype, weight expressions
//! evaluated once by the interpreter), compile, and run through the runtime.

use griffin_backend_cpu::ll::Storage;
use griffin_backend_cpu::{lower, Jit, Lowered, Options, TargetCpu, WeightsDtype};
use griffin_ir::{DType, Op};
use griffin_runtime::plan::{BufferKind, Plan};
use griffin_runtime::weights::{align, Fnv, Weights};
use griffin_runtime::Executor;

use crate::checkpoint::widen_to_f32;
use crate::error::RunError;
use crate::interp::Interpreter;
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

fn bf16_bytes(values: &[f32]) -> Vec<u8> {
    values
        .iter()
        .flat_map(|v| half::bf16::from_f32(*v).to_bits().to_le_bytes())
        .collect()
}

fn f32_bytes(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

/// Lowers and packs `model` (its graphs already optimised by the default pipeline).
pub fn build(model: &Model, opts: &CpuOptions) -> Result<Artifact, RunError> {
    let config = &model.checkpoint.config;
    let backend = |e: griffin_backend_cpu::BackendError| RunError::Backend(e.to_string());
    let lowered = lower(
        &model.prefill,
        &Options {
            max_tokens: opts.prefill_chunk.max(1) as u64,
            vocab_size: config.vocab_size as u64,
            bos_token_id: config.bos_token_id,
            eos_token_id: config.eos_token_id,
            weights: opts.weights,
        },
    )
    .map_err(backend)?;
    let mut plan = lowered.plan.clone();

    let expressions: Vec<_> = lowered
        .weights
        .iter()
        .filter(|w| !matches!(model.prefill.node(w.value.node).op, Op::Param { .. }))
        .map(|w| w.value)
        .collect();
    let interp = Interpreter::new(&model.checkpoint);
    let evaluated = interp
        .evaluate_weights(&model.prefill, &expressions)
        .map_err(RunError::Interp)?;
    let mut evaluated = expressions.into_iter().zip(evaluated);

    let mut data = Vec::new();
    for slot in &lowered.weights {
        let bytes = match &model.prefill.node(slot.value.node).op {
            Op::Param { tensor, .. } => {
                let entry = model
                    .checkpoint
                    .entry(tensor)
                    .expect("validated checkpoint");
                let raw = model
                    .checkpoint
                    .bytes(tensor)
                    .expect("validated checkpoint");
                match (entry.dtype, slot.storage) {
                    (DType::F32, Storage::F32) | (DType::BF16, Storage::Bf16) => raw.to_vec(),
                    (d, Storage::F32) => f32_bytes(&widen_to_f32(d, raw)),
                    (d, Storage::Bf16) => bf16_bytes(&widen_to_f32(d, raw)),
                }
            }
            _ => {
                let (_, tensor) = evaluated.next().expect("one value per expression slot");
                match slot.storage {
                    Storage::F32 => f32_bytes(tensor.floats()),
                    // Only exact in bf16 (lowering keeps concatenations of bf16 params narrow).
                    Storage::Bf16 => bf16_bytes(tensor.floats()),
                }
            }
        };
        let offset = align(data.len() as u64);
        data.resize(offset as usize, 0);
        data.extend_from_slice(&bytes);
        if let BufferKind::Weight {
            offset: o,
            bytes: b,
            ..
        } = &mut plan.buffers[slot.buffer].kind
        {
            *o = offset;
            *b = bytes.len() as u64;
        }
    }
    let mut hash = Fnv::default();
    hash.update(&data);
    plan.weights_hash = hash.hex();
    Ok(Artifact {
        plan,
        lowered,
        weights: data,
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
        let jit = Jit::new(&artifact.lowered.module, &opts.target_cpu)
            .map_err(|e| RunError::Backend(e.to_string()))?;
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

    fn step(&mut self, id: u32, on_logits: &mut dyn FnMut(&[f32])) -> Result<(), RunError> {
        on_logits(self.executor.call(&[id]).map_err(runtime)?);
        Ok(())
    }
}
